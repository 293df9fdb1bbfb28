"""Shared fixtures. Tests use tiny inputs and random weights; real data only when present."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits

# "auto" means torch in the suite (subprocesses inherit it): an ONNX export costs 2-10 s, and
# tests/test_runtime.py and the tests that name runtime="onnx" cover ONNX Runtime.
os.environ["DFSNET_RUNTIME"] = "torch"

REPO = Path(__file__).resolve().parents[1]
CIFAR10_ROOT = REPO.parent / "shared" / "datasets" / "cifar10"


@pytest.fixture(autouse=True)
def _one_thread():
    """Run torch and BLAS on one thread: on a shared 2-core machine, spinning worker threads made
    small forward passes and probe fits several times slower than a single thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(previous)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def cifar10_root() -> Path:
    """The read-only CIFAR-10 image folders beside the checkout; skips where absent."""
    if not (CIFAR10_ROOT / "train").is_dir():
        pytest.skip(f"CIFAR-10 image folders not found at {CIFAR10_ROOT} (only on the project's machines)")
    return CIFAR10_ROOT


def make_image_folder(root: Path, *, n_classes: int = 3, per_class: int = 4, size: int = 32,
                      seed: int = 0) -> Path:
    """Write a small class-per-sub-folder JPEG dataset whose classes differ in colour."""
    from PIL import Image

    gen = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for c in range(n_classes):
        d = root / f"class_{c}"
        d.mkdir(exist_ok=True)
        base = np.zeros(3)
        base[c % 3] = 200
        for i in range(per_class):
            arr = np.clip(base + gen.normal(0, 30, size=(size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(d / f"{i:03d}.jpg", quality=90)
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images")
