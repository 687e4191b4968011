// Pieces the attention forward and backward kernels share: block scheduling, score masking,
// dropout, launch helpers.
#pragma once

#include <cstdint>
#include <type_traits>

#include "attention.cuh"
#include "common.cuh"

namespace fastattn {
namespace cuda {

// Which operand tiles may use 16-byte copies (see rows_vectorizable).
struct VecFlags {
  bool q = false, k = false, v = false, dout = false;
};

// A (n, d) slice can be copied in 16-byte chunks: d contiguous, `dim` a multiple of 16 bytes and
// every row start 16-byte aligned.
inline bool rows_vectorizable(const View4& view, int dim, int elem_bytes) {
  const int per_chunk = 16 / elem_bytes;
  return view.sd == 1 && dim % per_chunk == 0 && reinterpret_cast<uintptr_t>(view.ptr) % 16 == 0 &&
         view.sb % per_chunk == 0 && view.sh % per_chunk == 0 && view.sn % per_chunk == 0;
}

// Head-dim bucket the kernels are compiled for: 32, 64, 128 or 256 (0 when too large).
inline int head_dim_bucket(int dim) {
  if (dim <= 32) return 32;
  if (dim <= 64) return 64;
  if (dim <= 128) return 128;
  if (dim <= kMaxHeadDim) return 256;
  return 0;
}

// Whether the binary holds sm_80+ code for `kernel`. A build for older archs only (e.g.
// TORCH_CUDA_ARCH_LIST=7.5 run on an A100 through PTX JIT) compiled the tensor-core kernels'
// bodies to a trap: the launchers then take the CUDA-core kernels instead. Cached per kernel.
template <typename Kernel>
bool has_sm80_code(Kernel kernel) {
#if defined(FASTATTN_EMULATE)
  (void)kernel;
  return true;
#else
  static const bool has_code = [kernel] {
    cudaFuncAttributes attributes;
    if (cudaFuncGetAttributes(&attributes, kernel) != cudaSuccess) {
      (void)cudaGetLastError();  // clear it: the next launch reports its own status
      return false;
    }
    return attributes.ptxVersion >= 80;
  }();
  return has_code;
#endif
}

// Query-block kernels (the forward, the backward's dQ): block -> (batch, head, first query row).
// Query blocks of one head are neighbours (their K/V stay in L2) and, under causal masking, the
// longest rows go first.
struct QueryBlock {
  int b, h, hk, q0;
};

__device__ __forceinline__ QueryBlock query_block(const AttentionShape& sh, int block_rows) {
  const int num_m_blocks = (sh.len_q + block_rows - 1) / block_rows;
  const int64_t block = blockIdx.x;
  const int bh = static_cast<int>(block / num_m_blocks);
  const int m_block = num_m_blocks - 1 - static_cast<int>(block % num_m_blocks);
  QueryBlock qb;
  qb.b = bh / sh.heads_q;
  qb.h = bh % sh.heads_q;
  qb.hk = qb.h / (sh.heads_q / sh.heads_kv);
  qb.q0 = m_block * block_rows;
  return qb;
}

// Keys a query block can see: all of them, or (causal) those up to its last row.
__device__ __forceinline__ int visible_keys(const AttentionShape& sh, int q0, int block_rows) {
  return sh.causal ? min(sh.len_k, q0 + block_rows) : sh.len_k;
}

// Masked, scaled score in log2 units: -inf where the key is past Nk or above the causal diagonal,
// plus the mask's value (times log2 e). Reads the mask only for in-range (i, j).
__device__ __forceinline__ float masked_score_log2(float dot, const AttentionShape& sh, int b, int h, int i, int j,
                                                   float scale_log2) {
  if (j >= sh.len_k || i >= sh.len_q || (sh.causal && j > i)) return -kInf;
  float x = dot * scale_log2;
  if (sh.mask_kind != MaskKind::kNone) {
    const int64_t offset = b * sh.mask_sb + h * sh.mask_sh + i * sh.mask_sq + j * sh.mask_sk;
    const float bias = mask_bias(sh.mask, sh.mask_kind, offset);
    // a key the bool mask hides is -inf even under a NaN score (NaN query row or scale): a fully masked
    // row stays zeros, as on the other backends
    x = sh.mask_kind == MaskKind::kBool && bias == -kInf ? -kInf : x + bias * kLog2e;
  }
  return x;
}

// A device function kept out of line (the CPU emulator compiles these sources with the host compiler).
#if defined(FASTATTN_EMULATE)
#define FASTATTN_NOINLINE static __attribute__((noinline))  // static: one copy per translation unit
#else
#define FASTATTN_NOINLINE __noinline__
#endif

// Dropout multiplier of element (b, h, i, j): 0 or 1/(1 - p). Same draw in forward and backward:
// Philox stream b·Hq + h, row i, column j (csrc/dropout_rng.h). Callers draw where few registers
// are live (the simple forward kernel: a second pass over its weights, after the scores are dead).
__device__ __forceinline__ float dropout_multiplier(uint64_t seed, uint32_t threshold, float kept, uint32_t stream,
                                                 uint32_t i, uint32_t j) {
  return dropout_bits(seed, stream, i, j) >= threshold ? kept : 0.f;
}

__device__ __forceinline__ float dropout_scale(const AttentionShape& sh, int b, int h, int i, int j) {
  const uint32_t stream = static_cast<uint32_t>(b) * static_cast<uint32_t>(sh.heads_q) + static_cast<uint32_t>(h);
  return dropout_multiplier(dropout_seed_of(sh.dropout), sh.dropout.threshold, sh.dropout.scale, stream,
                            static_cast<uint32_t>(i), static_cast<uint32_t>(j));
}

// The multipliers of the adjacent elements (b, h, i, j) and (b, h, i, j + 1), j even: one Philox
// call, as both lie in the quad j / 4 (the two columns of a thread's mma C fragment). A called
// function (scalars in and out: no struct is copied to local memory): inlined into the mma
// kernels' head-dim-256 loops, the Philox rounds pushed ptxas past 255 registers (16 bytes of
// spills on sm_80); as a call they cost registers only on the dropout path.
struct DropoutPair {
  float x, y;  // the multipliers of columns j and j + 1
};
__device__ FASTATTN_NOINLINE DropoutPair dropout_multiplier_pair(uint64_t seed, uint32_t threshold, float kept,
                                                            uint32_t stream, uint32_t i, uint32_t j) {
  const Philox4 r = dropout_bits4(seed, stream, i, j >> 2);
  const bool upper = (j & 2) != 0;
  const uint32_t w0 = upper ? r.x2 : r.x0, w1 = upper ? r.x3 : r.x1;
  return {w0 >= threshold ? kept : 0.f, w1 >= threshold ? kept : 0.f};
}

__device__ __forceinline__ DropoutPair dropout_scale_pair(const AttentionShape& sh, int b, int h, int i, int j) {
  const uint32_t stream = static_cast<uint32_t>(b) * static_cast<uint32_t>(sh.heads_q) + static_cast<uint32_t>(h);
  return dropout_multiplier_pair(dropout_seed_of(sh.dropout), sh.dropout.threshold, sh.dropout.scale, stream,
                                 static_cast<uint32_t>(i), static_cast<uint32_t>(j));
}

}  // namespace cuda
}  // namespace fastattn
