"""LightGCN (He et al., SIGIR'20) on the target behavior, plus the graph helpers MEMBER reuses.

Helpers:
* `BipartiteAdjacency`: the symmetric-normalized user-item adjacency D^-1/2 A D^-1/2, stored in CSR both ways
  (users x items and its transpose), so that one propagation step is two sparse x dense products and its
  backward two more on the stored transposes (no sparse transpose at run time, no (U+I) x (U+I) block matrix).
  The products run on the package's `mbrec_fast.graph.csr_spmm` op or on `torch.sparse.mm` (`SPMM_IMPL`).
* `lightgcn_propagate`: K simultaneous propagation steps, layer mean (alpha_k = 1 / (K + 1)).
* `drop_edges`: seeded edge dropout that keeps an exact-size subset of the edges (no replacement).

The model recomputes the propagated embeddings at every optimizer step (never reusing a stale
propagation) and, for evaluation, computes them once under no_grad inside `scorer()`.
"""
from __future__ import annotations

import warnings
from typing import Dict, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..batching import PairBatches
from ..csr import Csr, coo_to_csr, csr_rows, csr_to_coo
from ..graph import CsrMatrix, csr_spmm, csr_transpose
from .base import MultiBehaviorModel, Scorer, check_model_kwargs, gather_rows

__all__ = ["BipartiteAdjacency", "lightgcn_propagate", "drop_edges", "csr_to_edges", "check_model_kwargs",
           "LightGCN"]

csr_to_edges = csr_to_coo  # (rows, cols) int64 of a CSR pair; the old name of `mbrec_fast.csr.csr_to_coo`

#: the propagation's sparse x dense products: "fused" (the package's `csr_spmm` op: one FMA chain per element, the
#: same bits on any thread count; 2-3x torch's rate on the CPU, benchmarks/test_bench_graph.py), "torch"
#: (`torch.sparse.mm` on sparse CSR tensors, the plain-PyTorch way), or None: fused on CPU, torch on other devices
#: (on an H200 the op's CUDA kernel ran at 0.52x cuSPARSE's rate, docs/gpu_check.md).
SPMM_IMPL: Optional[str] = None
SPMM_IMPLS = ("fused", "torch")


def drop_edges(users: torch.Tensor, items: torch.Tensor, rate: float,
               generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Keeps round((1 - rate) * E) distinct edges chosen uniformly without replacement (original order)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"edge dropout rate must lie in [0, 1), got {rate}")
    n = users.numel()
    keep = int(round((1.0 - rate) * n))
    if keep >= n:
        return users, items
    idx = torch.randperm(n, generator=generator)[:keep].sort().values
    return users[idx], items[idx]


def _sparse_csr(crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, size) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(crow, col, val, size=size, check_invariants=False)


class _SpMM(torch.autograd.Function):
    """y = A @ x for sparse CSR A with the explicit transpose A_t used in the backward."""

    @staticmethod
    def forward(ctx, a, a_t, x):
        ctx.a_t = a_t
        return torch.sparse.mm(a, x)

    @staticmethod
    def backward(ctx, grad):
        return None, None, torch.sparse.mm(ctx.a_t, grad.contiguous())


class BipartiteAdjacency:
    """Symmetric-normalized bipartite adjacency: value of edge (u, i) = 1 / sqrt(deg(u) * deg(i)).

    Duplicate edges count once. Nodes without edges keep a zero row (their propagated embedding is 0).
    Holds CPU tensors; `on(device)` returns (and caches) a copy on another device.
    """

    def __init__(self, users: torch.Tensor, items: torch.Tensor, n_users: int, n_items: int,
                 dtype: torch.dtype = torch.float32):
        users = torch.as_tensor(users, dtype=torch.long).cpu()
        items = torch.as_tensor(items, dtype=torch.long).cpu()
        if users.shape != items.shape or users.dim() != 1:
            raise ValueError("users and items must be 1-D tensors of the same length")
        if users.numel() and (int(users.min()) < 0 or int(users.max()) >= n_users):
            raise ValueError(f"users must lie in [0, {n_users})")
        if items.numel() and (int(items.min()) < 0 or int(items.max()) >= n_items):
            raise ValueError(f"items must lie in [0, {n_items})")
        self.n_users, self.n_items = int(n_users), int(n_items)
        crow_u, i = coo_to_csr(users, items, n_users, n_items, torch.long)  # sorted by (user, item), de-duplicated
        u = csr_rows((crow_u, i))
        deg_u = torch.bincount(u, minlength=n_users).to(dtype)
        deg_i = torch.bincount(i, minlength=n_items).to(dtype)
        val = (deg_u[u] * deg_i[i]).rsqrt()
        self.n_edges = int(i.numel())
        # the transpose is item-major, each item's users in ascending order (csr_transpose is stable)
        self._parts = {"ui": (crow_u, i, val), "iu": csr_transpose((crow_u, i, val), n_items)}
        self._cache: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_csr(cls, csr: Csr, n_items: int, dtype: torch.dtype = torch.float32) -> "BipartiteAdjacency":
        rows, cols = csr_to_edges(tuple(t.cpu() for t in csr))
        return cls(rows, cols, csr[0].numel() - 1, n_items, dtype)

    def on(self, device, dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
        """(A [U, I], A^T [I, U]) as sparse CSR tensors on `device` with values in `dtype`."""
        key = f"{torch.device(device)}/{dtype}"
        if key not in self._cache:
            (cu, ci, vu), (ci2, cu2, vi) = self._parts["ui"], self._parts["iu"]
            a = _sparse_csr(cu.to(device), ci.to(device), vu.to(device, dtype), (self.n_users, self.n_items))
            a_t = _sparse_csr(ci2.to(device), cu2.to(device), vi.to(device, dtype), (self.n_items, self.n_users))
            self._cache[key] = (a, a_t)
        return self._cache[key]

    def csr_on(self, device, dtype: torch.dtype = torch.float32) -> Tuple[CsrMatrix, CsrMatrix]:
        """(A, A^T) as (crow, col, val) triples on `device` with values in `dtype` (cached), for `csr_spmm`."""
        key = f"csr/{torch.device(device)}/{dtype}"
        if key not in self._cache:
            self._cache[key] = tuple((crow.to(device), col.to(device), val.to(device, dtype))
                                     for crow, col, val in (self._parts["ui"], self._parts["iu"]))
        return self._cache[key]

    def step(self, user_emb: torch.Tensor, item_emb: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """One propagation step: (A @ item_emb, A^T @ user_emb), by `SPMM_IMPL`."""
        impl = SPMM_IMPL if SPMM_IMPL is not None else ("torch" if user_emb.device.type != "cpu" else "fused")
        if impl not in SPMM_IMPLS:
            raise ValueError(f"SPMM_IMPL must be one of {SPMM_IMPLS} or None, got {impl!r}")
        if impl == "fused":
            a, a_t = self.csr_on(user_emb.device, user_emb.dtype)
            return csr_spmm(a, item_emb, a_t), csr_spmm(a_t, user_emb, a)
        a, a_t = self.on(user_emb.device, user_emb.dtype)
        return _SpMM.apply(a, a_t, item_emb), _SpMM.apply(a_t, a, user_emb)


def lightgcn_propagate(adj: BipartiteAdjacency, user_emb: torch.Tensor, item_emb: torch.Tensor,
                       n_layers: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """LightGCN output: mean of the layer-0..K embeddings of `n_layers` propagation steps."""
    if n_layers < 0:
        raise ValueError(f"n_layers must be >= 0, got {n_layers}")
    if user_emb.shape[0] != adj.n_users or item_emb.shape[0] != adj.n_items:
        raise ValueError(f"embeddings have {user_emb.shape[0]} users / {item_emb.shape[0]} items, "
                         f"the graph {adj.n_users} / {adj.n_items}")
    u_sum, i_sum = user_emb, item_emb
    u, i = user_emb, item_emb
    for _ in range(n_layers):
        u, i = adj.step(u, i)
        u_sum, i_sum = u_sum + u, i_sum + i
    scale = 1.0 / (n_layers + 1)
    return u_sum * scale, i_sum * scale


class LightGCN(MultiBehaviorModel):
    """LightGCN on the target-behavior graph, trained with BPR (uniform negatives outside the user's
    purchases, sampler mode "exclusive"); score = dot product of the propagated embeddings.

    Defaults follow the paper: K = 3 layers, embeddings N(0, 0.1^2); L2 `reg` on the layer-0 rows
    used in the batch (divided by the batch size).
    """

    name = "lightgcn"

    def __init__(self, n_users: int, n_items: int, graph_csr: Csr, dim: int = 64, n_layers: int = 3,
                 reg: float = 1e-4, neg_ratio: int = 1, target_behavior: Optional[int] = None):
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if neg_ratio < 1:
            raise ValueError(f"neg_ratio must be >= 1, got {neg_ratio}")
        self.n_users, self.n_items, self.dim, self.n_layers = n_users, n_items, dim, n_layers
        self.reg, self.neg_ratio, self.target_behavior = reg, neg_ratio, target_behavior
        self.adj = BipartiteAdjacency.from_csr(graph_csr, n_items)
        self.user_emb = nn.Embedding(n_users, dim)
        self.item_emb = nn.Embedding(n_items, dim)
        nn.init.normal_(self.user_emb.weight, std=0.1)
        nn.init.normal_(self.item_emb.weight, std=0.1)

    @classmethod
    def from_data(cls, data, **kwargs) -> "LightGCN":
        """Model on `data`'s target-behavior training graph (kwargs go to the constructor)."""
        check_model_kwargs(cls, kwargs)
        return cls(data.n_users, data.n_items, data.target_csr(), target_behavior=data.target, **kwargs)

    def propagate(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Propagated (user, item) embeddings, with autograd (one call per optimizer step)."""
        return lightgcn_propagate(self.adj, self.user_emb.weight, self.item_emb.weight, self.n_layers)

    def training_batches(self, data, epoch: int, batch_size: int, seed: int) -> Iterable[Dict[str, torch.Tensor]]:
        return PairBatches.of_behaviors(data.train, [data.target], batch_size=batch_size, num_neg=self.neg_ratio,
                                        seed=seed, epoch=epoch, mode="exclusive")

    def score_pairs(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Scores of (users[j], items[j]) with a fresh propagation (autograd on)."""
        ue, ie = self.propagate()
        return (ue[users] * ie[items]).sum(-1)

    def loss(self, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, float]]:
        dev = self.user_emb.weight.device
        u, p, n = batch["users"].to(dev), batch["pos"].to(dev), batch["neg"].to(dev)
        ue, ie = self.propagate()
        eu, ep, en = gather_rows(ue, u), gather_rows(ie, p), gather_rows(ie, n)
        s_pos = (eu * ep).sum(-1, keepdim=True)
        s_neg = torch.einsum("bd,bkd->bk", eu, en)
        bpr = F.softplus(s_neg - s_pos).mean()
        uw, iw = self.user_emb.weight, self.item_emb.weight
        l2 = (gather_rows(uw, u).pow(2).sum() + gather_rows(iw, p).pow(2).sum()
              + gather_rows(iw, n).pow(2).sum() / n.shape[1]) / u.numel()
        total = bpr + self.reg * l2
        return total, {"loss": float(total.detach()), "bpr": float(bpr.detach())}

    def scorer(self) -> Scorer:
        with torch.no_grad():
            ue, ie = self.propagate()
        return Scorer(user_emb=ue.detach(), item_emb=ie.detach())
