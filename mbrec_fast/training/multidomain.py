"""Training and evaluation of the multi-domain multi-task CTR models (m3oe, m3rec, mlp, sharedbottom, mmoe, ple, star).

    mbrec-fast train --model m3oe --data synthetic --epochs 5 --run-dir runs/m3oe
    mbrec-fast train --model mmoe --setting mtl --data movielens --data-path /path/to/ml-1m
    mbrec-fast evaluate --checkpoint runs/m3oe/best.pt
    python -m mbrec_fast.training.multidomain --table --seeds 5 --out docs/multidomain_results   # results table

M3oE's fusion scalars (α, β) are never in the main optimizer: a second optimizer updates them on a held-out
(validation) batch every `--bilevel-every` steps (default: once per epoch, as in the paper) — first-order
bi-level optimisation. The main step leaves them untouched.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..data.ctr import CTRData, load_kuairand, load_movielens, make_synthetic_ctr
from ..metrics import ctr_metrics
from ..models.multidomain import MODEL_NAMES, M3oE, M3REC, bce_loss, build_model
from .checkpoint import load_checkpoint
from .._progress import progress_enabled
from .cli_options import (HelpFormatter, add_progress, add_resume, add_run_dir, evaluate_parser, parse_evaluate_args,
                          resolve_resume, resume_command)
from .common import Trainer, check_cli_args, format_table, log, seed_everything

__all__ = ["build_parser", "build_evaluate_parser", "load_data", "make_step", "predict", "train_main", "evaluate_main", "table_main", "run_training"]


def build_parser(prog: str = "mbrec-fast train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, formatter_class=HelpFormatter, description=(
        "Train a multi-domain multi-task CTR model (e.g. click, like in several domains);\n"
        "AUC and logloss per (domain, task) and overall."))
    p.add_argument("--model", choices=MODEL_NAMES, help="the model (required)")
    p.add_argument("--setting", default="mdmt", choices=["mdmt", "mtl", "mdl"],
                   help="baselines: one model (mdmt), one per domain (mtl) or one per task (mdl)")
    p.add_argument("--data", default="synthetic", help="synthetic | movielens | kuairand | a path (format by --format)")
    p.add_argument("--data-path", default=None, help="file or folder of the real data (default: the bundled sample)")
    p.add_argument("--format", default=None, choices=["movielens", "kuairand"], help="format of a --data path")
    p.add_argument("--tab-groups", default=None, help="KuaiRand domains as tab groups, e.g. '1;2;0,3,4'")
    p.add_argument("--synthetic-samples", type=int, default=100_000, help="samples of the synthetic data")
    p.add_argument("--synthetic-major-frac", type=float, default=0.9, help="share of the largest domain")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic data and of the split")
    p.add_argument("--split", default="0.8,0.1,0.1", help="train,valid,test fractions")
    p.add_argument("--epochs", type=int, default=5, help="training epochs (at most)")
    p.add_argument("--batch-size", type=int, default=512, help="samples per step")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--weight-decay", type=float, default=0.0, help="Adam weight decay")
    p.add_argument("--emb-dim", "--dim", dest="emb_dim", type=int, default=16, metavar="N",
                   help="embedding size per field (--dim is an alias)")
    p.add_argument("--expert-dim", type=int, default=64, help="hidden size of an expert")
    p.add_argument("--n-experts", type=int, default=4, help="MMoE experts")
    p.add_argument("--n-shared", type=int, default=None, help="shared experts (M3oE default 1, M3REC/PLE 2)")
    p.add_argument("--fusion-lr", type=float, default=1e-2, help="M3oE: learning rate of the fusion scalars")
    p.add_argument("--bilevel-every", type=int, default=0, help="M3oE: fusion step every N steps (0 = once per epoch)")
    p.add_argument("--fixed-fusion", action="store_true", help="M3oE ablation: α = β = 0.5, no AutoML")
    p.add_argument("--no-domain-module", action="store_true", help="M3oE ablation")
    p.add_argument("--no-task-module", action="store_true", help="M3oE ablation")
    p.add_argument("--cold-prob", type=float, default=0.1, help="M3REC: id-dropout rate of the meta item generator")
    p.add_argument("--impl", default="fused", choices=["fused", "loop"], help="expert layers: fused ops or a Python loop")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and batch order")
    add_run_dir(p, "run_dir", "runs/<model>-<setting>-<data>-s<seed>")
    add_resume(p)
    p.add_argument("--patience", type=int, default=3, help="evaluations without improvement before stopping")
    p.add_argument("--eval-every", type=int, default=1, help="validate every N epochs")
    p.add_argument("--max-steps", type=int, default=None, help="stop (and checkpoint) after this many steps")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    add_progress(p)
    return p


# ------------------------------------------------------------------------------------------------ data
def load_data(args: argparse.Namespace) -> CTRData:
    """The dataset named by the arguments (synthetic generator, MovieLens or KuaiRand loader)."""
    name = args.data.lower()
    path = args.data_path
    fmt = args.format
    if name not in ("synthetic", "movielens", "ml1m", "kuairand"):
        path, name = args.data, (fmt or ("kuairand" if "kuai" in os.path.basename(args.data).lower() else "movielens"))
    if name == "synthetic":
        return make_synthetic_ctr(args.synthetic_samples, major_domain_frac=args.synthetic_major_frac, seed=args.data_seed)
    if name in ("movielens", "ml1m"):
        return load_movielens(path)
    groups = None
    if args.tab_groups:
        groups = [tuple(int(t) for t in g.split(",")) for g in args.tab_groups.split(";")]
    return load_kuairand(path, tab_groups=groups)


def _split(data: CTRData, args) -> Tuple[CTRData, CTRData, CTRData]:
    fr = [float(f) for f in args.split.split(",")]
    return data.split(fr, seed=args.data_seed)


def _model_kwargs(args) -> Dict[str, Any]:
    kw: Dict[str, Any] = dict(emb_dim=args.emb_dim, expert_dim=args.expert_dim, n_experts=args.n_experts)
    if args.n_shared is not None:
        kw["n_shared"] = args.n_shared
    if args.model == "m3oe":
        kw.update(fixed_fusion=args.fixed_fusion, use_domain_module=not args.no_domain_module,
                  use_task_module=not args.no_task_module)
    if args.model == "m3rec":
        kw.update(cold_prob=args.cold_prob)
    return kw


# ------------------------------------------------------------------------------------------------ train / eval
@torch.no_grad()
def predict(model: torch.nn.Module, data: CTRData, batch_size: int = 4096, progress: bool = False) -> torch.Tensor:
    """Probabilities [N, T] for every sample of data (eval mode); progress: a bar on stderr."""
    from .._progress import progress_bar
    was = model.training
    model.eval()
    batches = data.batches(batch_size, shuffle=False)
    bar = progress_bar(progress, total=len(data), desc="predicting", unit=" samples")
    out = []
    for b in batches:
        out.append(torch.sigmoid(model(b)))
        if bar is not None:
            bar.update(out[-1].shape[0])
    if bar is not None:
        bar.close()
    model.train(was)
    return torch.cat(out, 0) if out else torch.zeros(0, data.n_tasks)


def evaluate_split(model, data: CTRData, batch_size: int = 4096, progress: bool = False) -> Dict[str, float]:
    probs = predict(model, data, batch_size, progress)
    return ctr_metrics(probs, data.labels, data.domain, data.n_domains, data.task_names)


def make_step(model: torch.nn.Module, main_opt: torch.optim.Optimizer, fusion_opt: Optional[torch.optim.Optimizer],
              heldout: Optional[CTRData], *, batch_size: int, bilevel_every: int, seed: int,
              counter: Dict[str, int]):
    """The per-batch step: main forward/backward/update; for M3oE also, every `bilevel_every` steps, one update of
    the fusion scalars on a held-out batch (the main optimizer never holds them, and their gradient from the main
    loss is discarded)."""
    fusion_params = model.fusion_parameters() if isinstance(model, M3oE) else []

    def step(batch: Dict[str, torch.Tensor]) -> Dict[str, float]:
        main_opt.zero_grad(set_to_none=True)
        loss = bce_loss(model(batch), batch["labels"])
        loss.backward()
        main_opt.step()
        logs = {"loss": loss.detach().item()}
        counter["steps"] += 1
        if fusion_opt is not None and fusion_params and heldout is not None and len(heldout) \
                and counter["steps"] % max(bilevel_every, 1) == 0:
            k = counter["fusion_steps"]
            counter["fusion_steps"] += 1
            # the k-th held-out batch: a seeded draw from the held-out split (deterministic in (seed, k))
            g = torch.Generator().manual_seed(seed * 1_000_003 + 7919 + k)
            rows = torch.randint(0, len(heldout), (min(batch_size, len(heldout)),), generator=g).to(heldout.sparse.device)
            held = {"sparse": heldout.sparse[rows], "dense": heldout.dense[rows], "domain": heldout.domain[rows],
                    "labels": heldout.labels[rows]}
            for p in model.parameters():
                p.grad = None
            fusion_loss = bce_loss(model(held), held["labels"])
            fusion_loss.backward()
            fusion_opt.step()
            for p in model.parameters():
                p.grad = None
            logs["fusion_loss"] = fusion_loss.detach().item()
        return logs

    return step


def _optimizers(model, args) -> Tuple[torch.optim.Optimizer, Optional[torch.optim.Optimizer]]:
    if isinstance(model, M3oE):
        main = torch.optim.Adam(model.main_parameters(), lr=args.lr, weight_decay=args.weight_decay)
        fp = model.fusion_parameters()
        return main, (torch.optim.Adam(fp, lr=args.fusion_lr) if fp else None)
    return torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay), None


def run_training(args: argparse.Namespace, data: Optional[CTRData] = None, progress: Optional[bool] = None) -> Dict[str, Any]:
    """Trains one model as the CLI does; returns {"test": metrics, "valid": metrics, "run_dir": ..., ...}."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if progress is None:
        progress = progress_enabled(False if getattr(args, "no_progress", False) else None)
    seed_everything(args.seed)
    data = load_data(args) if data is None else data
    train, valid, test = _split(data, args)
    device = torch.device(args.device)
    train, valid, test = train.to(device), valid.to(device), test.to(device)
    seed_everything(args.seed)
    model = build_model(args.model, data, setting=args.setting, impl=args.impl, **_model_kwargs(args)).to(device)
    if isinstance(model, M3REC):
        model.fit_item_counts(train.sparse[:, model.item_field])
    main_opt, fusion_opt = _optimizers(model, args)
    optimizers = {"main": main_opt}
    if fusion_opt is not None:
        optimizers["fusion"] = fusion_opt
    run_dir = args.run_dir or os.path.join("runs", f"{args.model}-{args.setting}-{args.data if args.data in ('synthetic', 'movielens', 'kuairand') else 'data'}-s{args.seed}")
    steps_per_epoch = len(train.batches(args.batch_size))
    counter = {"steps": 0, "fusion_steps": 0}
    every = args.bilevel_every if args.bilevel_every > 0 else steps_per_epoch
    step = make_step(model, main_opt, fusion_opt, valid, batch_size=args.batch_size, bilevel_every=every,
                     seed=args.seed, counter=counter)
    trainer = Trainer(model, optimizers, run_dir, epochs=args.epochs, eval_every=args.eval_every, patience=args.patience,
                      monitor="auc", mode="max", model_name=args.model, config=vars(args), progress=progress,
                      max_steps=args.max_steps, extra_state=lambda: dict(counter),
                      load_extra_state=lambda st: counter.update(st))
    t0 = time.perf_counter()
    result = trainer.fit(batches=lambda epoch: train.batches(args.batch_size, seed=args.seed, epoch=epoch), step=step,
                         evaluate=lambda split: evaluate_split(model, valid if split == "valid" else test,
                                                               progress=progress),
                         resume=resolve_resume(args.resume, run_dir, log))
    wall = time.perf_counter() - t0
    out = {"test": result.test, "valid": result.best_valid, "run_dir": run_dir, "best_epoch": result.best_epoch,
           "interrupted": result.interrupted, "timings": result.timings,
           "train_samples_per_s": (result.epochs_run * len(train)) / max(result.timings.get("step", wall), 1e-9)}
    if isinstance(model, M3oE) and model.fusion_parameters():
        out["fusion"] = {n: torch.sigmoid(p.detach()).cpu().tolist() for n, p in model.named_parameters()
                         if n in M3oE._FUSION}
    return out


def _print_metrics(metrics: Dict[str, float], data_tasks: Sequence[str], n_domains: int) -> None:
    rows = []
    for d in range(n_domains):
        row: Dict[str, Any] = {"domain": d}
        for t in data_tasks:
            row[f"auc {t}"] = metrics.get(f"auc_d{d}_{t}", float("nan"))
            row[f"logloss {t}"] = metrics.get(f"logloss_d{d}_{t}", float("nan"))
        rows.append(row)
    log(format_table(rows))
    log(f"overall: auc={metrics['auc']:.4f} logloss={metrics['logloss']:.4f}")


def train_main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.model is None:
        parser.error(f"--model is required (one of {', '.join(MODEL_NAMES)})")
    check_cli_args(args)
    data = load_data(args)
    log(f"data: {json.dumps(data.describe())}")
    out = run_training(args, data)
    if out["interrupted"]:
        log(f"continue with: {resume_command(list(sys.argv[1:] if argv is None else argv), out['run_dir'])}")
        return 0
    log(f"test metrics of the best epoch ({out['best_epoch']}), run dir {out['run_dir']}:")
    _print_metrics(out["test"], data.task_names, data.n_domains)
    if "fusion" in out:
        with open(os.path.join(out["run_dir"], "fusion.json"), "w") as f:
            json.dump(out["fusion"], f, indent=1)
        log(f"fusion weights (sigmoid): {json.dumps({k: [round(v, 3) for v in vs] for k, vs in out['fusion'].items()})}")
    return 0


def build_evaluate_parser(prog: str = "mbrec-fast evaluate") -> argparse.ArgumentParser:
    def options(p):
        p.add_argument("--split", default="test", choices=["train", "valid", "test"], help="split to score")
        p.add_argument("--data-path", default=None, help="override the data path stored in the checkpoint")
    return evaluate_parser("AUC / logloss of a multi-domain CTR checkpoint on a split of its data.", options, prog=prog)


def evaluate_main(argv: Optional[List[str]] = None) -> int:
    """`mbrec-fast evaluate --checkpoint P [--split test|valid]`: rebuilds data and model from the checkpoint's config."""
    a = parse_evaluate_args(build_evaluate_parser(), argv)
    ckpt = load_checkpoint(a.checkpoint)
    args = argparse.Namespace(**ckpt["config"])
    if a.data_path:
        args.data_path = a.data_path
    data = load_data(args)
    splits = dict(zip(("train", "valid", "test"), _split(data, args)))
    model = build_model(args.model, data, setting=args.setting, impl=args.impl, **_model_kwargs(args))
    model.load_state_dict(ckpt["model"])
    metrics = evaluate_split(model, splits[a.split], progress=progress_enabled(False if a.no_progress else None))
    _print_metrics(metrics, data.task_names, data.n_domains)
    if a.output:
        with open(a.output, "w") as f:
            json.dump(metrics, f, indent=1)
    return 0


# ------------------------------------------------------------------------------------------------ results table
TABLE_CONFIGS: List[Tuple[str, str, List[str]]] = [
    ("mlp", "mdmt", []),
    ("sharedbottom", "mtl", []), ("mmoe", "mtl", []), ("ple", "mtl", []),
    ("sharedbottom", "mdl", []), ("mmoe", "mdl", []), ("ple", "mdl", []), ("star", "mdl", []),
    ("sharedbottom", "mdmt", []), ("mmoe", "mdmt", []), ("ple", "mdmt", []), ("star", "mdmt", []),
    ("m3rec", "mdmt", []),
    ("m3oe", "mdmt", ["--fixed-fusion"]),
    ("m3oe", "mdmt", []),
    ("m3oe", "mdmt", ["--bilevel-every", "20"]),
]


def _label(model: str, setting: str, extra: Sequence[str]) -> str:
    label = model if model in ("mlp", "m3oe", "m3rec") else f"{model}-{setting}"
    return label + ("".join(" " + e.lstrip("-") for e in extra))


def table_main(argv: Optional[List[str]] = None) -> int:
    """Trains every TABLE_CONFIGS entry for `--seeds` seeds on one synthetic dataset with imbalanced domains and
    writes `<out>.md` (mean ± std of AUC/logloss per (domain, task) and overall) and `<out>.json`."""
    p = argparse.ArgumentParser(prog="python -m mbrec_fast.training.multidomain --table")
    p.add_argument("--table", action="store_true")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--out", default="docs/multidomain_results")
    p.add_argument("--only", default=None, help="comma-separated labels to run (default all)")
    p.add_argument("--runs-root", default="runs/table")
    a, rest = p.parse_known_args(argv)
    base = ["--model", "mlp"] + rest
    base_args = build_parser().parse_args(base)
    torch.set_num_threads(base_args.threads or 1)
    data = load_data(base_args)
    log(f"table data: {json.dumps(data.describe())}")
    _, _, test = _split(data, base_args)
    results: Dict[str, List[Dict[str, float]]] = {}
    if os.path.exists(a.out + ".json"):
        results = json.load(open(a.out + ".json")).get("runs", {})
    only = set(a.only.split(",")) if a.only else None
    for model, setting, extra in TABLE_CONFIGS:
        label = _label(model, setting, extra)
        if only and label not in only:
            continue
        runs = results.setdefault(label, [])
        for seed in range(len(runs), a.seeds):
            argv_run = ["--model", model, "--setting", setting, "--seed", str(seed),
                        "--run-dir", os.path.join(a.runs_root, label.replace(" ", "_"), f"s{seed}")] + extra + rest
            args = build_parser().parse_args(argv_run)
            t0 = time.time()
            out = run_training(args, data, progress=False)
            out["test"]["train_samples_per_s"] = out["train_samples_per_s"]
            runs.append(out["test"])
            log(f"{label} seed {seed}: auc={out['test']['auc']:.4f} logloss={out['test']['logloss']:.4f} "
                f"({time.time() - t0:.0f}s)")
            _write_table(a.out, results, data, test, base_args)
    _write_table(a.out, results, data, test, base_args)
    return 0


def _write_table(out: str, results: Dict[str, List[Dict[str, float]]], data: CTRData, test: CTRData, args) -> None:
    cells = [(d, t) for d in range(data.n_domains) for t in data.task_names]
    counts = data.domain_counts()
    total = max(sum(counts), 1)
    head = ["model"] + [f"d{d} {t}" for d, t in cells] + ["AUC", "Logloss", "runs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(vals):
        vals = [v for v in vals if v is not None and not math.isnan(v)]
        if not vals:
            return "–"
        return f"{100 * np.mean(vals):.2f} ± {100 * np.std(vals):.2f}"

    # reference rows: the Bayes predictor (true probabilities) and a constant predictor
    if test.true_probs is not None:
        ref = ctr_metrics(test.true_probs, test.labels, test.domain, test.n_domains, test.task_names)
        lines.append("| *oracle (true probabilities)* | " + " | ".join(f"{100 * ref[f'auc_d{d}_{t}']:.2f}" for d, t in cells)
                     + f" | {100 * ref['auc']:.2f} | {100 * ref['logloss']:.2f} | – |")
    const = ctr_metrics(test.labels.mean(0, keepdim=True).expand_as(test.labels).contiguous(), test.labels, test.domain,
                        test.n_domains, test.task_names)
    lines.append("| *constant (positive rate)* | " + " | ".join("50.00" for _ in cells)
                 + f" | 50.00 | {100 * const['logloss']:.2f} | – |")
    for label, runs in results.items():
        row = [label] + [fmt([r.get(f"auc_d{d}_{t}") for r in runs]) for d, t in cells]
        row += [fmt([r["auc"] for r in runs]), fmt([r["logloss"] for r in runs]), str(len(runs))]
        lines.append("| " + " | ".join(row) + " |")
    desc = (f"Synthetic benchmark: {len(data):,} samples ({', '.join(f'd{d} {100 * c / total:.1f}%' for d, c in enumerate(counts))}), "
            f"{data.n_tasks} tasks, split 8:1:1; {args.epochs} epochs max, batch {args.batch_size}, lr {args.lr}, "
            f"embedding {args.emb_dim}, early stopping on validation AUC (patience {args.patience}); test metrics ×100, "
            f"mean ± std over seeds. AUC overall = mean of the (domain, task) AUCs; Logloss = pooled.")
    with open(out + ".md", "w") as f:
        f.write(desc + "\n\n" + "\n".join(lines) + "\n")
    with open(out + ".json", "w") as f:
        json.dump({"description": desc, "runs": results}, f, indent=1)


if __name__ == "__main__":  # pragma: no cover
    argv = sys.argv[1:]
    if "--table" in argv:
        sys.exit(table_main(argv))
    sys.exit(train_main(argv))
