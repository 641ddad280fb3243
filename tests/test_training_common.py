"""The shared trainer: exact resume after an interruption, early stopping, outputs of a run."""
import json
import os

import pytest
import torch

from mbrec_fast.training.checkpoint import load_checkpoint, save_checkpoint
from mbrec_fast.training.common import Trainer, format_table, make_adam, seed_everything


def _toy_run(run_dir, epochs=4, max_steps=None, resume=None, patience=None, flat_metric=False, batch_size=8,
             evaluate=None, eval_every=1):
    """A regression model with dropout (so the global RNG matters) and seeded per-epoch batches."""
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
        return {"neg_mse": 0.0 if flat_metric else -((model(x) - y) ** 2).mean().item()}

    trainer = Trainer(model, {"main": opt}, str(run_dir), epochs=epochs, eval_every=eval_every, monitor="neg_mse",
                      model_name="toy",
                      max_steps=max_steps, patience=patience, progress=False,
                      config={"batch_size": batch_size, "threads": None})
    return model, trainer.fit(batches, step, evaluate or default_evaluate, resume=resume)


@pytest.mark.parametrize("stop_after", [
    5,    # mid-epoch: the resumed run must skip the consumed batches and restore the dropout RNG
    16,   # exactly at an epoch boundary
])
def test_resume_is_bit_exact(tmp_path, stop_after):
    full, full_result = _toy_run(tmp_path / "full")
    _, partial = _toy_run(tmp_path / "cut", max_steps=stop_after)
    assert partial.interrupted and partial.test is None
    resumed, resumed_result = _toy_run(tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint.pt"))
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert resumed_result.test == full_result.test
    assert [r["train_loss"] for r in resumed_result.history] == [r["train_loss"] for r in full_result.history]


def test_outputs_and_best_weights(tmp_path):
    _, result = _toy_run(tmp_path)
    for name in ("checkpoint.pt", "best.pt", "history.json", "metrics.json", "curves.png"):
        assert (tmp_path / name).is_file(), name
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["best_epoch"] == result.best_epoch and summary["test"] == result.test
    assert len(json.loads((tmp_path / "history.json").read_text())) == result.epochs_run == 4
    assert set(result.timings) >= {"data", "step", "eval", "wall"}


def test_validates_every_eval_every_epochs_and_after_the_last(tmp_path):
    """eval_every = 3 over 4 epochs: validation after epochs 3 and 4 (the last epoch is always a candidate, and a
    schedule shorter than eval_every still gets its best.pt)."""
    _, result = _toy_run(tmp_path / "a", epochs=4, eval_every=3)
    assert [r["epoch"] for r in result.history if "valid_neg_mse" in r] == [3, 4]
    _, result = _toy_run(tmp_path / "b", epochs=1, eval_every=2)
    assert [r["epoch"] for r in result.history if "valid_neg_mse" in r] == [1]
    assert (tmp_path / "b" / "best.pt").is_file()


def test_early_stopping_counts_evaluations_without_improvement(tmp_path):
    _, result = _toy_run(tmp_path, epochs=10, patience=2, flat_metric=True)
    assert result.best_epoch == 1 and result.epochs_run == 3


def test_patience_waits_while_a_top_k_monitor_is_zero(tmp_path):
    """A top-K monitor at 0 (no validation target in any top K yet) is no signal: patience starts counting at the
    first non-zero value. Other monitors count from the start (the flat-metric test above)."""
    values = iter([0.0, 0.0, 0.0, 0.0, 0.2, 0.1, 0.3, 0.3, 0.3, 0.3])
    seed_everything(0)
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), 0.1)
    trainer = Trainer(model, {"main": opt}, str(tmp_path), epochs=10, patience=2, monitor="ndcg@10",
                      model_name="toy", progress=False, config={"batch_size": 1, "threads": None})
    result = trainer.fit(lambda epoch: [0], lambda idx: {"loss": 0.0}, lambda split: {"ndcg@10": next(values) if split == "valid" else 0.5})
    assert result.best_epoch == 7 and result.epochs_run == 9             # four zeros not counted; 0.3 at 7, two flat
    values = iter([0.0, 0.0, 0.0, 0.0])
    result = Trainer(model, {"main": opt}, str(tmp_path / "b"), epochs=4, patience=1, monitor="ndcg@10",
                     model_name="toy", progress=False, config={"batch_size": 1, "threads": None}).fit(
        lambda epoch: [0], lambda idx: {"loss": 0.0}, lambda split: {"ndcg@10": next(values) if split == "valid" else 0.5})
    assert result.epochs_run == 4 and result.best_epoch == 1                # ran to `epochs`, best.pt from epoch 1


def test_make_adam_is_fused_and_matches_adam():
    """The families' Adam is torch's fused one on the CPU and follows the default Adam's updates."""
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(50, 8)), torch.nn.Parameter(torch.zeros(50, 8))
    b.data.copy_(a.data)
    fused, plain = make_adam([a], lr=1e-2, weight_decay=1e-3), torch.optim.Adam([b], lr=1e-2, weight_decay=1e-3)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    for step in range(5):
        grad = torch.randn(50, 8, generator=torch.Generator().manual_seed(step))
        a.grad, b.grad = grad.clone(), grad.clone()
        fused.step()
        plain.step()
    torch.testing.assert_close(a.data, b.data, rtol=1e-5, atol=1e-6)


def test_resume_rejects_other_model(tmp_path):
    save_checkpoint(str(tmp_path / "other.pt"), {"model_name": "someone_else"})
    with pytest.raises(ValueError, match="someone_else"):
        _toy_run(tmp_path / "x", resume=str(tmp_path / "other.pt"))


def test_checkpoint_rejects_foreign_file(tmp_path):
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not an mbrec_fast checkpoint"):
        load_checkpoint(str(tmp_path / "foreign.pt"))


def test_format_table():
    text = format_table([{"k": 10, "hr": 0.5}, {"k": 20, "hr": 0.75}])
    assert text.splitlines()[0].split() == ["k", "hr"] and "0.7500" in text
