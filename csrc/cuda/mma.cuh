// Warp-level tensor-core helpers for the sm_80+ kernels: mma.sync m16n8k16 (fp16/bf16 in, fp32
// accumulate), ldmatrix and cp.async, plus a shared-memory tile loader.
//
// Fragment layout of mma.m16n8k16 (PTX ISA), lane = 4·group + thread_in_group:
//   A 16×16 (4 regs, 2 elements each): rows group, group+8; cols 2·tig(+1), 2·tig+8(+1)
//   B 16×8  (2 regs):                  rows (k) 2·tig(+1), 2·tig+8(+1); col (n) group
//   C 16×8  (4 floats):                rows group (c0, c1), group+8 (c2, c3); cols 2·tig, 2·tig+1
// The C layout of two adjacent n-tiles equals the A layout of one k-step, so a score tile turns
// into the A operand of the next product without leaving registers.
//
// Everything that emits sm_80 instructions sits under FASTATTN_SM80 so that the same file also
// compiles for sm_70/sm_75, where the launchers never pick these kernels. Under FASTATTN_EMULATE
// (csrc/cuda/tools/emulate: the kernels compiled for the CPU and run thread by thread) the same
// helpers call a software model of each instruction instead.
#pragma once

#include <cstring>

#include "common.cuh"

#if defined(FASTATTN_EMULATE) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
#define FASTATTN_SM80 1
#else
#define FASTATTN_SM80 0
#endif

namespace fastattn {
namespace cuda {

#if FASTATTN_SM80 && !defined(FASTATTN_EMULATE)
__device__ __forceinline__ uint32_t shared_address(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}
#endif

// Four 8×8 b16 matrices; lanes 8·m .. 8·m+7 give the row addresses of matrix m, register m of
// each lane receives (row lane/4, cols 2·(lane%4), +1) of matrix m.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&regs)[4], const void* smem_row) {
#if defined(FASTATTN_EMULATE)
  ::emu::ldmatrix_x4(regs, smem_row, /*transpose=*/false);
#elif FASTATTN_SM80
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(regs[0]), "=r"(regs[1]), "=r"(regs[2]), "=r"(regs[3])
               : "r"(shared_address(smem_row)));
#endif
}

// Same with each matrix transposed: register m receives (rows 2·(lane%4), +1; col lane/4).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&regs)[4], const void* smem_row) {
#if defined(FASTATTN_EMULATE)
  ::emu::ldmatrix_x4(regs, smem_row, /*transpose=*/true);
#elif FASTATTN_SM80
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(regs[0]), "=r"(regs[1]), "=r"(regs[2]), "=r"(regs[3])
               : "r"(shared_address(smem_row)));
#endif
}

// c += a·b on one 16×8×16 tile.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(FASTATTN_EMULATE)
  ::emu::mma_16816(c, a, b0, b1, /*bf16=*/false);
#elif FASTATTN_SM80
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
#if defined(FASTATTN_EMULATE)
  ::emu::mma_16816(c, a, b0, b1, /*bf16=*/true);
#elif FASTATTN_SM80
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Two floats rounded to T and packed in one register, `low` in the low half (lower index).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float low, float high);

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float low, float high) {
  const __half2 pair = __floats2half2_rn(low, high);
  uint32_t bits;
  memcpy(&bits, &pair, sizeof(bits));
  return bits;
}

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float low, float high) {
  const __nv_bfloat162 pair = __floats2bfloat162_rn(low, high);
  uint32_t bits;
  memcpy(&bits, &pair, sizeof(bits));
  return bits;
}

// A fragment of a 16×16 tile stored row-major in shared memory (row stride `ld` elements, a
// multiple of 8): rows row0.., cols col0...
template <typename T>
__device__ __forceinline__ void load_a_rowmajor(uint32_t (&a)[4], const T* tile, int ld, int row0, int col0) {
  const int lane = threadIdx.x & 31;
  ldmatrix_x4(a, tile + (row0 + (lane & 15)) * ld + col0 + (lane >> 4) * 8);
}

// B fragments of two adjacent n-tiles (n0.., n0+8..) for one k-step, B[k][n] = tile[n][k] (the
// tile holds Bᵀ row-major, e.g. K when computing Q·Kᵀ): b[0], b[1] for n0; b[2], b[3] for n0+8.
template <typename T>
__device__ __forceinline__ void load_b_transposed(uint32_t (&b)[4], const T* tile, int ld, int n0, int k0) {
  const int lane = threadIdx.x & 31;
  ldmatrix_x4(b, tile + (n0 + (lane & 7) + ((lane >> 4) << 3)) * ld + k0 + ((lane >> 3) & 1) * 8);
}

// B fragments of two adjacent n-tiles for one k-step, B[k][n] = tile[k][n] (row-major B, e.g. V
// when computing P·V): b[0], b[1] for n0; b[2], b[3] for n0+8.
template <typename T>
__device__ __forceinline__ void load_b_rowmajor(uint32_t (&b)[4], const T* tile, int ld, int k0, int n0) {
  const int lane = threadIdx.x & 31;
  ldmatrix_x4_trans(b, tile + (k0 + (lane & 15)) * ld + n0 + (lane >> 4) * 8);
}

// ---------------------------------------------------------------------------------------------
// cp.async: global -> shared without registers; `valid == false` writes 16 zero bytes.
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
#if defined(FASTATTN_EMULATE)
  ::emu::cp_async_16(smem, gmem, valid);
#elif FASTATTN_SM80
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(smem)), "l"(gmem),
               "r"(valid ? 16 : 0));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(FASTATTN_EMULATE)
  ::emu::cp_async_commit();
#elif FASTATTN_SM80
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(FASTATTN_EMULATE)
  ::emu::cp_async_wait(kPending);
#elif FASTATTN_SM80
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#endif
}

// Loads rows [row0, row0 + kRows) × cols [0, kCols) of a strided (n, d) slice into a row-major
// shared tile (row stride kLd), writing zeros where n >= n_valid or d >= d_valid. With
// `vectorized` (d contiguous, d_valid % 8 == 0, rows 16-byte aligned: see rows_vectorizable) it
// issues cp.async 16-byte copies the caller must commit and wait for; otherwise it stores
// synchronously. Either way the tile is complete for the block after wait + __syncthreads.
template <typename T, int kRows, int kCols, int kLd, int kThreads>
__device__ __forceinline__ void load_tile_async(T* tile, const T* base, int64_t stride_n, int64_t stride_d, int row0,
                                                int n_valid, int d_valid, bool vectorized) {
  if (vectorized) {
    constexpr int kChunks = kCols / 8;
    for (int idx = threadIdx.x; idx < kRows * kChunks; idx += kThreads) {
      const int r = idx / kChunks, c = (idx % kChunks) * 8, n = row0 + r;
      const bool valid = n < n_valid && c < d_valid;
      const T* src = valid ? base + n * stride_n + c : base;
      cp_async_16(tile + r * kLd + c, src, valid);
    }
  } else {
    for (int idx = threadIdx.x; idx < kRows * kCols; idx += kThreads) {
      const int r = idx / kCols, c = idx % kCols, n = row0 + r;
      tile[r * kLd + c] = (n < n_valid && c < d_valid) ? base[n * stride_n + c * stride_d] : from_float<T>(0.f);
    }
  }
}

}  // namespace cuda
}  // namespace fastattn
