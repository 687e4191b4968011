// LayerNorm / RMSNorm forward and backward: a block per row (grid-stride over rows), float32
// statistics with two passes for the variance (no E[x²] - E[x]² cancellation).
#include <algorithm>

#include "common.cuh"
#include "norm.cuh"

namespace fastattn {
namespace cuda {
namespace {

constexpr int kColsInRegisters = 8;  // backward: per-thread column partials kept in registers up to this

// Threads per row: about 4 columns each, a multiple of 32, at most 1024.
int threads_for(int64_t cols) {
  const int64_t want = (cols + 3) / 4;
  return static_cast<int>(std::min<int64_t>(1024, std::max<int64_t>(32, (want + 31) / 32 * 32)));
}

template <typename T>
__global__ void __launch_bounds__(1024) norm_fwd_kernel(const NormFwdParams p) {
  __shared__ float scratch[32];
  const T* x = static_cast<const T*>(p.x);
  const T* residual = static_cast<const T*>(p.residual);
  const T* weight = static_cast<const T*>(p.weight);
  const T* bias = static_cast<const T*>(p.bias);
  const float inv_cols = 1.f / static_cast<float>(p.cols);
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    // s as the output dtype holds it (the sum is rounded once, as torch's x + residual).
    auto load_s = [&](int64_t j) -> float {
      const float v = to_float(x[row * p.x_stride_row + j * p.x_stride_col]);
      if (residual == nullptr) return v;
      return round_to<T>(v + to_float(residual[row * p.residual_stride_row + j * p.residual_stride_col]));
    };
    float acc = 0.f;
    for (int64_t j = threadIdx.x; j < p.cols; j += blockDim.x) {
      const float v = load_s(j);
      if (residual != nullptr) static_cast<T*>(p.residual_out)[row * p.cols + j] = from_float<T>(v);
      acc += p.rms ? v * v : v;
    }
    acc = block_sum(acc, scratch);
    float mean = 0.f, rstd;
    if (p.rms) {
      rstd = rsqrtf(acc * inv_cols + p.eps);
    } else {
      mean = acc * inv_cols;
      float var = 0.f;
      for (int64_t j = threadIdx.x; j < p.cols; j += blockDim.x) {
        const float d = load_s(j) - mean;
        var += d * d;
      }
      var = block_sum(var, scratch);
      rstd = rsqrtf(var * inv_cols + p.eps);
    }
    if (threadIdx.x == 0) {
      if (p.mean != nullptr) p.mean[row] = mean;
      p.rstd[row] = rstd;
    }
    T* y = static_cast<T*>(p.y) + row * p.cols;
    for (int64_t j = threadIdx.x; j < p.cols; j += blockDim.x) {
      float v = (load_s(j) - mean) * rstd;
      if (weight != nullptr) v *= to_float(weight[j * p.weight_stride]);
      if (bias != nullptr) v += to_float(bias[j * p.bias_stride]);
      y[j] = from_float<T>(v);
    }
  }
}

// First backward pass. Per row: g = dy·w, x̂ = (s - mean)·rstd,
//   layer: ds = rstd·(g - mean(g) - x̂·mean(g·x̂))     rms: ds = rstd·(g - x̂·mean(g·x̂))
// and per column dweight += dy·x̂, dbias += dy into this block's row of `partial` (kept in
// registers while N <= kColsInRegisters·blockDim.x; thread t always owns columns t + k·blockDim.x,
// so the global fallback needs no atomics either).
template <typename T>
__global__ void __launch_bounds__(1024) norm_bwd_kernel(const NormBwdParams p) {
  __shared__ float scratch[32];
  const T* dy = static_cast<const T*>(p.dy);
  const T* s = static_cast<const T*>(p.s);
  const T* weight = static_cast<const T*>(p.weight);
  const bool want_params = p.dweight != nullptr || p.dbias != nullptr;
  const bool in_registers = p.cols <= static_cast<int64_t>(kColsInRegisters) * blockDim.x;
  float* partial_dw = want_params ? p.partial + blockIdx.x * p.cols : nullptr;
  float* partial_db = want_params ? p.partial + (p.partial_rows + blockIdx.x) * p.cols : nullptr;
  const float inv_cols = 1.f / static_cast<float>(p.cols);

  float dw_reg[kColsInRegisters], db_reg[kColsInRegisters];
#pragma unroll
  for (int k = 0; k < kColsInRegisters; ++k) dw_reg[k] = db_reg[k] = 0.f;
  if (want_params && !in_registers) {
    for (int64_t j = threadIdx.x; j < p.cols; j += blockDim.x) partial_dw[j] = partial_db[j] = 0.f;
  }

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const float mean = p.rms ? 0.f : p.mean[row];
    const float rstd = p.rstd[row];
    auto grad_at = [&](int64_t j) -> float { return to_float(dy[row * p.dy_stride_row + j * p.dy_stride_col]); };
    auto xhat_at = [&](int64_t j) -> float {
      return (to_float(s[row * p.s_stride_row + j * p.s_stride_col]) - mean) * rstd;
    };
    auto weight_at = [&](int64_t j) -> float {
      return weight != nullptr ? to_float(weight[j * p.weight_stride]) : 1.f;
    };

    float sum_g = 0.f, sum_gx = 0.f;
    auto visit = [&](int64_t j, float& dw, float& db) {
      const float g0 = grad_at(j), xhat = xhat_at(j), g = g0 * weight_at(j);
      sum_g += g;
      sum_gx += g * xhat;
      dw += g0 * xhat;
      db += g0;
    };
    if (in_registers) {
#pragma unroll
      for (int k = 0; k < kColsInRegisters; ++k) {
        const int64_t j = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
        if (j < p.cols) visit(j, dw_reg[k], db_reg[k]);
      }
    } else {
      for (int64_t j = threadIdx.x; j < p.cols; j += blockDim.x) {
        float dw = 0.f, db = 0.f;
        visit(j, dw, db);
        if (want_params) {
          partial_dw[j] += dw;
          partial_db[j] += db;
        }
      }
    }
    sum_g = block_sum(sum_g, scratch);
    sum_gx = block_sum(sum_gx, scratch);
    const float mean_g = p.rms ? 0.f : sum_g * inv_cols, mean_gx = sum_gx * inv_cols;
    T* ds = static_cast<T*>(p.ds) + row * p.cols;
    for (int64_t j = threadIdx.x; j < p.cols; j += blockDim.x) {
      const float g = grad_at(j) * weight_at(j);
      ds[j] = from_float<T>(rstd * (g - mean_g - xhat_at(j) * mean_gx));
    }
  }

  if (want_params && in_registers) {
#pragma unroll
    for (int k = 0; k < kColsInRegisters; ++k) {
      const int64_t j = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
      if (j < p.cols) {
        partial_dw[j] = dw_reg[k];
        partial_db[j] = db_reg[k];
      }
    }
  }
}

// Second backward pass: dweight[j] = Σ_b partial_dw[b, j], dbias likewise (coalesced over j).
template <typename T>
__global__ void __launch_bounds__(256) norm_param_grad_kernel(const NormBwdParams p) {
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < p.cols;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float dw = 0.f, db = 0.f;
    for (int64_t b = 0; b < p.partial_rows; ++b) {
      dw += p.partial[b * p.cols + j];
      db += p.partial[(p.partial_rows + b) * p.cols + j];
    }
    if (p.dweight != nullptr) static_cast<T*>(p.dweight)[j] = from_float<T>(dw);
    if (p.dbias != nullptr) static_cast<T*>(p.dbias)[j] = from_float<T>(db);
  }
}

template <typename T>
cudaError_t launch_fwd(const NormFwdParams& p, cudaStream_t stream) {
  return launch_kernel(norm_fwd_kernel<T>, std::min(p.rows, kMaxGridBlocks), threads_for(p.cols), 0, stream, p);
}

template <typename T>
cudaError_t launch_bwd(const NormBwdParams& p, cudaStream_t stream) {
  const bool want_params = p.dweight != nullptr || p.dbias != nullptr;
  // With parameter gradients the grid is exactly partial_rows blocks (one partial row each).
  const int64_t blocks = want_params ? p.partial_rows : std::min(p.rows, kMaxGridBlocks);
  cudaError_t err = launch_kernel(norm_bwd_kernel<T>, blocks, threads_for(p.cols), 0, stream, p);
  if (err != cudaSuccess || !want_params) return err;
  return launch_kernel(norm_param_grad_kernel<T>, std::min<int64_t>((p.cols + 255) / 256, kMaxGridBlocks), 256, 0,
                       stream, p);
}

template <typename Params, typename Launch16, typename LaunchBf16, typename Launch32>
cudaError_t by_dtype(const Params& p, cudaStream_t stream, Launch16 f16, LaunchBf16 bf16, Launch32 f32) {
  switch (p.dtype) {
    case DType::kFloat16:
      return f16(p, stream);
    case DType::kBFloat16:
      return bf16(p, stream);
    case DType::kFloat32:
      return f32(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_norm_fwd(const NormFwdParams& params, cudaStream_t stream) {
  if (params.rows == 0 || params.cols == 0) return cudaSuccess;
  if (params.rstd == nullptr || (!params.rms && params.mean == nullptr)) return cudaErrorInvalidValue;
  return by_dtype(params, stream, launch_fwd<__half>, launch_fwd<__nv_bfloat16>, launch_fwd<float>);
}

cudaError_t launch_norm_bwd(const NormBwdParams& params, cudaStream_t stream) {
  const bool want_params = params.dweight != nullptr || params.dbias != nullptr;
  if (params.cols == 0) return cudaSuccess;
  if (want_params && (params.partial == nullptr || params.partial_rows < 1 || params.partial_rows > params.rows)) {
    // rows == 0 with parameter gradients asked for: they are zeros, which the glue fills.
    return params.rows == 0 ? cudaSuccess : cudaErrorInvalidValue;
  }
  if (params.rows == 0) return cudaSuccess;
  return by_dtype(params, stream, launch_bwd<__half>, launch_bwd<__nv_bfloat16>, launch_bwd<float>);
}

}  // namespace cuda
}  // namespace fastattn
