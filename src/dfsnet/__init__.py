"""dfsnet: content-based image retrieval with deep feature selection, gain ratio and hashing.

The main entry points are importable from here; each is imported on first use, so that
``import dfsnet`` stays cheap (no torch, faiss or matplotlib until they are needed)::

    import dfsnet
    backbone = dfsnet.create_backbone("efficientnet_lite0", pretrained=True)
    net = dfsnet.DFSNet(backbone, num_classes=10)
    encoder = dfsnet.make_encoder("gain_ratio", "sample_mean", n_bits=64)
    index = dfsnet.HammingIndex(64)
    images = dfsnet.ImageIndex.load("photos.index")
    results = dfsnet.run_experiment(dfsnet.experiments.load_config("demo"))
"""
from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

# name -> module that defines it
_LAZY = {
    "create_backbone": "dfsnet.models",
    "DFSNet": "dfsnet.models",
    "make_encoder": "dfsnet.hashing",
    "HammingIndex": "dfsnet.index",
    "ImageIndex": "dfsnet.store",
    "run_experiment": "dfsnet.experiments",
}

__all__ = ["__version__", "create_backbone", "DFSNet", "make_encoder", "HammingIndex", "ImageIndex",
           "run_experiment"]

if TYPE_CHECKING:
    from dfsnet.experiments import run_experiment
    from dfsnet.hashing import make_encoder
    from dfsnet.index import HammingIndex
    from dfsnet.models import DFSNet, create_backbone
    from dfsnet.store import ImageIndex


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module 'dfsnet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
