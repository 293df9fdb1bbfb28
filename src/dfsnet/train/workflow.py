"""The one training workflow: train (head or full) -> extract features -> fit the hash encoder.

``dfsnet train`` (:func:`train_and_fit`), the experiments runner (:mod:`dfsnet.experiments.runner`)
and the index builder share these steps, so the same seed and settings give the same weights and
the same encoder whichever entry point runs them:

- :func:`training_sets` and :func:`train_network`: the fit / validation subsets of a split
  (augmented in full mode) and the seeded call of :func:`dfsnet.train.train_model`;
- :func:`part_features` and :func:`train_part_features`: pooled features of a split's parts,
  through the cached frozen-backbone maps in head mode;
- :func:`build_encoder`, :func:`fit_encoder` and :func:`fit_encoder_on_folder`: the selector +
  hasher with the CLI's defaults (gain ratio, sample-mean threshold, 128 bits).

Importing this module is cheap (no torch); torch, Lightning and timm load inside the functions.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dfsnet.errors import InputError
from dfsnet.precision import DEFAULT_PRECISION

if TYPE_CHECKING:  # pragma: no cover - imports for annotations only
    from dfsnet.data import Split
    from dfsnet.hashing import Encoder
    from dfsnet.models import DFSNet
    from dfsnet.train.trainer import TrainResult

__all__ = [
    "MODES",
    "DEFAULT_BITS",
    "DEVICE_HELP",
    "TrainingOutcome",
    "build_encoder",
    "check_encoder_fits",
    "fit_encoder",
    "fit_encoder_on_folder",
    "folder_features",
    "lightning_device",
    "part_features",
    "torch_device",
    "train_and_fit",
    "train_network",
    "train_part_features",
    "training_sets",
]

logger = logging.getLogger(__name__)

#: Training modes: ``head`` (frozen backbone, head trained on cached maps) and ``full`` fine-tuning.
MODES = ("head", "full")
#: Code length of an encoder fitted with a selector (or ITQ) when none is given.
DEFAULT_BITS = 128
DEVICE_HELP = "auto (cuda when available, else cpu), cpu, cuda or cuda:N"


# --------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------

def _check_device(device: str | None) -> str:
    device = "auto" if device is None else device
    if not isinstance(device, str) or not device:
        raise InputError(f"device: expected {DEVICE_HELP}, got {device!r}")
    return device


def torch_device(device: str | None = "auto") -> str | None:
    """The torch device of feature extraction for a ``--device`` value; ``None`` means auto.

    Anything but ``auto`` is passed on (``cpu``, ``cuda``, ``cuda:1``, ``mps``) and checked by
    :func:`dfsnet.features.resolve_device` when used.
    """
    device = _check_device(device)
    return None if device == "auto" else ("cuda" if device == "gpu" else device)


def lightning_device(device: str | None = "auto") -> tuple[str, Any]:
    """``(accelerator, devices)`` of ``lightning.Trainer`` for a ``--device`` value.

    ``auto`` leaves both to Lightning (a GPU when one is available, else the CPU), as
    :func:`dfsnet.train.train_model` does by default; ``cuda:N`` trains on GPU ``N`` only.
    """
    device = _check_device(device)
    if device == "auto":
        return "auto", "auto"
    kind, _, index = device.partition(":")
    if kind in ("cuda", "gpu"):
        if index and not index.isdigit():
            raise InputError(f"device: expected {DEVICE_HELP}, got {device!r}")
        return "gpu", ([int(index)] if index else "auto")
    if index:
        raise InputError(f"device: expected {DEVICE_HELP}, got {device!r}")
    return kind, "auto"


# --------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------

def _selector_name(selector: str | None) -> str | None:
    return None if selector in (None, "none", "None") else selector


def build_encoder(feature_dim: int, *, selector: str | None = "gain_ratio", hasher: str = "sample_mean",
                  n_bits: int | None = None) -> Encoder:
    """The unfitted encoder for features of width ``feature_dim``, checked before any training.

    Parameters
    ----------
    feature_dim : int
        Width D of the features it will be fitted on.
    selector : {"gain_ratio", "random", None}
        ``"none"`` is read as None (no selection).
    hasher : {"sample_mean", "feature_mean", "feature_median", "zero", "itq"}
    n_bits : int, optional
        Code length; default :data:`DEFAULT_BITS`. Without a selector a threshold hasher makes
        one bit per feature, so it must then be None or ``feature_dim``.

    Returns
    -------
    dfsnet.hashing.Encoder
    """
    from dfsnet.hashing import make_encoder

    selector = _selector_name(selector)
    if selector is None and hasher != "itq":
        if n_bits not in (None, feature_dim):
            raise InputError(f"bits: with no selector, hasher {hasher!r} makes one bit per feature, i.e. "
                             f"{feature_dim} bits for this backbone; got {n_bits}. Choose a selector or "
                             "hasher 'itq' for shorter codes")
        return make_encoder(selector=None, hasher=hasher, n_bits=None)
    n_bits = DEFAULT_BITS if n_bits is None else n_bits
    if n_bits > feature_dim:
        raise InputError(f"bits: expected at most the backbone's feature width {feature_dim}, got {n_bits}")
    return make_encoder(selector=selector, hasher=hasher, n_bits=n_bits)


def check_encoder_fits(encoder: Encoder, n_train: int) -> None:
    """Refuse an ITQ code longer than the number of training images (its PCA has no more axes)."""
    from dfsnet.hashing import ITQHasher

    n_bits = getattr(encoder.hasher, "n_bits", None)
    if isinstance(encoder.hasher, ITQHasher) and n_bits is not None and n_bits > n_train:
        raise InputError(f"bits: ITQ learns {n_bits} principal directions from the {n_train} training "
                         "images; expected at most that many bits")


def fit_encoder(features: np.ndarray, labels: np.ndarray, *, selector: str | None = "gain_ratio",
                hasher: str = "sample_mean", n_bits: int | None = None) -> Encoder:
    """Fit the selector + hasher on training features, with ``dfsnet train``'s defaults.

    Parameters
    ----------
    features : ndarray of float32, shape (n, D)
        Pooled features of the training images (fit + validation part of a split).
    labels : ndarray of int64, shape (n,)
    selector, hasher, n_bits
        See :func:`build_encoder`.

    Returns
    -------
    dfsnet.hashing.Encoder
        Fitted; ``transform(X float (m, D)) -> uint8 (m, ceil(n_bits / 8))``.
    """
    features = np.asarray(features)
    if features.ndim != 2:
        raise InputError(f"features: expected shape (n, D), got {features.shape}")
    encoder = build_encoder(features.shape[1], selector=selector, hasher=hasher, n_bits=n_bits)
    check_encoder_fits(encoder, features.shape[0])
    return encoder.fit(features, labels)


def folder_features(model: DFSNet, root: str | os.PathLike, *, image_size: int | None = None,
                    batch_size: int = 64, num_workers: int = 0, device: str | None = "auto",
                    precision: str = DEFAULT_PRECISION, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of the readable images of a labelled folder ``ROOT/<class>/<image>``.

    Returns
    -------
    features : ndarray of float32, shape (n, D)
    labels : ndarray of int64, shape (n,)
        Unreadable images are left out of both.
    """
    from dfsnet.data import ImageFolder, build_transforms
    from dfsnet.features import extract_features_with_mask

    size = image_size or model.meta.input_size[-1]
    folder = ImageFolder(root, transform=build_transforms(model.meta, train=False, image_size=int(size)))
    features, ok = extract_features_with_mask(model, folder, batch_size=batch_size, num_workers=num_workers,
                                              device=torch_device(device), precision=precision, progress=progress)
    if ok.sum() < 2:
        raise InputError(f"fit_on: fewer than 2 readable images in {root}")
    return features[ok], np.asarray(folder.targets)[ok]


def fit_encoder_on_folder(model: DFSNet, root: str | os.PathLike, *, selector: str | None = "gain_ratio",
                          hasher: str = "sample_mean", n_bits: int | None = None,
                          image_size: int | None = None, batch_size: int = 64, num_workers: int = 0,
                          device: str | None = "auto", precision: str = DEFAULT_PRECISION,
                          progress: bool = False) -> Encoder:
    """:func:`fit_encoder` on the features of a labelled image folder (``dfsnet index build --fit-on``).

    The encoder settings are checked against the model's feature width before any extraction.
    """
    build_encoder(model.meta.feature_dim, selector=selector, hasher=hasher, n_bits=n_bits)
    features, labels = folder_features(model, root, image_size=image_size, batch_size=batch_size,
                                       num_workers=num_workers, device=device, precision=precision,
                                       progress=progress)
    encoder = fit_encoder(features, labels, selector=selector, hasher=hasher, n_bits=n_bits)
    logger.info("fitted a %d-bit %s/%s encoder on %d images of %s", encoder.n_bits_, _selector_name(selector),
                hasher, features.shape[0], root)
    return encoder


# --------------------------------------------------------------------------------------------
# Training and features
# --------------------------------------------------------------------------------------------

def training_sets(pool, split: Split, *, mode: str, meta, image_size: int | None = None):
    """``(fit_set, val_set)`` of ``split``: the fit set carries the training augmentation in full mode.

    Head mode keeps the evaluation transform: each image's backbone maps are computed once and
    reused every epoch, so a random augmentation would be frozen into the cache.
    """
    from dfsnet._validation import check_choice
    from dfsnet.data import build_transforms

    check_choice(mode, MODES, name="mode")
    train_tf = build_transforms(meta, train=True, image_size=image_size) if mode == "full" else None
    return split.subset(pool, "fit", transform=train_tf), split.subset(pool, "val")


def train_network(model: DFSNet, fit_set, val_set, *, mode: str, out_dir: str | os.PathLike, seed: int = 0,
                  progress: bool = False, **train_kwargs) -> TrainResult:
    """Seed, then :func:`dfsnet.train.train_model` (which trains ``model`` in place).

    ``train_kwargs`` go to :func:`~dfsnet.train.train_model` unchanged (epochs, lr, optimizer,
    batch_size, patience, resume, cache_dir, accelerator, devices, extra, ...).
    """
    import torch

    from dfsnet.train.trainer import train_model

    torch.manual_seed(seed)
    return train_model(model, fit_set, val_set, mode=mode, out_dir=out_dir, seed=seed, progress=progress,
                       **train_kwargs)


def part_features(model: DFSNet, subset, *, mode: str, maps_cache_dir=None, features_cache_dir=None,
                  batch_size: int = 64, num_workers: int = 0, device: str | None = "auto",
                  precision: str = DEFAULT_PRECISION, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features and labels of the readable images of ``subset``.

    Head mode runs only the head over the frozen backbone's cached maps (``maps_cache_dir``,
    the cache the head training filled); full mode runs the whole network over the images
    (cached in ``features_cache_dir`` when given, keyed by the weights).

    Returns
    -------
    features : ndarray of float32, shape (n, D)
    labels : ndarray of int64, shape (n,)
    """
    from dfsnet.features import cached_feature_maps, extract_features_with_mask, extract_from_maps

    dev = torch_device(device)
    if mode == "head":
        maps = cached_feature_maps(model.backbone, subset, cache_dir=maps_cache_dir, batch_size=batch_size,
                                   num_workers=num_workers, device=dev, precision=precision, progress=progress)
        # Rows of unreadable images are zero maps: cheaper to pool and drop than to copy the rest.
        feats = extract_from_maps(model, maps.maps, batch_size=256, device=dev, precision=precision)
        return feats[maps.ok], subset.targets[maps.ok]
    feats, ok = extract_features_with_mask(model, subset, batch_size=batch_size, num_workers=num_workers,
                                           device=dev, precision=precision, cache_dir=features_cache_dir,
                                           progress=progress)
    return feats[ok], subset.targets[ok]


def train_part_features(model: DFSNet, pool, split: Split, *, mode: str, maps_cache_dir=None,
                        batch_size: int = 64, num_workers: int = 0, device: str | None = "auto",
                        precision: str = DEFAULT_PRECISION, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of the split's train part (fit + val): what the encoder is fitted on."""
    common = dict(mode=mode, batch_size=batch_size, num_workers=num_workers, device=device, precision=precision,
                  progress=progress)
    if mode == "head":  # the maps of both parts are in the training's cache already
        parts = [part_features(model, split.subset(pool, p), maps_cache_dir=maps_cache_dir, **common)
                 for p in ("fit", "val")]
        return np.concatenate([f for f, _ in parts]), np.concatenate([y for _, y in parts])
    return part_features(model, split.subset(pool, "train"), **common)


@dataclass
class TrainingOutcome:
    """What :func:`train_and_fit` produced (files under ``out_dir``).

    Attributes
    ----------
    result : TrainResult
        Of :func:`dfsnet.train.train_model`; ``result.checkpoint`` is ``out_dir/model.safetensors``.
    model : DFSNet
        The trained network (best epoch), on the CPU.
    split : Split
        Saved as ``out_dir/split.json``.
    encoder : Encoder or None
        Fitted on the train part's features and saved as ``out_dir/encoder.npz``; None in the
        non-zero ranks of a distributed run, which write nothing.
    summary : dict
        ``out_dir/train_summary.json``: ``val_acc``, ``epochs``, ``seconds`` (and ``query_acc``).
    n_encoder_images : int
        Images the encoder was fitted on.
    """

    result: TrainResult
    model: DFSNet
    split: Split
    encoder: Encoder | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    n_encoder_images: int = 0

    @property
    def best_epoch(self) -> int:
        """1-based epoch of the exported model (0 when no epoch ran)."""
        history = self.result.history
        return max(history, key=lambda e: e["val_acc"])["epoch"] + 1 if history else 0


def train_and_fit(
    *,
    out_dir: str | os.PathLike,
    source: str = "folder",
    data: str | os.PathLike | None = None,
    download: bool = False,
    backbone: str = "efficientnet_lite0",
    pretrained: bool = True,
    weights: str | os.PathLike | None = None,
    init: str | os.PathLike | None = None,
    dfs: bool = True,
    dropout: float = 0.2,
    image_size: int | None = None,
    split: str | os.PathLike | None = None,
    split_protocol: str = "auto",
    val_fraction: float = 0.1,
    seed: int = 0,
    mode: str = "head",
    epochs: int = 10,
    lr: float = 1e-3,
    optimizer: str = "adamw",
    weight_decay: float = 1e-4,
    backbone_lr_mult: float = 0.1,
    warmup_epochs: float = 0.0,
    patience: int | None = 5,
    batch_size: int = 64,
    num_workers: int = 0,
    resume: bool = True,
    cache_dir: str | os.PathLike | None = None,
    device: str | None = "auto",
    accelerator: str | None = None,
    devices: Any = None,
    num_nodes: int = 1,
    strategy: str = "auto",
    precision: str = DEFAULT_PRECISION,
    selector: str | None = "gain_ratio",
    hasher: str = "sample_mean",
    n_bits: int | None = None,
    eval_queries: bool = False,
    progress: bool = False,
) -> TrainingOutcome:
    """``dfsnet train``: train DFS-Net (or Ori), then fit its encoder on the train part's features.

    Writes ``out_dir/{model.safetensors, split.json, encoder.npz, train_summary.json}`` (see
    :func:`dfsnet.train.train_model` for the checkpoints and logs). The encoder settings are
    checked before any training. ``accelerator``/``devices`` (Lightning's, e.g. for DDP) default
    to what ``device`` names. Every keyword has the CLI flag's default.

    Returns
    -------
    TrainingOutcome
    """
    import torch

    from dfsnet._io import atomic_write_text
    from dfsnet.data import Split, build_transforms, load_pool, make_split
    from dfsnet.models import DFSNet, create_backbone, load_checkpoint, read_checkpoint_meta
    from dfsnet.train.evaluate import evaluate_accuracy

    out = Path(out_dir)
    if init and weights:
        raise InputError("init, weights: give one of them; init already holds the backbone weights")
    default_accelerator, default_devices = lightning_device(device)
    accelerator = accelerator or default_accelerator
    devices = default_devices if devices is None else devices
    # Every DDP process runs this; seeding first gives them all the same random init.
    torch.manual_seed(seed)
    if init:
        backbone_meta = read_checkpoint_meta(init)[0].backbone
    else:
        backbone_module = create_backbone(backbone, pretrained=pretrained and weights is None, weights=weights)
        backbone_meta = backbone_module.meta
    encoder = build_encoder(backbone_meta.feature_dim, selector=selector, hasher=hasher, n_bits=n_bits)
    size = image_size or backbone_meta.input_size[-1]
    pool = load_pool(source, root=data, download=download,
                     transform=build_transforms(backbone_meta, train=False, image_size=size))
    n_classes = len(pool.classes)
    if init:
        model, _ = load_checkpoint(init, expect={"backbone": backbone, "num_classes": n_classes, "dfs": dfs})
        if model.meta.class_names is not None and list(model.meta.class_names) != list(pool.classes):
            raise InputError(f"init: checkpoint {init} was made for the classes {list(model.meta.class_names)}, "
                             f"but the data has {list(pool.classes)}")
    else:
        model = DFSNet(backbone_module, n_classes, dfs=dfs, dropout=dropout, class_names=pool.classes)

    if split:
        the_split = Split.load(split, expect_fingerprint=pool.fingerprint())
    else:
        protocol = split_protocol
        if protocol == "auto":
            protocol = "paper" if (pool.sources == 1).any() else "per-class"
        the_split = make_split(protocol, pool.targets, pool_sources=pool.sources, seed=seed,
                               val_fraction=val_fraction, pool_fingerprint=pool.fingerprint())
    if the_split.val.size == 0:
        raise InputError(f"val_fraction: the {the_split.protocol} split leaves no validation images "
                         f"({the_split.sizes()}); raise the validation fraction or use more images per class")
    check_encoder_fits(encoder, the_split.train.size)
    the_split.save(out / "split.json")
    fit_set, val_set = training_sets(pool, the_split, mode=mode, meta=backbone_meta, image_size=size)
    logger.info("training %s (%s, %s mode, %d px) on %d images, validating on %d; split %s %s",
                "DFS-Net" if dfs else "Ori", backbone_meta.name, mode, size, len(fit_set), len(val_set),
                the_split.protocol, the_split.sizes())
    result = train_network(
        model, fit_set, val_set, mode=mode, out_dir=out, seed=seed, progress=progress, epochs=epochs, lr=lr,
        weight_decay=weight_decay, optimizer=optimizer, backbone_lr_mult=backbone_lr_mult,
        warmup_epochs=warmup_epochs, batch_size=batch_size, resume=resume, patience=patience,
        accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy, precision=precision,
        num_workers=num_workers, cache_dir=cache_dir,
        extra={"image_size": size, "source": source, "data": str(data) if data else None,
               "split_protocol": the_split.protocol, "split_seed": the_split.seed},
    )
    outcome = TrainingOutcome(result=result, model=model, split=the_split)
    if not result.is_global_zero:  # another DDP process: rank zero fits and writes the encoder
        return outcome

    # Fitted on the train part (fit + val), as in the paper.
    features, labels = train_part_features(model, pool, the_split, mode=mode,
                                           maps_cache_dir=cache_dir or out / "cache", batch_size=batch_size,
                                           num_workers=num_workers, device=device, precision=precision,
                                           progress=progress)
    encoder.fit(features, labels)
    encoder.save(out / "encoder.npz")
    outcome.encoder, outcome.n_encoder_images = encoder, int(features.shape[0])
    summary: dict[str, Any] = {"val_acc": result.best_val_acc, "epochs": result.epochs_run,
                               "seconds": result.seconds, "precision": result.precision}
    if eval_queries and the_split.query.size:
        summary["query_acc"] = evaluate_accuracy(model, the_split.subset(pool, "query"), batch_size=batch_size,
                                                 num_workers=num_workers, device=torch_device(device),
                                                 progress=progress)
    atomic_write_text(out / "train_summary.json", json.dumps(summary, indent=2) + "\n")
    outcome.summary = summary
    return outcome
