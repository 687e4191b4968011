// The dropout RNG of every backend: Philox 4x32-10 (Salmon et al., "Parallel random numbers: as easy
// as 1, 2, 3", SC'11; the generator of Random123, cuRAND's Philox4_32_10 and Triton's tl.philox),
// counter-based, so that any kernel draws the keep decision of any element in any order and the
// backward regenerates the forward's mask. The CPU kernels (csrc/cpu), the CUDA kernels (csrc/cuda)
// and the Triton kernels (fastattn/triton/attention.py `_dropout_keep`, ffn.py `_keep`) and
// fastattn/reference.py `dropout_keep` implement this one scheme, so one seed drops the same
// elements everywhere.
//
// The scheme. A dropout shape is read as (S, R, C): C its last dim, R the one before (1 for a 1-D
// shape), S the product of the others:
//   attention weights (B, Hq, Nq, Nk): stream s = b·Hq + h, row = i, col = j;
//   FFN activation (M, hidden):       stream s = 0,        row = M index, col = hidden index.
// Element (s, row, col) takes output number col % 4 of
//   philox4x32_10(counter = (col / 4, row, s, 0), key = (seed mod 2^32, seed / 2^32))
// (seed the int64 seed as 64 unsigned bits), so one Philox call serves 4 consecutive columns of a
// row. It is kept iff that 32-bit output >= dropout_threshold(p), an integer compare, and kept
// elements are scaled by 1 / (1 - p). Limits: s, row < 2^32 and col < 2^34 (checked by the ops).
//
// dropout_threshold(p) = min(ceil(f · 2^32), 2^32 - 256) with f = p rounded to float32: every step
// is exact in float32, so the Triton kernels (which receive p as a float32) compute it bit for bit
// as the host does here. P(drop) = threshold / 2^32.
//
// The op fastattn::dropout_mask returns this mask so tests can mirror it.
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

struct Philox4 {
  uint32_t x0, x1, x2, x3;
};

// The high 32 bits of the 64-bit product (one mul.hi on the GPU).
FASTATTN_HOST_DEVICE uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

// Philox 4x32 with 10 rounds: the round multipliers 0xD2511F53 / 0xCD9E8D57 and the Weyl key
// increments 0x9E3779B9 / 0xBB67AE85 of the paper.
FASTATTN_HOST_DEVICE Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                           uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = mulhi32(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    const uint32_t hi1 = mulhi32(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {c0, c1, c2, c3};
}

// The 4 draws of columns 4·quad .. 4·quad + 3 of row `row` of stream `stream`.
FASTATTN_HOST_DEVICE Philox4 dropout_bits4(uint64_t seed, uint32_t stream, uint32_t row, uint32_t quad) {
  return philox4x32_10(quad, row, stream, 0u, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Output `lane` (0..3) of a draw, by selects (no dynamically indexed array: stays in registers).
FASTATTN_HOST_DEVICE uint32_t philox_lane(const Philox4& r, uint32_t lane) {
  return (lane & 2u) ? ((lane & 1u) ? r.x3 : r.x2) : ((lane & 1u) ? r.x1 : r.x0);
}

// The draw of one element (s, row, col): a full Philox call; kernels that walk a row use
// dropout_bits4 once per 4 columns instead.
FASTATTN_HOST_DEVICE uint32_t dropout_bits(uint64_t seed, uint32_t stream, uint32_t row, uint64_t col) {
  const Philox4 r = dropout_bits4(seed, stream, row, static_cast<uint32_t>(col >> 2));
  return philox_lane(r, static_cast<uint32_t>(col & 3u));
}

// Calls fn(c, kept) for the columns col0 + c, c in [0, n), of row `row` of stream `stream`, kept
// being draw >= threshold: one Philox call per 4 columns (the CPU kernels' row walk).
template <typename Fn>
FASTATTN_HOST_DEVICE void dropout_row_keep(uint64_t seed, uint32_t threshold, uint32_t stream, uint32_t row,
                                           int64_t col0, int64_t n, Fn&& fn) {
  int64_t c = 0;
  if ((col0 & 3) != 0 && n > 0) {  // the rest of a quad begun before col0
    const Philox4 r = dropout_bits4(seed, stream, row, static_cast<uint32_t>(col0 >> 2));
    for (uint32_t lane = static_cast<uint32_t>(col0 & 3); lane < 4u && c < n; ++lane, ++c) {
      fn(c, philox_lane(r, lane) >= threshold);
    }
  }
  for (; c + 4 <= n; c += 4) {  // whole quads: the 4 words in order
    const Philox4 r = dropout_bits4(seed, stream, row, static_cast<uint32_t>((col0 + c) >> 2));
    fn(c, r.x0 >= threshold);
    fn(c + 1, r.x1 >= threshold);
    fn(c + 2, r.x2 >= threshold);
    fn(c + 3, r.x3 >= threshold);
  }
  if (c < n) {  // a quad cut by the end
    const Philox4 r = dropout_bits4(seed, stream, row, static_cast<uint32_t>((col0 + c) >> 2));
    for (uint32_t lane = 0; c < n; ++lane, ++c) fn(c, philox_lane(r, lane) >= threshold);
  }
}

// Elements whose draw is below the threshold are dropped (see the scheme above).
inline uint32_t dropout_threshold(double p) {
  const float f = static_cast<float>(p);
  const float t = std::ceil(f * 4294967296.0f);  // exact: a power-of-two scale, then an integer
  return t >= 4294967040.0f ? 4294967040u : static_cast<uint32_t>(t);
}

// Largest stream/row count (2^32) and column count (2^34) the counters address.
constexpr uint64_t kDropoutMaxRows = uint64_t{1} << 32;
constexpr uint64_t kDropoutMaxCols = uint64_t{1} << 34;

}  // namespace fastattn
