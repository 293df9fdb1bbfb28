"""ImageFolder, ImageList, views and skipping of unreadable images."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader

from dfsnet.data import (
    ArrayImageDataset,
    ConcatPool,
    ImageFolder,
    ImageList,
    Subset,
    build_transforms,
    collate_skip_none,
    iter_image_files,
)
from tests.conftest import make_image_folder
from tests.test_images import bad_image_files, no_subprocess  # noqa: F401 (no_subprocess: a fixture)


def add_bad_images(root: Path) -> list[str]:
    """A corrupt JPEG (random bytes) in class_0 and a truncated one (first half of a valid file) in class_1."""
    corrupt = root / "class_0" / "corrupt.jpg"
    corrupt.write_bytes(np.random.default_rng(1).bytes(2000))
    valid = (root / "class_1" / "000.jpg").read_bytes()
    truncated = root / "class_1" / "truncated.jpg"
    truncated.write_bytes(valid[: len(valid) // 2])
    return sorted([str(corrupt), str(truncated)])


def test_scan_lists_classes_targets_and_samples(image_folder):
    ds = ImageFolder(image_folder)
    assert ds.classes == ["class_0", "class_1", "class_2"]
    assert ds.class_to_idx == {"class_0": 0, "class_1": 1, "class_2": 2}
    assert ds.targets.dtype == np.int64 and ds.targets.shape == (12,)
    np.testing.assert_array_equal(ds.targets, np.repeat(np.arange(3), 4))
    assert ds.samples[0] == (str(image_folder / "class_0" / "000.jpg"), 0)
    assert [label for _, label in ds.samples] == ds.targets.tolist()
    x, y = ds[5]
    assert isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.shape == (3, 32, 32)
    assert y == 1 and isinstance(y, int)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    with pytest.raises(IndexError):
        ds[12]


def test_scan_does_not_decode(image_folder, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("scanning must not open images")

    monkeypatch.setattr(Image, "open", refuse)
    assert len(ImageFolder(image_folder)) == 12


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_images_are_skipped_and_counted_through_a_dataloader(image_folder, num_workers):
    bad = add_bad_images(image_folder)
    ds = ImageFolder(image_folder, transform=build_transforms(32, train=False))
    assert len(ds) == 14 and ds.n_skipped == 0
    loader = DataLoader(ds, batch_size=5, num_workers=num_workers, collate_fn=collate_skip_none)
    for _ in range(2):  # a second epoch must not count the same files again
        seen = 0
        for images, labels in loader:
            assert images.shape[1:] == (3, 32, 32)
            seen += len(labels)
        assert seen == 12
        # Counted in the main process even when the workers found them.
        assert ds.n_skipped == 2
        assert sorted(ds.skipped_paths) == bad


def test_each_bad_image_is_logged_once(image_folder, caplog):
    bad = add_bad_images(image_folder)
    ds = ImageFolder(image_folder)
    with caplog.at_level(logging.WARNING, logger="dfsnet.data"):
        for _ in range(3):
            items = [ds[i] for i in range(len(ds))]
    assert sum(item is None for item in items) == 2
    messages = [r.getMessage() for r in caplog.records]
    for path in bad:
        assert sum(path in m for m in messages) == 1


def test_truncated_image_is_not_silently_padded(image_folder):
    add_bad_images(image_folder)
    ds = ImageFolder(image_folder)
    truncated = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("truncated.jpg")]
    assert ds.load_image(truncated[0]) is None
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_verify_finds_bad_images_in_the_calling_process(image_folder):
    bad = add_bad_images(image_folder)
    ds = ImageFolder(image_folder)
    assert ds.verify() == [p for p, _ in ds.samples if p in bad]
    assert ds.n_skipped == 2
    assert sum(ds[i] is None for i in range(len(ds))) == 2


@pytest.mark.usefixtures("no_subprocess")
def test_unsafe_files_are_skipped_and_counted_without_running_anything(image_folder, caplog):
    # EPS / PS / PDF payloads under image names, a 1x8000 and a 20000000x1 PNG: the same rules
    # as for queries, and each is counted like an unreadable image (no exception).
    bad = bad_image_files(image_folder / "class_2" / "unsafe")
    ds = ImageFolder(image_folder)
    assert len(ds) == 12 + 5
    with caplog.at_level(logging.WARNING, logger="dfsnet.data"):
        items = [ds[i] for i in range(len(ds))]
        items_again = [ds[i] for i in range(len(ds))]
    assert sum(item is None for item in items) == 5 and sum(item is None for item in items_again) == 5
    assert all(item[0].shape == (3, 32, 32) for item in items if item is not None)
    assert ds.n_skipped == 5 and sorted(ds.skipped_paths) == bad
    messages = [r.getMessage() for r in caplog.records]
    for path in bad:
        assert sum(path in m for m in messages) == 1
    assert any("aspect ratio" in m for m in messages) and any("not an image of a supported type" in m
                                                              for m in messages)

    good = [p for p, _ in ds.samples if p not in bad][:3]
    listed = ImageList(good + bad)
    assert listed.verify() == bad and listed.n_skipped == 5
    assert [listed[i] is None for i in range(len(listed))] == [False] * 3 + [True] * 5


def test_plain_pixel_formats_and_16_bit_images_are_read(tmp_path):
    root = tmp_path / "mixed"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
    Image.new("L", (10, 6), 40).save(root / "a" / "grey.pgm")
    Image.new("RGB", (10, 6), (1, 2, 3)).save(root / "a" / "colour.ppm")
    Image.fromarray(np.full((6, 10), 65535, dtype=np.uint16)).save(root / "b" / "deep.png")
    Image.new("RGBA", (10, 6), (9, 8, 7, 0)).save(root / "b" / "alpha.webp", lossless=True)
    ds = ImageFolder(root)
    assert len(ds) == 4
    images = [ds.load_image(i) for i in range(len(ds))]
    assert all(im is not None and im.mode == "RGB" and im.size == (10, 6) for im in images) and ds.n_skipped == 0
    deep = images[[p for p, _ in ds.samples].index(str(root / "b" / "deep.png"))]
    assert np.asarray(deep).min() == 255  # scaled to 8 bits, white stays white


def test_collate_skip_none():
    item = (torch.zeros(3, 4, 4), 1)
    images, labels = collate_skip_none([None, item, item, None])
    assert images.shape == (2, 3, 4, 4) and labels.tolist() == [1, 1]
    assert collate_skip_none([None, None]) is None


def test_missing_root_names_the_expected_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ROOT/<class>/<image>"):
        ImageFolder(tmp_path / "nope")


def test_empty_folder_is_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(tmp_path)


def test_one_class_folder_is_refused(tmp_path):
    root = make_image_folder(tmp_path / "one", n_classes=1)
    (root / "empty_class").mkdir()
    with pytest.raises(ValueError, match="only one class"):
        ImageFolder(root)


def test_flat_folder_points_to_imagelist(tmp_path):
    root = make_image_folder(tmp_path / "imgs", n_classes=2)
    for p in list(root.glob("*/*.jpg")):
        p.rename(root / f"{p.parent.name}_{p.name}")
    with pytest.raises(ValueError, match="ImageList"):
        ImageFolder(root)


def test_explicit_classes_fix_the_label_mapping(image_folder):
    ds = ImageFolder(image_folder, classes=["class_2", "class_0", "missing"])
    assert ds.classes == ["class_2", "class_0", "missing"]
    assert len(ds) == 8
    assert all(Path(p).parent.name == ds.classes[label] for p, label in ds.samples)


def test_iter_image_files_is_sorted_recursive_and_filtered(tmp_path):
    root = make_image_folder(tmp_path / "r", n_classes=2, per_class=2)
    nested = root / "class_1" / "deeper"
    nested.mkdir()
    shutil.copy(root / "class_0" / "000.jpg", nested / "A.JPG")
    shutil.copy(root / "class_0" / "000.jpg", root / ".hidden.jpg")
    (root / "class_0" / "readme.txt").write_text("x")
    found = [p.relative_to(root).as_posix() for p in iter_image_files(root)]
    assert found == ["class_0/000.jpg", "class_0/001.jpg", "class_1/000.jpg", "class_1/001.jpg",
                     "class_1/deeper/A.JPG"]
    assert list(iter_image_files(root, recursive=False)) == []
    assert [p.name for p in iter_image_files(root / "class_1", False)] == ["000.jpg", "001.jpg"]
    with pytest.raises(FileNotFoundError):
        iter_image_files(tmp_path / "nope")


def test_image_list_unlabelled_and_labelled(image_folder, tmp_path):
    paths = list(iter_image_files(image_folder))[:3] + [tmp_path / "gone.jpg"]
    ds = ImageList(paths)
    assert ds.targets.tolist() == [-1] * 4 and ds.classes == []
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and y == -1
    assert ds[3] is None and ds.n_skipped == 1 and ds.skipped_paths == [str(tmp_path / "gone.jpg")]
    labelled = ImageList(paths[:3], [0, 2, 1])
    assert labelled.classes == ["0", "1", "2"] and labelled[1][1] == 2
    with pytest.raises(ValueError, match="paths"):
        ImageList([])
    with pytest.raises(TypeError, match="iter_image_files"):
        ImageList(str(image_folder))
    with pytest.raises(ValueError, match="labels"):
        ImageList(paths[:2], [0, 1, 2])


def test_fingerprint_is_stable_and_follows_the_content(image_folder, tmp_path):
    fp = ImageFolder(image_folder).fingerprint()
    assert ImageFolder(image_folder).fingerprint() == fp
    moved = shutil.copytree(image_folder, tmp_path / "copy")
    assert ImageFolder(moved).fingerprint() == fp  # relative paths: caches survive a move
    shutil.copy(moved / "class_0" / "000.jpg", moved / "class_0" / "zzz.jpg")
    assert ImageFolder(moved).fingerprint() != fp
    (moved / "class_0" / "zzz.jpg").rename(moved / "class_1" / "zzz.jpg")
    assert ImageFolder(moved).fingerprint() != fp


def test_subset_and_pool_keep_targets_classes_and_counts(tmp_path):
    train = ImageFolder(make_image_folder(tmp_path / "train", per_class=4))
    test = ImageFolder(make_image_folder(tmp_path / "test", per_class=2, seed=1))
    add_bad_images(tmp_path / "test")
    test = ImageFolder(tmp_path / "test")
    pool = ConcatPool(train, test)
    assert len(pool) == 12 + 8 and pool.classes == train.classes
    np.testing.assert_array_equal(pool.targets, np.concatenate([train.targets, test.targets]))
    np.testing.assert_array_equal(pool.sources, np.repeat([0, 1], [12, 8]))
    assert pool.source_of(11) == "train" and pool.source_of(12) == "test"
    assert pool.samples[12] == test.samples[0]

    view = Subset(pool, [19, 0, 14], transform=build_transforms(16, train=False))
    np.testing.assert_array_equal(view.targets, pool.targets[[19, 0, 14]])
    assert view.classes == pool.classes
    assert view[1][0].shape == (3, 16, 16)  # the view's transform overrides the parts'
    assert pool[0][0].shape == (3, 32, 32)
    assert [view[i] is None for i in range(3)] == [False, False, True]  # 14: test's corrupt.jpg
    assert view.n_skipped == 1 and view.skipped_paths == [test.samples[2][0]]
    assert sum(pool[i] is None for i in range(len(pool))) == 2
    assert pool.n_skipped == test.n_skipped == 2 and train.n_skipped == 0
    assert view.fingerprint() != Subset(pool, [19, 0, 12]).fingerprint()
    assert pool.fingerprint() != ConcatPool(test, train).fingerprint()

    other = ImageFolder(make_image_folder(tmp_path / "other", n_classes=2))
    with pytest.raises(ValueError, match="classes"):
        ConcatPool(train, other)
    with pytest.raises(ValueError, match="indices"):
        Subset(pool, [0, 20])


def test_array_dataset_renders_rgb():
    grey = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    ds = ArrayImageDataset(grey, [0, 1], ["a", "b"], name="toy")
    assert ds.load_image(1).mode == "RGB"
    x, y = ds[1]
    assert x.shape == (3, 4, 4) and y == 1
    np.testing.assert_allclose(x[0].numpy(), grey[1] / 255.0, atol=1e-6)
    assert ds.samples[1] == ("toy/000001", 1) and ds.n_skipped == 0
    with pytest.raises(ValueError, match="uint8"):
        ArrayImageDataset(grey.astype(np.float32), [0, 1], ["a", "b"])
