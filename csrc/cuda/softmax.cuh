// Softmax kernels: parameter structs and host launchers (defined in softmax.cu).
//
// Semantics (schema in csrc/fastattn.cpp): along the last dim of x (..., N), any strides,
// y = softmax(x·scale + mask) (or log_softmax), computed in float32, written in x's dtype to a
// contiguous (rows, N) output. mask: a view of x's shape (stride 0 where broadcast), bool
// (true = keep) or floating (added). causal masks column j > i, i the index along dim -2.
// A fully masked row gives 0 (softmax) or -inf (log_softmax).
//
// Backward from the saved output y alone, dx also contiguous:
//   softmax:     dx = scale · y · (dy - Σ dy·y)
//   log_softmax: dx = scale · (dy - exp(y) · Σ dy), and 0 where y = -inf (a masked entry)
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "types.h"

namespace fastattn {
namespace cuda {

// Rows are the leading dims of x; at most this many (the glue flattens longer shapes).
constexpr int kMaxRowDims = 8;

// Leading-dim sizes shared by the row tensors and each tensor's strides.
struct RowLayout {
  int ndim = 0;                        // number of leading dims (x.dim() - 1)
  int64_t sizes[kMaxRowDims] = {};     // sizes of the leading dims
  int64_t rows = 0, cols = 0;          // product of sizes, and N
};

struct RowStrides {
  const void* ptr = nullptr;
  int64_t strides[kMaxRowDims] = {};  // per leading dim, in elements
  int64_t col_stride = 1;
};

struct SoftmaxFwdParams {
  RowLayout layout;
  RowStrides x;
  RowStrides mask;  // ptr == nullptr: no mask
  MaskKind mask_kind = MaskKind::kNone;
  void* y = nullptr;  // (rows, N) contiguous
  float scale = 1.f;
  bool causal = false, log = false;
  DType dtype = DType::kFloat32;
};

struct SoftmaxBwdParams {
  RowLayout layout;
  RowStrides dy, y;
  void* dx = nullptr;  // (rows, N) contiguous
  float scale = 1.f;
  bool log = false;
  DType dtype = DType::kFloat32;
};

cudaError_t launch_softmax_fwd(const SoftmaxFwdParams& params, cudaStream_t stream);
cudaError_t launch_softmax_bwd(const SoftmaxBwdParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastattn
