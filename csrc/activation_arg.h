// The activation argument of the extension's FFN ops (a string in the schema, csrc/fastattn.cpp) as
// the code of csrc/activations.h, with torch's ValueError when it names none: the one parser of the
// CPU kernels (csrc/cpu/ffn.cpp) and the CUDA glue (csrc/cuda/ffn_api.cpp). Host code, torch headers.
#pragma once

#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <string>
#include <string_view>

#include "activations.h"

namespace fastattn {

inline Activation activation_arg(c10::string_view name) {
  const std::string_view view(name.data(), name.size());
  Activation act = Activation::kGelu;
  TORCH_CHECK_VALUE(parse_activation(view, &act), "fastattn ffn: activation must be one of ", activation_choices(),
                    ", got '", std::string(view), "'");
  return act;
}

}  // namespace fastattn
