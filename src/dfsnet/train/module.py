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

logger = logging.getLogger(__name__)


class DFSNetTask(L.LightningModule):
    """Classification training of a :class:`dfsnet.models.DFSNet`.

    Cross-entropy on the logits, micro top-1 accuracy, and a per-step learning-rate schedule:
    linear warm-up over ``warmup_epochs``, then cosine decay to zero at the last step.

    In ``mode="head"`` the batches are cached backbone feature maps (float16, from
    :class:`MapsDataModule`) and only ``model.head_forward`` runs; the backbone is frozen
    (``requires_grad=False``, eval mode). In ``mode="full"`` every layer trains on images;
    backbone parameters get ``lr * backbone_lr_mult``.
    Biases and normalisation weights (1-D parameters) are exempt from weight decay.
    """

    def __init__(self, model: nn.Module, *, mode: str, optimizer: str, lr: float, weight_decay: float,
                 momentum: float = 0.9, backbone_lr_mult: float = 1.0, warmup_epochs: float = 0.0,
                 channels_last: bool = False):
        super().__init__()
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.mode == "head":
            return self.model.head_forward(x.float())
        return self.model(x)

    def on_train_epoch_start(self) -> None:
        if self.mode == "head":
            # Lightning puts the whole module in train mode every epoch; the frozen backbone's
            # BatchNorm statistics must stay those the cached maps were computed with.
            self.model.backbone.eval()

    def _step(self, batch, stage: str):
        if batch is None:  # every image of the batch was unreadable (collate_skip_none)
            return None
        x, y = batch
        logits = self(x)
        loss = self.criterion(logits, y)
        accuracy = self.train_acc if stage == "train" else self.val_acc
        accuracy(logits, y)
        n = int(y.shape[0])
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=n)
        self.log(f"{stage}_acc", accuracy, on_step=False, on_epoch=True, prog_bar=True, batch_size=n)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

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
        entry["lr"] = float(trainer.optimizers[0].param_groups[0]["lr"])
        entry["seconds"] = now - self._start
        entry["train_seconds"] = (self._val_start if self._val_start > self._start else now) - self._start
        self.epochs.append(entry)
        if trainer.is_global_zero:
            logger.info("epoch %d: train_loss %.4f train_acc %.4f val_loss %.4f val_acc %.4f (%.1f s)",
                        entry["epoch"], entry["train_loss"], entry["train_acc"], entry["val_loss"],
                        entry["val_acc"], entry["seconds"])

    def state_dict(self) -> dict:
        return {"epochs": [dict(e) for e in self.epochs]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.epochs = [dict(e) for e in state_dict.get("epochs", [])]


class _MapsDataset(Dataset):
    """Rows of cached feature maps whose images loaded: ``(float16 (C, h, w), label)``."""

    def __init__(self, maps: FeatureMaps):
        self.maps = maps.maps
        self.labels = maps.labels
        self.rows = np.flatnonzero(maps.ok)

    def __len__(self) -> int:
        return int(self.rows.size)

    def __getitem__(self, i):
        j = self.rows[i]
        return torch.from_numpy(np.array(self.maps[j])), int(self.labels[j])


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
    """

    def __init__(self, backbone: nn.Module, train_set, val_set, *, cache_dir, batch_size: int,
                 extract_batch_size: int, num_workers: int, progress: bool, precision: str = "fp32"):
        super().__init__()
        self.backbone = backbone
        self.sets = {"train": train_set, "val": val_set}
        self.cache_dir = cache_dir
        self.batch_size = batch_size
        self.extract_batch_size = extract_batch_size
        self.num_workers = num_workers
        self.progress = progress
        self.precision = precision
        self.cache_seconds = 0.0
        self.maps: dict[str, FeatureMaps] = {}

    def _maps(self, name: str) -> FeatureMaps:
        device = self.trainer.strategy.root_device if self.trainer is not None else None
        return cached_feature_maps(self.backbone, self.sets[name], cache_dir=self.cache_dir,
                                   batch_size=self.extract_batch_size, num_workers=self.num_workers,
                                   device=device, precision=self.precision, progress=self.progress)

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
        return _loader(_MapsDataset(self.maps["train"]), batch_size=self.batch_size, shuffle=True,
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
