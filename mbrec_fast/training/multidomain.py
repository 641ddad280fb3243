"""Training and evaluation of the multi-domain multi-task CTR models (m3oe, m3rec, mlp, sharedbottom, mmoe, ple, star).

    mbrec-fast train --model m3oe --data synthetic --epochs 5 --run-dir runs/m3oe
    mbrec-fast train --model mmoe --setting mtl --data movielens --data-path /path/to/ml-1m
    mbrec-fast evaluate --checkpoint runs/m3oe/best.pt
    python -m mbrec_fast.training.multidomain --table --seeds 5 --out docs/multidomain_results   # synthetic table
    python -m mbrec_fast.training.multidomain --results --data ml100k                          # ml100k tables

M3oE's fusion scalars (α, β): `--fusion-train official` (default) trains them with every main step plus one step of
their own optimizer per epoch on a training batch (the official code); `bilevel` / `bilevel-valid` keep them out of
the main optimizer and step them alone on training / validation batches (the paper / this package's v1).
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

from ..data.ctr import CTRData, load_kuairand, load_ml100k, load_movielens, load_ratings_table, make_synthetic_ctr
from ..metrics import ctr_metrics
from ..models.multidomain import _BASE, MODEL_NAMES, M3oE, M3REC, build_model, ctr_loss
from .checkpoint import load_checkpoint
from .._progress import progress_enabled
from .cli_options import (HelpFormatter, add_progress, add_resume, add_run_dir, evaluate_parser, fill_model_defaults,
                          model_defaults_text, parse_evaluate_args, resolve_resume, resume_command)
from .common import Trainer, check_cli_args, format_table, log, make_adam, seed_everything

__all__ = ["build_parser", "build_evaluate_parser", "load_data", "make_step", "predict", "train_main", "evaluate_main", "table_main", "run_training",
           "resolve_model_defaults"]

# the model options whose default None means the model's own (its constructor's signature): dest -> argument.
# --n-shared stays None in the run's config (M3oE picks its count by variant)
MODEL_OPTIONS = {"emb_dim": "emb_dim", "expert_dim": "expert_dim", "n_experts": "n_experts", "cold_prob": "cold_prob",
                 "m3oe_variant": "variant", "m3oe_fusion": "fusion"}


def _defaults(key: str, none_text: str = "its --m3oe-variant's") -> str:
    """Help text of a model option's default, read from the model classes' signatures."""
    return model_defaults_text(_BASE.values(), key, none_text)


def resolve_model_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fills the model options left at None with the chosen model's defaults (another model's where the chosen one
    does not take the option), so the run's config records the values as before."""
    chosen = _BASE.get(str(getattr(args, "model", "")).lower())
    fill_model_defaults(args, ([chosen] if chosen else []) + list(_BASE.values()), MODEL_OPTIONS)
    return args


def build_parser(prog: str = "mbrec-fast train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, formatter_class=HelpFormatter, description=(
        "Train a multi-domain multi-task CTR model (e.g. click, like in several domains);\n"
        "AUC and logloss per (domain, task) and overall."))
    p.add_argument("--model", choices=MODEL_NAMES, help="the model (required)")
    p.add_argument("--setting", default="mdmt", choices=["mdmt", "mtl", "mdl"],
                   help="baselines: one model (mdmt), one per domain (mtl) or one per task (mdl)")
    p.add_argument("--data", default="synthetic",
                   help="synthetic | ml100k | movielens | kuairand | a path (format by --format)")
    p.add_argument("--data-path", default=None, help="file or folder of the real data (default: the bundled sample)")
    p.add_argument("--format", default=None, choices=["movielens", "kuairand", "table"],
                   help="format of a --data path; table = any CSV/TSV/Parquet with --domain-col and --label-cols")
    p.add_argument("--domain-col", default=None, help="table: the domain column")
    p.add_argument("--label-cols", default=None, help="table: comma-separated 0/1 label columns")
    p.add_argument("--sparse-cols", default=None, help="table: comma-separated id columns (user and item first)")
    p.add_argument("--dense-cols", default="", help="table: comma-separated numeric columns")
    p.add_argument("--item-cols", default="", help="table: comma-separated item-side columns (M3REC's generator)")
    p.add_argument("--time-col", default=None, help="table: timestamp column (for --split-order time)")
    p.add_argument("--tab-groups", default=None, help="KuaiRand domains as tab groups, e.g. '1;2;0,3,4'")
    p.add_argument("--synthetic-samples", type=int, default=100_000, help="samples of the synthetic data")
    p.add_argument("--synthetic-major-frac", type=float, default=0.9, help="share of the largest domain")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic data and of the split")
    p.add_argument("--split", default="0.8,0.1,0.1", help="train,valid,test fractions")
    p.add_argument("--split-order", default=None, choices=["random", "sequential", "time"],
                   help="row order the split slices (default: the dataset's; ml100k: sequential, as the official code)")
    p.add_argument("--cold-items", type=int, default=None,
                   help="cold-item split: items with at most this many ratings form a separate cold test set")
    # schedule: None = the protocol default (ml100k: the official M3oE MovieLens schedule; else the v1 defaults)
    p.add_argument("--epochs", type=int, default=None, help="training epochs (at most; default: the data's protocol)")
    p.add_argument("--batch-size", type=int, default=None, help="samples per step (default: the data's protocol)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: the data's protocol)")
    p.add_argument("--weight-decay", type=float, default=None, help="Adam weight decay (default: the data's protocol)")
    p.add_argument("--patience", type=int, default=None,
                   help="evaluations without improvement before stopping (default: the data's protocol)")
    p.add_argument("--loss", default=None, choices=["pooled", "balanced"],
                   help="pooled: BCE mean over samples; balanced: mean BCE per (domain, task) cell, summed (official)")
    # model options: None = the model's default, stated once in its constructor's signature
    p.add_argument("--emb-dim", "--dim", dest="emb_dim", type=int, default=None, metavar="N",
                   help=f"embedding size per field (default {_defaults('emb_dim')}; --dim is an alias)")
    p.add_argument("--expert-dim", type=int, default=None,
                   help=f"hidden size of an expert (default {_defaults('expert_dim')})")
    p.add_argument("--n-experts", type=int, default=None, help=f"MMoE / M2M experts (default {_defaults('n_experts')})")
    p.add_argument("--n-shared", type=int, default=None, help=f"shared experts (default {_defaults('n_shared')})")
    p.add_argument("--m3oe-variant", default=None, choices=["official", "v1"],
                   help=f"M3oE architecture: the official code's, or this package's first version "
                        f"(default {_defaults('variant')})")
    p.add_argument("--m3oe-fusion", default=None, choices=["add", "concat", "gated"],
                   help=f"M3oE: add (paper), concat modules / fully gated modules (the paper's ablations) "
                        f"(default {_defaults('fusion')})")
    p.add_argument("--fusion-train", default="official", choices=["official", "joint", "bilevel", "bilevel-valid"],
                   help="M3oE α/β: official = main optimizer every step + one fusion step per epoch on a training "
                        "batch; joint = main optimizer only; bilevel = separate optimizer, fusion step on a training "
                        "batch every --bilevel-every steps (paper); bilevel-valid = same on validation batches (v1)")
    p.add_argument("--fusion-lr", type=float, default=None,
                   help="M3oE: learning rate of the fusion step (official 1e-3, v1 1e-2)")
    p.add_argument("--bilevel-every", type=int, default=0, help="M3oE: fusion step every N steps (0 = once per epoch)")
    p.add_argument("--fixed-fusion", action="store_true", help="M3oE ablation: α = β = 0.5, no AutoML")
    p.add_argument("--no-domain-module", action="store_true", help="M3oE ablation")
    p.add_argument("--no-task-module", action="store_true", help="M3oE ablation")
    p.add_argument("--cold-prob", type=float, default=None,
                   help=f"M3REC: id-dropout rate of the meta item generator (default {_defaults('cold_prob')})")
    p.add_argument("--no-generator", action="store_true", help="M3REC ablation: no meta item-embedding generator")
    # dest stays "impl": the key under which run configs and checkpoints store it
    p.add_argument("--expert-impl", "--impl", dest="impl", default="fused", choices=["fused", "loop"],
                   help="expert layers: fused ops or the loop-of-experts reference (--impl: deprecated spelling)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and batch order")
    add_run_dir(p, "run_dir", "runs/<model>-<setting>-<data>-s<seed>")
    add_resume(p)
    p.add_argument("--eval-every", type=int, default=1, help="validate every N epochs")
    p.add_argument("--max-steps", type=int, default=None, help="stop (and checkpoint) after this many steps")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    add_progress(p)
    return p


# the official M3oE MovieLens schedule (examples/run_movielens.py) with the batch scaled to ml100k: 40,960 of ML-1M's
# 800k training rows is ~20 steps per epoch; 4,096 of ml100k's 80k keeps that count
OFFICIAL_PROTOCOL = dict(epochs=50, batch_size=4096, lr=1e-2, weight_decay=1e-5, patience=10, loss="balanced",
                         fusion_lr=1e-3)
V1_PROTOCOL = dict(epochs=5, batch_size=512, lr=1e-3, weight_decay=0.0, patience=3, loss="pooled", fusion_lr=1e-2)


def resolve_protocol(args: argparse.Namespace) -> argparse.Namespace:
    """Fills the schedule options left unset: the official M3oE schedule for ml100k, the v1 defaults otherwise."""
    base = OFFICIAL_PROTOCOL if str(args.data).lower() in ("ml100k", "ml-100k") else V1_PROTOCOL
    for k, v in base.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return args


# ------------------------------------------------------------------------------------------------ data
_NAMED_DATA = ("synthetic", "movielens", "ml1m", "kuairand", "ml100k", "ml-100k")  # any other --data is a path


def load_data(args: argparse.Namespace) -> CTRData:
    """The dataset named by the arguments (synthetic generator, MovieLens or KuaiRand loader)."""
    name = args.data.lower()
    path = args.data_path
    fmt = args.format
    if path and name == "synthetic":  # it would be ignored: the synthetic data is generated
        raise ValueError(f"--data-path {path} is not read with --data synthetic (the default); to train on that file "
                         f"pass it as --data {path} (with --format table, --domain-col, --label-cols, --sparse-cols "
                         f"for any table)")
    if name not in _NAMED_DATA:
        if path:  # it would be ignored: --data is the path
            raise ValueError(f"--data-path {path} is not read when --data is a path ({args.data}): pass the file once, "
                             f"as --data")
        path, name = args.data, (fmt or ("kuairand" if "kuai" in os.path.basename(args.data).lower() else "movielens"))
    if name == "table":
        for opt in ("domain_col", "label_cols", "sparse_cols"):
            if not getattr(args, opt, None):
                raise ValueError(f"--format table needs --{opt.replace('_', '-')}")
        cols = lambda v: [c for c in (v or "").split(",") if c]  # noqa: E731
        return load_ratings_table(path, domain_col=args.domain_col, label_cols=cols(args.label_cols),
                                  sparse_cols=cols(args.sparse_cols), dense_cols=cols(args.dense_cols),
                                  item_cols=cols(args.item_cols), time_col=args.time_col)
    if name in ("ml100k", "ml-100k"):
        return load_ml100k(path)
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
    if getattr(args, "cold_items", None) is not None:
        return cold_item_split(data, args.cold_items, fr, seed=args.data_seed, order=args.split_order)[:3]
    return data.split(fr, seed=args.data_seed, order=getattr(args, "split_order", None))


def cold_item_split(data: CTRData, max_count: int, fractions: Sequence[float] = (0.8, 0.1, 0.1), *, seed: int = 0,
                    order: Optional[str] = None) -> Tuple[CTRData, CTRData, CTRData, CTRData]:
    """(train, valid, test, cold): items with at most `max_count` rows in the whole table are held out as a group
    (every row of theirs goes to `cold`, none to training); the other rows are split as usual."""
    if data.item_field is None:
        raise ValueError(f"dataset {data.name!r} names no item field: a cold-item split needs one")
    if max_count < 1:
        raise ValueError(f"cold_items must be >= 1, got {max_count}")
    items = data.sparse[:, data.item_field]
    counts = torch.bincount(items, minlength=data.field_dims[data.item_field])
    cold = counts[items] <= max_count
    if not bool(cold.any()) or bool(cold.all()):
        raise ValueError(f"cold_items={max_count} leaves no cold or no warm rows")
    warm = data.subset((~cold).nonzero().flatten())
    return (*warm.split(fractions, seed=seed, order=order), data.subset(cold.nonzero().flatten()))


def _model_kwargs(args) -> Dict[str, Any]:
    """The constructor arguments the options give; an option left at None is left out (the model's default)."""
    kw: Dict[str, Any] = dict(emb_dim=args.emb_dim, expert_dim=args.expert_dim, n_experts=args.n_experts,
                              n_shared=args.n_shared)
    if args.model == "m3oe":
        kw.update(fixed_fusion=args.fixed_fusion, use_domain_module=not args.no_domain_module,
                  use_task_module=not args.no_task_module, variant=getattr(args, "m3oe_variant", None),
                  fusion=getattr(args, "m3oe_fusion", None))
    if args.model == "m3rec":
        kw.update(cold_prob=args.cold_prob, use_generator=not getattr(args, "no_generator", False))
    return {k: v for k, v in kw.items() if v is not None}


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
              counter: Dict[str, int], loss: str = "pooled"):
    """The per-batch step: main forward/backward/update (`loss` pooled or domain-balanced); for M3oE with a
    fusion optimizer also, every `bilevel_every` steps, one update of the fusion scalars alone on a batch drawn
    (seeded) from `heldout` — the training split (official code, paper) or the validation split (v1). Whether
    the main optimizer also holds α/β is the caller's choice (`_optimizers`)."""
    fusion_params = model.fusion_parameters() if isinstance(model, M3oE) else []
    n_domains = getattr(model, "n_domains", 1)

    def step(batch: Dict[str, torch.Tensor]) -> Dict[str, float]:
        main_opt.zero_grad(set_to_none=True)
        value = ctr_loss(loss, model(batch), batch, n_domains)
        value.backward()
        main_opt.step()
        logs = {"loss": value.detach().item()}
        counter["steps"] += 1
        if fusion_opt is not None and fusion_params and heldout is not None and len(heldout) \
                and counter["steps"] % max(bilevel_every, 1) == 0:
            k = counter["fusion_steps"]
            counter["fusion_steps"] += 1
            # the k-th fusion batch: a seeded draw from the held-out split (deterministic in (seed, k))
            g = torch.Generator().manual_seed(seed * 1_000_003 + 7919 + k)
            rows = torch.randint(0, len(heldout), (min(batch_size, len(heldout)),), generator=g).to(heldout.sparse.device)
            held = {"sparse": heldout.sparse[rows], "dense": heldout.dense[rows], "domain": heldout.domain[rows],
                    "labels": heldout.labels[rows]}
            for p in model.parameters():
                p.grad = None
            fusion_loss = ctr_loss(loss, model(held), held, n_domains)
            fusion_loss.backward()
            fusion_opt.step()
            for p in model.parameters():
                p.grad = None
            logs["fusion_loss"] = fusion_loss.detach().item()
        return logs

    return step


def _optimizers(model, args) -> Tuple[torch.optim.Optimizer, Optional[torch.optim.Optimizer]]:
    """Main Adam (+ the fusion Adam of M3oE). official / joint: the main Adam holds α/β too and updates them every
    step (the official code); bilevel / bilevel-valid: it never holds them."""
    mode = getattr(args, "fusion_train", "bilevel-valid")
    if isinstance(model, M3oE) and model.fusion_parameters():
        fp = model.fusion_parameters()
        if mode in ("official", "joint"):
            main = make_adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
            return main, (make_adam(fp, lr=args.fusion_lr, weight_decay=args.weight_decay)
                          if mode == "official" else None)
        main = make_adam(model.main_parameters(), lr=args.lr, weight_decay=args.weight_decay)
        return main, make_adam(fp, lr=args.fusion_lr)
    return make_adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay), None


def run_training(args: argparse.Namespace, data: Optional[CTRData] = None, progress: Optional[bool] = None) -> Dict[str, Any]:
    """Trains one model as the CLI does; returns {"test": metrics, "valid": metrics, "run_dir": ..., ...}."""
    resolve_protocol(args)
    resolve_model_defaults(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if progress is None:
        progress = progress_enabled(False if getattr(args, "no_progress", False) else None)
    seed_everything(args.seed)
    data = load_data(args) if data is None else data
    cold = None
    if args.cold_items is not None:
        train, valid, test, cold = cold_item_split(data, args.cold_items, [float(f) for f in args.split.split(",")],
                                                   seed=args.data_seed, order=args.split_order)
    else:
        train, valid, test = _split(data, args)
    device = torch.device(args.device)
    train, valid, test = train.to(device), valid.to(device), test.to(device)
    seed_everything(args.seed)
    model = build_model(args.model, data, setting=args.setting, expert_impl=args.impl, **_model_kwargs(args)).to(device)
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
    heldout = valid if args.fusion_train == "bilevel-valid" else train
    step = make_step(model, main_opt, fusion_opt, heldout, batch_size=args.batch_size, bilevel_every=every,
                     seed=args.seed, counter=counter, loss=args.loss)
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
           "epochs_run": result.epochs_run,
           "interrupted": result.interrupted, "timings": result.timings,
           "train_samples_per_s": (result.epochs_run * len(train)) / max(result.timings.get("step", wall), 1e-9)}
    if isinstance(model, M3oE) and model.fusion_parameters():
        out["fusion"] = model.fusion_weights()
    if cold is not None and result.test is not None:
        out["cold"] = evaluate_split(model, cold.to(device))
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
        if str(args.data).lower() == "synthetic":
            raise ValueError(f"--data-path {a.data_path}: the checkpoint was trained on generated synthetic data, "
                             f"there is no file to read")
        if str(args.data).lower() in _NAMED_DATA:
            args.data_path = a.data_path
        else:  # the checkpoint's --data was the path itself
            args.data, args.data_path = a.data_path, None
    data = load_data(args)
    splits = dict(zip(("train", "valid", "test"), _split(data, args)))
    model = build_model(args.model, data, setting=args.setting, expert_impl=args.impl, **_model_kwargs(args))
    model.load_state_dict(ckpt["model"])
    metrics = evaluate_split(model, splits[a.split], progress=progress_enabled(False if a.no_progress else None))
    _print_metrics(metrics, data.task_names, data.n_domains)
    if a.output:
        with open(a.output, "w") as f:
            json.dump(metrics, f, indent=1)
    return 0


# ------------------------------------------------------------------------------------------------ results table
# the synthetic table: (model label, variant, argv) per row, in groups. "default" = the model's defaults at the table's
# schedule; the M3oE headline row is the official architecture and fusion training (the model's defaults, as on
# ml100k). The earlier rows of M3oE were its first version trained bi-level on validation batches (fusion lr 1e-2):
SYNTHETIC_M3OE_V1 = ["--m3oe-variant", "v1", "--fusion-train", "bilevel-valid"]
_TABLE_BASELINES = ([("mlp", "mlp", "mdmt")]
                    + [(f"{m}-{s}", m, s) for s in ("mtl", "mdl", "mdmt") for m in ("sharedbottom", "mmoe", "ple", "star")
                       if (m, s) != ("star", "mtl")]
                    + [(m, m, "mdmt") for m in ("adatt", "adatt-sp", "m2m", "m3rec", "m3oe")])
TABLE_GROUPS: Dict[str, List[Tuple[str, str, List[str]]]] = {
    "headline": [(label, "default", ["--model", m, "--setting", s]) for label, m, s in _TABLE_BASELINES],
    "v1": [("m3oe", "v1 fixed-fusion", ["--model", "m3oe"] + SYNTHETIC_M3OE_V1 + ["--fixed-fusion"]),
           ("m3oe", "v1", ["--model", "m3oe"] + SYNTHETIC_M3OE_V1),
           ("m3oe", "v1 bilevel-every 20", ["--model", "m3oe"] + SYNTHETIC_M3OE_V1 + ["--bilevel-every", "20"])],
    # the official M3oE trainer's domain-balanced loss (the table's default is the pooled mean, which gives a 5 %
    # domain 1/18 of the big domain's weight) and the paper's one shared expert
    "balanced": [(label, "loss balanced", argv + ["--loss", "balanced"]) for label, m, s in _TABLE_BASELINES
                 if label in ("mlp", "mmoe-mdmt", "star-mdmt", "m3oe") for argv in [["--model", m, "--setting", s]]],
    "m3oe": [("m3oe", "n-shared 1", ["--model", "m3oe", "--n-shared", "1"]),
             ("m3oe", "fixed-fusion", ["--model", "m3oe", "--fixed-fusion"])],
}
TABLE_CONFIGS: List[Tuple[str, str, List[str]]] = [c for g in TABLE_GROUPS.values() for c in g]


def table_label(model: str, variant: str) -> str:
    """The row's name in the markdown table and the key of its runs in `<out>.json`."""
    return model if variant == "default" else f"{model} {variant}"


def synthetic_data_label(args: argparse.Namespace) -> str:
    """The `data` of the synthetic table's rows: the sample count, plus whatever else differs from the defaults."""
    n = args.synthetic_samples
    label = f"synthetic-{n // 1000}k" if n % 1000 == 0 else f"synthetic-{n}"
    if args.synthetic_major_frac != 0.9:
        label += f"-major{args.synthetic_major_frac:g}"
    if args.data_seed != 0:
        label += f"-dataseed{args.data_seed}"
    return label


def upsert_rows(path: str, new_rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Writes `new_rows` into the rows file at `path` (docs/results/multidomain.json's list), each replacing a row of
    the same (model, variant, data, seed) in place, or appended; returns the file's rows."""
    rows: List[Dict[str, Any]] = json.load(open(path)) if os.path.exists(path) else []
    key = lambda r: (r["model"], r["variant"], r["data"], r["seed"])  # noqa: E731
    where = {key(r): i for i, r in enumerate(rows)}
    for r in new_rows:
        if key(r) in where:
            rows[where[key(r)]] = r
        else:
            where[key(r)] = len(rows)
            rows.append(r)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(rows, f, indent=1)
    os.replace(tmp, path)
    return rows


def table_main(argv: Optional[List[str]] = None) -> int:
    """Trains the rows of the chosen `--groups` of TABLE_GROUPS for `--seeds` seeds on one synthetic dataset with
    imbalanced domains (group by group, whole seeds first within a group); writes `<out>.md` (mean ± std of AUC and
    logloss per (domain, task) and overall), `<out>.json` (every run's metrics; a re-run resumes from it, per row and
    seed) and each run's row into `--rows` (replacing a row of the same model, variant, data and seed)."""
    p = argparse.ArgumentParser(prog="python -m mbrec_fast.training.multidomain --table")
    p.add_argument("--table", action="store_true")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--out", default="docs/multidomain_results")
    p.add_argument("--groups", default=",".join(TABLE_GROUPS), help="row groups to run, in this order")
    p.add_argument("--only", default=None, help="comma-separated row labels to run (default all)")
    p.add_argument("--rows", default="docs/results/multidomain.json", help="the rows file ('' = none)")
    p.add_argument("--runs-root", default="runs/table")
    a, rest = p.parse_known_args(argv)
    groups = [g for g in a.groups.split(",") if g]
    for g in groups:
        if g not in TABLE_GROUPS:
            raise ValueError(f"--groups: unknown group {g!r} (one of {', '.join(TABLE_GROUPS)})")
    base_args = resolve_model_defaults(resolve_protocol(build_parser().parse_args(["--model", "mlp"] + rest)))
    if base_args.data.lower() != "synthetic":
        raise ValueError(f"--table runs on --data synthetic, got --data {base_args.data!r} (ml100k: --results)")
    torch.set_num_threads(base_args.threads or 1)
    data = load_data(base_args)
    data_label = synthetic_data_label(base_args)
    log(f"table data ({data_label}): {json.dumps(data.describe())}")
    _, _, test = _split(data, base_args)
    # the one command of the table (what --only, --rows and --runs-root choose does not change a row)
    command = " ".join(["python -m mbrec_fast.training.multidomain --table", "--seeds", str(a.seeds), "--out", a.out]
                       + (["--groups", a.groups] if a.groups != ",".join(TABLE_GROUPS) else []) + rest)
    results: Dict[str, List[Dict[str, float]]] = {}
    if os.path.exists(a.out + ".json"):
        results = json.load(open(a.out + ".json")).get("runs", {})
    only = set(a.only.split(",")) if a.only else None
    for g in groups:
        for seed in range(a.seeds):
            for model, variant, extra in TABLE_GROUPS[g]:
                label = table_label(model, variant)
                if (only and label not in only) or len(results.get(label, [])) > seed:
                    continue
                runs = results.setdefault(label, [])
                argv_run = extra + ["--seed", str(seed),
                                    "--run-dir", os.path.join(a.runs_root, label.replace(" ", "_"), f"s{seed}")] + rest
                args = build_parser().parse_args(argv_run)
                t0 = time.time()
                out = run_training(args, data, progress=False)
                run = dict(out["test"], train_samples_per_s=out["train_samples_per_s"], best_epoch=out["best_epoch"],
                           epochs_run=out["epochs_run"])
                metrics = _row_metrics(out["test"], data.task_names, data.n_domains)
                if "fusion" in out:
                    metrics.update({f"fusion_{k}": v for k, v in out["fusion"].items()})
                    run.update({f"fusion_{k}": v for k, v in out["fusion"].items()})
                runs.append(run)
                if a.rows:
                    upsert_rows(a.rows, [{"model": model, "variant": variant, "data": data_label, "seed": seed,
                                          "metrics": metrics, "epochs": out["best_epoch"],
                                          "epochs_run": out["epochs_run"], "command": command,
                                          "args": " ".join(argv_run)}])
                log(f"{label} seed {seed}: auc={out['test']['auc']:.4f} logloss={out['test']['logloss']:.4f} "
                    f"best epoch {out['best_epoch']} of {out['epochs_run']} ({time.time() - t0:.0f}s)")
                _write_table(a.out, results, data, test, base_args, command)
    _write_table(a.out, results, data, test, base_args, command)
    return 0


def _write_table(out: str, results: Dict[str, List[Dict[str, float]]], data: CTRData, test: CTRData, args,
                 command: str = "") -> None:
    cells = [(d, t) for d in range(data.n_domains) for t in data.task_names]
    counts = data.domain_counts()
    total = max(sum(counts), 1)
    head = ["model"] + [f"d{d} {t}" for d, t in cells] + ["AUC", "Logloss", "best epoch", "runs"]
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
                     + f" | {100 * ref['auc']:.2f} | {100 * ref['logloss']:.2f} | – | – |")
    const = ctr_metrics(test.labels.mean(0, keepdim=True).expand_as(test.labels).contiguous(), test.labels, test.domain,
                        test.n_domains, test.task_names)
    lines.append("| *constant (positive rate)* | " + " | ".join("50.00" for _ in cells)
                 + f" | 50.00 | {100 * const['logloss']:.2f} | – | – |")
    for label, runs in results.items():
        if not runs:
            continue
        best = [r["best_epoch"] for r in runs if r.get("best_epoch") is not None]
        row = [label] + [fmt([r.get(f"auc_d{d}_{t}") for r in runs]) for d, t in cells]
        row += [fmt([r["auc"] for r in runs]), fmt([r["logloss"] for r in runs]),
                f"{np.mean(best):.1f}" if best else "–", str(len(runs))]
        lines.append("| " + " | ".join(row) + " |")
    desc = (f"Synthetic benchmark: {len(data):,} samples ({', '.join(f'd{d} {100 * c / total:.1f}%' for d, c in enumerate(counts))}), "
            f"{data.n_tasks} tasks, split 8:1:1; {args.epochs} epochs max, batch {args.batch_size}, lr {args.lr}, "
            f"embedding {args.emb_dim}, loss {args.loss} unless the row says otherwise, early stopping on validation "
            f"AUC (patience {args.patience}); test metrics ×100, mean ± std over seeds (population std). AUC overall = "
            f"mean of the (domain, task) AUCs; Logloss = pooled; best epoch = mean over seeds of the epoch whose "
            f"validation AUC was best (the test metrics are that epoch's). M3oE without a variant is the official "
            f"architecture and fusion training (the model's defaults); `v1` rows are this package's first M3oE "
            f"trained bi-level on validation batches.")
    text = desc + "\n\n" + "\n".join(lines) + "\n"
    if command:
        text += f"\nReproduce (resumes per row and seed from `{out}.json`):\n\n```bash\nOMP_NUM_THREADS=1 {command}\n```\n"
    with open(out + ".md", "w") as f:
        f.write(text)
    with open(out + ".json", "w") as f:
        json.dump({"description": desc, "command": command, "runs": results}, f, indent=1)


# ------------------------------------------------------------------------------------------------ ml100k results
# (model label, variant, argv) — the headline comparison under the official protocol (domain-balanced loss), then the
# pooled loss, the one-change-at-a-time M3oE ablations and M3REC's cold-item split
ML100K_HEADLINE = [
    ("mlp", "official", ["--model", "mlp"]),
    ("sharedbottom-mdmt", "official", ["--model", "sharedbottom"]),
    ("mmoe-mdmt", "official", ["--model", "mmoe"]),
    ("ple-mdmt", "official", ["--model", "ple"]),
    ("star-mdmt", "official", ["--model", "star"]),
    ("adatt", "official", ["--model", "adatt"]),
    ("adatt-sp", "official", ["--model", "adatt-sp"]),
    ("m2m", "official", ["--model", "m2m"]),
    ("m3rec", "official", ["--model", "m3rec"]),
    ("m3oe", "official", ["--model", "m3oe"]),
]
ML100K_POOLED = [(m, "loss pooled", argv + ["--loss", "pooled"]) for m, _, argv in ML100K_HEADLINE
                 if m in ("mlp", "mmoe-mdmt", "star-mdmt", "m3oe")]
ML100K_ABLATIONS = [  # one change at a time from the official configuration, cheapest / most telling first
    ("m3oe", "architecture v1", ["--model", "m3oe", "--m3oe-variant", "v1", "--n-shared", "4"]),
    ("m3oe", "fusion-train bilevel", ["--model", "m3oe", "--fusion-train", "bilevel"]),
    ("m3oe", "n-shared 1", ["--model", "m3oe", "--n-shared", "1"]),
    ("m3oe", "fixed-fusion", ["--model", "m3oe", "--fixed-fusion"]),
    ("m3oe", "fusion-train joint", ["--model", "m3oe", "--fusion-train", "joint"]),
    ("m3oe", "concat modules", ["--model", "m3oe", "--m3oe-fusion", "concat"]),
    ("m3oe", "fully gated modules", ["--model", "m3oe", "--m3oe-fusion", "gated"]),
    ("m3oe", "no domain module", ["--model", "m3oe", "--no-domain-module"]),
    ("m3oe", "no task module", ["--model", "m3oe", "--no-task-module"]),
]
ML100K_COLD = [
    ("m3rec", "cold-items 10", ["--model", "m3rec", "--cold-items", "10"]),
    ("m3rec", "cold-items 10 no-generator", ["--model", "m3rec", "--cold-items", "10", "--no-generator"]),
]
ML100K_GROUPS = {"headline": ML100K_HEADLINE, "pooled": ML100K_POOLED, "ablations": ML100K_ABLATIONS,
                 "cold": ML100K_COLD}
# the M3oE paper's Table 2, MovieLens-1M overall AUC / logloss (×100), for reference beside ours
PAPER_ML1M = {"m3oe": (77.02, None), "mmoe-mdmt": (76.35, 51.02), "sharedbottom-mdmt": (76.26, 50.96),
              "star-mdmt": (76.08, None), "mlp": (75.62, None), "adatt": (72.32, 58.72), "adatt-sp": (74.49, 54.65),
              "m2m": (74.59, 54.14)}


def _row_metrics(metrics: Dict[str, float], task_names: Sequence[str], n_domains: int, prefix: str = "") -> Dict[str, float]:
    """The schema's metric keys: auc, logloss, auc_d{d}_t{t}, logloss_d{d}_t{t} (plus the named-task keys)."""
    out = {prefix + "auc": metrics["auc"], prefix + "logloss": metrics["logloss"]}
    for d in range(n_domains):
        for t, name in enumerate(task_names):
            for m in ("auc", "logloss"):
                out[f"{prefix}{m}_d{d}_t{t}"] = metrics.get(f"{m}_d{d}_{name}", float("nan"))
    return out


def results_main(argv: Optional[List[str]] = None) -> int:
    """`python -m mbrec_fast.training.multidomain --results --data ml100k`: every configuration of the chosen
    groups for `--seeds` seeds (seed-major, so a stopped run leaves whole seeds), each row appended to
    `--rows` (docs/results/multidomain.json; rows already there are skipped) and the markdown table rewritten."""
    p = argparse.ArgumentParser(prog="python -m mbrec_fast.training.multidomain --results")
    p.add_argument("--results", action="store_true")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--groups", default="headline,cold,pooled,ablations", help="groups to run, in this order")
    p.add_argument("--ablation-seeds", type=int, default=3, help="seeds of the groups other than the headline")
    p.add_argument("--variants", default=None, help="comma-separated variants to run within the groups (default all)")
    p.add_argument("--rows", default="docs/results/multidomain.json")
    p.add_argument("--md", default="docs/multidomain_ml100k.md")
    p.add_argument("--runs-root", default="runs/ml100k")
    a, rest = p.parse_known_args(argv)
    rest = rest or ["--data", "ml100k"]
    data_args = resolve_protocol(build_parser().parse_args(["--model", "mlp"] + rest))
    torch.set_num_threads(data_args.threads or 1)
    data = load_data(data_args)
    data_name = data.name
    rows: List[Dict[str, Any]] = json.load(open(a.rows)) if os.path.exists(a.rows) else []
    done = {(r["model"], r["variant"], r["data"], r["seed"]) for r in rows}
    groups = [g for g in a.groups.split(",") if g]
    for g in groups:
        if g not in ML100K_GROUPS:
            raise ValueError(f"unknown group {g!r} (one of {', '.join(ML100K_GROUPS)})")
    for g in groups:  # group by group in the given order; within a group seed-major (whole seeds first)
        n_seeds = a.seeds if g == "headline" else min(a.seeds, a.ablation_seeds)
        for seed in range(n_seeds):
            for label, variant, extra in ML100K_GROUPS[g]:
                if a.variants and variant not in a.variants.split(","):
                    continue
                if (label, variant, data_name, seed) in done:
                    continue
                run_dir = os.path.join(a.runs_root, f"{label}_{variant}".replace(" ", "_"), f"s{seed}")
                argv_run = extra + rest + ["--seed", str(seed), "--run-dir", run_dir, "--threads", "1"]
                args = build_parser().parse_args(argv_run)
                t0 = time.time()
                out = run_training(args, data, progress=False)
                metrics = _row_metrics(out["test"], data.task_names, data.n_domains)
                if "cold" in out:
                    metrics.update(_row_metrics(out["cold"], data.task_names, data.n_domains, prefix="cold_"))
                if "fusion" in out:
                    metrics.update({f"fusion_{k}": v for k, v in out["fusion"].items()})
                row = {"model": label, "variant": variant, "data": data_name, "seed": seed, "metrics": metrics,
                       "epochs": out["best_epoch"], "epochs_run": out["epochs_run"],
                       "command": "python -m mbrec_fast.training.multidomain " + " ".join(argv_run)}
                rows.append(row)
                done.add((label, variant, data_name, seed))
                os.makedirs(os.path.dirname(a.rows) or ".", exist_ok=True)
                with open(a.rows, "w") as f:
                    json.dump(rows, f, indent=1)
                log(f"{label} [{variant}] seed {seed}: auc={metrics['auc']:.4f} logloss={metrics['logloss']:.4f} "
                    f"best epoch {out['best_epoch']} ({time.time() - t0:.0f}s)")
                write_results_md(rows, data, a.md, data_args)
    write_results_md(rows, data, a.md, data_args)
    return 0


def write_results_md(rows: List[Dict[str, Any]], data: CTRData, path: str, args) -> None:
    """The paper's format: AUC per (domain, task), overall AUC (mean of the cells) and logloss, ×100, mean ± std."""
    rows = [r for r in rows if r["data"] == data.name]
    cells = [(d, t) for d in range(data.n_domains) for t in range(data.n_tasks)]

    def fmt(vals):
        vals = [v for v in vals if v is not None and not math.isnan(v)]
        return f"{100 * np.mean(vals):.2f} ± {100 * np.std(vals):.2f}" if vals else "–"

    order: List[Tuple[str, str]] = []
    for r in rows:
        if (r["model"], r["variant"]) not in order:
            order.append((r["model"], r["variant"]))
    head = ["model", "variant"] + [f"d{d} {data.task_names[t]}" for d, t in cells] + ["AUC", "Logloss", "seeds",
                                                                                       "best epoch", "paper ML-1M AUC"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cold_lines = []
    for model, variant in order:
        rs = [r for r in rows if r["model"] == model and r["variant"] == variant]
        paper = PAPER_ML1M.get(model, (None, None))[0] if variant == "official" else None
        if "cold_auc" in rs[0]["metrics"]:
            cold_lines.append(f"| {model} | {variant} | {fmt([r['metrics']['cold_auc'] for r in rs])} | "
                              f"{fmt([r['metrics']['cold_logloss'] for r in rs])} | {fmt([r['metrics']['auc'] for r in rs])} | {len(rs)} |")
            continue
        line = [model, variant] + [fmt([r["metrics"].get(f"auc_d{d}_t{t}") for r in rs]) for d, t in cells]
        line += [fmt([r["metrics"]["auc"] for r in rs]), fmt([r["metrics"]["logloss"] for r in rs]), str(len(rs)),
                 f"{np.mean([r['epochs'] or 0 for r in rs]):.1f}", f"{paper:.2f}" if paper else "–"]
        lines.append("| " + " | ".join(line) + " |")
    counts = data.domain_counts()
    desc = (f"MovieLens-100K ({len(data):,} ratings; domains {', '.join(f'{n} {100 * c / len(data):.1f}%' for n, c in zip(data.domain_names, counts))}; "
            f"click = rating > 3, like = rating > 4), split 8:1:1 in u.data's row order (sequential, as the official "
            f"code); official M3oE schedule: Adam lr {args.lr}, batch {args.batch_size}, weight decay {args.weight_decay}, "
            f"at most {args.epochs} epochs, early stopping on validation AUC (patience {args.patience}); loss "
            f"{args.loss} unless the variant says otherwise. Test metrics ×100, mean ± std over seeds (population std). "
            f"AUC = mean of the 6 (domain, task) AUCs; Logloss pooled. The paper's ML-1M numbers are for reference "
            f"only (other data). Machine: shared 2-core CPU, one thread per run.")
    text = "# Multi-domain multi-task results on MovieLens-100K\n\n" + desc + "\n\n" + "\n".join(lines) + "\n"
    if cold_lines:
        text += ("\n## Cold items (M3REC's meta item-embedding generator)\n\nItems with at most 10 ratings in the whole "
                 "table are held out as a group (all their rows form the cold test set; none are trained on).\n\n"
                 "| model | variant | cold AUC | cold Logloss | warm test AUC | seeds |\n|---|---|---|---|---|---|\n"
                 + "\n".join(cold_lines) + "\n")
    text += ("\nReproduce: `OMP_NUM_THREADS=1 python -m mbrec_fast.training.multidomain --results --data ml100k` "
             "(resumes from the rows already in docs/results/multidomain.json).\n")
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":  # pragma: no cover
    argv = sys.argv[1:]
    if "--results" in argv:
        sys.exit(results_main(argv))
    if "--table" in argv:
        sys.exit(table_main(argv))
    sys.exit(train_main(argv))
