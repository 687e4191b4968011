// Attention kernels: parameter structs and host launchers (defined in attention_fwd.cu and
// attention_bwd.cu). The glue (attention_api.cpp) fills the structs from tensors; nothing here
// needs torch.
//
// Semantics (schema in csrc/fastattn.cpp): q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv),
// any strides, Hq % Hkv == 0 (query head h reads kv head h / (Hq / Hkv)); D, Dv <= 256.
// scores = q·kᵀ·scale, causal (top-left: key j > query i is masked), mask (B, Hq, Nq, Nk) bool
// (true = attend) or floating (added) read through its strides (0 where broadcast). Dropout
// draws element (b, h, i, j) at Philox stream b·Hq + h, row i, column j with csrc/dropout_rng.h (the
// RNG of every backend, so they all drop the same weights) and scales kept ones by 1/(1 - p).
// lse: float32 (B, Hq, Nq) contiguous, natural log, +inf for a fully masked row (whose output and
// gradients are 0).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "types.h"

namespace fastattn {
namespace cuda {

struct AttentionShape {
  int batch = 0, heads_q = 0, heads_kv = 0;
  int len_q = 0, len_k = 0;
  int dim_qk = 0, dim_v = 0;
  float scale = 1.f;
  bool causal = false;
  double dropout_p = 0.0;
  const int64_t* seed = nullptr;  // device pointer to the int64 seed (csrc/fastattn.cpp)
  DropoutDraw dropout;  // derived from dropout_p and seed by the launchers
  const void* mask = nullptr;  // (B, Hq, Nq, Nk) view, strides below
  MaskKind mask_kind = MaskKind::kNone;
  int64_t mask_sb = 0, mask_sh = 0, mask_sq = 0, mask_sk = 0;
  DType dtype = DType::kFloat16;  // q, k, v, out (and dout, dq, dk, dv) share it
  int sm_version = 0;             // compute capability of the device, e.g. 80 for sm_80
};

struct AttentionFwdParams {
  AttentionShape shape;
  View4 q, k, v;  // read only
  View4 out;      // written (B, Hq, Nq, Dv)
  float* lse = nullptr;  // (B, Hq, Nq) contiguous, written
};

struct AttentionBwdParams {
  AttentionShape shape;
  View4 q, k, v, out, dout;  // read only
  const float* lse = nullptr;  // (B, Hq, Nq) contiguous
  float* delta = nullptr;      // scratch (B, Hq, Nq) float32: rowsum(dout·out)
  View4 dq, dk, dv;            // written (B, Hq, Nq, D), (B, Hkv, Nk, D) and (B, Hkv, Nk, Dv), each element once
};

// Largest head dim (of q·k and of v) the kernels take.
constexpr int kMaxHeadDim = 256;

// Launch on `stream` (the kernels ask for up to ~100 KiB of shared memory per block: the
// launchers opt in above 48 KiB). cudaErrorInvalidValue for an unsupported dtype or head dim,
// else the launch's status.
cudaError_t launch_attention_fwd(const AttentionFwdParams& params, cudaStream_t stream);
cudaError_t launch_attention_bwd(const AttentionBwdParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastattn
