// AVX2+FMA (+F16C) building blocks for the CPU row kernels (softmax, norms), written with intrinsics:
// GCC's auto-vectorised reductions keep one accumulator (latency-bound, a quarter of the adds' rate)
// and convert 16-bit rows element by element; these keep several accumulators and convert 8 lanes
// at a time. Functions marked FASTATTN_AVX2 are compiled for AVX2 whatever the build's -march; a
// caller checks avx2::supported() (once per process) before calling them, and otherwise takes the
// portable path.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define FASTATTN_HAS_AVX2 1
#define FASTATTN_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define FASTATTN_HAS_AVX2 0
#define FASTATTN_AVX2
#endif

namespace fastattn::cpu::avx2 {

// The element types the 8-lane loads and stores take (the kernels dispatch double too, which the
// CPU ops reject before it reaches them).
template <typename T>
constexpr bool kLanes = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

#if FASTATTN_HAS_AVX2

// Whether this CPU runs AVX2, FMA and F16C (checked once).
inline bool supported() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
}

// ---- 8 lanes of float32 from / to float, bfloat16, float16 ----

FASTATTN_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
FASTATTN_AVX2 inline __m256 load8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
FASTATTN_AVX2 inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

FASTATTN_AVX2 inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
// Round to nearest even, NaN -> 0x7fc0: c10::BFloat16's conversion, 8 lanes at once.
FASTATTN_AVX2 inline void store8(c10::BFloat16* p, __m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(nan));
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
FASTATTN_AVX2 inline void store8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

// The value as computed, opaque to the optimiser: a product passed through it is rounded before a
// following add (GCC would otherwise contract a * b - c into one FMA, whose unrounded product makes
// x * scale - max(x * scale) nonzero at the max).
FASTATTN_AVX2 inline __m256 rounded(__m256 v) {
  asm("" : "+x"(v));
  return v;
}
inline float rounded(float v) {
  asm("" : "+x"(v));
  return v;
}

// ---- horizontal reductions ----

FASTATTN_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

FASTATTN_AVX2 inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// ---- exp: simd::exp's algorithm (simd.h) on 8 lanes ----
// 2^n * exp(r), n = round(x / ln 2), Cody-Waite reduction, degree-7 Taylor polynomial; exp(x) = 0
// below ln(FLT_MIN) (so exp(-inf) = 0), saturates above ln(FLT_MAX); NaN in, NaN out.
FASTATTN_AVX2 inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.33654f), hi = _mm256_set1_ps(88.37626f);
  const __m256 xc = _mm256_min_ps(hi, _mm256_max_ps(lo, x));  // operand order keeps a NaN
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), r);
  __m256 p = _mm256_set1_ps(1.f / 5040.f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 720.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 value = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  return _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LT_OQ), value);
}

#else

inline bool supported() { return false; }

#endif

}  // namespace fastattn::cpu::avx2
