"""`mbrec-fast` command line: demo, train, evaluate, bench (`mbrec-fast --help`).

Each model family owns its own argument parser in `mbrec_fast.training.<family>`; this file only
dispatches, by the model registry (`mbrec_fast.registry`), so that adding a model never touches the CLI.
"""
from __future__ import annotations

import importlib
import sys
from typing import List, Optional

from . import registry

# training module -> (family title, its models with one-line descriptions): the help's table, read from
# the model registry (mbrec_fast/registry.py)
FAMILIES = {registry.family_module(family): (title, {name: registry.MODELS[name].description
                                                     for name in registry.model_names(family)})
            for family, title in registry.FAMILIES.items()}

# model name (aliases included) -> training module exposing train_main(argv) and evaluate_main(argv)
MODEL_FAMILIES = {name: registry.family_of(name) for name in registry.model_names(aliases=True)}

COMMANDS = {
    "demo": "train and evaluate two small models on Beibei (a few minutes)",
    "train": "train any model (--model NAME): checkpoints, metrics, curves",
    "evaluate": "re-evaluate a checkpoint (--checkpoint PATH)",
    "bench": "run the benchmark suites (source checkout): ratio table, JSON, PNG",
}


def _version() -> str:
    from importlib import metadata
    try:
        version = metadata.version("mbrec_fast")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        version = "0.1.0 (not installed)"
    import torch
    return f"mbrec-fast {version} (torch {torch.__version__})"


def _wants_help(argv: List[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)


def _option_value(argv: List[str], name: str) -> Optional[str]:
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def _main_help() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: mbrec-fast [--version] COMMAND [options]", "",
             "Fused PyTorch ops for multi-behavior, multi-domain and multi-task recommenders,",
             "and the models built on them.", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    lines += ["", "mbrec-fast COMMAND --help shows a command's options;",
              "mbrec-fast train --help lists the models.",
              "Data: --data PATH, else $MBREC_FAST_DATA, ../shared/data beside a source",
              "checkout, ./data, or the current directory (README: 'Where the data is')."]
    return "\n".join(lines)


def _train_help() -> str:
    lines = ["usage: mbrec-fast train --model MODEL [options]", "",
             "Train a model with validation, early stopping and checkpoints (--resume",
             "continues a stopped run); metrics.json, history.json and curves.png go to",
             "--run-dir. The options depend on the model's family:",
             "mbrec-fast train --model MODEL --help lists them with their defaults.", ""]
    for module, (title, models) in FAMILIES.items():
        lines.append(f"{title}:")
        lines += [f"  {name:<13}{text}" for name, text in models.items()]
        lines.append("")
    lines += ["options of every family: --run-dir DIR (alias --out), --emb-dim N (alias --dim),",
              "--epochs, --batch-size, --lr, --seed, --device, --threads,",
              "--resume [CHECKPOINT], --max-steps, --no-progress."]
    return "\n".join(lines)


def _evaluate_help() -> str:
    parts = ["usage: mbrec-fast evaluate --checkpoint PATH [options]", "",
             "Re-evaluates a checkpoint of mbrec-fast train (best.pt or checkpoint.pt).",
             "The options depend on the family of the model in the checkpoint:"]
    for module, (title, _) in FAMILIES.items():
        parser = importlib.import_module(module).build_evaluate_parser()
        parts += ["", f"== {title.split(' (')[0]}", parser.format_help().split("\n\n", 1)[-1].rstrip()]
    return "\n".join(parts)


def _family_for(argv: List[str]) -> str:
    model = _option_value(argv, "--model")
    if model is None:
        raise SystemExit(f"mbrec-fast train: --model is required (one of {', '.join(sorted(MODEL_FAMILIES))}); "
                         "mbrec-fast train --help lists them")
    if model.lower() not in MODEL_FAMILIES:
        raise SystemExit(f"mbrec-fast train: unknown --model {model!r} (one of {', '.join(sorted(MODEL_FAMILIES))})")
    return MODEL_FAMILIES[model.lower()]


# Exceptions that mean bad input (a flag value, a data file, a checkpoint): reported in one line, no traceback.
USER_ERRORS = (ValueError, TypeError, OSError)


def main(argv: Optional[List[str]] = None) -> int:
    """Runs a command; a user error prints one line naming the flag or file and exits 2 (`--debug`: traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        return _dispatch(argv)
    except USER_ERRORS as e:
        if debug:
            raise
        text = " ".join(str(e).split()) or type(e).__name__
        if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in text:
            text = f"{e.filename}: {text}"
        print(f"mbrec-fast: error: {text} (--debug shows the traceback)", file=sys.stderr)
        return 2


def _dispatch(argv: List[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(_main_help())
        return 0
    if argv[0] in ("-V", "--version"):
        print(_version())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        raise SystemExit(f"mbrec-fast: unknown command {command!r} (one of {', '.join(COMMANDS)}); "
                         "mbrec-fast --help describes them")
    if command == "demo":
        from .demo import main as demo_main
        return demo_main(rest) or 0
    if command == "bench":
        from .bench import main as bench_main
        return bench_main(rest) or 0
    if command == "train":
        if _wants_help(rest) and _option_value(rest, "--model") is None:
            print(_train_help())
            return 0
        return importlib.import_module(_family_for(rest)).train_main(rest) or 0
    # evaluate: the checkpoint records its model name; each family reads its own checkpoints.
    if _wants_help(rest) and _option_value(rest, "--checkpoint") is None:
        print(_evaluate_help())
        return 0
    from .training.checkpoint import family_of_checkpoint
    return importlib.import_module(family_of_checkpoint(rest)).evaluate_main(rest) or 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
