"""Property tests (hypothesis) of the public ops against the references on small random problems with ties,
duplicate ids and extreme (but representable) values. Examples per test: the "hardening" profile, 200 by
default (MBREC_FAST_HYPOTHESIS_EXAMPLES overrides it); each example is a tiny problem, so the file runs in
seconds."""
import math
import os

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mbrec_fast.evaluator import evaluate_full_ranking, topk
from mbrec_fast.reference.evaluator import dense_scores, reference_evaluate, reference_topk
from mbrec_fast.sampler import AliasTable, InteractionGraph, sample_negatives
from test_evaluator import assert_same_as_reference, rand_csr
from test_sampler import check_rules

settings.register_profile("hardening", max_examples=int(os.environ.get("MBREC_FAST_HYPOTHESIS_EXAMPLES", "200")),
                          deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
HARDENING = settings.get_profile("hardening")


def scaled_int_emb(n, d, gen, extreme):
    """Integer embeddings times a per-row power of two: dot products are exact in fp32 (so the fused blocked
    GEMM and the dense reference agree bit for bit), many scores tie, and with `extreme` they reach ~1e36."""
    base = torch.randint(-2, 3, (n, d), generator=gen).float()
    if not extreme:
        return base
    exps = torch.randint(-60, 58, (n, 1), generator=gen).float()
    return base * torch.exp2(exps)


@HARDENING
@given(U=st.integers(1, 10), N=st.integers(1, 24), d=st.integers(1, 3), pe=st.floats(0, 0.9), pt=st.floats(0, 0.6),
       seed=st.integers(0, 2 ** 16), extreme=st.booleans(), use_score_fn=st.booleans(), data=st.data())
def test_evaluate_full_ranking_matches_reference(U, N, d, pe, pt, seed, extreme, use_score_fn, data):
    gen = torch.Generator().manual_seed(seed)
    ks = tuple(data.draw(st.lists(st.integers(1, N), min_size=1, max_size=4)))  # repeats allowed
    ue, ie = scaled_int_emb(U, d, gen, extreme), scaled_int_emb(N, d, gen, extreme)
    ex, tg = rand_csr(U, N, pe, gen, dup=True), rand_csr(U, N, pt, gen, dup=True)
    scores = dense_scores(ue, ie)
    if use_score_fn:
        res = evaluate_full_ranking(None, None, ex, tg, ks, n_items=N, per_user=True,
                                    score_fn=lambda users, a, b: scores[users][:, a:b],
                                    block_items=data.draw(st.integers(1, N + 2)))
    else:
        res = evaluate_full_ranking(ue, ie, ex, tg, ks, per_user=True, block_users=data.draw(st.integers(1, 5)),
                                    block_items=data.draw(st.integers(1, N + 2)))
    assert_same_as_reference(res, reference_evaluate(scores, ex, tg, ks), sorted(set(ks)))


@HARDENING
@given(U=st.integers(1, 10), N=st.integers(1, 24), d=st.integers(1, 3), pe=st.floats(0, 1), seed=st.integers(0, 2 ** 16),
       extreme=st.booleans(), data=st.data())
def test_topk_matches_reference(U, N, d, pe, seed, extreme, data):
    gen = torch.Generator().manual_seed(seed)
    ue, ie = scaled_int_emb(U, d, gen, extreme), scaled_int_emb(N, d, gen, extreme)
    ex = rand_csr(U, N, pe, gen, dup=True)
    k = data.draw(st.integers(1, N))
    s, i = topk(ue, ie, k, ex, block_users=data.draw(st.integers(1, 5)), block_items=data.draw(st.integers(1, N + 2)))
    rs, ri = reference_topk(dense_scores(ue, ie), k, ex)
    assert torch.equal(i, ri) and torch.equal(s, rs)


@HARDENING
@given(seed=st.integers(0, 10 ** 6), n_items=st.integers(1, 20), R=st.integers(1, 3), num_neg=st.integers(1, 25),
       replacement=st.booleans(), mode=st.sampled_from(["exclusive", "strict", "unvisited", "cascade", "visited"]),
       dense=st.booleans(), weights=st.sampled_from([None, "tiny", "huge", "zeros", "ties"]))
def test_sample_negatives_obeys_the_reference_rules(seed, n_items, R, num_neg, replacement, mode, dense, weights):
    """Every negative lies in the reference's allowed set; -1 only where that set is exhausted; no repeats
    without replacement; zero-weight items are never drawn; and a row is a pure function of the arguments."""
    if mode == "visited" and R < 2:
        return
    rng = torch.Generator().manual_seed(seed)
    n = 200 if dense else 15
    users_, items_ = torch.randint(0, 5, (n,), generator=rng), torch.randint(0, n_items, (n,), generator=rng)
    g = InteractionGraph.from_arrays(users_, items_, torch.randint(0, R, (n,), generator=rng), 5, n_items,
                                     n_behaviors=R)  # duplicate (user, item, behavior) rows are common here
    r = int(torch.randint(0, R, (1,), generator=rng))
    kw = {"level_probs": np.full(r + 1, 1 / (r + 1))} if mode == "cascade" else {}
    pop = None
    if weights is not None and mode != "visited":
        base = torch.rand(n_items, generator=rng, dtype=torch.float64)
        pop = {"tiny": base * 1e-300, "huge": base * 1e308, "ties": torch.ones(n_items, dtype=torch.float64),
               "zeros": torch.where(torch.arange(n_items) % 2 == 0, base + 0.1, torch.zeros_like(base))}[weights]
        kw["popularity"] = AliasTable(pop)
    users = torch.arange(5).repeat(3)
    out = sample_negatives(g, users, num_neg, behavior=r, mode=mode, replacement=replacement, seed=seed,
                           on_empty="sentinel", **kw)
    if pop is not None and mode != "cascade":  # zero-weight items lie outside every weighted pool; cascade's
        assert bool((kw["popularity"].weights_q[out[out >= 0]] > 0).all())  # level pools are uniform
    if weights != "zeros":  # (with zero weights the allowed set is smaller than check_rules counts)
        check_rules(g, users, r, mode, out, replacement, num_neg)
    again = sample_negatives(g, users, num_neg, behavior=r, mode=mode, replacement=replacement, seed=seed,
                             on_empty="sentinel", **kw)
    assert torch.equal(out, again)
