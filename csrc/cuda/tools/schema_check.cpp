// Checks, without a GPU or CUDA torch, that the C++ signatures of the CUDA glue functions match the
// op schemas of csrc/fastattn.cpp: the glue files are compiled in here with their CUDA
// registrations turned into unused functions, and stubs with exactly their signatures are
// registered for the CPU key of the real schemas. torch infers a schema from each stub and
// compares it with the declared one at registration, so a mismatch fails this program.
// Run by csrc/cuda/tools/check_glue.sh (SCHEMAS_INC is the TORCH_LIBRARY block of fastattn.cpp).
#include <torch/library.h>
#include <torch/torch.h>

#include <iostream>
#include <stdexcept>

// The glue files, their TORCH_LIBRARY_IMPL(fastattn, CUDA, m) blocks made into unused functions.
#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, k, m) \
  [[maybe_unused]] static void C10_CONCATENATE(glue_registration_, C10_UID)(torch::Library & m)
#include "../attention_api.cpp"
#include "../dropout_api.cpp"
#include "../ffn_api.cpp"
#include "../norm_api.cpp"
#include "../softmax_api.cpp"
#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, k, m) _TORCH_LIBRARY_IMPL(ns, k, m, C10_UID)

#include SCHEMAS_INC

namespace {

template <typename F>
struct Stub;

template <typename R, typename... Args>
struct Stub<R (*)(Args...)> {
  static R call(Args...) { throw std::runtime_error("stub reached"); }
};

template <typename F>
constexpr auto stub(F) {
  return &Stub<F>::call;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  using namespace fastattn::cuda;
  m.impl("attention_fwd", stub(&attention_fwd_cuda));
  m.impl("attention_bwd", stub(&attention_bwd_cuda));
  m.impl("dropout_mask", stub(&dropout_mask_cuda));
  m.impl("softmax_fwd", stub(&softmax_fwd_cuda));
  m.impl("softmax_bwd", stub(&softmax_bwd_cuda));
  m.impl("ffn_act_fwd", stub(&ffn_act_fwd_cuda));
  m.impl("ffn_act_bwd", stub(&ffn_act_bwd_cuda));
  m.impl("layer_norm_fwd", stub(&layer_norm_fwd_cuda));
  m.impl("layer_norm_bwd", stub(&layer_norm_bwd_cuda));
  m.impl("rms_norm_fwd", stub(&rms_norm_fwd_cuda));
  m.impl("rms_norm_bwd", stub(&rms_norm_bwd_cuda));
}

int main() {
  // Reaching main means every registration above matched its schema; call one op end to end.
  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastattn::softmax_bwd", "")
                      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double, bool)>();
  try {
    op.call(at::ones({2, 3}), at::ones({2, 3}), 1.0, false);
  } catch (const std::runtime_error& e) {
    std::cout << "schema check passed: 11 CUDA glue signatures match csrc/fastattn.cpp (" << e.what() << ")\n";
    return 0;
  }
  std::cerr << "schema check: the stub was not reached\n";
  return 1;
}
