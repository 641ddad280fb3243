"""Cross-domain interaction sequences: loaders, leave-one-out split, training windows, synthetic generator.

A `SequenceData` holds, per user, the time-ordered item ids of every interaction; each item belongs to exactly one
domain (`item_domain`). Ids are dense and 0-based. Two loaders: the SyNCRec release layout
(`samples/amazon5_seq.tsv`: comma-separated items, domain names and unix times per user) and any
(user, item, domain, timestamp) log. `make_synthetic_sequences` plants controllable cross-domain relatedness, so a
domain can be made useless (or harmful) to the others: the negative-transfer test bed.
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .._checks import reads_data_file

__all__ = ["SequenceData", "SequenceSplit", "load_amazon_sequences", "load_interaction_log", "load_amazon_toys_games",
           "make_synthetic_sequences", "leave_one_out", "make_training_windows", "default_data_root"]


def default_data_root() -> str:
    """The data root (see `mbrec_fast.data.paths`)."""
    from .paths import default_data_root as root
    return str(root())


@dataclass
class SequenceData:
    """Per-user time-ordered item sequences over several domains.

    seqs[u]: int64 item ids in time order; item_domain[i]: domain of item i; names are optional labels.
    """
    seqs: List[torch.Tensor]
    item_domain: torch.Tensor
    domain_names: List[str]
    user_names: Optional[List[str]] = None
    item_names: Optional[List[str]] = None
    info: Dict[str, object] = field(default_factory=dict)

    def __post_init__(self):
        self.item_domain = torch.as_tensor(self.item_domain, dtype=torch.int64)
        if self.item_domain.dim() != 1:
            raise ValueError("item_domain must be 1-D (one domain id per item)")
        if self.item_domain.numel() and (int(self.item_domain.min()) < 0 or int(self.item_domain.max()) >= len(self.domain_names)):
            raise ValueError(f"item_domain ids must lie in [0, {len(self.domain_names)})")
        n = self.item_domain.numel()
        for u, s in enumerate(self.seqs):
            if s.numel() and (int(s.min()) < 0 or int(s.max()) >= n):
                raise ValueError(f"seqs[{u}] holds item ids outside [0, {n})")

    @property
    def n_users(self) -> int:
        return len(self.seqs)

    @property
    def n_items(self) -> int:
        return int(self.item_domain.numel())

    @property
    def n_domains(self) -> int:
        return len(self.domain_names)

    def domain_items(self, d: int) -> torch.Tensor:
        """Sorted item ids of domain d."""
        return torch.nonzero(self.item_domain == d).flatten()

    def domain_item_sets(self) -> List[torch.Tensor]:
        return [self.domain_items(d) for d in range(self.n_domains)]

    def describe(self) -> Dict[str, object]:
        lens = np.array([s.numel() for s in self.seqs]) if self.seqs else np.zeros(1)
        counts = torch.bincount(torch.cat(self.seqs), minlength=self.n_items) if self.seqs else torch.zeros(self.n_items)
        per_dom = [int(counts[self.item_domain == d].sum()) for d in range(self.n_domains)]
        return {"users": self.n_users, "items": self.n_items, "domains": self.domain_names,
                "interactions": int(lens.sum()), "mean_len": round(float(lens.mean()), 2),
                "interactions_per_domain": per_dom, **{k: v for k, v in self.info.items() if k != "true"}}


@reads_data_file("amazon5_seq.tsv")
def load_amazon_sequences(path: Optional[str] = None, domains_path: Optional[str] = None) -> SequenceData:
    """Reads the SyNCRec release layout (index, user_id, items, domain names, unix times, length; tab-separated).

    Items are renumbered densely in order of first appearance; domain ids follow `amazon5_domains.txt` when it is
    present next to the file (or given), else sorted names. Interactions are stably sorted by time (the file is
    already ordered; ties keep the file order).
    """
    if not path:
        from .paths import find_in_data_roots
        path = str(find_in_data_roots("samples/amazon5_seq.tsv", what="bundled sample"))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"sequence file not found: {path}")
    domains_path = domains_path or os.path.join(os.path.dirname(path), "amazon5_domains.txt")
    rows = []
    with open(path, newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader)
        cols = {name: i for i, name in enumerate(header)}
        for name in ("user_id", "item", "type", "unix_time"):
            if name not in cols:
                raise ValueError(f"{path}: missing column {name!r} (header {header})")
        for line in reader:
            if not line:
                continue
            if len(line) <= max(cols[c] for c in ("user_id", "item", "type", "unix_time")):
                raise ValueError(f"{path}, line {reader.line_num}: {len(line)} columns, the header has {len(header)}")
            items = line[cols["item"]].split(",")
            doms = line[cols["type"]].split(",")
            times = line[cols["unix_time"]].split(",")
            if not (len(items) == len(doms) == len(times)):
                raise ValueError(f"{path}: user {line[cols['user_id']]}: items, domains and times differ in length")
            if not all(t.strip().lstrip("-").isdigit() for t in times):
                raise ValueError(f"{path}, line {reader.line_num}: unix_time must hold integers, got {times[:3]}")
            rows.append((line[cols["user_id"]], items, doms, [int(t) for t in times]))
    if os.path.isfile(domains_path):
        with open(domains_path) as f:
            r = csv.reader(f, delimiter="\t")
            hdr = next(r)
            ti = hdr.index("type")
            domain_names = [line[ti] for line in r if line]
    else:
        domain_names = sorted({d for _, _, doms, _ in rows for d in doms})
    dom_id = {d: k for k, d in enumerate(domain_names)}
    log = [(u, it, d, t) for u, items, doms, times in rows for it, d, t in zip(items, doms, times)]
    for _, _, d, _ in log:
        if d not in dom_id:
            raise ValueError(f"{path}: domain {d!r} is not listed in {domains_path}")
    return _from_log(log, domain_names, info={"source": os.path.basename(path)})


@reads_data_file("log")
def load_interaction_log(path_or_rows, *, columns: Sequence[str] = ("user", "item", "domain", "timestamp"),
                         sep: str = "\t", header: bool = True) -> SequenceData:
    """Builds sequences from any (user, item, domain, order) log: a file path or an iterable of 4-tuples.

    `columns` names the file's columns when it has a header (extra columns are ignored); without a header the first
    four columns are taken in (user, item, domain, timestamp) order. The timestamp only orders a user's events (a
    number: unix time or a position); ties keep the file order. An item seen in two domains, a short row or a
    non-numeric timestamp is a ValueError naming the file and line.
    """
    where = str(path_or_rows) if isinstance(path_or_rows, (str, os.PathLike)) else "log rows"
    log = []
    if isinstance(path_or_rows, (str, os.PathLike)):
        if not os.path.isfile(path_or_rows):
            raise FileNotFoundError(f"interaction log not found: {path_or_rows}")
        with open(path_or_rows, newline="") as f:
            reader = csv.reader(f, delimiter=sep)
            idx = [0, 1, 2, 3]
            first = 1
            if header:
                hdr = next(reader, None)
                if hdr is None:
                    raise ValueError(f"{where}: empty file (expected a header {list(columns)})")
                missing = [c for c in columns if c not in hdr]
                if missing:
                    raise ValueError(f"{where}: header {hdr} lacks column(s) {missing} (columns={list(columns)})")
                idx = [hdr.index(c) for c in columns]
                first = 2
            for lineno, line in enumerate(reader, first):
                if not line:
                    continue
                if len(line) <= max(idx):
                    raise ValueError(f"{where}, line {lineno}: {len(line)} fields, expected at least {max(idx) + 1}")
                log.append(_log_row(tuple(line[i] for i in idx), f"{where}, line {lineno}"))
    else:
        for k, r in enumerate(path_or_rows):
            log.append(_log_row(tuple(r), f"{where}[{k}]"))
    domain_names = sorted({d for _, _, d, _ in log})
    return _from_log(log, domain_names, info={"source": os.path.basename(where) if where != "log rows" else "log"},
                     where=where)


def _log_row(r: tuple, where: str) -> Tuple[str, str, str, float]:
    if len(r) != 4:
        raise ValueError(f"{where}: each log row must be (user, item, domain, timestamp), got {r!r}")
    try:
        t = float(r[3])
    except (TypeError, ValueError):
        raise ValueError(f"{where}: timestamp {r[3]!r} is not a number") from None
    if math.isnan(t):
        raise ValueError(f"{where}: timestamp is NaN")
    return str(r[0]), str(r[1]), str(r[2]), t


def load_amazon_toys_games(path: Optional[str] = None) -> SequenceData:
    """The Amazon Toys_and_Games + Video_Games log (`amazon_toys_games/interactions.tsv`: user, item, domain,
    timestamp = position in the merged sequence) through `load_interaction_log`."""
    path = path or os.path.join(default_data_root(), "amazon_toys_games", "interactions.tsv")
    return load_interaction_log(path)


def _from_log(log, domain_names: List[str], info: Dict[str, object], where: str = "log") -> SequenceData:
    if not log:
        raise ValueError(f"{where}: the log has no interactions")
    dom_id = {d: k for k, d in enumerate(domain_names)}
    users: Dict[str, int] = {}
    items: Dict[str, int] = {}
    item_dom: List[int] = []
    per_user: List[List[Tuple[float, int, int]]] = []
    for pos, (u, it, d, t) in enumerate(log):
        if u not in users:
            users[u] = len(users)
            per_user.append([])
        if it not in items:
            items[it] = len(items)
            item_dom.append(dom_id[d])
        elif item_dom[items[it]] != dom_id[d]:
            raise ValueError(f"{where}: item {it!r} appears in two domains ({domain_names[item_dom[items[it]]]!r} "
                             f"and {d!r}); every item must belong to exactly one domain")
        per_user[users[u]].append((t, pos, items[it]))
    seqs = [torch.tensor([i for _, _, i in sorted(evs)], dtype=torch.int64) for evs in per_user]
    return SequenceData(seqs=seqs, item_domain=torch.tensor(item_dom, dtype=torch.int64), domain_names=list(domain_names),
                        user_names=list(users), item_names=list(items), info=info)


# ---------------------------------------------------------------------------------------------- split
@dataclass
class SequenceSplit:
    """Leave-one-out split: train sequences (all but the last two items), and for valid/test the history before
    the held-out item, the item and its domain. Users with fewer than 3 interactions train on their whole sequence
    and are not evaluated; `n_short` counts them (the run logs it)."""
    data: SequenceData
    train: List[torch.Tensor]
    eval_users: torch.Tensor
    valid_history: List[torch.Tensor]
    valid_target: torch.Tensor
    test_history: List[torch.Tensor]
    test_target: torch.Tensor
    n_short: int = 0

    def split(self, name: str) -> Tuple[torch.Tensor, List[torch.Tensor], torch.Tensor]:
        """(users, histories, targets) of 'valid' or 'test'."""
        if name == "valid":
            return self.eval_users, self.valid_history, self.valid_target
        if name == "test":
            return self.eval_users, self.test_history, self.test_target
        raise ValueError(f"split must be 'valid' or 'test', got {name!r}")


def leave_one_out(data: SequenceData, min_len: int = 3) -> SequenceSplit:
    """Last item -> test, second-to-last -> validation, the rest -> training (per user, on the merged sequence).

    A user with fewer than `min_len` items is not evaluated (no room for a training item, a validation and a test
    item); it still trains on its whole sequence. `SequenceSplit.n_short` counts these users."""
    if min_len < 3:
        raise ValueError("min_len must be >= 3 (one training item, one validation, one test)")
    train, users, vh, vt, th, tt = [], [], [], [], [], []
    for u, s in enumerate(data.seqs):
        if s.numel() >= min_len:
            train.append(s[:-2])
            users.append(u)
            vh.append(s[:-2])
            vt.append(int(s[-2]))
            th.append(s[:-1])
            tt.append(int(s[-1]))
        else:
            train.append(s)
    return SequenceSplit(data=data, train=train, eval_users=torch.tensor(users, dtype=torch.int64),
                         valid_history=vh, valid_target=torch.tensor(vt, dtype=torch.int64),
                         test_history=th, test_target=torch.tensor(tt, dtype=torch.int64),
                         n_short=data.n_users - len(users))


# ---------------------------------------------------------------------------------------------- windows
def make_training_windows(seqs: Sequence[torch.Tensor], item_domain: torch.Tensor, n_domains: int,
                          max_len: int, n_items: int) -> Dict[str, torch.Tensor]:
    """Padded next-item tensors for every user, SOS-shifted as in the paper (Fig. 2).

    Each user's last `max_len` training items x_1..x_n give
      cross_in  [U, max_len]: SOS, x_1, ..., x_{n-1}, PAD...   cross_tgt [U, max_len]: x_1, ..., x_n, -1...
    and, for every domain d, the subsequence of that window in d:
      single_in [U, D, max_len], single_tgt [U, D, max_len]  (same layout).
    align [U, max_len]: for each cross target, its index among the targets of its own domain (-1 for pads), which
    pairs a cross-domain position with the single-domain position predicting the same item (MI loss).
    Token ids: items 0..N-1, PAD = N, SOS = N + 1. Domain ids of tokens: d for items, D for PAD/SOS.
    """
    U, L, D = len(seqs), max_len, n_domains
    PAD, SOS = n_items, n_items + 1
    cross_in = torch.full((U, L), PAD, dtype=torch.int64)
    cross_tgt = torch.full((U, L), -1, dtype=torch.int64)
    single_in = torch.full((U, D, L), PAD, dtype=torch.int64)
    single_tgt = torch.full((U, D, L), -1, dtype=torch.int64)
    align = torch.full((U, L), -1, dtype=torch.int64)
    for u, s in enumerate(seqs):
        w = s[-L:]
        n = w.numel()
        if n == 0:
            continue
        cross_tgt[u, :n] = w
        cross_in[u, 0] = SOS
        cross_in[u, 1:n] = w[:-1]
        dom = item_domain[w]
        for d in range(D):
            sub = w[dom == d]
            m = sub.numel()
            if m == 0:
                continue
            single_tgt[u, d, :m] = sub
            single_in[u, d, 0] = SOS
            single_in[u, d, 1:m] = sub[:-1]
        # index of each position among its own domain's positions
        onehot = torch.nn.functional.one_hot(dom, D)
        align[u, :n] = (onehot.cumsum(0) * onehot).sum(1) - 1
    return {"cross_in": cross_in, "cross_tgt": cross_tgt, "single_in": single_in, "single_tgt": single_tgt,
            "align": align}


# ---------------------------------------------------------------------------------------------- synthetic
def make_synthetic_sequences(n_users: int = 2000, n_domains: int = 3, items_per_domain: int = 100,
                             mean_len: float = 24.0, n_clusters: int = 8,
                             relatedness: Optional[Sequence[float]] = None, chain_prob: float = 0.5,
                             domain_probs: Optional[Sequence[float]] = None, seed: int = 0) -> SequenceData:
    """Seeded cross-domain sequences with controllable domain relatedness.

    Every user has a latent taste cluster c in [n_clusters]. The items of each domain are split evenly over the
    clusters. For domain d the user's cluster in d is c with probability relatedness[d] and an independent uniform
    cluster otherwise (drawn once per user), so relatedness 1 makes the other domains fully informative about d and
    0 makes them pure noise for d: the planted negative-transfer domain. Within a domain, the next item follows the
    previous item of that domain along a fixed per-cluster cycle with probability `chain_prob` (sequential signal a
    single-domain model can use), else it is uniform in the user's cluster. The domain of each step is drawn from
    `domain_probs`. Lengths are 3 + Poisson(mean_len - 3).
    """
    rng = np.random.default_rng(seed)
    D, K, P = n_domains, n_clusters, items_per_domain
    if P < K:
        raise ValueError(f"items_per_domain ({P}) must be >= n_clusters ({K})")
    rel = np.ones(D) if relatedness is None else np.asarray(relatedness, dtype=np.float64)
    if rel.shape != (D,) or (rel < 0).any() or (rel > 1).any():
        raise ValueError(f"relatedness must hold {D} values in [0, 1]")
    dp = np.full(D, 1.0 / D) if domain_probs is None else np.asarray(domain_probs, dtype=np.float64)
    if dp.shape != (D,) or (dp < 0).any() or dp.sum() <= 0:
        raise ValueError(f"domain_probs must hold {D} non-negative values")
    dp = dp / dp.sum()
    item_domain = np.repeat(np.arange(D), P)
    # cluster members per (domain, cluster), in a random order that defines the cycle
    members = []
    for d in range(D):
        perm = rng.permutation(P) + d * P
        members.append([perm[k::K] for k in range(K)])
    succ = {}
    for d in range(D):
        for k in range(K):
            m = members[d][k]
            for j, it in enumerate(m):
                succ[int(it)] = int(m[(j + 1) % len(m)])
    seqs = []
    for _ in range(n_users):
        c = rng.integers(K)
        clusters = [c if rng.random() < rel[d] else rng.integers(K) for d in range(D)]
        length = 3 + rng.poisson(max(mean_len - 3, 0))
        last = [-1] * D
        s = []
        for _ in range(length):
            d = int(rng.choice(D, p=dp))
            pool = members[d][clusters[d]]
            if last[d] >= 0 and rng.random() < chain_prob:
                it = succ[last[d]]
            else:
                it = int(pool[rng.integers(len(pool))])
            s.append(it)
            last[d] = it
        seqs.append(torch.tensor(s, dtype=torch.int64))
    return SequenceData(seqs=seqs, item_domain=torch.from_numpy(item_domain).long(),
                        domain_names=[f"d{d}" for d in range(D)],
                        info={"source": "synthetic", "relatedness": [float(r) for r in rel], "seed": seed,
                              "n_clusters": K, "chain_prob": chain_prob})
