"""DFS-Net checkpoints: safetensors weights with the model's meta as JSON in the header.

A checkpoint rebuilds its architecture from the meta alone (random init, no network), then
loads the weights strictly, so it never executes code from the file.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfsnet import __version__
from dfsnet._io import atomic_write_bytes, checkpoint_hash
from dfsnet.errors import InputError, InputTypeError
from dfsnet.models.backbones import BACKBONE_ALIASES, create_backbone, state_dict_mismatch
from dfsnet.models.network import DFSNet, DFSNetMeta

__all__ = ["FORMAT", "FORMAT_VERSION", "checkpoint_hash", "load_checkpoint", "save_checkpoint"]

logger = logging.getLogger(__name__)

FORMAT = "dfsnet.checkpoint"
# The conventional file name of a checkpoint: `dfsnet train`'s output and an index's model copy.
MODEL_FILE = "model.safetensors"
FORMAT_VERSION = 1
_HEADER_KEY = "dfsnet"
_EXPECT_KEYS = ("backbone", "num_classes", "dfs")


def save_checkpoint(model: DFSNet, path: str | os.PathLike, *, extra: Mapping[str, Any] | None = None) -> Path:
    """Write a model's weights and meta to one safetensors file, atomically.

    Parameters
    ----------
    model : DFSNet
        Also accepted inside ``DataParallel`` / ``DistributedDataParallel``.
    path : path-like
        Destination; parent folders are created.
    extra : mapping or None
        JSON-serialisable information stored beside the meta (epoch, accuracy, split name...),
        returned by :func:`load_checkpoint`. NaN and infinities survive (Python's JSON dialect).

    Returns
    -------
    pathlib.Path
    """
    from safetensors.torch import save

    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    if not isinstance(model, DFSNet):
        raise InputTypeError(f"model: expected a DFSNet, got {type(model).__name__}")
    if extra is not None and not isinstance(extra, Mapping):
        raise InputTypeError(f"extra: expected a mapping or None, got {type(extra).__name__}")
    # One metadata entry: safetensors writes its metadata map in arbitrary order, so several
    # entries would make the bytes (and checkpoint_hash) of identical models differ.
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dfsnet_version": __version__,
        "meta": model.meta.to_dict(),
        "extra": dict(extra or {}),
    }
    try:
        metadata = {_HEADER_KEY: json.dumps(header, sort_keys=True)}
    except (TypeError, ValueError) as exc:
        raise InputTypeError(f"extra: expected JSON-serialisable values ({exc})") from None
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    path = Path(path)
    atomic_write_bytes(path, save(tensors, metadata=metadata))
    logger.info("saved checkpoint %s (%d tensors)", path, len(tensors))
    return path


def read_checkpoint_meta(path: str | os.PathLike) -> tuple[DFSNetMeta, dict[str, Any]]:
    """Read a checkpoint's meta and extra without loading its weights.

    Returns
    -------
    (DFSNetMeta, dict)
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no such checkpoint file: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = fh.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise InputError(f"path: {path} is not a readable safetensors checkpoint ({exc})") from None
    try:
        header = json.loads(metadata[_HEADER_KEY])
        found_format = header.get("format")
    except (KeyError, json.JSONDecodeError, AttributeError):
        header, found_format = {}, None
    if found_format != FORMAT:
        raise InputError(f"path: {path} is a safetensors file but not a dfsnet checkpoint "
                         f"(no {FORMAT!r} header in its metadata)")
    version = header.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise InputError(f"path: {path} has checkpoint format version {version!r}; this dfsnet "
                         f"({__version__}) reads versions up to {FORMAT_VERSION}")
    try:
        meta = DFSNetMeta.from_dict(header["meta"])
        extra = dict(header["extra"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"path: {path} has a malformed dfsnet header ({type(exc).__name__}: {exc})") from None
    return meta, extra


def load_checkpoint(
    path: str | os.PathLike,
    *,
    map_location: str | torch.device = "cpu",
    expect: Mapping[str, Any] | None = None,
) -> tuple[DFSNet, dict[str, Any]]:
    """Rebuild a DFSNet from a checkpoint written by :func:`save_checkpoint`.

    Parameters
    ----------
    path : path-like
    map_location : str or torch.device
        Device the model is moved to.
    expect : mapping or None
        What the caller needs, any of ``backbone`` (alias or timm name), ``num_classes`` and
        ``dfs``; a checkpoint made for something else is refused, naming both.

    Returns
    -------
    model : DFSNet
        In eval mode, on ``map_location``.
    extra : dict
        The ``extra`` given to :func:`save_checkpoint`.

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    ValueError
        Not a dfsnet safetensors checkpoint (or truncated), a mismatch with ``expect``, or
        weights that do not fit the architecture in its meta.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta, extra = read_checkpoint_meta(path)
    if expect is not None:
        _check_expected(meta, expect, path)
    backbone = create_backbone(meta.backbone.timm_name, pretrained=False, in_chans=meta.input_size[0])
    backbone.meta = meta.backbone  # keep the recorded name, input conventions and weight source
    model = DFSNet(backbone, meta.num_classes, dfs=meta.dfs, dropout=meta.dropout,
                   class_names=meta.class_names, reduce_channels=meta.reduce_channels)
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise InputError(f"path: {path} is not a readable safetensors checkpoint ({exc})") from None
    mismatch = state_dict_mismatch(model.state_dict(), state)
    if mismatch:
        raise InputError(f"path: the weights in {path} do not fit the {meta.timm_name} DFSNet its meta "
                         f"describes (saved with another timm version?): {mismatch}")
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval(), extra


def _check_expected(meta: DFSNetMeta, expect: Mapping[str, Any], path: str | os.PathLike) -> None:
    unknown = sorted(set(expect) - set(_EXPECT_KEYS))
    if unknown:
        raise InputError(f"expect: unknown keys {unknown}; expected any of {list(_EXPECT_KEYS)}")
    found = {"backbone": meta.name, "num_classes": meta.num_classes, "dfs": meta.dfs}
    mismatched = []
    if "backbone" in expect:
        want = expect["backbone"]
        if BACKBONE_ALIASES.get(want, want) not in (meta.name, meta.timm_name):
            mismatched.append("backbone")
    mismatched += [k for k in ("num_classes", "dfs") if k in expect and expect[k] != found[k]]
    if mismatched:
        made = ", ".join(f"{k}={found[k]!r}" for k in _EXPECT_KEYS if k in expect)
        wanted = ", ".join(f"{k}={expect[k]!r}" for k in _EXPECT_KEYS if k in expect)
        raise InputError(f"path: checkpoint {path} was made for {made} ({meta.timm_name}), "
                         f"but {wanted} is expected")
