// Argument checks of the experts op family's fused passes (host side, on common/checks.h).
#pragma once
#include <ATen/ATen.h>

#include "common/checks.h"

namespace mbrec_fast {
namespace experts {

// act [B, E, H] fp32/fp64, gates [T, B, E] of act's dtype, grad_out (if defined) [T, B, H]; all contiguous, on
// act's device.
inline void check_mix_args(const at::Tensor& act, const at::Tensor& gates, const at::Tensor* grad_out) {
  TORCH_CHECK(act.scalar_type() == at::kFloat || act.scalar_type() == at::kDouble,
              "act must be float32 or float64, got ", act.scalar_type());
  const auto dev = act.device();
  check_tensor(act, "act", act.scalar_type(), 3, dev);
  check_tensor(gates, "gates", act.scalar_type(), 3, dev);
  TORCH_CHECK(gates.size(1) == act.size(0) && gates.size(2) == act.size(1), "gates must be [T, B, E] = [T, ",
              act.size(0), ", ", act.size(1), "], got ", gates.sizes());
  if (grad_out != nullptr) {
    check_tensor(*grad_out, "grad_out", act.scalar_type(), 3, dev);
    TORCH_CHECK(grad_out->size(0) == gates.size(0) && grad_out->size(1) == act.size(0) &&
                    grad_out->size(2) == act.size(2),
                "grad_out must be [T, B, H] = [", gates.size(0), ", ", act.size(0), ", ", act.size(2), "], got ",
                grad_out->sizes());
  }
}

}  // namespace experts
}  // namespace mbrec_fast
