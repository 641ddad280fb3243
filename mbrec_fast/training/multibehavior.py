"""`mbrec-fast train|evaluate` for the multi-behavior models: bpr (alias mf), neumf, mcbpr, lightgcn,
nmtr, member.

    mbrec-fast train --model nmtr --data beibei --epochs 10 --device cpu --out runs/nmtr
    mbrec-fast evaluate --checkpoint runs/nmtr/best.pt
    torchrun --nproc_per_node 2 -m mbrec_fast.cli train --model bpr --data beibei --epochs 5

Training goes through the shared `Trainer` (progress bars, validation every --eval-every epochs,
early stopping on --monitor, checkpoints with exact resume, metrics.json / history.json / curves.png
in --out). Evaluation ranks every item with `mbrec_fast.evaluate_full_ranking`, masking the user's
training purchases (and validation items at test time), and reports HR/NDCG@K overall and on
visited / unvisited held-out items. Under torchrun the model is wrapped in DistributedDataParallel,
each global batch is split across ranks and the evaluator shards users across ranks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from .. import registry
from .._progress import progress_enabled
from ..evaluator import METRICS
from .checkpoint import load_checkpoint
from .cli_options import (HelpFormatter, add_progress, add_resume, add_run_dir, evaluate_parser, model_defaults_text,
                          parse_evaluate_args, resolve_resume, resume_command)
from .common import (Trainer, check_cli_args, format_table, init_distributed, is_main_process, log, make_adam,
                     seed_everything, world)

__all__ = ["train_main", "evaluate_main", "build_parser", "build_evaluate_parser", "build_model", "load_data",
           "evaluate_model", "results_markdown", "metrics_table", "MODELS", "check_protocol", "result_rows",
           "write_result_rows", "variant_label", "summary_markdown"]

# name (aliases included) -> (module, class name), from the model registry (mbrec_fast/registry.py)
MODELS = {name: tuple(registry.resolve(name).builder.split(":"))
          for name in registry.model_names("multibehavior", aliases=True)}
# the model arguments --emb-dim, --reg and --neg-ratio: None means the model's own default, stated once in
# its constructor's signature (MEMBER's reg: its variant's)
MODEL_ARGS = ("dim", "reg", "neg_ratio")
# Training defaults per model: (model, None) applies to every variant of the model, (model, variant) overrides it
# for that --variant; GENERIC_DEFAULTS for the rest. The values are the configurations of the results tables in
# docs/multibehavior.md (learning rates and schedules chosen on Beibei's validation split, early stopping on the
# validation NDCG@10), so that `mbrec-fast train --model M --data D` without other flags trains as the tables did
# (with 10 epochs at lr 1e-3 for every model, BPR-MF stayed near random on a new data set). The faithful MEMBER
# takes the official code's optimiser settings (Adam lr 5e-3, batch 1,024, weight decay 1e-7; its variant drops the
# L2 term) and the tables' 12 epochs (the official schedule is 100: --epochs 100).
TRAINING_DEFAULTS = {
    ("bpr", None): {"lr": 5e-3, "epochs": 30, "eval_every": 2, "patience": 3},
    ("mcbpr", None): {"lr": 5e-3, "epochs": 30, "eval_every": 2, "patience": 3},
    ("neumf", None): {"lr": 2e-3, "epochs": 20, "eval_every": 2, "patience": 3},
    ("lightgcn", None): {"lr": 5e-3, "epochs": 40, "eval_every": 2, "patience": 3},
    ("nmtr", None): {"lr": 5e-3, "epochs": 20, "eval_every": 2, "patience": 3},
    ("member", None): {"lr": 1e-2, "epochs": 12, "eval_every": 2, "patience": 2},
    ("member", "faithful"): {"lr": 5e-3, "batch_size": 1024, "weight_decay": 1e-7},
}
GENERIC_DEFAULTS = {"lr": 1e-3, "batch_size": 4096, "weight_decay": 0.0, "epochs": 10, "eval_every": 1, "patience": 5}
PROTOCOLS = ("full", "pool", "both")
# --ablation -> MEMBER constructor arguments
ABLATIONS = {"avg": {"gate": "avg"}, "single-expert": {"single_expert": True}}


# ------------------------------------------------------------------------------------------ parsing
def _training_defaults_text(key: str) -> str:
    """A training option's default and its per-model values, e.g. "4096; member faithful 1024"."""
    parts = [f"{GENERIC_DEFAULTS[key]:g}"]
    parts += [f"{model}{' ' + variant if variant else ''} {values[key]:g}"
              for (model, variant), values in TRAINING_DEFAULTS.items() if key in values]
    return "; ".join(parts)


def training_defaults(model: str, variant: Optional[str] = None) -> Dict[str, Any]:
    """The training options a run of `model` (and --variant) takes when left unset."""
    out = dict(GENERIC_DEFAULTS)
    out.update(TRAINING_DEFAULTS.get((model, None), {}))
    if variant is not None:
        out.update(TRAINING_DEFAULTS.get((model, variant), {}))
    return out


def _model_defaults_text(key: str) -> str:
    """The models' defaults of constructor argument `key`, read from their signatures, e.g. "1; NeuMF/NMTR 4"
    (the most common value first; None: the model's variant decides)."""
    classes = []
    for name in registry.model_names("multibehavior"):
        try:
            classes.append(registry.load_builder(name))
        except (ImportError, AttributeError):
            continue
    return model_defaults_text(classes, key)


def add_protocol_options(p: argparse.ArgumentParser) -> None:
    """--protocol, --pool-others and --pool-scores, shared by train and evaluate."""
    p.add_argument("--protocol", default="full",
                   help="evaluation: full (full ranking, overall / visited / unvisited targets), pool (the MEMBER "
                        "paper's per-pool settings) or both")
    p.add_argument("--pool-others", default="exclude", choices=["exclude", "zero"],
                   help="pool protocol: items outside the pool are removed (exclude) or kept with score 0 (zero, "
                        "the official MEMBER code)")
    p.add_argument("--pool-scores", default="model", choices=["model", "expert"],
                   help="pool protocol: rank each pool by the model's score, or by that pool's MEMBER expert alone")


def build_parser(prog: str = "mbrec-fast train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, formatter_class=HelpFormatter, description=(
        "Train a multi-behavior recommender (purchases helped by views, carts) and rank\n"
        "every item: HR/NDCG@K overall and on visited / unvisited held-out items."))
    p.add_argument("--model", choices=sorted(MODELS), help="the model (required)")
    p.add_argument("--data", default="beibei",
                   help="data set name under the data root, a folder in the canonical layout, a CSV/TSV/Parquet "
                        "table (user,item,behavior[,timestamp]), or synthetic:USERSxITEMS")
    p.add_argument("--behaviors", default=None, help="comma-separated cascade order for a table (weakest first)")
    p.add_argument("--valid", default="leave-one-out", choices=["leave-one-out", "none"],
                   help="validation split for early stopping: each user's last purchase, or none")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"training epochs (at most; default {_training_defaults_text('epochs')})")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"training pairs per step (default {_training_defaults_text('batch_size')})")
    p.add_argument("--lr", type=float, default=None, help=f"learning rate (default {_training_defaults_text('lr')})")
    p.add_argument("--weight-decay", type=float, default=None,
                   help=f"weight decay (default {_training_defaults_text('weight_decay')})")
    p.add_argument("--optimizer", default="adam", choices=["adam", "adagrad"],
                   help="adam, or adagrad (the NMTR paper's optimiser, lr 0.01 there)")
    p.add_argument("--emb-dim", "--dim", dest="dim", type=int, default=None, metavar="N",
                   help=f"embedding size (default {_model_defaults_text('dim')}; --dim is an alias)")
    p.add_argument("--neg-ratio", type=int, default=None,
                   help=f"negatives per positive (default {_model_defaults_text('neg_ratio')})")
    p.add_argument("--reg", type=float, default=None,
                   help=f"L2 on the embedding rows of a batch (default {_model_defaults_text('reg')})")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, batches and negatives")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--eval-every", type=int, default=None,
                   help=f"validate every N epochs (default {_training_defaults_text('eval_every')})")
    p.add_argument("--patience", type=int, default=None,
                   help="evaluations without improvement before stopping; 0 = never "
                        f"(default {_training_defaults_text('patience')})")
    p.add_argument("--monitor", default="ndcg@10", help="validation metric for early stopping and best.pt")
    add_run_dir(p, "out", "runs/<model>-<data>")
    add_resume(p)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--ks", type=int, nargs="+", default=[10, 20, 50, 100], help="cut-offs K of HR@K / NDCG@K")
    p.add_argument("--max-steps", type=int, default=None, help="stop (with a checkpoint) after this many steps")
    add_progress(p)
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra constructor argument of the model (VALUE parsed as JSON when it can be), repeatable")
    # model-specific shortcuts (also reachable through --model-arg)
    p.add_argument("--layers", type=int, default=None, help="LightGCN/MEMBER propagation layers; NMTR MLP tower depth")
    p.add_argument("--loss-weights", default=None, help="NMTR per-behavior loss weights, comma-separated")
    p.add_argument("--interaction", default=None, help="NMTR interaction function: gmf, mlp or neumf")
    p.add_argument("--variant", default=None, choices=["legacy", "faithful"],
                   help="MEMBER configuration: legacy (default) or faithful (the official code's choices)")
    p.add_argument("--ablation", default=None, choices=sorted(ABLATIONS),
                   help="MEMBER ablation: avg (the paper's 'w/ AVG', expert scores averaged) or single-expert")
    add_protocol_options(p)
    return p


def _model_kwargs(args) -> Dict[str, Any]:
    extra: Dict[str, Any] = {}
    for item in args.model_arg:
        if "=" not in item:
            raise SystemExit(f"--model-arg expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            extra[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            extra[key.replace("-", "_")] = value
    if args.layers is not None:
        extra.setdefault("mlp_layers" if args.model == "nmtr" else "n_layers", args.layers)
    if args.loss_weights is not None:
        extra.setdefault("loss_weights", [float(x) for x in args.loss_weights.split(",")])
    if args.interaction is not None:
        extra.setdefault("interaction", args.interaction)
    if getattr(args, "variant", None) is not None or getattr(args, "ablation", None) is not None:
        if args.model != "member":
            raise SystemExit(f"--variant and --ablation apply to --model member, not {args.model!r}")
        if args.variant is not None:
            extra.setdefault("variant", args.variant)
        for key, value in ABLATIONS.get(args.ablation, {}).items():
            extra.setdefault(key, value)
    return extra


def _fill_defaults(args) -> None:
    """Training defaults (lr, batch size, weight decay, epochs, validation cadence, patience) of the model for the
    options left at None; the model arguments stay None until the model is built (`_record_model_args`)."""
    for key, value in training_defaults(args.model, getattr(args, "variant", None)).items():
        if getattr(args, key) is None:
            setattr(args, key, value)


# ------------------------------------------------------------------------------------------ data / model
def load_data(spec: str, valid: str = "leave-one-out", seed: int = 0, behaviors: Optional[str] = None):
    """A `MultiBehaviorData` from a name, a folder, a table file or "synthetic:UxI"."""
    from ..data.multibehavior import from_table, load_dataset, synthetic_multibehavior
    if spec.startswith("synthetic:"):
        size = spec.split(":", 1)[1].lower().replace(",", "x")
        try:
            n_users, n_items = (int(x) for x in size.split("x"))
        except ValueError:
            raise SystemExit(f"--data synthetic:USERSxITEMS expected, got {spec!r}")
        return synthetic_multibehavior(n_users, n_items, valid=valid, seed=seed)
    if os.path.isfile(spec):
        order = behaviors.split(",") if behaviors else None
        return from_table(spec, order, valid=valid, seed=seed)
    return load_dataset(spec, valid=valid, seed=seed)


def build_model(name: str, data, *, dim: Optional[int] = None, reg: Optional[float] = None,
                neg_ratio: Optional[int] = None, **extra) -> nn.Module:
    """Constructs model `name` for `data` through its `from_data`; dim, reg and neg_ratio left at None take
    the model's defaults. An argument the model does not take exits naming it."""
    from ..models.base import check_model_kwargs
    entry = registry.resolve(name)
    try:
        cls = registry.load_builder(name)
    except (ImportError, AttributeError) as exc:
        raise SystemExit(f"model {name!r} is not available ({entry.builder if entry else name}: {exc})")
    kwargs = {k: v for k, v in dict(dim=dim, reg=reg, neg_ratio=neg_ratio).items() if v is not None}
    kwargs.update(extra)
    try:
        check_model_kwargs(cls, kwargs)
    except TypeError as exc:
        raise SystemExit(f"model {name!r}: {exc}")
    return cls.from_data(data, **kwargs)


def _record_model_args(args, model: nn.Module) -> None:
    """Fills the model arguments left at None with the values the model took (for the run's config)."""
    for key in MODEL_ARGS:
        if getattr(args, key, None) is None and hasattr(model, key):
            setattr(args, key, getattr(model, key))


class _LossModule(nn.Module):
    """Makes `model.loss(batch)` the forward of a module, so DistributedDataParallel can wrap it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.loss(batch)


def _shard_batch(batch: Dict[str, Any], rank: int, world_size: int) -> Dict[str, Any]:
    """This rank's part of a global batch: every tensor whose first dimension is the batch size is split."""
    if world_size == 1:
        return batch
    size = batch["users"].shape[0] if "users" in batch else next(v.shape[0] for v in batch.values() if torch.is_tensor(v))
    return {k: (v.tensor_split(world_size)[rank] if torch.is_tensor(v) and v.dim() and v.shape[0] == size else v)
            for k, v in batch.items()}


def _to_device(csr, device):
    return tuple(t.to(device) for t in csr)


def check_protocol(protocol: str, data=None) -> None:
    """ValueError naming --protocol for an unknown protocol, or a pool protocol on data without
    auxiliary behaviors (no visited pool exists there)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if protocol != "full" and data is not None and data.n_behaviors < 2:
        raise ValueError(f"--protocol {protocol}: the per-pool protocol needs auxiliary behaviors, and data set "
                         f"{data.name!r} has only {data.behavior_names}")


def evaluate_model(model: nn.Module, data, split: str, ks=(10, 20, 50, 100), device="cpu",
                   distributed: bool = False, protocol: str = "full", pool_others: str = "exclude",
                   pool_scores: str = "model", progress: bool = False) -> Dict[str, float]:
    """HR/NDCG@K on `split` (flat dict). protocol "full": full ranking, overall and on visited / unvisited
    held-out items; "pool": the MEMBER paper's per-pool settings (keys "visited_pool_hr@10", ...; see
    `mbrec_fast.models.member.evaluate_by_pool`); "both": both. progress: a bar (users ranked, users/s, time
    left) on stderr while ranking in full."""
    check_protocol(protocol, data)
    out: Dict[str, float] = {}
    ks = [k for k in ks if k <= data.n_items]
    if protocol in ("pool", "both"):
        from ..models.member import evaluate_by_pool
        out.update(evaluate_by_pool(model, data, split, ks, device, others=pool_others, scores=pool_scores,
                                    distributed=distributed))
    if protocol in ("full", "both"):
        out.update(_evaluate_full(model, data, split, ks, device, distributed, progress))
    return out


def _evaluate_full(model: nn.Module, data, split: str, ks, device, distributed: bool,
                   progress: bool = False) -> Dict[str, float]:
    from .._progress import ranking_progress
    from ..evaluator import evaluate_full_ranking
    targets, labels = data.split(split)
    scorer = model.scorer()
    users = data.eval_users(split)
    with ranking_progress(progress and is_main_process(), f"ranking {split}",
                          total=None if distributed else users.numel()) as callback:
        res = evaluate_full_ranking(**scorer.evaluator_kwargs(), exclude=_to_device(data.exclude(split), device),
                                    targets=_to_device(targets, device), ks=ks, metrics=("hr", "ndcg"),
                                    users=users.to(device), target_groups=labels.to(device),
                                    group_names=["unvisited", "visited"],
                                    process_group="default" if distributed else None, progress=callback)
    out = dict(res.metrics)
    out["users"] = float(res.n_users)
    for group in ("visited", "unvisited"):
        out.update({f"{group}_{k}": v for k, v in res.groups[group].items()})
        out[f"{group}_users"] = float(res.group_users[group])
    return out


# (label, key prefix) of the result rows: full ranking by target group, then the two pool settings
TARGET_ROWS = (("overall", ""), ("visited", "visited_"), ("unvisited", "unvisited_"),
               ("visited pool", "visited_pool_"), ("unvisited pool", "unvisited_pool_"))
GROUPS = TARGET_ROWS[:3]
POOL_ROWS = (("pool vis.", "visited_pool_"), ("pool unvis", "unvisited_pool_"))  # short labels for the table
VISITED_NOTE = "visited = the user had the held-out item in an auxiliary behavior in training"
POOL_NOTE = ("pool vis. / pool unvis = the MEMBER paper's per-pool settings\n"
             "(candidates: the user's visited / unvisited items)")


def ranking_table(rows: List[Any], ks, metrics=("hr", "ndcg")) -> str:
    """The one table layout of full-ranking results (the demo's two halves, train, evaluate): a row
    per target group (name, metrics dict "{m}@{k}", users), a column block per metric, one column per
    K; about 75 columns for four Ks. A group without users reads "no users" instead of 0."""
    width = 7
    label = {"hr": "HR", "ndcg": "NDCG", "recall": "Recall", "precision": "Precision", "mrr": "MRR"}
    blocks = [f"{label.get(m, m)}@K".center(width * len(ks)) for m in metrics]
    lines = [" " * 19 + "  ".join(blocks).rstrip(),
             f"{'targets':<10}{'users':>8} " + "  ".join("".join(f"{'@' + str(k):>{width}}" for k in ks)
                                                        for _ in metrics)]
    for name, values, n in rows:
        n = int(n or 0)
        head = f"{name:<10}{n:>8,} "
        if not n:
            lines.append(head + " no users")
            continue
        lines.append(head + "  ".join("".join(f"{values[f'{m}@{k}']:>{width}.4f}" for k in ks) for m in metrics))
    return "\n".join(lines)


def metrics_table(metrics: Dict[str, float], ks) -> str:
    """Rows overall / visited / unvisited (all three, in this order, when full ranking ran), then the two pool
    settings when the pool protocol ran; columns HR@K and NDCG@K."""
    full = "users" in metrics
    groups = (GROUPS if full else ()) + tuple(r for r in POOL_ROWS if f"{r[1]}users" in metrics)
    ks = [k for k in ks if any(f"{prefix}hr@{k}" in metrics for _, prefix in groups)]
    rows = [(group, {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)} if prefix else metrics,
             metrics.get(f"{prefix}users", 0)) for group, prefix in groups]
    return ranking_table(rows, ks)


def _timing_lines(timings: Dict[str, float], load_s: float, epochs: int) -> str:
    wall = timings.get("wall", 0.0)
    parts = [("load data", load_s), ("sampling / batches", timings.get("data", 0.0)),
             ("forward + backward + step", timings.get("step", 0.0)), ("evaluation", timings.get("eval", 0.0)),
             ("checkpoints", timings.get("checkpoint", 0.0))]
    other = max(wall - sum(v for _, v in parts[1:]), 0.0)
    parts.append(("other", other))
    total = wall + load_s
    lines = [f"where the time went ({epochs} epoch{'s' if epochs != 1 else ''}, {total:.1f}s in all, "
             f"{torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''}):"]
    lines += [f"  {name:<27}{v:8.2f}s  {100 * v / max(total, 1e-9):5.1f}%" for name, v in parts]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ entry points
def train_main(argv: Optional[List[str]] = None) -> int:
    argv_used = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.model is None:
        parser.error(f"--model is required (one of {', '.join(sorted(MODELS))})")
    _fill_defaults(args)
    check_cli_args(args)
    check_protocol(args.protocol)
    monitors = [f"{m}@{k}" for k in args.ks for m in METRICS]
    if args.monitor not in monitors:
        raise ValueError(f"--monitor {args.monitor!r} is not a validation metric; choose one of {monitors}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    distributed = init_distributed(args.device)
    rank, world_size = world()
    if distributed and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    seed_everything(args.seed)

    t0 = time.perf_counter()
    data = load_data(args.data, valid=args.valid, seed=args.seed, behaviors=args.behaviors)
    load_s = time.perf_counter() - t0
    log(textwrap.fill(data.summary() + f" (loaded in {load_s:.1f}s)", 79, subsequent_indent="  "))
    check_protocol(args.protocol, data)

    seed_everything(args.seed)
    model = build_model(args.model, data, dim=args.dim, reg=args.reg, neg_ratio=args.neg_ratio,
                        **_model_kwargs(args)).to(device)
    _record_model_args(args, model)
    model.name = args.model
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if args.protocol != "full" and args.pool_scores == "expert" and not hasattr(model, "expert_scorer"):
        raise SystemExit(f"--pool-scores expert: model {args.model!r} has no experts (only member has)")
    # one Adam over every parameter equals MEMBER's official two Adams (one per expert): Adam keeps
    # per-parameter state and skips the parameters a step leaves without gradient (zero_grad(set_to_none))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.Adagrad(trainable, lr=args.lr, weight_decay=args.weight_decay) if args.optimizer == "adagrad"
           else make_adam(trainable, lr=args.lr, weight_decay=args.weight_decay))
    forward: nn.Module = _LossModule(model)
    if distributed:
        forward = nn.parallel.DistributedDataParallel(
            forward, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=bool(getattr(model, "ddp_find_unused_parameters", False)))
    log(f"{args.model}: {n_params:,} parameters, device {device}, world size {world_size}")

    def step(batch):
        batch = _shard_batch(batch, rank, world_size)
        opt.zero_grad(set_to_none=True)
        loss, parts = forward(batch)
        loss.backward()
        opt.step()
        return parts

    has_valid = data.valid is not None

    show_progress = progress_enabled(False if args.no_progress else None)

    def evaluate(split):
        if split == "valid" and not has_valid:
            return None
        # the early-stopping monitor is a full-ranking metric: validation always includes full ranking
        protocol = "full" if split == "valid" and args.protocol == "pool" else args.protocol
        return evaluate_model(model, data, split, args.ks, device, distributed, protocol=protocol,
                              pool_others=args.pool_others, pool_scores=args.pool_scores, progress=show_progress)

    run_dir = args.out or os.path.join("runs", f"{args.model}-{os.path.basename(str(args.data).rstrip('/'))}")
    resume = resolve_resume(args.resume, run_dir, log)
    config = {k: v for k, v in vars(args).items() if k not in ("resume", "max_steps")}
    trainer = Trainer(model, {"main": opt}, run_dir, epochs=args.epochs, eval_every=args.eval_every,
                      patience=args.patience or None, monitor=args.monitor, model_name=args.model, config=config,
                      progress=show_progress, max_steps=args.max_steps)
    result = trainer.fit(batches=lambda epoch: model.training_batches(data, epoch, args.batch_size, args.seed),
                         step=step, evaluate=evaluate,
                         on_epoch_start=lambda epoch: model.on_epoch_start(data, epoch, args.seed), resume=resume)
    if result.interrupted:
        log(f"continue with: {resume_command(argv_used, run_dir)}")
        return 0
    if is_main_process():
        path = os.path.join(run_dir, "metrics.json")
        summary = json.load(open(path))
        summary.update({"dataset": data.name, "n_params": n_params, "load_s": load_s, "world_size": world_size,
                        "command": "mbrec-fast train " + " ".join(argv_used)})
        with open(path, "w") as f:
            json.dump(summary, f, indent=1, default=float)
    if result.best_epoch is not None:
        log(f"best validation {args.monitor} = {result.best_valid[args.monitor]:.4f} at epoch {result.best_epoch}")
    log(f"test ({data.name}, protocol {args.protocol}, {data.n_items:,} items):")
    log(metrics_table(result.test, args.ks))
    log(VISITED_NOTE)
    if args.protocol != "full":
        log(POOL_NOTE)
    log(_timing_lines(result.timings, load_s, result.epochs_run))
    log(f"outputs in {run_dir}:\n  metrics.json, history.json, curves.png, checkpoint.pt" +
        (", best.pt" if result.best_epoch is not None else ""))
    return 0


def build_evaluate_parser(prog: str = "mbrec-fast evaluate") -> argparse.ArgumentParser:
    def options(p):
        p.add_argument("--data", default=None, help="data set (default: the one the model was trained on)")
        p.add_argument("--split", default="test", choices=["test", "valid"], help="held-out split to rank")
        p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
        p.add_argument("--ks", type=int, nargs="+", default=None, help="cut-offs K (default: the training run's)")
        add_protocol_options(p)
    return evaluate_parser("Full-ranking and per-pool evaluation of a multi-behavior checkpoint (best.pt or "
                           "checkpoint.pt).",
                           options, output_dest="json", prog=prog)


def evaluate_main(argv: Optional[List[str]] = None) -> int:
    args = parse_evaluate_args(build_evaluate_parser(), argv)
    check_protocol(args.protocol)
    ckpt = load_checkpoint(args.checkpoint)
    cfg = dict(ckpt.get("config") or {})
    name = ckpt["model_name"]
    if name not in MODELS:
        raise SystemExit(f"{args.checkpoint}: model {name!r} is not a multi-behavior model")
    cfg.setdefault("model", name)
    train_args = build_parser().parse_args(["--model", name])
    for key, value in cfg.items():
        setattr(train_args, key, value)
    _fill_defaults(train_args)
    data_spec = args.data or cfg.get("data", "beibei")
    t0 = time.perf_counter()
    data = load_data(data_spec, valid=cfg.get("valid", "leave-one-out"), seed=cfg.get("seed", 0),
                     behaviors=cfg.get("behaviors"))
    load_s = time.perf_counter() - t0
    model = build_model(name, data, dim=train_args.dim, reg=train_args.reg, neg_ratio=train_args.neg_ratio,
                        **_model_kwargs(train_args))
    model.load_state_dict(ckpt["model"])
    device = torch.device(args.device)
    model.to(device).eval()
    ks = args.ks or cfg.get("ks") or [10, 20, 50, 100]
    t0 = time.perf_counter()
    with torch.no_grad():
        metrics = evaluate_model(model, data, args.split, ks, device, protocol=args.protocol,
                                 pool_others=args.pool_others, pool_scores=args.pool_scores,
                                 progress=progress_enabled(False if args.no_progress else None))
    eval_s = time.perf_counter() - t0
    print(f"{name} on {data.name} ({args.split}, protocol {args.protocol}, {data.n_items:,} items; "
          f"data {load_s:.1f}s, evaluation {eval_s:.1f}s)")
    print(metrics_table(metrics, ks))
    print(VISITED_NOTE)
    if args.protocol != "full":
        print(POOL_NOTE)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": name, "split": args.split, "protocol": args.protocol, "pool_others": args.pool_others,
                       "pool_scores": args.pool_scores, "metrics": metrics, "eval_s": eval_s}, f, indent=1)
    return 0


def variant_label(cfg: Dict[str, Any]) -> str:
    """Short description of a run's configuration beyond the model name (e.g. "faithful, ablation=avg")."""
    parts: List[str] = []
    if cfg.get("model") == "member":
        parts.append(cfg.get("variant") or "legacy")
    if cfg.get("ablation"):
        parts.append(f"ablation={cfg['ablation']}")
    parts += [f"{k}={cfg[k]}" for k in ("interaction", "layers", "loss_weights") if cfg.get(k) is not None]
    if cfg.get("optimizer", "adam") != "adam":
        parts.append(f"optimizer={cfg['optimizer']}")
    parts += list(cfg.get("model_arg") or [])
    return ", ".join(parts)


def result_rows(run_dir: str) -> List[Dict[str, Any]]:
    """The rows of docs/results/multibehavior.json for one finished run: one per (protocol, targets) with its
    test metrics. Pool rows say how other-pool items were treated ("pool_others"); a `pool_zero.json`
    written by `mbrec-fast evaluate --protocol pool --pool-others zero --json` adds the official variant, a
    `pool_expert.json` (`--pool-scores expert`) rows with each pool ranked by its expert alone ("pool_scores":
    "expert"; the other rows rank by the model's own score)."""
    s = json.load(open(os.path.join(run_dir, "metrics.json")))
    cfg = s.get("config") or {}
    common = {"model": s.get("model"), "variant": variant_label(cfg), "data": s.get("dataset"),
              "seed": cfg.get("seed"), "epochs": s.get("epochs_run"), "max_epochs": cfg.get("epochs"),
              "command": s.get("command"),
              "best_epoch": s.get("best_epoch"),
              "selection": "best validation epoch" if s.get("best_epoch") else "last epoch (no validation)",
              "wall_s": round(s["timings_s"]["wall"] + s.get("load_s", 0.0), 1)}
    sources = [(s.get("test") or {}, cfg.get("pool_others", "exclude"), cfg.get("pool_scores", "model"))]
    for name, others, scores in (("pool_zero.json", "zero", "model"), ("pool_expert.json", "exclude", "expert")):
        path = os.path.join(run_dir, name)
        if os.path.isfile(path):
            extra = json.load(open(path))
            sources.append((extra["metrics"], extra.get("pool_others", others), extra.get("pool_scores", scores)))
    rows = []
    for k, (metrics, others, scores) in enumerate(sources):
        for label, prefix in TARGET_ROWS:
            pool = "pool" in label
            if k > 0 and not pool or not metrics.get(f"{prefix}users"):
                continue
            values = {key[len(prefix):]: round(float(v), 6) for key, v in metrics.items()
                      if key.startswith(prefix) and "@" in key[len(prefix):] and not key[len(prefix):].startswith(("visited", "unvisited"))}
            row = dict(common, protocol="pool" if pool else "full", targets=label.split()[0],
                       users=int(metrics[f"{prefix}users"]), metrics=values)
            if pool:
                row["pool_others"] = others
                if scores != "model":
                    row["pool_scores"] = scores
            rows.append(row)
    return rows


def write_result_rows(run_dirs: List[str], json_path: str) -> int:
    """Adds (or replaces, same model / variant / data / seed / protocol / targets / pool_others / schedule: epoch cap
    and model selection) the rows of finished runs in `json_path`; returns the number of rows written. A run of
    another schedule (100 epochs against 12, a validation split against none) adds rows beside the others."""
    rows = json.load(open(json_path)) if os.path.isfile(json_path) else []
    key = lambda r: (r["model"], r["variant"], r["data"], r["seed"], r["protocol"], r["targets"], r.get("pool_others"),
                     r.get("pool_scores"), r.get("max_epochs"), r.get("selection"))
    new = [r for d in run_dirs if os.path.isfile(os.path.join(d, "metrics.json")) for r in result_rows(d)]
    keys = {key(r) for r in new}
    rows = [r for r in rows if key(r) not in keys] + new
    rows.sort(key=lambda r: (r["data"], r["model"], r["variant"], r["seed"], r["protocol"], r.get("pool_others") or "",
                             r.get("pool_scores") or "", ["overall", "visited", "unvisited"].index(r["targets"])))
    os.makedirs(os.path.dirname(json_path) or ".", exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(rows, f, indent=1)
    return len(new)


def summary_markdown(json_path: str, data: Optional[str] = None, ks=(10, 20, 50, 100)) -> str:
    """Markdown table of docs/results/multibehavior.json: one line per (model, variant, protocol, targets,
    pool_others), mean ± std over the seeds present (std shown from 2 seeds up), with the seed count."""
    import statistics
    rows = [r for r in json.load(open(json_path)) if data is None or r["data"] == data]
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in rows:
        # one group per schedule (epoch cap), so seeds stopped early at different epochs stay together
        groups.setdefault((r["data"], r["model"], r["variant"], r["protocol"], r.get("pool_others") or "",
                           r.get("pool_scores") or "", r["targets"], r.get("max_epochs") or r["epochs"],
                           r.get("selection") or ""), []).append(r)
    header = ["model", "data", "protocol", "targets"] + [f"{m}@{k}" for k in ks for m in ("HR", "NDCG")] + \
             ["seeds", "epochs", "selection", "wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    order = {"overall": 0, "visited": 1, "unvisited": 2}
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2], k[3], k[4], k[5], order[k[6]])):
        data_name, model, variant, protocol, others, scores, targets, _, selection = key
        runs = groups[key]
        best = sorted({r.get("best_epoch") for r in runs if r.get("best_epoch")})
        cells = []
        for k in ks:
            for m in ("hr", "ndcg"):
                vals = [r["metrics"].get(f"{m}@{k}") for r in runs if f"{m}@{k}" in r["metrics"]]
                if not vals:
                    cells.append("")
                elif len(vals) == 1:
                    cells.append(f"{vals[0]:.4f}")
                else:
                    cells.append(f"{statistics.mean(vals):.4f} ± {statistics.stdev(vals):.4f}")
        label = model + (f" ({variant})" if variant else "")
        proto = protocol + (f" (others {others}" + (f", {scores} scores" if scores else "") + ")" if others else "")
        wall = statistics.mean(r["wall_s"] for r in runs)
        lines.append("| " + " | ".join([label, data_name, proto, f"{targets} ({runs[0]['users']})"] + cells
                                        + [str(len(runs)), ", ".join(map(str, sorted({r["epochs"] for r in runs})))
                                           + (f" (best {', '.join(map(str, best))})"
                                              if best and selection.startswith("best") else ""),
                                           selection, f"{wall:.0f}"]) + " |")
    return "\n".join(lines)


def results_markdown(run_dirs: List[str], ks=(10, 20, 50, 100)) -> str:
    """A markdown results table (one row per run and target group) from runs' metrics.json files."""
    header = ["model", "data", "targets"] + [f"{m}@{k}" for k in ks for m in ("HR", "NDCG")] + ["epochs", "wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for d in run_dirs:
        path = os.path.join(d, "metrics.json")
        if not os.path.isfile(path):
            continue
        s = json.load(open(path))
        test = s.get("test") or {}
        cfg = s.get("config") or {}
        variant = variant_label(cfg)
        label = str(s.get("model")) + (f" ({variant})" if variant else "")
        for group, prefix in TARGET_ROWS:
            if not test.get(f"{prefix}users"):
                continue
            vals = [f"{test.get(f'{prefix}{m}@{k}', float('nan')):.4f}" for k in ks for m in ("hr", "ndcg")]
            best = s.get("best_epoch")
            epochs = f"{s.get('epochs_run')}" + (f" (best {best})" if best else "")
            lines.append("| " + " | ".join([label, str(s.get("dataset", "")), f"{group} ({int(test[f'{prefix}users'])})"]
                                            + vals + [epochs, f"{s['timings_s']['wall'] + s.get('load_s', 0):.0f}"]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m mbrec_fast.training.multibehavior table|rows ...
    if len(sys.argv) > 1 and sys.argv[1] == "table":
        print(results_markdown(sys.argv[2:]))
    elif len(sys.argv) > 2 and sys.argv[1] == "rows":   # rows JSON_PATH RUN_DIR...
        print(f"{write_result_rows(sys.argv[3:], sys.argv[2])} rows written to {sys.argv[2]}")
    elif len(sys.argv) > 2 and sys.argv[1] == "summary":  # summary JSON_PATH [DATA] [--ks K ...]
        rest = sys.argv[3:]
        ks = tuple(int(k) for k in rest[rest.index("--ks") + 1:]) if "--ks" in rest else (10, 20, 50, 100)
        rest = rest[:rest.index("--ks")] if "--ks" in rest else rest
        print(summary_markdown(sys.argv[2], rest[0] if rest else None, ks=ks))
    else:
        raise SystemExit(train_main(sys.argv[1:]))
