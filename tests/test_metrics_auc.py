"""Exact AUC (ties as one half) and log loss against brute-force references."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from mbrec_fast.metrics import auc_score, ctr_metrics, grouped_auc, grouped_log_loss, log_loss
from mbrec_fast.reference.metrics import auc_pairwise, log_loss_loop

torch.set_num_threads(1)


@pytest.mark.parametrize("n,levels,seed", [
    (50, None, 0),      # continuous scores, no ties
    (200, 3, 1),        # only 3 distinct scores: heavy ties across classes
    (64, 1, 2),         # all scores equal: AUC must be exactly 0.5
    (300, 20, 3),       # moderate ties
    (7, None, 4),       # tiny input
])
def test_auc_matches_pairwise(n, levels, seed):
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, generator=g) < 0.4).long()
    labels[0], labels[1] = 0, 1  # both classes present
    if levels is None:
        scores = torch.randn(n, generator=g)
    else:
        scores = torch.randint(0, levels, (n,), generator=g).float()
    expected = auc_pairwise(scores.tolist(), labels.tolist())
    assert auc_score(scores, labels) == pytest.approx(expected, abs=1e-12)


def test_auc_all_ties_is_half_and_perfect_is_one():
    # all-equal scores -> 0.5; perfectly separated -> 1; reversed -> 0
    y = torch.tensor([0, 1, 0, 1, 1])
    assert auc_score(torch.zeros(5), y) == 0.5
    assert auc_score(y.float(), y) == 1.0
    assert auc_score(-y.float(), y) == 0.0


def test_auc_single_class_is_nan():
    # one class only: undefined
    assert math.isnan(auc_score(torch.rand(5), torch.ones(5)))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 1), st.integers(0, 3)), min_size=1, max_size=60))
def test_grouped_auc_property(rows):
    # property: each group's AUC equals the brute-force AUC of that group's rows (ties frequent: 6 score levels)
    scores = torch.tensor([float(r[0]) for r in rows])
    labels = torch.tensor([r[1] for r in rows])
    groups = torch.tensor([r[2] for r in rows])
    got = grouped_auc(scores, labels, groups, 4)
    for g in range(4):
        idx = [i for i, r in enumerate(rows) if r[2] == g]
        ref = auc_pairwise([rows[i][0] for i in idx], [rows[i][1] for i in idx])
        if math.isnan(ref):
            assert math.isnan(float(got[g]))
        else:
            assert float(got[g]) == pytest.approx(ref, abs=1e-12)


def test_log_loss_matches_loop_and_grouped():
    # probabilities including the clipped extremes 0 and 1
    g = torch.Generator().manual_seed(5)
    p = torch.rand(100, generator=g)
    p[0], p[1] = 0.0, 1.0
    y = (torch.rand(100, generator=g) < 0.5).long()
    assert log_loss(p, y) == pytest.approx(log_loss_loop(p.tolist(), y.tolist()), rel=1e-12)
    groups = torch.randint(0, 3, (100,), generator=g)
    got = grouped_log_loss(p, y, groups, 3)
    for k in range(3):
        m = groups == k
        assert float(got[k]) == pytest.approx(log_loss_loop(p[m].tolist(), y[m].tolist()), rel=1e-12)


def test_ctr_metrics_table():
    # per (domain, task) cells, overall = mean of cells, logloss pooled
    g = torch.Generator().manual_seed(6)
    n = 400
    probs = torch.rand(n, 2, generator=g)
    labels = (torch.rand(n, 2, generator=g) < probs).float()
    domains = torch.randint(0, 3, (n,), generator=g)
    m = ctr_metrics(probs, labels, domains, 3, ["click", "like"])
    cells = []
    for d in range(3):
        for t, name in enumerate(["click", "like"]):
            sel = domains == d
            ref = auc_pairwise(probs[sel, t].tolist(), labels[sel, t].long().tolist())
            assert m[f"auc_d{d}_{name}"] == pytest.approx(ref, abs=1e-12)
            cells.append(ref)
    assert m["auc"] == pytest.approx(np.mean(cells), abs=1e-12)
    assert m["logloss"] == pytest.approx(log_loss_loop(probs.flatten().tolist(), labels.flatten().long().tolist()), rel=1e-9)


@pytest.mark.parametrize("bad,err", [
    ((torch.tensor([0.1, float("nan")]), torch.tensor([0, 1])), ValueError),   # NaN score
    ((torch.tensor([0.1, 0.2]), torch.tensor([0, 2])), ValueError),            # label not 0/1
    ((torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0, 1])), ValueError),       # length mismatch
    (([0.1, 0.2], torch.tensor([0, 1])), TypeError),                           # not a tensor
])
def test_bad_input(bad, err):
    with pytest.raises(err):
        auc_score(*bad)


def test_auc_large_fast():
    # 1M samples, 1000 distinct levels: vectorized path agrees with a counting formula
    g = torch.Generator().manual_seed(7)
    s = torch.randint(0, 1000, (1_000_000,), generator=g).float()
    y = (torch.rand(1_000_000, generator=g) < 0.3).long()
    # counting reference: per level, #pos and #neg; pairs below + half ties
    pos = torch.bincount(s[y == 1].long(), minlength=1000).double()
    neg = torch.bincount(s[y == 0].long(), minlength=1000).double()
    neg_below = torch.cumsum(neg, 0) - neg
    ref = float(((pos * neg_below).sum() + 0.5 * (pos * neg).sum()) / (pos.sum() * neg.sum()))
    assert auc_score(s, y) == pytest.approx(ref, abs=1e-12)
