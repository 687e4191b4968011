// LayerNorm and RMSNorm over the last dim of a 2-D x (M, N) on the CPU, forward and backward,
// computed in float32, with the residual add fused in: s = x + residual (rounded to x's dtype, as
// the unfused `x + residual` would be) is normalised and returned as residual_out.
//
// mean and rstd are float32 (M,). The backward gets s (residual_out, or x) and returns ds, the
// gradient of both x and residual; dweight and dbias are reduced over rows in per-chunk partial
// sums (no atomics), and are empty tensors when there is no weight / bias.
#include <torch/library.h>

#include <cmath>

#include "common.h"

namespace fastattn::cpu {
namespace {

// Row chunks for the backward's weight reductions: a few per thread, each with its partial sums.
int64_t reduction_chunks(int64_t rows) { return std::clamp<int64_t>(4 * at::get_num_threads(), 1, rows); }

template <typename T>
const T* data_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

void check_row_param(const c10::optional<at::Tensor>& t, const at::Tensor& x, const char* name) {
  if (!t.has_value()) return;
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == x.size(1), "fastattn norm: ", name, " must have shape (",
                    x.size(1), ",), got ", t->sizes());
  TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type(), "fastattn norm: ", name, " must have x's dtype");
}

void check_norm_inputs(const at::Tensor& x, const c10::optional<at::Tensor>& residual) {
  check_dtype(x, "x");
  TORCH_CHECK_VALUE(x.dim() == 2, "fastattn norm: x must be 2-D (M, N), got ", x.sizes());
  if (residual.has_value()) {
    TORCH_CHECK_VALUE(residual->sizes() == x.sizes(), "fastattn norm: residual must have x's shape");
    TORCH_CHECK_TYPE(residual->scalar_type() == x.scalar_type(), "fastattn norm: residual must have x's dtype");
  }
}

// Loads row r of x (+ residual) as float32 into s, writing the sum to residual_out when there is one.
template <typename T>
void load_sum_row(float* s, const at::Tensor& x, const c10::optional<at::Tensor>& residual, T* residual_out,
                  int64_t r) {
  const int64_t n = x.size(1);
  const T* xr = x.const_data_ptr<T>() + r * x.stride(0);
  for (int64_t c = 0; c < n; ++c) s[c] = static_cast<float>(xr[c * x.stride(1)]);
  if (!residual.has_value()) return;
  const T* rr = residual->const_data_ptr<T>() + r * residual->stride(0);
  T* out = residual_out + r * n;
  for (int64_t c = 0; c < n; ++c) {
    const T sum = static_cast<T>(s[c] + static_cast<float>(rr[c * residual->stride(1)]));
    out[c] = sum;
    s[c] = static_cast<float>(sum);
  }
}

// The mean of a row, accumulated relative to its first value: rows far from zero (mean 1000, say)
// then sum small numbers, and the float32 sum loses nothing to the large common offset.
float shifted_mean(const float* s, int64_t n) {
  const float origin = s[0];
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < n; ++c) sum += s[c] - origin;
  return origin + sum / static_cast<float>(n);
}

template <typename T>
void layer_norm_forward(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                        const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, float eps,
                        at::Tensor& y, at::Tensor& residual_out, at::Tensor& mean, at::Tensor& rstd) {
  const int64_t rows = x.size(0), n = x.size(1);
  const T* w = data_or_null<T>(weight);
  const T* bi = data_or_null<T>(bias);
  const int64_t ws = weight.has_value() ? weight->stride(0) : 0, bs = bias.has_value() ? bias->stride(0) : 0;
  T* res_out = residual.has_value() ? residual_out.data_ptr<T>() : nullptr;
  T* y_data = y.data_ptr<T>();
  float* mean_data = mean.data_ptr<float>();
  float* rstd_data = rstd.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / n), [&](int64_t begin, int64_t end) {
    std::vector<float> s(static_cast<size_t>(n));
    for (int64_t r = begin; r < end; ++r) {
      load_sum_row(s.data(), x, residual, res_out, r);
      const float mu = shifted_mean(s.data(), n);
      float var = 0.f;
      for (int64_t c = 0; c < n; ++c) var += (s[c] - mu) * (s[c] - mu);  // two passes: no cancellation
      const float inv_std = 1.f / std::sqrt(var / static_cast<float>(n) + eps);
      mean_data[r] = mu, rstd_data[r] = inv_std;
      T* out = y_data + r * n;
      for (int64_t c = 0; c < n; ++c) {
        float v = (s[c] - mu) * inv_std;
        if (w) v *= static_cast<float>(w[c * ws]);
        if (bi) v += static_cast<float>(bi[c * bs]);
        out[c] = static_cast<T>(v);
      }
    }
  });
}

template <typename T>
void rms_norm_forward(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                      const c10::optional<at::Tensor>& weight, float eps, at::Tensor& y, at::Tensor& residual_out,
                      at::Tensor& rstd) {
  const int64_t rows = x.size(0), n = x.size(1);
  const T* w = data_or_null<T>(weight);
  const int64_t ws = weight.has_value() ? weight->stride(0) : 0;
  T* res_out = residual.has_value() ? residual_out.data_ptr<T>() : nullptr;
  T* y_data = y.data_ptr<T>();
  float* rstd_data = rstd.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / n), [&](int64_t begin, int64_t end) {
    std::vector<float> s(static_cast<size_t>(n));
    for (int64_t r = begin; r < end; ++r) {
      load_sum_row(s.data(), x, residual, res_out, r);
      const float inv_rms = 1.f / std::sqrt(row_dot(s.data(), s.data(), n) / static_cast<float>(n) + eps);
      rstd_data[r] = inv_rms;
      T* out = y_data + r * n;
      for (int64_t c = 0; c < n; ++c) out[c] = static_cast<T>(s[c] * inv_rms * (w ? static_cast<float>(w[c * ws]) : 1.f));
    }
  });
}

// Shared backward of both norms. xhat = (s - mean) * rstd (mean = 0 for RMSNorm), g = dy * weight:
//   ds = rstd * (g - mean(g) - xhat * mean(g * xhat))   (LayerNorm; RMSNorm drops the mean(g) term)
//   dweight = sum_rows dy * xhat,  dbias = sum_rows dy.
template <typename T>
void norm_backward(const at::Tensor& dy, const at::Tensor& s, const c10::optional<at::Tensor>& weight,
                   const float* mean, const float* rstd, bool centered, at::Tensor& ds, float* dweight_parts,
                   float* dbias_parts, int64_t chunks) {
  const int64_t rows = s.size(0), n = s.size(1);
  const T* w = data_or_null<T>(weight);
  const int64_t ws = weight.has_value() ? weight->stride(0) : 0;
  const T* dy_data = dy.const_data_ptr<T>();
  const T* s_data = s.const_data_ptr<T>();
  T* ds_data = ds.data_ptr<T>();
  const int64_t rows_per_chunk = (rows + chunks - 1) / chunks;
  parallel_tasks(chunks, 3 * n, [&](int64_t chunk, float* buffer) {
    float* xhat = buffer;
    float* g = buffer + n;
    float* dyr = buffer + 2 * n;
    float* dweight = dweight_parts ? dweight_parts + chunk * n : nullptr;
    float* dbias = dbias_parts ? dbias_parts + chunk * n : nullptr;
    if (dweight) std::fill(dweight, dweight + n, 0.f);
    if (dbias) std::fill(dbias, dbias + n, 0.f);
    const int64_t end = std::min(rows, (chunk + 1) * rows_per_chunk);
    for (int64_t r = chunk * rows_per_chunk; r < end; ++r) {
      const T* dy_row = dy_data + r * dy.stride(0);
      const T* s_row = s_data + r * s.stride(0);
      const float mu = centered ? mean[r] : 0.f, inv = rstd[r];
      for (int64_t c = 0; c < n; ++c) {
        dyr[c] = static_cast<float>(dy_row[c * dy.stride(1)]);
        xhat[c] = (static_cast<float>(s_row[c * s.stride(1)]) - mu) * inv;
        g[c] = w ? dyr[c] * static_cast<float>(w[c * ws]) : dyr[c];
      }
      const float mean_gx = row_dot(g, xhat, n) / static_cast<float>(n);
      const float mean_g = centered ? row_sum(g, n) / static_cast<float>(n) : 0.f;
      T* out = ds_data + r * n;
      for (int64_t c = 0; c < n; ++c) out[c] = static_cast<T>(inv * (g[c] - mean_g - xhat[c] * mean_gx));
      if (dweight)
        for (int64_t c = 0; c < n; ++c) dweight[c] += dyr[c] * xhat[c];
      if (dbias)
        for (int64_t c = 0; c < n; ++c) dbias[c] += dyr[c];
    }
  });
}

void check_backward_inputs(const at::Tensor& dy, const at::Tensor& s, const at::Tensor& rstd) {
  check_dtype(s, "s");
  TORCH_CHECK_VALUE(s.dim() == 2 && dy.sizes() == s.sizes(), "fastattn norm backward: dy and s must be (M, N)");
  TORCH_CHECK_TYPE(dy.scalar_type() == s.scalar_type(), "fastattn norm backward: dy must have s's dtype");
  TORCH_CHECK_VALUE(rstd.dim() == 1 && rstd.size(0) == s.size(0) && rstd.scalar_type() == at::kFloat,
                    "fastattn norm backward: rstd must be float32 (M,)");
}

// Sums the per-chunk partials into a parameter gradient of dtype `like`, or an empty tensor.
at::Tensor reduce_parts(const at::Tensor& parts, bool wanted, const at::Tensor& like) {
  if (!wanted) return at::empty({0}, like.options());
  return parts.sum(0).to(like.scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& x,
                                                                          const c10::optional<at::Tensor>& residual,
                                                                          const c10::optional<at::Tensor>& weight,
                                                                          const c10::optional<at::Tensor>& bias,
                                                                          double eps) {
  check_norm_inputs(x, residual);
  check_row_param(weight, x, "weight");
  check_row_param(bias, x, "bias");
  at::Tensor y = new_output(x.sizes(), x.options());
  at::Tensor residual_out = residual.has_value() ? new_output(x.sizes(), x.options()) : at::empty({0}, x.options());
  at::Tensor mean = new_output({x.size(0)}, x.options().dtype(at::kFloat));
  at::Tensor rstd = new_output({x.size(0)}, x.options().dtype(at::kFloat));
  if (x.numel() == 0) {
    mean.zero_(), rstd.zero_();
    return {y, residual_out, mean, rstd};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastattn_layer_norm_fwd", [&] {
    layer_norm_forward<scalar_t>(x, residual, weight, bias, static_cast<float>(eps), y, residual_out, mean, rstd);
  });
  return {y, residual_out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(const at::Tensor& dy, const at::Tensor& s,
                                                              const c10::optional<at::Tensor>& weight,
                                                              const at::Tensor& mean, const at::Tensor& rstd,
                                                              bool has_bias) {
  check_backward_inputs(dy, s, rstd);
  check_row_param(weight, s, "weight");
  TORCH_CHECK_VALUE(mean.sizes() == rstd.sizes() && mean.scalar_type() == at::kFloat,
                    "fastattn layer_norm_bwd: mean must be float32 (M,)");
  const int64_t rows = s.size(0), n = s.size(1);
  at::Tensor ds = new_output(s.sizes(), s.options());
  const int64_t chunks = rows > 0 ? reduction_chunks(rows) : 0;
  at::Tensor parts = at::zeros({2, chunks, n}, s.options().dtype(at::kFloat));
  if (s.numel() > 0) {
    const at::Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
    float* dweight_parts = weight.has_value() ? parts[0].data_ptr<float>() : nullptr;
    float* dbias_parts = has_bias ? parts[1].data_ptr<float>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "fastattn_layer_norm_bwd", [&] {
      norm_backward<scalar_t>(dy, s, weight, mean_c.const_data_ptr<float>(), rstd_c.const_data_ptr<float>(), true,
                              ds, dweight_parts, dbias_parts, chunks);
    });
  }
  return {ds, reduce_parts(parts[0], weight.has_value(), s), reduce_parts(parts[1], has_bias, s)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x,
                                                            const c10::optional<at::Tensor>& residual,
                                                            const c10::optional<at::Tensor>& weight, double eps) {
  check_norm_inputs(x, residual);
  check_row_param(weight, x, "weight");
  at::Tensor y = new_output(x.sizes(), x.options());
  at::Tensor residual_out = residual.has_value() ? new_output(x.sizes(), x.options()) : at::empty({0}, x.options());
  at::Tensor rstd = new_output({x.size(0)}, x.options().dtype(at::kFloat));
  if (x.numel() == 0) {
    rstd.zero_();
    return {y, residual_out, rstd};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastattn_rms_norm_fwd", [&] {
    rms_norm_forward<scalar_t>(x, residual, weight, static_cast<float>(eps), y, residual_out, rstd);
  });
  return {y, residual_out, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& s,
                                                const c10::optional<at::Tensor>& weight, const at::Tensor& rstd) {
  check_backward_inputs(dy, s, rstd);
  check_row_param(weight, s, "weight");
  const int64_t rows = s.size(0), n = s.size(1);
  at::Tensor ds = new_output(s.sizes(), s.options());
  const int64_t chunks = rows > 0 ? reduction_chunks(rows) : 0;
  at::Tensor parts = at::zeros({chunks, n}, s.options().dtype(at::kFloat));
  if (s.numel() > 0) {
    const at::Tensor rstd_c = rstd.contiguous();
    float* dweight_parts = weight.has_value() ? parts.data_ptr<float>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "fastattn_rms_norm_bwd", [&] {
      norm_backward<scalar_t>(dy, s, weight, nullptr, rstd_c.const_data_ptr<float>(), false, ds, dweight_parts,
                              nullptr, chunks);
    });
  }
  return {ds, reduce_parts(parts, weight.has_value(), s)};
}

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd);
  m.impl("layer_norm_bwd", &layer_norm_bwd);
  m.impl("rms_norm_fwd", &rms_norm_fwd);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
}

}  // namespace fastattn::cpu
