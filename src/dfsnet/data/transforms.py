"""Image transforms for training and evaluation, sized and normalised for a model.

Evaluation (deterministic): :class:`dfsnet.preprocess.EvalPreprocess` (resize for a
``crop_pct`` centre crop, scale and normalise; numpy and PIL only, so that query-time search
shares it without importing torch), then conversion of its array to a tensor.

Training (standard augmentation): ``RandomResizedCrop(size, scale=(0.5, 1.0), ratio=(3/4, 4/3))``
and ``RandomHorizontalFlip``, then ``ToTensor`` and ``Normalize``. The scale range is narrower
than ImageNet's (0.08, 1.0) because small images (32 px) carry little content to crop from and
the fine-tuning runs are short.
"""
from __future__ import annotations

import numpy as np
import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from dfsnet.preprocess import IMAGENET_MEAN, IMAGENET_STD, EvalPreprocess, _resolve_options

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "TRAIN_SCALE", "build_transforms"]

TRAIN_SCALE = (0.5, 1.0)
TRAIN_RATIO = (3 / 4, 4 / 3)


class FromNumpy:
    """numpy array -> torch tensor sharing its memory (a class so that DataLoader workers can pickle it)."""

    def __call__(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array)

    def __repr__(self) -> str:
        return "FromNumpy()"


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
        Output: float32 tensor of shape (3, H, W). For evaluation, ``[EvalPreprocess, FromNumpy]``
        (the same preprocessing as :func:`dfsnet.preprocess.eval_preprocess`).
    """
    options = _resolve_options(meta_or_size, mean, std, image_size=image_size, crop_pct=crop_pct,
                               interpolation=interpolation)
    if not train:
        return T.Compose([EvalPreprocess(options.size, crop_pct=options.crop_pct,
                                         interpolation=options.interpolation, mean=options.mean, std=options.std),
                          FromNumpy()])
    return T.Compose([
        T.RandomResizedCrop(options.size, scale=TRAIN_SCALE, ratio=TRAIN_RATIO,
                            interpolation=InterpolationMode(options.interpolation)),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(options.mean, options.std),
    ])
