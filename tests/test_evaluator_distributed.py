"""evaluate_full_ranking over 2 gloo processes on CPU equals the single-process result."""
import os
import pickle
import socket
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mbrec_fast.evaluator import evaluate_full_ranking


def _problem():
    gen = torch.Generator().manual_seed(11)
    U, N = 61, 80  # odd user count: uneven shards
    ue = torch.randint(-2, 3, (U, 4), generator=gen).float()
    ie = torch.randint(-2, 3, (N, 4), generator=gen).float()

    def csr(p):
        m = torch.rand(U, N, generator=gen) < p
        ptr = torch.zeros(U + 1, dtype=torch.int64)
        ptr[1:] = m.sum(1).cumsum(0)
        return ptr, m.nonzero()[:, 1].contiguous()

    ex, tg = csr(0.2), csr(0.05)
    labels = torch.randint(0, 2, (tg[1].numel(),), generator=gen)
    return ue, ie, ex, tg, labels


def _evaluate(process_group, score_fn=False):
    ue, ie, ex, tg, labels = _problem()
    kw = dict(ks=(1, 5, 20), target_groups=labels, group_names=["unvisited", "visited"], per_user=True,
              process_group=process_group, block_users=8, block_items=16)
    if score_fn:
        return evaluate_full_ranking(None, None, ex, tg, score_fn=lambda u, a, b: ue[u] @ ie[a:b].T,
                                     n_items=ie.shape[0], **kw)
    return evaluate_full_ranking(ue, ie, ex, tg, **kw)


def _worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = [_evaluate("default"), _evaluate(dist.group.WORLD, score_fn=True)]
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump([(r.metrics, r.groups, r.group_users, r.n_users, r.n_skipped,
                          {k: v.tolist() for k, v in r.per_user.items()}) for r in results], f)
    finally:
        dist.destroy_process_group()
    # skip interpreter finalization, where gloo's worker threads can abort a finished rank (pytorch/pytorch#179291)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_two_gloo_ranks_match_single_process():
    single = _evaluate(None)
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(2, _free_port(), out_dir), nprocs=2, join=True)
        per_rank = []
        for rank in range(2):
            with open(os.path.join(out_dir, f"rank{rank}.pkl"), "rb") as f:
                per_rank.append(pickle.load(f))
    for results in per_rank:
        for metrics, groups, group_users, n_users, n_skipped, per_user in results:
            assert n_users == single.n_users and n_skipped == single.n_skipped
            assert group_users == single.group_users
            for name, value in single.metrics.items():
                assert metrics[name] == pytest.approx(value, rel=1e-12, abs=1e-12)
            for g in single.groups:
                for name, value in single.groups[g].items():
                    assert groups[g][name] == pytest.approx(value, rel=1e-12, abs=1e-12)
            # gathered per-user rows: same users, same values (shards are contiguous, in order)
            assert per_user["user"] == single.per_user["user"].tolist()
            assert per_user["ndcg@5"] == single.per_user["ndcg@5"].tolist()
    # every rank returns the same result
    assert per_rank[0] == per_rank[1]
