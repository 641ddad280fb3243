// Schemas of the experts op family's fused C++ passes (kernels: experts_cpu.cpp; fakes: mbrec_fast/_experts_ops.py).
// The expert layers themselves (gated_experts_* / routed_experts_*) are Python custom ops (mbrec_fast/_experts_ops.py);
// their CPU kernels call these passes around the big GEMMs, so that each direction makes one pass over [B, E, H].
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(mbrec_fast, m) {
  // Forward of the gate mixture on the expert GEMM output act [B, E, H] (bias already added by the GEMM):
  // applies relu in place when `relu` (act then holds the activation) and returns out [T, B, H] with
  // out[t, b] = sum_e gates[t, b, e] * act[b, e]. gates [T, B, E], same dtype as act (fp32 or fp64).
  m.def("gated_mix_fwd(Tensor(a!) act, Tensor gates, bool relu) -> Tensor");
  // Backward of gated_mix_fwd from grad_out [T, B, H] and the saved activation act [B, E, H]: returns
  // (grad of the pre-activation [B, E, H] (relu's backward applied when `relu`), grad of gates [T, B, E],
  // bias gradient [E, H] = the pre-activation gradient summed over B, or an empty tensor unless `with_bias`).
  m.def("gated_mix_bwd(Tensor grad_out, Tensor act, Tensor gates, bool relu, bool with_bias) "
        "-> (Tensor, Tensor, Tensor)");
}
