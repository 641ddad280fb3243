"""Run-time selected CPU kernel variants (csrc/cpu_isa.h): every variant this CPU can run, forced through
MBREC_FAST_CPU_ISA, against the reference.

Evaluator micro-kernel: exact on small-integer embeddings (every dot product is exact in fp32, whatever the
summation order, and ties are plentiful), within 1e-6 of the fp64 dot product's scale on random ones. The
sampler's Philox batch (AVX2 or scalar) must give the same draws bit for bit.
"""
import math
import pathlib
import re

import pytest
import torch

import mbrec_fast as mf
from mbrec_fast.evaluator import evaluate_full_ranking, topk
from mbrec_fast.reference.evaluator import dense_scores, reference_evaluate, reference_topk
from test_evaluator import rand_csr  # tests/ is on sys.path under pytest

torch.set_num_threads(1)
ALL_VARIANTS = ["avx512", "avx2", "portable"]
ROOT = pathlib.Path(__file__).resolve().parents[1]


def supported():
    return list(torch.ops.mbrec_fast.cpu_isa_variants())


@pytest.fixture(params=ALL_VARIANTS)
def variant(request, monkeypatch):
    if request.param not in supported():
        pytest.skip(f"this CPU cannot run the {request.param} kernels (supported: {supported()})")
    monkeypatch.setenv("MBREC_FAST_CPU_ISA", request.param)
    assert torch.ops.mbrec_fast.cpu_isa() == request.param
    return request.param


def _cpu_flags():
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    m = re.search(r"^flags\s*:(.*)$", text, re.M)
    return set(m.group(1).split()) if m else None


# ---------------------------------------------------------------------------------------------
# selection

def test_detection_agrees_with_cpuinfo():
    variants = supported()
    assert variants[-1] == "portable" and torch.ops.mbrec_fast.cpu_isa() in variants
    flags = _cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo")
    assert ("avx2" in variants) == ({"avx2", "fma"} <= flags)
    assert ("avx512" in variants) == ({"avx512f", "avx2", "fma"} <= flags)


def test_forcing_a_variant_this_cpu_lacks_is_an_error(monkeypatch):
    ue, ie = torch.ones(2, 3), torch.ones(5, 3)
    monkeypatch.setenv("MBREC_FAST_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="MBREC_FAST_CPU_ISA must be one of"):
        topk(ue, ie, 2)
    missing = [v for v in ALL_VARIANTS if v not in supported()]
    if not missing:
        pytest.skip("this CPU runs every variant")
    monkeypatch.setenv("MBREC_FAST_CPU_ISA", missing[0])
    with pytest.raises(RuntimeError, match="cannot run"):
        topk(ue, ie, 2)


def test_build_does_not_depend_on_the_build_machine():
    # no -march/-mavx flags: the SIMD kernels carry their target in their own files
    setup = (ROOT / "setup.py").read_text()
    assert not re.search(r"-m(arch|avx|fma|tune)", setup) and "cpuinfo" not in setup
    for name in ("cpu_kernels_avx2.cpp", "cpu_kernels_avx512.cpp"):
        assert "#pragma GCC target" in (ROOT / "csrc" / name).read_text()


# ---------------------------------------------------------------------------------------------
# evaluator micro-kernel

EXACT_CASES = [
    # (U, N, d, k, p_exclude, block_users, dtype): users/items not multiples of any tile, d odd, k = N
    (37, 203, 5, 10, 0.2, 256, torch.float32),
    (13, 61, 64, 61, 0.3, 5, torch.float32),
    (50, 1000, 33, 100, 0.05, 7, torch.float32),
    (3, 40, 1, 7, 0.5, 1, torch.float32),
    (25, 129, 8, 20, 0.1, 12, torch.float16),
    (25, 129, 8, 20, 0.1, 13, torch.bfloat16),
    (70, 2500, 16, 50, 0.02, 64, torch.float32),  # long enough for many reservoir shrinks
]


@pytest.mark.parametrize("U,N,d,k,p,bu,dtype", EXACT_CASES)
def test_topk_exact_on_integer_embeddings(variant, U, N, d, k, p, bu, dtype):
    gen = torch.Generator().manual_seed(U + N + d)
    ue = torch.randint(-2, 3, (U, d), generator=gen).to(dtype)
    ie = torch.randint(-2, 3, (N, d), generator=gen).to(dtype)
    ex = rand_csr(U, N, p, gen)
    s, i = topk(ue, ie, k, ex, block_users=bu)
    rs, ri = reference_topk(dense_scores(ue, ie), k, ex)
    assert torch.equal(i, ri) and torch.equal(s, rs)


def test_topk_users_subset_and_all_excluded(variant):
    gen = torch.Generator().manual_seed(5)
    ue, ie = torch.randint(-2, 3, (9, 4), generator=gen).float(), torch.randint(-2, 3, (30, 4), generator=gen).float()
    rows = [[0, 3], list(range(30)), [], [29]] + [[]] * 5
    indptr = torch.tensor([0] + [len(r) for r in rows]).cumsum(0)
    ex = (indptr, torch.tensor([x for r in rows for x in r], dtype=torch.int64))
    users = torch.tensor([3, 1, 0, 1, 8, 2])
    s, i = topk(ue, ie, 30, ex, users=users, block_users=4)
    rs, ri = reference_topk(dense_scores(ue, ie)[users], 30, ex, users)
    assert torch.equal(i, ri) and torch.equal(s, rs)
    assert bool((i[1] == -1).all())


@pytest.mark.parametrize("d", [16, 64, 128])
def test_topk_random_within_1e6(variant, d):
    # another summation order than torch.mm: each score within 1e-6 of the exact (fp64) dot product, relative
    # to sum |u_k v_k|; the ids are the reference's except where two scores are closer than that
    gen = torch.Generator().manual_seed(d)
    U, N, k = 40, 3000, 50
    ue, ie = torch.randn(U, d, generator=gen), torch.randn(N, d, generator=gen)
    ex = rand_csr(U, N, 0.01, gen)
    s, i = topk(ue, ie, k, ex)
    exact = ue.double() @ ie.double().T
    scale = ue.double().abs() @ ie.double().abs().T
    got_exact, got_scale = torch.gather(exact, 1, i), torch.gather(scale, 1, i)
    assert bool(((s.double() - got_exact).abs() <= 1e-6 * got_scale).all())
    rs, ri = reference_topk(dense_scores(ue, ie), k, ex)
    differ = i != ri
    if differ.any():  # only swaps of near-ties
        gap = (torch.gather(exact, 1, i) - torch.gather(exact, 1, ri)).abs()
        assert bool((gap[differ] <= 2e-6 * got_scale[differ]).all())
    excluded = torch.zeros(U, N, dtype=torch.bool)
    excluded[torch.repeat_interleave(torch.arange(U), ex[0].diff()), ex[1]] = True
    assert not torch.gather(excluded, 1, i).any()


def test_evaluate_metrics_exact(variant):
    gen = torch.Generator().manual_seed(3)
    U, N, d = 60, 700, 12
    ue, ie = torch.randint(-2, 3, (U, d), generator=gen).float(), torch.randint(-2, 3, (N, d), generator=gen).float()
    ex, tg = rand_csr(U, N, 0.05, gen), rand_csr(U, N, 0.01, gen)
    res = evaluate_full_ranking(ue, ie, ex, tg, ks=(1, 10, 50), per_user=True, block_users=16)
    ref = reference_evaluate(dense_scores(ue, ie), ex, tg, (1, 10, 50))
    for name, value in ref["metrics"].items():
        assert res.metrics[name] == pytest.approx(value, rel=1e-12, abs=1e-12), name


def test_variants_agree_exactly_on_integer_embeddings(monkeypatch):
    gen = torch.Generator().manual_seed(8)
    ue, ie = torch.randint(-3, 4, (31, 20), generator=gen).float(), torch.randint(-3, 4, (517, 20), generator=gen).float()
    ex = rand_csr(31, 517, 0.1, gen)
    outs = []
    for v in supported():
        monkeypatch.setenv("MBREC_FAST_CPU_ISA", v)
        outs.append(topk(ue, ie, 40, ex))
    for s, i in outs[1:]:
        assert torch.equal(s, outs[0][0]) and torch.equal(i, outs[0][1])


def test_topk_merge_prefilter(variant):
    # the score_fn path's merge uses the variant's 16-score pre-filter (ties admitted: blocks in any order)
    gen = torch.Generator().manual_seed(4)
    b, n, k = 6, 150, 12
    scores = torch.randint(-3, 3, (b, n), generator=gen).float()
    users = torch.arange(b)
    ex = rand_csr(b, n, 0.2, gen)
    s, i = torch.full((b, k), -math.inf), torch.full((b, k), -1, dtype=torch.int64)
    for a, e in reversed([(0, 37), (37, 100), (100, 150)]):
        s, i = torch.ops.mbrec_fast.topk_merge(scores[:, a:e].contiguous(), users, a, *ex, s, i)
    rs, ri = reference_topk(scores, k, ex, users)
    assert torch.equal(i, ri) and torch.equal(s, rs)


# ---------------------------------------------------------------------------------------------
# sampler: the Philox batch's variants give the same bits

def test_sampler_draws_identical_across_variants(monkeypatch):
    g = mf.InteractionGraph.from_arrays(torch.arange(900) % 40, (torch.arange(900) * 13) % 300,
                                        torch.arange(900) % 2, 40, 300)
    users = torch.randint(0, 40, (333,), generator=torch.Generator().manual_seed(1))
    outs = {}
    for v in supported():
        monkeypatch.setenv("MBREC_FAST_CPU_ISA", v)
        outs[v] = [mf.sample_negatives(g, users, n, mode=mode, replacement=rep, seed=7, offset=3,
                                       on_empty="sentinel")
                   for n in (1, 8, 23) for mode, rep in (("exclusive", True), ("visited", False))]
    first = outs[supported()[0]]
    for v, out in outs.items():
        assert all(torch.equal(a, b) for a, b in zip(out, first)), v
