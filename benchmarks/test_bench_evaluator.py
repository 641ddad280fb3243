"""Full-ranking evaluation: fused blocked GEMM + top-K selection vs the dense RecBole-style path (with
RecBole's default user batching, and with large batches) and faiss exact inner-product search (IndexFlatIP, over-fetching k + max excluded to apply the mask).

Every impl computes the same RecBole metrics at K = 10, 20, 50, 100 with the users' training items
excluded. Recorded per impl: users_per_s; gemm_gflops, the scoring GEMM's FLOPs (2 * n_items * d per
user) per second; frac_sgemm_bound = users/s over sgemm_rate / (2 * n_items * d), with the torch.mm
rate of the dense scoring GEMM measured in the same run; x_best_mm_rate = gemm_gflops over the fastest
torch.mm rate measured in this run (that GEMM and small cache-resident ones; above 1 = faster than any
plain torch.mm measured); and, in the full run, peak_mem_mb (growth of the peak RSS during one call,
measured in a fresh subprocess).

Default shapes are small so that CI's `--benchmark-disable` pass is quick; MBREC_FAST_BENCH_FULL=1
runs Beibei (all users), 100k items x 8192 users, 1M items x 2048 users and the single-shot
100k users x 1M items case (fused only).
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import resource
import subprocess
import sys
import time

import pytest
import torch

FULL = os.environ.get("MBREC_FAST_BENCH_FULL", "0") == "1"
KS = (10, 20, 50, 100)
D = 64
DATA_DIR = pathlib.Path(os.environ.get("MBREC_FAST_DATA", pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"))

def _count(n: int) -> str:
    """100000 -> "100k", 1000000 -> "1M", 512 -> "512"."""
    for div, unit in ((1_000_000, "M"), (1_000, "k")):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


def case_label(n_users, n_items) -> str:
    """The case name says the sizes that run (quick and full mode differ); None = all of Beibei."""
    if n_items is None:
        return f"beibei {'all' if n_users is None else _count(n_users)} users d={D}"
    return f"synthetic {_count(n_users)} users x {_count(n_items)} items d={D}"


# case name -> (n_users, n_items); Beibei's sizes come from the data (None: all users / items)
CASES = {case_label(*size): size for size in [
    (None if FULL else 2048, None),
    (8192, 100_000) if FULL else (512, 20_000),
    (2048, 1_000_000) if FULL else (256, 50_000),
]}
IMPLS = ["mbrec_fast", "dense_recbole", "dense_blocked", "faiss_flatip", "implicit"]


# ---------------------------------------------------------------------------------------------
# problems

def _csr_from_lists(rows, n_rows):
    indptr = torch.zeros(n_rows + 1, dtype=torch.int64)
    indptr[1:] = torch.tensor([len(r) for r in rows], dtype=torch.int64).cumsum(0)
    flat = [x for r in rows for x in r]
    return indptr, torch.tensor(flat, dtype=torch.int64)


def _random_csr(n_rows, n_cols, per_row, gen):
    """per_row distinct sorted random ids per row."""
    cols = torch.randint(0, n_cols, (n_rows, per_row), generator=gen).sort(1).values
    keep = torch.ones_like(cols, dtype=torch.bool)
    keep[:, 1:] = cols[:, 1:] != cols[:, :-1]
    indptr = torch.zeros(n_rows + 1, dtype=torch.int64)
    indptr[1:] = keep.sum(1).cumsum(0)
    return indptr, cols[keep].contiguous()


def make_problem(case: str):
    """(user_emb, item_emb, exclude, targets) for a case; deterministic (subprocesses rebuild it)."""
    n_users, n_items = CASES[case]
    if n_items is None:  # Beibei
        from mbrec_fast.demo import _csr, load_multibehavior, train_bpr_mf
        folder = DATA_DIR / "beibei"
        if not (folder / "meta.json").is_file():
            pytest.skip(f"Beibei data not found at {folder}")
        data = load_multibehavior(folder)
        nu, ni = data["meta"]["n_users"], data["meta"]["n_items"]
        is_t = data["behaviors"] == data["target"]
        ue, ie = train_bpr_mf(data["users"][is_t], data["items"][is_t], nu, ni, dim=D, epochs=2)
        exclude = _csr(data["users"][is_t], data["items"][is_t], nu)
        targets = _csr(data["test"][:, 0], data["test"][:, 1], nu)
        n = nu if n_users is None else n_users
        return (ue[:n].contiguous(), ie, (exclude[0][:n + 1], exclude[1][:int(exclude[0][n])]),
                (targets[0][:n + 1], targets[1][:int(targets[0][n])]))
    return random_problem(n_users, n_items)


def random_problem(n_users: int, n_items: int):
    """Synthetic (user_emb, item_emb, exclude, targets): Gaussian embeddings, 20 excluded and 3 target items
    per user; seeded, so a subprocess rebuilds exactly the same problem."""
    gen = torch.Generator().manual_seed(0)
    ue = torch.randn(n_users, D, generator=gen)
    ie = torch.randn(n_items, D, generator=gen)
    return ue, ie, _random_csr(n_users, n_items, 20, gen), _random_csr(n_users, n_items, 3, gen)


# ---------------------------------------------------------------------------------------------
# implementations

def run_mbrec_fast(ue, ie, exclude, targets):
    from mbrec_fast import evaluate_full_ranking
    return evaluate_full_ranking(ue, ie, exclude, targets, KS).metrics


def run_dense_recbole(ue, ie, exclude, targets):
    """RecBole's full-sort path with its default batching: max(eval_batch_size // n_items, 1) users per
    step, eval_batch_size = 4096 (RecBole's FullSortEvalDataLoader._init_batch_size_and_step)."""
    from mbrec_fast.reference.evaluator import dense_blocked_evaluate
    return dense_blocked_evaluate(ue, ie, exclude, targets, KS, block_users=max(4096 // ie.shape[0], 1))


def run_dense_blocked(ue, ie, exclude, targets):
    """The same dense path with large user batches (one batch of scores <= 1 GiB): the strongest dense setting."""
    from mbrec_fast.reference.evaluator import dense_blocked_evaluate
    return dense_blocked_evaluate(ue, ie, exclude, targets, KS, block_users=max(1, min(4096, (1 << 28) // ie.shape[0])))


def run_faiss_flatip(ue, ie, exclude, targets):
    import faiss
    import numpy as np
    faiss.omp_set_num_threads(torch.get_num_threads())
    index = faiss.IndexFlatIP(ie.shape[1])
    index.add(np.ascontiguousarray(ie.float().numpy()))
    n_users, kmax = ue.shape[0], max(KS)
    over = kmax + int(exclude[0].diff().max()) if n_users else kmax
    _, ids = index.search(np.ascontiguousarray(ue.float().numpy()), over)
    ids = torch.from_numpy(ids)
    # drop excluded ids, keep the first kmax survivors per row
    rows = torch.repeat_interleave(torch.arange(n_users), exclude[0].diff())
    excluded_keys = rows * ie.shape[0] + exclude[1]
    keys = torch.arange(n_users)[:, None] * ie.shape[0] + ids
    bad = torch.isin(keys, excluded_keys) | (ids < 0)
    order = torch.argsort(bad.to(torch.int8), dim=1, stable=True)[:, :kmax]
    top = torch.where(torch.gather(bad, 1, order), -1, torch.gather(ids, 1, order)).contiguous()
    users = torch.arange(n_users)
    values, counts = torch.ops.mbrec_fast.rank_metrics(top, users, *targets, torch.zeros(0, dtype=torch.int64), 0, list(KS))
    valid = counts[0] > 0
    means = values[0][valid].mean(0)
    return {f"{m}@{k}": float(means[j, i]) for j, k in enumerate(KS)
            for i, m in enumerate(("hr", "ndcg", "recall", "precision", "mrr"))}


def run_implicit(ue, ie, exclude, targets):  # pragma: no cover - implicit is not installed here
    import implicit.cpu.topk as itopk  # noqa: F401
    import numpy as np
    kmax = max(KS)
    filt = [exclude[1][exclude[0][u]:exclude[0][u + 1]].numpy() for u in range(ue.shape[0])]
    del filt
    ids, _ = itopk.topk(np.ascontiguousarray(ue.numpy()), np.ascontiguousarray(ie.numpy()), kmax)
    return ids


RUNNERS = {"mbrec_fast": run_mbrec_fast, "dense_recbole": run_dense_recbole, "dense_blocked": run_dense_blocked,
           "faiss_flatip": run_faiss_flatip,
           "implicit": run_implicit}


def _available(impl: str) -> bool:
    if impl == "faiss_flatip":
        try:
            import faiss  # noqa: F401
        except ImportError:
            return False
    if impl == "implicit":
        try:
            import implicit  # noqa: F401
        except ImportError:
            return False
    return True


# ---------------------------------------------------------------------------------------------
# measurements

_SGEMM_RATE = {}


def _mm_rate(m: int, n: int, d: int, reps: int) -> float:
    a, b, c = torch.randn(m, d), torch.randn(n, d), torch.empty(m, n)
    torch.mm(a, b.T, out=c)
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b.T, out=c)
        best = min(best, time.perf_counter() - t)
    return 2 * m * n * d / best


def sgemm_rate(d: int = D) -> float:
    """FLOP/s of torch.mm (fp32) on the dense scoring GEMM [4096, d] x [d, 65536] into a preallocated
    output (no page-fault cost), best of 3; measured once per run. The bound for frac_sgemm_bound."""
    if d not in _SGEMM_RATE:
        _SGEMM_RATE[d] = _mm_rate(4096, 65536, d, 3)
    return _SGEMM_RATE[d]


def best_mm_rate(d: int = D) -> float:
    """The fastest torch.mm FLOP/s measured in this run: the dense scoring GEMM (sgemm_rate) and small
    cache-resident products (512 x 512 and 256 x 256 outputs). The reference of x_best_mm_rate."""
    key = ("best", d)
    if key not in _SGEMM_RATE:
        _SGEMM_RATE[key] = max(sgemm_rate(d), _mm_rate(512, 512, d, 50), _mm_rate(256, 256, d, 100))
    return _SGEMM_RATE[key]


def peak_mem_mb(impl: str, case: str) -> float:
    """Growth of the peak RSS over one call, in a fresh subprocess (MiB)."""
    out = subprocess.run([sys.executable, __file__, "--peak", impl, case], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mem_mb"]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", IMPLS)
def test_bench_evaluator(benchmark, record, impl, case):
    if not _available(impl):
        pytest.skip(f"{impl} baseline is not installed")
    ue, ie, exclude, targets = make_problem(case)
    n_users, n_items = ue.shape[0], ie.shape[0]
    benchmark.group = f"evaluator: {case}"
    # full shapes: one timed round after a warm-up on a slice of 64 users (the big cases run minutes)
    if FULL:
        RUNNERS[impl](ue[:64], ie, (exclude[0][:65], exclude[1][:int(exclude[0][64])]),
                      (targets[0][:65], targets[1][:int(targets[0][64])]))
    metrics = benchmark.pedantic(RUNNERS[impl], args=(ue, ie, exclude, targets), rounds=1 if FULL else 3,
                                 iterations=1, warmup_rounds=0 if FULL else 1)
    bound_users_per_s = sgemm_rate() / (2 * n_items * D)
    fields = dict(op="evaluator", case=case, impl=impl, n_users=n_users, n_items=n_items, d=D, ks=list(KS),
                  hr_at_10=metrics["hr@10"], ndcg_at_10=metrics["ndcg@10"])
    if benchmark.stats is not None and benchmark.stats.stats.min:
        users_per_s = n_users / benchmark.stats.stats.min
        gemm_rate = users_per_s * 2 * n_items * D
        sgemm_2048 = sgemm_2048_rate()  # measured right after this impl's timed call
        fields.update(users_per_s=users_per_s, gemm_gflops=gemm_rate / 1e9,
                      frac_sgemm_bound=users_per_s / bound_users_per_s, x_best_mm_rate=gemm_rate / best_mm_rate(),
                      frac_sgemm_2048=gemm_rate / sgemm_2048,
                      sgemm_gflops=sgemm_rate() / 1e9, best_mm_gflops=best_mm_rate() / 1e9,
                      sgemm_2048_gflops=sgemm_2048 / 1e9)
    # RecBole's batching holds one user's row: its peak is small. MBREC_FAST_BENCH_PEAK=0 skips the subprocesses.
    if FULL and impl != "dense_recbole" and os.environ.get("MBREC_FAST_BENCH_PEAK", "1") != "0":
        fields["peak_mem_mb"] = peak_mem_mb(impl, case)
    record(**fields)
    assert 0.0 <= metrics["hr@10"] <= 1.0


def test_bench_evaluator_memory_flat_in_users(record, benchmark):
    """Peak memory of the fused path does not grow with users beyond the [users, K] outputs."""
    n_items = 100_000 if FULL else 20_000
    small, large = (2048, 16384) if FULL else (256, 1024)
    benchmark.group = "evaluator: memory vs users"
    peaks = {}
    for n_users in (small, large):
        out = subprocess.run([sys.executable, __file__, "--peak-topk", str(n_users), str(n_items)], capture_output=True,
                             text=True, env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())},
                             timeout=1800)
        assert out.returncode == 0, out.stderr[-2000:]
        peaks[n_users] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mem_mb"]
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    output_mb = (large - small) * max(KS) * 12 / 2**20  # fp32 score + int64 id per slot
    record(op="evaluator", case="memory vs users", impl="mbrec_fast", n_items=n_items, users_small=small,
           users_large=large, peak_mem_mb_small=peaks[small], peak_mem_mb_large=peaks[large],
           output_growth_mb=output_mb)
    # embeddings of the extra users + outputs + allocator slack; a dense path would need users x items x 4 bytes
    extra_inputs_mb = (large - small) * D * 4 / 2**20
    assert peaks[large] - peaks[small] <= output_mb + extra_inputs_mb + 64


def test_bench_100k_users_1m_items(record, benchmark):
    """The scale case: 100k users x 1M items, d = 64, fused top-100 + metrics (run once, full only)."""
    if not FULL:
        pytest.skip("set MBREC_FAST_BENCH_FULL=1 for the 100k users x 1M items case")
    benchmark.group = "evaluator: 100k users x 1M items d=64"
    out = subprocess.run([sys.executable, __file__, "--scale", "100000", "1000000"], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}, timeout=3600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    record(op="evaluator", case="100k users x 1M items d=64", impl="mbrec_fast", **result)


# ---------------------------------------------------------------------------------------------
# the CPU scoring micro-kernel against a bare 2048^3 sgemm, measured in the same run

KERNEL_CASES = ([(d, n, t) for d in (64, 128) for n in (100_000, 1_000_000) for t in (1, 2)] if FULL
                else [(64, 20_000, 1), (128, 20_000, 2)])


def sgemm_2048_rate(reps: int = 2) -> float:
    """FLOP/s of torch.mm on fp32 [2048, 2048] x [2048, 2048] into a preallocated output, best of reps."""
    return _mm_rate(2048, 2048, 2048, reps)


@pytest.mark.parametrize("d,n_items,threads", KERNEL_CASES)
def test_bench_scoring_kernel_vs_sgemm(benchmark, record, d, n_items, threads):
    """Fused top-100 selection (`topk_dot`, 20 excluded items per user) of every SIMD variant this CPU runs,
    as a fraction of the 2048^3 sgemm FLOP rate; sgemm and the variants are measured interleaved, best of 3
    rounds each, so a load spike on a shared machine hits both."""
    from mbrec_fast.evaluator import topk
    variants = [v for v in torch.ops.mbrec_fast.cpu_isa_variants() if v != "portable"] or ["portable"]
    flops_per_call = 4e10 if FULL else 2e8
    n_users = max(512, int(flops_per_call / (2 * n_items * d)) // 512 * 512)
    gen = torch.Generator().manual_seed(0)
    ue, ie = torch.randn(n_users, d, generator=gen), torch.randn(n_items, d, generator=gen)
    exclude = _random_csr(n_users, n_items, 20, gen)
    before_threads, before_isa = torch.get_num_threads(), os.environ.get("MBREC_FAST_CPU_ISA")
    best = {"sgemm": 0.0, **{v: 0.0 for v in variants}}
    try:
        torch.set_num_threads(threads)
        for _ in range(3):
            best["sgemm"] = max(best["sgemm"], sgemm_2048_rate())
            for v in variants:
                os.environ["MBREC_FAST_CPU_ISA"] = v
                t = time.perf_counter()
                topk(ue, ie, max(KS), exclude)
                best[v] = max(best[v], 2 * n_users * n_items * d / (time.perf_counter() - t))
    finally:
        torch.set_num_threads(before_threads)
        if before_isa is None:
            os.environ.pop("MBREC_FAST_CPU_ISA", None)
        else:
            os.environ["MBREC_FAST_CPU_ISA"] = before_isa
    benchmark.group = f"evaluator kernel: d={d} items={n_items} threads={threads}"
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    fields = {f"frac_sgemm_2048_{v}": best[v] / best["sgemm"] for v in variants}
    fields.update({f"gflops_{v}": best[v] / 1e9 for v in variants})
    record(op="evaluator_kernel", case=f"d={d} items={n_items} threads={threads}", impl="mbrec_fast", d=d,
           n_items=n_items, n_users=n_users, threads=threads, variants=variants, cpu_isa_default=variants[0],
           sgemm_2048_gflops=best["sgemm"] / 1e9, frac_sgemm_2048=best[variants[0]] / best["sgemm"], **fields)
    assert all(best[v] > 0 for v in variants)


# ---------------------------------------------------------------------------------------------
# subprocess entry points (peak RSS must be measured in a fresh process)

def _maxrss_mb() -> float:
    """Peak RSS of this process (MiB). VmHWM belongs to the process image and starts afresh at exec, whereas
    getrusage's ru_maxrss carries over the parent's peak through fork + exec (a large pytest parent would hide the
    child's own peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _main(argv):
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    import mbrec_fast  # noqa: F401  (load the ops before the baseline RSS is taken)
    if argv[0] == "--peak":
        impl, case = argv[1], argv[2]
        problem = make_problem(case)
        before = _maxrss_mb()
        RUNNERS[impl](*problem)
        print(json.dumps({"peak_mem_mb": _maxrss_mb() - before}))
    elif argv[0] == "--peak-topk":
        n_users, n_items = int(argv[1]), int(argv[2])
        ue, ie, exclude, targets = random_problem(n_users, n_items)
        before = _maxrss_mb()
        run_mbrec_fast(ue, ie, exclude, targets)
        print(json.dumps({"peak_mem_mb": _maxrss_mb() - before}))
    elif argv[0] == "--interleaved":
        # Every available impl on one synthetic problem, rounds interleaved (ours, baselines, ours, ...) so that a
        # load spike on a shared machine hits all of them; best of 3 per impl, users/s and slowdown vs ours.
        n_users, n_items = int(argv[1]), int(argv[2])
        problem = random_problem(n_users, n_items)
        impls = [i for i in ("mbrec_fast", "dense_blocked", "faiss_flatip") if _available(i)]
        best = {i: math.inf for i in impls}
        metrics = {}
        for _ in range(3):
            for impl in impls:
                t = time.perf_counter()
                metrics[impl] = RUNNERS[impl](*problem)
                best[impl] = min(best[impl], time.perf_counter() - t)
        assert all(metrics[i]["ndcg@100"] == pytest.approx(metrics["mbrec_fast"]["ndcg@100"], rel=1e-9) for i in impls)
        print(json.dumps({"n_users": n_users, "n_items": n_items, "d": D, "threads": torch.get_num_threads(),
                          "users_per_s": {i: n_users / best[i] for i in impls},
                          "x_slower_than_ours": {i: best[i] / best["mbrec_fast"] for i in impls}}))
    elif argv[0] == "--scale":
        n_users, n_items = int(argv[1]), int(argv[2])
        ue, ie, exclude, targets = random_problem(n_users, n_items)
        before = _maxrss_mb()
        t = time.perf_counter()
        metrics = run_mbrec_fast(ue, ie, exclude, targets)
        seconds = time.perf_counter() - t
        print(json.dumps({"n_users": n_users, "n_items": n_items, "d": D, "seconds": seconds,
                          "users_per_s": n_users / seconds, "peak_rss_mb": _maxrss_mb(),
                          "peak_mem_mb": _maxrss_mb() - before, "frac_sgemm_bound": n_users / seconds
                          / (sgemm_rate() / (2 * n_items * D)),
                          "x_best_mm_rate": n_users / seconds * 2 * n_items * D / best_mm_rate(),
                          "ndcg_at_10": metrics["ndcg@10"]}))


if __name__ == "__main__":
    _main(sys.argv[1:])
