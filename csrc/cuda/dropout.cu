// The dropout keep mask as the attention and FFN kernels draw it (see dropout.cuh).
#include <algorithm>

#include "common.cuh"
#include "dropout.cuh"

namespace fastattn {
namespace cuda {
namespace {

// One thread per element i of the contiguous (streams, rows, cols) mask.
__global__ void __launch_bounds__(256)
    dropout_mask_kernel(bool* mask, int64_t numel, int64_t rows, int64_t cols, const DropoutDraw draw) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t col = i % cols, row_of_all = i / cols;
    const uint32_t row = static_cast<uint32_t>(row_of_all % rows), stream = static_cast<uint32_t>(row_of_all / rows);
    mask[i] = dropout_bits(dropout_seed_of(draw), stream, row, static_cast<uint64_t>(col)) >= draw.threshold;
  }
}

}  // namespace

cudaError_t launch_dropout_mask(bool* mask, int64_t streams, int64_t rows, int64_t cols, double p, const int64_t* seed,
                                cudaStream_t stream) {
  const int64_t numel = streams * rows * cols;
  if (numel <= 0) return cudaSuccess;
  const DropoutDraw draw = make_dropout(p, seed);
  const int64_t blocks = std::min<int64_t>((numel + 255) / 256, kMaxGridBlocks);
  return launch_kernel(dropout_mask_kernel, blocks, 256, 0, stream, mask, numel, rows, cols, draw);
}

}  // namespace cuda
}  // namespace fastattn
