"""Multi-behavior interaction data: loaders for the canonical layout and for any table, splits, and a
seeded synthetic generator that scales to millions of users and items.

Everything is vectorized NumPy (no per-user Python loops): ids are re-indexed with `np.unique`,
CSRs are built by `mbrec_fast.csr` from sorted `user * n_items + item` keys, and leave-one-out picks
one row per user with a lexsort. Behaviors are integers in cascade order, 0 = weakest (e.g. view), last = target (buy).

Held-out target items are labelled *visited* (1) when the user touched the item under an auxiliary
(non-target) behavior in the training data, *unvisited* (0) otherwise.
"""
from __future__ import annotations

import json
import os
import pathlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .._checks import check_id_column, data_file
from ..csr import Csr, build_csr, csr_contains, csr_rows, union_csr
from ..sampler import InteractionGraph

__all__ = ["MultiBehaviorData", "load_dataset", "from_table", "from_arrays",
           "synthetic_multibehavior", "default_data_root", "build_csr", "csr_contains"]


def _make_graph(users: np.ndarray, items: np.ndarray, behaviors: np.ndarray, n_users: int, n_items: int,
                behavior_names: Sequence[str]) -> InteractionGraph:
    """The sampler's packed per-behavior CSR graph (duplicates merged, rows sorted)."""
    return InteractionGraph.from_arrays(torch.from_numpy(users), torch.from_numpy(items), torch.from_numpy(behaviors),
                                        n_users, n_items, behavior_names=[str(b) for b in behavior_names])


# ------------------------------------------------------------------------------------------ the data set
@dataclass
class MultiBehaviorData:
    """A multi-behavior data set ready for training and full-ranking evaluation.

    train: per-behavior CSR graph (cascade order, target last). valid / test: CSR of held-out target
    items per user (valid may be None). *_visited: int64 label per held-out item, aligned with the
    CSR indices (1 = the user touched it at an auxiliary behavior in training, 0 = unvisited).
    user_ids / item_ids: original ids of the re-indexed users / items when loaded from a table.
    """

    name: str
    n_users: int
    n_items: int
    behavior_names: List[str]
    train: InteractionGraph
    test: Csr
    test_visited: torch.Tensor
    valid: Optional[Csr] = None
    valid_visited: Optional[torch.Tensor] = None
    user_ids: Optional[np.ndarray] = None
    item_ids: Optional[np.ndarray] = None
    info: Dict[str, object] = field(default_factory=dict)

    @property
    def n_behaviors(self) -> int:
        return len(self.behavior_names)

    @property
    def target(self) -> int:
        """Index of the target behavior (the last in cascade order)."""
        return self.n_behaviors - 1

    def behavior_csr(self, behavior: int) -> Csr:
        return self.train.csr(behavior)

    def target_csr(self) -> Csr:
        return self.train.csr(self.target)

    def aux_csr(self) -> Csr:
        """Items each user touched under any auxiliary (non-target) behavior in training."""
        return self.train.aux_csr()

    def union_csr(self) -> Csr:
        return self.train.union_csr()

    def pairs(self, behavior: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(users, items) int64 of one behavior's training interactions, sorted by user then item."""
        return self.train.positives(behavior)

    def split(self, split: str) -> Tuple[Csr, torch.Tensor]:
        """(targets CSR, visited labels) of "valid" or "test"."""
        if split == "test":
            return self.test, self.test_visited
        if split == "valid":
            if self.valid is None:
                raise ValueError("this data set has no validation split (loaded with valid='none')")
            return self.valid, self.valid_visited
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")

    def exclude(self, split: str) -> Csr:
        """Items masked when ranking for `split`: the training target items, plus for "test" the
        validation items (they are known purchases at test time)."""
        base = self.target_csr()
        if split == "valid":
            self.split("valid")
            return base
        if split != "test":
            raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
        if self.valid is None:
            return base
        if "_test_exclude" not in self.info:
            self.info["_test_exclude"] = union_csr([base, self.valid], self.n_users, self.n_items)
        return self.info["_test_exclude"]

    def eval_users(self, split: str) -> torch.Tensor:
        """Users with at least one held-out item in `split` (the only ones the evaluator scores)."""
        targets, _ = self.split(split)
        return torch.nonzero(targets[0].diff() > 0).flatten()

    def summary(self) -> str:
        counts = ", ".join(f"{n} {int(self.train.csr(r)[1].numel()):,}" for r, n in enumerate(self.behavior_names))
        vis = self.test_visited
        out = (f"{self.name}: {self.n_users:,} users, {self.n_items:,} items, train [{counts}], "
               f"test {int(self.test[1].numel()):,} ({int(vis.sum()):,} visited / {int((vis == 0).sum()):,} unvisited)")
        if self.valid is not None:
            out += f", valid {int(self.valid[1].numel()):,}"
        return out


def _visited_labels(aux: Csr, targets: Csr, n_items: int) -> torch.Tensor:
    rows = csr_rows(targets).numpy()
    return torch.from_numpy(csr_contains(aux, rows, targets[1].numpy(), n_items).astype(np.int64))


def _pick_one_per_user(users: np.ndarray, order_key: np.ndarray) -> np.ndarray:
    """Row index of the row with the largest order_key for each user present (ties: last row)."""
    order = np.lexsort((np.arange(users.size), order_key, users))
    u_sorted = users[order]
    last = np.ones(u_sorted.size, dtype=bool)
    last[:-1] = u_sorted[1:] != u_sorted[:-1]
    return order[last]


def _leave_one_out(users: np.ndarray, timestamps: Optional[np.ndarray], rng: np.random.Generator,
                   min_keep: int) -> np.ndarray:
    """Bool mask of rows held out: per user the latest row (by timestamp, random among equal times) or a
    random row without timestamps; only users keeping at least `min_keep` rows give one."""
    noise = rng.random(users.size)
    if timestamps is not None:
        # exact lexicographic (timestamp, noise) order without float rounding of big timestamps
        order = np.lexsort((noise, timestamps, users))
        u_sorted = users[order]
        last = np.ones(u_sorted.size, dtype=bool)
        last[:-1] = u_sorted[1:] != u_sorted[:-1]
        picked = order[last]
    else:
        picked = _pick_one_per_user(users, noise)
    counts = np.bincount(users, minlength=int(users.max()) + 1 if users.size else 0)
    picked = picked[counts[users[picked]] > min_keep]
    mask = np.zeros(users.size, dtype=bool)
    mask[picked] = True
    return mask


def from_arrays(users: np.ndarray, items: np.ndarray, behaviors: np.ndarray, n_users: int, n_items: int,
                behavior_names: Sequence[str], *, test: Optional[Tuple[np.ndarray, np.ndarray]] = None,
                timestamps: Optional[np.ndarray] = None, split: str = "leave-one-out",
                valid: str = "leave-one-out", test_fraction: float = 0.1, seed: int = 0,
                name: str = "data", user_ids=None, item_ids=None) -> MultiBehaviorData:
    """Builds `MultiBehaviorData` from dense 0-based arrays (behaviors int in cascade order, target last).

    test: explicit held-out (users, items) of the target behavior; otherwise `split` makes one:
    "leave-one-out" holds out each user's latest target interaction (random one without timestamps;
    only users with >= 2 of them), "time" holds out the target interactions in the last
    `test_fraction` of the time span and drops every interaction at or after that cut from training.
    valid: "leave-one-out" holds out one more training target item per user the same way (the latest,
    or a random one without timestamps; users with >= 2 training target items), or "none".
    Duplicate (user, item, behavior) rows count once. A held-out (user, item) is removed from the
    target behavior's training data (auxiliary behaviors keep it: that is what makes it visited).
    """
    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    behaviors = np.asarray(behaviors, dtype=np.int64)
    n_b = len(behavior_names)
    if not (users.shape == items.shape == behaviors.shape) or users.ndim != 1:
        raise ValueError("users, items and behaviors must be 1-D arrays of the same length")
    if n_b < 1:
        raise ValueError("behavior_names must name at least one behavior")
    for arr, n, what in ((users, n_users, "users"), (items, n_items, "items"), (behaviors, n_b, "behaviors")):
        if arr.size and (arr.min() < 0 or arr.max() >= n):
            raise ValueError(f"{what} ids must lie in [0, {n}), found [{arr.min()}, {arr.max()}]")
    if split not in ("leave-one-out", "time"):
        raise ValueError(f"split must be 'leave-one-out' or 'time', got {split!r}")
    if valid not in ("leave-one-out", "none"):
        raise ValueError(f"valid must be 'leave-one-out' or 'none', got {valid!r}")
    if timestamps is not None:
        timestamps = np.asarray(timestamps)
        if timestamps.shape != users.shape:
            raise ValueError("timestamps must have one value per interaction")
    rng = np.random.default_rng(seed)
    target = n_b - 1
    is_t = behaviors == target

    if test is None:
        if split == "time":
            if timestamps is None:
                raise ValueError("split='time' needs timestamps")
            if not 0 < test_fraction < 1:
                raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
            lo, hi = timestamps.min(), timestamps.max()
            cut = lo + (1.0 - test_fraction) * (hi - lo)
            late = timestamps >= cut
            held = late & is_t
            test = (users[held], items[held])
            keep = ~late
        else:
            held_rows = np.flatnonzero(is_t)
            mask = _leave_one_out(users[held_rows], None if timestamps is None else timestamps[held_rows], rng, 1)
            held = np.zeros(users.size, dtype=bool)
            held[held_rows[mask]] = True
            test = (users[held], items[held])
            keep = np.ones(users.size, dtype=bool)
        users, items, behaviors = users[keep], items[keep], behaviors[keep]
        timestamps = None if timestamps is None else timestamps[keep]
    test_u, test_i = (np.asarray(a, dtype=np.int64) for a in test)
    for arr, n, what in ((test_u, n_users, "test users"), (test_i, n_items, "test items")):
        if arr.size and (arr.min() < 0 or arr.max() >= n):  # would wrap into another user's CSR row
            raise ValueError(f"{what} must lie in [0, {n}), found [{arr.min()}, {arr.max()}]")
    test_csr = build_csr(test_u, test_i, n_users, n_items)
    # the held-out pairs leave the target behavior's training data
    is_t = behaviors == target
    drop = is_t & csr_contains(test_csr, users, items, n_items)
    users, items, behaviors = users[~drop], items[~drop], behaviors[~drop]
    timestamps = None if timestamps is None else timestamps[~drop]

    valid_csr = None
    if valid == "leave-one-out":
        is_t = behaviors == target
        t_rows = np.flatnonzero(is_t)
        # one row per distinct (user, item): duplicates of a held-out pair must all leave training
        key = users[t_rows] * n_items + items[t_rows]
        _, first = np.unique(key, return_index=True)
        cand = t_rows[first]
        mask = _leave_one_out(users[cand], None if timestamps is None else timestamps[cand], rng, 1)
        valid_csr = build_csr(users[cand[mask]], items[cand[mask]], n_users, n_items)
        drop = is_t & csr_contains(valid_csr, users, items, n_items)
        users, items, behaviors = users[~drop], items[~drop], behaviors[~drop]

    graph = _make_graph(users, items, behaviors, n_users, n_items, behavior_names)
    aux = graph.aux_csr()
    data = MultiBehaviorData(name=name, n_users=int(n_users), n_items=int(n_items),
                             behavior_names=[str(b) for b in behavior_names], train=graph, test=test_csr,
                             test_visited=_visited_labels(aux, test_csr, n_items), user_ids=user_ids,
                             item_ids=item_ids)
    if valid_csr is not None:
        data.valid = valid_csr
        data.valid_visited = _visited_labels(aux, valid_csr, n_items)
    return data


# ------------------------------------------------------------------------------------------ loaders
def default_data_root() -> pathlib.Path:
    """The data root (see `mbrec_fast.data.paths`: $MBREC_FAST_DATA, ../shared/data beside a source
    checkout, ./data, the current directory)."""
    from .paths import default_data_root as root
    return root()


def _resolve(name_or_path: Union[str, os.PathLike]) -> pathlib.Path:
    p = pathlib.Path(name_or_path)
    if (p / "meta.json").is_file():
        return p
    if p.is_absolute():
        raise FileNotFoundError(f"no multi-behavior data set at {str(name_or_path)!r}: expected a folder with meta.json")
    from .paths import find_in_data_roots
    return find_in_data_roots(str(name_or_path), "meta.json", what="multi-behavior data set")


def _read_tsv(path: pathlib.Path, n_cols_min: int):
    import pandas as pd
    with data_file(path):
        df = pd.read_csv(path, sep="\t", header=None, comment=None, skip_blank_lines=False)
    if df.shape[1] < n_cols_min:
        raise ValueError(f"{path}: expected at least {n_cols_min} tab-separated columns, got {df.shape[1]}")
    return df


def _meta_count(meta, key: str) -> int:
    value = meta[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key} must be a non-negative integer, got {value!r}")
    return value


def load_dataset(name_or_path: Union[str, os.PathLike], valid: str = "leave-one-out", *, seed: int = 0,
                 use_timestamps: bool = True) -> MultiBehaviorData:
    """Loads a data set in the canonical layout (interactions.tsv, test.tsv, meta.json).

    name_or_path: a folder, or a name under the data root (e.g. "beibei", "retailrocket").
    The test split is test.tsv. valid="leave-one-out" holds out, per user with >= 2 training target
    items, the latest one (by timestamp when the file has timestamps, else a seeded random one);
    "none" keeps all training data (no early stopping).
    """
    folder = _resolve(name_or_path)
    with data_file(folder / "meta.json"):
        meta = json.loads((folder / "meta.json").read_text())
        names = list(meta["behaviors"])
        n_users, n_items = _meta_count(meta, "n_users"), _meta_count(meta, "n_items")
    if meta.get("target", names[-1]) != names[-1]:
        raise ValueError(f"{folder}/meta.json: target {meta['target']!r} must be the last behavior of {names}")
    df = _read_tsv(folder / "interactions.tsv", 3)
    code = {n: i for i, n in enumerate(names)}
    beh = df[2].astype(str).map(code)
    if beh.isna().any():
        bad = sorted(set(df[2].astype(str)[beh.isna()]))[:5]
        raise ValueError(f"{folder}/interactions.tsv: behaviors {bad} not in meta.json behaviors {names}")
    ts = df[3].to_numpy() if (df.shape[1] > 3 and use_timestamps) else None
    test = _read_tsv(folder / "test.tsv", 2)
    inter, held = folder / "interactions.tsv", folder / "test.tsv"
    return from_arrays(check_id_column(df[0], n_users, inter, "user"), check_id_column(df[1], n_items, inter, "item"),
                       beh.to_numpy(np.int64), n_users, n_items, names,
                       test=(check_id_column(test[0], n_users, held, "user"),
                             check_id_column(test[1], n_items, held, "item")), timestamps=ts,
                       valid=valid, seed=seed, name=str(meta.get("name", folder.name)))


def from_table(table, behavior_order: Optional[Sequence] = None, *, user_col: str = "user",
               item_col: str = "item", behavior_col: str = "behavior", time_col: Optional[str] = "timestamp",
               split: str = "leave-one-out", valid: str = "leave-one-out", test_fraction: float = 0.1,
               seed: int = 0, name: Optional[str] = None, meta: Optional[Union[str, os.PathLike]] = None
               ) -> MultiBehaviorData:
    """Builds a data set from any (user, item, behavior[, timestamp]) table.

    table: a pandas DataFrame or a path to a CSV / TSV / Parquet file (Parquet needs pyarrow).
    behavior_order: behaviors in cascade order, weakest first, target last; else taken from `meta`
    (a meta.json path) when given, else ordered by decreasing frequency (the funnel's usual shape).
    User and item ids of any type are re-indexed to dense 0-based ids (kept in user_ids / item_ids).
    split: "leave-one-out" or "time" (see `from_arrays`); valid: "leave-one-out" or "none".
    """
    import pandas as pd
    if isinstance(table, (str, os.PathLike)):
        path = pathlib.Path(table)
        suffix = path.suffix.lower()
        if suffix in (".parquet", ".pq"):
            df = pd.read_parquet(path)
        else:
            df = pd.read_csv(path, sep="\t" if suffix in (".tsv", ".txt") else ",")
        name = name or path.stem
    elif isinstance(table, pd.DataFrame):
        df = table
    else:
        raise TypeError(f"table must be a pandas DataFrame or a file path, got {type(table).__name__}")
    for col in (user_col, item_col, behavior_col):
        if col not in df.columns:
            raise ValueError(f"table has no column {col!r} (columns: {list(df.columns)})")
    if behavior_order is None and meta is not None:
        behavior_order = json.loads(pathlib.Path(meta).read_text())["behaviors"]
    if behavior_order is None:
        behavior_order = list(df[behavior_col].value_counts(sort=True).index)
    behavior_order = list(behavior_order)
    code = {b: i for i, b in enumerate(behavior_order)}
    beh = df[behavior_col].map(code)
    if beh.isna().any():
        bad = list(pd.unique(df[behavior_col][beh.isna()]))[:5]
        raise ValueError(f"behaviors {bad} are not in behavior_order {behavior_order}")
    user_ids, users = np.unique(df[user_col].to_numpy(), return_inverse=True)
    item_ids, items = np.unique(df[item_col].to_numpy(), return_inverse=True)
    ts = df[time_col].to_numpy() if (time_col is not None and time_col in df.columns) else None
    return from_arrays(users.astype(np.int64), items.astype(np.int64), beh.to_numpy(np.int64), len(user_ids),
                       len(item_ids), [str(b) for b in behavior_order], timestamps=ts, split=split, valid=valid,
                       test_fraction=test_fraction, seed=seed, name=name or "table",
                       user_ids=user_ids, item_ids=item_ids)


# ------------------------------------------------------------------------------------------ synthetic
def synthetic_multibehavior(n_users: int, n_items: int, behaviors: Sequence[str] = ("view", "cart", "buy"),
                            funnel: Sequence[float] = (1.0, 0.3, 0.4), *, interactions_per_user: float = 20.0,
                            direct_target_rate: float = 0.3, dim: int = 16, popularity_skew: float = 1.0,
                            affinity: float = 2.0, candidates: int = 8, valid: str = "leave-one-out",
                            seed: int = 0, chunk: int = 1 << 20) -> MultiBehaviorData:
    """Seeded synthetic multi-behavior data with planted user/item factors and a cascade funnel.

    Each user does Poisson(`interactions_per_user`) weakest-behavior events (at least 1). Items come from
    a Zipf-like popularity law (weight (rank+1)^-popularity_skew, ranks shuffled) re-weighted by the
    planted affinity <p_u, q_i>: `candidates` popularity draws per event, the one with the largest
    `affinity * <p_u, q_i> + Gumbel` wins (a sampled softmax, O(events * candidates * dim)).
    Each event moves up one behavior with probability sigmoid(logit(funnel[r]) + affinity * z), z the
    standardized affinity, so mean rates follow `funnel` and liked items go further. On top, a user
    makes Poisson(direct_target_rate * mean target events) target events with no earlier behavior
    (these make unvisited targets). One target item per user is held out as test (leave-one-out).
    Memory and time are linear in the number of events (processed in chunks of `chunk`).
    """
    n_b = len(behaviors)
    if n_users < 1 or n_items < 2:
        raise ValueError(f"need n_users >= 1 and n_items >= 2, got {n_users}, {n_items}")
    if len(funnel) != n_b:
        raise ValueError(f"funnel must have one rate per behavior ({n_b}), got {len(funnel)}")
    if any(not 0 < f <= 1 for f in funnel[1:]):
        raise ValueError(f"funnel rates after the first must lie in (0, 1], got {list(funnel)}")
    rng = np.random.default_rng(seed)
    p_user = (rng.standard_normal((n_users, dim)) / np.sqrt(dim)).astype(np.float32)
    q_item = (rng.standard_normal((n_items, dim)) / np.sqrt(dim)).astype(np.float32)
    weights = (np.arange(1, n_items + 1, dtype=np.float64)) ** (-float(popularity_skew))
    weights = weights[rng.permutation(n_items)]
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]

    def draw_items(users: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        out_i = np.empty(users.size, dtype=np.int64)
        out_z = np.empty(users.size, dtype=np.float32)
        step = max(chunk // max(candidates, 1), 1)
        for s in range(0, users.size, step):
            u = users[s:s + step]
            cand = np.minimum(np.searchsorted(cdf, rng.random((u.size, candidates))), n_items - 1)
            score = np.einsum("bd,bcd->bc", p_user[u], q_item[cand])
            best = np.argmax(affinity * score + rng.gumbel(size=score.shape), axis=1)
            out_i[s:s + u.size] = cand[np.arange(u.size), best]
            out_z[s:s + u.size] = score[np.arange(u.size), best]
        return out_i, out_z

    counts = np.maximum(rng.poisson(interactions_per_user, n_users), 1)
    ev_users = np.repeat(np.arange(n_users, dtype=np.int64), counts)
    ev_items, z = draw_items(ev_users)
    z = (z - z.mean()) / (z.std() + 1e-8)
    all_u, all_i, all_b = [ev_users], [ev_items], [np.zeros(ev_users.size, dtype=np.int64)]
    alive = np.ones(ev_users.size, dtype=bool)
    for r in range(1, n_b):
        rate = float(funnel[r])
        logit = np.log(rate) - np.log1p(-rate) if rate < 1 else 20.0
        p = 1.0 / (1.0 + np.exp(-(logit + affinity * z)))
        alive &= rng.random(ev_users.size) < p
        all_u.append(ev_users[alive])
        all_i.append(ev_items[alive])
        all_b.append(np.full(int(alive.sum()), r, dtype=np.int64))
    mean_target = all_u[-1].size / n_users
    if direct_target_rate > 0 and n_b > 1:
        d_counts = rng.poisson(direct_target_rate * mean_target, n_users)
        d_users = np.repeat(np.arange(n_users, dtype=np.int64), d_counts)
        d_items, _ = draw_items(d_users)
        all_u.append(d_users)
        all_i.append(d_items)
        all_b.append(np.full(d_users.size, n_b - 1, dtype=np.int64))
    users, items, behs = np.concatenate(all_u), np.concatenate(all_i), np.concatenate(all_b)
    # de-duplicate (user, item, behavior) triples before splitting
    key = np.unique((users * n_items + items) * n_b + behs)
    behs = key % n_b
    ui = key // n_b
    users, items = ui // n_items, ui % n_items
    data = from_arrays(users, items, behs, n_users, n_items, list(behaviors), split="leave-one-out",
                       valid=valid, seed=seed + 1, name=f"synthetic-{n_users}x{n_items}")
    data.info["planted_user_factors"] = p_user
    data.info["planted_item_factors"] = q_item
    return data
