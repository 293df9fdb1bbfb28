"""The values printed in the DFS-Net paper, as a fixed table to set beside our measurements.

Source: "DFS-Net: deep feature selection, information gain rate and hash transform for image
retrieval". Only numbers we can point to in the paper are held here;
everything else is ``None`` and the report prints "—" for it. Values are fractions (0.8793, not
87.93 %), like every metric in dfsnet.
"""
from __future__ import annotations

from dataclasses import dataclass

from dfsnet.errors import InputError

__all__ = [
    "PAPER_TITLE",
    "PaperValue",
    "PAPER_VALUES",
    "PAPER_NETWORKS",
    "paper_network",
    "paper_value",
    "dataset_title",
]

PAPER_TITLE = ("DFS-Net: deep feature selection, information gain rate and hash transform "
               "for image retrieval")

# The paper's three networks, by the backbone names dfsnet accepts for them (aliases and timm
# names both, so a config written either way finds its paper column).
PAPER_NETWORKS = {
    "inception_v3": "DFS-Net-I",
    "resnet50": "DFS-Net-R",
    "mobilenetv2": "DFS-Net-M",
    "mobilenetv2_100": "DFS-Net-M",
}

_DATASETS = {"cifar10": "CIFAR-10", "caltech256": "Caltech256"}


@dataclass(frozen=True)
class PaperValue:
    """One number printed in the paper.

    ``metric`` is ``"map_scheme3_best"`` (the best mAP of Scheme 3, DFS-Net features with gain
    ratio selection and hash codes, over the code lengths the paper tried) or
    ``"accuracy_dfs"`` (test classification accuracy of the trained DFS-Net).
    """

    dataset: str
    network: str
    metric: str
    value: float
    meaning: str


PAPER_VALUES: tuple[PaperValue, ...] = (
    PaperValue("cifar10", "DFS-Net-I", "map_scheme3_best", 0.8793,
               "CIFAR-10 mAP of Scheme 3 (best over b), InceptionV3 backbone"),
    PaperValue("cifar10", "DFS-Net-R", "map_scheme3_best", 0.8460,
               "CIFAR-10 mAP of Scheme 3 (best over b), ResNet50 backbone"),
    PaperValue("cifar10", "DFS-Net-M", "map_scheme3_best", 0.7774,
               "CIFAR-10 mAP of Scheme 3 (best over b), MobileNetV2 backbone"),
    PaperValue("cifar10", "DFS-Net-I", "accuracy_dfs", 0.888,
               "CIFAR-10 classification accuracy of DFS-Net, InceptionV3 backbone"),
    PaperValue("cifar10", "DFS-Net-R", "accuracy_dfs", 0.871,
               "CIFAR-10 classification accuracy of DFS-Net, ResNet50 backbone"),
    PaperValue("cifar10", "DFS-Net-M", "accuracy_dfs", 0.834,
               "CIFAR-10 classification accuracy of DFS-Net, MobileNetV2 backbone"),
    PaperValue("caltech256", "DFS-Net-I", "map_scheme3_best", 0.8391,
               "Caltech256 mAP of Scheme 3 (best over b), InceptionV3 backbone"),
    PaperValue("caltech256", "DFS-Net-R", "map_scheme3_best", 0.7674,
               "Caltech256 mAP of Scheme 3 (best over b), ResNet50 backbone"),
    PaperValue("caltech256", "DFS-Net-M", "map_scheme3_best", 0.7420,
               "Caltech256 mAP of Scheme 3 (best over b), MobileNetV2 backbone"),
)

_METRICS = sorted({v.metric for v in PAPER_VALUES})


def paper_network(backbone: str) -> str | None:
    """The paper's name for the network built on ``backbone`` ("DFS-Net-R"), or None."""
    return PAPER_NETWORKS.get(backbone.lower())


def paper_value(metric: str, *, backbone: str, dataset: str) -> float | None:
    """The paper's printed value of ``metric`` for ``backbone`` on ``dataset``, or None.

    None means the paper gives no number we hold for this combination (for example any
    backbone the paper did not use, or the digits demo data set).
    """
    if metric not in _METRICS:
        raise InputError(f"metric: expected one of {_METRICS}, got {metric!r}")
    network = paper_network(backbone)
    for v in PAPER_VALUES:
        if v.metric == metric and v.network == network and v.dataset == dataset.lower():
            return v.value
    return None


def dataset_title(dataset: str) -> str:
    """How the paper spells a data set name ("CIFAR-10"); other names pass through."""
    return _DATASETS.get(dataset.lower(), dataset)
