"""Multi-domain multi-task CTR: loaders, synthetic generator, models (M3oE, M3REC, baselines), bi-level step, CLI."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from mbrec_fast.data.ctr import load_kuairand, load_movielens, make_synthetic_ctr
from mbrec_fast.metrics import ctr_metrics
from mbrec_fast.models.multidomain import M3oE, M3REC, MODEL_NAMES, PerGroup, bce_loss, build_model
from mbrec_fast.training.multidomain import build_parser, make_step, predict, run_training

torch.set_num_threads(1)

FORMS = [(m, "mdmt") for m in MODEL_NAMES] + [(m, s) for m in ("sharedbottom", "mmoe", "ple", "star") for s in ("mtl", "mdl")]


@pytest.fixture(scope="module")
def small():
    return make_synthetic_ctr(3000, n_users=200, n_items=100, seed=3)


# ------------------------------------------------------------------------------------------------ data
def test_movielens_sample_layout(data_dir):
    # domains by age group, click = rating > 3, like = rating > 4, one row per rating
    data = load_movielens(data_dir / "samples" / "ml1m_sample.csv")
    raw = pd.read_csv(data_dir / "samples" / "ml1m_sample.csv")
    assert len(data) == len(raw) and data.n_domains == 3 and data.task_names == ["click", "like"]
    expect_dom = raw["age"].map(lambda a: 0 if a in (1, 18) else (1 if a == 25 else 2)).to_numpy()
    assert np.array_equal(data.domain.numpy(), expect_dom)
    assert np.array_equal(data.labels[:, 0].numpy(), (raw["rating"] > 3).to_numpy().astype(np.float32))
    assert np.array_equal(data.labels[:, 1].numpy(), (raw["rating"] > 4).to_numpy().astype(np.float32))
    for f, dim in enumerate(data.field_dims):
        assert int(data.sparse[:, f].max()) < dim and int(data.sparse[:, f].min()) >= 0
    assert data.sparse_names[data.item_field] == "movie_id" and data.sparse_names[data.user_field] == "user_id"


def test_kuairand_sample_layout(data_dir):
    # domain = tab, tasks click and long view (play >= min(duration, 18 s)); tab groups remap domains
    path = data_dir / "samples" / "kuairand_sample.csv"
    data = load_kuairand(path)
    raw = pd.read_csv(path)
    assert len(data) == len(raw) and data.task_names == ["click", "long_view"]
    assert np.array_equal(data.labels[:, 0].numpy(), raw["is_click"].to_numpy().astype(np.float32))
    lv = raw["play_time_ms"].to_numpy() >= np.minimum(raw["duration_ms"].to_numpy(), 18_000)
    assert np.array_equal(data.labels[:, 1].numpy(), lv.astype(np.float32))
    tabs = sorted(raw["tab"].unique())
    assert data.n_domains == len(tabs)
    grouped = load_kuairand(path, tab_groups=[(99,), tuple(int(t) for t in tabs)])
    assert grouped.n_domains == 2 and bool((grouped.domain == 1).all())


def test_loader_errors(tmp_path):
    # missing file and missing columns give clear errors
    with pytest.raises(FileNotFoundError):
        load_movielens(tmp_path / "nope.csv")
    pd.DataFrame({"user_id": [1], "movie_id": [2]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match="lacks columns"):
        load_movielens(tmp_path / "bad.csv")


def test_synthetic_seeded_and_imbalanced():
    # same seed -> same data; major domain holds ~90 %; true_probs are the Bayes predictor
    a = make_synthetic_ctr(20000, seed=1)
    b = make_synthetic_ctr(20000, seed=1)
    c = make_synthetic_ctr(20000, seed=2)
    assert torch.equal(a.sparse, b.sparse) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.labels, c.labels)
    frac = a.domain_counts()[1] / len(a)
    assert 0.88 < frac < 0.92
    oracle = ctr_metrics(a.true_probs, a.labels, a.domain, 3)
    assert oracle["auc"] > 0.75  # planted structure is strong enough to learn
    balanced = make_synthetic_ctr(9000, domain_probs=[1, 1, 1], seed=0)
    assert max(balanced.domain_counts()) < 3300
    with pytest.raises(ValueError):
        make_synthetic_ctr(100, major_domain_frac=1.5)


def test_batches_deterministic_and_cover_all(small):
    # the order is a function of (seed, epoch); every row appears once per epoch; domain kept per sample
    def rows(epoch, seed=0):
        return torch.cat([b["sparse"][:, 0] * 1000 + b["sparse"][:, 1] for b in small.batches(256, seed=seed, epoch=epoch)])
    assert torch.equal(rows(0), rows(0))
    assert not torch.equal(rows(0), rows(1))
    batches = list(small.batches(256, seed=0, epoch=0))
    assert len(batches) == len(small.batches(256)) == math.ceil(len(small) / 256)
    assert sum(len(b["domain"]) for b in batches) == len(small)
    assert sorted(torch.cat([b["labels"][:, 0] for b in batches]).tolist()) == sorted(small.labels[:, 0].tolist())


# ------------------------------------------------------------------------------------------------ models
@pytest.mark.parametrize("name,setting", FORMS)  # every model in every form of the M3oE table
def test_shapes_gradients_and_fused_matches_loop(small, name, setting):
    torch.manual_seed(0)
    model = build_model(name, small, setting=setting, emb_dim=8, expert_dim=16)
    batch = next(iter(small.batches(64, seed=0)))
    model.eval()  # M3REC's id dropout is off in eval
    out = model(batch)
    assert out.shape == (64, small.n_tasks) and bool(torch.isfinite(out).all())
    bce_loss(out, batch["labels"]).backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    # every parameter gets a gradient (M3oE's fusion scalars too: they are in the graph)
    assert set(fused_grads) == {n for n, _ in model.named_parameters()}
    model.zero_grad()
    model.set_impl("loop")
    out_loop = model(batch)
    torch.testing.assert_close(out, out_loop, rtol=1e-4, atol=1e-5)
    bce_loss(out_loop, batch["labels"]).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(fused_grads[n], p.grad, rtol=1e-3, atol=1e-5, msg=n)


def test_pergroup_forms_are_independent(small):
    # mtl: one member per domain, a domain's samples never touch another member
    model = build_model("mmoe", small, setting="mtl", emb_dim=8, expert_dim=16)
    assert isinstance(model, PerGroup) and len(model.members) == small.n_domains
    batch = next(iter(small.batches(128, seed=0)))
    only_d1 = {k: v[batch["domain"] == 1] for k, v in batch.items()}
    bce_loss(model(only_d1), only_d1["labels"]).backward()
    assert all(p.grad is None for p in model.members[0].parameters())
    assert any(p.grad is not None for p in model.members[1].parameters())


@pytest.mark.parametrize("name,setting", [(m, "mdmt") for m in MODEL_NAMES] + [("mmoe", "mtl"), ("star", "mdl")])
def test_learns_planted_structure(name, setting):
    # each model beats the constant predictor (AUC 0.5) by a clear margin on held-out synthetic data
    data = make_synthetic_ctr(12000, n_users=300, n_items=150, seed=11)
    train, test = data.split((0.8, 0.2), seed=0)
    torch.manual_seed(0)
    model = build_model(name, data, setting=setting, emb_dim=8, expert_dim=32)
    if isinstance(model, M3REC):
        model.fit_item_counts(train.sparse[:, model.item_field])
    params = model.main_parameters() if isinstance(model, M3oE) else model.parameters()
    opt = torch.optim.Adam(params, lr=3e-3)
    for epoch in range(3):
        for batch in train.batches(256, seed=0, epoch=epoch):
            opt.zero_grad()
            bce_loss(model(batch), batch["labels"]).backward()
            opt.step()
    m = ctr_metrics(predict(model, test), test.labels, test.domain, test.n_domains)
    const_ll = ctr_metrics(train.labels.mean(0).expand_as(test.labels).contiguous(), test.labels, test.domain, 3)["logloss"]
    assert m["auc"] > 0.68, m["auc"]
    assert m["logloss"] < const_ll - 0.03


# ------------------------------------------------------------------------------------------------ M3oE bi-level
def test_m3oe_parameter_sets_and_ablations(small):
    # fusion scalars are exactly α_d, α_t, β_d, β_t; the ablations remove modules / freeze the scalars
    model = build_model("m3oe", small)
    fusion = {id(p) for p in model.fusion_parameters()}
    assert len(fusion) == 4 and not fusion & {id(p) for p in model.main_parameters()}
    assert len(fusion) + len(model.main_parameters()) == len(list(model.parameters()))
    fixed = build_model("m3oe", small, fixed_fusion=True)
    assert fixed.fusion_parameters() == [] and float(torch.sigmoid(fixed.alpha_domain)[0]) == 0.5
    no_dom = build_model("m3oe", small, use_domain_module=False)
    no_task = build_model("m3oe", small, use_task_module=False)
    assert no_dom.domain_experts is None and no_task.task_experts is None
    batch = next(iter(small.batches(32)))
    assert no_dom(batch).shape == no_task(batch).shape == (32, 2)


def test_bilevel_step_moves_only_fusion_scalars(small):
    # main step: fusion scalars unchanged; held-out step: only fusion scalars change
    train, valid = small.split((0.8, 0.2), seed=0)
    torch.manual_seed(0)
    model = build_model("m3oe", small, emb_dim=8, expert_dim=16)
    main_opt = torch.optim.Adam(model.main_parameters(), lr=1e-2)
    fusion_opt = torch.optim.Adam(model.fusion_parameters(), lr=1e-2)
    main_ids = {id(p) for g in main_opt.param_groups for p in g["params"]}
    assert not main_ids & {id(p) for p in model.fusion_parameters()}
    counter = {"steps": 0, "fusion_steps": 0}
    step = make_step(model, main_opt, fusion_opt, valid, batch_size=64, bilevel_every=2, seed=0, counter=counter)
    batches = iter(train.batches(64, seed=0))

    def snapshot():
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    fusion_names = set(M3oE._FUSION)
    before = snapshot()
    logs = step(next(batches))  # step 1: main only
    after = snapshot()
    assert "fusion_loss" not in logs
    assert all(torch.equal(before[n], after[n]) for n in fusion_names)
    assert any(not torch.equal(before[n], after[n]) for n in before if n not in fusion_names)
    # step 2: main step then the held-out fusion step; isolate the fusion step by freezing the main lr
    for g in main_opt.param_groups:
        g["lr"] = 0.0
    main_opt.state.clear()
    before = snapshot()
    logs = step(next(batches))
    after = snapshot()
    assert "fusion_loss" in logs and counter["fusion_steps"] == 1
    assert all(not torch.equal(before[n], after[n]) for n in fusion_names)
    assert all(torch.equal(before[n], after[n]) for n in before if n not in fusion_names)


# ------------------------------------------------------------------------------------------------ CLI
@pytest.mark.parametrize("model", MODEL_NAMES)  # every model through `mbrec-fast train` on the MovieLens sample
def test_cli_smoke_movielens(data_dir, tmp_path, model):
    from mbrec_fast.cli import main
    run = tmp_path / model
    rc = main(["train", "--model", model, "--data", "movielens", "--data-path", str(data_dir / "samples" / "ml1m_sample.csv"),
               "--epochs", "2", "--batch-size", "64", "--run-dir", str(run), "--threads", "1"])
    assert rc == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["model"] == model and "auc" in metrics["test"] and "logloss" in metrics["test"]
    assert (run / "curves.png").stat().st_size > 0 and (run / "best.pt").exists()
    if model == "m3oe":  # learned fusion weights are written next to the metrics
        fusion = json.loads((run / "fusion.json").read_text())
        assert set(fusion) == {"alpha_domain", "alpha_task", "beta_domain", "beta_task"}
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--output", str(run / "eval.json")]) == 0
    again = json.loads((run / "eval.json").read_text())
    assert again["logloss"] == pytest.approx(metrics["test"]["logloss"], rel=1e-6)


def test_cli_smoke_kuairand_and_setting(data_dir, tmp_path):
    # KuaiRand sample through an -MTL baseline
    from mbrec_fast.cli import main
    rc = main(["train", "--model", "ple", "--setting", "mtl", "--data", "kuairand",
               "--data-path", str(data_dir / "samples" / "kuairand_sample.csv"), "--epochs", "1", "--batch-size", "64",
               "--run-dir", str(tmp_path / "k"), "--threads", "1"])
    assert rc == 0 and (tmp_path / "k" / "metrics.json").exists()


def test_resume_is_exact(tmp_path):
    # interrupted after 5 steps and resumed == uninterrupted (M3oE: bi-level counter and both optimizers restored)
    common = ["--model", "m3oe", "--data", "synthetic", "--synthetic-samples", "1500", "--epochs", "2", "--batch-size", "128",
              "--bilevel-every", "3", "--threads", "1"]
    full = run_training(build_parser().parse_args(common + ["--run-dir", str(tmp_path / "a")]), progress=False)
    part = run_training(build_parser().parse_args(common + ["--run-dir", str(tmp_path / "b"), "--max-steps", "5"]), progress=False)
    assert part["interrupted"]
    resumed = run_training(build_parser().parse_args(common + ["--run-dir", str(tmp_path / "b"), "--resume",
                                                               str(tmp_path / "b" / "checkpoint.pt")]), progress=False)
    assert resumed["test"]["auc"] == pytest.approx(full["test"]["auc"], abs=1e-9)
    assert resumed["test"]["logloss"] == pytest.approx(full["test"]["logloss"], abs=1e-9)
