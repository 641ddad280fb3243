"""SyNCRec on amazon_toys_games: a training pass and the full-ranking evaluation with the package's ops vs the same
model in plain PyTorch, in one benchmark run.

* epoch: training steps (forward of both passes, losses, backward, Adam) over consecutive batches of 128 users.
  `mbrec_fast`: negatives from `mbrec_fast.sample_sequence_negatives`, each expert group's trunks as one batched
  transformer on the non-padding positions and the expert heads + partitioned gate mix through
  `mbrec_fast.gated_experts`; `plain_torch`: negatives redrawn row by row with torch.randint / torch.isin
  (`reference.sequential.sequence_negatives_torch`), the trunks one expert at a time through torch's attention on
  the padded rows and the heads as a Python loop over experts (`expert_impl="loop"`).
  Identical parameters and batches. Official protocol (negatives from all items outside the window).
* full ranking: the users' SyNCRec states (computed once, shared) ranked against all 49,603 items with the history
  masked: `mbrec_fast.evaluate_full_ranking` vs dense scores + torch.topk (`reference.sequential.dense_full_ranking`).

Default: the first 4 batches and 2,000 users (minutes on a shared CPU); `MBREC_FAST_BENCH_FULL=1`: one whole epoch
(63 batches) and all 7,996 users. Model: dim 64, 1 single + 4 cross experts, 2 layers, max_len 50, 8 negatives.
"""
import os
import pathlib

import pytest
import torch

from mbrec_fast import evaluate_full_ranking
from mbrec_fast.data.sequences import leave_one_out, load_amazon_toys_games, make_training_windows
from mbrec_fast.models.syncrec import SyNCRec, mix_expert_heads_expert_major
from mbrec_fast.reference.sequential import dense_full_ranking, sequence_negatives_torch
from mbrec_fast.training import sequential as S

DATA_DIR = pathlib.Path(os.environ.get("MBREC_FAST_DATA", pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"))
LOG = DATA_DIR / "amazon_toys_games" / "interactions.tsv"
FULL = os.environ.get("MBREC_FAST_BENCH_FULL") == "1"
CASE = dict(dim=64, n_single=1, n_cross=4, layers=2, max_len=50, num_neg=8, batch=128,
            batches=None if FULL else 4, users=None if FULL else 2000)
pytestmark = pytest.mark.skipif(not LOG.is_file(), reason=f"amazon_toys_games not found at {LOG}")


@pytest.fixture(scope="module")
def setup():
    data = load_amazon_toys_games(str(LOG))
    split = leave_one_out(data)
    windows = make_training_windows(split.train, data.item_domain, data.n_domains, CASE["max_len"], data.n_items)
    return data, split, windows


def _model(data, impl):
    torch.manual_seed(0)
    return SyNCRec(data.n_items, data.n_domains, data.item_domain, dim=CASE["dim"], n_single=CASE["n_single"],
                   n_cross=CASE["n_cross"], n_layers=CASE["layers"], max_len=CASE["max_len"], expert_impl=impl)


def _time(benchmark, record, fn, group, op, case, impl, rounds, warmup=0):
    """Times fn under one benchmark group; extra_info carries the case for `mbrec-fast bench`."""
    benchmark.group = group
    record(op=op, case=case, impl=impl, **CASE)
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=warmup)


def _plain_negatives(gen):
    return lambda tgt, n_items, k, restrict: sequence_negatives_torch(tgt, n_items, k, restrict, generator=gen)


@pytest.mark.parametrize("impl", ["mbrec_fast", "plain_torch"])
def test_syncrec_epoch(benchmark, record, setup, impl):
    data, _, windows = setup
    model = _model(data, "fused" if impl == "mbrec_fast" else "loop")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = S.make_batches(windows["cross_in"].shape[0], CASE["batch"], 0, 0)[:CASE["batches"]]
    negatives = None if impl == "mbrec_fast" else _plain_negatives(torch.Generator().manual_seed(0))

    def epoch():
        for batch in batches:
            b = S.materialize(batch, windows, data.item_domain, data.n_items, CASE["num_neg"], 0, "cpu",
                              negatives=negatives)
            opt.zero_grad(set_to_none=True)
            model.losses(b)["loss"].backward()
            opt.step()

    warm = S.materialize(S.make_batches(windows["cross_in"].shape[0], CASE["batch"], 0, 1)[0], windows,
                         data.item_domain, data.n_items, CASE["num_neg"], 0, "cpu", negatives=negatives)
    model.losses(warm)["loss"].backward()  # warm-up (op probe, allocator); not timed
    _time(benchmark, record, epoch, "syncrec epoch (amazon_toys_games)", "syncrec_epoch",
          f"amazon_toys_games {len(batches)} batches", impl, rounds=1)


@pytest.mark.parametrize("impl", ["mbrec_fast", "plain_torch"])
def test_syncrec_negatives(benchmark, record, setup, impl):
    """The negatives of the epoch's batches alone (materialize: index, trim, draw, map to the single rows)."""
    data, _, windows = setup
    batches = S.make_batches(windows["cross_in"].shape[0], CASE["batch"], 0, 0)[:16]
    negatives = None if impl == "mbrec_fast" else _plain_negatives(torch.Generator().manual_seed(0))

    def draw():
        for batch in batches:
            S.materialize(batch, windows, data.item_domain, data.n_items, CASE["num_neg"], 0, "cpu", negatives=negatives)

    _time(benchmark, record, draw, "syncrec negatives, 16 batches (amazon_toys_games)", "syncrec_negatives",
          "amazon_toys_games 16 batches", impl, rounds=3, warmup=1)


@pytest.mark.parametrize("impl", ["mbrec_fast", "plain_torch"])
def test_syncrec_expert_mix(benchmark, record, setup, impl):
    """The 5 expert heads + partitioned gate mix of one batch's cross pass, forward and backward, on fixed trunk
    outputs in the layout the batched trunks produce (expert-major [E, n, d], the non-padding positions):
    `gated_experts` vs the Python loop over experts."""
    data, _, windows = setup
    model = _model(data, "fused")
    tokens = windows["cross_in"][:CASE["batch"]]
    x = model.embed(tokens).detach()
    task = torch.full((tokens.shape[0],), data.n_domains, dtype=torch.int64)
    trunks, gates, _ = model._gates_and_trunks(x, tokens != data.n_items, task, "cross")
    trunks, gates = trunks.detach().requires_grad_(True), gates.detach()
    E, n, _ = trunks.shape

    def mix():
        out = mix_expert_heads_expert_major(trunks, gates, model.head_weight, model.head_bias, model.head_ln_weight,
                                            model.head_ln_bias, expert_impl="fused" if impl == "mbrec_fast" else "loop")
        out.square().sum().backward()

    _time(benchmark, record, mix, "syncrec expert heads + gate mix, fwd+bwd (one batch)", "syncrec_expert_mix",
          f"n{n} E{E} d{CASE['dim']}", impl, rounds=10, warmup=2)


@pytest.mark.parametrize("impl", ["mbrec_fast", "plain_torch"])
def test_syncrec_expert_trunks(benchmark, record, setup, impl):
    """The 4 cross experts' transformer trunks of one batch's cross pass, forward and backward (eval mode, no
    dropout): one batched transformer on the non-padding positions (`StackedCausalEncoder.forward`) vs one expert
    at a time through torch's multi-head attention on the padded rows (`forward_loop`)."""
    data, _, windows = setup
    model = _model(data, "fused").eval()
    tokens = windows["cross_in"][:CASE["batch"]]
    x = model.embed(tokens).detach().requires_grad_(True)
    keep = tokens != data.n_items

    def trunks():
        fn = model.cross_experts.forward if impl == "mbrec_fast" else model.cross_experts.forward_loop
        fn(x, keep).square().sum().backward()

    _time(benchmark, record, trunks, "syncrec expert trunks, fwd+bwd (one batch)", "syncrec_expert_trunks",
          f"B{tokens.shape[0]} L{tokens.shape[1]} E{CASE['n_cross']} d{CASE['dim']}", impl, rounds=5, warmup=1)


@pytest.mark.parametrize("impl", ["mbrec_fast", "plain_torch"])
def test_syncrec_full_ranking(benchmark, record, setup, impl):
    data, split, _ = setup
    model = _model(data, "fused").eval()
    n = CASE["users"] or split.eval_users.numel()
    ctx = S.make_eval_context(split, "test", n_neg=1, protocol="official")
    histories, targets = ctx.histories[:n], ctx.targets[:n]
    states = model.user_repr(histories)
    items = model.items.detach()
    indptr = ctx.exclude[0][:n + 1]
    exclude = (indptr, ctx.exclude[1][:int(indptr[-1])])
    target_csr = (torch.arange(n + 1), targets)

    def rank():
        if impl == "mbrec_fast":
            return evaluate_full_ranking(states, items, exclude, target_csr, ks=(10,), metrics=("hr", "ndcg")).metrics
        return dense_full_ranking(states, items, histories, targets, k=10)

    got = rank()
    other = (dense_full_ranking(states, items, histories, targets, k=10) if impl == "mbrec_fast" else
             evaluate_full_ranking(states, items, exclude, target_csr, ks=(10,), metrics=("hr", "ndcg")).metrics)
    assert abs(got["hr@10"] - other["hr@10"]) < 1e-3  # same ranking (ties aside)
    _time(benchmark, record, rank, "syncrec full ranking (amazon_toys_games)", "syncrec_full_ranking",
          f"{n} users x {data.n_items} items", impl, rounds=3)
