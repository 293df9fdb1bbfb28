"""The numeric precision a network runs in: fp32, or bf16 autocast (+ channels_last on a CPU).

``auto`` picks bf16 where the hardware runs it natively: on a CPU with AMX or AVX512-BF16
(oneDNN's bf16 kernels; 2.5-3.5x fp32 on EfficientNet-Lite0 on this project's CPU), and on a
CUDA device that supports bf16; fp32 elsewhere. On a CPU, bf16 also switches the network and
its inputs to the channels_last memory format, which oneDNN's convolutions need to be fast.

An explicit ``"bf16"`` on a CPU without native bf16 logs a warning and runs fp32 (emulated
bf16 is slower than fp32); the :class:`Precision` returned always names what actually runs,
and that is what results, manifests and summaries record.

Training on a CPU follows its own measurements (:func:`resolve_training_precision`): a full
fine-tuning step runs fastest in fp32 with channels_last, and ``auto`` trains so there.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from dfsnet.errors import InputError

if TYPE_CHECKING:
    import torch

__all__ = ["PRECISIONS", "DEFAULT_PRECISION", "Precision", "resolve_precision", "resolve_training_precision",
           "cpu_has_native_bf16", "cpu_info"]

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")
DEFAULT_PRECISION = "auto"
_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.lru_cache(maxsize=1)
def cpu_info() -> tuple[str | None, frozenset[str] | None]:
    """This CPU's model name and feature flags, from /proc/cpuinfo; ``(None, None)`` where there is
    none (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return None, None
    model, flags = None, frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key == "flags":
            flags = frozenset(value.split())
            break
    return model, flags


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU has AMX or AVX512-BF16 and torch's oneDNN can use them."""
    flags = cpu_info()[1]
    if flags is None:  # not Linux: trust oneDNN's own check alone
        flags = frozenset(_BF16_CPU_FLAGS)
    if not flags.intersection(_BF16_CPU_FLAGS):
        return False
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclasses.dataclass(frozen=True)
class Precision:
    """How a network runs: ``name`` ("fp32" or "bf16") on ``device_type`` ("cpu", "cuda", ...).

    Attributes
    ----------
    name : str
    device_type : str
    channels_last : bool
        Network weights and inputs in channels_last memory format.
    """

    name: str
    device_type: str
    channels_last: bool = False

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context of this precision (a no-op for fp32)."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        import torch

        return torch.autocast(device_type=self.device_type, dtype=torch.bfloat16)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Put ``model``'s weights in this precision's memory format (in place; returns it)."""
        import torch

        return model.to(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def prepare_input(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` float (N, 3, H, W) in this precision's memory format."""
        import torch

        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def lightning(self) -> str:
        """The matching Lightning ``precision`` setting."""
        return "bf16-mixed" if self.name == "bf16" else "32-true"


def resolve_precision(precision: str = "auto", device: torch.device | str = "cpu") -> Precision:
    """The :class:`Precision` that ``precision`` means on ``device``.

    Parameters
    ----------
    precision : {"auto", "fp32", "bf16"}
    device : torch.device or str

    Returns
    -------
    Precision

    Raises
    ------
    InputError
        An unknown precision name (the valid ones are listed).
    """
    import torch

    if precision not in PRECISIONS:
        raise InputError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    device_type = torch.device(device).type
    if precision == "fp32":
        return Precision("fp32", device_type)
    if device_type == "cuda":
        native = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    elif device_type == "cpu":
        native = cpu_has_native_bf16()
    else:
        native = False
    if native:
        return Precision("bf16", device_type, channels_last=device_type == "cpu")
    if precision == "bf16":
        logger.warning("precision: bf16 was asked for, but this %s has no native bf16 support "
                       "(AMX or AVX512-BF16 on a CPU); running fp32", device_type)
    return Precision("fp32", device_type)


def resolve_training_precision(precision: str = "auto", device: torch.device | str = "cpu", *,
                               mode: str = "full") -> Precision:
    """The :class:`Precision` a training step runs in; :func:`resolve_precision`'s except on a CPU.

    On a CPU, full fine-tuning always uses channels_last, and ``auto`` there means fp32: a
    training step of EfficientNet-Lite0 at 128 px (batch 128, 2 cores,
    ``benchmarks/bench_train_step.py``) measured 1.49x (Ori) and 1.64x (DFS-Net) the fp32 NCHW
    step in fp32 channels_last against 1.39x and 1.57x with bf16 autocast: bf16's backward
    passes do not repay their casts there, unlike its inference (2.5-3.5x). Head-only training
    on cached maps keeps NCHW (channels_last measured slower on the 4x4 maps) and bf16 where
    native (1.27x fp32 per DFS head epoch, ``benchmarks/bench_head_epoch.py``).

    Parameters
    ----------
    precision : {"auto", "fp32", "bf16"}
    device : torch.device or str
    mode : {"full", "head"}

    Returns
    -------
    Precision
    """
    import torch

    if mode not in ("full", "head"):
        raise InputError(f"mode: expected 'full' or 'head', got {mode!r}")
    on_cpu = torch.device(device).type == "cpu"
    if not on_cpu:
        return resolve_precision(precision, device)
    if mode == "head":
        return dataclasses.replace(resolve_precision(precision, device), channels_last=False)
    resolved = resolve_precision("fp32" if precision == "auto" else precision, device)
    return dataclasses.replace(resolved, channels_last=True)
