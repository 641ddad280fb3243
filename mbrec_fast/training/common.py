"""The training loop shared by every model family: progress, timing, validation with early stopping,
checkpoints that resume bit-exactly, and the JSON/PNG outputs of a run.

The loop owns no model logic: callers pass `batches(epoch)` (a deterministic function of the seed
and epoch), `step(batch)` (forward, backward and optimizer steps; returns floats to log) and
`evaluate(split)` (returns metrics). That keeps multi-optimizer schemes such as M3oE's bi-level
update inside the model family's own step.
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state

__all__ = ["seed_everything", "Trainer", "FitResult", "init_distributed", "is_main_process", "world",
           "unwrap", "log", "format_table", "check_cli_args"]


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy and torch (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_adam(params, lr: float, weight_decay: float = 0.0) -> torch.optim.Adam:
    """Adam as every family trains with it: torch's fused implementation (one pass over each parameter's value,
    gradient and moments; 5.8x the default for-loop Adam on a 2 M-parameter model on one CPU thread), the default one
    where this torch or device has no fused Adam. Element-wise, so the same bits on any thread count."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


# ---------------------------------------------------------------- distributed
def init_distributed(device: str = "cpu") -> bool:
    """Joins the process group torchrun describes (gloo on CPU, nccl on CUDA). False when not under torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return True


def world() -> tuple:
    """(rank, world_size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return world()[0] == 0


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return model.module if hasattr(model, "module") and isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def log(message: str) -> None:
    """Prints on the main process only."""
    if is_main_process():
        print(message, flush=True)


def format_table(rows: List[Dict[str, Any]], columns: Optional[List[str]] = None, floatfmt: str = "{:.4f}") -> str:
    """A plain-text table of dict rows (used for the metric tables the CLIs print)."""
    if not rows:
        return ""
    columns = columns or list(rows[0].keys())
    cells = [[floatfmt.format(r.get(c)) if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


# ---------------------------------------------------------------- command-line arguments
_POSITIVE_INT_ARGS = ("epochs", "batch_size", "eval_every", "dim", "emb_dim", "expert_dim", "n_experts", "num_neg",
                      "eval_neg", "max_len", "heads", "layers", "threads", "max_steps", "neg_ratio", "n_single",
                      "n_cross", "synthetic_samples", "syn_users", "syn_domains", "syn_items", "seeds")
_NON_NEGATIVE_ARGS = ("weight_decay", "patience", "seed", "data_seed", "reg", "mi_weight", "bilevel_every", "n_shared")
_POSITIVE_FLOAT_ARGS = ("lr", "fusion_lr", "temperature")
_UNIT_INTERVAL_ARGS = ("dropout", "cold_prob", "momentum", "smoothing")


def check_cli_args(args) -> None:
    """Rejects impossible values of the flags the training CLIs share (ValueError naming the flag), before
    any data is loaded: `--epochs 0` or `--lr -1` would otherwise fail late or train nothing silently."""
    def bad(name, value, rule):
        raise ValueError(f"--{name.replace('_', '-')} must be {rule}, got {value!r}")

    for name in _POSITIVE_INT_ARGS:
        v = getattr(args, name, None)
        if v is not None and v < 1:
            bad(name, v, ">= 1")
    for name in _NON_NEGATIVE_ARGS:
        v = getattr(args, name, None)
        if v is not None and not (math.isfinite(v) and v >= 0):
            bad(name, v, ">= 0")
    for name in _POSITIVE_FLOAT_ARGS:
        v = getattr(args, name, None)
        if v is not None and not (math.isfinite(v) and v > 0):
            bad(name, v, "a finite number > 0")
    for name in _UNIT_INTERVAL_ARGS:
        v = getattr(args, name, None)
        if v is not None and not 0 <= v <= 1:
            bad(name, v, "in [0, 1]")
    ks = getattr(args, "ks", None)
    if ks is not None and (not ks or min(ks) < 1):
        bad("ks", ks, "one or more cut-offs >= 1")


# ---------------------------------------------------------------- trainer
@dataclass
class FitResult:
    best_epoch: Optional[int]
    best_valid: Optional[Dict[str, float]]
    test: Optional[Dict[str, float]]
    epochs_run: int
    history: List[Dict[str, Any]]
    timings: Dict[str, float]
    interrupted: bool = False
    run_dir: Optional[str] = None


# Arguments that may differ between a run and its resumption: they change where or how fast it runs, not
# the numbers it computes. Every other recorded argument defines the schedule and must match.
RESUME_FREE_ARGS = frozenset({"resume", "max_steps", "device", "threads", "no_progress", "progress", "out",
                              "run_dir", "debug"})


class _EvalInterrupted(Exception):
    """Raised by the signal handler when SIGINT/SIGTERM arrives during a validation pass."""


def _plain(value):
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _extends_epochs(key: str, saved, current) -> bool:
    """More epochs than the checkpoint's run extends its schedule rather than changing it: batches are a function
    of (seed, epoch) and no learning-rate schedule depends on the total, so 12 epochs resumed to 100 train exactly
    what one 100-epoch run trains. Fewer epochs would end a run before its checkpoint and stay refused."""
    return key == "epochs" and isinstance(saved, int) and isinstance(current, int) and current >= saved


def check_resume_config(path: str, saved: Dict[str, Any], current: Dict[str, Any]) -> None:
    """Refuses to resume when a schedule-defining argument differs from the checkpoint's (ValueError naming
    the flags): batches are a function of (seed, epoch, batch size, ...), so a changed one would silently
    train another schedule."""
    changed = [k for k in sorted(set(saved) & set(current))
               if k not in RESUME_FREE_ARGS and _plain(saved[k]) != _plain(current[k])
               and not _extends_epochs(k, saved[k], current[k])]
    if changed:
        diffs = "; ".join(f"--{k.replace('_', '-')} is {current[k]!r} here but {saved[k]!r} in the checkpoint"
                          for k in changed)
        raise ValueError(f"resume: {path} was written with other arguments: {diffs}. Resume with the checkpoint's "
                         f"values or start a fresh run")


@dataclass
class _State:
    epoch: int = 0                 # epoch in progress (or next to start)
    step_in_epoch: int = 0         # batches of `epoch` already consumed
    global_step: int = 0
    history: List[Dict[str, Any]] = field(default_factory=list)
    best_metric: Optional[float] = None
    best_epoch: Optional[int] = None
    best_valid: Optional[Dict[str, float]] = None
    bad_evals: int = 0
    timings: Dict[str, float] = field(default_factory=lambda: {"data": 0.0, "step": 0.0, "eval": 0.0, "checkpoint": 0.0})
    epoch_sums: Dict[str, float] = field(default_factory=dict)


class Trainer:
    """Runs `epochs` epochs with validation, early stopping and checkpoints in `run_dir`.

    Files written (main process only): `checkpoint.pt` (resume state, every epoch and on
    interruption), `best.pt` (best weights by `monitor`), `history.json`, `metrics.json`,
    `curves.png`. Patience counts validations without improvement, except while a top-K monitor is still 0
    (`_no_signal_yet`). `max_steps` stops (and checkpoints) after that many optimizer steps in this
    call, which is how the tests simulate an interruption.
    """

    def __init__(self, model: torch.nn.Module, optimizers: Dict[str, torch.optim.Optimizer], run_dir: str, *,
                 epochs: int, eval_every: int = 1, patience: Optional[int] = None, monitor: str = "ndcg@10",
                 mode: str = "max", model_name: str = "model", config: Optional[Dict[str, Any]] = None,
                 progress: Optional[bool] = None, max_steps: Optional[int] = None,
                 extra_state: Optional[Callable[[], Dict[str, Any]]] = None,
                 load_extra_state: Optional[Callable[[Dict[str, Any]], None]] = None):
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        if eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {eval_every}")
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.model, self.optimizers, self.run_dir = model, optimizers, run_dir
        self.epochs, self.eval_every, self.patience = epochs, eval_every, patience
        self.monitor, self.mode, self.model_name = monitor, mode, model_name
        self.config = dict(config or {})
        self.progress = sys.stderr.isatty() and os.environ.get("MBREC_FAST_PROGRESS", "1") != "0" if progress is None else progress
        self.max_steps = max_steps
        self.extra_state, self.load_extra_state = extra_state, load_extra_state
        self.state = _State()
        self._stop_signal: Optional[int] = None
        self._validating = False

    # ------------------------------------------------------------ paths
    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.run_dir, "checkpoint.pt")

    @property
    def best_path(self) -> str:
        return os.path.join(self.run_dir, "best.pt")

    # ------------------------------------------------------------ checkpoint
    def _payload(self) -> Dict[str, Any]:
        s = self.state
        payload = {
            "model_name": self.model_name, "config": self.config,
            "model": unwrap(self.model).state_dict(),
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "epoch": s.epoch, "step_in_epoch": s.step_in_epoch, "global_step": s.global_step,
            "history": s.history, "best_metric": s.best_metric, "best_epoch": s.best_epoch,
            "best_valid": s.best_valid, "bad_evals": s.bad_evals, "timings": s.timings,
            "epoch_sums": s.epoch_sums, "rng": rng_state(),
        }
        if self.extra_state is not None:
            payload["extra"] = self.extra_state()
        return payload

    def save(self) -> None:
        if not is_main_process():
            return
        t0 = time.perf_counter()
        save_checkpoint(self.checkpoint_path, self._payload())
        self.state.timings["checkpoint"] += time.perf_counter() - t0

    def _restore(self, path: str) -> Dict[str, Any]:
        ckpt = load_checkpoint(path)
        if ckpt.get("model_name") != self.model_name:
            raise ValueError(f"resume: checkpoint {path} is for model {ckpt.get('model_name')!r}, not {self.model_name!r}")
        check_resume_config(path, ckpt.get("config") or {}, self.config)
        unwrap(self.model).load_state_dict(ckpt["model"])
        for k, opt in self.optimizers.items():
            opt.load_state_dict(ckpt["optimizers"][k])
        s = self.state
        s.epoch, s.step_in_epoch, s.global_step = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]
        s.history, s.best_metric, s.best_epoch = ckpt["history"], ckpt["best_metric"], ckpt["best_epoch"]
        s.best_valid, s.bad_evals, s.timings = ckpt["best_valid"], ckpt["bad_evals"], ckpt["timings"]
        s.epoch_sums = ckpt["epoch_sums"]
        if self.load_extra_state is not None and "extra" in ckpt:
            self.load_extra_state(ckpt["extra"])
        return ckpt

    # ------------------------------------------------------------ signals
    def _on_signal(self, signum, _frame):
        self._stop_signal = signum
        if self._validating:  # do not wait for a long validation pass: abandon it, checkpoint, stop
            self._validating = False
            raise _EvalInterrupted(signum)

    def _install_signals(self):
        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not in the main thread
                pass
        return previous

    # ------------------------------------------------------------ evaluation bookkeeping
    def _no_signal_yet(self) -> bool:
        """True while a top-K monitor (hr@K, ndcg@K, recall@K, mrr@K, precision@K) has stayed at 0: no validation
        target has reached any user's top K yet, so there is nothing to select and patience does not count (on Retail
        Rocket, 885 validation users, BPR-MF's default run stopped at epoch 8 with NDCG@10 0 and its loss still
        falling). `epochs` bounds such a run."""
        top_k = self.monitor.split("@")[0] in ("hr", "ndcg", "recall", "mrr", "precision")
        return top_k and self.mode == "max" and self.state.best_metric == 0.0

    def _improved(self, value: float) -> bool:
        best = self.state.best_metric
        if best is None:
            return True
        return value > best if self.mode == "max" else value < best

    def _evaluate(self, evaluate: Callable[[str], Optional[Dict[str, float]]], split: str) -> Optional[Dict[str, float]]:
        t0 = time.perf_counter()
        self.model.eval()
        with torch.no_grad():
            metrics = evaluate(split)
        self.model.train()
        self.state.timings["eval"] += time.perf_counter() - t0
        return metrics

    # ------------------------------------------------------------ main loop
    def fit(self, batches: Callable[[int], Iterable[Any]], step: Callable[[Any], Dict[str, float]],
            evaluate: Optional[Callable[[str], Optional[Dict[str, float]]]] = None,
            on_epoch_start: Optional[Callable[[int], None]] = None, resume: Optional[str] = None) -> FitResult:
        """Trains; returns the best validation metrics and the test metrics of the best weights."""
        wall0 = time.perf_counter()
        saved_rng = None
        if resume:
            saved_rng = self._restore(resume)["rng"]
            log(f"resumed from {resume} at epoch {self.state.epoch + 1}, step {self.state.step_in_epoch}")
        if is_main_process():
            os.makedirs(self.run_dir, exist_ok=True)
        previous_handlers = self._install_signals()
        steps_this_call = 0
        interrupted = False
        s = self.state
        self.model.train()
        try:
            while s.epoch < self.epochs and not interrupted:
                # A checkpoint taken at an epoch boundary precedes on_epoch_start; one taken mid-epoch
                # follows it and the consumed batches. Put the global RNG back at the matching point.
                if saved_rng is not None and s.step_in_epoch == 0:
                    set_rng_state(saved_rng)
                    saved_rng = None
                if on_epoch_start is not None:
                    on_epoch_start(s.epoch)
                epoch_batches = batches(s.epoch)
                total = len(epoch_batches) if hasattr(epoch_batches, "__len__") else None
                iterator = iter(epoch_batches)
                # Batches are a function of (seed, epoch): skip those a previous run consumed.
                for consumed in range(s.step_in_epoch):
                    if next(iterator, _State) is _State:  # the class is a sentinel no batch can be
                        raise ValueError(f"resume: epoch {s.epoch + 1} has only {consumed} batches but the checkpoint "
                                         f"consumed {s.step_in_epoch}; were the data or the batch size changed?")
                if saved_rng is not None:
                    set_rng_state(saved_rng)
                    saved_rng = None
                if s.step_in_epoch == 0:
                    s.epoch_sums = {}
                bar = None
                if self.progress and is_main_process():
                    from tqdm.auto import tqdm
                    bar = tqdm(total=total, initial=s.step_in_epoch, desc=f"epoch {s.epoch + 1}/{self.epochs}", leave=False)
                while True:
                    t0 = time.perf_counter()
                    try:
                        batch = next(iterator)
                    except StopIteration:
                        break
                    t1 = time.perf_counter()
                    logs = step(batch)
                    t2 = time.perf_counter()
                    s.timings["data"] += t1 - t0
                    s.timings["step"] += t2 - t1
                    for k, v in (logs or {}).items():
                        s.epoch_sums[k] = s.epoch_sums.get(k, 0.0) + float(v)
                    s.epoch_sums["_n"] = s.epoch_sums.get("_n", 0.0) + 1
                    s.step_in_epoch += 1
                    s.global_step += 1
                    steps_this_call += 1
                    if bar is not None:
                        bar.update(1)
                        if "loss" in (logs or {}):
                            bar.set_postfix(loss=f"{float(logs['loss']):.4f}")
                    if self._stop_signal is not None or (self.max_steps is not None and steps_this_call >= self.max_steps):
                        interrupted = True
                        break
                if bar is not None:
                    bar.close()
                if interrupted:
                    self.save()
                    reason = f"signal {self._stop_signal}" if self._stop_signal is not None else f"max_steps={self.max_steps}"
                    log(f"stopped ({reason}) at epoch {s.epoch + 1}, step {s.step_in_epoch}; checkpoint {self.checkpoint_path}")
                    break
                try:
                    self._end_epoch(evaluate)
                except _EvalInterrupted:
                    # the epoch's batches are done, its validation is not: resume re-runs the validation
                    interrupted = True
                    self.model.train()
                    self.save()
                    log(f"stopped (signal {self._stop_signal}) during validation of epoch {s.epoch + 1}; "
                        f"checkpoint {self.checkpoint_path}")
                    break
                s.epoch += 1
                s.step_in_epoch = 0
                self.save()
                if self.patience is not None and s.bad_evals >= self.patience:
                    log(f"early stop: no improvement of {self.monitor} in {s.bad_evals} evaluations")
                    break
        finally:
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)

        test = None
        if not interrupted:
            if s.best_epoch is not None:
                if dist.is_available() and dist.is_initialized():
                    dist.barrier()  # the main process wrote best.pt
                unwrap(self.model).load_state_dict(load_checkpoint(self.best_path)["model"])
            if evaluate is not None:
                test = self._evaluate(evaluate, "test")
        result = FitResult(best_epoch=s.best_epoch, best_valid=s.best_valid, test=test, epochs_run=s.epoch,
                           history=s.history, timings=dict(s.timings, wall=time.perf_counter() - wall0),
                           interrupted=interrupted, run_dir=self.run_dir)
        if not interrupted:
            self._write_outputs(result)
        return result

    def _end_epoch(self, evaluate) -> None:
        s = self.state
        n = max(s.epoch_sums.get("_n", 0.0), 1.0)
        row: Dict[str, Any] = {"epoch": s.epoch + 1, "steps": int(s.epoch_sums.get("_n", 0))}
        row.update({f"train_{k}": v / n for k, v in s.epoch_sums.items() if k != "_n"})
        # every eval_every epochs, and always after the last one (so that the schedule's end is a candidate)
        if evaluate is not None and ((s.epoch + 1) % self.eval_every == 0 or s.epoch + 1 == self.epochs):
            self._validating = True
            try:
                metrics = self._evaluate(evaluate, "valid")
            finally:
                self._validating = False
            if metrics and self.monitor not in metrics:
                raise ValueError(f"monitor (--monitor) {self.monitor!r} is not a validation metric of this run; "
                                 f"choose one of {sorted(metrics)}")
            if metrics:
                row.update({f"valid_{k}": v for k, v in metrics.items()})
                value = metrics.get(self.monitor)
                if value is not None and not math.isnan(value):
                    if self._improved(value):
                        s.best_metric, s.best_epoch, s.best_valid, s.bad_evals = value, s.epoch + 1, dict(metrics), 0
                        if is_main_process():
                            save_checkpoint(self.best_path, {"model_name": self.model_name, "config": self.config,
                                                             "model": copy.deepcopy(unwrap(self.model).state_dict()),
                                                             "epoch": s.epoch + 1, "valid": dict(metrics)})
                    elif not self._no_signal_yet():
                        s.bad_evals += 1
        s.history.append(row)
        shown = {k: v for k, v in row.items() if k in ("train_loss", f"valid_{self.monitor}")}
        log(f"epoch {s.epoch + 1}/{self.epochs}: " + ", ".join(f"{k}={v:.4f}" for k, v in shown.items()))

    # ------------------------------------------------------------ outputs
    def _write_outputs(self, result: FitResult) -> None:
        if not is_main_process():
            return
        with open(os.path.join(self.run_dir, "history.json"), "w") as f:
            json.dump(result.history, f, indent=1)
        summary = {"model": self.model_name, "config": self.config, "epochs_run": result.epochs_run,
                   "best_epoch": result.best_epoch, "valid": result.best_valid, "test": result.test,
                   "timings_s": result.timings}
        with open(os.path.join(self.run_dir, "metrics.json"), "w") as f:
            json.dump(summary, f, indent=1, default=float)
        data = self.config.get("data")
        plot_curves(result.history, os.path.join(self.run_dir, "curves.png"), monitor=self.monitor,
                    title=self.model_name + (f" on {os.path.basename(str(data).rstrip('/'))}" if data else ""))


def plot_curves(history: List[Dict[str, Any]], path: str, monitor: str, title: str = "") -> None:
    """PNG of training loss and the monitored validation metric per epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    loss_keys = sorted({k for row in history for k in row if k.startswith("train_")})
    for key in loss_keys:
        axes[0].plot(epochs, [row.get(key, float("nan")) for row in history], marker="o", label=key[6:])
    axes[0].set_xlabel("epoch")
    axes[0].set_title("training losses")
    if loss_keys:
        axes[0].legend(fontsize=7)
    valid = [(row["epoch"], row[f"valid_{monitor}"]) for row in history if f"valid_{monitor}" in row]
    if valid:
        axes[1].plot([e for e, _ in valid], [v for _, v in valid], marker="o", color="tab:green")
    else:  # an empty panel would read as a plotting bug
        axes[1].text(0.5, 0.5, "no validation in this run", ha="center", va="center", transform=axes[1].transAxes)
        axes[1].set_yticks([])
    from matplotlib.ticker import MaxNLocator
    for ax in axes:  # epochs are whole numbers (one epoch would otherwise get ticks 0.96 ... 1.04)
        if 0 < len(epochs) <= 12:
            ax.set_xticks(epochs)
            ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1].set_xlabel("epoch")
    axes[1].set_title(f"validation {monitor}")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
