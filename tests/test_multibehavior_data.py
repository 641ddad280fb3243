"""Multi-behavior data: canonical loaders, table loader, splits, visited labels, synthetic generator."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from mbrec_fast._checks import check_csr
from mbrec_fast.data.multibehavior import (build_csr, from_arrays, from_table, load_dataset,
                                           synthetic_multibehavior)


def _rows(csr):
    ip = csr[0].numpy()
    return {u: set(csr[1][ip[u]:ip[u + 1]].tolist()) for u in range(ip.size - 1)}


def _check_consistent(data):
    """Invariants of every MultiBehaviorData, checked against Python sets."""
    n_u, n_i = data.n_users, data.n_items
    for r in range(data.n_behaviors):
        check_csr(data.train.csr(r), f"train[{r}]", n_u, n_i)
    check_csr(data.test, "test", n_u, n_i)
    train_t = _rows(data.target_csr())
    aux = {u: set() for u in range(n_u)}
    for r in range(data.n_behaviors - 1):
        for u, items in _rows(data.train.csr(r)).items():
            aux[u] |= items
    splits = [("test", data.test, data.test_visited)]
    if data.valid is not None:
        check_csr(data.valid, "valid", n_u, n_i)
        splits.append(("valid", data.valid, data.valid_visited))
    for name, csr, visited in splits:
        assert visited.dtype == torch.int64 and visited.numel() == csr[1].numel()
        ip = csr[0].numpy()
        for u in range(n_u):
            held = csr[1][ip[u]:ip[u + 1]].tolist()
            labels = visited[ip[u]:ip[u + 1]].tolist()
            assert not set(held) & train_t[u], f"{name} item of user {u} still in training purchases"
            assert labels == [int(i in aux[u]) for i in held]
    if data.valid is not None:
        ex = _rows(data.exclude("test"))
        vr = _rows(data.valid)
        for u in range(n_u):
            assert ex[u] == train_t[u] | vr[u]
        assert _rows(data.exclude("valid")) == train_t


# ----------------------------------------------------------------------------------------- canonical data
def test_beibei_matches_meta(data_dir):
    data = load_dataset(data_dir / "beibei")
    meta = json.loads((data_dir / "beibei" / "meta.json").read_text())
    assert (data.n_users, data.n_items) == (meta["n_users"], meta["n_items"])
    assert data.behavior_names == ["cart", "buy"] and data.target == 1
    assert data.train.csr(0)[1].numel() == meta["interactions"]["cart"]
    # each user gives one training purchase to validation; together they are the file's purchases
    assert data.target_csr()[1].numel() + data.valid[1].numel() == meta["interactions"]["buy"]
    assert data.test[1].numel() == meta["test"]
    # the data README: 13,525 visited and 8,191 unvisited test items
    assert int(data.test_visited.sum()) == 13525 and int((data.test_visited == 0).sum()) == 8191
    assert torch.equal(data.eval_users("test"), torch.arange(data.n_users))


def test_retailrocket_time_ordered_validation(data_dir):
    data = load_dataset(data_dir / "retailrocket")
    assert data.behavior_names == ["view", "cart", "buy"]
    assert int(data.test_visited.sum()) == 0  # README: every test item is unvisited
    _check_consistent(data)
    # validation = each user's latest training purchase (by timestamp)
    df = pd.read_csv(data_dir / "retailrocket" / "interactions.tsv", sep="\t", header=None,
                     names=["u", "i", "b", "t"])
    buys = df[df.b == "buy"]
    latest = buys.loc[buys.groupby("u").t.idxmax()]
    vr = _rows(data.valid)
    multi = buys.groupby("u").i.nunique()
    checked = 0
    for row in latest.itertuples():
        if multi[row.u] >= 2 and (buys[(buys.u == row.u)].t == row.t).sum() == 1:
            assert vr[row.u] == {row.i}
            checked += 1
            if checked > 50:
                break
    assert checked > 10


def test_valid_none_keeps_all_purchases(data_dir):
    data = load_dataset(data_dir / "retailrocket", valid="none")
    assert data.valid is None and data.target_csr()[1].numel() == 9551
    with pytest.raises(ValueError, match="no validation split"):
        data.split("valid")


def test_unknown_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="meta.json"):
        load_dataset(tmp_path / "nothing-here")


# ----------------------------------------------------------------------------------------- tables
def _toy_table():
    """String ids, three behaviors, timestamps; user 'c' has a single purchase (cannot give one away)."""
    rows = [("a", "x", "view", 1), ("a", "x", "cart", 2), ("a", "x", "buy", 3), ("a", "y", "buy", 5),
            ("a", "z", "view", 6), ("a", "z", "buy", 9), ("b", "y", "view", 1), ("b", "y", "buy", 2),
            ("b", "w", "buy", 7), ("b", "x", "buy", 8), ("c", "w", "view", 3), ("c", "w", "buy", 4),
            ("a", "x", "view", 1)]  # duplicate row counts once
    return pd.DataFrame(rows, columns=["user", "item", "behavior", "timestamp"])


def test_from_table_reindexes_and_holds_out_latest():
    data = from_table(_toy_table(), ["view", "cart", "buy"], valid="leave-one-out")
    assert list(data.user_ids) == ["a", "b", "c"] and list(data.item_ids) == ["w", "x", "y", "z"]
    item = {name: j for j, name in enumerate(data.item_ids)}
    test = _rows(data.test)
    assert test[0] == {item["z"]} and test[1] == {item["x"]} and test[2] == set()  # latest purchase; c has one
    valid = _rows(data.valid)
    assert valid[0] == {item["y"]} and valid[1] == {item["w"]} and valid[2] == set()
    # z was viewed by a before the held-out purchase: visited; b's x was never touched before: unvisited
    assert data.test_visited.tolist() == [1, 0]
    _check_consistent(data)


def test_from_table_time_split_drops_the_future():
    data = from_table(_toy_table(), ["view", "cart", "buy"], split="time", test_fraction=0.25, valid="none")
    item = {name: j for j, name in enumerate(data.item_ids)}
    # cut = 1 + 0.75 * 8 = 7: the purchases at t >= 7 are the test items, everything at t >= 7 leaves training
    assert _rows(data.test)[0] == {item["z"]} and _rows(data.test)[1] == {item["w"], item["x"]}
    assert item["z"] in _rows(data.train.csr(0))[0]  # viewed at t = 6, kept
    _check_consistent(data)


def test_from_table_reads_csv_and_infers_order(tmp_path):
    path = tmp_path / "events.csv"
    _toy_table().to_csv(path, index=False)
    data = from_table(path)  # no order given: by decreasing frequency (buy 7 rows, view 5, cart 1)
    assert data.behavior_names == ["buy", "view", "cart"]
    data = from_table(path, ["view", "cart", "buy"])
    assert data.behavior_names == ["view", "cart", "buy"] and data.name == "events"


def test_from_table_parquet(tmp_path):
    pytest.importorskip("pyarrow")
    path = tmp_path / "events.parquet"
    _toy_table().to_parquet(path)
    assert from_table(path, ["view", "cart", "buy"]).n_users == 3


@pytest.mark.parametrize("kwargs, message", [
    ({"behavior_order": ["view", "buy"]}, "not in behavior_order"),      # a behavior missing from the order
    ({"behavior_order": ["view", "cart", "buy"], "split": "random"}, "split must be"),
    ({"behavior_order": ["view", "cart", "buy"], "valid": "last"}, "valid must be"),
    ({"behavior_order": ["view", "cart", "buy"], "user_col": "uid"}, "no column 'uid'"),
])
def test_from_table_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        from_table(_toy_table(), **kwargs)


def test_from_arrays_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match="items ids must lie"):
        from_arrays(np.array([0]), np.array([5]), np.array([0]), 1, 3, ["buy"])
    with pytest.raises(ValueError, match="split='time' needs timestamps"):
        from_arrays(np.array([0]), np.array([1]), np.array([0]), 1, 3, ["buy"], split="time")


def test_build_csr_sorts_and_dedups():
    ip, ind = build_csr(np.array([2, 0, 2, 2]), np.array([5, 1, 3, 5]), 3, 6)
    assert ip.tolist() == [0, 1, 1, 3] and ind.tolist() == [1, 3, 5]


# ----------------------------------------------------------------------------------------- synthetic
def test_synthetic_is_seeded_and_consistent():
    a = synthetic_multibehavior(300, 200, seed=3)
    b = synthetic_multibehavior(300, 200, seed=3)
    c = synthetic_multibehavior(300, 200, seed=4)
    for r in range(3):
        assert torch.equal(a.train.csr(r)[1], b.train.csr(r)[1])
    assert torch.equal(a.test[1], b.test[1]) and not torch.equal(a.train.csr(0)[1], c.train.csr(0)[1])
    _check_consistent(a)


def test_synthetic_funnel_popularity_and_unvisited():
    data = synthetic_multibehavior(3000, 2000, funnel=(1.0, 0.3, 0.4), popularity_skew=1.0, seed=0)
    counts = [data.train.csr(r)[1].numel() for r in range(3)]
    assert counts[0] > counts[1] > 0
    # funnel: about 30% of views become carts (cart counts are distinct pairs, so a bit less)
    assert 0.2 < counts[1] / counts[0] < 0.4
    pop = torch.bincount(data.train.csr(0)[1], minlength=data.n_items).sort(descending=True).values
    # skewed popularity: the top 1% of items get far more than 1% of the views
    assert float(pop[:20].sum()) / float(pop.sum()) > 0.05
    assert 0 < int(data.test_visited.sum()) < data.test_visited.numel()  # both visited and unvisited targets


def test_synthetic_at_scale_is_consistent():
    """50k users x 20k items (~1e6 events, the vectorized path): sizes and CSR invariants hold at scale
    (its speed is the benchmarks' business, not a test's)."""
    data = synthetic_multibehavior(50_000, 20_000, interactions_per_user=10, seed=0)
    assert data.n_users == 50_000 and data.test[1].numel() > 30_000
    for r in range(data.n_behaviors):
        indptr, indices = data.behavior_csr(r)
        assert indptr.numel() == data.n_users + 1 and int(indptr[-1]) == indices.numel()
        assert 0 <= int(indices.min()) and int(indices.max()) < data.n_items


def test_synthetic_bad_funnel():
    with pytest.raises(ValueError, match="funnel"):
        synthetic_multibehavior(10, 10, funnel=(1.0, 0.5))


def test_tmall_matches_meta_and_the_issue_counts(data_dir, monkeypatch):
    """MB-CGCN's Tmall: view -> cart -> buy, one held-out purchase per user; 12,852 held-out items were
    touched (viewed or carted) in training, 2,597 not."""
    data = load_dataset(data_dir / "tmall", valid="none")
    meta = json.loads((data_dir / "tmall" / "meta.json").read_text())
    assert (data.n_users, data.n_items) == (meta["n_users"], meta["n_items"]) == (15449, 11953)
    assert data.behavior_names == ["view", "cart", "buy"] and data.target == 2
    counts = [data.train.csr(r)[1].numel() for r in range(3)]
    assert counts == [meta["interactions"][b] for b in ("view", "cart", "buy")] == [858505, 180027, 92180]
    assert data.valid is None and data.test[1].numel() == 15449
    assert int(data.test_visited.sum()) == 12852 and int((data.test_visited == 0).sum()) == 2597
    # the name under the data root resolves to the same folder (mbrec-fast train --data tmall)
    monkeypatch.setenv("MBREC_FAST_DATA", str(data_dir))
    assert load_dataset("tmall", valid="none").n_users == 15449
