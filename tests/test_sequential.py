"""Cross-domain sequential models (SyNCRec, SASRec): data, masking, experts, gap weights, metrics, CLI."""
import json
import math
import os

import numpy as np
import pytest
import torch

from mbrec_fast.data.sequences import (SequenceData, leave_one_out, load_amazon_sequences, load_interaction_log,
                                       make_synthetic_sequences, make_training_windows)
from mbrec_fast.models.sasrec import (CausalEncoder, PerDomainSASRec, SASRec, StackedCausalEncoder, fast_dropout,
                                     histories_to_inputs, sampled_softmax_loss)
from mbrec_fast.models.syncrec import SyNCRec, gap_weights
from mbrec_fast.reference.sequential import full_ranking_metrics_reference, sampled_metrics_reference
from mbrec_fast.training import sequential as S

torch.set_num_threads(1)


def _tiny_data(seed=0, rel=(1.0, 1.0, 0.0), users=120):
    return make_synthetic_sequences(n_users=users, n_domains=3, items_per_domain=20, mean_len=10, n_clusters=4,
                                    relatedness=rel, chain_prob=0.3, seed=seed)


def _batch(data, max_len=12, num_neg=4, users=None, protocol="official"):
    split = leave_one_out(data)
    w = make_training_windows(split.train, data.item_domain, data.n_domains, max_len, data.n_items)
    b = {"users": torch.arange(w["cross_in"].shape[0]) if users is None else users, "epoch": 0, "index": 0}
    return S.materialize(b, w, data.item_domain, data.n_items, num_neg, 0, "cpu", protocol)


# ------------------------------------------------------------------------------------------------ data
def test_amazon_loader_matches_domain_counts(data_dir):
    """The release sample: 500 users, 5 domains; per-domain interaction counts equal amazon5_domains.txt."""
    data = load_amazon_sequences(str(data_dir / "samples" / "amazon5_seq.tsv"))
    assert data.n_users == 500 and data.n_domains == 5
    counts = {}
    with open(data_dir / "samples" / "amazon5_domains.txt") as f:
        next(f)
        for line in f:
            _, name, cnt = line.rstrip("\n").split("\t")
            counts[name] = int(cnt)
    desc = data.describe()
    assert dict(zip(data.domain_names, desc["interactions_per_domain"])) == counts
    # file order is time order; each sequence keeps its length column
    first = open(data_dir / "samples" / "amazon5_seq.tsv").readlines()[1].rstrip("\n").split("\t")
    assert data.seqs[0].numel() == int(first[5])
    assert [data.item_names[i] for i in data.seqs[0][:3].tolist()] == first[2].split(",")[:3]
    # per-domain item sets partition the items
    sets = data.domain_item_sets()
    assert sum(s.numel() for s in sets) == data.n_items
    assert torch.equal(torch.sort(torch.cat(sets)).values, torch.arange(data.n_items))


def test_interaction_log_loader_sorts_by_time_and_rejects_bad_rows(tmp_path):
    """Generic (user, item, domain, timestamp) log: sorted by time per user; an item in two domains is an error."""
    rows = [("u1", "b", "books", 5), ("u1", "a", "toys", 1), ("u2", "a", "toys", 3), ("u1", "c", "books", 9)]
    data = load_interaction_log(rows)
    names = data.item_names
    assert [names[i] for i in data.seqs[0].tolist()] == ["a", "b", "c"]
    assert data.domain_names == ["books", "toys"]
    assert data.item_domain[names.index("a")] == 1
    p = tmp_path / "log.tsv"
    p.write_text("user\titem\tdomain\ttimestamp\nx\ti1\td1\t2\nx\ti2\td2\t1\n")
    d2 = load_interaction_log(str(p))
    assert [d2.item_names[i] for i in d2.seqs[0].tolist()] == ["i2", "i1"]
    with pytest.raises(ValueError, match="two domains"):
        load_interaction_log([("u", "a", "x", 1), ("v", "a", "y", 2)])
    with pytest.raises(ValueError, match="user, item, domain, timestamp"):
        load_interaction_log([("u", "a", "x")])


def test_leave_one_out_and_windows():
    """Last item test, second-to-last validation; windows are SOS-shifted and aligned with the domain subsequences."""
    seqs = [torch.tensor([0, 3, 1, 4, 2]), torch.tensor([5, 0])]
    item_domain = torch.tensor([0, 0, 0, 1, 1, 1])
    data = SequenceData(seqs=seqs, item_domain=item_domain, domain_names=["a", "b"])
    split = leave_one_out(data)
    assert split.eval_users.tolist() == [0]                # user 1 has only 2 items: trains, not evaluated
    assert split.train[0].tolist() == [0, 3, 1] and split.train[1].tolist() == [5, 0]
    assert split.valid_target.tolist() == [4] and split.valid_history[0].tolist() == [0, 3, 1]
    assert split.test_target.tolist() == [2] and split.test_history[0].tolist() == [0, 3, 1, 4]
    w = make_training_windows(split.train, item_domain, 2, max_len=4, n_items=6)
    PAD, SOS = 6, 7
    assert w["cross_in"][0].tolist() == [SOS, 0, 3, PAD] and w["cross_tgt"][0].tolist() == [0, 3, 1, -1]
    assert w["single_in"][0, 0].tolist() == [SOS, 0, PAD, PAD] and w["single_tgt"][0, 0].tolist() == [0, 1, -1, -1]
    assert w["single_tgt"][0, 1].tolist() == [3, -1, -1, -1]
    # align: position of each cross target among its domain's targets
    assert w["align"][0].tolist() == [0, 0, 1, -1]
    for t in range(3):
        d = int(item_domain[w["cross_tgt"][0, t]])
        assert w["single_tgt"][0, d, w["align"][0, t]] == w["cross_tgt"][0, t]
    # truncation keeps the most recent max_len items
    w2 = make_training_windows([torch.arange(6)], item_domain, 2, max_len=3, n_items=6)
    assert w2["cross_tgt"][0].tolist() == [3, 4, 5]


def test_synthetic_generator_is_seeded_and_relatedness_controls_transfer():
    """Same seed -> same data; relatedness 1 ties a domain's cluster to the others, 0 decouples it."""
    a, b = _tiny_data(3), _tiny_data(3)
    assert all(torch.equal(x, y) for x, y in zip(a.seqs, b.seqs))
    c = _tiny_data(4)
    assert not all(torch.equal(x, y) for x, y in zip(a.seqs, c.seqs) if x.numel() == y.numel())
    data = make_synthetic_sequences(n_users=400, n_domains=3, items_per_domain=40, n_clusters=4,
                                    relatedness=[1, 1, 0], chain_prob=0.0, seed=0)
    # cluster of an item = its position in the per-(domain, cluster) split; estimate agreement via co-occurrence:
    # users' majority item block in domain 0 predicts domain 1's block (related) but not domain 2's (unrelated)
    def blocks(seq, d):
        items = seq[data.item_domain[seq] == d]
        return items
    agree = {1: 0, 2: 0}
    pairs = {1: 0, 2: 0}
    # two users share a domain-0 item -> same cluster in domain 0 (items belong to one cluster)
    first0 = {}
    for u, s in enumerate(data.seqs):
        it = blocks(s, 0)
        if it.numel():
            first0.setdefault(int(it[0]), []).append(u)
    for users in first0.values():
        for i in range(len(users) - 1):
            u, v = users[i], users[i + 1]
            for d in (1, 2):
                su, sv = set(blocks(data.seqs[u], d).tolist()), set(blocks(data.seqs[v], d).tolist())
                if su and sv:
                    pairs[d] += 1
                    agree[d] += bool(su & sv)
    assert agree[1] / pairs[1] > agree[2] / pairs[2] + 0.2
    with pytest.raises(ValueError, match="relatedness"):
        make_synthetic_sequences(n_domains=2, relatedness=[1, 2])


# ------------------------------------------------------------------------------------------------ model structure
@pytest.mark.parametrize("which", ["sasrec", "syncrec-single", "syncrec-cross"])  # every encoder path
def test_causal_masking_no_position_sees_the_future(which):
    """Changing tokens after position t leaves the states up to t unchanged, and their gradient w.r.t. the
    future embeddings is exactly zero."""
    torch.manual_seed(0)
    n_items, D, L = 30, 3, 8
    item_domain = torch.arange(n_items) % D
    if which == "sasrec":
        model = SASRec(n_items, D, item_domain, dim=16, n_layers=2, max_len=L, dropout=0.0).eval()
        run = lambda tok: model(tok)  # noqa: E731
        emb = model.item_emb
    else:
        model = SyNCRec(n_items, D, item_domain, dim=16, n_single=2, n_cross=2, n_layers=2, max_len=L, dropout=0.0).eval()
        mode = which.split("-")[1]
        task = torch.tensor([0 if mode == "single" else D])
        run = lambda tok: model.encode(tok, task, mode)  # noqa: E731
        emb = model.item_emb
    tok = torch.randint(0, n_items, (1, L))
    tok[0, 0] = n_items + 1
    h = run(tok)
    for t in range(L - 1):
        tok2 = tok.clone()
        tok2[0, t + 1:] = torch.randint(0, n_items, (L - t - 1,))
        h2 = run(tok2)
        assert torch.allclose(h[0, :t + 1], h2[0, :t + 1], atol=1e-6)
    # gradient: d h[t] / d x[t'] = 0 for t' > t (through the input embeddings)
    x = emb(tok).detach().requires_grad_(True)
    model.item_emb = torch.nn.Identity()
    try:
        feats = x
        if which == "sasrec":
            hh = model.encoder(feats * model.dim ** 0.5 + model.pos_emb(torch.arange(L)) + model.dom_emb(model.token_domain[tok]))
        else:
            x_in = feats * model.dim ** 0.5 + model.dom_emb(model.token_domain[tok]) + model.pos_emb(torch.arange(L))
            hh = (model.single_experts(x_in).sum(0) + model.cross_experts(x_in).sum(0)).view(1, L, -1)
        t = 3
        (hh[0, t] * torch.randn(hh.shape[-1])).sum().backward()  # LayerNorm outputs sum to a constant
        assert x.grad[0, t + 1:].abs().max() == 0
        assert x.grad[0, :t + 1].abs().max() > 0
    finally:
        model.item_emb = emb


def test_experts_have_distinct_parameters_and_asymmetric_gradients():
    """Every expert has its own slice of the stacked parameters, with its own values; the SDSR pass trains no cross
    expert and the CDSR pass no single expert (the detached group), while both passes train every expert of their
    own group and the embeddings."""
    data = _tiny_data()
    model = SyNCRec(data.n_items, 3, data.item_domain, dim=16, n_single=2, n_cross=3, max_len=12, dropout=0.0)
    assert len(model.single_experts) == 2 and len(model.cross_experts) == 3
    assert not ({p.data_ptr() for p in model.single_experts.parameters()}
                & {p.data_ptr() for p in model.cross_experts.parameters()})
    w0 = torch.cat([model.single_experts.qkv_weight[0], model.cross_experts.qkv_weight[0]])   # [5, 3d, d] layer 0
    assert all(not torch.equal(w0[i], w0[j]) for i in range(5) for j in range(i + 1, 5))     # independent init
    tok = torch.randint(0, data.n_items, (4, 12))
    tok[1, 5:] = data.n_items  # padding: the packed positions
    for mode, own, other in (("single", model.single_experts, model.cross_experts),
                             ("cross", model.cross_experts, model.single_experts)):
        model.zero_grad(set_to_none=True)
        task = torch.full((4,), 0 if mode == "single" else 3)
        model.encode(tok, task, mode).pow(2).sum().backward()
        assert all(p.grad is None for p in other.parameters())
        for name, p in own.named_parameters():   # every expert of the own group, every layer
            assert p.grad is not None and bool((p.grad.flatten(2).abs().sum(-1) > 0).all()), name
        assert model.item_emb.weight.grad is not None
        # output heads (fused op): only the own group's heads get gradient
        own = slice(0, 2) if mode == "single" else slice(2, 5)
        oth = slice(2, 5) if mode == "single" else slice(0, 2)
        assert model.head_weight.grad[oth].abs().sum() == 0 and model.head_weight.grad[own].abs().sum() > 0
        # gates of both partitions of this task learn (the gate sees the detached outputs as constants)
        t = int(task[0])
        assert model.gate_single.grad[t].abs().sum() > 0 and model.gate_cross.grad[t].abs().sum() > 0
        others = [k for k in range(4) if k != t]
        assert model.gate_single.grad[others].abs().sum() == 0


def _per_expert_state(stack: StackedCausalEncoder, prefix: str = "") -> dict:
    """The stacked parameters in the earlier layout: one CausalEncoder per expert (`<e>.layers.<l>.<param>`)."""
    return {f"{prefix}{e}.layers.{l}.{key}": getattr(stack, name)[l, e].detach().clone()
            for name, key in StackedCausalEncoder.LAYER_KEYS.items()
            for e in range(stack.n_experts) for l in range(stack.n_layers)}


def test_stacked_encoder_equals_a_list_of_causal_encoders():
    """The batched expert group: initialised with the same draws as a ModuleList of CausalEncoders (same seed, same
    values), and the same outputs and input gradients as those modules (torch's TransformerEncoderLayer), also on
    the packed non-padding positions; the per-expert checkpoint layout loads."""
    torch.manual_seed(5)
    encoders = torch.nn.ModuleList([CausalEncoder(16, 2, 2, 0.1, final_norm=False) for _ in range(3)])
    torch.manual_seed(5)
    stack = StackedCausalEncoder(3, 16, 2, 2, 0.1)
    other = StackedCausalEncoder(3, 16, 2, 2, 0.1)          # other draws
    other.load_state_dict(encoders.state_dict())            # the per-expert layout (strict)
    for name in StackedCausalEncoder.LAYER_KEYS:
        assert torch.equal(getattr(stack, name), getattr(other, name)), name
    encoders.eval(), stack.eval()
    x = torch.randn(4, 9, 16, requires_grad=True)
    keep = torch.ones(4, 9, dtype=torch.bool)
    keep[1, 3:], keep[3, 7:] = False, False
    for impl in ("forward", "forward_loop"):
        for k in (None, keep):
            ref = torch.stack([e(x) for e in encoders])              # [E, B, L, d]
            got = getattr(stack, impl)(x, k)
            want = ref.flatten(1, 2) if k is None else ref.flatten(1, 2)[:, k.flatten()]
            assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5), (impl, k is None)
            g_got, = torch.autograd.grad((got * torch.linspace(-1, 1, got.numel()).view_as(got)).sum(), x)
            g_want, = torch.autograd.grad((want * torch.linspace(-1, 1, want.numel()).view_as(want)).sum(), x)
            assert torch.allclose(g_got, g_want, atol=1e-5), (impl, k is None)


@pytest.mark.parametrize("n_single", [1, 0])  # with and without the single-domain group
def test_checkpoints_with_per_expert_keys_load(n_single):
    """A SyNCRec state dict of the earlier layout (one CausalEncoder per expert) loads strictly into the stacked
    model and gives the same parameters and states; a seeded model draws the same initial values as before."""
    data = _tiny_data()
    torch.manual_seed(0)
    m = SyNCRec(data.n_items, 3, data.item_domain, dim=8, n_single=n_single, n_cross=2, max_len=8, dropout=0.0)
    old = {k: v for k, v in m.state_dict().items() if not k.startswith(("single_experts.", "cross_experts."))}
    old.update(_per_expert_state(m.cross_experts, "cross_experts."))
    old.update(_per_expert_state(m.single_experts, "single_experts."))
    torch.manual_seed(1)
    fresh = SyNCRec(data.n_items, 3, data.item_domain, dim=8, n_single=n_single, n_cross=2, max_len=8, dropout=0.0)
    fresh.load_state_dict(old)
    for k, v in m.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    tok = torch.randint(0, data.n_items, (2, 8))
    task = torch.full((2,), 3)
    assert torch.equal(m.eval().encode(tok, task, "cross"), fresh.eval().encode(tok, task, "cross"))
    # the earlier model built its experts as CausalEncoders right after the embeddings: the same draws now
    torch.manual_seed(0)
    torch.nn.Embedding(data.n_items + 2, 8), torch.nn.Embedding(4, 8), torch.nn.Embedding(8, 8)
    before = [CausalEncoder(8, 2, 2, 0.0, final_norm=False) for _ in range(n_single + 2)]
    stacked = torch.cat([m.single_experts.ff1_weight, m.cross_experts.ff1_weight], 1)
    for e, enc in enumerate(before):
        assert torch.equal(stacked[1, e], enc.layers[1].linear1.weight)


def test_fast_dropout_is_inverted_dropout():
    """Zero with probability p, the kept values scaled by 1 / (1 - p); identity in eval or at p = 0; seeded."""
    x = torch.ones(200_000)
    torch.manual_seed(0)
    y = fast_dropout(x, 0.2, True)
    assert set(torch.unique(y).tolist()) == {0.0, 1.25}
    assert abs(float((y == 0).float().mean()) - 0.2) < 0.005
    torch.manual_seed(0)
    assert torch.equal(y, fast_dropout(x, 0.2, True))
    assert fast_dropout(x, 0.2, False) is x and fast_dropout(x, 0.0, True) is x
    g = torch.ones(10, requires_grad=True)
    torch.manual_seed(1)
    out = fast_dropout(g, 0.5, True)
    out.sum().backward()
    assert torch.equal(g.grad, out.detach())   # gradient = the mask's scale where kept, 0 where dropped


@pytest.mark.parametrize("mode", ["single", "cross"])  # both passes (different detached groups)
def test_fused_expert_mix_matches_loop(mode):
    """The fused pass (each group's trunks as one batched transformer on the non-padding positions, heads +
    partitioned mixture through mbrec_fast.gated_experts) equals the loop twin (one expert at a time through torch's
    functional attention on the whole padded rows, heads as a Python loop), values and gradients of every
    parameter."""
    data = _tiny_data()
    torch.manual_seed(0)
    m = SyNCRec(data.n_items, 3, data.item_domain, dim=8, n_single=2, n_cross=3, max_len=7, dropout=0.0, r=0.7)
    tok = torch.randint(0, data.n_items, (3, 7))
    tok[0, 4:], tok[2, 6:] = data.n_items, data.n_items   # padding tails: the fused trunks skip them
    task = torch.tensor([0, 1, 2]) if mode == "single" else torch.full((3,), 3)
    res = {}
    for impl in ("fused", "loop"):
        m.expert_impl = impl
        m.zero_grad(set_to_none=True)
        h = m.encode(tok, task, mode)
        (h * torch.linspace(-1, 1, h.numel()).view_as(h)).sum().backward()
        res[impl] = (h.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert torch.allclose(res["fused"][0], res["loop"][0], atol=1e-5)
    assert res["fused"][1].keys() == res["loop"][1].keys()
    for n in res["loop"][1]:
        assert torch.allclose(res["fused"][1][n], res["loop"][1][n], atol=1e-5), n


def test_partitioned_gate_ratio():
    """r = 1 makes a pass depend on its own group only; r = 0 on the other group only."""
    data = _tiny_data()
    tok = torch.randint(0, data.n_items, (2, 6))
    for r in (1.0, 0.0):
        torch.manual_seed(0)
        m = SyNCRec(data.n_items, 3, data.item_domain, dim=8, max_len=6, dropout=0.0, r=r).eval()
        h = m.encode(tok, torch.tensor([3, 3]), "cross")
        with torch.no_grad():
            for p in (m.single_experts if r == 1.0 else m.cross_experts).parameters():
                p.add_(torch.randn_like(p))
            heads = slice(0, m.n_single) if r == 1.0 else slice(m.n_single, None)
            m.head_weight[heads] += 1.0
        assert torch.allclose(h, m.encode(tok, torch.tensor([3, 3]), "cross"), atol=1e-6)


# ------------------------------------------------------------------------------------------------ losses
def test_gap_weights_function():
    """Softmax with temperature, mean 1 over present domains, smoothing toward uniform, absent domains 0."""
    g = torch.tensor([0.0, 1.0, -1.0])
    w = gap_weights(g, 1.0)
    assert torch.allclose(w, 3 * torch.softmax(g, 0)) and abs(float(w.mean()) - 1) < 1e-6
    assert torch.allclose(gap_weights(g, 1e6), torch.ones(3), atol=1e-4)          # hot: uniform
    assert torch.allclose(gap_weights(g, 1.0, eps=1.0), torch.ones(3))            # full smoothing: uniform
    assert int(torch.argmax(gap_weights(g, 0.1))) == 1                            # larger gap, larger weight
    w = gap_weights(g, 1.0, present=torch.tensor([True, False, True]))
    assert w[1] == 0 and torch.allclose(w.sum(), torch.tensor(2.0))
    with pytest.raises(ValueError, match="temperature"):
        gap_weights(g, 0.0)


@pytest.mark.parametrize("gap_grad", ["detach", "cross"])  # the two documented gradient behaviours
def test_gap_weight_gradient_behaviour(gap_grad):
    """detach: the loss gradient equals that of sum(L_single) + sum(w L_cross) + mi with w constant;
    cross: it differs from that only through the cross losses (single-domain-only parameters see no difference)."""
    data = _tiny_data()
    batch = _batch(data)
    torch.manual_seed(0)
    m = SyNCRec(data.n_items, 3, data.item_domain, dim=8, max_len=12, dropout=0.0, mi_weight=0.0, gap_grad=gap_grad,
                momentum=0.5, temperature=1.0, domain_loss="mean")
    m.losses(batch)  # warm the EMA
    m.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    out = m.losses(batch)
    out["loss"].backward()
    g_full = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    # the same loss with the weights as constants
    m.zero_grad(set_to_none=True)
    m.gap_ema.copy_(m.gap_ema)  # unchanged buffers; recompute the parts without touching the EMA
    torch.manual_seed(1)
    parts = m.losses(batch, update_ema=False)
    present = parts["present"]
    # rebuild the loss from differentiable per-domain losses with constant weights
    s_loss, c_loss = _per_domain_losses(m, batch)
    w = out["weights"]
    const = s_loss[present].sum() / present.sum() + (w * c_loss)[present].sum() / present.sum()
    const.backward()
    g_const = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    single_only = [n for n in g_full if n.startswith("single_experts")]
    assert single_only
    for n in single_only:  # single experts get gradient only from the single losses, unweighted in both modes
        assert torch.allclose(g_full[n], g_const[n], atol=1e-6)
    cross_only = [n for n in g_full if n.startswith("cross_experts")]
    diff = max(float((g_full[n] - g_const[n]).abs().max()) for n in cross_only)
    if gap_grad == "detach":
        assert diff < 1e-6
    else:
        assert diff > 1e-7


def _per_domain_losses(m, batch):
    """Per-domain single and cross losses with gradient (mirrors SyNCRec.losses, for the gradient test)."""
    from mbrec_fast.models.syncrec import _domain_means
    D = m.n_domains
    B, _, L = batch["single_in"].shape
    s_in = batch["single_in"].reshape(B * D, L)
    s_tgt = batch["single_tgt"].reshape(B * D, L)
    s_neg = batch["single_neg"].reshape(B * D, L, -1)
    task = torch.arange(D).repeat(B)
    rows = torch.nonzero(s_tgt[:, 0] >= 0).flatten()
    l_s, v_s = sampled_softmax_loss(m.encode(s_in[rows], task[rows], "single"), m.item_emb.weight, s_tgt[rows], s_neg[rows])
    l_c, v_c = sampled_softmax_loss(m(batch["cross_in"]), m.item_emb.weight, batch["cross_tgt"], batch["cross_neg"])
    dom_c = m.token_domain[batch["cross_tgt"].clamp_min(0)].masked_fill(~v_c, D)
    return (_domain_means(l_s, v_s, task[rows][:, None].expand_as(v_s), D)[0], _domain_means(l_c, v_c, dom_c, D)[0])


def test_negatives_are_domain_restricted_for_the_single_task():
    """Domain protocol: single-domain negatives lie in the position's domain and outside the row; cross negatives
    outside the row."""
    data = _tiny_data()
    b = _batch(data, num_neg=6, protocol="domain")
    tgt, neg = b["single_tgt"], b["single_neg"]
    valid = tgt >= 0
    dom_t = data.item_domain[tgt.clamp_min(0)]
    assert bool((data.item_domain[neg.clamp_min(0)] == dom_t[..., None])[valid].all())
    assert bool((neg[valid] >= 0).all())
    for u in range(4):
        row = set(b["cross_tgt"][u][b["cross_tgt"][u] >= 0].tolist())
        n = b["cross_neg"][u][b["cross_tgt"][u] >= 0]
        assert not (set(n.flatten().tolist()) & row)


def test_mi_loss_is_finite_and_trains_the_discriminator():
    data = _tiny_data()
    b = _batch(data)
    m = SyNCRec(data.n_items, 3, data.item_domain, dim=8, max_len=12, dropout=0.0, mi_weight=1.0)
    out = m.losses(b)
    assert torch.isfinite(out["mi"]) and out["mi"] > 0
    out["loss"].backward()
    assert m.mi_bilinear.grad.abs().sum() > 0


def _train_gaps(rel, epochs=12):
    torch.manual_seed(0)
    data = make_synthetic_sequences(n_users=600, n_domains=3, items_per_domain=40, mean_len=15, n_clusters=4,
                                    relatedness=rel, chain_prob=0.3, seed=0)
    split = leave_one_out(data)
    w = make_training_windows(split.train, data.item_domain, 3, 20, data.n_items)
    m = SyNCRec(data.n_items, 3, data.item_domain, dim=16, n_single=1, n_cross=1, n_layers=1, max_len=20, dropout=0.0,
                momentum=0.8)
    opt = torch.optim.Adam(m.parameters(), lr=5e-3)
    for ep in range(epochs):
        for batch in S.make_batches(w["cross_in"].shape[0], 64, 0, ep):
            out = m.losses(S.materialize(batch, w, data.item_domain, data.n_items, 8, 0, "cpu"))
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
    return m.gap_ema.clone(), m.current_weights()


@pytest.mark.parametrize("planted", [2, 0, None])  # the planted domain at either end (not an index artifact); none
def test_loss_weights_respond_to_planted_negative_transfer(planted):
    """Tiny planted case, official protocol, default temperature: the domain unrelated to the others gets the
    largest negative-transfer gap and a cross-loss weight well below the related domains' (the paper's direction);
    without a planted domain the weights stay near 1."""
    rel = [1.0, 1.0, 1.0]
    if planted is not None:
        rel[planted] = 0.0
    gaps, weights = _train_gaps(rel)
    if planted is None:
        assert float((weights - 1).abs().max()) < 0.15, (gaps, weights)
        return
    others = [d for d in range(3) if d != planted]
    assert int(torch.argmin(weights)) == planted, (gaps, weights)
    assert float(gaps[planted]) > max(float(gaps[d]) for d in others) + 0.1, (gaps, weights)
    assert float(weights[planted]) < 0.5 * min(float(weights[d]) for d in others), (gaps, weights)


# ------------------------------------------------------------------------------------------------ metrics
@pytest.mark.parametrize("ties", [False, True])  # continuous scores; heavy ties (rounded scores)
def test_sampled_metrics_match_bruteforce(ties):
    g = torch.Generator().manual_seed(0)
    U, M = 60, 100
    pos = torch.randn(U, generator=g)
    neg = torch.randn(U, M, generator=g) - 1.0
    if ties:
        pos, neg = pos.round(), neg.round()
    groups = torch.randint(0, 3, (U,), generator=g)
    got = S.sampled_metrics(pos, neg, torch.ones_like(neg, dtype=torch.bool), groups, ["a", "b", "c"])
    ref = sampled_metrics_reference(pos, neg, groups, S.KS, ["a", "b", "c"])
    assert got.keys() == ref.keys()
    for k in ref:
        for m in ref[k]:
            assert math.isclose(got[k][m], ref[k][m], abs_tol=1e-9), (k, m)


@pytest.mark.parametrize("model_kind,candidates", [
    ("syncrec", "domain"),      # one item table, domain-restricted ranking (score_fn offsets)
    ("syncrec", "all"),         # unrestricted ranking
    ("sasrec-single", "domain"),  # one item table per domain: score_fn picks the table per user
])
def test_evaluate_model_matches_bruteforce(model_kind, candidates):
    """Both protocols of evaluate_model agree with a brute-force ranking of the same scores."""
    data = _tiny_data(users=80)
    split = leave_one_out(data)
    torch.manual_seed(0)
    if model_kind == "syncrec":
        model = SyNCRec(data.n_items, 3, data.item_domain, dim=8, max_len=12, dropout=0.0).eval()
    else:
        model = PerDomainSASRec(data.n_items, 3, data.item_domain, dim=8, n_layers=1, max_len=12, dropout=0.0).eval()
    ctx = S.make_eval_context(split, "test", n_neg=30, seed=3, protocol="domain" if candidates == "domain" else "official")
    # sampled negatives: outside the user's whole sequence, in the target's domain when restricted, distinct
    for u in range(len(ctx.histories)):
        n = ctx.negatives[u][ctx.negatives[u] >= 0]
        assert n.unique().numel() == n.numel()
        assert not (set(n.tolist()) & set(ctx.histories[u].tolist() + [int(ctx.targets[u])]))
        if candidates == "domain":
            assert bool((data.item_domain[n] == ctx.target_domains[u]).all())
    got = S.evaluate_model(model, ctx)
    states, tables = S._states_and_tables(model, ctx)
    with torch.no_grad():
        scores = torch.stack([states[u] @ tables[int(ctx.target_domains[u]) if len(tables) > 1 else 0].T
                              for u in range(states.shape[0])])
    pos = scores.gather(1, ctx.targets[:, None])[:, 0]
    neg = scores.gather(1, ctx.negatives.clamp_min(0))
    neg = neg.masked_fill(ctx.negatives < 0, -math.inf)
    ref_s = sampled_metrics_reference(pos, neg, ctx.target_domains, S.KS, data.domain_names)
    full_scores = scores.clone()
    if candidates == "domain":
        full_scores = full_scores - 1e9 * (data.item_domain[None, :] != ctx.target_domains[:, None]).float()
    ref_f = full_ranking_metrics_reference(full_scores, [h.tolist() for h in ctx.histories], ctx.targets,
                                           ctx.target_domains, S.KS, data.domain_names)
    for g, ms in ref_s.items():
        for k, v in ms.items():
            key = f"sampled_{k}" if g == "all" else f"sampled_{k}_{g}"
            assert math.isclose(got[key], v, abs_tol=1e-6), key
    for g, ms in ref_f.items():
        for k, v in ms.items():
            key = f"full_{k}" if g == "all" else f"full_{k}_{g}"
            assert math.isclose(got[key], v, abs_tol=1e-6), key


def test_eval_negatives_are_seeded_per_user():
    data = _tiny_data(users=50)
    split = leave_one_out(data)
    a = S.make_eval_context(split, "test", 10, seed=1).negatives
    b = S.make_eval_context(split, "test", 10, seed=1).negatives
    c = S.make_eval_context(split, "test", 10, seed=2).negatives
    assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------------------------------------------ CLI
@pytest.mark.parametrize("model", [["--model", "syncrec"], ["--model", "sasrec", "--setting", "single"],
                                   ["--model", "sasrec", "--setting", "cross"]])  # every CLI model
def test_cli_smoke_on_amazon_sample(data_dir, tmp_path, model):
    """`mbrec-fast train` on the Amazon sample writes metrics/history/curves/checkpoints; `evaluate` reloads."""
    from mbrec_fast.cli import main
    run = tmp_path / "run"
    argv = ["train", *model, "--data", "amazon", "--data-path", str(data_dir / "samples" / "amazon5_seq.tsv"),
            "--epochs", "1", "--dim", "8", "--max-len", "10", "--batch-size", "256", "--num-neg", "2",
            "--eval-neg", "20", "--threads", "1", "--run-dir", str(run)]
    assert main(argv) == 0
    for f in ("metrics.json", "history.json", "curves.png", "checkpoint.pt", "best.pt"):
        assert (run / f).is_file(), f
    m = json.load(open(run / "metrics.json"))
    for key in ("sampled_hr@10", "sampled_ndcg@10", "sampled_mrr", "full_hr@10", "full_ndcg@10", "full_mrr@10",
                "sampled_hr@1_Books", "full_ndcg@5_Video_Games"):
        assert key in m["test"] and 0.0 <= m["test"][key] <= 1.0, key
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--output", str(out)]) == 0
    ev = json.load(open(out))
    assert math.isclose(ev["sampled_ndcg@10"], m["test"]["sampled_ndcg@10"], abs_tol=1e-9)


def test_interrupted_training_resumes_exactly(tmp_path):
    """--max-steps stops mid-epoch with a checkpoint; --resume finishes with the metrics of an uninterrupted run
    (negatives keyed by (seed, epoch, batch), the EMA gap buffers in the state dict, RNG restored)."""
    common = ["--model", "syncrec", "--data", "synthetic", "--syn-users", "80", "--syn-items", "20", "--syn-len", "8",
              "--syn-clusters", "4", "--epochs", "2", "--batch-size", "32", "--dim", "8", "--max-len", "8",
              "--num-neg", "3", "--eval-neg", "10", "--threads", "1", "--dropout", "0.1"]
    full = S.run_training(S.build_parser().parse_args(common + ["--run-dir", str(tmp_path / "a")]), progress=False)
    part = S.run_training(S.build_parser().parse_args(common + ["--run-dir", str(tmp_path / "b"), "--max-steps", "4"]),
                          progress=False)
    assert part["interrupted"]
    done = S.run_training(S.build_parser().parse_args(common + ["--run-dir", str(tmp_path / "b"), "--resume",
                                                                str(tmp_path / "b" / "checkpoint.pt")]), progress=False)
    assert done["test"] == full["test"]
    assert done["gap_ema"] == full["gap_ema"]


# ------------------------------------------------------------------------------------------------ issue 16
def test_amazon_toys_games_loader_on_the_real_file(data_dir):
    """The real log: 7,996 users, 197,358 events, per-domain events and items as its README; each sequence is the
    user's events in position order; leave-one-out evaluates every user (all have >= 6 events)."""
    from mbrec_fast.data.sequences import load_amazon_toys_games
    path = data_dir / "amazon_toys_games" / "interactions.tsv"
    data = load_amazon_toys_games(str(path))
    desc = data.describe()
    assert data.n_users == 7996 and desc["interactions"] == 197358
    assert data.domain_names == ["Toys_and_Games", "Video_Games"]
    assert desc["interactions_per_domain"] == [114487, 82871]
    assert [int((data.item_domain == d).sum()) for d in range(2)] == [37868, 11735]
    # spot-check a few users against the file, sorted by the position column
    rows = {}
    with open(path) as f:
        next(f)
        for line in f:
            u, it, dom, t = line.rstrip("\n").split("\t")
            if u in (data.user_names[0], data.user_names[123], data.user_names[-1]):
                rows.setdefault(u, []).append((int(t), it, dom))
    for u in (0, 123, data.n_users - 1):
        evs = sorted(rows[data.user_names[u]])
        assert [t for t, _, _ in evs] == list(range(len(evs)))
        assert [data.item_names[i] for i in data.seqs[u].tolist()] == [it for _, it, _ in evs]
        assert [data.domain_names[int(data.item_domain[i])] for i in data.seqs[u].tolist()] == [d for _, _, d in evs]
    split = leave_one_out(data)
    assert split.n_short == 0 and split.eval_users.numel() == 7996
    u = 123
    assert split.test_target[u] == data.seqs[u][-1] and split.valid_target[u] == data.seqs[u][-2]
    assert torch.equal(split.train[u], data.seqs[u][:-2])


def test_loader_bad_input_is_a_clear_error(tmp_path):
    """An item in two domains, a missing column, a short row or a non-numeric timestamp: ValueError naming the
    file (and line); sequences shorter than 3 are counted by the split, not evaluated."""
    p = tmp_path / "log.tsv"
    head = "user\titem\tdomain\ttimestamp\n"
    cases = [(head + "u\ta\ttoys\t0\nv\ta\tgames\t0\n", r"log\.tsv.*'a' appears in two domains"),
             ("user\titem\tdomain\nu\ta\ttoys\n", r"log\.tsv.*lacks column.*timestamp"),
             (head + "u\ta\ttoys\t0\nu\tb\n", r"log\.tsv, line 3"),
             (head + "u\ta\ttoys\tyesterday\n", r"line 2: timestamp 'yesterday' is not a number")]
    for text, message in cases:
        p.write_text(text)
        with pytest.raises(ValueError, match=message):
            load_interaction_log(str(p))
    with pytest.raises(FileNotFoundError):
        load_interaction_log(str(tmp_path / "missing.tsv"))
    data = load_interaction_log([("u", "a", "x", 0), ("u", "b", "x", 1), ("v", "a", "x", 0), ("v", "b", "x", 1),
                                 ("v", "c", "x", 2)])
    split = leave_one_out(data)
    assert split.n_short == 1 and split.eval_users.tolist() == [1]


def test_unknown_protocol_is_rejected():
    data = _tiny_data(users=20)
    split = leave_one_out(data)
    with pytest.raises(ValueError, match="protocol must be one of"):
        S.make_eval_context(split, "test", 10, protocol="everything")
    with pytest.raises(ValueError, match="protocol must be one of"):
        _batch(data, protocol="all")
    with pytest.raises(SystemExit):
        S.build_parser().parse_args(["--model", "syncrec", "--protocol", "nope"])


@pytest.mark.parametrize("protocol", ["official", "domain"])  # both candidate protocols
def test_candidates_match_bruteforce_reference(protocol):
    """Training negatives (every model's: cross and single positions) lie in the brute-force pool of their target
    (outside the user's window; the target's domain under "domain"), the single-domain twin of a merged position has
    its negatives; the evaluation draw equals the reference draw item for item."""
    from mbrec_fast.reference.sequential import eval_negatives_reference, negative_pool_reference
    data = _tiny_data(users=60)
    dom = data.item_domain.tolist()
    b = _batch(data, max_len=12, num_neg=5, protocol=protocol)
    B, D, Ls = b["single_tgt"].shape
    n_checked = 0
    for u in range(B):
        window = b["cross_tgt"][u][b["cross_tgt"][u] >= 0].tolist()
        for t, tgt in enumerate(window):
            pool = set(negative_pool_reference(window, tgt, dom, protocol))
            negs = b["cross_neg"][u, t].tolist()
            assert len(negs) == 5 and set(negs) <= pool, (u, t)
            d, j = dom[tgt], int(b["align"][u, t])
            assert int(b["single_tgt"][u, d, j]) == tgt and b["single_neg"][u, d, j].tolist() == negs
            n_checked += 1
    assert n_checked > 200
    assert bool((b["single_neg"][b["single_tgt"] < 0] == -1).all())
    if protocol == "official":  # all items: some negatives come from other domains than the target's
        tdom = data.item_domain[b["cross_tgt"].clamp_min(0)]
        ndom = data.item_domain[b["cross_neg"].clamp_min(0)]
        assert bool((ndom != tdom[..., None])[b["cross_tgt"] >= 0].any())
    split = leave_one_out(data)
    ctx = S.make_eval_context(split, "valid", n_neg=25, seed=7, protocol=protocol)
    for u in range(len(ctx.histories)):
        ref = eval_negatives_reference(ctx.histories[u].tolist(), int(ctx.targets[u]), dom, 25, 7, u, protocol)
        got = ctx.negatives[u][ctx.negatives[u] >= 0].tolist()
        assert got == ref, u


def test_trimmed_windows_change_no_state():
    """materialize cuts the all-padding tail; left-aligned inputs and causal attention make that exact."""
    data = _tiny_data(users=30)
    split = leave_one_out(data)
    w = make_training_windows(split.train, data.item_domain, 3, 40, data.n_items)
    b = S.materialize({"users": torch.arange(8), "epoch": 0, "index": 0}, w, data.item_domain, data.n_items, 3, 0, "cpu")
    L = b["cross_in"].shape[1]
    assert L < 40 and bool((w["cross_tgt"][:8, L:] < 0).all())
    torch.manual_seed(0)
    m = SASRec(data.n_items, 3, data.item_domain, dim=8, n_layers=2, max_len=40, dropout=0.0).eval()
    with torch.no_grad():
        assert torch.allclose(m(w["cross_in"][:8])[:, :L], m(b["cross_in"]), atol=1e-5)


def test_reweighting_direction_and_variants():
    """"lower" gives the largest gap (most negative transfer) the smallest weight, "raise" the largest, "none" 1;
    all keep mean 1 over the present domains."""
    data = _tiny_data(users=20)
    gaps = torch.tensor([0.05, 0.0, 0.4])
    w = {}
    for mode in ("lower", "raise", "none"):
        m = SyNCRec(data.n_items, 3, data.item_domain, dim=8, max_len=6, reweight=mode, temperature=0.1)
        w[mode] = m.weights_from_gaps(gaps)
        assert abs(float(w[mode].mean()) - 1) < 1e-6
    assert int(torch.argmin(w["lower"])) == 2 and float(w["lower"][2]) < 0.2 < 1 < float(w["lower"][1])
    assert int(torch.argmax(w["raise"])) == 2
    assert torch.equal(w["none"], torch.ones(3))
    with pytest.raises(ValueError, match="reweight"):
        SyNCRec(data.n_items, 3, data.item_domain, reweight="up")
    with pytest.raises(ValueError, match="domain_loss"):
        SyNCRec(data.n_items, 3, data.item_domain, domain_loss="max")


def test_summed_domain_losses_and_weights_in_the_loss():
    """domain_loss "sum": loss = (sum_d S_single_d + sum_d w_d S_cross_d) / #targets + mi_weight * MI, with
    S_*_d the summed per-position losses of domain d (the official per-domain sums)."""
    from mbrec_fast.models.syncrec import _domain_means
    data = _tiny_data()
    batch = _batch(data)
    torch.manual_seed(0)
    m = SyNCRec(data.n_items, 3, data.item_domain, dim=8, max_len=12, dropout=0.0, mi_weight=0.0, n_layers=1)
    m.losses(batch)
    m.eval()
    out = m.losses(batch, update_ema=False)
    s_d, c_d = _per_domain_losses(m, batch)
    n = torch.bincount(data.item_domain[batch["cross_tgt"][batch["cross_tgt"] >= 0]], minlength=3).float()
    want = ((s_d * n).sum() + (out["weights"] * c_d * n).sum()) / n.sum()
    assert torch.allclose(out["loss"], want, atol=1e-5)
    assert not torch.allclose(out["weights"], torch.ones(3), atol=1e-3)


def test_ablation_without_single_experts_shares_the_cross_group():
    """n_single=0: both passes run (and train) the cross experts; the gap is still measured per domain."""
    data = _tiny_data()
    batch = _batch(data)
    m = SyNCRec(data.n_items, 3, data.item_domain, dim=8, max_len=12, dropout=0.0, n_single=0, n_cross=2, n_layers=1)
    assert len(m.single_experts) == 0 and m.gate_single is None
    tok = batch["single_in"][:4, 0]
    m.encode(tok, torch.zeros(4, dtype=torch.int64), "single").pow(2).sum().backward()
    assert all(p.grad is not None for p in m.cross_experts.parameters() if p.requires_grad)
    m.zero_grad(set_to_none=True)
    out = m.losses(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and bool(out["present"].all())


@pytest.mark.parametrize("protocol", ["official", "domain"])  # both candidate sets
def test_per_domain_item_scoring_matches_bruteforce(protocol):
    """per_domain_scoring="item": every candidate scored by its own domain's SASRec (no target-domain oracle);
    both protocols agree with a brute-force ranking of those scores."""
    data = _tiny_data(users=60)
    split = leave_one_out(data)
    torch.manual_seed(0)
    model = PerDomainSASRec(data.n_items, 3, data.item_domain, dim=8, n_layers=1, max_len=12, dropout=0.0).eval()
    ctx = S.make_eval_context(split, "test", n_neg=20, seed=2, protocol=protocol)
    got = S.evaluate_model(model, ctx, per_domain_scoring="item")
    U = len(ctx.histories)
    with torch.no_grad():
        states = [model.user_repr(ctx.histories, torch.full((U,), d)) for d in range(3)]
        scores = torch.stack([torch.stack([states[int(data.item_domain[i])][u] @ model.models[int(data.item_domain[i])].items[i]
                                           for i in range(data.n_items)]) for u in range(U)])
    neg = scores.gather(1, ctx.negatives.clamp_min(0)).masked_fill(ctx.negatives < 0, -math.inf)
    ref_s = sampled_metrics_reference(scores.gather(1, ctx.targets[:, None])[:, 0], neg, ctx.target_domains, S.KS,
                                      data.domain_names)
    full_scores = scores - 1e9 * (data.item_domain[None, :] != ctx.target_domains[:, None]).float() \
        if protocol == "domain" else scores
    ref_f = full_ranking_metrics_reference(full_scores, [h.tolist() for h in ctx.histories], ctx.targets,
                                           ctx.target_domains, S.KS, data.domain_names)
    for prefix, ref in (("sampled", ref_s), ("full", ref_f)):
        for g, ms in ref.items():
            for k, v in ms.items():
                key = f"{prefix}_{k}" if g == "all" else f"{prefix}_{k}_{g}"
                assert math.isclose(got[key], v, abs_tol=1e-5), key
    with pytest.raises(ValueError, match="per_domain_scoring"):
        S.evaluate_model(model, ctx, per_domain_scoring="oracle")


# ------------------------------------------------------------------------------------------------ model defaults
def test_model_options_default_to_the_constructors_and_record_the_old_values():
    """The model options parse to None ("the model's default"); resolved, they are SyNCRec's / SASRec's constructor
    defaults, and the recorded config carries the values earlier runs recorded (old checkpoints still resume)."""
    from mbrec_fast.models.base import constructor_defaults
    recorded = dict(max_len=50, dim=64, layers=2, heads=2, dropout=0.2, n_single=1, n_cross=4, r=0.8, temperature=1.0,
                    momentum=0.9, smoothing=0.1, reweight="lower", domain_loss="sum", mi_weight=1.0, gap_grad="detach")
    assert set(recorded) == set(S.MODEL_OPTIONS)
    for model, cls in (("syncrec", SyNCRec), ("sasrec", SASRec)):
        args = S.build_parser().parse_args(["--model", model])
        assert all(getattr(args, dest) is None for dest in S.MODEL_OPTIONS), model
        S.resolve_model_defaults(args)
        assert {k: getattr(args, k) for k in recorded} == recorded, model
        defaults = constructor_defaults(cls)
        assert all(getattr(args, dest) == defaults[key] for dest, key in S.MODEL_OPTIONS.items() if key in defaults)
    args = S.resolve_model_defaults(S.build_parser().parse_args(["--model", "syncrec", "--dim", "32", "--r", "0.5"]))
    assert (args.dim, args.r, args.n_cross) == (32, 0.5, 4)


def test_model_option_help_reads_the_signatures():
    from mbrec_fast.models.sasrec import DIM, DROPOUT, MAX_LEN, N_HEADS, N_LAYERS
    help_text = " ".join(S.build_parser().format_help().split())
    for text in (f"longest history window fed to the model (default {MAX_LEN})",
                 f"embedding and transformer width (default {DIM};", f"per SASRec (default {N_LAYERS})",
                 f"attention heads (default {N_HEADS})", f"dropout rate (default {DROPOUT:g})",
                 "cross-domain experts (default 4)", "(default 0.8)", "(default lower)", "(default sum)",
                 "(default detach)"):
        assert text in help_text, text


def test_build_model_from_freshly_parsed_arguments_takes_the_model_defaults():
    data = _tiny_data(users=60)
    args = S.build_parser().parse_args(["--model", "syncrec"])
    model = S.build_model(args, data)
    assert isinstance(model, SyNCRec) and args.dim == 64 and args.n_cross == 4


def test_skip_done_compares_the_training_schedule():
    """--skip-done counts a row as done only when it was trained with the same training options: the table's own
    options (seeds, --only, --runs-root, --skip-done) do not matter, another schedule (e.g. fewer epochs) does."""
    base = ("python -m mbrec_fast.training.sequential --table --seeds 3 --ablation-seeds 1 --skip-done --data "
            "amazon_toys_games --runs-root /a --dim 32 --max-len 30 --epochs 6 --patience 2 --no-full --threads 1")
    same = base.replace("--seeds 3", "--seeds 1 --only merged").replace("/a", "/b").replace("--skip-done ", "")
    assert S.training_schedule(base) is not None and S.training_schedule(base) == S.training_schedule(same)
    assert S.training_schedule(base) != S.training_schedule(base.replace("--epochs 6", "--epochs 30"))
    assert S.training_schedule("mbrec-fast train --model syncrec") is None


def test_table_markdown_keeps_one_schedule():
    """A table re-run on a new schedule averages only the rows of that schedule; the others are counted."""
    cmd = ("python -m mbrec_fast.training.sequential --table --data amazon_toys_games --epochs {e} --lr 5e-3 "
           "--no-full --threads 1")
    rows = [{"model": "syncrec", "variant": "paper", "data": "amazon_toys_games", "protocol": "sampled",
             "domain": "all", "seed": seed, "metrics": {"hr@10": v, "ndcg@10": v}, "epochs": e,
             "command": cmd.format(e=e)} for seed, v, e in ((0, 0.5, 40), (1, 0.1, 6), (2, 0.1, 6))]
    md = S.table_markdown(rows, "amazon_toys_games", [], cmd.format(e=40))
    assert "| syncrec | paper | 1 | 40 | 0.5000 | 0.5000 |" in md and "2 runs of this data" in md
    assert "0.2333" in S.table_markdown(rows, "amazon_toys_games", [])   # no command: every row
