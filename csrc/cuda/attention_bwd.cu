// Attention backward. With P = softmax(S) recomputed from q, k and lse, Z the dropout multipliers
// and delta_i = Σ_d dO[i,d]·O[i,d] (= Σ_j P_ij Z_ij dP_ij):
//   dV_j = Σ_i P_ij Z_ij dO_i        dP_ij = dO_i · V_j
//   dS_ij = P_ij (Z_ij dP_ij - delta_i) · scale
//   dK_j = Σ_i dS_ij Q_i             dQ_i = Σ_j dS_ij K_j
// Three kernels, FlashAttention-2's split: a delta kernel; a key-block kernel that owns dK/dV of
// BN keys of one kv head and loops over the query blocks of every query head of its group (so
// GQA needs no atomics); a query-block kernel that owns dQ of BM rows of one query head and loops
// over the key blocks. Both recompute P (and dP) from the saved lse: the score products are done
// twice, but no gradient is shared between blocks, so there are no atomics, no float32 dQ buffer
// and no conversion pass, every warp works in every phase, and the result is bit-deterministic
// (each element is summed by one thread in a fixed order).
//
// Kernels: attention_bwd_{dkdv,dq}_mma_kernel (sm_80+, fp16/bf16, head dims <= 128; mma.sync,
// 16 keys resp. 16 query rows per warp, every product's A operand from registers or ldmatrix) and
// attention_bwd_{dkdv,dq}_simple_kernel (every arch and dtype, fp32 CUDA cores).
#include <algorithm>

#include "attention.cuh"
#include "attention_common.cuh"
#include "mma.cuh"

namespace fastattn {
namespace cuda {
namespace {

// delta[b, h, i] = Σ_d dout[b, h, i, d] · out[b, h, i, d] in float32, one warp per row.
template <typename T>
__global__ void __launch_bounds__(128) attention_delta_kernel(const AttentionBwdParams p) {
  const AttentionShape& sh = p.shape;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 4 + (threadIdx.x >> 5);
  const int64_t rows = static_cast<int64_t>(sh.batch) * sh.heads_q * sh.len_q;
  if (row >= rows) return;  // whole warps leave together: the shuffles below see full warps
  const int lane = threadIdx.x & 31;
  const int i = static_cast<int>(row % sh.len_q);
  const int64_t bh = row / sh.len_q;
  const int b = static_cast<int>(bh / sh.heads_q), h = static_cast<int>(bh % sh.heads_q);
  const T* dout = static_cast<const T*>(p.dout.ptr) + p.dout.offset(b, h, i, 0);
  const T* out = static_cast<const T*>(p.out.ptr) + p.out.offset(b, h, i, 0);
  float sum = 0.f;
  for (int d = lane; d < sh.dim_v; d += 32) sum += to_float(dout[d * p.dout.sd]) * to_float(out[d * p.out.sd]);
  sum = group_sum<32>(sum);
  if (lane == 0) p.delta[row] = sum;
}

// Block -> (batch, kv head, first key).
struct KeyBlock {
  int b, hk, k0;
};

__device__ __forceinline__ KeyBlock key_block(const AttentionShape& sh, int block_keys) {
  const int num_n_blocks = (sh.len_k + block_keys - 1) / block_keys;
  const int64_t block = blockIdx.x;
  const int bhk = static_cast<int>(block / num_n_blocks);
  KeyBlock kb;
  kb.b = bhk / sh.heads_kv;
  kb.hk = bhk % sh.heads_kv;
  kb.k0 = static_cast<int>(block % num_n_blocks) * block_keys;
  return kb;
}

// First query block (index) that can see key k0: causal rows i < k0 see none of keys >= k0.
__device__ __forceinline__ int first_query_block(const AttentionShape& sh, int k0, int block_rows) {
  return sh.causal ? k0 / block_rows : 0;
}

// Row index into lse/delta of (b, h, i).
__device__ __forceinline__ int64_t lse_row(const AttentionShape& sh, int b, int h, int i) {
  return (static_cast<int64_t>(b) * sh.heads_q + h) * sh.len_q + i;
}

// =============================================================================================
// tensor-core kernels (sm_80+, head dims <= 128)
// =============================================================================================

// Blocks per SM the kernels are compiled for (__launch_bounds__'s second argument). Without it
// ptxas picks its own occupancy target and spills a few registers to reach it (dK/dV mma at head
// dim 32: 168 registers and 52 bytes of spill traffic for 3 blocks; CUDA-core dQ: 64 registers and
// 16-24 bytes); with these every kernel compiles spill-free for sm_80 and sm_90 (benchmarks/NOTES.md).
constexpr int kMinBlocksMma = 2;         // 128 threads each: up to 255 registers
constexpr int kMinBlocksDkdvSimple = 3;  // up to 168 registers (at 4 blocks, 16-bit d64/d128 spill on sm_90)
constexpr int kMinBlocksDqSimple = 4;    // up to 128 registers

// dK/dV of kBlockN = 16·kWarps keys. Per query block of kBlockM rows (Q, dO double-buffered with
// cp.async when kStages == 2): Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ (rows = this warp's 16 keys), then
// dV += (P∘Z)ᵀ·dO and dK += dSᵀ·Q with the A operands straight from registers.
template <typename T, int kHeadDim, int kBlockM, int kWarps, int kStages>
__global__ void __launch_bounds__(kWarps * 32, kMinBlocksMma)
    attention_bwd_dkdv_mma_kernel(const AttentionBwdParams p, const VecFlags vec) {
#if FASTATTN_SM80
  constexpr int kBlockN = 16 * kWarps, kThreads = kWarps * 32, kLd = kHeadDim + 8;
  constexpr int kDimTiles = kHeadDim / 8, kQueryTiles = kBlockM / 8;
  FASTATTN_DYNAMIC_SHARED(T, k_tile);
  T* v_tile = k_tile + kBlockN * kLd;
  T* q_tiles = v_tile + kBlockN * kLd;             // kStages × [kBlockM][kLd]
  T* do_tiles = q_tiles + kStages * kBlockM * kLd;  // kStages × [kBlockM][kLd]
  float* lse_tiles = reinterpret_cast<float*>(do_tiles + kStages * kBlockM * kLd);  // log2 units
  float* delta_tiles = lse_tiles + kStages * kBlockM;

  const AttentionShape& sh = p.shape;
  const KeyBlock kb = key_block(sh, kBlockN);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, group = lane >> 2, tig = lane & 3;
  const int warp_key0 = warp * 16;
  const int group_size = sh.heads_q / sh.heads_kv;
  const float scale_log2 = sh.scale * kLog2e;
  const bool has_dropout = sh.dropout.active;
  // (query head of the group, query block) pairs, flattened so that the pipeline runs across heads.
  const int first_m_block = first_query_block(sh, kb.k0, kBlockM);
  const int m_blocks = max(0, (sh.len_q + kBlockM - 1) / kBlockM - first_m_block);
  const int steps = group_size * m_blocks;

  auto load_queries = [&](int step, int stage) {
    const int h = kb.hk * group_size + step / m_blocks, q0 = (first_m_block + step % m_blocks) * kBlockM;
    const T* q_base = static_cast<const T*>(p.q.ptr) + kb.b * p.q.sb + h * p.q.sh;
    const T* do_base = static_cast<const T*>(p.dout.ptr) + kb.b * p.dout.sb + h * p.dout.sh;
    load_tile_async<T, kBlockM, kHeadDim, kLd, kThreads>(q_tiles + stage * kBlockM * kLd, q_base, p.q.sn, p.q.sd, q0,
                                                         sh.len_q, sh.dim_qk, vec.q);
    load_tile_async<T, kBlockM, kHeadDim, kLd, kThreads>(do_tiles + stage * kBlockM * kLd, do_base, p.dout.sn,
                                                         p.dout.sd, q0, sh.len_q, sh.dim_v, vec.dout);
    const int64_t row_base = lse_row(sh, kb.b, h, 0);
    for (int r = threadIdx.x; r < kBlockM; r += kThreads) {
      const bool valid = q0 + r < sh.len_q;
      lse_tiles[stage * kBlockM + r] = valid ? p.lse[row_base + q0 + r] * kLog2e : kInf;
      delta_tiles[stage * kBlockM + r] = valid ? p.delta[row_base + q0 + r] : 0.f;
    }
  };

  const T* k_base = static_cast<const T*>(p.k.ptr) + kb.b * p.k.sb + kb.hk * p.k.sh;
  const T* v_base = static_cast<const T*>(p.v.ptr) + kb.b * p.v.sb + kb.hk * p.v.sh;
  load_tile_async<T, kBlockN, kHeadDim, kLd, kThreads>(k_tile, k_base, p.k.sn, p.k.sd, kb.k0, sh.len_k, sh.dim_qk,
                                                       vec.k);
  load_tile_async<T, kBlockN, kHeadDim, kLd, kThreads>(v_tile, v_base, p.v.sn, p.v.sd, kb.k0, sh.len_k, sh.dim_v,
                                                       vec.v);
  if (steps > 0) load_queries(0, 0);
  cp_async_commit();

  float dk[kDimTiles][4], dv[kDimTiles][4];
#pragma unroll
  for (int t = 0; t < kDimTiles; ++t) {
    dk[t][0] = dk[t][1] = dk[t][2] = dk[t][3] = 0.f;
    dv[t][0] = dv[t][1] = dv[t][2] = dv[t][3] = 0.f;
  }

  for (int step = 0; step < steps; ++step) {
    const int stage = kStages == 2 ? (step & 1) : 0;
    if (kStages == 2 && step + 1 < steps) {
      load_queries(step + 1, (step + 1) & 1);  // that stage was last read in step - 1, which ended synced
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int h = kb.hk * group_size + step / m_blocks, q0 = (first_m_block + step % m_blocks) * kBlockM;
    const T* q_tile = q_tiles + stage * kBlockM * kLd;
    const T* do_tile = do_tiles + stage * kBlockM * kLd;
    const float* lse_tile = lse_tiles + stage * kBlockM;
    const float* delta_tile = delta_tiles + stage * kBlockM;

    // Sᵀ and dPᵀ: 16 keys × kBlockM queries per warp.
    float st[kQueryTiles][4], dpt[kQueryTiles][4];
#pragma unroll
    for (int t = 0; t < kQueryTiles; ++t) {
      st[t][0] = st[t][1] = st[t][2] = st[t][3] = 0.f;
      dpt[t][0] = dpt[t][1] = dpt[t][2] = dpt[t][3] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
      uint32_t a_k[4], a_v[4];
      load_a_rowmajor(a_k, k_tile, kLd, warp_key0, kk * 16);
      load_a_rowmajor(a_v, v_tile, kLd, warp_key0, kk * 16);
#pragma unroll
      for (int nt2 = 0; nt2 < kBlockM / 16; ++nt2) {
        uint32_t b[4];
        load_b_transposed(b, q_tile, kLd, nt2 * 16, kk * 16);
        mma_16816<T>(st[2 * nt2], a_k, b[0], b[1]);
        mma_16816<T>(st[2 * nt2 + 1], a_k, b[2], b[3]);
        load_b_transposed(b, do_tile, kLd, nt2 * 16, kk * 16);
        mma_16816<T>(dpt[2 * nt2], a_v, b[0], b[1]);
        mma_16816<T>(dpt[2 * nt2 + 1], a_v, b[2], b[3]);
      }
    }

    // st <- P∘Z (for dV), dpt <- dS·scale (for dK). Tiles whose keys all exist and lie on or
    // below the diagonal of every query of the block skip the per-element checks (rows past Nq
    // have lse = +inf, hence P = 0, either way).
    const bool interior = kb.k0 + kBlockN <= sh.len_k && (!sh.causal || kb.k0 + warp_key0 + 15 <= q0) &&
                          sh.mask_kind == MaskKind::kNone;
#pragma unroll
    for (int t = 0; t < kQueryTiles; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key_local = warp_key0 + group + (e >> 1) * 8, query_local = t * 8 + 2 * tig + (e & 1);
        const int i = q0 + query_local, j = kb.k0 + key_local;
        const float x = interior ? st[t][e] * scale_log2 : masked_score_log2(st[t][e], sh, kb.b, h, i, j, scale_log2);
        const float prob = exp2f(x - lse_tile[query_local]);  // 0 when masked or the row is (lse = +inf)
        const float z = (has_dropout && prob != 0.f) ? dropout_scale(sh, kb.b, h, i, j) : 1.f;
        st[t][e] = prob * z;
        dpt[t][e] = prob * (dpt[t][e] * z - delta_tile[query_local]) * sh.scale;
      }
    }

    // dV += (P∘Z)ᵀ·dO and dK += dSᵀ·Q, A operands straight from registers.
#pragma unroll
    for (int kq = 0; kq < kBlockM / 16; ++kq) {
      const uint32_t a_p[4] = {pack2<T>(st[2 * kq][0], st[2 * kq][1]), pack2<T>(st[2 * kq][2], st[2 * kq][3]),
                               pack2<T>(st[2 * kq + 1][0], st[2 * kq + 1][1]),
                               pack2<T>(st[2 * kq + 1][2], st[2 * kq + 1][3])};
      const uint32_t a_ds[4] = {pack2<T>(dpt[2 * kq][0], dpt[2 * kq][1]), pack2<T>(dpt[2 * kq][2], dpt[2 * kq][3]),
                                pack2<T>(dpt[2 * kq + 1][0], dpt[2 * kq + 1][1]),
                                pack2<T>(dpt[2 * kq + 1][2], dpt[2 * kq + 1][3])};
#pragma unroll
      for (int dt2 = 0; dt2 < kHeadDim / 16; ++dt2) {
        uint32_t b[4];
        load_b_rowmajor(b, do_tile, kLd, kq * 16, dt2 * 16);
        mma_16816<T>(dv[2 * dt2], a_p, b[0], b[1]);
        mma_16816<T>(dv[2 * dt2 + 1], a_p, b[2], b[3]);
        load_b_rowmajor(b, q_tile, kLd, kq * 16, dt2 * 16);
        mma_16816<T>(dk[2 * dt2], a_ds, b[0], b[1]);
        mma_16816<T>(dk[2 * dt2 + 1], a_ds, b[2], b[3]);
      }
    }
    __syncthreads();  // every warp is done with this stage before it is refilled
    if (kStages == 1 && step + 1 < steps) {
      load_queries(step + 1, 0);
      cp_async_commit();
    }
  }
  cp_async_wait<0>();  // nothing may be in flight at exit (no query block at all)

  // dK, dV of this warp's 16 keys.
  T* dk_base = static_cast<T*>(p.dk.ptr) + kb.b * p.dk.sb + kb.hk * p.dk.sh;
  T* dv_base = static_cast<T*>(p.dv.ptr) + kb.b * p.dv.sb + kb.hk * p.dv.sh;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int j = kb.k0 + warp_key0 + group + (e >> 1) * 8;
    if (j >= sh.len_k) continue;
#pragma unroll
    for (int t = 0; t < kDimTiles; ++t) {
      const int col = t * 8 + 2 * tig + (e & 1);
      if (col < sh.dim_qk) dk_base[j * p.dk.sn + col * p.dk.sd] = from_float<T>(dk[t][e]);
      if (col < sh.dim_v) dv_base[j * p.dv.sn + col * p.dv.sd] = from_float<T>(dv[t][e]);
    }
  }
#else
  __trap();  // launchers pick this kernel on sm_80+ only
#endif
}

// dQ of kBlockM = 16·kWarps query rows of one head, one warp per 16 rows. Per key block (K, V
// double-buffered with cp.async when kStages == 2): S = Q·Kᵀ and dP = dO·Vᵀ, dS in registers, then
// dQ += dS·K with dS as the A operand (the C layout of two key tiles is the A layout of one k-step).
// lse and delta of the lane's two rows stay in registers.
template <typename T, int kHeadDim, int kBlockN, int kWarps, int kStages>
__global__ void __launch_bounds__(kWarps * 32, kMinBlocksMma)
    attention_bwd_dq_mma_kernel(const AttentionBwdParams p, const VecFlags vec, const bool vec_dq) {
#if FASTATTN_SM80
  constexpr int kBlockM = 16 * kWarps, kThreads = kWarps * 32, kLd = kHeadDim + 8;
  constexpr int kDimTiles = kHeadDim / 8, kKeyTiles = kBlockN / 8;
  FASTATTN_DYNAMIC_SHARED(T, q_tile);
  T* do_tile = q_tile + kBlockM * kLd;
  T* k_tiles = do_tile + kBlockM * kLd;  // kStages × [kBlockN][kLd]
  T* v_tiles = k_tiles + kStages * kBlockN * kLd;

  const AttentionShape& sh = p.shape;
  const QueryBlock qb = query_block(sh, kBlockM);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, group = lane >> 2, tig = lane & 3;
  const int warp_row0 = warp * 16;
  const float scale_log2 = sh.scale * kLog2e;
  const bool has_dropout = sh.dropout.active;

  const T* q_base = static_cast<const T*>(p.q.ptr) + qb.b * p.q.sb + qb.h * p.q.sh;
  const T* do_base = static_cast<const T*>(p.dout.ptr) + qb.b * p.dout.sb + qb.h * p.dout.sh;
  const T* k_base = static_cast<const T*>(p.k.ptr) + qb.b * p.k.sb + qb.hk * p.k.sh;
  const T* v_base = static_cast<const T*>(p.v.ptr) + qb.b * p.v.sb + qb.hk * p.v.sh;
  const int num_key_blocks = (visible_keys(sh, qb.q0, kBlockM) + kBlockN - 1) / kBlockN;

  auto load_kv = [&](int key_block, int stage) {
    const int k0 = key_block * kBlockN;
    load_tile_async<T, kBlockN, kHeadDim, kLd, kThreads>(k_tiles + stage * kBlockN * kLd, k_base, p.k.sn, p.k.sd, k0,
                                                         sh.len_k, sh.dim_qk, vec.k);
    load_tile_async<T, kBlockN, kHeadDim, kLd, kThreads>(v_tiles + stage * kBlockN * kLd, v_base, p.v.sn, p.v.sd, k0,
                                                         sh.len_k, sh.dim_v, vec.v);
  };
  load_tile_async<T, kBlockM, kHeadDim, kLd, kThreads>(q_tile, q_base, p.q.sn, p.q.sd, qb.q0, sh.len_q, sh.dim_qk,
                                                       vec.q);
  load_tile_async<T, kBlockM, kHeadDim, kLd, kThreads>(do_tile, do_base, p.dout.sn, p.dout.sd, qb.q0, sh.len_q,
                                                       sh.dim_v, vec.dout);
  if (num_key_blocks > 0) load_kv(0, 0);
  cp_async_commit();

  float lse_log2[2], delta[2];  // rows group and group + 8 of this warp
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = qb.q0 + warp_row0 + group + r * 8;
    const bool valid = i < sh.len_q;
    lse_log2[r] = valid ? p.lse[lse_row(sh, qb.b, qb.h, i)] * kLog2e : kInf;
    delta[r] = valid ? p.delta[lse_row(sh, qb.b, qb.h, i)] : 0.f;
  }
  float dq[kDimTiles][4];
#pragma unroll
  for (int t = 0; t < kDimTiles; ++t) dq[t][0] = dq[t][1] = dq[t][2] = dq[t][3] = 0.f;

  for (int kb = 0; kb < num_key_blocks; ++kb) {
    const int stage = kStages == 2 ? (kb & 1) : 0;
    if (kStages == 2 && kb + 1 < num_key_blocks) {
      load_kv(kb + 1, (kb + 1) & 1);  // that stage was last read in iteration kb - 1, which ended synced
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* k_tile = k_tiles + stage * kBlockN * kLd;
    const T* v_tile = v_tiles + stage * kBlockN * kLd;
    const int k0 = kb * kBlockN;

    // S = Q·Kᵀ and dP = dO·Vᵀ for this warp's 16 rows and the block's keys.
    float s[kKeyTiles][4], dp[kKeyTiles][4];
#pragma unroll
    for (int t = 0; t < kKeyTiles; ++t) {
      s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.f;
      dp[t][0] = dp[t][1] = dp[t][2] = dp[t][3] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
      uint32_t a_q[4], a_do[4];
      load_a_rowmajor(a_q, q_tile, kLd, warp_row0, kk * 16);
      load_a_rowmajor(a_do, do_tile, kLd, warp_row0, kk * 16);
#pragma unroll
      for (int nt2 = 0; nt2 < kBlockN / 16; ++nt2) {
        uint32_t b[4];
        load_b_transposed(b, k_tile, kLd, nt2 * 16, kk * 16);
        mma_16816<T>(s[2 * nt2], a_q, b[0], b[1]);
        mma_16816<T>(s[2 * nt2 + 1], a_q, b[2], b[3]);
        load_b_transposed(b, v_tile, kLd, nt2 * 16, kk * 16);
        mma_16816<T>(dp[2 * nt2], a_do, b[0], b[1]);
        mma_16816<T>(dp[2 * nt2 + 1], a_do, b[2], b[3]);
      }
    }

    // dS·scale in place of dP. Tiles fully inside the keys and below the diagonal skip the checks.
    const bool interior = k0 + kBlockN <= sh.len_k && (!sh.causal || k0 + kBlockN - 1 <= qb.q0 + warp_row0) &&
                          sh.mask_kind == MaskKind::kNone;
#pragma unroll
    for (int t = 0; t < kKeyTiles; ++t) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {  // elements 2·half, 2·half + 1: columns j, j + 1 of row i
        const int i = qb.q0 + warp_row0 + group + half * 8;
        const int j = k0 + t * 8 + 2 * tig;
        float prob[2];
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int e = 2 * half + c;
          const float x =
              interior ? s[t][e] * scale_log2 : masked_score_log2(s[t][e], sh, qb.b, qb.h, i, j + c, scale_log2);
          prob[c] = exp2f(x - lse_log2[half]);  // 0 when masked or the row is (lse = +inf)
        }
        // the two columns share one Philox call (dropout_scale_pair)
        const DropoutPair zz = (has_dropout && (prob[0] != 0.f || prob[1] != 0.f))
                                   ? dropout_scale_pair(sh, qb.b, qb.h, i, j)
                                   : DropoutPair{1.f, 1.f};
        const float z[2] = {prob[0] != 0.f ? zz.x : 1.f, prob[1] != 0.f ? zz.y : 1.f};
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          dp[t][2 * half + c] = prob[c] * (dp[t][2 * half + c] * z[c] - delta[half]) * sh.scale;
        }
      }
    }

    // dQ += dS·K: dS from registers, K row-major ([key][d]) as B.
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      const uint32_t a[4] = {pack2<T>(dp[2 * kk][0], dp[2 * kk][1]), pack2<T>(dp[2 * kk][2], dp[2 * kk][3]),
                             pack2<T>(dp[2 * kk + 1][0], dp[2 * kk + 1][1]),
                             pack2<T>(dp[2 * kk + 1][2], dp[2 * kk + 1][3])};
#pragma unroll
      for (int dt2 = 0; dt2 < kHeadDim / 16; ++dt2) {
        uint32_t b[4];
        load_b_rowmajor(b, k_tile, kLd, kk * 16, dt2 * 16);
        mma_16816<T>(dq[2 * dt2], a, b[0], b[1]);
        mma_16816<T>(dq[2 * dt2 + 1], a, b[2], b[3]);
      }
    }
    __syncthreads();  // every warp is done with this stage before it is refilled
    if (kStages == 1 && kb + 1 < num_key_blocks) {
      load_kv(kb + 1, 0);
      cp_async_commit();
    }
  }
  cp_async_wait<0>();  // no copy may be left in flight at exit (no key block at all)

  T* dq_base = static_cast<T*>(p.dq.ptr) + qb.b * p.dq.sb + qb.h * p.dq.sh;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = qb.q0 + warp_row0 + group + r * 8;
    if (i >= sh.len_q) continue;
#pragma unroll
    for (int t = 0; t < kDimTiles; ++t) {
      const int col = t * 8 + 2 * tig;
      T* dst = dq_base + i * p.dq.sn + col * p.dq.sd;
      if (vec_dq && col + 1 < sh.dim_qk) {
        *reinterpret_cast<uint32_t*>(dst) = pack2<T>(dq[t][2 * r], dq[t][2 * r + 1]);
      } else {
        if (col < sh.dim_qk) dst[0] = from_float<T>(dq[t][2 * r]);
        if (col + 1 < sh.dim_qk) dst[p.dq.sd] = from_float<T>(dq[t][2 * r + 1]);
      }
    }
  }
#else
  __trap();  // launchers pick this kernel on sm_80+ only
#endif
}

// =============================================================================================
// fp32 CUDA-core kernels (every arch)
// =============================================================================================

// Loads rows [row0, row0 + rows) of a strided (n, d) slice as float into a [rows][ld] tile, zeros
// past n_valid rows and d_valid columns.
template <typename T, int kHeadDim, int kLd, int kThreads>
__device__ __forceinline__ void load_float_tile(float* tile, const T* base, int64_t sn, int64_t sd, int row0, int rows,
                                                int n_valid, int d_valid) {
  for (int idx = threadIdx.x; idx < rows * kHeadDim; idx += kThreads) {
    const int r = idx / kHeadDim, c = idx % kHeadDim, n = row0 + r;
    tile[r * kLd + c] = (n < n_valid && c < d_valid) ? to_float(base[n * sn + c * sd]) : 0.f;
  }
}

// P∘Z and dS·scale of the (query il, key jl) pairs of a [kBlockM][kBlockN] tile pair from float
// tiles of q, dO (rows = queries) and k, v (rows = keys); zero where masked or out of range.
template <int kHeadDim, int kBlockM, int kBlockN, int kThreads>
__device__ __forceinline__ void simple_scores(const AttentionShape& sh, int b, int h, int q0, int k0,
                                              const float* q_tile, const float* do_tile, const float* k_tile,
                                              const float* v_tile, const float* lse_tile, const float* delta_tile,
                                              float* p_tile, float* ds_tile) {
  constexpr int kLd = kHeadDim + 1, kLdP = kBlockN + 1;
  const float scale_log2 = sh.scale * kLog2e;
  for (int idx = threadIdx.x; idx < kBlockM * kBlockN; idx += kThreads) {
    const int il = idx / kBlockN, jl = idx % kBlockN, i = q0 + il, j = k0 + jl;
    float pz = 0.f, ds = 0.f;
    if (i < sh.len_q && j < sh.len_k && !(sh.causal && j > i)) {
      float dot_qk = 0.f, dot_dov = 0.f;
#pragma unroll 16
      for (int d = 0; d < kHeadDim; ++d) {
        dot_qk += q_tile[il * kLd + d] * k_tile[jl * kLd + d];
        dot_dov += do_tile[il * kLd + d] * v_tile[jl * kLd + d];
      }
      const float prob = exp2f(masked_score_log2(dot_qk, sh, b, h, i, j, scale_log2) - lse_tile[il]);
      const float z = (sh.dropout.active && prob != 0.f) ? dropout_scale(sh, b, h, i, j) : 1.f;
      pz = prob * z;
      ds = prob * (dot_dov * z - delta_tile[il]) * sh.scale;
    }
    if (p_tile != nullptr) p_tile[il * kLdP + jl] = pz;
    ds_tile[il * kLdP + jl] = ds;
  }
}

// dK/dV of kBlockN keys; thread t accumulates key t / kKeyThreads, columns t % kKeyThreads +
// kKeyThreads·u. Tiles are float with rows padded by one against bank conflicts.
template <typename T, int kHeadDim, int kBlockN, int kBlockM>
__global__ void __launch_bounds__(128, kMinBlocksDkdvSimple) attention_bwd_dkdv_simple_kernel(const AttentionBwdParams p) {
  constexpr int kThreads = 128, kLd = kHeadDim + 1, kLdP = kBlockN + 1;
  constexpr int kKeyThreads = kThreads / kBlockN, kColsPerThread = kHeadDim / kKeyThreads;
  static_assert(kThreads % kBlockN == 0 && kHeadDim % kKeyThreads == 0, "tile shape");
  FASTATTN_DYNAMIC_SHARED(float, k_tile);
  float* v_tile = k_tile + kBlockN * kLd;
  float* q_tile = v_tile + kBlockN * kLd;
  float* do_tile = q_tile + kBlockM * kLd;
  float* p_tile = do_tile + kBlockM * kLd;   // P∘Z      [query][key]
  float* ds_tile = p_tile + kBlockM * kLdP;  // dS·scale [query][key]
  float* lse_tile = ds_tile + kBlockM * kLdP;
  float* delta_tile = lse_tile + kBlockM;

  const AttentionShape& sh = p.shape;
  const KeyBlock kb = key_block(sh, kBlockN);
  const int group_size = sh.heads_q / sh.heads_kv;
  load_float_tile<T, kHeadDim, kLd, kThreads>(k_tile, static_cast<const T*>(p.k.ptr) + kb.b * p.k.sb + kb.hk * p.k.sh,
                                              p.k.sn, p.k.sd, kb.k0, kBlockN, sh.len_k, sh.dim_qk);
  load_float_tile<T, kHeadDim, kLd, kThreads>(v_tile, static_cast<const T*>(p.v.ptr) + kb.b * p.v.sb + kb.hk * p.v.sh,
                                              p.v.sn, p.v.sd, kb.k0, kBlockN, sh.len_k, sh.dim_v);

  const int key_row = threadIdx.x / kKeyThreads, col0 = threadIdx.x % kKeyThreads;
  float dk[kColsPerThread], dv[kColsPerThread];
#pragma unroll
  for (int u = 0; u < kColsPerThread; ++u) dk[u] = dv[u] = 0.f;

  for (int g = 0; g < group_size; ++g) {
    const int h = kb.hk * group_size + g;
    const int64_t row_base = lse_row(sh, kb.b, h, 0);
    for (int q0 = first_query_block(sh, kb.k0, kBlockM) * kBlockM; q0 < sh.len_q; q0 += kBlockM) {
      __syncthreads();  // K/V are in place; the previous query block's tiles are no longer read
      load_float_tile<T, kHeadDim, kLd, kThreads>(q_tile, static_cast<const T*>(p.q.ptr) + kb.b * p.q.sb + h * p.q.sh,
                                                  p.q.sn, p.q.sd, q0, kBlockM, sh.len_q, sh.dim_qk);
      load_float_tile<T, kHeadDim, kLd, kThreads>(
          do_tile, static_cast<const T*>(p.dout.ptr) + kb.b * p.dout.sb + h * p.dout.sh, p.dout.sn, p.dout.sd, q0,
          kBlockM, sh.len_q, sh.dim_v);
      for (int r = threadIdx.x; r < kBlockM; r += kThreads) {
        const bool valid = q0 + r < sh.len_q;
        lse_tile[r] = valid ? p.lse[row_base + q0 + r] * kLog2e : kInf;
        delta_tile[r] = valid ? p.delta[row_base + q0 + r] : 0.f;
      }
      __syncthreads();
      simple_scores<kHeadDim, kBlockM, kBlockN, kThreads>(sh, kb.b, h, q0, kb.k0, q_tile, do_tile, k_tile, v_tile,
                                                          lse_tile, delta_tile, p_tile, ds_tile);
      __syncthreads();
#pragma unroll 4
      for (int il = 0; il < kBlockM; ++il) {
        const float pz = p_tile[il * kLdP + key_row], ds = ds_tile[il * kLdP + key_row];
#pragma unroll
        for (int u = 0; u < kColsPerThread; ++u) {
          const int c = col0 + kKeyThreads * u;
          dv[u] += pz * do_tile[il * kLd + c];
          dk[u] += ds * q_tile[il * kLd + c];
        }
      }
    }
  }

  const int j = kb.k0 + key_row;
  if (j < sh.len_k) {
    T* dk_row = static_cast<T*>(p.dk.ptr) + p.dk.offset(kb.b, kb.hk, j, 0);
    T* dv_row = static_cast<T*>(p.dv.ptr) + p.dv.offset(kb.b, kb.hk, j, 0);
#pragma unroll
    for (int u = 0; u < kColsPerThread; ++u) {
      const int c = col0 + kKeyThreads * u;
      if (c < sh.dim_qk) dk_row[c * p.dk.sd] = from_float<T>(dk[u]);
      if (c < sh.dim_v) dv_row[c * p.dv.sd] = from_float<T>(dv[u]);
    }
  }
}

// dQ of kBlockM query rows of one head; thread t accumulates row t / kRowThreads, columns
// t % kRowThreads + kRowThreads·u, over the key blocks the rows can see.
template <typename T, int kHeadDim, int kBlockM, int kBlockN>
__global__ void __launch_bounds__(128, kMinBlocksDqSimple) attention_bwd_dq_simple_kernel(const AttentionBwdParams p) {
  constexpr int kThreads = 128, kLd = kHeadDim + 1, kLdP = kBlockN + 1;
  constexpr int kRowThreads = kThreads / kBlockM, kColsPerThread = kHeadDim / kRowThreads;
  static_assert(kThreads % kBlockM == 0 && kHeadDim % kRowThreads == 0, "tile shape");
  FASTATTN_DYNAMIC_SHARED(float, q_tile);
  float* do_tile = q_tile + kBlockM * kLd;
  float* k_tile = do_tile + kBlockM * kLd;
  float* v_tile = k_tile + kBlockN * kLd;
  float* ds_tile = v_tile + kBlockN * kLd;  // dS·scale [query][key]
  float* lse_tile = ds_tile + kBlockM * kLdP;
  float* delta_tile = lse_tile + kBlockM;

  const AttentionShape& sh = p.shape;
  const QueryBlock qb = query_block(sh, kBlockM);
  const T* k_base = static_cast<const T*>(p.k.ptr) + qb.b * p.k.sb + qb.hk * p.k.sh;
  const T* v_base = static_cast<const T*>(p.v.ptr) + qb.b * p.v.sb + qb.hk * p.v.sh;
  load_float_tile<T, kHeadDim, kLd, kThreads>(q_tile, static_cast<const T*>(p.q.ptr) + qb.b * p.q.sb + qb.h * p.q.sh,
                                              p.q.sn, p.q.sd, qb.q0, kBlockM, sh.len_q, sh.dim_qk);
  load_float_tile<T, kHeadDim, kLd, kThreads>(
      do_tile, static_cast<const T*>(p.dout.ptr) + qb.b * p.dout.sb + qb.h * p.dout.sh, p.dout.sn, p.dout.sd, qb.q0,
      kBlockM, sh.len_q, sh.dim_v);
  const int64_t row_base = lse_row(sh, qb.b, qb.h, 0);
  for (int r = threadIdx.x; r < kBlockM; r += kThreads) {
    const bool valid = qb.q0 + r < sh.len_q;
    lse_tile[r] = valid ? p.lse[row_base + qb.q0 + r] * kLog2e : kInf;
    delta_tile[r] = valid ? p.delta[row_base + qb.q0 + r] : 0.f;
  }

  const int row = threadIdx.x / kRowThreads, col0 = threadIdx.x % kRowThreads;
  float dq[kColsPerThread];
#pragma unroll
  for (int u = 0; u < kColsPerThread; ++u) dq[u] = 0.f;

  const int keys = visible_keys(sh, qb.q0, kBlockM);
  for (int k0 = 0; k0 < keys; k0 += kBlockN) {
    __syncthreads();  // the previous key block's tiles are no longer read
    load_float_tile<T, kHeadDim, kLd, kThreads>(k_tile, k_base, p.k.sn, p.k.sd, k0, kBlockN, sh.len_k, sh.dim_qk);
    load_float_tile<T, kHeadDim, kLd, kThreads>(v_tile, v_base, p.v.sn, p.v.sd, k0, kBlockN, sh.len_k, sh.dim_v);
    __syncthreads();
    simple_scores<kHeadDim, kBlockM, kBlockN, kThreads>(sh, qb.b, qb.h, qb.q0, k0, q_tile, do_tile, k_tile, v_tile,
                                                        lse_tile, delta_tile, nullptr, ds_tile);
    __syncthreads();
#pragma unroll 4
    for (int jl = 0; jl < kBlockN; ++jl) {
      const float ds = ds_tile[row * kLdP + jl];
#pragma unroll
      for (int u = 0; u < kColsPerThread; ++u) dq[u] += ds * k_tile[jl * kLd + col0 + kRowThreads * u];
    }
  }

  const int i = qb.q0 + row;
  if (i < sh.len_q) {
    T* dq_row = static_cast<T*>(p.dq.ptr) + p.dq.offset(qb.b, qb.h, i, 0);
#pragma unroll
    for (int u = 0; u < kColsPerThread; ++u) {
      const int c = col0 + kRowThreads * u;
      if (c < sh.dim_qk) dq_row[c * p.dq.sd] = from_float<T>(dq[u]);
    }
  }
}

// =============================================================================================
// launchers
// =============================================================================================

template <typename T, int kHeadDim>
cudaError_t launch_bwd_simple(const AttentionBwdParams& p, cudaStream_t stream) {
  // Both fit 64 KiB (sm_75's limit) at every head dim.
  constexpr int kKvBlockN = kHeadDim <= 64 ? 32 : 16;
  constexpr int kKvBlockM = kHeadDim <= 64 ? 32 : (kHeadDim <= 128 ? 16 : 8);
  constexpr int kQBlockM = kHeadDim <= 64 ? 32 : (kHeadDim <= 128 ? 16 : 8);
  constexpr int kQBlockN = kHeadDim <= 64 ? 32 : 16;
  constexpr size_t kLd = kHeadDim + 1;
  const AttentionShape& sh = p.shape;
  const size_t smem_kv = sizeof(float) * ((2 * kKvBlockN + 2 * kKvBlockM) * kLd +
                                          static_cast<size_t>(2 * kKvBlockM) * (kKvBlockN + 1) + 2 * kKvBlockM);
  const size_t smem_q = sizeof(float) * ((2 * kQBlockN + 2 * kQBlockM) * kLd +
                                         static_cast<size_t>(kQBlockM) * (kQBlockN + 1) + 2 * kQBlockM);
  const int64_t kv_blocks = static_cast<int64_t>(sh.batch) * sh.heads_kv * ceil_div(sh.len_k, kKvBlockN);
  cudaError_t err = launch_kernel(attention_bwd_dkdv_simple_kernel<T, kHeadDim, kKvBlockN, kKvBlockM>, kv_blocks, 128,
                                  smem_kv, stream, p);
  if (err != cudaSuccess) return err;
  const int64_t q_blocks = static_cast<int64_t>(sh.batch) * sh.heads_q * ceil_div(sh.len_q, kQBlockM);
  return launch_kernel(attention_bwd_dq_simple_kernel<T, kHeadDim, kQBlockM, kQBlockN>, q_blocks, 128, smem_q, stream,
                       p);
}

template <typename T, int kHeadDim>
cudaError_t launch_bwd_mma(const AttentionBwdParams& p, cudaStream_t stream) {
  constexpr int kWarps = 4, kLd = kHeadDim + 8;
  // dK/dV: 64 keys per block; query blocks of 64 rows (32 at 128: dK, dV, Sᵀ and dPᵀ stay in
  // registers), Q/dO double-buffered.
  constexpr int kKvBlockN = 16 * kWarps, kKvBlockM = kHeadDim <= 64 ? 64 : 32, kKvStages = 2;
  // dQ: 64 rows per block; key blocks of 64 keys (32 at 128, so that two stages fit 99 KiB).
  constexpr int kQBlockM = 16 * kWarps, kQBlockN = kHeadDim <= 64 ? 64 : 32, kQStages = 2;
  const AttentionShape& sh = p.shape;
  const size_t smem_kv = sizeof(T) * static_cast<size_t>(2 * kKvBlockN + 2 * kKvStages * kKvBlockM) * kLd +
                         sizeof(float) * 2 * kKvStages * kKvBlockM;
  const size_t smem_q = sizeof(T) * static_cast<size_t>(2 * kQBlockM + 2 * kQStages * kQBlockN) * kLd;
  VecFlags vec;
  vec.q = rows_vectorizable(p.q, sh.dim_qk, sizeof(T));
  vec.k = rows_vectorizable(p.k, sh.dim_qk, sizeof(T));
  vec.v = rows_vectorizable(p.v, sh.dim_v, sizeof(T));
  vec.dout = rows_vectorizable(p.dout, sh.dim_v, sizeof(T));
  const bool vec_dq = p.dq.sd == 1 && sh.dim_qk % 2 == 0 && reinterpret_cast<uintptr_t>(p.dq.ptr) % 4 == 0 &&
                      p.dq.sb % 2 == 0 && p.dq.sh % 2 == 0 && p.dq.sn % 2 == 0;
  const auto kv_kernel = attention_bwd_dkdv_mma_kernel<T, kHeadDim, kKvBlockM, kWarps, kKvStages>;
  const auto q_kernel = attention_bwd_dq_mma_kernel<T, kHeadDim, kQBlockN, kWarps, kQStages>;
  if (!has_sm80_code(kv_kernel) || !has_sm80_code(q_kernel)) return launch_bwd_simple<T, kHeadDim>(p, stream);
  const int64_t kv_blocks = static_cast<int64_t>(sh.batch) * sh.heads_kv * ceil_div(sh.len_k, kKvBlockN);
  cudaError_t err = launch_kernel(kv_kernel, kv_blocks, kWarps * 32, smem_kv, stream, p, vec);
  if (err != cudaSuccess) return err;
  const int64_t q_blocks = static_cast<int64_t>(sh.batch) * sh.heads_q * ceil_div(sh.len_q, kQBlockM);
  return launch_kernel(q_kernel, q_blocks, kWarps * 32, smem_q, stream, p, vec, vec_dq);
}

template <typename T, int kHeadDim>
cudaError_t launch_bwd(const AttentionBwdParams& p, cudaStream_t stream) {
  if constexpr (!std::is_same<T, float>::value && kHeadDim <= 128) {
    if (p.shape.sm_version >= 80) return launch_bwd_mma<T, kHeadDim>(p, stream);
  }
  return launch_bwd_simple<T, kHeadDim>(p, stream);
}

template <typename T>
cudaError_t launch_bwd_dtype(const AttentionBwdParams& p, cudaStream_t stream) {
  const AttentionShape& sh = p.shape;
  const int64_t rows = static_cast<int64_t>(sh.batch) * sh.heads_q * sh.len_q;
  const cudaError_t err = launch_kernel(attention_delta_kernel<T>, (rows + 3) / 4, 128, 0, stream, p);
  if (err != cudaSuccess) return err;
  switch (head_dim_bucket(std::max(sh.dim_qk, sh.dim_v))) {
    case 32:
      return launch_bwd<T, 32>(p, stream);
    case 64:
      return launch_bwd<T, 64>(p, stream);
    case 128:
      return launch_bwd<T, 128>(p, stream);
    case 256:
      return launch_bwd<T, 256>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_attention_bwd(const AttentionBwdParams& params, cudaStream_t stream) {
  AttentionBwdParams p = params;
  const AttentionShape& sh = p.shape;
  if (sh.heads_kv <= 0 || sh.heads_q % sh.heads_kv != 0) return cudaErrorInvalidValue;
  if (sh.batch == 0 || sh.heads_q == 0 || sh.len_q == 0) return cudaSuccess;
  p.shape.dropout = make_dropout(sh.dropout_p, sh.seed);
  switch (sh.dtype) {
    case DType::kFloat16:
      return launch_bwd_dtype<__half>(p, stream);
    case DType::kBFloat16:
      return launch_bwd_dtype<__nv_bfloat16>(p, stream);
    case DType::kFloat32:
      return launch_bwd_dtype<float>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace fastattn
