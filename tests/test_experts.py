"""Gated / routed expert ops and the mbrec_fast.nn expert modules against the loop-of-experts reference.

Tolerances (fused op vs reference): fp32 rtol=atol=1e-5 (fp32 compute both sides, different summation order);
fp16 2e-2 and bf16 5e-2 (the op computes in fp32 from the half inputs; the reference runs in fp32 on the same
half-rounded values, so only the final rounding differs); fp64 gradcheck with default tolerances.
"""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import mbrec_fast as mf
from mbrec_fast.nn import CGC, PLE, DomainTaskExperts, GatedExperts, RoutedExperts, from_loop
from mbrec_fast.reference.experts import LoopGatedExperts, gated_experts_ref, routed_experts_ref
from mbrec_fast._experts_torch import sort_routes

TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def _params(B, D, H, E, T, dtype, ln=False, per_expert=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(dtype).requires_grad_()
    p = dict(x=r(E, B, D) if per_expert else r(B, D), weight=r(E, D, H, scale=D ** -0.5), bias=r(E, H),
             gate_weight=r(T, D, E), gate_bias=r(T, E))
    if ln:
        p.update(ln_weight=r(E, H), ln_bias=r(E, H))
    return p


def _grads(out, inputs, seed=1):
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    return torch.autograd.grad(out, inputs, gout, allow_unused=True)


def _assert_close(a, b, dtype, what):
    tol = TOL[dtype]
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def _ref_inputs(p):
    """fp32 leaf copies of the (possibly half) inputs for the reference."""
    return {k: v.detach().float().requires_grad_() for k, v in p.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ["none", "relu", "gelu", "silu"])
@pytest.mark.parametrize("mode", [
    "gate_weight",        # gates computed in the op (MMoE)
    "gate_weight_mask",   # masked softmax over a per-task subset (PLE/CGC)
    "gates",              # precomputed gates with gradient (M3oE alpha/beta mixes)
    "per_expert_x",       # per-expert input [E, B, D] (last layer of multi-layer experts)
])
@pytest.mark.parametrize("ln", [False, True])  # with and without per-expert LayerNorm
def test_gated_matches_reference(dtype, activation, mode, ln):
    B, D, H, E, T = 11, 9, 7, 5, 3
    p = _params(B, D, H, E, T, dtype, ln=ln, per_expert=mode == "per_expert_x")
    kw = {k: p[k] for k in ("ln_weight", "ln_bias") if k in p}
    if mode in ("gates", "per_expert_x"):
        p.pop("gate_weight"), p.pop("gate_bias")
        p["gates"] = torch.softmax(torch.randn(T, B, E), -1).to(dtype).requires_grad_()
        kw["gates"] = p["gates"]
    else:
        kw.update(gate_weight=p["gate_weight"], gate_bias=p["gate_bias"])
        if mode == "gate_weight_mask":
            mask = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 1, 1, 0], [0, 0, 0, 0, 1]], dtype=torch.bool)
            kw["gate_mask"] = mask
    out = mf.gated_experts(p["x"], p["weight"], p["bias"], activation=activation, **kw)
    assert out.shape == (T, B, H) and out.dtype == dtype
    q = _ref_inputs(p)
    rkw = {k: (q[k] if k in q else v) for k, v in kw.items()}
    ref = gated_experts_ref(q["x"], q["weight"], q["bias"], activation=activation, **rkw)
    _assert_close(out, ref, dtype, "forward")
    names = list(p)
    got = _grads(out, [p[n] for n in names])
    want = _grads(ref, [q[n] for n in names])
    for n, a, b in zip(names, got, want):
        assert a is not None and a.dtype == p[n].dtype, n
        _assert_close(a, b, dtype, f"grad {n}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k,weighted", [
    (1, False),  # top-1 hard routing (STAR towers / MEMBER heads)
    (1, True),   # top-1 with a weight per sample
    (2, True),   # top-k with weights
    (4, True),   # k = E: every sample through every expert
])
@pytest.mark.parametrize("ln", [False, True])
def test_routed_matches_reference(dtype, k, weighted, ln):
    B, D, H, E = 13, 6, 10, 4
    p = _params(B, D, H, E, 1, dtype, ln=ln)
    p.pop("gate_weight"), p.pop("gate_bias")
    route = torch.stack([torch.randperm(E)[:k] for _ in range(B)])
    if weighted:
        p["route_weight"] = torch.rand(B, k).to(dtype).requires_grad_()
    kw = {n: p[n] for n in ("ln_weight", "ln_bias") if n in p}
    out = mf.routed_experts(p["x"], p["weight"], p["bias"], route, p.get("route_weight"), activation="gelu", **kw)
    q = _ref_inputs(p)
    ref = routed_experts_ref(q["x"], q["weight"], q["bias"], route, q.get("route_weight"), activation="gelu",
                             **{n: q[n] for n in kw})
    _assert_close(out, ref, dtype, "forward")
    names = list(p)
    for n, a, b in zip(names, _grads(out, [p[n] for n in names]), _grads(ref, [q[n] for n in names])):
        _assert_close(a, b, dtype, f"grad {n}")


@pytest.mark.parametrize("route_kind", [
    "one_expert_empty",   # an expert with no routed samples (its weight grad must be exactly 0)
    "all_to_one",         # every sample to the same expert
    "batch_of_one",       # B = 1
])
def test_routed_edge_routes(route_kind):
    B, D, H, E = 9, 5, 6, 3
    p = _params(B, D, H, E, 1, torch.float32)
    route = {"one_expert_empty": torch.randint(0, 2, (B,)), "all_to_one": torch.full((B,), 2),
             "batch_of_one": torch.tensor([1])}[route_kind]
    x = p["x"][: route.shape[0]].detach().requires_grad_()
    out = mf.routed_experts(x, p["weight"], p["bias"], route)
    ref = routed_experts_ref(x, p["weight"], p["bias"], route)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    got = _grads(out, [x, p["weight"], p["bias"]])
    want = _grads(ref, [x, p["weight"], p["bias"]])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    unused = sorted(set(range(E)) - set(route.tolist()))
    for e in unused:
        assert torch.count_nonzero(got[1][e]) == 0 and torch.count_nonzero(got[2][e]) == 0


def _f64(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def test_gradcheck_gated_gate_weight_ln_mask():
    B, D, H, E, T = 4, 3, 5, 3, 2
    mask = torch.tensor([[True, True, False], [False, True, True]])
    args = (_f64(B, D), _f64(E, D, H), _f64(E, H), _f64(T, D, E), _f64(T, E), _f64(E, H), _f64(E, H))
    fn = lambda x, w, b, gw, gb, lw, lb: mf.gated_experts(  # noqa: E731
        x, w, b, gate_weight=gw, gate_bias=gb, gate_mask=mask, ln_weight=lw, ln_bias=lb, activation="gelu")
    assert torch.autograd.gradcheck(fn, args)


def test_gradcheck_gated_precomputed_gates_per_expert_x():
    B, D, H, E, T = 4, 3, 5, 3, 2
    args = (_f64(E, B, D), _f64(E, D, H), _f64(E, H), _f64(T, B, E), _f64(E, H))
    fn = lambda x, w, b, g, lw: mf.gated_experts(x, w, b, gates=g, ln_weight=lw, activation="silu")  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("k", [1, 2])  # top-1 and top-k
def test_gradcheck_routed(k):
    B, D, H, E = 5, 3, 4, 3
    route = torch.stack([torch.randperm(E)[:k] for _ in range(B)])
    args = (_f64(B, D), _f64(E, D, H), _f64(E, H), _f64(B, k), _f64(E, H), _f64(E, H))
    fn = lambda x, w, b, rw, lw, lb: mf.routed_experts(  # noqa: E731
        x, w, b, route, rw, ln_weight=lw, ln_bias=lb, activation="silu")
    assert torch.autograd.gradcheck(fn, args)


# ---- the C++ gate-mixture passes (csrc/experts: gated_mix_fwd / gated_mix_bwd; shared X, relu/none, no LayerNorm)
def _mix_torch(act, gates, relu):
    """Torch form of gated_mix_fwd: relu on act [B, E, H], mixture into [T, B, H] with gates [T, B, E]."""
    a = act.relu() if relu else act
    return torch.einsum("tbe,beh->tbh", gates, a), a


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("B,E,H,T,gate_kind", [
    (70, 3, 37, 2, "rand"),     # B not a multiple of the 32-row block, H not a multiple of the 8 lanes
    (33, 1, 8, 1, "rand"),      # E = 1, T = 1
    (64, 8, 128, 2, "zeros"),   # all-zero gates: zero output and zero grad of the activation
    (1, 4, 5, 3, "onehot"),     # one row, one-hot gates
    (0, 4, 5, 2, "rand"),       # no rows
])
def test_gated_mix_ops_match_torch(dtype, relu, B, E, H, T, gate_kind):
    g = torch.Generator().manual_seed(B + E + H + T)
    pre = torch.randn(B, E, H, generator=g, dtype=dtype)
    gates = {"rand": torch.rand(T, B, E, generator=g, dtype=dtype), "zeros": torch.zeros(T, B, E, dtype=dtype),
             "onehot": torch.nn.functional.one_hot(torch.arange(T * B) % E, E).to(dtype).view(T, B, E)}[gate_kind]
    want, a_want = _mix_torch(pre, gates, relu)
    act = pre.clone()
    out = torch.ops.mbrec_fast.gated_mix_fwd(act, gates, relu)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(out, want, **tol)
    torch.testing.assert_close(act, a_want, rtol=0, atol=0)  # relu applied in place, exactly
    go = torch.randn(T, B, H, generator=g, dtype=dtype)
    a_req, g_req = pre.clone().requires_grad_(), gates.clone().requires_grad_()
    o, _ = _mix_torch(a_req, g_req, relu)
    d_pre_want, d_g_want = torch.autograd.grad(o, (a_req, g_req), go)
    d_pre, d_g, d_b = torch.ops.mbrec_fast.gated_mix_bwd(go, act, gates, relu, True)
    torch.testing.assert_close(d_pre, d_pre_want, **tol)
    torch.testing.assert_close(d_g, d_g_want, **tol)
    torch.testing.assert_close(d_b, d_pre_want.sum(0), **tol)
    assert torch.ops.mbrec_fast.gated_mix_bwd(go, act, gates, relu, False)[2].numel() == 0
    if gate_kind == "zeros":
        assert not out.any() and not d_pre.any()


def _on_1_and_2_threads(fn):
    """fn() run with 1 then 2 intra-op threads (the setting restored after)."""
    before = torch.get_num_threads()
    try:
        res = []
        for n in (1, 2):
            torch.set_num_threads(n)
            res.append(fn())
    finally:
        torch.set_num_threads(before)
    return res


def test_gated_mix_bwd_same_on_any_thread_count():
    """The bias gradient's per-block partial sums are added in block order: bit-identical for 1 and 2 threads."""
    g = torch.Generator().manual_seed(0)
    act, gates, go = torch.randn(1000, 4, 16, generator=g).relu(), torch.rand(2, 1000, 4, generator=g), \
        torch.randn(2, 1000, 16, generator=g)
    res = _on_1_and_2_threads(lambda: torch.ops.mbrec_fast.gated_mix_bwd(go, act, gates, True, True))
    for a, b in zip(*res):
        assert torch.equal(a, b)


def test_opcheck_gated_mix_ops():
    B, E, H, T = 37, 3, 10, 2
    act, gates = torch.randn(B, E, H), torch.rand(T, B, E)
    torch.library.opcheck(torch.ops.mbrec_fast.gated_mix_fwd, (act.clone(), gates, True))
    torch.library.opcheck(torch.ops.mbrec_fast.gated_mix_fwd, (act.clone(), gates, False))
    for with_bias in (True, False):
        torch.library.opcheck(torch.ops.mbrec_fast.gated_mix_bwd, (torch.randn(T, B, H), act.relu(), gates, True,
                                                                     with_bias))


def test_gated_mix_bad_input():
    act, gates = torch.randn(4, 3, 5), torch.rand(2, 4, 3)
    with pytest.raises(RuntimeError, match="gates must be"):
        torch.ops.mbrec_fast.gated_mix_fwd(act, torch.rand(2, 5, 3), True)
    with pytest.raises(RuntimeError, match="gates must have dtype"):
        torch.ops.mbrec_fast.gated_mix_fwd(act, gates.double(), True)
    with pytest.raises(RuntimeError, match="grad_out must be"):
        torch.ops.mbrec_fast.gated_mix_bwd(torch.randn(2, 4, 6), act, gates, True, True)


@pytest.mark.parametrize("activation", ["relu", "none"])
@pytest.mark.parametrize("gate_mode", ["gates", "gate_weight"])
def test_gradcheck_gated_fused_mix_path(activation, gate_mode):
    """fp64 gradcheck of the public op on the path that runs the C++ mixture passes (shared X, no LayerNorm),
    with B = 37 (not a multiple of the 32-row block)."""
    B, D, H, E, T = 37, 3, 4, 3, 2
    if gate_mode == "gates":
        args = (_f64(B, D), _f64(E, D, H), _f64(E, H), _f64(T, B, E))
        fn = lambda x, w, b, g: mf.gated_experts(x, w, b, gates=g, activation=activation)  # noqa: E731
    else:
        args = (_f64(B, D), _f64(E, D, H), _f64(E, H), _f64(T, D, E), _f64(T, E))
        fn = lambda x, w, b, gw, gb: mf.gated_experts(  # noqa: E731
            x, w, b, gate_weight=gw, gate_bias=gb, activation=activation)
    assert torch.autograd.gradcheck(fn, args)


# ---- the C++ LayerNorm-experts passes (csrc/experts: gated_ln_mix_fwd / gated_ln_mix_bwd)
def _ln_mix_torch(pre, gates, lnw, lnb, eps, activation, expert_major):
    """Torch form of gated_ln_mix_fwd: per-expert LayerNorm + affine + activation on pre, mixture by gates."""
    from mbrec_fast._experts_torch import activate
    p = pre.transpose(0, 1) if expert_major else pre  # [B, E, H]
    y = torch.nn.functional.layer_norm(p, p.shape[-1:], eps=eps)
    if lnw is not None:
        y = y * lnw
    if lnb is not None:
        y = y + lnb
    return torch.einsum("tbe,beh->tbh", gates, activate(y, activation))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("activation", ["none", "relu", "gelu", "silu"])
@pytest.mark.parametrize("expert_major", [False, True])
@pytest.mark.parametrize("B,E,H,T,affine", [
    (70, 3, 37, 2, "both"),     # B not a multiple of the 32-row block, H not a multiple of the 8 lanes
    (33, 1, 8, 1, "weight"),    # E = 1, T = 1, no ln_bias
    (40, 4, 16, 3, "bias"),     # no ln_weight
    (0, 4, 5, 2, "both"),       # no rows
])
def test_gated_ln_mix_ops_match_torch(dtype, activation, expert_major, B, E, H, T, affine):
    g = torch.Generator().manual_seed(B + E + H + T)
    pre = torch.randn(*((E, B, H) if expert_major else (B, E, H)), generator=g, dtype=dtype) * 3 + 1
    gates = torch.rand(T, B, E, generator=g, dtype=dtype)
    lnw = torch.randn(E, H, generator=g, dtype=dtype) if affine in ("both", "weight") else None
    lnb = torch.randn(E, H, generator=g, dtype=dtype) if affine in ("both", "bias") else None
    eps = 1e-5
    before = pre.clone()
    out = torch.ops.mbrec_fast.gated_ln_mix_fwd(pre, gates, lnw, lnb, eps, activation, expert_major)
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(out, _ln_mix_torch(pre, gates, lnw, lnb, eps, activation, expert_major), **tol)
    assert torch.equal(pre, before)  # pre is the saved tensor: untouched
    go = torch.randn(T, B, H, generator=g, dtype=dtype)
    req = [t.clone().requires_grad_() if t is not None else None for t in (pre, gates, lnw, lnb)]
    o = _ln_mix_torch(req[0], req[1], req[2], req[3], eps, activation, expert_major)
    live = [t for t in req if t is not None]
    want = dict(zip([i for i, t in enumerate(req) if t is not None], torch.autograd.grad(o, live, go)))
    d_pre, d_g, d_b, d_lnw, d_lnb = torch.ops.mbrec_fast.gated_ln_mix_bwd(go, pre, gates, lnw, lnb, eps, activation,
                                                                         expert_major, True)
    torch.testing.assert_close(d_pre, want[0], **tol)
    torch.testing.assert_close(d_g, want[1], **tol)
    torch.testing.assert_close(d_b, want[0].sum(1 if expert_major else 0), **tol)
    if lnw is not None:
        torch.testing.assert_close(d_lnw, want[2], **tol)
    else:
        assert d_lnw.numel() == 0
    if lnb is not None:
        torch.testing.assert_close(d_lnb, want[3], **tol)
    else:
        assert d_lnb.numel() == 0
    assert torch.ops.mbrec_fast.gated_ln_mix_bwd(go, pre, gates, lnw, lnb, eps, activation, expert_major,
                                                 False)[2].numel() == 0


def test_gated_ln_mix_bwd_same_on_any_thread_count():
    """The bias and affine gradients' per-block partial sums are added in block order: bit-identical for 1 and 2
    threads."""
    g = torch.Generator().manual_seed(0)
    pre, gates, go = torch.randn(1000, 4, 16, generator=g), torch.rand(2, 1000, 4, generator=g), \
        torch.randn(2, 1000, 16, generator=g)
    lnw, lnb = torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g)
    res = _on_1_and_2_threads(lambda: torch.ops.mbrec_fast.gated_ln_mix_bwd(go, pre, gates, lnw, lnb, 1e-5, "gelu",
                                                                            False, True))
    for a, b in zip(*res):
        assert torch.equal(a, b)


def test_opcheck_gated_ln_mix_ops():
    B, E, H, T = 37, 3, 10, 2
    gates, lnw, lnb = torch.rand(T, B, E), torch.randn(E, H), torch.randn(E, H)
    for expert_major in (False, True):
        pre = torch.randn(*((E, B, H) if expert_major else (B, E, H)))
        torch.library.opcheck(torch.ops.mbrec_fast.gated_ln_mix_fwd, (pre, gates, lnw, None, 1e-5, "relu",
                                                                       expert_major))
        for with_bias in (True, False):
            torch.library.opcheck(torch.ops.mbrec_fast.gated_ln_mix_bwd,
                                  (torch.randn(T, B, H), pre, gates, lnw, lnb, 1e-5, "silu", expert_major, with_bias))


def test_gated_ln_mix_bad_input():
    pre, gates, lnw = torch.randn(4, 3, 5), torch.rand(2, 4, 3), torch.randn(3, 5)
    with pytest.raises(RuntimeError, match="activation must be one of"):
        torch.ops.mbrec_fast.gated_ln_mix_fwd(pre, gates, lnw, None, 1e-5, "tanh", False)
    with pytest.raises(RuntimeError, match="ln_weight must be"):
        torch.ops.mbrec_fast.gated_ln_mix_fwd(pre, gates, torch.randn(3, 6), None, 1e-5, "relu", False)
    with pytest.raises(RuntimeError, match="ln_bias must have dtype"):
        torch.ops.mbrec_fast.gated_ln_mix_fwd(pre, gates, None, lnw.double(), 1e-5, "relu", False)
    with pytest.raises(RuntimeError, match="gates must be"):
        torch.ops.mbrec_fast.gated_ln_mix_fwd(pre, gates, lnw, None, 1e-5, "relu", True)  # [E, B, H] reading: B = 3
    with pytest.raises(RuntimeError, match="grad_out must be"):
        torch.ops.mbrec_fast.gated_ln_mix_bwd(torch.randn(2, 4, 6), pre, gates, lnw, None, 1e-5, "relu", False, True)


@pytest.mark.parametrize("per_expert", [False, True])
def test_gated_ln_path_matches_plain_torch_path(per_expert):
    """The C++ LayerNorm passes against the plain torch form of the same op (the FUSED_LN switch), forward and
    every gradient, shared and per-expert X."""
    import mbrec_fast._experts_torch as et
    B, D, H, E, T = 45, 6, 9, 4, 3
    base = _params(B, D, H, E, T, torch.float32, ln=True, per_expert=per_expert, seed=5)
    res = []
    for fused in (True, False):
        et.FUSED_LN = fused
        try:
            p = {k: v.detach().clone().requires_grad_() for k, v in base.items()}
            if per_expert:
                gates = torch.softmax(torch.randn(T, B, E, generator=torch.Generator().manual_seed(1)), -1)
                gates.requires_grad_()
                out = mf.gated_experts(p["x"], p["weight"], p["bias"], gates=gates, ln_weight=p["ln_weight"],
                                       ln_bias=p["ln_bias"], activation="gelu")
                extra = [gates]
            else:
                out = mf.gated_experts(p["x"], p["weight"], p["bias"], gate_weight=p["gate_weight"],
                                       gate_bias=p["gate_bias"], ln_weight=p["ln_weight"], ln_bias=p["ln_bias"],
                                       activation="relu")
                extra = []
            out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
            res.append([out] + [t.grad for t in list(p.values()) + extra if t.grad is not None])
        finally:
            et.FUSED_LN = True
    assert len(res[0]) == len(res[1])
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(B=st.integers(1, 9), E=st.integers(1, 5), k=st.integers(1, 5), seed=st.integers(0, 1000))
def test_routed_equals_gated_with_sparse_gates(B, E, k, seed):
    """Property: routing with weights is the dense mixture whose gates are zero outside the routed experts."""
    k = min(k, E)
    g = torch.Generator().manual_seed(seed)
    x, w, b = torch.randn(B, 4, generator=g), torch.randn(E, 4, 6, generator=g), torch.randn(E, 6, generator=g)
    route = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(B)])
    rw = torch.rand(B, k, generator=g)
    gates = torch.zeros(1, B, E).scatter_(2, route.unsqueeze(0), rw.unsqueeze(0))
    torch.testing.assert_close(mf.routed_experts(x, w, b, route, rw), mf.gated_experts(x, w, b, gates=gates)[0],
                               rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------- bad input
def _ok():
    return torch.randn(4, 3), torch.randn(2, 3, 5), torch.randn(2, 5), torch.randn(1, 3, 2)


@pytest.mark.parametrize("change,exc,match", [
    (lambda a: a.update(x=torch.randn(4, 7)), ValueError, "x.shape"),                       # D mismatch
    (lambda a: a.update(weight=torch.randn(0, 3, 5), bias=None, gate_weight=torch.randn(1, 3, 0)),
     ValueError, "0 experts"),                                                                # E = 0
    (lambda a: a.update(gate_weight=torch.randn(0, 3, 2)), ValueError, "T = 0"),            # T = 0
    (lambda a: a.update(bias=torch.randn(3, 5)), ValueError, "bias"),                       # bias shape
    (lambda a: a.update(gate_weight=None), ValueError, "exactly one"),                      # no gate at all
    (lambda a: a.update(gates=torch.full((1, 4, 2), float("nan"))), ValueError, "exactly one"),  # both given
    (lambda a: a.update(gate_weight=None, gates=torch.full((1, 4, 2), float("nan"))), ValueError, "gates"),  # NaN
    (lambda a: a.update(gate_weight=None, gates=torch.ones(1, 5, 2)), ValueError, "gates"),  # gates B mismatch
    (lambda a: a.update(gate_mask=torch.tensor([[False, False]])), ValueError, "gate_mask"),  # empty subset
    (lambda a: a.update(activation="tanh"), ValueError, "activation"),                      # unknown activation
    (lambda a: a.update(weight=torch.randn(2, 3, 5, dtype=torch.float64)), TypeError, "weight"),  # dtype mismatch
    (lambda a: a.update(x=[[1.0]]), TypeError, "x"),                                        # not a tensor
])
def test_gated_bad_input(change, exc, match):
    x, w, b, gw = _ok()
    a = dict(x=x, weight=w, bias=b, gate_weight=gw)
    change(a)
    with pytest.raises(exc, match=match):
        mf.gated_experts(a.pop("x"), a.pop("weight"), a.pop("bias"), **a)


@pytest.mark.parametrize("route,rw,match", [
    (torch.tensor([0, 1, 2, 0]), None, "route ids"),             # id == E
    (torch.tensor([0, -1, 1, 0]), None, "route ids"),            # negative id
    (torch.tensor([0, 1, 1]), None, "route must be"),            # wrong B
    (torch.zeros(4, 3, dtype=torch.long), None, "k = 3"),        # k > E
    (torch.tensor([0, 1, 1, 0]), torch.tensor([1.0, float("inf"), 1.0, 1.0]), "route_weight"),  # non-finite
    (torch.tensor([0, 1, 1, 0]), torch.ones(4, 2), "route_weight"),  # weight shape
])
def test_routed_bad_input(route, rw, match):
    x, w, b, _ = _ok()
    with pytest.raises(ValueError, match=match):
        mf.routed_experts(x, w, b, route, rw)


def test_route_float_rejected():
    x, w, b, _ = _ok()
    with pytest.raises(TypeError, match="route"):
        mf.routed_experts(x, w, b, torch.zeros(4))


# ----------------------------------------------------------------------------------------------- opcheck/compile
def _op_samples():
    B, D, H, E, T = 5, 4, 6, 3, 2
    x, w, b = torch.randn(B, D), torch.randn(E, D, H), torch.randn(E, H)
    gw, gb, lw = torch.randn(T, D, E), torch.randn(T, E), torch.randn(E, H)
    g = torch.rand(T, B, E)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    rg = lambda *ts: [t.clone().requires_grad_() for t in ts]  # noqa: E731
    route = torch.tensor([[0, 2], [1, 0], [2, 1], [0, 1], [2, 0]])
    return [
        (torch.ops.mbrec_fast.gated_experts_fwd, (*rg(x, w, b), None, *rg(gw, gb), mask, *rg(lw), None, 1e-5, "relu")),
        (torch.ops.mbrec_fast.gated_experts_fwd, (*rg(torch.randn(E, B, D), w), None, *rg(g), None, None, None, None,
                                                   None, 1e-5, "gelu")),
        (torch.ops.mbrec_fast.routed_experts_fwd, (*rg(x, w, b), route, *rg(torch.rand(B, 2), lw), None, 1e-5, "silu")),
        (torch.ops.mbrec_fast.routed_experts_fwd, (*rg(x, w), None, route[:, :1], None, None, None, 1e-5, "none")),
    ]


@pytest.mark.parametrize("case", range(4))  # gate weights+mask+LN / per-expert x with gates / routed top-k / top-1
def test_opcheck(case):
    op, args = _op_samples()[case]
    torch.library.opcheck(op, args)


def test_opcheck_backward_ops():
    B, D, H, E, T = 5, 4, 6, 3, 2
    x, w, b, gw = torch.randn(B, D), torch.randn(E, D, H), torch.randn(E, H), torch.randn(T, D, E)
    _, pre, probs = torch.ops.mbrec_fast.gated_experts_fwd(x, w, b, None, gw, None, None, None, None, 1e-5, "relu")
    torch.library.opcheck(torch.ops.mbrec_fast.gated_experts_bwd,
                          (torch.randn(T, B, H), x, w, b, None, gw, None, None, None, None, 1e-5, "relu", pre, probs))
    route = torch.tensor([[0], [2], [2], [0], [0]])
    _, pre, order, offsets, xs = torch.ops.mbrec_fast.routed_experts_fwd(x, w, b, route, None, None, None, 1e-5, "relu")
    torch.library.opcheck(torch.ops.mbrec_fast.routed_experts_bwd,
                          (torch.randn(B, H), x, w, b, route, None, None, None, 1e-5, "relu", pre, order, offsets, xs))


def test_torch_compile_fullgraph_functional_and_modules():
    torch._dynamo.reset()
    B, D = 6, 8
    x = torch.randn(B, D, requires_grad=True)
    mmoe = GatedExperts(D, [7, 5], num_experts=3, num_tasks=2, layer_norm=True)
    m3oe = DomainTaskExperts(D, 5, n_domains=3, n_tasks=2, n_shared_experts=2)
    routed = RoutedExperts(D, 5, num_experts=3)
    dom = torch.tensor([0, 1, 2, 2, 1, 0])

    def f(x):
        a = mmoe(x)
        b = mf.gated_experts(x, mmoe.experts.weight[0], gate_weight=mmoe.gate_weight, activation="silu")
        c = m3oe(x, dom)
        d = routed(x, dom)
        return a.sum() + b.sum() + c.sum() + d.sum()

    eager = f(x)
    (ge,) = torch.autograd.grad(eager, x)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(x)
    (gc,) = torch.autograd.grad(got, x)
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------ modules
@pytest.mark.parametrize("hidden,ln,act", [
    ([8], False, "relu"),      # one-layer experts, the common MMoE
    ([10, 8], True, "gelu"),   # two layers with LayerNorm (hidden layers batched, last fused)
    ([6, 7, 5], False, "silu"),  # three layers
])
def test_from_loop_round_trip(hidden, ln, act):
    loop = LoopGatedExperts(12, hidden, num_experts=4, num_tasks=3, activation=act, layer_norm=ln)
    x = torch.randn(9, 12)
    fused = from_loop(loop.experts, loop.gates)
    assert isinstance(fused, GatedExperts)
    torch.testing.assert_close(fused(x), loop(x), rtol=1e-5, atol=1e-5)
    # gradients w.r.t. the input agree as well
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    (ga,) = torch.autograd.grad(fused(xa).square().sum(), xa)
    (gb,) = torch.autograd.grad(loop(xb).square().sum(), xb)
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5)
    routed = from_loop(loop.experts)
    assert isinstance(routed, RoutedExperts)
    route = torch.randint(0, 4, (9,))
    want = torch.stack([loop.experts[int(e)](x[i]) for i, e in enumerate(route)])
    torch.testing.assert_close(routed(x, route), want, rtol=1e-5, atol=1e-5)


def test_from_loop_rejects_unknown_layers():
    experts = [torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh()) for _ in range(2)]
    with pytest.raises(ValueError, match="Tanh"):
        from_loop(experts, [torch.nn.Linear(3, 2)])


def test_cgc_and_ple_match_loop_reference():
    torch.manual_seed(0)
    D, T, S, P, B = 6, 2, 2, 1, 5
    cgc = CGC(D, [4], S, P, T, output_shared=True)
    x = torch.randn(B, D)
    m = cgc.mix
    ref = gated_experts_ref(x, m.experts.weight[0], m.experts.bias[0], gate_weight=m.gate_weight,
                            gate_bias=m.gate_bias, gate_mask=m.gate_mask)
    torch.testing.assert_close(cgc(x), ref, rtol=1e-5, atol=1e-5)
    # task 0 must not see task 1's specific expert (index S + 1)
    assert not bool(m.gate_mask[0, S + 1]) and bool(m.gate_mask[T].all())
    # second level: per-task inputs; compare with an explicit loop over experts and gates
    level2 = CGC(4, [3], S, P, T)
    h = cgc(x)  # [T + 1, B, 4]
    m2 = level2.mix
    expert_in = [h[T]] * S + [h[t] for t in range(T) for _ in range(P)]
    outs = torch.stack([torch.relu(expert_in[e] @ m2.experts.weight[0][e] + m2.experts.bias[0][e])
                        for e in range(S + P * T)], 1)
    for t in range(T):
        logits = (h[t] @ m2.gate_weight[t] + m2.gate_bias[t]).masked_fill(~m2.gate_mask[t], float("-inf"))
        want = torch.einsum("be,beh->bh", torch.softmax(logits, -1), outs)
        torch.testing.assert_close(level2(h)[t], want, rtol=1e-5, atol=1e-5)
    ple = PLE(D, [5, 4], S, P, T, num_levels=3)
    y = ple(x)
    assert y.shape == (T, B, 4)
    y.sum().backward()
    assert all(p.grad is not None for p in ple.parameters())


def test_domain_task_experts_formula_and_fusion_parameters():
    torch.manual_seed(0)
    D, H, nD, nT, S, B = 6, 5, 3, 2, 2, 7
    mod = DomainTaskExperts(D, H, nD, nT, S, alpha_init=0.3, beta_init=-0.2)
    with torch.no_grad():
        for p in mod.fusion_parameters():
            p.normal_()
    x, dom = torch.randn(B, D), torch.tensor([0, 1, 2, 0, 1, 2, 2])
    out = mod(x, dom)
    ex = mod.experts
    outs = [torch.relu(torch.nn.functional.layer_norm(x @ ex.weight[0][e] + ex.bias[0][e], (H,),
                                                     ex.ln_weight[0][e], ex.ln_bias[0][e])) for e in range(S + nD + nT)]
    sig = torch.sigmoid
    for b in range(B):
        d = int(dom[b])
        dom_out = [outs[S + j][b] for j in range(nD)]
        a_d = sig(mod.alpha_domain[d])
        dmix = a_d * dom_out[d] + (1 - a_d) / (nD - 1) * sum(dom_out[j] for j in range(nD) if j != d)
        for t in range(nT):
            g = torch.softmax(x[b] @ mod.gate_weight[d, t] + mod.gate_bias[d, t], -1)
            shared = sum(g[s] * outs[s][b] for s in range(S))
            task_out = [outs[S + nD + j][b] for j in range(nT)]
            a_t = sig(mod.alpha_task[t])
            tmix = a_t * task_out[t] + (1 - a_t) / (nT - 1) * sum(task_out[j] for j in range(nT) if j != t)
            want = shared + sig(mod.beta_domain[d]) * dmix + sig(mod.beta_task[t]) * tmix
            torch.testing.assert_close(out[t, b], want, rtol=1e-5, atol=1e-5)
    fusion = {id(p) for p in mod.fusion_parameters()}
    main = {id(p) for p in mod.main_parameters()}
    assert len(fusion) == 4 and not (fusion & main) and fusion | main == {id(p) for p in mod.parameters()}
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in mod.fusion_parameters())
    with pytest.raises(ValueError, match="domain_ids"):
        mod(x, torch.full((B,), nD))


def test_routed_module_topk_router_trains_router():
    mod = RoutedExperts(6, [5, 4], num_experts=4, top_k=2, layer_norm=True)
    y = mod(torch.randn(8, 6))
    assert y.shape == (8, 4)
    y.square().sum().backward()
    assert mod.router.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="route is required"):
        RoutedExperts(6, 4, num_experts=2)(torch.randn(3, 6))


# ------------------------------------------------------------------------------------------------ one stack, one switch
def test_expert_bank_switch_and_deprecated_spellings():
    """`expert_impl` switches an ExpertBank between the fused ops and the loop twins of reference/experts.py (same
    numbers); `impl=` / `.impl` / `set_impl` still work with a DeprecationWarning."""
    from mbrec_fast.nn import ExpertBank, RoutedMLP, set_expert_impl
    from mbrec_fast.models.multidomain import ExpertBank as OldPathBank, RoutedMLP as OldPathMLP
    assert OldPathBank is ExpertBank and OldPathMLP is RoutedMLP
    bank = ExpertBank(3, 6, 5)
    x, route = torch.randn(7, 6), torch.tensor([0, 1, 2, 2, 1, 0, 0])
    gw, gb = torch.randn(2, 6, 3), torch.randn(2, 3)
    fused = bank.gated(x, gw, gb), bank.routed(x, route), bank.experts_out(x)
    set_expert_impl(bank, "loop")
    assert bank.expert_impl == "loop"
    loop = bank.gated(x, gw, gb), bank.routed(x, route), bank.experts_out(x)
    for a, b in zip(fused, loop):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.warns(DeprecationWarning, match="expert_impl"):
        old = ExpertBank(2, 4, 3, impl="loop")
    assert old.expert_impl == "loop" and old.impl == "loop"
    with pytest.warns(DeprecationWarning):
        assert RoutedMLP(2, [4, 3, 1], impl="loop").layers[0].expert_impl == "loop"
    with pytest.raises(ValueError, match="expert_impl"):
        ExpertBank(2, 4, 3, expert_impl="einsum")


def test_models_take_expert_impl_and_deprecated_impl():
    from mbrec_fast.data.ctr import make_synthetic_ctr
    from mbrec_fast.models.multidomain import build_model
    from mbrec_fast.models.nmtr import NMTR
    from mbrec_fast.models.syncrec import mix_expert_heads
    from mbrec_fast.training.multidomain import build_parser
    data = make_synthetic_ctr(200, n_users=20, n_items=10, seed=1)
    assert build_model("ple", data, expert_impl="loop").expert_impl == "loop"
    with pytest.warns(DeprecationWarning):
        model = build_model("mmoe", data, impl="loop")
    assert model.expert_impl == "loop" and model.experts.expert_impl == "loop"
    with pytest.warns(DeprecationWarning):
        model.set_impl("fused")
    assert model.experts.expert_impl == "fused"
    for flag in ("--expert-impl", "--impl"):
        assert build_parser().parse_args(["--model", "mmoe", flag, "loop"]).impl == "loop"
    nmtr = NMTR(5, 6, 2, dim=4, expert_impl="loop")
    assert nmtr.fused_experts is False
    with pytest.warns(DeprecationWarning):
        assert NMTR(5, 6, 2, dim=4, fused_experts=True).expert_impl == "fused"
    trunks, gates = torch.randn(2, 3, 4, 5), torch.softmax(torch.randn(2, 3, 4), -1)
    params = torch.randn(4, 5, 5), torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 5)
    fused = mix_expert_heads(trunks, gates, *params, expert_impl="fused")
    with pytest.warns(DeprecationWarning):
        loop = mix_expert_heads(trunks, gates, *params, impl="loop")
    torch.testing.assert_close(fused, loop, rtol=1e-5, atol=1e-5)


def test_ple_model_and_cgc_share_gate_masks():
    from mbrec_fast.data.ctr import make_synthetic_ctr
    from mbrec_fast.models.multidomain import build_model
    from mbrec_fast.nn import cgc_expert_inputs, cgc_gate_mask
    data = make_synthetic_ctr(200, n_users=20, n_items=10, seed=1)
    model = build_model("ple", data, n_shared=2, n_specific=1)
    heads = data.n_domains * data.n_tasks
    assert torch.equal(model.gate_mask, cgc_gate_mask(2, 1, heads, output_shared=True))
    assert torch.equal(model.owner, cgc_expert_inputs(2, 1, heads))
    cgc = CGC(6, 4, 2, 1, heads, output_shared=True)
    assert torch.equal(cgc.mix.gate_mask, model.gate_mask)


def test_no_import_circle_between_ops_and_kernels():
    """The Triton kernels import the leaf `_experts_torch`, never `_experts_ops`; of the package the leaf imports
    only the argument checks (`_checks`, which import nothing but `csr`, which imports nothing of the package)."""
    import ast
    import pathlib
    root = pathlib.Path(mf.__file__).resolve().parent
    kernel_dir = pathlib.Path(mf.kernels.__file__).resolve().parent if hasattr(mf, "kernels") else root.parent / "kernels"

    def imported(path):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names.add(("." * node.level) + (node.module or ""))
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        return names

    for path in kernel_dir.glob("*.py"):
        assert not any("_experts_ops" in n for n in imported(path)), path
    def package_imports(name):
        return {n for n in imported(root / name) if n.startswith(".") or n.startswith("mbrec_fast")}

    assert package_imports("_experts_torch.py") <= {"._checks"}
    assert package_imports("_checks.py") <= {".csr"}
    assert not package_imports("csr.py")


def test_expert_stack_is_built_of_expert_banks_and_loads_old_state_dicts():
    """One stack: `nn.GatedExperts` / `PLE` / `RoutedExperts` layers are the `ExpertBank`s the models use; a state
    dict saved when the stack held its own `weight.{i}` / `bias.{i}` / `ln_*.{i}` lists still loads."""
    from mbrec_fast.nn import ExpertBank, GatedExperts
    torch.manual_seed(0)
    m = GatedExperts(16, [24, 8], 4, 2, layer_norm=True)
    assert all(isinstance(layer, ExpertBank) for layer in m.experts.layers)
    old = {}
    for key, value in m.state_dict().items():
        parts = key.split(".")
        if parts[:2] == ["experts", "layers"]:  # experts.layers.{i}.{name} -> experts.{name}.{i}
            key = f"experts.{parts[3]}.{parts[2]}"
        old[key] = value.clone() + 1.0
    fresh = GatedExperts(16, [24, 8], 4, 2, layer_norm=True)
    fresh.load_state_dict(old)
    for i in range(2):
        assert torch.equal(fresh.experts.weight[i], old[f"experts.weight.{i}"])
        assert torch.equal(fresh.experts.ln_bias[i], old[f"experts.ln_bias.{i}"])
    x = torch.randn(5, 16)
    m.load_state_dict(fresh.state_dict())
    assert torch.equal(m(x), fresh(x))


# ---- the C++ routed passes (csrc/experts: routed_combine / routed_mix_bwd; relu/none, no LayerNorm)
def _route_case(kind, B, E, k, g):
    """A route [B, k] of distinct experts per sample: random, one expert never chosen, or all rows to one expert."""
    if kind == "all_to_one":
        return torch.full((B, 1), E - 1)
    pool = E - 1 if kind == "one_empty" else E
    return torch.stack([torch.randperm(pool, generator=g)[:k] for _ in range(B)])


def _torch_routed_combine(src, order, rw, B):
    k = src.shape[0] // B if B else 0
    a = src if rw is None else src * rw.reshape(-1).index_select(0, order).unsqueeze(1)
    return src.new_zeros(B, src.shape[1]).index_add_(0, torch.div(order, max(k, 1), rounding_mode="floor"), a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("B,E,k,kind", [(37, 4, 2, "random"), (37, 4, 1, "random"), (37, 4, 4, "random"),
                                        (37, 4, 2, "one_empty"), (37, 4, 1, "all_to_one"), (1, 3, 2, "random"),
                                        (1, 3, 3, "random")])
def test_routed_passes_match_torch(dtype, relu, weighted, B, E, k, kind):
    g = torch.Generator().manual_seed(B * 7 + k)
    route = _route_case(kind, B, E, k, g)
    k = route.shape[1]
    H = 10
    order, _ = sort_routes(route, E)
    act = torch.randn(B * k, H, generator=g, dtype=dtype)
    act = act.relu() if relu else act
    rw = torch.rand(B, k, generator=g, dtype=dtype) if weighted else None
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    out = torch.ops.mbrec_fast.routed_combine(act, order, rw, B)
    torch.testing.assert_close(out, _torch_routed_combine(act, order, rw, B), **tol)
    go = torch.randn(B, H, generator=g, dtype=dtype)
    d_pre, d_rw = torch.ops.mbrec_fast.routed_mix_bwd(go, act, order, rw, relu)
    rows = torch.div(order, k, rounding_mode="floor")
    go_rows = go.index_select(0, rows)
    want = go_rows if rw is None else go_rows * rw.reshape(-1).index_select(0, order).unsqueeze(1)
    want = torch.where(act > 0, want, torch.zeros_like(want)) if relu else want
    torch.testing.assert_close(d_pre, want, **tol)
    if weighted:
        want_rw = torch.zeros(B * k, dtype=dtype).index_copy_(0, order, (go_rows * act).sum(-1)).view(B, k)
        torch.testing.assert_close(d_rw, want_rw, **tol)
    else:
        assert d_rw.numel() == 0


def test_routed_passes_same_on_any_thread_count():
    g = torch.Generator().manual_seed(1)
    B, E, k, H = 1000, 8, 2, 16
    route = _route_case("random", B, E, k, g)
    order, _ = sort_routes(route, E)
    act, rw = torch.randn(B * k, H, generator=g).relu(), torch.rand(B, k, generator=g)
    go = torch.randn(B, H, generator=g)
    res = _on_1_and_2_threads(lambda: (torch.ops.mbrec_fast.routed_combine(act, order, rw, B),
                                       *torch.ops.mbrec_fast.routed_mix_bwd(go, act, order, rw, True)))
    for a, b in zip(*res):
        assert torch.equal(a, b)


def test_opcheck_routed_passes():
    B, E, k, H = 23, 4, 2, 6
    route = torch.stack([torch.randperm(E)[:k] for _ in range(B)])
    order, _ = sort_routes(route, E)
    act, rw = torch.randn(B * k, H).relu(), torch.rand(B, k)
    for w in (rw, None):
        torch.library.opcheck(torch.ops.mbrec_fast.routed_combine, (act, order, w, B))
        for relu in (True, False):
            torch.library.opcheck(torch.ops.mbrec_fast.routed_mix_bwd, (torch.randn(B, H), act, order, w, relu))


def test_routed_passes_bad_input():
    act, order = torch.randn(6, 4), torch.arange(6)
    with pytest.raises(RuntimeError, match="permutation"):
        torch.ops.mbrec_fast.routed_combine(act, torch.tensor([0, 1, 2, 3, 4, 4]), None, 3)
    with pytest.raises(RuntimeError, match="batch"):
        torch.ops.mbrec_fast.routed_combine(act, order, None, 4)
    with pytest.raises(RuntimeError, match="route_weight must be"):
        torch.ops.mbrec_fast.routed_combine(act, order, torch.rand(3, 3), 3)
    with pytest.raises(RuntimeError, match="grad_out must be"):
        torch.ops.mbrec_fast.routed_mix_bwd(torch.randn(3, 5), act, order, None, True)


def _torch_routed_ln(pre, order, rw, B, offsets, lnw, lnb, eps, activation):
    """Torch form of routed_ln_combine: per-row LayerNorm with the row's expert affine, activation, combine."""
    from mbrec_fast._experts_torch import activate
    E = offsets.shape[0] - 1
    expert = torch.repeat_interleave(torch.arange(E), offsets.diff())
    y = torch.nn.functional.layer_norm(pre, pre.shape[-1:], eps=eps)
    if lnw is not None:
        y = y * lnw.index_select(0, expert)
    if lnb is not None:
        y = y + lnb.index_select(0, expert)
    return _torch_routed_combine(activate(y, activation), order, rw, B)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("activation", ["none", "relu", "gelu", "silu"])
@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("B,E,k,kind,affine", [(37, 4, 2, "random", "both"), (37, 4, 1, "one_empty", "weight"),
                                               (37, 4, 1, "all_to_one", "bias"), (1, 3, 3, "random", "both"),
                                               (0, 3, 1, "random", "both")])
def test_routed_ln_passes_match_torch(dtype, activation, weighted, B, E, k, kind, affine):
    g = torch.Generator().manual_seed(B * 5 + k)
    route = _route_case(kind, B, E, k, g) if B else torch.zeros(0, k, dtype=torch.int64)
    k = route.shape[1]
    H = 11
    order, offsets = sort_routes(route, E)
    pre = torch.randn(B * k, H, generator=g, dtype=dtype) * 2 - 1
    rw = torch.rand(B, k, generator=g, dtype=dtype) if weighted else None
    lnw = torch.randn(E, H, generator=g, dtype=dtype) if affine in ("both", "weight") else None
    lnb = torch.randn(E, H, generator=g, dtype=dtype) if affine in ("both", "bias") else None
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else {}
    out = torch.ops.mbrec_fast.routed_ln_combine(pre, order, rw, B, offsets, lnw, lnb, 1e-5, activation)
    torch.testing.assert_close(out, _torch_routed_ln(pre, order, rw, B, offsets, lnw, lnb, 1e-5, activation), **tol)
    go = torch.randn(B, H, generator=g, dtype=dtype)
    req = [t.clone().requires_grad_() if t is not None else None for t in (pre, rw, lnw, lnb)]
    o = _torch_routed_ln(req[0], order, req[1], B, offsets, req[2], req[3], 1e-5, activation)
    idx = [i for i, t in enumerate(req) if t is not None]
    want = dict(zip(idx, torch.autograd.grad(o, [req[i] for i in idx], go, allow_unused=True)))
    d_pre, d_rw, d_lnw, d_lnb = torch.ops.mbrec_fast.routed_ln_mix_bwd(go, pre, order, rw, offsets, lnw, lnb, 1e-5,
                                                                     activation)
    for i, got in enumerate((d_pre, d_rw, d_lnw, d_lnb)):
        if i in want:
            torch.testing.assert_close(got, want[i] if want[i] is not None else torch.zeros_like(got), **tol)
        else:
            assert got.numel() == 0


def test_routed_ln_passes_same_on_any_thread_count():
    g = torch.Generator().manual_seed(2)
    B, E, k, H = 1000, 8, 2, 16
    route = _route_case("random", B, E, k, g)
    order, offsets = sort_routes(route, E)
    pre, rw = torch.randn(B * k, H, generator=g), torch.rand(B, k, generator=g)
    lnw, lnb, go = torch.randn(E, H, generator=g), torch.randn(E, H, generator=g), torch.randn(B, H, generator=g)
    res = _on_1_and_2_threads(lambda: (
        torch.ops.mbrec_fast.routed_ln_combine(pre, order, rw, B, offsets, lnw, lnb, 1e-5, "relu"),
        *torch.ops.mbrec_fast.routed_ln_mix_bwd(go, pre, order, rw, offsets, lnw, lnb, 1e-5, "relu")))
    for a, b in zip(*res):
        assert torch.equal(a, b)


def test_opcheck_routed_ln_passes():
    B, E, k, H = 23, 4, 2, 6
    route = torch.stack([torch.randperm(E)[:k] for _ in range(B)])
    order, offsets = sort_routes(route, E)
    pre, rw, lnw, lnb = torch.randn(B * k, H), torch.rand(B, k), torch.randn(E, H), torch.randn(E, H)
    for w, lb in ((rw, lnb), (None, None)):
        torch.library.opcheck(torch.ops.mbrec_fast.routed_ln_combine, (pre, order, w, B, offsets, lnw, lb, 1e-5,
                                                                        "gelu"))
        torch.library.opcheck(torch.ops.mbrec_fast.routed_ln_mix_bwd, (torch.randn(B, H), pre, order, w, offsets, lnw,
                                                                        lb, 1e-5, "silu"))


def test_routed_ln_passes_bad_input():
    pre, order, offsets, lnw = torch.randn(6, 4), torch.arange(6), torch.tensor([0, 2, 6]), torch.randn(2, 4)
    with pytest.raises(RuntimeError, match="offsets must run from 0"):
        torch.ops.mbrec_fast.routed_ln_combine(pre, order, None, 3, torch.tensor([0, 2, 5]), lnw, None, 1e-5, "relu")
    with pytest.raises(RuntimeError, match="offsets must be non-decreasing"):
        torch.ops.mbrec_fast.routed_ln_combine(pre, order, None, 3, torch.tensor([0, 7, 6]), lnw, None, 1e-5, "relu")
    with pytest.raises(RuntimeError, match="ln_weight must be"):
        torch.ops.mbrec_fast.routed_ln_combine(pre, order, None, 3, offsets, torch.randn(3, 4), None, 1e-5, "relu")
    with pytest.raises(RuntimeError, match="activation must be one of"):
        torch.ops.mbrec_fast.routed_ln_mix_bwd(torch.randn(3, 4), pre, order, None, offsets, lnw, None, 1e-5, "tanh")


@pytest.mark.parametrize("activation", ["relu", "none"])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("weighted", [True, False])
def test_gradcheck_routed_fused_path(activation, k, weighted):
    """fp64 gradcheck of the public op on the path that runs the C++ routed passes (relu/none, no LayerNorm)."""
    B, D, H, E = 5, 3, 4, 3
    route = torch.stack([torch.randperm(E)[:k] for _ in range(B)])
    args = [_f64(B, D), _f64(E, D, H), _f64(E, H)] + ([_f64(B, k).abs()] if weighted else [])
    fn = lambda x, w, b, *rw: mf.routed_experts(x, w, b, route, *rw, activation=activation)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("ln", [False, True])
def test_routed_fused_path_matches_plain_torch_path(ln):
    """The C++ passes against the plain torch form of the same op (the FUSED_ROUTED switch), forward and grads,
    without and with LayerNorm (gelu)."""
    import mbrec_fast._experts_torch as et
    g = torch.Generator().manual_seed(3)
    B, D, H, E, k = 64, 8, 12, 5, 2
    route = torch.stack([torch.randperm(E - 1, generator=g)[:k] for _ in range(B)])  # expert E-1 gets no rows
    base = [torch.randn(B, D, generator=g), torch.randn(E, D, H, generator=g), torch.randn(E, H, generator=g),
            torch.rand(B, k, generator=g)]
    if ln:
        base += [torch.randn(E, H, generator=g), torch.randn(E, H, generator=g)]
    res = []
    for fused in (True, False):
        et.FUSED_ROUTED = fused
        try:
            p = [t.clone().requires_grad_() for t in base]
            extra = dict(ln_weight=p[4], ln_bias=p[5], activation="gelu") if ln else {}
            out = mf.routed_experts(p[0], p[1], p[2], route, p[3], **extra)
            out.backward(torch.ones_like(out))
            res.append([out] + [t.grad for t in p])
        finally:
            et.FUSED_ROUTED = True
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(res[0][2][E - 1]) == 0


@pytest.mark.parametrize("E", [5, 1])
@pytest.mark.parametrize("layer", ["gated-shared", "gated-per-expert", "routed-relu", "routed-gelu"])
def test_segment_gemms_match_the_torch_gemms(layer, E):
    """The expert GEMMs on the C++ segment GEMMs (FUSED_GEMM, the CPU default) against torch.mm / bmm for the same
    layer, forward and every gradient; shapes that leave partial micro-tiles and an expert without rows."""
    import mbrec_fast._experts_torch as et
    g = torch.Generator().manual_seed(5)
    B, D, H, T = 45, 19, 37, 2
    k = min(2, E - 1) if E > 1 else 1
    shared = layer != "gated-per-expert"
    base = [torch.randn(B, D, generator=g) if shared else torch.randn(E, B, D, generator=g),
            torch.randn(E, D, H, generator=g), torch.randn(E, H, generator=g)]
    if layer.startswith("gated"):  # gate weights for shared x, precomputed gates for per-expert x
        base.append(torch.randn(T, D, E, generator=g) if shared else torch.rand(T, B, E, generator=g))
    else:
        n_used = max(E - 1, 1)  # with E > 1 the last expert gets no rows
        route = torch.stack([torch.randperm(n_used, generator=g)[:k] for _ in range(B)])
        base.append(torch.rand(B, k, generator=g))
    res = []
    for fused in (True, False):
        et.FUSED_GEMM = fused
        try:
            p = [t.clone().requires_grad_() for t in base]
            if layer.startswith("gated"):
                gate = dict(gate_weight=p[3]) if shared else dict(gates=p[3])
                out = mf.gated_experts(p[0], p[1], p[2], **gate)
            else:
                out = mf.routed_experts(p[0], p[1], p[2], route, p[3], activation=layer.split("-")[1])
            out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
            res.append([out] + [t.grad for t in p])
        finally:
            et.FUSED_GEMM = True
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
