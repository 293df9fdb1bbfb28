"""The deep feature selection (DFS) module and DFS-Net: backbone -> DFS -> GAP -> dropout -> FC."""
from __future__ import annotations

import collections.abc
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dfsnet._validation import check_positive_int
from dfsnet.errors import InputError, InputTypeError
from dfsnet.models.backbones import Backbone, ModelMeta

__all__ = ["DFSModule", "DFSNet", "DFSNetMeta", "dfs_branch_widths"]

# Output widths of Inception-v3's last block (InceptionE, 2048 channels): 1x1 | 1x3||3x1 |
# 3x3 -> 1x3||3x1 | pool -> 1x1. The DFS module keeps these proportions at any width.
_INCEPTION_E_WIDTHS = (320, 768, 768, 192)
# InceptionE widens the double-3x3 branch's first 1x1 to 448 before its 384-wide 3x3.
_INCEPTION_E_DBL_STEM = 448 / 384


def dfs_branch_widths(out_channels: int) -> tuple[int, int, int, int]:
    """Split ``out_channels`` over the four DFS branches in Inception-v3's 320:768:768:192 ratio.

    Largest-remainder rounding: each branch gets the floor of its exact share and the
    leftover channels go to the branches with the largest fractional parts (ties: earlier
    branch), so the widths sum to ``out_channels`` exactly. 2048 gives (320, 768, 768, 192)
    and 1280 gives (200, 480, 480, 120), both exact.

    Parameters
    ----------
    out_channels : int
        At least 6, so that every branch has a channel and each split branch two.

    Returns
    -------
    tuple of 4 int
        Widths of the 1x1, 1x3||3x1, 3x3 -> 1x3||3x1 and pool branches.
    """
    out_channels = check_positive_int(out_channels, name="out_channels")
    total = sum(_INCEPTION_E_WIDTHS)
    exact = [out_channels * r / total for r in _INCEPTION_E_WIDTHS]
    widths = [int(e) for e in exact]
    by_remainder = sorted(range(4), key=lambda i: (-(exact[i] - widths[i]), i))
    for i in by_remainder[: out_channels - sum(widths)]:
        widths[i] += 1
    if min(widths[0], widths[3]) < 1 or min(widths[1], widths[2]) < 2:
        raise InputError(f"out_channels: expected at least 6 so that every DFS branch has a channel, "
                         f"got {out_channels} (branch widths {tuple(widths)})")
    return tuple(widths)


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int | tuple[int, int]) -> nn.Sequential:
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, (kh, kw), padding=(kh // 2, kw // 2), bias=False),
        nn.BatchNorm2d(out_ch, eps=1e-3),  # Inception-v3's BN epsilon
        nn.ReLU(inplace=True),
    )


class _SplitConv(nn.Module):
    """1x3 and 3x1 convolutions side by side on the same input, concatenated."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        half = (out_ch + 1) // 2
        self.conv_1x3 = _conv_bn_relu(in_ch, half, (1, 3))
        self.conv_3x1 = _conv_bn_relu(in_ch, out_ch - half, (3, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv_1x3(x), self.conv_3x1(x)], dim=1)


class DFSModule(nn.Module):
    """Deep feature selection module: a 1x1 compression, then an Inception-E style block.

    ``x -> 1x1 (reduce_channels) -> [b1 | b2 | b3 | b4] -> concat``, with
    b1 = 1x1; b2 = 1x1 -> (1x3 || 3x1); b3 = 1x1 -> 3x3 -> (1x3 || 3x1);
    b4 = 3x3 average pool (stride 1) -> 1x1. Every convolution is followed by BatchNorm and
    ReLU. Branch widths follow :func:`dfs_branch_widths`; the inner widths follow
    Inception-E too (b2's 1x1 and b3's 3x3 are half their branch, b3's 1x1 is 448/384 of
    that). Spatial size is preserved.

    Parameters
    ----------
    in_channels : int
        Channels of the input feature map.
    out_channels : int
        Channels of the output, at least 6.
    reduce_channels : int
        Width of the 1x1 compression (192 in the paper's Fig. 2).

    Attributes
    ----------
    widths : tuple of 4 int
        Output widths of the four branches; they sum to ``out_channels``.
    """

    def __init__(self, in_channels: int, out_channels: int, *, reduce_channels: int = 192):
        super().__init__()
        in_channels = check_positive_int(in_channels, name="in_channels")
        reduce_channels = check_positive_int(reduce_channels, name="reduce_channels")
        self.widths = dfs_branch_widths(out_channels)
        self.in_channels, self.out_channels, self.reduce_channels = in_channels, out_channels, reduce_channels
        w1, w2, w3, w4 = self.widths
        half2, half3 = (w2 + 1) // 2, (w3 + 1) // 2
        self.reduce = _conv_bn_relu(in_channels, reduce_channels, 1)
        self.branch1 = _conv_bn_relu(reduce_channels, w1, 1)
        self.branch2 = nn.Sequential(_conv_bn_relu(reduce_channels, half2, 1), _SplitConv(half2, w2))
        stem3 = max(1, round(half3 * _INCEPTION_E_DBL_STEM))
        self.branch3 = nn.Sequential(
            _conv_bn_relu(reduce_channels, stem3, 1),
            _conv_bn_relu(stem3, half3, 3),
            _SplitConv(half3, w3),
        )
        # count_include_pad=False: on the 1x1-2x2 maps of small inputs, zero padding would
        # otherwise dominate the average.
        self.branch4 = nn.Sequential(
            nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False),
            _conv_bn_relu(reduce_channels, w4, 1),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Parameters
        ----------
        x : torch.Tensor, float, shape (N, in_channels, h, w)

        Returns
        -------
        torch.Tensor, float, shape (N, out_channels, h, w)
        """
        x = self.reduce(x)
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], dim=1)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, " \
               f"reduce_channels={self.reduce_channels}, widths={self.widths}"


_FORWARDED = ("name", "timm_name", "input_size", "mean", "std", "feature_dim", "interpolation", "crop_pct")


@dataclass(frozen=True)
class DFSNetMeta(collections.abc.Mapping):
    """Everything needed to rebuild a :class:`DFSNet` and feed it images.

    Read-only and dict-like: ``meta.num_classes`` and ``meta["num_classes"]`` are the same.
    The backbone's fields (``name``, ``timm_name``, ``input_size``, ``mean``, ``std``,
    ``feature_dim``, ``interpolation``, ``crop_pct``) are readable directly as well.
    """

    backbone: ModelMeta
    num_classes: int
    class_names: tuple[str, ...] | None
    dfs: bool
    dropout: float
    reduce_channels: int
    hash_bits: int | tuple[int, ...] | None = None

    def __getattr__(self, key: str) -> Any:
        # Only reached for names that are not fields: forward the backbone's input conventions.
        if key in _FORWARDED:
            return getattr(self.backbone, key)
        raise AttributeError(f"{type(self).__name__} has no attribute {key!r}")

    def _keys(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self)) + _FORWARDED

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready nested dict, the inverse of :meth:`from_dict`."""
        return {
            "backbone": self.backbone.to_dict(),
            "num_classes": self.num_classes,
            "class_names": list(self.class_names) if self.class_names is not None else None,
            "dfs": self.dfs,
            "dropout": self.dropout,
            "reduce_channels": self.reduce_channels,
            "hash_bits": list(self.hash_bits) if isinstance(self.hash_bits, tuple) else self.hash_bits,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DFSNetMeta:
        """Rebuild from :meth:`to_dict` output; malformed input raises ValueError.

        ``hash_bits`` may be missing (a meta written before hash heads existed): None.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        if isinstance(data, Mapping) and "hash_bits" not in data:
            data = {**data, "hash_bits": None}
        if not isinstance(data, Mapping) or sorted(data) != sorted(names):
            found = sorted(data) if isinstance(data, Mapping) else type(data).__name__
            raise InputError(f"meta: expected keys {sorted(names)}, found {found}")
        names_ = data["class_names"]
        return cls(
            backbone=ModelMeta.from_dict(data["backbone"]),
            num_classes=int(data["num_classes"]),
            class_names=tuple(str(n) for n in names_) if names_ is not None else None,
            dfs=bool(data["dfs"]),
            dropout=float(data["dropout"]),
            reduce_channels=int(data["reduce_channels"]),
            hash_bits=_hash_bits(data["hash_bits"]),
        )


def _hash_bits(value) -> int | tuple[int, ...] | None:
    """``hash_bits`` checked: None, a positive int, or a sequence of them (one head each)."""
    if value is None:
        return None
    if isinstance(value, Sequence) and not isinstance(value, str):
        widths = tuple(check_positive_int(v, name="hash_bits") for v in value)
        if not widths:
            raise InputError("hash_bits: expected at least one code length, got an empty sequence")
        return widths[0] if len(widths) == 1 else widths
    return check_positive_int(value, name="hash_bits")


class DFSNet(nn.Module):
    """DFS-Net: a CNN backbone, the DFS module, global average pooling, dropout and a linear classifier.

    With ``dfs=False`` it is the paper's "Ori" network (backbone + GAP + dropout + FC).
    The classifier returns logits; ``nn.CrossEntropyLoss`` applies the softmax. With
    ``hash_bits=b`` a b-bit linear hash layer sits on the pooled feature beside the classifier
    (:meth:`head_outputs`, :meth:`hash_logits`); it trains jointly with the classifier and is
    exported as a :class:`dfsnet.hashing.LinearHasher` (:meth:`export_hasher`).

    Parameters
    ----------
    backbone : Backbone
        From :func:`create_backbone`.
    num_classes : int
        At least 2.
    dfs : bool
        Insert the DFS module between the backbone and the pooling.
    dropout : float
        Dropout probability before the classifier, in [0, 1).
    class_names : sequence of str or None
        One name per class, kept in :attr:`meta` and checkpoints.
    reduce_channels : int
        Width of the DFS module's 1x1 compression.
    hash_bits : int, sequence of int, or None
        Width of the hash layer; several widths train several hash heads at once, stored as the
        consecutive output chunks of one linear layer (:attr:`hash_widths`); None for none.

    Attributes
    ----------
    meta : DFSNetMeta
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        *,
        dfs: bool = True,
        dropout: float = 0.2,
        class_names: Sequence[str] | None = None,
        reduce_channels: int = 192,
        hash_bits: int | None = None,
    ):
        super().__init__()
        if not isinstance(backbone, Backbone):
            raise InputTypeError(f"backbone: expected a dfsnet.models.Backbone (from create_backbone), "
                            f"got {type(backbone).__name__}")
        num_classes = check_positive_int(num_classes, name="num_classes")
        if num_classes < 2:
            raise InputError(f"num_classes: expected at least 2 classes, got {num_classes}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise InputError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
        if class_names is not None:
            if isinstance(class_names, str) or not all(isinstance(n, str) for n in class_names):
                raise InputTypeError(f"class_names: expected a sequence of str, got {class_names!r}")
            class_names = tuple(class_names)
            if len(class_names) != num_classes:
                raise InputError(f"class_names: expected {num_classes} names (num_classes), got {len(class_names)}")
        reduce_channels = check_positive_int(reduce_channels, name="reduce_channels")
        hash_bits = _hash_bits(hash_bits)
        dim = backbone.meta.feature_dim
        self.backbone = backbone
        self.dfs = DFSModule(dim, dim, reduce_channels=reduce_channels) if dfs else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(float(dropout))
        self.fc = nn.Linear(dim, num_classes)
        # Created after the classifier, so a network without it draws the same initial weights.
        widths = () if hash_bits is None else (hash_bits if isinstance(hash_bits, tuple) else (hash_bits,))
        self.hash = nn.Linear(dim, sum(widths)) if widths else None
        self.meta = DFSNetMeta(backbone=backbone.meta, num_classes=num_classes, class_names=class_names,
                               dfs=bool(dfs), dropout=float(dropout), reduce_channels=reduce_channels,
                               hash_bits=hash_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits.

        Parameters
        ----------
        x : torch.Tensor, float, shape (N, 3, H, W)
            Images normalised with ``meta.mean`` / ``meta.std``.

        Returns
        -------
        torch.Tensor, float, shape (N, num_classes)
        """
        return self.head_forward(self.backbone(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled deep features, the retrieval representation.

        Parameters
        ----------
        x : torch.Tensor, float, shape (N, 3, H, W)

        Returns
        -------
        torch.Tensor, float, shape (N, D), D = ``meta.feature_dim``
        """
        return self.head_features(self.backbone(x))

    def head_features(self, fmap: torch.Tensor) -> torch.Tensor:
        """Pooled features from a backbone feature map (the part after the backbone).

        Parameters
        ----------
        fmap : torch.Tensor, float, shape (N, D, h, w)

        Returns
        -------
        torch.Tensor, float, shape (N, D)
        """
        dim = self.meta.feature_dim
        if not isinstance(fmap, torch.Tensor):
            raise InputTypeError(f"fmap: expected a torch.Tensor of shape (N, {dim}, h, w), got {type(fmap).__name__}")
        if fmap.dim() != 4 or fmap.shape[1] != dim:
            raise InputError(f"fmap: expected a feature map of shape (N, {dim}, h, w), got {tuple(fmap.shape)}")
        return self.pool(self.dfs(fmap)).flatten(1)

    def head_forward(self, fmap: torch.Tensor) -> torch.Tensor:
        """Logits from a backbone feature map, for head-only training on cached maps.

        Parameters
        ----------
        fmap : torch.Tensor, float, shape (N, D, h, w)

        Returns
        -------
        torch.Tensor, float, shape (N, num_classes)
        """
        return self.fc(self.dropout(self.head_features(fmap)))

    def head_outputs(self, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Class logits and hash layer outputs from one pass over a backbone feature map.

        Parameters
        ----------
        fmap : torch.Tensor, float, shape (N, D, h, w)

        Returns
        -------
        logits : torch.Tensor, float, shape (N, num_classes)
        hash_logits : torch.Tensor, float, shape (N, hash_bits), or None without a hash layer
            Computed on the pooled feature without dropout, as at retrieval time.
        """
        feats = self.head_features(fmap)
        logits = self.fc(self.dropout(feats))
        return logits, (None if self.hash is None else self.hash(feats))

    def hash_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Real-valued hash layer outputs of images; their signs are the codes.

        Parameters
        ----------
        x : torch.Tensor, float, shape (N, 3, H, W)

        Returns
        -------
        torch.Tensor, float, shape (N, hash_bits)
        """
        if self.hash is None:
            raise InputError("hash_logits: this network has no hash layer (built with hash_bits=None)")
        return self.hash(self.features(x))

    @property
    def hash_widths(self) -> tuple[int, ...]:
        """Code length of each hash head, in the order of the hash layer's output chunks."""
        bits = self.meta.hash_bits
        return () if bits is None else (bits if isinstance(bits, tuple) else (bits,))

    def export_hasher(self, n_bits: int | None = None):
        """A trained hash head as a fitted :class:`dfsnet.hashing.LinearHasher` on pooled features.

        Parameters
        ----------
        n_bits : int, optional
            Which head; may be omitted when there is one.

        Returns
        -------
        dfsnet.hashing.LinearHasher
            ``transform(features float (n, D)) -> uint8 (n, ceil(n_bits / 8))``.
        """
        from dfsnet.hashing import LinearHasher

        widths = self.hash_widths
        if not widths:
            raise InputError("export_hasher: this network has no hash layer (built with hash_bits=None)")
        if n_bits is None:
            if len(widths) > 1:
                raise InputError(f"n_bits: this network has hash heads of {list(widths)} bits; name one")
            n_bits = widths[0]
        if n_bits not in widths:
            raise InputError(f"n_bits: this network has hash heads of {list(widths)} bits, not {n_bits}")
        start = sum(widths[:widths.index(n_bits)])
        rows = slice(start, start + n_bits)
        return LinearHasher.from_weights(self.hash.weight.detach()[rows].float().cpu().numpy(),
                                         self.hash.bias.detach()[rows].float().cpu().numpy())

    def export_hashers(self) -> dict:
        """``{n_bits: LinearHasher}`` of every hash head (empty without a hash layer)."""
        return {b: self.export_hasher(b) for b in self.hash_widths}

    def without_hash(self) -> DFSNet:
        """Drop the hash layer (in place), e.g. once it is exported; returns self."""
        self.hash = None
        self.meta = dataclasses.replace(self.meta, hash_bits=None)
        return self
