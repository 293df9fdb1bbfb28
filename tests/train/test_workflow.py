"""The shared training workflow: deterministic heads, the encoder defaults, device mapping."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dfsnet.train.workflow import (
    DEFAULT_BITS,
    build_encoder,
    fit_encoder,
    fit_encoder_on_folder,
    lightning_device,
    torch_device,
    train_and_fit,
)
from tests.conftest import make_image_folder

TINY = dict(backbone="test_efficientnet", pretrained=False, image_size=32, batch_size=8, epochs=2,
            val_fraction=0.3, n_bits=16)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("workflow") / "images", n_classes=3, per_class=8)


def test_same_seed_gives_identical_weights_and_encoder(images, tmp_path):
    runs = [train_and_fit(out_dir=tmp_path / name, data=images, seed=7, **TINY) for name in ("a", "b")]
    a, b = (r.model.state_dict() for r in runs)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [e["train_loss"] for e in runs[0].result.history] == [e["train_loss"] for e in runs[1].result.history]
    x = np.random.default_rng(0).normal(size=(5, runs[0].model.meta.feature_dim)).astype(np.float32)
    np.testing.assert_array_equal(runs[0].encoder.transform(x), runs[1].encoder.transform(x))
    assert runs[0].encoder.n_bits_ == 16 and runs[0].n_encoder_images == runs[0].split.train.size
    for name in ("model.safetensors", "encoder.npz", "split.json", "train_summary.json"):
        assert (tmp_path / "a" / name).is_file()

    other = train_and_fit(out_dir=tmp_path / "c", data=images, seed=8, **TINY)
    assert not all(torch.equal(a[k], v) for k, v in other.model.state_dict().items())


def test_fit_encoder_uses_the_cli_defaults(rng):
    x = rng.normal(size=(60, 256)).astype(np.float32)
    y = np.repeat(np.arange(3), 20)
    enc = fit_encoder(x, y)
    assert enc.n_bits_ == DEFAULT_BITS == 128
    assert type(enc.selector).__name__ == "GainRatioSelector"
    assert enc.transform(x).shape == (60, 16)
    assert fit_encoder(x, y, selector="none").n_bits_ == 256
    with pytest.raises(ValueError, match=r"bits: expected at most the backbone's feature width 256, got 512"):
        fit_encoder(x, y, n_bits=512)
    with pytest.raises(ValueError, match=r"bits: with no selector, hasher 'sample_mean' makes one bit per feature"):
        build_encoder(256, selector=None, n_bits=16)
    with pytest.raises(ValueError, match=r"bits: ITQ learns 64 principal directions from the 60 training images"):
        fit_encoder(x, y, selector=None, hasher="itq", n_bits=64)


def test_fit_encoder_on_folder(images):
    from dfsnet.models import DFSNet, create_backbone

    torch.manual_seed(0)
    model = DFSNet(create_backbone("test_efficientnet"), 3)
    enc = fit_encoder_on_folder(model, images, n_bits=8, image_size=32, batch_size=8, device="cpu")
    assert enc.n_bits_ == 8 and enc.n_features_in_ == model.meta.feature_dim
    with pytest.raises(ValueError, match="bits: expected at most"):
        fit_encoder_on_folder(model, images, n_bits=model.meta.feature_dim + 1)


def test_device_values_map_to_torch_and_lightning():
    assert torch_device("auto") is None and torch_device(None) is None and torch_device("cuda:1") == "cuda:1"
    assert lightning_device("auto") == ("auto", "auto")
    assert lightning_device("cpu") == ("cpu", "auto")
    assert lightning_device("cuda") == ("gpu", "auto") and lightning_device("cuda:1") == ("gpu", [1])
    with pytest.raises(ValueError, match="device: expected"):
        lightning_device("cuda:x")
