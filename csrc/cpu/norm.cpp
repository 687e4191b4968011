// LayerNorm and RMSNorm over the last dim of a 2-D x (M, N) on the CPU, forward and backward,
// computed in float32, with the residual add fused in: s = x + residual (rounded to x's dtype, as
// the unfused `x + residual` would be) is normalised and returned as residual_out.
//
// mean and rstd are float32 (M,). The backward gets s (residual_out, or x) and returns ds, the
// gradient of both x and residual; dweight and dbias are reduced over rows in per-chunk partial
// sums (no atomics), and are empty tensors when there is no weight / bias.
#include <torch/library.h>

#include <cmath>
#include <type_traits>

#include "avx2.h"
#include "common.h"
#include "simd.h"

namespace fastattn::cpu {
namespace {

// Row chunks for the backward's weight reductions: a few per thread, each with its partial sums.
int64_t reduction_chunks(int64_t rows) { return std::clamp<int64_t>(4 * at::get_num_threads(), 1, rows); }

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

// ---- row primitives (vectorised; FASTATTN_CLONES builds them for AVX2+FMA too) ----

FASTATTN_CLONES void add_rows(float* acc, const float* x, int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) acc[c] += x[c];
}

FASTATTN_CLONES void sum_rows(float* out, const float* a, const float* b, int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) out[c] = a[c] + b[c];
}

FASTATTN_CLONES void accumulate_product(float* acc, const float* a, const float* b, int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) acc[c] += a[c] * b[c];
}

// The mean of a row, accumulated relative to its first value: rows far from zero (mean 1000, say)
// then sum small numbers, and the float32 sum loses nothing to the large common offset.
FASTATTN_CLONES float shifted_mean(const float* s, int64_t n) {
  const float origin = s[0];
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < n; ++c) sum += s[c] - origin;
  return origin + sum / static_cast<float>(n);
}

// sum((s - mu)^2): with the mean known, a second pass that cannot cancel (unlike E[s^2] - mu^2).
FASTATTN_CLONES float centered_square_sum(const float* s, int64_t n, float mu) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < n; ++c) sum += (s[c] - mu) * (s[c] - mu);
  return sum;
}

FASTATTN_CLONES void normalize_row(float* y, const float* s, int64_t n, float mu, float inv, const float* w,
                                   const float* b) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) y[c] = (s[c] - mu) * inv * w[c] + b[c];
}

// ds of one row (see norm_backward), and xhat = (s - mu) * inv into xhat (which may alias s).
FASTATTN_CLONES void norm_grad_row(float* ds, float* xhat, const float* s, const float* dy, const float* w, int64_t n,
                                   float mu, float inv, bool centered) {
  float sum_gx = 0.f, sum_g = 0.f;
#pragma omp simd reduction(+ : sum_gx, sum_g)
  for (int64_t c = 0; c < n; ++c) {
    xhat[c] = (s[c] - mu) * inv;
    ds[c] = dy[c] * w[c];  // g, kept rounded so that g - mean(g) is exactly 0 where g is constant
    sum_gx += ds[c] * xhat[c];
    sum_g += ds[c];
  }
  const float mean_gx = sum_gx / static_cast<float>(n), mean_g = centered ? sum_g / static_cast<float>(n) : 0.f;
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) ds[c] = inv * (ds[c] - mean_g - xhat[c] * mean_gx);
}

// ---- the kernels ----

// Row r of x (+ residual) as float32 into s; with a residual, the sum rounded to T (what the unfused
// x + residual gives) is written to residual_out and is what gets normalised.
template <typename T>
void load_sum_row(float* s, float* scratch, const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                  T* residual_out, int64_t r) {
  const int64_t n = x.size(1);
  load_row(s, x.const_data_ptr<T>() + r * x.stride(0), n, x.stride(1));
  if (!residual.has_value()) return;
  load_row(scratch, residual->const_data_ptr<T>() + r * residual->stride(0), n, residual->stride(1));
  add_rows(s, scratch, n);
  T* out = residual_out + r * n;
  store_row(out, s, n);
  if constexpr (!std::is_same_v<T, float>) load_row(s, out, n, 1);
}

// A per-column parameter as float32, or `fill` everywhere when absent.
template <typename T>
std::vector<float> param_as_float(const c10::optional<at::Tensor>& t, int64_t n, float fill) {
  std::vector<float> out(static_cast<size_t>(n), fill);
  if (t.has_value()) load_row(out.data(), t->const_data_ptr<T>(), n, t->stride(0));
  return out;
}

int64_t grain_rows(int64_t n) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)); }

#if FASTATTN_HAS_AVX2
// One row of either norm's forward, straight from x (and residual) in their dtype, unit column
// stride: s = x (+ residual, rounded to T and written to res_out, then read back from cache);
// mean (LayerNorm) relative to s[0], then the centred square sum (two in-cache passes that cannot
// cancel, as shifted_mean and centered_square_sum), then y = (s - mean) * rstd * w + b. w and b
// (nullable) are read in T. Four accumulators per reduction.
template <typename T>
FASTATTN_AVX2 void norm_row_avx2(const T* x, const T* res, T* res_out, T* y, const float* w, const float* b, int64_t n,
                                 float eps, bool centered, float* mean_out, float* rstd_out) {
  using namespace avx2;
  const int64_t n8 = n & ~int64_t{7}, n32 = n & ~int64_t{31};
  const T* s = x;
  if (res != nullptr) {
    int64_t c = 0;
    for (; c < n8; c += 8) store8(res_out + c, _mm256_add_ps(load8(x + c), load8(res + c)));
    for (; c < n; ++c) res_out[c] = static_cast<T>(static_cast<float>(x[c]) + static_cast<float>(res[c]));
    s = res_out;
  }
  float mu = 0.f;
  if (centered) {
    const float origin = static_cast<float>(s[0]);
    const __m256 vo = _mm256_set1_ps(origin);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t c = 0;
    for (; c < n32; c += 32) {
      a0 = _mm256_add_ps(a0, _mm256_sub_ps(load8(s + c), vo));
      a1 = _mm256_add_ps(a1, _mm256_sub_ps(load8(s + c + 8), vo));
      a2 = _mm256_add_ps(a2, _mm256_sub_ps(load8(s + c + 16), vo));
      a3 = _mm256_add_ps(a3, _mm256_sub_ps(load8(s + c + 24), vo));
    }
    for (; c < n8; c += 8) a0 = _mm256_add_ps(a0, _mm256_sub_ps(load8(s + c), vo));
    float sum = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; c < n; ++c) sum += static_cast<float>(s[c]) - origin;
    mu = origin + sum / static_cast<float>(n);
  }
  const __m256 vmu = _mm256_set1_ps(mu);
  __m256 q0 = _mm256_setzero_ps(), q1 = q0, q2 = q0, q3 = q0;
  int64_t c = 0;
  for (; c < n32; c += 32) {
    const __m256 d0 = _mm256_sub_ps(load8(s + c), vmu), d1 = _mm256_sub_ps(load8(s + c + 8), vmu);
    const __m256 d2 = _mm256_sub_ps(load8(s + c + 16), vmu), d3 = _mm256_sub_ps(load8(s + c + 24), vmu);
    q0 = _mm256_fmadd_ps(d0, d0, q0);
    q1 = _mm256_fmadd_ps(d1, d1, q1);
    q2 = _mm256_fmadd_ps(d2, d2, q2);
    q3 = _mm256_fmadd_ps(d3, d3, q3);
  }
  for (; c < n8; c += 8) {
    const __m256 d = _mm256_sub_ps(load8(s + c), vmu);
    q0 = _mm256_fmadd_ps(d, d, q0);
  }
  float sq = hsum(_mm256_add_ps(_mm256_add_ps(q0, q1), _mm256_add_ps(q2, q3)));
  for (; c < n; ++c) {
    const float d = static_cast<float>(s[c]) - mu;
    sq += d * d;
  }
  const float inv = 1.f / std::sqrt(sq / static_cast<float>(n) + eps);
  if (mean_out) *mean_out = mu;
  *rstd_out = inv;
  const __m256 vinv = _mm256_set1_ps(inv);
  if (w && b) {
    for (c = 0; c < n8; c += 8) {
      const __m256 t = _mm256_mul_ps(_mm256_sub_ps(load8(s + c), vmu), vinv);
      store8(y + c, _mm256_fmadd_ps(t, _mm256_loadu_ps(w + c), _mm256_loadu_ps(b + c)));
    }
  } else {
    for (c = 0; c < n8; c += 8) {
      __m256 t = _mm256_mul_ps(_mm256_sub_ps(load8(s + c), vmu), vinv);
      if (w) t = _mm256_mul_ps(t, _mm256_loadu_ps(w + c));
      if (b) t = _mm256_add_ps(t, _mm256_loadu_ps(b + c));
      store8(y + c, t);
    }
  }
  for (; c < n; ++c) {
    float t = (static_cast<float>(s[c]) - mu) * inv;
    if (w) t *= w[c];
    if (b) t += b[c];
    y[c] = static_cast<T>(t);
  }
}
#endif

// Both norms' forward: y = (s - mean) * rstd * weight + bias, mean = 0 and no bias for RMSNorm
// (centered = false), rstd = 1 / sqrt(mean((s - mean)^2) + eps).
template <typename T>
void norm_forward(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                  const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, float eps,
                  bool centered, at::Tensor& y, at::Tensor& residual_out, float* mean, float* rstd) {
  const int64_t rows = x.size(0), n = x.size(1);
  T* res_out = residual.has_value() ? residual_out.data_ptr<T>() : nullptr;
  T* y_data = y.data_ptr<T>();
#if FASTATTN_HAS_AVX2
  // Unit column strides everywhere: each row straight from x in its dtype, no buffers.
  if constexpr (avx2::kLanes<T>) if (avx2::supported() && (x.stride(1) == 1 || n == 1) && (!residual || residual->stride(1) == 1 || n == 1) &&
      (!weight || weight->stride(0) == 1 || n == 1) && (!bias || bias->stride(0) == 1 || n == 1)) {
    const T* x_data = x.const_data_ptr<T>();
    const T* r_data = residual.has_value() ? residual->const_data_ptr<T>() : nullptr;
    // weight and bias as float32: read in place when they are, else converted once into this
    // thread's scratch (no allocation once warm), which the workers only read
    static thread_local std::vector<float> params;
    const float* w_data = nullptr;
    const float* b_data = nullptr;
    if constexpr (std::is_same_v<T, float>) {
      w_data = weight.has_value() ? weight->const_data_ptr<float>() : nullptr;
      b_data = bias.has_value() ? bias->const_data_ptr<float>() : nullptr;
    } else {
      if (static_cast<int64_t>(params.size()) < 2 * n) params.resize(static_cast<size_t>(2 * n));
      if (weight.has_value()) load_row(params.data(), weight->const_data_ptr<T>(), n, 1), w_data = params.data();
      if (bias.has_value()) load_row(params.data() + n, bias->const_data_ptr<T>(), n, 1), b_data = params.data() + n;
    }
    const int64_t xs = x.stride(0), rs = residual.has_value() ? residual->stride(0) : 0;
    at::parallel_for(0, rows, grain_rows(n), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        norm_row_avx2<T>(x_data + r * xs, r_data ? r_data + r * rs : nullptr, res_out ? res_out + r * n : nullptr,
                         y_data + r * n, w_data, b_data, n, eps, centered, mean ? mean + r : nullptr, rstd + r);
      }
    });
    return;
  }
#endif
  const std::vector<float> w = param_as_float<T>(weight, n, 1.f), b = param_as_float<T>(bias, n, 0.f);
  // float32 rows with unit stride are read and written in place; other layouts and dtypes go
  // through float32 row buffers.
  const bool in_place = std::is_same_v<T, float> && x.stride(1) == 1 && (!residual || residual->stride(1) == 1);
  at::parallel_for(0, rows, grain_rows(n), [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(in_place ? 0 : static_cast<size_t>(2 * n));
    for (int64_t r = begin; r < end; ++r) {
      const float* s = nullptr;
      float* y_row = nullptr;
      if constexpr (std::is_same_v<T, float>) {
        if (in_place) {
          const float* x_row = x.const_data_ptr<float>() + r * x.stride(0);
          if (residual.has_value()) {
            sum_rows(res_out + r * n, x_row, residual->const_data_ptr<float>() + r * residual->stride(0), n);
            x_row = res_out + r * n;
          }
          s = x_row, y_row = y_data + r * n;
        }
      }
      if (!in_place) {
        load_sum_row(buffer.data(), buffer.data() + n, x, residual, res_out, r);
        s = buffer.data(), y_row = buffer.data() + n;
      }
      const float mu = centered ? shifted_mean(s, n) : 0.f;
      const float inv = 1.f / std::sqrt(centered_square_sum(s, n, mu) / static_cast<float>(n) + eps);
      if (mean) mean[r] = mu;
      rstd[r] = inv;
      normalize_row(y_row, s, n, mu, inv, w.data(), b.data());
      if (!in_place) store_row(y_data + r * n, y_row, n);
    }
  });
}

// Shared backward of both norms. xhat = (s - mean) * rstd (mean = 0 for RMSNorm), g = dy * weight:
//   ds = rstd * (g - mean(g) - xhat * mean(g * xhat))   (LayerNorm; RMSNorm drops the mean(g) term)
//   dweight = sum_rows dy * xhat,  dbias = sum_rows dy.
template <typename T>
void norm_backward(const at::Tensor& dy, const at::Tensor& s, const c10::optional<at::Tensor>& weight,
                   const float* mean, const float* rstd, at::Tensor& ds, float* dweight_parts, float* dbias_parts,
                   int64_t chunks) {
  const int64_t rows = s.size(0), n = s.size(1);
  const std::vector<float> w = param_as_float<T>(weight, n, 1.f);
  T* ds_data = ds.data_ptr<T>();
  const int64_t rows_per_chunk = (rows + chunks - 1) / chunks;
  const bool in_place = std::is_same_v<T, float> && dy.stride(1) == 1 && s.stride(1) == 1;
  parallel_tasks(chunks, 3 * n, [&](int64_t chunk, float* buffer) {
    float* xhat = buffer;
    float* dyr = buffer + n;
    float* out = buffer + 2 * n;
    float* dweight = dweight_parts ? dweight_parts + chunk * n : nullptr;
    float* dbias = dbias_parts ? dbias_parts + chunk * n : nullptr;
    const int64_t end = std::min(rows, (chunk + 1) * rows_per_chunk);
    for (int64_t r = chunk * rows_per_chunk; r < end; ++r) {
      const float *dy_row = dyr, *s_row = xhat;
      float* ds_row = out;
      if constexpr (std::is_same_v<T, float>) {
        if (in_place) {
          dy_row = dy.const_data_ptr<float>() + r * dy.stride(0);
          s_row = s.const_data_ptr<float>() + r * s.stride(0);
          ds_row = ds_data + r * n;
        }
      }
      if (!in_place) {
        load_row(dyr, dy.const_data_ptr<T>() + r * dy.stride(0), n, dy.stride(1));
        load_row(xhat, s.const_data_ptr<T>() + r * s.stride(0), n, s.stride(1));
      }
      norm_grad_row(ds_row, xhat, s_row, dy_row, w.data(), n, mean ? mean[r] : 0.f, rstd[r], mean != nullptr);
      if (!in_place) store_row(ds_data + r * n, out, n);
      if (dweight) accumulate_product(dweight, dy_row, xhat, n);
      if (dbias) add_rows(dbias, dy_row, n);
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
    norm_forward<scalar_t>(x, residual, weight, bias, static_cast<float>(eps), true, y, residual_out,
                           mean.data_ptr<float>(), rstd.data_ptr<float>());
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
      norm_backward<scalar_t>(dy, s, weight, mean_c.const_data_ptr<float>(), rstd_c.const_data_ptr<float>(), ds,
                              dweight_parts, dbias_parts, chunks);
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
    norm_forward<scalar_t>(x, residual, weight, c10::nullopt, static_cast<float>(eps), false, y, residual_out,
                           nullptr, rstd.data_ptr<float>());
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
      norm_backward<scalar_t>(dy, s, weight, nullptr, rstd_c.const_data_ptr<float>(), ds, dweight_parts, nullptr,
                              chunks);
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
