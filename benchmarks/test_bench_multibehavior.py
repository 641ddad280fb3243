"""Epoch time and full-ranking evaluation time of the multi-behavior models: mbrec_fast's pipeline
(fused negative sampler, fused top-K evaluator, and inside the models the package's ops: `csr_spmm` for the graph
propagation of LightGCN and MEMBER, the fused routed experts for NMTR's towers) against the same models run the
plain PyTorch way (Python-set negatives, dense scores + torch.topk, `torch.sparse.mm`, one GEMM per NMTR head),
same hyper-parameters and initial weights, in one run.

Default: a synthetic 1,500 x 1,000 data set (quick under --benchmark-disable).
MBREC_FAST_BENCH_FULL=1: Beibei (21,716 users x 7,977 items) from the data root, or the data set named by
MBREC_FAST_BENCH_DATA (e.g. tmall: 15,449 x 11,953, view / cart / buy).

    nice -n 5 mbrec-fast bench multibehavior --full
    MBREC_FAST_BENCH_FULL=1 MBREC_FAST_BENCH_DATA=tmall python -m pytest \
        benchmarks/test_bench_multibehavior.py -k "nmtr or member"
"""
import contextlib
import importlib
import os

import pytest
import torch

from mbrec_fast.batching import behavior_positives, default_level_probs
from mbrec_fast.reference.multibehavior import (PythonSetSampler, dense_topk_evaluate, nmtr_scores_plain, plain_epoch,
                                                plain_member_epoch)
from mbrec_fast.models import lightgcn, member
from mbrec_fast.training.common import make_adam
from mbrec_fast.training.multibehavior import MODELS, build_model, evaluate_model, load_data

FULL = os.environ.get("MBREC_FAST_BENCH_FULL") == "1"
DATA = os.environ.get("MBREC_FAST_BENCH_DATA", "beibei") if FULL else "synthetic:1500x1000"
KS = (10, 20, 50, 100)
BATCH = 4096
#: MEMBER twice: its default (legacy) configuration, and the faithful one (official schedule, batch 1024)
EPOCH_MODELS = ["bpr", "mcbpr", "neumf", "lightgcn", "nmtr", "member", "member_faithful"]
MODEL_ARGS = {"member_faithful": ("member", {"variant": "faithful"}, 1024)}


def _available(name):
    try:
        importlib.import_module(MODELS[MODEL_ARGS.get(name, (name,))[0]][0])
        return True
    except ImportError:
        return False


ALL_MODELS = [m for m in EPOCH_MODELS if _available(m)]


def _positive_rows(model, data):
    """The (users, items, behaviors) rows one epoch of `model` trains on, for the plain-PyTorch loop."""
    every = type(model).__name__ in ("NMTR", "MCBPR")  # positives at every behavior; the others: the target
    return behavior_positives(data.train, range(data.n_behaviors) if every else [data.target])


@pytest.fixture(scope="module")
def data():
    torch.set_num_threads(int(os.environ.get("MBREC_FAST_BENCH_THREADS", "2")))
    return load_data(DATA)


@pytest.fixture(scope="module")
def set_sampler(data):
    return PythonSetSampler(data.train, default_level_probs(data.n_behaviors))


def _model(name, data):
    model_name, kwargs, _ = MODEL_ARGS.get(name, (name, {}, BATCH))
    torch.manual_seed(0)
    return build_model(model_name, data, **kwargs)  # the model's own defaults on both sides (NeuMF/NMTR: 4 negatives)


def _rounds(name, what):
    """Rounds per case: full size, one for the long cases, five where one round takes a few seconds or less
    (MEMBER's evaluations, its default configuration's epoch), whose single rounds varied by 40 % on the shared
    machine."""
    if not FULL:
        return 2
    return 5 if name.startswith("member") and (what == "eval" or name == "member") else 1


@contextlib.contextmanager
def _plain_ops(model, impl):
    """Inside: the model's plain-PyTorch twin when impl is "plain_torch" (`torch.sparse.mm` propagation,
    `F.normalize` for MEMBER's row normalization, one GEMM per NMTR head); the package's code otherwise (the
    defaults)."""
    if impl != "plain_torch":
        yield
        return
    saved = lightgcn.SPMM_IMPL, getattr(model, "expert_impl", None), member.NORMALIZE_IMPL
    lightgcn.SPMM_IMPL, member.NORMALIZE_IMPL = "torch", "torch"
    if hasattr(model, "expert_impl"):
        model.expert_impl = "loop"
    try:
        yield
    finally:
        lightgcn.SPMM_IMPL, member.NORMALIZE_IMPL = saved[0], saved[2]
        if hasattr(model, "expert_impl"):
            model.expert_impl = saved[1]


def _case(data):
    return f"{data.name} {data.n_users}x{data.n_items}"


@pytest.mark.parametrize("name", [m for m in EPOCH_MODELS if m in ALL_MODELS])
@pytest.mark.parametrize("impl", ["mbrec_fast", "plain_torch"])
def test_epoch(benchmark, record, data, set_sampler, name, impl):
    model = _model(name, data)
    batch_size = MODEL_ARGS.get(name, (name, {}, BATCH))[2]
    # the package trains with its fused Adam (training.common.make_adam); a plain-PyTorch loop with torch's default
    opt = make_adam(model.parameters(), lr=1e-3) if impl == "mbrec_fast" else torch.optim.Adam(model.parameters(), lr=1e-3)
    if impl == "mbrec_fast":
        def run():
            for batch in model.training_batches(data, 0, batch_size, 0):
                opt.zero_grad()
                loss, _ = model.loss(batch)
                loss.backward()
                opt.step()
    elif name.startswith("member"):  # pool negatives, generative-loss edges, InfoNCE nodes the plain way too
        def run():
            with _plain_ops(model, impl):
                plain_member_epoch(model, data, set_sampler, opt, batch_size=batch_size)
    else:
        positives = _positive_rows(model, data)
        mode = "cascade" if name == "mcbpr" else "exclusive"
        assert positives[0].numel() == sum(b["users"].numel() for b in model.training_batches(data, 0, BATCH, 0))

        def run():
            with _plain_ops(model, impl):
                plain_epoch(model, positives, set_sampler, opt, batch_size=BATCH, num_neg=model.neg_ratio, mode=mode)
    n_pos = len(model.training_batches(data, 0, batch_size, 0))
    record(op="multibehavior", case=f"{name} epoch {_case(data)}", impl=impl, model=name, batches=n_pos,
           batch_size=batch_size)
    benchmark.group = f"multibehavior: {name} epoch {_case(data)}"
    benchmark.pedantic(run, rounds=_rounds(name, "epoch"), iterations=1, warmup_rounds=0)


@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize("impl", ["mbrec_fast", "plain_torch", "dense_topk"])
def test_full_ranking_eval(benchmark, record, data, name, impl):
    """Full-ranking test evaluation. plain_torch: the model's scores the plain way (NMTR with MLP towers: its
    pairwise MLP over every (user, item), `reference.multibehavior.nmtr_scores_plain`), a dense score block,
    torch.topk. dense_topk (NMTR only): the package's scorer (`NMTR.score_block`) feeding the same dense top-K,
    which isolates the evaluator's share."""
    model = _model(name, data).eval()
    pairwise = getattr(model, "use_mlp", False)  # NMTR with MLP / NeuMF units
    if impl == "dense_topk" and not pairwise:
        pytest.skip("dense_topk differs from plain_torch only for NMTR's MLP scorer")
    with torch.no_grad():
        if hasattr(model, "on_epoch_start"):
            model.on_epoch_start(data, 0, 0)
    labels = data.test_visited

    if impl == "mbrec_fast":
        def run():
            with torch.no_grad():
                return evaluate_model(model, data, "test", KS)
    else:
        def run():
            with torch.no_grad(), _plain_ops(model, "plain_torch"):
                scorer = model.scorer()
                if scorer.score_fn is None:
                    rows = lambda u: scorer.user_emb[u] @ scorer.item_emb.T  # noqa: E731
                elif pairwise and impl == "plain_torch":
                    rows = lambda u: nmtr_scores_plain(model, u, 0, data.n_items)  # noqa: E731
                else:
                    rows = lambda u: scorer.score_fn(u, 0, data.n_items)  # noqa: E731
                return dense_topk_evaluate(rows, data.n_users, data.n_items, data.exclude("test"), data.test, KS,
                                           target_groups=labels, group_names=["unvisited", "visited"],
                                           batch_users=256)
    record(op="multibehavior", case=f"{name} eval {_case(data)}", impl=impl, model=name,
           users=int(data.eval_users("test").numel()), items=data.n_items)
    benchmark.group = f"multibehavior: {name} eval {_case(data)}"
    result = benchmark.pedantic(run, rounds=_rounds(name, "eval"), iterations=1, warmup_rounds=0)
    overall = result if impl == "mbrec_fast" else result["all"]
    assert 0.0 <= overall["ndcg@10"] <= 1.0
    benchmark.extra_info["ndcg@10"] = overall["ndcg@10"]


@pytest.mark.parametrize("impl", ["mbrec_fast", "plain_torch"])
def test_nmtr_scoring_tmall_size(benchmark, record, impl):
    """NMTR (NeuMF units, d = 64, 3-layer towers, 3 behaviors as Tmall's view, cart, buy) scoring users against every item of a Tmall-size
    catalog (15,449 users x 11,953 items): `NMTR.score_block` (first layer split into user / item halves, the rest
    tiled) against the plain pairwise MLP (`reference.multibehavior.nmtr_scores_plain`). extra_info: users/s
    and the implied seconds of one full-ranking pass over all 15,449 users (what validating every epoch costs)."""
    from mbrec_fast.models.nmtr import NMTR
    n_users, n_items = 15_449, 11_953
    torch.manual_seed(0)
    model = NMTR(n_users, n_items, 3, dim=64, interaction="neumf").eval()
    users = torch.arange(256 if FULL else 64)
    fn = model.score_block if impl == "mbrec_fast" else (lambda u, a, b: nmtr_scores_plain(model, u, a, b))

    def run():
        with torch.no_grad():
            return fn(users, 0, n_items)
    record(op="multibehavior", case=f"nmtr score_fn tmall-size {n_users}x{n_items}", impl=impl, users=len(users),
           items=n_items)
    benchmark.group = "multibehavior: nmtr scoring, Tmall-size catalog"
    benchmark.pedantic(run, rounds=2, iterations=1, warmup_rounds=0)
    mean = benchmark.stats.stats.mean if getattr(benchmark, "stats", None) is not None else None
    if mean:
        benchmark.extra_info["users_per_s"] = len(users) / mean
        benchmark.extra_info["full_pass_s"] = n_users * mean / len(users)
