// Row softmax / log_softmax, forward and backward. A row is handled by one warp (N <= 1024,
// several rows per block) or by a whole block (longer rows, looping over the columns). The
// forward makes two passes over the row: an online (max, sum) pass and the writing pass; the
// backward one reduction pass and the writing pass. All arithmetic in float32.
#include <algorithm>

#include "common.cuh"
#include "softmax.cuh"

namespace fastattn {
namespace cuda {
namespace {


// Element offsets of a row in two strided tensors, and the row's index along dim -2.
struct RowOffsets {
  int64_t first = 0, second = 0, index_m2 = 0;
};

__device__ __forceinline__ RowOffsets row_offsets(const RowLayout& layout, int64_t row, const int64_t* strides_first,
                                                  const int64_t* strides_second) {
  RowOffsets off;
  for (int d = layout.ndim - 1; d >= 0; --d) {
    const int64_t idx = row % layout.sizes[d];
    row /= layout.sizes[d];
    if (d == layout.ndim - 1) off.index_m2 = idx;
    off.first += idx * strides_first[d];
    off.second += idx * strides_second[d];
  }
  return off;
}

// Running max (log2 units) and Σ exp2(x - max) of a set of values; -inf max and sum 0 = empty set. A NaN
// value makes the sum NaN (fmaxf drops it from the max), which every merge keeps: NaN in, NaN out.
struct MaxSum {
  float max, sum;
};

__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.max, b.max);
  if (m == -kInf) return {m, a.sum + b.sum};  // 0 for empty sets, NaN kept
  return {m, a.sum * exp2f(a.max - m) + b.sum * exp2f(b.max - m)};
}

__device__ __forceinline__ void accumulate(MaxSum& s, float x) {
  if (x == -kInf) return;
  if (x > s.max) {
    s.sum = s.sum * exp2f(s.max - x) + 1.f;
    s.max = x;
  } else {
    s.sum += exp2f(x - s.max);
  }
}

__device__ __forceinline__ MaxSum warp_merge(MaxSum s) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const MaxSum other = {__shfl_xor_sync(0xffffffffu, s.max, offset), __shfl_xor_sync(0xffffffffu, s.sum, offset)};
    s = merge(s, other);
  }
  return s;
}

// Whole-row reductions: the warp's (kWarpPerRow) or the block's; every thread gets the result.
template <bool kWarpPerRow>
__device__ __forceinline__ MaxSum row_merge(MaxSum s) {
  s = warp_merge(s);
  if (kWarpPerRow) return s;
  __shared__ float scratch_max[32], scratch_sum[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // the previous row's readers are done
  if (lane == 0) {
    scratch_max[warp] = s.max;
    scratch_sum[warp] = s.sum;
  }
  __syncthreads();
  MaxSum total = {-kInf, 0.f};
  for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) total = merge(total, {scratch_max[w], scratch_sum[w]});
  return total;
}

template <bool kWarpPerRow>
__device__ __forceinline__ float row_sum(float v) {
  if (kWarpPerRow) return group_sum<32>(v);
  __shared__ float scratch[32];
  return block_sum(v, scratch);
}

// Rows handled by this thread's warp or block: first row, step, and the thread's column start/step.
struct RowSchedule {
  int64_t first_row, row_step;
  int col0, col_step;
};

template <bool kWarpPerRow>
__device__ __forceinline__ RowSchedule row_schedule() {
  RowSchedule s;
  if (kWarpPerRow) {
    const int rows_per_block = blockDim.x >> 5;
    s.first_row = static_cast<int64_t>(blockIdx.x) * rows_per_block + (threadIdx.x >> 5);
    s.row_step = static_cast<int64_t>(gridDim.x) * rows_per_block;
    s.col0 = threadIdx.x & 31;
    s.col_step = 32;
  } else {
    s.first_row = blockIdx.x;
    s.row_step = gridDim.x;
    s.col0 = threadIdx.x;
    s.col_step = blockDim.x;
  }
  return s;
}

template <typename T, bool kWarpPerRow>
__global__ void __launch_bounds__(1024) softmax_fwd_kernel(const SoftmaxFwdParams p) {
  const RowSchedule sched = row_schedule<kWarpPerRow>();
  const int64_t cols = p.layout.cols;
  const T* x = static_cast<const T*>(p.x.ptr);
  const bool has_mask = p.mask_kind != MaskKind::kNone;
  // A row loop whose trip count is the same for every thread of a block (block mode) or warp.
  for (int64_t row = sched.first_row; row < p.layout.rows; row += sched.row_step) {
    const RowOffsets off = row_offsets(p.layout, row, p.x.strides, p.mask.strides);
    auto score_log2 = [&](int64_t j) -> float {
      if (p.causal && j > off.index_m2) return -kInf;
      float v = to_float(x[off.first + j * p.x.col_stride]) * p.scale;
      if (has_mask) v += mask_bias(p.mask.ptr, p.mask_kind, off.second + j * p.mask.col_stride);
      return v * kLog2e;
    };

    MaxSum s = {-kInf, 0.f};
    for (int64_t j = sched.col0; j < cols; j += sched.col_step) accumulate(s, score_log2(j));
    s = row_merge<kWarpPerRow>(s);

    const bool empty = s.max == -kInf && s.sum == 0.f;  // fully masked row (an all-NaN one has sum NaN)
    const float inv_sum = empty ? 0.f : 1.f / s.sum;
    const float log_sum = empty ? 0.f : log2f(s.sum);
    T* y = static_cast<T*>(p.y) + row * cols;
    for (int64_t j = sched.col0; j < cols; j += sched.col_step) {
      const float v = score_log2(j);
      float out;
      if (p.log) {
        out = empty ? -kInf : (v - s.max - log_sum) * kLn2;
      } else {
        out = empty ? 0.f : exp2f(v - s.max) * inv_sum;
      }
      y[j] = from_float<T>(out);
    }
  }
}

template <typename T, bool kWarpPerRow>
__global__ void __launch_bounds__(1024) softmax_bwd_kernel(const SoftmaxBwdParams p) {
  const RowSchedule sched = row_schedule<kWarpPerRow>();
  const int64_t cols = p.layout.cols;
  const T* dy = static_cast<const T*>(p.dy.ptr);
  const T* y = static_cast<const T*>(p.y.ptr);
  for (int64_t row = sched.first_row; row < p.layout.rows; row += sched.row_step) {
    const RowOffsets off = row_offsets(p.layout, row, p.dy.strides, p.y.strides);
    float partial = 0.f;
    for (int64_t j = sched.col0; j < cols; j += sched.col_step) {
      const float g = to_float(dy[off.first + j * p.dy.col_stride]);
      partial += p.log ? g : g * to_float(y[off.second + j * p.y.col_stride]);
    }
    const float total = row_sum<kWarpPerRow>(partial);
    T* dx = static_cast<T*>(p.dx) + row * cols;
    for (int64_t j = sched.col0; j < cols; j += sched.col_step) {
      const float g = to_float(dy[off.first + j * p.dy.col_stride]);
      const float out = to_float(y[off.second + j * p.y.col_stride]);
      float grad;
      if (p.log) {
        grad = p.scale * (g - exp2f(out * kLog2e) * total);  // torch's formula: dy·scale where y = -inf
      } else {
        grad = p.scale * out * (g - total);
      }
      dx[j] = from_float<T>(grad);
    }
  }
}

// Warp per row up to 1024 columns (8 rows per block), else a block per row.
template <typename Params, typename KernelWarp, typename KernelBlock>
cudaError_t launch_rows(const Params& p, KernelWarp warp_kernel, KernelBlock block_kernel, cudaStream_t stream) {
  const int64_t rows = p.layout.rows, cols = p.layout.cols;
  if (rows == 0 || cols == 0) return cudaSuccess;
  if (cols <= 1024) {
    constexpr int kRowsPerBlock = 8;
    return launch_kernel(warp_kernel, std::min((rows + kRowsPerBlock - 1) / kRowsPerBlock, kMaxGridBlocks),
                         32 * kRowsPerBlock, 0, stream, p);
  }
  const int threads = cols <= 8192 ? 256 : 1024;
  return launch_kernel(block_kernel, std::min(rows, kMaxGridBlocks), threads, 0, stream, p);
}

template <typename T>
cudaError_t launch_fwd(const SoftmaxFwdParams& p, cudaStream_t stream) {
  return launch_rows(p, softmax_fwd_kernel<T, true>, softmax_fwd_kernel<T, false>, stream);
}

template <typename T>
cudaError_t launch_bwd(const SoftmaxBwdParams& p, cudaStream_t stream) {
  return launch_rows(p, softmax_bwd_kernel<T, true>, softmax_bwd_kernel<T, false>, stream);
}

}  // namespace

cudaError_t launch_softmax_fwd(const SoftmaxFwdParams& params, cudaStream_t stream) {
  if (params.layout.ndim < 0 || params.layout.ndim > kMaxRowDims) return cudaErrorInvalidValue;
  switch (params.dtype) {
    case DType::kFloat16:
      return launch_fwd<__half>(params, stream);
    case DType::kBFloat16:
      return launch_fwd<__nv_bfloat16>(params, stream);
    case DType::kFloat32:
      return launch_fwd<float>(params, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t launch_softmax_bwd(const SoftmaxBwdParams& params, cudaStream_t stream) {
  if (params.layout.ndim < 0 || params.layout.ndim > kMaxRowDims) return cudaErrorInvalidValue;
  switch (params.dtype) {
    case DType::kFloat16:
      return launch_bwd<__half>(params, stream);
    case DType::kBFloat16:
      return launch_bwd<__nv_bfloat16>(params, stream);
    case DType::kFloat32:
      return launch_bwd<float>(params, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace fastattn
