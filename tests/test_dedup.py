"""dfsnet.dedup: exact and near-duplicate groups, from a folder and from an index."""
from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from dfsnet.dedup import connected_groups, find_duplicates, fingerprint, near_duplicate_pairs
from tests.store.test_unsupervised import distinct_images


def plant_copies(folder, sources, seed: int = 0):
    """A transformed copy of each source (rotate, crop, rescale, brighten, JPEG 30) in ``folder``."""
    rng = np.random.default_rng(seed)
    out = []
    for i, src in enumerate(sources):
        im = Image.open(src).convert("RGB").rotate(float(rng.uniform(-4, 4)), resample=Image.BILINEAR)
        w, h = im.size
        im = im.crop((2, 1, w - 2, h - 3)).resize((int(w * 1.3), int(h * 1.3)), Image.BILINEAR)
        im = ImageEnhance.Brightness(im).enhance(float(rng.uniform(0.85, 1.15)))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=30)
        (folder / f"copy{i}.jpg").write_bytes(buf.getvalue())
        out.append(folder / f"copy{i}.jpg")
    return out


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("dedup")
    images = distinct_images(root / "images", 16, seed=4)
    copies = plant_copies(images, [images / "003.jpg", images / "007.jpg"])
    shutil.copyfile(images / "011.jpg", images / "exact.jpg")
    return {"root": root, "images": images, "copies": copies}


def test_planted_copies_are_found_and_nothing_else(planted):
    images = planted["images"]
    report = find_duplicates(images=images)
    groups = sorted((g.kind, sorted(p.rsplit("/", 1)[1] for p in g.paths)) for g in report.groups)
    assert groups == [("exact", ["011.jpg", "exact.jpg"]), ("near", ["003.jpg", "copy0.jpg"]),
                      ("near", ["007.jpg", "copy1.jpg"])]
    assert report.n_images == 18 and report.n_pairs == 2 and report.n_unreadable == 0
    assert len(report.pairs()) == 3 and report.to_dict()["groups"][0]["kind"] == "exact"


def test_distinct_images_have_no_duplicates(tmp_path):
    report = find_duplicates(images=distinct_images(tmp_path / "distinct", 24, seed=11))
    assert report.groups == [] and report.n_images == 24


def test_an_index_reports_the_same_groups_without_loading_a_model(planted, tmp_path, monkeypatch):
    from dfsnet.store import ImageIndex

    index = ImageIndex.build(images_dir=planted["images"], out_dir=tmp_path / "index", bits=8, image_size=32,
                             device="cpu")
    assert index.last_report.n_duplicates == 1  # exact.jpg: skipped, but recorded
    from dfsnet.store import unsupervised

    monkeypatch.setattr(unsupervised, "load_index_model", lambda *a, **k: pytest.fail("loaded a model"))
    report = find_duplicates(tmp_path / "index")
    folder = find_duplicates(images=planted["images"])
    def members(r):
        return sorted(sorted(g.paths) for g in r.groups)

    assert members(report) == members(folder)
    exact = next(g for g in report.groups if g.kind == "exact")
    assert exact.ids[0] == index.record(exact.ids[0]).id and exact.ids[1] == -1
    assert find_duplicates(index).n_pairs == report.n_pairs
    # re-adding the same folder writes no new generation (the duplicate is recorded once)
    assert index.add(planted["images"]).generation == index.manifest["generation"] == 1


def test_pairs_and_groups_on_arrays():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 144)).astype(np.float32)
    x[39] = x[3] + 0.1 * rng.standard_normal(144)
    x[38] = x[39] + 0.05 * rng.standard_normal(144)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    pairs, sims = near_duplicate_pairs(x)
    assert {tuple(p) for p in pairs} >= {(3, 39), (38, 39)} and np.all(sims > 0.8)
    assert [g.tolist() for g in connected_groups(40, pairs)] == [[3, 38, 39]]
    with pytest.raises(ValueError, match="max_distance: expected a number in"):
        near_duplicate_pairs(x, max_distance=-1)
    assert np.allclose(np.linalg.norm(fingerprint(Image.new("RGB", (9, 9), (10, 200, 30)))), 0)  # flat
    with pytest.raises(ValueError, match="exactly one of"):
        find_duplicates()
