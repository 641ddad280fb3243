"""The multi-behavior training and evaluation pipeline written the plain-PyTorch way, as a baseline.

What a typical research code base does (e.g. the public NMTR/MEMBER-style repositories):
* negatives by rejection sampling against per-user Python sets, one `random` call per draw;
* evaluation by building the dense [batch_users, n_items] score matrix, writing -inf over the
  training items, `torch.topk`, and metrics from a dense 0/1 target matrix.

The models' own forward/loss code is shared with the package (the same nn.Modules, same
hyper-parameters), so a benchmark against this module measures the sampling and evaluation
machinery. Metric values agree with `mbrec_fast.evaluate_full_ranking` (HR, NDCG; ties aside).
"""
from __future__ import annotations

import math
import random
from typing import Dict, List, Optional, Sequence

import torch

__all__ = ["PythonSetSampler", "plain_epoch", "plain_member_epoch", "dense_topk_evaluate", "nmtr_scores_plain"]


class PythonSetSampler:
    """Per-user Python sets of every behavior; draws negatives one at a time with `random`."""

    def __init__(self, graph, level_probs: Optional[torch.Tensor] = None):
        self.n_items, self.n_behaviors = graph.n_items, graph.n_behaviors
        self.sets: List[List[set]] = []
        self.lists: List[List[list]] = []
        for r in range(graph.n_behaviors):
            ip, ind = graph.csr(r)
            ip, ind = ip.tolist(), ind.tolist()
            rows = [ind[ip[u]:ip[u + 1]] for u in range(len(ip) - 1)]
            self.lists.append(rows)
            self.sets.append([set(row) for row in rows])
        self.touched = [set().union(*(self.sets[r][u] for r in range(self.n_behaviors)))
                        for u in range(len(self.sets[0]))]
        self.level_probs = None if level_probs is None else level_probs.tolist()

    def exclusive(self, u: int, r: int, k: int, rnd: random.Random) -> List[int]:
        done, out = self.sets[r][u], []
        while len(out) < k:
            i = rnd.randrange(self.n_items)
            if i not in done:
                out.append(i)
        return out

    def cascade(self, u: int, r: int, k: int, rnd: random.Random) -> List[int]:
        probs = self.level_probs[r]
        levels = list(range(r)) + [self.n_behaviors - 1]
        weights = [probs[lv] for lv in levels]
        done, out = self.sets[r][u], []
        while len(out) < k:
            lv = rnd.choices(levels, weights)[0]
            if lv < self.n_behaviors - 1 and lv < r:
                pool = [i for i in self.lists[lv][u] if i not in done]
                if pool:
                    out.append(rnd.choice(pool))
                    continue
            while True:
                i = rnd.randrange(self.n_items)
                if i not in self.touched[u]:
                    out.append(i)
                    break
        return out


def _run_epoch(model, optimizer, n_rows: int, batch_size: int, rnd: random.Random, make_batch) -> float:
    """Shuffles the row indices with `rnd`, then per mini-batch: make_batch(indices) -> batch dict,
    `model.loss`, backward, optimizer step. Returns the mean loss."""
    order = list(range(n_rows))
    rnd.shuffle(order)
    total, steps = 0.0, 0
    for start in range(0, n_rows, batch_size):
        batch = make_batch(order[start:start + batch_size])
        optimizer.zero_grad()
        loss, _ = model.loss(batch)
        loss.backward()
        optimizer.step()
        total += float(loss.detach())
        steps += 1
    return total / max(steps, 1)


def plain_epoch(model, positives, sampler: PythonSetSampler, optimizer, *, batch_size: int, num_neg: int,
                mode: str = "exclusive", seed: int = 0) -> float:
    """One epoch: shuffle positives (users, items, behaviors), Python-set negatives, model.loss, Adam step.
    Returns the mean loss."""
    users, items, behaviors = (t.tolist() for t in positives)
    rnd = random.Random(seed)
    draw = sampler.cascade if mode == "cascade" else sampler.exclusive

    def make_batch(idx):
        bu = [users[j] for j in idx]
        bb = [behaviors[j] for j in idx]
        neg = [draw(u, r, num_neg, rnd) for u, r in zip(bu, bb)]
        return {"users": torch.tensor(bu), "pos": torch.tensor([items[j] for j in idx]),
                "neg": torch.tensor(neg), "behavior": torch.tensor(bb)}
    return _run_epoch(model, optimizer, len(users), batch_size, rnd, make_batch)


def plain_member_epoch(model, data, sampler: PythonSetSampler, optimizer, *, batch_size: int, seed: int = 0,
                       rounds: int = 16) -> float:
    """One MEMBER epoch with every draw from Python sets: per purchase `neg_ratio` exclusive negatives, a
    visited-pool negative (an auxiliary item not bought, for visited positives) and an unvisited-pool negative
    (a never-touched item, `rounds` rejection tries, -1 when none), plus `gen_batch` random edges of each lower
    behavior with `gen_neg` uniform negatives; then `model.loss`, Adam step. Under the official schedule
    (MEMBER's faithful variant) the two self-supervised passes come first (`_plain_member_official`).
    Returns the mean loss."""
    target = data.target
    users, items = (t.tolist() for t in data.pairs(target))
    aux_sets = [set().union(*(sampler.sets[r][u] for r in range(target))) for u in range(len(sampler.touched))]
    aux_rows = [sorted(row) for row in aux_sets]
    edges = [(eu.tolist(), ei.tolist()) for eu, ei in model.behavior_edges[:target]]
    rnd = random.Random(seed)

    def make_batch(idx, gen=True):
        bu, bp = [users[j] for j in idx], [items[j] for j in idx]
        batch = {"users": torch.tensor(bu), "pos": torch.tensor(bp),
                 "neg": torch.tensor([sampler.exclusive(u, target, model.neg_ratio, rnd) for u in bu]),
                 "behavior": torch.full((len(bu),), target)}
        if model.pool_weight:
            pool = []
            for u, i in zip(bu, bp):
                bought, visited = sampler.sets[target][u], i in aux_sets[u]
                cand = [j for j in aux_rows[u] if j not in bought] if visited else []
                row = [rnd.choice(cand) if cand else -1, -1]
                if model.unvisited_all_purchases or not visited:
                    for _ in range(rounds):
                        j = rnd.randrange(sampler.n_items)
                        if j not in sampler.touched[u]:
                            row[1] = j
                            break
                pool.append(row)
            batch["pool_neg"] = torch.tensor(pool)
        if model.gen_weight and gen:  # (not in the official schedule's BPR pass, which has no generative term)
            _plain_generative_edges(model, edges, rnd, batch)
        return batch
    if getattr(model, "schedule", "joint") == "official":
        return _plain_member_official(model, users, edges, optimizer, batch_size, rnd, make_batch)
    return _run_epoch(model, optimizer, len(users), batch_size, rnd, make_batch)


def _plain_generative_edges(model, edges, rnd: random.Random, batch) -> None:
    """Adds MEMBER's generative-loss edges to `batch` the plain way: per (lower, higher) behavior pair
    `gen_batch` random edges of the lower behavior, each with `gen_neg` random items (and random users when
    gen_negatives="pair")."""
    for lo, hi in model.generative_pairs():
        eu, ei = edges[lo]
        if not eu:
            continue
        pick = [rnd.randrange(len(eu)) for _ in range(model.gen_batch)]
        batch[f"gen_users_{lo}_{hi}"] = torch.tensor([eu[j] for j in pick])
        batch[f"gen_items_{lo}_{hi}"] = torch.tensor([ei[j] for j in pick])
        batch[f"gen_neg_{lo}_{hi}"] = torch.tensor([[rnd.randrange(model.n_items) for _ in range(model.gen_neg)]
                                                    for _ in pick])
        if model.gen_negatives == "pair":
            batch[f"gen_negusers_{lo}_{hi}"] = torch.tensor(
                [[rnd.randrange(model.n_users) for _ in range(model.gen_neg)] for _ in pick])


def _plain_member_official(model, users, edges, optimizer, batch_size, rnd, make_batch) -> float:
    """MEMBER's official schedule the plain way: a visited-expert InfoNCE pass and an unvisited-expert pass
    (InfoNCE nodes from `random.sample`, generative edges and their negatives from `random`), one batch per
    batch of purchases each, then the gated-BPR pass with Python-set negatives."""
    n_batches = -(-len(users) // batch_size)
    total, steps = 0.0, 0
    for phase in ("ssl_visited", "ssl_unvisited"):
        for _ in range(n_batches):
            batch = {"phase": phase,
                     "cl_users": torch.tensor(rnd.sample(range(model.n_users), min(model.cl_nodes, model.n_users))),
                     "cl_items": torch.tensor(rnd.sample(range(model.n_items), min(model.cl_nodes, model.n_items)))}
            if phase == "ssl_unvisited" and model.gen_weight:
                _plain_generative_edges(model, edges, rnd, batch)
            optimizer.zero_grad()
            loss, _ = model.loss(batch)
            loss.backward()
            optimizer.step()
            total, steps = total + float(loss.detach()), steps + 1

    def bpr_batch(idx):
        batch = make_batch(idx, gen=False)
        batch["phase"] = "bpr"
        return batch
    bpr = _run_epoch(model, optimizer, len(users), batch_size, rnd, bpr_batch)
    return (total + bpr * n_batches) / max(steps + n_batches, 1)


def dense_topk_evaluate(score_rows, n_users: int, n_items: int, exclude, targets, ks: Sequence[int] = (10, 20, 50, 100),
                        target_groups: Optional[torch.Tensor] = None, group_names: Sequence[str] = (),
                        batch_users: int = 1024) -> Dict[str, Dict[str, float]]:
    """Dense full ranking: score_rows(users) -> [b, n_items] scores; -inf on excluded items; torch.topk.

    Returns {"all": {...}, group: {...}} with hr@K and ndcg@K means over users with targets (in the group).
    """
    kmax = max(ks)
    ex_ip, ex_ind = exclude
    t_ip, t_ind = targets
    groups = ["all"] + list(group_names)
    sums = {g: {f"{m}@{k}": 0.0 for k in ks for m in ("hr", "ndcg")} for g in groups}
    counts = {g: 0 for g in groups}
    discount = 1.0 / torch.log2(torch.arange(2, kmax + 2, dtype=torch.float64))
    users_all = torch.nonzero(t_ip.diff() > 0).flatten()
    for ub in users_all.split(batch_users):
        with torch.no_grad():
            scores = score_rows(ub).float().clone()
        b = ub.numel()
        lo, hi = ex_ip[ub], ex_ip[ub + 1]
        rows = torch.repeat_interleave(torch.arange(b), hi - lo)
        cols = torch.cat([ex_ind[a:z] for a, z in zip(lo.tolist(), hi.tolist())]) if b else ex_ind[:0]
        scores[rows, cols] = -math.inf
        top = torch.topk(scores, kmax, dim=1).indices
        tlo, thi = t_ip[ub], t_ip[ub + 1]
        trows = torch.repeat_interleave(torch.arange(b), thi - tlo)
        tcols = torch.cat([t_ind[a:z] for a, z in zip(tlo.tolist(), thi.tolist())])
        tlabels = None if target_groups is None else torch.cat([target_groups[a:z] for a, z in zip(tlo.tolist(), thi.tolist())])
        for gi, g in enumerate(groups):
            keep = torch.ones_like(trows, dtype=torch.bool) if gi == 0 else tlabels == gi - 1
            mat = torch.zeros(b, n_items, dtype=torch.bool)
            mat[trows[keep], tcols[keep]] = True
            n_t = mat.sum(1)
            valid = n_t > 0
            hits = torch.gather(mat, 1, top).double()
            for k in ks:
                h = hits[:, :k]
                idcg = torch.cumsum(discount, 0)[(n_t.clamp(max=k) - 1).clamp(min=0)]
                sums[g][f"hr@{k}"] += float((h.sum(1) > 0)[valid].double().sum())
                sums[g][f"ndcg@{k}"] += float(((h * discount[:k]).sum(1) / idcg)[valid].sum())
            counts[g] += int(valid.sum())
    return {g: {m: v / max(counts[g], 1) for m, v in sums[g].items()} for g in groups}


def nmtr_scores_plain(model, users: torch.Tensor, item_start: int, item_end: int, user_block: int = 8) -> torch.Tensor:
    """NMTR's target-behavior logits [len(users), item_end - item_start] computed the plain way: every (user, item)
    pair's [p, q] through each head's whole MLP tower (the first layer a [pairs, 2d] GEMM), `user_block` users at
    a time. The baseline of `NMTR.score_block` (which splits the first layer and tiles the rest)."""
    dev = model.user_emb.weight.device
    users = users.to(dev).long()
    items = torch.arange(item_start, item_end, device=dev)
    q = model.item_emb(items)
    out = []
    for ub in users.split(user_block):
        p = model.user_emb(ub)
        pp, qq = p[:, None, :].expand(-1, items.numel(), -1), q[None].expand(ub.numel(), -1, -1)
        s = model.item_bias.sum(0)[items].expand(ub.numel(), -1).clone()
        if model.use_gmf:
            s = s + ((pp * qq) @ model.gmf_h.sum(0))
        if model.use_mlp:
            x0 = torch.cat([pp, qq], -1)
            for r in range(model.n_behaviors):
                z = x0
                for w, b in zip(model.mlp_weight, model.mlp_bias):
                    z = torch.relu(z @ w[r] + b[r])
                s = s + z @ model.mlp_h[r]
        out.append(s)
    return torch.cat(out) if out else torch.zeros(0, items.numel(), device=dev)
