"""Graph propagation products: `mbrec_fast.csr_spmm` (the package's CSR x dense kernel) against `torch.sparse.mm`
on sparse CSR tensors (what LightGCN-style code runs today), y = A x and the training step's pair (A x forward,
A^T dy backward), on the symmetric-normalized user-item graphs the models propagate over, in one run. Also the
per-layer row normalisation: `mbrec_fast.row_l2_normalize` against `F.normalize`, forward + backward, on embedding
tables of Tmall's user and item counts.

Default: a synthetic 20,000 x 10,000 graph with 500,000 edges. MBREC_FAST_BENCH_FULL=1: Tmall's view, cart and buy
graphs and their union (MEMBER's global graph) from the data root. extra_info: nonzeros per second.

    OMP_NUM_THREADS=1 python -m pytest benchmarks/test_bench_graph.py --benchmark-json out.json
    mbrec-fast bench --report out.json
"""
import os

import pytest
import torch

import torch.nn.functional as F

from mbrec_fast.graph import csr_spmm, row_l2_normalize
from mbrec_fast.models.lightgcn import BipartiteAdjacency

FULL = os.environ.get("MBREC_FAST_BENCH_FULL") == "1"
WIDTHS = (32, 64)


def _graphs():
    if not FULL:
        gen = torch.Generator().manual_seed(0)
        users = torch.randint(0, 20_000, (500_000,), generator=gen)
        items = (torch.rand(500_000, generator=gen) ** 2 * 10_000).long()  # skewed item popularity
        return {"synthetic 20000x10000": BipartiteAdjacency(users, items, 20_000, 10_000)}
    from mbrec_fast.training.multibehavior import load_data
    data = load_data("tmall")
    out = {}
    for r, name in enumerate(data.behavior_names):
        out[f"tmall {name}"] = BipartiteAdjacency.from_csr(data.train.csr(r), data.n_items)
    every = [data.pairs(r) for r in range(data.n_behaviors)]
    out["tmall all behaviors"] = BipartiteAdjacency(torch.cat([u for u, _ in every]), torch.cat([i for _, i in every]),
                                                    data.n_users, data.n_items)
    return out


GRAPHS = _graphs()


@pytest.mark.parametrize("graph", list(GRAPHS))
@pytest.mark.parametrize("d", WIDTHS)
@pytest.mark.parametrize("impl", ["mbrec_fast", "torch_sparse_mm"])
@pytest.mark.parametrize("pass_", ["forward", "forward+backward"])
def test_spmm(benchmark, record, graph, d, impl, pass_):
    adj = GRAPHS[graph]
    gen = torch.Generator().manual_seed(d)
    x, dy = torch.randn(adj.n_items, d, generator=gen), torch.randn(adj.n_users, d, generator=gen)
    if impl == "mbrec_fast":
        a, a_t = adj.csr_on("cpu")
        fwd, bwd = (lambda: csr_spmm(a, x)), (lambda: csr_spmm(a_t, dy))
    else:
        a, a_t = adj.on("cpu")
        fwd, bwd = (lambda: torch.sparse.mm(a, x)), (lambda: torch.sparse.mm(a_t, dy))

    def run():
        y = fwd()
        return (y, bwd()) if pass_ == "forward+backward" else y
    products = 2 if pass_ == "forward+backward" else 1
    record(op="graph", case=f"csr_spmm {pass_} {graph} d={d}", impl=impl, nnz=adj.n_edges, d=d)
    benchmark.group = f"graph: {pass_} {graph} d={d}"
    benchmark.pedantic(run, rounds=7, iterations=1, warmup_rounds=1)
    mean = benchmark.stats.stats.mean if getattr(benchmark, "stats", None) is not None else None
    if mean:
        benchmark.extra_info["nnz_per_s"] = products * adj.n_edges / mean


@pytest.mark.parametrize("rows", [11_953, 15_449])
@pytest.mark.parametrize("d", WIDTHS)
@pytest.mark.parametrize("impl", ["mbrec_fast", "F_normalize"])
def test_row_l2_normalize(benchmark, record, rows, d, impl):
    """Forward and backward of the row normalisation MEMBER's propagation applies after every layer."""
    gen = torch.Generator().manual_seed(rows + d)
    x = torch.randn(rows, d, generator=gen).requires_grad_()
    g = torch.randn(rows, d, generator=gen)
    fn = row_l2_normalize if impl == "mbrec_fast" else (lambda t: F.normalize(t, dim=-1))

    def run():
        x.grad = None
        fn(x).backward(g)
    record(op="graph", case=f"row_l2_normalize fwd+bwd {rows}x{d}", impl=impl, rows=rows, d=d)
    benchmark.group = f"graph: row_l2_normalize fwd+bwd {rows}x{d}"
    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=2)
