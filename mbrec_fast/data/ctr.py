"""CTR-style multi-domain multi-task data: loaders, a synthetic generator with planted structure, batching.

Every sample has sparse id features (one local id space per field), dense features, the domain it
was observed in and T binary labels. `CTRData` keeps them as tensors; `CTRData.batches` yields dict
batches that keep the domain id per sample and are a deterministic function of (seed, epoch), which is
what exact resume needs.

Loaders:
* `load_movielens` — MovieLens-1M in the layout of M3oE (domains by age group {1,18}/{25}/{35,45,50,56};
  click = rating > 3, like = rating > 4), from the merged CSV of `samples/ml1m_sample.csv` or the original
  `ratings.dat`/`users.dat`/`movies.dat` folder.
* `load_ml100k` — MovieLens-100K (GroupLens files) with the M3oE paper's MovieLens protocol.
* `load_ratings_table` — any CSV / TSV / Parquet table (or train/valid/test files) with a domain column and
  0/1 label columns.
* `load_kuairand` — KuaiRand rows (domain = tab, tasks click and long view), from the layout of
  `samples/kuairand_sample.csv` or a KuaiRand-Pure folder (logs joined with user and video features).
* `make_synthetic_ctr` — seeded generator; see its docstring for the planted structure.
"""
from __future__ import annotations

import glob
import os
import pathlib
from dataclasses import dataclass, field, replace
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .._checks import data_file, reads_data_file
from ..csr import tensor_from_numpy

__all__ = ["CTRData", "CTRBatches", "default_data_root", "load_movielens", "load_kuairand", "make_synthetic_ctr",
           "load_ctr", "load_ml100k", "load_ratings_table", "ML1M_AGE_DOMAINS", "ML1M_GENRES"]

ML1M_AGE_DOMAINS: Tuple[Tuple[int, ...], ...] = ((1, 18), (25,), (35, 45, 50, 56))
ML1M_GENRES = ("Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
               "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")


def default_data_root() -> pathlib.Path:
    """The data root (see `mbrec_fast.data.paths`)."""
    from .paths import default_data_root as root
    return root()


@dataclass
class CTRData:
    """A CTR table. sparse[N, F] int64 (field-local ids), dense[N, Dn] float32, domain[N] int64, labels[N, T] float32.

    `user_field` / `item_field` name the sparse columns holding user and item ids (M3REC needs them);
    `item_sparse_fields` / `item_dense_cols` are the item-side features (input of M3REC's meta generator).
    `true_probs[N, T]` is only set by the synthetic generator (the Bayes-optimal predictor).
    """

    sparse: Tensor
    dense: Tensor
    domain: Tensor
    labels: Tensor
    field_dims: List[int]
    n_domains: int
    sparse_names: List[str]
    dense_names: List[str]
    task_names: List[str]
    domain_names: List[str]
    user_field: Optional[int] = None
    item_field: Optional[int] = None
    item_sparse_fields: List[int] = field(default_factory=list)
    item_dense_cols: List[int] = field(default_factory=list)
    true_probs: Optional[Tensor] = None
    name: str = "ctr"
    timestamp: Optional[Tensor] = None
    default_split_order: str = "random"
    fixed_split: Optional[Tuple[int, ...]] = None

    def __post_init__(self):
        n = self.sparse.shape[0]
        for t, nm in ((self.dense, "dense"), (self.domain, "domain"), (self.labels, "labels")):
            if t.shape[0] != n:
                raise ValueError(f"CTRData.{nm} has {t.shape[0]} rows, sparse has {n}")
        if self.sparse.dim() != 2 or self.sparse.shape[1] != len(self.field_dims):
            raise ValueError("CTRData.sparse must be [N, len(field_dims)]")
        if len(self.task_names) != self.labels.shape[1]:
            raise ValueError("CTRData.task_names must name every label column")
        if n and (int(self.domain.min()) < 0 or int(self.domain.max()) >= self.n_domains):
            raise ValueError(f"CTRData.domain must lie in [0, {self.n_domains})")

    def __len__(self) -> int:
        return int(self.sparse.shape[0])

    @property
    def n_tasks(self) -> int:
        return int(self.labels.shape[1])

    @property
    def n_dense(self) -> int:
        return int(self.dense.shape[1])

    def domain_counts(self) -> List[int]:
        return torch.bincount(self.domain, minlength=self.n_domains).tolist()

    def subset(self, index: Tensor) -> "CTRData":
        """Rows `index` (same vocabularies)."""
        tp = None if self.true_probs is None else self.true_probs[index]
        ts = None if self.timestamp is None else self.timestamp[index]
        return replace(self, sparse=self.sparse[index], dense=self.dense[index], domain=self.domain[index],
                       labels=self.labels[index], true_probs=tp, timestamp=ts, fixed_split=None)

    def split(self, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0,
              order: Optional[str] = None) -> Tuple["CTRData", ...]:
        """Split into consecutive slices (M3oE uses 8:1:1) of the rows in `order`: "random" (a seeded shuffle),
        "sequential" (the table's row order, as the official M3oE code slices its table) or "time" (ascending
        `timestamp`, ties by row order). Default: the dataset's `default_split_order`. One CTRData per fraction."""
        if abs(sum(fractions) - 1.0) > 1e-6 or any(f < 0 for f in fractions):
            raise ValueError(f"fractions must be non-negative and sum to 1, got {fractions}")
        order = order or self.default_split_order
        if self.fixed_split is not None:  # the table came as train / valid / test files: keep them
            if order != "sequential" or len(fractions) != len(self.fixed_split):
                raise ValueError(f"dataset {self.name!r} came as {len(self.fixed_split)} files: split it with "
                                 f"order='sequential' and {len(self.fixed_split)} fractions")
            bounds = np.cumsum([0] + list(self.fixed_split))
            return tuple(self.subset(torch.arange(int(bounds[i]), int(bounds[i + 1]))) for i in range(len(self.fixed_split)))
        if order == "random":
            g = torch.Generator().manual_seed(seed)
            perm = torch.randperm(len(self), generator=g)
        elif order == "sequential":
            perm = torch.arange(len(self))
        elif order == "time":
            if self.timestamp is None:
                raise ValueError(f"order='time' needs timestamps; dataset {self.name!r} has none")
            perm = torch.from_numpy(np.argsort(self.timestamp.cpu().numpy(), kind="stable"))
        else:
            raise ValueError(f"order must be 'random', 'sequential' or 'time', got {order!r}")
        bounds = np.round(np.cumsum([0.0] + list(fractions)) * len(self)).astype(int)
        return tuple(self.subset(perm[bounds[i]:bounds[i + 1]]) for i in range(len(fractions)))

    def to(self, device) -> "CTRData":
        tp = None if self.true_probs is None else self.true_probs.to(device)
        ts = None if self.timestamp is None else self.timestamp.to(device)
        return replace(self, sparse=self.sparse.to(device), dense=self.dense.to(device), domain=self.domain.to(device),
                       labels=self.labels.to(device), true_probs=tp, timestamp=ts)

    def batches(self, batch_size: int, *, shuffle: bool = True, seed: int = 0, epoch: int = 0,
                drop_last: bool = False) -> "CTRBatches":
        """Batches of one epoch: the order is a function of (seed, epoch) only."""
        return CTRBatches(self, batch_size, shuffle=shuffle, seed=seed, epoch=epoch, drop_last=drop_last)

    def describe(self) -> Dict[str, object]:
        return {"name": self.name, "samples": len(self), "fields": dict(zip(self.sparse_names, self.field_dims)),
                "dense": len(self.dense_names), "tasks": self.task_names, "domains": self.domain_names,
                "domain_counts": self.domain_counts(),
                "positive_rate": [round(float(v), 4) for v in self.labels.mean(0)] if len(self) else []}


class CTRBatches:
    """Iterable of dict batches {sparse, dense, domain, labels}; len() is the number of batches."""

    def __init__(self, data: CTRData, batch_size: int, *, shuffle: bool, seed: int, epoch: int, drop_last: bool):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.data, self.batch_size, self.shuffle = data, batch_size, shuffle
        self.seed, self.epoch, self.drop_last = seed, epoch, drop_last

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Dict[str, Tensor]]:
        d, n = self.data, len(self.data)
        if self.shuffle:
            g = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + int(self.epoch))
            order = torch.randperm(n, generator=g).to(d.sparse.device)
        else:
            order = None
        for b in range(len(self)):
            sl = slice(b * self.batch_size, min(n, (b + 1) * self.batch_size))
            if order is None:
                yield {"sparse": d.sparse[sl], "dense": d.dense[sl], "domain": d.domain[sl], "labels": d.labels[sl]}
            else:
                idx = order[sl]
                yield {"sparse": d.sparse[idx], "dense": d.dense[idx], "domain": d.domain[idx], "labels": d.labels[idx]}


# ----------------------------------------------------------------------------------------------- helpers
def _factorize(values) -> Tuple[np.ndarray, int]:
    """Dense 0-based codes of a column (sorted unique values; missing values get their own code)."""
    import pandas as pd
    codes, uniques = pd.factorize(pd.Series(values), sort=True, use_na_sentinel=False)
    return codes.astype(np.int64), max(int(len(uniques)), 1)


def _frame_to_ctr(df, sparse_cols: List[str], dense: np.ndarray, dense_names: List[str], domain: np.ndarray,
                  labels: np.ndarray, task_names: List[str], domain_names: List[str], name: str,
                  user_col: str, item_col: str, item_sparse: List[str], item_dense_cols: List[int]) -> CTRData:
    if len(df) == 0:
        raise ValueError("the data has no rows")
    cols, dims = [], []
    for c in sparse_cols:
        codes, n = _factorize(df[c].to_numpy())
        cols.append(codes)
        dims.append(n)
    sparse = torch.from_numpy(np.stack(cols, 1) if cols else np.zeros((len(df), 0), np.int64))
    return CTRData(sparse=sparse, dense=tensor_from_numpy(np.asarray(dense, dtype=np.float32)),
                   domain=torch.from_numpy(domain.astype(np.int64)),
                   labels=torch.from_numpy(labels.astype(np.float32)), field_dims=dims,
                   n_domains=len(domain_names), sparse_names=list(sparse_cols), dense_names=list(dense_names),
                   task_names=list(task_names), domain_names=list(domain_names),
                   user_field=sparse_cols.index(user_col), item_field=sparse_cols.index(item_col),
                   item_sparse_fields=[sparse_cols.index(c) for c in item_sparse], item_dense_cols=list(item_dense_cols),
                   name=name)


def _resolve(path: Optional[Union[str, os.PathLike]], sample_name: str) -> pathlib.Path:
    if path is None:
        from .paths import find_in_data_roots
        return find_in_data_roots(f"samples/{sample_name}", what="bundled sample")
    p = pathlib.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data not found: {p}")
    return p


# ----------------------------------------------------------------------------------------------- MovieLens
@reads_data_file("ml1m_sample.csv")
def load_movielens(path: Optional[Union[str, os.PathLike]] = None, *, click_threshold: int = 3,
                   like_threshold: int = 4,
                   age_domains: Sequence[Sequence[int]] = ML1M_AGE_DOMAINS) -> CTRData:
    """MovieLens-1M as M3oE uses it: 3 domains by age group, tasks click (rating > 3) and like (rating > 4).

    `path`: a merged CSV (columns user_id, movie_id, rating, genres, gender, age, occupation, zip — the
    layout of `samples/ml1m_sample.csv`), or the original ML-1M folder with ratings.dat, users.dat,
    movies.dat; default the sample under the data root. Sparse fields: user_id, movie_id, gender, age,
    occupation, zip, first genre; dense: the 18-genre multi-hot of the movie.
    """
    import pandas as pd
    p = _resolve(path, "ml1m_sample.csv")
    if p.is_dir():
        if (p / "ratings.dat").exists():
            kw = dict(sep="::", engine="python", header=None, encoding="latin-1")
            ratings = pd.read_csv(p / "ratings.dat", names=["user_id", "movie_id", "rating", "timestamp"], **kw)
            users = pd.read_csv(p / "users.dat", names=["user_id", "gender", "age", "occupation", "zip"], **kw)
            movies = pd.read_csv(p / "movies.dat", names=["movie_id", "title", "genres"], **kw)
            df = ratings.merge(users, on="user_id").merge(movies, on="movie_id")
        elif (p / "ml1m_sample.csv").exists():
            df = pd.read_csv(p / "ml1m_sample.csv")
        else:
            raise FileNotFoundError(f"{p} holds neither ratings.dat/users.dat/movies.dat nor ml1m_sample.csv")
    else:
        df = pd.read_csv(p)
    missing = {"user_id", "movie_id", "rating", "genres", "gender", "age", "occupation", "zip"} - set(df.columns)
    if missing:
        raise ValueError(f"MovieLens data at {p} lacks columns {sorted(missing)}")
    age_to_domain = {int(a): d for d, ages in enumerate(age_domains) for a in ages}
    unknown = set(int(a) for a in df["age"].unique()) - set(age_to_domain)
    if unknown:
        raise ValueError(f"age values {sorted(unknown)} are in no age_domains group")
    domain = df["age"].map(age_to_domain).to_numpy()
    rating = df["rating"].to_numpy()
    labels = np.stack([rating > click_threshold, rating > like_threshold], 1)
    genres = df["genres"].fillna("").astype(str)
    df = df.assign(genre=genres.str.split("|").str[0])
    multi_hot = np.stack([genres.str.contains(g, regex=False).to_numpy() for g in ML1M_GENRES], 1).astype(np.float32)
    sparse_cols = ["user_id", "movie_id", "gender", "age", "occupation", "zip", "genre"]
    names = ["age " + "/".join(str(a) for a in ages) for ages in age_domains]
    return _frame_to_ctr(df, sparse_cols, multi_hot, [f"genre_{g}" for g in ML1M_GENRES], domain, labels,
                         ["click", "like"], names, "movielens", "user_id", "movie_id", ["movie_id", "genre"],
                         list(range(len(ML1M_GENRES))))


# ----------------------------------------------------------------------------------------------- any ratings table
def _read_table(path, sep: Optional[str]):
    """A DataFrame from CSV / TSV / Parquet (by suffix; `sep` overrides the text separator)."""
    import pandas as pd
    p = pathlib.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data not found: {p}")
    suffix = p.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return pd.read_parquet(p)
    if sep is None:
        sep = "\t" if suffix in (".tsv", ".tab") else ","
    return pd.read_csv(p, sep=sep)


def load_ratings_table(path, *, domain_col: str, label_cols: Sequence[str], sparse_cols: Sequence[str],
                       dense_cols: Sequence[str] = (), user_col: Optional[str] = None, item_col: Optional[str] = None,
                       item_cols: Sequence[str] = (), domains: Optional[Sequence] = None,
                       time_col: Optional[str] = None, sep: Optional[str] = None, name: str = "table",
                       split_order: str = "random") -> CTRData:
    """Any multi-domain multi-task table as CTRData: one row per sample, a domain column, 0/1 label columns.

    `path`: a CSV / TSV / Parquet file, a DataFrame, or a list of them — then they are the train, valid and
    test parts in that order (the split is fixed to them, and a domain value absent from the first part is an
    error). `sparse_cols` become id fields (factorized over all rows), `dense_cols` float features;
    `user_col` / `item_col` (default: the first two sparse columns) and `item_cols` (item-side features,
    sparse or dense) feed M3REC. `domains`: the domain values in domain-id order (default: the sorted values
    of the training part). Labels must be 0/1 (or booleans); every bad input names its column.
    """
    import pandas as pd
    parts = list(path) if isinstance(path, (list, tuple)) else [path]
    frames, sources = [], []
    for part in parts:
        if isinstance(part, pd.DataFrame):
            frames.append(part)
            sources.append("DataFrame")
        else:
            frames.append(_read_table(part, sep))
            sources.append(str(part))
    if not label_cols:
        raise ValueError("label_cols must name at least one label column")
    needed = [domain_col, *label_cols, *sparse_cols, *dense_cols, *item_cols] + ([time_col] if time_col else [])
    for frame, src in zip(frames, sources):
        missing = [c for c in dict.fromkeys(needed) if c not in frame.columns]
        if missing:
            raise ValueError(f"column {missing[0]!r} is missing from {src} (missing: {missing})")
    for c in item_cols:
        if c not in sparse_cols and c not in dense_cols:
            raise ValueError(f"item column {c!r} must also be in sparse_cols or dense_cols")
    for role, c in (("user_col", user_col), ("item_col", item_col)):
        if c is not None and c not in sparse_cols:
            raise ValueError(f"{role} {c!r} must be one of sparse_cols")
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0].reset_index(drop=True)
    for c in label_cols:
        values = pd.to_numeric(df[c], errors="coerce") if df[c].dtype != bool else df[c].astype(np.int64)
        bad = ~values.isin([0, 1])
        if bad.any():
            raise ValueError(f"label column {c!r} must hold only 0/1, found {sorted(map(str, df[c][bad].unique()[:5]))}")
    for c in dense_cols:
        if not pd.api.types.is_numeric_dtype(df[c]) or df[c].isna().any():
            raise ValueError(f"dense column {c!r} must be numeric without missing values")
    train_dom = frames[0][domain_col]
    if domains is None:
        domains = sorted(train_dom.dropna().unique().tolist())
    domains = list(domains)
    dom_index = {v: d for d, v in enumerate(domains)}
    for frame, src, part in zip(frames, sources, ("training", "validation", "test")):
        unseen = sorted(set(frame[domain_col].unique().tolist()) - set(dom_index), key=str)
        if unseen:
            where = "the given domains" if part == "training" else "the training data"
            raise ValueError(f"domain column {domain_col!r} of the {part} data ({src}) has values {unseen[:5]} "
                             f"absent from {where}")
    domain = df[domain_col].map(dom_index).to_numpy()
    labels = np.stack([df[c].astype(np.float64).to_numpy() for c in label_cols], 1)
    dense = df[list(dense_cols)].to_numpy(np.float32) if dense_cols else np.zeros((len(df), 0), np.float32)
    sparse_cols = list(sparse_cols)
    user_col = user_col or sparse_cols[0]
    item_col = item_col or sparse_cols[min(1, len(sparse_cols) - 1)]
    data = _frame_to_ctr(df, sparse_cols, dense, list(dense_cols), domain, labels, list(label_cols),
                         [f"{domain_col}={v}" for v in domains], name, user_col, item_col,
                         [c for c in item_cols if c in sparse_cols] or [item_col],
                         [list(dense_cols).index(c) for c in item_cols if c in dense_cols])
    if time_col:
        data.timestamp = torch.from_numpy(np.array(pd.to_numeric(df[time_col]), dtype=np.int64))
    if len(frames) > 1:
        data.fixed_split = tuple(len(f) for f in frames)
    data.default_split_order = "sequential" if len(frames) > 1 else split_order
    return data


# ----------------------------------------------------------------------------------------------- MovieLens-100K
ML100K_GENRES = ("unknown",) + ML1M_GENRES
ML100K_AGE_DOMAINS = ((0, 25), (25, 35), (35, 200))  # [lo, hi) ages: <25 (<18 and 18-24), 25-34, 35+


def _ml1m_age_code(age: np.ndarray) -> np.ndarray:
    """MovieLens-1M's age groups for exact ages: 1 (<18), 18, 25, 35, 45, 50, 56 (lower bound of the group)."""
    bounds = np.array([18, 25, 35, 45, 50, 56])
    codes = np.array([1, 18, 25, 35, 45, 50, 56])
    return codes[np.searchsorted(bounds, age, side="right")]


def load_ml100k(path: Optional[Union[str, os.PathLike]] = None, *, click_threshold: int = 3, like_threshold: int = 4,
                zip_prefix: int = 2, split_order: str = "sequential") -> CTRData:
    """MovieLens-100K (the GroupLens files u.data, u.user, u.item) with the M3oE paper's MovieLens protocol.

    Domains by age: <25 (ML-1M's groups "<18" and "18-24"), 25-34, 35+; tasks click = rating > 3 and
    like = rating > 4. Sparse fields: user id, movie id, gender, age group (ML-1M's codes), occupation,
    zip prefix (`zip_prefix` characters), first genre, release year; dense: the 19-genre multi-hot. Rows
    keep u.data's order (GroupLens ship it neither by user nor by time), which the default split slices
    sequentially as the official M3oE code does; `timestamp` allows split order "time".
    """
    import pandas as pd
    p = pathlib.Path(path) if path is not None else default_data_root() / "ml100k"
    for f in ("u.data", "u.user", "u.item"):
        if not (p / f).exists():
            raise FileNotFoundError(f"MovieLens-100K file {p / f} not found")
    # each file parsed with integer columns where GroupLens has them: a garbled or truncated row is a ValueError
    # naming the file (data_file), not NaNs or a TypeError further down
    with data_file(p / "u.data"):
        ratings = pd.read_csv(p / "u.data", sep="\t", header=None, names=["user_id", "movie_id", "rating", "timestamp"],
                              dtype=np.int64)
    with data_file(p / "u.user"):
        users = pd.read_csv(p / "u.user", sep="|", header=None, names=["user_id", "age", "gender", "occupation", "zip"],
                            dtype={"user_id": np.int64, "age": np.int64, "zip": str})
    with data_file(p / "u.item"):
        items = pd.read_csv(p / "u.item", sep="|", header=None, encoding="latin-1",
                            names=["movie_id", "title", "date", "video_date", "url", *ML100K_GENRES],
                            dtype={"movie_id": np.int64, **{g: np.int64 for g in ML100K_GENRES}})
    df = ratings.merge(users, on="user_id", how="left", validate="many_to_one")
    df = df.merge(items, on="movie_id", how="left", validate="many_to_one")
    if df["age"].isna().any() or df["title"].isna().any():
        raise ValueError(f"u.data at {p} rates users or movies absent from u.user / u.item")
    age = df["age"].to_numpy()
    domain = np.zeros(len(df), np.int64)
    for d, (lo, hi) in enumerate(ML100K_AGE_DOMAINS):
        domain[(age >= lo) & (age < hi)] = d
    flags = df[list(ML100K_GENRES)].to_numpy(np.float32)
    first = np.where(flags.any(1), flags.argmax(1), 0)
    df = df.assign(domain=domain, click=(df["rating"] > click_threshold).astype(np.int64),
                   like=(df["rating"] > like_threshold).astype(np.int64), age_group=_ml1m_age_code(age),
                   zip=df["zip"].str[:zip_prefix], genre=np.array(ML100K_GENRES)[first],
                   year=df["date"].astype(str).str[-4:].where(df["date"].notna(), "none"))
    genre_cols = list(ML100K_GENRES)
    data = load_ratings_table(df, domain_col="domain", label_cols=["click", "like"],
                              sparse_cols=["user_id", "movie_id", "gender", "age_group", "occupation", "zip", "genre",
                                           "year"],
                              dense_cols=genre_cols, user_col="user_id", item_col="movie_id",
                              item_cols=["movie_id", "genre", "year", *genre_cols], domains=[0, 1, 2],
                              time_col="timestamp", name="ml100k", split_order=split_order)
    data.domain_names = ["age <25", "age 25-34", "age 35+"]
    data.dense_names = [f"genre_{g}" for g in ML100K_GENRES]
    return data


# ----------------------------------------------------------------------------------------------- KuaiRand
_KUAI_USER_SPARSE = ["user_active_degree", "is_lowactive_period", "is_live_streamer", "is_video_author",
                     "follow_user_num_range", "fans_user_num_range", "friend_user_num_range", "register_days_range"] + \
                    [f"onehot_feat{i}" for i in range(18)]
_KUAI_USER_DENSE = ["follow_user_num", "fans_user_num", "friend_user_num", "register_days"]
_KUAI_ITEM_SPARSE = ["video_type", "server_width", "server_height", "visible_status"]


def _check_complete_rows(df, columns: Sequence[str], path, *, single_file: bool) -> None:
    """A row with an empty label, id or tab (a truncated or garbled line: pandas reads it as NaN) is an error
    naming the file and, for a single CSV, the line; it would otherwise become a wrong domain or label."""
    present = [c for c in columns if c in df.columns]
    bad = df[present].isna().to_numpy().any(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        empty = [c for c in present if bool(df[c].isna().iloc[row])]
        where = f"line {row + 2}" if single_file else f"row {row + 1} of the joined logs"
        raise ValueError(f"{path}, {where}: no value in {', '.join(empty)} (a truncated or garbled line?); "
                         f"{int(bad.sum())} such row(s)")


@reads_data_file("kuairand_sample.csv")
def load_kuairand(path: Optional[Union[str, os.PathLike]] = None, *,
                  tab_groups: Optional[Sequence[Sequence[int]]] = None,
                  long_view_ms: int = 18_000) -> CTRData:
    """KuaiRand with domain = tab and tasks click and long view.

    `path`: a CSV in the layout of `samples/kuairand_sample.csv` (log rows joined with user features), or a
    KuaiRand-Pure folder (`log_*.csv` joined here with `user_features*.csv` and, when present,
    `video_features_basic*.csv`). `tab_groups`: tab values forming each domain (default: every distinct tab
    its own domain, ascending). Long view: the log's `long_view` column when present, else
    play_time >= min(duration, long_view_ms) (a view counts as long when it passes 18 s or the whole video).
    """
    import pandas as pd
    p = _resolve(path, "kuairand_sample.csv")
    if p.is_dir():
        logs = sorted(glob.glob(str(p / "log_*.csv")))
        if logs:
            df = pd.concat([pd.read_csv(f) for f in logs], ignore_index=True)
            users = sorted(glob.glob(str(p / "user_features*.csv")))
            if users:
                df = df.merge(pd.read_csv(users[0]), on="user_id", how="left", suffixes=("", "_u"))
            videos = sorted(glob.glob(str(p / "video_features_basic*.csv")))
            if videos:
                df = df.merge(pd.read_csv(videos[0]), on="video_id", how="left", suffixes=("", "_v"))
        elif (p / "kuairand_sample.csv").exists():
            df = pd.read_csv(p / "kuairand_sample.csv")
        else:
            raise FileNotFoundError(f"{p} holds neither log_*.csv nor kuairand_sample.csv")
    else:
        df = pd.read_csv(p)
    missing = {"user_id", "video_id", "is_click", "tab"} - set(df.columns)
    if missing:
        raise ValueError(f"KuaiRand data at {p} lacks columns {sorted(missing)}")
    _check_complete_rows(df, ["user_id", "video_id", "is_click", "tab", "long_view", "play_time_ms", "duration_ms"],
                         p, single_file=not p.is_dir())
    tabs = df["tab"].to_numpy().astype(np.int64)
    if tab_groups is None:
        tab_groups = [(int(t),) for t in sorted(set(tabs.tolist()))]
    tab_to_domain = {int(t): d for d, group in enumerate(tab_groups) for t in group}
    keep = np.array([int(t) in tab_to_domain for t in tabs], dtype=bool)
    df = df[keep].reset_index(drop=True)
    domain = np.array([tab_to_domain[int(t)] for t in df["tab"].to_numpy()], dtype=np.int64)
    if "long_view" in df.columns:
        long_view = df["long_view"].to_numpy().astype(bool)
    elif {"play_time_ms", "duration_ms"} <= set(df.columns):
        play, dur = df["play_time_ms"].to_numpy(), df["duration_ms"].to_numpy()
        long_view = play >= np.minimum(dur, long_view_ms)
    else:
        raise ValueError("KuaiRand data needs a long_view column or play_time_ms and duration_ms")
    labels = np.stack([df["is_click"].to_numpy().astype(bool), long_view], 1)
    user_sparse = [c for c in _KUAI_USER_SPARSE if c in df.columns]
    item_sparse = [c for c in _KUAI_ITEM_SPARSE if c in df.columns]
    sparse_cols = ["user_id", "video_id"] + user_sparse + item_sparse
    dense_cols = [c for c in _KUAI_USER_DENSE if c in df.columns]
    dense = np.log1p(np.clip(df[dense_cols].to_numpy(np.float64), 0, None)) if dense_cols else np.zeros((len(df), 0))
    dense_names = list(dense_cols)
    item_dense_cols: List[int] = []
    if "duration_ms" in df.columns:
        dense = np.concatenate([dense, np.log1p(np.clip(df[["duration_ms"]].to_numpy(np.float64), 0, None))], 1)
        item_dense_cols.append(len(dense_names))
        dense_names.append("log_duration_ms")
    dense = np.nan_to_num(dense)
    names = ["tab " + "/".join(str(t) for t in group) for group in tab_groups]
    return _frame_to_ctr(df, sparse_cols, dense, dense_names, domain, labels, ["click", "long_view"], names,
                         "kuairand", "user_id", "video_id", ["video_id"] + item_sparse, item_dense_cols)


# ----------------------------------------------------------------------------------------------- synthetic
def make_synthetic_ctr(n_samples: int = 100_000, *, n_domains: int = 3, n_tasks: int = 2, n_users: int = 2000,
                       n_items: int = 1000, latent_dim: int = 8, n_user_groups: int = 8, n_item_cats: int = 12,
                       n_contexts: int = 6, domain_probs: Optional[Sequence[float]] = None,
                       major_domain_frac: float = 0.9, major_domain: int = 1, shared_scale: float = 1.0,
                       domain_scale: float = 1.0, task_scale: float = 1.0, feature_noise: float = 0.5,
                       seed: int = 0, chunk: int = 1_000_000) -> CTRData:
    """Seeded synthetic CTR data with planted shared, domain-specific and task-specific structure.

    Each user u and item i has a latent vector (N(0, I/k)); z = [p_u; q_i]. The logit of task t for a
    sample in domain d is

        logit = shared_scale * (w_s·z + 2·p_u·q_i)              (same for every domain and task)
              + domain_scale * (w_d·z + 2·p_u·diag(a_d)·q_i + c_d[context])
              + task_scale   * (w_t·z + 2·p_u·diag(b_t)·q_i)
              + bias[d, t]

    and the label is Bernoulli(sigmoid(logit)) (stored in `true_probs`, the Bayes predictor). The model
    sees: sparse user id, item id, user group and item category (coarse clusters of the latents), a
    context id; dense noisy copies of p_u and q_i (fixed per user/item, noise `feature_noise`).
    Domains: `domain_probs`, or `major_domain` drawing `major_domain_frac` of the samples and the rest
    shared equally (0.9 as in KuaiRand, the default). Item popularity is Zipf-like. Memory is
    O(n_samples * fields); generation runs in chunks so millions of samples are fine.
    """
    if n_samples < 1 or n_domains < 1 or n_tasks < 1:
        raise ValueError("n_samples, n_domains and n_tasks must be >= 1")
    if domain_probs is None:
        if n_domains == 1:
            domain_probs = [1.0]
        else:
            if not 0 < major_domain_frac < 1:
                raise ValueError(f"major_domain_frac must lie in (0, 1), got {major_domain_frac}")
            if not 0 <= major_domain < n_domains:
                raise ValueError(f"major_domain must lie in [0, {n_domains})")
            rest = (1 - major_domain_frac) / (n_domains - 1)
            domain_probs = [major_domain_frac if d == major_domain else rest for d in range(n_domains)]
    domain_probs = np.asarray(domain_probs, dtype=np.float64)
    if domain_probs.shape != (n_domains,) or (domain_probs < 0).any() or domain_probs.sum() <= 0:
        raise ValueError(f"domain_probs must be {n_domains} non-negative weights")
    domain_probs = domain_probs / domain_probs.sum()
    rng = np.random.default_rng(seed)
    k = latent_dim
    P = rng.normal(0, 1 / np.sqrt(k), (n_users, k))
    Q = rng.normal(0, 1 / np.sqrt(k), (n_items, k))
    user_group = np.argmax(P @ rng.normal(size=(k, n_user_groups)), 1)
    item_cat = np.argmax(Q @ rng.normal(size=(k, n_item_cats)), 1)
    P_obs = P + feature_noise / np.sqrt(k) * rng.normal(size=P.shape)
    Q_obs = Q + feature_noise / np.sqrt(k) * rng.normal(size=Q.shape)
    w_s = rng.normal(0, 1, 2 * k) / np.sqrt(2)
    w_d = rng.normal(0, 1, (n_domains, 2 * k)) / np.sqrt(2)
    w_t = rng.normal(0, 1, (n_tasks, 2 * k)) / np.sqrt(2)
    a_d = rng.normal(0, 1, (n_domains, k))
    b_t = rng.normal(0, 1, (n_tasks, k))
    c_d = rng.normal(0, 0.5, (n_domains, n_contexts))
    bias = rng.normal(-0.3, 0.5, (n_domains, n_tasks))
    item_pop = 1.0 / (np.arange(n_items) + 10.0) ** 0.8
    item_pop = item_pop[rng.permutation(n_items)]
    item_pop /= item_pop.sum()

    sparse = np.empty((n_samples, 5), np.int64)
    dense = np.empty((n_samples, 2 * k), np.float32)
    domain = np.empty(n_samples, np.int64)
    probs = np.empty((n_samples, n_tasks), np.float32)
    labels = np.empty((n_samples, n_tasks), np.float32)
    for start in range(0, n_samples, chunk):
        m = min(chunk, n_samples - start)
        sl = slice(start, start + m)
        u = rng.integers(0, n_users, m)
        i = rng.choice(n_items, m, p=item_pop)
        d = rng.choice(n_domains, m, p=domain_probs)
        ctx = rng.integers(0, n_contexts, m)
        pu, qi = P[u], Q[i]
        z = np.concatenate([pu, qi], 1)
        shared = z @ w_s + 2 * (pu * qi).sum(1)
        dom = (z * w_d[d]).sum(1) + 2 * (pu * a_d[d] * qi).sum(1) + c_d[d, ctx]
        task = z @ w_t.T + 2 * (pu * qi) @ b_t.T  # [m, T]
        logit = shared_scale * shared[:, None] + domain_scale * dom[:, None] + task_scale * task + bias[d]
        pr = 1 / (1 + np.exp(-logit))
        sparse[sl] = np.stack([u, i, user_group[u], item_cat[i], ctx], 1)
        dense[sl] = np.concatenate([P_obs[u], Q_obs[i]], 1)
        domain[sl] = d
        probs[sl] = pr
        labels[sl] = rng.random((m, n_tasks)) < pr
    return CTRData(sparse=torch.from_numpy(sparse), dense=torch.from_numpy(dense), domain=torch.from_numpy(domain),
                   labels=torch.from_numpy(labels), field_dims=[n_users, n_items, n_user_groups, n_item_cats, n_contexts],
                   n_domains=n_domains, sparse_names=["user_id", "item_id", "user_group", "item_cat", "context"],
                   dense_names=[f"user_f{j}" for j in range(k)] + [f"item_f{j}" for j in range(k)],
                   task_names=[f"task{t}" for t in range(n_tasks)], domain_names=[f"domain{d}" for d in range(n_domains)],
                   user_field=0, item_field=1, item_sparse_fields=[1, 3], item_dense_cols=list(range(k, 2 * k)),
                   true_probs=torch.from_numpy(probs), name="synthetic")


def load_ctr(name: str, path: Optional[str] = None, **kwargs) -> CTRData:
    """`movielens`/`ml1m`, `kuairand` (from `path` or the bundled sample) or `synthetic` (kwargs to the generator)."""
    key = name.lower()
    if key in ("movielens", "ml1m", "ml-1m"):
        return load_movielens(path, **kwargs)
    if key == "kuairand":
        return load_kuairand(path, **kwargs)
    if key in ("ml100k", "ml-100k"):
        return load_ml100k(path, **kwargs)
    if key == "synthetic":
        return make_synthetic_ctr(**kwargs)
    raise ValueError(f"unknown CTR dataset {name!r} (movielens, ml100k, kuairand, synthetic)")
