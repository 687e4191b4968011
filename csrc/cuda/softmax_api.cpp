// torch glue of the CUDA softmax kernels: fastattn::softmax_fwd / softmax_bwd for the CUDA
// dispatch key (schemas in csrc/fastattn.cpp). Rows are read in place through their strides;
// tensors with more than kMaxRowDims leading dims are first made contiguous (and the mask
// expanded), which only costs a copy.
//
// Syntax check without CUDA torch: see csrc/cuda/README.md (`make check-cuda` runs it).
#ifdef FASTATTN_WITH_CUDA

#include <torch/library.h>

#include <optional>

#include "api_utils.h"
#include "softmax.cuh"

namespace fastattn {
namespace cuda {
namespace {

// Leading dims of `shape` (all but the last) as the kernels' row layout.
RowLayout row_layout(at::IntArrayRef shape) {
  RowLayout layout;
  layout.ndim = static_cast<int>(shape.size()) - 1;
  layout.rows = 1;
  for (int d = 0; d < layout.ndim; ++d) {
    layout.sizes[d] = shape[d];
    layout.rows *= shape[d];
  }
  layout.cols = shape.back();
  return layout;
}

RowStrides row_strides(const at::Tensor& t) {
  RowStrides rs;
  rs.ptr = t.data_ptr();
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rs.strides[d] = t.stride(d);
  rs.col_stride = t.stride(-1);
  return rs;
}

// A view of `t` with at most kMaxRowDims leading dims: itself, or a contiguous copy viewed as
// (rows / R, R, N) (R the size of dim -2, kept for the causal row index).
at::Tensor with_few_row_dims(const at::Tensor& t) {
  if (t.dim() - 1 <= kMaxRowDims) return t;
  return t.contiguous().view({-1, t.size(-2), t.size(-1)});
}

at::Tensor softmax_fwd_cuda(const at::Tensor& x, const std::optional<at::Tensor>& mask, double scale, bool is_causal,
                            bool log) {
  check_cuda_tensor(x, "x");
  const DType dtype = kernel_dtype(x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have at least 1 dim, got a scalar");
  TORCH_CHECK_VALUE(!is_causal || x.dim() >= 2, "is_causal needs x with at least 2 dims, got shape ", x.sizes());
  if (mask.has_value()) {
    check_same_device(*mask, "mask", x, "x");
    mask_kind(*mask, "mask");
    TORCH_CHECK_VALUE(mask->sizes() == x.sizes(), "mask must be a view of x's shape ", x.sizes(), ", got ",
                      mask->sizes());
  }
  const DeviceGuard guard(x.device());
  at::Tensor y = new_output(x.sizes(), x.options());
  if (y.numel() == 0) return y;

  const at::Tensor x_rows = with_few_row_dims(x);
  std::optional<at::Tensor> mask_rows;
  if (mask.has_value()) mask_rows = x.dim() - 1 <= kMaxRowDims ? *mask : with_few_row_dims(mask->expand(x.sizes()));

  SoftmaxFwdParams params;
  params.layout = row_layout(x_rows.sizes());
  params.x = row_strides(x_rows);
  if (mask_rows.has_value()) {
    params.mask = row_strides(*mask_rows);
    params.mask_kind = mask_kind(*mask_rows, "mask");
  }
  params.y = y.data_ptr();
  params.scale = static_cast<float>(scale);
  params.causal = is_causal;
  params.log = log;
  params.dtype = dtype;
  check_launch(launch_softmax_fwd(params, current_stream(x)), "softmax_fwd");
  return y;
}

at::Tensor softmax_bwd_cuda(const at::Tensor& dy, const at::Tensor& y, double scale, bool log) {
  check_cuda_tensor(y, "y");
  check_same_device(dy, "dy", y, "y");
  check_same_dtype(dy, "dy", y, "y");
  const DType dtype = kernel_dtype(y, "y");
  TORCH_CHECK_VALUE(y.dim() >= 1, "y must have at least 1 dim, got a scalar");
  TORCH_CHECK_VALUE(dy.sizes() == y.sizes(), "dy must have y's shape ", y.sizes(), ", got ", dy.sizes());
  const DeviceGuard guard(y.device());
  at::Tensor dx = new_output(y.sizes(), y.options());
  if (dx.numel() == 0) return dx;

  const at::Tensor dy_rows = with_few_row_dims(dy), y_rows = with_few_row_dims(y);
  SoftmaxBwdParams params;
  params.layout = row_layout(y_rows.sizes());
  params.dy = row_strides(dy_rows);
  params.y = row_strides(y_rows);
  params.dx = dx.data_ptr();
  params.scale = static_cast<float>(scale);
  params.log = log;
  params.dtype = dtype;
  check_launch(launch_softmax_bwd(params, current_stream(y)), "softmax_bwd");
  return dx;
}

}  // namespace
}  // namespace cuda
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("softmax_fwd", &fastattn::cuda::softmax_fwd_cuda);
  m.impl("softmax_bwd", &fastattn::cuda::softmax_bwd_cuda);
}

#endif  // FASTATTN_WITH_CUDA
