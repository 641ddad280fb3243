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

FORMS = [(m, "mdmt") for m in MODEL_NAMES] + [(m, s) for m in ("sharedbottom", "mmoe", "ple", "star", "adatt") for s in ("mtl", "mdl")]


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
    model.set_expert_impl("loop")
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


# ------------------------------------------------------------------------------------------------ ml100k + any table
def test_ml100k_protocol(data_dir):
    # the M3oE MovieLens protocol on MovieLens-100K: 3 age domains, click = rating > 3, like = rating > 4
    from mbrec_fast.data.ctr import load_ml100k
    data = load_ml100k(data_dir / "ml100k")
    raw = pd.read_csv(data_dir / "ml100k" / "u.data", sep="\t", header=None, names=["u", "i", "r", "t"])
    users = pd.read_csv(data_dir / "ml100k" / "u.user", sep="|", header=None, names=["u", "age", "g", "o", "z"])
    age = raw["u"].map(users.set_index("u")["age"]).to_numpy()
    assert len(data) == 100_000 and data.n_domains == 3 and data.task_names == ["click", "like"]
    expect = np.where(age < 25, 0, np.where(age < 35, 1, 2))
    assert np.array_equal(data.domain.numpy(), expect)  # rows keep u.data's order
    assert data.domain_counts() == [26551, 35444, 38005]  # 26.6 % / 35.4 % / 38.0 %
    assert np.array_equal(data.labels[:, 0].numpy(), (raw["r"] > 3).to_numpy().astype(np.float32))
    assert np.array_equal(data.labels[:, 1].numpy(), (raw["r"] > 4).to_numpy().astype(np.float32))
    assert data.labels.mean(0).tolist() == pytest.approx([0.5537, 0.2120], abs=1e-4)
    assert data.sparse_names == ["user_id", "movie_id", "gender", "age_group", "occupation", "zip", "genre", "year"]
    assert data.field_dims[:2] == [943, 1682] and data.n_dense == 19
    # the default split slices the table in row order (the official code's sequential 8:1:1)
    train, valid, test = data.split((0.8, 0.1, 0.1))
    assert (len(train), len(valid), len(test)) == (80_000, 10_000, 10_000)
    assert torch.equal(test.timestamp, torch.from_numpy(raw["t"].to_numpy()[90_000:].copy()))
    early = data.split((0.8, 0.1, 0.1), order="time")[0]
    assert int(early.timestamp.max()) <= int(data.split((0.8, 0.1, 0.1), order="time")[2].timestamp.min())


def _table(n=60, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"user": rng.integers(0, 10, n), "item": rng.integers(0, 20, n), "cat": rng.integers(0, 3, n),
                         "price": rng.random(n), "scenario": rng.choice(["app", "web"], n),
                         "click": rng.integers(0, 2, n), "buy": rng.integers(0, 2, n)})


@pytest.mark.parametrize("suffix", ["csv", "tsv", "parquet"])
def test_ratings_table_formats(tmp_path, suffix):
    from mbrec_fast.data.ctr import load_ratings_table
    df = _table()
    path = tmp_path / f"t.{suffix}"
    if suffix == "parquet":
        df.to_parquet(path)
    else:
        df.to_csv(path, sep="\t" if suffix == "tsv" else ",", index=False)
    data = load_ratings_table(path, domain_col="scenario", label_cols=["click", "buy"], sparse_cols=["user", "item", "cat"],
                              dense_cols=["price"], item_cols=["item", "cat", "price"])
    assert data.n_domains == 2 and data.domain_names == ["scenario=app", "scenario=web"]
    assert np.array_equal(data.domain.numpy(), (df["scenario"] == "web").to_numpy().astype(np.int64))
    assert np.array_equal(data.labels.numpy(), df[["click", "buy"]].to_numpy().astype(np.float32))
    assert data.item_sparse_fields == [1, 2] and data.item_dense_cols == [0] and data.user_field == 0


def test_ratings_table_bad_inputs(tmp_path):
    # every bad input names its column: non-0/1 labels, a missing feature column, an unseen domain at test time
    from mbrec_fast.data.ctr import load_ratings_table
    kw = dict(domain_col="scenario", label_cols=["click"], sparse_cols=["user", "item"])
    bad = _table().assign(click=lambda d: d["click"] * 2)
    with pytest.raises(ValueError, match="label column 'click' must hold only 0/1"):
        load_ratings_table(bad, **kw)
    with pytest.raises(ValueError, match="column 'brand' is missing"):
        load_ratings_table(_table(), **dict(kw, sparse_cols=["user", "item", "brand"]))
    train, test = _table(seed=1), _table(seed=2)
    test.loc[3, "scenario"] = "tv"
    with pytest.raises(ValueError, match="domain column 'scenario' of the test data .* \\['tv'\\]"):
        load_ratings_table([train, train, test], **kw)
    with pytest.raises(ValueError, match="dense column 'scenario' must be numeric"):
        load_ratings_table(_table(), **dict(kw, dense_cols=["scenario"]))
    with pytest.raises(FileNotFoundError):
        load_ratings_table(tmp_path / "none.csv", **kw)
    # train / valid / test files: the split keeps them
    parts = load_ratings_table([train, _table(seed=3), _table(n=30, seed=4)], **kw)
    assert [len(p) for p in parts.split((0.8, 0.1, 0.1), order="sequential")] == [60, 60, 30]


def test_cli_table_format(tmp_path):
    # `--data FILE --format table` trains on any table
    from mbrec_fast.cli import main
    path = tmp_path / "t.csv"
    _table(n=400).to_csv(path, index=False)
    rc = main(["train", "--model", "mmoe", "--data", str(path), "--format", "table", "--domain-col", "scenario",
               "--label-cols", "click,buy", "--sparse-cols", "user,item,cat", "--dense-cols", "price", "--epochs", "1",
               "--batch-size", "64", "--run-dir", str(tmp_path / "r"), "--threads", "1"])
    assert rc == 0 and (tmp_path / "r" / "metrics.json").exists()


# ------------------------------------------------------------------------------------------------ losses / fusion
def test_balanced_loss_hand_computed():
    # 3 samples of domain 0, 1 of domain 1, 2 domains x 2 tasks: sum over cells of the cell's mean BCE
    from mbrec_fast.models.multidomain import balanced_bce_loss
    logits = torch.tensor([[0.0, 1.0], [2.0, -1.0], [-3.0, 0.5], [1.5, 0.0]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 1.0]])
    domain = torch.tensor([0, 0, 0, 1])

    def bce(z, y):
        p = 1 / (1 + math.exp(-z))
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))

    expect = 0.0
    for d in (0, 1):
        rows = [i for i in range(4) if int(domain[i]) == d]
        for t in (0, 1):
            expect += sum(bce(float(logits[i, t]), float(labels[i, t])) for i in rows) / len(rows)
    assert float(balanced_bce_loss(logits, labels, domain, 3)) == pytest.approx(expect, rel=1e-6)  # domain 2 empty
    pooled = sum(bce(float(logits[i, t]), float(labels[i, t])) for i in range(4) for t in (0, 1)) / 4
    assert float(bce_loss(logits, labels)) == pytest.approx(pooled, rel=1e-6)


def test_official_fusion_scalars_move_every_step(small):
    # official training: the main Adam holds α/β (raw init 1, σ = 0.731) and moves them at every step
    from mbrec_fast.training.multidomain import _optimizers
    torch.manual_seed(0)
    model = build_model("m3oe", small, emb_dim=8, expert_dim=16)
    assert [p.numel() for p in model.fusion_parameters()] == [1, 1, 1, 1]
    assert all(p.item() == 1.0 for p in model.fusion_parameters())
    args = build_parser().parse_args(["--model", "m3oe", "--fusion-train", "joint", "--lr", "1e-2", "--weight-decay", "0"])
    main_opt, fusion_opt = _optimizers(model, args)
    assert fusion_opt is None
    counter = {"steps": 0, "fusion_steps": 0}
    step = make_step(model, main_opt, None, None, batch_size=64, bilevel_every=1, seed=0, counter=counter, loss="balanced")
    for batch in list(small.batches(64, seed=0))[:4]:
        before = [p.detach().clone() for p in model.fusion_parameters()]
        main_opt.zero_grad()
        step(batch)
        assert all(not torch.equal(b, p) for b, p in zip(before, model.fusion_parameters()))
    # bilevel (the paper): a separate optimizer, fusion step on a TRAINING batch; the main one never holds α/β
    args = build_parser().parse_args(["--model", "m3oe", "--fusion-train", "bilevel", "--lr", "1e-2", "--weight-decay", "0",
                                      "--fusion-lr", "1e-2"])
    main_opt, fusion_opt = _optimizers(model, args)
    assert not {id(p) for g in main_opt.param_groups for p in g["params"]} & {id(p) for p in model.fusion_parameters()}
    assert {id(p) for g in fusion_opt.param_groups for p in g["params"]} == {id(p) for p in model.fusion_parameters()}


@pytest.mark.parametrize("kw", [dict(fusion="concat"), dict(fusion="gated"), dict(variant="v1"),
                                dict(variant="official", n_shared=1)])
def test_m3oe_variants_fused_matches_loop(small, kw):
    torch.manual_seed(0)
    model = build_model("m3oe", small, emb_dim=8, expert_dim=16, rep_dim=24, star_dim=32, **kw)
    batch = next(iter(small.batches(64, seed=0)))
    out = model(batch)
    bce_loss(out, batch["labels"]).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == {n for n, _ in model.named_parameters()}  # no dead parameter in any variant
    if kw.get("fusion") == "gated":
        assert model.fusion_parameters() == [] and model.shared.n_experts == 4 + 3 + 2
    model.zero_grad()
    model.set_expert_impl("loop")
    torch.testing.assert_close(model(batch), out, rtol=1e-4, atol=1e-5)


def test_m3oe_official_architecture(small):
    # STAR layer without activation, Linear-LN-ReLU mapping plus skip, LN in the towers, 4 shared experts
    model = build_model("m3oe", small, emb_dim=8)
    assert model.star.activation == "none" and model.star.ln_weight is None
    assert model.skip is not None and model.mapping.ln_weight is not None
    assert model.tower.layers[0].ln_weight is not None and model.shared.n_experts == 4
    v1 = build_model("m3oe", small, emb_dim=8, variant="v1")
    assert v1.star.activation == "relu" and v1.skip is None and v1.shared.n_experts == 1
    assert [p.numel() for p in v1.fusion_parameters()] == [3, 2, 3, 2]
    # the gate reads the detached representation: same forward as an undetached twin, but the representation's
    # gradient lacks the gate path
    twin = build_model("m3oe", small, emb_dim=8, detach_gate=False)
    twin.load_state_dict(model.state_dict())
    batch = next(iter(small.batches(32, seed=0)))
    r0 = model.representation(batch).detach().requires_grad_(True)
    grads = []
    for m in (model, twin):
        m.representation = lambda _batch: r0
        out = m(batch)
        grads.append(torch.autograd.grad(out.sum(), [r0, m.shared_gate_weight]))
    torch.testing.assert_close(model(batch), twin(batch))
    assert not torch.allclose(grads[0][0], grads[1][0]) and grads[0][1].abs().sum() > 0


def test_adatt_formula(small):
    # head h: (softmax(x G_h) + native residual on its own experts) mixing every expert's output
    torch.manual_seed(0)
    model = build_model("adatt", small, emb_dim=8, expert_dim=16, n_specific=2)
    batch = next(iter(small.batches(16, seed=0)))
    x = model.embedding(batch["sparse"], batch["dense"])
    outs = model.experts.experts_out(x)  # [B, E, H]
    assert outs.shape[1] == 6 * 2 + 2
    sparse = build_model("adatt-sp", small, emb_dim=8, expert_dim=16)
    assert sparse.experts.n_experts == 6 and sparse.n_shared == 0
    heads = model.heads(batch["domain"])
    for t in range(small.n_tasks):
        for b in range(16):
            h = int(heads[t, b])
            g = torch.softmax(x[b] @ model.gate_weight[h] + model.gate_bias[h], -1)
            g[2 * h:2 * h + 2] += model.native_weight[h]
            mixed = g @ outs[b]
            logit = model.tower(mixed.unsqueeze(0), torch.tensor([h]))
            torch.testing.assert_close(model(batch)[b, t], logit[0, 0], rtol=1e-4, atol=1e-5)
            break


def test_m3rec_cold_item_split_and_generator_ablation(small):
    from mbrec_fast.training.multidomain import cold_item_split
    items = small.sparse[:, small.item_field]
    counts = torch.bincount(items)
    k = int(counts[counts > 0].min()) + 2  # the rarest items
    train, valid, test, cold = cold_item_split(small, k)
    cold_items = set(torch.nonzero((counts <= k) & (counts > 0)).flatten().tolist())
    assert 0 < len(cold_items) < 50
    assert set(cold.sparse[:, small.item_field].tolist()) == cold_items
    assert not set(train.sparse[:, small.item_field].tolist()) & cold_items
    assert len(train) + len(valid) + len(test) + len(cold) == len(small)
    with pytest.raises(ValueError, match="cold_items"):
        cold_item_split(small, 0)
    model = build_model("m3rec", small, emb_dim=8, expert_dim=16)
    model.fit_item_counts(train.sparse[:, small.item_field])
    assert float(model.item_seen[sorted(cold_items)].sum()) == 0  # cold items use the generated embedding alone
    plain = build_model("m3rec", small, emb_dim=8, expert_dim=16, use_generator=False)
    assert plain.generator is None and plain(next(iter(cold.batches(8)))).shape == (8, 2)


@pytest.mark.parametrize("name,corrupt,message", [
    ("u.data", lambda b: b + b"196\t242\n", "u.data.*NA values"),                    # truncated row
    ("u.data", lambda b: b + b"x\t1\t3\t5\n", "u.data.*invalid literal"),             # garbled id
    ("u.user", lambda b: b.replace(b"1|24|", b"1|abc|", 1), "u.user.*invalid literal"),  # garbled age
    ("u.data", lambda b: b[:len(b) // 2] + b"\xff\xfe\n", "u.data.*not UTF-8"),      # binary garbage
])
def test_corrupted_ml100k_names_the_file(data_dir, tmp_path, name, corrupt, message):
    # a damaged copy of MovieLens-100K: one ValueError naming the damaged file, never NaNs or a TypeError later
    import shutil
    from mbrec_fast.data.ctr import load_ml100k
    copy = tmp_path / "ml100k"
    shutil.copytree(data_dir / "ml100k", copy)
    (copy / name).write_bytes(corrupt((copy / name).read_bytes()))
    with pytest.raises(ValueError, match=message):
        load_ml100k(copy)


# ------------------------------------------------------------------------------------------------ model defaults
def test_model_options_default_to_the_constructors_and_record_the_old_values():
    """--emb-dim, --expert-dim, ... parse to None ("the model's default"); resolved, they are the constructor
    defaults, and the recorded config carries the values earlier runs recorded (old checkpoints still resume)."""
    from mbrec_fast.models.base import constructor_defaults
    from mbrec_fast.models.multidomain import MMoE, _BASE
    from mbrec_fast.training.multidomain import MODEL_OPTIONS, resolve_model_defaults
    recorded = dict(emb_dim=16, expert_dim=64, n_experts=4, n_shared=None, cold_prob=0.1, m3oe_variant="official",
                    m3oe_fusion="add")
    for name in MODEL_NAMES:
        args = build_parser().parse_args(["--model", name])
        assert all(getattr(args, dest) is None for dest in MODEL_OPTIONS), name
        resolve_model_defaults(args)
        assert {k: getattr(args, k) for k in recorded} == recorded, name
        defaults = constructor_defaults(_BASE[name])
        assert all(getattr(args, dest) == defaults[key] for dest, key in MODEL_OPTIONS.items() if key in defaults), name
    args = resolve_model_defaults(build_parser().parse_args(["--model", "mmoe", "--emb-dim", "8", "--n-experts", "3"]))
    assert (args.emb_dim, args.n_experts, args.expert_dim) == (8, 3, constructor_defaults(MMoE)["expert_dim"])


def test_model_option_help_reads_the_signatures():
    from mbrec_fast.models.multidomain import EMB_DIM, EXPERT_DIM, N_EXPERTS, N_SHARED
    help_text = " ".join(build_parser().format_help().split())
    for text in (f"embedding size per field (default {EMB_DIM};", f"hidden size of an expert (default {EXPERT_DIM})",
                 f"MMoE / M2M experts (default {N_EXPERTS})", f"shared experts (default {N_SHARED}; M3oE",
                 "(default official)", "(default add)", "(default 0.1)"):
        assert text in help_text, text


def test_model_kwargs_of_an_old_config_without_the_newer_m3oe_options(small):
    """A run config from before --m3oe-variant / --m3oe-fusion existed builds M3oE with its defaults."""
    import argparse
    from mbrec_fast.training.multidomain import _model_kwargs
    args = argparse.Namespace(model="m3oe", emb_dim=8, expert_dim=16, n_experts=4, n_shared=None, fixed_fusion=False,
                              no_domain_module=False, no_task_module=False, cold_prob=0.1)
    kw = _model_kwargs(args)
    assert "variant" not in kw and "fusion" not in kw and "n_shared" not in kw
    model = build_model("m3oe", small, **kw)
    assert (model.variant, model.fusion) == ("official", "add")


# ------------------------------------------------------------------------------------------------ synthetic table
def test_table_configs_official_m3oe_headline_and_v1_variants():
    from mbrec_fast.training.multidomain import ML100K_HEADLINE, SYNTHETIC_M3OE_V1, TABLE_GROUPS
    headline = {model: argv for model, _, argv in TABLE_GROUPS["headline"]}
    # every model of the ml100k headline is in the synthetic headline, M3oE there with the model's defaults
    assert {m for m, _, _ in ML100K_HEADLINE} <= set(headline)
    assert headline["m3oe"] == ["--model", "m3oe", "--setting", "mdmt"]
    args = build_parser().parse_args(headline["m3oe"])
    assert args.m3oe_variant is None and args.fusion_train == "official"
    # the earlier M3oE rows stay reachable as named variants: v1 trained bi-level on validation batches
    v1 = {variant: argv for _, variant, argv in TABLE_GROUPS["v1"]}
    assert set(v1) == {"v1", "v1 fixed-fusion", "v1 bilevel-every 20"}
    for argv in v1.values():
        parsed = build_parser().parse_args(argv)
        assert argv[argv.index("--m3oe-variant"):][:4] == SYNTHETIC_M3OE_V1
        assert parsed.m3oe_variant == "v1" and parsed.fusion_train == "bilevel-valid"


def test_upsert_rows_replaces_the_same_key_in_place(tmp_path):
    from mbrec_fast.training.multidomain import upsert_rows
    path = str(tmp_path / "rows.json")
    row = lambda model, seed, auc, data="synthetic-40k": {"model": model, "variant": "default", "data": data,  # noqa: E731
                                                          "seed": seed, "metrics": {"auc": auc}}
    upsert_rows(path, [row("mlp", 0, 0.1), row("mlp", 1, 0.2), row("m3oe", 0, 0.3)])
    rows = upsert_rows(path, [row("mlp", 1, 0.9), row("mlp", 1, 0.5, data="synthetic-400k")])
    assert rows == json.load(open(path))
    assert [(r["model"], r["seed"], r["data"], r["metrics"]["auc"]) for r in rows] == [
        ("mlp", 0, "synthetic-40k", 0.1), ("mlp", 1, "synthetic-40k", 0.9), ("m3oe", 0, "synthetic-40k", 0.3),
        ("mlp", 1, "synthetic-400k", 0.5)]


def test_table_writes_rows_resumes_and_replaces_on_rerun(tmp_path):
    from mbrec_fast.training.multidomain import table_main
    out, rows_path = str(tmp_path / "table"), str(tmp_path / "rows.json")
    json.dump([{"model": "mmoe-mdmt", "variant": "official", "data": "ml100k", "seed": 0, "metrics": {"auc": 0.7}}],
              open(rows_path, "w"))
    argv = ["--table", "--seeds", "2", "--out", out, "--rows", rows_path, "--runs-root", str(tmp_path / "runs"),
            "--groups", "headline,v1", "--only", "mlp,m3oe v1", "--synthetic-samples", "1200", "--epochs", "1",
            "--threads", "1"]
    assert table_main(argv) == 0
    rows = json.load(open(rows_path))
    assert rows[0]["data"] == "ml100k"  # other tables' rows stay
    mine = [r for r in rows if r["data"] == "synthetic-1200"]
    assert sorted((r["model"], r["variant"], r["seed"]) for r in mine) == [
        ("m3oe", "v1", 0), ("m3oe", "v1", 1), ("mlp", "default", 0), ("mlp", "default", 1)]
    table = json.load(open(out + ".json"))
    for r in mine:
        assert {"auc", "logloss", "auc_d0_t0", "auc_d2_t1", "logloss_d1_t0"} <= set(r["metrics"])
        assert r["epochs"] == 1 and r["epochs_run"] == 1
        # the table's one command (without the choice of rows), and the run's own arguments
        assert r["command"] == table["command"] and "--only" not in r["command"] and "--runs-root" not in r["command"]
        assert r["command"].startswith("python -m mbrec_fast.training.multidomain --table --seeds 2")
        assert "--synthetic-samples 1200" in r["command"] and f"--seed {r['seed']}" in r["args"]
        label = r["model"] if r["variant"] == "default" else f"{r['model']} {r['variant']}"
        assert r["metrics"]["auc"] == table["runs"][label][r["seed"]]["auc"]
    assert "fusion_alpha_domain" in next(r for r in mine if r["model"] == "m3oe")["metrics"]
    assert "| m3oe v1 |" in open(out + ".md").read() and "| mlp |" in open(out + ".md").read()
    # resume: nothing left to run, nothing rewritten
    stamp = {r["seed"]: r["metrics"]["auc"] for r in mine}
    assert table_main(argv) == 0 and json.load(open(rows_path)) == rows
    # a re-run from scratch replaces the rows of the same (model, variant, data, seed) instead of adding rows
    import os
    os.remove(out + ".json")
    assert table_main(argv) == 0
    again = json.load(open(rows_path))
    assert len(again) == len(rows) and [(r["model"], r["variant"], r["seed"]) for r in again] == \
        [(r["model"], r["variant"], r["seed"]) for r in rows]
    assert {r["seed"]: r["metrics"]["auc"] for r in again if r["data"] == "synthetic-1200"} == stamp  # deterministic


def test_table_rejects_unknown_group_and_other_data(tmp_path):
    from mbrec_fast.training.multidomain import table_main
    with pytest.raises(ValueError, match="--groups: unknown group 'nope'"):
        table_main(["--table", "--groups", "headline,nope", "--out", str(tmp_path / "t")])
    with pytest.raises(ValueError, match="--table runs on --data synthetic"):
        table_main(["--table", "--data", "ml100k", "--out", str(tmp_path / "t")])


@pytest.mark.parametrize("data", [None, "synthetic", "FILE"])
def test_cli_data_path_that_would_be_ignored_is_an_error(tmp_path, capsys, data):
    # `--format table --data-path FILE` without --data used to train on the synthetic data, ignoring the file
    from mbrec_fast.cli import main
    path = tmp_path / "t.csv"
    _table(n=100).to_csv(path, index=False)
    argv = ["train", "--model", "m3oe", "--format", "table", "--data-path", str(path), "--domain-col", "scenario",
            "--label-cols", "click,buy", "--sparse-cols", "user,item,cat", "--epochs", "1", "--run-dir",
            str(tmp_path / "r"), "--threads", "1"]
    if data is not None:
        argv += ["--data", str(path) if data == "FILE" else data]
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert f"--data-path {path} is not read" in err
    assert not (tmp_path / "r").exists()


def test_evaluate_data_path_replaces_a_path_and_is_an_error_for_synthetic(tmp_path, capsys):
    # evaluate's --data-path overrides the checkpoint's data file; a checkpoint trained on --data FILE took the path
    # as --data, so the override replaces that (it used to be ignored); synthetic data has no file to read
    from mbrec_fast.cli import main
    table = ["--format", "table", "--domain-col", "scenario", "--label-cols", "click,buy", "--sparse-cols",
             "user,item,cat", "--epochs", "1", "--batch-size", "64", "--threads", "1"]
    a, missing = tmp_path / "a.csv", tmp_path / "moved.csv"
    _table(n=300).to_csv(a, index=False)
    assert main(["train", "--model", "mlp", "--data", str(a), "--run-dir", str(tmp_path / "r")] + table) == 0
    assert main(["evaluate", "--checkpoint", str(tmp_path / "r" / "best.pt")]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(tmp_path / "r" / "best.pt"), "--data-path", str(missing)]) == 2
    assert "moved.csv" in capsys.readouterr().err  # the override was read (and is missing), not ignored
    assert main(["train", "--model", "mlp", "--synthetic-samples", "600", "--epochs", "1", "--threads", "1",
                 "--run-dir", str(tmp_path / "s")]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(tmp_path / "s" / "best.pt"), "--data-path", str(a)]) == 2
    assert "trained on generated synthetic data" in capsys.readouterr().err
