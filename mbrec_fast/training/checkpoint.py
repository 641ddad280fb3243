"""Checkpoint files: atomic writes, RNG capture for exact resume, and model-name lookup for the CLI.

Checkpoints hold only tensors and plain Python values (the RNG states included), so they load with
torch.load(weights_only=True): a crafted file cannot run code through the unpickler.
"""
from __future__ import annotations

import argparse
import glob
import os
import pickle
import random
from typing import Any, Dict, List

import numpy as np
import torch

from .. import registry

FORMAT_VERSION = 1


def save_checkpoint(path: str, payload: Dict[str, Any]) -> None:
    """Writes payload to path atomically (temp file + rename), so an interruption never leaves a torn file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    _remove_stale_temps(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save({"format_version": FORMAT_VERSION, **_loadable(payload)}, tmp)
    with open(tmp, "rb") as f:  # data on disk before the rename makes it visible
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(directory)


def _loadable(value):
    """NumPy scalars and arrays (e.g. a metric computed in NumPy) as Python values and tensors, which
    weights_only=True loads; everything else unchanged."""
    if isinstance(value, dict):
        return {k: _loadable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_loadable(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    return value


def _remove_stale_temps(path: str) -> None:
    """Deletes `<path>.tmp-<pid>` files left by a writer that was killed (its process no longer runs)."""
    for tmp in glob.glob(glob.escape(path) + ".tmp-*"):
        pid = tmp.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _process_alive(int(pid)):
            continue
        try:
            os.remove(tmp)
        except OSError:
            pass


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(directory: str) -> None:
    """Makes a rename inside directory durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str, map_location: str = "cpu") -> Dict[str, Any]:
    """Reads a checkpoint written by save_checkpoint with weights_only=True: tensors and plain values only,
    so a file carrying pickled callables is refused (ValueError) before anything in it runs."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"checkpoint {path} holds objects other than tensors and plain values and was refused "
                         f"(weights_only=True): {first}") from e
    except (RuntimeError, EOFError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"checkpoint {path} is truncated or corrupt: {first}") from e
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not an mbrec_fast checkpoint (format {FORMAT_VERSION})")
    return payload


def rng_state() -> Dict[str, Any]:
    """The global RNG states that training code may consume (dropout, initialisation), as tensors and plain
    values so that the checkpoint loads with weights_only=True."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def family_of_checkpoint(argv: List[str]) -> str:
    """The training module that owns the checkpoint named by `--checkpoint` in argv."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--checkpoint", required=True)
    args, _ = parser.parse_known_args(argv)
    name = str(load_checkpoint(args.checkpoint).get("model_name", "")).lower()
    family = registry.family_of(name)
    if family is None:
        raise SystemExit(f"mbrec-fast evaluate: checkpoint {args.checkpoint} names unknown model {name!r}")
    return family
