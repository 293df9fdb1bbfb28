"""The Lightning pieces behind :func:`dfsnet.train.train_model`."""
from __future__ import annotations

import logging
import math
import time

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import MulticlassAccuracy

from dfsnet.errors import InputError
from dfsnet.features.maps import FeatureMaps, cached_feature_maps
from dfsnet.train.workflow import MONITORS, validation_cutoff

logger = logging.getLogger(__name__)

#: Head-mode augmentations: none; ``flip``: mirror a random half of each batch of cached maps
#: along their width; ``flip_image``: also cache the maps of the horizontally flipped training
#: images and draw each item's map from the two at random.
AUGMENTS = ("none", "flip", "flip_image")
#: Cut-off of the validation mAP (capped at the number of training images).
VAL_MAP_K = 1000
#: Validation images scored by ``val_map_loo`` at most (evenly spaced past it).
VAL_LOO_MAX = 4000


class DFSNetTask(L.LightningModule):
    """Classification training of a :class:`dfsnet.models.DFSNet`.

    Cross-entropy on the logits, micro top-1 accuracy, and a per-step learning-rate schedule:
    linear warm-up over ``warmup_epochs``, then cosine decay to zero at the last step.

    In ``mode="head"`` the batches are cached backbone feature maps (float16, from
    :class:`MapsDataModule`) and only ``model.head_forward`` runs; the backbone is frozen
    (``requires_grad=False``, eval mode). In ``mode="full"`` every layer trains on images;
    backbone parameters get ``lr * backbone_lr_mult``.
    Biases and normalisation weights (1-D parameters) are exempt from weight decay.

    A model with a hash layer (``hash_bits``) adds ``hash_weight * hash_loss(...)`` of
    :func:`dfsnet.hashing.learned.hash_loss` towards its class centres to the cross-entropy.
    ``augment="flip"`` (head mode) mirrors a random half of each training batch of maps along
    their width. ``monitor="val_map"`` (head mode) scores every validation epoch by the mAP of
    the validation images as queries against the training images: Hamming on the hash codes
    when the model has a hash layer (the mean over its heads), else Euclidean on the pooled
    features. ``monitor="val_map_loo"`` (either mode) scores the validation images against each other instead
    (each image's own match left out) by mAP at the top 2 %, as ``dfsnet train`` scores its
    encoder candidates (:func:`dfsnet.train.workflow.select_encoder`), but with ties at their
    expected order (the encoder choice takes the stored order; the monitor was measured so): the
    network has fitted its training images (their codes sit on the class centres), so only there
    are both sides unseen, as queries and database are in use. ``mixup=alpha > 0``
    trains on convex mixtures of pairs of inputs (weight drawn from Beta(alpha, alpha)) against
    the same mixture of their two losses.
    """

    def __init__(self, model: nn.Module, *, mode: str, optimizer: str, lr: float, weight_decay: float,
                 momentum: float = 0.9, backbone_lr_mult: float = 1.0, warmup_epochs: float = 0.0,
                 channels_last: bool = False, augment: str = "none", hash_loss: str = "csq",
                 hash_weight: float = 1.0, hash_lam: float = 1e-4, monitor: str = "val_acc",
                 mixup: float = 0.0):
        super().__init__()
        self.mixup = mixup
        from dfsnet.hashing.learned import hash_centres

        self.augment = augment
        self.hash_loss_name = hash_loss
        self.hash_weight = hash_weight
        self.hash_lam = hash_lam
        self.monitor = monitor
        self._val_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        # One set of class centres per hash head (output chunk of the hash layer).
        self.widths = model.hash_widths
        for i, b in enumerate(self.widths):
            self.register_buffer(f"centres_{i}", torch.from_numpy(hash_centres(model.meta.num_classes, b)),
                                 persistent=False)
        self.model = model
        # bf16 on a CPU: oneDNN's convolutions want channels_last weights and inputs.
        self.channels_last = channels_last
        if channels_last:
            model.to(memory_format=torch.channels_last)
        self.mode = mode
        self.optimizer_name = optimizer
        self.lr = lr
        self.weight_decay = weight_decay
        self.momentum = momentum
        self.backbone_lr_mult = backbone_lr_mult
        self.warmup_epochs = warmup_epochs
        self.criterion = nn.CrossEntropyLoss()
        n = model.meta.num_classes
        self.train_acc = MulticlassAccuracy(num_classes=n, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=n, average="micro")
        if mode == "head":
            model.backbone.requires_grad_(False)
            model.backbone.eval()
        else:
            model.requires_grad_(True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``(logits, hash outputs or None, pooled features)`` of images (full mode) or maps (head mode)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        fmap = x.float() if self.mode == "head" else self.model.backbone(x)
        feats = self.model.head_features(fmap)
        codes = None if self.model.hash is None else self.model.hash(feats)
        return self.model.fc(self.model.dropout(feats)), codes, feats

    def on_train_epoch_start(self) -> None:
        if self.mode == "head":
            # Lightning puts the whole module in train mode every epoch; the frozen backbone's
            # BatchNorm statistics must stay those the cached maps were computed with.
            self.model.backbone.eval()

    def _step(self, batch, stage: str):
        if batch is None:  # every image of the batch was unreadable (collate_skip_none)
            return None
        x, y = batch
        if stage == "train" and self.mode == "head" and self.augment == "flip":
            flip = torch.rand(x.shape[0], device=x.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        mix = None
        if stage == "train" and self.mixup > 0 and x.shape[0] > 1:
            weight = float(torch.distributions.Beta(self.mixup, self.mixup).sample())
            perm = torch.randperm(x.shape[0], device=x.device)
            x = weight * x.float() + (1.0 - weight) * x.float()[perm]
            mix = (weight, perm)
        logits, codes, feats = self(x)
        loss = self._loss(logits, codes, y)
        if mix is not None:  # both losses are linear in the target: mixing them mixes the targets
            loss = mix[0] * loss + (1.0 - mix[0]) * self._loss(logits, codes, y[mix[1]])
        if stage == "val" and self.monitor != "val_acc":
            self._val_outputs.append(((feats if codes is None else codes).detach().float().cpu(), y.cpu()))
        accuracy = self.train_acc if stage == "train" else self.val_acc
        accuracy(logits, y)
        n = int(y.shape[0])
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=n)
        self.log(f"{stage}_acc", accuracy, on_step=False, on_epoch=True, prog_bar=True, batch_size=n)
        return loss

    def _loss(self, logits: torch.Tensor, codes: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        loss = self.criterion(logits, y)
        if codes is not None:
            from dfsnet.hashing.learned import hash_loss

            chunks = codes.split(list(self.widths), dim=1)
            loss = loss + self.hash_weight / len(chunks) * sum(
                hash_loss(u, getattr(self, f"centres_{i}"), y, loss=self.hash_loss_name, lam=self.hash_lam)
                for i, u in enumerate(chunks))
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def on_validation_epoch_start(self) -> None:
        self._val_outputs = []

    def on_validation_epoch_end(self) -> None:
        if self.monitor == "val_acc" or not self._val_outputs:
            return
        self.log(self.monitor, self._val_map(), on_step=False, on_epoch=True, prog_bar=True)
        self._val_outputs = []

    @torch.no_grad()
    def _val_map(self) -> float:
        """The monitored validation mAP of this epoch's validation outputs (eval mode)."""
        from dfsnet.eval.metrics import euclidean_map, hamming_map, leave_one_out_map

        val = torch.cat([v for v, _ in self._val_outputs]).numpy()
        val_y = torch.cat([y for _, y in self._val_outputs]).numpy()
        hashed = self.model.hash is not None
        bounds = np.cumsum((0, *self.widths)) if hashed else np.array([0, val.shape[1]])
        heads = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        if self.monitor == "val_map_loo":
            if len(val_y) < 2:
                raise InputError(f"val_set: {len(val_y)} validation image(s) could be loaded; monitor "
                                 "'val_map_loo' ranks them against each other and needs at least 2")
            # Every n-th validation image past VAL_LOO_MAX keeps the n x n distances bounded.
            rows = np.linspace(0, len(val_y) - 1, min(len(val_y), VAL_LOO_MAX)).round().astype(np.int64)
            val, val_y = val[rows].astype(np.float64), val_y[rows]
            if hashed:  # for +-1 codes s, Hamming distance = (b - s . s') / 2, exact in float64
                signs = [np.where(val[:, h] >= 0, 1.0, -1.0) for h in heads]
                dist = [(s.shape[1] - s @ s.T) / 2.0 for s in signs]
            else:
                sq = (val ** 2).sum(axis=1)
                dist = [np.maximum(sq[:, None] + sq[None] - 2.0 * val @ val.T, 0.0)]
            # Scored as dfsnet train's encoder choice scores its candidates (select_encoder).
            k = validation_cutoff(len(val_y))
            # Several hash heads: the mean of their mAPs.
            return float(np.mean([leave_one_out_map(d, val_y, k=k, ties="expected") for d in dist]))
        train_maps = self.trainer.datamodule.maps["train"]
        rows = np.flatnonzero(train_maps.ok)
        out = []
        for start in range(0, rows.size, 512):
            x = torch.from_numpy(np.asarray(train_maps.maps[rows[start:start + 512]])).to(self.device).float()
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            feats = self.model.head_features(x)
            out.append((self.model.hash(feats) if hashed else feats).float().cpu())
        train = torch.cat(out).numpy()
        train_y = train_maps.labels[rows]
        k = min(VAL_MAP_K, train.shape[0])
        if not hashed:
            return float(euclidean_map(val, train, val_y, train_y, k=k).map)
        pack = lambda u: np.packbits(u >= 0, axis=1, bitorder="big")  # noqa: E731
        return float(np.mean([hamming_map(pack(val[:, h]), pack(train[:, h]), val_y, train_y, k=k).map
                              for h in heads]))

    def configure_optimizers(self):
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                groups.setdefault((name.startswith("backbone."), p.ndim <= 1), []).append(p)
        # Head groups first, so param_groups[0] carries the head's learning rate.
        param_groups = [
            {"params": params, "lr": self.lr * (self.backbone_lr_mult if in_backbone else 1.0),
             "weight_decay": 0.0 if no_decay else self.weight_decay}
            for (in_backbone, no_decay), params in sorted(groups.items())
        ]
        if self.optimizer_name == "sgd":
            opt = torch.optim.SGD(param_groups, lr=self.lr, momentum=self.momentum, nesterov=self.momentum > 0)
        else:
            opt = torch.optim.AdamW(param_groups, lr=self.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(round(self.warmup_epochs * total / max(1, self.trainer.max_epochs)))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class History(L.Callback):
    """Per-epoch metrics, kept in the Lightning checkpoint so a resumed run continues the list.

    Entries: ``epoch`` (0-based), ``train_loss``, ``train_acc``, ``val_loss``, ``val_acc``,
    ``val_map`` or ``val_map_loo`` (only when the task monitors it),
    ``lr`` (head learning rate at the epoch's end), ``seconds`` (training + validation) and
    ``train_seconds`` (training only).
    """

    def __init__(self):
        self.epochs: list[dict] = []
        self._start = self._val_start = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = self._val_start = time.perf_counter()

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._val_start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # Runs before the (monitoring) checkpoint callback saves, so last.ckpt includes this epoch.
        now = time.perf_counter()
        entry = {"epoch": int(trainer.current_epoch)}
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            value = trainer.callback_metrics.get(key)
            entry[key] = float(value) if value is not None else float("nan")
        for key in MONITORS[1:]:
            if key in trainer.callback_metrics:
                entry[key] = float(trainer.callback_metrics[key])
        entry["lr"] = float(trainer.optimizers[0].param_groups[0]["lr"])
        entry["seconds"] = now - self._start
        entry["train_seconds"] = (self._val_start if self._val_start > self._start else now) - self._start
        self.epochs.append(entry)
        if trainer.is_global_zero:
            logger.info("epoch %d: train_loss %.4f train_acc %.4f val_loss %.4f val_acc %.4f%s (%.1f s)",
                        entry["epoch"], entry["train_loss"], entry["train_acc"], entry["val_loss"],
                        entry["val_acc"], "".join(f" {k} {entry[k]:.4f}" for k in MONITORS[1:] if k in entry),
                        entry["seconds"])

    def state_dict(self) -> dict:
        return {"epochs": [dict(e) for e in self.epochs]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.epochs = [dict(e) for e in state_dict.get("epochs", [])]


class _MapsDataset(Dataset):
    """Rows of cached feature maps whose images loaded: ``(float16 (C, h, w), label)``.

    With ``flipped`` (the maps of the mirrored images, same rows), each item is drawn from
    one of the two at random (torch's RNG, so seeded runs repeat).
    """

    def __init__(self, maps: FeatureMaps, flipped: FeatureMaps | None = None):
        self.maps = maps.maps
        self.flipped = None if flipped is None else flipped.maps
        self.labels = maps.labels
        ok = maps.ok if flipped is None else maps.ok & flipped.ok
        self.rows = np.flatnonzero(ok)

    def __len__(self) -> int:
        return int(self.rows.size)

    def __getitem__(self, i):
        j = self.rows[i]
        source = self.maps
        if self.flipped is not None and bool(torch.rand(()) < 0.5):
            source = self.flipped
        return torch.from_numpy(np.array(source[j])), int(self.labels[j])


class HFlipped(Dataset):
    """``dataset`` with every image mirrored left-right (for caching the flipped images' maps).

    Items ``(image float (3, H, W), label)`` or None, as the wrapped dataset yields them.
    """

    def __init__(self, dataset):
        from dfsnet.features.fingerprint import dataset_fingerprint

        self.dataset = dataset
        self.targets = getattr(dataset, "targets", None)
        base = dataset_fingerprint(dataset)
        self.fingerprint = None if base is None else f"hflip:{base}"

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        if item is None:
            return None
        image, label = item
        return image.flip(-1), label


def _loader(dataset, *, batch_size: int, shuffle: bool, num_workers: int, pin_memory: bool,
            collate_fn=None) -> DataLoader:
    # drop_last on training batches: a last batch of one item breaks BatchNorm in train mode.
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      collate_fn=collate_fn, pin_memory=pin_memory,
                      drop_last=shuffle and len(dataset) > batch_size,
                      persistent_workers=num_workers > 0)


class MapsDataModule(L.LightningDataModule):
    """Head-only data: the frozen backbone's maps of ``train_set`` and ``val_set``.

    ``prepare_data`` (once per node, on local rank 0, as Lightning schedules it) computes the
    maps into ``cache_dir`` on the trainer's device; ``setup`` (every rank) memory-maps them.
    Maps are read in the main process (``num_workers=0``): a row is one slice of a memory map.
    ``flip_image`` also caches the maps of the mirrored training images (see :data:`AUGMENTS`).
    """

    def __init__(self, backbone: nn.Module, train_set, val_set, *, cache_dir, batch_size: int,
                 extract_batch_size: int, num_workers: int, progress: bool, precision: str = "fp32",
                 runtime: str = "auto", flip_image: bool = False):
        super().__init__()
        self.backbone = backbone
        self.sets = {"train": train_set, "val": val_set}
        if flip_image:
            self.sets["train_flipped"] = HFlipped(train_set)
        self.cache_dir = cache_dir
        self.batch_size = batch_size
        self.extract_batch_size = extract_batch_size
        self.num_workers = num_workers
        self.progress = progress
        self.precision = precision
        self.runtime = runtime
        self.cache_seconds = 0.0
        self.maps: dict[str, FeatureMaps] = {}

    def _maps(self, name: str) -> FeatureMaps:
        device = self.trainer.strategy.root_device if self.trainer is not None else None
        # Computing the maps creates DataLoader iterators, which draw from the global torch RNG;
        # a cache hit draws nothing. Isolated, a run gives the same weights with a warm or cold cache.
        with torch.random.fork_rng(devices=[]):
            return self._cached(name, device)

    def _cached(self, name: str, device) -> FeatureMaps:
        return cached_feature_maps(self.backbone, self.sets[name], cache_dir=self.cache_dir,
                                   batch_size=self.extract_batch_size, num_workers=self.num_workers,
                                   device=device, precision=self.precision, runtime=self.runtime,
                                   progress=self.progress)

    def prepare_data(self) -> None:
        for name in self.sets:
            self.cache_seconds += self._maps(name).seconds

    def setup(self, stage: str) -> None:
        for name in self.sets:
            maps = self._maps(name)
            if not maps.ok.any():
                raise InputError(f"{name}_set: none of its {len(maps)} images could be loaded")
            self.maps[name] = maps

    def train_dataloader(self) -> DataLoader:
        return _loader(_MapsDataset(self.maps["train"], self.maps.get("train_flipped")),
                       batch_size=self.batch_size, shuffle=True,
                       num_workers=0, pin_memory=False)

    def val_dataloader(self) -> DataLoader:
        return _loader(_MapsDataset(self.maps["val"]), batch_size=self.batch_size, shuffle=False,
                       num_workers=0, pin_memory=False)


class ImagesDataModule(L.LightningDataModule):
    """Full fine-tuning data: the image datasets as given (augmentation from their transforms)."""

    def __init__(self, train_set, val_set, *, batch_size: int, num_workers: int, pin_memory: bool):
        super().__init__()
        self.train_set, self.val_set = train_set, val_set
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory

    def train_dataloader(self) -> DataLoader:
        from dfsnet.data import collate_skip_none

        return _loader(self.train_set, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers,
                       pin_memory=self.pin_memory, collate_fn=collate_skip_none)

    def val_dataloader(self) -> DataLoader:
        from dfsnet.data import collate_skip_none

        return _loader(self.val_set, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                       pin_memory=self.pin_memory, collate_fn=collate_skip_none)
