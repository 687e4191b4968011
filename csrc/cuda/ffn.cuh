// The FFN epilogue around its first GEMM: parameter struct and launchers (defined in ffn.cu).
//
// Semantics (schema in csrc/fastattn.cpp): h (M, H1) any strides, bias (H1,) or none.
// Forward: out = dropout(act(h + bias)), (M, H1), or (M, H1/2) for the gated activations whose
// gate is the first half of the columns: act(gate)·up. Backward: d(h + bias), (M, H1), from the
// upstream gradient (M, Hout). Dropout draws out[r, c] at Philox stream 0, row r, column c with
// csrc/dropout_rng.h (as every backend) and scales kept ones by 1/(1 - dropout_p). Outputs are
// contiguous; float32 arithmetic.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../activations.h"
#include "types.h"

namespace fastattn {
namespace cuda {

// The activation codes and gating are csrc/activations.h's (shared with the CPU kernels and, by
// number, with fastattn/activations.py).
using ::fastattn::Activation;
using ::fastattn::is_gated;

struct FfnActParams {
  const void* h = nullptr;
  int64_t h_stride_row = 0, h_stride_col = 1;
  const void* bias = nullptr;  // nullptr: no bias
  int64_t bias_stride = 1;
  const void* grad = nullptr;  // backward only: (M, Hout)
  int64_t grad_stride_row = 0, grad_stride_col = 1;
  void* out = nullptr;  // forward (M, Hout), backward (M, H1); contiguous
  int64_t rows = 0, hidden_in = 0, hidden_out = 0;  // M, H1, Hout (= H1 / 2 when gated)
  Activation activation = Activation::kGelu;
  double dropout_p = 0.0;
  const int64_t* seed = nullptr;  // device pointer to the int64 seed (csrc/fastattn.cpp)
  DropoutDraw dropout;  // derived from dropout_p and seed by the launchers
  DType dtype = DType::kFloat32;
};

cudaError_t launch_ffn_act_fwd(const FfnActParams& params, cudaStream_t stream);
cudaError_t launch_ffn_act_bwd(const FfnActParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastattn
