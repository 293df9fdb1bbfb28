"""Top-1 accuracy of a classifier on a labelled dataset."""
from __future__ import annotations

import numpy as np

from dfsnet.errors import InputError
from dfsnet.features._loader import check_dataset, inference_on, iter_batches, resolve_device

__all__ = ["evaluate_accuracy"]


def evaluate_accuracy(model, dataset, *, batch_size: int = 64, num_workers: int = 0, device=None,
                      progress: bool = False) -> float:
    """Fraction of the loadable items of ``dataset`` whose arg-max logit is their label.

    The paper's Tables 1 and 4 compare this figure for the "Ori" network (``dfs=False``) and
    DFS-Net on the test (query) images. Runs in eval mode under ``torch.inference_mode`` on
    ``device`` (default: CUDA when available, else CPU); the model's mode and device are
    restored afterwards. Unreadable images are left out of the count.

    Parameters
    ----------
    model : DFSNet
        ``forward(x float (N, 3, H, W)) -> logits (N, num_classes)``.
    dataset : torch Dataset
        Items ``(image float (3, H, W), label int)``, transformed for evaluation.

    Returns
    -------
    float
        Top-1 accuracy in [0, 1].
    """
    n = check_dataset(dataset)
    dev = resolve_device(device)
    correct = seen = 0
    with inference_on(model, dev):
        for batch in iter_batches(dataset, batch_size=batch_size, num_workers=num_workers, device=dev,
                                  progress=progress, desc="evaluate"):
            if batch.images is None:
                continue
            if (batch.labels < 0).any():
                raise InputError("dataset: expected labelled items (image, label) to measure accuracy")
            predicted = model(batch.images).argmax(dim=1).cpu().numpy()
            correct += int(np.sum(predicted == batch.labels))
            seen += int(batch.labels.size)
    if seen == 0:
        raise InputError(f"dataset: none of its {n} images could be loaded")
    return correct / seen
