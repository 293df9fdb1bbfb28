"""Split protocols: sizes, disjointness, determinism, files."""
from __future__ import annotations

import json

import numpy as np
import pytest

from dfsnet.data import (
    PROTOCOLS,
    ConcatPool,
    ImageFolder,
    Split,
    make_split,
    stratified_holdout,
)
from tests.conftest import make_image_folder

# A CIFAR-10-shaped pool: train source (5,000 per class) then test source (1,000 per class).
TARGETS = np.concatenate([np.repeat(np.arange(10), 5000), np.repeat(np.arange(10), 1000)])
SOURCES = np.repeat([0, 1], [50000, 10000])


def per_class(indices):
    return np.bincount(TARGETS[indices], minlength=10)


def assert_disjoint(*arrays):
    joined = np.concatenate(arrays)
    assert np.unique(joined).size == joined.size


def test_cifar10_protocol_sizes_and_disjointness():
    split = make_split("cifar10", TARGETS, pool_sources=SOURCES, seed=0)
    assert split.sizes() == {"train": 5000, "fit": 4500, "val": 500, "query": 1000, "database": 54000}
    assert (per_class(split.query) == 100).all() and (per_class(split.train) == 500).all()
    assert (per_class(split.val) == 50).all() and (per_class(split.database) == 5400).all()
    assert_disjoint(split.train, split.query, split.database)
    np.testing.assert_array_equal(np.sort(np.concatenate([split.train, split.query, split.database])),
                                  np.arange(60000))
    assert np.isin(split.val, split.train).all()
    np.testing.assert_array_equal(split.fit, np.setdiff1d(split.train, split.val))
    # Drawn from the whole pool, not only the train source.
    assert (SOURCES[split.query] == 1).any() and (SOURCES[split.query] == 0).any()
    for part in ("train", "val", "query", "database"):
        assert getattr(split, part).dtype == np.int64


def test_cifar10_1_database_is_everything_but_the_queries():
    split = make_split("cifar10-1", TARGETS, seed=0)
    assert split.query.size == 1000 and split.train.size == 5000 and split.database.size == 59000
    np.testing.assert_array_equal(split.database, np.setdiff1d(np.arange(60000), split.query))
    assert np.isin(split.train, split.database).all()
    # Same draw as 'cifar10' with the same seed.
    np.testing.assert_array_equal(split.query, make_split("cifar10", TARGETS, seed=0).query)


def test_paper_protocol_uses_the_sources():
    split = make_split("paper", TARGETS, pool_sources=SOURCES, seed=3, val_fraction=0.2)
    np.testing.assert_array_equal(split.train, np.arange(50000))
    np.testing.assert_array_equal(split.database, np.arange(50000))
    np.testing.assert_array_equal(split.query, np.arange(50000, 60000))
    assert (per_class(split.val) == 1000).all() and split.fit.size == 40000
    with pytest.raises(ValueError, match="test source"):
        make_split("paper", TARGETS)
    with pytest.raises(ValueError, match="test source"):
        make_split("paper", TARGETS, pool_sources=np.zeros_like(SOURCES))


def test_per_class_counts_fractions_and_database_flag():
    split = make_split("per-class", TARGETS, query_per_class=10, train_per_class=20,
                       database_includes_train=False, val_fraction=0)
    assert split.query.size == 100 and split.train.size == 200 and split.val.size == 0
    assert split.database.size == 60000 - 300
    assert_disjoint(split.train, split.query, split.database)

    small = np.repeat(np.arange(3), [10, 20, 7])
    split = make_split("per-class", small, query_fraction=0.2, train_fraction=0.5)
    assert np.bincount(small[split.query]).tolist() == [2, 4, 1]
    assert np.bincount(small[split.train]).tolist() == [5, 10, 4]  # round half up: 3.5 -> 4
    np.testing.assert_array_equal(split.database, np.setdiff1d(np.arange(37), split.query))
    assert split.params["database_includes_train"] is True
    # Defaults: 10 % queries, 50 % train.
    default = make_split("per-class", np.repeat(np.arange(2), 100))
    assert default.query.size == 20 and default.train.size == 100
    with pytest.raises(ValueError, match="not both"):
        make_split("per-class", small, query_per_class=1, query_fraction=0.1)
    with pytest.raises(ValueError, match="train_fraction"):
        make_split("per-class", small, train_fraction=1.5)


def test_same_seed_same_split_different_seed_different():
    a = make_split("cifar10", TARGETS, seed=7)
    b = make_split("cifar10", TARGETS, seed=7)
    c = make_split("cifar10", TARGETS, seed=8)
    for part in ("train", "val", "query", "database"):
        np.testing.assert_array_equal(getattr(a, part), getattr(b, part))
    assert not np.array_equal(a.query, c.query) and not np.array_equal(a.val, c.val)


def test_counts_shrink_for_small_runs_and_too_small_classes_are_named():
    targets = np.repeat(np.arange(4), [30, 30, 30, 8])
    split = make_split("cifar10", targets, query_per_class=2, train_per_class=5)
    assert split.query.size == 8 and split.train.size == 20 and split.database.size == 98 - 28
    # counts are caps: the class of 8 gives queries and train images in proportion (1 + 7)
    split = make_split("cifar10", targets, query_per_class=2, train_per_class=10)
    assert np.bincount(targets[split.query]).tolist() == [2, 2, 2, 1]
    assert np.bincount(targets[split.train]).tolist() == [10, 10, 10, 7]
    split = make_split("cifar10", np.repeat(np.arange(2), 5000), train_per_class=5000)
    assert split.query.size == 2 * 98 and split.train.size == 2 * 4902


def test_every_short_class_is_named_with_its_count_before_anything_else():
    from dfsnet.data.splits import SplitError

    targets = np.concatenate([np.repeat(0, 30), [1], np.repeat(2, 30), [4, 4]])
    names = ["airplane", "bird", "cat", "deer", "frog"]
    with pytest.raises(SplitError) as err:
        make_split("per-class", targets, class_names=names, min_train_per_class=2)
    message = str(err.value)
    assert "'bird' (1)" in message and "'frog' (2)" in message and "2 of 4 classes" in message
    assert "pool_targets" not in message and "class 1" not in message
    assert "min_query_per_class" in message and err.value.short_classes == [("bird", 1), ("frog", 2)]
    with pytest.raises(SplitError, match=r"'class 1' \(1\)"):  # no names: by label
        make_split("cifar10", targets, query_per_class=2, train_per_class=5)
    # the floors are options: 0 queries allowed for a one-image class
    split = make_split("cifar10", targets, query_per_class=2, train_per_class=5, min_query_per_class=0)
    assert 1 in targets[split.train] and 1 not in targets[split.query]
    with pytest.raises(ValueError, match="min_train_per_class: expected an integer >= 0"):
        make_split("cifar10", targets, min_train_per_class=-1)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="'cifar10-1'"):
        make_split("cifar100", TARGETS)
    with pytest.raises(TypeError, match="query_fraction"):
        make_split("cifar10", TARGETS, query_fraction=0.1)
    with pytest.raises(TypeError, match="paper"):
        make_split("paper", TARGETS, pool_sources=SOURCES, train_per_class=5)
    with pytest.raises(ValueError, match="val_fraction"):
        make_split("cifar10", TARGETS, val_fraction=1.0)
    with pytest.raises(ValueError, match="non-negative"):
        make_split("cifar10", np.full(10, -1))
    with pytest.raises(ValueError, match="seed"):
        make_split("cifar10", TARGETS, seed=-1)
    with pytest.raises(ValueError, match="query_per_class"):
        make_split("cifar10", TARGETS, query_per_class=0)


def test_save_load_round_trip(tmp_path):
    split = make_split("cifar10", TARGETS, seed=1, query_per_class=20, train_per_class=50,
                       pool_fingerprint="pool-abc")
    path = tmp_path / "splits" / "cifar10.json"
    split.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["cifar10.json"]  # no temp file left
    data = json.loads(path.read_text())
    assert data["format"] == "dfsnet.split" and data["sizes"]["query"] == 200
    loaded = Split.load(path, expect_fingerprint="pool-abc")
    assert (loaded.protocol, loaded.seed, loaded.n_pool, loaded.pool_fingerprint) == ("cifar10", 1, 60000, "pool-abc")
    assert loaded.params == split.params
    for part in ("train", "val", "query", "database"):
        np.testing.assert_array_equal(getattr(loaded, part), getattr(split, part))
        assert getattr(loaded, part).dtype == np.int64


def test_load_refuses_another_pool_and_broken_files(tmp_path):
    path = tmp_path / "s.json"
    make_split("cifar10-1", TARGETS, query_per_class=5, train_per_class=5, pool_fingerprint="pool-A").save(path)
    with pytest.raises(ValueError, match="pool-A.*pool-B"):
        Split.load(path, expect_fingerprint="pool-B")

    data = json.loads(path.read_text())
    data["train"], data["val"] = data["train"][:10] + data["query"][:1], []
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="overlap"):
        Split.load(path)
    path.write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="not a dfsnet split"):
        Split.load(path)
    path.write_text("{")
    with pytest.raises(ValueError, match="not a dfsnet split"):
        Split.load(path)
    with pytest.raises(FileNotFoundError, match="path: no such split file: .*missing.json"):
        Split.load(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="path: no such split file"):
        Split.load(tmp_path)  # a folder, which open() reports as IsADirectoryError
    path.write_bytes(b"\x80\xffbinary")
    with pytest.raises(ValueError, match="not a dfsnet split file .*UnicodeDecodeError"):
        Split.load(path)


@pytest.mark.parametrize("indices", [[0.5, 1.0], [10**30], "abc", [[1, 2]]])
def test_load_refuses_indices_that_are_not_integers(tmp_path, indices):
    path = tmp_path / "s.json"
    make_split("per-class", TARGETS).save(path)
    data = json.loads(path.read_text())
    data["database"] = indices  # float indices were silently truncated to int
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="holds an invalid split: database: expected a 1-D integer index array"):
        Split.load(path)


def test_subset_views_check_the_pool(tmp_path):
    pool = ConcatPool(ImageFolder(make_image_folder(tmp_path / "a", per_class=6)))
    split = make_split("per-class", pool.targets, query_per_class=1, train_per_class=3,
                       pool_fingerprint=pool.fingerprint())
    query = split.subset(pool, "query")
    assert len(query) == 3 and query.targets.tolist() == pool.targets[split.query].tolist()
    assert len(split.subset(pool, "fit")) == split.fit.size
    other = ConcatPool(ImageFolder(make_image_folder(tmp_path / "b", per_class=6, seed=5)))
    other_fp = other.fingerprint()
    with pytest.raises(ValueError, match=f"{split.pool_fingerprint}.*{other_fp}"):
        split.subset(other, "train")
    # A split made from labels alone checks the labels.
    by_labels = make_split("per-class", pool.targets, query_per_class=1, train_per_class=3)
    assert len(by_labels.subset(other, "database")) == by_labels.database.size
    with pytest.raises(ValueError, match="labels:"):
        by_labels.subset(ConcatPool(ImageFolder(make_image_folder(tmp_path / "c", per_class=5))), "train")


def test_stratified_holdout_and_protocol_list():
    targets = np.repeat(np.arange(3), [10, 4, 1])
    rest, held = stratified_holdout(targets, 0.25, seed=0)
    assert np.bincount(targets[held], minlength=3).tolist() == [3, 1, 0]
    np.testing.assert_array_equal(np.sort(np.concatenate([rest, held])), np.arange(15))
    assert PROTOCOLS == ("paper", "cifar10", "cifar10-1", "per-class")
