"""Named sources: folder, cifar10 (image-folder layout), caltech256 (local layout), digits."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from sklearn.datasets import load_digits

from dfsnet.data import (
    ConcatPool,
    ImageFolder,
    build_transforms,
    list_sources,
    load_pool,
    load_source,
    make_split,
    stratified_holdout,
)
from tests.conftest import make_image_folder

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_list_sources_and_unknown_name():
    assert list_sources() == ["folder", "cifar10", "caltech256", "digits"]
    with pytest.raises(ValueError, match=r"\['folder', 'cifar10', 'caltech256', 'digits'\].*'mnist'"):
        load_source("mnist")
    with pytest.raises(ValueError, match="split"):
        load_source("digits", split="val")


def test_digits_renders_sklearn_digits_as_rgb_images():
    train = load_source("digits", split="train")
    test = load_source("digits", split="test")
    assert (len(train), len(test)) == (1438, 359)
    assert train.classes == [str(d) for d in range(10)]
    # Stratified: every class in both parts, in about the 80/20 ratio.
    ratio = np.bincount(test.targets) / (np.bincount(train.targets) + np.bincount(test.targets))
    assert np.all(np.abs(ratio - 0.2) < 0.01)
    image = train.load_image(0)
    assert image.mode == "RGB" and image.size == (8, 8)
    digits = load_digits()
    rest, _ = stratified_holdout(digits.target, 0.2, seed=0)
    pixels = np.asarray(image)
    assert pixels.dtype == np.uint8 and (pixels[..., 0] == pixels[..., 2]).all()
    np.testing.assert_array_equal(pixels[..., 1], np.round(digits.images[rest[0]] * 255 / 16))
    assert pixels.max() == 255 and train.targets[0] == digits.target[rest[0]]
    x, y = load_source("digits", split="test", transform=build_transforms(32, train=False))[3]
    assert x.shape == (3, 32, 32) and y == test.targets[3]
    pool = load_source("digits", split="all")
    assert isinstance(pool, ConcatPool) and len(pool) == 1797
    assert load_source("digits", split="train").fingerprint() == train.fingerprint() != test.fingerprint()


def test_folder_source_with_train_and_test(tmp_path):
    make_image_folder(tmp_path / "ds" / "train", n_classes=3, per_class=3)
    make_image_folder(tmp_path / "ds" / "test", n_classes=2, per_class=2, seed=1)  # lacks class_2
    train = load_source("folder", root=tmp_path / "ds")
    test = load_source("folder", root=tmp_path / "ds", split="test")
    assert train.classes == test.classes == ["class_0", "class_1", "class_2"]
    assert (len(train), len(test)) == (9, 4)
    pool = load_pool("folder", root=tmp_path / "ds")
    assert pool.sources.tolist() == [0] * 9 + [1] * 4
    assert len(load_source("folder", root=tmp_path / "ds", split="all")) == 13
    with pytest.raises(ValueError, match="download"):
        load_source("folder", root=tmp_path / "ds", download=True)


def test_flat_folder_source_has_no_test_split(image_folder):
    assert len(load_source("folder", root=image_folder)) == 12
    with pytest.raises(FileNotFoundError, match="no test split"):
        load_source("folder", root=image_folder, split="test")
    pool = load_pool("folder", root=image_folder)
    assert len(pool) == 12 and not pool.sources.any()
    with pytest.raises(ValueError, match="per-class"):
        make_split("paper", pool.targets, pool_sources=pool.sources)


def test_missing_roots_say_how_to_get_the_data(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"download=True.*ROOT/train/<class>/<image>"):
        load_source("cifar10", root=tmp_path)
    with pytest.raises(ValueError, match="root"):
        load_source("cifar10")
    with pytest.raises(FileNotFoundError, match="download=True.*256_ObjectCategories"):
        load_source("caltech256", root=tmp_path, split="all")
    with pytest.raises(FileNotFoundError, match=r"ROOT/<class>/<image>"):
        load_source("folder", root=tmp_path / "nope")


def test_cifar10_image_folder_layout_is_detected(tmp_path):
    for split, n in (("train", 4), ("test", 2)):
        make_image_folder(tmp_path / "c10" / split, n_classes=3, per_class=n)
    ds = load_source("cifar10", root=tmp_path / "c10", split="test")
    assert isinstance(ds, ImageFolder) and len(ds) == 6
    pool = load_pool("cifar10", root=tmp_path / "c10")
    assert len(pool) == 18 and pool.sources.sum() == 6
    shutil.rmtree(tmp_path / "c10" / "test")
    with pytest.raises(FileNotFoundError, match="test"):
        load_pool("cifar10", root=tmp_path / "c10")


def test_real_cifar10_folders_scan(cifar10_root):
    pool = load_pool("cifar10", root=cifar10_root)
    assert pool.classes == CIFAR10_CLASSES
    assert len(pool) == 60000 and int(pool.sources.sum()) == 10000
    assert np.bincount(pool.targets).tolist() == [6000] * 10
    split = make_split("cifar10", pool.targets, pool_sources=pool.sources, seed=0)
    assert (split.query.size, split.train.size, split.database.size) == (1000, 5000, 54000)
    x, y = pool[0]
    assert x.shape == (3, 32, 32) and pool.classes[y] == "airplane"


def test_caltech256_local_layout_drops_clutter(tmp_path):
    folder = tmp_path / "caltech256" / "256_ObjectCategories"
    for name, n in (("001.ak47", 3), ("002.american-flag", 2), ("257.clutter", 4)):
        make_image_folder(tmp_path / "tmp" / name, n_classes=1, per_class=n)
        shutil.move(tmp_path / "tmp" / name / "class_0", folder / name)
    (folder / "001.ak47" / "RENAME2").write_text("not an image")
    for root in (tmp_path, folder):
        ds = load_source("caltech256", root=root, split="all")
        assert ds.classes == ["001.ak47", "002.american-flag"] and len(ds) == 5
    with pytest.raises(ValueError, match="no official train/test split.*per-class"):
        load_source("caltech256", root=tmp_path, split="train")
    pool = load_pool("caltech256", root=tmp_path)
    split = make_split("per-class", pool.targets, query_per_class=1, train_per_class=1,
                       pool_fingerprint=pool.fingerprint())
    assert split.query.size == 2 and split.train.size == 2


def test_corrupt_cifar10_batches_are_reported(tmp_path):
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    for name in ("data_batch_1", "batches.meta"):
        (batches / name).write_bytes(b"not the official file")
    for root in (tmp_path, batches):
        with pytest.raises(FileNotFoundError, match="missing or corrupt.*download=True"):
            load_source("cifar10", root=root, split="train")
