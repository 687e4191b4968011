// Helpers for the vectorised row loops of the CPU kernels: the multi-versioning attribute and math
// functions written without branches or libm calls, so that GCC vectorises loops that use them.
//
// FASTATTN_CLONES compiles a function for AVX2+FMA and for the baseline x86-64 ISA; the loader picks
// the best one for the CPU (GCC target_clones + ifunc), so the extension needs no -march flag.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FASTATTN_CLONES __attribute__((target_clones("default", "arch=x86-64-v3")))
#else
#define FASTATTN_CLONES
#endif

// Forced inlining: a call left in a loop body stops its vectorisation.
#if defined(__GNUC__)
#define FASTATTN_INLINE inline __attribute__((always_inline))
#else
#define FASTATTN_INLINE inline
#endif

namespace fastattn::cpu::simd {

// exp(x) = 2^n * exp(r) with n = round(x / ln 2) and |r| <= ln(2) / 2; a degree-7 Taylor polynomial
// gives exp(r) within 1e-7 relative. Below ln(FLT_MIN) the result is 0 (so exp(-inf) = 0); above
// ln(FLT_MAX) it saturates at 2^127.
FASTATTN_INLINE float exp(float x) {
  constexpr float kLo = -87.33654f, kHi = 88.37626f;
  const float xc = std::min(std::max(x, kLo), kHi);
  const float n = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
  float r = xc - n * 0.693145751953125f;                                    // Cody-Waite: ln 2 in two parts
  r = r - n * 1.428606765330187045e-06f;
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  const float value = p * two_n;
  return x < kLo ? 0.f : value;
}

// erf(x) by Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7), odd-extended.
FASTATTN_INLINE float erf(float x) {
  const float ax = std::abs(x);
  const float t = 1.f / (1.f + 0.3275911f * ax);
  float p = 1.061405429f;
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  const float y = 1.f - p * t * simd::exp(-ax * ax);
  return x < 0.f ? -y : y;
}

// tanh(x) = 1 - 2 / (1 + exp(2x)); exp saturates, so large |x| gives +-1 without overflow to NaN.
FASTATTN_INLINE float tanh(float x) { return 1.f - 2.f / (1.f + simd::exp(2.f * x)); }

FASTATTN_INLINE float sigmoid(float x) { return 1.f / (1.f + simd::exp(-x)); }

}  // namespace fastattn::cpu::simd
