// Attention forward: out = dropout(softmax(q·kᵀ·scale + mask)) · v and lse, tiled in shared
// memory with the online softmax (one pass over the keys, no (Nq, Nk) matrix in memory).
//
// Two kernels:
// - attention_fwd_mma_kernel (sm_80+, fp16/bf16): one warp per 16 query rows, mma.sync on
//   tensor cores, fp32 accumulation, K/V tiles double-buffered with cp.async.
// - attention_fwd_simple_kernel (every arch, every dtype; the fp32 path and the fallback below
//   sm_80): fp32 CUDA-core arithmetic on tiles converted to float in shared memory.
#include <algorithm>

#include "attention.cuh"
#include "attention_common.cuh"
#include "mma.cuh"

namespace fastattn {
namespace cuda {
namespace {

// lse of a finished row (max in log2 units, sum of exp2): natural log, +inf when fully masked, NaN when
// a score was NaN (a NaN query row or scale: the sum is NaN), so the backward gives NaN too.
__device__ __forceinline__ float row_lse(float row_max_log2, float row_sum) {
  return row_sum == 0.f ? kInf : (row_max_log2 + log2f(row_sum)) * kLn2;
}

// =============================================================================================
// tensor-core kernel (sm_80+)
// =============================================================================================

// Compiled for 8 / kWarps blocks per SM (one of 8 warps, two of 4): without that bound ptxas picks its
// own occupancy target and spills to reach it (head dim 32, 8 warps, sm_80: 224 bytes; head dim
// 256, sm_90a: 36 bytes); with it no variant spills (benchmarks/check_sass.py's CUDA rows).
template <typename T, int kHeadDim, int kBlockN, int kWarps, int kStages>
__global__ void __launch_bounds__(kWarps * 32, 8 / kWarps)
    attention_fwd_mma_kernel(const AttentionFwdParams p, const VecFlags vec, const bool vec_out) {
#if FASTATTN_SM80
  constexpr int kBlockM = 16 * kWarps, kThreads = kWarps * 32, kLd = kHeadDim + 8;
  constexpr int kDimTiles = kHeadDim / 8, kKeyTiles = kBlockN / 8;
  FASTATTN_DYNAMIC_SHARED(T, q_tile);
  T* k_tiles = q_tile + kBlockM * kLd;
  T* v_tiles = k_tiles + kStages * kBlockN * kLd;

  const AttentionShape& sh = p.shape;
  const QueryBlock qb = query_block(sh, kBlockM);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, group = lane >> 2, tig = lane & 3;
  const int warp_row0 = warp * 16;  // first row of this warp inside the block

  const T* q_base = static_cast<const T*>(p.q.ptr) + qb.b * p.q.sb + qb.h * p.q.sh;
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
  load_kv(0, 0);
  cp_async_commit();

  float acc[kDimTiles][4];
#pragma unroll
  for (int t = 0; t < kDimTiles; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;
  float row_max[2] = {-kInf, -kInf};  // log2 units, rows group and group + 8
  float row_sum[2] = {0.f, 0.f};      // this lane's share; the quad's total at the end
  const float scale_log2 = sh.scale * kLog2e;
  const bool has_dropout = sh.dropout.active;

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

    // S = Q·Kᵀ for this warp's 16 rows and the block's keys.
    float s[kKeyTiles][4];
#pragma unroll
    for (int t = 0; t < kKeyTiles; ++t) s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
      uint32_t a[4];
      load_a_rowmajor(a, q_tile, kLd, warp_row0, kk * 16);
#pragma unroll
      for (int nt2 = 0; nt2 < kBlockN / 16; ++nt2) {
        uint32_t b[4];
        load_b_transposed(b, k_tile, kLd, nt2 * 16, kk * 16);
        mma_16816<T>(s[2 * nt2], a, b[0], b[1]);
        mma_16816<T>(s[2 * nt2 + 1], a, b[2], b[3]);
      }
    }

    // Scale and mask. Tiles fully inside the keys and below the diagonal skip the checks.
    const bool interior = k0 + kBlockN <= sh.len_k && (!sh.causal || k0 + kBlockN - 1 <= qb.q0 + warp_row0) &&
                          sh.mask_kind == MaskKind::kNone;
#pragma unroll
    for (int t = 0; t < kKeyTiles; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = qb.q0 + warp_row0 + group + (e >> 1) * 8;
        const int j = k0 + t * 8 + 2 * tig + (e & 1);
        s[t][e] = interior ? s[t][e] * scale_log2 : masked_score_log2(s[t][e], sh, qb.b, qb.h, i, j, scale_log2);
      }
    }

    // Online softmax: new running max per row (over the quad that shares the row), rescale.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float block_max = -kInf;
#pragma unroll
      for (int t = 0; t < kKeyTiles; ++t) block_max = fmaxf(block_max, fmaxf(s[t][2 * r], s[t][2 * r + 1]));
      block_max = group_max<4>(block_max);
      const float new_max = fmaxf(row_max[r], block_max);
      const float base = new_max == -kInf ? 0.f : new_max;  // a row masked so far: exp2(-inf - 0) = 0
      const float alpha = exp2f(row_max[r] - base);
      row_max[r] = new_max;
      float block_sum = 0.f;
#pragma unroll
      for (int t = 0; t < kKeyTiles; ++t) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const float prob = exp2f(s[t][2 * r + c] - base);
          s[t][2 * r + c] = prob;
          block_sum += prob;
        }
      }
      row_sum[r] = row_sum[r] * alpha + block_sum;
#pragma unroll
      for (int t = 0; t < kDimTiles; ++t) {
        acc[t][2 * r] *= alpha;
        acc[t][2 * r + 1] *= alpha;
      }
    }

    if (has_dropout) {  // the normaliser keeps every weight; only the product with V drops
#pragma unroll
      for (int t = 0; t < kKeyTiles; ++t) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {  // elements 2·half, 2·half + 1: columns j, j + 1 of row i
          const int i = qb.q0 + warp_row0 + group + half * 8;
          const int j = k0 + t * 8 + 2 * tig;
          if (s[t][2 * half] != 0.f || s[t][2 * half + 1] != 0.f) {
            const DropoutPair z = dropout_scale_pair(sh, qb.b, qb.h, i, j);
            s[t][2 * half] *= z.x;
            s[t][2 * half + 1] *= z.y;
          }
        }
      }
    }

    // O += P·V with P straight from registers (C layout of two key tiles = A layout of one k-step).
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      const uint32_t a[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                             pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dt2 = 0; dt2 < kHeadDim / 16; ++dt2) {
        uint32_t b[4];
        load_b_rowmajor(b, v_tile, kLd, kk * 16, dt2 * 16);
        mma_16816<T>(acc[2 * dt2], a, b[0], b[1]);
        mma_16816<T>(acc[2 * dt2 + 1], a, b[2], b[3]);
      }
    }
    __syncthreads();  // every warp is done with this stage before it is refilled
    if (kStages == 1 && kb + 1 < num_key_blocks) {
      load_kv(kb + 1, 0);
      cp_async_commit();
    }
  }

  cp_async_wait<0>();  // no copy may be left in flight at exit (no key block at all: Nk == 0)

  // Epilogue: normalise, write out and lse.
  T* out_base = static_cast<T*>(p.out.ptr) + qb.b * p.out.sb + qb.h * p.out.sh;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float total = group_sum<4>(row_sum[r]);
    const float inv = total == 0.f ? 0.f : 1.f / total;  // a NaN total gives NaN
    const int i = qb.q0 + warp_row0 + group + r * 8;
    if (i < sh.len_q) {
#pragma unroll
      for (int t = 0; t < kDimTiles; ++t) {
        const int col = t * 8 + 2 * tig;
        T* dst = out_base + i * p.out.sn + col * p.out.sd;
        if (vec_out && col + 1 < sh.dim_v) {
          *reinterpret_cast<uint32_t*>(dst) = pack2<T>(acc[t][2 * r] * inv, acc[t][2 * r + 1] * inv);
        } else {
          if (col < sh.dim_v) dst[0] = from_float<T>(acc[t][2 * r] * inv);
          if (col + 1 < sh.dim_v) dst[p.out.sd] = from_float<T>(acc[t][2 * r + 1] * inv);
        }
      }
      if (tig == 0) p.lse[(static_cast<int64_t>(qb.b) * sh.heads_q + qb.h) * sh.len_q + i] = row_lse(row_max[r], total);
    }
  }
#else
  __trap();  // launchers pick this kernel on sm_80+ only
#endif
}

// =============================================================================================
// fp32 CUDA-core kernel (every arch)
// =============================================================================================

// 16 query rows per block, 8 threads per row: a thread scores keys tr, tr+8, ... and owns output
// columns tr, tr+8, ...; rows of shared tiles are padded by one float against bank conflicts.
template <typename T, int kHeadDim, int kBlockN>
__global__ void __launch_bounds__(128, 1) attention_fwd_simple_kernel(const AttentionFwdParams p) {
  constexpr int kBlockM = 16, kThreads = 128, kRowThreads = 8, kLd = kHeadDim + 1, kLdP = kBlockN + 1;
  constexpr int kKeysPerThread = kBlockN / kRowThreads, kColsPerThread = kHeadDim / kRowThreads;
  FASTATTN_DYNAMIC_SHARED(float, q_tile);
  float* k_tile = q_tile + kBlockM * kLd;
  float* v_tile = k_tile + kBlockN * kLd;
  float* p_tile = v_tile + kBlockN * kLd;

  const AttentionShape& sh = p.shape;
  const QueryBlock qb = query_block(sh, kBlockM);
  const int row = threadIdx.x / kRowThreads, tr = threadIdx.x % kRowThreads;
  const int i = qb.q0 + row;

  const T* q_base = static_cast<const T*>(p.q.ptr) + qb.b * p.q.sb + qb.h * p.q.sh;
  const T* k_base = static_cast<const T*>(p.k.ptr) + qb.b * p.k.sb + qb.hk * p.k.sh;
  const T* v_base = static_cast<const T*>(p.v.ptr) + qb.b * p.v.sb + qb.hk * p.v.sh;
  auto load = [&](float* tile, const T* base, int64_t sn, int64_t sd, int row0, int rows, int n_valid, int d_valid) {
    for (int idx = threadIdx.x; idx < rows * kHeadDim; idx += kThreads) {
      const int r = idx / kHeadDim, c = idx % kHeadDim, n = row0 + r;
      tile[r * kLd + c] = (n < n_valid && c < d_valid) ? to_float(base[n * sn + c * sd]) : 0.f;
    }
  };
  load(q_tile, q_base, p.q.sn, p.q.sd, qb.q0, kBlockM, sh.len_q, sh.dim_qk);

  float acc[kColsPerThread];
#pragma unroll
  for (int u = 0; u < kColsPerThread; ++u) acc[u] = 0.f;
  float row_max = -kInf, row_sum = 0.f;
  const float scale_log2 = sh.scale * kLog2e;
  const int num_key_blocks = (visible_keys(sh, qb.q0, kBlockM) + kBlockN - 1) / kBlockN;

  for (int kb = 0; kb < num_key_blocks; ++kb) {
    const int k0 = kb * kBlockN;
    __syncthreads();  // the previous block's tiles are no longer read
    load(k_tile, k_base, p.k.sn, p.k.sd, k0, kBlockN, sh.len_k, sh.dim_qk);
    load(v_tile, v_base, p.v.sn, p.v.sd, k0, kBlockN, sh.len_k, sh.dim_v);
    __syncthreads();

    float s[kKeysPerThread];
    float block_max = -kInf;
#pragma unroll
    for (int u = 0; u < kKeysPerThread; ++u) {
      const int jl = tr + kRowThreads * u;
      float dot = 0.f;
#pragma unroll 16
      for (int d = 0; d < kHeadDim; ++d) dot += q_tile[row * kLd + d] * k_tile[jl * kLd + d];
      s[u] = masked_score_log2(dot, sh, qb.b, qb.h, i, k0 + jl, scale_log2);
      block_max = fmaxf(block_max, s[u]);
    }
    block_max = group_max<kRowThreads>(block_max);
    const float new_max = fmaxf(row_max, block_max);
    const float base = new_max == -kInf ? 0.f : new_max;
    const float alpha = exp2f(row_max - base);
    row_max = new_max;
    float block_sum = 0.f;
#pragma unroll
    for (int u = 0; u < kKeysPerThread; ++u) {
      const int jl = tr + kRowThreads * u;
      const float prob = exp2f(s[u] - base);
      block_sum += prob;
      p_tile[row * kLdP + jl] = prob;
    }
    if (sh.dropout.active) {  // a second pass over this thread's own weights, after s[] is dead
#pragma unroll 1
      for (int u = 0; u < kKeysPerThread; ++u) {
        const int jl = tr + kRowThreads * u;
        const float prob = p_tile[row * kLdP + jl];
        if (prob != 0.f) p_tile[row * kLdP + jl] = prob * dropout_scale(sh, qb.b, qb.h, i, k0 + jl);
      }
    }
    row_sum = row_sum * alpha + block_sum;
#pragma unroll
    for (int u = 0; u < kColsPerThread; ++u) acc[u] *= alpha;
    __syncthreads();  // p_tile complete

#pragma unroll 4
    for (int jl = 0; jl < kBlockN; ++jl) {
      const float prob = p_tile[row * kLdP + jl];
#pragma unroll
      for (int u = 0; u < kColsPerThread; ++u) acc[u] += prob * v_tile[jl * kLd + tr + kRowThreads * u];
    }
  }

  const float total = group_sum<kRowThreads>(row_sum);
  if (i < sh.len_q) {
    const float inv = total == 0.f ? 0.f : 1.f / total;  // a NaN total gives NaN
    T* out_row = static_cast<T*>(p.out.ptr) + qb.b * p.out.sb + qb.h * p.out.sh + i * p.out.sn;
#pragma unroll
    for (int u = 0; u < kColsPerThread; ++u) {
      const int col = tr + kRowThreads * u;
      if (col < sh.dim_v) out_row[col * p.out.sd] = from_float<T>(acc[u] * inv);
    }
    if (tr == 0) p.lse[(static_cast<int64_t>(qb.b) * sh.heads_q + qb.h) * sh.len_q + i] = row_lse(row_max, total);
  }
}

// =============================================================================================
// launchers
// =============================================================================================

template <typename T, int kHeadDim>
cudaError_t launch_fwd_simple(const AttentionFwdParams& p, cudaStream_t stream);

template <typename T, int kHeadDim>
cudaError_t launch_fwd_mma(const AttentionFwdParams& p, cudaStream_t stream) {
  // 8 warps (128 rows) share each K/V tile for small head dims; single-buffered at 256 so that
  // the tiles fit the 99 KiB of sm_86/sm_89.
  constexpr int kWarps = kHeadDim <= 64 ? 8 : 4;
  constexpr int kBlockN = kHeadDim <= 128 ? 64 : 32;
  constexpr int kStages = kHeadDim <= 128 ? 2 : 1;
  constexpr int kBlockM = 16 * kWarps, kLd = kHeadDim + 8;
  const AttentionShape& sh = p.shape;
  const size_t smem = static_cast<size_t>(kBlockM + 2 * kStages * kBlockN) * kLd * sizeof(T);
  VecFlags vec;
  vec.q = rows_vectorizable(p.q, sh.dim_qk, sizeof(T));
  vec.k = rows_vectorizable(p.k, sh.dim_qk, sizeof(T));
  vec.v = rows_vectorizable(p.v, sh.dim_v, sizeof(T));
  const bool vec_out = p.out.sd == 1 && sh.dim_v % 2 == 0 && reinterpret_cast<uintptr_t>(p.out.ptr) % 4 == 0 &&
                       p.out.sb % 2 == 0 && p.out.sh % 2 == 0 && p.out.sn % 2 == 0;
  const int64_t blocks = static_cast<int64_t>(sh.batch) * sh.heads_q * ceil_div(sh.len_q, kBlockM);
  const auto kernel = attention_fwd_mma_kernel<T, kHeadDim, kBlockN, kWarps, kStages>;
  if (!has_sm80_code(kernel)) return launch_fwd_simple<T, kHeadDim>(p, stream);
  return launch_kernel(kernel, blocks, kWarps * 32, smem, stream, p, vec, vec_out);
}

template <typename T, int kHeadDim>
cudaError_t launch_fwd_simple(const AttentionFwdParams& p, cudaStream_t stream) {
  constexpr int kBlockM = 16, kBlockN = kHeadDim <= 128 ? 32 : 16;
  const AttentionShape& sh = p.shape;
  const size_t smem = sizeof(float) * (static_cast<size_t>(kBlockM + 2 * kBlockN) * (kHeadDim + 1) +
                                       static_cast<size_t>(kBlockM) * (kBlockN + 1));
  const int64_t blocks = static_cast<int64_t>(sh.batch) * sh.heads_q * ceil_div(sh.len_q, kBlockM);
  return launch_kernel(attention_fwd_simple_kernel<T, kHeadDim, kBlockN>, blocks, 128, smem, stream, p);
}

template <typename T, int kHeadDim>
cudaError_t launch_fwd(const AttentionFwdParams& p, cudaStream_t stream) {
  if constexpr (!std::is_same<T, float>::value) {
    if (p.shape.sm_version >= 80) return launch_fwd_mma<T, kHeadDim>(p, stream);
  }
  return launch_fwd_simple<T, kHeadDim>(p, stream);
}

template <typename T>
cudaError_t launch_fwd_dtype(const AttentionFwdParams& p, cudaStream_t stream) {
  switch (head_dim_bucket(std::max(p.shape.dim_qk, p.shape.dim_v))) {
    case 32:
      return launch_fwd<T, 32>(p, stream);
    case 64:
      return launch_fwd<T, 64>(p, stream);
    case 128:
      return launch_fwd<T, 128>(p, stream);
    case 256:
      return launch_fwd<T, 256>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_attention_fwd(const AttentionFwdParams& params, cudaStream_t stream) {
  AttentionFwdParams p = params;
  const AttentionShape& sh = p.shape;
  if (sh.heads_kv <= 0 || sh.heads_q % sh.heads_kv != 0) return cudaErrorInvalidValue;
  if (sh.batch == 0 || sh.heads_q == 0 || sh.len_q == 0) return cudaSuccess;
  p.shape.dropout = make_dropout(sh.dropout_p, sh.seed);
  switch (sh.dtype) {
    case DType::kFloat16:
      return launch_fwd_dtype<__half>(p, stream);
    case DType::kBFloat16:
      return launch_fwd_dtype<__nv_bfloat16>(p, stream);
    case DType::kFloat32:
      return launch_fwd_dtype<float>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace fastattn
