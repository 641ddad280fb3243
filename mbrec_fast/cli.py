"""`mbrec-fast` command line: demo, bench, train, evaluate.

Each model family owns its own argument parser in `mbrec_fast.training.<family>`; this file only
dispatches, so that adding a model never touches the CLI.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# model name -> training module exposing train_main(argv) and evaluate_main(argv)
MODEL_FAMILIES = {
    "mf": "mbrec_fast.training.multibehavior",
    "bpr": "mbrec_fast.training.multibehavior",
    "neumf": "mbrec_fast.training.multibehavior",
    "mcbpr": "mbrec_fast.training.multibehavior",
    "lightgcn": "mbrec_fast.training.multibehavior",
    "nmtr": "mbrec_fast.training.multibehavior",
    "member": "mbrec_fast.training.multibehavior",
    "m3oe": "mbrec_fast.training.multidomain",
    "m3rec": "mbrec_fast.training.multidomain",
    "mlp": "mbrec_fast.training.multidomain",
    "sharedbottom": "mbrec_fast.training.multidomain",
    "mmoe": "mbrec_fast.training.multidomain",
    "ple": "mbrec_fast.training.multidomain",
    "star": "mbrec_fast.training.multidomain",
    "adatt": "mbrec_fast.training.multidomain",
    "adatt-sp": "mbrec_fast.training.multidomain",
    "m2m": "mbrec_fast.training.multidomain",
    "syncrec": "mbrec_fast.training.sequential",
    "sasrec": "mbrec_fast.training.sequential",
}


def _family_for(argv: List[str]) -> str:
    model = None
    for i, arg in enumerate(argv):
        if arg == "--model" and i + 1 < len(argv):
            model = argv[i + 1]
        elif arg.startswith("--model="):
            model = arg.split("=", 1)[1]
    if model is None:
        raise SystemExit(f"mbrec-fast train: --model is required (one of {', '.join(sorted(MODEL_FAMILIES))})")
    if model.lower() not in MODEL_FAMILIES:
        raise SystemExit(f"mbrec-fast train: unknown --model {model!r} (one of {', '.join(sorted(MODEL_FAMILIES))})")
    return MODEL_FAMILIES[model.lower()]


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="mbrec-fast", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["demo", "bench", "train", "evaluate"])
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    command, rest = argv[0], argv[1:]
    if command not in ("demo", "bench", "train", "evaluate"):
        parser.error(f"unknown command {command!r}")
    if command == "demo":
        from .demo import main as demo_main
        return demo_main(rest) or 0
    if command == "bench":
        from .bench import main as bench_main
        return bench_main(rest) or 0
    if command == "train":
        return importlib.import_module(_family_for(rest)).train_main(rest) or 0
    # evaluate: the checkpoint records its model name; each family reads its own checkpoints.
    from .training.checkpoint import family_of_checkpoint
    return importlib.import_module(family_of_checkpoint(rest)).evaluate_main(rest) or 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
