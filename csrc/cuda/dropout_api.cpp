// torch glue of fastattn::dropout_mask for the CUDA dispatch key (schema in csrc/fastattn.cpp):
// the keep mask the CUDA (and CPU) kernels draw, drawn on the GPU.
//
// Syntax check without CUDA torch: see csrc/cuda/README.md (`make check-cuda` runs it).
#ifdef FASTATTN_WITH_CUDA

#include <torch/library.h>

#include "api_utils.h"
#include "dropout.cuh"

namespace fastattn {
namespace cuda {
namespace {

at::Tensor dropout_mask_cuda(const at::Tensor& like, double p, const at::Tensor& seed) {
  check_cuda_tensor(like, "like");
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "p must be in [0, 1), got ", p);
  const DeviceGuard guard(like.device());
  at::Tensor mask = at::empty(like.sizes(), like.options().dtype(at::kBool));
  check_launch(launch_dropout_mask(mask.data_ptr<bool>(), mask.numel(), p, seed_pointer(seed, p, like, "like"),
                                   current_stream(like)),
               "dropout_mask");
  return mask;
}

}  // namespace
}  // namespace cuda
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) { m.impl("dropout_mask", &fastattn::cuda::dropout_mask_cuda); }

#endif  // FASTATTN_WITH_CUDA
