// LayerNorm and RMSNorm over the last dim of a 2-D x (M, N): parameter structs and launchers
// (defined in norm.cu).
//
// Semantics (schema in csrc/fastattn.cpp): with a residual, s = x + residual (rounded to x's
// dtype, as torch would store it) is normalised and written to residual_out. layer_norm:
// y = (s - mean)·rstd·weight + bias; rms_norm: y = s·rstd·weight; mean, rstd float32 (M,).
// Backward from s, mean and rstd: ds (M, N) and the parameter gradients, reduced without atomics:
// each of `partial_rows` blocks sums its rows into a float32 row of `partial`, then a second
// kernel adds those rows. Outputs contiguous; float32 arithmetic.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>

#include "types.h"

namespace fastattn {
namespace cuda {

struct NormFwdParams {
  const void* x = nullptr;
  int64_t x_stride_row = 0, x_stride_col = 1;
  const void* residual = nullptr;  // nullptr: none
  int64_t residual_stride_row = 0, residual_stride_col = 1;
  const void* weight = nullptr;  // nullptr: none
  int64_t weight_stride = 1;
  const void* bias = nullptr;  // nullptr: none (always for rms_norm)
  int64_t bias_stride = 1;
  void* y = nullptr;             // (M, N) contiguous
  void* residual_out = nullptr;  // (M, N) contiguous, written when residual != nullptr
  float* mean = nullptr;         // (M,), layer_norm only
  float* rstd = nullptr;         // (M,)
  int64_t rows = 0, cols = 0;
  float eps = 1e-5f;
  bool rms = false;
  DType dtype = DType::kFloat32;
};

struct NormBwdParams {
  const void* dy = nullptr;
  int64_t dy_stride_row = 0, dy_stride_col = 1;
  const void* s = nullptr;  // the normalised input (x + residual)
  int64_t s_stride_row = 0, s_stride_col = 1;
  const void* weight = nullptr;  // nullptr: none
  int64_t weight_stride = 1;
  const float* mean = nullptr;  // layer_norm only
  const float* rstd = nullptr;
  void* ds = nullptr;       // (M, N) contiguous
  void* dweight = nullptr;  // (N,) or nullptr
  void* dbias = nullptr;    // (N,) or nullptr (layer_norm with a bias)
  float* partial = nullptr;  // scratch float32 (2, partial_rows, N) when dweight or dbias is asked for
  int64_t partial_rows = 0;  // from norm_bwd_partial_rows
  int64_t rows = 0, cols = 0;
  bool rms = false;
  DType dtype = DType::kFloat32;
};

// Blocks of the backward's first pass: each owns a row of the partial sums.
inline int64_t norm_bwd_partial_rows(int64_t rows, int sm_count) {
  return std::max<int64_t>(1, std::min<int64_t>(rows, 4 * static_cast<int64_t>(std::max(sm_count, 1))));
}

cudaError_t launch_norm_fwd(const NormFwdParams& params, cudaStream_t stream);
cudaError_t launch_norm_bwd(const NormBwdParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastattn
