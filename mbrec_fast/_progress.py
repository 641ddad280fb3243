"""Progress bars for the long steps (training epochs, full-ranking evaluation, the demo).

Shown on stderr when it is a terminal, never in logs or CI: `progress_enabled(None)` is True only
for a TTY and unless MBREC_FAST_PROGRESS=0; `--no-progress` passes False. The evaluator reports
through a plain callback (`evaluate_full_ranking(progress=...)`), so the op itself never prints.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

__all__ = ["progress_enabled", "ranking_progress", "progress_bar"]


def progress_enabled(flag: Optional[bool] = None) -> bool:
    """flag when given; else True on a terminal unless MBREC_FAST_PROGRESS=0 (quiet in logs and CI)."""
    if flag is not None:
        return bool(flag)
    if os.environ.get("MBREC_FAST_PROGRESS", "1") == "0":
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def progress_bar(enabled: bool, **kwargs):
    """A tqdm bar on stderr (rate and time left included), or None when disabled."""
    if not enabled:
        return None
    from tqdm.auto import tqdm
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(file=sys.stderr, **kwargs)


@contextmanager
def ranking_progress(enabled: bool, desc: str = "full ranking", total: Optional[int] = None,
                     **bar_options) -> Iterator[Optional[Callable[[int, int], None]]]:
    """A `progress(done_users, total_users)` callback for `evaluate_full_ranking` that drives a bar
    showing users ranked, users/s and time left; None when disabled. bar_options go to tqdm."""
    bar = progress_bar(enabled, desc=desc, total=total, unit=" users", **bar_options)
    if bar is None:
        yield None
        return

    def update(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
            bar.refresh()
        bar.update(max(0, int(done) - bar.n))

    try:
        yield update
    finally:
        bar.close()
