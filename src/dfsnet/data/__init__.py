"""Datasets, sources, split protocols and transforms.

See ``docs/ARCHITECTURE.md`` ("Data"). Typical use::

    pool = load_pool("cifar10", root="../shared/datasets/cifar10",
                     transform=build_transforms(model.meta, train=False))
    split = make_split("cifar10", pool.targets, pool_sources=pool.sources, seed=0,
                       pool_fingerprint=pool.fingerprint())
    split.save("split.json")
    fit_set = split.subset(pool, "fit", transform=build_transforms(model.meta, train=True))
    loader = DataLoader(fit_set, batch_size=64, collate_fn=collate_skip_none)
"""
from dfsnet.data.datasets import (
    IMG_EXTENSIONS,
    ArrayImageDataset,
    ConcatPool,
    ImageFolder,
    ImageList,
    Subset,
    collate_skip_none,
    iter_image_files,
)
from dfsnet.data.sources import list_sources, load_pool, load_source
from dfsnet.data.splits import (
    PROTOCOLS,
    Split,
    labels_fingerprint,
    make_split,
    stratified_holdout,
)
from dfsnet.data.transforms import build_transforms

__all__ = [
    "IMG_EXTENSIONS",
    "PROTOCOLS",
    "ArrayImageDataset",
    "ConcatPool",
    "ImageFolder",
    "ImageList",
    "Split",
    "Subset",
    "build_transforms",
    "collate_skip_none",
    "iter_image_files",
    "labels_fingerprint",
    "list_sources",
    "load_pool",
    "load_source",
    "make_split",
    "stratified_holdout",
]
