// A software CUDA device for testing the fastattn kernels on a machine without a GPU.
//
// The .cu files are compiled as C++ (FASTATTN_EMULATE) and each block of a launch runs as one
// fiber per CUDA thread on a single OS thread; the blocks of a launch run one at a time in a
// shuffled order. Fibers switch only at the points where CUDA
// threads synchronise: __syncthreads (the block), warp shuffles, ldmatrix and mma (the warp).
// Races show up as wrong or NaN results because the schedule is adversarial: fibers resume in a
// shuffled order, whole warps sit out scheduling rounds at random rates (so warps drift apart
// between block barriers), shared memory is NaN-filled before each block, and each cp.async
// lands either at its issue or only at the cp.async.wait_group that covers it
// (FASTATTN_EMU_COPIES=early|late forces one; FASTATTN_EMU_SEED seeds the schedule).
// mma.sync and ldmatrix follow the PTX ISA's fragment layouts (the model the kernels were
// written against); misaligned or out-of-shared-memory ldmatrix/cp.async addresses are errors.
//
// Include this before the CUDA headers of a translation unit that includes a .cu file.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <functional>

namespace emu {

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

Dim3& thread_idx();
Dim3& block_idx();
Dim3& block_dim();
Dim3& grid_dim();

// Dynamic shared memory of the running block (NaN-filled before it starts), and its capacity.
unsigned char* dynamic_shared();
constexpr size_t kSharedBytes = 256 * 1024;

void syncthreads();
float shfl_xor(float value, int lane_mask);
void ldmatrix_x4(uint32_t (&regs)[4], const void* row_address, bool transpose);
void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16);
void cp_async_16(void* smem, const void* gmem, bool valid);
void cp_async_commit();
void cp_async_wait(int pending);
[[noreturn]] void trap();

// Runs `blocks` blocks of `threads` threads of `body` (1-D grid and blocks).
cudaError_t run_grid(int64_t blocks, int threads, size_t smem_bytes, const std::function<void()>& body);

template <typename Kernel, typename... Args>
cudaError_t launch(Kernel kernel, int64_t blocks, int threads, size_t smem_bytes, const Args&... args) {
  if (blocks <= 0) return cudaSuccess;
  if (smem_bytes > kSharedBytes || threads <= 0 || threads > 1024 || threads % 32 != 0) {
    return cudaErrorInvalidConfiguration;
  }
  return run_grid(blocks, threads, smem_bytes, [&] { kernel(args...); });
}

}  // namespace emu

// The CUDA built-ins the kernels use, in terms of the emulator.
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx())
#define blockDim (::emu::block_dim())
#define gridDim (::emu::grid_dim())

inline void __syncthreads() { ::emu::syncthreads(); }
inline float __shfl_xor_sync(unsigned, float value, int lane_mask) { return ::emu::shfl_xor(value, lane_mask); }
inline float atomicAdd(float* address, float value) {  // fibers never interleave inside a call
  const float old = *address;
  *address = old + value;
  return old;
}
inline void __trap() { ::emu::trap(); }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

// Static `__shared__` arrays (in device functions) become function-local statics: one per
// program, shared by the fibers of the running block, as a block's shared memory.
#undef __shared__
#define __shared__ static
