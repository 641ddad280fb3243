"""Triton forward and backward kernels of the expert ops, under TRITON_INTERPRET=1 on CPU (set by conftest) and on a
GPU when present. Compared with the torch (CPU) implementation of the same op, which tests/test_experts.py checks against
the loop reference. Tolerances: fp32 1e-5, fp16 inputs 1e-2 (fp32 accumulation both sides; fp16 tl.dot operands).
Shapes are tiny because the interpreter is slow; tiles are 16 (the interpreter config).
"""
import pytest
import torch

triton = pytest.importorskip("triton")

import mbrec_fast  # noqa: E402,F401
from mbrec_fast.kernels.gated_experts import gated_experts_bwd_triton, gated_experts_fwd_triton  # noqa: E402
from mbrec_fast.kernels.routed_experts import routed_experts_bwd_triton, routed_experts_fwd_triton  # noqa: E402
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


@pytest.mark.parametrize("E,T,bias,masked", [
    (5, 3, False, False),   # fused gate: BLOCK_E = 8 > E, BLOCK_T = 4 > T, no gate bias, no mask
    (1, 1, True, False),    # a single expert (probability 1), BLOCK_T padded to 16 so the gate dot has N = 16
    (4, 2, True, True),     # mask leaving one expert for task 1 (probability exactly 1 there)
])
def test_gated_triton_fused_gate_softmax(E, T, bias, masked):
    """The in-kernel gate (x @ Wg_t + bg_t, masked softmax): output and the saved probabilities equal the op's."""
    B, D, H = 11, 18, 10
    x, w = torch.randn(B, D), torch.randn(E, D, H) * D ** -0.5
    gw, gb = torch.randn(T, D, E), (torch.randn(T, E) if bias else None)
    mask = None
    if masked:
        mask = torch.ones(T, E, dtype=torch.bool)
        mask[1, 1:] = False
    args = (x, w, None, None, gw, gb, mask, None, None, 1e-5, "relu")
    got, want = gated_experts_fwd_triton(*args), OPS.gated_experts_fwd(*args)
    _close(got, want, torch.float32)
    if masked:
        assert bool((got[2][1, :, 1:] == 0).all()) and torch.equal(got[2][1, :, 0], torch.ones(B))


def _ln_params(ln, E, H, dtype):
    lw = _rand(E, H, dtype=dtype) if ln in ("both", "weight") else None
    lb = _rand(E, H, dtype=dtype) if ln in ("both", "bias") else None
    return lw, lb


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,D,H,E,T,mode,ln,act", [
    (5, 20, 24, 3, 2, "gate_weight", None, "gelu"),     # B < tile, H not a multiple of 16, masked gates + softmax Jacobian
    (17, 16, 16, 2, 1, "gate_weight", "both", "silu"),  # B one past a tile (two row blocks), LayerNorm, T = 1
    (6, 8, 9, 4, 3, "gates", None, "relu"),             # precomputed gates (d gates returned), odd H
    (4, 7, 12, 3, 2, "per_expert_x", "both", "none"),   # per-expert inputs [E, B, D] (dX per expert), LN, identity
    (9, 12, 20, 2, 2, "gates", "weight", "gelu"),       # LayerNorm weight only
    (3, 5, 7, 3, 2, "gates", "bias", "silu"),           # LayerNorm bias only, every dim < 16
])
def test_gated_triton_backward_matches_op(dtype, B, D, H, E, T, mode, ln, act):
    """The three backward launches (fused elementwise, dX, dW/db) + torch softmax Jacobian against the CPU op."""
    x = _rand(E, B, D, dtype=dtype) if mode == "per_expert_x" else _rand(B, D, dtype=dtype)
    w, b = _rand(E, D, H, dtype=dtype, scale=D ** -0.5), _rand(E, H, dtype=dtype)
    lw, lb = _ln_params(ln, E, H, dtype)
    if mode == "gate_weight":
        gates, gw, gb = None, _rand(T, D, E, dtype=dtype), _rand(T, E, dtype=dtype)
        mask = torch.ones(T, E, dtype=torch.bool)
        mask[0, -1] = False
    else:
        gates, gw, gb, mask = torch.softmax(torch.randn(T, B, E), -1).to(dtype), None, None, None
    args = (x, w, b, gates, gw, gb, mask, lw, lb, 1e-5, act)
    _, pre, probs = OPS.gated_experts_fwd(*args)
    grad_out = _rand(T, B, H, dtype=dtype)
    got = gated_experts_bwd_triton(grad_out, *args, pre, probs)
    want = OPS.gated_experts_bwd(grad_out, *args, pre, probs)
    assert [(g.shape, g.dtype) for g in got] == [(g.shape, g.dtype) for g in want]
    _close(got, want, dtype)
    _assert_no_aliasing(got, (grad_out, *args, pre, probs))


def _assert_no_aliasing(outputs, inputs):
    """A custom op's outputs may not be one another or an input (torch checks it on CUDA: the first GPU run found
    the backward launchers returning one empty tensor for every absent gradient)."""
    assert len({id(t) for t in outputs}) == len(outputs)
    given = {id(t) for t in inputs if isinstance(t, torch.Tensor)}
    assert not any(id(t) in given for t in outputs)
    storages = [t.untyped_storage().data_ptr() for t in outputs if t.numel()]
    assert len(set(storages)) == len(storages)


def test_gated_triton_backward_no_bias_fp64_fallback():
    """No expert bias (empty db); fp64 inputs take the exact torch path of the op."""
    B, D, H, E, T = 6, 9, 11, 3, 2
    for dtype in (torch.float32, torch.float64):
        x, w = torch.randn(B, D, dtype=dtype), torch.randn(E, D, H, dtype=dtype)
        gates = torch.softmax(torch.randn(T, B, E, dtype=dtype), -1)
        args = (x, w, None, gates, None, None, None, None, None, 1e-5, "relu")
        _, pre, probs = OPS.gated_experts_fwd(*args)
        grad_out = torch.randn(T, B, H, dtype=dtype)
        got = gated_experts_bwd_triton(grad_out, *args, pre, probs)
        want = OPS.gated_experts_bwd(grad_out, *args, pre, probs)
        assert got[2].numel() == 0
        _close(got, want, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("route_kind,k,ln,act", [
    ("random", 1, None, "relu"),          # top-1 hard routing, no route weight
    ("empty_expert", 1, "both", "gelu"),  # expert 2 gets no sample: its dW/db/dLN are exactly zero
    ("all_to_one", 1, None, "silu"),      # every sample to expert 1 (a group spanning two row tiles)
    ("random", 3, "both", "none"),        # k = E: every sample to every expert, weighted (dX accumulates k rows)
    ("random", 2, "weight", "gelu"),      # top-2 with weights, LayerNorm weight only
])
def test_routed_triton_backward_matches_op(dtype, route_kind, k, ln, act):
    """The three routed backward launches (fused elementwise, grouped dX, grouped dW/db) against the CPU op."""
    B, D, H, E = 19, 10, 20, 3
    x, w, b = _rand(B, D, dtype=dtype), _rand(E, D, H, dtype=dtype, scale=D ** -0.5), _rand(E, H, dtype=dtype)
    if route_kind == "random":
        route = torch.stack([torch.randperm(E)[:k] for _ in range(B)])
    elif route_kind == "empty_expert":
        route = torch.randint(0, 2, (B, 1))
    else:
        route = torch.ones(B, 1, dtype=torch.long)
    rw = torch.rand(B, k).to(dtype) if k > 1 else None
    lw, lb = _ln_params(ln, E, H, dtype)
    args = (x, w, b, route, rw, lw, lb, 1e-5, act)
    _, pre, order, offsets, xs = OPS.routed_experts_fwd(*args)
    grad_out = _rand(B, H, dtype=dtype)
    got = routed_experts_bwd_triton(grad_out, *args, pre, order, offsets, xs)
    want = OPS.routed_experts_bwd(grad_out, *args, pre, order, offsets, xs)
    assert [(g.shape, g.dtype) for g in got] == [(g.shape, g.dtype) for g in want]
    _close(got, want, dtype)
    _assert_no_aliasing(got, (grad_out, *args, pre, order, offsets, xs))
    if route_kind == "empty_expert":
        assert not got[1][2].any() and not got[2][2].any() and not got[4][2].any()


def test_triton_kernels_registered_for_cuda():
    """Forward and backward ops of both families dispatch to the Triton launchers on CUDA."""
    from mbrec_fast import _experts_ops
    assert _experts_ops.TRITON_REGISTERED
    for name in ("gated_experts_fwd", "gated_experts_bwd", "routed_experts_fwd", "routed_experts_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mbrec_fast::{name}", "CUDA"), name


def test_cuda_kernel_fp64_dispatch():
    """The registered CUDA kernel runs the torch implementation for fp64 (bit-equal to the op) and Triton otherwise."""
    from mbrec_fast import _experts_ops as ops
    kernel = ops._fp64_falls_back(gated_experts_fwd_triton, ops.gated_experts_fwd_torch)
    B, D, H, E, T = 5, 6, 7, 2, 2
    for dtype in (torch.float64, torch.float32):
        x, w = torch.randn(B, D, dtype=dtype), torch.randn(E, D, H, dtype=dtype)
        gw = torch.randn(T, D, E, dtype=dtype)
        args = (x, w, None, None, gw, None, None, None, None, 1e-5, "silu")
        got, want = kernel(*args), OPS.gated_experts_fwd(*args)
        if dtype == torch.float64:
            for a, b in zip(got, want):
                assert torch.equal(a, b)
        else:
            _close(got, want, dtype)


def test_triton_kernels_compile_for_sm90():
    """Every forward/backward kernel compiles to a cubin for an H100 target without a GPU (one rich variant per
    kernel; `python tests/experts_gpu_compile_check.py full` compiles all 22 variants). Triton's on-disk cache only
    holds successful compilations, so a cache hit on a rerun is still a pass of the same source."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "experts_gpu_compile_check.py")
    res = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "ALL OK" in res.stdout, res.stdout[-2000:] + res.stderr[-4000:]


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


@pytest.mark.gpu
def test_gpu_one_kernel_launch_forward_with_gate_weight():
    """With gate_weight= the gate GEMM + masked softmax run inside the fused forward: one kernel per layer."""
    from torch.profiler import ProfilerActivity, profile
    dev = "cuda"
    x, w = torch.randn(512, 64, device=dev), torch.randn(4, 64, 32, device=dev)
    gw, gb = torch.randn(2, 64, 4, device=dev), torch.randn(2, 4, device=dev)
    mbrec_fast.gated_experts(x, w, gate_weight=gw, gate_bias=gb)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        mbrec_fast.gated_experts(x, w, gate_weight=gw, gate_bias=gb)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    assert sum("_gated_experts_fwd_kernel" in n for n in names) == 1
    assert not any("gemm" in n.lower() or "softmax" in n.lower() for n in names)


@pytest.mark.gpu
def test_gpu_backward_runs_triton_kernels():
    """On CUDA the backward ops launch the Triton backward kernels (elementwise, dX, dW) instead of torch GEMMs."""
    from torch.profiler import ProfilerActivity, profile
    dev = "cuda"
    x = torch.randn(512, 64, device=dev, requires_grad=True)
    w = torch.randn(4, 64, 32, device=dev, requires_grad=True)
    gates = torch.softmax(torch.randn(2, 512, 4, device=dev), -1).requires_grad_()
    route = torch.randint(0, 4, (512,), device=dev)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        mbrec_fast.gated_experts(x, w, gates=gates).sum().backward()
        mbrec_fast.routed_experts(x, w, None, route).sum().backward()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    for kernel in ("_gated_experts_bwd_elem_kernel", "_experts_dx_kernel", "_experts_dw_kernel",
                   "_routed_experts_bwd_elem_kernel", "_routed_experts_dx_kernel", "_routed_experts_dw_kernel"):
        assert any(n.startswith(kernel) for n in names), kernel
