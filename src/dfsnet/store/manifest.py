"""The index folder's layout and its commit point, ``manifest.json``.

Index folder layout (format version 1)::

    manifest.json               the commit point: readers follow only what it names
    model.safetensors           copy of the checkpoint (the index is self-contained)
    encoder.npz                 the fitted selector + hasher (dfsnet.hashing.Encoder)
    codes.<gen>.hidx            HammingIndex of generation <gen>, ids 0..count-1
    metadata.<gen>.sqlite       one row per indexed image: id, path, sha256, size, mtime, label
    features.<gen>.npy          float32 features of the images added in generation <gen>
                                (only with store_features; chunks accumulate across generations)
"""
from __future__ import annotations

import datetime
import json
import re
from pathlib import Path
from typing import Any

from dfsnet import __version__
from dfsnet._io import atomic_write_text
from dfsnet.errors import InputError

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "MODEL_FILE", "ENCODER_FILE", "read_manifest",
           "write_manifest", "generation_file", "referenced_files", "encoder_params", "check_compatible"]

FORMAT = "dfsnet.index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
ENCODER_FILE = "encoder.npz"
# Files the store creates and may delete when no manifest names them.
OWNED = re.compile(r"^(codes\.\d+\.hidx|metadata\.\d+\.sqlite(-journal|-wal|-shm)?|features\.\d+\.npy"
                   r"|\..+\.tmp(-journal)?)$")
_EXTENSIONS = {"codes": "hidx", "metadata": "sqlite", "features": "npy"}


def now() -> str:
    """The current UTC time, ISO 8601 to the second (the manifest's timestamps)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def generation_file(kind: str, generation: int) -> str:
    """The file name of ``kind`` ("codes", "metadata" or "features") in ``generation``."""
    return f"{kind}.{generation:06d}.{_EXTENSIONS[kind]}"


def referenced_files(manifest: dict[str, Any]) -> list[str]:
    """Every file a manifest names besides itself: model, encoder, codes, metadata, feature chunks."""
    files = manifest["files"]
    return [MODEL_FILE, ENCODER_FILE, files["codes"], files["metadata"],
            *(c["file"] for c in files["features"] or [])]


def read_manifest(index_dir) -> dict[str, Any]:
    """The manifest of the index at ``index_dir``.

    Raises
    ------
    FileNotFoundError
        No folder, or no manifest in it.
    InputError
        Not valid JSON, not a dfsnet index, or another format version.
    """
    index_dir = Path(index_dir).expanduser()
    path = index_dir / MANIFEST
    if not index_dir.is_dir():
        raise FileNotFoundError(f"index_dir: no such folder: {index_dir}")
    if not path.is_file():
        raise FileNotFoundError(
            f"index_dir: {index_dir} is not a dfsnet index (no {MANIFEST}); create one with "
            "`dfsnet index build` or ImageIndex.build()")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"index_dir: {path} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(f"index_dir: {path} is not a dfsnet index manifest (format "
                         f"{manifest.get('format') if isinstance(manifest, dict) else None!r}, expected {FORMAT!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise InputError(f"index_dir: {index_dir} has index format version {version!r}; this dfsnet "
                         f"({__version__}) reads version {FORMAT_VERSION}")
    return manifest


def write_manifest(index_dir: Path, manifest: dict[str, Any]) -> None:
    """Replace the manifest atomically: the commit point of a new generation."""
    atomic_write_text(index_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def encoder_params(encoder) -> dict[str, Any]:
    """A JSON-ready description of a fitted encoder's steps, for the manifest."""
    def step(est):
        if est is None:
            return None
        return {"class": type(est).__name__, **est.get_params(deep=False)}

    desc = {"selector": step(encoder.selector), "hasher": step(encoder.hasher), "n_bits": int(encoder.n_bits_),
            "n_features_in": int(encoder.n_features_in_)}
    return json.loads(json.dumps(desc, default=str))


def check_compatible(index_dir: Path, manifest: dict, *, model=None, bits: int | None = None,
                     expect_hash: str | None = None) -> None:
    """Refuse a checkpoint, bit width or checkpoint hash other than the index's.

    Raises
    ------
    InputError
        Naming what the index holds and what was given.
    """
    from dfsnet.models import checkpoint_hash

    built = manifest["checkpoint"]
    if model is not None:
        found = checkpoint_hash(model)
        if found != built["hash"]:
            raise InputError(f"model: the index {index_dir} was built with checkpoint {built['source']} "
                             f"(hash {built['hash']}), not with {Path(model).resolve()} (hash {found})")
    if expect_hash is not None and expect_hash != built["hash"]:
        raise InputError(f"index_dir: {index_dir} now holds an index of checkpoint hash {built['hash']}, "
                         f"not {expect_hash} as when it was loaded")
    if bits is not None and int(bits) != manifest["bits"]:
        raise InputError(f"bits: the index {index_dir} holds {manifest['bits']}-bit codes, not {bits}-bit ones")
