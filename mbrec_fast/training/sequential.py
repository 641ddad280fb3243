"""Training and evaluation of the cross-domain sequential models (syncrec, sasrec).

    mbrec-fast train --model syncrec --data synthetic --epochs 10 --run-dir runs/syncrec
    mbrec-fast train --model sasrec --setting single --data amazon        # one SASRec per domain
    mbrec-fast train --model sasrec --setting cross --data amazon         # SASRec on the merged sequence
    mbrec-fast evaluate --checkpoint runs/syncrec/best.pt
    python -m mbrec_fast.training.sequential --table --data amazon_toys_games --seeds 3   # rows -> docs/results

Evaluation (leave-one-out; valid = second-to-last item, test = last item), two protocols, overall and per target
domain, HR/NDCG@{1,5,10} and MRR:
* sampled: the target against 100 distinct negatives drawn (seeded, once per split) from the items not in the user's
  whole sequence (`sample_eval_negatives`); rank = 1 + #(negatives scoring >= target); MRR untruncated;
* full: `mbrec_fast.evaluate_full_ranking` with a `score_fn`, the user's history items masked through the exclude
  CSR (customary; a repeat purchase of a history item therefore cannot be hit), MRR@10.
`--protocol official` (default, as the SyNCRec release) trains every model and task with negatives from all items
outside the user's sequence and ranks each target against all items (sampled: 100 of them outside the sequence);
`--protocol domain` draws training negatives and evaluation candidates from the target's domain (items of other
domains pushed below every in-domain item by a -1e9 offset in the full ranking), for every model alike.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import evaluate_full_ranking, sample_sequence_negatives
from ..data.sequences import (SequenceData, SequenceSplit, leave_one_out, load_amazon_sequences,
                              load_amazon_toys_games, load_interaction_log, make_synthetic_sequences,
                              make_training_windows)
from ..models.sasrec import PerDomainSASRec, SASRec
from ..models.syncrec import SyNCRec
from .. import registry
from .checkpoint import load_checkpoint
from .._progress import progress_enabled, ranking_progress
from .cli_options import (HelpFormatter, add_progress, add_resume, add_run_dir, evaluate_parser, fill_model_defaults,
                          model_defaults_text, parse_evaluate_args, resolve_resume, resume_command)
from .common import Trainer, check_cli_args, format_table, log, make_adam, seed_everything

__all__ = ["build_parser", "build_evaluate_parser", "load_data", "build_model", "EvalContext", "make_eval_context", "evaluate_model",
           "sampled_metrics", "sample_eval_negatives", "train_main", "evaluate_main", "table_main", "run_training",
           "resolve_model_defaults"]

KS = (1, 5, 10)
MODELS = registry.model_names("sequential")
PROTOCOLS = ("official", "domain")
# the model options whose default None means the model's own (SyNCRec's / SASRec's signature): dest -> argument
MODEL_OPTIONS = {"max_len": "max_len", "dim": "dim", "layers": "n_layers", "heads": "n_heads", "dropout": "dropout",
                 "n_single": "n_single", "n_cross": "n_cross", "r": "r", "temperature": "temperature",
                 "momentum": "momentum", "smoothing": "smoothing", "reweight": "reweight", "domain_loss": "domain_loss",
                 "mi_weight": "mi_weight", "gap_grad": "gap_grad"}


def _defaults(key: str) -> str:
    """Help text of a model option's default, read from SyNCRec's and SASRec's signatures."""
    return model_defaults_text((SyNCRec, SASRec), key)


def resolve_model_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fills the model options left at None with the chosen model's defaults (SyNCRec's for its own options), so
    the run's config records the values the model takes."""
    chosen = SyNCRec if getattr(args, "model", None) == "syncrec" else SASRec
    fill_model_defaults(args, (chosen, SyNCRec, SASRec), MODEL_OPTIONS)
    return args


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    return protocol


def build_parser(prog: str = "mbrec-fast train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, formatter_class=HelpFormatter, description=(
        "Train a cross-domain sequential recommender (next item of a sequence that spans\n"
        "several domains); HR/NDCG@{1,5,10}, MRR; sampled and full ranking, per domain."))
    p.add_argument("--model", choices=MODELS, help="the model (required)")
    p.add_argument("--setting", default="cross", choices=["single", "cross"],
                   help="sasrec: one model per domain (single) or one on the merged sequence (cross)")
    p.add_argument("--data", default="synthetic",
                   help="synthetic | amazon_toys_games (../shared/data log) | amazon (the 500-user release sample) | "
                        "a path (format by --format)")
    p.add_argument("--data-path", default=None, help="file of the real data (default: the bundled Amazon sample)")
    p.add_argument("--format", default="amazon", choices=["amazon", "log"],
                   help="layout of a --data path: the SyNCRec release TSV or a (user,item,domain,timestamp) log")
    p.add_argument("--syn-users", type=int, default=2000, help="synthetic data: users")
    p.add_argument("--syn-domains", type=int, default=3, help="synthetic data: domains")
    p.add_argument("--syn-items", type=int, default=100, help="items per domain")
    p.add_argument("--syn-len", type=float, default=24.0, help="mean sequence length")
    p.add_argument("--syn-clusters", type=int, default=8, help="synthetic data: taste clusters")
    p.add_argument("--syn-relatedness", default="1,1,0", help="per-domain relatedness (0 = planted negative transfer)")
    p.add_argument("--syn-chain", type=float, default=0.5, help="within-domain sequential signal")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic data")
    # model options: None = the model's default, stated once in its constructor's signature
    p.add_argument("--max-len", type=int, default=None,
                   help=f"longest history window fed to the model (default {_defaults('max_len')})")
    p.add_argument("--emb-dim", "--dim", dest="dim", type=int, default=None, metavar="N",
                   help=f"embedding and transformer width (default {_defaults('dim')}; --dim is an alias)")
    p.add_argument("--layers", type=int, default=None,
                   help=f"transformer layers per expert / per SASRec (default {_defaults('n_layers')})")
    p.add_argument("--heads", type=int, default=None, help=f"attention heads (default {_defaults('n_heads')})")
    p.add_argument("--dropout", type=float, default=None, help=f"dropout rate (default {_defaults('dropout')})")
    p.add_argument("--n-single", type=int, default=None,
                   help=f"SyNCRec single-domain experts (0: ablation w/o single-domain experts, one shared group; "
                        f"default {_defaults('n_single')})")
    p.add_argument("--n-cross", type=int, default=None,
                   help=f"SyNCRec cross-domain experts (default {_defaults('n_cross')})")
    p.add_argument("--r", type=float, default=None,
                   help=f"SyNCRec: weight of a task's own expert group (default {_defaults('r')})")
    p.add_argument("--temperature", type=float, default=None,
                   help=f"SyNCRec: softmax temperature of the gap weights (default {_defaults('temperature')})")
    p.add_argument("--momentum", type=float, default=None,
                   help=f"SyNCRec: EMA momentum of the gaps (default {_defaults('momentum')})")
    p.add_argument("--smoothing", type=float, default=None,
                   help=f"SyNCRec: mix of the gap weights toward uniform (default {_defaults('smoothing')})")
    p.add_argument("--reweight", default=None, choices=["lower", "raise", "none"],
                   help=f"SyNCRec cross-loss weights: lower for more negative transfer (paper), raise (earlier "
                        f"reading), none (ablation w/o reweighting) (default {_defaults('reweight')})")
    p.add_argument("--domain-loss", default=None, choices=["sum", "mean"],
                   help=f"SyNCRec: per-domain summed losses (official) or the mean of per-domain means "
                        f"(default {_defaults('domain_loss')})")
    p.add_argument("--mi-weight", type=float, default=None,
                   help=f"SyNCRec MI loss weight (0: ablation w/o MI; default {_defaults('mi_weight')})")
    p.add_argument("--gap-grad", default=None, choices=["detach", "cross"],
                   help=f"SyNCRec: gradient through the negative-transfer gaps (default {_defaults('gap_grad')})")
    p.add_argument("--num-neg", type=int, default=8, help="training negatives per position")
    p.add_argument("--eval-neg", type=int, default=100, help="negatives of the sampled protocol")
    p.add_argument("--protocol", default="official", choices=list(PROTOCOLS),
                   help="official: training negatives and evaluation candidates from all items outside the user's "
                        "sequence, for every model and task; domain: both from the target's domain")
    p.add_argument("--monitor", default="sampled_ndcg@10", help="validation metric for early stopping and best.pt")
    p.add_argument("--no-full", action="store_true", help="skip the full-ranking protocol during validation")
    p.add_argument("--epochs", type=int, default=20, help="training epochs (at most)")
    p.add_argument("--batch-size", type=int, default=128, help="users per step")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--weight-decay", type=float, default=0.0, help="Adam weight decay")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, batches and negatives")
    add_run_dir(p, "run_dir", "runs/<model>-<data>-s<seed>")
    add_resume(p)
    p.add_argument("--patience", type=int, default=5, help="evaluations without improvement before stopping")
    p.add_argument("--eval-every", type=int, default=1, help="validate every N epochs")
    p.add_argument("--max-steps", type=int, default=None, help="stop (and checkpoint) after this many steps")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    add_progress(p)
    return p


# ------------------------------------------------------------------------------------------------ data / model
def load_data(args: argparse.Namespace) -> SequenceData:
    name = args.data.lower()
    if name == "synthetic":
        rel = [float(v) for v in args.syn_relatedness.split(",")]
        if len(rel) != args.syn_domains:
            raise SystemExit(f"--syn-relatedness needs {args.syn_domains} values, got {len(rel)}")
        return make_synthetic_sequences(args.syn_users, args.syn_domains, args.syn_items, args.syn_len,
                                        args.syn_clusters, rel, args.syn_chain, seed=args.data_seed)
    if name == "amazon":
        return load_amazon_sequences(args.data_path)
    if name == "amazon_toys_games":
        return load_amazon_toys_games(args.data_path)
    path = args.data
    return load_amazon_sequences(path) if args.format == "amazon" else load_interaction_log(path)


def build_model(args: argparse.Namespace, data: SequenceData) -> torch.nn.Module:
    """The model the arguments name; model options left at None take its defaults (filled into `args`)."""
    resolve_model_defaults(args)
    common = dict(dim=args.dim, n_layers=args.layers, n_heads=args.heads, max_len=args.max_len, dropout=args.dropout)
    if args.model == "syncrec":
        return SyNCRec(data.n_items, data.n_domains, data.item_domain, n_single=args.n_single, n_cross=args.n_cross,
                       r=args.r, temperature=args.temperature, momentum=args.momentum, smoothing=args.smoothing,
                       mi_weight=args.mi_weight, gap_grad=args.gap_grad, reweight=args.reweight,
                       domain_loss=args.domain_loss, **common)
    if args.setting == "single":
        return PerDomainSASRec(data.n_items, data.n_domains, data.item_domain, **common)
    return SASRec(data.n_items, data.n_domains, data.item_domain, **common)


def model_label(args) -> str:
    return "syncrec" if args.model == "syncrec" else f"sasrec-{args.setting}"


# ------------------------------------------------------------------------------------------------ evaluation
@dataclass
class EvalContext:
    """Everything one split's evaluation needs, built once: histories, targets, their domains, the fixed sampled
    negatives [U, M] (-1 = none) and the exclude/target CSRs over the evaluated users (0..U-1)."""
    histories: List[torch.Tensor]
    targets: torch.Tensor
    target_domains: torch.Tensor
    negatives: torch.Tensor
    exclude: Tuple[torch.Tensor, torch.Tensor]
    target_csr: Tuple[torch.Tensor, torch.Tensor]
    item_domain: torch.Tensor
    domain_names: List[str]
    restrict: bool


def make_eval_context(split: SequenceSplit, name: str, n_neg: int = 100, seed: int = 0,
                      protocol: str = "official") -> EvalContext:
    """protocol "official": candidates are all items; "domain": the target's domain only."""
    restrict = check_protocol(protocol) == "domain"
    data = split.data
    users, histories, targets = split.split(name)
    item_domain = data.item_domain
    tdom = item_domain[targets]
    negatives = sample_eval_negatives(histories, targets, item_domain, n_neg, seed=seed, restrict=restrict)
    ex_rows = [torch.unique(h) for h in histories]
    indptr = torch.zeros(len(histories) + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(torch.tensor([r.numel() for r in ex_rows], dtype=torch.int64), 0)
    exclude = (indptr, torch.cat(ex_rows) if ex_rows else torch.zeros(0, dtype=torch.int64))
    target_csr = (torch.arange(len(histories) + 1, dtype=torch.int64), targets.clone())
    return EvalContext(histories, targets, tdom, negatives, exclude, target_csr, item_domain, data.domain_names, restrict)


def sample_eval_negatives(histories: Sequence[torch.Tensor], targets: torch.Tensor, item_domain: torch.Tensor,
                          n_neg: int = 100, seed: int = 0, restrict: bool = True) -> torch.Tensor:
    """[U, n_neg] distinct negatives per user, uniform without replacement over the items not in the user's whole
    sequence (history + target), within the target's domain when `restrict`; -1 pads a pool smaller than n_neg.
    Seeded: user u's draw depends only on (seed, u)."""
    dom = item_domain.numpy()
    n_items = dom.size
    pools = [np.nonzero(dom == d)[0] for d in range(int(dom.max()) + 1)] if restrict else None
    everything = np.arange(n_items)
    out = np.full((len(histories), n_neg), -1, dtype=np.int64)
    allowed = np.ones(n_items, dtype=bool)
    for u, (h, t) in enumerate(zip(histories, targets.tolist())):
        rng = np.random.default_rng([seed, u])
        base = pools[dom[t]] if restrict else everything
        seen = np.append(h.numpy(), t)
        allowed[seen] = False
        pool = base[allowed[base]]  # sorted: base is
        allowed[seen] = True
        k = min(n_neg, pool.size)
        out[u, :k] = rng.choice(pool, size=k, replace=False)
    return torch.from_numpy(out)


def _states_and_tables(model, ctx: EvalContext) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Per-user state [U, d] and the item table(s) to score against (one per domain for per-domain SASRec)."""
    if isinstance(model, PerDomainSASRec):
        return model.user_repr(ctx.histories, ctx.target_domains), [m.items for m in model.models]
    return model.user_repr(ctx.histories), [model.items]


def _score_rows(states, tables, table_of_row, items: torch.Tensor) -> torch.Tensor:
    """scores [b, M] of rows' states against item ids [b, M] (-1 allowed)."""
    out = torch.empty(items.shape, dtype=torch.float32, device=states.device)
    for t, table in enumerate(tables):
        rows = table_of_row == t if len(tables) > 1 else torch.ones(states.shape[0], dtype=torch.bool, device=states.device)
        if bool(rows.any()):
            out[rows] = torch.einsum("bd,bmd->bm", states[rows], table[items[rows].clamp_min(0)])
    return out


def sampled_metrics(pos: torch.Tensor, neg: torch.Tensor, neg_valid: torch.Tensor, groups: torch.Tensor,
                    group_names: Sequence[str], ks: Sequence[int] = KS) -> Dict[str, Dict[str, float]]:
    """Sampled-protocol metrics: rank = 1 + #(valid negatives scoring >= the target)."""
    ranks = 1 + ((neg >= pos[:, None]) & neg_valid).sum(1).double()
    def one(r: torch.Tensor) -> Dict[str, float]:
        out = {}
        for k in ks:
            hit = r <= k
            out[f"hr@{k}"] = float(hit.double().mean()) if r.numel() else 0.0
            out[f"ndcg@{k}"] = float((hit / torch.log2(r + 1)).mean()) if r.numel() else 0.0
        out["mrr"] = float((1.0 / r).mean()) if r.numel() else 0.0
        return out
    res = {"all": one(ranks)}
    for g, name in enumerate(group_names):
        sel = groups == g
        if bool(sel.any()):
            res[name] = one(ranks[sel])
    return res


def evaluate_model(model: torch.nn.Module, ctx: EvalContext, full: bool = True,
                   per_domain_scoring: str = "target", progress: bool = False) -> Dict[str, float]:
    """Both protocols; keys '<protocol>_<metric>' overall and '<protocol>_<metric>_<domain>' per target domain.

    per_domain_scoring (per-domain SASRec only): "target" — the model of the target's domain scores every candidate
    (the customary single-domain evaluation: the baseline is told the target's domain); "item" — each candidate is
    scored by the model of its own domain after the user's history in that domain (nothing about the target is
    given, as for SyNCRec and the merged SASRec)."""
    if per_domain_scoring not in ("target", "item"):
        raise ValueError(f"per_domain_scoring must be 'target' or 'item', got {per_domain_scoring!r}")
    was = model.training
    model.eval()
    with torch.no_grad():
        if isinstance(model, PerDomainSASRec) and per_domain_scoring == "item":
            cand_scores, score_fn, direct = _scorer_per_item_domain(model, ctx)
        else:
            cand_scores, score_fn, direct = _scorer(model, ctx)
        out = _protocol_metrics(ctx, cand_scores, score_fn, direct, full, progress)
    model.train(was)
    return out


def _candidates(ctx: EvalContext, dev) -> torch.Tensor:
    """[U, 1 + M]: each user's target, then its sampled negatives (-1 = none)."""
    return torch.cat([ctx.targets[:, None], ctx.negatives], 1).to(dev)


def _restricted(ctx: EvalContext, score_fn: Callable, dev) -> Callable:
    """Under the domain protocol, other domains' items drop below every in-domain item (-1e9)."""
    if not ctx.restrict:
        return score_fn
    item_dom, tdom = ctx.item_domain.to(dev), ctx.target_domains.to(dev)

    def fn(users: torch.Tensor, start: int, end: int) -> torch.Tensor:
        u = users.to(dev)
        return score_fn(u, start, end) - 1e9 * (item_dom[start:end][None, :] != tdom[u][:, None]).float()
    return fn


def _scorer(model, ctx: EvalContext):
    """Candidate scores, a full-ranking score_fn and (states, table) when plain dot products over one table."""
    states, tables = _states_and_tables(model, ctx)
    dev = states.device
    tdom = ctx.target_domains.to(dev)

    def score_fn(users: torch.Tensor, start: int, end: int) -> torch.Tensor:
        u = users.to(dev)
        s = torch.empty(u.numel(), end - start, dtype=torch.float32, device=dev)
        for t, table in enumerate(tables):  # per-domain SASRec: each user's target-domain table
            rows = tdom[u] == t if len(tables) > 1 else slice(None)
            s[rows] = states[u][rows] @ table[start:end].T
        return s

    direct = (states, tables[0]) if len(tables) == 1 and not ctx.restrict else None
    return _score_rows(states, tables, tdom, _candidates(ctx, dev)), _restricted(ctx, score_fn, dev), direct


def _scorer_per_item_domain(model: PerDomainSASRec, ctx: EvalContext):
    """Per-domain SASRec with every candidate scored by its own domain's model (no target-domain oracle)."""
    D, U = model.n_domains, len(ctx.histories)
    dev = model.item_domain.device
    states = torch.stack([model.user_repr(ctx.histories, torch.full((U,), d, device=dev)) for d in range(D)])
    tables = [m.items for m in model.models]
    item_dom = ctx.item_domain.to(dev)
    cand = _candidates(ctx, dev)
    sc = torch.zeros(cand.shape, dtype=torch.float32, device=dev)
    for d in range(D):
        sel = item_dom[cand.clamp_min(0)] == d
        sc += sel * torch.einsum("ud,umd->um", states[d], tables[d][cand.clamp_min(0)])

    def score_fn(users: torch.Tensor, start: int, end: int) -> torch.Tensor:
        u = users.to(dev)
        s = torch.empty(u.numel(), end - start, dtype=torch.float32, device=dev)
        for d in range(D):
            cols = torch.nonzero(item_dom[start:end] == d).flatten()
            s[:, cols] = states[d][u] @ tables[d][start + cols].T
        return s

    return sc, _restricted(ctx, score_fn, dev), None


def _protocol_metrics(ctx: EvalContext, cand_scores: torch.Tensor, score_fn: Callable, direct, full: bool,
                      progress: bool = False) -> Dict[str, float]:
    """Sampled metrics from the candidate scores; full ranking through the evaluator op (direct dot products
    when `direct` = (states, table), else `score_fn`); progress: a bar (users ranked, users/s, time left)."""
    res = sampled_metrics(cand_scores[:, 0], cand_scores[:, 1:], ctx.negatives.to(cand_scores.device) >= 0,
                          ctx.target_domains, ctx.domain_names)
    out: Dict[str, float] = {}
    for g, ms in res.items():
        for k, v in ms.items():
            out[f"sampled_{k}" if g == "all" else f"sampled_{k}_{g}"] = v
    if full:
        common = dict(ks=KS, metrics=("hr", "ndcg", "mrr"), target_groups=ctx.target_domains,
                      group_names=ctx.domain_names)
        with ranking_progress(progress, "full ranking", total=len(ctx.histories)) as callback:
            if direct is not None:  # plain dot products: the op's fused scoring
                r = evaluate_full_ranking(direct[0], direct[1], ctx.exclude, ctx.target_csr, progress=callback,
                                          **common)
            else:
                r = evaluate_full_ranking(None, None, ctx.exclude, ctx.target_csr, score_fn=score_fn,
                                          n_items=ctx.item_domain.numel(), progress=callback, **common)
        out.update({f"full_{k}": v for k, v in r.metrics.items()})
        out.update({f"full_{k}_{g}": v for g, ms in r.groups.items() for k, v in ms.items()})
        out.update({f"full_users_{g}": float(n) for g, n in r.group_users.items()})  # 0: no users' mean
    return out


# ------------------------------------------------------------------------------------------------ training
def make_batches(n_users: int, batch_size: int, seed: int, epoch: int) -> List[Dict[str, Any]]:
    """The epoch's batches: a permutation of the users, a deterministic function of (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n_users, generator=g)
    return [{"users": perm[s:s + batch_size], "epoch": epoch, "index": k}
            for k, s in enumerate(range(0, n_users, batch_size))]


def materialize(batch: Dict[str, Any], windows: Dict[str, torch.Tensor], item_domain: torch.Tensor, n_items: int,
                num_neg: int, seed: int, device, protocol: str = "official",
                negatives: Optional[Callable[..., torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """Index the windows, trim their all-padding tail and draw this batch's negatives (keyed by seed, epoch and
    batch index).

    One draw per merged (cross-domain) position, from `sample_sequence_negatives`: outside the user's window, from
    every item ("official") or from the target's domain ("domain"). The single-domain position that predicts the
    same item (`align`) gets the same negatives, so the per-domain SASRec, the merged SASRec and both SyNCRec tasks
    train against candidates of one distribution and each SyNCRec gap compares the two tasks on equal negatives.
    Inputs are left-aligned and attention is causal, so cutting the padding columns after the longest row changes
    no real position's state. `negatives(cross_tgt, n_items, num_neg, item_domain)` replaces the op (the
    benchmark's plain-PyTorch baseline).
    """
    check_protocol(protocol)
    u = batch["users"]
    b = {k: v[u] for k, v in windows.items()}
    lc = max(int((b["cross_tgt"] >= 0).sum(1).max()) if u.numel() else 1, 1)
    ls = max(int((b["single_tgt"] >= 0).sum(2).max()) if u.numel() else 1, 1)
    for k in ("cross_in", "cross_tgt", "align"):
        b[k] = b[k][:, :lc].contiguous()
    for k in ("single_in", "single_tgt"):
        b[k] = b[k][:, :, :ls].contiguous()
    offset = (batch["epoch"] * 100_003 + batch["index"]) * 2
    restrict = item_domain if protocol == "domain" else None
    if negatives is None:
        b["cross_neg"] = sample_sequence_negatives(b["cross_tgt"], n_items, num_neg, pad=-1, seed=seed, offset=offset,
                                                   item_domain=restrict, on_empty="sentinel")
    else:
        b["cross_neg"] = negatives(b["cross_tgt"], n_items, num_neg, restrict)
    B, D, _ = b["single_tgt"].shape
    single_neg = torch.full((B, D, ls, num_neg), -1, dtype=torch.int64)
    bi, ti = torch.nonzero(b["cross_tgt"] >= 0, as_tuple=True)
    single_neg[bi, item_domain[b["cross_tgt"][bi, ti]], b["align"][bi, ti]] = b["cross_neg"][bi, ti]
    b["single_neg"] = single_neg
    return {k: v.to(device) for k, v in b.items()}


def make_step(model, opt, windows, item_domain, n_items, args, device, last_logs: Dict[str, Any]) -> Callable:
    def step(batch):
        b = materialize(batch, windows, item_domain, n_items, args.num_neg, args.seed, device, args.protocol)
        opt.zero_grad(set_to_none=True)
        logs: Dict[str, float] = {}
        if isinstance(model, SyNCRec):
            out = model.losses(b)
            loss = out["loss"]
            logs.update(single=float(out["single"]), cross=float(out["cross"]), mi=float(out["mi"]))
            weights = model.current_weights()
            for d in range(model.n_domains):
                logs[f"w_d{d}"] = float(weights[d])
                logs[f"gap_d{d}"] = float(model.gap_ema[d])
        elif isinstance(model, PerDomainSASRec):
            loss = model.loss(b["single_in"], b["single_tgt"], b["single_neg"])
        else:
            loss = model.loss(b["cross_in"], b["cross_tgt"], b["cross_neg"])
        loss.backward()
        opt.step()
        logs["loss"] = float(loss.detach())
        last_logs.update(logs)
        return logs
    return step


def model_weights(model: SyNCRec) -> torch.Tensor:
    """Current cross-loss weights from the smoothed gaps."""
    return model.current_weights()


def run_training(args: argparse.Namespace, data: Optional[SequenceData] = None,
                 progress: Optional[bool] = None) -> Dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    if progress is None:
        progress = progress_enabled(False if getattr(args, "no_progress", False) else None)
    resolve_model_defaults(args)
    seed_everything(args.seed)
    data = load_data(args) if data is None else data
    split = leave_one_out(data)
    if split.n_short:
        log(f"{split.n_short} of {data.n_users} users have fewer than 3 interactions: trained on, not evaluated")
    device = torch.device(args.device)
    windows = make_training_windows(split.train, data.item_domain, data.n_domains, args.max_len, data.n_items)
    has_items = torch.nonzero(windows["cross_tgt"][:, 0] >= 0).flatten()
    windows = {k: v[has_items] for k, v in windows.items()}
    ctx = {s: make_eval_context(split, s, args.eval_neg, seed=args.seed + (0 if s == "valid" else 1),
                                protocol=args.protocol) for s in ("valid", "test")}
    seed_everything(args.seed)
    model = build_model(args, data).to(device)
    opt = make_adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    known = ("synthetic", "amazon", "amazon_toys_games")
    run_dir = args.run_dir or os.path.join("runs", f"{model_label(args)}-{args.data if args.data in known else 'data'}-s{args.seed}")
    last: Dict[str, Any] = {}
    step = make_step(model, opt, windows, data.item_domain, data.n_items, args, device, last)
    trainer = Trainer(model, {"main": opt}, run_dir, epochs=args.epochs, eval_every=args.eval_every,
                      patience=args.patience, monitor=args.monitor, mode="max", model_name=args.model,
                      config=vars(args), progress=progress, max_steps=args.max_steps)

    def report_weights(epoch: int) -> None:  # the reweighting as it stands after each epoch (also in history.json)
        if isinstance(model, SyNCRec) and epoch > 0:
            log(f"after epoch {epoch}: smoothed gaps {[round(v, 4) for v in model.gap_ema.tolist()]}, "
                f"cross-loss weights {[round(v, 3) for v in model.current_weights().tolist()]} {data.domain_names}")

    result = trainer.fit(batches=lambda epoch: make_batches(windows["cross_in"].shape[0], args.batch_size, args.seed, epoch),
                         step=step,
                         evaluate=lambda s: evaluate_model(model, ctx[s], full=(s == "test" or not args.no_full),
                                                           progress=progress),
                         on_epoch_start=report_weights, resume=resolve_resume(args.resume, run_dir, log))
    out = {"test": result.test, "valid": result.best_valid, "run_dir": run_dir, "best_epoch": result.best_epoch,
           "interrupted": result.interrupted, "timings": result.timings, "data": data.describe()}
    if isinstance(model, SyNCRec):  # the best epoch's buffers (the trainer reloaded its weights for the test)
        out["gap_ema"] = model.gap_ema.tolist()
        out["gap_weights"] = model_weights(model).tolist()
        out["weights_per_epoch"] = [[row.get(f"train_w_d{d}") for d in range(data.n_domains)] for row in result.history]
        if not result.interrupted and os.path.isfile(os.path.join(run_dir, "metrics.json")):
            m = json.load(open(os.path.join(run_dir, "metrics.json")))
            m["gap_ema"], m["gap_weights"] = out["gap_ema"], out["gap_weights"]
            with open(os.path.join(run_dir, "metrics.json"), "w") as f:
                json.dump(m, f, indent=1, default=float)
    return out


def _metric_table(metrics: Dict[str, float], domains: Sequence[str]) -> str:
    rows = []
    for proto in ("sampled", "full"):
        mrr = "mrr" if proto == "sampled" else "mrr@10"
        for g in ["all", *domains]:
            sfx = "" if g == "all" else f"_{g}"
            if f"{proto}_hr@10{sfx}" not in metrics:
                continue
            row: Dict[str, Any] = {"protocol": proto, "domain": g}
            empty = metrics.get(f"{proto}_users{sfx}") == 0
            for k in KS:
                row[f"HR@{k}"] = "no users" if empty and k == KS[0] else "" if empty else metrics[f"{proto}_hr@{k}{sfx}"]
                row[f"NDCG@{k}"] = "" if empty else metrics[f"{proto}_ndcg@{k}{sfx}"]
            row["MRR"] = "" if empty else metrics.get(f"{proto}_{mrr}{sfx}", float("nan"))
            rows.append(row)
    return format_table(rows)


def train_main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.model is None:
        parser.error(f"--model is required (one of {', '.join(MODELS)})")
    check_cli_args(args)
    data = load_data(args)
    log(f"data: {json.dumps(data.describe())}")
    out = run_training(args, data)
    if out["interrupted"]:
        log(f"continue with: {resume_command(list(sys.argv[1:] if argv is None else argv), out['run_dir'])}")
        return 0
    log(f"test metrics of the best epoch ({out['best_epoch']}), run dir {out['run_dir']}:")
    log(_metric_table(out["test"], data.domain_names))
    if "gap_weights" in out:
        log(f"negative-transfer gaps (EMA): {[round(v, 4) for v in out['gap_ema']]}; "
            f"cross-loss weights: {[round(v, 3) for v in out['gap_weights']]}")
    return 0


def build_evaluate_parser(prog: str = "mbrec-fast evaluate") -> argparse.ArgumentParser:
    def options(p):
        p.add_argument("--split", default="test", choices=["valid", "test"], help="held-out split to rank")
        p.add_argument("--data-path", default=None, help="override the data path stored in the checkpoint")
        p.add_argument("--protocol", default=None, choices=list(PROTOCOLS),
                       help="evaluation candidates (default: the training protocol); 'domain' on a model trained "
                            "with 'official' tells every model the target's domain")
        p.add_argument("--per-domain-scoring", default="target", choices=["target", "item"],
                       help="per-domain SASRec: the target domain's model scores all candidates (target) or each "
                            "candidate is scored by its own domain's model (item: no target-domain oracle)")
    return evaluate_parser("Both protocols (sampled and full ranking) of a sequential checkpoint.", options, prog=prog)


def evaluate_main(argv: Optional[List[str]] = None) -> int:
    """`mbrec-fast evaluate --checkpoint P [--split test|valid]`: rebuilds data and model from the checkpoint."""
    a = parse_evaluate_args(build_evaluate_parser(), argv)
    ckpt = load_checkpoint(a.checkpoint)
    args = resolve_model_defaults(argparse.Namespace(**ckpt["config"]))
    if a.data_path:
        args.data_path = a.data_path
    data = load_data(args)
    split = leave_one_out(data)
    model = build_model(args, data)
    model.load_state_dict(ckpt["model"])
    ctx = make_eval_context(split, a.split, args.eval_neg, seed=args.seed + (0 if a.split == "valid" else 1),
                            protocol=a.protocol or getattr(args, "protocol", "official"))
    metrics = evaluate_model(model, ctx, full=True, per_domain_scoring=a.per_domain_scoring,
                             progress=progress_enabled(False if a.no_progress else None))
    log(_metric_table(metrics, data.domain_names))
    if a.output:
        with open(a.output, "w") as f:
            json.dump(metrics, f, indent=1)
    return 0


# ------------------------------------------------------------------------------------------------ results table
# (row label, variant, extra training arguments): the three models, then SyNCRec's ablations (one seed each)
TABLE = [("syncrec", "paper", ["--model", "syncrec"]),
         ("sasrec-single", "per-domain", ["--model", "sasrec", "--setting", "single"]),
         ("sasrec-cross", "merged", ["--model", "sasrec", "--setting", "cross"])]
ABLATIONS = [("syncrec", "w/o reweighting", ["--model", "syncrec", "--reweight", "none"]),
             ("syncrec", "w/o MI loss", ["--model", "syncrec", "--mi-weight", "0"]),
             ("syncrec", "w/o single-domain experts", ["--model", "syncrec", "--n-single", "0"])]


def data_label(args: argparse.Namespace) -> str:
    """Names the data of a results row: the dataset, or the synthetic generator's chain and relatedness."""
    if args.data.lower() == "synthetic":
        return f"synthetic(chain={args.syn_chain:g}, relatedness={args.syn_relatedness})"
    return args.data if args.data_path is None else f"{args.data}:{args.data_path}"


def result_rows(label: str, variant: str, data_name: str, seed: int, test: Dict[str, float], domains: Sequence[str],
                epochs: int, command: str) -> List[Dict[str, Any]]:
    """docs/results/sequential.json rows of one run: per protocol (sampled, full) and domain (each, "all")."""
    rows = []
    for proto in ("sampled", "full"):
        for g in ["all", *domains]:
            sfx = "" if g == "all" else f"_{g}"
            if f"{proto}_ndcg@10{sfx}" not in test:
                continue
            rows.append({"model": label, "variant": variant, "data": data_name, "protocol": proto, "domain": g,
                         "seed": seed, "metrics": {"hr@10": test[f"{proto}_hr@10{sfx}"],
                                                   "ndcg@10": test[f"{proto}_ndcg@10{sfx}"]},
                         "epochs": epochs, "command": command})
    return rows


def merge_rows(path: str, new: List[Dict[str, Any]]) -> None:
    """Replaces the rows of the same (model, variant, data, protocol, domain, seed) in the JSON list at `path`."""
    key = lambda r: (r["model"], r["variant"], r["data"], r["protocol"], r["domain"], r["seed"])  # noqa: E731
    old = json.load(open(path)) if os.path.isfile(path) else []
    fresh = {key(r) for r in new}
    rows = [r for r in old if key(r) not in fresh] + new
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(rows, f, indent=1, default=float)


def table_markdown(rows: List[Dict[str, Any]], data_name: str, domains: Sequence[str],
                   command: Optional[str] = None) -> str:
    """Mean ± std over seeds of test HR@10 / NDCG@10 per model and variant, one table per protocol. With `command`
    (the table's command line), only the rows trained with its training options: a table being re-run on a new
    schedule never averages seeds of two schedules (the others are counted below it)."""
    rows = [r for r in rows if r["data"] == data_name]
    n_other = 0
    if command is not None:
        schedule = training_schedule(command)
        kept = [r for r in rows if training_schedule(r.get("command", "")) == schedule]
        n_other, rows = len({(r["model"], r["variant"], r["seed"]) for r in rows}
                            - {(r["model"], r["variant"], r["seed"]) for r in kept}), kept
    labels = list(dict.fromkeys((r["model"], r["variant"]) for r in rows))
    lines = []
    for proto in ("sampled", "full"):
        head = ["model", "variant", "seeds", "epochs run"] + [f"{g} {m}" for g in ["all", *domains]
                                                               for m in ("HR@10", "NDCG@10")]
        lines += [f"**{proto}** ({'100 sampled negatives' if proto == 'sampled' else 'full ranking'})", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for lab in labels:
            sel = [r for r in rows if (r["model"], r["variant"]) == lab and r["protocol"] == proto]
            if not sel:
                continue
            seeds = sorted({r["seed"] for r in sel})
            epochs = sorted({r["epochs"] for r in sel})
            cells = [lab[0], lab[1], str(len(seeds)), "/".join(str(e) for e in epochs)]
            for g in ["all", *domains]:
                for m in ("hr@10", "ndcg@10"):
                    vals = [r["metrics"][m] for r in sel if r["domain"] == g]
                    cells.append("–" if not vals else (f"{np.mean(vals):.4f}" if len(vals) == 1 else
                                                       f"{np.mean(vals):.4f} ± {np.std(vals, ddof=1):.4f}"))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if n_other:
        lines += [f"({n_other} runs of this data trained with other options are in the JSON rows, not in this table.)", ""]
    return "\n".join(lines)


def table_parser() -> argparse.ArgumentParser:
    """The table's own options (the rest of its command line are training options, `build_parser`)."""
    p = argparse.ArgumentParser(prog="python -m mbrec_fast.training.sequential --table")
    p.add_argument("--table", action="store_true")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--ablation-seeds", type=int, default=1)
    p.add_argument("--only", default=None, help="comma-separated row labels / variants to run (default: all)")
    p.add_argument("--json", default="docs/results/sequential.json")
    p.add_argument("--md", default=None, help="Markdown table (default: docs/results/sequential_<data>.md)")
    p.add_argument("--runs-root", default="runs/seq_table")
    p.add_argument("--skip-done", action="store_true",
                   help="skip the runs whose rows (model, variant, data, seed) are already in --json with the same "
                        "training options (resume a table; rows of another schedule are re-run and replaced)")
    return p


def training_schedule(command: str) -> Optional[Dict[str, Any]]:
    """The training options of a table command line (a row's `command`): what makes two rows' runs comparable;
    the table's own options (`--seeds`, `--only`, `--runs-root`, `--skip-done`, ...) left out. None if unparsable."""
    tokens = command.split()
    if "--table" not in tokens:
        return None
    try:
        _, rest = table_parser().parse_known_args(tokens[tokens.index("--table"):])
        return vars(build_parser().parse_args(["--model", "syncrec"] + rest))
    except SystemExit:
        return None


def table_main(argv: Optional[List[str]] = None) -> int:
    """One command per table: trains SyNCRec and both SASRecs (`--seeds` each) and SyNCRec's ablations
    (`--ablation-seeds`) on one dataset; after every run, its test rows go into `--json` (replacing rows of the same
    model, variant, data and seed) and the Markdown table of that dataset is rewritten to `--md`."""
    a, rest = table_parser().parse_known_args(argv)
    base = build_parser().parse_args(["--model", "syncrec"] + rest)
    torch.set_num_threads(base.threads or 1)
    data = load_data(base)
    name = data_label(base)
    md = a.md or os.path.join(os.path.dirname(a.json) or ".", "sequential_" + "".join(
        c if c.isalnum() else "_" for c in name).strip("_") + ".md")
    log(f"table data {name}: {json.dumps(data.describe())}")
    command = "python -m mbrec_fast.training.sequential " + " ".join(argv or [])
    only = None if a.only is None else set(a.only.split(","))
    # seed 0 of every model, then their other seeds (the headline comparison), then the ablations
    plan = [(lab, var, extra, 0) for lab, var, extra in TABLE if a.seeds > 0]
    plan += [(lab, var, extra, seed) for seed in range(1, a.seeds) for lab, var, extra in TABLE]
    plan += [(lab, var, extra, seed) for lab, var, extra in ABLATIONS for seed in range(a.ablation_seeds)]
    weights_path = os.path.splitext(a.json)[0] + "_weights.json"
    # done: rows of the same run AND the same training schedule (rows of another schedule, e.g. fewer epochs, are
    # re-run and replaced)
    schedule = training_schedule(command)
    done = {(r["model"], r["variant"], r["data"], r["seed"]) for r in json.load(open(a.json))
            if training_schedule(r.get("command", "")) == schedule} if a.skip_done and os.path.isfile(a.json) else set()
    for label, variant, extra, seed in plan:
        if only is not None and label not in only and variant not in only:
            continue
        variant_name = variant if base.protocol == "official" else f"{variant}, {base.protocol} protocol"
        if (label, variant_name, name, seed) in done:
            log(f"{label} [{variant_name}] seed {seed}: rows already in {a.json}, skipped")
            continue
        run_dir = os.path.join(a.runs_root, name.replace(" ", ""), label, variant.replace(" ", "_").replace("/", ""),
                               f"s{seed}")
        args = build_parser().parse_args(rest + extra + ["--seed", str(seed), "--run-dir", run_dir])
        t0 = time.time()
        out = run_training(args, data, progress=False)
        if out["interrupted"] or out["test"] is None:
            log(f"{label} {variant} seed {seed}: interrupted; no rows written")
            return 1
        epochs_run = len(json.load(open(os.path.join(run_dir, "history.json"))))
        merge_rows(a.json, result_rows(label, variant_name, name, seed, out["test"], data.domain_names, epochs_run,
                                       command))
        log(f"{label} [{variant_name}] seed {seed}: best epoch {out['best_epoch']}/{epochs_run}, test sampled "
            f"ndcg@10={out['test']['sampled_ndcg@10']:.4f} full ndcg@10={out['test']['full_ndcg@10']:.4f} "
            f"({time.time() - t0:.0f}s)")
        weights_log = json.load(open(weights_path)) if os.path.isfile(weights_path) else {}
        if "weights_per_epoch" in out:
            weights_log.setdefault(name, {})[f"{label} [{variant_name}] seed {seed}"] = {
                "domains": data.domain_names, "per_epoch": out["weights_per_epoch"], "best_epoch": out["best_epoch"]}
            with open(weights_path, "w") as f:
                json.dump(weights_log, f, indent=1)
        weights_log = weights_log.get(name, {})
        rows = json.load(open(a.json))
        text = [f"Data: {name} ({json.dumps(data.describe())}).", "", f"Command: `{command}`", "",
                "Test metrics of the best validation epoch (monitor: valid " + base.monitor + ").", "",
                table_markdown(rows, name, data.domain_names, command)]
        if weights_log:
            text += ["SyNCRec cross-loss weights per epoch (epoch means; domains " + str(data.domain_names) + "):", ""]
            for k, ws in weights_log.items():
                text.append(f"- {k} (best epoch {ws['best_epoch']}): "
                            + "; ".join(str([round(v, 3) for v in w]) for w in ws["per_epoch"]))
        os.makedirs(os.path.dirname(md) or ".", exist_ok=True)
        with open(md, "w") as f:
            f.write("\n".join(text) + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    argv = sys.argv[1:]
    if "--table" in argv:
        sys.exit(table_main(argv))
    sys.exit(train_main(argv))
