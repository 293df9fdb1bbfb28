"""The index folder's layout and its commit point, ``manifest.json``.

Index folder layout (format version 1)::

    manifest.json               the commit point: readers follow only what it names
    manifest.<gen>.json         a copy of generation <gen>'s manifest, written before the commit;
                                the current and the previous generation's are kept, so
                                `dfsnet index repair` can recover the newest complete one
    model.safetensors           copy of the checkpoint (the index is self-contained)
    encoder.npz                 the fitted selector + hasher (dfsnet.hashing.Encoder)
    model.onnx                  the model's features() as an ONNX graph (optional: when the
                                exporter was installed), so queries run in ONNX Runtime
                                without torch; its SHA-256 is in the manifest's ``onnx`` entry
    codes.<gen>.hidx            HammingIndex of generation <gen>
    metadata.<gen>.sqlite       one row per indexed image: id, path, sha256, size, mtime, label
    features.<gen>.npy          float32 features of the images added in generation <gen>
                                (only with store_features; chunks accumulate across generations;
                                row r of the chunks in order is the image with id r)

Ids are given out in order (``next_id``) and never reused or renumbered: removing images
writes a generation without their codes and rows (their feature rows stay, unused). The
manifest records the size and SHA-256 of every codes, metadata and feature file under
``checksums``; manifests written before that key existed are still read (their files are
checked by size and header only).
"""
from __future__ import annotations

import datetime
import json
import re
from pathlib import Path
from typing import Any

from dfsnet import __version__
from dfsnet._io import atomic_write_text, checkpoint_hash, sha256_file
from dfsnet.errors import InputError

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "MODEL_FILE", "ENCODER_FILE", "ONNX_FILE", "IndexDamagedError",
           "read_manifest", "parse_manifest", "write_manifest", "generation_file", "backup_file",
           "referenced_files", "encoder_params", "check_compatible", "check_same_index", "file_checksum",
           "next_id"]

FORMAT = "dfsnet.index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
ENCODER_FILE = "encoder.npz"
ONNX_FILE = "model.onnx"
# Files the store creates and may delete when no manifest names them.
OWNED = re.compile(r"^(codes\.\d+\.hidx|metadata\.\d+\.sqlite(-journal|-wal|-shm)?|features\.\d+\.npy"
                   r"|manifest\.\d+\.json|\..+\.tmp(-journal)?)$")
GENERATION_FILE = re.compile(r"^(codes|metadata|features|manifest)\.(\d+)\.(hidx|sqlite|npy|json)$")
_EXTENSIONS = {"codes": "hidx", "metadata": "sqlite", "features": "npy"}
# Keys every manifest has, and the type each must be (D11: a manifest missing one was a KeyError).
_REQUIRED = {"generation": int, "count": int, "bits": int, "image_size": int, "checkpoint": dict,
             "model": dict, "encoder": dict, "files": dict, "stats": dict, "created": str, "updated": str}
_FILES_REQUIRED = ("codes", "metadata", "features")


class IndexDamagedError(InputError):
    """A file of the index is missing, damaged or inconsistent with the manifest.

    The message names the file; ``dfsnet index verify`` lists every problem and
    ``dfsnet index repair`` recovers the newest complete generation.
    """


def now() -> str:
    """The current UTC time, ISO 8601 to the second (the manifest's timestamps)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def generation_file(kind: str, generation: int) -> str:
    """The file name of ``kind`` ("codes", "metadata" or "features") in ``generation``."""
    return f"{kind}.{generation:06d}.{_EXTENSIONS[kind]}"


def backup_file(generation: int) -> str:
    """The name of the copy of generation ``generation``'s manifest."""
    return f"manifest.{generation:06d}.json"


def referenced_files(manifest: dict[str, Any]) -> list[str]:
    """Every file a manifest names besides itself: model, encoder, ONNX graph, codes, metadata, feature
    chunks."""
    files = manifest["files"]
    return [MODEL_FILE, ENCODER_FILE, *([ONNX_FILE] if manifest.get("onnx") else []),
            *(n for n in (files["codes"], files["metadata"]) if n is not None),
            *(c["file"] for c in files["features"] or [])]


def next_id(manifest: dict[str, Any]) -> int:
    """The id the next added image gets (manifests from before removals existed: ``count``)."""
    return int(manifest.get("next_id", manifest["count"]))


def file_checksum(path: Path) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex}`` of a file, as the manifest records it."""
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def parse_manifest(text: str | bytes, *, where: str) -> dict[str, Any]:
    """Decode and check a manifest's text; ``where`` names it in errors.

    Raises
    ------
    InputError
        Not valid UTF-8 JSON, not a dfsnet index manifest, another format version, or a
        required key missing or of the wrong type.
    """
    try:
        manifest = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"index_dir: {where} is not valid JSON ({exc}); `dfsnet index repair` recovers "
                         "the newest complete generation") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(f"index_dir: {where} is not a dfsnet index manifest (format "
                         f"{manifest.get('format') if isinstance(manifest, dict) else None!r}, expected {FORMAT!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise InputError(f"index_dir: {where} has index format version {version!r}; this dfsnet "
                         f"({__version__}) reads version {FORMAT_VERSION}")
    problems = [f"{key!r} ({kind.__name__})" for key, kind in _REQUIRED.items()
                if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool)]
    files = manifest.get("files")
    if isinstance(files, dict):
        problems += [f"'files.{key}'" for key in _FILES_REQUIRED if key not in files]
        problems += [f"'files.{key}' (str)" for key in ("codes", "metadata")
                     if key in files and not isinstance(files[key], (str, type(None)))]
        chunks = files.get("features")
        if chunks is not None and not (isinstance(chunks, list) and all(
                isinstance(c, dict) and isinstance(c.get("file"), str) and isinstance(c.get("rows"), int)
                for c in chunks)):
            problems.append("'files.features' (a list of {file, rows})")
    if isinstance(manifest.get("checkpoint"), dict) and not isinstance(manifest["checkpoint"].get("hash"), str):
        problems.append("'checkpoint.hash' (str)")
    if isinstance(manifest.get("encoder"), dict) and not isinstance(manifest["encoder"].get("sha256"), str):
        problems.append("'encoder.sha256' (str)")
    if isinstance(manifest.get("model"), dict) and not isinstance(manifest["model"].get("feature_dim"), int):
        problems.append("'model.feature_dim' (int)")
    onnx = manifest.get("onnx")
    if onnx is not None and not (isinstance(onnx, dict) and isinstance(onnx.get("sha256"), str)
                                 and isinstance(onnx.get("input_shape"), list)):
        problems.append("'onnx' (null, or {sha256, input_shape, ...})")
    if "checksums" in manifest and not isinstance(manifest["checksums"], dict):
        problems.append("'checksums' (dict)")
    if problems:
        raise InputError(f"index_dir: {where} is incomplete: expected the keys {', '.join(problems)}, which "
                         "are missing or of another type; `dfsnet index repair` recovers the newest complete "
                         "generation")
    return manifest


def read_manifest(index_dir) -> dict[str, Any]:
    """The manifest of the index at ``index_dir``.

    Raises
    ------
    FileNotFoundError
        No folder, or no manifest in it.
    InputError
        Not valid JSON, not a dfsnet index, another format version, or keys missing.
    """
    index_dir = Path(index_dir).expanduser()
    path = index_dir / MANIFEST
    if not index_dir.is_dir():
        raise FileNotFoundError(f"index_dir: no such folder: {index_dir}")
    if not path.is_file():
        remains = sorted(p.name for p in index_dir.iterdir() if GENERATION_FILE.match(p.name))
        if remains:
            raise FileNotFoundError(
                f"index_dir: {index_dir} has no {MANIFEST} but holds the files of an index "
                f"({', '.join(remains[:4])}{' ...' if len(remains) > 4 else ''}); recover it with "
                "`dfsnet index repair` (building into this folder again would replace it)")
        raise FileNotFoundError(
            f"index_dir: {index_dir} is not a dfsnet index (no {MANIFEST}); create one with "
            "`dfsnet index build` or ImageIndex.build()")
    return parse_manifest(path.read_bytes(), where=str(path))


def write_manifest(index_dir: Path, manifest: dict[str, Any]) -> None:
    """Write the generation's manifest copy, then replace the manifest atomically: the commit point."""
    text = json.dumps(manifest, indent=2) + "\n"
    atomic_write_text(index_dir / backup_file(int(manifest["generation"])), text)
    atomic_write_text(index_dir / MANIFEST, text)


def encoder_params(encoder) -> dict[str, Any]:
    """A JSON-ready description of a fitted encoder's steps, for the manifest."""
    def step(est):
        if est is None:
            return None
        return {"class": type(est).__name__, **est.get_params(deep=False)}

    desc = {"selector": step(encoder.selector), "hasher": step(encoder.hasher), "n_bits": int(encoder.n_bits_),
            "n_features_in": int(encoder.n_features_in_)}
    return json.loads(json.dumps(desc, default=str))


def check_compatible(index_dir: Path, manifest: dict, *, model=None, bits: int | None = None) -> None:
    """Refuse a checkpoint or bit width other than the index's.

    Raises
    ------
    InputError
        Naming what the index holds and what was given.
    """
    built = manifest["checkpoint"]
    if model is not None:
        found = checkpoint_hash(model)
        if found != built["hash"]:
            raise InputError(f"model: the index {index_dir} was built with checkpoint {built.get('source')} "
                             f"(hash {built['hash']}), not with {Path(model).resolve()} (hash {found})")
    if bits is not None and int(bits) != manifest["bits"]:
        raise InputError(f"bits: the index {index_dir} holds {manifest['bits']}-bit codes, not {bits}-bit ones")


# What a reader that loaded one generation needs unchanged in the next: the model, the encoder
# and what they make (a code width or feature width it did not load would break every search).
_INVARIANTS = (("checkpoint hash", lambda m: m["checkpoint"]["hash"]), ("bits", lambda m: m["bits"]),
               ("encoder sha256", lambda m: m["encoder"]["sha256"]), ("image size", lambda m: m["image_size"]),
               ("feature width", lambda m: m["model"]["feature_dim"]),
               ("stored features", lambda m: m["files"]["features"] is not None))


def check_same_index(index_dir: Path, loaded: dict, found: dict) -> None:
    """Refuse a newer generation ``found`` whose model, encoder or widths differ from ``loaded``'s.

    Raises
    ------
    InputError
        Naming what changed, from what to what.
    """
    for what, get in _INVARIANTS:
        if get(loaded) != get(found):
            raise InputError(f"index_dir: {index_dir} now holds generation {found['generation']} with {what} "
                             f"{get(found)!r}, not {get(loaded)!r} as the loaded generation "
                             f"{loaded['generation']}; reload it to follow")
