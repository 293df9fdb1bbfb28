"""Image transforms for training and evaluation, sized and normalised for a model.

Evaluation (deterministic): resize so the shorter side is ``size / crop_pct`` (timm's
convention, ``crop_pct`` 0.875 by default) and take the centre ``size`` crop. Images whose
shorter side is already at most ``size`` (e.g. 32 px CIFAR-10 or 8 px digits upsampled to a
model's input) are resized so the shorter side equals ``size`` instead, so the crop keeps the
whole (square) image rather than cutting away its border. Then ``ToTensor`` and ``Normalize``.

Training (standard augmentation): ``RandomResizedCrop(size, scale=(0.5, 1.0), ratio=(3/4, 4/3))``
and ``RandomHorizontalFlip``, then ``ToTensor`` and ``Normalize``. The scale range is narrower
than ImageNet's (0.08, 1.0) because small images (32 px) carry little content to crop from and
the fine-tuning runs are short.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from dfsnet.errors import InputError, InputTypeError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "TRAIN_SCALE", "build_transforms"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP_PCT = 0.875
TRAIN_SCALE = (0.5, 1.0)
TRAIN_RATIO = (3 / 4, 4 / 3)
_INTERPOLATIONS = {mode.value: mode for mode in InterpolationMode}


def _meta_get(meta, key: str):
    if isinstance(meta, Mapping):
        return meta.get(key)
    return getattr(meta, key, None)


def _as_hw(value, name: str) -> tuple[int, int]:
    def is_int(v):
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    if is_int(value):
        hw = (int(value), int(value))
    elif isinstance(value, (tuple, list)) and len(value) in (2, 3) and all(is_int(v) for v in value):
        hw = (int(value[-2]), int(value[-1]))
    else:
        raise InputTypeError(f"{name}: expected an int or (H, W) / (3, H, W), got {value!r}")
    if min(hw) < 1:
        raise InputError(f"{name}: expected positive sizes, got {value!r}")
    return hw


def _as_stats(value, name: str, *, positive: bool) -> tuple[float, float, float]:
    try:
        stats = tuple(float(v) for v in value)
    except TypeError:
        raise InputTypeError(f"{name}: expected 3 numbers (one per RGB channel), got {value!r}") from None
    if len(stats) != 3 or not all(math.isfinite(v) for v in stats):
        raise InputError(f"{name}: expected 3 finite numbers (one per RGB channel), got {value!r}")
    if positive and min(stats) <= 0:
        raise InputError(f"{name}: expected positive values, got {value!r}")
    return stats


class ResizeForCrop:
    """Resize the shorter side to ``min(size) / crop_pct``, or to ``min(size)`` for small images.

    A class rather than a lambda so that DataLoader workers can pickle it.
    """

    def __init__(self, size: tuple[int, int], crop_pct: float, interpolation: InterpolationMode):
        self.size = size
        self.crop_pct = crop_pct
        self.interpolation = interpolation

    def __call__(self, image: Image.Image) -> Image.Image:
        target = min(self.size)
        shorter = target if min(image.size) <= target else math.floor(target / self.crop_pct + 0.5)
        return F.resize(image, shorter, interpolation=self.interpolation)

    def __repr__(self) -> str:
        return (f"ResizeForCrop(size={self.size}, crop_pct={self.crop_pct}, "
                f"interpolation={self.interpolation.value})")


def build_transforms(meta_or_size, mean=None, std=None, *, train: bool, image_size=None,
                     crop_pct: float | None = None, interpolation: str | None = None) -> T.Compose:
    """Transform from an RGB PIL image to a normalised float32 tensor (3, H, W).

    Parameters
    ----------
    meta_or_size : ModelMeta-like, mapping, int or tuple
        A model's meta (``input_size`` (3, H, W), ``mean``, ``std``, optionally ``crop_pct`` and
        ``interpolation``, as attributes or keys), or the output size as an int, (H, W) or
        (3, H, W).
    mean, std : sequence of 3 floats, optional
        Per-channel normalisation; default: the meta's, else ImageNet's.
    train : bool
        Training augmentation (random resized crop and flip) instead of the evaluation pipeline.
    image_size : int or tuple, optional
        Output size overriding the meta's ``input_size`` (e.g. 128 px on CPU for a 224 px model).
    crop_pct : float, optional
        Evaluation centre-crop fraction in (0, 1]; default: the meta's, else 0.875.
    interpolation : {"bilinear", "bicubic", "nearest", "lanczos", ...}, optional
        A torchvision ``InterpolationMode`` value; default: the meta's, else "bilinear".

    Returns
    -------
    torchvision.transforms.Compose
        Output: float32 tensor of shape (3, H, W).
    """
    is_meta = not isinstance(meta_or_size, (numbers.Integral, tuple, list))
    if is_meta:
        input_size = _meta_get(meta_or_size, "input_size")
        if input_size is None:
            raise InputTypeError(f"meta_or_size: expected a model meta with input_size, an int or a tuple, "
                            f"got {type(meta_or_size).__name__}")
        mean = _meta_get(meta_or_size, "mean") if mean is None else mean
        std = _meta_get(meta_or_size, "std") if std is None else std
        crop_pct = _meta_get(meta_or_size, "crop_pct") if crop_pct is None else crop_pct
        interpolation = _meta_get(meta_or_size, "interpolation") if interpolation is None else interpolation
    else:
        input_size = meta_or_size
    size = _as_hw(image_size if image_size is not None else input_size,
                  "image_size" if image_size is not None else "meta_or_size")
    mean = _as_stats(IMAGENET_MEAN if mean is None else mean, "mean", positive=False)
    std = _as_stats(IMAGENET_STD if std is None else std, "std", positive=True)
    crop_pct = DEFAULT_CROP_PCT if crop_pct is None else float(crop_pct)
    if not 0 < crop_pct <= 1:
        raise InputError(f"crop_pct: expected a fraction in (0, 1], got {crop_pct}")
    interpolation = interpolation or "bilinear"
    if interpolation not in _INTERPOLATIONS:
        raise InputError(f"interpolation: expected one of {list(_INTERPOLATIONS)}, got {interpolation!r}")
    mode = _INTERPOLATIONS[interpolation]
    if train:
        geometry = [T.RandomResizedCrop(size, scale=TRAIN_SCALE, ratio=TRAIN_RATIO, interpolation=mode),
                    T.RandomHorizontalFlip()]
    else:
        geometry = [ResizeForCrop(size, crop_pct, mode), T.CenterCrop(size)]
    return T.Compose([*geometry, T.ToTensor(), T.Normalize(mean, std)])
