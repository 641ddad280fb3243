"""Training and evaluation of the cross-domain sequential models (syncrec, sasrec).

    mbrec-fast train --model syncrec --data synthetic --epochs 10 --run-dir runs/syncrec
    mbrec-fast train --model sasrec --setting single --data amazon        # one SASRec per domain
    mbrec-fast train --model sasrec --setting cross --data amazon         # SASRec on the merged sequence
    mbrec-fast evaluate --checkpoint runs/syncrec/best.pt
    python -m mbrec_fast.training.sequential --table --data synthetic --out docs/sequential_synthetic

Evaluation (leave-one-out; valid = second-to-last item, test = last item), two protocols, overall and per target
domain, HR/NDCG@{1,5,10} and MRR:
* sampled: the target against 100 distinct negatives drawn (seeded, once per split) from the items not in the user's
  whole sequence (`sample_eval_negatives`); rank = 1 + #(negatives scoring >= target); MRR untruncated;
* full: `mbrec_fast.evaluate_full_ranking` with a `score_fn`, the user's history items masked through the exclude
  CSR (customary; a repeat purchase of a history item therefore cannot be hit), MRR@10.
`--candidates domain` (default) ranks within the target's domain (negatives from that domain; items of other
domains pushed below every in-domain item by a -1e9 offset in the full protocol), which is what makes per-domain
single-domain models comparable; `--candidates all` ranks against every item.
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
from ..data.sequences import (SequenceData, SequenceSplit, leave_one_out, load_amazon_sequences, load_interaction_log,
                              make_synthetic_sequences, make_training_windows)
from ..models.sasrec import PerDomainSASRec, SASRec
from ..models.syncrec import SyNCRec
from .checkpoint import load_checkpoint
from .._progress import progress_enabled, ranking_progress
from .cli_options import (HelpFormatter, add_progress, add_resume, add_run_dir, evaluate_parser, parse_evaluate_args,
                          resolve_resume, resume_command)
from .common import Trainer, check_cli_args, format_table, log, seed_everything

__all__ = ["build_parser", "build_evaluate_parser", "load_data", "build_model", "EvalContext", "make_eval_context", "evaluate_model",
           "sampled_metrics", "sample_eval_negatives", "train_main", "evaluate_main", "table_main", "run_training"]

KS = (1, 5, 10)
MODELS = ("syncrec", "sasrec")


def build_parser(prog: str = "mbrec-fast train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, formatter_class=HelpFormatter, description=(
        "Train a cross-domain sequential recommender (next item of a sequence that spans\n"
        "several domains); HR/NDCG@{1,5,10}, MRR; sampled and full ranking, per domain."))
    p.add_argument("--model", choices=MODELS, help="the model (required)")
    p.add_argument("--setting", default="cross", choices=["single", "cross"],
                   help="sasrec: one model per domain (single) or one on the merged sequence (cross)")
    p.add_argument("--data", default="synthetic", help="synthetic | amazon | a path (format by --format)")
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
    p.add_argument("--max-len", type=int, default=50, help="longest history window fed to the model")
    p.add_argument("--emb-dim", "--dim", dest="dim", type=int, default=64, metavar="N",
                   help="embedding and transformer width (--dim is an alias)")
    p.add_argument("--layers", type=int, default=1, help="transformer layers per expert / per SASRec")
    p.add_argument("--heads", type=int, default=2, help="attention heads")
    p.add_argument("--dropout", type=float, default=0.2, help="dropout rate")
    p.add_argument("--n-single", type=int, default=2, help="SyNCRec single-domain experts")
    p.add_argument("--n-cross", type=int, default=2, help="SyNCRec cross-domain experts")
    p.add_argument("--r", type=float, default=0.5, help="SyNCRec: weight of a task's own expert group")
    p.add_argument("--temperature", type=float, default=1.0, help="SyNCRec: softmax temperature of the gap weights")
    p.add_argument("--momentum", type=float, default=0.9, help="SyNCRec: EMA momentum of the gaps")
    p.add_argument("--smoothing", type=float, default=0.1, help="SyNCRec: mix of the gap weights toward uniform")
    p.add_argument("--mi-weight", type=float, default=0.1, help="SyNCRec: weight of the mutual-information loss")
    p.add_argument("--gap-grad", default="detach", choices=["detach", "cross"],
                   help="SyNCRec: gradient through the negative-transfer gaps")
    p.add_argument("--num-neg", type=int, default=8, help="training negatives per position")
    p.add_argument("--eval-neg", type=int, default=100, help="negatives of the sampled protocol")
    p.add_argument("--candidates", default="domain", choices=["domain", "all"],
                   help="rank the target within its domain's items or against all items")
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
    path = args.data
    return load_amazon_sequences(path) if args.format == "amazon" else load_interaction_log(path)


def build_model(args: argparse.Namespace, data: SequenceData) -> torch.nn.Module:
    common = dict(dim=args.dim, n_layers=args.layers, n_heads=args.heads, max_len=args.max_len, dropout=args.dropout)
    if args.model == "syncrec":
        return SyNCRec(data.n_items, data.n_domains, data.item_domain, n_single=args.n_single, n_cross=args.n_cross,
                       r=args.r, temperature=args.temperature, momentum=args.momentum, smoothing=args.smoothing,
                       mi_weight=args.mi_weight, gap_grad=args.gap_grad, **common)
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
                      candidates: str = "domain", chunk: int = 256, progress: bool = False) -> EvalContext:
    data = split.data
    users, histories, targets = split.split(name)
    item_domain = data.item_domain
    tdom = item_domain[targets]
    restrict = candidates == "domain"
    negatives = sample_eval_negatives(histories, targets, item_domain, n_neg, seed=seed, restrict=restrict,
                                      progress=progress, desc=f"{name} negatives")
    ex_rows = [torch.unique(h) for h in histories]
    indptr = torch.zeros(len(histories) + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(torch.tensor([r.numel() for r in ex_rows], dtype=torch.int64), 0)
    exclude = (indptr, torch.cat(ex_rows) if ex_rows else torch.zeros(0, dtype=torch.int64))
    target_csr = (torch.arange(len(histories) + 1, dtype=torch.int64), targets.clone())
    return EvalContext(histories, targets, tdom, negatives, exclude, target_csr, item_domain, data.domain_names, restrict)


def sample_eval_negatives(histories: Sequence[torch.Tensor], targets: torch.Tensor, item_domain: torch.Tensor,
                          n_neg: int = 100, seed: int = 0, restrict: bool = True, progress: bool = False,
                          desc: str = "eval negatives") -> torch.Tensor:
    """[U, n_neg] distinct negatives per user, uniform without replacement over the items not in the user's whole
    sequence (history + target), within the target's domain when `restrict`; -1 pads a pool smaller than n_neg.
    Seeded: user u's draw depends only on (seed, u). progress: a bar on stderr (a user at a time in Python:
    minutes for ~10k users over ~40k-item domains)."""
    from .._progress import progress_bar
    dom = item_domain.numpy()
    n_items = dom.size
    pools = [np.nonzero(dom == d)[0] for d in range(int(dom.max()) + 1)] if restrict else None
    everything = np.arange(n_items)
    out = np.full((len(histories), n_neg), -1, dtype=np.int64)
    bar = progress_bar(progress, total=len(histories), desc=desc, unit=" users")
    for u, (h, t) in enumerate(zip(histories, targets.tolist())):
        rng = np.random.default_rng([seed, u])
        base = pools[dom[t]] if restrict else everything
        pool = np.setdiff1d(base, np.append(h.numpy(), t), assume_unique=False)
        k = min(n_neg, pool.size)
        out[u, :k] = rng.choice(pool, size=k, replace=False)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
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


def evaluate_model(model: torch.nn.Module, ctx: EvalContext, full: bool = True, progress: bool = False) -> Dict[str, float]:
    """Both protocols; keys '<protocol>_<metric>' overall and '<protocol>_<metric>_<domain>' per target domain.
    progress: a bar (users ranked, users/s, time left) on stderr during the full ranking."""
    was = model.training
    model.eval()
    with torch.no_grad():
        states, tables = _states_and_tables(model, ctx)
        dev = states.device
        tdom = ctx.target_domains.to(dev)
        cand = torch.cat([ctx.targets[:, None], ctx.negatives], 1).to(dev)
        sc = _score_rows(states, tables, tdom, cand)
        res = sampled_metrics(sc[:, 0], sc[:, 1:], cand[:, 1:] >= 0, ctx.target_domains, ctx.domain_names)
        out: Dict[str, float] = {}
        for g, ms in res.items():
            for k, v in ms.items():
                out[f"sampled_{k}" if g == "all" else f"sampled_{k}_{g}"] = v
        if full:
            item_dom = ctx.item_domain.to(dev)

            def score_fn(users: torch.Tensor, start: int, end: int) -> torch.Tensor:
                u = users.to(dev)
                items = torch.arange(start, end, device=dev).expand(u.numel(), -1)
                s = _score_rows(states[u], tables, tdom[u], items)
                if ctx.restrict:
                    s = s - 1e9 * (item_dom[start:end][None, :] != tdom[u][:, None]).float()
                return s

            n_items = ctx.item_domain.numel()
            with ranking_progress(progress, "full ranking", total=len(ctx.histories)) as callback:
                r = evaluate_full_ranking(None, None, ctx.exclude, ctx.target_csr, ks=KS,
                                          metrics=("hr", "ndcg", "mrr"), score_fn=score_fn, n_items=n_items,
                                          target_groups=ctx.target_domains, group_names=ctx.domain_names,
                                          progress=callback)
            for k, v in r.metrics.items():
                out[f"full_{k}"] = v
            for g, ms in r.groups.items():
                for k, v in ms.items():
                    out[f"full_{k}_{g}"] = v
                out[f"full_users_{g}"] = float(r.group_users[g])  # 0: the metrics above are no users' mean
    model.train(was)
    return out


# ------------------------------------------------------------------------------------------------ training
def make_batches(n_users: int, batch_size: int, seed: int, epoch: int) -> List[Dict[str, Any]]:
    """The epoch's batches: a permutation of the users, a deterministic function of (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n_users, generator=g)
    return [{"users": perm[s:s + batch_size], "epoch": epoch, "index": k}
            for k, s in enumerate(range(0, n_users, batch_size))]


def materialize(batch: Dict[str, Any], windows: Dict[str, torch.Tensor], item_domain: torch.Tensor, n_items: int,
                num_neg: int, seed: int, device) -> Dict[str, torch.Tensor]:
    """Index the windows and draw this batch's negatives (keyed by seed, epoch and batch index)."""
    u = batch["users"]
    b = {k: v[u] for k, v in windows.items()}
    B, D, L = b["single_tgt"].shape
    offset = (batch["epoch"] * 100_003 + batch["index"]) * 2
    b["cross_neg"] = sample_sequence_negatives(b["cross_tgt"], n_items, num_neg, pad=-1, seed=seed, offset=offset,
                                               on_empty="sentinel")
    flat = b["single_tgt"].reshape(B * D, L)
    b["single_neg"] = sample_sequence_negatives(flat, n_items, num_neg, pad=-1, item_domain=item_domain, seed=seed,
                                                offset=offset + 1, on_empty="sentinel").reshape(B, D, L, num_neg)
    return {k: v.to(device) for k, v in b.items()}


def make_step(model, opt, windows, item_domain, n_items, args, device, last_logs: Dict[str, Any]) -> Callable:
    def step(batch):
        b = materialize(batch, windows, item_domain, n_items, args.num_neg, args.seed, device)
        opt.zero_grad(set_to_none=True)
        logs: Dict[str, float] = {}
        if isinstance(model, SyNCRec):
            out = model.losses(b)
            loss = out["loss"]
            logs.update(single=float(out["single"]), cross=float(out["cross"]), mi=float(out["mi"]))
            for d in range(model.n_domains):
                logs[f"w_d{d}"] = float(model_weights(model)[d])
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
    """Current gap weights from the smoothed gaps (all domains present)."""
    from ..models.syncrec import gap_weights
    return gap_weights(model.gap_ema, model.temperature, model.smoothing)


def run_training(args: argparse.Namespace, data: Optional[SequenceData] = None,
                 progress: Optional[bool] = None) -> Dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    if progress is None:
        progress = progress_enabled(False if getattr(args, "no_progress", False) else None)
    seed_everything(args.seed)
    data = load_data(args) if data is None else data
    split = leave_one_out(data)
    device = torch.device(args.device)
    windows = make_training_windows(split.train, data.item_domain, data.n_domains, args.max_len, data.n_items)
    has_items = torch.nonzero(windows["cross_tgt"][:, 0] >= 0).flatten()
    windows = {k: v[has_items] for k, v in windows.items()}
    ctx = {s: make_eval_context(split, s, args.eval_neg, seed=args.seed + (0 if s == "valid" else 1),
                                candidates=args.candidates, progress=progress) for s in ("valid", "test")}
    seed_everything(args.seed)
    model = build_model(args, data).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    run_dir = args.run_dir or os.path.join("runs", f"{model_label(args)}-{args.data if args.data in ('synthetic', 'amazon') else 'data'}-s{args.seed}")
    last: Dict[str, Any] = {}
    step = make_step(model, opt, windows, data.item_domain, data.n_items, args, device, last)
    trainer = Trainer(model, {"main": opt}, run_dir, epochs=args.epochs, eval_every=args.eval_every,
                      patience=args.patience, monitor=args.monitor, mode="max", model_name=args.model,
                      config=vars(args), progress=progress, max_steps=args.max_steps)
    result = trainer.fit(batches=lambda epoch: make_batches(windows["cross_in"].shape[0], args.batch_size, args.seed, epoch),
                         step=step,
                         evaluate=lambda s: evaluate_model(model, ctx[s], full=(s == "test" or not args.no_full),
                                                           progress=progress),
                         resume=resolve_resume(args.resume, run_dir, log))
    out = {"test": result.test, "valid": result.best_valid, "run_dir": run_dir, "best_epoch": result.best_epoch,
           "interrupted": result.interrupted, "timings": result.timings, "data": data.describe()}
    if isinstance(model, SyNCRec):
        out["gap_ema"] = model.gap_ema.tolist()
        out["gap_weights"] = model_weights(model).tolist()
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
    return evaluate_parser("Both protocols (sampled and full ranking) of a sequential checkpoint.", options, prog=prog)


def evaluate_main(argv: Optional[List[str]] = None) -> int:
    """`mbrec-fast evaluate --checkpoint P [--split test|valid]`: rebuilds data and model from the checkpoint."""
    a = parse_evaluate_args(build_evaluate_parser(), argv)
    ckpt = load_checkpoint(a.checkpoint)
    args = argparse.Namespace(**ckpt["config"])
    if a.data_path:
        args.data_path = a.data_path
    data = load_data(args)
    split = leave_one_out(data)
    model = build_model(args, data)
    model.load_state_dict(ckpt["model"])
    show_progress = progress_enabled(False if a.no_progress else None)
    ctx = make_eval_context(split, a.split, args.eval_neg, seed=args.seed + (0 if a.split == "valid" else 1),
                            candidates=args.candidates, progress=show_progress)
    metrics = evaluate_model(model, ctx, full=True, progress=show_progress)
    log(_metric_table(metrics, data.domain_names))
    if a.output:
        with open(a.output, "w") as f:
            json.dump(metrics, f, indent=1)
    return 0


# ------------------------------------------------------------------------------------------------ results table
TABLE = [("syncrec", "cross"), ("sasrec", "single"), ("sasrec", "cross")]


def table_main(argv: Optional[List[str]] = None) -> int:
    """Trains SyNCRec, single-domain SASRec and cross-domain SASRec on one dataset; writes <out>.md/.json with
    per-domain test HR@10/NDCG@10 of both protocols (mean over seeds)."""
    p = argparse.ArgumentParser(prog="python -m mbrec_fast.training.sequential --table")
    p.add_argument("--table", action="store_true")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--out", default="docs/sequential_results")
    p.add_argument("--runs-root", default="runs/seq_table")
    a, rest = p.parse_known_args(argv)
    base = build_parser().parse_args(["--model", "syncrec"] + rest)
    torch.set_num_threads(base.threads or 1)
    data = load_data(base)
    log(f"table data: {json.dumps(data.describe())}")
    results: Dict[str, List[Dict[str, Any]]] = {}
    for model, setting in TABLE:
        label = "syncrec" if model == "syncrec" else f"sasrec-{setting}"
        for seed in range(a.seeds):
            args = build_parser().parse_args(["--model", model, "--setting", setting, "--seed", str(seed),
                                              "--run-dir", os.path.join(a.runs_root, label, f"s{seed}")] + rest)
            t0 = time.time()
            out = run_training(args, data, progress=False)
            if out["interrupted"] or out["test"] is None:
                log(f"{label} seed {seed}: interrupted; table not updated")
                return 1
            rec = dict(out["test"])
            rec["train_s"] = time.time() - t0
            if "gap_weights" in out:
                rec["gap_ema"], rec["gap_weights"] = out["gap_ema"], out["gap_weights"]
            results.setdefault(label, []).append(rec)
            log(f"{label} seed {seed}: sampled ndcg@10={rec['sampled_ndcg@10']:.4f} full ndcg@10={rec['full_ndcg@10']:.4f} "
                f"({rec['train_s']:.0f}s)")
            _write_table(a.out, results, data, base, argv)
    return 0


def _write_table(out: str, results, data: SequenceData, args, argv) -> None:
    doms = data.domain_names
    lines = []
    for proto in ("sampled", "full"):
        head = ["model"] + [f"{d} HR@10" for d in doms] + [f"{d} NDCG@10" for d in doms] + ["all HR@10", "all NDCG@10"]
        lines += [f"**{proto} protocol**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for label, runs in results.items():
            def mean(key):
                vals = [r[key] for r in runs if key in r]
                return f"{np.mean(vals):.4f}" if vals else "–"
            row = [label] + [mean(f"{proto}_hr@10_{d}") for d in doms] + [mean(f"{proto}_ndcg@10_{d}") for d in doms]
            row += [mean(f"{proto}_hr@10"), mean(f"{proto}_ndcg@10")]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    gw = [r.get("gap_weights") for r in results.get("syncrec", []) if r.get("gap_weights")]
    if gw:
        lines.append(f"SyNCRec cross-loss weights at the end of training (per domain {doms}): "
                     + "; ".join(str([round(v, 3) for v in w]) for w in gw))
    desc = f"Data: {json.dumps(data.describe())}. Command: `python -m mbrec_fast.training.sequential {' '.join(argv or [])}`"
    with open(out + ".md", "w") as f:
        f.write(desc + "\n\n" + "\n".join(lines) + "\n")
    with open(out + ".json", "w") as f:
        json.dump({"description": desc, "runs": results}, f, indent=1, default=float)


if __name__ == "__main__":  # pragma: no cover
    argv = sys.argv[1:]
    if "--table" in argv:
        sys.exit(table_main(argv))
    sys.exit(train_main(argv))
