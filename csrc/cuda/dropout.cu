// The dropout keep mask as the attention and FFN kernels draw it (see dropout.cuh).
#include <algorithm>

#include "common.cuh"
#include "dropout.cuh"

namespace fastattn {
namespace cuda {
namespace {

__global__ void __launch_bounds__(256) dropout_mask_kernel(bool* mask, int64_t numel, const DropoutDraw draw) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    mask[i] = dropout_bits(dropout_key_of(draw), static_cast<uint64_t>(i)) >= draw.threshold;
  }
}

}  // namespace

cudaError_t launch_dropout_mask(bool* mask, int64_t numel, double p, const int64_t* seed, cudaStream_t stream) {
  if (numel <= 0) return cudaSuccess;
  const DropoutDraw draw = make_dropout(p, seed);
  const int64_t blocks = std::min<int64_t>((numel + 255) / 256, kMaxGridBlocks);
  return launch_kernel(dropout_mask_kernel, blocks, 256, 0, stream, mask, numel, draw);
}

}  // namespace cuda
}  // namespace fastattn
