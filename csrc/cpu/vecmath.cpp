// Row primitives of the CPU kernels and the helpers declared in common.h.
//
// The loops are plain C++ that GCC vectorises (omp simd); FASTATTN_CLONES (simd.h) builds each for
// AVX2+FMA and for the baseline ISA. exp is simd::exp, a polynomial (no libm call) that vectorises.
#include <ATen/ops/addmm_cpu_dispatch.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "avx2.h"
#include "common.h"
#include "simd.h"

namespace fastattn::cpu {

float exp_scalar(float x) { return simd::exp(x); }

#if FASTATTN_HAS_AVX2
namespace {
// row_max and exp_shift(_sum) with four / two accumulators and the 8-lane exp (avx2.h); the
// portable versions below keep one accumulator (GCC's reductions), a quarter of the rate.
FASTATTN_AVX2 float row_max_avx2(const float* x, int64_t n) {
  __m256 m0 = _mm256_set1_ps(-kInf), m1 = m0, m2 = m0, m3 = m0, nan = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
    const __m256 c = _mm256_loadu_ps(x + i + 16), d = _mm256_loadu_ps(x + i + 24);
    m0 = _mm256_max_ps(a, m0), m1 = _mm256_max_ps(b, m1), m2 = _mm256_max_ps(c, m2), m3 = _mm256_max_ps(d, m3);
    nan = _mm256_or_ps(nan, _mm256_or_ps(_mm256_cmp_ps(a, b, _CMP_UNORD_Q), _mm256_cmp_ps(c, d, _CMP_UNORD_Q)));
  }
  for (; i + 8 <= n; i += 8) {
    const __m256 a = _mm256_loadu_ps(x + i);
    m0 = _mm256_max_ps(a, m0);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
  }
  float m = avx2::hmax(_mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3)));
  bool any_nan = _mm256_movemask_ps(nan) != 0;
  for (; i < n; ++i) {
    m = x[i] > m ? x[i] : m;
    any_nan |= x[i] != x[i];
  }
  return any_nan ? std::numeric_limits<float>::quiet_NaN() : m;  // NaN in, NaN out (as torch)
}

template <bool kSum>
FASTATTN_AVX2 float exp_shift_avx2(float* x, int64_t n, float shift) {
  const __m256 vs = _mm256_set1_ps(shift);
  __m256 s0 = _mm256_setzero_ps(), s1 = s0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 a = avx2::exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), vs));
    const __m256 b = avx2::exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i + 8), vs));
    _mm256_storeu_ps(x + i, a), _mm256_storeu_ps(x + i + 8, b);
    if (kSum) s0 = _mm256_add_ps(s0, a), s1 = _mm256_add_ps(s1, b);
  }
  for (; i + 8 <= n; i += 8) {
    const __m256 a = avx2::exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), vs));
    _mm256_storeu_ps(x + i, a);
    if (kSum) s0 = _mm256_add_ps(s0, a);
  }
  float sum = kSum ? avx2::hsum(_mm256_add_ps(s0, s1)) : 0.f;
  for (; i < n; ++i) {
    x[i] = simd::exp(x[i] - shift);
    sum += x[i];
  }
  return sum;
}

// sum(a * b) (b = nullptr: sum(a)) with four accumulators.
FASTATTN_AVX2 float row_dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  int64_t i = 0;
  if (b != nullptr) {
    for (; i + 32 <= n; i += 32) {
      s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
      s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
      s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
      s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
  } else {
    for (; i + 32 <= n; i += 32) {
      s0 = _mm256_add_ps(_mm256_loadu_ps(a + i), s0);
      s1 = _mm256_add_ps(_mm256_loadu_ps(a + i + 8), s1);
      s2 = _mm256_add_ps(_mm256_loadu_ps(a + i + 16), s2);
      s3 = _mm256_add_ps(_mm256_loadu_ps(a + i + 24), s3);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_add_ps(_mm256_loadu_ps(a + i), s0);
  }
  float sum = avx2::hsum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
  for (; i < n; ++i) sum += b != nullptr ? a[i] * b[i] : a[i];
  return sum;
}
}  // namespace
#endif

FASTATTN_CLONES float row_max(const float* x, int64_t n) {
#if FASTATTN_HAS_AVX2
  if (avx2::supported()) return row_max_avx2(x, n);
#endif
  float m = -kInf;
  int nans = 0;  // counted beside the max: a max reduction would drop them
#pragma omp simd reduction(max : m) reduction(+ : nans)
  for (int64_t i = 0; i < n; ++i) {
    m = x[i] > m ? x[i] : m;  // (std::max's reference blocks vectorisation)
    nans += x[i] != x[i];
  }
  return nans ? std::numeric_limits<float>::quiet_NaN() : m;  // NaN in, NaN out (as torch)
}

FASTATTN_CLONES float exp_shift_sum(float* x, int64_t n, float shift) {
#if FASTATTN_HAS_AVX2
  if (avx2::supported()) return exp_shift_avx2<true>(x, n, shift);
#endif
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    const float e = simd::exp(x[i] - shift);
    x[i] = e;
    sum += e;
  }
  return sum;
}

FASTATTN_CLONES void exp_shift(float* x, int64_t n, float shift) {
#if FASTATTN_HAS_AVX2
  if (avx2::supported()) {
    exp_shift_avx2<false>(x, n, shift);
    return;
  }
#endif
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] = simd::exp(x[i] - shift);
}

FASTATTN_CLONES void scale_row(float* x, int64_t n, float factor) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] *= factor;
}

FASTATTN_CLONES float row_sum(const float* x, int64_t n) {
#if FASTATTN_HAS_AVX2
  if (avx2::supported()) return row_dot_avx2(x, nullptr, n);
#endif
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += x[i];
  return sum;
}

FASTATTN_CLONES float row_dot(const float* a, const float* b, int64_t n) {
#if FASTATTN_HAS_AVX2
  if (avx2::supported()) return row_dot_avx2(a, b, n);
#endif
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

FASTATTN_CLONES void softmax_grad_row(float* ds, const float* p, int64_t n, float d) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) ds[i] = p[i] * (ds[i] - d);
}

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  const auto options = at::TensorOptions().dtype(at::kFloat);
  at::Tensor out = at::from_blob(c, {m, n}, {ldc, 1}, options);
  if (k <= 0) {  // an empty inner product: C = beta * C
    beta == 0.f ? out.zero_() : out.mul_(beta);
    return;
  }
  auto* a_data = const_cast<float*>(a);
  auto* b_data = const_cast<float*>(b);
  at::Tensor lhs = trans_a ? at::from_blob(a_data, {k, m}, {lda, 1}, options).t()
                           : at::from_blob(a_data, {m, k}, {lda, 1}, options);
  at::Tensor rhs = trans_b ? at::from_blob(b_data, {n, k}, {ldb, 1}, options).t()
                           : at::from_blob(b_data, {k, n}, {ldb, 1}, options);
  // The CPU kernel directly: no dispatcher, autograd or profiler on this hot path.
  at::cpu::addmm_out(out, out, lhs, rhs, beta, alpha);
}

RowOffsets::RowOffsets(const at::Tensor& t) {
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    sizes_.push_back(std::max<int64_t>(t.size(d), 1));
    strides_.push_back(t.stride(d));
  }
}

at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  static const bool poison = [] {
    const char* value = std::getenv("FASTATTN_POISON_OUTPUTS");
    return value != nullptr && std::strcmp(value, "1") == 0;
  }();
  at::Tensor out = at::empty(sizes, options);
  if (poison && out.is_floating_point()) out.fill_(std::numeric_limits<float>::quiet_NaN());
  return out;
}

at::Tensor float_rows(const at::Tensor& t) {
  at::Tensor f = t.scalar_type() == at::kFloat ? t : t.to(at::kFloat);
  const int64_t cols = f.size(-1);
  const bool rows_ok = f.dim() < 2 || f.size(-2) <= 1 || f.stride(-2) >= std::max<int64_t>(cols, 1);
  if ((cols > 1 && f.stride(-1) != 1) || !rows_ok) f = f.contiguous();
  return f;
}

void check_dtype(const at::Tensor& t, const char* name) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, "fastattn cpu: ", name,
                   " must be float32, bfloat16 or float16, got ", dtype);
}

}  // namespace fastattn::cpu
