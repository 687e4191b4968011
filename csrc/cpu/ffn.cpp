// The FFN's fused epilogue on the CPU: bias + activation (+ gating) + dropout after the first GEMM,
// and its backward. The GEMMs themselves run in ATen (BLAS) around these ops (fastattn/ext.py).
//
// h = x w1^T (M, H1), any strides. Plain activations: a = act(h + bias), (M, H1). Gated ones
// (swiglu: silu, geglu: exact gelu) split the columns, the gate's first: a = act(gate) * up,
// (M, H1 / 2). Dropout keeps a[row, col] by the RNG of dropout_rng.h at offset row * hidden + col and
// scales kept values by 1 / (1 - p). The backward returns d(h + bias), (M, H1), in h's dtype.
#include <torch/library.h>

#include <cmath>
#include <string>

#include "common.h"

namespace fastattn::cpu {
namespace {

enum class Act { kRelu, kGelu, kGeluTanh, kSilu, kSwiglu, kGeglu };

Act parse_activation(const std::string& name) {
  if (name == "relu") return Act::kRelu;
  if (name == "gelu") return Act::kGelu;
  if (name == "gelu_tanh") return Act::kGeluTanh;
  if (name == "silu") return Act::kSilu;
  if (name == "swiglu") return Act::kSwiglu;
  if (name == "geglu") return Act::kGeglu;
  TORCH_CHECK_VALUE(false, "fastattn ffn: activation must be relu, gelu, gelu_tanh, silu, swiglu or geglu, got '",
                    name, "'");
}

bool is_gated(Act act) { return act == Act::kSwiglu || act == Act::kGeglu; }

// The function under the gate: swiglu gates with silu, geglu with the exact gelu.
Act base_activation(Act act) { return act == Act::kSwiglu ? Act::kSilu : act == Act::kGeglu ? Act::kGelu : act; }

constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kTanhScale = 0.79788456080286536f;  // sqrt(2 / pi)
constexpr float kTanhCubic = 0.044715f;

float sigmoid(float x) { return 1.f / (1.f + std::exp(-x)); }

float activate(Act act, float x) {
  switch (act) {
    case Act::kRelu:
      return x > 0.f ? x : 0.f;
    case Act::kGelu:
      return 0.5f * x * (1.f + std::erf(x * kSqrtHalf));
    case Act::kGeluTanh:
      return 0.5f * x * (1.f + std::tanh(kTanhScale * (x + kTanhCubic * x * x * x)));
    default:  // silu
      return x * sigmoid(x);
  }
}

// d act / dx.
float activate_grad(Act act, float x) {
  switch (act) {
    case Act::kRelu:
      return x > 0.f ? 1.f : 0.f;
    case Act::kGelu:
      return 0.5f * (1.f + std::erf(x * kSqrtHalf)) + x * kInvSqrt2Pi * std::exp(-0.5f * x * x);
    case Act::kGeluTanh: {
      const float t = std::tanh(kTanhScale * (x + kTanhCubic * x * x * x));
      return 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * kTanhScale * (1.f + 3.f * kTanhCubic * x * x);
    }
    default: {  // silu
      const float s = sigmoid(x);
      return s * (1.f + x * (1.f - s));
    }
  }
}

struct Epilogue {
  Act act;
  int64_t rows, width, hidden;  // width: columns of h; hidden: columns of a
  bool dropout;
  uint64_t key;
  uint32_t threshold;
  float keep_scale;

  Epilogue(const at::Tensor& h, const std::string& activation, double p, int64_t seed) {
    act = parse_activation(activation);
    rows = h.size(0), width = h.size(1);
    TORCH_CHECK_VALUE(!is_gated(act) || width % 2 == 0, "fastattn ffn: gated activation ", activation,
                      " needs an even number of columns in h, got ", width);
    hidden = is_gated(act) ? width / 2 : width;
    TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "fastattn ffn: dropout_p must be in [0, 1)");
    dropout = p > 0.0;
    key = dropout_key(static_cast<uint64_t>(seed));
    threshold = dropout_threshold(p);
    keep_scale = static_cast<float>(1.0 / (1.0 - p));
  }
  float factor(int64_t row, int64_t col) const {
    if (!dropout) return 1.f;
    return dropout_bits(key, static_cast<uint64_t>(row * hidden + col)) >= threshold ? keep_scale : 0.f;
  }
};

void check_epilogue_inputs(const at::Tensor& h, const c10::optional<at::Tensor>& bias) {
  check_dtype(h, "h");
  TORCH_CHECK_VALUE(h.dim() == 2, "fastattn ffn: h must be 2-D (M, H1), got ", h.sizes());
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == h.size(1), "fastattn ffn: bias must have shape (",
                      h.size(1), ",), got ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == h.scalar_type(), "fastattn ffn: bias must have h's dtype");
  }
}

// Row r of h + bias as float32 into dst (width values).
template <typename T>
void load_biased_row(float* dst, const T* h, int64_t h_stride, const T* bias, int64_t bias_stride, int64_t width) {
  for (int64_t c = 0; c < width; ++c) dst[c] = static_cast<float>(h[c * h_stride]);
  if (bias)
    for (int64_t c = 0; c < width; ++c) dst[c] += static_cast<float>(bias[c * bias_stride]);
}

template <typename T>
void epilogue_forward(const Epilogue& e, const at::Tensor& h, const c10::optional<at::Tensor>& bias, at::Tensor& a) {
  const T* h_data = h.const_data_ptr<T>();
  const T* bias_data = bias.has_value() ? bias->const_data_ptr<T>() : nullptr;
  const int64_t bias_stride = bias.has_value() ? bias->stride(0) : 0;
  T* a_data = a.data_ptr<T>();
  const Act base = base_activation(e.act);
  at::parallel_for(0, e.rows, std::max<int64_t>(1, 16384 / e.width), [&](int64_t begin, int64_t end) {
    std::vector<float> pre(static_cast<size_t>(e.width));
    for (int64_t r = begin; r < end; ++r) {
      load_biased_row(pre.data(), h_data + r * h.stride(0), h.stride(1), bias_data, bias_stride, e.width);
      T* out = a_data + r * e.hidden;
      for (int64_t c = 0; c < e.hidden; ++c) {
        float value = activate(base, pre[c]);
        if (is_gated(e.act)) value *= pre[c + e.hidden];
        out[c] = static_cast<T>(value * e.factor(r, c));
      }
    }
  });
}

template <typename T>
void epilogue_backward(const Epilogue& e, const at::Tensor& grad, const at::Tensor& h,
                       const c10::optional<at::Tensor>& bias, at::Tensor& dh) {
  const T* g_data = grad.const_data_ptr<T>();
  const T* h_data = h.const_data_ptr<T>();
  const T* bias_data = bias.has_value() ? bias->const_data_ptr<T>() : nullptr;
  const int64_t bias_stride = bias.has_value() ? bias->stride(0) : 0;
  T* dh_data = dh.data_ptr<T>();
  const Act base = base_activation(e.act);
  at::parallel_for(0, e.rows, std::max<int64_t>(1, 16384 / e.width), [&](int64_t begin, int64_t end) {
    std::vector<float> pre(static_cast<size_t>(e.width));
    for (int64_t r = begin; r < end; ++r) {
      load_biased_row(pre.data(), h_data + r * h.stride(0), h.stride(1), bias_data, bias_stride, e.width);
      const T* g = g_data + r * grad.stride(0);
      T* out = dh_data + r * e.width;
      for (int64_t c = 0; c < e.hidden; ++c) {
        const float da = static_cast<float>(g[c * grad.stride(1)]) * e.factor(r, c);
        const float x = pre[c];
        if (is_gated(e.act)) {
          const float up = pre[c + e.hidden];
          out[c] = static_cast<T>(da * up * activate_grad(base, x));
          out[c + e.hidden] = static_cast<T>(da * activate(base, x));
        } else {
          out[c] = static_cast<T>(da * activate_grad(base, x));
        }
      }
    }
  });
}

}  // namespace

at::Tensor ffn_act_fwd(const at::Tensor& h, const c10::optional<at::Tensor>& bias, c10::string_view activation,
                       double dropout_p, int64_t seed) {
  check_epilogue_inputs(h, bias);
  const Epilogue e(h, std::string(activation), dropout_p, seed);
  at::Tensor a = new_output({e.rows, e.hidden}, h.options());
  if (a.numel() == 0) return a;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "fastattn_ffn_act_fwd",
                                  [&] { epilogue_forward<scalar_t>(e, h, bias, a); });
  return a;
}

at::Tensor ffn_act_bwd(const at::Tensor& grad, const at::Tensor& h, const c10::optional<at::Tensor>& bias,
                       c10::string_view activation, double dropout_p, int64_t seed) {
  check_epilogue_inputs(h, bias);
  const Epilogue e(h, std::string(activation), dropout_p, seed);
  TORCH_CHECK_VALUE(grad.sizes() == at::IntArrayRef({e.rows, e.hidden}), "fastattn ffn_act_bwd: grad must have shape (",
                    e.rows, ", ", e.hidden, "), got ", grad.sizes());
  TORCH_CHECK_TYPE(grad.scalar_type() == h.scalar_type(), "fastattn ffn_act_bwd: grad must have h's dtype");
  at::Tensor dh = new_output(h.sizes(), h.options());
  if (dh.numel() == 0) return dh;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "fastattn_ffn_act_bwd",
                                  [&] { epilogue_backward<scalar_t>(e, grad, h, bias, dh); });
  return dh;
}

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("ffn_act_fwd", &ffn_act_fwd);
  m.impl("ffn_act_bwd", &ffn_act_bwd);
}

}  // namespace fastattn::cpu
