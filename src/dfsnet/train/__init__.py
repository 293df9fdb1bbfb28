"""Training DFS-Net and its "Ori" baseline through Lightning, and measuring top-1 accuracy.

- :func:`train_model`: head-only (frozen backbone, cached feature maps) or full fine-tuning,
  with checkpoints, resume, early stopping, a CSV log, AMP on GPU and DDP through Lightning.
- :func:`evaluate_accuracy`: top-1 accuracy on a test (query) set, as in the paper's Tables 1 and 4.
"""
from dfsnet.train.evaluate import evaluate_accuracy
from dfsnet.train.trainer import TrainResult, train_model

__all__ = ["TrainResult", "evaluate_accuracy", "train_model"]
