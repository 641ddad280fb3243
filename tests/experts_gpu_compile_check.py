"""Compiles every expert Triton kernel for sm_90 down to a cubin (Triton's bundled ptxas) without a GPU.

Run as a script with TRITON_INTERPRET unset (tests/test_experts_triton.py does it in a subprocess): it catches
what the interpreter cannot, e.g. type errors in tl.dot, reshapes, loop bounds, constexpr branches.
"""
import inspect
import sys
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from mbrec_fast.kernels import gated_experts as kg, routed_experts as kr

TARGET = GPUTarget("cuda", 90, 32)

def compile_kernel(jf, types, consts):
    names = list(inspect.signature(jf.fn).parameters)
    sig = {}
    for n in names:
        if n in consts:
            sig[n] = "constexpr"
        else:
            sig[n] = types.get(n, "*fp32" if n.endswith("_ptr") else "i32")
    cx = {(names.index(k),): v for k, v in consts.items()}
    src = ASTSource(fn=jf, signature=sig, constexprs=cx)
    triton.compile(src, target=TARGET)
    print("compiled", jf.fn.__name__, {k: v for k, v in consts.items() if not k.startswith("BLOCK")})

F = {"ln_eps": "fp32"}
I64 = {"order_ptr": "*i64", "offsets_ptr": "*i64", "tile_off_ptr": "*i64", "route_ptr": "*i64"}
FULL = "full" in sys.argv[1:]  # every variant below; default: one (the richest) variant per kernel
for ieee, xt in ((False, "*fp16"), (True, "*fp32"))[:2 if FULL else 1]:
    for fused in (True, False)[:2 if FULL else 1]:
        compile_kernel(kg._gated_experts_fwd_kernel, {**F, "x_ptr": xt, "w_ptr": xt, "gw_ptr": xt, "gmask_ptr": "*u8",
                                                      "gbias_ptr": xt},
                       dict(HAS_BIAS=True, HAS_LNW=True, HAS_LNB=True, LN=True, ACT=2, IEEE=ieee, FUSED_GATE=fused,
                            HAS_GBIAS=True, HAS_GMASK=True, BLOCK_T=4, BLOCK_E=8, BLOCK_B=64, BLOCK_H=128, BLOCK_D=32))
for ln in (True, False)[:2 if FULL else 1]:
    compile_kernel(kg._gated_experts_bwd_elem_kernel, {**F, "g_ptr": "*fp16", "go_ptr": "*fp16", "lnw_ptr": "*fp16"},
                   dict(HAS_LNW=ln, HAS_LNB=ln, LN=ln, ACT=3, BLOCK_B=32, BLOCK_H=128))
for shared in (False, True)[:2 if FULL else 1]:
    for ieee, xt in ((False, "*bf16"), (True, "*fp32"))[:2 if FULL else 1]:
        compile_kernel(kg._experts_dx_kernel, {"w_ptr": xt},
                       dict(SHARED=shared, IEEE=ieee, BLOCK_B=64, BLOCK_D=64, BLOCK_K=32))
        compile_kernel(kg._experts_dw_kernel, {"x_ptr": xt},
                       dict(HAS_BIAS=True, IEEE=ieee, BLOCK_D=64, BLOCK_H=64, BLOCK_K=32))
for ln in (True, False)[:2 if FULL else 1]:
    compile_kernel(kr._routed_experts_bwd_elem_kernel, {**F, **I64, "go_ptr": "*fp16", "rw_ptr": "*fp16"},
                   dict(HAS_RW=True, HAS_LNW=ln, HAS_LNB=ln, LN=ln, ACT=2, BLOCK_M=32, BLOCK_H=128))
for ieee, xt in ((False, "*fp16"), (True, "*fp32"))[:2 if FULL else 1]:
    compile_kernel(kr._routed_experts_dx_kernel, {**I64, "w_ptr": xt},
                   dict(IEEE=ieee, BLOCK_M=64, BLOCK_D=64, BLOCK_K=32))
    compile_kernel(kr._routed_experts_dw_kernel, {**I64, "x_ptr": xt},
                   dict(HAS_BIAS=True, IEEE=ieee, BLOCK_D=64, BLOCK_H=64, BLOCK_K=32))
    compile_kernel(kr._routed_experts_fwd_kernel, {**F, **I64, "x_ptr": xt, "w_ptr": xt},
                   dict(HAS_BIAS=True, HAS_RW=True, HAS_LNW=True, HAS_LNB=True, LN=True, ACT=1, IEEE=ieee,
                        BLOCK_M=64, BLOCK_H=128, BLOCK_D=32))
print("ALL OK")
