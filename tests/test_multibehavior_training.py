"""Multi-behavior baselines and the train/evaluate CLI: overfitting, gradients, determinism, exact
resume, CLI smoke runs on the bundled data, and DistributedDataParallel with 2 gloo CPU processes."""
import json
import os
import shutil
import socket
import sys

import pytest
import torch

from mbrec_fast import evaluate_full_ranking
from mbrec_fast.cli import main as cli_main
from mbrec_fast.data.multibehavior import synthetic_multibehavior
from mbrec_fast.models._batches import default_level_probs, negatives
from mbrec_fast.models.baselines import BPRMF, MCBPR, NeuMF
from mbrec_fast.training.checkpoint import load_checkpoint
from mbrec_fast.training.multibehavior import build_model, evaluate_model, train_main

BASELINES = ["bpr", "mcbpr", "neumf"]


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny():
    """60 users x 80 items, three behaviors: small enough to memorize."""
    return synthetic_multibehavior(60, 80, interactions_per_user=8, seed=1)


def _train(model, data, epochs, lr, batch_size=256, seed=0):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for epoch in range(epochs):
        for batch in model.training_batches(data, epoch, batch_size, seed):
            opt.zero_grad()
            loss, _ = model.loss(batch)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    return losses


# ----------------------------------------------------------------------------------------- models
@pytest.mark.parametrize("name", BASELINES)  # each baseline on its own
def test_baseline_overfits_tiny_data(tiny, name):
    torch.manual_seed(0)
    model = build_model(name, tiny, dim=32, reg=0.0, neg_ratio=4 if name == "neumf" else 1)
    losses = _train(model, tiny, epochs=150, lr=0.02)
    assert losses[-1] < 0.25 * losses[0]
    # training purchases must rank at the top once memorized (nothing excluded)
    model.eval()
    with torch.no_grad():
        res = evaluate_full_ranking(**model.scorer().evaluator_kwargs(), exclude=None, targets=tiny.target_csr(),
                                    ks=[10], metrics=["recall"])
    assert res.metrics["recall@10"] > (0.6 if name == "mcbpr" else 0.9), res.metrics


@pytest.mark.parametrize("name", BASELINES)
def test_gradients_reach_every_parameter(tiny, name):
    torch.manual_seed(0)
    model = build_model(name, tiny, dim=8, reg=1e-4, neg_ratio=2)
    batch = next(iter(model.training_batches(tiny, 0, 64, 0)))
    loss, parts = model.loss(batch)
    loss.backward()
    assert "loss" in parts and torch.isfinite(loss)
    for pname, p in model.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, pname


@pytest.mark.parametrize("name", BASELINES)
def test_training_is_deterministic_with_a_seed(tiny, name):
    weights = []
    for _ in range(2):
        torch.manual_seed(5)
        model = build_model(name, tiny, dim=8, reg=1e-4, neg_ratio=2)
        _train(model, tiny, epochs=2, lr=0.01, batch_size=64, seed=7)
        weights.append(model.state_dict())
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


def test_batches_depend_on_seed_and_epoch_only(tiny):
    model = BPRMF(tiny.n_users, tiny.n_items, dim=4)
    a = list(model.training_batches(tiny, 3, 50, 11))
    b = list(model.training_batches(tiny, 3, 50, 11))
    c = list(model.training_batches(tiny, 4, 50, 11))
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    assert not torch.equal(a[0]["pos"], c[0]["pos"])
    pos_total = sum(x["pos"].numel() for x in a)
    assert pos_total == tiny.target_csr()[1].numel() and len(a) == len(model.training_batches(tiny, 3, 50, 11))


def test_negatives_respect_their_mode(tiny):
    """Exclusive negatives are never done at the positive's behavior; cascade lower-level draws are."""
    graph = tiny.train
    users = torch.arange(tiny.n_users).repeat(20)
    target = tiny.target
    rows = lambda r: [set(graph.csr(r)[1][graph.csr(r)[0][u]:graph.csr(r)[0][u + 1]].tolist())  # noqa: E731
                      for u in range(tiny.n_users)]
    bought = rows(target)
    neg = negatives(graph, users, 3, target, "exclusive", seed=1)
    assert all(int(i) not in bought[int(u)] for u, row in zip(users, neg) for i in row)
    neg = negatives(graph, users, 3, torch.full_like(users, target), "cascade",
                    level_probs=default_level_probs(tiny.n_behaviors), seed=2)
    viewed = rows(0)
    assert all(int(i) not in bought[int(u)] for u, row in zip(users, neg) for i in row)
    from_lower = sum(int(i) in viewed[int(u)] for u, row in zip(users, neg) for i in row)
    assert from_lower > 0.2 * neg.numel()  # the default table puts half the mass on lower levels


def test_neumf_score_block_matches_pairwise_scores(tiny):
    torch.manual_seed(0)
    model = NeuMF(tiny.n_users, tiny.n_items, dim=8, eval_user_block=7)
    users = torch.tensor([0, 5, 59, 3])
    block = model.score_block(users, 10, 30)
    pairs = model(users.repeat_interleave(20), torch.arange(10, 30).repeat(4)).view(4, 20)
    torch.testing.assert_close(block, pairs, rtol=1e-5, atol=1e-5)


def test_mcbpr_rejects_bad_level_table():
    with pytest.raises(ValueError, match="level_probs"):
        MCBPR(3, 4, n_behaviors=3, level_probs=torch.ones(2, 2))


# ----------------------------------------------------------------------------------------- CLI + resume
def _args(run_dir, model="bpr", extra=()):
    return ["--model", model, "--data", "synthetic:200x150", "--epochs", "3", "--batch-size", "128",
            "--lr", "0.01", "--dim", "8", "--out", str(run_dir), "--no-progress", "--patience", "0", *extra]


@pytest.mark.parametrize("name, stop_after", [
    ("bpr", 5),      # exactly at the end of epoch 1 (5 batches per epoch)
    ("neumf", 7),    # mid-epoch 2, several negatives per positive, score_fn evaluation
    ("mcbpr", 3),    # early in epoch 1 (36 batches), cascade sampling over all behaviors
])
def test_resume_is_bit_exact(tmp_path, name, stop_after):
    assert train_main(_args(tmp_path / "full", name)) == 0
    assert train_main(_args(tmp_path / "cut", name, ["--max-steps", str(stop_after)])) == 0
    cut = load_checkpoint(str(tmp_path / "cut" / "checkpoint.pt"))
    assert cut["global_step"] == stop_after
    assert train_main(_args(tmp_path / "cut", name, ["--resume"])) == 0
    full = load_checkpoint(str(tmp_path / "full" / "checkpoint.pt"))
    resumed = load_checkpoint(str(tmp_path / "cut" / "checkpoint.pt"))
    for key, value in full["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    a = json.loads((tmp_path / "full" / "metrics.json").read_text())
    b = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert a["test"] == b["test"] and a["best_epoch"] == b["best_epoch"]


def test_checkpoint_round_trip_through_evaluate(tmp_path, capsys):
    assert train_main(_args(tmp_path, "neumf")) == 0
    summary = json.loads((tmp_path / "metrics.json").read_text())
    out_json = tmp_path / "eval.json"
    assert cli_main(["evaluate", "--checkpoint", str(tmp_path / "best.pt"), "--json", str(out_json)]) == 0
    again = json.loads(out_json.read_text())["metrics"]
    for key, value in summary["test"].items():
        assert again[key] == pytest.approx(value, abs=1e-12), key
    assert "visited" in capsys.readouterr().out


@pytest.mark.parametrize("model", ["bpr", "mcbpr"])  # target-only and multi-behavior sampling on real data
def test_cli_smoke_on_bundled_data(tmp_path, data_dir, model, capsys):
    rc = cli_main(["train", "--model", model, "--data", str(data_dir / "beibei"), "--epochs", "1",
                   "--batch-size", "2048", "--lr", "0.05", "--dim", "16",
                   "--out", str(tmp_path), "--no-progress", "--ks", "10", "100"])
    assert rc == 0
    out = capsys.readouterr().out
    for word in ("overall", "visited", "unvisited", "where the time went", "HR@K", "NDCG@K", "@100"):
        assert word in out
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["test"]["users"] == 21716 and summary["test"]["visited_users"] == 13525
    assert summary["test"]["hr@100"] > 0.05  # far above random (100 / 7977 = 0.0125)
    for name in ("checkpoint.pt", "best.pt", "history.json", "curves.png"):
        assert (tmp_path / name).is_file()


@pytest.mark.parametrize("model", ["nmtr", "member", "lightgcn"])  # the other models through the same CLI
def test_cli_smoke_seed_models(tmp_path, model):
    pytest.importorskip(f"mbrec_fast.models.{model}")
    assert train_main(["--model", model, "--data", "synthetic:100x80", "--epochs", "1", "--batch-size", "256",
                       "--dim", "8", "--out", str(tmp_path), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert 0.0 <= summary["test"]["ndcg@10"] <= 1.0 and summary["test"]["users"] > 0


def test_cli_rejects_unknown_model_argument(tmp_path):
    with pytest.raises(SystemExit, match="no argument 'depth'"):
        train_main(_args(tmp_path, extra=["--model-arg", "depth=3"]))


# ----------------------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world_size, port, argv):
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    import torch.distributed as dist
    try:
        train_main(argv)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # A finished rank skips interpreter finalization, where gloo's worker threads can abort the process
    # ("terminate called without an active exception", seen once on a loaded machine; pytorch/pytorch#179291).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    """2 ranks, each with half of every global batch, gradients averaged: the same model as one
    process on the whole batch (up to float summation order), and a sharded evaluation equal to a
    single-process evaluation of those weights."""
    import torch.multiprocessing as mp
    argv = lambda d: ["--model", "bpr", "--data", "synthetic:300x200", "--epochs", "2", "--batch-size", "128",  # noqa: E731
                      "--lr", "0.01", "--dim", "8", "--out", str(d), "--no-progress", "--patience", "0"]
    mp.spawn(_ddp_worker, args=(2, _free_port(), argv(tmp_path / "ddp")), nprocs=2, join=True)
    assert train_main(argv(tmp_path / "single")) == 0
    ddp = load_checkpoint(str(tmp_path / "ddp" / "checkpoint.pt"))
    single = load_checkpoint(str(tmp_path / "single" / "checkpoint.pt"))
    for key, value in single["model"].items():
        torch.testing.assert_close(ddp["model"][key], value, rtol=1e-3, atol=1e-4)
    # evaluation sharded over the 2 ranks == one process evaluating the same (best) weights
    from mbrec_fast.training.multibehavior import load_data
    data = load_data("synthetic:300x200")
    model = build_model("bpr", data, dim=8, reg=1e-4, neg_ratio=1)
    model.load_state_dict(load_checkpoint(str(tmp_path / "ddp" / "best.pt"))["model"])
    with torch.no_grad():
        expected = evaluate_model(model, data, "test")
    got = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert got["world_size"] == 2
    for key, value in expected.items():
        assert got["test"][key] == pytest.approx(value, abs=1e-9), key


def test_plain_pytorch_reference_the_benchmark_runs(tiny):
    """The plain-PyTorch pipeline the benchmark compares against: Python-set negatives obey their exclusion,
    MEMBER's plain epoch (pool negatives and generative edges from Python sets) trains, and dense top-K
    evaluation gives the fused evaluator's metrics."""
    import random

    from mbrec_fast.reference.multibehavior import PythonSetSampler, dense_topk_evaluate, plain_member_epoch
    sampler = PythonSetSampler(tiny.train, default_level_probs(tiny.n_behaviors))
    rnd = random.Random(0)
    for u in range(tiny.n_users):
        assert not set(sampler.exclusive(u, tiny.target, 5, rnd)) & sampler.sets[tiny.target][u]
        assert not set(sampler.cascade(u, tiny.target, 5, rnd)) & sampler.sets[tiny.target][u]
    torch.manual_seed(0)
    model = build_model("member", tiny, dim=8, reg=1e-4, neg_ratio=1)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    losses = [plain_member_epoch(model, tiny, sampler, opt, batch_size=64, seed=s) for s in range(8)]
    assert losses[-1] < losses[0]
    with torch.no_grad():
        fused = evaluate_model(model, tiny, "test", (10, 20))
        scorer = model.scorer()
        if scorer.score_fn is not None:
            rows = lambda u: scorer.score_fn(u, 0, tiny.n_items)  # noqa: E731
        else:
            rows = lambda u: scorer.user_emb[u] @ scorer.item_emb.T  # noqa: E731
        dense = dense_topk_evaluate(rows, tiny.n_users, tiny.n_items, tiny.exclude("test"), tiny.test, (10, 20))
    for key in ("hr@10", "ndcg@10", "hr@20", "ndcg@20"):
        assert dense["all"][key] == pytest.approx(fused[key], abs=1e-6), key


def test_plain_member_epoch_runs_the_official_schedule(tiny):
    """The faithful MEMBER's plain twin: the two self-supervised passes (InfoNCE nodes and generative edges from
    `random`) and the BPR pass, as many batches each as the package's batches, and it trains."""
    from mbrec_fast.reference.multibehavior import PythonSetSampler, plain_member_epoch
    sampler = PythonSetSampler(tiny.train, default_level_probs(tiny.n_behaviors))
    torch.manual_seed(0)
    model = build_model("member", tiny, dim=8, variant="faithful", cl_nodes=16, gen_batch=32)
    phases = []
    original = model.loss
    model.loss = lambda batch: (phases.append(batch["phase"]), original(batch))[1]
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    losses = [plain_member_epoch(model, tiny, sampler, opt, batch_size=64, seed=s) for s in range(6)]
    per_epoch = phases[:len(phases) // 6]
    expected = [b["phase"] for b in model.training_batches(tiny, 0, 64, 0)]
    assert per_epoch == expected and set(expected) == {"ssl_visited", "ssl_unvisited", "bpr"}
    assert losses[-1] < losses[0]


# ----------------------------------------------------------------------------------------- MEMBER protocols
def test_cli_member_faithful_avg_both_protocols_and_result_rows(tmp_path):
    from mbrec_fast.training.multibehavior import write_result_rows
    run = tmp_path / "avg"
    argv = ["--model", "member", "--variant", "faithful", "--ablation", "avg", "--data", "synthetic:120x90",
            "--valid", "none", "--epochs", "1", "--dim", "8", "--protocol", "both", "--ks", "10", "20",
            "--out", str(run), "--no-progress"]
    assert train_main(argv) == 0
    summary = json.loads((run / "metrics.json").read_text())
    cfg = summary["config"]
    assert (cfg["lr"], cfg["batch_size"], cfg["weight_decay"], cfg["reg"]) == (5e-3, 1024, 1e-7, 0.0)  # official
    assert summary["command"] == "mbrec-fast train " + " ".join(argv)
    for key in ("hr@10", "visited_hr@10", "unvisited_ndcg@20", "visited_pool_hr@10", "unvisited_pool_ndcg@20"):
        assert 0.0 <= summary["test"][key] <= 1.0, key
    ckpt = load_checkpoint(str(run / "checkpoint.pt"))
    assert any(k.startswith("model.experts.1.") or k.startswith("experts.1.") for k in ckpt["model"])
    # the official "other pool scored 0" variant, from the checkpoint, as extra rows
    assert cli_main(["evaluate", "--checkpoint", str(run / "checkpoint.pt"), "--protocol", "pool",
                     "--pool-others", "zero", "--json", str(run / "pool_zero.json")]) == 0
    out = tmp_path / "rows.json"
    assert write_result_rows([str(run)], str(out)) == 7
    rows = json.loads(out.read_text())
    assert {(r["protocol"], r["targets"], r.get("pool_others")) for r in rows} == {
        ("full", "overall", None), ("full", "visited", None), ("full", "unvisited", None),
        ("pool", "visited", "exclude"), ("pool", "unvisited", "exclude"),
        ("pool", "visited", "zero"), ("pool", "unvisited", "zero")}
    row = next(r for r in rows if r["protocol"] == "full" and r["targets"] == "overall")
    assert row["variant"] == "faithful, ablation=avg" and row["seed"] == 0 and row["epochs"] == 1
    assert row["metrics"]["hr@10"] == pytest.approx(summary["test"]["hr@10"], abs=1e-6)
    assert row["selection"] == "last epoch (no validation)"
    assert write_result_rows([str(run)], str(out)) == 7 and len(json.loads(out.read_text())) == 7  # replaced
    # each pool ranked by its expert alone (the paper's per-pool scores), as two more rows of their own
    assert cli_main(["evaluate", "--checkpoint", str(run / "checkpoint.pt"), "--protocol", "pool",
                     "--pool-scores", "expert", "--json", str(run / "pool_expert.json")]) == 0
    assert json.loads((run / "pool_expert.json").read_text())["pool_scores"] == "expert"
    assert write_result_rows([str(run)], str(out)) == 9
    expert = [r for r in json.loads(out.read_text()) if r.get("pool_scores") == "expert"]
    assert {(r["targets"], r["pool_others"]) for r in expert} == {("visited", "exclude"), ("unvisited", "exclude")}
    (run / "pool_expert.json").unlink()
    out.unlink()
    assert write_result_rows([str(run)], str(out)) == 7
    # the run resumed to 2 epochs is another schedule: its rows sit beside the 1-epoch ones instead of replacing them
    longer = tmp_path / "avg-2"
    shutil.copytree(run, longer)
    (longer / "pool_zero.json").unlink()
    argv2 = list(argv)
    argv2[argv2.index("--epochs") + 1], argv2[argv2.index("--out") + 1] = "2", str(longer)
    assert train_main(argv2 + ["--resume"]) == 0
    assert write_result_rows([str(longer)], str(out)) == 5
    rows = json.loads(out.read_text())
    assert len(rows) == 12 and sorted({r["max_epochs"] for r in rows}) == [1, 2]


def test_cli_protocol_and_variant_errors_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="--protocol"):  # the CLI prints it in one line (mbrec_fast.cli.main)
        train_main(_args(tmp_path / "a", extra=["--protocol", "pools"]))
    with pytest.raises(SystemExit, match="--variant"):
        train_main(_args(tmp_path / "b", extra=["--variant", "faithful"]))
    with pytest.raises(SystemExit, match="--pool-scores expert.*no experts"):
        train_main(_args(tmp_path / "c", extra=["--protocol", "pool", "--pool-scores", "expert"]))
    table = tmp_path / "buys.csv"
    table.write_text("user,item,behavior\n" + "".join(f"{u},{(u * 7 + j) % 30},buy\n" for u in range(20) for j in range(4)))
    with pytest.raises(ValueError, match="--protocol pool.*auxiliary"):
        train_main(["--model", "bpr", "--data", str(table), "--protocol", "pool", "--epochs", "1",
                    "--out", str(tmp_path / "d"), "--no-progress"])


def test_cli_adagrad_option(tmp_path):
    assert train_main(_args(tmp_path, "bpr", ["--optimizer", "adagrad", "--epochs", "1"])) == 0
    state = load_checkpoint(str(tmp_path / "checkpoint.pt"))["optimizers"]["main"]["state"]
    assert all("sum" in s for s in state.values())     # Adagrad's accumulator, not Adam's moments


def test_results_summary_is_mean_and_std_over_seeds(tmp_path):
    from mbrec_fast.training.multibehavior import summary_markdown
    base = {"model": "member", "variant": "faithful", "data": "tmall", "protocol": "full", "targets": "overall",
            "epochs": 12, "command": "x", "wall_s": 10.0, "users": 5}
    rows = [dict(base, seed=0, metrics={"hr@10": 0.2, "ndcg@10": 0.1}, selection="last epoch (no validation)"),
            dict(base, seed=1, metrics={"hr@10": 0.4, "ndcg@10": 0.1}, selection="last epoch (no validation)"),
            dict(base, seed=0, variant="faithful, ablation=avg", metrics={"hr@10": 0.1, "ndcg@10": 0.05},
                 selection="best validation epoch", best_epoch=8)]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    table = summary_markdown(str(path), "tmall", ks=(10,))
    lines = table.splitlines()
    assert len(lines) == 4
    assert ("| member (faithful) | tmall | full | overall (5) | 0.3000 ± 0.1414 | 0.1000 ± 0.0000 | 2 | 12 | "
            "last epoch (no validation) | 10 |") in lines
    assert ("| member (faithful, ablation=avg) | tmall | full | overall (5) | 0.1000 | 0.0500 | 1 | 12 (best 8) | "
            "best validation epoch | 10 |") in lines


def test_model_defaults_come_from_the_constructors(tiny):
    """dim / reg / neg_ratio left at None take the model's own defaults (stated once, in its signature)."""
    from mbrec_fast.models.base import constructor_defaults
    from mbrec_fast import registry
    for name in registry.model_names("multibehavior"):
        model = build_model(name, tiny)
        defaults = constructor_defaults(type(model))
        assert model.dim == defaults["dim"] and model.neg_ratio == defaults["neg_ratio"], name
        if defaults["reg"] is not None:
            assert model.reg == defaults["reg"], name


def test_training_defaults_are_per_model():
    """Options left unset take the model's training defaults (the results tables' configurations), a --variant's
    override its model's, and an explicit flag wins; --help lists them."""
    from mbrec_fast.training.multibehavior import _fill_defaults, build_parser, training_defaults
    for argv, want in [
        (["--model", "bpr"], {"lr": 5e-3, "epochs": 30, "eval_every": 2, "patience": 3, "batch_size": 4096}),
        (["--model", "member"], {"lr": 1e-2, "epochs": 12, "eval_every": 2, "patience": 2}),
        (["--model", "member", "--variant", "faithful"], {"lr": 5e-3, "batch_size": 1024, "weight_decay": 1e-7,
                                                          "epochs": 12}),
        (["--model", "bpr", "--epochs", "3", "--lr", "0.1"], {"lr": 0.1, "epochs": 3, "eval_every": 2}),
    ]:
        args = build_parser().parse_args(argv)
        _fill_defaults(args)
        assert {k: getattr(args, k) for k in want} == want, argv
    assert training_defaults("unknown-model") == training_defaults("bpr") | {"lr": 1e-3, "epochs": 10,
                                                                            "eval_every": 1, "patience": 5}
    help_text = build_parser().format_help()
    assert "bpr 30" in " ".join(help_text.split())
