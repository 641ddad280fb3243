"""Training throughput (samples/s) of the multi-domain multi-task models: fused expert ops vs the same models with a
Python loop of per-expert Linear/LayerNorm/ReLU modules (identical parameters, `impl="loop"`).

One timed unit = one training step (forward, BCE over tasks, backward, Adam step) on one batch.
Small shapes by default; `MBREC_FAST_BENCH_FULL=1` runs the large case (batch 2048, 6 domains x 3 tasks, 8 experts).
"""
import os

import pytest
import torch

from mbrec_fast.data.ctr import make_synthetic_ctr
from mbrec_fast.models.multidomain import M3oE, bce_loss, build_model

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


@pytest.mark.parametrize("impl", ["fused", "loop"])
@pytest.mark.parametrize("name", MODELS)
def test_train_step(benchmark, record, data, name, impl):
    torch.manual_seed(0)
    kw = dict(emb_dim=CASE["emb_dim"], expert_dim=CASE["expert_dim"], n_experts=CASE["n_experts"])
    if name in ("m3oe", "m3rec", "ple"):
        kw["n_shared"] = CASE["n_experts"] if name != "ple" else CASE["n_experts"] // 2
    model = build_model(name, data, impl=impl, **kw)
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
    record(op="multidomain_train_step", case=f"{name} {CASE_NAME}", impl="mbrec_fast" if impl == "fused" else "loop_experts",
           **CASE)
    benchmark.pedantic(step, rounds=5 if not FULL else 10, iterations=1, warmup_rounds=1)
    mean = benchmark.stats.stats.mean if benchmark.stats is not None else None
    if mean:
        benchmark.extra_info["samples_per_s"] = CASE["batch"] / mean
