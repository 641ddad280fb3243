"""`mbrec-fast demo`: the package end to end on Beibei in a few minutes.

Part 1 trains a BPR matrix factorization on the purchases and evaluates it with the fused full-ranking
evaluator (overall and on visited / unvisited held-out items), timed against the dense (RecBole-style)
evaluation in the same run. Part 2 trains a seed system through `mbrec-fast train` (NMTR with GMF
heads and d = 32 by default, `--seed-model member|none`) for a short schedule and prints the same
table and where the time went. Outputs go to --run-dir (default: mbrec-fast-demo in the temp folder).

Data: --data PATH (a data root holding beibei/, or the dataset folder), else $MBREC_FAST_DATA,
../shared/data beside a source checkout, ./data or the current directory.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from .evaluator import evaluate_full_ranking
from .reference.evaluator import dense_blocked_evaluate

__all__ = ["main", "load_multibehavior", "train_bpr_mf"]


def _resolve_dataset(path: Optional[pathlib.Path], name: str) -> pathlib.Path:
    """The dataset folder: PATH itself or PATH/name when given, else name under the searched data roots."""
    if path is None:
        from .data.paths import find_in_data_roots
        return find_in_data_roots(name, "meta.json", what="data set")
    if (path / "meta.json").is_file():
        return path
    if (path / name / "meta.json").is_file():
        return path / name
    raise FileNotFoundError(f"mbrec-fast demo: no dataset at {path} (expected {path}/meta.json or "
                            f"{path}/{name}/meta.json)")


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
                 seed: int = 0, progress: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """BPR matrix factorization on (user, item) pairs with uniform negatives; plain torch, fixed seed.

    Sparse embedding gradients with SparseAdam: a step touches only the rows in the batch.
    progress: a bar (steps, rate, time left) on stderr.
    """
    from ._progress import progress_bar
    gen = torch.Generator().manual_seed(seed)
    user_table = torch.nn.Embedding(n_users, dim, sparse=True)
    item_table = torch.nn.Embedding(n_items, dim, sparse=True)
    with torch.no_grad():
        user_table.weight.copy_(torch.randn(n_users, dim, generator=gen) * 0.1)
        item_table.weight.copy_(torch.randn(n_items, dim, generator=gen) * 0.1)
    opt = torch.optim.SparseAdam(list(user_table.parameters()) + list(item_table.parameters()), lr=lr)
    u_all, i_all = torch.from_numpy(users), torch.from_numpy(items)
    bar = progress_bar(progress, total=epochs * -(-u_all.numel() // batch), desc="BPR-MF training", unit=" steps")
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
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return user_table.weight.detach().clone(), item_table.weight.detach().clone()


def default_run_dir() -> pathlib.Path:
    """mbrec-fast-demo in the temp folder: never inside the repository the demo may be run from."""
    return pathlib.Path(tempfile.gettempdir()) / "mbrec-fast-demo"


def build_parser() -> argparse.ArgumentParser:
    from .training.cli_options import HelpFormatter, add_progress
    parser = argparse.ArgumentParser(prog="mbrec-fast demo", formatter_class=HelpFormatter,
                                     description=__doc__.split("\n\n")[1].replace("`", ""))
    parser.add_argument("--data", type=pathlib.Path, default=None, metavar="PATH",
                        help="data root holding the dataset folder, or the dataset folder itself "
                             "(default: searched, see mbrec-fast --help)")
    parser.add_argument("--dataset", default="beibei", help="dataset folder name under the data root")
    parser.add_argument("--emb-dim", "--dim", dest="dim", type=int, default=64, metavar="N",
                        help="BPR-MF embedding size (--dim is an alias)")
    parser.add_argument("--epochs", type=int, default=10, help="BPR-MF training epochs")
    parser.add_argument("--seed", type=int, default=0, help="seed of both parts")
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 20, 50, 100], help="cut-offs K")
    parser.add_argument("--seed-model", default="nmtr", choices=["nmtr", "member", "none"],
                        help="seed system trained in part 2 (none: skip part 2)")
    parser.add_argument("--seed-model-epochs", type=int, default=1, help="training epochs of part 2")
    parser.add_argument("--run-dir", "--out", dest="out", type=pathlib.Path, default=None, metavar="DIR",
                        help=f"where the outputs go (default: {default_run_dir()}; --out is an alias)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    add_progress(parser)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from ._progress import progress_enabled
    from .training.multibehavior import GROUPS, VISITED_NOTE, ranking_table
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    n_threads = f"{threads} thread{'s' if threads != 1 else ''}"
    show_progress = progress_enabled(False if args.no_progress else None)
    run_dir = args.out or default_run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"mbrec-fast demo: outputs in {run_dir} (--run-dir DIR), {n_threads} (--threads N)")

    folder = _resolve_dataset(args.data, args.dataset)
    t0 = time.perf_counter()
    data = load_multibehavior(folder)
    meta = data["meta"]
    n_users, n_items = meta["n_users"], meta["n_items"]
    is_target = data["behaviors"] == data["target"]
    print(f"data: {meta.get('name', folder.name)} from {folder}, loaded in {time.perf_counter() - t0:.1f}s\n"
          f"  {n_users:,} users, {n_items:,} items, {int(is_target.sum()):,} training {meta['target']} events, "
          f"{len(data['test']):,} test pairs")

    print(f"\n[1/2] BPR-MF, d = {args.dim}, {args.epochs} epoch{'s' if args.epochs != 1 else ''} on the "
          f"{meta['target']} events", flush=True)
    t0 = time.perf_counter()
    ue, ie = train_bpr_mf(data["users"][is_target], data["items"][is_target], n_users, n_items,
                          dim=args.dim, epochs=args.epochs, seed=args.seed, progress=show_progress)
    t_train = time.perf_counter() - t0
    print(f"trained in {t_train:.1f}s; full-ranking test metrics:")

    exclude = _csr(data["users"][is_target], data["items"][is_target], n_users)
    aux = _csr(data["users"][~is_target], data["items"][~is_target], n_users)
    test = data["test"]
    targets = _csr(test[:, 0], test[:, 1], n_users)
    # visited = the user touched the held-out item under an auxiliary behavior in training
    t_users = torch.repeat_interleave(torch.arange(n_users), targets[0].diff())
    aux_users = torch.repeat_interleave(torch.arange(n_users), aux[0].diff())
    visited = np.isin((t_users * n_items + targets[1]).numpy(), (aux_users * n_items + aux[1]).numpy())
    labels = torch.from_numpy(visited.astype(np.int64))

    ks = tuple(k for k in args.ks if k <= n_items)
    evaluate_full_ranking(ue[:64], ie, None, (targets[0][:65], targets[1][:int(targets[0][64])]), ks)  # warm-up
    t0 = time.perf_counter()
    res = evaluate_full_ranking(ue, ie, exclude, targets, ks, target_groups=labels,
                                group_names=["unvisited", "visited"])
    t_fused = time.perf_counter() - t0
    print(ranking_table([("overall", res.metrics, res.n_users)]
                        + [(g, res.groups[g], res.group_users[g]) for g, _ in GROUPS[1:]], ks))
    print(VISITED_NOTE)
    if res.n_skipped:
        print(f"({res.n_skipped:,} users without test items skipped)")

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
    worst = max(abs(res.metrics[n] - dense[n]) for n in res.metrics)
    print(f"\nspeed of full ranking, {n_users:,} users x {n_items:,} items, top-{max(ks)}, {n_threads}:")
    print(f"  {'fused evaluator (this package)':<41}{n_users / t_fused:>8,.0f} users/s")
    print(f"  {'dense torch.mm + topk, 4096-user batches':<41}{n_users / t_dense:>8,.0f} users/s"
          f"  {t_dense / t_fused:5.1f}x slower")
    print(f"  {f'dense, RecBole batching ({recbole_users} user/step)*':<41}{n_users / t_recbole:>8,.0f} users/s"
          f"  {t_recbole / t_fused:5.1f}x slower")
    print(f"  (* timed on {n_sub:,} users; fused and dense metrics "
          f"{'are identical' if worst == 0 else f'agree to {worst:.0e}'})")
    summary = {"dataset": meta.get("name", folder.name), "threads": threads, "dim": args.dim, "epochs": args.epochs,
               "train_s": t_train, "test": {"overall": res.metrics, **res.groups}, "users": res.n_users,
               "group_users": res.group_users, "users_per_s": {"fused": n_users / t_fused,
                                                               "dense_4096": n_users / t_dense,
                                                               "dense_recbole": n_users / t_recbole}}
    with open(run_dir / "bpr-mf.json", "w") as f:
        json.dump(summary, f, indent=1)
    if args.seed_model != "none":
        _seed_model_part(folder, args, run_dir, show_progress)
    print(f"\ndemo outputs in {run_dir}:\n  bpr-mf.json (part 1)" +
          (f"\n  {args.seed_model}-{folder.name}/ (part 2: metrics.json, curves.png, checkpoints)"
           if args.seed_model != "none" else ""))
    return 0


def _seed_model_part(folder: pathlib.Path, args, run_dir: pathlib.Path, show_progress: bool) -> None:
    """Trains a seed system (NMTR by default) for a short schedule through `mbrec-fast train` and prints
    its full-ranking metrics (overall / visited / unvisited) and where the time went."""
    from .training.multibehavior import train_main
    # NMTR with GMF heads (one of the paper's NCF units): its full-ranking score is a GEMM per head.
    settings = {"nmtr": ["--emb-dim", "32", "--interaction", "gmf", "--batch-size", "16384", "--lr", "0.005"],
                "member": ["--batch-size", "8192", "--lr", "0.005"]}[args.seed_model]
    what = {"nmtr": "NMTR with GMF heads, d = 32", "member": "MEMBER, d = 32"}[args.seed_model]
    epochs = f"{args.seed_model_epochs} epoch" + ("s" if args.seed_model_epochs != 1 else "")
    print(f"\n[2/2] {what}, {epochs}, through mbrec-fast train:")
    train_main(["--model", args.seed_model, "--data", str(folder), "--epochs", str(args.seed_model_epochs),
                "--seed", str(args.seed), "--run-dir", str(run_dir / f"{args.seed_model}-{folder.name}"),
                "--valid", "none", "--ks", *[str(k) for k in args.ks], *settings]
               + ([] if show_progress else ["--no-progress"]))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
