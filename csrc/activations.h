// The FFN's activations for the CPU and CUDA kernels: their codes, names and gating, and the scalar
// functions with their derivatives, written once.
//
// The codes are those of fastattn/activations.py (the Python table; tests/test_activations.py checks
// that the two agree). The extension's ops take the activation's name (schemas in csrc/fastattn.cpp);
// parse_activation below is the one place that turns it into a code (csrc/activation_arg.h wraps it
// with torch's error for the ops).
//
// The functions are templates over a math policy M (static exp, tanh, sigmoid and normal_cdf on
// float), so that each backend keeps its own elementary functions (the CPU's branch-free polynomials
// that vectorise, the CUDA kernels' erfc/expm1 forms that survive --use_fast_math) while the formulas
// of the activations and of their derivatives exist once. Gated activations (swiglu: silu gate, geglu:
// exact erf gelu gate, geglu_tanh: tanh-approximated gelu gate) apply their base function to the gate
// half of h's columns (the first half) and multiply by the up half.
//
// Plain C++ (no torch header) so that nvcc compiles it for the device as well.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

#if defined(__CUDACC__)
#define FASTATTN_ACT_FN __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define FASTATTN_ACT_FN inline __attribute__((always_inline))  // a call left in a loop stops its vectorisation
#else
#define FASTATTN_ACT_FN inline
#endif

namespace fastattn {

enum class Activation : int { kRelu = 0, kGelu = 1, kGeluTanh = 2, kSilu = 3, kSwiglu = 4, kGeglu = 5, kGegluTanh = 6 };
constexpr int kNumActivations = 7;

FASTATTN_ACT_FN constexpr bool is_gated(Activation act) {
  return act == Activation::kSwiglu || act == Activation::kGeglu || act == Activation::kGegluTanh;
}

// The function applied to h (to the gate when gated).
FASTATTN_ACT_FN constexpr Activation base_activation(Activation act) {
  return act == Activation::kSwiglu     ? Activation::kSilu
         : act == Activation::kGeglu    ? Activation::kGelu
         : act == Activation::kGegluTanh ? Activation::kGeluTanh
                                         : act;
}

// ---- host only: names ----

// In code order: kActivationNames[code].
inline constexpr const char* kActivationNames[kNumActivations] = {"relu",   "gelu",  "gelu_tanh", "silu",
                                                                  "swiglu", "geglu", "geglu_tanh"};

// The activation named `name`, false when there is none.
inline bool parse_activation(std::string_view name, Activation* out) {
  for (int code = 0; code < kNumActivations; ++code) {
    if (name == kActivationNames[code]) {
      *out = static_cast<Activation>(code);
      return true;
    }
  }
  return false;
}

// "relu, gelu, ..., geglu_tanh", for error messages.
inline std::string activation_choices() {
  std::string out;
  for (int code = 0; code < kNumActivations; ++code) {
    if (code) out += ", ";
    out += kActivationNames[code];
  }
  return out;
}

// ---- the functions (host and device) ----

constexpr float kSqrtHalf = 0.70710678118654752f;     // 1/√2: Φ(x) = (1 + erf(x/√2)) / 2
constexpr float kInvSqrt2Pi = 0.39894228040143268f;   // 1/√(2π): φ(x) = e^{-x²/2}/√(2π)
constexpr float kSqrt2OverPi = 0.79788456080286536f;  // √(2/π), the tanh approximation's scale
constexpr float kGeluTanhCubic = 0.044715f;           // and its cubic coefficient

struct ActValue {
  float value, derivative;
};

// act(x) and act'(x) for a base (ungated) activation A; M supplies exp, tanh, sigmoid, normal_cdf.
template <Activation A, class M>
FASTATTN_ACT_FN ActValue activate(float x) {
  static_assert(!is_gated(A), "gated activations apply their base_activation to the gate");
  if constexpr (A == Activation::kRelu) {
    return {x < 0.f ? 0.f : x, x <= 0.f ? 0.f : 1.f};  // NaN stays NaN and passes its gradient, as torch
  } else if constexpr (A == Activation::kGelu) {
    const float cdf = M::normal_cdf(x);
    return {x * cdf, cdf + x * kInvSqrt2Pi * M::exp(-0.5f * x * x)};
  } else if constexpr (A == Activation::kGeluTanh) {
    const float t = M::tanh(kSqrt2OverPi * (x + kGeluTanhCubic * x * x * x));
    const float dinner = kSqrt2OverPi * (1.f + 3.f * kGeluTanhCubic * x * x);
    return {0.5f * x * (1.f + t), 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * dinner};
  } else {
    static_assert(A == Activation::kSilu, "unknown activation");
    const float s = M::sigmoid(x);
    return {x * s, s * (1.f + x * (1.f - s))};
  }
}

// The same for an activation known at run time (gated ones: their base function).
template <class M>
FASTATTN_ACT_FN ActValue activate(Activation act, float x) {
  switch (base_activation(act)) {
    case Activation::kRelu:
      return activate<Activation::kRelu, M>(x);
    case Activation::kGelu:
      return activate<Activation::kGelu, M>(x);
    case Activation::kGeluTanh:
      return activate<Activation::kGeluTanh, M>(x);
    default:
      return activate<Activation::kSilu, M>(x);
  }
}

}  // namespace fastattn
