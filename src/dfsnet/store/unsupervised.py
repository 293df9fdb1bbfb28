"""Indexing without labels: a pretrained backbone's pooled features and an encoder fitted on the
collection itself.

An unsupervised index stores its network as a *backbone checkpoint*: the backbone's weights in
safetensors with its :class:`~dfsnet.models.ModelMeta` as JSON in the header (format
``dfsnet.backbone``), no classifier. :func:`load_index_model` rebuilds either kind of
``model.safetensors`` (a ``dfsnet.checkpoint`` DFSNet, or a backbone) without running code from
the file. The features are L2-normalised, so Euclidean re-ranking and the cosine check of
near-duplicates order images the same way. This module imports torch: import it inside functions.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn.functional as F
from torch import nn

from dfsnet import __version__
from dfsnet._io import atomic_write_bytes
from dfsnet.errors import InputError

__all__ = ["BACKBONE_FORMAT", "PooledBackbone", "save_backbone", "model_file_kind", "read_backbone_meta",
           "load_index_model", "pretrained_model", "fit_unsupervised_encoder", "DEFAULT_UNSUPERVISED_BITS"]

logger = logging.getLogger(__name__)

BACKBONE_FORMAT = "dfsnet.backbone"
_BACKBONE_VERSION = 1
_HEADER_KEY = "dfsnet"
DEFAULT_UNSUPERVISED_BITS = 64


class PooledBackbone(nn.Module):
    """A backbone followed by global average pooling and L2 normalisation: features without training.

    Parameters
    ----------
    backbone : dfsnet.models.Backbone

    Attributes
    ----------
    meta : dfsnet.models.ModelMeta
        The backbone's input conventions; ``feature_dim`` is the feature width.
    """

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.meta = backbone.meta

    def features(self, x):
        """Unit-length pooled features.

        Parameters
        ----------
        x : torch.Tensor, float, shape (N, 3, H, W)
            Images normalised with ``meta.mean`` / ``meta.std``.

        Returns
        -------
        torch.Tensor, float, shape (N, meta.feature_dim)
        """
        return F.normalize(self.pool(self.backbone(x)).flatten(1).float(), dim=1)

    forward = features


def save_backbone(model: PooledBackbone, path: str | os.PathLike) -> Path:
    """Write a backbone checkpoint (weights + meta, one safetensors file, atomically).

    The bytes depend only on the weights and the meta, so equal models hash equal.
    """
    from safetensors.torch import save

    header = {"format": BACKBONE_FORMAT, "format_version": _BACKBONE_VERSION, "dfsnet_version": __version__,
              "meta": model.meta.to_dict()}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.backbone.state_dict().items()}
    path = Path(path)
    atomic_write_bytes(path, save(tensors, metadata={_HEADER_KEY: json.dumps(header, sort_keys=True)}))
    return path


def _header(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise FileNotFoundError(f"path: no such checkpoint file: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = fh.metadata() or {}
        return json.loads(metadata.get(_HEADER_KEY, "{}"))
    except (SafetensorError, OSError, json.JSONDecodeError) as exc:
        raise InputError(f"path: {path} is not a readable safetensors checkpoint ({exc})") from None


def model_file_kind(path: str | os.PathLike) -> str:
    """``"backbone"`` for a backbone checkpoint, ``"dfsnet"`` for anything else (a DFSNet checkpoint,
    or a file :func:`dfsnet.models.load_checkpoint` will refuse with its own message)."""
    header = _header(Path(path))
    return "backbone" if isinstance(header, dict) and header.get("format") == BACKBONE_FORMAT else "dfsnet"


def read_backbone_meta(path: str | os.PathLike):
    """The :class:`~dfsnet.models.ModelMeta` of a backbone checkpoint, without loading its weights."""
    from dfsnet.models import ModelMeta

    path = Path(path)
    header = _header(path)
    if header.get("format") != BACKBONE_FORMAT:
        raise InputError(f"path: {path} is not a dfsnet backbone checkpoint")
    if header.get("format_version") != _BACKBONE_VERSION:
        raise InputError(f"path: {path} has backbone format version {header.get('format_version')!r}; this "
                         f"dfsnet ({__version__}) reads version {_BACKBONE_VERSION}")
    try:
        return ModelMeta.from_dict(header["meta"])
    except (KeyError, TypeError) as exc:
        raise InputError(f"path: {path} has a malformed backbone header ({exc})") from None


def load_index_model(path: str | os.PathLike, *, map_location="cpu"):
    """The network of an index's ``model.safetensors``, in eval mode: a DFSNet, or a :class:`PooledBackbone`.

    Returns
    -------
    model : torch.nn.Module
        With ``features(x float (N, 3, H, W)) -> float (N, D)`` and ``meta``.
    extra : dict
        The DFSNet checkpoint's ``extra`` ({} for a backbone).
    """
    from dfsnet.models import load_checkpoint

    path = Path(path)
    if model_file_kind(path) == "dfsnet":
        return load_checkpoint(path, map_location=map_location)
    import timm
    from safetensors.torch import load_file

    from dfsnet.models.backbones import Backbone, state_dict_mismatch

    meta = read_backbone_meta(path)
    # The meta already holds what create_backbone would probe (the feature width) with a forward pass.
    backbone = Backbone(timm.create_model(meta.timm_name, pretrained=False, num_classes=0,
                                          in_chans=meta.input_size[0]), meta)
    state = load_file(str(path), device="cpu")
    mismatch = state_dict_mismatch(backbone.state_dict(), state)
    if mismatch:
        raise InputError(f"path: the weights in {path} do not fit the {meta.timm_name} backbone its meta "
                         f"describes (saved with another timm version?): {mismatch}")
    backbone.load_state_dict(state, strict=True)
    return PooledBackbone(backbone).to(map_location).eval(), {}


def pretrained_model(backbone: str, weights=None) -> PooledBackbone:
    """A :class:`PooledBackbone` on ``backbone``'s pretrained weights (or the local file ``weights``).

    EfficientNet-Lite0's ImageNet weights ship in a package (offline); other timm models need
    their weights in timm's cache, the network, or ``weights``.
    """
    from dfsnet.models import create_backbone

    return PooledBackbone(create_backbone(backbone, pretrained=weights is None, weights=weights)).eval()


def fit_unsupervised_encoder(features: np.ndarray, *, n_bits: int, sample: int, seed: int = 0):
    """An ITQ encoder fitted on (a random sample of) a collection's own features, without labels.

    Parameters
    ----------
    features : ndarray of float32, shape (n, D)
    n_bits : int
        At most ``min(n, D)``.
    sample : int
        Rows drawn (without replacement, seeded) when ``n`` is larger.
    seed : int

    Returns
    -------
    dfsnet.hashing.Encoder
        Fitted; ``transform(X float (m, D)) -> uint8 (m, ceil(n_bits / 8))``.
    """
    from dfsnet.hashing import make_encoder

    n, dim = features.shape
    if n_bits > min(n, dim):
        raise InputError(f"bits: ITQ makes at most min(images, feature width) = min({n}, {dim}) bits, "
                         f"{n_bits} were requested")
    rows = features
    if n > sample:
        rows = features[np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))]
    encoder = make_encoder(selector=None, hasher="itq", n_bits=n_bits, random_state=seed).fit(rows)
    logger.info("fitted a %d-bit ITQ encoder on %d of %d images (no labels)", n_bits, rows.shape[0], n)
    return encoder
