"""Hardening (issue 12): checkpoint safety, resume refusals, interruptible validation, CLI user errors,
corrupted data files, and the bounds on what one bad value can allocate."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mbrec_fast.training.checkpoint import load_checkpoint, save_checkpoint
from mbrec_fast.training.common import Trainer, seed_everything


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
def _toy(run_dir, batch_size=8, max_steps=None, resume=None, evaluate=None, epochs=3):
    seed_everything(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    y = x.sum(1, keepdim=True)

    def batches(epoch):
        perm = torch.randperm(64, generator=torch.Generator().manual_seed(100 + epoch))
        return [perm[i:i + batch_size] for i in range(0, 64, batch_size)]

    def step(idx):
        opt.zero_grad()
        loss = ((model(x[idx]) - y[idx]) ** 2).mean()
        loss.backward()
        opt.step()
        return {"loss": loss.item()}

    def default_evaluate(split):
        return {"neg_mse": -((model(x) - y) ** 2).mean().item()}

    trainer = Trainer(model, {"main": opt}, str(run_dir), epochs=epochs, monitor="neg_mse", model_name="toy",
                      config={"batch_size": batch_size, "threads": None}, max_steps=max_steps, progress=False)
    return model, trainer.fit(batches, step, evaluate or default_evaluate, resume=resume)


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
