"""The one training workflow: train (head or full) -> extract features -> fit the hash encoder.

``dfsnet train`` (:func:`train_and_fit`), the experiments runner (:mod:`dfsnet.experiments.runner`)
and the index builder share these steps, so the same seed and settings give the same weights and
the same encoder whichever entry point runs them:

- :func:`training_sets` and :func:`train_network`: the fit / validation subsets of a split
  (augmented in full mode) and the seeded call of :func:`dfsnet.train.train_model`;
- :func:`part_features` and :func:`train_part_features`: pooled features of a split's parts,
  through the cached frozen-backbone maps in head mode;
- :func:`build_network`: the network, its head initialised from a seed of its own, so that
  ``dfsnet train`` and ``dfsnet experiment`` give identical weights for the same seed;
- :func:`build_encoder`, :func:`fit_encoder` and :func:`fit_encoder_on_folder`: the selector +
  hasher with the CLI's defaults (gain ratio, sample-mean threshold, 128 bits);
- :func:`encoder_candidates` and :func:`select_encoder`: ``dfsnet train``'s default encoder,
  the best on the validation split of the learned hash head, ITQ and the paper's hash.

Importing this module is cheap (no torch); torch, Lightning and timm load inside the functions.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
from dataclasses import dataclass, field, replace
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
    "ENCODERS",
    "HASH_HEADS",
    "TrainingOutcome",
    "build_encoder",
    "build_network",
    "encoder_candidates",
    "fitted_encoder",
    "select_encoder",
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
#: Model-selection metrics: validation accuracy, or validation retrieval mAP with the validation
#: images as queries against the training images (``val_map``, head mode) or against each other
#: (``val_map_loo``, leave-one-out); see :class:`dfsnet.train.module.DFSNetTask`.
MONITORS = ("val_acc", "val_map", "val_map_loo")
#: Code length of an encoder fitted with a selector (or ITQ) when none is given.
DEFAULT_BITS = 128
DEVICE_HELP = "auto (cuda when available, else cpu), cpu, cuda or cuda:N"
#: ``dfsnet train --encoder``: ``auto`` picks the best on the validation split of ``learned``
#: (the network's hash head), ``itq`` and ``paper`` (gain ratio + sample-mean hash, Scheme 3);
#: ``custom`` is ``--selector`` + ``--hasher``.
ENCODERS = ("auto", "learned", "itq", "paper", "custom")
#: Hash heads trained jointly with the classifier (``none``: a plain classifier).
HASH_HEADS = ("csq", "orthohash", "none")
#: Candidates of ``encoder="auto"``, in order of preference on equal validation mAP.
_AUTO_CANDIDATES = ("learned", "itq", "paper")


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
    from dfsnet.hashing.encoder import FREE_LENGTH_HASHERS

    selector = _selector_name(selector)
    if selector is None and hasher not in FREE_LENGTH_HASHERS:
        if n_bits not in (None, feature_dim):
            raise InputError(f"bits: with no selector, hasher {hasher!r} makes one bit per feature, i.e. "
                             f"{feature_dim} bits for this backbone; got {n_bits}. Choose a selector or "
                             "hasher 'itq' for shorter codes")
        return make_encoder(selector=None, hasher=hasher, n_bits=None)
    n_bits = DEFAULT_BITS if n_bits is None else n_bits
    if n_bits > feature_dim:
        raise InputError(f"bits: expected at most the backbone's feature width {feature_dim}, got {n_bits}")
    return make_encoder(selector=selector, hasher=hasher, n_bits=n_bits)


def build_network(backbone, num_classes: int, *, dfs: bool = True, dropout: float = 0.2,
                  class_names=None, hash_bits: int | None = None, seed: int = 0) -> DFSNet:
    """A :class:`DFSNet` whose new layers are initialised from ``seed`` alone.

    The global torch RNG is seeded right before the head is built, so the same seed gives the
    same initial head whatever ran before (``dfsnet experiment`` trains Ori first,
    ``dfsnet train`` does not).
    """
    import torch

    from dfsnet.models import DFSNet

    torch.manual_seed(seed)
    return DFSNet(backbone, num_classes, dfs=dfs, dropout=dropout, class_names=class_names, hash_bits=hash_bits)


def fitted_encoder(hasher) -> Encoder:
    """An :class:`Encoder` (no selector) around an already fitted hasher, e.g. an exported hash head."""
    from sklearn.base import clone

    from dfsnet.hashing import Encoder

    encoder = Encoder(selector=None, hasher=clone(hasher))
    encoder.selector_, encoder.hasher_ = None, hasher
    encoder.n_bits_, encoder.n_features_in_ = int(hasher.n_bits_), int(hasher.n_features_in_)
    return encoder


def encoder_candidates(feature_dim: int, n_bits: int, *, n_train: int, learned=None) -> dict[str, Encoder]:
    """The encoders ``encoder="auto"`` compares: ``{name: encoder}`` in order of preference.

    Parameters
    ----------
    feature_dim : int
    n_bits : int
        Code length of all of them.
    n_train : int
        Images they are fitted on (ITQ is left out when ``n_bits`` exceeds it).
    learned : LinearHasher, optional
        The network's trained hash head; ``"learned"`` is a fitted encoder around it.

    Returns
    -------
    dict of str to Encoder
        ``"learned"`` fitted, the others unfitted.
    """
    out: dict[str, Encoder] = {}
    if learned is not None:
        if learned.n_bits_ != n_bits:
            raise InputError(f"bits: the hash head has {learned.n_bits_} bits, the other candidates {n_bits}")
        out["learned"] = fitted_encoder(learned)
    if n_bits <= min(feature_dim, n_train):
        out["itq"] = build_encoder(feature_dim, selector=None, hasher="itq", n_bits=n_bits)
    out["paper"] = build_encoder(feature_dim, selector="gain_ratio", hasher="sample_mean", n_bits=n_bits)
    return out


#: Share of the ranked validation images that the selection's mAP@k looks at: mAP@1000 over
#: CIFAR-10's 54,000-image database looks at its top 2 %.
SELECT_TOP_FRACTION = 0.02


def validation_cutoff(n_val: int) -> int:
    """The cut-off of a leave-one-out validation mAP over ``n_val`` images: the top
    :data:`SELECT_TOP_FRACTION` of the other ``n_val - 1``, at least 5 (capped at them)."""
    return min(max(5, math.ceil(SELECT_TOP_FRACTION * (n_val - 1))), n_val - 1)


def select_encoder(candidates: dict[str, Encoder], fit: tuple[np.ndarray, np.ndarray],
                   val: tuple[np.ndarray, np.ndarray], *, k: int | None = None) -> tuple[str, dict[str, dict]]:
    """The candidate whose validation codes retrieve best; never looks at the queries.

    Unfitted candidates are fitted on ``fit``. Each validation image is then a query against the
    *other* validation images (leave-one-out), ranked by Hamming distance with ties in the
    validation images' stored order, as an index returns ties (by id, i.e. in the order images
    were added): codes that tie by the thousand, as a hash head's at its class centres, are
    judged by the order a user would get, not by an average over orders (on CIFAR-10 with an
    AMD EPYC, fp32: expected ties chose a CSQ head 7.3 points below ITQ on the queries, scored
    in stored order). The split's parts are stored grouped by class, an order that costs tying
    codes points (8.2 for a 64-bit CSQ head on CIFAR-10's queries, against a shuffled
    database), so this rule leans towards codes that rarely tie (ITQ). Both
    sides are images no candidate was fitted on: ranked against the fit images instead, a hash
    head that memorised them (every fit image on its class centre) looks far better than it
    retrieves new images (on CIFAR-10, 0.75 against 0.56 on the queries).

    Parameters
    ----------
    candidates : dict of str to Encoder
        From :func:`encoder_candidates`; fitted ones are used as they are.
    fit, val : (features float32 (n, D), labels int64 (n,))
        The fit and validation parts of the training split; at least 2 validation images.
    k : int, optional
        Cut-off of the mAP that decides (capped at the other validation images); default the
        top :data:`SELECT_TOP_FRACTION` of them, at least 5, since retrieval is judged at the top
        of a ranking far longer than the validation set (measured on CIFAR-10: against the
        whole ranking, mAP@all, a CSQ head and ITQ tie on validation while ITQ is 13 points
        better at mAP@1000 on the queries). mAP@all is recorded too.

    Returns
    -------
    name : str
        Highest validation mAP@k; on a tie, the earlier candidate.
    scores : dict
        ``{name: {"map_at_k", "map_all", "k"}}``.
    """
    from sklearn.base import clone

    from dfsnet.eval.metrics import leave_one_out_map
    from dfsnet.hashing import hamming_distances

    (xf, yf), (xv, yv) = fit, val
    n = xv.shape[0]
    if n < 2:
        raise InputError(f"val: the encoder is chosen on the validation images; expected at least 2, got {n}")
    k = min(validation_cutoff(n) if k is None else k, n - 1)
    scores: dict[str, dict] = {}
    for name, encoder in candidates.items():
        if not hasattr(encoder, "n_bits_"):
            encoder = clone(encoder).fit(xf, yf)
        codes = encoder.transform(xv)
        d = hamming_distances(codes, codes)
        ap = {cut: leave_one_out_map(d, yv, k=cut, ties="stable") for cut in (k, None)}
        scores[name] = {"map_at_k": float(ap[k]), "map_all": float(ap[None]), "k": k}
        logger.info("encoder candidate %s: validation (leave-one-out) mAP@%d %.4f, mAP@all %.4f", name, k,
                    scores[name]["map_at_k"], scores[name]["map_all"])
    best = max(scores, key=lambda n: scores[n]["map_at_k"])  # max keeps the first of equal values
    return best, scores


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
    batch_size, patience, resume, cache_dir, accelerator, devices, extra, augment, monitor, ...).
    """
    from dfsnet.train.trainer import train_model

    return train_model(model, fit_set, val_set, mode=mode, out_dir=out_dir, seed=seed, progress=progress,
                       **train_kwargs)


def part_features(model: DFSNet, subset, *, mode: str, maps_cache_dir=None, features_cache_dir=None,
                  pixel_cache_dir=None, batch_size: int = 64, num_workers: int = 0, device: str | None = "auto",
                  precision: str = DEFAULT_PRECISION, runtime: str = "auto",
                  progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features and labels of the readable images of ``subset``.

    Head mode runs only the head over the frozen backbone's cached maps (``maps_cache_dir``,
    the cache the head training filled; give the training's ``maps_runtime``, see
    :func:`dfsnet.features.maps_runtime`); full mode runs the whole network over the images
    (cached in ``features_cache_dir`` when given, keyed by the weights) in ``runtime``. Images
    decoded for the backbone's maps or the network are kept in ``pixel_cache_dir`` when given,
    for the next network run over the same part (:mod:`dfsnet.features.pixels`).

    Returns
    -------
    features : ndarray of float32, shape (n, D)
    labels : ndarray of int64, shape (n,)
    """
    from dfsnet.features import cached_feature_maps, extract_features_with_mask, extract_from_maps

    dev = torch_device(device)
    if mode == "head":
        maps = cached_feature_maps(model.backbone, subset, cache_dir=maps_cache_dir, batch_size=batch_size,
                                   num_workers=num_workers, device=dev, precision=precision, runtime=runtime,
                                   pixel_cache_dir=pixel_cache_dir, progress=progress)
        # Rows of unreadable images are zero maps: cheaper to pool and drop than to copy the rest.
        feats = extract_from_maps(model, maps.maps, batch_size=256, device=dev, precision=precision)
        return feats[maps.ok], subset.targets[maps.ok]
    feats, ok = extract_features_with_mask(model, subset, batch_size=batch_size, num_workers=num_workers,
                                           device=dev, precision=precision, runtime=runtime,
                                           cache_dir=features_cache_dir,
                                           pixel_cache_dir=pixel_cache_dir, progress=progress)
    return feats[ok], subset.targets[ok]


def train_part_features(model: DFSNet, pool, split: Split, *, mode: str, maps_cache_dir=None,
                        batch_size: int = 64, num_workers: int = 0, device: str | None = "auto",
                        precision: str = DEFAULT_PRECISION, runtime: str = "auto",
                        progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of the split's train part (fit + val): what the encoder is fitted on."""
    common = dict(mode=mode, batch_size=batch_size, num_workers=num_workers, device=device, precision=precision,
                  runtime=runtime, progress=progress)
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
        return self.result.best_epoch + 1


def _protocol(split_protocol: str, pool) -> str:
    """``auto``: the paper's protocol when the data has a test part, else per-class."""
    if split_protocol != "auto":
        return split_protocol
    return "paper" if (pool.sources == 1).any() else "per-class"


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
    encoder: str = "auto",
    hash_head: str = "auto",
    hash_weight: float = 1.0,
    hash_lam: float = 1e-4,
    augment: str | None = None,
    monitor: str | None = None,
    mixup: float | None = None,
    refit: bool = False,
    eval_queries: bool = False,
    progress: bool = False,
) -> TrainingOutcome:
    """``dfsnet train``: train DFS-Net (or Ori), then fit its encoder on the train part's features.

    Writes ``out_dir/{model.safetensors, split.json, encoder.npz, train_summary.json}`` and, with
    a hash head, ``out_dir/hash_head.npz`` (that head as an encoder, whichever was chosen) (see
    :func:`dfsnet.train.train_model` for the checkpoints and logs). The encoder settings are
    checked before any training. ``accelerator``/``devices`` (Lightning's, e.g. for DDP) default
    to what ``device`` names. Every keyword has the CLI flag's default.

    ``encoder`` (:data:`ENCODERS`): ``"auto"`` trains a ``hash_head`` beside the classifier and
    keeps, of that head, ITQ and the paper's hash, the one whose codes of the validation images
    retrieve the fit images best (:func:`select_encoder`); the choice and every candidate's
    validation mAP go to ``train_summary.json`` (``encoder``). ``"paper"`` is exactly Scheme 3
    (no hash head; gain ratio + sample-mean hash); ``"custom"`` is ``selector`` + ``hasher``.
    ``hash_head="auto"`` is ``"csq"`` for ``encoder`` auto or learned, else ``"none"``.
    ``mixup`` defaults to 0.4 in head mode with a hash head, else 0.
    ``augment`` and ``monitor`` default to ``"flip"`` and ``"val_map_loo"`` in head mode (``"none"``
    and ``"val_acc"`` in full mode, and ``"val_acc"`` for Ori without a hash head, whose
    head-only features do not train); see :func:`dfsnet.train.train_model`. ``refit`` trains the
    network again from the same initial weights on fit + validation images for the selected
    number of epochs, and gives that network the selected kind of encoder.

    Returns
    -------
    TrainingOutcome
    """
    import torch

    from dfsnet._io import atomic_write_text
    from dfsnet._validation import check_choice
    from dfsnet.data import Split, build_transforms, load_pool, make_split
    from dfsnet.features import maps_runtime
    from dfsnet.models import create_backbone, load_checkpoint, read_checkpoint_meta
    from dfsnet.train.evaluate import evaluate_accuracy

    out = Path(out_dir)
    if init and weights:
        raise InputError("init, weights: give one of them; init already holds the backbone weights")
    default_accelerator, default_devices = lightning_device(device)
    accelerator = accelerator or default_accelerator
    devices = default_devices if devices is None else devices
    if not split:  # a split that cannot be drawn fails now, naming every short class, before any model loads
        labels = load_pool(source, root=data, download=download)
        make_split(_protocol(split_protocol, labels), labels.targets, pool_sources=labels.sources, seed=seed,
                   val_fraction=val_fraction, class_names=labels.classes)
    # Every DDP process runs this; seeding first gives them all the same random init.
    torch.manual_seed(seed)
    if init:
        backbone_meta = read_checkpoint_meta(init)[0].backbone
    else:
        backbone_module = create_backbone(backbone, pretrained=pretrained and weights is None, weights=weights)
        backbone_meta = backbone_module.meta
    check_choice(encoder, ENCODERS, name="encoder")
    check_choice(hash_head, HASH_HEADS + ("auto",), name="hash_head")
    if hash_head == "auto":
        hash_head = "csq" if encoder in ("auto", "learned") else "none"
    if encoder == "learned" and hash_head == "none":
        raise InputError("encoder: 'learned' needs a hash head; pass hash_head csq or orthohash")
    n_bits_used = n_bits or DEFAULT_BITS
    hash_bits = None if hash_head == "none" else n_bits_used
    augment = augment or ("flip" if mode == "head" else "none")
    # Chosen on CIFAR-10's validation split: mixup helps the hash head, not the paper's hash.
    mixup = (0.4 if mode == "head" and hash_bits else 0.0) if mixup is None else mixup
    # Ori's head-only features (GAP of the frozen maps) do not train: only its hash head could.
    monitor = monitor or ("val_map_loo" if mode == "head" and (dfs or hash_bits) else "val_acc")
    fixed = {"custom": (selector, hasher, n_bits), "paper": ("gain_ratio", "sample_mean", n_bits_used),
             "itq": (None, "itq", n_bits_used)}.get(encoder)
    # Checked before any training: the settings of a fixed encoder, or the auto candidates' length.
    the_encoder = build_encoder(backbone_meta.feature_dim, selector=fixed[0], hasher=fixed[1], n_bits=fixed[2]) \
        if fixed else build_encoder(backbone_meta.feature_dim, selector="gain_ratio", n_bits=n_bits_used)
    size = image_size or backbone_meta.input_size[-1]
    pool = load_pool(source, root=data, download=download,
                     transform=build_transforms(backbone_meta, train=False, image_size=size))
    n_classes = len(pool.classes)
    if init:
        model, _ = load_checkpoint(init, expect={"backbone": backbone, "num_classes": n_classes, "dfs": dfs})
        if model.meta.class_names is not None and list(model.meta.class_names) != list(pool.classes):
            raise InputError(f"init: checkpoint {init} was made for the classes {list(model.meta.class_names)}, "
                             f"but the data has {list(pool.classes)}")
        if hash_bits is not None:  # a head-trained checkpoint has none: a fresh one, seeded
            torch.manual_seed(seed)
            model.hash = torch.nn.Linear(model.meta.feature_dim, hash_bits)
            model.meta = replace(model.meta, hash_bits=hash_bits)
    else:
        model = build_network(backbone_module, n_classes, dfs=dfs, dropout=dropout, class_names=pool.classes,
                              hash_bits=hash_bits, seed=seed)

    if split:
        the_split = Split.load(split, expect_fingerprint=pool.fingerprint())
    else:
        the_split = make_split(_protocol(split_protocol, pool), pool.targets, pool_sources=pool.sources, seed=seed,
                               val_fraction=val_fraction, pool_fingerprint=pool.fingerprint(),
                               class_names=pool.classes)
    if the_split.val.size == 0:
        raise InputError(f"val_fraction: the {the_split.protocol} split leaves no validation images "
                         f"({the_split.sizes()}); raise the validation fraction or use more images per class")
    check_encoder_fits(the_encoder, the_split.train.size)
    the_split.save(out / "split.json")
    fit_set, val_set = training_sets(pool, the_split, mode=mode, meta=backbone_meta, image_size=size)
    logger.info("training %s (%s, %s mode, %d px) on %d images, validating on %d; split %s %s",
                "DFS-Net" if dfs else "Ori", backbone_meta.name, mode, size, len(fit_set), len(val_set),
                the_split.protocol, the_split.sizes())
    # One runtime for the maps of every part, so the encoder is fitted on maps made as the training's;
    # chosen from the whole pool, as `dfsnet experiment` chooses it, so both train on the same maps.
    runtime = maps_runtime(len(pool), device=torch_device(device), precision=precision) \
        if mode == "head" else "auto"
    common = dict(mode=mode, seed=seed, progress=progress, lr=lr, weight_decay=weight_decay, optimizer=optimizer,
                  backbone_lr_mult=backbone_lr_mult, warmup_epochs=warmup_epochs, batch_size=batch_size,
                  resume=resume, accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
                  precision=precision, num_workers=num_workers, cache_dir=cache_dir, augment=augment,
                  hash_loss="csq" if hash_head == "none" else hash_head, hash_weight=hash_weight,
                  hash_lam=hash_lam, mixup=mixup, maps_runtime=runtime,
                  extra={"image_size": size, "source": source, "data": str(data) if data else None,
                         "split_protocol": the_split.protocol, "split_seed": the_split.seed})
    initial = copy.deepcopy(model.state_dict()) if refit else None
    result = train_network(model, fit_set, val_set, out_dir=out, epochs=epochs, patience=patience, monitor=monitor,
                           **common)
    outcome = TrainingOutcome(result=result, model=model, split=the_split)
    if not result.is_global_zero:  # another DDP process: rank zero fits and writes the encoder
        return outcome

    maps_dir = cache_dir or out / "cache"
    feats = {part: part_features(model, the_split.subset(pool, part), mode=mode, maps_cache_dir=maps_dir,
                                 batch_size=batch_size, num_workers=num_workers, device=device, precision=precision,
                                 runtime=runtime, progress=progress) for part in ("fit", "val")}
    record: dict[str, Any] = {"choice": encoder, "selected_on": None, "n_bits": None, "candidates": {}}
    choice = encoder
    if encoder == "auto":
        candidates = encoder_candidates(model.meta.feature_dim, n_bits_used, n_train=feats["fit"][0].shape[0],
                                        learned=result.hasher)
        choice, record["candidates"] = select_encoder(candidates, feats["fit"], feats["val"])
        record.update(choice=choice, selected_on="validation")
        logger.info("encoder: %s has the best validation mAP@%d (%.4f) of %s", choice,
                    record["candidates"][choice]["k"], record["candidates"][choice]["map_at_k"],
                    ", ".join(candidates))
    epochs_run, val_acc = result.epochs_run, result.best_val_acc
    if refit:
        refit_epochs = max(1, result.best_epoch + 1)
        model.load_state_dict(initial)
        logger.info("refit: training again on the fit + validation images for %d epoch(s)", refit_epochs)
        train_tf = build_transforms(backbone_meta, train=True, image_size=size) if mode == "full" else None
        train_set = the_split.subset(pool, "train", transform=train_tf)
        result = train_network(model, train_set, val_set, out_dir=out / "refit", epochs=refit_epochs,
                               patience=None, monitor="val_acc", **common)
        outcome.result = result
        feats = {"train": part_features(model, the_split.subset(pool, "train"), mode=mode, maps_cache_dir=maps_dir,
                                        batch_size=batch_size, num_workers=num_workers, device=device,
                                        precision=precision, runtime=runtime, progress=progress)}
        # The refitted network is the one to index with; the selection stands.
        os.replace(result.checkpoint, out / "model.safetensors")
        result.checkpoint = out / "model.safetensors"
    features = np.concatenate([f for f, _ in feats.values()])
    labels = np.concatenate([y for _, y in feats.values()])
    if choice == "learned":
        if result.hasher is None:
            raise InputError("encoder: 'learned' needs a hash head; this network was trained without one")
        final = fitted_encoder(result.hasher)
    elif choice in ("itq", "paper"):
        final = encoder_candidates(model.meta.feature_dim, n_bits_used, n_train=features.shape[0])[choice]
    else:
        final = the_encoder
    if not hasattr(final, "n_bits_"):  # fitted on the train part (fit + val), as in the paper
        check_encoder_fits(final, features.shape[0])
        final.fit(features, labels)
    final.save(out / "encoder.npz")
    if result.hasher is not None:  # kept whatever was chosen: one file away for index build
        fitted_encoder(result.hasher).save(out / "hash_head.npz")
    record["n_bits"] = int(final.n_bits_)
    outcome.encoder, outcome.n_encoder_images = final, int(features.shape[0])
    summary: dict[str, Any] = {"val_acc": val_acc, "epochs": epochs_run,
                               "seconds": result.seconds, "precision": result.precision,
                               "monitor": monitor, "augment": augment, "mixup": mixup, "hash_head": hash_head,
                               "val_map": None if result.best_val_map != result.best_val_map else result.best_val_map,
                               "encoder": record}
    if refit:
        summary["refit_epochs"] = result.epochs_run
    if eval_queries and the_split.query.size:
        summary["query_acc"] = evaluate_accuracy(model, the_split.subset(pool, "query"), batch_size=batch_size,
                                                 num_workers=num_workers, device=torch_device(device),
                                                 progress=progress)
    atomic_write_text(out / "train_summary.json", json.dumps(summary, indent=2) + "\n")
    outcome.summary = summary
    return outcome
