// torch glue of the CUDA norm kernels: fastattn::layer_norm_fwd/bwd and rms_norm_fwd/bwd for the
// CUDA dispatch key (schemas in csrc/fastattn.cpp). Absent outputs (residual_out without a
// residual, dweight without a weight, dbias without a bias) are empty tensors.
//
// Syntax check without CUDA torch: see csrc/cuda/README.md (`make check-cuda` runs it).
#ifdef FASTATTN_WITH_CUDA

#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "api_utils.h"
#include "norm.cuh"

namespace fastattn {
namespace cuda {
namespace {

at::Tensor empty_like_none(const at::Tensor& like) { return at::empty({0}, like.options()); }

void check_param(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& x) {
  if (!t.has_value()) return;
  check_same_device(*t, name, x, "x");
  check_same_dtype(*t, name, x, "x");
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == x.size(1), name, " must have shape (", x.size(1), ",), got ",
                    t->sizes());
}

void check_rows(const at::Tensor& t, const char* name, const at::Tensor& x) {
  check_same_device(t, name, x, "x");
  check_same_dtype(t, name, x, "x");
  TORCH_CHECK_VALUE(t.sizes() == x.sizes(), name, " must have x's shape ", x.sizes(), ", got ", t.sizes());
}

void check_stats(const at::Tensor& t, const char* name, const at::Tensor& x) {
  check_same_device(t, name, x, "s");
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == x.size(0), name, " must have shape (", x.size(0), ",), got ",
                    t.sizes());
}

// Forward of both norms; mean is returned for layer_norm only.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_fwd(const at::Tensor& x,
                                                                    const std::optional<at::Tensor>& residual,
                                                                    const std::optional<at::Tensor>& weight,
                                                                    const std::optional<at::Tensor>& bias, double eps,
                                                                    bool rms, const char* op) {
  check_cuda_tensor(x, "x");
  NormFwdParams p;
  p.dtype = kernel_dtype(x, "x");
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be 2-D (M, N), got shape ", x.sizes());
  if (residual.has_value()) check_rows(*residual, "residual", x);
  check_param(weight, "weight", x);
  check_param(bias, "bias", x);
  const DeviceGuard guard(x.device());
  at::Tensor y = new_output(x.sizes(), x.options());
  at::Tensor residual_out = residual.has_value() ? new_output(x.sizes(), x.options()) : empty_like_none(x);
  at::Tensor mean = new_output({rms ? 0 : x.size(0)}, x.options().dtype(at::kFloat));
  at::Tensor rstd = new_output({x.size(0)}, x.options().dtype(at::kFloat));
  if (x.numel() == 0) {
    // N = 0 with rows: mean 0 and rstd 1/sqrt(eps), as torch gives for an empty normalised shape.
    if (x.size(0) > 0) {
      mean.zero_();
      rstd.fill_(1.0 / std::sqrt(eps));
    }
    return {y, residual_out, mean, rstd};
  }
  p.x = x.data_ptr();
  p.x_stride_row = x.stride(0);
  p.x_stride_col = x.stride(1);
  if (residual.has_value()) {
    p.residual = residual->data_ptr();
    p.residual_stride_row = residual->stride(0);
    p.residual_stride_col = residual->stride(1);
    p.residual_out = residual_out.data_ptr();
  }
  if (weight.has_value()) {
    p.weight = weight->data_ptr();
    p.weight_stride = weight->stride(0);
  }
  if (bias.has_value()) {
    p.bias = bias->data_ptr();
    p.bias_stride = bias->stride(0);
  }
  p.y = y.data_ptr();
  p.mean = rms ? nullptr : mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.rows = x.size(0);
  p.cols = x.size(1);
  p.eps = static_cast<float>(eps);
  p.rms = rms;
  check_launch(launch_norm_fwd(p, current_stream(x)), op);
  return {y, residual_out, mean, rstd};
}

// Backward of both norms: (ds, dweight, dbias), dweight/dbias empty when not asked for.
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_bwd(const at::Tensor& dy, const at::Tensor& s,
                                                        const std::optional<at::Tensor>& weight,
                                                        const std::optional<at::Tensor>& mean,
                                                        const at::Tensor& rstd, bool has_bias, bool rms,
                                                        const char* op) {
  check_cuda_tensor(s, "s");
  NormBwdParams p;
  p.dtype = kernel_dtype(s, "s");
  TORCH_CHECK_VALUE(s.dim() == 2, "s must be 2-D (M, N), got shape ", s.sizes());
  check_rows(dy, "dy", s);
  check_param(weight, "weight", s);
  if (mean.has_value()) check_stats(*mean, "mean", s);
  check_stats(rstd, "rstd", s);
  const DeviceGuard guard(s.device());
  const int64_t rows = s.size(0), cols = s.size(1);
  at::Tensor ds = new_output(s.sizes(), s.options());
  at::Tensor dweight = weight.has_value() ? new_output({cols}, s.options()) : empty_like_none(s);
  at::Tensor dbias = has_bias ? new_output({cols}, s.options()) : empty_like_none(s);
  if (rows == 0 || cols == 0) {  // nothing to reduce: zero parameter gradients
    dweight.zero_();
    dbias.zero_();
    return {ds, dweight, dbias};
  }
  const at::Tensor rstd_c = rstd.contiguous();
  const at::Tensor mean_c = mean.has_value() ? mean->contiguous() : at::Tensor();
  at::Tensor partial;
  if (weight.has_value() || has_bias) {
    p.partial_rows = norm_bwd_partial_rows(rows, sm_count(s));
    partial = at::empty({2, p.partial_rows, cols}, s.options().dtype(at::kFloat));
    p.partial = partial.data_ptr<float>();
  }
  p.dy = dy.data_ptr();
  p.dy_stride_row = dy.stride(0);
  p.dy_stride_col = dy.stride(1);
  p.s = s.data_ptr();
  p.s_stride_row = s.stride(0);
  p.s_stride_col = s.stride(1);
  if (weight.has_value()) {
    p.weight = weight->data_ptr();
    p.weight_stride = weight->stride(0);
    p.dweight = dweight.data_ptr();
  }
  if (has_bias) p.dbias = dbias.data_ptr();
  p.mean = mean.has_value() ? mean_c.data_ptr<float>() : nullptr;
  p.rstd = rstd_c.data_ptr<float>();
  p.ds = ds.data_ptr();
  p.rows = rows;
  p.cols = cols;
  p.rms = rms;
  check_launch(launch_norm_bwd(p, current_stream(s)), op);
  return {ds, dweight, dbias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  return norm_fwd(x, residual, weight, bias, eps, /*rms=*/false, "layer_norm_fwd");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cuda(const at::Tensor& dy, const at::Tensor& s,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const at::Tensor& mean, const at::Tensor& rstd,
                                                                   bool has_bias) {
  return norm_bwd(dy, s, weight, mean, rstd, has_bias, /*rms=*/false, "layer_norm_bwd");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_fwd_cuda(const at::Tensor& x,
                                                                 const std::optional<at::Tensor>& residual,
                                                                 const std::optional<at::Tensor>& weight, double eps) {
  auto [y, residual_out, mean, rstd] = norm_fwd(x, residual, weight, std::nullopt, eps, /*rms=*/true, "rms_norm_fwd");
  return {y, residual_out, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cuda(const at::Tensor& dy, const at::Tensor& s,
                                                     const std::optional<at::Tensor>& weight, const at::Tensor& rstd) {
  auto [ds, dweight, dbias] = norm_bwd(dy, s, weight, std::nullopt, rstd, /*has_bias=*/false, /*rms=*/true,
                                       "rms_norm_bwd");
  return {ds, dweight};
}

}  // namespace
}  // namespace cuda
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("layer_norm_fwd", &fastattn::cuda::layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd", &fastattn::cuda::layer_norm_bwd_cuda);
  m.impl("rms_norm_fwd", &fastattn::cuda::rms_norm_fwd_cuda);
  m.impl("rms_norm_bwd", &fastattn::cuda::rms_norm_bwd_cuda);
}

#endif  // FASTATTN_WITH_CUDA
