"""``train_model``: fine-tune a DFS-Net (or its "Ori" baseline) with Lightning.

Layout of ``out_dir``::

    model.safetensors        the best model (highest monitored validation metric), without its hash
                             layer, which is returned as TrainResult.hasher (a LinearHasher)
    train_config.json        settings a resumed run must share with the first one
    checkpoints/last.ckpt    Lightning checkpoint after the latest epoch (resume point)
    checkpoints/best.ckpt    Lightning checkpoint of the best epoch
    logs/version_N/metrics.csv   CSVLogger, one version per call
    cache/                   head mode: the frozen backbone's feature maps (unless cache_dir)

Lightning checkpoints hold optimizer and loop state and are pickles. They are only ever read
from ``out_dir/checkpoints``, where this trainer wrote them, and with
``torch.load(weights_only=True)`` (tensors and primitive containers only). Model files that
users exchange are the safetensors ones.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dfsnet._io import atomic_write_text
from dfsnet._validation import check_choice, check_positive_int
from dfsnet.errors import InputError, InputTypeError
from dfsnet.features.fingerprint import dataset_fingerprint, module_fingerprint
from dfsnet.models.checkpoint import MODEL_FILE
from dfsnet.precision import DEFAULT_PRECISION, resolve_training_precision
from dfsnet.train.workflow import MODES

__all__ = ["TrainResult", "train_model"]

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "sgd")
CONFIG_FILE = "train_config.json"
# Settings that must not change when a run is resumed (learning rate and epochs may).
_RESUME_KEYS = ("mode", "backbone", "num_classes", "dfs", "reduce_channels", "optimizer",
                "backbone_weights", "train_data", "val_data", "hash_bits", "hash_loss", "augment", "monitor",
                "mixup")


@dataclass
class TrainResult:
    """Outcome of :func:`train_model`.

    Attributes
    ----------
    checkpoint : Path
        ``out_dir/model.safetensors``: the best model, for :func:`dfsnet.models.load_checkpoint`.
    best_val_acc : float
        Top-1 validation accuracy of that model.
    history : list of dict
        One entry per completed epoch, earlier runs of a resumed training included (keys:
        ``epoch``, ``train_loss``, ``train_acc``, ``val_loss``, ``val_acc``, ``lr``,
        ``seconds``, ``train_seconds``).
    seconds : float
        Wall time of this call.
    epochs_run : int
        Epochs completed in total (``len(history)``), counting those of resumed runs.
    start_epoch : int
        Epochs already completed when this call started (0 for a fresh run).
    cache_seconds : float
        Head mode: time this call spent computing feature maps (0.0 on a cache hit).
    stopped_early : bool
        Early stopping ended the training before ``epochs``.
    is_global_zero : bool
        False in the other processes of a distributed (DDP) run, which should not write shared
        outputs; the checkpoint is written by the global-zero process.
    precision : str
        What the training ran in: "fp32" or "bf16".
    best_epoch : int
        0-based epoch of the exported model (-1 when none was scored).
    best_val_map : float
        The monitored validation mAP of that model (NaN under ``monitor="val_acc"``).
    hasher : LinearHasher or None
        The trained hash head of a model with one ``hash_bits`` width, on its pooled features.
    hashers : dict of int to LinearHasher
        Every hash head by code length (empty without a hash layer).
    """

    checkpoint: Path
    best_val_acc: float
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    epochs_run: int = 0
    start_epoch: int = 0
    cache_seconds: float = 0.0
    stopped_early: bool = False
    is_global_zero: bool = True
    precision: str = "fp32"
    best_epoch: int = -1
    best_val_map: float = float("nan")
    hasher: Any = None
    hashers: dict = field(default_factory=dict)


def train_model(
    model,
    train_set,
    val_set,
    *,
    mode: str = "head",
    epochs: int = 10,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    optimizer: str = "adamw",
    momentum: float = 0.9,
    backbone_lr_mult: float = 0.1,
    warmup_epochs: float = 0.0,
    batch_size: int = 64,
    out_dir,
    resume: bool = True,
    patience: int | None = 5,
    accelerator: str = "auto",
    devices="auto",
    num_nodes: int = 1,
    strategy="auto",
    precision: str = DEFAULT_PRECISION,
    num_workers: int = 0,
    cache_dir=None,
    progress: bool = True,
    seed: int = 0,
    extra: Mapping[str, Any] | None = None,
    augment: str = "none",
    monitor: str = "val_acc",
    hash_loss: str = "csq",
    hash_weight: float = 1.0,
    hash_lam: float = 1e-4,
    mixup: float = 0.0,
    maps_runtime: str = "auto",
) -> TrainResult:
    """Train ``model`` for classification and export the best epoch to ``out_dir/model.safetensors``.

    Parameters
    ----------
    model : dfsnet.models.DFSNet
        Trained in place; on return it holds the weights of the best epoch, on the CPU.
    train_set, val_set : torch Dataset
        Items ``(image float (3, H, W), label)``, ``None`` for an unreadable image (skipped).
        ``val_set`` is carved from the training data (e.g. ``Split.val``), never from the
        queries. In ``"full"`` mode ``train_set`` should carry the training augmentation
        (``build_transforms(..., train=True)``); in ``"head"`` mode both should use the
        evaluation transform, since each image's maps are computed once and reused every epoch.
    mode : {"head", "full"}
        ``"head"``: the backbone is frozen, its feature maps for both sets are computed once
        into a float16 cache, and the part after it (DFS module, pooling, dropout, classifier;
        or pooling and classifier for ``dfs=False``) trains on them, without augmentation and
        without a backbone pass per epoch, which makes it practical on a CPU
        (``benchmarks/bench_head_epoch.py`` times it). ``"full"``: every layer is fine-tuned on
        images with augmentation, as in the paper.
    epochs : int
        Total epochs; a resumed run continues up to this number.
    lr, weight_decay, optimizer, momentum
        AdamW or SGD (Nesterov momentum); biases and norm weights get no weight decay.
        The learning rate follows a per-step cosine decay to zero after ``warmup_epochs`` of
        linear warm-up.
    backbone_lr_mult : float
        ``"full"`` mode: the backbone's learning rate is ``lr * backbone_lr_mult`` (0.1 keeps
        pretrained features from being destroyed by a head-sized rate; 1.0 trains all alike).
    batch_size : int
    out_dir : path
        See the module docstring for its layout.
    resume : bool
        Continue from ``out_dir/checkpoints/last.ckpt`` if present (settings in
        ``_RESUME_KEYS`` must match); ``False`` starts over and replaces the old checkpoints.
    patience : int or None
        Early stopping: stop after this many epochs without a better val accuracy; ``None``
        disables it.
    accelerator, devices, num_nodes, strategy
        Passed to ``lightning.Trainer``: e.g. ``devices=4`` or ``strategy="ddp"`` trains on
        several GPUs and ``num_nodes`` on several machines (launch with ``torchrun`` or SLURM),
        with no other change. As always with DDP, every process must build the same model
        (seed before creating a randomly initialised one). Head mode computes the maps once per
        node (``prepare_data``), so a cache folder on a shared file system is computed once.
    precision : {"auto", "fp32", "bf16"}
        See :func:`dfsnet.precision.resolve_training_precision` (on a CPU, ``"auto"`` trains
        the full network in fp32 with channels_last, where it measured fastest, and heads in
        bf16 where native): bf16 runs as Lightning's ``"bf16-mixed"`` (autocast). The resolved
        name is recorded in the result and in ``train_config.json``. The head mode's maps are
        extracted under ``precision`` as given (see :func:`dfsnet.features.cached_feature_maps`).
    num_workers : int
        DataLoader workers for reading images (head mode: while caching; full mode: always).
    cache_dir : path, optional
        Head mode feature-map cache; default ``out_dir/cache``.
    maps_runtime : {"auto", "torch", "onnx"}
        Head mode: the runtime of the frozen backbone's maps. Give the one of
        :func:`dfsnet.features.maps_runtime` for the whole setting, so the maps the head trains on
        are computed as those of the images it later encodes.
    progress : bool
        Progress bars for caching and epochs.
    seed : int
        Seeds Python, numpy and torch (and the DataLoader workers).
    extra : mapping, optional
        JSON-serialisable items added to the exported checkpoint's ``extra`` (e.g. the image
        size and the split), beside ``val_acc``, ``epochs``, ``best_epoch``, ``mode``,
        ``optimizer``, ``lr``.
    augment : {"none", "flip", "flip_image"}
        Head mode: see :data:`dfsnet.train.module.AUGMENTS` (full mode augments through the
        dataset's transform; anything but "none" is refused there).
    monitor : {"val_acc", "val_map", "val_map_loo"}
        What selects the best epoch and drives early stopping; ``"val_map"`` (head mode) is the
        validation images' retrieval mAP against the training images (on the hash codes when
        the model has a hash layer), ``"val_map_loo"`` (either mode) their mAP against each
        other (see :class:`dfsnet.train.module.DFSNetTask`).
    hash_loss : {"csq", "orthohash"}
        Loss of the hash layer of a model built with ``hash_bits``, added to the cross-entropy
        with weight ``hash_weight``; ``hash_lam`` weighs its quantisation term.
    mixup : float
        Beta(mixup, mixup) mixup of training inputs (maps in head mode) and their losses; 0 = off.

    Returns
    -------
    TrainResult
    """
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from dfsnet.models import DFSNet, save_checkpoint
    from dfsnet.train.module import DFSNetTask, History, ImagesDataModule, MapsDataModule

    start = time.perf_counter()
    if not isinstance(model, DFSNet):
        raise InputTypeError(f"model: expected a dfsnet.models.DFSNet, got {type(model).__name__}")
    check_choice(mode, MODES, name="mode")
    check_choice(optimizer, OPTIMIZERS, name="optimizer")
    epochs = check_positive_int(epochs, name="epochs")
    batch_size = check_positive_int(batch_size, name="batch_size")
    num_nodes = check_positive_int(num_nodes, name="num_nodes")
    for name, value in (("lr", lr), ("weight_decay", weight_decay), ("momentum", momentum),
                        ("backbone_lr_mult", backbone_lr_mult), ("warmup_epochs", warmup_epochs)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise InputError(f"{name}: expected a finite non-negative number, got {value!r}")
    if lr <= 0:
        raise InputError(f"lr: expected a positive learning rate, got {lr!r}")
    if patience is not None:
        patience = check_positive_int(patience, name="patience")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise InputError(f"num_workers: expected an integer >= 0, got {num_workers!r}")
    for name, ds in (("train_set", train_set), ("val_set", val_set)):
        if ds is None or len(ds) == 0:
            raise InputError(f"{name}: expected a non-empty dataset, got "
                             f"{'None' if ds is None else 'an empty one'}")
        _check_label_range(ds, model.meta.num_classes, name)
    from dfsnet.hashing.learned import HASH_LOSSES
    from dfsnet.runtime import RUNTIMES
    from dfsnet.train.module import AUGMENTS
    from dfsnet.train.workflow import MONITORS

    check_choice(augment, AUGMENTS, name="augment")
    check_choice(monitor, MONITORS, name="monitor")
    check_choice(hash_loss, HASH_LOSSES, name="hash_loss")
    if mode == "full" and augment != "none":
        raise InputError(f"augment: {augment!r} is a head-mode option; full mode augments through the training "
                         "set's transform")
    if mode == "full" and monitor == "val_map":
        raise InputError("monitor: 'val_map' ranks against the cached maps of head mode; full mode monitors "
                         "val_acc or val_map_loo")
    if monitor == "val_map_loo" and len(val_set) < 2:
        raise InputError(f"val_set: monitor 'val_map_loo' ranks the validation images against each other; "
                         f"expected at least 2, got {len(val_set)}")
    check_choice(maps_runtime, RUNTIMES, name="maps_runtime")
    for name, value in (("hash_weight", hash_weight), ("hash_lam", hash_lam), ("mixup", mixup)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise InputError(f"{name}: expected a finite non-negative number, got {value!r}")
    if mode == "head" and "Random" in repr(getattr(train_set, "transform", None)):
        logger.warning("train_set: a random (augmenting) transform in head mode is applied once and frozen "
                       "into the feature-map cache; use the evaluation transform")

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"out_dir: expected a folder, but {out_dir} is a file")
    ckpt_dir = out_dir / "checkpoints"
    last_ckpt, best_ckpt = ckpt_dir / "last.ckpt", ckpt_dir / "best.ckpt"
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    prec = resolve_training_precision(precision, "cuda" if on_gpu else "cpu", mode=mode)
    config = _config(model, train_set, val_set, mode=mode, optimizer=optimizer, lr=lr,
                     weight_decay=weight_decay, batch_size=batch_size, epochs=epochs, precision=prec.name,
                     augment=augment, monitor=monitor, mixup=mixup, hash_bits=list(model.hash_widths) or None,
                     hash_loss=hash_loss if model.meta.hash_bits else None, maps_runtime=maps_runtime)
    resuming = resume and last_ckpt.is_file()
    if resuming:
        _check_resumable(out_dir / CONFIG_FILE, config)
    else:
        for stale in (last_ckpt, best_ckpt):
            stale.unlink(missing_ok=True)
    atomic_write_text(out_dir / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n")

    state = _peek(last_ckpt) if resuming else {"epochs": [], "stopped": False}
    start_epoch = len(state["epochs"])

    # Head mode freezes the backbone and full mode unfreezes everything; the caller's
    # requires_grad flags are restored afterwards.
    requires_grad = [p.requires_grad for p in model.parameters()]
    try:
        task = DFSNetTask(model, mode=mode, optimizer=optimizer, lr=lr, weight_decay=weight_decay,
                          momentum=momentum, backbone_lr_mult=backbone_lr_mult, warmup_epochs=warmup_epochs,
                          channels_last=prec.channels_last, augment=augment,
                          hash_loss=hash_loss,
                          hash_weight=hash_weight, hash_lam=hash_lam, monitor=monitor, mixup=mixup)
        if mode == "head":
            data = MapsDataModule(model.backbone, train_set, val_set, cache_dir=cache_dir or out_dir / "cache",
                                  batch_size=batch_size, extract_batch_size=max(batch_size, 64),
                                  num_workers=num_workers, progress=progress, precision=precision,
                                  runtime=maps_runtime, flip_image=augment == "flip_image")
        else:
            data = ImagesDataModule(train_set, val_set, batch_size=batch_size, num_workers=num_workers,
                                    pin_memory=on_gpu)
        history = History()
        # Two checkpoint callbacks: since Lightning 2.6 a monitored ModelCheckpoint refreshes
        # last.ckpt only in epochs that improved the metric, which would resume from a stale epoch.
        # Both save at the end of the training epoch, after History has recorded it.
        best_cb = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=monitor, mode="max", save_top_k=1,
                                  save_on_train_epoch_end=True, enable_version_counter=False,
                                  auto_insert_metric_name=False)
        last_cb = ModelCheckpoint(dirpath=ckpt_dir, filename="last", save_top_k=1, save_on_train_epoch_end=True,
                                  enable_version_counter=False)
        callbacks = [history, best_cb, last_cb]
        if patience is not None:
            callbacks.append(EarlyStopping(monitor=monitor, mode="max", patience=patience,
                                           check_on_train_epoch_end=True))
        L.seed_everything(seed, workers=True, verbose=False)
        trainer = L.Trainer(
            max_epochs=epochs, accelerator=accelerator, devices=devices, num_nodes=num_nodes,
            strategy=strategy, precision=prec.lightning(), callbacks=callbacks,
            logger=CSVLogger(out_dir, name="logs"), default_root_dir=out_dir,
            enable_progress_bar=progress, enable_model_summary=False, num_sanity_val_steps=0,
            log_every_n_steps=1,
        )
        if state["stopped"] or start_epoch >= epochs:
            logger.info("training in %s already finished after %d epochs; exporting its best model",
                        out_dir, start_epoch)
            history.epochs = state["epochs"]
        else:
            with warnings.catch_warnings():
                # Head batches come from an in-memory map; a worker pool would only add overhead.
                warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
                # Intentional: the frozen backbone stays in eval mode; a resumed run reuses its folder.
                warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
                warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")
                # Raised inside Lightning itself with this torch; nothing a caller can act on.
                warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
                trainer.fit(task, datamodule=data, ckpt_path=last_ckpt if resuming else None,
                            weights_only=True if resuming else None)
    finally:
        for p, flag in zip(model.parameters(), requires_grad):
            p.requires_grad_(flag)
        if prec.channels_last:  # set by the task; callers expect the default layout
            model.to(memory_format=torch.contiguous_format)

    best_state = torch.load(best_ckpt, map_location="cpu", weights_only=True)
    model.load_state_dict({k.removeprefix("model."): v for k, v in best_state["state_dict"].items()
                           if k.startswith("model.")})
    model.cpu()
    scored = [e for e in history.epochs if e.get(monitor, float("nan")) == e.get(monitor, float("nan"))]
    # The first of equal epochs, as ModelCheckpoint keeps it.
    best = max(scored, key=lambda e: e[monitor]) if scored else {"val_acc": float("nan"), "epoch": -1}
    best_map = float(best.get(monitor, float("nan"))) if monitor != "val_acc" else float("nan")
    stopped = state["stopped"] or (0 < len(history.epochs) < epochs and trainer.should_stop)
    path = out_dir / MODEL_FILE
    hashers = model.export_hashers()
    if hashers:
        # The exported network is a plain DFSNet (any dfsnet loads it); its hash heads travel as
        # LinearHashers on its pooled features, which the caller saves as encoders.
        layer, bits = model.hash, model.meta.hash_bits
    if trainer.is_global_zero:
        try:
            if hashers:
                model.without_hash()
            save_checkpoint(model, path, extra={
                **dict(extra or {}), "val_acc": best["val_acc"], "best_epoch": best["epoch"],
                "epochs": len(history.epochs), "mode": mode, "optimizer": optimizer, "lr": lr,
                "precision": prec.name, "monitor": monitor, "val_map": best_map if best_map == best_map else None,
                "augment": augment, "mixup": mixup,
                **({"hash_bits": list(hashers), "hash_loss": hash_loss} if hashers else {}),
            })
        finally:
            if hashers:
                model.hash = layer
                model.meta = dataclasses.replace(model.meta, hash_bits=bits)
    trainer.strategy.barrier("dfsnet-export")
    return TrainResult(
        checkpoint=path, best_val_acc=float(best["val_acc"]), history=[dict(e) for e in history.epochs],
        seconds=time.perf_counter() - start, epochs_run=len(history.epochs), start_epoch=start_epoch,
        cache_seconds=getattr(data, "cache_seconds", 0.0), stopped_early=bool(stopped),
        is_global_zero=trainer.is_global_zero, precision=prec.name, best_epoch=int(best["epoch"]),
        best_val_map=best_map, hashers=hashers,
        hasher=next(iter(hashers.values())) if len(hashers) == 1 else None,
    )


def _config(model, train_set, val_set, **settings) -> dict:
    config = {
        **settings,
        "backbone": model.meta.timm_name,
        "num_classes": model.meta.num_classes,
        "dfs": model.meta.dfs,
        "reduce_channels": model.meta.reduce_channels,
        "train_data": dataset_fingerprint(train_set),
        "val_data": dataset_fingerprint(val_set),
    }
    if settings["mode"] == "head":
        # The cached maps come from the backbone given now; a resumed run must get the same one.
        config["backbone_weights"] = module_fingerprint(model.backbone)
    else:
        config.pop("maps_runtime", None)
    return config


def _check_resumable(path: Path, config: dict) -> None:
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        previous = None
    if not isinstance(previous, dict):
        raise InputError(f"resume: {path.parent} has a checkpoint but no readable {CONFIG_FILE}; "
                         "pass resume=False (--no-resume) to start over")
    changed = [f"{k}: {previous.get(k)!r} -> {config.get(k)!r}" for k in _RESUME_KEYS
               if previous.get(k) != config.get(k)]
    if changed:
        raise InputError(f"resume: the run in {path.parent} was made with other settings ({'; '.join(changed)}); "
                         "use another output folder or resume=False (--no-resume) to start over")


def _check_label_range(dataset, num_classes: int, name: str) -> None:
    """Refuse labels outside ``[0, num_classes)`` before training (they would fail deep inside
    the loss); datasets without ``targets`` are checked by the loss alone."""
    targets = getattr(dataset, "targets", None)
    if targets is None:
        return
    targets = np.asarray(targets)
    if targets.size and (targets.min() < 0 or targets.max() >= num_classes):
        raise InputError(f"{name}: expected class labels in [0, {num_classes}) for a model with "
                         f"num_classes={num_classes}, found labels in [{targets.min()}, {targets.max()}]")


def _peek(last_ckpt: Path) -> dict:
    """History and early-stop flag of the run saved in ``last_ckpt`` (a file this trainer wrote)."""
    try:
        ckpt = torch.load(last_ckpt, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 -- a truncated file fails in many ways inside torch
        raise InputError(f"resume: {last_ckpt} is unreadable ({type(exc).__name__}: {exc}); pass "
                         "resume=False (--no-resume) to start over") from None
    callbacks = ckpt.get("callbacks", {})
    epochs = next((s.get("epochs", []) for k, s in callbacks.items() if k.startswith("History")), [])
    stopped = any(s.get("stopped_epoch", 0) > 0 for k, s in callbacks.items() if k.startswith("EarlyStopping"))
    return {"epochs": [dict(e) for e in epochs], "stopped": stopped}
