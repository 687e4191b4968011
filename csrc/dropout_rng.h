// The dropout RNG shared by the CPU and CUDA kernels: a counter-based hash, so that any kernel can
// draw the keep decision of any element in any order and the backward regenerates the forward's mask.
//
// Element `offset` is the linear index of the element in the contiguous dropout shape:
//   attention: ((b * Hq + h) * Nq + i) * Nk + j     (the attention weights, B x Hq x Nq x Nk)
//   FFN:       row * hidden + col                   (the activation, M x hidden)
// keep(offset) = dropout_bits(dropout_key(seed), offset) >= dropout_threshold(p); kept elements are
// scaled by 1 / (1 - p). The op fastattn::dropout_mask returns this mask so tests can mirror it.
//
// Plain C++ (no torch header) so that nvcc compiles it for the device as well.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FASTATTN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTATTN_HOST_DEVICE inline
#endif

namespace fastattn {

// The splitmix64 finaliser: a bijective mix whose output bits all depend on every input bit.
FASTATTN_HOST_DEVICE uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Per-call key: mixing the seed first keeps nearby seeds from giving shifted copies of one stream.
FASTATTN_HOST_DEVICE uint64_t dropout_key(uint64_t seed) { return mix64(seed ^ 0x5DEECE66Dull); }

// 24 uniform random bits for one element (the splitmix64 sequence of `key`, read at `offset`).
FASTATTN_HOST_DEVICE uint32_t dropout_bits(uint64_t key, uint64_t offset) {
  return static_cast<uint32_t>(mix64(key + (offset + 1) * 0x9E3779B97F4A7C15ull) >> 40);
}

// Elements whose bits are below the threshold are dropped: P(drop) = ceil(p * 2^24) / 2^24.
inline uint32_t dropout_threshold(double p) { return static_cast<uint32_t>(std::ceil(p * 16777216.0)); }

}  // namespace fastattn
