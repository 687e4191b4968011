// Plain C++ types shared by the kernels (.cu) and the torch glue (*_api.cpp): dtype and mask tags
// and a strided 4-D view. No device code here, so host compilers include it too.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#if defined(__CUDACC__)
#define FASTATTN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTATTN_HOST_DEVICE inline
#endif

namespace fastattn {
namespace cuda {

// Element types as a runtime tag: the glue maps torch dtypes onto it, launchers switch on it.
enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

// Masks are bool (true = keep) or floating (added), read through strides, never materialised.
enum class MaskKind : int { kNone = 0, kBool = 1, kFloat16 = 2, kBFloat16 = 3, kFloat32 = 4, kFloat64 = 5 };

// Dropout as the kernels draw it (csrc/dropout_rng.h, shared with the CPU kernels): element
// (stream, row, col) is kept when dropout_bits(*seed, stream, row, col) >= threshold (Philox
// 4x32-10) and then scaled by `scale`. The seed stays in device memory (a one-element int64 tensor drawn by torch inside the
// graph): the kernels read it, so the host never waits for the GPU and CUDA graphs replay new seeds.
struct DropoutDraw {
  bool active = false;
  const int64_t* seed = nullptr;  // device pointer; read only when active
  uint32_t threshold = 0;
  float scale = 1.f;
};

// Strided 4-D view (b, h, n, d), strides in elements: the attention tensors.
struct View4 {
  void* ptr = nullptr;
  int64_t sb = 0, sh = 0, sn = 0, sd = 0;

  FASTATTN_HOST_DEVICE int64_t offset(int64_t b, int64_t h, int64_t n, int64_t d) const {
    return b * sb + h * sh + n * sn + d * sd;
  }
};

}  // namespace cuda
}  // namespace fastattn
