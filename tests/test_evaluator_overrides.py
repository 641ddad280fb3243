"""`evaluate_full_ranking(..., score_overrides=...)`: a dot product except on sparse (user, item) pairs, ranked by
the fused dot-product op with the overridden pairs merged into each user's top K. Checked against the dense
reference (the overrides written into the score matrix) on integer scores with many ties between dot and
overridden scores, overrides that are excluded, users whose every item is overridden, -0.0 against +0.0, the
order keys, MEMBER's scorer (its gated score_fn and its dot form agree), and bad input."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from mbrec_fast.evaluator import _rank_keys, evaluate_full_ranking
from mbrec_fast.reference.evaluator import reference_evaluate
from test_evaluator import int_emb, rand_csr


def random_overrides(n_users, n_items, p, gen, lo=-6, hi=7):
    indptr, indices = rand_csr(n_users, n_items, p, gen)
    return indptr, indices, torch.randint(lo, hi, (indices.numel(),), generator=gen).float()


def dense_with_overrides(ue, ie, overrides):
    scores = ue.float() @ ie.float().T
    indptr, indices, vals = overrides
    rows = torch.repeat_interleave(torch.arange(ue.shape[0]), indptr.diff())
    scores[rows, indices] = vals
    return scores


def check_against_reference(n_users, n_items, d, p_over, p_excl, ks, seed):
    gen = torch.Generator().manual_seed(seed)
    ue, ie = int_emb(n_users, d, gen=gen), int_emb(n_items, d, gen=gen)
    overrides = random_overrides(n_users, n_items, p_over, gen)
    ex, tg = rand_csr(n_users, n_items, p_excl, gen), rand_csr(n_users, n_items, 0.15, gen)
    got = evaluate_full_ranking(ue, ie, ex, tg, ks=ks, per_user=True, score_overrides=overrides)
    ref = reference_evaluate(dense_with_overrides(ue, ie, overrides), ex, tg, ks=ks)
    assert got.n_users == ref["n_users"] and got.n_skipped == ref["n_skipped"]
    for name, value in ref["metrics"].items():
        assert got.metrics[name] == pytest.approx(value, abs=1e-12), name
    for name, values in ref["per_user"].items():
        assert torch.equal(got.per_user[name], values), name


@pytest.mark.parametrize("n_users,n_items,d,p_over,p_excl,ks", [
    (30, 50, 3, 0.2, 0.2, (1, 5, 10)),     # many ties between dot scores (small integers) and overrides
    (20, 12, 2, 1.0, 0.0, (3, 12)),        # every item overridden: the dot op ranks nothing
    (25, 40, 4, 0.0, 0.3, (5, 20)),        # no overrides at all
    (40, 300, 8, 0.05, 0.1, (10, 50, 100)),  # k close to the number of items left
])
def test_matches_dense_reference(n_users, n_items, d, p_over, p_excl, ks):
    check_against_reference(n_users, n_items, d, p_over, p_excl, ks, seed=n_users + n_items)


@settings(max_examples=20, deadline=None)
@given(n_users=st.integers(1, 20), n_items=st.integers(1, 40), d=st.integers(1, 4),
       p_over=st.floats(0.0, 1.0), p_excl=st.floats(0.0, 0.9), k=st.integers(1, 40), seed=st.integers(0, 10_000))
def test_property_matches_dense_reference(n_users, n_items, d, p_over, p_excl, k, seed):
    check_against_reference(n_users, n_items, d, p_over, p_excl, (min(k, n_items),), seed)


def test_rank_keys_order_scores_then_lower_id():
    scores = torch.tensor([[1.5, -2.0, 0.0, -0.0, 1.5, float("-inf"), -1e30, 3e38]])
    ids = torch.tensor([[7, 3, 9, 2, 4, -1, 5, 6]])
    order = _rank_keys(scores, ids).argsort(dim=1, descending=True)
    assert ids[0, order[0]].tolist() == [6, 4, 7, 2, 9, 3, 5, -1]  # -0.0 ties with 0.0: lower id first


def test_member_dot_form_equals_its_gated_score_fn():
    """MEMBER's scorer offers its gated score (unvisited expert, visited expert on the auxiliary entries) both as
    score_fn and as a dot product with overrides; the evaluator gives the same metrics either way."""
    from mbrec_fast.training.multibehavior import build_model, load_data
    data = load_data("synthetic:300x200")
    torch.manual_seed(0)
    model = build_model("member", data, dim=8, variant="faithful").eval()
    with torch.no_grad():
        model.on_epoch_start(data, 0, 0)
        sc = model.scorer()
        kw = dict(exclude=data.exclude("test"), targets=data.test, ks=(1, 10, 50), per_user=True)
        fast = evaluate_full_ranking(**sc.evaluator_kwargs(), **kw)
        slow = evaluate_full_ranking(None, None, score_fn=sc.score_fn, n_items=data.n_items, **kw)
    assert "score_overrides" in sc.evaluator_kwargs()
    for name in slow.metrics:
        assert fast.metrics[name] == pytest.approx(slow.metrics[name], abs=1e-9), name


def test_bad_overrides_are_clear_errors():
    gen = torch.Generator().manual_seed(1)
    ue, ie = int_emb(5, 2, gen=gen), int_emb(6, 2, gen=gen)
    tg = rand_csr(5, 6, 0.3, gen)
    ok = random_overrides(5, 6, 0.4, gen)
    with pytest.raises(TypeError, match=r"score_overrides must be \(indptr, indices, scores\)"):
        evaluate_full_ranking(ue, ie, None, tg, ks=(1,), score_overrides=ok[:2])
    with pytest.raises(ValueError, match="one score per index"):
        evaluate_full_ranking(ue, ie, None, tg, ks=(1,), score_overrides=(ok[0], ok[1], ok[2][:-1]))
    with pytest.raises(ValueError, match="score_overrides.scores"):
        evaluate_full_ranking(ue, ie, None, tg, ks=(1,), score_overrides=(ok[0], ok[1], ok[2] * float("nan")))
    dup = (torch.tensor([0, 2, 2, 2, 2, 2]), torch.tensor([1, 1]), torch.zeros(2))
    with pytest.raises(ValueError, match="distinct within a row"):
        evaluate_full_ranking(ue, ie, None, tg, ks=(1,), score_overrides=dup)
    with pytest.raises(ValueError, match="not to score_fn"):
        evaluate_full_ranking(None, None, None, tg, ks=(1,), score_fn=lambda u, a, b: ue[u] @ ie[a:b].T, n_items=6,
                              score_overrides=ok)
