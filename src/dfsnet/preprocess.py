"""The evaluation image preprocessing, in numpy and PIL only.

Query-time search imports this instead of torchvision (start-up time); training and
evaluation reach the same code through :func:`dfsnet.data.transforms.build_transforms`, so a
query is preprocessed exactly as the indexed images were.

The pipeline reproduces torchvision's ``Resize(shorter) -> CenterCrop(size) -> ToTensor ->
Normalize(mean, std)`` on PIL images bit for bit: resize so the shorter side is
``size / crop_pct`` (timm's convention, ``crop_pct`` 0.875 by default), or ``size`` for images
whose shorter side is already at most ``size`` (e.g. 32 px CIFAR-10 or 8 px digits upsampled
to a model's input), so the crop keeps the whole (square) image rather than cutting away its
border; take the centre crop, zero-padded where the image is smaller than the crop; scale to
[0, 1] and normalise per channel.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
from PIL import Image

from dfsnet.errors import InputError, InputTypeError

__all__ = ["DEFAULT_CROP_PCT", "IMAGENET_MEAN", "IMAGENET_STD", "INTERPOLATIONS", "EvalPreprocess",
           "eval_preprocess"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP_PCT = 0.875
# torchvision's InterpolationMode values, mapped to PIL filters as torchvision's
# ``pil_modes_mapping`` does (PIL has no nearest-exact: its NEAREST already samples pixel centres).
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}


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


def _as_crop_pct(value) -> float:
    try:
        crop_pct = float(value)
    except (TypeError, ValueError):
        raise InputTypeError(f"crop_pct: expected a number, got {value!r}") from None
    if not 0 < crop_pct <= 1:
        raise InputError(f"crop_pct: expected a fraction in (0, 1], got {crop_pct}")
    return crop_pct


def _as_interpolation(value) -> str:
    if not isinstance(value, str) or value not in INTERPOLATIONS:
        raise InputError(f"interpolation: expected one of {list(INTERPOLATIONS)}, got {value!r}")
    return value


class _Options(NamedTuple):
    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float
    interpolation: str


def _resolve_options(meta_or_size, mean=None, std=None, *, image_size=None, crop_pct=None,
                     interpolation=None) -> _Options:
    """The validated settings of :func:`eval_preprocess` (also used for training transforms).

    Arguments left None take the meta's value, else the default; see :func:`eval_preprocess`.
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
    return _Options(
        size=_as_hw(image_size if image_size is not None else input_size,
                    "image_size" if image_size is not None else "meta_or_size"),
        mean=_as_stats(IMAGENET_MEAN if mean is None else mean, "mean", positive=False),
        std=_as_stats(IMAGENET_STD if std is None else std, "std", positive=True),
        crop_pct=_as_crop_pct(DEFAULT_CROP_PCT if crop_pct is None else crop_pct),
        interpolation=_as_interpolation(interpolation or "bilinear"),
    )


class EvalPreprocess:
    """Deterministic evaluation preprocessing: RGB PIL image -> normalised float32 array.

    Reproduces torchvision's ``F.resize(image, shorter)``, ``CenterCrop(size)``, ``ToTensor``
    and ``Normalize(mean, std)`` on PIL images (see the module docstring). A class rather than
    a closure so that DataLoader workers can pickle it.

    Parameters
    ----------
    size : int or tuple
        Output size: an int, (H, W) or (3, H, W).
    crop_pct : float
        Centre-crop fraction in (0, 1] for images larger than ``size``.
    interpolation : str
        A torchvision ``InterpolationMode`` value, one of :data:`INTERPOLATIONS`.
    mean, std : sequence of 3 floats
        Per-channel normalisation of the [0, 1] pixel values; ``std`` positive.

    Attributes
    ----------
    size : tuple of int
        (H, W).
    crop_pct : float
    interpolation : str
    mean, std : tuple of 3 floats
    """

    def __init__(self, size, *, crop_pct: float = DEFAULT_CROP_PCT, interpolation: str = "bilinear",
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.size = _as_hw(size, "size")
        self.crop_pct = _as_crop_pct(crop_pct)
        self.interpolation = _as_interpolation(interpolation)
        self.mean = _as_stats(mean, "mean", positive=False)
        self.std = _as_stats(std, "std", positive=True)

    def _resize(self, image: Image.Image) -> Image.Image:
        # torchvision's F.resize(image, shorter): the longer side is truncated, not rounded,
        # and an image already at the output size is returned as it is.
        target = min(self.size)
        shorter = target if min(image.size) <= target else math.floor(target / self.crop_pct + 0.5)
        w, h = image.size
        if w <= h:
            out_w, out_h = shorter, int(shorter * h / w)
        else:
            out_w, out_h = int(shorter * w / h), shorter
        if (out_w, out_h) == (w, h):
            return image
        return image.resize((out_w, out_h), INTERPOLATIONS[self.interpolation])

    def _center_crop(self, pixels: np.ndarray) -> np.ndarray:
        # torchvision's F.center_crop: zero-pad a side shorter than the crop (the extra pixel of
        # an odd difference goes right / bottom), then offset by round() (half to even).
        crop_h, crop_w = self.size
        h, w = pixels.shape[:2]
        if crop_h > h or crop_w > w:
            pad_h, pad_w = max(crop_h - h, 0), max(crop_w - w, 0)
            pixels = np.pad(pixels, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)))
            h, w = pixels.shape[:2]
        top, left = int(round((h - crop_h) / 2.0)), int(round((w - crop_w) / 2.0))
        return pixels[top:top + crop_h, left:left + crop_w]

    def __call__(self, image: Image.Image) -> np.ndarray:
        """Preprocess one image: :meth:`normalize` of :meth:`pixels`.

        Parameters
        ----------
        image : PIL.Image.Image
            Mode "RGB", any size (as :func:`dfsnet.images.open_image` returns).

        Returns
        -------
        numpy.ndarray
            float32, shape (3, H, W), C-contiguous: ``(pixel / 255 - mean) / std``.

        Raises
        ------
        InputTypeError
            ``image`` is not a PIL image.
        InputError
            ``image`` is not in mode "RGB".
        """
        return self.normalize(self.pixels(image))

    def pixels(self, image: Image.Image) -> np.ndarray:
        """The resized and cropped image before normalisation: uint8, shape (3, H, W), C-contiguous.

        What a pixel cache stores (:mod:`dfsnet.features.pixels`); raises as :meth:`__call__`.
        """
        if not isinstance(image, Image.Image):
            raise InputTypeError(f"image: expected a PIL image, got {type(image).__name__}")
        if image.mode != "RGB":
            # torchvision would fail on 1 or 4 channels, or read YCbCr / HSV / LAB as RGB.
            raise InputError(f"image: expected mode 'RGB' (convert it, or decode with "
                             f"dfsnet.images.open_image), got mode {image.mode!r}")
        pixels = self._center_crop(np.asarray(self._resize(image)))  # uint8 (H, W, 3)
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """``(pixels / 255 - mean) / std`` of uint8 ``pixels``, shape (3, H, W) or a batch (n, 3, H, W).

        Returns float32 of the same shape, C-contiguous. Element-wise, so a batch gives each
        image's :meth:`__call__` result bit for bit.
        """
        # The same float32 operations as ToTensor (true division by 255) and Normalize, so the
        # result matches torchvision's bit for bit.
        x = np.asarray(pixels, dtype=np.float32) / np.float32(255)
        x -= np.asarray(self.mean, dtype=np.float32).reshape(3, 1, 1)
        x /= np.asarray(self.std, dtype=np.float32).reshape(3, 1, 1)
        return x

    def __repr__(self) -> str:
        return (f"EvalPreprocess(size={self.size}, crop_pct={self.crop_pct}, "
                f"interpolation={self.interpolation!r}, mean={self.mean}, std={self.std})")


def eval_preprocess(meta_or_size, mean=None, std=None, *, image_size=None, crop_pct: float | None = None,
                    interpolation: str | None = None) -> EvalPreprocess:
    """The evaluation preprocessing for a model, from its meta or an output size.

    Parameters
    ----------
    meta_or_size : ModelMeta-like, mapping, int or tuple
        A model's meta (``input_size`` (3, H, W), ``mean``, ``std``, optionally ``crop_pct`` and
        ``interpolation``, as attributes or keys), or the output size as an int, (H, W) or
        (3, H, W).
    mean, std : sequence of 3 floats, optional
        Per-channel normalisation; default: the meta's, else ImageNet's.
    image_size : int or tuple, optional
        Output size overriding the meta's ``input_size`` (e.g. 128 px on CPU for a 224 px model).
    crop_pct : float, optional
        Centre-crop fraction in (0, 1]; default: the meta's, else 0.875.
    interpolation : {"bilinear", "bicubic", "nearest", "lanczos", ...}, optional
        A torchvision ``InterpolationMode`` value; default: the meta's, else "bilinear".

    Returns
    -------
    EvalPreprocess
        RGB PIL image -> float32 array of shape (3, H, W).

    Raises
    ------
    InputTypeError
        ``meta_or_size`` is neither a meta with ``input_size`` nor a size, or a size, statistic
        or ``crop_pct`` of the wrong type.
    InputError
        Non-positive sizes, statistics that are not 3 finite numbers (``std`` not positive),
        ``crop_pct`` outside (0, 1], or an unknown interpolation.
    """
    options = _resolve_options(meta_or_size, mean, std, image_size=image_size, crop_pct=crop_pct,
                               interpolation=interpolation)
    return EvalPreprocess(options.size, crop_pct=options.crop_pct, interpolation=options.interpolation,
                          mean=options.mean, std=options.std)
