// The FFN's fused epilogue on the CPU: bias + activation (+ gating) + dropout after the first GEMM,
// and its backward. The GEMMs themselves run in ATen (BLAS) around these ops (fastattn/ext.py).
//
// h = x w1^T (M, H1), any strides. Plain activations: a = act(h + bias), (M, H1). Gated ones
// (swiglu: silu, geglu: exact erf gelu, geglu_tanh: tanh-approximated gelu) split the columns, the gate's first: a = act(gate) * up,
// (M, H1 / 2). Dropout keeps a[row, col] by the Philox RNG of dropout_rng.h (stream 0, row, col) and
// scales kept values by 1 / (1 - p). The backward returns d(h + bias), (M, H1), in h's dtype.
#include <torch/library.h>

#include <cmath>
#include <string>
#include <utility>

#include "../activation_arg.h"
#include "../activations.h"
#include "common.h"
#include "simd.h"

namespace fastattn::cpu {
namespace {

using Act = ::fastattn::Activation;

// The elementary functions of csrc/activations.h's formulas: the branch-free simd:: ones, so that the
// row loops vectorise.
struct SimdMath {
  static FASTATTN_INLINE float exp(float x) { return simd::exp(x); }
  static FASTATTN_INLINE float tanh(float x) { return simd::tanh(x); }
  static FASTATTN_INLINE float sigmoid(float x) { return simd::sigmoid(x); }
  static FASTATTN_INLINE float normal_cdf(float x) { return 0.5f * (1.f + simd::erf(x * kSqrtHalf)); }
};

template <Act A>
FASTATTN_INLINE float activate(float x) {
  return ::fastattn::activate<A, SimdMath>(x).value;
}

template <Act A>
FASTATTN_INLINE float activate_grad(float x) {
  return ::fastattn::activate<A, SimdMath>(x).derivative;
}

// One row of the forward: a = act(pre) (up == nullptr) or act(pre) * up (gated), n values.
template <Act A>
FASTATTN_CLONES void forward_row(float* a, const float* pre, const float* up, int64_t n) {
  if (up == nullptr) {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) a[c] = activate<A>(pre[c]);
  } else {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) a[c] = activate<A>(pre[c]) * up[c];
  }
}

// One row of the backward, da the incoming gradient (dropout already applied): plain, d = da * act'(pre)
// into dpre; gated, dpre = da * up * act'(gate) and dup = da * act(gate).
template <Act A>
FASTATTN_CLONES void backward_row(float* dpre, float* dup, const float* da, const float* pre, const float* up,
                                  int64_t n) {
  if (up == nullptr) {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) dpre[c] = da[c] * activate_grad<A>(pre[c]);
  } else {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) {
      dpre[c] = da[c] * up[c] * activate_grad<A>(pre[c]);
      dup[c] = da[c] * activate<A>(pre[c]);
    }
  }
}

using ForwardRow = void (*)(float*, const float*, const float*, int64_t);
using BackwardRow = void (*)(float*, float*, const float*, const float*, const float*, int64_t);

// The row functions for an activation (gated ones use their base function on the gate).
std::pair<ForwardRow, BackwardRow> row_functions(Act act) {
  switch (base_activation(act)) {
    case Act::kRelu:
      return {&forward_row<Act::kRelu>, &backward_row<Act::kRelu>};
    case Act::kGelu:
      return {&forward_row<Act::kGelu>, &backward_row<Act::kGelu>};
    case Act::kGeluTanh:
      return {&forward_row<Act::kGeluTanh>, &backward_row<Act::kGeluTanh>};
    default:
      return {&forward_row<Act::kSilu>, &backward_row<Act::kSilu>};
  }
}

struct Epilogue {
  Act act;
  int64_t rows, width, hidden;  // width: columns of h; hidden: columns of a
  bool dropout;
  uint64_t seed;
  uint32_t threshold;
  float keep_scale;

  Epilogue(const at::Tensor& h, c10::string_view activation, double p, int64_t seed_) {
    act = activation_arg(activation);
    rows = h.size(0), width = h.size(1);
    TORCH_CHECK_VALUE(!is_gated(act) || width % 2 == 0, "fastattn ffn: gated activation ", kActivationNames[static_cast<int>(act)],
                      " needs an even number of columns in h, got ", width);
    hidden = is_gated(act) ? width / 2 : width;
    TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "fastattn ffn: dropout_p must be in [0, 1)");
    dropout = p > 0.0;
    seed = static_cast<uint64_t>(seed_);
    threshold = dropout_threshold(p);
    if (dropout) check_dropout_extent(1, rows, hidden, "ffn");
    keep_scale = static_cast<float>(1.0 / (1.0 - p));
  }
  // Multiplies row `row` of the activation (or of its gradient) by the dropout factors: element
  // (row, c) of the (M, hidden) activation, stream 0 (dropout_rng.h).
  void apply_dropout(float* values, int64_t row) const {
    if (!dropout) return;
    const float scale = keep_scale;
    dropout_row_keep(seed, threshold, 0u, static_cast<uint32_t>(row), 0, hidden,
                     [values, scale](int64_t c, bool kept) { values[c] *= kept ? scale : 0.f; });
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

// Row r of h + bias as float32 (width values).
template <typename T>
void load_biased_row(float* dst, const at::Tensor& h, const float* bias, int64_t r) {
  load_row(dst, h.const_data_ptr<T>() + r * h.stride(0), h.size(1), h.stride(1));
  if (bias == nullptr) return;
  const int64_t width = h.size(1);
#pragma omp simd
  for (int64_t c = 0; c < width; ++c) dst[c] += bias[c];
}

// The bias as float32 once, shared by the rows (empty without bias).
template <typename T>
std::vector<float> bias_as_float(const c10::optional<at::Tensor>& bias) {
  if (!bias.has_value()) return {};
  std::vector<float> out(static_cast<size_t>(bias->size(0)));
  load_row(out.data(), bias->const_data_ptr<T>(), bias->size(0), bias->stride(0));
  return out;
}

int64_t grain_rows(int64_t width) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1)); }

template <typename T>
void epilogue_forward(const Epilogue& e, const at::Tensor& h, const c10::optional<at::Tensor>& bias, at::Tensor& a) {
  const std::vector<float> bias_f = bias_as_float<T>(bias);
  const float* bias_data = bias_f.empty() ? nullptr : bias_f.data();
  const ForwardRow forward = row_functions(e.act).first;
  const bool gated = is_gated(e.act);
  T* a_data = a.data_ptr<T>();
  at::parallel_for(0, e.rows, grain_rows(e.width), [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(static_cast<size_t>(e.width + e.hidden));
    float* pre = buffer.data();
    float* out = pre + e.width;
    for (int64_t r = begin; r < end; ++r) {
      load_biased_row<T>(pre, h, bias_data, r);
      forward(out, pre, gated ? pre + e.hidden : nullptr, e.hidden);
      e.apply_dropout(out, r);
      store_row(a_data + r * e.hidden, out, e.hidden);
    }
  });
}

template <typename T>
void epilogue_backward(const Epilogue& e, const at::Tensor& grad, const at::Tensor& h,
                       const c10::optional<at::Tensor>& bias, at::Tensor& dh) {
  const std::vector<float> bias_f = bias_as_float<T>(bias);
  const float* bias_data = bias_f.empty() ? nullptr : bias_f.data();
  const BackwardRow backward = row_functions(e.act).second;
  const bool gated = is_gated(e.act);
  const T* g_data = grad.const_data_ptr<T>();
  T* dh_data = dh.data_ptr<T>();
  at::parallel_for(0, e.rows, grain_rows(e.width), [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(static_cast<size_t>(2 * e.width + e.hidden));
    float* pre = buffer.data();
    float* da = pre + e.width;
    float* dpre = da + e.hidden;
    for (int64_t r = begin; r < end; ++r) {
      load_biased_row<T>(pre, h, bias_data, r);
      load_row(da, g_data + r * grad.stride(0), e.hidden, grad.stride(1));
      e.apply_dropout(da, r);  // the dropped elements pass no gradient; kept ones are scaled
      backward(dpre, dpre + e.hidden, da, pre, gated ? pre + e.hidden : nullptr, e.hidden);
      store_row(dh_data + r * e.width, dpre, e.width);
    }
  });
}

}  // namespace

at::Tensor ffn_act_fwd(const at::Tensor& h, const c10::optional<at::Tensor>& bias, c10::string_view activation,
                       double dropout_p, const c10::optional<at::Tensor>& seed) {
  check_epilogue_inputs(h, bias);
  const Epilogue e(h, activation, dropout_p, read_seed(seed, dropout_p));
  at::Tensor a = new_output({e.rows, e.hidden}, h.options());
  if (a.numel() == 0) return a;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "fastattn_ffn_act_fwd",
                                  [&] { epilogue_forward<scalar_t>(e, h, bias, a); });
  return a;
}

at::Tensor ffn_act_bwd(const at::Tensor& grad, const at::Tensor& h, const c10::optional<at::Tensor>& bias,
                       c10::string_view activation, double dropout_p, const c10::optional<at::Tensor>& seed) {
  check_epilogue_inputs(h, bias);
  const Epilogue e(h, activation, dropout_p, read_seed(seed, dropout_p));
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
