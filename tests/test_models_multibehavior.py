"""NMTR, MEMBER and LightGCN: graph helpers against dense references, overfitting, gradients, determinism,
MEMBER's sparse gating against a dense-mask reference, evaluation score == training score."""
import numpy as np
import pytest
import torch

from mbrec_fast.data.multibehavior import from_arrays, synthetic_multibehavior
from mbrec_fast.models.lightgcn import BipartiteAdjacency, LightGCN, drop_edges, lightgcn_propagate
from mbrec_fast.models.member import (EXCLUDED_SCORE, MEMBER, KeyedCsr, evaluate_by_pool,
                                      gated_scores_dense_reference, l2_normalize_rows,
                                      official_propagate)
from mbrec_fast.models.nmtr import NMTR

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    """60 users, 40 items, view -> cart -> buy, with direct purchases (so some held-out items are unvisited)."""
    return synthetic_multibehavior(60, 40, interactions_per_user=8, direct_target_rate=0.5, seed=3)


def _build(kind, data, **kw):
    torch.manual_seed(0)
    if kind == "lightgcn":
        return LightGCN.from_data(data, dim=16, **kw)
    if kind.startswith("nmtr"):
        return NMTR.from_data(data, dim=16, interaction=kind.split("-")[1], **kw)
    if kind == "member":
        return MEMBER.from_data(data, dim=16, cl_nodes=64, gen_batch=64, **kw)
    if kind == "member-single":
        return MEMBER.from_data(data, dim=16, cl_nodes=64, gen_batch=64, single_expert=True, **kw)
    raise AssertionError(kind)


def _full_scores(model):
    """Dense [U, I] scores from the model's evaluation scorer."""
    with torch.no_grad():
        sc = model.scorer()
        if sc.score_fn is None:
            return sc.user_emb @ sc.item_emb.T
        users = torch.arange(model.n_users)
        # odd block boundaries on purpose: item ranges that split users' rows
        bounds = sorted({b for b in (0, 7, 8, 23) if b < model.n_items} | {model.n_items})
        return torch.cat([sc.score_fn(users, a, b) for a, b in zip(bounds[:-1], bounds[1:])], 1)


def _train(model, data, epochs, lr, batch_size=64, seed=0):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    history = []
    for epoch in range(epochs):
        model.on_epoch_start(data, epoch, seed)
        sums, n = {}, 0
        for batch in model.training_batches(data, epoch, batch_size, seed):
            opt.zero_grad()
            loss, parts = model.loss(batch)
            loss.backward()
            opt.step()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
        history.append({k: v / n for k, v in sums.items()})
    return history


def _train_auc(model, data):
    """AUC of training purchases against items the user never bought, from the evaluation scores."""
    scores = _full_scores(model)
    indptr, indices = data.target_csr()
    pos = torch.zeros(model.n_users, model.n_items, dtype=torch.bool)
    rows = torch.repeat_interleave(torch.arange(model.n_users), indptr.diff())
    pos[rows, indices] = True
    aucs = []
    for u in range(model.n_users):
        p, n = scores[u][pos[u]], scores[u][~pos[u]]
        if p.numel() and n.numel():
            aucs.append(float((p[:, None] > n[None, :]).float().mean()))
    return float(np.mean(aucs))


# ---------------------------------------------------------------------------------------------- graph helpers
def _dense_norm_adj(users, items, n_users, n_items):
    a = torch.zeros(n_users, n_items, dtype=torch.float64)
    a[users, items] = 1.0
    du, di = a.sum(1), a.sum(0)
    with np.errstate(divide="ignore"):
        su = torch.where(du > 0, du.rsqrt(), torch.zeros_like(du))
        si = torch.where(di > 0, di.rsqrt(), torch.zeros_like(di))
    return su[:, None] * a * si[None, :]


@pytest.mark.parametrize("n_layers", [0, 1, 3])  # 0 = identity, 1 = one hop, 3 = the LightGCN default
def test_propagation_matches_dense_reference(n_layers):
    g = torch.Generator().manual_seed(1)
    users = torch.randint(0, 9, (30,), generator=g)
    items = torch.randint(0, 7, (30,), generator=g)
    users = torch.cat([users, users[:5]])  # duplicate edges count once
    items = torch.cat([items, items[:5]])
    adj = BipartiteAdjacency(users, items, 10, 8)   # user 9 (and maybe item 7) have no edges
    eu = torch.randn(10, 4, dtype=torch.float64, generator=g)
    ei = torch.randn(8, 4, dtype=torch.float64, generator=g)
    a = _dense_norm_adj(users, items, 10, 8)
    ru, ri, cu, ci = eu, ei, eu, ei
    for _ in range(n_layers):
        cu, ci = a @ ci, a.T @ cu
        ru, ri = ru + cu, ri + ci
    ou, oi = lightgcn_propagate(adj, eu, ei, n_layers)
    torch.testing.assert_close(ou, ru / (n_layers + 1))
    torch.testing.assert_close(oi, ri / (n_layers + 1))


def test_propagation_gradient_gradcheck():
    g = torch.Generator().manual_seed(2)
    adj = BipartiteAdjacency(torch.randint(0, 6, (15,), generator=g), torch.randint(0, 5, (15,), generator=g), 6, 5)
    eu = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    ei = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: lightgcn_propagate(adj, a, b, 2), (eu, ei))


def test_adjacency_rejects_bad_ids():
    with pytest.raises(ValueError, match="users"):
        BipartiteAdjacency(torch.tensor([0, 5]), torch.tensor([0, 1]), 5, 3)
    with pytest.raises(ValueError, match="items"):
        BipartiteAdjacency(torch.tensor([0, 1]), torch.tensor([0, -1]), 5, 3)


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.9])  # no-op, the paper's rate, nearly everything dropped
def test_drop_edges_is_exact_subset_without_replacement(rate):
    u = torch.arange(100)
    i = torch.arange(100) % 7
    ku, ki = drop_edges(u, i, rate, torch.Generator().manual_seed(0))
    assert ku.numel() == round((1 - rate) * 100)
    assert torch.unique(ku).numel() == ku.numel()               # distinct edges: no replacement
    assert torch.equal(ki, ku % 7)                              # kept pairs are original edges
    ku2, _ = drop_edges(u, i, rate, torch.Generator().manual_seed(0))
    assert torch.equal(ku, ku2)
    with pytest.raises(ValueError, match="rate"):
        drop_edges(u, i, 1.0, torch.Generator())


# ---------------------------------------------------------------------------------------------- training
MODELS = ["lightgcn", "nmtr-gmf", "nmtr-mlp", "nmtr-neumf", "member", "member-single"]


@pytest.mark.parametrize("kind", MODELS)  # every model and NMTR unit, MEMBER and its ablation
def test_overfits_tiny_data(tiny, kind):
    model = _build(kind, tiny, reg=0.0)
    before = _train_auc(model, tiny)
    history = _train(model, tiny, epochs=25, lr=0.03)
    after = _train_auc(model, tiny)
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]
    assert after > 0.93 and after >= before, (before, after)  # random scores give 0.5


@pytest.mark.parametrize("kind", MODELS)  # incl. both MEMBER experts' four tables and every NMTR head
def test_gradients_reach_every_parameter(tiny, kind):
    model = _build(kind, tiny)
    batch = next(iter(model.training_batches(tiny, 0, 512, seed=0)))
    loss, _ = model.loss(batch)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


@pytest.mark.parametrize("kind", ["lightgcn", "nmtr-neumf", "member"])  # MEMBER: extra per-batch draws, aug graphs
def test_deterministic_with_seed(tiny, kind):
    def run(seed, epoch):
        model = _build(kind, tiny)
        batches = list(model.training_batches(tiny, epoch, 128, seed))
        model.on_epoch_start(tiny, epoch, seed)
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        for b in batches[:3]:
            opt.zero_grad()
            model.loss(b)[0].backward()
            opt.step()
        return batches, [p.detach().clone() for p in model.parameters()]

    b1, p1 = run(5, 1)
    b2, p2 = run(5, 1)
    b3, _ = run(5, 2)
    assert len(b1) == len(b2)
    for x, y in zip(b1, b2):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))
    assert not torch.equal(b1[0]["users"], b3[0]["users"])   # another epoch, another order


# ---------------------------------------------------------------------------------------------- scoring
@pytest.mark.parametrize("kind", MODELS)  # dot-product scorers and score_fn scorers (NMTR MLP/NeuMF, gated MEMBER)
def test_eval_scores_equal_training_scores(tiny, kind):
    model = _build(kind, tiny)
    _train(model, tiny, epochs=1, lr=0.01)   # move away from the initialization (non-zero biases etc.)
    full = _full_scores(model)
    g = torch.Generator().manual_seed(0)
    users = torch.randint(0, tiny.n_users, (200,), generator=g)
    items = torch.randint(0, tiny.n_items, (200,), generator=g)
    aux_rows = torch.repeat_interleave(torch.arange(tiny.n_users), tiny.aux_csr()[0].diff())
    users = torch.cat([users, aux_rows[:50]])                  # make sure visited pairs are in
    items = torch.cat([items, tiny.aux_csr()[1][:50]])
    with torch.no_grad():
        if kind.startswith("nmtr"):
            train_scores = model.logits(users, items, tiny.target)
        else:
            train_scores = model.score_pairs(users, items)
    torch.testing.assert_close(full[users, items], train_scores, rtol=1e-5, atol=1e-5)
    if kind.startswith("nmtr"):  # the blocked score_fn too (GMF's scorer takes the dot-product path instead)
        with torch.no_grad():
            block = model.score_block(torch.arange(tiny.n_users), 0, tiny.n_items)
        torch.testing.assert_close(block, full, rtol=1e-5, atol=1e-5)


def test_member_gating_equals_dense_mask_reference(tiny):
    model = _build("member", tiny)
    _train(model, tiny, epochs=1, lr=0.01)
    with torch.no_grad():
        embs = model._all_embeddings()
        uv, iv = model._concat(embs[0], model.lambdas[0])
        un, in_ = model._concat(embs[1], model.lambdas[1])
        dense = gated_scores_dense_reference(uv, iv, un, in_, tiny.aux_csr(), tiny.n_items)
        score_fn = model.scorer().score_fn
        users = torch.tensor([5, 0, 59, 5, 17])                 # unsorted, with a repeat
        for a, b in [(0, tiny.n_items), (0, 1), (13, 14), (3, 29), (39, 40)]:  # whole range, single items, tails
            torch.testing.assert_close(score_fn(users, a, b), dense[users, a:b], rtol=1e-5, atol=1e-6)
    # the case is not trivial: the tested users have visited items and the two experts disagree there
    aux_deg = tiny.aux_csr()[0].diff()
    assert int(aux_deg[users].min()) > 0
    assert not torch.allclose(uv @ iv.T, un @ in_.T)


def test_keyed_csr_block_entries_and_contains():
    indptr = torch.tensor([0, 2, 2, 5])
    indices = torch.tensor([1, 4, 0, 2, 3])
    k = KeyedCsr((indptr, indices), 6)
    rows, items = k.block_entries(torch.tensor([2, 1, 0]), 1, 4)
    assert sorted(zip(rows.tolist(), items.tolist())) == [(0, 2), (0, 3), (2, 1)]
    assert k.contains(torch.tensor([0, 0, 1, 2]), torch.tensor([4, 5, 0, 0])).tolist() == [True, False, False, True]
    with pytest.raises(ValueError, match="sorted"):
        KeyedCsr((torch.tensor([0, 2]), torch.tensor([3, 1])), 6)


def test_member_pool_negatives_come_from_the_right_pool(tiny):
    model = _build("member", tiny)
    u, i = tiny.pairs(tiny.target)
    neg = model.pool_negatives(u, i, tiny.train, seed=3)
    vis = model.is_visited(u, i)
    v_ok, n_ok = neg[:, 0] >= 0, neg[:, 1] >= 0
    assert bool(v_ok[vis].float().mean() > 0.5) and not bool(v_ok[~vis].any())   # only visited positives
    assert bool(n_ok.all())                                                       # every purchase (default)
    assert bool(model.aux.contains(u[v_ok], neg[v_ok, 0]).all())                  # touched at an auxiliary behavior
    assert not bool(model.target.contains(u[v_ok], neg[v_ok, 0]).any())           # ... but never bought
    assert not bool(model.union.contains(u, neg[:, 1]).any())                     # never touched at all


def test_member_self_supervised_losses_finite_and_decrease(tiny):
    model = _build("member", tiny)
    history = _train(model, tiny, epochs=12, lr=0.03)
    for key in ("cl_visited", "cl_unvisited", "gen", "bpr", "bpr_pool_visited", "bpr_pool_unvisited"):
        values = [h[key] for h in history]
        assert all(np.isfinite(values)), key
        assert values[-1] < values[0], (key, values)


def test_member_single_expert_ablation_uses_dot_product_path(tiny):
    two, one = _build("member", tiny), _build("member-single", tiny)
    assert sum(p.numel() for p in two.parameters()) == 2 * sum(p.numel() for p in one.parameters())
    sc = one.scorer()
    assert sc.score_fn is None and sc.user_emb.shape == (tiny.n_users, 32)


def test_member_augmented_graphs_depend_on_seed_and_epoch(tiny):
    model = _build("member", tiny)
    model.on_epoch_start(tiny, 0, 0)
    a = [adj._parts["ui"][1].clone() for adj in model._aug]
    model.on_epoch_start(tiny, 0, 0)
    assert all(torch.equal(x, adj._parts["ui"][1]) for x, adj in zip(a, model._aug))
    model.on_epoch_start(tiny, 1, 0)
    assert any(not torch.equal(x, adj._parts["ui"][1]) for x, adj in zip(a, model._aug))
    n_vis = model.visited_purchases[0].numel()
    assert model._aug[0].n_edges == round(0.8 * n_vis)


def test_nmtr_cascade_structure(tiny):
    """out^r = out^{r-1} + f^r + b^r: the difference between adjacent behaviors is head r alone."""
    model = _build("nmtr-neumf", tiny)
    with torch.no_grad():
        model.item_bias.normal_()
        u, i = torch.arange(10), torch.arange(10)
        l0, l1, l2 = (model.logits(u, i, r) for r in range(3))
        mixed = model.logits(u, i, torch.tensor([0, 1, 2] * 3 + [2]))
        expected = torch.stack([l0, l1, l2])[torch.tensor([0, 1, 2] * 3 + [2]), torch.arange(10)]
        torch.testing.assert_close(mixed, expected)
        # zeroing head 2's output weights leaves only its bias between behaviors 1 and 2
        model.gmf_h[2].zero_()
        model.mlp_h[2].zero_()
        torch.testing.assert_close(model.logits(u, i, 2) - model.logits(u, i, 1), model.item_bias[2, i])


def test_nmtr_fused_expert_op_matches_torch_path(tiny):
    """The towers through the package's routed-experts op == the PyTorch grouped-GEMM path, values and grads."""
    model = _build("nmtr-mlp", tiny)
    u, i = torch.arange(30), torch.arange(30) % tiny.n_items
    beh = torch.arange(30) % 3                      # rows with 1, 2 and 3 heads
    results = []
    for expert_impl in ("loop", "fused"):
        model.expert_impl = expert_impl
        model.zero_grad()
        out = model.logits(u, i, beh)
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    for g_fused, g_torch in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(g_fused, g_torch, rtol=1e-4, atol=1e-6)


def test_bad_arguments_raise_clear_errors(tiny):
    with pytest.raises(ValueError, match="interaction"):
        NMTR(10, 10, 3, interaction="dot")
    with pytest.raises(ValueError, match="loss_weights"):
        NMTR(10, 10, 3, loss_weights=[0.5, 0.5])
    with pytest.raises(ValueError, match="behaviors"):
        NMTR(10, 10, 2).logits(torch.tensor([0]), torch.tensor([0]), 2)
    with pytest.raises(ValueError, match="auxiliary"):
        MEMBER(10, 10, [tiny.target_csr()])
    with pytest.raises(ValueError, match="lambda_visited"):
        MEMBER.from_data(tiny, lambda_visited=1.5)
    with pytest.raises(ValueError, match="edge_dropout"):
        MEMBER.from_data(tiny, edge_dropout=1.0)
    for cls in (NMTR, MEMBER, LightGCN):  # a misspelt hyper-parameter is named, not swallowed
        with pytest.raises(TypeError, match="no argument 'depth'"):
            cls.from_data(tiny, depth=3)


def test_models_work_on_hand_built_data_with_empty_rows():
    """A user with no interactions at all and an item nobody touched: finite scores everywhere."""
    users = np.array([0, 0, 1, 1, 2, 0, 1, 2, 3])
    items = np.array([0, 1, 1, 2, 3, 1, 2, 3, 0])
    behs = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1])
    data = from_arrays(users, items, behs, 5, 6, ["cart", "buy"], test=(np.array([0]), np.array([2])), valid="none")
    for kind in ("lightgcn", "nmtr-neumf", "member"):
        model = _build(kind, data)
        _train(model, data, epochs=2, lr=0.01, batch_size=4)
        assert torch.isfinite(_full_scores(model)).all(), kind


# ---------------------------------------------------------------------------------------------- faithful MEMBER
def _faithful(data, **kw):
    torch.manual_seed(0)
    return MEMBER.from_data(data, dim=8, variant="faithful", cl_nodes=16, gen_batch=32, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_normalization_matches_f_normalize(dtype, monkeypatch):
    """The fused row normalization gives F.normalize's values (to one rounding) and gradients, including rows
    whose norm is clamped at eps (exactly zero and tiny rows) and under both implementation switches."""
    from mbrec_fast.models import member
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 7, dtype=dtype, generator=g)
    x[3] = 0.0
    x[5] = 1e-14                                   # norm below eps: scaled by 1 / eps, gradient g / eps
    grad = torch.randn(40, 7, dtype=dtype, generator=g)
    outs = {}
    for impl in member.NORMALIZE_IMPLS:
        monkeypatch.setattr(member, "NORMALIZE_IMPL", impl)
        xi = x.clone().requires_grad_(True)
        y = l2_normalize_rows(xi)
        y.backward(grad)
        outs[impl] = (y.detach(), xi.grad)
    want_y = torch.nn.functional.normalize(x, dim=-1)
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-13, atol=1e-13)
    for y, dx in outs.values():
        torch.testing.assert_close(y, want_y, **tol)
    torch.testing.assert_close(outs["fused"][1], outs["torch"][1], rtol=tol["rtol"], atol=tol["atol"] * 1e12)
    if dtype == torch.float64:
        monkeypatch.setattr(member, "NORMALIZE_IMPL", "fused")
        assert torch.autograd.gradcheck(l2_normalize_rows, (torch.randn(6, 5, dtype=dtype, generator=g,
                                                                        requires_grad=True),))
    monkeypatch.setattr(member, "NORMALIZE_IMPL", "cuda")
    with pytest.raises(ValueError, match="NORMALIZE_IMPL"):
        l2_normalize_rows(x)


def test_official_propagation_matches_dense_reference():
    """e_0 + sum_l (1 + 1/l) e_l with e_l = row-L2-normalize(A_hat e_{l-1}), as the official lightGCN.py."""
    g = torch.Generator().manual_seed(1)
    users, items = torch.randint(0, 6, (20,), generator=g), torch.randint(0, 5, (20,), generator=g)
    adj = BipartiteAdjacency(users, items, 7, 5)                     # user 6 isolated
    r = _dense_norm_adj(users, items, 7, 5)
    a = torch.zeros(12, 12, dtype=torch.float64)
    a[:7, 7:], a[7:, :7] = r, r.T
    x = torch.randn(12, 4, dtype=torch.float64, generator=g)
    cur, want = x, x.clone()
    for layer in range(1, 4):
        cur = torch.nn.functional.normalize(a @ cur, dim=-1)
        want = want + (1 + 1 / layer) * cur
    gu, gi = official_propagate(adj, x[:7].float(), x[7:].float(), 3)
    torch.testing.assert_close(torch.cat([gu, gi]).double(), want, rtol=1e-5, atol=1e-5)


def test_member_faithful_knobs_and_one_at_a_time_override(tiny):
    m = _faithful(tiny)
    assert (m.pool_weight, m.neg_scale, m.gen_neg, m.reg, m.schedule) == (0.0, 2.0, 3, 0.0, "official")
    assert (m.gen_experts, m.gen_negatives, m.propagation, m.cl_sampling) == ("unvisited", "pair", "official", "table")
    assert m.generative_pairs() == [(0, 1), (0, 2), (1, 2)]        # cart->view, buy->view, buy->cart
    assert m.layers_visited_global == 4 and m.n_layers == 2 and not m.unvisited_all_purchases
    std = float(m.experts[0].glo_user.weight.detach().std())
    assert 0.8 < std < 1.2                                          # N(0, 1) initialisation
    one = _faithful(tiny, propagation="mean")                       # one knob changed, the rest faithful
    assert one.propagation == "mean" and one.neg_scale == 2.0
    legacy = MEMBER.from_data(tiny, dim=8)
    assert legacy.variant == "legacy" and legacy.generative_pairs() == [(0, 1), (1, 2)] and legacy.reg == 1e-4
    with pytest.raises(ValueError, match="variant"):
        MEMBER.from_data(tiny, variant="paper")
    # a knob that would change nothing is refused rather than ignored (it acts only on the in-pool terms)
    with pytest.raises(ValueError, match="unvisited_all_purchases=True acts only on the in-pool BPR terms"):
        _faithful(tiny, unvisited_all_purchases=True)
    assert _faithful(tiny, pool_weight=1.0, unvisited_all_purchases=True).unvisited_all_purchases
    with pytest.raises(ValueError, match="gen_pairs"):
        MEMBER.from_data(tiny, gen_pairs="some")


def _info_nce_reference(a, b, t):
    a, b = torch.nn.functional.normalize(a, dim=-1), torch.nn.functional.normalize(b, dim=-1)
    logits = a @ b.T / t
    return float((-(logits.diag() - torch.logsumexp(logits, 1))).mean())


def _local(model, expert, behaviors=None):
    per = [official_propagate(adj, expert.loc_user.weight, expert.loc_item.weight, model.n_layers)
           for adj in model.local_adj]
    return per


def test_member_faithful_schedule_loss_terms_on_a_tiny_case(tiny):
    """Per epoch: a visited-expert self-supervised pass (InfoNCE only, visited expert's local tables only),
    an unvisited-expert one (InfoNCE + generative, unvisited expert only), then the gated BPR with
    alpha = 2 on the negatives and nothing else; each checked against a hand computation."""
    model = _faithful(tiny)
    model.on_epoch_start(tiny, 0, 0)
    batches = model.training_batches(tiny, 0, 64, 0)
    n = -(-tiny.pairs(tiny.target)[0].numel() // 64)
    got = list(batches)
    assert len(batches) == len(got) == 3 * n
    assert [b["phase"] for b in got] == ["ssl_visited"] * n + ["ssl_unvisited"] * n + ["bpr"] * n
    ssl_v, ssl_n, bpr = got[0], got[n], got[2 * n]
    assert ssl_v["cl_users"].unique().numel() == 16 and ssl_v["cl_items"].unique().numel() == 16
    vis, unv = model.experts

    # visited pass: InfoNCE of the local view vs the augmented seen-purchase graph, temperature 0.6
    model.zero_grad(set_to_none=True)
    loss, parts = model.loss(ssl_v)
    loss.backward()
    with torch.no_grad():
        per = _local(model, vis)
        lu, li = torch.stack([p[0] for p in per]).mean(0), torch.stack([p[1] for p in per]).mean(0)
        au, ai = official_propagate(model._aug[0], vis.loc_user.weight, vis.loc_item.weight, 2)
        cu, ci = ssl_v["cl_users"], ssl_v["cl_items"]
        want = 0.5 * (_info_nce_reference(lu[cu], au[cu], 0.6) + _info_nce_reference(li[ci], ai[ci], 0.6))
    assert parts["cl_visited"] == pytest.approx(want, rel=1e-5)
    assert float(loss.detach()) == pytest.approx(0.1 * want, rel=1e-5)
    assert vis.loc_user.weight.grad is not None and vis.glo_user.weight.grad is None
    assert all(p.grad is None for p in unv.parameters())

    # unvisited pass: InfoNCE of the global view (temperature 0.7) + generative BCE over the three pairs,
    # random (user, item) negatives, 3 per edge, in the unvisited expert only
    model.zero_grad(set_to_none=True)
    loss, parts = model.loss(ssl_n)
    loss.backward()
    with torch.no_grad():
        gu, gi = official_propagate(model.union_adj, unv.glo_user.weight, unv.glo_item.weight, 2)
        au, ai = official_propagate(model._aug[1], unv.glo_user.weight, unv.glo_item.weight, 2)
        cu, ci = ssl_n["cl_users"], ssl_n["cl_items"]
        cl = 0.5 * (_info_nce_reference(gu[cu], au[cu], 0.7) + _info_nce_reference(gi[ci], ai[ci], 0.7))
        per = _local(model, unv)
        terms = []
        for lo, hi in [(0, 1), (0, 2), (1, 2)]:
            k = f"{lo}_{hi}"
            eu, ei = per[hi]
            assert ssl_n[f"gen_neg_{k}"].shape == ssl_n[f"gen_negusers_{k}"].shape == (32, 3)
            pos = (eu[ssl_n[f"gen_users_{k}"]] * ei[ssl_n[f"gen_items_{k}"]]).sum(-1)
            neg = (eu[ssl_n[f"gen_negusers_{k}"]] * ei[ssl_n[f"gen_neg_{k}"]]).sum(-1).reshape(-1)
            # BCE by hand: -log sigma(pos) and -log(1 - sigma(neg)), averaged over all 32 + 96 logits
            terms.append(float(torch.cat([-torch.nn.functional.logsigmoid(pos),
                                          -torch.nn.functional.logsigmoid(-neg)]).mean()))
        gen = float(np.mean(terms))
    assert parts["cl_unvisited"] == pytest.approx(cl, rel=1e-5) and parts["gen"] == pytest.approx(gen, rel=1e-5)
    assert float(loss.detach()) == pytest.approx(0.1 * cl + 0.1 * gen, rel=1e-5)
    assert all(p.grad is None for p in vis.parameters())
    assert unv.glo_user.weight.grad is not None and unv.loc_item.weight.grad is not None

    # BPR pass: gated scores, -log sigma(s_pos - 2 s_neg), one uniform negative outside the purchases
    model.zero_grad(set_to_none=True)
    loss, parts = model.loss(bpr)
    loss.backward()
    assert set(parts) == {"bpr", "loss"} and bpr["neg"].shape[1] == 1
    assert not bool(model.target.contains(bpr["users"], bpr["neg"][:, 0]).any())
    with torch.no_grad():
        dense = gated_scores_dense_reference(*model._concat(model.propagate_expert(vis), 0.5),
                                             *model._concat(model.propagate_expert(unv), 0.5),
                                             tiny.aux_csr(), tiny.n_items)
        u, p, ng = bpr["users"], bpr["pos"], bpr["neg"][:, 0]
        want = float((-torch.nn.functional.logsigmoid(dense[u, p] - 2.0 * dense[u, ng])).mean())
    assert float(loss.detach()) == pytest.approx(want, rel=1e-5)
    assert all(p.grad is not None for p in model.parameters())


def test_member_pool_weight_acts_under_the_official_schedule(tiny):
    """`pool_weight` on top of the faithful configuration (an ablation) adds the in-pool terms to the BPR pass
    instead of being silently ignored; at 0 (faithful) the BPR pass carries no pool negatives."""
    plain = _faithful(tiny)
    plain.on_epoch_start(tiny, 0, 0)
    bpr = [b for b in plain.training_batches(tiny, 0, 64, 0) if b["phase"] == "bpr"]
    assert bpr and all("pool_neg" not in b for b in bpr)
    model = _faithful(tiny, pool_weight=1.0)
    model.on_epoch_start(tiny, 0, 0)
    bpr = [b for b in model.training_batches(tiny, 0, 64, 0) if b["phase"] == "bpr"]
    assert all("pool_neg" in b for b in bpr)
    model.load_state_dict(plain.state_dict())
    loss, parts = model.loss(bpr[0])
    ref, ref_parts = plain.loss({k: v for k, v in bpr[0].items() if k != "pool_neg"})
    assert "bpr_pool_visited" in parts and "bpr_pool_unvisited" in parts
    assert parts["bpr"] == pytest.approx(ref_parts["bpr"])
    extra = parts["bpr_pool_visited"] + parts["bpr_pool_unvisited"]
    assert extra > 0 and float(loss.detach()) == pytest.approx(float(ref.detach()) + extra, rel=1e-5)


def test_member_faithful_trains_on_a_tiny_case(tiny):
    model = _faithful(tiny)
    before = _train_auc(model, tiny)
    history = _train(model, tiny, epochs=15, lr=0.01)
    # alpha = 2 on the negatives and the interleaved self-supervised passes make the BPR term non-monotone
    # (it oscillates on this case), so the check is on the ranking: the training AUC rises
    assert all(np.isfinite(h["bpr"]) and np.isfinite(h["gen"]) for h in history)
    assert _train_auc(model, tiny) > max(before + 0.03, 0.9)


def test_member_avg_ablation_averages_the_two_experts(tiny):
    """'w/ AVG': score = (s_visited + s_unvisited) / 2 for every item, in training and evaluation."""
    model = _faithful(tiny, gate="avg")
    _train(model, tiny, epochs=1, lr=0.01)
    sc = model.scorer()
    assert sc.score_fn is None                                      # a plain dot product: the fast path
    with torch.no_grad():
        uv, iv = model._concat(model.propagate_expert(model.experts[0]), 0.5)
        un, in_ = model._concat(model.propagate_expert(model.experts[1]), 0.5)
        want = 0.5 * (uv @ iv.T + un @ in_.T)
        torch.testing.assert_close(sc.user_emb @ sc.item_emb.T, want, rtol=1e-5, atol=1e-4)
        users = torch.arange(tiny.n_users).repeat_interleave(3)
        items = torch.randint(0, tiny.n_items, users.shape, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(model.score_pairs(users, items), want[users, items], rtol=1e-5, atol=1e-4)
        hard = _faithful(tiny)
        hard.load_state_dict(model.state_dict())
        assert not torch.allclose(_full_scores(hard), want, atol=1e-3)   # the gate matters on this case
    with pytest.raises(ValueError, match="single_expert"):
        _faithful(tiny, gate="avg", single_expert=True)
    with pytest.raises(ValueError, match="gate"):
        _faithful(tiny, gate="max")


@pytest.mark.parametrize("others", ["exclude", "zero"])
@pytest.mark.parametrize("kind", ["member", "member-avg", "lightgcn"])
def test_pool_protocol_matches_brute_force_with_both_treatments_of_other_items(tiny, kind, others):
    """HR and NDCG of each pool setting against a dense reference: other-pool items removed, or kept
    with score 0 (the official code)."""
    model = _faithful(tiny, gate="avg") if kind == "member-avg" else _build(kind, tiny)
    _train(model, tiny, epochs=1, lr=0.01)
    got = evaluate_by_pool(model, tiny, "test", ks=[5, 10], others=others)
    scores = _full_scores(model)
    targets, labels = tiny.split("test")
    aux, excl = tiny.aux_csr(), tiny.exclude("test")
    for pool, flag in (("visited", 1), ("unvisited", 0)):
        hr, ndcg = {5: [], 10: []}, {5: [], 10: []}
        for u in range(tiny.n_users):
            t = targets[1][targets[0][u]:targets[0][u + 1]]
            t = t[labels[targets[0][u]:targets[0][u + 1]] == flag]
            if t.numel() == 0:
                continue
            in_pool = torch.zeros(tiny.n_items, dtype=torch.bool)
            in_pool[aux[1][aux[0][u]:aux[0][u + 1]]] = True
            if pool == "unvisited":
                in_pool = ~in_pool
            s = scores[u].clone()
            s[~in_pool] = -float("inf") if others == "exclude" else 0.0
            s[excl[1][excl[0][u]:excl[0][u + 1]]] = -float("inf")
            order = torch.argsort(s, descending=True, stable=True)
            n_cand = int(torch.isfinite(s).sum())
            for k in (5, 10):
                top = order[:min(k, n_cand)].numpy()
                rel = np.isin(top, t.numpy()).astype(float)
                hr[k].append(float(rel.any()))
                idcg = sum(1 / np.log2(np.arange(2, min(t.numel(), k) + 2)))
                ndcg[k].append(float((rel / np.log2(np.arange(2, rel.size + 2))).sum() / idcg))
        assert got[f"{pool}_pool_users"] == len(hr[5]) > 0
        for k in (5, 10):
            assert got[f"{pool}_pool_hr@{k}"] == pytest.approx(np.mean(hr[k]), abs=1e-6), (pool, k)
            assert got[f"{pool}_pool_ndcg@{k}"] == pytest.approx(np.mean(ndcg[k]), abs=1e-6), (pool, k)
    assert EXCLUDED_SCORE < -1e29


def test_pool_protocol_expert_scores_and_clear_errors(tiny):
    model = _faithful(tiny)
    _train(model, tiny, epochs=1, lr=0.01)
    # with the hard gate each pool is scored by its own expert anyway: the two choices agree
    a = evaluate_by_pool(model, tiny, "test", ks=[10], scores="model")
    b = evaluate_by_pool(model, tiny, "test", ks=[10], scores="expert")
    assert a == pytest.approx(b, abs=1e-6)
    with pytest.raises(ValueError, match="experts"):
        evaluate_by_pool(_build("lightgcn", tiny), tiny, "test", ks=[10], scores="expert")
    one = from_arrays(np.array([0, 1, 2]), np.array([0, 1, 2]), np.array([0, 0, 0]), 3, 4, ["buy"],
                      test=(np.array([0]), np.array([3])), valid="none")
    lgcn = LightGCN.from_data(one, dim=4)
    with pytest.raises(ValueError, match="auxiliary behaviors"):
        evaluate_by_pool(lgcn, one, "test", ks=[2])
    from mbrec_fast.training.multibehavior import evaluate_model
    with pytest.raises(ValueError, match="--protocol"):
        evaluate_model(model, tiny, "test", ks=[10], protocol="pools")
    with pytest.raises(ValueError, match="--protocol pool.*auxiliary"):
        evaluate_model(lgcn, one, "test", ks=[2], protocol="pool")
    both = evaluate_model(model, tiny, "test", ks=[10], protocol="both")
    assert both["visited_pool_hr@10"] == pytest.approx(a["visited_pool_hr@10"]) and "hr@10" in both


def test_member_reuses_the_graph_unions(tiny):
    """MEMBER built on the training graph (from_data) takes its auxiliary / union CSRs from the graph; built
    on plain per-behavior CSRs it builds them with the CSR toolkit: the same keys either way."""
    from_graph = MEMBER.from_data(tiny, dim=8)
    csrs = [tiny.behavior_csr(r) for r in range(tiny.n_behaviors)]
    from_csrs = MEMBER(tiny.n_users, tiny.n_items, csrs, dim=8)
    for part in ("aux", "union", "target"):
        assert torch.equal(getattr(from_graph, part).keys, getattr(from_csrs, part).keys)
        assert torch.equal(getattr(from_graph, part).indptr, getattr(from_csrs, part).indptr)


@pytest.mark.parametrize("interaction", ["mlp", "neumf"])
def test_nmtr_score_block_tiles_match_pairwise_logits(interaction, monkeypatch):
    """score_block's tiled evaluation (users x items tiles through reused buffers, partial tiles at both edges)
    against the training path's pairwise logits, on an unsorted user list and an item range not starting at 0."""
    import mbrec_fast.models.nmtr as nmtr_module
    from mbrec_fast.reference.multibehavior import nmtr_scores_plain
    monkeypatch.setattr(nmtr_module, "EVAL_ITEM_TILE", 7)
    torch.manual_seed(0)
    model = nmtr_module.NMTR(23, 40, 3, dim=8, interaction=interaction, eval_user_block=4).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.5)
    users = torch.tensor([5, 0, 22, 5, 17, 9, 3, 11, 1, 2, 8])
    with torch.no_grad():
        block = model.score_block(users, 3, 38)
        uu, ii = torch.meshgrid(users, torch.arange(3, 38), indexing="ij")
        want = model.logits(uu.reshape(-1), ii.reshape(-1), 2).view(len(users), -1)
        plain = nmtr_scores_plain(model, users, 3, 38, user_block=3)  # the benchmark's baseline computes the same
    torch.testing.assert_close(block, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, want, rtol=1e-5, atol=1e-5)
