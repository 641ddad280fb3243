"""Checkpoint files: atomic writes, RNG capture for exact resume, and model-name lookup for the CLI."""
from __future__ import annotations

import argparse
import os
import random
from typing import Any, Dict, List

import numpy as np
import torch

FORMAT_VERSION = 1


def save_checkpoint(path: str, payload: Dict[str, Any]) -> None:
    """Writes payload to path atomically (temp file + rename), so an interruption never leaves a torn file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save({"format_version": FORMAT_VERSION, **payload}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, map_location: str = "cpu") -> Dict[str, Any]:
    """Reads a checkpoint written by save_checkpoint (our own files hold RNG states, hence weights_only=False)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    payload = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not an mbrec_fast checkpoint (format {FORMAT_VERSION})")
    return payload


def rng_state() -> Dict[str, Any]:
    """The global RNG states that training code may consume (dropout, initialisation)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def family_of_checkpoint(argv: List[str]) -> str:
    """The training module that owns the checkpoint named by `--checkpoint` in argv."""
    from ..cli import MODEL_FAMILIES

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--checkpoint", required=True)
    args, _ = parser.parse_known_args(argv)
    name = str(load_checkpoint(args.checkpoint).get("model_name", "")).lower()
    if name not in MODEL_FAMILIES:
        raise SystemExit(f"mbrec-fast evaluate: checkpoint {args.checkpoint} names unknown model {name!r}")
    return MODEL_FAMILIES[name]
