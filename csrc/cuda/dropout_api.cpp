// torch glue of fastattn::dropout_mask for the CUDA dispatch key (schema in csrc/fastattn.cpp):
// the keep mask the CUDA (and CPU) kernels draw, drawn on the GPU.
//
// Syntax check without CUDA torch: see csrc/cuda/README.md (`make check-cuda` runs it).
#ifdef FASTATTN_WITH_CUDA

#include <torch/library.h>

#include "api_utils.h"
#include "../dropout_rng.h"
#include "dropout.cuh"

namespace fastattn {
namespace cuda {
namespace {

at::Tensor dropout_mask_cuda(const at::Tensor& like, double p, const at::Tensor& seed) {
  check_cuda_tensor(like, "like");
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "p must be in [0, 1), got ", p);
  const DeviceGuard guard(like.device());
  at::Tensor mask = at::empty(like.sizes(), like.options().dtype(at::kBool));
  if (mask.numel() == 0) return mask;
  // the shape read as (streams, rows, cols), as csrc/dropout_rng.h says
  const int64_t cols = like.dim() >= 1 ? like.size(-1) : 1, rows = like.dim() >= 2 ? like.size(-2) : 1;
  const int64_t streams = mask.numel() / (rows * cols);
  TORCH_CHECK_VALUE(static_cast<uint64_t>(streams) <= kDropoutMaxRows &&
                        static_cast<uint64_t>(rows) <= kDropoutMaxRows && static_cast<uint64_t>(cols) <= kDropoutMaxCols,
                    "like: dropout addresses at most 2^32 streams and rows and 2^34 columns, got shape ", like.sizes());
  check_launch(launch_dropout_mask(mask.data_ptr<bool>(), streams, rows, cols, p, seed_pointer(seed, p, like, "like"),
                                   current_stream(like)),
               "dropout_mask");
  return mask;
}

}  // namespace
}  // namespace cuda
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) { m.impl("dropout_mask", &fastattn::cuda::dropout_mask_cuda); }

#endif  // FASTATTN_WITH_CUDA
