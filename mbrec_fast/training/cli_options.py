"""Command-line pieces the three model families share: the help formatter (defaults shown), the
resume-path rule, the command printed to continue a stopped run, and the model hyper-parameter options
(default None = "the model's default", read from the model constructors' signatures for the help and the
run's config).

One vocabulary across the families: `--run-dir` (alias `--out`), `--emb-dim` (alias `--dim`),
`--resume [PATH]` (no value: <run-dir>/checkpoint.pt), `--no-progress`, `--threads`, `--device`.
"""
from __future__ import annotations

import argparse
import os
import shlex
from typing import Any, Dict, Iterable, List, Optional

__all__ = ["HelpFormatter", "resolve_resume", "resume_command", "add_run_dir", "add_resume", "add_progress",
           "evaluate_parser", "parse_evaluate_args", "model_defaults_text", "fill_model_defaults"]


class HelpFormatter(argparse.HelpFormatter):
    """Fills the description paragraph by paragraph (blank lines kept) within 79 columns, and appends
    "(default: X)" to options whose default is not None or False (those say their default in their
    own help text, if they have one)."""

    def _fill_text(self, text, width, indent):
        import textwrap
        paragraphs = [" ".join(par.split()) for par in text.strip().split("\n\n")]
        return "\n\n".join(textwrap.fill(par, min(width, 79), initial_indent=indent, subsequent_indent=indent)
                            for par in paragraphs)

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or default is None or default is False or default is argparse.SUPPRESS
                or default == [] or not action.option_strings):
            return text
        if isinstance(default, (list, tuple)):
            return f"{text} (default: {' '.join(str(v) for v in default)})".strip()
        return f"{text} (default: %(default)s)".strip()


def add_run_dir(p: argparse.ArgumentParser, dest: str, default_text: str) -> None:
    """--run-dir DIR (alias --out): where checkpoints, metrics.json, history.json, curves.png go."""
    p.add_argument("--run-dir", "--out", dest=dest, default=None, metavar="DIR",
                   help=f"run directory for checkpoints, metrics.json, history.json, curves.png "
                        f"(default {default_text}; --out is an alias)")


def add_resume(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                   help="continue a stopped run from CHECKPOINT (no value: <run-dir>/checkpoint.pt)")


def add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (they are shown only when stderr is a terminal anyway)")


def evaluate_parser(description: str, extra, output_dest: str = "output",
                    prog: str = "mbrec-fast evaluate") -> argparse.ArgumentParser:
    """The `mbrec-fast evaluate` parser of a family: --checkpoint, the family's options (`extra(p)`),
    --output JSON (alias --json), --threads and --no-progress (the same flags in every family)."""
    p = argparse.ArgumentParser(prog=prog, formatter_class=HelpFormatter, description=description)
    p.add_argument("--checkpoint", help="the checkpoint file (required)")
    extra(p)
    p.add_argument("--output", "--json", dest=output_dest, default=None, metavar="JSON",
                   help="also write the metrics to this JSON file (--json is an alias)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    add_progress(p)
    return p


def parse_evaluate_args(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """Parses and applies --threads; --checkpoint is checked after parsing, so that --help works without one."""
    args = parser.parse_args(argv)
    if not args.checkpoint:
        parser.error("--checkpoint is required")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        import torch
        torch.set_num_threads(args.threads)
    return args


def resolve_resume(resume: Optional[str], run_dir: str, log=print) -> Optional[str]:
    """The checkpoint to resume from: None, an explicit path, or for "auto" <run_dir>/checkpoint.pt
    (None, with a message, when that file does not exist yet)."""
    if resume != "auto":
        return resume
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isfile(path):
        log(f"--resume: no checkpoint at {path}, starting fresh")
        return None
    return path


def resume_command(argv: List[str], run_dir: str, prog: str = "mbrec-fast train") -> str:
    """The command that continues a run stopped by --max-steps or a signal: argv without --max-steps
    and without any earlier --resume, with --run-dir pinned and one --resume at the end."""
    out: List[str] = []
    i, has_run_dir = 0, False
    while i < len(argv):
        arg = argv[i]
        if arg == "--max-steps":
            i += 2
            continue
        if arg.startswith("--max-steps="):
            i += 1
            continue
        if arg == "--resume":
            i += 2 if i + 1 < len(argv) and not argv[i + 1].startswith("-") else 1
            continue
        if arg.startswith("--resume="):
            i += 1
            continue
        if arg in ("--run-dir", "--out") or arg.startswith(("--run-dir=", "--out=")):
            has_run_dir = True
        out.append(arg)
        i += 1
    if not has_run_dir:
        out += ["--run-dir", run_dir]
    return " ".join([prog] + [shlex.quote(a) for a in out] + ["--resume"])


# ------------------------------------------------------------------------------------------ model defaults
def _defaults_by_value(classes: Iterable[type], key: str) -> Dict[Any, List[str]]:
    """{default: [class names]} of constructor argument `key` over the classes that take it (in order)."""
    from ..models.base import constructor_defaults
    by_value: Dict[Any, List[str]] = {}
    for cls in classes:
        defaults = constructor_defaults(cls)
        if key in defaults:
            names = by_value.setdefault(defaults[key], [])
            if cls.__name__ not in names:
                names.append(cls.__name__)
    return by_value


def model_defaults_text(classes: Iterable[type], key: str, none_text: str = "its --variant's") -> str:
    """The defaults of constructor argument `key` over model classes, read from their signatures, for a
    help text: the most common value first, then the others by class, e.g. "1; NeuMF/NMTR 4" (a None
    default reads `none_text`: the model decides from another argument)."""
    by_value = _defaults_by_value(classes, key)
    if not by_value:
        return "the model's"
    common = max(by_value, key=lambda v: (v is not None, len(by_value[v])))
    text = lambda v: none_text if v is None else f"{v:g}" if isinstance(v, float) else str(v)  # noqa: E731
    return "; ".join([text(common)] + [f"{'/'.join(names)} {text(v)}" for v, names in by_value.items() if v != common])


def fill_model_defaults(args: argparse.Namespace, classes: Iterable[type], options: Dict[str, str]) -> None:
    """Sets each model option `dest` left at None (`options`: dest -> constructor argument) to the default of
    the first class in `classes` whose constructor takes that argument (list the chosen model's class first),
    so the run's config records the value the model takes."""
    from ..models.base import constructor_defaults
    classes = list(classes)
    for dest, key in options.items():
        if getattr(args, dest, None) is not None:
            continue
        for cls in classes:
            defaults = constructor_defaults(cls)
            if key in defaults:
                setattr(args, dest, defaults[key])
                break
