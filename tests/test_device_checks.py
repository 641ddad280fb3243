"""Every op on one device, against the CPU reference: the test step of `benchmarks/gpu_check.py`.

The device is MBREC_FAST_CHECK_DEVICE (default "cpu", tiny and quick, so the plain suite runs these lines too,
which is the check's dry run); `gpu_check.py --device cuda` runs the same file on the GPU: sampler bits equal
the CPU's for every mode, the evaluator equals the reference (ties, exclusions, users subset, score_fn, one
process through the distributed path), experts forward and backward against the loop reference in fp32/fp16/
bf16, opcheck of every op on device tensors and torch.compile of a model that uses each op.
"""
import math
import os
import socket

import numpy as np
import pytest
import torch

import mbrec_fast as mf
from mbrec_fast import InteractionGraph
from mbrec_fast.evaluator import evaluate_full_ranking, topk
from mbrec_fast.reference.evaluator import dense_scores, reference_evaluate, reference_topk
from mbrec_fast.reference.experts import gated_experts_ref, routed_experts_ref
from mbrec_fast.sampler import MODES
from test_evaluator import rand_csr  # tests/ is on sys.path under pytest

DEVICE = os.environ.get("MBREC_FAST_CHECK_DEVICE", "cpu")
if DEVICE.startswith("cuda") and not torch.cuda.is_available():
    pytest.skip(f"MBREC_FAST_CHECK_DEVICE={DEVICE} but no CUDA device is present", allow_module_level=True)
# inductor on the GPU (what users run); aot_eager on the CPU dry run (no C++ compile of generated code)
COMPILE_BACKEND = "inductor" if DEVICE.startswith("cuda") else "aot_eager"


def dev(*ts):
    out = tuple(t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in ts)
    return out if len(out) > 1 else out[0]


def small_graph(seed=0, n_users=40, n_items=300, n=1500, n_behaviors=3):
    gen = torch.Generator().manual_seed(seed)
    return InteractionGraph.from_arrays(torch.randint(0, n_users, (n,), generator=gen),
                                        torch.randint(0, n_items, (n,), generator=gen),
                                        torch.randint(0, n_behaviors, (n,), generator=gen), n_users, n_items)


# ---------------------------------------------------------------------------------------------------- sampler
@pytest.mark.parametrize("mode", MODES)
def test_sampler_bits_equal_cpu(mode):
    g = small_graph()
    users, _ = g.positives(g.target)
    kw = {"level_probs": np.full(g.n_behaviors, 1 / g.n_behaviors)} if mode == "cascade" else {}
    for extra in (kw, dict(kw, popularity=g.item_popularity()) if mode != "visited" else kw):
        for rep in (True, False):
            a = mf.sample_negatives(g, users, 6, mode=mode, replacement=rep, seed=3, offset=2, on_empty="sentinel",
                                    **extra)
            b = mf.sample_negatives(g.to(DEVICE), dev(users), 6, mode=mode, replacement=rep, seed=3, offset=2,
                                    on_empty="sentinel", **extra)
            assert b.device.type == torch.device(DEVICE).type and torch.equal(a, b.cpu()), (mode, rep)


def test_sequence_sampler_bits_equal_cpu():
    seqs = torch.randint(0, 200, (16, 20), generator=torch.Generator().manual_seed(1))
    seqs[:, :4] = -1
    dom = torch.arange(200) % 3
    for item_domain in (None, dom):
        a = mf.sample_sequence_negatives(seqs, 200, 3, item_domain=item_domain, seed=2)
        b = mf.sample_sequence_negatives(dev(seqs), 200, 3, item_domain=None if item_domain is None else dev(dom),
                                         seed=2)
        assert torch.equal(a, b.cpu())


# -------------------------------------------------------------------------------------------------- evaluator
def _eval_problem(seed=2, U=70, N=900, d=6):
    gen = torch.Generator().manual_seed(seed)
    ue = torch.randint(-2, 3, (U, d), generator=gen).float()  # small integers: exact scores, many ties
    ie = torch.randint(-2, 3, (N, d), generator=gen).float()
    ex, tg = rand_csr(U, N, 0.05, gen), rand_csr(U, N, 0.01, gen)
    labels = torch.randint(0, 2, (tg[1].numel(),), generator=gen)
    return ue, ie, ex, tg, labels


def test_evaluator_topk_ties_and_exclusions():
    ue, ie, ex, _, _ = _eval_problem()
    users = torch.tensor([5, 0, 69, 5, 33])
    s, i = topk(dev(ue), dev(ie), 40, dev(*ex), users=dev(users), block_users=3, block_items=128)
    rs, ri = reference_topk(dense_scores(ue, ie)[users], 40, ex, users)
    assert torch.equal(i.cpu(), ri) and torch.equal(s.cpu(), rs)
    for dtype in (torch.float16, torch.bfloat16):  # small integers are exact in half precision
        s, i = topk(dev(ue.to(dtype)), dev(ie.to(dtype)), 40, dev(*ex))
        rs, ri = reference_topk(dense_scores(ue, ie), 40, ex)
        assert torch.equal(i.cpu(), ri) and torch.equal(s.cpu(), rs)


def test_evaluator_metrics_groups_and_score_fn():
    ue, ie, ex, tg, labels = _eval_problem()
    ref = reference_evaluate(dense_scores(ue, ie), ex, tg, (1, 10, 50), target_groups=labels,
                             group_names=["a", "b"])
    kw = dict(ks=(1, 10, 50), target_groups=dev(labels), group_names=["a", "b"], per_user=True)
    res = evaluate_full_ranking(dev(ue), dev(ie), dev(*ex), dev(*tg), block_users=16, block_items=256, **kw)
    ue_d, ie_d = dev(ue, ie)
    by_fn = evaluate_full_ranking(None, None, dev(*ex), dev(*tg), score_fn=lambda u, a, b: ue_d[u] @ ie_d[a:b].T,
                                  n_items=ie.shape[0], block_items=100, **kw)
    for r in (res, by_fn):
        assert r.n_users == ref["n_users"] and r.group_users == ref["group_users"]
        for name, value in ref["metrics"].items():
            assert r.metrics[name] == pytest.approx(value, rel=1e-12, abs=1e-12), name
        for g, vals in ref["groups"].items():
            for name, value in vals.items():
                assert r.groups[g][name] == pytest.approx(value, rel=1e-12, abs=1e-12), (g, name)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_evaluator_distributed_one_process():
    import torch.distributed as dist
    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    ue, ie, ex, tg, labels = _eval_problem()
    single = evaluate_full_ranking(dev(ue), dev(ie), dev(*ex), dev(*tg), ks=(5, 20), per_user=True)
    backend = "nccl" if DEVICE.startswith("cuda") else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        sharded = evaluate_full_ranking(dev(ue), dev(ie), dev(*ex), dev(*tg), ks=(5, 20), per_user=True,
                                        process_group="default")
    finally:
        dist.destroy_process_group()
    assert sharded.metrics == single.metrics and sharded.n_users == single.n_users
    assert torch.equal(sharded.per_user["user"], single.per_user["user"])


# ---------------------------------------------------------------------------------------------------- experts
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_experts_forward_backward_vs_reference(dtype):
    gen = torch.Generator().manual_seed(0)
    B, D, H, E, T = 96, 32, 24, 5, 3
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}[dtype]

    def leaf(*shape, scale=1.0):
        return dev((torch.randn(*shape, generator=gen) * scale).to(dtype)).requires_grad_()

    x, w, b = leaf(B, D), leaf(E, D, H, scale=D ** -0.5), leaf(E, H)
    gw, lw, lb = leaf(T, D, E), leaf(E, H), leaf(E, H)
    for kw in (dict(gate_weight=gw, activation="gelu"), dict(gate_weight=gw, ln_weight=lw, ln_bias=lb)):
        out = mf.gated_experts(x, w, b, **kw)
        ref = gated_experts_ref(x.float(), w.float(), b.float(),
                                **{k: v.float() if isinstance(v, torch.Tensor) else v for k, v in kw.items()})
        torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
        params = [x, w, b] + [v for v in kw.values() if isinstance(v, torch.Tensor)]
        for a, c in zip(torch.autograd.grad(out.float().sum(), params), torch.autograd.grad(ref.sum(), params)):
            torch.testing.assert_close(a.float(), c.float(), rtol=tol * 10, atol=tol * 10)
    route = dev(torch.randint(0, E, (B, 2), generator=gen))
    rw = leaf(B, 2).detach().abs().requires_grad_()
    out = mf.routed_experts(x, w, b, route, rw, activation="silu")
    ref = routed_experts_ref(x.float(), w.float(), b.float(), route, rw.float(), activation="silu")
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    for a, c in zip(torch.autograd.grad(out.float().sum(), [x, w, b, rw]),
                    torch.autograd.grad(ref.sum(), [x, w, b, rw])):
        torch.testing.assert_close(a.float(), c.float(), rtol=tol * 10, atol=tol * 10)


# ----------------------------------------------------------------------------------------- opcheck, compile
def _sampler_op_args(g):
    """(indptr, indices, level_thr, alias_thr, alias_idx, weights_q, prefix) of the raw op (uniform, no cascade)."""
    from mbrec_fast.sampler import _level_thresholds
    R = g.n_behaviors
    table = torch.zeros(R, R, dtype=torch.float64)
    table[:, R - 1] = 1
    z = torch.empty(0, dtype=torch.int64)
    return dev(g._indptr, g._indices, _level_thresholds(table), z, torch.empty(0, dtype=torch.int32), z, z)


def _op_cases():
    ue, ie, ex, tg, labels = _eval_problem(U=6, N=9, d=3)
    users = torch.arange(6)
    _, top_i = torch.ops.mbrec_fast.topk_dot(ue, ie, users, *ex, 4, 2, 4)
    g = small_graph()
    ptr, idx, thr, *pop = _sampler_op_args(g)
    B, D, H, E, T = 5, 4, 6, 3, 2
    x, w, b, gw = torch.randn(B, D), torch.randn(E, D, H), torch.randn(E, H), torch.randn(T, D, E)
    route = torch.tensor([[0, 2], [1, 0], [2, 1], [0, 1], [2, 0]])
    _, pre, probs = torch.ops.mbrec_fast.gated_experts_fwd(x, w, b, None, gw, None, None, None, None, 1e-5, "relu")
    _, rpre, order, offsets, rxs = torch.ops.mbrec_fast.routed_experts_fwd(x, w, b, route, None, None, None, 1e-5,
                                                                           "relu")
    rg = lambda t: dev(t).clone().requires_grad_()  # noqa: E731
    ops = torch.ops.mbrec_fast
    return {
        "topk_dot": (ops.topk_dot.default, dev(ue, ie, users, *ex) + (4, 2, 4)),
        "topk_merge": (ops.topk_merge.default, dev(ue @ ie.T, users, 0, *ex, torch.full((6, 4), -math.inf),
                                                   torch.full((6, 4), -1, dtype=torch.int64))),
        "rank_metrics": (ops.rank_metrics.default, dev(top_i, users, *tg, labels, 2, [1, 4])),
        "sample_negatives": (ops.sample_negatives.default,
                             (ptr, idx, dev(torch.arange(10)), dev(torch.full((10,), g.target)), thr, *pop,
                              g.n_items, 3, 0, True, 5, 1)),
        "gated_experts_fwd": (ops.gated_experts_fwd, (rg(x), rg(w), rg(b), None, rg(gw), None, None, None, None,
                                                      1e-5, "relu")),
        "gated_experts_bwd": (ops.gated_experts_bwd, dev(torch.randn(T, B, H), x, w, b, None, gw, None, None, None,
                                                         None, 1e-5, "relu", pre, probs)),
        "routed_experts_fwd": (ops.routed_experts_fwd, (rg(x), rg(w), rg(b), dev(route), None, None, None, 1e-5,
                                                        "silu")),
        "routed_experts_bwd": (ops.routed_experts_bwd, dev(torch.randn(B, H), x, w, b, route, None, None, None,
                                                           1e-5, "relu", rpre, order, offsets, rxs)),
    }


@pytest.mark.parametrize("name", ["topk_dot", "topk_merge", "rank_metrics", "sample_negatives", "gated_experts_fwd",
                                  "gated_experts_bwd", "routed_experts_fwd", "routed_experts_bwd"])
def test_opcheck_on_device(name):
    op, args = _op_cases()[name]
    utils = ("test_schema", "test_faketensor") if name == "sample_negatives" else \
        ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(op, args, test_utils=utils)


def test_compile_model_using_each_op():
    """One small model that samples negatives, runs gated and routed experts (with backward) and ranks items."""
    from mbrec_fast.nn import GatedExperts, RoutedExperts
    torch._dynamo.reset()
    torch.manual_seed(0)
    g = small_graph()
    ptr, idx, thr, *pop = _sampler_op_args(g)
    D, n_items = 8, g.n_items
    mmoe = GatedExperts(D, 6, num_experts=3, num_tasks=2).to(DEVICE)
    routed = RoutedExperts(D, 6, num_experts=3).to(DEVICE)
    item_emb = dev(torch.randn(n_items, 6))
    user_x = dev(torch.randn(g.n_users, D))
    users = dev(torch.arange(12))
    dom = dev(torch.arange(12) % 3)
    rows = dev(torch.arange(12))
    no_exclude = dev(torch.zeros(13, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))

    def step(users):
        negs = torch.ops.mbrec_fast.sample_negatives(ptr, idx, users, torch.full_like(users, g.target), thr, *pop,
                                                     n_items, 4, 0, True, 1, 0)
        h = mmoe(user_x[users]).sum(0) + routed(user_x[users], dom)
        neg_scores = (h[:, None, :] * item_emb[negs]).sum(-1)
        loss = neg_scores.sum()
        s, i = torch.ops.mbrec_fast.topk_dot(h.detach().contiguous(), item_emb, rows, *no_exclude, 5, 4, 64)
        return loss, s, i

    loss_e, s_e, i_e = step(users)
    grads_e = torch.autograd.grad(loss_e, list(mmoe.parameters()) + list(routed.parameters()))
    compiled = torch.compile(step, fullgraph=True, backend=COMPILE_BACKEND)
    loss_c, s_c, i_c = compiled(users)
    grads_c = torch.autograd.grad(loss_c, list(mmoe.parameters()) + list(routed.parameters()))
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s_c, s_e, rtol=1e-4, atol=1e-4)
    for a, c in zip(grads_c, grads_e):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)
