"""EvalPreprocess: equal to torchvision's evaluation pipeline, argument checks, pickling, no torch import."""
from __future__ import annotations

import math
import pickle
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from dfsnet.data import build_transforms
from dfsnet.errors import InputError, InputTypeError
from dfsnet.preprocess import INTERPOLATIONS, EvalPreprocess, eval_preprocess

# (width, height): tiny digits, CIFAR-like, landscape, portrait, a sliver, large, and both
# target sizes exactly.
IMAGE_SIZES = [(8, 8), (32, 32), (300, 200), (200, 300), (1, 50), (50, 1), (640, 480), (497, 333),
               (128, 128), (224, 224), (146, 146), (256, 256), (129, 500)]


def noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def reference(image: Image.Image, size: tuple[int, int], crop_pct: float, interpolation: str,
              mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> np.ndarray:
    """The evaluation pipeline as it was in torchvision: float32 (3, H, W)."""
    target = min(size)
    shorter = target if min(image.size) <= target else math.floor(target / crop_pct + 0.5)
    resized = F.resize(image, shorter, interpolation=InterpolationMode(interpolation))
    pipeline = T.Compose([T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])
    return pipeline(resized).numpy()


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest", "lanczos"])
@pytest.mark.parametrize("size", [(128, 128), (224, 224), (96, 160), (160, 96)])
def test_matches_torchvision_bit_for_bit(size, interpolation):
    pre = EvalPreprocess(size, interpolation=interpolation)
    for i, (w, h) in enumerate(IMAGE_SIZES):
        image = noise_image(w, h, seed=i)
        out = pre(image)
        assert out.shape == (3, *size) and out.dtype == np.float32 and out.flags.c_contiguous
        np.testing.assert_array_equal(out, reference(image, size, 0.875, interpolation), err_msg=f"{w}x{h}")


@pytest.mark.parametrize("interpolation", sorted(INTERPOLATIONS))
@pytest.mark.parametrize("crop_pct", [1.0, 0.95, 0.9, 0.5])
def test_every_interpolation_and_crop_pct_match(interpolation, crop_pct):
    mean, std = (0.5, 0.25, 0.0), (0.5, 0.125, 1.0)
    pre = EvalPreprocess((64, 80), crop_pct=crop_pct, interpolation=interpolation, mean=mean, std=std)
    for i, (w, h) in enumerate([(8, 8), (33, 47), (300, 200), (200, 300), (81, 65), (80, 64)]):
        image = noise_image(w, h, seed=i)
        np.testing.assert_array_equal(pre(image), reference(image, (64, 80), crop_pct, interpolation, mean, std))


def test_interpolation_names_are_torchvisions():
    assert set(INTERPOLATIONS) == {mode.value for mode in InterpolationMode}
    assert {k: int(v) for k, v in INTERPOLATIONS.items()} == {
        mode.value: F.pil_modes_mapping[mode] for mode in InterpolationMode}


def test_build_transforms_eval_is_eval_preprocess_as_a_tensor():
    meta = SimpleNamespace(input_size=(3, 224, 224), mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4),
                           crop_pct=0.9, interpolation="bicubic")
    transform = build_transforms(meta, train=False, image_size=128)
    pre = eval_preprocess(meta, image_size=128)
    assert (pre.size, pre.crop_pct, pre.interpolation) == ((128, 128), 0.9, "bicubic")
    image = noise_image(300, 200)
    out = transform(image)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (3, 128, 128)
    np.testing.assert_array_equal(out.numpy(), pre(image))
    np.testing.assert_array_equal(out.numpy(), reference(image, (128, 128), 0.9, "bicubic", meta.mean, meta.std))


def test_meta_mappings_and_explicit_arguments():
    meta = {"input_size": (3, 48, 40), "mean": (0.1, 0.2, 0.3), "std": (1, 1, 1), "interpolation": "nearest"}
    pre = eval_preprocess(meta, std=(0.5, 0.5, 0.5), crop_pct=1)
    assert (pre.size, pre.mean, pre.std, pre.crop_pct, pre.interpolation) == (
        (48, 40), (0.1, 0.2, 0.3), (0.5, 0.5, 0.5), 1.0, "nearest")
    assert eval_preprocess(32).size == (32, 32)
    assert eval_preprocess([3, 20, 30]).size == (20, 30)
    assert "EvalPreprocess(size=(48, 40), crop_pct=1.0, interpolation='nearest'" in repr(pre)


def test_pickles_for_dataloader_workers():
    pre = eval_preprocess(16, interpolation="bicubic")
    copy = pickle.loads(pickle.dumps(pre))
    image = noise_image(20, 30)
    np.testing.assert_array_equal(copy(image), pre(image))
    assert pickle.loads(pickle.dumps(build_transforms(16, train=False)))(image).shape == (3, 16, 16)


def test_bad_arguments_are_named():
    with pytest.raises(InputTypeError, match="meta_or_size"):
        eval_preprocess("224")
    with pytest.raises(InputTypeError, match="meta_or_size: expected a model meta with input_size"):
        eval_preprocess(SimpleNamespace(mean=(0, 0, 0)))
    with pytest.raises(InputError, match="meta_or_size: expected positive sizes"):
        eval_preprocess((0, 32))
    with pytest.raises(InputTypeError, match="image_size"):
        eval_preprocess(32, image_size=(3, 32.0, 32))
    with pytest.raises(InputTypeError, match="size"):
        EvalPreprocess(True)
    with pytest.raises(InputError, match="crop_pct: expected a fraction in \\(0, 1\\], got 0.0"):
        eval_preprocess(32, crop_pct=0)
    with pytest.raises(InputError, match="crop_pct"):
        EvalPreprocess(32, crop_pct=1.5)
    with pytest.raises(InputTypeError, match="crop_pct: expected a number"):
        eval_preprocess(32, crop_pct="big")
    with pytest.raises(InputError, match="interpolation: expected one of .*'nearest-exact'.*'lanczos'.*got 'lanczos3'"):
        eval_preprocess(32, interpolation="lanczos3")
    with pytest.raises(InputError, match="interpolation"):
        EvalPreprocess(32, interpolation=InterpolationMode.BILINEAR)
    with pytest.raises(InputError, match="std: expected positive values"):
        eval_preprocess(32, (0, 0, 0), (1, 0, 1))
    with pytest.raises(InputError, match="mean: expected 3 finite numbers"):
        eval_preprocess(32, (0, 0), (1, 1, 1))
    with pytest.raises(InputError, match="std: expected 3 finite numbers"):
        eval_preprocess(32, std=(1, float("nan"), 1))
    with pytest.raises(InputTypeError, match="mean: expected 3 numbers"):
        eval_preprocess(32, mean=0.5)


def test_bad_images_are_named():
    pre = eval_preprocess(16)
    with pytest.raises(InputTypeError, match="image: expected a PIL image, got ndarray"):
        pre(np.zeros((16, 16, 3), dtype=np.uint8))
    for mode in ("L", "RGBA", "YCbCr"):
        with pytest.raises(InputError, match=f"image: expected mode 'RGB'.*got mode '{mode}'"):
            pre(Image.new(mode, (16, 16)))


def test_importing_does_not_import_torch():
    code = ("import sys, dfsnet.preprocess; "
            "print(sorted({'torch', 'torchvision', 'sklearn', 'scipy'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
