// Device helpers for the fastattn CUDA kernels (.cu files only): conversions, reductions, masks,
// the launch helper. No torch header: the kernels compile with plain nvcc (`make check-cuda`).
// The torch glue (csrc/cuda/*_api.cpp) includes only the launcher headers, which are plain C++.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../dropout_rng.h"
#include "types.h"

namespace fastattn {
namespace cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kInf = __builtin_huge_valf();

// Dynamic shared memory (the launch's smem_bytes) as a T*. A macro so that the CPU emulator
// (csrc/cuda/tools/emulate) can substitute its own buffer.
#if defined(FASTATTN_EMULATE)
#define FASTATTN_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(::emu::dynamic_shared())
#else
#define FASTATTN_DYNAMIC_SHARED(T, name)                                   \
  extern __shared__ __align__(16) unsigned char fastattn_dynamic_smem[]; \
  T* name = reinterpret_cast<T*>(fastattn_dynamic_smem)
#endif

// --------------------------------------------------------------------------------------------
// conversions (explicit intrinsics: torch builds define __CUDA_NO_HALF_CONVERSIONS__ and friends)
// --------------------------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(double x) { return static_cast<float>(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Rounds through T and back: the value a tensor of dtype T would hold.
template <typename T>
__device__ __forceinline__ float round_to(float x) {
  return to_float(from_float<T>(x));
}

// --------------------------------------------------------------------------------------------
// reductions
// --------------------------------------------------------------------------------------------

// Reduction over the `width` lanes of an aligned lane group (width a power of two <= 32).
template <int kWidth = 32>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int offset = kWidth / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <int kWidth = 32>
__device__ __forceinline__ float group_max(float v) {
#pragma unroll
  for (int offset = kWidth / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024). `scratch` holds 32 floats.
// Every thread gets the result. Each call starts with a barrier, so consecutive calls may share
// `scratch`.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = blockDim.x >> 5;
  v = group_sum<32>(v);
  __syncthreads();  // the previous use of scratch is over
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = lane < num_warps ? scratch[lane] : 0.f;
  return group_sum<32>(total);
}

// --------------------------------------------------------------------------------------------
// masks (see MaskKind)
// --------------------------------------------------------------------------------------------

// Additive value of a mask element: 0 or -inf for a bool mask, the value for a floating one.
__device__ __forceinline__ float mask_bias(const void* mask, MaskKind kind, int64_t offset) {
  switch (kind) {
    case MaskKind::kBool:
      return static_cast<const bool*>(mask)[offset] ? 0.f : -kInf;
    case MaskKind::kFloat16:
      return to_float(static_cast<const __half*>(mask)[offset]);
    case MaskKind::kBFloat16:
      return to_float(static_cast<const __nv_bfloat16*>(mask)[offset]);
    case MaskKind::kFloat32:
      return static_cast<const float*>(mask)[offset];
    case MaskKind::kFloat64:
      return static_cast<float>(static_cast<const double*>(mask)[offset]);
    default:
      return 0.f;
  }
}

// The Philox key of a draw: the seed in device memory (read-only for the kernel's lifetime, so the
// compiler may hoist the load out of the loops).
__device__ __forceinline__ uint64_t dropout_seed_of(const DropoutDraw& d) { return static_cast<uint64_t>(*d.seed); }

// --------------------------------------------------------------------------------------------
// host launch helpers
// --------------------------------------------------------------------------------------------

// The launchers' dropout draw for probability p and seed (host side of csrc/dropout_rng.h).
inline DropoutDraw make_dropout(double p, const int64_t* seed) {
  DropoutDraw d;
  d.active = p > 0.0;
  d.seed = seed;
  d.threshold = dropout_threshold(p);
  d.scale = static_cast<float>(1.0 / (1.0 - p));
  return d;
}

// Grid-stride kernels launch at most this many blocks (each then loops). The emulator uses a tiny
// cap so that its small test problems run those loops too.
#if defined(FASTATTN_EMULATE)
constexpr int64_t kMaxGridBlocks = 3;
#else
constexpr int64_t kMaxGridBlocks = int64_t{1} << 20;
#endif

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// Launches `kernel` on a 1-D grid, opting in to more than 48 KiB of dynamic shared memory.
template <typename Kernel, typename... Args>
cudaError_t launch_kernel(Kernel kernel, int64_t blocks, int threads, size_t smem_bytes, cudaStream_t stream,
                          const Args&... args) {
  if (blocks <= 0) return cudaSuccess;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
#if defined(FASTATTN_EMULATE)  // csrc/cuda/tools/emulate: run the blocks on the CPU
  (void)stream;
  return ::emu::launch(kernel, blocks, threads, smem_bytes, args...);
#else
  if (smem_bytes > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes));
    if (err != cudaSuccess) return err;
  }
  kernel<<<static_cast<unsigned>(blocks), threads, smem_bytes, stream>>>(args...);
  return cudaGetLastError();
#endif
}

}  // namespace cuda
}  // namespace fastattn
