"""extract_features, its cache and mask, feature-map caching and extract_from_maps."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dfsnet.data import ImageFolder, Subset, build_transforms
from dfsnet.features import (
    cached_feature_maps,
    dataset_fingerprint,
    extract_features,
    extract_features_with_mask,
    extract_from_maps,
)
from dfsnet.models import DFSNet, create_backbone
from tests.conftest import make_image_folder

SIZE = 32


@pytest.fixture(scope="module")
def model() -> DFSNet:
    torch.manual_seed(0)
    return DFSNet(create_backbone("test_efficientnet"), 3).eval()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, model):
    root = make_image_folder(tmp_path_factory.mktemp("feat") / "images", n_classes=3, per_class=3, size=SIZE)
    return ImageFolder(root, transform=build_transforms(model.meta, train=False, image_size=SIZE))


class _Counter:
    """Wraps a bound method and counts the images it sees."""

    def __init__(self, fn):
        self.fn, self.images = fn, 0

    def __call__(self, x):
        self.images += x.shape[0]
        return self.fn(x)


def test_extract_features_shape_order_and_batching(model, dataset):
    feats = extract_features(model, dataset, batch_size=4, precision="fp32")
    assert feats.shape == (len(dataset), model.meta.feature_dim) and feats.dtype == np.float32
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad():
        expected = model.features(x).numpy()
    np.testing.assert_allclose(feats, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(extract_features(model, dataset, batch_size=1, precision="fp32"), feats,
                               rtol=1e-4, atol=1e-5)
    assert not model.training  # the mode is restored


def test_cache_hit_skips_the_model(model, dataset, tmp_path):
    first = extract_features(model, dataset, cache_dir=tmp_path, cache_key="test")
    files = list(tmp_path.glob("features-*.npz"))
    assert len(files) == 1
    counter = _Counter(model.features)
    model.features = counter
    try:
        again = extract_features(model, dataset, cache_dir=tmp_path, cache_key="test")
        assert counter.images == 0
        np.testing.assert_array_equal(again, first)
        # Another split name or another view of the data is another entry.
        extract_features(model, Subset(dataset, [0, 1, 2]), cache_dir=tmp_path, cache_key="test")
        extract_features(model, dataset, cache_dir=tmp_path, cache_key="other")
        assert counter.images == 3 + len(dataset)
    finally:
        del model.features
    assert len(list(tmp_path.glob("features-*.npz"))) == 3


def test_cache_key_follows_the_weights(dataset, tmp_path):
    torch.manual_seed(1)
    a = DFSNet(create_backbone("test_efficientnet"), 3).eval()
    fa = extract_features(a, dataset, cache_dir=tmp_path)
    with torch.no_grad():
        a.fc.weight.add_(1.0)  # the classifier is part of the state, so the key changes
    assert len(list(tmp_path.glob("features-*.npz"))) == 1
    extract_features(a, dataset, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("features-*.npz"))) == 2
    with torch.no_grad():
        a.fc.weight.sub_(1.0)
    np.testing.assert_array_equal(extract_features(a, dataset, cache_dir=tmp_path), fa)


def test_head_map_features_equal_full_forward(model, dataset, tmp_path):
    maps = cached_feature_maps(model.backbone, dataset, cache_dir=tmp_path, batch_size=4)
    assert maps.maps.dtype == np.float16 and maps.maps.shape[0] == len(dataset) and maps.ok.all()
    np.testing.assert_array_equal(maps.labels, dataset.targets)
    assert maps.seconds > 0
    counter = _Counter(model.backbone.forward)
    model.backbone.forward = counter
    try:
        again = cached_feature_maps(model.backbone, dataset, cache_dir=tmp_path, batch_size=4)
        assert counter.images == 0 and again.seconds == 0.0 and again.path == maps.path
    finally:
        del model.backbone.forward
    from_maps = extract_from_maps(model, maps.maps, batch_size=4)
    full = extract_features(model, dataset)
    assert from_maps.dtype == np.float32 and from_maps.shape == full.shape
    # Only the float16 storage of the maps separates the two.
    np.testing.assert_allclose(from_maps, full, rtol=2e-2, atol=2e-2 * np.abs(full).max())


def test_unreadable_image_is_masked(model, tmp_path):
    root = make_image_folder(tmp_path / "images", n_classes=2, per_class=3, size=SIZE)
    (root / "class_0" / "001.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    ds = ImageFolder(root, transform=build_transforms(model.meta, train=False, image_size=SIZE))
    bad = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("class_0/001.jpg")][0]
    with pytest.raises(ValueError, match=r"1 of 6 items could not be loaded .*001\.jpg"):
        extract_features(model, ds, batch_size=4)
    feats, ok = extract_features_with_mask(model, ds, batch_size=4)
    assert ok.dtype == bool and np.flatnonzero(~ok).tolist() == [bad]
    assert not feats[bad].any() and feats[ok].any(axis=1).all()
    maps = cached_feature_maps(model.backbone, ds, cache_dir=tmp_path / "cache", batch_size=4)
    assert np.flatnonzero(~maps.ok).tolist() == [bad] and maps.labels[bad] == -1


def test_fingerprint_covers_transform_and_subset(dataset, model):
    base = dataset_fingerprint(dataset)
    assert base == dataset_fingerprint(dataset)
    other = ImageFolder(dataset.root, transform=build_transforms(model.meta, train=False, image_size=SIZE * 2))
    assert dataset_fingerprint(other) != base
    assert dataset_fingerprint(Subset(dataset, [0, 1])) != dataset_fingerprint(Subset(dataset, [1, 0]))
    assert dataset_fingerprint(torch.utils.data.TensorDataset(torch.zeros(2, 3))) is not None
    assert dataset_fingerprint([1, 2, 3]) is None


def test_bad_arguments(model, dataset, tmp_path):
    with pytest.raises(TypeError, match="model"):
        extract_features(torch.nn.Linear(2, 2), dataset)
    with pytest.raises(ValueError, match="dataset"):
        extract_features(model, Subset(dataset, []))
    with pytest.raises(ValueError, match="cache_key"):
        extract_features(model, [(torch.zeros(3, SIZE, SIZE), 0)], cache_dir=tmp_path)
    with pytest.raises(ValueError, match="maps"):
        extract_from_maps(model, np.zeros((2, 3), dtype=np.float32))


def test_unusable_device_and_cache_folder_fail_before_any_work(model, dataset, tmp_path, monkeypatch):
    from dfsnet.train import evaluate_accuracy

    # torch raised a RuntimeError deep in .to() when no CUDA device was there.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device: got 'cuda', but this machine has 0 usable CUDA device"):
        extract_features(model, dataset, device="cuda")
    with pytest.raises(ValueError, match="device: got 'cuda:1'"):
        evaluate_accuracy(model, dataset, device="cuda:1")
    # A file given as the cache folder failed only at the final write, after the extraction.
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    with pytest.raises(NotADirectoryError, match=r"cache_dir: expected a folder, but .*not_a_folder is a file"):
        extract_features(model, dataset, cache_dir=blocker)
    with pytest.raises(NotADirectoryError, match="cache_dir: expected a folder"):
        cached_feature_maps(model.backbone, dataset, cache_dir=blocker)
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module .* got object"):
        evaluate_accuracy(object(), dataset)


@pytest.fixture
def bf16_cpu(monkeypatch):
    """Pretend this CPU has native bf16, so the bf16 path runs on any test machine."""
    from dfsnet import precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)


def test_bf16_features_agree_with_fp32_and_are_cached_apart(model, dataset, tmp_path, bf16_cpu):
    fp32 = extract_features(model, dataset, precision="fp32", cache_dir=tmp_path)
    bf16 = extract_features(model, dataset, precision="bf16", cache_dir=tmp_path)
    assert bf16.dtype == np.float32 and bf16.shape == fp32.shape
    cos = (fp32 * bf16).sum(1) / (np.linalg.norm(fp32, axis=1) * np.linalg.norm(bf16, axis=1))
    assert cos.min() > 0.99 and not np.array_equal(fp32, bf16)
    assert len(list(tmp_path.glob("features-*.npz"))) == 2
    # The model is left as it was found: contiguous weights, eval mode untouched.
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous()


def test_bf16_feature_maps_and_head_agree_with_fp32(model, dataset, tmp_path, bf16_cpu):
    fp32 = cached_feature_maps(model.backbone, dataset, cache_dir=tmp_path, precision="fp32")
    bf16 = cached_feature_maps(model.backbone, dataset, cache_dir=tmp_path, precision="bf16")
    assert fp32.path != bf16.path and bf16.maps.shape == fp32.maps.shape
    a = extract_from_maps(model, fp32.maps, precision="fp32")
    b = extract_from_maps(model, bf16.maps, precision="bf16")
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() > 0.98


def test_auto_workers_decode_files_and_skip_memory(dataset):
    import os

    from dfsnet.data import ArrayImageDataset
    from dfsnet.features._loader import resolve_num_workers

    assert dataset.reads_files and Subset(dataset, np.arange(3)).reads_files
    assert resolve_num_workers(None, dataset, batch_size=1) == min(8, os.cpu_count())
    assert resolve_num_workers(None, dataset, batch_size=64) == 0  # too short to pay for worker start-up
    memory = ArrayImageDataset(np.zeros((300, 8, 8, 3), dtype=np.uint8), np.zeros(300, dtype=np.int64), ["a"])
    assert not memory.reads_files and resolve_num_workers(None, memory, batch_size=4) == 0
    assert resolve_num_workers(3, memory, batch_size=4) == 3
    with pytest.raises(ValueError, match="num_workers"):
        resolve_num_workers(-1, memory, batch_size=4)


def test_auto_workers_give_the_same_features(model, dataset):
    one = extract_features(model, dataset, batch_size=2, num_workers=0, precision="fp32")
    auto = extract_features(model, dataset, batch_size=1, num_workers=None, precision="fp32")
    np.testing.assert_allclose(auto, one, rtol=1e-4, atol=1e-5)
