// torch glue of the CUDA attention kernels: fastattn::attention_fwd / attention_bwd for the CUDA
// dispatch key (schemas in csrc/fastattn.cpp). Checks the arguments (errors name them), takes the
// current stream, allocates the outputs and calls the launchers of attention.cuh.
//
// Syntax check without CUDA torch: see csrc/cuda/README.md (`make check-cuda` runs it).
#ifdef FASTATTN_WITH_CUDA

#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "api_utils.h"
#include "attention.cuh"

namespace fastattn {
namespace cuda {
namespace {

void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask, double dropout_p) {
  check_cuda_tensor(q, "q");
  check_same_device(k, "k", q, "q");
  check_same_device(v, "v", q, "q");
  check_same_dtype(k, "k", q, "q");
  check_same_dtype(v, "v", q, "q");
  kernel_dtype(q, "q");
  TORCH_CHECK_VALUE(q.dim() == 4, "q must be (B, Hq, Nq, D), got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 4, "k must be (B, Hkv, Nk, D), got shape ", k.sizes());
  TORCH_CHECK_VALUE(v.dim() == 4, "v must be (B, Hkv, Nk, Dv), got shape ", v.sizes());
  TORCH_CHECK_VALUE(k.size(0) == q.size(0) && v.size(0) == q.size(0), "q, k and v must have the same batch size, got ",
              q.size(0), ", ", k.size(0), ", ", v.size(0));
  TORCH_CHECK_VALUE(k.size(3) == q.size(3), "k's head dim ", k.size(3), " must equal q's ", q.size(3));
  TORCH_CHECK_VALUE(v.size(1) == k.size(1) && v.size(2) == k.size(2), "v's (heads, length) ", v.sizes().slice(1, 2),
              " must equal k's ", k.sizes().slice(1, 2));
  TORCH_CHECK_VALUE(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "q's heads (", q.size(1),
              ") must be a multiple of k's heads (", k.size(1), ")");
  TORCH_CHECK_VALUE(q.size(3) <= kMaxHeadDim && v.size(3) <= kMaxHeadDim,
                    "the CUDA attention kernels take head dims up to ",
              kMaxHeadDim, ", got q/k ", q.size(3), " and v ", v.size(3));
  check_dropout(dropout_p);
  if (mask.has_value()) {
    check_same_device(*mask, "mask", q, "q");
    mask_kind(*mask, "mask");
    const std::vector<int64_t> want = {q.size(0), q.size(1), q.size(2), k.size(2)};
    TORCH_CHECK_VALUE(mask->sizes() == at::IntArrayRef(want), "mask must be a (B, Hq, Nq, Nk) = ",
                      at::IntArrayRef(want),
                " view (stride 0 where broadcast), got shape ", mask->sizes());
  }
}

AttentionShape attention_shape(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& mask, double scale, bool is_causal, double dropout_p,
                               const std::optional<at::Tensor>& seed) {
  AttentionShape sh;
  sh.batch = checked_int(q.size(0), "batch");
  sh.heads_q = checked_int(q.size(1), "query heads");
  sh.heads_kv = checked_int(k.size(1), "key/value heads");
  sh.len_q = checked_int(q.size(2), "query length");
  sh.len_k = checked_int(k.size(2), "key length");
  sh.dim_qk = checked_int(q.size(3), "head dim");
  sh.dim_v = checked_int(v.size(3), "value head dim");
  sh.scale = static_cast<float>(scale);
  sh.causal = is_causal;
  sh.dropout_p = dropout_p;
  sh.seed = seed_pointer(seed, dropout_p, q, "q");
  if (mask.has_value()) {
    sh.mask = mask->data_ptr();
    sh.mask_kind = mask_kind(*mask, "mask");
    sh.mask_sb = mask->stride(0);
    sh.mask_sh = mask->stride(1);
    sh.mask_sq = mask->stride(2);
    sh.mask_sk = mask->stride(3);
  }
  sh.dtype = kernel_dtype(q, "q");
  sh.sm_version = sm_version(q);
  return sh;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const std::optional<at::Tensor>& mask, double scale,
                                                      bool is_causal, double dropout_p, const std::optional<at::Tensor>& seed) {
  check_attention_inputs(q, k, v, mask, dropout_p);
  const DeviceGuard guard(q.device());
  at::Tensor out = new_output({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  at::Tensor lse = new_output({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (lse.numel() == 0) return {out, lse};

  AttentionFwdParams params;
  params.shape = attention_shape(q, k, v, mask, scale, is_causal, dropout_p, seed);
  params.q = view4(q);
  params.k = view4(k);
  params.v = view4(v);
  params.out = view4(out);
  params.lse = lse.data_ptr<float>();
  check_launch(launch_attention_fwd(params, current_stream(q)), "attention_fwd");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& mask, double scale, bool is_causal, double dropout_p,
    const std::optional<at::Tensor>& seed) {
  check_attention_inputs(q, k, v, mask, dropout_p);
  const std::vector<int64_t> out_shape = {q.size(0), q.size(1), q.size(2), v.size(3)};
  auto check_like_out = [&](const at::Tensor& t, const char* name) {
    check_same_device(t, name, q, "q");
    check_same_dtype(t, name, q, "q");
    TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(out_shape), name, " must have shape ", at::IntArrayRef(out_shape),
                ", got ", t.sizes());
  };
  check_like_out(dout, "dout");
  check_like_out(out, "out");
  check_same_device(lse, "lse", q, "q");
  TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat, "lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef(out_shape).slice(0, 3), "lse must have shape (B, Hq, Nq) = ",
              at::IntArrayRef(out_shape).slice(0, 3), ", got ", lse.sizes());

  const DeviceGuard guard(q.device());
  at::Tensor dq = new_output(q.sizes(), q.options());
  at::Tensor dk = new_output(k.sizes(), k.options());
  at::Tensor dv = new_output(v.sizes(), v.options());
  if (dq.numel() == 0 && dk.numel() == 0 && dv.numel() == 0) return {dq, dk, dv};
  if (k.size(2) == 0 || q.size(2) == 0) {  // no key (every row fully masked) or no query: zero gradients
    return {dq.zero_(), dk.zero_(), dv.zero_()};
  }

  at::Tensor delta = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  const at::Tensor lse_contig = lse.contiguous();

  AttentionBwdParams params;
  params.shape = attention_shape(q, k, v, mask, scale, is_causal, dropout_p, seed);
  params.q = view4(q);
  params.k = view4(k);
  params.v = view4(v);
  params.out = view4(out);
  params.dout = view4(dout);
  params.lse = lse_contig.data_ptr<float>();
  params.delta = delta.data_ptr<float>();
  params.dq = view4(dq);
  params.dk = view4(dk);
  params.dv = view4(dv);
  check_launch(launch_attention_bwd(params, current_stream(q)), "attention_bwd");
  return {dq, dk, dv};
}

}  // namespace
}  // namespace cuda
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("attention_fwd", &fastattn::cuda::attention_fwd_cuda);
  m.impl("attention_bwd", &fastattn::cuda::attention_bwd_cuda);
}

#endif  // FASTATTN_WITH_CUDA
