"""Tests of the cascade-aware negative sampler (mbrec_fast.sampler) against the CSR and the reference."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy import stats

import mbrec_fast as mf
from mbrec_fast.reference import sampler as ref
from mbrec_fast.sampler import MODES, AliasTable, InteractionGraph, _build_torch

DATASETS = {"beibei": ["cart", "buy"], "retailrocket": ["view", "cart", "buy"]}


@pytest.fixture(scope="module", params=sorted(DATASETS))
def real_graph(request, data_dir):
    name = request.param
    return name, InteractionGraph.from_table(data_dir / name / "interactions.tsv", DATASETS[name])


def small_graph(seed=0, n_users=30, n_items=40, n=400, R=3):
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(0, n_users, (n,), generator=g)
    i = torch.randint(0, n_items, (n,), generator=g)
    b = torch.randint(0, R, (n,), generator=g)
    return InteractionGraph.from_arrays(u, i, b, n_users, n_items, n_behaviors=R)


# ---------------------------------------------------------------------------------------------------------
# helpers: vectorized membership against a CSR
# ---------------------------------------------------------------------------------------------------------
def member(csr, users, items, n_items):
    """Bool tensor: items[k, j] is in row users[k] of csr (rows sorted)."""
    indptr, indices = csr
    rows = torch.repeat_interleave(torch.arange(indptr.numel() - 1), indptr.diff())
    keys = rows * n_items + indices.to(torch.int64)
    q = users.unsqueeze(1) * n_items + items.clamp(min=0)
    pos = torch.searchsorted(keys, q).clamp(max=max(keys.numel() - 1, 0))
    return (keys[pos] == q) if keys.numel() else torch.zeros_like(q, dtype=torch.bool)


def allowed_counts(graph, users, r, mode):
    """Size of each row's allowed set, from the CSRs only."""
    n = graph.n_items
    at_r = graph.degree(r)[users]
    if mode in ("exclusive", "cascade"):
        return n - at_r
    if mode == "strict":
        return n - graph.degree()[users]
    aux_ptr, aux_idx = graph.aux_csr()
    owner = torch.repeat_interleave(torch.arange(graph.n_users), aux_ptr.diff())
    in_r = member(graph.csr(r), owner, aux_idx.to(torch.int64).unsqueeze(1), n).squeeze(1)
    both = torch.zeros(graph.n_users, dtype=torch.int64).index_add_(0, owner, in_r.to(torch.int64))
    aux_deg = aux_ptr.diff()
    if mode == "visited":
        return (aux_deg - both)[users]
    return n - (aux_deg + graph.degree(r) - both)[users]  # unvisited: complement of aux U at_r


def check_rules(graph, users, r, mode, out, replacement, num_neg):
    """Asserts every negative of out obeys the exclusion rule of mode, exhaustively."""
    n = graph.n_items
    valid = out >= 0
    assert bool((out[valid] < n).all())
    users = users.to(torch.int64)
    at_r = member(graph.csr(r), users, out, n)
    assert not bool((at_r & valid).any()), f"{mode}: a negative was done at behavior {r}"
    if mode == "strict":
        assert not bool((member(graph.union_csr(), users, out, n) & valid).any())
    if mode == "visited":
        assert bool(member(graph.aux_csr(), users, out, n)[valid].all())
    if mode == "unvisited":
        assert not bool((member(graph.aux_csr(), users, out, n) & valid).any())
    counts = allowed_counts(graph, users, r, mode)
    if replacement:
        # -1 exactly where the allowed set is empty
        assert torch.equal((~valid).all(1), counts == 0)
        assert torch.equal((~valid).any(1), counts == 0)
    else:
        k = valid.sum(1)
        assert torch.equal(k, torch.minimum(counts, torch.tensor(num_neg)))
        srt = torch.sort(torch.where(valid, out, -1 - torch.arange(num_neg).expand_as(out)), 1).values
        assert bool((srt[:, 1:] != srt[:, :-1]).all()), "repeated negative without replacement"
        # valid draws come first, -1 after
        assert bool((valid[:, :-1] | ~valid[:, 1:]).all())


# ---------------------------------------------------------------------------------------------------------
# construction
# ---------------------------------------------------------------------------------------------------------
def test_build_matches_torch_fallback(real_graph, data_dir):
    # the C++ counting-sort build equals the torch unique-based build on real data
    name, g = real_graph
    import pandas as pd
    df = pd.read_csv(data_dir / name / "interactions.tsv", sep="\t", header=None, usecols=[0, 1, 2])
    codes = df[2].map({b: k for k, b in enumerate(DATASETS[name])}).to_numpy()
    if name == "beibei":  # the torch build is slow on 0.9M rows: compare a slice of users
        keep = df[0].to_numpy() < 3000
        df, codes = df[keep], codes[keep]
        g = InteractionGraph.from_arrays(df[0].values, df[1].values, codes, g.n_users, g.n_items,
                                         behavior_names=DATASETS[name])
    ip, ix = _build_torch(torch.tensor(df[0].values), torch.tensor(df[1].values), torch.tensor(codes),
                          g.n_users, g.n_items, len(DATASETS[name]))
    assert torch.equal(ip, g._indptr) and torch.equal(ix, g._indices)
    for b, bname in enumerate(DATASETS[name]):
        assert g.nnz(b) == len(df[df[2] == bname].drop_duplicates([0, 1]))


@pytest.mark.parametrize("R", [1, 2, 4])  # single behavior (empty aux), two, four behaviors
def test_build_unions_small(R):
    g = small_graph(seed=R, R=R)
    for u in range(g.n_users):
        rows = [set(ref.row_items(*g.csr(b), u).tolist()) for b in range(R)]
        assert set(ref.row_items(*g.union_csr(), u).tolist()) == set().union(*rows)
        assert set(ref.row_items(*g.aux_csr(), u).tolist()) == set().union(*rows[:-1])
        for b in range(R):
            assert np.all(np.diff(ref.row_items(*g.csr(b), u)) > 0)  # sorted and distinct
    users, items = g.positives(R - 1)
    assert bool(member(g.csr(R - 1), users, items.unsqueeze(1), g.n_items).all())


def test_duplicates_and_empty_graph():
    # duplicates merge; a graph without interactions samples every item
    g = InteractionGraph.from_arrays([0, 0, 0], [1, 1, 2], [0, 0, 0], 2, 4)
    assert g.nnz(0) == 2
    empty = InteractionGraph.from_arrays(torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64),
                                         torch.empty(0, dtype=torch.int64), 3, 5, n_behaviors=2)
    out = mf.sample_negatives(empty, torch.arange(3), 50, behavior=1)
    assert bool((out >= 0).all() and (out < 5).all())


# ---------------------------------------------------------------------------------------------------------
# exhaustive exclusion rules on real data
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("replacement", [True, False])  # with / without replacement inside a row
@pytest.mark.parametrize("mode", MODES)
def test_every_negative_obeys_its_rule(real_graph, mode, replacement):
    name, g = real_graph
    R = g.n_behaviors
    num_neg = 6
    for r in range(R):
        if mode == "visited" and R < 2:
            continue
        users, _ = g.positives(r)
        users = users[::3] if users.numel() > 60000 else users
        kw = {}
        if mode == "cascade":
            p = np.full(r + 1, 1.0 / (r + 1))
            kw["level_probs"] = p
        out = mf.sample_negatives(g, users, num_neg, behavior=r, mode=mode, replacement=replacement,
                                  on_empty="sentinel", seed=7, offset=r, **kw)
        assert out.shape == (users.numel(), num_neg) and out.dtype == torch.int64
        check_rules(g, users, r, mode, out, replacement, num_neg)


@pytest.mark.parametrize("mode", ["exclusive", "strict", "unvisited", "cascade"])  # modes taking popularity
def test_popularity_obeys_rules(real_graph, mode):
    name, g = real_graph
    r = g.target
    users, _ = g.positives(r)
    kw = {"level_probs": np.full(r + 1, 1.0 / (r + 1))} if mode == "cascade" else {}
    pop = g.item_popularity()
    for replacement in (True, False):
        out = mf.sample_negatives(g, users, 5, behavior=r, mode=mode, popularity=pop, replacement=replacement,
                                  on_empty="sentinel", **kw)
        check_rules(g, users, r, mode, out, replacement, 5)
        assert bool((pop[out[out >= 0]] > 0).all()), "a zero-popularity item was drawn"


def test_per_row_behaviors(real_graph):
    # one behavior per row (NMTR triples), cascade with an [R, R] table
    name, g = real_graph
    R = g.n_behaviors
    users = torch.cat([g.positives(r)[0][:2000] for r in range(R)])
    beh = torch.cat([torch.full((min(2000, g.nnz(r)),), r) for r in range(R)])
    table = np.zeros((R, R))
    for r in range(R):
        table[r, :r] = 0.5 / max(r, 1)
        table[r, R - 1] = 1 - table[r, :r].sum()
    out = mf.sample_negatives(g, users, 4, behavior=beh, mode="cascade", level_probs=table)
    for r in range(R):
        m = beh == r
        check_rules(g, users[m], r, "cascade", out[m], True, 4)


# ---------------------------------------------------------------------------------------------------------
# distributions (chi-square)
# ---------------------------------------------------------------------------------------------------------
def chi2_against(samples: torch.Tensor, expected: np.ndarray, min_p=1e-4):
    support = np.nonzero(expected)[0]
    s = samples.flatten().numpy()
    assert np.isin(s, support).all(), "a draw fell outside the expected support"
    counts = np.bincount(s, minlength=expected.size)[support]
    exp = expected[support] * s.size
    res = stats.chisquare(counts, exp / exp.sum() * counts.sum())
    assert res.pvalue > min_p, f"chi-square p = {res.pvalue}"


def level_minus_sizes(g, lv, r):
    """|S_lv(u) minus S_r(u)| for every user, vectorized."""
    ptr, idx = g.csr(lv)
    owner = torch.repeat_interleave(torch.arange(g.n_users), ptr.diff())
    hit = member(g.csr(r), owner, idx.to(torch.int64).unsqueeze(1), g.n_items).squeeze(1)
    return ptr.diff() - torch.zeros(g.n_users, dtype=torch.int64).index_add_(0, owner, hit.to(torch.int64))


def pick_user(g, r, mode, lo, hi):
    counts = allowed_counts(g, torch.arange(g.n_users), r, mode)
    ok = torch.nonzero((counts >= lo) & (counts <= hi)).flatten()
    assert ok.numel(), "no user with a suitable allowed set"
    return int(ok[0])


@pytest.mark.parametrize("mode,lo,hi", [
    ("visited", 5, 40),          # small own pool: rejection against at_r plus exact fallback
    ("exclusive", 1, 10 ** 9),   # big complement pool: rejection path
    ("strict", 1, 10 ** 9),      # complement of the touched union
    ("unvisited", 1, 10 ** 9),   # complement of aux U at_r
])
def test_uniform_over_allowed_set(real_graph, mode, lo, hi):
    name, g = real_graph
    r = g.target
    u = pick_user(g, r, mode, lo, hi)
    allowed = ref.allowed_items(g, u, r, mode)
    draws = max(40 * allowed.size, 20000)
    out = mf.sample_negatives(g, torch.full((draws // 8,), u), 8, behavior=r, mode=mode, seed=3)
    chi2_against(out, ref.expected_distribution(g, u, r, mode))


def test_cascade_hits_level_probabilities(data_dir):
    # Retail Rocket, buy: levels view\buy, cart\buy and never-touched, with overlapping pools
    g = InteractionGraph.from_table(data_dir / "retailrocket" / "interactions.tsv", DATASETS["retailrocket"])
    r = 2
    sizes = [level_minus_sizes(g, lv, r) for lv in range(2)]
    u = int(torch.nonzero((sizes[0] >= 4) & (sizes[1] >= 2))[0, 0])
    probs = np.array([0.5, 0.2, 0.3])
    out = mf.sample_negatives(g, torch.full((6000,), u), 8, behavior=r, mode="cascade", level_probs=probs, seed=11)
    chi2_against(out, ref.expected_distribution(g, u, r, "cascade", probs))
    # the share of never-touched draws is the last probability (binomial test)
    touched = set(ref.row_items(*g.union_csr(), u).tolist())
    frac_untouched = np.mean([x not in touched for x in out.flatten().tolist()])
    assert abs(frac_untouched - 0.3) < 4 * np.sqrt(0.3 * 0.7 / out.numel())


def test_cascade_empty_level_falls_back(data_dir):
    # a user whose view\buy pool is empty gets never-touched items for that share (documented fallback)
    g = InteractionGraph.from_arrays([0, 0, 0, 1], [0, 0, 1, 2], [0, 2, 2, 0], 2, 6, n_behaviors=3)
    probs = np.array([0.6, 0.1, 0.3])  # level 0 (empty for user 0), level 1 (empty), untouched
    out = mf.sample_negatives(g, torch.zeros(5000, dtype=torch.int64), 4, behavior=2, mode="cascade", level_probs=probs)
    chi2_against(out, ref.expected_distribution(g, 0, 2, "cascade", probs))
    assert set(out.flatten().tolist()) == {2, 3, 4, 5}


@pytest.mark.parametrize("n_excluded", [0, 3, 37])  # alias path only; mixed; tiny allowed set (exact walk)
def test_popularity_distribution(n_excluded):
    n = 40
    items = torch.arange(n_excluded)
    g = InteractionGraph.from_arrays(torch.zeros(n_excluded, dtype=torch.int64), items,
                                     torch.zeros(n_excluded, dtype=torch.int64), 1, n)
    w = np.random.default_rng(0).gamma(0.7, size=n) + 0.01
    w[-1] = 0.0  # a zero-weight item is never drawn
    out = mf.sample_negatives(g, torch.zeros(4000, dtype=torch.int64), 10, popularity=torch.tensor(w), seed=5)
    chi2_against(out, ref.expected_distribution(g, 0, 0, "exclusive", popularity=w))


def test_without_replacement_is_uniform_subset():
    # 3 distinct of 5 allowed: every one of the 10 subsets equally likely and every position uniform
    g = InteractionGraph.from_arrays([0, 0, 0], [0, 1, 2], [0, 0, 0], 1, 8)
    out = mf.sample_negatives(g, torch.zeros(20000, dtype=torch.int64), 3, replacement=False, seed=2)
    keys = (torch.sort(out, 1).values - 3) @ torch.tensor([25, 5, 1])
    counts = torch.bincount(keys).numpy()
    counts = counts[counts > 0]
    assert counts.size == 10 and stats.chisquare(counts).pvalue > 1e-4
    for col in range(3):
        assert stats.chisquare(torch.bincount(out[:, col] - 3).numpy()).pvalue > 1e-4


def test_reference_sampler_same_rules(real_graph):
    # the pure reference obeys the same rules (it defines them)
    name, g = real_graph
    r = g.target
    users = g.positives(r)[0][::997][:40]
    for mode in MODES:
        kw = {"level_probs": np.eye(g.n_behaviors)[-1][None].repeat(g.n_behaviors, 0)} if mode == "cascade" else {}
        out = ref.sample_negatives_reference(g, users, torch.full_like(users, r), 3, mode, replacement=False, **kw)
        check_rules(g, users, r, mode, out, False, 3)


# ---------------------------------------------------------------------------------------------------------
# determinism and termination
# ---------------------------------------------------------------------------------------------------------
def test_same_seed_same_bits_across_threads(real_graph):
    name, g = real_graph
    users = g.positives(g.target)[0][:20000]
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append([mf.sample_negatives(g, users, 4, mode=m, replacement=rep, seed=9, offset=3,
                                                on_empty="sentinel",
                                                **({"level_probs": np.full(g.n_behaviors, 1 / g.n_behaviors)}
                                                   if m == "cascade" else {}))
                            for m in MODES for rep in (True, False)])
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)
    again = mf.sample_negatives(g, users, 4, seed=9, offset=3)
    other_seed = mf.sample_negatives(g, users, 4, seed=10, offset=3)
    other_offset = mf.sample_negatives(g, users, 4, seed=9, offset=4)
    assert torch.equal(again, results[0][0])
    assert not torch.equal(again, other_seed) and not torch.equal(again, other_offset)


@pytest.mark.parametrize("num_neg", [
    1,   # one pre-computed Philox block per row, mostly unused
    8,   # two blocks: the usual case
    23,  # more words than the 4 pre-computed blocks: the stream continues with scalar blocks
])
def test_row_bits_do_not_depend_on_batch_size(num_neg):
    # the CPU kernel computes Philox blocks for 8 rows per SIMD vector; rows left over are computed one by
    # one. A row's draws must be the same whichever way its stream was set up: row i of a call equals
    # row i of any longer call (the stream is keyed by the row index).
    g = small_graph(seed=4, n_users=30, n_items=400, n=900)
    users = torch.randint(0, 30, (203,), generator=torch.Generator().manual_seed(2))
    behaviors = torch.randint(0, g.n_behaviors, (203,), generator=torch.Generator().manual_seed(3))
    for mode, rep in (("exclusive", True), ("strict", False), ("visited", True)):
        full = mf.sample_negatives(g, users, num_neg, behavior=behaviors, mode=mode, replacement=rep,
                                   seed=11, offset=5, on_empty="sentinel")
        for m in (1, 3, 7, 9, 64, 65, 130):
            part = mf.sample_negatives(g, users[:m], num_neg, behavior=behaviors[:m], mode=mode, replacement=rep,
                                       seed=11, offset=5, on_empty="sentinel")
            assert torch.equal(part, full[:m]), (mode, rep, m)


def test_reference_philox_matches_random123_known_answers():
    from mbrec_fast.reference.sampler import philox4x32_10
    # Random123's published known-answer vectors for philox4x32 with 10 rounds (counter, key -> output)
    assert philox4x32_10([0, 0, 0, 0], [0, 0]) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    m = 0xFFFFFFFF
    assert philox4x32_10([m, m, m, m], [m, m]) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert philox4x32_10([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0]) == \
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@pytest.mark.parametrize("seed,offset", [
    (0, 0),                          # the all-zero key and counter of the first known-answer vector (row 0)
    (0x123456789ABCDEF, 7),          # the seed's high word in the key
    (5, (3 << 32) + 11),             # the offset's high word folded into the key
])
def test_kernel_draws_follow_the_philox_stream(seed, offset):
    # With n_items = 2^31 - 2 (the largest allowed) and nothing excluded, draw d of a row is Lemire's (word * n) >> 32 of the row's
    # stream words (a word is redrawn only when its low product half falls below (2^32 - n) mod n): the
    # kernel's bits, SIMD-batched rows (groups of 8) and scalar rows alike, equal the reference stream.
    from mbrec_fast.reference.sampler import philox_stream_words
    n = 2 ** 31 - 2
    g = InteractionGraph.from_arrays(torch.tensor([0]), torch.tensor([0]), torch.tensor([0]), 1, n, n_behaviors=2)
    rows, num_neg = 21, 6
    out = mf.sample_negatives(g, torch.zeros(rows, dtype=torch.int64), num_neg, behavior=1, seed=seed,
                              offset=offset)
    threshold = (2 ** 32 - n) % n
    for row in range(rows):
        words = iter(philox_stream_words(seed, offset, row, 4 * num_neg))
        expect = []
        for _ in range(num_neg):
            m = next(words) * n
            while (m & 0xFFFFFFFF) < threshold:
                m = next(words) * n
            expect.append(m >> 32)
        assert out[row].tolist() == expect, row


def test_same_bits_in_subprocess_with_omp_threads():
    # a fresh process with OMP_NUM_THREADS=2 reproduces this process's bits
    code = textwrap.dedent("""
        import torch, mbrec_fast as mf, sys
        g = mf.InteractionGraph.from_arrays(torch.arange(300) % 50, (torch.arange(300) * 7) % 90,
                                            torch.arange(300) % 2, 50, 90)
        out = mf.sample_negatives(g, torch.arange(50).repeat(40), 5, mode='visited', replacement=False,
                                  seed=4, on_empty='sentinel')
        sys.stdout.write(','.join(map(str, out.flatten().tolist())))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "2"})
    assert res.returncode == 0, res.stderr
    g = InteractionGraph.from_arrays(torch.arange(300) % 50, (torch.arange(300) * 7) % 90, torch.arange(300) % 2, 50, 90)
    here = mf.sample_negatives(g, torch.arange(50).repeat(40), 5, mode="visited", replacement=False, seed=4,
                               on_empty="sentinel")
    assert res.stdout == ",".join(map(str, here.flatten().tolist()))


@pytest.mark.parametrize("replacement", [True, False])
# user touched all items / all but one / all but two / all but num_neg (the fewest left that can never run short
# without replacement: the output scan for empty pools is skipped there)
@pytest.mark.parametrize("left", [0, 1, 2, 4])
def test_tiny_allowed_sets_terminate(left, replacement):
    n = 5000
    items = torch.arange(n - left)
    g = InteractionGraph.from_arrays(torch.zeros(n - left, dtype=torch.int64), items,
                                     torch.ones(n - left, dtype=torch.int64), 1, n, n_behaviors=2)
    for mode in ("exclusive", "strict", "unvisited"):
        out = mf.sample_negatives(g, torch.zeros(200, dtype=torch.int64), 4, mode=mode, replacement=replacement,
                                  on_empty="sentinel")
        allowed = set(range(n - left, n))
        vals = out[out >= 0].tolist()
        assert set(vals) <= allowed
        if replacement:
            assert (len(vals) == 0) == (left == 0)
        else:
            assert bool(((out >= 0).sum(1) == min(left, 4)).all())
        if left == 0 or (not replacement and left < 4):
            with pytest.raises(ValueError, match="allowed set"):
                mf.sample_negatives(g, torch.zeros(3, dtype=torch.int64), 4, mode=mode, replacement=replacement)
        else:
            assert bool((mf.sample_negatives(g, torch.zeros(3, dtype=torch.int64), 4, mode=mode,
                                             replacement=replacement) >= 0).all())
    # popularity with only zero-weight items left: empty, not a hang
    w = torch.ones(n)
    w[n - left:] = 0
    out = mf.sample_negatives(g, torch.zeros(10, dtype=torch.int64), 3, popularity=w, on_empty="sentinel")
    assert bool((out == -1).all())


# ---------------------------------------------------------------------------------------------------------
# sequences
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pad", [-1, 0])  # pad outside the item range / pad as item 0 (SASRec style)
@pytest.mark.parametrize("use_domain", [False, True])
def test_sequence_negatives_rules(pad, use_domain):
    n, B, L = 60, 16, 12
    g = torch.Generator().manual_seed(1)
    seqs = torch.randint(1, n, (B, L), generator=g)
    seqs[:, :3] = pad
    seqs[0] = pad  # a fully padded row
    item_domain = torch.arange(n) % 3 if use_domain else None
    out = mf.sample_sequence_negatives(seqs, n, 7, pad=pad, item_domain=item_domain, seed=1)
    assert out.shape == (B, L, 7)
    valid = seqs != pad
    assert bool((out[~valid] == pad).all())
    for b in range(B):
        seen = set(seqs[b][valid[b]].tolist()) | ({pad} if pad >= 0 else set())
        for t in range(L):
            if not valid[b, t]:
                continue
            for x in out[b, t].tolist():
                assert 0 <= x < n and x not in seen
                if use_domain:
                    assert x % 3 == int(seqs[b, t]) % 3


def test_sequence_negatives_uniform_and_seq_domain():
    n = 30
    seqs = torch.tensor([[3, 4, 5, 6, -1]]).repeat(4000, 1)
    item_domain = torch.arange(n) // 10
    seq_domain = torch.tensor([[0, 0, 2, 2, 0]]).repeat(4000, 1)
    out = mf.sample_sequence_negatives(seqs, n, 2, item_domain=item_domain, seq_domain=seq_domain, seed=3)
    first = out[:, 0]
    chi2_against(first, np.r_[[1 / 6] * 3, [0] * 4, [1 / 6] * 3, [0] * 20])
    third = out[:, 2]
    chi2_against(third, np.r_[[0] * 20, [0.1] * 10])
    ref_out = ref.sample_sequence_negatives_reference(seqs[:50], n, 2, item_domain=item_domain, seq_domain=seq_domain)
    assert bool((ref_out[:, :4] >= 0).all())


def test_sequence_negatives_on_amazon_sample(data_dir):
    # SyNCRec's 5-domain sample: negatives stay in the target's domain and out of the sequence
    import pandas as pd
    df = pd.read_csv(data_dir / "samples" / "amazon5_seq.tsv", sep="\t").head(100)
    seq_items = [s.split(",") for s in df["item"]]
    seq_doms = [s.split(",") for s in df["type"]]
    vocab = {it: k for k, it in enumerate(sorted({x for s in seq_items for x in s}))}
    domains = sorted({x for s in seq_doms for x in s})
    item_domain = torch.zeros(len(vocab), dtype=torch.int64)
    for s, d in zip(seq_items, seq_doms):
        for it, dd in zip(s, d):
            item_domain[vocab[it]] = domains.index(dd)
    L = 30
    seqs = torch.full((len(seq_items), L), -1)
    for b, s in enumerate(seq_items):
        ids = [vocab[x] for x in s][-L:]
        seqs[b, L - len(ids):] = torch.tensor(ids)
    out = mf.sample_sequence_negatives(seqs, len(vocab), 3, item_domain=item_domain, on_empty="sentinel")
    valid = seqs >= 0
    for b in range(seqs.shape[0]):
        seen = set(seqs[b][valid[b]].tolist())
        for t in torch.nonzero(valid[b]).flatten().tolist():
            for x in out[b, t].tolist():
                if x >= 0:
                    assert int(item_domain[x]) == int(item_domain[seqs[b, t]])
                    assert x not in seen


# ---------------------------------------------------------------------------------------------------------
# training batches
# ---------------------------------------------------------------------------------------------------------
def test_triple_batches_epoch(real_graph):
    name, g = real_graph
    R = g.n_behaviors
    tb = mf.TripleBatches(g, behaviors=list(range(R)), batch_size=4096, num_neg=2, seed=1)
    total = sum(g.nnz(b) for b in range(R))
    assert len(tb) == -(-total // 4096)
    batches = list(tb)
    assert len(batches) == len(tb)
    u = torch.cat([b["users"] for b in batches])
    i = torch.cat([b["positives"] for b in batches])
    beh = torch.cat([b["behaviors"] for b in batches])
    key = torch.sort((beh * g.n_users + u) * g.n_items + i).values
    expected = torch.sort(torch.cat([(b * g.n_users + g.positives(b)[0]) * g.n_items + g.positives(b)[1]
                                     for b in range(R)])).values
    assert torch.equal(key, expected), "an epoch must visit every positive exactly once"
    for b in batches[:3]:
        for r in range(R):
            m = b["behaviors"] == r
            check_rules(g, b["users"][m], r, "exclusive", b["negatives"][m], True, 2)
    again = list(mf.TripleBatches(g, behaviors=list(range(R)), batch_size=4096, num_neg=2, seed=1))
    assert all(torch.equal(a["negatives"], b["negatives"]) for a, b in zip(batches, again))
    tb.set_epoch(1)
    first = next(iter(tb))
    assert not torch.equal(first["users"], batches[0]["users"])


def test_triple_batches_drop_last_and_cascade():
    g = small_graph(seed=3)
    tb = mf.TripleBatches(g, behaviors=[2], batch_size=7, num_neg=3, mode="cascade", drop_last=True, shuffle=False,
                          level_probs=[0.2, 0.3, 0.5])
    assert len(tb) == g.nnz(2) // 7
    out = list(tb)
    assert all(b["users"].numel() == 7 for b in out)
    assert torch.equal(torch.cat([b["users"] for b in out]), g.positives(2)[0][:7 * len(tb)])


# ---------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------
def test_bad_graph_input():
    with pytest.raises(ValueError, match="items out of range"):
        InteractionGraph.from_arrays([0], [5], [0], 1, 5)
    with pytest.raises(ValueError, match="users out of range"):
        InteractionGraph.from_arrays([-1], [0], [0], 1, 5)
    with pytest.raises(ValueError, match="behaviors out of range"):
        InteractionGraph.from_arrays([0], [0], [3], 1, 5, n_behaviors=2)
    with pytest.raises(ValueError, match="same length"):
        InteractionGraph.from_arrays([0, 1], [0], [0], 2, 5)
    with pytest.raises(TypeError, match="items must hold integer ids"):
        InteractionGraph.from_arrays([0], [0.5], [0], 1, 5)
    with pytest.raises(ValueError, match="n_items"):
        InteractionGraph.from_arrays([0], [0], [0], 1, -3)
    import pandas as pd
    with pytest.raises(ValueError, match="behavior_order does not contain"):
        InteractionGraph.from_table(pd.DataFrame({"user": [0], "item": [0], "behavior": ["click"]}), ["view", "buy"])
    with pytest.raises(ValueError, match="no column"):
        InteractionGraph.from_table(pd.DataFrame({"u": [0], "item": [0], "behavior": ["view"]}), ["view"])


@pytest.mark.parametrize("kwargs,err,match", [
    ({"num_neg": 0}, ValueError, "num_neg"),                                     # num_neg < 1
    ({"num_neg": 2.5}, ValueError, "num_neg"),                                   # non-int num_neg
    ({"users": torch.tensor([0, 30])}, ValueError, "users out of range"),        # user id too large
    ({"behavior": 3}, ValueError, "behavior must lie"),                          # unknown behavior int
    ({"behavior": "click"}, ValueError, "unknown"),                              # unknown behavior name
    ({"behavior": torch.tensor([0, 5])}, ValueError, "behavior out of range"),   # per-row behavior out of range
    ({"behavior": torch.tensor([0])}, ValueError, "one entry per row"),          # per-row behavior wrong length
    ({"mode": "hard"}, ValueError, "mode must be"),                              # unknown mode
    ({"mode": "cascade"}, ValueError, "level_probs is required"),                # cascade without probabilities
    ({"mode": "cascade", "level_probs": [0.5, 0.6, -0.1]}, ValueError, "non-negative"),  # negative probability
    ({"mode": "cascade", "level_probs": [0.5, 0.2, 0.2]}, ValueError, "sum to 1"),       # does not sum to 1
    ({"mode": "cascade", "level_probs": [0.5, 0.5]}, ValueError, "3 entries"),           # wrong length
    ({"mode": "cascade", "level_probs": [0.5, float("nan"), 0.5]}, ValueError, "NaN"),   # NaN probability
    ({"mode": "cascade", "level_probs": np.full((3, 3), 1 / 3)}, ValueError, "levels >= "),  # mass above r
    ({"level_probs": [1.0]}, ValueError, "only used by mode='cascade'"),         # probabilities in a uniform mode
    ({"popularity": torch.ones(7)}, ValueError, "n_items"),                      # popularity of the wrong size
    ({"popularity": -torch.ones(40)}, ValueError, ">= 0"),                       # negative weights
    ({"popularity": torch.zeros(40)}, ValueError, "all be 0"),                   # all-zero weights
    ({"mode": "visited", "popularity": torch.ones(40)}, ValueError, "visited"),  # popularity on own pool
    ({"on_empty": "skip"}, ValueError, "on_empty"),                              # unknown on_empty
    ({"seed": -1}, ValueError, "seed"),                                          # negative seed
])
def test_bad_sampling_input(kwargs, err, match):
    g = small_graph()
    args = {"users": torch.tensor([0, 1]), "num_neg": 2}
    args.update(kwargs)
    users, num_neg = args.pop("users"), args.pop("num_neg")
    with pytest.raises(err, match=match):
        mf.sample_negatives(g, users, num_neg, **args)


def test_bad_sampling_types():
    g = small_graph()
    with pytest.raises(TypeError, match="graph must be"):
        mf.sample_negatives("graph", torch.tensor([0]), 1)
    with pytest.raises(TypeError, match="users must hold integer"):
        mf.sample_negatives(g, torch.tensor([0.0]), 1)
    with pytest.raises(ValueError, match="users must be 1-D"):
        mf.sample_negatives(g, torch.zeros(2, 2, dtype=torch.int64), 1)


def test_bad_sequence_input():
    seqs = torch.tensor([[1, 2, -1]])
    with pytest.raises(ValueError, match="seqs out of range"):
        mf.sample_sequence_negatives(seqs, 2, 1)
    with pytest.raises(ValueError, match="seqs must be 2-D"):
        mf.sample_sequence_negatives(seqs[0], 5, 1)
    with pytest.raises(ValueError, match="num_neg"):
        mf.sample_sequence_negatives(seqs, 5, 0)
    with pytest.raises(ValueError, match="item_domain must have"):
        mf.sample_sequence_negatives(seqs, 5, 1, item_domain=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="seq_domain out of range"):
        mf.sample_sequence_negatives(seqs, 5, 1, item_domain=torch.zeros(5, dtype=torch.int64),
                                     seq_domain=torch.tensor([[0, 4, 0]]))
    with pytest.raises(ValueError, match="seq_domain needs item_domain"):
        mf.sample_sequence_negatives(seqs, 5, 1, seq_domain=torch.zeros(1, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="no allowed negative"):
        mf.sample_sequence_negatives(torch.tensor([[0, 1, 2]]), 3, 1)


def test_op_level_checks_name_the_argument():
    # the C++ side is a second line of defense with the argument's name
    g = small_graph()
    z64 = torch.empty(0, dtype=torch.int64)
    thr = torch.zeros(3, 3, dtype=torch.int64)
    op = torch.ops.mbrec_fast.sample_negatives
    with pytest.raises(RuntimeError, match="users out of range"):
        op(g._indptr, g._indices, torch.tensor([99]), torch.tensor([0]), thr, z64, torch.empty(0, dtype=torch.int32),
           z64, z64, g.n_items, 1, 0, True, 0, 0)
    with pytest.raises(RuntimeError, match="indices must have dtype"):
        op(g._indptr, g._indices.long(), torch.tensor([0]), torch.tensor([0]), thr, z64,
           torch.empty(0, dtype=torch.int32), z64, z64, g.n_items, 1, 0, True, 0, 0)
    with pytest.raises(RuntimeError, match="num_neg"):
        op(g._indptr, g._indices, torch.tensor([0]), torch.tensor([0]), thr, z64, torch.empty(0, dtype=torch.int32),
           z64, z64, g.n_items, 0, 0, True, 0, 0)
    with pytest.raises(RuntimeError, match="items out of range"):
        torch.ops.mbrec_fast.build_interaction_graph(torch.tensor([0]), torch.tensor([9]), torch.tensor([0]), 1, 5, 1)


# ---------------------------------------------------------------------------------------------------------
# properties on random small graphs (adversarial shapes)
# ---------------------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10 ** 6), n_items=st.integers(1, 25), R=st.integers(1, 4), num_neg=st.integers(1, 30),
       replacement=st.booleans(), mode=st.sampled_from(MODES), dense=st.booleans())
def test_rules_hold_on_random_graphs(seed, n_items, R, num_neg, replacement, mode, dense):
    if mode == "visited" and R < 2:
        return
    rng = torch.Generator().manual_seed(seed)
    n = 300 if dense else 20
    g = InteractionGraph.from_arrays(torch.randint(0, 6, (n,), generator=rng), torch.randint(0, n_items, (n,), generator=rng),
                                     torch.randint(0, R, (n,), generator=rng), 6, n_items, n_behaviors=R)
    r = int(torch.randint(0, R, (1,), generator=rng))
    kw = {"level_probs": np.full(r + 1, 1 / (r + 1))} if mode == "cascade" else {}
    users = torch.arange(6).repeat(3)
    out = mf.sample_negatives(g, users, num_neg, behavior=r, mode=mode, replacement=replacement, seed=seed,
                              on_empty="sentinel", **kw)
    check_rules(g, users, r, mode, out, replacement, num_neg)


# ---------------------------------------------------------------------------------------------------------
# op registration: opcheck and torch.compile
# ---------------------------------------------------------------------------------------------------------
def _op_args(g, popularity=False):
    from mbrec_fast.sampler import _level_thresholds
    R = g.n_behaviors
    table = torch.zeros(R, R, dtype=torch.float64)
    table[:, R - 1] = 1
    table[R - 1, 0] = 0.5
    table[R - 1, R - 1] = 0.5
    if popularity:
        a = AliasTable(torch.arange(g.n_items, dtype=torch.float64) + 1)
        pop = (a.threshold, a.alias, a.weights_q, a.prefix)
    else:
        z = torch.empty(0, dtype=torch.int64)
        pop = (z, torch.empty(0, dtype=torch.int32), z, z)
    return (g._indptr, g._indices, torch.arange(10), torch.full((10,), R - 1), _level_thresholds(table), *pop)


@pytest.mark.parametrize("mode,replacement,popularity", [
    (0, True, False),   # exclusive, uniform
    (2, False, True),   # cascade, without replacement, popularity
    (3, True, False),   # visited
])
def test_opcheck_sample_negatives(mode, replacement, popularity):
    g = small_graph()
    args = _op_args(g, popularity) + (g.n_items, 3, mode, replacement, 5, 1)
    torch.library.opcheck(torch.ops.mbrec_fast.sample_negatives.default, args)


def test_opcheck_sequence_and_build():
    excl = torch.tensor([[1, 2, 5], [0, 5, 5]], dtype=torch.int32)
    args = (excl, torch.tensor([2, 1]), torch.tensor([[0, 1], [-1, 0]]), torch.tensor([0, 2, 5]),
            torch.tensor([0, 1, 2, 3, 4], dtype=torch.int32), 5, 2, -1, 0, 0)
    torch.library.opcheck(torch.ops.mbrec_fast.sample_sequence_negatives.default, args)
    torch.library.opcheck(torch.ops.mbrec_fast.build_interaction_graph.default,
                          (torch.tensor([0, 1, 1]), torch.tensor([2, 0, 2]), torch.tensor([0, 1, 0]), 2, 3, 2),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph():
    g = small_graph()
    args = _op_args(g)

    @torch.compile(fullgraph=True, backend="eager")
    def f(users):
        return torch.ops.mbrec_fast.sample_negatives(*args[:2], users, *args[3:], g.n_items, 4, 0, True, 1, 2)

    users = torch.arange(10)
    assert torch.equal(f(users), torch.ops.mbrec_fast.sample_negatives(*args[:2], users, *args[3:], g.n_items, 4, 0,
                                                                       True, 1, 2))


# ---------------------------------------------------------------------------------------------------------
# GPU: bit-identical with the CPU
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_cuda_matches_cpu_bits(real_graph, mode):
    name, g = real_graph
    gc = g.to("cuda")
    users = g.positives(g.target)[0]
    kw = {"level_probs": np.full(g.n_behaviors, 1 / g.n_behaviors)} if mode == "cascade" else {}
    if mode != "visited":
        kw_pop = dict(kw, popularity=g.item_popularity())
    else:
        kw_pop = kw
    for rep in (True, False):
        for extra in (kw, kw_pop):
            a = mf.sample_negatives(g, users, 5, mode=mode, replacement=rep, seed=3, offset=2, on_empty="sentinel",
                                    **extra)
            b = mf.sample_negatives(gc, users.cuda(), 5, mode=mode, replacement=rep, seed=3, offset=2,
                                    on_empty="sentinel", **extra)
            assert b.is_cuda and torch.equal(a, b.cpu())


@pytest.mark.gpu
def test_cuda_sequence_matches_cpu_bits():
    seqs = torch.randint(0, 500, (64, 50))
    seqs[:, :10] = -1
    dom = torch.arange(500) % 5
    for item_domain in (None, dom):
        a = mf.sample_sequence_negatives(seqs, 500, 4, item_domain=item_domain, seed=2)
        b = mf.sample_sequence_negatives(seqs.cuda(), 500, 4, item_domain=None if item_domain is None else dom.cuda(),
                                         seed=2)
        assert torch.equal(a, b.cpu())
    tb = mf.TripleBatches(InteractionGraph.from_arrays(seqs[:, 10:].flatten() % 30, seqs[:, 10:].flatten(),
                                                       torch.zeros(64 * 40, dtype=torch.int64), 30, 500).to("cuda"),
                          batch_size=100, num_neg=2)
    assert next(iter(tb))["negatives"].is_cuda
