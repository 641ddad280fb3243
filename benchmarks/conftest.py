"""Benchmark harness. Each benchmark records extra_info {op, case, impl, ...}; `mbrec-fast bench`
turns the JSON into a table of times and ratios of every baseline over the `mbrec_fast` impl."""
import os
import platform

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def describe_env() -> dict:
    info = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    try:
        import mbrec_fast
        info["mbrec_fast"] = mbrec_fast.__version__
        info["cuda_built"] = mbrec_fast.cuda_built()
    except Exception:  # pragma: no cover - reported, never fatal
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


@pytest.fixture
def record(benchmark):
    """Returns a function that fills benchmark.extra_info with env facts plus the given fields."""
    def _record(**fields):
        benchmark.extra_info.update(describe_env())
        benchmark.extra_info.update(fields)
    return _record
