"""Negatives per second of the sampler against a RecBole-style sampler and a vectorized torch baseline.

Default (CI): Beibei target-behavior rows and a small cache-resident synthetic graph. With
MBREC_FAST_BENCH_FULL=1 also the 1M users x 1M items x 100M interactions graph (generation and build time,
peak RSS, and the rates of all three samplers on 2M random users). Threads: torch.set_num_threads(2) for our op; the baselines are what they are.
"""
import os
import resource
import time

import numpy as np
import pytest
import torch

import mbrec_fast as mf
from mbrec_fast.sampler import InteractionGraph

FULL = os.environ.get("MBREC_FAST_BENCH_FULL") == "1"
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")
NUM_NEG = 8


class RecBoleStyle:
    """Per-user Python sets; NumPy draws for all rows, redraw the rejected ones in a Python loop."""

    def __init__(self, graph: InteractionGraph, behavior: int):
        indptr, indices = graph.csr(behavior)
        ip, ix = indptr.numpy(), indices.numpy()
        self.used = [set(ix[ip[u]:ip[u + 1]].tolist()) for u in range(graph.n_users)]
        self.n_items = graph.n_items

    def sample(self, users: np.ndarray, num: int) -> np.ndarray:
        key = np.repeat(users, num)
        value = np.random.randint(0, self.n_items, key.size)
        check = np.array([i for i, u, v in zip(range(key.size), key, value) if v in self.used[u]], dtype=np.int64)
        while check.size:
            value[check] = np.random.randint(0, self.n_items, check.size)
            check = np.array([i for i, u, v in zip(check, key[check], value[check]) if v in self.used[u]],
                             dtype=np.int64)
        return value.reshape(-1, num)


def torch_rejection(graph: InteractionGraph, behavior: int, users: torch.Tensor, num: int) -> torch.Tensor:
    """Vectorized rejection: sorted (user * n + item) keys, searchsorted membership, redraw the rejects."""
    indptr, indices = graph.csr(behavior)
    n = graph.n_items
    owner = torch.repeat_interleave(torch.arange(graph.n_users), indptr.diff())
    keys = owner * n + indices.to(torch.int64)
    out = torch.randint(0, n, (users.numel(), num))
    todo = torch.ones_like(out, dtype=torch.bool)
    while True:
        q = users.unsqueeze(1) * n + out
        pos = torch.searchsorted(keys, q).clamp(max=keys.numel() - 1)
        bad = (keys[pos] == q) & todo
        if not bool(bad.any()):
            return out
        out[bad] = torch.randint(0, n, (int(bad.sum()),))
        todo = bad


def _exclusive_sampler(impl: str, g: InteractionGraph, r: int, users: torch.Tensor):
    """(call drawing NUM_NEG exclusive negatives per row, the rows it draws for); the RecBole-style loop gets
    the first 50,000 rows only (it is slow; rates are per negative)."""
    if impl == "recbole_style":
        users = users[:50_000]
        sampler = RecBoleStyle(g, r)
        return (lambda: sampler.sample(users.numpy(), NUM_NEG)), users
    if impl == "torch_rejection":
        return (lambda: torch_rejection(g, r, users, NUM_NEG)), users
    return (lambda: mf.sample_negatives(g, users, NUM_NEG, behavior=r)), users


def synthetic(n_users, n_items, n_inter, R=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    users = torch.randint(0, n_users, (n_inter,), generator=g)
    items = torch.randint(0, n_items, (n_inter,), generator=g)
    behaviors = torch.multinomial(torch.tensor([0.8, 0.15, 0.05]), n_inter, replacement=True, generator=g)
    return users, items, behaviors


def _graphs():
    cases = []
    path = os.path.join(DATA, "beibei", "interactions.tsv")
    if os.path.exists(path):
        cases.append(("beibei", lambda: InteractionGraph.from_table(path, ["cart", "buy"])))
    cases.append(("synthetic 20k users x 20k items x 400k (cache-resident)",
                  lambda: InteractionGraph.from_arrays(*synthetic(20_000, 20_000, 400_000), 20_000, 20_000,
                                                       n_behaviors=3)))
    return cases


_CACHE = {}


def _graph(name, make):
    if name not in _CACHE:
        _CACHE[name] = make()
    return _CACHE[name]


@pytest.mark.parametrize("name,make", _graphs(), ids=[c[0].split(" ")[0] for c in _graphs()])
@pytest.mark.parametrize("impl", ["mbrec_fast", "torch_rejection", "recbole_style"])
def test_bench_exclusive(benchmark, record, name, make, impl):
    g = _graph(name, make)
    r = g.target
    fn, users = _exclusive_sampler(impl, g, r, g.positives(r)[0])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        t = time.perf_counter()
        fn()
        once = time.perf_counter() - t
        benchmark.group = f"sampler: {name} exclusive num_neg={NUM_NEG}"
        # the cache-resident case takes ~2 ms a call: 50 rounds, so that its best is not one noisy sample
        rounds = 1 if impl == "recbole_style" else (50 if users.numel() < 100_000 else 10)
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1 if impl != "recbole_style" else 0)
    finally:
        torch.set_num_threads(before)
    stats = benchmark.stats.stats if benchmark.stats else None
    best = stats.min if stats is not None and stats.min else once
    record(op="sampler", case=f"{name} exclusive", impl=impl, rows=users.numel(), num_neg=NUM_NEG, threads=2,
           neg_per_s=users.numel() * NUM_NEG / best)


@pytest.mark.parametrize("mode", ["strict", "cascade", "visited", "unvisited"])
def test_bench_modes(benchmark, record, mode):
    g = _graph(*_graphs()[0])
    r = g.target
    users = g.positives(r)[0]
    kw = {"level_probs": np.full(r + 1, 1 / (r + 1))} if mode == "cascade" else {}
    fn = lambda: mf.sample_negatives(g, users, NUM_NEG, behavior=r, mode=mode, on_empty="sentinel", **kw)  # noqa
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        benchmark.group = f"sampler: {_graphs()[0][0]} {mode}"
        benchmark.pedantic(fn, rounds=3, iterations=1)
    finally:
        torch.set_num_threads(before)
    best = benchmark.stats.stats.min if benchmark.stats else float("nan")
    record(op="sampler", case=f"{_graphs()[0][0]} {mode}", impl="mbrec_fast", rows=users.numel(), num_neg=NUM_NEG,
           threads=2, neg_per_s=users.numel() * NUM_NEG / best)


def _graph_100m():
    """The 1M users x 1M items x 100M interactions graph, built once per session: (graph, gen_s, build_s)."""
    if "100m" not in _CACHE:
        n = 1_000_000
        t = time.perf_counter()
        users, items, behaviors = synthetic(n, n, 100_000_000)
        gen_s = time.perf_counter() - t
        before = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            t = time.perf_counter()
            g = InteractionGraph.from_arrays(users, items, behaviors, n, n, n_behaviors=3)
            build_s = time.perf_counter() - t
        finally:
            torch.set_num_threads(before)
        _CACHE["100m"] = (g, gen_s, build_s)
    return _CACHE["100m"]


@pytest.mark.skipif(not FULL, reason="set MBREC_FAST_BENCH_FULL=1 for the 100M-interaction graph")
@pytest.mark.parametrize("impl", ["mbrec_fast", "torch_rejection", "recbole_style"])
def test_bench_100m_graph(benchmark, record, impl):
    g, gen_s, build_s = _graph_100m()
    r = g.target
    fn, rows = _exclusive_sampler(impl, g, r, torch.randint(0, g.n_users, (2_000_000,),
                                                            generator=torch.Generator().manual_seed(1)))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        benchmark.group = "sampler: synthetic 1M x 1M x 100M"
        benchmark.pedantic(fn, rounds=2 if impl != "recbole_style" else 1, iterations=1)
    finally:
        torch.set_num_threads(before)
    best = benchmark.stats.stats.min
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    record(op="sampler", case="synthetic 1M x 1M x 100M exclusive", impl=impl, rows=rows.numel(),
           num_neg=NUM_NEG, threads=2, neg_per_s=rows.numel() * NUM_NEG / best, build_s=build_s, gen_s=gen_s,
           peak_mem_mb=peak_mb, graph_mb=g.nbytes() / 2 ** 20)
    print(f"\n100M graph, {impl}: generate {gen_s:.1f}s, build {build_s:.1f}s, storage {g.nbytes() / 2**20:.0f} MiB, "
          f"peak RSS so far {peak_mb:.0f} MiB, {rows.numel() * NUM_NEG / best / 1e6:.2f} M neg/s")
