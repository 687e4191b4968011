// Helpers the CUDA torch glue (csrc/cuda/*_api.cpp) shares: argument checks that name the
// argument, tensor -> kernel-parameter conversions, output allocation, device queries.
//
// Only c10/cuda headers (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE headers):
// the glue then also syntax-checks against a CPU build of torch (see csrc/cuda/README.md).
// Under FASTATTN_EMULATE (csrc/cuda/tools/emulate) the device-specific helpers below take CPU
// tensors and a software device instead, so the same glue drives the emulated kernels.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime_api.h>
#if !defined(FASTATTN_EMULATE)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>

#include "types.h"

namespace fastattn {
namespace cuda {

#if defined(FASTATTN_EMULATE)
inline void check_cuda_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cpu(), name, " must be a CPU tensor for the emulated kernels, got one on ", t.device());
}

struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};
#else
inline void check_cuda_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
}

using DeviceGuard = c10::cuda::CUDAGuard;
#endif

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  check_cuda_tensor(t, name);
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ",
                    ref.device());
}

inline void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, " has dtype ", t.scalar_type(), " but ", ref_name,
                   " has ",
              ref.scalar_type(), "; they must match");
}

// Kernel dtype of a float16/bfloat16/float32 tensor.
inline DType kernel_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kFloat:
      return DType::kFloat32;
    default:
      TORCH_CHECK_TYPE(false, name, " must be float32, bfloat16 or float16 for the CUDA kernels, got ",
                       t.scalar_type());
  }
  return DType::kFloat32;  // unreachable
}

// Mask kind of a bool (true = keep) or floating (added) mask.
inline MaskKind mask_kind(const at::Tensor& mask, const char* name) {
  switch (mask.scalar_type()) {
    case at::kBool:
      return MaskKind::kBool;
    case at::kHalf:
      return MaskKind::kFloat16;
    case at::kBFloat16:
      return MaskKind::kBFloat16;
    case at::kFloat:
      return MaskKind::kFloat32;
    case at::kDouble:
      return MaskKind::kFloat64;
    default:
      TORCH_CHECK_TYPE(false, name, " must be bool (True = keep) or floating (added), got ", mask.scalar_type());
  }
  return MaskKind::kNone;  // unreachable
}

inline View4 view4(const at::Tensor& t) {
  View4 v;
  v.ptr = const_cast<void*>(t.data_ptr());
  v.sb = t.stride(0);
  v.sh = t.stride(1);
  v.sn = t.stride(2);
  v.sd = t.stride(3);
  return v;
}

inline int checked_int(int64_t value, const char* what) {
  TORCH_CHECK_VALUE(value >= 0 && value <= std::numeric_limits<int>::max(), what, " = ", value,
              " is larger than the CUDA kernels take (2^31 - 1)");
  return static_cast<int>(value);
}

#if defined(FASTATTN_EMULATE)
// The emulated device: FASTATTN_EMU_SM picks the compute capability (default 80), 4 SMs.
inline int sm_version(const at::Tensor&) {
  const char* sm = std::getenv("FASTATTN_EMU_SM");
  return sm != nullptr ? std::atoi(sm) : 80;
}

inline int sm_count(const at::Tensor&) { return 4; }

inline cudaStream_t current_stream(const at::Tensor&) { return nullptr; }

inline const char* error_string(cudaError_t err) { return err == cudaSuccess ? "no error" : "emulated launch error"; }
#else
// Compute capability as 10·major + minor, e.g. 80 for sm_80.
inline int sm_version(const at::Tensor& t) {
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, t.get_device()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, t.get_device()));
  return 10 * major + minor;
}

inline int sm_count(const at::Tensor& t) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, t.get_device()));
  return count;
}

inline cudaStream_t current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.get_device()).stream();
}

inline const char* error_string(cudaError_t err) { return cudaGetErrorString(err); }
#endif

// at::empty for kernel outputs, NaN-filled under FASTATTN_POISON_OUTPUTS=1 (as fastattn.utils.empty)
// so that an element a kernel forgot to write shows in the tests. FASTATTN_GUARD_OUTPUTS=G (tests
// only) also puts G NaN elements before and after a floating output in one allocation, so that a
// test can check through the storage that no kernel wrote past either end.
inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const char* poison = std::getenv("FASTATTN_POISON_OUTPUTS");
  const bool poisoned = poison != nullptr && std::strcmp(poison, "1") == 0 && at::isFloatingType(options.dtype().toScalarType());
  const char* guard_env = poisoned ? std::getenv("FASTATTN_GUARD_OUTPUTS") : nullptr;
  const int64_t guard = guard_env != nullptr ? std::max<int64_t>(0, std::atoll(guard_env)) : 0;
  int64_t numel = 1;
  for (int64_t size : sizes) numel *= size;
  at::Tensor out = guard > 0 ? at::empty({numel + 2 * guard}, options) : at::empty(sizes, options);
  if (poisoned) out.fill_(std::numeric_limits<double>::quiet_NaN());
  return guard > 0 ? out.narrow(0, guard, numel).view(sizes) : out;
}

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fastattn::", op, " (CUDA): kernel launch failed: ", error_string(err), " (",
              static_cast<int>(err), ")");
}

inline void check_dropout(double dropout_p) {
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ", dropout_p);
}

// The device pointer to the dropout seed (a one-element int64 tensor on ref's device, which the
// kernels read: no host sync); nullptr when there is no dropout.
inline const int64_t* seed_pointer(const std::optional<at::Tensor>& seed, double dropout_p, const at::Tensor& ref,
                                   const char* ref_name) {
  if (!seed.has_value()) {
    TORCH_CHECK_VALUE(dropout_p == 0.0, "seed is required when dropout_p > 0, got None");
    return nullptr;
  }
  check_same_device(*seed, "seed", ref, ref_name);
  TORCH_CHECK_TYPE(seed->scalar_type() == at::kLong, "seed must be an int64 tensor, got ", seed->scalar_type());
  TORCH_CHECK_VALUE(seed->numel() == 1, "seed must have one element, got shape ", seed->sizes());
  return seed->const_data_ptr<int64_t>();
}

}  // namespace cuda
}  // namespace fastattn
