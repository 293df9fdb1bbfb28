"""build_transforms: sizes, resize rule, normalisation, augmentation, argument checks."""
from __future__ import annotations

import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as F

from dfsnet.data import build_transforms
from dfsnet.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_small_images_are_resized_whole_not_cropped():
    image = noise_image(32, 32)
    out = build_transforms(64, train=False)(image)
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    expected = F.normalize(F.to_tensor(F.resize(image, 64)), IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(out, expected)


def test_large_images_are_resized_by_crop_pct_then_centre_cropped():
    image = noise_image(300, 200)
    out = build_transforms(64, train=False)(image)
    resized = F.resize(image, 73)  # round(64 / 0.875)
    assert resized.size == (109, 73)
    expected = F.normalize(F.to_tensor(F.center_crop(resized, 64)), IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(out, expected)


def test_normalisation_uses_the_given_statistics():
    grey = Image.new("RGB", (40, 40), (51, 102, 204))
    out = build_transforms(16, [0.1, 0.2, 0.3], [0.5, 0.5, 0.25], train=False)(grey)
    expected = (np.array([51, 102, 204]) / 255 - [0.1, 0.2, 0.3]) / [0.5, 0.5, 0.25]
    np.testing.assert_allclose(out.mean(dim=(1, 2)).numpy(), expected, atol=1e-5)


def test_meta_like_objects_and_image_size_override():
    meta = SimpleNamespace(input_size=(3, 48, 48), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    white = Image.new("RGB", (10, 10), (255, 255, 255))
    out = build_transforms(meta, train=False)(white)
    assert out.shape == (3, 48, 48)
    torch.testing.assert_close(out, torch.ones(3, 48, 48))  # (1 - 0.5) / 0.5
    assert build_transforms({"input_size": (3, 40, 40)}, train=True, image_size=24)(white).shape == (3, 24, 24)
    assert build_transforms((3, 20, 30), train=False)(noise_image(50, 50)).shape == (3, 20, 30)


def test_training_augmentation_is_random_and_seedable():
    image = noise_image(64, 64)
    transform = build_transforms(32, train=True)
    torch.manual_seed(0)
    a, b = transform(image), transform(image)
    torch.manual_seed(0)
    a2 = transform(image)
    assert a.shape == (3, 32, 32)
    assert not torch.equal(a, b)
    torch.testing.assert_close(a, a2)


def test_transforms_pickle_for_dataloader_workers():
    transform = pickle.loads(pickle.dumps(build_transforms(16, train=False)))
    assert transform(noise_image(20, 20)).shape == (3, 16, 16)


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="meta_or_size"):
        build_transforms("224", train=False)
    with pytest.raises(TypeError, match="meta_or_size"):
        build_transforms(SimpleNamespace(mean=(0, 0, 0)), train=False)
    with pytest.raises(ValueError, match="meta_or_size"):
        build_transforms(0, train=False)
    with pytest.raises(ValueError, match="std"):
        build_transforms(32, (0, 0, 0), (1, 0, 1), train=False)
    with pytest.raises(ValueError, match="mean"):
        build_transforms(32, (0, 0), (1, 1, 1), train=False)
    with pytest.raises(ValueError, match="crop_pct"):
        build_transforms(32, train=False, crop_pct=1.5)
    with pytest.raises(ValueError, match="interpolation"):
        build_transforms(32, train=False, interpolation="lanczos3")
