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


def test_moved_names_keep_their_old_import_paths():
    """The batcher and the CSR toolkit have one home each (mbrec_fast/batching.py, mbrec_fast/csr.py); the
    names they had elsewhere still import and are the same objects."""
    from mbrec_fast import batching, csr
    from mbrec_fast import sampler
    from mbrec_fast.data import multibehavior as mb_data
    from mbrec_fast.models import _batches, lightgcn
    assert sampler.TripleBatches is batching.TripleBatches is mbrec_fast.TripleBatches
    assert sampler.NegativeSampler is batching.TripleBatches
    assert sampler._coo_to_csr is csr.coo_to_csr and sampler._build_torch is csr.build_packed_csr
    assert _batches.PairBatches is batching.PairBatches and _batches.epoch_seed is batching.epoch_seed
    assert _batches.default_level_probs is batching.default_level_probs and _batches.negatives is batching.negatives
    assert mb_data.build_csr is csr.build_csr and mb_data.csr_contains is csr.csr_contains
    assert lightgcn.csr_to_edges is csr.csr_to_coo


def test_csr_toolkit_builds_sorted_distinct_rows():
    from mbrec_fast.csr import build_csr, coo_to_csr, csr_contains, csr_to_coo, union_csr
    rows, cols = torch.tensor([2, 0, 2, 2]), torch.tensor([5, 1, 3, 5])
    ip, ix = coo_to_csr(rows, cols, 3, 6)
    assert ip.tolist() == [0, 1, 1, 3] and ix.tolist() == [1, 3, 5] and ix.dtype == torch.int32
    ip64, ix64 = build_csr(rows.numpy(), cols.numpy(), 3, 6)
    assert torch.equal(ip64, ip) and ix64.dtype == torch.int64 and ix64.tolist() == ix.tolist()
    r, c = csr_to_coo((ip, ix))
    assert r.tolist() == [0, 2, 2] and c.tolist() == [1, 3, 5]
    other = build_csr([1, 2], [0, 3], 3, 6)
    u_ip, u_ix = union_csr([(ip, ix), other], 3, 6)
    assert u_ip.tolist() == [0, 1, 2, 4] and u_ix.tolist() == [1, 0, 3, 5]
    assert csr_contains((u_ip, u_ix), [0, 0, 2], [1, 2, 5], 6).tolist() == [True, False, True]
    e_ip, e_ix = union_csr([], 2, 4)
    assert e_ip.tolist() == [0, 0, 0] and e_ix.numel() == 0
    from mbrec_fast.csr import indptr_from_rows
    assert indptr_from_rows(torch.tensor([0, 0, 2, 2, 2]), 4).tolist() == [0, 2, 2, 5, 5]
    assert indptr_from_rows(torch.empty(0, dtype=torch.long), 2).tolist() == [0, 0, 0]


def test_build_csr_of_read_only_arrays_warns_nothing():
    """Cached / memory-mapped data arrays are read-only: torch would warn on sharing them (a user saw it on
    `mbrec-fast evaluate`); build_csr copies those instead."""
    import warnings

    import numpy as np

    from mbrec_fast.csr import build_csr
    rows, cols = np.array([2, 0, 2]), np.array([5, 1, 3])
    rows.flags.writeable = cols.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ip, ix = build_csr(rows, cols, 3, 6)
    assert ip.tolist() == [0, 1, 1, 3] and ix.tolist() == [1, 3, 5]


def test_model_registry_is_the_one_list():
    """The CLI's tables, the training families and checkpoint lookup all read mbrec_fast/registry.py."""
    from mbrec_fast import cli, registry
    from mbrec_fast.models import multidomain
    from mbrec_fast.training import multibehavior, sequential
    assert set(cli.MODEL_FAMILIES) == set(registry.MODELS) | set(registry.ALIASES)
    for name in registry.model_names(aliases=True):
        assert cli.MODEL_FAMILIES[name] == registry.family_of(name)
    assert set(multibehavior.MODELS) == set(registry.model_names("multibehavior", aliases=True))
    assert multidomain.MODEL_NAMES == registry.model_names("multidomain")
    assert set(multidomain.MDMT_ONLY) == {"mlp", "m3oe", "m3rec", "m2m"}
    assert sequential.MODELS == registry.model_names("sequential")
    assert registry.family_of("MF") == "mbrec_fast.training.multibehavior" and registry.family_of("nope") is None
    for name in registry.model_names("multibehavior"):
        assert hasattr(registry.load_builder(name), "from_data")


def test_no_import_circle_through_the_cli():
    """checkpoint -> cli -> checkpoint was a circle; the registry is a leaf both import."""
    import ast
    src = (ROOT / "mbrec_fast" / "registry.py").read_text()
    imported = [n for n in ast.walk(ast.parse(src)) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert all(not (isinstance(n, ast.ImportFrom) and (n.level or (n.module or "").startswith("mbrec_fast")))
               for n in imported), "registry.py must import nothing of the package"
    src = (ROOT / "mbrec_fast" / "training" / "checkpoint.py").read_text()
    modules = [n.module or "" for n in ast.walk(ast.parse(src)) if isinstance(n, ast.ImportFrom)]
    assert not any(m.split(".")[-1] == "cli" for m in modules)
