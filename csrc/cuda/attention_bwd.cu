// Attention backward. With P = softmax(S) recomputed from q, k and lse, Z the dropout multipliers
// and delta_i = Σ_d dO[i,d]·O[i,d] (= Σ_j P_ij Z_ij dP_ij):
//   dV_j = Σ_i P_ij Z_ij dO_i        dP_ij = dO_i · V_j
//   dS_ij = P_ij (Z_ij dP_ij - delta_i) · scale
//   dK_j = Σ_i dS_ij Q_i             dQ_i = Σ_j dS_ij K_j
// Steps: a delta kernel; a key-block kernel that owns dK/dV of Nk/BN key blocks of one kv head
// (looping over the Hq/Hkv query heads of its group, so GQA needs no atomics there) and adds
// its share of dQ into a float32 buffer with atomics; a pass that converts dQ to the output dtype.
//
// Key-block kernels: attention_bwd_mma_kernel (sm_80+, fp16/bf16, head dims <= 128; one warp per
// 16 keys, mma.sync) and attention_bwd_simple_kernel (every arch and dtype, fp32 CUDA cores).
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

// dq (output dtype, any strides) from the float32 accumulator (B, Hq, Nq, D) contiguous.
template <typename T>
__global__ void __launch_bounds__(256) attention_dq_convert_kernel(const AttentionBwdParams p) {
  const AttentionShape& sh = p.shape;
  const int64_t total = static_cast<int64_t>(sh.batch) * sh.heads_q * sh.len_q * sh.dim_qk;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int d = static_cast<int>(idx % sh.dim_qk);
    const int64_t row = idx / sh.dim_qk;
    const int i = static_cast<int>(row % sh.len_q);
    const int64_t bh = row / sh.len_q;
    const int b = static_cast<int>(bh / sh.heads_q), h = static_cast<int>(bh % sh.heads_q);
    static_cast<T*>(p.dq.ptr)[p.dq.offset(b, h, i, d)] = from_float<T>(p.dq_accum[idx]);
  }
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

// First query row that can see key k0 (causal: rows i < k0 see none of keys >= k0), rounded down
// to a query-block boundary.
__device__ __forceinline__ int first_query_block(const AttentionShape& sh, int k0, int block_rows) {
  return sh.causal ? (k0 / block_rows) * block_rows : 0;
}

__device__ __forceinline__ float* dq_row(const AttentionBwdParams& p, int b, int h, int i) {
  const AttentionShape& sh = p.shape;
  return p.dq_accum + ((static_cast<int64_t>(b) * sh.heads_q + h) * sh.len_q + i) * sh.dim_qk;
}

// =============================================================================================
// tensor-core kernel (sm_80+, head dims <= 128)
// =============================================================================================

// Per query block: Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ (rows = this warp's 16 keys), then dV += (P∘Z)ᵀ·dO and
// dK += dSᵀ·Q from registers; dS goes through shared memory (as [query][key]) for dQ = dS·K.
template <typename T, int kHeadDim, int kBlockM, int kWarps>
__global__ void __launch_bounds__(kWarps * 32)
    attention_bwd_mma_kernel(const AttentionBwdParams p, const VecFlags vec) {
#if FASTATTN_SM80
  constexpr int kBlockN = 16 * kWarps, kThreads = kWarps * 32, kLd = kHeadDim + 8, kLdS = kBlockN + 8;
  constexpr int kDimTiles = kHeadDim / 8, kQueryTiles = kBlockM / 8;
  FASTATTN_DYNAMIC_SHARED(T, k_tile);
  T* v_tile = k_tile + kBlockN * kLd;
  T* q_tile = v_tile + kBlockN * kLd;
  T* do_tile = q_tile + kBlockM * kLd;
  T* ds_tile = do_tile + kBlockM * kLd;  // [query][key]
  float* lse_tile = reinterpret_cast<float*>(ds_tile + kBlockM * kLdS);  // log2 units
  float* delta_tile = lse_tile + kBlockM;

  const AttentionShape& sh = p.shape;
  const KeyBlock kb = key_block(sh, kBlockN);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, group = lane >> 2, tig = lane & 3;
  const int warp_key0 = warp * 16;
  const int group_size = sh.heads_q / sh.heads_kv;
  const float scale_log2 = sh.scale * kLog2e;
  const bool has_dropout = sh.dropout.active;

  const T* k_base = static_cast<const T*>(p.k.ptr) + kb.b * p.k.sb + kb.hk * p.k.sh;
  const T* v_base = static_cast<const T*>(p.v.ptr) + kb.b * p.v.sb + kb.hk * p.v.sh;
  load_tile_async<T, kBlockN, kHeadDim, kLd, kThreads>(k_tile, k_base, p.k.sn, p.k.sd, kb.k0, sh.len_k, sh.dim_qk,
                                                       vec.k);
  load_tile_async<T, kBlockN, kHeadDim, kLd, kThreads>(v_tile, v_base, p.v.sn, p.v.sd, kb.k0, sh.len_k, sh.dim_v,
                                                       vec.v);
  cp_async_commit();

  float dk[kDimTiles][4], dv[kDimTiles][4];
#pragma unroll
  for (int t = 0; t < kDimTiles; ++t) {
    dk[t][0] = dk[t][1] = dk[t][2] = dk[t][3] = 0.f;
    dv[t][0] = dv[t][1] = dv[t][2] = dv[t][3] = 0.f;
  }

  for (int g = 0; g < group_size; ++g) {
    const int h = kb.hk * group_size + g;
    const T* q_base = static_cast<const T*>(p.q.ptr) + kb.b * p.q.sb + h * p.q.sh;
    const T* do_base = static_cast<const T*>(p.dout.ptr) + kb.b * p.dout.sb + h * p.dout.sh;
    const int64_t row_base = (static_cast<int64_t>(kb.b) * sh.heads_q + h) * sh.len_q;
    for (int q0 = first_query_block(sh, kb.k0, kBlockM); q0 < sh.len_q; q0 += kBlockM) {
      __syncthreads();  // the previous query block's tiles are no longer read
      load_tile_async<T, kBlockM, kHeadDim, kLd, kThreads>(q_tile, q_base, p.q.sn, p.q.sd, q0, sh.len_q, sh.dim_qk,
                                                           vec.q);
      load_tile_async<T, kBlockM, kHeadDim, kLd, kThreads>(do_tile, do_base, p.dout.sn, p.dout.sd, q0, sh.len_q,
                                                           sh.dim_v, vec.dout);
      cp_async_commit();
      for (int r = threadIdx.x; r < kBlockM; r += kThreads) {
        const bool valid = q0 + r < sh.len_q;
        lse_tile[r] = valid ? p.lse[row_base + q0 + r] * kLog2e : kInf;
        delta_tile[r] = valid ? p.delta[row_base + q0 + r] : 0.f;
      }
      cp_async_wait<0>();
      __syncthreads();

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

      // st <- P∘Z (for dV), dpt <- dS·scale (for dK and dQ).
#pragma unroll
      for (int t = 0; t < kQueryTiles; ++t) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key_local = warp_key0 + group + (e >> 1) * 8, query_local = t * 8 + 2 * tig + (e & 1);
          const int i = q0 + query_local, j = kb.k0 + key_local;
          const float x = masked_score_log2(st[t][e], sh, kb.b, h, i, j, scale_log2);
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

      // dS to shared memory, [query][key], for dQ.
#pragma unroll
      for (int t = 0; t < kQueryTiles; ++t) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key_local = warp_key0 + group + (e >> 1) * 8, query_local = t * 8 + 2 * tig + (e & 1);
          ds_tile[query_local * kLdS + key_local] = from_float<T>(dpt[t][e]);
        }
      }
      __syncthreads();

      // dQ[q0 + 16·mt ..] += dS·K, one 16-row tile per warp at a time, added into float32 with atomics.
      for (int mt = warp; mt < kBlockM / 16; mt += kWarps) {
        uint32_t a[kBlockN / 16][4];
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk) load_a_rowmajor(a[kk], ds_tile, kLdS, mt * 16, kk * 16);
#pragma unroll
        for (int dt2 = 0; dt2 < kHeadDim / 16; ++dt2) {
          float c[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
          for (int kk = 0; kk < kBlockN / 16; ++kk) {
            uint32_t b[4];
            load_b_rowmajor(b, k_tile, kLd, kk * 16, dt2 * 16);
            mma_16816<T>(c[0], a[kk], b[0], b[1]);
            mma_16816<T>(c[1], a[kk], b[2], b[3]);
          }
#pragma unroll
          for (int half = 0; half < 2; ++half) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int i = q0 + mt * 16 + group + (e >> 1) * 8;
              const int col = dt2 * 16 + half * 8 + 2 * tig + (e & 1);
              if (i < sh.len_q && col < sh.dim_qk) atomicAdd(dq_row(p, kb.b, h, i) + col, c[half][e]);
            }
          }
        }
      }
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

// =============================================================================================
// fp32 CUDA-core kernel (every arch)
// =============================================================================================

// kBlockN keys per block; thread t accumulates dK/dV of key t / kKeyThreads, columns
// t % kKeyThreads + kKeyThreads·u. Tiles are float with rows padded by one against bank conflicts.
template <typename T, int kHeadDim, int kBlockN, int kBlockM>
__global__ void __launch_bounds__(128) attention_bwd_simple_kernel(const AttentionBwdParams p) {
  constexpr int kThreads = 128, kLd = kHeadDim + 1, kLdP = kBlockN + 1;
  constexpr int kKeyThreads = kThreads / kBlockN, kColsPerThread = kHeadDim / kKeyThreads;
  static_assert(kThreads % kBlockN == 0 && kHeadDim % kKeyThreads == 0, "tile shape");
  FASTATTN_DYNAMIC_SHARED(float, k_tile);
  float* v_tile = k_tile + kBlockN * kLd;
  float* q_tile = v_tile + kBlockN * kLd;
  float* do_tile = q_tile + kBlockM * kLd;
  float* p_tile = do_tile + kBlockM * kLd;  // P∘Z    [query][key]
  float* ds_tile = p_tile + kBlockM * kLdP;  // dS·scale [query][key]
  float* lse_tile = ds_tile + kBlockM * kLdP;
  float* delta_tile = lse_tile + kBlockM;

  const AttentionShape& sh = p.shape;
  const KeyBlock kb = key_block(sh, kBlockN);
  const int group_size = sh.heads_q / sh.heads_kv;
  const float scale_log2 = sh.scale * kLog2e;
  auto load = [&](float* tile, const T* base, int64_t sn, int64_t sd, int row0, int rows, int n_valid, int d_valid) {
    for (int idx = threadIdx.x; idx < rows * kHeadDim; idx += kThreads) {
      const int r = idx / kHeadDim, c = idx % kHeadDim, n = row0 + r;
      tile[r * kLd + c] = (n < n_valid && c < d_valid) ? to_float(base[n * sn + c * sd]) : 0.f;
    }
  };
  load(k_tile, static_cast<const T*>(p.k.ptr) + kb.b * p.k.sb + kb.hk * p.k.sh, p.k.sn, p.k.sd, kb.k0, kBlockN,
       sh.len_k, sh.dim_qk);
  load(v_tile, static_cast<const T*>(p.v.ptr) + kb.b * p.v.sb + kb.hk * p.v.sh, p.v.sn, p.v.sd, kb.k0, kBlockN,
       sh.len_k, sh.dim_v);

  const int key_row = threadIdx.x / kKeyThreads, col0 = threadIdx.x % kKeyThreads;
  float dk[kColsPerThread], dv[kColsPerThread];
#pragma unroll
  for (int u = 0; u < kColsPerThread; ++u) dk[u] = dv[u] = 0.f;

  for (int g = 0; g < group_size; ++g) {
    const int h = kb.hk * group_size + g;
    const int64_t row_base = (static_cast<int64_t>(kb.b) * sh.heads_q + h) * sh.len_q;
    for (int q0 = first_query_block(sh, kb.k0, kBlockM); q0 < sh.len_q; q0 += kBlockM) {
      __syncthreads();  // K/V are in place; the previous query block's tiles are no longer read
      load(q_tile, static_cast<const T*>(p.q.ptr) + kb.b * p.q.sb + h * p.q.sh, p.q.sn, p.q.sd, q0, kBlockM,
           sh.len_q, sh.dim_qk);
      load(do_tile, static_cast<const T*>(p.dout.ptr) + kb.b * p.dout.sb + h * p.dout.sh, p.dout.sn, p.dout.sd, q0,
           kBlockM, sh.len_q, sh.dim_v);
      for (int r = threadIdx.x; r < kBlockM; r += kThreads) {
        const bool valid = q0 + r < sh.len_q;
        lse_tile[r] = valid ? p.lse[row_base + q0 + r] * kLog2e : kInf;
        delta_tile[r] = valid ? p.delta[row_base + q0 + r] : 0.f;
      }
      __syncthreads();

      for (int idx = threadIdx.x; idx < kBlockM * kBlockN; idx += kThreads) {
        const int il = idx / kBlockN, jl = idx % kBlockN, i = q0 + il, j = kb.k0 + jl;
        float pz = 0.f, ds = 0.f;
        if (i < sh.len_q && j < sh.len_k && !(sh.causal && j > i)) {
          float dot_qk = 0.f, dot_dov = 0.f;
#pragma unroll 16
          for (int d = 0; d < kHeadDim; ++d) {
            dot_qk += q_tile[il * kLd + d] * k_tile[jl * kLd + d];
            dot_dov += do_tile[il * kLd + d] * v_tile[jl * kLd + d];
          }
          const float prob = exp2f(masked_score_log2(dot_qk, sh, kb.b, h, i, j, scale_log2) - lse_tile[il]);
          const float z = (sh.dropout.active && prob != 0.f) ? dropout_scale(sh, kb.b, h, i, j) : 1.f;
          pz = prob * z;
          ds = prob * (dot_dov * z - delta_tile[il]) * sh.scale;
        }
        p_tile[il * kLdP + jl] = pz;
        ds_tile[il * kLdP + jl] = ds;
      }
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

      for (int idx = threadIdx.x; idx < kBlockM * kHeadDim; idx += kThreads) {
        const int il = idx / kHeadDim, c = idx % kHeadDim, i = q0 + il;
        if (i >= sh.len_q || c >= sh.dim_qk) continue;
        float sum = 0.f;
#pragma unroll 8
        for (int jl = 0; jl < kBlockN; ++jl) sum += ds_tile[il * kLdP + jl] * k_tile[jl * kLd + c];
        atomicAdd(dq_row(p, kb.b, h, i) + c, sum);
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

// =============================================================================================
// launchers
// =============================================================================================

template <typename T, int kHeadDim>
cudaError_t launch_bwd_simple(const AttentionBwdParams& p, cudaStream_t stream);

template <typename T, int kHeadDim>
cudaError_t launch_bwd_mma(const AttentionBwdParams& p, cudaStream_t stream) {
  constexpr int kWarps = 4, kBlockN = 16 * kWarps;
  constexpr int kBlockM = kHeadDim <= 64 ? 64 : 32;  // keeps dK, dV, Sᵀ and dPᵀ in registers
  constexpr int kLd = kHeadDim + 8;
  const AttentionShape& sh = p.shape;
  const size_t smem = sizeof(T) * (static_cast<size_t>(2 * kBlockN + 2 * kBlockM) * kLd +
                                   static_cast<size_t>(kBlockM) * (kBlockN + 8)) +
                      sizeof(float) * 2 * kBlockM;
  VecFlags vec;
  vec.q = rows_vectorizable(p.q, sh.dim_qk, sizeof(T));
  vec.k = rows_vectorizable(p.k, sh.dim_qk, sizeof(T));
  vec.v = rows_vectorizable(p.v, sh.dim_v, sizeof(T));
  vec.dout = rows_vectorizable(p.dout, sh.dim_v, sizeof(T));
  const int64_t blocks = static_cast<int64_t>(sh.batch) * sh.heads_kv * ceil_div(sh.len_k, kBlockN);
  const auto kernel = attention_bwd_mma_kernel<T, kHeadDim, kBlockM, kWarps>;
  if (!has_sm80_code(kernel)) return launch_bwd_simple<T, kHeadDim>(p, stream);
  return launch_kernel(kernel, blocks, kWarps * 32, smem, stream, p, vec);
}

template <typename T, int kHeadDim>
cudaError_t launch_bwd_simple(const AttentionBwdParams& p, cudaStream_t stream) {
  // Fits 64 KiB (sm_75's limit) at every head dim.
  constexpr int kBlockN = kHeadDim <= 64 ? 32 : 16;
  constexpr int kBlockM = kHeadDim <= 64 ? 32 : (kHeadDim <= 128 ? 16 : 8);
  const AttentionShape& sh = p.shape;
  const size_t smem = sizeof(float) * (static_cast<size_t>(2 * kBlockN + 2 * kBlockM) * (kHeadDim + 1) +
                                       static_cast<size_t>(2 * kBlockM) * (kBlockN + 1) + 2 * kBlockM);
  const int64_t blocks = static_cast<int64_t>(sh.batch) * sh.heads_kv * ceil_div(sh.len_k, kBlockN);
  return launch_kernel(attention_bwd_simple_kernel<T, kHeadDim, kBlockN, kBlockM>, blocks, 128, smem, stream, p);
}

template <typename T, int kHeadDim>
cudaError_t launch_bwd_key_blocks(const AttentionBwdParams& p, cudaStream_t stream) {
  if constexpr (!std::is_same<T, float>::value && kHeadDim <= 128) {
    if (p.shape.sm_version >= 80) return launch_bwd_mma<T, kHeadDim>(p, stream);
  }
  return launch_bwd_simple<T, kHeadDim>(p, stream);
}

template <typename T>
cudaError_t launch_bwd_dtype(const AttentionBwdParams& p, cudaStream_t stream) {
  const AttentionShape& sh = p.shape;
  const int64_t rows = static_cast<int64_t>(sh.batch) * sh.heads_q * sh.len_q;
  cudaError_t err = launch_kernel(attention_delta_kernel<T>, (rows + 3) / 4, 128, 0, stream, p);
  if (err != cudaSuccess) return err;
  switch (head_dim_bucket(std::max(sh.dim_qk, sh.dim_v))) {
    case 32:
      err = launch_bwd_key_blocks<T, 32>(p, stream);
      break;
    case 64:
      err = launch_bwd_key_blocks<T, 64>(p, stream);
      break;
    case 128:
      err = launch_bwd_key_blocks<T, 128>(p, stream);
      break;
    case 256:
      err = launch_bwd_key_blocks<T, 256>(p, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  if (err != cudaSuccess || p.dq.ptr == nullptr) return err;
  const int64_t total = rows * sh.dim_qk;
  const int64_t blocks = std::min<int64_t>((total + 255) / 256, kMaxGridBlocks);
  return launch_kernel(attention_dq_convert_kernel<T>, blocks, 256, 0, stream, p);
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
