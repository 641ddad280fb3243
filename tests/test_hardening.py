"""Hardening (issue 12): checkpoint safety, resume refusals, interruptible validation, CLI user errors,
corrupted data files, and the bounds on what one bad value can allocate."""
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mbrec_fast.training.checkpoint import load_checkpoint, save_checkpoint
from test_training_common import _toy_run


class _Payload:
    """Pickles to a call of os.system: what a crafted checkpoint would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _malicious_checkpoint(path, marker):
    torch.save({"format_version": 1, "model_name": "mf", "config": {}, "model": {}, "evil": _Payload(marker)}, path)


def test_checkpoint_with_pickled_callable_is_refused_and_runs_nothing(tmp_path):
    ckpt, marker = tmp_path / "evil.pt", tmp_path / "pwned"
    _malicious_checkpoint(ckpt, marker)
    with pytest.raises(ValueError, match="refused"):
        load_checkpoint(str(ckpt))
    assert not marker.exists()


@pytest.mark.parametrize("argv", [
    ["evaluate", "--checkpoint", "{ckpt}"],
    ["train", "--model", "mf", "--data", "{data}", "--epochs", "1", "--out", "{out}", "--resume", "{ckpt}"],
    ["train", "--model", "mf", "--data", "{data}", "--epochs", "1", "--out", "{out}", "--resume"],  # planted in <out>
])
def test_cli_refuses_malicious_checkpoint(tmp_path, argv, tiny_multibehavior):
    out = tmp_path / "run"
    out.mkdir()
    ckpt, marker = out / "checkpoint.pt", tmp_path / "pwned"
    _malicious_checkpoint(ckpt, marker)
    argv = [a.format(ckpt=ckpt, data=tiny_multibehavior, out=out) for a in argv]
    proc = _cli(argv)
    assert proc.returncode != 0
    assert not marker.exists()
    assert "refused" in proc.stderr and "Traceback" not in proc.stderr


def _cli(argv, **kw):
    env = dict(os.environ, MBREC_FAST_PROGRESS="0", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "mbrec_fast.cli", *argv], capture_output=True, text=True, env=env,
                          timeout=300, **kw)


@pytest.fixture
def tiny_multibehavior(tmp_path):
    """A data set in the canonical layout: 12 users, 10 items, view/buy."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "meta.json").write_text('{"name": "tiny", "n_users": 12, "n_items": 10, "behaviors": ["view", "buy"]}')
    rows, test = [], []
    for u in range(12):
        for j in range(4):
            rows.append(f"{u}\t{(u + j) % 10}\tview")
        rows.append(f"{u}\t{(u + 1) % 10}\tbuy")
        rows.append(f"{u}\t{(u + 2) % 10}\tbuy")
        test.append(f"{u}\t{(u + 5) % 10}")
    (folder / "interactions.tsv").write_text("\n".join(rows) + "\n")
    (folder / "test.tsv").write_text("\n".join(test) + "\n")
    return str(folder)


# ---------------------------------------------------------------- checkpoints on disk
def test_stale_temp_files_are_removed_at_next_save(tmp_path):
    path = tmp_path / "checkpoint.pt"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"checkpoint.pt.tmp-{dead.pid}"
    stale.write_bytes(b"torn")
    save_checkpoint(str(path), {"x": 1})
    assert not stale.exists() and load_checkpoint(str(path))["x"] == 1


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(str(path), {"model": {"w": torch.randn(100)}})
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_checkpoint(str(path))


# ---------------------------------------------------------------- resume
def _toy(run_dir, epochs=3, **kw):
    return _toy_run(run_dir, epochs=epochs, **kw)


def test_resume_refuses_changed_schedule_argument(tmp_path):
    _toy(tmp_path, max_steps=3)
    with pytest.raises(ValueError, match=r"--batch-size is 16 here but 8 in the checkpoint"):
        _toy(tmp_path, batch_size=16, resume=str(tmp_path / "checkpoint.pt"))


def test_resume_with_changed_args_at_the_command_line(tmp_path, tiny_multibehavior):
    out = tmp_path / "run"
    base = ["train", "--model", "mf", "--data", tiny_multibehavior, "--epochs", "2", "--out", str(out),
            "--dim", "8", "--no-progress"]
    first = _cli(base + ["--batch-size", "16", "--max-steps", "2"])
    assert first.returncode == 0, first.stderr
    proc = _cli(base + ["--batch-size", "32", "--resume"])
    assert proc.returncode != 0
    assert "--batch-size is 32 here but 16 in the checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    ok = _cli(base + ["--batch-size", "16", "--resume", "--threads", "1"])  # a free argument may change
    assert ok.returncode == 0, ok.stderr


def test_resume_with_more_epochs_extends_the_run_exactly(tmp_path, tiny_multibehavior):
    """12 epochs resumed to 100 must train what one 100-epoch run trains; fewer epochs stay refused."""
    def run(out, epochs, *extra):
        return _cli(["train", "--model", "mf", "--data", tiny_multibehavior, "--epochs", str(epochs), "--out",
                     str(tmp_path / out), "--dim", "8", "--batch-size", "16", "--valid", "none", "--no-progress",
                     *extra])
    assert run("long", 3).returncode == 0
    assert run("short", 1).returncode == 0
    extended = run("short", 3, "--resume")
    assert extended.returncode == 0, extended.stderr
    long_weights = load_checkpoint(str(tmp_path / "long" / "checkpoint.pt"))["model"]
    extended_weights = load_checkpoint(str(tmp_path / "short" / "checkpoint.pt"))["model"]
    for key in long_weights:
        assert torch.equal(long_weights[key], extended_weights[key]), key
    shortened = run("long", 2, "--resume")
    assert shortened.returncode != 0 and "--epochs is 2 here but 3 in the checkpoint" in shortened.stderr


def test_sigint_during_validation_stops_at_once_and_resumes_exactly(tmp_path):
    full, full_result = _toy(tmp_path / "full")
    state = {"calls": 0}

    def slow_evaluate_once(split):
        state["calls"] += 1
        if state["calls"] == 2:  # the second validation: interrupted, must not run to its end
            os.kill(os.getpid(), signal.SIGINT)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                time.sleep(0.01)
            raise AssertionError("validation was not interrupted")
        return {"neg_mse": 0.0}

    t0 = time.monotonic()
    _, cut = _toy(tmp_path / "cut", evaluate=slow_evaluate_once)
    assert cut.interrupted and time.monotonic() - t0 < 20
    _, result = _toy(tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint.pt"))
    last_full = load_checkpoint(str(tmp_path / "full" / "checkpoint.pt"))["model"]
    last_cut = load_checkpoint(str(tmp_path / "cut" / "checkpoint.pt"))["model"]  # best.pt differs: fake metric
    for key in last_full:
        assert torch.equal(last_full[key], last_cut[key])
    assert [r["train_loss"] for r in result.history[1:]] == [r["train_loss"] for r in full_result.history[1:]]


# ---------------------------------------------------------------- user errors at the command line
def _main(argv, capsys):
    from mbrec_fast.cli import main
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("flags, named", [
    (["--epochs", "0"], "--epochs"),
    (["--lr", "-1"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--ks", "0"], "--ks"),
    (["--batch-size", "0"], "--batch-size"),
    (["--monitor", "ndgc@10"], "--monitor"),
    (["--monitor", "ndcg@5"], "--monitor"),  # 5 is not among --ks
])
def test_bad_flag_values_give_one_line(tmp_path, capsys, tiny_multibehavior, flags, named):
    code, err = _main(["train", "--model", "mf", "--data", tiny_multibehavior, "--out", str(tmp_path), *flags], capsys)
    assert code == 2 and named in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_debug_flag_shows_the_traceback(tmp_path, tiny_multibehavior):
    from mbrec_fast.cli import main
    with pytest.raises(ValueError, match="--epochs"):
        main(["train", "--model", "mf", "--data", tiny_multibehavior, "--epochs", "0", "--debug"])


def _corrupt(folder, name, content):
    path = os.path.join(folder, name)
    if content is None:
        os.remove(path)
    else:
        with open(path, "wb") as f:
            f.write(content)
    return name


@pytest.mark.parametrize("name, content, expect", [
    ("test.tsv", b"0\t3\n1\t10\n", "test.tsv, line 2: item 10 out of range"),     # item id past n_items
    ("test.tsv", b"0\t3\n-1\t4\n", "test.tsv, line 2: user -1 out of range"),     # negative user
    ("interactions.tsv", b"0\t1\tview\n0\t2\tbuy\n12\t1\tview\n", "interactions.tsv, line 3: user 12"),
    ("interactions.tsv", b"0\t1\tview\n0\tx\tbuy\n", "interactions.tsv, line 2: item must be an integer"),
    ("interactions.tsv", b"0\t1\tview\n0\t2\tbuy\n3\t", "interactions.tsv"),          # truncated last line
    ("interactions.tsv", b"", "interactions.tsv"),                                     # empty
    ("interactions.tsv", b"0\t1\tview\n\xff\xfe\t2\tbuy\n", "interactions.tsv"),       # not UTF-8
    ("interactions.tsv", None, "interactions.tsv"),                                    # missing
    ("meta.json", b'{"n_users": 12, "n_items": 10, "behaviors": ["view", "buy"]', "meta.json: malformed JSON"),
    ("meta.json", b'{"n_users": 12, "behaviors": ["view", "buy"]}', "meta.json: missing entry 'n_items'"),
    ("meta.json", b'{"n_users": -3, "n_items": 10, "behaviors": ["view", "buy"]}', "meta.json: n_users"),
    ("meta.json", b"", "meta.json"),
])
def test_corrupted_multibehavior_data(tmp_path, capsys, tiny_multibehavior, name, content, expect):
    from mbrec_fast.data.multibehavior import load_dataset
    _corrupt(tiny_multibehavior, name, content)
    with pytest.raises((ValueError, OSError), match=None) as info:
        load_dataset(tiny_multibehavior)
    assert expect in str(info.value) or (content is None and name in str(info.value)), str(info.value)
    code, err = _main(["train", "--model", "mf", "--data", tiny_multibehavior, "--out", str(tmp_path)], capsys)
    assert code == 2 and name in err and len(err.splitlines()) == 1


def test_truncated_checkpoint_at_the_command_line(tmp_path, capsys):
    path = tmp_path / "best.pt"
    save_checkpoint(str(path), {"model_name": "mf", "model": {"w": torch.randn(1000)}})
    path.write_bytes(path.read_bytes()[:500])
    code, err = _main(["evaluate", "--checkpoint", str(path)], capsys)
    assert code == 2 and str(path) in err and len(err.splitlines()) == 1


def _sample(data_dir, name, tmp_path, edit):
    text = (data_dir / "samples" / name).read_bytes()
    path = tmp_path / name
    path.write_bytes(edit(text))
    return path


_CORRUPTIONS = {
    "empty": lambda b: b"",
    "truncated": lambda b: b[:len(b) // 3],
    "not-utf8": lambda b: b[:200] + b"\xff\xfe\xfd" + b[200:],
    "header-only": lambda b: b.split(b"\n", 1)[0] + b"\n",
    "garbled-row": lambda b: b.split(b"\n", 1)[0] + b"\nnot,a\tvalid,row\n" + b.split(b"\n", 1)[1],
}


@pytest.mark.parametrize("kind", sorted(_CORRUPTIONS))
@pytest.mark.parametrize("loader, name", [("load_movielens", "ml1m_sample.csv"),
                                          ("load_kuairand", "kuairand_sample.csv"),
                                          ("load_amazon_sequences", "amazon5_seq.tsv")])
def test_corrupted_ctr_and_sequence_files(data_dir, tmp_path, loader, name, kind):
    """Each corruption either loads (a truncated file is still a valid, shorter file) or raises one ValueError
    naming the file; never another exception type."""
    import mbrec_fast.data.ctr as ctr
    import mbrec_fast.data.sequences as seq
    fn = getattr(ctr, loader, None) or getattr(seq, loader)
    path = _sample(data_dir, name, tmp_path, _CORRUPTIONS[kind])
    try:
        fn(str(path))
    except ValueError as e:
        assert str(path) in str(e), str(e)
    else:
        assert kind in ("truncated", "garbled-row", "not-utf8")


def test_kuairand_truncated_last_line_names_the_line(data_dir, tmp_path):
    """The last line cut after a few fields used to load with NaN labels and tab; now it names the line."""
    from mbrec_fast.data.ctr import load_kuairand
    text = (data_dir / "samples" / "kuairand_sample.csv").read_text().rstrip("\n").split("\n")
    cut = text[:-1] + [",".join(text[-1].split(",")[:4])]
    path = tmp_path / "kuairand_cut.csv"
    path.write_text("\n".join(cut) + "\n")
    with pytest.raises(ValueError, match=rf"line {len(cut)}: no value in .*tab"):
        load_kuairand(str(path))


# ---------------------------------------------------------------- silent wrong numbers, bounds, exception types
def test_minus_inf_and_nan_dot_products_raise():
    from mbrec_fast.evaluator import evaluate_full_ranking, topk
    ue = torch.ones(3, 2)
    targets = (torch.tensor([0, 1, 2, 3]), torch.tensor([2, 2, 2]))
    for bad in ([-3e38, -3e38],    # -inf
                [3e38, 3e38]):      # +inf
        ie = torch.ones(5, 2)
        ie[2] = torch.tensor(bad)
        with pytest.raises(ValueError, match="overflow"):
            evaluate_full_ranking(ue, ie, None, targets, ks=(2,))
        with pytest.raises(ValueError, match="overflow"):
            topk(ue, ie, 2)
    ue_nan = torch.tensor([[3e38, 3e38, -3e38, -3e38]])  # inf - inf inside the sum
    with pytest.raises(ValueError, match="overflow"):
        topk(ue_nan, torch.ones(4, 4), 1)
    for bad in (-math.inf, math.nan):
        def score_fn(users, start, end, bad=bad):
            s = torch.zeros(len(users), end - start)
            s[:, 0] = bad
            return s
        with pytest.raises(ValueError, match="NaN or inf"):
            evaluate_full_ranking(None, None, None, targets, ks=(2,), score_fn=score_fn, n_items=5)


def test_reference_evaluator_counts_a_repeated_cutoff_once():
    from mbrec_fast.evaluator import evaluate_full_ranking
    from mbrec_fast.reference.evaluator import dense_blocked_evaluate, dense_scores, reference_evaluate
    ue, ie = torch.eye(3), torch.eye(3)
    targets = (torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2]))
    ref = reference_evaluate(dense_scores(ue, ie), None, targets, ks=(1, 1))
    assert ref["metrics"]["hr@1"] == 1.0 and len(ref["per_user"]["hr@1"]) == 3
    assert dense_blocked_evaluate(ue, ie, (torch.zeros(4, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)),
                                  targets, ks=(1, 1))["hr@1"] == 1.0
    assert evaluate_full_ranking(ue, ie, None, targets, ks=(1, 1)).metrics["hr@1"] == 1.0


def test_from_loop_refuses_what_it_cannot_reproduce():
    from torch import nn
    from mbrec_fast.nn.experts import from_loop

    def expert(eps=1e-5, tail_dropout=0.0, dropout=0.0):
        layers = [nn.Linear(4, 8), nn.LayerNorm(8, eps=eps), nn.ReLU(), nn.Dropout(dropout),
                  nn.Linear(8, 3), nn.LayerNorm(3, eps=eps), nn.ReLU()]
        return nn.Sequential(*layers, nn.Dropout(tail_dropout)) if tail_dropout else nn.Sequential(*layers)

    with pytest.raises(ValueError, match="eps"):
        from_loop([expert(1e-5), expert(1.0)])
    with pytest.raises(ValueError, match="last layer"):
        from_loop([expert(tail_dropout=0.5), expert(tail_dropout=0.5)])
    with pytest.raises(ValueError, match="Dropout rate"):
        from_loop([expert(dropout=0.1), expert(dropout=0.2)])
    from_loop([expert(), expert()])  # identical experts convert (tests/test_experts.py checks the outputs)


def test_popularity_at_extreme_scales_and_shapes():
    from mbrec_fast.sampler import InteractionGraph, sample_negatives
    g = InteractionGraph.from_arrays([0, 1], [0, 1], [0, 0], 2, 3)
    users = [1] * 4000  # user 1 may draw items 0 and 2
    for scale in (1e-300, 1e-310, 1e300, 5e307):  # all tiny (even subnormal), or summing past 1e308
        pop = torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64) * scale
        counts = sample_negatives(g, users, 1, popularity=pop).flatten().bincount(minlength=3)
        assert counts[1] == 0 and 0.6 < counts[0] / 4000 < 0.73, (scale, counts)
    with pytest.raises(ValueError, match="1-D"):
        sample_negatives(g, [0], 1, popularity=torch.ones(1, 3))


def test_one_bad_value_cannot_allocate_gigabytes():
    import pandas as pd
    from mbrec_fast.evaluator import evaluate_full_ranking
    from mbrec_fast.sampler import InteractionGraph
    targets = (torch.tensor([0, 1, 2]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="target_groups has label"):
        evaluate_full_ranking(torch.ones(2, 2), torch.ones(3, 2), None, targets, ks=(1,),
                              target_groups=torch.tensor([0, 2 ** 40]))
    table = pd.DataFrame({"user": [0, 1, 2_000_000_000], "item": [0, 1, 2], "behavior": ["buy"] * 3})
    with pytest.raises(ValueError, match="row 2: user id 2000000000"):
        InteractionGraph.from_table(table, ["buy"])


def test_raw_ops_check_csr_offsets():
    """Offsets beyond `indices` (or decreasing) are refused inside the C++ ops, below the Python wrappers."""
    from mbrec_fast.sampler import InteractionGraph
    users = torch.arange(2)
    good_ptr, idx = torch.tensor([0, 1, 2]), torch.tensor([0, 1])
    for ptr in (torch.tensor([0, 1, 50]), torch.tensor([0, 2, 1]), torch.tensor([-4, 1, 2])):
        with pytest.raises(RuntimeError, match="exclude"):
            torch.ops.mbrec_fast.topk_dot(torch.ones(2, 2), torch.ones(3, 2), users, ptr, idx, 1, 1, 1)
        with pytest.raises(RuntimeError, match="exclude"):
            torch.ops.mbrec_fast.topk_merge(torch.ones(2, 3), users, 0, ptr, idx, torch.full((2, 1), -math.inf),
                                            torch.full((2, 1), -1, dtype=torch.int64))
        with pytest.raises(RuntimeError, match="targets"):
            torch.ops.mbrec_fast.rank_metrics(torch.zeros(2, 1, dtype=torch.int64), users, ptr, idx,
                                              torch.zeros(0, dtype=torch.int64), 0, [1])
    g = InteractionGraph.from_arrays([0, 1], [0, 1], [0, 0], 2, 3)
    bad = g._indptr.clone()
    bad[0, 2] = 999
    z64, z32 = torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="indptr"):
        torch.ops.mbrec_fast.sample_negatives(bad, g._indices, users, torch.zeros(2, dtype=torch.int64),
                                              torch.zeros(1, 1, dtype=torch.int64), z64, z32, z64, z64, 3, 1, 0,
                                              True, 0, 0)
    with pytest.raises(ValueError, match="indptr offsets"):
        InteractionGraph(bad, g._indices, 2, 3)
    unsorted = torch.tensor([1, 0, 1, 0], dtype=torch.int32)
    with pytest.raises(ValueError, match="sorted and distinct"):
        InteractionGraph(torch.tensor([[0, 2, 2], [2, 4, 4], [4, 4, 4]]), unsorted, 2, 3)
    seq = torch.zeros(1, 2, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="dom_indptr"):
        torch.ops.mbrec_fast.sample_sequence_negatives(seq, torch.tensor([1]), torch.zeros(1, 2, dtype=torch.int64),
                                                       torch.tensor([0, 9]), torch.tensor([0, 1], dtype=torch.int32),
                                                       3, 1, -1, 0, 0)
    with pytest.raises(RuntimeError, match="excl_len"):
        torch.ops.mbrec_fast.sample_sequence_negatives(seq, torch.tensor([7]), torch.zeros(1, 2, dtype=torch.int64),
                                                       z64, z32, 3, 1, -1, 0, 0)
    assert InteractionGraph(g._indptr.clone(), g._indices.clone(), 2, 3).nnz() == g.nnz()
    # ids >= n_items in raw storage are trusted (not checked per call) but never used as an index: the
    # popularity walk of an exhausted pool skips them (an ASan heap-buffer-overflow before)
    from mbrec_fast.sampler import AliasTable, _level_thresholds, _never_touched_table
    a = AliasTable(torch.ones(3, dtype=torch.float64))
    out = torch.ops.mbrec_fast.sample_negatives(
        torch.tensor([[0, 4], [4, 8], [8, 8]]), torch.tensor([0, 1, 2, 1000] * 2, dtype=torch.int32),
        torch.tensor([0]), torch.tensor([0]), _level_thresholds(_never_touched_table(1)), a.threshold, a.alias,
        a.weights_q, a.prefix, 3, 1, 0, True, 0, 0)
    assert out.tolist() == [[-1]]


def test_other_bad_arguments_raise_value_or_type_errors():
    from mbrec_fast.evaluator import evaluate_full_ranking
    from mbrec_fast.sampler import InteractionGraph, sample_sequence_negatives
    with pytest.raises(ValueError, match="n_behaviors"):
        InteractionGraph.from_arrays([0], [0], [0], 1, 1, n_behaviors=65)
    with pytest.raises(ValueError, match="n_items"):
        sample_sequence_negatives(torch.zeros(1, 2, dtype=torch.int64), 2 ** 31, 1)
    with pytest.raises(TypeError, match="item_domain"):
        sample_sequence_negatives(torch.zeros(1, 2, dtype=torch.int64), 4, 1, item_domain=torch.zeros(4))
    empty = (torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ValueError, match="targets.indptr"):
        evaluate_full_ranking(None, None, None, empty, ks=(1,), n_items=3,
                              score_fn=lambda u, a, b: torch.zeros(len(u), b - a))
    assert InteractionGraph.from_arrays([], [], [], 3, 3).nnz() == 0
