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
  // seed (here and in the FFN ops): the dropout RNG's seed, a one-element int64 tensor on the
  // inputs' device drawn inside the graph (torch.compile needs no .item(), CUDA no host sync: the
  // CPU kernels read it on the host, the CUDA kernels on the device); None when dropout_p == 0.
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, bool is_causal, "
      "float dropout_p, Tensor? seed) -> (Tensor out, Tensor lse)");
  m.def(
      "attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? mask, "
      "float scale, bool is_causal, float dropout_p, Tensor? seed) -> (Tensor dq, Tensor dk, Tensor dv)");

  // The dropout keep mask (bool, true = kept) the kernels draw for `seed` and probability p, for a
  // tensor of like's shape (only its shape is read), read as (streams, rows, cols): (B, Hq, Nq, Nk)
  // for attention and (M, hidden) for the FFN. The RNG is csrc/dropout_rng.h (Philox 4x32-10, the
  // one of every backend); tests use this op to reproduce a kernel's dropout exactly.
  m.def("dropout_mask(Tensor like, float p, Tensor seed) -> Tensor");

  // Softmax along the last dim of x (..., N), any strides. mask: None or a view of x's shape.
  // is_causal masks column j > row i, i the index along dim -2. log: log_softmax (a fully masked
  // row gives -inf there, 0 for softmax). The backward takes the saved output y only.
  m.def("softmax_fwd(Tensor x, Tensor? mask, float scale, bool is_causal, bool log) -> Tensor");
  m.def("softmax_bwd(Tensor dy, Tensor y, float scale, bool log) -> Tensor");

  // The FFN's epilogue around its first GEMM: h = x·w1ᵀ (M, H1) -> dropout(act(h + bias)), (M, H1)
  // or (M, H1/2) for the gated activations (gate columns first). The backward gives d(h + bias).
  m.def("ffn_act_fwd(Tensor h, Tensor? bias, str activation, float dropout_p, Tensor? seed) -> Tensor");
  m.def("ffn_act_bwd(Tensor grad, Tensor h, Tensor? bias, str activation, float dropout_p, Tensor? seed) -> Tensor");

  // Norms over the last dim of a 2-D x (M, N). With residual, s = x + residual is normalised and
  // returned as residual_out; without, residual_out is an empty tensor. mean/rstd: float32 (M,).
  m.def(
      "layer_norm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps) "
      "-> (Tensor y, Tensor residual_out, Tensor mean, Tensor rstd)");
  m.def(
      "layer_norm_bwd(Tensor dy, Tensor s, Tensor? weight, Tensor mean, Tensor rstd, bool has_bias) "
      "-> (Tensor ds, Tensor dweight, Tensor dbias)");
  m.def(
      "rms_norm_fwd(Tensor x, Tensor? residual, Tensor? weight, float eps) "
      "-> (Tensor y, Tensor residual_out, Tensor rstd)");
  m.def("rms_norm_bwd(Tensor dy, Tensor s, Tensor? weight, Tensor rstd) -> (Tensor ds, Tensor dweight)");
}
