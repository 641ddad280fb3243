"""Where the data lives, for a source checkout and for a regular (non-editable) install alike.

Places searched, in order (an explicit path given to a loader or `--data PATH` always wins):
1. `$MBREC_FAST_DATA`, when set;
2. `../shared/data` beside the repository, when the package runs from a source checkout;
3. `./data` in the current directory;
4. the current directory itself.
A data set is found in the first place that holds it; the error lists every place tried.
"""
from __future__ import annotations

import os
import pathlib
from typing import List, Optional, Tuple

__all__ = ["data_roots", "default_data_root", "find_in_data_roots", "source_checkout"]

ENV_VAR = "MBREC_FAST_DATA"


def source_checkout() -> Optional[pathlib.Path]:
    """The repository root when the package is imported from a source checkout (editable install or
    PYTHONPATH); None for a regular install into site-packages."""
    root = pathlib.Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "setup.py").is_file() and (root / "mbrec_fast").is_dir():
        return root
    return None


def data_roots() -> List[Tuple[pathlib.Path, str]]:
    """(folder, how it was chosen) for every place searched, in order."""
    roots: List[Tuple[pathlib.Path, str]] = []
    env = os.environ.get(ENV_VAR)
    if env:
        roots.append((pathlib.Path(env).expanduser(), f"${ENV_VAR}"))
    checkout = source_checkout()
    if checkout is not None:
        roots.append((checkout.parent / "shared" / "data", "../shared/data beside the source checkout"))
    cwd = pathlib.Path.cwd()
    roots.append((cwd / "data", "./data"))
    roots.append((cwd, "the current directory"))
    return roots


def default_data_root() -> pathlib.Path:
    """The first searched place that exists (the first place searched when none does)."""
    roots = data_roots()
    for folder, _ in roots:
        if folder.is_dir():
            return folder
    return roots[0][0]


def find_in_data_roots(relative: str, marker: Optional[str] = None, what: str = "data set") -> pathlib.Path:
    """root / relative for the first searched root where it exists (or, with `marker`, where
    root / relative / marker exists). FileNotFoundError naming every place tried and how to point
    the package at the data otherwise."""
    tried = []
    for folder, how in data_roots():
        candidate = folder / relative
        probe = candidate / marker if marker else candidate
        if probe.exists():
            return candidate
        tried.append(f"{probe} ({how})")
    if not os.environ.get(ENV_VAR):
        tried.append(f"${ENV_VAR} (not set)")
    raise FileNotFoundError(f"{what} {relative!r} not found; looked in: " + "; ".join(tried)
                            + f". Pass the path explicitly (--data PATH) or set {ENV_VAR} to the folder that holds "
                            f"{relative} (e.g. export {ENV_VAR}=/path/to/shared/data)")
