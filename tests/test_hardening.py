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
