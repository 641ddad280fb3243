"""`mbrec-fast demo`: train a small BPR matrix factorization on Beibei purchases and evaluate it with
the fused full-ranking evaluator, overall and on visited / unvisited held-out items, next to the
dense (RecBole-style) evaluation timed in the same run; then train a seed system (NMTR with GMF heads
by default, `--seed-model member|none`) for a short schedule and print its full-ranking metrics
(overall / visited / unvisited) and where the time went.

Data: --data PATH, else $MBREC_FAST_DATA, else ../shared/data next to the repository; the folder
may be the data root (holding beibei/) or a dataset folder in the canonical layout.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from .evaluator import evaluate_full_ranking
from .reference.evaluator import dense_blocked_evaluate

__all__ = ["main", "load_multibehavior", "train_bpr_mf"]


def _default_data_root() -> pathlib.Path:
    env = os.environ.get("MBREC_FAST_DATA")
    if env:
        return pathlib.Path(env)
    return pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def _resolve_dataset(path: pathlib.Path, name: str) -> pathlib.Path:
    if (path / "meta.json").is_file():
        return path
    if (path / name / "meta.json").is_file():
        return path / name
    raise SystemExit(f"mbrec-fast demo: no dataset found at {path} (expected meta.json or {name}/meta.json); "
                     "pass --data PATH or set MBREC_FAST_DATA")


def _csr(rows: np.ndarray, cols: np.ndarray, n_rows: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sorted, deduplicated CSR from (row, col) pairs."""
    key = np.unique(rows.astype(np.int64) * (int(cols.max()) + 1 if cols.size else 1) + cols.astype(np.int64))
    width = int(cols.max()) + 1 if cols.size else 1
    r, c = key // width, key % width
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.add.at(indptr, r + 1, 1)
    return torch.from_numpy(np.cumsum(indptr)), torch.from_numpy(c.astype(np.int64))


def load_multibehavior(folder: pathlib.Path) -> Dict:
    """Reads a canonical multi-behavior dataset: training pairs per behavior, test pairs, meta."""
    meta = json.loads((folder / "meta.json").read_text())
    users, items, behaviors = [], [], []
    names = {b: i for i, b in enumerate(meta["behaviors"])}
    with open(folder / "interactions.tsv") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            users.append(int(parts[0]))
            items.append(int(parts[1]))
            behaviors.append(names[parts[2]])
    test = np.loadtxt(folder / "test.tsv", dtype=np.int64, ndmin=2)
    return {"meta": meta, "users": np.asarray(users, dtype=np.int64), "items": np.asarray(items, dtype=np.int64),
            "behaviors": np.asarray(behaviors, dtype=np.int64), "target": names[meta["target"]], "test": test}


def train_bpr_mf(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int, dim: int = 64,
                 epochs: int = 10, batch: int = 8192, lr: float = 1e-2, reg: float = 1e-4,
                 seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """BPR matrix factorization on (user, item) pairs with uniform negatives; plain torch, fixed seed.

    Sparse embedding gradients with SparseAdam: a step touches only the rows in the batch.
    """
    gen = torch.Generator().manual_seed(seed)
    user_table = torch.nn.Embedding(n_users, dim, sparse=True)
    item_table = torch.nn.Embedding(n_items, dim, sparse=True)
    with torch.no_grad():
        user_table.weight.copy_(torch.randn(n_users, dim, generator=gen) * 0.1)
        item_table.weight.copy_(torch.randn(n_items, dim, generator=gen) * 0.1)
    opt = torch.optim.SparseAdam(list(user_table.parameters()) + list(item_table.parameters()), lr=lr)
    u_all, i_all = torch.from_numpy(users), torch.from_numpy(items)
    for _ in range(epochs):
        perm = torch.randperm(u_all.numel(), generator=gen)
        for start in range(0, perm.numel(), batch):
            idx = perm[start:start + batch]
            u, p = u_all[idx], i_all[idx]
            n = torch.randint(0, n_items, (idx.numel(),), generator=gen)
            eu, ep, en = user_table(u), item_table(p), item_table(n)
            x = (eu * (ep - en)).sum(1)
            l2 = (eu.pow(2).sum() + ep.pow(2).sum() + en.pow(2).sum()) / idx.numel()
            loss = -torch.nn.functional.logsigmoid(x).mean() + reg * l2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return user_table.weight.detach().clone(), item_table.weight.detach().clone()


def _table(rows: List[Tuple[str, Dict[str, float], int]], ks, metrics) -> str:
    header = ["targets", "users"] + [f"{m}@{k}" for k in ks for m in metrics]
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for name, values, n in rows:
        lines.append(" | ".join([name, str(n)] + [f"{values[f'{m}@{k}']:.4f}" for k in ks for m in metrics]))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="mbrec-fast demo", description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=pathlib.Path, default=None, help="data root or dataset folder")
    parser.add_argument("--dataset", default="beibei")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 20, 50, 100])
    parser.add_argument("--seed-model", default="nmtr", choices=["nmtr", "member", "none"],
                        help="seed system trained after the MF part (none: skip)")
    parser.add_argument("--seed-model-epochs", type=int, default=1)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/demo"),
                        help="run directory of the seed model (metrics.json, curves.png, checkpoints)")
    args = parser.parse_args(argv)

    folder = _resolve_dataset(args.data or _default_data_root(), args.dataset)
    t0 = time.perf_counter()
    data = load_multibehavior(folder)
    meta = data["meta"]
    n_users, n_items = meta["n_users"], meta["n_items"]
    is_target = data["behaviors"] == data["target"]
    print(f"{meta.get('name', folder.name)}: {n_users} users, {n_items} items, "
          f"{int(is_target.sum())} training {meta['target']} events, {len(data['test'])} test pairs "
          f"(loaded in {time.perf_counter() - t0:.1f}s)")

    t0 = time.perf_counter()
    ue, ie = train_bpr_mf(data["users"][is_target], data["items"][is_target], n_users, n_items,
                          dim=args.dim, epochs=args.epochs, seed=args.seed)
    print(f"BPR-MF d={args.dim}: trained {args.epochs} epochs in {time.perf_counter() - t0:.1f}s")

    exclude = _csr(data["users"][is_target], data["items"][is_target], n_users)
    aux = _csr(data["users"][~is_target], data["items"][~is_target], n_users)
    test = data["test"]
    targets = _csr(test[:, 0], test[:, 1], n_users)
    # visited = the user touched the held-out item under an auxiliary behavior in training
    t_users = torch.repeat_interleave(torch.arange(n_users), targets[0].diff())
    aux_users = torch.repeat_interleave(torch.arange(n_users), aux[0].diff())
    visited = np.isin((t_users * n_items + targets[1]).numpy(), (aux_users * n_items + aux[1]).numpy())
    labels = torch.from_numpy(visited.astype(np.int64))

    ks = tuple(args.ks)
    metrics = ("hr", "ndcg", "recall", "mrr")
    evaluate_full_ranking(ue[:64], ie, None, (targets[0][:65], targets[1][:int(targets[0][64])]), ks)  # warm-up
    t0 = time.perf_counter()
    res = evaluate_full_ranking(ue, ie, exclude, targets, ks, target_groups=labels,
                                group_names=["unvisited", "visited"])
    t_fused = time.perf_counter() - t0
    t0 = time.perf_counter()
    dense = dense_blocked_evaluate(ue, ie, exclude, targets, ks, block_users=4096)
    t_dense = time.perf_counter() - t0
    # RecBole's own batching: max(eval_batch_size // n_items, 1) users per step, eval_batch_size = 4096
    # (timed on the first 2048 users, that path is slow)
    recbole_users = max(4096 // n_items, 1)
    n_sub = min(2048, n_users)
    sub = lambda csr: (csr[0][:n_sub + 1], csr[1][:int(csr[0][n_sub])])  # noqa: E731
    t0 = time.perf_counter()
    dense_blocked_evaluate(ue[:n_sub], ie, sub(exclude), sub(targets), ks, block_users=recbole_users)
    t_recbole = (time.perf_counter() - t0) * n_users / n_sub

    rows = [("all", res.metrics, res.n_users)] + [(g, res.groups[g], res.group_users[g]) for g in res.groups]
    print(_table(rows, ks, metrics))
    if res.n_skipped:
        print(f"({res.n_skipped} users without test items skipped)")
    worst = max(abs(res.metrics[n] - dense[n]) for n in res.metrics)
    print(f"full ranking of {n_users} users x {n_items} items, top-{max(ks)}: fused {t_fused * 1e3:.0f} ms "
          f"({n_users / t_fused:,.0f} users/s)")
    print(f"  dense torch.mm + torch.topk, 4096-user batches: {t_dense * 1e3:.0f} ms -> fused is "
          f"{t_dense / t_fused:.1f}x faster (max |fused - dense| over metrics = {worst:.1e})")
    print(f"  dense with RecBole's default batching ({recbole_users} user(s) per step, timed on {n_sub} users): "
          f"{n_users / t_recbole:,.0f} users/s -> fused is {t_recbole / t_fused:.1f}x faster")
    if args.seed_model != "none":
        _seed_model_part(folder, args)
    return 0


def _seed_model_part(folder: pathlib.Path, args) -> None:
    """Trains a seed system (NMTR by default) for a short schedule through `mbrec-fast train` and prints
    its full-ranking metrics (overall / visited / unvisited) and where the time went."""
    from .training.multibehavior import train_main
    # NMTR with GMF heads (one of the paper's NCF units): its full-ranking score is a GEMM per head.
    settings = {"nmtr": ["--dim", "32", "--interaction", "gmf", "--batch-size", "16384", "--lr", "0.005"],
                "member": ["--batch-size", "8192", "--lr", "0.005"]}[args.seed_model]
    print(f"\n{args.seed_model.upper()} on {folder.name}: {args.seed_model_epochs} epoch(s), full-ranking test")
    run_dir = args.out / f"{args.seed_model}-{folder.name}"
    train_main(["--model", args.seed_model, "--data", str(folder), "--epochs", str(args.seed_model_epochs),
                "--seed", str(args.seed), "--out", str(run_dir), "--no-progress", "--valid", "none",
                "--ks", *[str(k) for k in args.ks], *settings])


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
