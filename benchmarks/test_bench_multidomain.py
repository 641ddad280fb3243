"""Training throughput (samples/s) of the multi-domain multi-task models: fused expert ops vs the same models with a
Python loop of per-expert Linear/LayerNorm/ReLU modules (identical parameters, `expert_impl="loop"`).

One timed unit = one training step (forward, BCE over tasks, backward, Adam step) on one batch.
Small shapes by default; `MBREC_FAST_BENCH_FULL=1` runs the large case (batch 2048, 6 domains x 3 tasks, 8 experts).
`test_train_step_ml100k`: every model with its default sizes on MovieLens-100K batches of 4,096 (the official
M3oE schedule's batch scaled to ml100k), domain-balanced loss; skipped when the data is absent.
"""
import os

import pytest
import torch

from mbrec_fast.data.ctr import default_data_root, load_ml100k, make_synthetic_ctr
from mbrec_fast.models.multidomain import MODEL_NAMES, M3oE, bce_loss, build_model, ctr_loss

FULL = os.environ.get("MBREC_FAST_BENCH_FULL") == "1"
if FULL:
    CASE = dict(batch=2048, n_domains=6, n_tasks=3, n_experts=8, expert_dim=128, emb_dim=16)
else:
    CASE = dict(batch=256, n_domains=3, n_tasks=2, n_experts=4, expert_dim=32, emb_dim=8)
CASE_NAME = "b{batch} D{n_domains} T{n_tasks} E{n_experts} H{expert_dim}".format(**CASE)
MODELS = ["m3oe", "m3rec", "mmoe", "ple", "star", "sharedbottom", "mlp"]


@pytest.fixture(scope="module")
def data():
    return make_synthetic_ctr(CASE["batch"] * 4, n_domains=CASE["n_domains"], n_tasks=CASE["n_tasks"],
                              domain_probs=[1.0] * CASE["n_domains"], seed=0)


@pytest.mark.parametrize("expert_impl", ["fused", "loop"])
@pytest.mark.parametrize("name", MODELS)
def test_train_step(benchmark, record, data, name, expert_impl):
    torch.manual_seed(0)
    kw = dict(emb_dim=CASE["emb_dim"], expert_dim=CASE["expert_dim"], n_experts=CASE["n_experts"])
    if name in ("m3oe", "m3rec", "ple"):
        kw["n_shared"] = CASE["n_experts"] if name != "ple" else CASE["n_experts"] // 2
    model = build_model(name, data, expert_impl=expert_impl, **kw)
    params = model.main_parameters() if isinstance(model, M3oE) else list(model.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    batches = list(data.batches(CASE["batch"], seed=0))

    state = {"i": 0}

    def step():
        batch = batches[state["i"] % len(batches)]
        state["i"] += 1
        opt.zero_grad(set_to_none=True)
        loss = bce_loss(model(batch), batch["labels"])
        loss.backward()
        opt.step()

    step()  # warm-up (op probe, allocator)
    benchmark.group = f"multidomain train step: {name} {CASE_NAME}"
    record(op="multidomain_train_step", case=f"{name} {CASE_NAME}", impl="mbrec_fast" if expert_impl == "fused" else "loop_experts",
           **CASE)
    benchmark.pedantic(step, rounds=5 if not FULL else 10, iterations=1, warmup_rounds=1)
    mean = benchmark.stats.stats.mean if benchmark.stats is not None else None
    if mean:
        benchmark.extra_info["samples_per_s"] = CASE["batch"] / mean


@pytest.fixture(scope="module")
def ml100k_batches():
    path = default_data_root() / "ml100k"
    if not (path / "u.data").exists():
        pytest.skip(f"MovieLens-100K not found under {path}")
    data = load_ml100k(path)
    train = data.split((0.8, 0.1, 0.1))[0]
    return data, list(train.batches(4096, seed=0))[:4]


@pytest.mark.parametrize("expert_impl", ["fused", "loop"])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_train_step_ml100k(benchmark, record, ml100k_batches, name, expert_impl):
    data, batches = ml100k_batches
    torch.manual_seed(0)
    model = build_model(name, data, expert_impl=expert_impl)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-5)
    state = {"i": 0}

    def step():
        batch = batches[state["i"] % len(batches)]
        state["i"] += 1
        opt.zero_grad(set_to_none=True)
        ctr_loss("balanced", model(batch), batch, data.n_domains).backward()
        opt.step()

    if not getattr(benchmark, "disabled", False):
        step()  # warm-up (op probe, allocator); a disabled benchmark runs the step once as a smoke test
    benchmark.group = f"multidomain train step ml100k: {name} b4096"
    record(op="multidomain_train_step", case=f"{name} ml100k b4096", impl="mbrec_fast" if expert_impl == "fused" else "loop_experts",
           batch=4096)
    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    mean = benchmark.stats.stats.mean if benchmark.stats is not None else None
    if mean:
        benchmark.extra_info["samples_per_s"] = 4096 / mean
