// torch glue of the CUDA FFN epilogue kernels: fastattn::ffn_act_fwd / ffn_act_bwd for the CUDA
// dispatch key (schemas in csrc/fastattn.cpp). The GEMMs around them stay at::matmul (cuBLAS).
//
// Syntax check without CUDA torch: see csrc/cuda/README.md (`make check-cuda` runs it).
#ifdef FASTATTN_WITH_CUDA

#include <torch/library.h>

#include <optional>
#include <string>

#include "../activation_arg.h"
#include "api_utils.h"
#include "ffn.cuh"

namespace fastattn {
namespace cuda {
namespace {

// Checks h and bias, fills the shared parameters (everything but grad and out).
FfnActParams ffn_params(const at::Tensor& h, const std::optional<at::Tensor>& bias, c10::string_view activation,
                        double dropout_p, const std::optional<at::Tensor>& seed) {
  check_cuda_tensor(h, "h");
  FfnActParams p;
  p.dtype = kernel_dtype(h, "h");
  TORCH_CHECK_VALUE(h.dim() == 2, "h must be 2-D (M, H1), got shape ", h.sizes());
  p.activation = activation_arg(activation);
  const int64_t hidden_in = h.size(1);
  TORCH_CHECK_VALUE(!is_gated(p.activation) || hidden_in % 2 == 0,
                    "h must have an even number of columns (gate, then up) for ",
              std::string(activation.data(), activation.size()), ", got ", hidden_in);
  check_dropout(dropout_p);
  p.h = h.data_ptr();
  p.h_stride_row = h.stride(0);
  p.h_stride_col = h.stride(1);
  if (bias.has_value()) {
    check_same_device(*bias, "bias", h, "h");
    check_same_dtype(*bias, "bias", h, "h");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == hidden_in, "bias must have shape (", hidden_in, ",), got ",
                bias->sizes());
    p.bias = bias->data_ptr();
    p.bias_stride = bias->stride(0);
  }
  p.rows = h.size(0);
  p.hidden_in = hidden_in;
  p.hidden_out = is_gated(p.activation) ? hidden_in / 2 : hidden_in;
  p.dropout_p = dropout_p;
  p.seed = seed_pointer(seed, dropout_p, h, "h");
  return p;
}

at::Tensor ffn_act_fwd_cuda(const at::Tensor& h, const std::optional<at::Tensor>& bias, c10::string_view activation,
                            double dropout_p, const std::optional<at::Tensor>& seed) {
  FfnActParams p = ffn_params(h, bias, activation, dropout_p, seed);
  const DeviceGuard guard(h.device());
  at::Tensor out = new_output({p.rows, p.hidden_out}, h.options());
  if (out.numel() == 0) return out;
  p.out = out.data_ptr();
  check_launch(launch_ffn_act_fwd(p, current_stream(h)), "ffn_act_fwd");
  return out;
}

at::Tensor ffn_act_bwd_cuda(const at::Tensor& grad, const at::Tensor& h, const std::optional<at::Tensor>& bias,
                            c10::string_view activation, double dropout_p, const std::optional<at::Tensor>& seed) {
  FfnActParams p = ffn_params(h, bias, activation, dropout_p, seed);
  check_same_device(grad, "grad", h, "h");
  check_same_dtype(grad, "grad", h, "h");
  TORCH_CHECK_VALUE(grad.dim() == 2 && grad.size(0) == p.rows && grad.size(1) == p.hidden_out, "grad must have shape (",
              p.rows, ", ", p.hidden_out, "), the forward output's, got ", grad.sizes());
  const DeviceGuard guard(h.device());
  at::Tensor dh = new_output({p.rows, p.hidden_in}, h.options());
  if (dh.numel() == 0) return dh;
  p.grad = grad.data_ptr();
  p.grad_stride_row = grad.stride(0);
  p.grad_stride_col = grad.stride(1);
  p.out = dh.data_ptr();
  check_launch(launch_ffn_act_bwd(p, current_stream(h)), "ffn_act_bwd");
  return dh;
}

}  // namespace
}  // namespace cuda
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("ffn_act_fwd", &fastattn::cuda::ffn_act_fwd_cuda);
  m.impl("ffn_act_bwd", &fastattn::cuda::ffn_act_bwd_cuda);
}

#endif  // FASTATTN_WITH_CUDA
