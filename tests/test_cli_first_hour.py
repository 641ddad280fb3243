"""A new user's first hour: help on every command and family, one flag vocabulary, the resume hint,
data lookup for any install, progress reporting, the results table, honest benchmark labels, and
(opt-in, MBREC_FAST_TEST_INSTALL=1) the regular non-editable install."""
import importlib.util
import os
import pathlib
import shlex
import subprocess
import sys

import pytest
import torch

from mbrec_fast import evaluate_full_ranking
from mbrec_fast.cli import FAMILIES, MODEL_FAMILIES, main as cli_main

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(argv, capsys):
    """cli main's exit code (argparse's --help exits through SystemExit(0)) and its stdout."""
    try:
        code = cli_main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ help
def test_main_help_lists_every_command_with_a_description(capsys):
    for argv in ([], ["--help"], ["-h"]):
        code, out = _run(argv, capsys)
        assert code == 0
        for command in ("demo", "train", "evaluate", "bench"):
            line = next(l for l in out.splitlines() if l.strip().startswith(command + " "))
            assert len(line.split()) > 3, f"{command} has no description: {line!r}"
        assert all(len(l) <= 80 for l in out.splitlines())


def test_version(capsys):
    code, out = _run(["--version"], capsys)
    assert code == 0 and out.startswith("mbrec-fast ") and "torch" in out


def test_train_help_without_model_lists_every_model_per_family(capsys):
    code, out = _run(["train", "--help"], capsys)
    assert code == 0
    for module, (title, models) in FAMILIES.items():
        assert title in out
        for name in models:
            assert f"  {name} " in out
    # every model the CLI accepts is described (mf is bpr's alias)
    assert set(MODEL_FAMILIES) - {"mf"} == {m for _, models in FAMILIES.values() for m in models}
    assert "--model MODEL --help" in out


@pytest.mark.parametrize("model", sorted(MODEL_FAMILIES))
def test_train_help_of_every_model_shows_its_family_options_with_defaults(model, capsys):
    code, out = _run(["train", "--model", model, "--help"], capsys)
    assert code == 0
    for flag in ("--run-dir", "--emb-dim", "--resume", "--no-progress", "--epochs", "--threads"):
        assert flag in out, f"{flag} missing from {model}'s help"
    assert "(default: " in out
    family = MODEL_FAMILIES[model]
    specific = {"mbrec_fast.training.multibehavior": "--interaction",
                "mbrec_fast.training.multidomain": "--bilevel-every",
                "mbrec_fast.training.sequential": "--n-cross"}[family]
    assert specific in out


@pytest.mark.parametrize("family", ["multibehavior", "multidomain", "sequential"])
def test_evaluate_takes_the_same_common_flags_in_every_family(family):
    """--threads, --output / --json and --no-progress mean the same in every family's `evaluate` (a sequential
    evaluate once refused --threads that the multi-behavior one took)."""
    import importlib
    parser = importlib.import_module(f"mbrec_fast.training.{family}").build_evaluate_parser()
    args = parser.parse_args(["--checkpoint", "c.pt", "--threads", "1", "--json", "m.json", "--no-progress"])
    assert args.threads == 1 and args.no_progress and "m.json" in vars(args).values()
    with pytest.raises(SystemExit):
        from mbrec_fast.training.cli_options import parse_evaluate_args
        parse_evaluate_args(parser, ["--checkpoint", "c.pt", "--threads", "0"])


def test_train_without_model_errors_after_parsing(capsys):
    with pytest.raises(SystemExit, match="--model is required"):
        cli_main(["train", "--epochs", "1"])


def test_evaluate_help_without_checkpoint(capsys):
    code, out = _run(["evaluate", "--help"], capsys)
    assert code == 0
    assert "--checkpoint" in out and out.count("--no-progress") == 3  # one section per family


@pytest.mark.parametrize("command", ["demo", "bench"])
def test_demo_and_bench_help(command, capsys):
    code, out = _run([command, "--help"], capsys)
    assert code == 0
    assert "--run-dir" in out and "(default: " in out
    description = out.split("\n\n")[1]
    assert description.rstrip().endswith((".", ")")), f"description cut short: {description!r}"
    assert all(len(line) <= 80 for line in out.splitlines())


def test_unknown_command_names_the_commands():
    with pytest.raises(SystemExit, match="one of demo, train, evaluate, bench"):
        cli_main(["trian"])


# ------------------------------------------------------------------------------------------------ vocabulary
FAMILY_OF = {"multibehavior": "bpr", "multidomain": "mmoe", "sequential": "sasrec"}


@pytest.mark.parametrize("family", sorted(FAMILY_OF))
def test_one_flag_vocabulary_with_the_old_spellings_as_aliases(family):
    module = importlib.import_module(f"mbrec_fast.training.{family}")
    parser = module.build_parser()
    model = FAMILY_OF[family]
    new = parser.parse_args(["--model", model, "--run-dir", "r", "--emb-dim", "8", "--resume", "--no-progress"])
    old = parser.parse_args(["--model", model, "--out", "r", "--dim", "8", "--resume", "--no-progress"])
    assert vars(new) == vars(old)
    run_dir = new.out if family == "multibehavior" else new.run_dir
    dim = new.emb_dim if family == "multidomain" else new.dim
    assert (run_dir, dim, new.resume, new.no_progress) == ("r", 8, "auto", True)
    assert parser.parse_args(["--model", model, "--resume", "x.pt"]).resume == "x.pt"
    evaluate = module.build_evaluate_parser()
    a, b = evaluate.parse_args(["--output", "m.json"]), evaluate.parse_args(["--json", "m.json"])
    assert vars(a) == vars(b)



# ------------------------------------------------------------------------------------------------ resume hint
def test_resume_command_drops_max_steps_and_earlier_resume():
    from mbrec_fast.training.cli_options import resume_command
    cmd = resume_command(["--model", "bpr", "--max-steps", "3", "--epochs", "2", "--resume", "--max-steps=4"], "runs/x")
    assert cmd == "mbrec-fast train --model bpr --epochs 2 --run-dir runs/x --resume"
    cmd = resume_command(["--model", "bpr", "--out", "my dir", "--resume", "my dir/checkpoint.pt"], "my dir")
    assert cmd == "mbrec-fast train --model bpr --out 'my dir' --resume"


FAMILY_RUNS = {
    "multibehavior": ["--model", "bpr", "--data", "synthetic:120x60", "--epochs", "2", "--batch-size", "64",
                      "--emb-dim", "8", "--ks", "10"],
    "multidomain": ["--model", "mlp", "--synthetic-samples", "1500", "--epochs", "2", "--batch-size", "256"],
    "sequential": ["--model", "sasrec", "--syn-users", "80", "--syn-items", "20", "--epochs", "2",
                   "--batch-size", "32", "--emb-dim", "8", "--eval-neg", "10"],
}


@pytest.mark.parametrize("family", sorted(FAMILY_RUNS))
def test_following_the_resume_hint_finishes_the_run(family, tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    argv = ["train", *FAMILY_RUNS[family], "--run-dir", run_dir, "--no-progress", "--max-steps", "1"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    hint = next(l for l in out.splitlines() if l.startswith("continue with: "))[len("continue with: "):]
    words = shlex.split(hint)
    assert words[:2] == ["mbrec-fast", "train"] and "--max-steps" not in words and words.count("--resume") == 1
    assert cli_main(words[1:]) == 0  # the hint's command runs to the end
    out = capsys.readouterr().out
    assert "continue with" not in out and "resumed from" in out
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_a_resumed_run_stopped_again_hints_one_resume(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    base = ["train", *FAMILY_RUNS["multibehavior"], "--run-dir", run_dir, "--no-progress"]
    assert cli_main(base + ["--max-steps", "1"]) == 0
    assert cli_main(base + ["--resume", "--max-steps", "1"]) == 0
    hints = [l for l in capsys.readouterr().out.splitlines() if l.startswith("continue with: ")]
    assert len(hints) == 2 and hints[1].count("--resume") == 1 and "--max-steps" not in hints[1]


# ------------------------------------------------------------------------------------------------ data lookup
def test_data_lookup_order_and_error(tmp_path, monkeypatch):
    from mbrec_fast.data import paths
    monkeypatch.delenv("MBREC_FAST_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(paths, "source_checkout", lambda: None)  # as a regular install
    with pytest.raises(FileNotFoundError) as info:
        paths.find_in_data_roots("beibei", "meta.json")
    message = str(info.value)
    assert "./data" in message and "current directory" in message and "MBREC_FAST_DATA" in message
    (tmp_path / "beibei").mkdir()
    (tmp_path / "beibei" / "meta.json").write_text("{}")
    assert paths.find_in_data_roots("beibei", "meta.json") == tmp_path / "beibei"  # the current directory
    (tmp_path / "data" / "beibei").mkdir(parents=True)
    (tmp_path / "data" / "beibei" / "meta.json").write_text("{}")
    assert paths.find_in_data_roots("beibei", "meta.json") == tmp_path / "data" / "beibei"  # ./data first
    env_root = tmp_path / "elsewhere"
    (env_root / "beibei").mkdir(parents=True)
    (env_root / "beibei" / "meta.json").write_text("{}")
    monkeypatch.setenv("MBREC_FAST_DATA", str(env_root))
    assert paths.find_in_data_roots("beibei", "meta.json") == env_root / "beibei"  # the variable wins


def test_source_checkout_looks_beside_the_repository(monkeypatch):
    from mbrec_fast.data import paths
    monkeypatch.delenv("MBREC_FAST_DATA", raising=False)
    if paths.source_checkout() is None:
        pytest.skip("not running from a source checkout")
    roots = [str(folder) for folder, _ in paths.data_roots()]
    assert roots[0] == str(ROOT.parent / "shared" / "data")


# ------------------------------------------------------------------------------------------------ progress
def _problem(n_users=50, n_items=40, d=8):
    g = torch.Generator().manual_seed(0)
    ue, ie = torch.randn(n_users, d, generator=g), torch.randn(n_items, d, generator=g)
    indptr = torch.arange(n_users + 1, dtype=torch.int64) * 2
    items = torch.stack([torch.arange(n_users) % n_items, (torch.arange(n_users) + 7) % n_items], 1).sort(1).values
    return ue, ie, (indptr, items.flatten().contiguous())


@pytest.mark.parametrize("with_score_fn", [False, True])
def test_evaluator_progress_callback_observes_only(with_score_fn, monkeypatch):
    import mbrec_fast.evaluator as ev
    monkeypatch.setattr(ev, "_USER_CHUNK", 16)  # several chunks
    monkeypatch.setattr(ev, "_MERGE_WINDOW_BYTES", 16 * 4 * 8)  # several item windows per chunk
    ue, ie, targets = _problem()
    if with_score_fn:
        kwargs = dict(score_fn=lambda users, s, e: ue[users] @ ie[s:e].T, n_items=ie.shape[0])
        ue_, ie_ = None, None
    else:
        kwargs, ue_, ie_ = {}, ue, ie
    calls = []
    plain = evaluate_full_ranking(ue_, ie_, None, targets, (5, 10), block_items=8, **kwargs)
    seen = evaluate_full_ranking(ue_, ie_, None, targets, (5, 10), block_items=8,
                                 progress=lambda done, total: calls.append((done, total)), **kwargs)
    assert seen.metrics == plain.metrics
    assert calls[-1] == (50, 50) and all(t == 50 for _, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert len(calls) > 4 if with_score_fn else len(calls) == 4
    with pytest.raises(TypeError, match="progress"):
        evaluate_full_ranking(ue, ie, None, targets, (5,), progress=3)


def test_progress_shown_only_when_asked_or_on_a_terminal(capsys, monkeypatch):
    from mbrec_fast._progress import progress_enabled, ranking_progress
    assert progress_enabled(None) is False  # pytest's captured stderr is not a terminal
    assert progress_enabled(True) is True and progress_enabled(False) is False
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert progress_enabled(None) is True
    monkeypatch.setenv("MBREC_FAST_PROGRESS", "0")
    assert progress_enabled(None) is False
    ue, ie, targets = _problem()
    with ranking_progress(True, "ranking test", mininterval=0) as callback:
        evaluate_full_ranking(ue, ie, None, targets, (5,), progress=callback)
    err = capsys.readouterr().err
    assert "ranking test" in err and "50/50" in err and "users/s" in err
    with ranking_progress(False) as callback:
        assert callback is None


def test_no_progress_keeps_a_training_run_quiet_on_stderr(tmp_path, capsys):
    argv = ["train", *FAMILY_RUNS["multibehavior"], "--run-dir", str(tmp_path), "--no-progress"]
    assert cli_main(argv) == 0
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------------------ results table
def test_ranking_table_fits_80_columns_and_says_no_users():
    from mbrec_fast.training.multibehavior import metrics_table
    metrics = {"users": 10.0, "visited_users": 0.0, "unvisited_users": 10.0}
    for k in (10, 20, 50, 100):
        for m in ("hr", "ndcg"):
            metrics[f"{m}@{k}"] = metrics[f"unvisited_{m}@{k}"] = 0.5
            metrics[f"visited_{m}@{k}"] = 0.0
    text = metrics_table(metrics, (10, 20, 50, 100))
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert [l.split()[0] for l in lines[2:]] == ["overall", "visited", "unvisited"]
    assert lines[3].split()[2:] == ["no", "users"]
    assert "0.0000" not in text


# ------------------------------------------------------------------------------------------------ bench labels
def _bench_module(monkeypatch, full: bool):
    if full:
        monkeypatch.setenv("MBREC_FAST_BENCH_FULL", "1")
    else:
        monkeypatch.delenv("MBREC_FAST_BENCH_FULL", raising=False)
    spec = importlib.util.spec_from_file_location("bench_evaluator_labels", ROOT / "benchmarks" / "test_bench_evaluator.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("full", [False, True])
def test_bench_case_names_say_the_sizes_that_run(full, monkeypatch):
    module = _bench_module(monkeypatch, full)
    for name, (n_users, n_items) in module.CASES.items():
        assert name == module.case_label(n_users, n_items)
        if n_items is not None:
            assert f"{module._count(n_users)} users x {module._count(n_items)} items" in name
    names = " ".join(module.CASES)
    if full:
        assert "8192 users x 100k items" in names and "2048 users x 1M items" in names and "beibei all users" in names
    else:
        assert "100k" not in names and "1M" not in names and "20k items" in names and "50k items" in names


def test_bench_has_no_fraction_of_peak_above_its_reference():
    source = (ROOT / "benchmarks" / "test_bench_evaluator.py").read_text()
    assert "frac_sgemm_peak" not in source and "x_best_mm_rate" in source


# ------------------------------------------------------------------------------------------------ regular install
@pytest.mark.skipif(os.environ.get("MBREC_FAST_TEST_INSTALL") != "1",
                    reason="set MBREC_FAST_TEST_INSTALL=1 (and MBREC_FAST_DATA) to build a regular install in a "
                           "fresh venv (minutes; .ci/run runs it as its own step)")
def test_regular_install_runs_every_family_outside_the_source_tree():
    out = subprocess.run(["bash", str(ROOT / ".ci" / "install_check.sh")], capture_output=True, text=True,
                         timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "install check passed" in out.stdout


def test_sequential_table_says_no_users_for_an_empty_domain():
    from mbrec_fast.training.sequential import KS, _metric_table
    metrics = {}
    for proto in ("sampled", "full"):
        for sfx in ("", "_a", "_b"):
            for k in KS:
                metrics[f"{proto}_hr@{k}{sfx}"] = metrics[f"{proto}_ndcg@{k}{sfx}"] = 0.0 if sfx == "_b" else 0.25
    metrics.update(sampled_mrr=0.3, sampled_mrr_a=0.3, **{"full_mrr@10": 0.3, "full_mrr@10_a": 0.3},
                   full_users_a=5.0, full_users_b=0.0)
    del metrics["sampled_hr@10_b"]  # the sampled protocol leaves an empty domain out
    rows = [line.split() for line in _metric_table(metrics, ["a", "b"]).splitlines()[2:]]
    assert ["full", "b", "no", "users"] in rows
    assert not any(r[:2] == ["sampled", "b"] for r in rows)


# ------------------------------------------------------------------------------------------------ demo
def test_demo_reads_well_in_80_columns(data_dir, tmp_path, capsys):
    """Both halves in one table layout (same header, rows overall / visited / unvisited), the visited
    note, the run directory named and used, the thread count on the speed figures."""
    import json
    run_dir = tmp_path / "demo"
    assert cli_main(["demo", "--dataset", "retailrocket", "--epochs", "1", "--emb-dim", "16",
                     "--run-dir", str(run_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    wide = [l for l in lines if len(l) > 80 and str(tmp_path) not in l]  # a long path is the path's length
    assert not wide, wide
    headers = [i for i, l in enumerate(lines) if l.startswith("targets")]
    assert len(headers) == 2 and lines[headers[0]] == lines[headers[1]]
    assert lines[headers[0] - 1] == lines[headers[1] - 1]
    for h in headers:
        assert [lines[h + j].split()[0] for j in (1, 2, 3)] == ["overall", "visited", "unvisited"]
        assert lines[h + 2].split()[1:] == ["0", "no", "users"]  # Retail Rocket has no visited test items
    assert out.count("visited = ") == 2
    assert f"outputs in {run_dir}" in lines[0] and "thread" in lines[0]
    assert any(l.startswith("speed of full ranking") and "thread" in l for l in lines)
    assert json.loads((run_dir / "bpr-mf.json").read_text())["users"] == 2174
    assert (run_dir / "nmtr-retailrocket" / "curves.png").is_file()
