// FFN epilogue: bias + activation (+ gate) + dropout, forward and backward, one thread per
// output element of the gated product or of the plain activation. float32 arithmetic, written
// precisely enough for the float32 path (no tanh.approx, no 1 + erf cancellation).
#include <algorithm>

#include "common.cuh"
#include "ffn.cuh"

namespace fastattn {
namespace cuda {
namespace {

// The elementary functions of csrc/activations.h's formulas on the device. tanh through expm1:
// accurate near 0 and unaffected by --use_fast_math (which maps tanhf to the 11-bit tanh.approx); the
// normal CDF through erfc, without the 1 + erf cancellation for negative x.
struct DeviceMath {
  static FASTATTN_HOST_DEVICE float exp(float x) { return expf(x); }
  static FASTATTN_HOST_DEVICE float tanh(float u) {
    const float em = expm1f(-2.f * fabsf(u));
    return copysignf(-em / (2.f + em), u);
  }
  static FASTATTN_HOST_DEVICE float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }
  static FASTATTN_HOST_DEVICE float normal_cdf(float x) { return 0.5f * erfcf(-x * kSqrtHalf); }
};

// Value and derivative of the element-wise activation (gated ones: of their gate's function).
__device__ __forceinline__ ActValue activate(Activation act, float x) { return ::fastattn::activate<DeviceMath>(act, x); }

// (row, col) of a flat index over (rows, cols).
struct RowCol {
  int64_t row, col;
};

__device__ __forceinline__ RowCol row_col(int64_t idx, int64_t cols) { return {idx / cols, idx % cols}; }

__device__ __forceinline__ float dropout_factor(const FfnActParams& p, int64_t row, int64_t col) {
  if (!p.dropout.active) return 1.f;
  // element (row, col) of the (M, hidden) activation: Philox stream 0 (csrc/dropout_rng.h)
  return dropout_bits(dropout_seed_of(p.dropout), 0u, static_cast<uint32_t>(row), static_cast<uint64_t>(col)) >=
                 p.dropout.threshold
             ? p.dropout.scale
             : 0.f;
}

// h[row, col] + bias[col] in float32.
template <typename T>
__device__ __forceinline__ float biased(const FfnActParams& p, int64_t row, int64_t col) {
  float v = to_float(static_cast<const T*>(p.h)[row * p.h_stride_row + col * p.h_stride_col]);
  if (p.bias != nullptr) v += to_float(static_cast<const T*>(p.bias)[col * p.bias_stride]);
  return v;
}

template <typename T>
__global__ void __launch_bounds__(256) ffn_act_fwd_kernel(const FfnActParams p) {
  const int64_t total = p.rows * p.hidden_out;
  const bool gated = is_gated(p.activation);
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const RowCol rc = row_col(idx, p.hidden_out);
    float y = activate(p.activation, biased<T>(p, rc.row, rc.col)).value;
    if (gated) y *= biased<T>(p, rc.row, rc.col + p.hidden_out);
    static_cast<T*>(p.out)[idx] = from_float<T>(y * dropout_factor(p, rc.row, rc.col));
  }
}

template <typename T>
__global__ void __launch_bounds__(256) ffn_act_bwd_kernel(const FfnActParams p) {
  const int64_t total = p.rows * p.hidden_out;
  const bool gated = is_gated(p.activation);
  T* dh = static_cast<T*>(p.out);
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const RowCol rc = row_col(idx, p.hidden_out);
    const float g = to_float(static_cast<const T*>(p.grad)[rc.row * p.grad_stride_row + rc.col * p.grad_stride_col]) *
                    dropout_factor(p, rc.row, rc.col);
    const ActValue a = activate(p.activation, biased<T>(p, rc.row, rc.col));
    if (gated) {
      const float up = biased<T>(p, rc.row, rc.col + p.hidden_out);
      dh[rc.row * p.hidden_in + rc.col] = from_float<T>(g * up * a.derivative);
      dh[rc.row * p.hidden_in + rc.col + p.hidden_out] = from_float<T>(g * a.value);
    } else {
      dh[idx] = from_float<T>(g * a.derivative);
    }
  }
}

template <typename Kernel>
cudaError_t launch_elementwise(Kernel kernel, const FfnActParams& params, cudaStream_t stream) {
  const int64_t total = params.rows * params.hidden_out;
  if (total == 0) return cudaSuccess;
  FfnActParams p = params;
  p.dropout = make_dropout(p.dropout_p, p.seed);
  const int64_t blocks = std::min<int64_t>((total + 255) / 256, kMaxGridBlocks);
  return launch_kernel(kernel, blocks, 256, 0, stream, p);
}

bool valid(const FfnActParams& p) {
  if (p.rows < 0 || p.hidden_in < 0) return false;
  return p.hidden_out == (is_gated(p.activation) ? p.hidden_in / 2 : p.hidden_in) &&
         (!is_gated(p.activation) || p.hidden_in % 2 == 0);
}

}  // namespace

cudaError_t launch_ffn_act_fwd(const FfnActParams& params, cudaStream_t stream) {
  if (!valid(params)) return cudaErrorInvalidValue;
  switch (params.dtype) {
    case DType::kFloat16:
      return launch_elementwise(ffn_act_fwd_kernel<__half>, params, stream);
    case DType::kBFloat16:
      return launch_elementwise(ffn_act_fwd_kernel<__nv_bfloat16>, params, stream);
    case DType::kFloat32:
      return launch_elementwise(ffn_act_fwd_kernel<float>, params, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t launch_ffn_act_bwd(const FfnActParams& params, cudaStream_t stream) {
  if (!valid(params) || params.grad == nullptr) return cudaErrorInvalidValue;
  switch (params.dtype) {
    case DType::kFloat16:
      return launch_elementwise(ffn_act_bwd_kernel<__half>, params, stream);
    case DType::kBFloat16:
      return launch_elementwise(ffn_act_bwd_kernel<__nv_bfloat16>, params, stream);
    case DType::kFloat32:
      return launch_elementwise(ffn_act_bwd_kernel<float>, params, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace fastattn
