"""MEMBER: a self-supervised mixture of experts for multi-behavior recommendation (Kim et al., CIKM'25).

A target item is *visited* for a user when the user touched it under an auxiliary (non-target) behavior
in training, *unvisited* otherwise. Two experts with no shared parameters score the two kinds:

* each expert has a global part (its own user/item tables propagated by LightGCN over the union graph of
  all behaviors) and a local part (one table propagated by a separate LightGCN over each behavior graph,
  results averaged); score_e(u, i) = lambda_e <g_u, g_i> + (1 - lambda_e) <l_u, l_i>;
* hard gating: score(u, i) = score_visited(u, i) if i is in u's auxiliary row, else score_unvisited(u, i).
  Membership comes from the sorted auxiliary CSR (binary search on flattened user * n_items + item
  keys) - never from a dense users x items mask, in training and inside the evaluator's score_fn.

Losses (weights are constructor arguments, defaults from the paper / authors' run scripts):
* BPR on the gated score: per training purchase, `neg_ratio` uniform negatives outside the user's
  purchases (sampler mode "exclusive" at the target), which also calibrates the two experts' scales
  against each other; plus (`pool_weight`) in-pool BPR terms: the visited expert ranks a visited
  purchase above an item the user touched but did not buy (sampler mode "visited"), the unvisited
  expert ranks a purchase above an item the user never touched (mode "unvisited");
* InfoNCE for the visited expert between its local embeddings and its local table propagated over an
  augmented graph of purchases preceded by an auxiliary behavior; for the unvisited expert between its
  global embeddings and its global table propagated over an augmented graph of the other purchases.
  Augmentation = edge dropout (exact-size subset, no replacement), rebuilt per epoch from (seed, epoch);
* generative loss: each lower behavior's edges predicted from the next higher behavior's local
  embeddings of each expert (BCE, uniform item negatives).

`single_expert=True` is the ablation: one expert scores every item (same losses, no gating).
Propagated embeddings are recomputed at every optimizer step; `scorer()` computes them once under no_grad.
"""
from __future__ import annotations

from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..batching import PairBatches, epoch_seed
from ..csr import Csr, union_csr
from ..graph import row_l2_normalize
from ..sampler import InteractionGraph
from .base import MultiBehaviorModel, Scorer, check_model_kwargs, gather_rows
from .lightgcn import BipartiteAdjacency, csr_to_edges, drop_edges, lightgcn_propagate

__all__ = ["MEMBER", "KeyedCsr", "gated_scores_dense_reference", "pool_restricted_scorer", "evaluate_by_pool",
           "EXCLUDED_SCORE", "VARIANTS", "OFFICIAL_PHASES", "official_propagate",
           "l2_normalize_rows", "NORMALIZE_IMPLS"]


class KeyedCsr:
    """A sorted CSR as flattened keys user * n_items + item, for vectorized membership tests."""

    def __init__(self, csr: Csr, n_items: int):
        rows, cols = csr_to_edges(tuple(t.cpu() for t in csr))
        self.n_items = int(n_items)
        self.indptr = csr[0].cpu().long()
        self.indices = cols
        self.keys = rows * n_items + cols
        if self.keys.numel() > 1 and not bool((self.keys[1:] > self.keys[:-1]).all()):
            raise ValueError("CSR rows must hold sorted, distinct item ids")
        self._dev: Dict[str, torch.Tensor] = {}

    def keys_on(self, device) -> torch.Tensor:
        key = str(torch.device(device))
        if key not in self._dev:
            self._dev[key] = self.keys.to(device)
        return self._dev[key]

    def contains(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Bool tensor (shape of items): is (users, items) an entry? users broadcasts against items."""
        keys = self.keys_on(items.device)
        q = users.long() * self.n_items + items.long()
        if keys.numel() == 0:
            return torch.zeros(q.shape, dtype=torch.bool, device=q.device)
        pos = torch.searchsorted(keys, q.reshape(-1)).clamp_(max=keys.numel() - 1)
        return (keys[pos] == q.reshape(-1)).view(q.shape)

    def block_entries(self, users: torch.Tensor, item_start: int, item_end: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(row positions into `users`, item ids) of every entry with item in [item_start, item_end)."""
        keys = self.keys_on(users.device)
        base = users.long() * self.n_items
        lo = torch.searchsorted(keys, base + item_start)
        hi = torch.searchsorted(keys, base + item_end)
        count = hi - lo
        rows = torch.repeat_interleave(torch.arange(users.numel(), device=users.device), count)
        first = torch.cumsum(count, 0) - count
        pos = torch.arange(rows.numel(), device=users.device) - first[rows] + lo[rows]
        return rows, keys[pos] - base[rows]


def gated_scores_dense_reference(user_v, item_v, user_n, item_n, aux_csr: Csr, n_items: int) -> torch.Tensor:
    """Brute-force reference of the gated score matrix with a dense users x items mask (tests only)."""
    rows, cols = csr_to_edges(aux_csr)
    mask = torch.zeros(user_v.shape[0], n_items, dtype=torch.bool)
    mask[rows, cols] = True
    return torch.where(mask, user_v @ item_v.T, user_n @ item_n.T)


#: score given to items outside the candidate pool: finite (the evaluator rejects inf), below any real
#: score, so those items rank after every candidate and never change HR/NDCG of the pool's targets
EXCLUDED_SCORE = -1e30


def pool_restricted_scorer(scorer: Scorer, aux_csr: Csr, n_items: int, pool: str, others: str = "exclude") -> Scorer:
    """A scorer that ranks only the user's visited items (pool="visited") or only the others
    ("unvisited"), for the paper's per-pool protocol; works for any model's scorer.

    others="exclude": items outside the pool get EXCLUDED_SCORE (they rank after every candidate, so they
    are removed for HR/NDCG). others="zero": they keep score 0, as in the official MEMBER code (they
    then outrank every candidate with a negative score). Pool membership per [users x item range] block
    comes from the auxiliary CSR by binary search; the only mask is the block's own [b, block] one.
    """
    if pool not in ("visited", "unvisited"):
        raise ValueError(f"pool must be 'visited' or 'unvisited', got {pool!r}")
    if others not in ("exclude", "zero"):
        raise ValueError(f"others must be 'exclude' or 'zero', got {others!r}")
    fill = EXCLUDED_SCORE if others == "exclude" else 0.0
    keyed = KeyedCsr(aux_csr, n_items)

    def score_fn(users: torch.Tensor, item_start: int, item_end: int) -> torch.Tensor:
        if scorer.score_fn is not None:
            s = scorer.score_fn(users, item_start, item_end).float()
        else:
            s = scorer.user_emb[users].float() @ scorer.item_emb[item_start:item_end].float().T
        rows, items = keyed.block_entries(users.to(s.device), item_start, item_end)
        in_pool = torch.zeros(s.shape, dtype=torch.bool, device=s.device)
        in_pool[rows, items - item_start] = True
        return s.masked_fill(~in_pool if pool == "visited" else in_pool, fill)

    return Scorer(score_fn=score_fn, n_items=n_items, block_items=scorer.block_items)


def evaluate_by_pool(model, data, split: str = "test", ks: Sequence[int] = (10, 20), device="cpu",
                     others: str = "exclude", scores: str = "model", distributed: bool = False) -> Dict[str, float]:
    """The MEMBER paper's per-pool settings: visited targets ranked among the user's visited items (the
    items of the user's auxiliary training rows), unvisited targets among the other items; the user's
    training purchases (and validation items at test time) masked as in full ranking. Keys
    "visited_pool_hr@10", "unvisited_pool_ndcg@20", ..., "visited_pool_users".

    others: "exclude" (items outside the pool removed) or "zero" (kept with score 0, the official code).
    scores: "model" (the model's own score, any model) or "expert" (each pool ranked by the matching MEMBER
    expert alone, as the official code's visited / unvisited settings; a ValueError for models without
    experts). The full-ranking protocol is `mbrec_fast.training.multibehavior.evaluate_model`.
    """
    from ..evaluator import evaluate_full_ranking
    if scores not in ("model", "expert"):
        raise ValueError(f"scores must be 'model' or 'expert', got {scores!r}")
    if scores == "expert" and not hasattr(model, "expert_scorer"):
        raise ValueError(f"pool scores='expert' needs a model with visited / unvisited experts (MEMBER), "
                         f"got {type(model).__name__}")
    if data.n_behaviors < 2:
        raise ValueError(f"the per-pool protocol needs auxiliary behaviors; {data.name!r} has only {data.behavior_names}")
    targets, labels = data.split(split)
    aux = tuple(t.to(device) for t in data.aux_csr())
    out: Dict[str, float] = {}
    with torch.no_grad():
        base = model.scorer() if scores == "model" else None
        for role, pool in enumerate(("visited", "unvisited")):
            pool_base = base if base is not None else model.expert_scorer(role)
            sc = pool_restricted_scorer(pool_base, aux, data.n_items, pool, others)
            res = evaluate_full_ranking(None, None, exclude=tuple(t.to(device) for t in data.exclude(split)),
                                        targets=tuple(t.to(device) for t in targets), ks=list(ks),
                                        metrics=("hr", "ndcg"), score_fn=sc.score_fn, n_items=data.n_items,
                                        block_items=sc.block_items,
                                        users=data.eval_users(split).to(device), target_groups=labels.to(device),
                                        group_names=["unvisited", "visited"],
                                        process_group="default" if distributed else None)
            out.update({f"{pool}_pool_{k}": v for k, v in res.groups[pool].items()})
            out[f"{pool}_pool_users"] = float(res.group_users[pool])
    return out


#: named configurations. "faithful" follows the official code (K-Kyungho/MEMBER) wherever the earlier
#: version of this module ("legacy") differs; every knob stays a constructor argument, so an ablation can
#: change one of them at a time. See docs/models_multibehavior.md for what each knob does and why.
VARIANTS: Dict[str, Dict[str, object]] = {
    "legacy": dict(pool_weight=1.0, unvisited_all_purchases=True, neg_scale=1.0, gen_neg=1, gen_experts="both",
                   gen_pairs="adjacent", gen_negatives="item", propagation="mean", init_std=0.1,
                   layers_visited_global=None, cl_sampling="batch", schedule="joint", reg=1e-4),
    "faithful": dict(pool_weight=0.0, unvisited_all_purchases=False, neg_scale=2.0, gen_neg=3,
                     gen_experts="unvisited", gen_pairs="all", gen_negatives="pair", propagation="official",
                     init_std=1.0, layers_visited_global=4, cl_sampling="table", schedule="official", reg=0.0),
}
_CHOICES = {"gen_experts": ("both", "unvisited"), "gen_pairs": ("adjacent", "all"), "gen_negatives": ("item", "pair"),
            "propagation": ("mean", "official"), "cl_sampling": ("batch", "table"), "schedule": ("joint", "official"),
            "gate": ("hard", "avg")}
#: the phases of one epoch under schedule="official", in order (each a full pass over the purchase batches)
OFFICIAL_PHASES = ("ssl_visited", "ssl_unvisited", "bpr")


#: Row normalization of the propagation and InfoNCE: "fused" (the package's `row_l2_normalize` op, one pass each
#: way, docs/graph.md) or "torch" (`F.normalize`, the plain-PyTorch way and the official code's, whose autograd
#: chain makes about six passes forward and backward).
NORMALIZE_IMPL = "fused"
NORMALIZE_IMPLS = ("fused", "torch")


def l2_normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of x scaled to unit L2 norm, as F.normalize(x, dim=-1), by `NORMALIZE_IMPL`."""
    if NORMALIZE_IMPL not in NORMALIZE_IMPLS:
        raise ValueError(f"NORMALIZE_IMPL must be one of {NORMALIZE_IMPLS}, got {NORMALIZE_IMPL!r}")
    if NORMALIZE_IMPL == "torch":
        return F.normalize(x, dim=-1)
    return row_l2_normalize(x)


def official_propagate(adj: BipartiteAdjacency, user_emb: torch.Tensor, item_emb: torch.Tensor,
                       n_layers: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The official code's propagation: e_0 + sum_l (1 + 1/l) * e_l, e_l = L2-normalize(A e_{l-1}) per node
    (its lightGCN.py appends each normalized layer twice, once divided by l)."""
    if n_layers < 0:
        raise ValueError(f"n_layers must be >= 0, got {n_layers}")
    u_sum, i_sum = user_emb, item_emb
    u, i = user_emb, item_emb
    for layer in range(1, n_layers + 1):
        u, i = adj.step(u, i)
        u, i = l2_normalize_rows(u), l2_normalize_rows(i)
        w = 1.0 + 1.0 / layer
        u_sum, i_sum = torch.add(u_sum, u, alpha=w), torch.add(i_sum, i, alpha=w)
    return u_sum, i_sum


class _Expert(nn.Module):
    """Global and local embedding tables of one expert."""

    def __init__(self, n_users: int, n_items: int, dim: int, init_std: float = 0.1):
        super().__init__()
        self.glo_user, self.glo_item = nn.Embedding(n_users, dim), nn.Embedding(n_items, dim)
        self.loc_user, self.loc_item = nn.Embedding(n_users, dim), nn.Embedding(n_items, dim)
        for emb in (self.glo_user, self.glo_item, self.loc_user, self.loc_item):
            nn.init.normal_(emb.weight, std=init_std)


def _mean_of(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """The element-wise mean of same-shape tensors, as a chain of adds: the backward of stack(...).mean(0)
    materialises an expanded [k, n, d] gradient through a strided division (a few % of a faithful step)."""
    tensors = list(tensors)
    total = tensors[0]
    for t in tensors[1:]:
        total = total + t
    return total / len(tensors)


def _info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE with in-batch negatives: row j of `a` should match row j of `b` (cosine / temperature)."""
    a, b = l2_normalize_rows(a), l2_normalize_rows(b)
    logits = (a * (1.0 / temperature)) @ b.T  # the scale on [n, d] rather than on the [n, n] logits
    return F.cross_entropy(logits, torch.arange(a.shape[0], device=a.device))


class MEMBER(MultiBehaviorModel):
    """Visited / unvisited experts with hard gating from the auxiliary CSR (see the module docstring).

    behavior_csrs: per-behavior training CSRs in cascade order (target last; at least 2 behaviors), or the
    training `InteractionGraph` itself, whose auxiliary and union CSRs are then reused (`from_data`).
    variant: "legacy" (this package's first version, the default until the faithful one measures better)
    or "faithful" (the official code's choices, see VARIANTS); any knob below left at None takes the
    variant's value, so one knob can be changed at a time.
    lambda_visited / lambda_unvisited: global-vs-local mix per expert. con_visited / con_unvisited and
    temp_*: InfoNCE weights and temperatures. gen_weight, gen_batch, gen_neg: generative loss weight,
    edges per batch per behavior pair, negatives per edge. cl_nodes: users and items in each InfoNCE.
    pool_weight: weight of the two in-pool BPR terms (0 disables them). unvisited_all_purchases: the
    unvisited expert's in-pool term uses every purchase as a positive (True) or only unvisited ones.
    neg_scale: BPR on s_pos - neg_scale * s_neg (the official alpha, 2 on Tmall).
    gen_experts: "both" or "unvisited" (the official code: the generative loss only in that expert).
    gen_pairs: "adjacent" (behavior r's edges from r + 1's local embeddings) or "all" (every lower behavior
    from every higher one: cart->view, buy->cart, buy->view). gen_negatives: "item" (the edge's user with
    random items) or "pair" (random users with random items, the official code).
    propagation: "mean" (LightGCN layer mean) or "official" (layers L2-normalized and summed).
    init_std: N(0, init_std^2) initialisation. layers_visited_global: layers of the visited expert's
    global graph (None: n_layers). cl_sampling: InfoNCE nodes from the batch ("batch") or drawn uniformly
    from the whole tables ("table"). schedule: "joint" (every loss at every step) or "official" (per epoch a
    visited-expert self-supervised pass, an unvisited-expert one, then a gated-BPR pass; batches carry
    their "phase"). gate: "hard" (MEMBER) or "avg" (the paper's "w/ AVG" ablation: the two experts' scores
    averaged for every item). reg: L2 on the layer-0 rows of the batch. single_expert: the ablation (one
    expert, no gating).
    """

    name = "member"

    def __init__(self, n_users: int, n_items: int, behavior_csrs: Union[Sequence[Csr], InteractionGraph], dim: int = 32, n_layers: int = 2,
                 lambda_visited: float = 0.5, lambda_unvisited: float = 0.5, con_visited: float = 0.1,
                 con_unvisited: float = 0.1, temp_visited: float = 0.6, temp_unvisited: float = 0.7,
                 gen_weight: float = 0.1, gen_batch: int = 1024, gen_neg: Optional[int] = None,
                 edge_dropout: float = 0.2, cl_nodes: int = 1024, pool_weight: Optional[float] = None,
                 neg_ratio: int = 1, reg: Optional[float] = None, single_expert: bool = False,
                 unvisited_all_purchases: Optional[bool] = None, variant: str = "legacy", gate: str = "hard",
                 neg_scale: Optional[float] = None, gen_experts: Optional[str] = None, gen_pairs: Optional[str] = None,
                 gen_negatives: Optional[str] = None, propagation: Optional[str] = None,
                 init_std: Optional[float] = None, layers_visited_global: Optional[int] = None,
                 cl_sampling: Optional[str] = None, schedule: Optional[str] = None):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
        knobs = dict(VARIANTS[variant])
        given = dict(pool_weight=pool_weight, unvisited_all_purchases=unvisited_all_purchases, neg_scale=neg_scale,
                     gen_neg=gen_neg, gen_experts=gen_experts, gen_pairs=gen_pairs, gen_negatives=gen_negatives,
                     propagation=propagation, init_std=init_std, layers_visited_global=layers_visited_global,
                     cl_sampling=cl_sampling, schedule=schedule, reg=reg)
        knobs.update({k: v for k, v in given.items() if v is not None})
        if unvisited_all_purchases and not knobs["pool_weight"]:
            raise ValueError("unvisited_all_purchases=True acts only on the in-pool BPR terms, which pool_weight=0 "
                             "disables (the faithful variant's default); set pool_weight > 0 as well")
        for key, allowed in _CHOICES.items():
            value = gate if key == "gate" else knobs[key]
            if value not in allowed:
                raise ValueError(f"{key} must be one of {list(allowed)}, got {value!r}")
        graph = behavior_csrs if isinstance(behavior_csrs, InteractionGraph) else None
        if graph is not None:
            behavior_csrs = [graph.csr(r) for r in range(graph.n_behaviors)]
        R = len(behavior_csrs)
        if R < 2:
            raise ValueError("MEMBER needs at least one auxiliary behavior besides the target (got 1 behavior)")
        for name, v in (("lambda_visited", lambda_visited), ("lambda_unvisited", lambda_unvisited)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {v}")
        gen_neg = int(knobs["gen_neg"])
        if dim < 1 or neg_ratio < 1 or n_layers < 0 or gen_batch < 1 or gen_neg < 1 or cl_nodes < 2:
            raise ValueError("dim, neg_ratio, gen_batch, gen_neg must be >= 1, cl_nodes >= 2 and n_layers >= 0")
        if not 0.0 <= edge_dropout < 1.0:
            raise ValueError(f"edge_dropout must lie in [0, 1), got {edge_dropout}")
        if single_expert and gate == "avg":
            raise ValueError("gate='avg' averages two experts: it cannot be combined with single_expert=True")
        if float(knobs["init_std"]) <= 0 or float(knobs["neg_scale"]) <= 0:
            raise ValueError("init_std and neg_scale must be > 0")
        lvg = knobs["layers_visited_global"]
        if lvg is not None and int(lvg) < 0:
            raise ValueError(f"layers_visited_global must be >= 0, got {lvg}")
        self.n_users, self.n_items, self.n_behaviors, self.dim, self.n_layers = n_users, n_items, R, dim, n_layers
        self.variant, self.gate = variant, gate
        self.lambdas = (float(lambda_visited), float(lambda_unvisited))
        self.con = (float(con_visited), float(con_unvisited))
        self.temps = (float(temp_visited), float(temp_unvisited))
        self.gen_weight, self.gen_batch, self.gen_neg = float(gen_weight), int(gen_batch), gen_neg
        self.edge_dropout, self.cl_nodes = float(edge_dropout), int(cl_nodes)
        self.pool_weight = float(knobs["pool_weight"])
        self.neg_ratio, self.reg, self.single_expert = int(neg_ratio), float(knobs["reg"]), bool(single_expert)
        self.unvisited_all_purchases = bool(knobs["unvisited_all_purchases"])
        self.neg_scale = float(knobs["neg_scale"])
        self.gen_experts, self.gen_pairs, self.gen_negatives = knobs["gen_experts"], knobs["gen_pairs"], knobs["gen_negatives"]
        self.propagation, self.cl_sampling, self.schedule = knobs["propagation"], knobs["cl_sampling"], knobs["schedule"]
        self.init_std = float(knobs["init_std"])
        self.layers_visited_global = n_layers if lvg is None else int(lvg)
        # under the official schedule a self-supervised step touches one expert only
        self.ddp_find_unused_parameters = self.schedule == "official"

        csrs = [tuple(t.cpu().long() for t in c) for c in behavior_csrs]
        self.local_adj = [BipartiteAdjacency.from_csr(c, n_items) for c in csrs]
        edges = [csr_to_edges(c) for c in csrs]
        self.behavior_edges = edges
        all_u = torch.cat([e[0] for e in edges])
        all_i = torch.cat([e[1] for e in edges])
        self.union_adj = BipartiteAdjacency(all_u, all_i, n_users, n_items)
        if graph is not None:  # the graph holds both unions already
            aux_csr, all_csr = graph.aux_csr(), graph.union_csr()
        else:
            aux_csr, all_csr = union_csr(csrs[:-1], n_users, n_items), union_csr(csrs, n_users, n_items)
        self.aux = KeyedCsr(aux_csr, n_items)
        self.target = KeyedCsr(csrs[-1], n_items)
        self.union = KeyedCsr(all_csr, n_items)
        tu, ti = edges[-1]
        visited = self.aux.contains(tu, ti)
        self.visited_purchases = (tu[visited], ti[visited])
        self.other_purchases = (tu[~visited], ti[~visited])
        self._aug: Optional[Tuple[BipartiteAdjacency, BipartiteAdjacency]] = None
        self._aug_key: Optional[Tuple[int, int]] = None

        self.experts = nn.ModuleList([_Expert(n_users, n_items, dim, self.init_std)
                                      for _ in range(1 if single_expert else 2)])

    @classmethod
    def from_data(cls, data, **kwargs) -> "MEMBER":
        """Model on `data`'s per-behavior training graphs (kwargs go to the constructor)."""
        check_model_kwargs(cls, kwargs)
        return cls(data.n_users, data.n_items, data.train, **kwargs)

    # ------------------------------------------------------------------------------ experts
    def expert(self, role: int) -> _Expert:
        """Expert for role 0 = visited, 1 = unvisited (the same one in the single-expert ablation)."""
        return self.experts[0 if self.single_expert else role]

    def _lambda(self, role: int) -> float:
        return self.lambdas[0 if self.single_expert else role]

    def generative_pairs(self) -> List[Tuple[int, int]]:
        """(lower, higher) behavior pairs of the generative loss: lower's edges scored with higher's local
        embeddings."""
        R = self.n_behaviors
        if self.gen_pairs == "adjacent":
            return [(r, r + 1) for r in range(R - 1)]
        return [(lo, hi) for hi in range(1, R) for lo in range(hi)]

    def _propagate(self, adj: BipartiteAdjacency, user_emb, item_emb, n_layers: int):
        fn = official_propagate if self.propagation == "official" else lightgcn_propagate
        return fn(adj, user_emb, item_emb, n_layers)

    def propagate_expert(self, expert: _Expert, parts: Sequence[str] = ("glo", "loc")) -> Dict[str, object]:
        """Global and/or local propagated embeddings of one expert (autograd on)."""
        out: Dict[str, object] = {}
        if "glo" in parts:
            layers = self.layers_visited_global if expert is self.experts[0] else self.n_layers
            out["glo"] = self._propagate(self.union_adj, expert.glo_user.weight, expert.glo_item.weight, layers)
        if "loc" in parts:
            per_behavior = [self._propagate(adj, expert.loc_user.weight, expert.loc_item.weight, self.n_layers)
                            for adj in self.local_adj]
            out["loc"] = (_mean_of(p[0] for p in per_behavior), _mean_of(p[1] for p in per_behavior))
            out["per_behavior"] = per_behavior
        return out

    def _all_embeddings(self) -> List[Dict[str, object]]:
        return [self.propagate_expert(e) for e in self.experts]

    @staticmethod
    def _expert_score(emb: Dict[str, object], lam: float, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        gu, gi = emb["glo"]
        lu, li = emb["loc"]
        u = users.unsqueeze(-1).expand_as(items) if items.dim() > users.dim() else users
        return (lam * (gather_rows(gu, u) * gather_rows(gi, items)).sum(-1)
                + (1.0 - lam) * (gather_rows(lu, u) * gather_rows(li, items)).sum(-1))

    def _gated(self, embs: List[Dict[str, object]], users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Gated scores of (users, items); items may be [B] or [B, k] (users [B] broadcast)."""
        if self.single_expert:
            return self._expert_score(embs[0], self.lambdas[0], users, items)
        s_v = self._expert_score(embs[0], self.lambdas[0], users, items)
        s_n = self._expert_score(embs[1], self.lambdas[1], users, items)
        if self.gate == "avg":
            return 0.5 * (s_v + s_n)
        u = users.unsqueeze(-1).expand_as(items) if items.dim() > users.dim() else users
        return torch.where(self.aux.contains(u, items), s_v, s_n)

    def score_pairs(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Training-time gated scores of (users[j], items[j]) from a fresh propagation."""
        dev = self.experts[0].glo_user.weight.device
        return self._gated(self._all_embeddings(), users.to(dev).long(), items.to(dev).long())

    def is_visited(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Bool: did the user touch the item under an auxiliary behavior in training?"""
        return self.aux.contains(users, items)

    # ------------------------------------------------------------------------------ evaluation
    def _concat(self, emb: Dict[str, object], lam: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """(user [U, 2d], item [I, 2d]) whose dot product is the expert's score."""
        (gu, gi), (lu, li) = emb["glo"], emb["loc"]
        return torch.cat([lam * gu, (1.0 - lam) * lu], 1), torch.cat([gi, li], 1)

    def scorer(self) -> Scorer:
        with torch.no_grad():
            embs = self._all_embeddings()
            if self.single_expert:
                ue, ie = self._concat(embs[0], self.lambdas[0])
                return Scorer(user_emb=ue.contiguous(), item_emb=ie.contiguous())
            uv, iv = self._concat(embs[0], self.lambdas[0])
            un, in_ = self._concat(embs[1], self.lambdas[1])
            if self.gate == "avg":   # (s_v + s_n) / 2 is one dot product over the concatenation
                return Scorer(user_emb=(0.5 * torch.cat([uv, un], 1)).contiguous(),
                              item_emb=torch.cat([iv, in_], 1).contiguous())
        aux = self.aux

        def score_fn(users: torch.Tensor, item_start: int, item_end: int) -> torch.Tensor:
            users = users.to(un.device).long()
            out = un[users] @ in_[item_start:item_end].T              # unvisited expert everywhere ...
            rows, items = aux.block_entries(users, item_start, item_end)
            if rows.numel():                                            # ... visited expert on the aux entries
                out[rows, items - item_start] = (uv[users[rows]] * iv[items]).sum(-1)
            return out

        # a GEMM plus a sparse fix-up per block: wide blocks amortize the per-call gathers and searches
        return Scorer(score_fn=score_fn, n_items=self.n_items, block_items=None if un.is_cuda else 2048,
                      dot_with_overrides=(un, in_, self._visited_overrides(uv, iv)))

    def _visited_overrides(self, uv: torch.Tensor, iv: torch.Tensor, rows_per_pass: int = 1 << 16):
        """(indptr, items, visited-expert scores) of every auxiliary (user, item) entry: the gated score is the
        unvisited expert's dot product except on these pairs (the evaluator's `score_overrides`)."""
        aux, dev = self.aux, uv.device
        keys = aux.keys_on(dev)
        rows, cols = keys // self.n_items, keys % self.n_items
        scores = torch.empty(keys.numel(), dtype=uv.dtype, device=dev)
        for a in range(0, keys.numel(), rows_per_pass):
            b = min(keys.numel(), a + rows_per_pass)
            scores[a:b] = (uv.index_select(0, rows[a:b]) * iv.index_select(0, cols[a:b])).sum(-1)
        return aux.indptr.to(dev), cols, scores

    def expert_scorer(self, role: int) -> Scorer:
        """Dot-product scorer of one expert alone (role 0 = visited, 1 = unvisited), for every item."""
        with torch.no_grad():
            ex = self.expert(role)
            ue, ie = self._concat(self.propagate_expert(ex), self._lambda(role))
        return Scorer(user_emb=ue.contiguous(), item_emb=ie.contiguous())

    # ------------------------------------------------------------------------------ augmentation
    def on_epoch_start(self, data, epoch: int, seed: int) -> None:
        """Rebuilds the two augmented purchase graphs with edge dropout seeded by (seed, epoch)."""
        self._build_augmented(epoch, seed)

    def _build_augmented(self, epoch: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(epoch_seed(seed, epoch, 7))
        vu, vi = drop_edges(*self.visited_purchases, self.edge_dropout, gen)
        ou, oi = drop_edges(*self.other_purchases, self.edge_dropout, gen)
        self._aug = (BipartiteAdjacency(vu, vi, self.n_users, self.n_items),
                     BipartiteAdjacency(ou, oi, self.n_users, self.n_items))
        self._aug_key = (epoch, seed)

    # ------------------------------------------------------------------------------ training
    def training_batches(self, data, epoch: int, batch_size: int, seed: int) -> Iterable[Dict[str, torch.Tensor]]:
        return _MemberBatches(self, data, epoch, batch_size, seed)

    def pool_negatives(self, users: torch.Tensor, pos: torch.Tensor, graph, seed: int = 0,
                       offset: int = 0) -> torch.Tensor:
        """Pool negatives [B, 2] (-1 where the pool is empty), drawn by the package sampler from `graph`
        (the training `mbrec_fast.InteractionGraph`), keyed by seed/offset.

        Column 0, rows with a visited positive: uniform over the user's auxiliary items not bought
        (mode "visited"). Column 1: uniform over the items the user never touched (mode "unvisited"), for
        every row when `unvisited_all_purchases`, else only for rows with an unvisited positive.
        """
        from ..sampler import sample_negatives
        users, pos = users.cpu().long(), pos.cpu().long()
        out = torch.full((users.numel(), 2), -1, dtype=torch.long)
        vis = self.aux.contains(users, pos)
        want_unvisited = torch.ones_like(vis) if self.unvisited_all_purchases else ~vis
        for col, mode, sel in ((0, "visited", vis), (1, "unvisited", want_unvisited)):
            idx = torch.nonzero(sel).flatten()
            if idx.numel():
                draw = sample_negatives(graph, users[idx], 1, mode=mode, seed=(seed + col) & ((1 << 62) - 1),
                                        offset=offset, on_empty="sentinel")
                out[idx, col] = draw[:, 0].cpu().long()
        return out

    def loss(self, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, float]]:
        """Loss of one batch. Under schedule="official" the batch's "phase" says which terms: the visited
        expert's InfoNCE, the unvisited expert's InfoNCE + generative loss, or the gated BPR alone."""
        if self._aug is None:
            self._build_augmented(0, 0)
        phase = batch.get("phase", "joint")
        if phase == "ssl_visited":
            emb = self.propagate_expert(self.expert(0), ("loc",))
            cl = self._contrastive(0, emb, batch)
            total = self.con[0] * cl
            return total, {"cl_visited": float(cl.detach()), "loss": float(total.detach())}
        if phase == "ssl_unvisited":
            emb = self.propagate_expert(self.expert(1), ("glo", "loc"))
            cl = self._contrastive(1, emb, batch)
            total = self.con[1] * cl
            parts = {"cl_unvisited": float(cl.detach())}
            gen = self._generative([emb], batch)
            if gen is not None:
                total = total + self.gen_weight * gen
                parts["gen"] = float(gen.detach())
            parts["loss"] = float(total.detach())
            return total, parts
        if phase not in ("joint", "bpr"):
            raise ValueError(f"unknown MEMBER batch phase {phase!r}")

        dev = self.experts[0].glo_user.weight.device
        u, p, n = batch["users"].to(dev).long(), batch["pos"].to(dev).long(), batch["neg"].to(dev).long()
        embs = self._all_embeddings()
        s_pos = self._gated(embs, u, p)
        s_neg = self._gated(embs, u, n)
        bpr = F.softplus(self.neg_scale * s_neg - s_pos.unsqueeze(-1)).mean()
        total = bpr
        parts = {"bpr": float(bpr.detach())}
        if phase == "joint":
            total = total + self._joint_extras(embs, batch, u, p, parts)
        elif self.pool_weight:  # the official schedule's BPR pass with the in-pool terms (an ablation)
            total = total + self._pool_terms(embs, batch, u, p, parts)
        if self.reg:
            l2 = 0.0
            for ex in self.experts:
                for tab_u, tab_i in ((ex.glo_user, ex.glo_item), (ex.loc_user, ex.loc_item)):
                    l2 = l2 + tab_u(u).pow(2).sum() + tab_i(p).pow(2).sum() + tab_i(n).pow(2).sum() / n.shape[1]
            total = total + self.reg * l2 / u.numel()
        parts["loss"] = float(total.detach())
        return total, parts

    def _pool_terms(self, embs, batch, u, p, parts: Dict[str, float]) -> torch.Tensor:
        """The in-pool BPR terms (`pool_weight`), in the joint step and in the official schedule's BPR pass."""
        dev = u.device
        total = torch.zeros((), device=dev)
        if self.pool_weight and "pool_neg" in batch:
            # each expert ranks purchases above its own pool: the visited expert inside the visited pool
            # (visited purchases only), the unvisited expert above never-touched items
            pn = batch["pool_neg"].to(dev).long()
            vis = self.aux.contains(u, p)
            for role, ok in ((0, (pn[:, 0] >= 0) & vis), (1, pn[:, 1] >= 0)):
                key = "bpr_pool_visited" if role == 0 else "bpr_pool_unvisited"
                parts[key] = 0.0
                if not bool(ok.any()):
                    continue
                emb, lam = embs[0 if self.single_expert else role], self._lambda(role)
                s_p = self._expert_score(emb, lam, u[ok], p[ok])
                s_n = self._expert_score(emb, lam, u[ok], pn[ok, role])
                term = F.softplus(s_n - s_p).mean()
                total = total + self.pool_weight * term
                parts[key] = float(term.detach())
        return total

    def _joint_extras(self, embs, batch, u, p, parts: Dict[str, float]) -> torch.Tensor:
        """In-pool BPR, InfoNCE and generative terms of the joint schedule (every term at every step)."""
        total = self._pool_terms(embs, batch, u, p, parts)
        for role in (0, 1):
            if self.con[role]:
                cl = self._contrastive(role, embs[0 if self.single_expert else role], batch)
                total = total + self.con[role] * cl
                parts["cl_visited" if role == 0 else "cl_unvisited"] = float(cl.detach())
        if self.gen_weight:
            gen_embs = embs if self.gen_experts == "both" else [embs[-1]]
            gen = self._generative(gen_embs, batch)
            if gen is not None:
                total = total + self.gen_weight * gen
                parts["gen"] = float(gen.detach())
        return total

    def _contrastive(self, role: int, emb: Dict[str, object], batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """InfoNCE of the visited expert's local view vs its augmented visited-purchase view (role 0), or
        of the unvisited expert's global view vs its augmented other-purchase view (role 1)."""
        ex = self.expert(role)
        if role == 0:
            (zu, zi), tables, layers = emb["loc"], (ex.loc_user.weight, ex.loc_item.weight), self.n_layers
        else:
            (zu, zi), tables = emb["glo"], (ex.glo_user.weight, ex.glo_item.weight)
            layers = self.layers_visited_global if ex is self.experts[0] else self.n_layers
        dev = zu.device
        if "cl_users" in batch:
            cu, ci = batch["cl_users"].to(dev).long(), batch["cl_items"].to(dev).long()
        else:
            cu = _first_distinct(batch["users"].to(dev).long(), self.cl_nodes)
            ci = _first_distinct(batch["pos"].to(dev).long(), self.cl_nodes)
        au, ai = self._propagate(self._aug[role], tables[0], tables[1], layers)
        t = self.temps[role]
        return 0.5 * (_info_nce(gather_rows(zu, cu), gather_rows(au, cu), t)
                      + _info_nce(gather_rows(zi, ci), gather_rows(ai, ci), t))

    def _generative(self, embs: List[Dict[str, object]], batch: Dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
        """Mean BCE over (lower, higher) pairs and experts: lower's edges vs negatives, scored with
        higher's local embeddings. Negatives: the edge's user with random items, or random (user, item)."""
        terms = []
        for lo, hi in self.generative_pairs():
            key = f"{lo}_{hi}"
            if f"gen_users_{key}" not in batch:
                continue
            for emb in embs:
                hu, hi_ = emb["per_behavior"][hi]
                dev = hu.device
                gu, gi, gn = (batch[f"gen_{k}_{key}"].to(dev).long() for k in ("users", "items", "neg"))
                pos_logit = (gather_rows(hu, gu) * gather_rows(hi_, gi)).sum(-1)
                if f"gen_negusers_{key}" in batch:
                    nu = batch[f"gen_negusers_{key}"].to(dev).long()
                    neg_logit = (gather_rows(hu, nu) * gather_rows(hi_, gn)).sum(-1)
                else:
                    neg_logit = (gather_rows(hu, gu).unsqueeze(1) * gather_rows(hi_, gn)).sum(-1)
                logits = torch.cat([pos_logit, neg_logit.reshape(-1)])
                labels = torch.cat([torch.ones_like(pos_logit), torch.zeros(neg_logit.numel(), device=dev)])
                terms.append(F.binary_cross_entropy_with_logits(logits, labels))
        return torch.stack(terms).mean() if terms else None


def _first_distinct(x: torch.Tensor, limit: int) -> torch.Tensor:
    """The first `limit` distinct values of x in order of first appearance (deterministic)."""
    uniq, inverse = torch.unique(x, return_inverse=True)
    first = torch.full((uniq.numel(),), x.numel(), dtype=torch.long, device=x.device)
    first.scatter_reduce_(0, inverse, torch.arange(x.numel(), device=x.device), reduce="amin")
    order = torch.argsort(first)[:limit]
    return uniq[order]


class _MemberBatches:
    """Epoch batches of MEMBER, every draw seeded by (seed, epoch, batch index).

    Joint schedule: purchases with uniform negatives (package sampler), pool negatives [B, 2] (visited
    pool, unvisited pool) and, per generative (lower, higher) pair, `gen_batch` edges of the lower
    behavior (a per-epoch permutation of its edges walked in order: no replacement) with negatives.
    Official schedule: the same number of batches three times, tagged "phase": "ssl_visited" (InfoNCE
    nodes only), "ssl_unvisited" (InfoNCE nodes and generative edges), then "bpr" (purchases and
    uniform negatives). With cl_sampling="table", InfoNCE nodes are `cl_nodes` distinct users and items
    drawn uniformly from the whole tables."""

    def __init__(self, model: MEMBER, data, epoch: int, batch_size: int, seed: int):
        u, i = data.pairs(data.target)
        self.model = model
        self.pairs = PairBatches(data.train, u, i, torch.full_like(u, data.target), batch_size=batch_size,
                                 num_neg=model.neg_ratio, seed=seed, epoch=epoch, mode="exclusive")
        self.seed, self.epoch = seed, epoch

    def __len__(self) -> int:
        return len(self.pairs) * (len(OFFICIAL_PHASES) if self.model.schedule == "official" else 1)

    def _gen_edges(self, batch: Dict[str, torch.Tensor], perms, b: int, gen: torch.Generator) -> None:
        m = self.model
        for lo, hi in m.generative_pairs():
            perm = perms[lo]
            n_e = perm.numel()
            if n_e == 0:
                continue
            idx = perm[(torch.arange(m.gen_batch) + b * m.gen_batch) % n_e]
            key = f"{lo}_{hi}"
            batch[f"gen_users_{key}"] = m.behavior_edges[lo][0][idx]
            batch[f"gen_items_{key}"] = m.behavior_edges[lo][1][idx]
            batch[f"gen_neg_{key}"] = torch.randint(0, m.n_items, (m.gen_batch, m.gen_neg), generator=gen)
            if m.gen_negatives == "pair":
                batch[f"gen_negusers_{key}"] = torch.randint(0, m.n_users, (m.gen_batch, m.gen_neg), generator=gen)

    def _cl_nodes(self, batch: Dict[str, torch.Tensor], gen: torch.Generator) -> None:
        m = self.model
        batch["cl_users"] = torch.randperm(m.n_users, generator=gen)[:m.cl_nodes]
        batch["cl_items"] = torch.randperm(m.n_items, generator=gen)[:m.cl_nodes]

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        m = self.model
        perms = []
        for r in range(m.n_behaviors - 1):
            g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch, 10 + r))
            perms.append(torch.randperm(m.behavior_edges[r][0].numel(), generator=g))
        base = epoch_seed(self.seed, self.epoch, 2)
        if m.schedule == "official":
            n_batches = len(self.pairs)
            for phase_index, phase in enumerate(OFFICIAL_PHASES[:2]):
                stream = epoch_seed(self.seed, self.epoch, 20 + phase_index)
                for b in range(n_batches):
                    gen = torch.Generator().manual_seed((stream + b) & ((1 << 62) - 1))
                    batch: Dict[str, torch.Tensor] = {"phase": phase}
                    self._cl_nodes(batch, gen)
                    if phase == "ssl_unvisited" and m.gen_weight:
                        self._gen_edges(batch, perms, b, gen)
                    yield batch
            for b, batch in enumerate(self.pairs):
                batch["phase"] = "bpr"
                if m.pool_weight:  # an ablation on top of the official schedule: the in-pool terms in its BPR pass
                    batch["pool_neg"] = m.pool_negatives(batch["users"], batch["pos"], self.pairs.graph,
                                                         seed=base, offset=b * self.pairs.batch_size)
                yield batch
            return
        for b, batch in enumerate(self.pairs):
            if m.pool_weight:
                batch["pool_neg"] = m.pool_negatives(batch["users"], batch["pos"], self.pairs.graph,
                                                     seed=base, offset=b * self.pairs.batch_size)
            gen = torch.Generator().manual_seed((base + b) & ((1 << 62) - 1))
            if m.cl_sampling == "table":
                self._cl_nodes(batch, torch.Generator().manual_seed(epoch_seed(base, b, 3)))
            if m.gen_weight:
                self._gen_edges(batch, perms, b, gen)
            yield batch
