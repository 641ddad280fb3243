"""Full-ranking evaluator: fused ops vs the dense reference (mbrec_fast/reference/evaluator.py).

Exact cases use small-integer embeddings, so every dot product is exact in fp32 (and ties are
plentiful): top-K ids, scores and per-user metrics must then match the reference bit for bit.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mbrec_fast
from mbrec_fast.evaluator import METRICS, evaluate_full_ranking, topk
from mbrec_fast.reference.evaluator import dense_scores, reference_evaluate, reference_topk, reference_user_metrics

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------
# helpers

def int_emb(n, d, lo=-2, hi=3, dtype=torch.float32, gen=None):
    """Small-integer embeddings: exact dot products in fp32/fp16/bf16 and many ties."""
    return torch.randint(lo, hi, (n, d), generator=gen).to(dtype)


def rand_csr(n_rows, n_cols, p, gen=None, dup=False):
    """Random CSR with sorted rows; dup=True repeats some ids inside rows."""
    mask = torch.rand(n_rows, n_cols, generator=gen) < p
    rows, cols = mask.nonzero(as_tuple=True)
    if dup and cols.numel():
        pick = torch.rand(cols.numel(), generator=gen) < 0.3
        rows = torch.cat([rows, rows[pick]])
        cols = torch.cat([cols, cols[pick]])
        order = torch.argsort(rows * n_cols + cols, stable=True)
        rows, cols = rows[order], cols[order]
    indptr = torch.zeros(n_rows + 1, dtype=torch.int64)
    indptr[1:] = torch.bincount(rows, minlength=n_rows).cumsum(0)
    return indptr, cols.contiguous()


def csr_from_rows(rows_list, n_rows=None):
    n_rows = len(rows_list) if n_rows is None else n_rows
    indptr = torch.zeros(n_rows + 1, dtype=torch.int64)
    flat = []
    for r, row in enumerate(rows_list):
        indptr[r + 1] = indptr[r] + len(row)
        flat += list(row)
    return indptr, torch.tensor(flat, dtype=torch.int64)


def assert_same_as_reference(res, ref, ks, metrics=METRICS):
    assert res.n_users == ref["n_users"]
    assert res.n_skipped == ref["n_skipped"]
    assert res.group_users == ref["group_users"]
    for name, value in ref["metrics"].items():
        if name.split("@")[0] in metrics:
            assert res.metrics[name] == pytest.approx(value, rel=1e-12, abs=1e-12), name
    for g, vals in ref["groups"].items():
        for name, value in vals.items():
            if name.split("@")[0] in metrics:
                assert res.groups[g][name] == pytest.approx(value, rel=1e-12, abs=1e-12), (g, name)
    if res.per_user is not None:
        assert torch.equal(res.per_user["user"], ref["per_user"]["user"])
        for name in res.per_user:
            if name != "user":
                # Per-user values are computed in the same order with the same formulas: exact.
                assert torch.equal(res.per_user[name], ref["per_user"][name]), name


# ---------------------------------------------------------------------------------------------
# top-k

TOPK_CASES = [
    # (U, N, d, k, p_exclude, block_users, block_items, dtype) -- edge covered
    (20, 50, 4, 10, 0.2, 64, 1024, torch.float32),   # one block, many ties among small ints
    (33, 97, 3, 7, 0.3, 5, 11, torch.float32),       # ragged user and item blocks cross boundaries
    (10, 40, 2, 1, 0.1, 3, 8, torch.float32),        # K = 1
    (8, 30, 4, 30, 0.2, 4, 7, torch.float32),        # K = n_items: excluded slots padded with (-inf, -1)
    (5, 1, 3, 1, 0.0, 2, 1, torch.float32),          # a single item
    (12, 25, 4, 5, 0.0, 4, 6, torch.float16),        # fp16 embeddings (exact for small ints)
    (12, 25, 4, 5, 0.2, 4, 6, torch.bfloat16),       # bf16 embeddings
    (16, 60, 1, 20, 0.5, 4, 16, torch.float32),      # d = 1: massive ties, heavy exclusion
]


@pytest.mark.parametrize("U,N,d,k,p,bu,bi,dtype", TOPK_CASES)
def test_topk_exact_matches_reference(U, N, d, k, p, bu, bi, dtype):
    gen = torch.Generator().manual_seed(U * 1000 + N)
    ue, ie = int_emb(U, d, dtype=dtype, gen=gen), int_emb(N, d, dtype=dtype, gen=gen)
    ex = rand_csr(U, N, p, gen)
    s, i = topk(ue, ie, k, ex, block_users=bu, block_items=bi)
    rs, ri = reference_topk(dense_scores(ue, ie), k, ex)
    assert s.dtype == torch.float32 and i.dtype == torch.int64
    assert torch.equal(i, ri)
    assert torch.equal(s, rs)


def test_topk_user_all_excluded_and_subset():
    # user 1 has every item excluded: its row is all (-inf, -1); `users` picks and orders rows
    ue, ie = int_emb(4, 3), int_emb(9, 3)
    ex = csr_from_rows([[0, 3], list(range(9)), [], [8]])
    users = torch.tensor([3, 1, 0, 1])
    s, i = topk(ue, ie, 4, ex, users=users, block_users=2, block_items=4)
    rs, ri = reference_topk(dense_scores(ue, ie)[users], 4, ex, users)
    assert torch.equal(i, ri) and torch.equal(s, rs)
    assert (i[1] == -1).all() and torch.isinf(s[1]).all()


def test_topk_tie_rule_lower_id_first():
    # all scores equal: the top-k must be the k lowest non-excluded ids
    ue, ie = torch.ones(2, 2), torch.ones(10, 2)
    ex = csr_from_rows([[0, 2], []])
    _, i = topk(ue, ie, 4, ex, block_items=3)
    assert i.tolist() == [[1, 3, 4, 5], [0, 1, 2, 3]]


def test_topk_random_float_close_to_reference():
    # random floats: blocked GEMM may differ from one big GEMM in the last bits, so compare scores
    # with a tolerance and check every returned id really has the returned score
    gen = torch.Generator().manual_seed(1)
    ue, ie = torch.randn(50, 16, generator=gen), torch.randn(300, 16, generator=gen)
    ex = rand_csr(50, 300, 0.1, gen)
    s, i = topk(ue, ie, 20, ex, block_users=7, block_items=64)
    rs, _ = reference_topk(dense_scores(ue, ie), 20, ex)
    torch.testing.assert_close(s, rs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.gather(dense_scores(ue, ie), 1, i), s, rtol=1e-5, atol=1e-5)
    excluded = torch.zeros(50, 300, dtype=torch.bool)
    excluded[torch.repeat_interleave(torch.arange(50), ex[0].diff()), ex[1]] = True
    assert not torch.gather(excluded, 1, i).any()


# ---------------------------------------------------------------------------------------------
# metrics

def test_metric_formulas_hand_computed():
    # ranked [3, 1, 2], targets {1, 5}: one hit at rank 2 (RecBole definitions)
    top = [3, 1, 2]
    got = reference_user_metrics(top, [1, 5, 5], 3)  # duplicate 5 counts once
    idcg = 1 + 1 / math.log2(3)
    expected = {"hr": 1.0, "ndcg": (1 / math.log2(3)) / idcg, "recall": 0.5, "precision": 1 / 3, "mrr": 0.5}
    assert got == pytest.approx(expected)
    # the fused op gives the same values
    values, counts = torch.ops.mbrec_fast.rank_metrics(
        torch.tensor([top]), torch.tensor([0]), *csr_from_rows([[1, 5, 5]]), torch.zeros(0, dtype=torch.int64), 0, [3, 1])
    assert counts.tolist() == [[2]]
    assert values[0, 0, 0].tolist() == pytest.approx([expected[m] for m in METRICS])
    assert values[0, 0, 1].tolist() == [0.0, 0.0, 0.0, 0.0, 0.0]  # @1: item 3 is no target


def test_idcg_uses_min_targets_k():
    # 3 targets, K = 2, both top-2 items are targets: NDCG = 1 (IDCG over min(3, 2) positions)
    got = reference_user_metrics([4, 7], [4, 7, 9], 2)
    assert got["ndcg"] == pytest.approx(1.0)
    assert got["recall"] == pytest.approx(2 / 3)


EVAL_CASES = [
    # (U, N, d, ks, p_exclude, p_target, dup, groups, bu, bi) -- edge covered
    (40, 60, 3, (1, 5, 10), 0.2, 0.1, False, False, 8, 16),   # plain case, several cutoffs
    (40, 60, 3, (5, 60), 0.3, 0.15, True, True, 64, 1024),    # duplicates in targets, K = n_items, groups
    (30, 25, 2, (3,), 0.0, 0.05, False, True, 4, 5),          # no exclusion, many users without targets
    (20, 40, 4, (10, 2), 0.5, 0.3, True, False, 3, 9),        # unsorted ks, targets often excluded
]


@pytest.mark.parametrize("U,N,d,ks,pe,pt,dup,groups,bu,bi", EVAL_CASES)
def test_evaluate_exact_matches_reference(U, N, d, ks, pe, pt, dup, groups, bu, bi):
    gen = torch.Generator().manual_seed(U + N + d)
    ue, ie = int_emb(U, d, gen=gen), int_emb(N, d, gen=gen)
    ex = rand_csr(U, N, pe, gen)
    tg = rand_csr(U, N, pt, gen, dup=dup)
    labels = torch.randint(0, 2, (tg[1].numel(),), generator=gen) if groups else None
    names = ["unvisited", "visited"] if groups else None
    res = evaluate_full_ranking(ue, ie, ex, tg, ks, target_groups=labels, group_names=names, per_user=True,
                                block_users=bu, block_items=bi)
    ref = reference_evaluate(dense_scores(ue, ie), ex, tg, ks, target_groups=labels, group_names=names)
    assert_same_as_reference(res, ref, ks)
    assert res.n_users + res.n_skipped == U


def test_evaluate_adversarial_rows():
    # user 0: target excluded (cannot be hit, still counts); user 1: no targets (skipped);
    # user 2: every item excluded; user 3: duplicate targets; single-metric selection
    N = 6
    ue, ie = int_emb(4, 2), int_emb(N, 2)
    ex = csr_from_rows([[1, 2], [], list(range(N)), [0]])
    tg = csr_from_rows([[2, 4], [], [3], [5, 5, 5]])
    res = evaluate_full_ranking(ue, ie, ex, tg, ks=(1, N), metrics=("ndcg", "recall"), per_user=True)
    ref = reference_evaluate(dense_scores(ue, ie), ex, tg, (1, N), metrics=("ndcg", "recall"))
    assert_same_as_reference(res, ref, (1, N), metrics=("ndcg", "recall"))
    assert res.n_users == 3 and res.n_skipped == 1
    assert set(res.metrics) == {"ndcg@1", "ndcg@6", "recall@1", "recall@6"}
    # user 0 can hit only item 4 of its two targets: recall@N = 1/2 exactly
    assert res.per_user["recall@6"][0].item() == 0.5
    # user 2 has nothing ranked: all zero
    assert res.per_user["ndcg@6"][1].item() == 0.0


def test_evaluate_empty_csr_and_users_subset():
    # empty exclude (None and an empty CSR agree) and a users subset
    ue, ie = int_emb(10, 3), int_emb(12, 3)
    tg = rand_csr(10, 12, 0.3, torch.Generator().manual_seed(3))
    empty = (torch.zeros(11, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
    users = torch.tensor([9, 2, 5])
    a = evaluate_full_ranking(ue, ie, None, tg, ks=(4,), users=users, per_user=True)
    b = evaluate_full_ranking(ue, ie, empty, tg, ks=(4,), users=users, per_user=True)
    ref = reference_evaluate(dense_scores(ue, ie), empty, tg, (4,), users=users)
    assert a.metrics == b.metrics
    assert_same_as_reference(a, ref, (4,))
    # no targets at all: every user skipped, metrics 0
    none = evaluate_full_ranking(ue, ie, None, empty, ks=(4,))
    assert none.n_users == 0 and none.n_skipped == 10 and none.metrics["hr@4"] == 0.0


def test_group_metrics_only_count_group_targets():
    # groups: user 0 has targets in both groups, user 1 only in group 1
    ue = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    ie = torch.tensor([[3.0, 0.0], [2.0, 0.0], [0.0, 3.0], [0.0, 2.0]])
    tg = csr_from_rows([[0, 3], [2]])
    labels = torch.tensor([0, 1, 1])
    res = evaluate_full_ranking(ue, ie, None, tg, ks=(1,), target_groups=labels, group_names=["a", "b"])
    # user 0 ranks item 0 first (group a hit), item 3 is not top-1; user 1 ranks item 2 first (group b hit)
    assert res.group_users == {"a": 1, "b": 2}
    assert res.groups["a"]["hr@1"] == 1.0
    assert res.groups["b"]["hr@1"] == 0.5
    assert res.metrics["hr@1"] == 1.0
    assert res.metrics["recall@1"] == pytest.approx((0.5 + 1.0) / 2)


@pytest.mark.parametrize("window_bytes", [
    None,       # default: one window holds every block
    25 * 4 * 3,  # 3 score columns of the 25 users per merge window: blocks gathered, ragged last window
])
@pytest.mark.parametrize("bi", [1, 7, 64])  # block size: per-item blocks, ragged, one block
def test_score_fn_equals_dot_path(bi, window_bytes, monkeypatch):
    if window_bytes is not None:
        monkeypatch.setattr(mbrec_fast.evaluator, "_MERGE_WINDOW_BYTES", window_bytes)
    gen = torch.Generator().manual_seed(5)
    ue, ie = int_emb(25, 3, gen=gen), int_emb(40, 3, gen=gen)
    ex, tg = rand_csr(25, 40, 0.2, gen), rand_csr(25, 40, 0.1, gen, dup=True)
    labels = torch.randint(0, 3, (tg[1].numel(),), generator=gen)
    calls = []

    def score_fn(users, start, end):
        calls.append((start, end))
        return ue[users] @ ie[start:end].T

    dot = evaluate_full_ranking(ue, ie, ex, tg, ks=(1, 5, 10), target_groups=labels, per_user=True)
    fn = evaluate_full_ranking(None, None, ex, tg, ks=(1, 5, 10), score_fn=score_fn, n_items=40,
                               target_groups=labels, per_user=True, block_items=bi)
    assert dot.metrics == fn.metrics and dot.groups == fn.groups
    for name in dot.per_user:
        assert torch.equal(dot.per_user[name], fn.per_user[name])
    assert calls[0] == (0, min(bi, 40)) and calls[-1][1] == 40


@pytest.mark.parametrize("n,k,levels,order", [
    (20, 5, 7, "reverse"),      # two blocks, reverse id order: ties must still go to the lower id
    (300, 7, 3, "shuffled"),    # many equal scores, k << n: the reservoir trims (4k) many times
    (50, 60, 5, "shuffled"),    # k > n: the tail is padded with (-inf, -1)
    (64, 16, 2, "ascending"),   # two score values only: every score ties with the threshold
    (40, 8, 0, "shuffled"),     # -inf scores that are not excluded rank last with their ids
])
def test_topk_merge_matches_reference_over_windows(n, k, levels, order):
    gen = torch.Generator().manual_seed(n + k)
    b = 9
    if levels:
        scores = torch.randint(-(levels // 2), levels - levels // 2, (b, n), generator=gen).float()
    else:
        scores = torch.randn(b, n, generator=gen)
        scores[torch.rand(b, n, generator=gen) < 0.5] = -math.inf
    users = torch.randperm(b, generator=gen)
    ex = rand_csr(b, n, 0.3, gen)
    bounds = list(range(0, n, 13)) + [n]
    windows = list(zip(bounds[:-1], bounds[1:]))
    if order == "reverse":
        windows = windows[::-1]
    elif order == "shuffled":
        windows = [windows[i] for i in torch.randperm(len(windows), generator=gen)]
    s = torch.full((b, k), -math.inf)
    i = torch.full((b, k), -1, dtype=torch.int64)
    for a, e in windows:
        s, i = torch.ops.mbrec_fast.topk_merge(scores[:, a:e].contiguous(), users, a, *ex, s, i)
    rs, ri = reference_topk(scores, k, ex, users)  # at most n columns
    m = min(k, n)
    assert torch.equal(i[:, :m], ri) and torch.equal(s[:, :m], rs)
    assert bool((i[:, m:] == -1).all()) and bool((s[:, m:] == -math.inf).all())


def test_topk_merge_op_matches_reference():
    # merge two blocks in reverse id order (general comparator path)
    gen = torch.Generator().manual_seed(9)
    scores = torch.randint(-3, 4, (6, 20), generator=gen).float()
    users = torch.arange(6)
    ex = rand_csr(6, 20, 0.2, gen)
    s = torch.full((6, 5), -math.inf)
    i = torch.full((6, 5), -1, dtype=torch.int64)
    s, i = torch.ops.mbrec_fast.topk_merge(scores[:, 10:].contiguous(), users, 10, *ex, s, i)
    s, i = torch.ops.mbrec_fast.topk_merge(scores[:, :10].contiguous(), users, 0, *ex, s, i)
    rs, ri = reference_topk(scores, 5, ex)
    assert torch.equal(i, ri) and torch.equal(s, rs)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(U=st.integers(1, 12), N=st.integers(1, 30), d=st.integers(1, 4), pe=st.floats(0, 0.9),
       pt=st.floats(0, 0.5), seed=st.integers(0, 2**16), bu=st.integers(1, 9), bi=st.integers(1, 33),
       data=st.data())
def test_property_evaluate_equals_reference(U, N, d, pe, pt, seed, bu, bi, data):
    gen = torch.Generator().manual_seed(seed)
    ks = tuple(data.draw(st.lists(st.integers(1, N), min_size=1, max_size=3, unique=True)))
    ue, ie = int_emb(U, d, gen=gen), int_emb(N, d, gen=gen)
    ex, tg = rand_csr(U, N, pe, gen), rand_csr(U, N, pt, gen, dup=True)
    labels = torch.randint(0, 2, (tg[1].numel(),), generator=gen)
    res = evaluate_full_ranking(ue, ie, ex, tg, ks, target_groups=labels, per_user=True,
                                block_users=bu, block_items=bi)
    ref = reference_evaluate(dense_scores(ue, ie), ex, tg, ks, target_groups=labels,
                             group_names=["0", "1"] if labels.numel() and int(labels.max()) == 1 else None)
    if labels.numel() and int(labels.max()) == 0:
        ref["groups"].pop("1", None)
    assert_same_as_reference(res, ref, ks)
    # top-k invariants: sorted, no excluded id, padding only at the tail
    s, i = topk(ue, ie, max(ks), ex, block_users=bu, block_items=bi)
    assert (s[:, :-1] >= s[:, 1:]).all()
    valid = i >= 0
    assert (valid[:, :-1] >= valid[:, 1:]).all()


# ---------------------------------------------------------------------------------------------
# ops: schema, fake tensors, compile

def _op_samples():
    ue, ie = int_emb(6, 3), int_emb(9, 3)
    ex = rand_csr(6, 9, 0.2, torch.Generator().manual_seed(0))
    tg = rand_csr(6, 9, 0.3, torch.Generator().manual_seed(1))
    users = torch.arange(6)
    top_s, top_i = torch.ops.mbrec_fast.topk_dot(ue, ie, users, *ex, 4, 2, 4)
    labels = torch.randint(0, 2, (tg[1].numel(),))
    return [
        (torch.ops.mbrec_fast.topk_dot.default, (ue, ie, users, *ex, 4, 2, 4)),
        (torch.ops.mbrec_fast.topk_merge.default, (ue @ ie.T, users, 0, *ex, torch.full((6, 4), -math.inf),
                                                   torch.full((6, 4), -1, dtype=torch.int64))),
        (torch.ops.mbrec_fast.rank_metrics.default, (top_i, users, *tg, labels, 2, [1, 4])),
    ]


@pytest.mark.parametrize("idx", [0, 1, 2])  # topk_dot, topk_merge, rank_metrics
def test_opcheck(idx):
    op, args = _op_samples()[idx]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                                "test_aot_dispatch_dynamic"))


def test_op_level_checks_name_the_argument():
    """The ops' own checks (csrc/common/checks.h, shared with the sampler) name the bad argument."""
    ue, ie = int_emb(2, 3), int_emb(4, 3)
    ptr, idx = torch.tensor([0, 1, 2]), torch.tensor([0, 1])
    with pytest.raises(RuntimeError, match=r"users out of range: ids must lie in \[0, 2\), found \[0, 5\]"):
        torch.ops.mbrec_fast.topk_dot(ue, ie, torch.tensor([0, 5]), ptr, idx, 1, 1, 1)
    with pytest.raises(RuntimeError, match="users must have dtype Long"):
        torch.ops.mbrec_fast.topk_dot(ue, ie, torch.tensor([0, 1], dtype=torch.int32), ptr, idx, 1, 1, 1)
    with pytest.raises(RuntimeError, match="exclude.indices must have dtype Long"):
        torch.ops.mbrec_fast.topk_dot(ue, ie, torch.arange(2), ptr, idx.int(), 1, 1, 1)
    with pytest.raises(RuntimeError, match="targets.indptr must be 1-D"):
        torch.ops.mbrec_fast.rank_metrics(torch.zeros(2, 1, dtype=torch.int64), torch.arange(2), ptr[None], idx,
                                          torch.zeros(0, dtype=torch.int64), 0, [1])
    with pytest.raises(RuntimeError, match="users out of range"):
        torch.ops.mbrec_fast.topk_merge(torch.ones(2, 3), torch.tensor([0, -1]), 0, ptr, idx,
                                        torch.full((2, 1), -math.inf), torch.full((2, 1), -1, dtype=torch.int64))


def test_compile_fullgraph():
    ue, ie = int_emb(6, 3), int_emb(9, 3)
    ex = rand_csr(6, 9, 0.2, torch.Generator().manual_seed(0))
    users = torch.arange(6)

    def f(ue, ie, users, ptr, idx):
        s, i = torch.ops.mbrec_fast.topk_dot(ue, ie, users, ptr, idx, 3, 4, 4)
        return s * 2, i

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(ue, ie, users, *ex)
    want = f(ue, ie, users, *ex)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ---------------------------------------------------------------------------------------------
# bad input: ValueError/TypeError naming the argument

def _good():
    ue, ie = int_emb(4, 3), int_emb(6, 3)
    ex = csr_from_rows([[0], [], [1, 2], []])
    tg = csr_from_rows([[1], [2], [], [5]])
    return ue, ie, ex, tg


BAD_CASES = [
    # (mutation, exception, message fragment) -- the bad input
    (lambda a: a.update(exclude=(a["exclude"][0], torch.tensor([0, 1, 9]))), ValueError, "exclude.indices out of range"),
    (lambda a: a.update(targets=(a["targets"][0], torch.tensor([1, 2, -1]))), ValueError, "targets.indices out of range"),
    (lambda a: a.update(exclude=(a["exclude"][0], torch.tensor([0, 2, 1]))), ValueError, "exclude.indices must be sorted"),
    (lambda a: a.update(exclude=(torch.tensor([0, 1, 1, 3]), a["exclude"][1])), ValueError, "exclude.indptr must have"),
    (lambda a: a.update(targets=(torch.tensor([0, 2, 1, 3, 3]), a["targets"][1])), ValueError, "targets.indptr must be non-decreasing"),
    (lambda a: a.update(targets=(torch.tensor([1, 1, 2, 2, 3]), a["targets"][1])), ValueError, "targets.indptr must start at 0"),
    (lambda a: a.update(ks=(0,)), ValueError, "ks"),
    (lambda a: a.update(ks=(7,)), ValueError, "ks"),
    (lambda a: a.update(item_emb=int_emb(6, 4)), ValueError, "embedding dim"),
    (lambda a: a.update(item_emb=a["item_emb"].double()), TypeError, "item_emb"),
    (lambda a: a.update(item_emb=a["item_emb"].half()), TypeError, "same dtype"),
    (lambda a: a.update(user_emb=a["user_emb"].long()), TypeError, "user_emb"),
    (lambda a: a.update(item_emb=a["item_emb"].to("meta")), ValueError, "item_emb is on meta"),
    (lambda a: a["user_emb"].__setitem__((1, 1), float("nan")), ValueError, "user_emb contains NaN"),
    (lambda a: a["item_emb"].__setitem__((2, 0), float("inf")), ValueError, "item_emb contains NaN or inf"),
    (lambda a: a.update(users=torch.tensor([0, 4])), ValueError, "users out of range"),
    (lambda a: a.update(metrics=("auc",)), ValueError, "metrics"),
    (lambda a: a.update(target_groups=torch.tensor([0, 1])), ValueError, "target_groups"),
    (lambda a: a.update(target_groups=torch.tensor([0, 1, 2]), group_names=["a", "b"]), ValueError, "group_names"),
    (lambda a: a.update(block_items=0), ValueError, "block_items"),
    (lambda a: a.update(user_emb=torch.full((4, 3), 1e30), item_emb=torch.full((6, 3), 1e30)), ValueError, "overflow"),
]


@pytest.mark.parametrize("mutate,exc,msg", BAD_CASES)
def test_bad_input_raises(mutate, exc, msg):
    ue, ie, ex, tg = _good()
    args = dict(user_emb=ue, item_emb=ie, exclude=ex, targets=tg, ks=(2,))
    mutate(args)
    with pytest.raises(exc, match=msg):
        evaluate_full_ranking(args.pop("user_emb"), args.pop("item_emb"), args.pop("exclude"), args.pop("targets"),
                              **args)


@pytest.mark.parametrize("bad", ["nan", "inf", "shape", "int"])  # score_fn returns NaN / inf / wrong shape / ints
def test_score_fn_bad_scores(bad):
    ue, ie, ex, tg = _good()

    def score_fn(users, start, end):
        s = ue[users] @ ie[start:end].T
        if bad == "nan":
            s[0, 0] = float("nan")
        elif bad == "inf":
            s[-1, -1] = float("inf")
        elif bad == "shape":
            s = s[:, :-1]
        else:
            s = s.long()
        return s

    exc = TypeError if bad == "int" else ValueError
    with pytest.raises(exc, match="score_fn"):
        evaluate_full_ranking(None, None, ex, tg, ks=(2,), score_fn=score_fn, n_items=6)


def test_topk_bad_k_and_score_fn_args():
    ue, ie, ex, tg = _good()
    with pytest.raises(ValueError, match="k must satisfy"):
        topk(ue, ie, 0)
    with pytest.raises(ValueError, match="k must satisfy"):
        topk(ue, ie, 7)
    with pytest.raises(ValueError, match="n_items"):
        evaluate_full_ranking(None, None, ex, tg, ks=(2,), score_fn=lambda u, s, e: None)
    with pytest.raises(ValueError, match="user_emb and item_emb are required"):
        evaluate_full_ranking(ue, None, ex, tg, ks=(2,))


# ---------------------------------------------------------------------------------------------
# real data and GPU

def test_beibei_subset_matches_reference(data_dir):
    import numpy as np
    root = data_dir / "beibei"
    inter = np.loadtxt(root / "interactions.tsv", dtype=str, max_rows=60000)
    test = np.loadtxt(root / "test.tsv", dtype=np.int64)
    n_users = 300
    n_items = int(max(inter[:, 1].astype(np.int64).max(), test[:, 1].max())) + 1
    u = inter[:, 0].astype(np.int64)
    i = inter[:, 1].astype(np.int64)
    buy = (inter[:, 2] == "buy") & (u < n_users)
    pairs = sorted(set(zip(u[buy].tolist(), i[buy].tolist())))
    ex = csr_from_rows([[it for uu, it in pairs if uu == r] for r in range(n_users)])
    tgt = test[test[:, 0] < n_users]
    tg = csr_from_rows([sorted(tgt[tgt[:, 0] == r, 1].tolist()) for r in range(n_users)])
    gen = torch.Generator().manual_seed(0)
    ue, ie = int_emb(n_users, 8, gen=gen), int_emb(n_items, 8, gen=gen)
    res = evaluate_full_ranking(ue, ie, ex, tg, ks=(10, 50), per_user=True)
    ref = reference_evaluate(dense_scores(ue, ie), ex, tg, (10, 50))
    assert_same_as_reference(res, ref, (10, 50))


@pytest.mark.gpu
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(2)
    ue, ie = int_emb(300, 8, gen=gen), int_emb(5000, 8, gen=gen)
    ex, tg = rand_csr(300, 5000, 0.01, gen), rand_csr(300, 5000, 0.002, gen, dup=True)
    labels = torch.randint(0, 2, (tg[1].numel(),), generator=gen)
    cpu = evaluate_full_ranking(ue, ie, ex, tg, ks=(10, 100), target_groups=labels, per_user=True)
    cu = lambda t: t.cuda()  # noqa: E731
    gpu = evaluate_full_ranking(cu(ue), cu(ie), tuple(map(cu, ex)), tuple(map(cu, tg)), ks=(10, 100),
                                target_groups=cu(labels), per_user=True, block_users=64, block_items=1024)
    assert gpu.n_users == cpu.n_users and gpu.group_users == cpu.group_users
    for name in cpu.metrics:
        assert gpu.metrics[name] == pytest.approx(cpu.metrics[name], rel=1e-9)
    s_cpu, i_cpu = topk(ue, ie, 50, ex)
    s_gpu, i_gpu = topk(cu(ue), cu(ie), 50, tuple(map(cu, ex)), block_users=32, block_items=777)
    assert torch.equal(i_gpu.cpu(), i_cpu) and torch.equal(s_gpu.cpu(), s_cpu)
    # score_fn path on the GPU
    fn = evaluate_full_ranking(None, None, tuple(map(cu, ex)), tuple(map(cu, tg)), ks=(10, 100),
                               score_fn=lambda us, a, b: cu(ue)[us] @ cu(ie)[a:b].T, n_items=5000, block_items=999)
    for name in cpu.metrics:
        assert fn.metrics[name] == pytest.approx(cpu.metrics[name], rel=1e-9)
