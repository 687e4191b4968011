// fastattn._C: the op schemas of the fastattn library and the Python module stub.
//
// Kernels register per dispatch key elsewhere: csrc/cpu/*.cpp (CPU) and csrc/cuda/*_api.cpp
// (CUDA). Fake implementations and autograd are registered from Python (fastattn/ext.py).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing fastattn._C loads this shared library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastattn, m) {
  // Attention, canonical layout (B, H, N, D), any strides. mask: None or a (B, Hq, Nq, Nk) view,
  // bool (true = attend) or floating (added). lse: float32 (B, Hq, Nq), natural log; +inf for a
  // fully masked row (its output is 0, and exp(s - lse) = 0 in the backward).
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, bool is_causal, "
      "float dropout_p, int seed) -> (Tensor out, Tensor lse)");
  m.def(
      "attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? mask, "
      "float scale, bool is_causal, float dropout_p, int seed) -> (Tensor dq, Tensor dk, Tensor dv)");
}
