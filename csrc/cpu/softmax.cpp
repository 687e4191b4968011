// Softmax and log-softmax along the last dim on the CPU, forward and backward, computed in float32.
//
// x (..., N) with any strides (rows are gathered into a float32 buffer); mask None or a view of x's
// shape (stride 0 where broadcast), bool (true = keep) or floating (added after scaling); is_causal
// masks column j > row i, i the index along dim -2. A fully masked row gives zeros (softmax) or
// -inf (log_softmax). The backward reads only the saved output y.
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "avx2.h"
#include "common.h"
#include "simd.h"

namespace fastattn::cpu {
namespace {

// Rows per parallel chunk: about 16K elements each (~10 us of work), so short rows are not one task
// apiece and a small input (64 x 128, say) runs inline on the calling thread, never waking a worker.
int64_t grain_rows(int64_t row_len) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(row_len, 1)); }

// A float32 scratch row per thread, grown when a longer row comes and then reused: no heap
// allocation per call or per row once warm.
float* scratch_row(int64_t floats) {
  static thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < floats) buffer.resize(static_cast<size_t>(floats));
  return buffer.data();
}

// A row whose max is -inf: fully masked (zeros, or -inf for log), unless it holds a NaN (NaN out, as
// torch).
template <typename T>
void fill_masked_row(T* out, const float* s, int64_t n, bool log) {
  bool nan = false;
  for (int64_t j = 0; j < n; ++j) nan |= s[j] != s[j];
  const float value = nan ? std::numeric_limits<float>::quiet_NaN() : (log ? -kInf : 0.f);
  std::fill(out, out + n, static_cast<T>(value));
}

#if FASTATTN_HAS_AVX2
// One row of softmax (log_softmax) of x * scale over its first `visible` columns (the causal
// prefix; the rest are masked: 0, or -inf for log), written to y. Reads x twice (the second time
// from cache) and writes y once, plus one in-cache pass over float32 exps: for float32 y itself,
// for 16-bit y the scratch row e. A NaN gives a NaN row (exp(NaN) poisons the sum); a row whose
// max is -inf goes to fill_masked_row.
template <typename TIn, typename TOut>
FASTATTN_AVX2 void softmax_row_avx2(const TIn* x, TOut* y, int64_t n, int64_t visible, float scale, bool log,
                                    float* e) {
  using namespace avx2;
  const __m256 vscale = _mm256_set1_ps(scale);
  const int64_t v8 = visible & ~int64_t{7}, v32 = visible & ~int64_t{31};
  // pass 1: the max of x * scale (4 accumulators)
  __m256 m0 = _mm256_set1_ps(-kInf), m1 = m0, m2 = m0, m3 = m0;
  int64_t j = 0;
  for (; j < v32; j += 32) {
    m0 = _mm256_max_ps(rounded(_mm256_mul_ps(load8(x + j), vscale)), m0);
    m1 = _mm256_max_ps(rounded(_mm256_mul_ps(load8(x + j + 8), vscale)), m1);
    m2 = _mm256_max_ps(rounded(_mm256_mul_ps(load8(x + j + 16), vscale)), m2);
    m3 = _mm256_max_ps(rounded(_mm256_mul_ps(load8(x + j + 24), vscale)), m3);
  }
  for (; j < v8; j += 8) m0 = _mm256_max_ps(rounded(_mm256_mul_ps(load8(x + j), vscale)), m0);
  float m = hmax(_mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3)));
  for (; j < visible; ++j) {
    const float v = rounded(static_cast<float>(x[j]) * scale);
    m = v > m ? v : m;
  }
  if (m == -kInf) {  // every visible score is -inf (or NaN): the portable path decides
    float* s = e;
    for (int64_t c = 0; c < visible; ++c) s[c] = static_cast<float>(x[c]) * scale;
    std::fill(s + visible, s + n, -kInf);
    fill_masked_row(y, s, n, log);
    return;
  }
  const __m256 vm = _mm256_set1_ps(m);
  // pass 2: exp(x * scale - m), summed (kept in e, or in y when y is float32, for softmax)
  float* keep = nullptr;
  if (!log) {
    if constexpr (std::is_same_v<TOut, float>) keep = y;
    else keep = e;
  }
  __m256 s0 = _mm256_setzero_ps(), s1 = s0;
  j = 0;
  for (; j + 16 <= visible; j += 16) {
    const __m256 a = exp8(_mm256_sub_ps(rounded(_mm256_mul_ps(load8(x + j), vscale)), vm));
    const __m256 b = exp8(_mm256_sub_ps(rounded(_mm256_mul_ps(load8(x + j + 8), vscale)), vm));
    if (keep) _mm256_storeu_ps(keep + j, a), _mm256_storeu_ps(keep + j + 8, b);
    s0 = _mm256_add_ps(s0, a);
    s1 = _mm256_add_ps(s1, b);
  }
  for (; j < v8; j += 8) {
    const __m256 a = exp8(_mm256_sub_ps(rounded(_mm256_mul_ps(load8(x + j), vscale)), vm));
    if (keep) _mm256_storeu_ps(keep + j, a);
    s0 = _mm256_add_ps(s0, a);
  }
  float sum = hsum(_mm256_add_ps(s0, s1));
  for (; j < visible; ++j) {
    const float a = simd::exp(rounded(static_cast<float>(x[j]) * scale) - m);
    if (keep) keep[j] = a;
    sum += a;
  }
  // pass 3: normalise
  if (log) {
    const float shift = m + std::log(sum);
    const __m256 vshift = _mm256_set1_ps(shift);
    for (j = 0; j < v8; j += 8) store8(y + j, _mm256_sub_ps(rounded(_mm256_mul_ps(load8(x + j), vscale)), vshift));
    for (; j < visible; ++j) y[j] = static_cast<TOut>(rounded(static_cast<float>(x[j]) * scale) - shift);
  } else {
    const float inv = 1.f / sum;
    const __m256 vinv = _mm256_set1_ps(inv);
    for (j = 0; j < v8; j += 8) store8(y + j, _mm256_mul_ps(_mm256_loadu_ps(keep + j), vinv));
    for (; j < visible; ++j) y[j] = static_cast<TOut>(keep[j] * inv);
  }
  std::fill(y + visible, y + n, static_cast<TOut>(log ? -kInf : 0.f));
}

// The backward of one row straight from dy and y in their dtype (unit stride), no float copies:
// softmax dx = scale * y * (dy - sum(dy * y)); log_softmax dx = scale * (dy - exp(y) * sum(dy)).
template <typename T>
FASTATTN_AVX2 void softmax_bwd_row_avx2(const T* dy, const T* y, T* dx, int64_t n, float scale, bool log) {
  using namespace avx2;
  const int64_t n8 = n & ~int64_t{7};
  __m256 s0 = _mm256_setzero_ps(), s1 = s0;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    if (log) {
      s0 = _mm256_add_ps(s0, load8(dy + j)), s1 = _mm256_add_ps(s1, load8(dy + j + 8));
    } else {
      s0 = _mm256_fmadd_ps(load8(dy + j), load8(y + j), s0);
      s1 = _mm256_fmadd_ps(load8(dy + j + 8), load8(y + j + 8), s1);
    }
  }
  for (; j < n8; j += 8) s0 = log ? _mm256_add_ps(s0, load8(dy + j)) : _mm256_fmadd_ps(load8(dy + j), load8(y + j), s0);
  float total = hsum(_mm256_add_ps(s0, s1));
  for (; j < n; ++j) total += log ? static_cast<float>(dy[j]) : static_cast<float>(dy[j]) * static_cast<float>(y[j]);
  const __m256 vt = _mm256_set1_ps(total), vs = _mm256_set1_ps(scale);
  for (j = 0; j < n8; j += 8) {
    const __m256 g = load8(dy + j), p = load8(y + j);
    const __m256 d = log ? _mm256_fnmadd_ps(exp8(p), vt, g) : _mm256_mul_ps(p, _mm256_sub_ps(g, vt));
    store8(dx + j, _mm256_mul_ps(vs, d));
  }
  for (; j < n; ++j) {
    const float g = static_cast<float>(dy[j]), p = static_cast<float>(y[j]);
    dx[j] = static_cast<T>(scale * (log ? g - simd::exp(p) * total : p * (g - total)));
  }
}
#endif

// d log_softmax of one row: dx = scale * (dy - exp(y) * sum(dy)), torch's formula everywhere: where
// y = -inf (a -inf score, fully masked rows included) exp(y) = 0 and dx = scale * dy. Positions a bool
// or causal mask hides get their zero gradient in the autograd (fastattn/ext.py), which sees the mask.
// g holds dy on entry and dx on return.
FASTATTN_CLONES void log_softmax_grad_row(float* g, const float* y, int64_t n, float scale) {
  float total = 0.f;
#pragma omp simd reduction(+ : total)
  for (int64_t j = 0; j < n; ++j) total += g[j];
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) g[j] = scale * (g[j] - simd::exp(y[j]) * total);
}

// Applies a mask row (any dtype, strided) to the scaled scores s.
template <typename M>
void apply_mask_row(float* s, const M* mask, int64_t n, int64_t stride) {
  if constexpr (std::is_same_v<M, bool>) {
    for (int64_t j = 0; j < n; ++j)
      if (!mask[j * stride]) s[j] = -kInf;
  } else {
    for (int64_t j = 0; j < n; ++j) s[j] += static_cast<float>(mask[j * stride]);
  }
}

template <typename T, typename M>
void softmax_rows(const at::Tensor& x, const at::Tensor* mask, float scale, bool is_causal, bool log, at::Tensor& y) {
  const int64_t n = x.size(-1), rows = x.numel() / std::max<int64_t>(n, 1);
  const int64_t rows_per_matrix = x.dim() >= 2 ? x.size(-2) : 1;
  const RowOffsets x_rows(x);
  const RowOffsets mask_rows = mask ? RowOffsets(*mask) : RowOffsets(x);
  const T* x_data = x.const_data_ptr<T>();
  const M* mask_data = mask ? mask->const_data_ptr<M>() : nullptr;
  const int64_t x_stride = x.stride(-1), mask_stride = mask ? mask->stride(-1) : 0;
  T* y_data = y.data_ptr<T>();
#if FASTATTN_HAS_AVX2
  const bool fast = avx2::kLanes<T> && avx2::supported();
#else
  constexpr bool fast = false;
#endif

  at::parallel_for(0, rows, grain_rows(n), [&](int64_t begin, int64_t end) {
    float* s = scratch_row(2 * n);  // the scores, and their exps
    for (int64_t row = begin; row < end; ++row) {
      const int64_t visible = is_causal ? std::min(n, row % rows_per_matrix + 1) : n;
      T* out = y_data + row * n;
#if FASTATTN_HAS_AVX2
      if constexpr (avx2::kLanes<T>) {
        if (fast && !mask_data && (x_stride == 1 || n == 1)) {  // straight from x, in x's dtype
          softmax_row_avx2<T, T>(x_data + x_rows(row), out, n, visible, scale, log, s);
          continue;
        }
      }
#endif
      load_row(s, x_data + x_rows(row), n, x_stride);
      if (scale != 1.f) scale_row(s, n, scale);
      std::fill(s + visible, s + n, -kInf);
      if (mask_data) apply_mask_row(s, mask_data + mask_rows(row), n, mask_stride);
#if FASTATTN_HAS_AVX2
      if constexpr (avx2::kLanes<T>) {
        if (fast) {  // the gathered, masked float32 scores
          softmax_row_avx2<float, T>(s, out, n, n, 1.f, log, s + n);
          continue;
        }
      }
#endif
      const float m = row_max(s, n);
      if (m == -kInf) {  // fully masked: zeros, or the log of zeros (a NaN row has m = NaN: NaN out)
        std::fill(out, out + n, static_cast<T>(log ? -kInf : 0.f));
        continue;
      }
      if (log) {
        float* e = s + n;
        std::copy(s, s + n, e);
        const float shift = m + std::log(exp_shift_sum(e, n, m));
        for (int64_t j = 0; j < n; ++j) out[j] = static_cast<T>(s[j] - shift);
      } else {
        scale_row(s, n, 1.f / exp_shift_sum(s, n, m));
        store_row(out, s, n);
      }
    }
  });
}

template <typename T>
void softmax_backward_rows(const at::Tensor& dy, const at::Tensor& y, float scale, bool log, at::Tensor& dx) {
  const int64_t n = y.size(-1), rows = y.numel() / std::max<int64_t>(n, 1);
  const RowOffsets dy_rows(dy), y_rows(y);
  const T* dy_data = dy.const_data_ptr<T>();
  const T* y_data = y.const_data_ptr<T>();
  const int64_t dy_stride = dy.stride(-1), y_stride = y.stride(-1);
  T* dx_data = dx.data_ptr<T>();

#if FASTATTN_HAS_AVX2
  if constexpr (avx2::kLanes<T>) {
    if (avx2::supported() && ((dy_stride == 1 && y_stride == 1) || n == 1)) {
      at::parallel_for(0, rows, grain_rows(n), [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row)
          softmax_bwd_row_avx2<T>(dy_data + dy_rows(row), y_data + y_rows(row), dx_data + row * n, n, scale, log);
      });
      return;
    }
  }
#endif
  at::parallel_for(0, rows, grain_rows(n), [&](int64_t begin, int64_t end) {
    float* g = scratch_row(2 * n);
    float* p = g + n;
    for (int64_t row = begin; row < end; ++row) {
      load_row(g, dy_data + dy_rows(row), n, dy_stride);
      load_row(p, y_data + y_rows(row), n, y_stride);
      if (log) {
        log_softmax_grad_row(g, p, n, scale);
      } else {
        softmax_grad_row(g, p, n, row_dot(g, p, n));  // y * (dy - sum(dy * y))
        if (scale != 1.f) scale_row(g, n, scale);
      }
      store_row(dx_data + row * n, g, n);
    }
  });
}

}  // namespace

at::Tensor softmax_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& mask, double scale, bool is_causal,
                       bool log) {
  check_dtype(x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, "fastattn softmax: x must have at least 1 dim");
  TORCH_CHECK_VALUE(!is_causal || x.dim() >= 2, "fastattn softmax: is_causal needs x with at least 2 dims");
  if (mask.has_value()) {
    TORCH_CHECK_VALUE(mask->sizes() == x.sizes(), "fastattn softmax: mask must be a view of x's shape ", x.sizes(),
                      ", got ", mask->sizes());
    const auto dt = mask->scalar_type();
    TORCH_CHECK_TYPE(dt == at::kBool || dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 ||
                         dt == at::kHalf,
                     "fastattn softmax: mask must be bool or floating, got ", dt);
  }
  at::Tensor y = new_output(x.sizes(), x.options());
  if (x.numel() == 0) return y;
  const at::Tensor* mask_ptr = mask.has_value() ? &*mask : nullptr;
  const at::ScalarType mask_type = mask.has_value() ? mask->scalar_type() : at::kFloat;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastattn_softmax_fwd", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, mask_type, "fastattn_softmax_mask", [&] {
      softmax_rows<T, scalar_t>(x, mask_ptr, static_cast<float>(scale), is_causal, log, y);
    });
  });
  return y;
}

at::Tensor softmax_bwd(const at::Tensor& dy, const at::Tensor& y, double scale, bool log) {
  check_dtype(y, "y");
  TORCH_CHECK_VALUE(dy.sizes() == y.sizes(), "fastattn softmax_bwd: dy must have y's shape ", y.sizes());
  TORCH_CHECK_TYPE(dy.scalar_type() == y.scalar_type(), "fastattn softmax_bwd: dy must have y's dtype");
  TORCH_CHECK_VALUE(y.dim() >= 1, "fastattn softmax_bwd: y must have at least 1 dim");
  at::Tensor dx = new_output(y.sizes(), y.options());
  if (y.numel() == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "fastattn_softmax_bwd", [&] {
    softmax_backward_rows<scalar_t>(dy, y, static_cast<float>(scale), log, dx);
  });
  return dx;
}

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("softmax_fwd", &softmax_fwd);
  m.impl("softmax_bwd", &softmax_bwd);
}

}  // namespace fastattn::cpu
