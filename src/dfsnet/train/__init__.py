"""Training DFS-Net and its "Ori" baseline through Lightning, and measuring top-1 accuracy.

- :func:`train_model`: head-only (frozen backbone, cached feature maps) or full fine-tuning,
  with checkpoints, resume, early stopping, a CSV log, AMP on GPU and DDP through Lightning.
- :func:`evaluate_accuracy`: top-1 accuracy on a test (query) set, as in the paper's Tables 1 and 4.
- :mod:`dfsnet.train.workflow`: train -> extract features -> fit the encoder, shared by
  ``dfsnet train``, the experiments runner and the index builder.

Attributes load on first use, so ``dfsnet.train.workflow`` (and its ``MODES``) can be imported
without torch and Lightning.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from dfsnet.train.evaluate import evaluate_accuracy
    from dfsnet.train.trainer import TrainResult, train_model
    from dfsnet.train.workflow import MODES, TrainingOutcome, fit_encoder, train_and_fit

__all__ = ["MODES", "TrainResult", "TrainingOutcome", "evaluate_accuracy", "fit_encoder", "train_and_fit",
           "train_model"]

_WHERE = {
    "evaluate_accuracy": "dfsnet.train.evaluate",
    "TrainResult": "dfsnet.train.trainer",
    "train_model": "dfsnet.train.trainer",
    "MODES": "dfsnet.train.workflow",
    "TrainingOutcome": "dfsnet.train.workflow",
    "fit_encoder": "dfsnet.train.workflow",
    "train_and_fit": "dfsnet.train.workflow",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'dfsnet.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
