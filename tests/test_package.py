"""The package imports, registers its library, and the README and CI agree on the commands."""
import pathlib
import re

import torch

import mbrec_fast

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_library_is_registered():
    assert isinstance(mbrec_fast.cuda_built(), bool)
    assert hasattr(torch.ops, "mbrec_fast")


def test_kernels_subpackage_installed():
    import mbrec_fast.kernels  # noqa: F401  (installed from top-level kernels/ via package-dir)


def test_ci_runs_the_readme_commands():
    """.ci/run must run exactly the README's set-up and test commands."""
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    for tag in ("SETUP", "TEST"):
        m = re.search(rf"# README:{tag}\n(.+)\n", ci)
        assert m, f".ci/run lacks the README:{tag} line"
        assert m.group(1).strip() in readme, f"README does not contain the {tag} command {m.group(1)!r}"
