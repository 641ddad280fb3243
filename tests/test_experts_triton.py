"""Triton forward kernels of the expert ops, under TRITON_INTERPRET=1 on CPU (set by conftest) and on a GPU when
present. Compared with the torch (CPU) implementation of the same op, which tests/test_experts.py checks against
the loop reference. Tolerances: fp32 1e-5, fp16 inputs 1e-2 (fp32 accumulation both sides; fp16 tl.dot operands).
Shapes are tiny because the interpreter is slow; tiles are 16 (the interpreter config).
"""
import pytest
import torch

triton = pytest.importorskip("triton")

import mbrec_fast  # noqa: E402,F401
from mbrec_fast.kernels.gated_experts import gated_experts_fwd_triton  # noqa: E402
from mbrec_fast.kernels.routed_experts import routed_experts_fwd_triton  # noqa: E402
from mbrec_fast.reference.experts import gated_experts_ref, routed_experts_ref  # noqa: E402

OPS = torch.ops.mbrec_fast
TOL = {torch.float32: 1e-5, torch.float16: 1e-2}


def _close(got, want, dtype):
    for a, b in zip(got, want):
        if b.numel() == 0:
            assert a.numel() == 0
            continue
        torch.testing.assert_close(a.float(), b.float(), rtol=TOL[dtype], atol=TOL[dtype])


def _rand(*s, dtype, scale=1.0):
    return (torch.randn(*s) * scale).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,D,H,E,T,mode,ln", [
    (5, 20, 24, 3, 2, "gate_weight", False),   # B smaller than a tile, H not a multiple of 16, D > BLOCK_D
    (17, 16, 16, 2, 1, "gate_weight", True),   # B one past a tile, LayerNorm (BLOCK_H covers H), T = 1
    (6, 8, 9, 4, 3, "gates", False),           # precomputed gates, odd H
    (4, 7, 12, 3, 2, "per_expert_x", True),    # per-expert inputs [E, B, D] with LN
])
def test_gated_triton_matches_op(dtype, B, D, H, E, T, mode, ln):
    x = _rand(E, B, D, dtype=dtype) if mode == "per_expert_x" else _rand(B, D, dtype=dtype)
    w, b = _rand(E, D, H, dtype=dtype, scale=D ** -0.5), _rand(E, H, dtype=dtype)
    lw = _rand(E, H, dtype=dtype) if ln else None
    lb = _rand(E, H, dtype=dtype) if ln else None
    if mode == "gate_weight":
        gates, gw, gb = None, _rand(T, D, E, dtype=dtype), _rand(T, E, dtype=dtype)
        mask = torch.ones(T, E, dtype=torch.bool)
        mask[0, -1] = False
    else:
        gates, gw, gb, mask = torch.softmax(torch.randn(T, B, E), -1).to(dtype), None, None, None
    args = (x, w, b, gates, gw, gb, mask, lw, lb, 1e-5, "gelu")
    got = gated_experts_fwd_triton(*args)
    want = OPS.gated_experts_fwd(*args)
    _close(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("route_kind,k", [
    ("random", 1),           # top-1 hard routing
    ("empty_expert", 1),     # expert 2 gets no samples
    ("all_to_one", 1),       # every sample to expert 1 (a group spanning two tiles)
    ("random", 3),           # k = E: every sample to every expert, weighted
])
def test_routed_triton_matches_op(dtype, route_kind, k):
    B, D, H, E = 19, 10, 20, 3
    x, w, b = _rand(B, D, dtype=dtype), _rand(E, D, H, dtype=dtype, scale=D ** -0.5), _rand(E, H, dtype=dtype)
    if route_kind == "random":
        route = torch.stack([torch.randperm(E)[:k] for _ in range(B)])
    elif route_kind == "empty_expert":
        route = torch.randint(0, 2, (B, 1))
    else:
        route = torch.ones(B, 1, dtype=torch.long)
    rw = torch.rand(B, k).to(dtype) if k > 1 else None
    args = (x, w, b, route, rw, None, None, 1e-5, "relu")
    got = routed_experts_fwd_triton(*args)
    want = OPS.routed_experts_fwd(*args)
    _close(got, want, dtype)


def test_routed_triton_layer_norm_fp32():
    """LayerNorm epilogue of the grouped GEMM (BLOCK_H = next power of two >= H)."""
    B, D, H, E = 7, 9, 13, 2
    x, w, b = torch.randn(B, D), torch.randn(E, D, H) * 0.3, torch.randn(E, H)
    lw, lb = torch.randn(E, H), torch.randn(E, H)
    route = torch.tensor([[0, 1], [1, 0], [1, 0], [0, 1], [0, 1], [1, 0], [0, 1]])
    rw = torch.rand(B, 2)
    got = routed_experts_fwd_triton(x, w, b, route, rw, lw, lb, 1e-5, "silu")
    want = OPS.routed_experts_fwd(x, w, b, route, rw, lw, lb, 1e-5, "silu")
    _close(got, want, torch.float32)


# ------------------------------------------------------------------------------------------------------ GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_ops_forward_backward(dtype):
    """On CUDA the forward runs the Triton kernels; forward and gradients against the reference."""
    dev = "cuda"
    B, D, H, E, T = 300, 64, 48, 5, 3
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}[dtype]
    x = torch.randn(B, D, device=dev).to(dtype).requires_grad_()
    w = (torch.randn(E, D, H, device=dev) * D ** -0.5).to(dtype).requires_grad_()
    b = torch.randn(E, H, device=dev).to(dtype).requires_grad_()
    gw = torch.randn(T, D, E, device=dev).to(dtype).requires_grad_()
    out = mbrec_fast.gated_experts(x, w, b, gate_weight=gw, activation="gelu")
    ref = gated_experts_ref(x.float(), w.float(), b.float(), gate_weight=gw.float(), activation="gelu")
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    g1 = torch.autograd.grad(out.float().sum(), [x, w, b, gw])
    g2 = torch.autograd.grad(ref.sum(), [x, w, b, gw])
    for a, c in zip(g1, g2):
        torch.testing.assert_close(a.float(), c.float(), rtol=tol * 10, atol=tol * 10)
    route = torch.randint(0, E, (B, 2), device=dev)
    rw = torch.rand(B, 2, device=dev).to(dtype)
    out = mbrec_fast.routed_experts(x, w, b, route, rw)
    ref = routed_experts_ref(x.float(), w.float(), b.float(), route, rw.float())
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


@pytest.mark.gpu
def test_gpu_one_kernel_launch_forward_with_precomputed_gates():
    """The fused gated forward with precomputed fp32 gates launches one Triton kernel (plus no GEMM)."""
    from torch.profiler import ProfilerActivity, profile
    dev = "cuda"
    x, w = torch.randn(512, 64, device=dev), torch.randn(4, 64, 32, device=dev)
    gates = torch.softmax(torch.randn(2, 512, 4, device=dev), -1)
    mbrec_fast.gated_experts(x, w, gates=gates)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        mbrec_fast.gated_experts(x, w, gates=gates)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    assert sum("_gated_experts_fwd_kernel" in n for n in names) == 1
    assert not any("gemm" in n.lower() for n in names)
