"""The pixel cache: decoded evaluation images kept for the next network over the same part."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dfsnet.data import ImageFolder, Subset, build_transforms
from dfsnet.data.datasets import ConcatPool
from dfsnet.features import cached_feature_maps, extract_features_with_mask
from dfsnet.features.pixels import pixel_cache_paths, pixel_preprocess
from dfsnet.models import DFSNet, create_backbone
from dfsnet.preprocess import EvalPreprocess
from tests.conftest import make_image_folder

SIZE = 32


@pytest.fixture(scope="module")
def model() -> DFSNet:
    torch.manual_seed(0)
    return DFSNet(create_backbone("test_efficientnet"), 3).eval()


@pytest.fixture
def folder(tmp_path, model):
    root = make_image_folder(tmp_path / "images", n_classes=3, per_class=3, size=24)
    # Smaller than the input, so the preprocessing resizes, and one unreadable image.
    (root / "class_1" / "002.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return ImageFolder(root, transform=build_transforms(model.meta, train=False, image_size=SIZE))


def _count_decodes(monkeypatch, dataset) -> list:
    seen = []
    original = type(dataset).load_image

    def counting(self, index):
        seen.append(index)
        return original(self, index)

    monkeypatch.setattr(type(dataset), "load_image", counting)
    return seen


def test_features_from_the_cache_equal_the_decoded_ones_bit_for_bit(model, folder, tmp_path, monkeypatch):
    part = Subset(folder, [8, 0, 5, 4, 7, 1, 2, 3])  # 5 is the unreadable image (class_1/002)
    plain, ok = extract_features_with_mask(model, part, batch_size=3, precision="fp32")
    cache = tmp_path / "pixels"
    filled, ok_filled = extract_features_with_mask(model, part, batch_size=3, precision="fp32",
                                                   pixel_cache_dir=cache)
    pixels_path, meta_path = pixel_cache_paths(part, cache)
    assert pixels_path.is_file() and meta_path.is_file()
    stored = np.load(pixels_path, allow_pickle=False)
    assert stored.dtype == np.uint8 and stored.shape == (len(part), 3, SIZE, SIZE) and not stored[2].any()
    seen = _count_decodes(monkeypatch, folder)
    hit, ok_hit = extract_features_with_mask(model, part, batch_size=3, precision="fp32", pixel_cache_dir=cache)
    assert seen == []  # nothing decoded again
    for feats, mask in ((filled, ok_filled), (hit, ok_hit)):
        np.testing.assert_array_equal(mask, ok)
        np.testing.assert_array_equal(feats, plain)
    assert ok.tolist() == [True, True, False, True, True, True, True, True]
    maps = cached_feature_maps(model.backbone, part, cache_dir=tmp_path / "maps", batch_size=3, precision="fp32")
    seen.clear()
    maps_hit = cached_feature_maps(model.backbone, part, cache_dir=tmp_path / "maps2", batch_size=3,
                                   precision="fp32", pixel_cache_dir=cache)
    assert seen == []
    np.testing.assert_array_equal(np.asarray(maps_hit.maps), np.asarray(maps.maps))
    np.testing.assert_array_equal(maps_hit.labels, maps.labels)


def test_each_part_and_transform_is_its_own_entry(model, folder, tmp_path):
    a, b = Subset(folder, [0, 1, 2]), Subset(folder, [2, 1, 0])
    other_size = ImageFolder(folder.root, transform=build_transforms(model.meta, train=False, image_size=16))
    keys = {pixel_cache_paths(ds, tmp_path)[0] for ds in (a, b, folder, other_size)}
    assert len(keys) == 4


def test_only_the_evaluation_preprocessing_is_cached(model, folder, tmp_path):
    assert isinstance(pixel_preprocess(folder), EvalPreprocess)
    assert pixel_preprocess(Subset(folder, [0, 1])) is pixel_preprocess(folder)
    augmenting = Subset(folder, [0, 1], transform=build_transforms(model.meta, train=True, image_size=SIZE))
    assert pixel_preprocess(augmenting) is None and pixel_cache_paths(augmenting, tmp_path) is None
    assert pixel_preprocess(torch.utils.data.TensorDataset(torch.zeros(2, 3, SIZE, SIZE))) is None
    # A pool applies its sources' transforms: cached when they are one preprocessing.
    same = ImageFolder(folder.root, transform=build_transforms(model.meta, train=False, image_size=SIZE))
    assert pixel_preprocess(Subset(ConcatPool(folder, same), [0, 9])) is not None
    other = ImageFolder(folder.root, transform=build_transforms(model.meta, train=False, image_size=16))
    assert pixel_preprocess(ConcatPool(folder, other)) is None
    # Such a dataset is read as before, and nothing is written.
    feats, ok = extract_features_with_mask(model, augmenting, precision="fp32", pixel_cache_dir=tmp_path / "p")
    assert ok.all() and feats.shape[0] == 2 and not (tmp_path / "p").exists()


def test_damaged_or_partial_entries_are_ignored_and_rewritten(model, folder, tmp_path, caplog):
    cache = tmp_path / "pixels"
    first, _ = extract_features_with_mask(model, folder, precision="fp32", pixel_cache_dir=cache)
    pixels_path, meta_path = pixel_cache_paths(folder, cache)
    pixels_path.write_bytes(pixels_path.read_bytes()[:200])  # truncated
    again, _ = extract_features_with_mask(model, folder, precision="fp32", pixel_cache_dir=cache)
    assert "pixel cache: ignoring" in caplog.text
    np.testing.assert_array_equal(again, first)
    assert np.load(pixels_path, allow_pickle=False).shape == (len(folder), 3, SIZE, SIZE)
    # Without its meta file (an interrupted pass) the entry is not used.
    meta_path.unlink()
    assert list(cache.glob("*.meta.npz")) == []
    caplog.clear()
    extract_features_with_mask(model, folder, precision="fp32", pixel_cache_dir=cache)
    assert "hit" not in caplog.text and meta_path.is_file()


def test_an_interrupted_fill_leaves_no_entry(model, folder, tmp_path):
    from dfsnet.features._loader import iter_batches

    cache = tmp_path / "pixels"
    batches = iter_batches(folder, batch_size=2, num_workers=0, device=torch.device("cpu"), pixel_cache_dir=cache)
    next(batches)
    batches.close()
    assert list(cache.iterdir()) == []


def test_batched_normalisation_equals_one_image_at_a_time(model, folder):
    pre = pixel_preprocess(folder)
    images = [folder.load_image(i) for i in (0, 1, 3)]
    batch = pre.normalize(np.stack([pre.pixels(im) for im in images]))
    for row, image in zip(batch, images):
        np.testing.assert_array_equal(row, pre(image))


@pytest.mark.parametrize("kind", ["pixels", "maps"])
def test_an_entry_whose_bytes_changed_fails_its_checksum_and_is_computed_again(model, folder, tmp_path, caplog,
                                                                              kind):
    from dfsnet.features import _loader

    cache = tmp_path / kind
    if kind == "pixels":
        def compute():
            return extract_features_with_mask(model, folder, precision="fp32", pixel_cache_dir=cache)[0]
    else:
        def compute():
            return np.array(cached_feature_maps(model.backbone, folder, cache_dir=cache, batch_size=4,
                                                precision="fp32").maps)
    first = compute()
    (array_path,) = cache.glob("*.npy")
    data = bytearray(array_path.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte: same size and shape, so only the checksum can tell
    array_path.write_bytes(bytes(data))
    _loader._VERIFIED.clear()  # as a new process would start
    caplog.clear()
    again = compute()
    assert "ignoring damaged cache" in caplog.text
    np.testing.assert_array_equal(again, first)
    assert array_path.read_bytes() != bytes(data)  # rewritten
    caplog.clear()
    compute()
    assert "damaged" not in caplog.text
