"""dfsnet.store: building, loading, adding to, searching and verifying a persistent index."""
from __future__ import annotations

import io
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dfsnet.store import ImageIndex, read_manifest, verify_index
from dfsnet.store import builder as builder_module
from tests.conftest import make_image_folder

BITS = 32


def _tiny_checkpoint(folder: Path, *, seed: int = 0) -> Path:
    import torch

    from dfsnet.models import DFSNet, create_backbone, save_checkpoint

    torch.manual_seed(seed)
    net = DFSNet(create_backbone("test_efficientnet", pretrained=False), num_classes=3,
                 class_names=["class_0", "class_1", "class_2"])
    return save_checkpoint(net, folder / "best.safetensors", extra={"image_size": 32})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny random-weight checkpoint, a labelled folder and an index built on it (read-only)."""
    root = tmp_path_factory.mktemp("store")
    ckpt = _tiny_checkpoint(root / "model")
    images = make_image_folder(root / "images", n_classes=3, per_class=4, size=32, seed=1)
    index = root / "index"
    ImageIndex.build(ckpt, images, index, bits=BITS, fit_on=images, store_features=True, batch_size=8)
    return {"root": root, "ckpt": ckpt, "images": images, "index": index}


@pytest.fixture
def index_copy(world, tmp_path) -> Path:
    dst = tmp_path / "index"
    shutil.copytree(world["index"], dst)
    return dst


def _encoder_beside(ckpt: Path, images: Path, bits: int) -> Path:
    """Fit and save encoder.npz beside ``ckpt`` as `dfsnet train` does."""
    from dfsnet.data import ImageFolder, build_transforms
    from dfsnet.features import extract_features
    from dfsnet.hashing import make_encoder
    from dfsnet.models import load_checkpoint

    model, _ = load_checkpoint(ckpt)
    data = ImageFolder(images, transform=build_transforms(model.meta, train=False, image_size=32))
    encoder = make_encoder("gain_ratio", "sample_mean", n_bits=bits).fit(extract_features(model, data), data.targets)
    encoder.save(ckpt.parent / "encoder.npz")
    return ckpt.parent / "encoder.npz"


def test_build_records_manifest_metadata_and_labels(world):
    pipe = ImageIndex.load(world["index"])
    info = pipe.info()
    assert len(pipe) == info["count"] == 12
    assert info["bits"] == pipe.n_bits == BITS
    assert info["labels"] == {"class_0": 4, "class_1": 4, "class_2": 4}
    assert info["has_features"] and info["generation"] == 1
    manifest = read_manifest(world["index"])
    assert manifest["image_size"] == 32
    assert manifest["model"]["backbone"] == "test_efficientnet"
    assert manifest["encoder"]["params"]["selector"]["class"] == "GainRatioSelector"
    files = sorted(p.name for p in world["index"].iterdir())
    assert files == [".lock", "codes.000001.hidx", "encoder.npz", "features.000001.npy", "manifest.000001.json",
                     "manifest.json", "metadata.000001.sqlite", "model.safetensors"]
    assert set(manifest["checksums"]) == {"codes.000001.hidx", "features.000001.npy", "metadata.000001.sqlite"}
    record = pipe.record(0)
    assert Path(record.path).is_file() and record.label == "class_0"
    assert record.size == Path(record.path).stat().st_size
    assert verify_index(world["index"], files="all").errors == []


def test_search_finds_the_query_itself_first(world):
    pipe = ImageIndex.load(world["index"])
    query = world["images"] / "class_1" / "002.jpg"
    hits = pipe.search(query, k=5)
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
    distances = [h.distance for h in hits]
    assert distances == sorted(distances) and distances[0] == 0
    exact = [h.path for h in hits if h.distance == 0]
    assert str(query.resolve()) in exact
    # Every accepted input type gives the same answer.
    data = query.read_bytes()
    assert pipe.search(data, k=5) == hits
    assert pipe.search(Image.open(io.BytesIO(data)), k=5) == hits
    assert len(pipe.search(query, k=100)) == 12


def test_search_distances_match_the_codes(world):
    from dfsnet.hashing import hamming_distances

    pipe = ImageIndex.load(world["index"])
    query = world["images"] / "class_2" / "000.jpg"
    features = pipe.embed([query])
    code = pipe.encoder.transform(features)
    hits = pipe.search_features(features[0], k=12)
    all_codes = pipe.encoder.transform(np.stack([pipe.embed([h.path])[0] for h in hits]))
    expected = hamming_distances(code, all_codes)[0]
    assert [h.distance for h in hits] == expected.tolist()


def test_rerank_orders_the_shortlist_by_euclidean_distance(world):
    pipe = ImageIndex.load(world["index"])
    query = world["images"] / "class_0" / "001.jpg"
    hits = pipe.search(query, k=4, rerank=True, rerank_factor=3)
    scores = [h.score for h in hits]
    assert len(hits) == 4 and scores == sorted(scores)
    assert hits[0].path == str(query.resolve()) and scores[0] == pytest.approx(0.0, abs=1e-4)
    shortlist = {h.id for h in pipe.search(query, k=12)[:12]}
    assert {h.id for h in hits} <= shortlist
    q = pipe.embed([query])[0]
    for h in hits:
        assert h.score == pytest.approx(float(np.linalg.norm(pipe.embed([h.path])[0] - q)), rel=1e-4, abs=1e-4)


def test_rerank_without_stored_features_is_refused(world, tmp_path):
    pipe = ImageIndex.build(world["ckpt"], world["images"] / "class_0", tmp_path / "idx", bits=BITS,
                          fit_on=world["images"])
    assert not pipe.has_features and len(pipe) == 4
    assert pipe.info()["labels"] == {None: 4}  # files directly in the folder carry no label
    with pytest.raises(ValueError, match="stores no float features"):
        pipe.search(world["images"] / "class_0" / "000.jpg", rerank=True)


def test_build_uses_the_encoder_saved_beside_the_checkpoint(world, tmp_path):
    ckpt = _tiny_checkpoint(tmp_path / "model")
    with pytest.raises(FileNotFoundError, match="--fit-on"):
        ImageIndex.build(ckpt, world["images"], tmp_path / "a")
    assert not (tmp_path / "a" / "manifest.json").exists()
    _encoder_beside(ckpt, world["images"], bits=16)
    with pytest.raises(ValueError, match=r"16-bit codes, but 64 bits were requested"):
        ImageIndex.build(ckpt, world["images"], tmp_path / "b", bits=64)
    pipe = ImageIndex.build(ckpt, world["images"], tmp_path / "c")
    assert pipe.n_bits == 16 and len(pipe) == 12
    assert pipe.manifest["encoder"]["source"].endswith("encoder.npz")


def test_build_refuses_an_existing_index_and_bad_arguments(world, tmp_path):
    with pytest.raises(ValueError, match="already holds an index"):
        ImageIndex.build(world["ckpt"], world["images"], world["index"], fit_on=world["images"])
    with pytest.raises(ValueError, match="no image files"):
        (tmp_path / "empty").mkdir()
        ImageIndex.build(world["ckpt"], tmp_path / "empty", tmp_path / "x", fit_on=world["images"])
    with pytest.raises(ValueError, match="feature width 256, got 300"):
        ImageIndex.build(world["ckpt"], world["images"], tmp_path / "y", bits=300, fit_on=world["images"])
    with pytest.raises(FileNotFoundError):
        ImageIndex.build(tmp_path / "missing.safetensors", world["images"], tmp_path / "z", fit_on=world["images"])
    for name in ("x", "y"):
        leftovers = sorted(p.name for p in (tmp_path / name).iterdir()) if (tmp_path / name).exists() else []
        assert "manifest.json" not in leftovers and "model.safetensors" not in leftovers


def test_load_refuses_another_checkpoint_or_bit_width(world, tmp_path):
    from dfsnet.models import checkpoint_hash

    other = _tiny_checkpoint(tmp_path / "other", seed=1)
    built, found = checkpoint_hash(world["ckpt"]), checkpoint_hash(other)
    with pytest.raises(ValueError, match=f"hash {built}.*hash {found}"):
        ImageIndex.load(world["index"], model=other)
    with pytest.raises(ValueError, match=f"holds {BITS}-bit codes, not 64-bit"):
        ImageIndex.load(world["index"], bits=64)
    assert len(ImageIndex.load(world["index"], model=world["ckpt"], bits=BITS)) == 12
    pipe = ImageIndex.load(world["index"])
    with pytest.raises(ValueError, match=f"hash {built}.*hash {found}"):
        pipe.add(world["images"], model=other)
    with pytest.raises(FileNotFoundError, match="not a dfsnet index"):
        ImageIndex.load(tmp_path)


def test_add_appends_new_images_and_skips_known_content(world, index_copy, tmp_path):
    pipe = ImageIndex.load(index_copy)
    report = pipe.add(world["images"])
    assert (report.n_added, report.n_duplicates, report.n_bad) == (0, 12, 0)
    assert report.generation == 1 and pipe.manifest["generation"] == 1

    new = make_image_folder(tmp_path / "new", n_classes=2, per_class=3, seed=7)
    shutil.copy(world["images"] / "class_0" / "000.jpg", new / "class_0" / "copy.jpg")  # known content
    (new / "class_1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (new / "class_1" / "truncated.jpg").write_bytes((new / "class_1" / "000.jpg").read_bytes()[:300])
    report = pipe.add(new)
    assert (report.n_added, report.n_duplicates, report.n_bad) == (6, 1, 2)
    assert sorted(Path(p).name for p in report.bad_paths) == ["broken.jpg", "truncated.jpg"]
    assert len(pipe) == report.count == 18 and pipe.manifest["generation"] == 2
    assert pipe.record(17).label == "class_1" and pipe.record(12).id == 12
    hits = pipe.search(new / "class_1" / "002.jpg", k=3, rerank=True)
    assert hits[0].path == str((new / "class_1" / "002.jpg").resolve())
    # The previous generation stays (for `dfsnet index repair`); feature chunks accumulate.
    names = sorted(p.name for p in index_copy.iterdir())
    assert {"codes.000001.hidx", "metadata.000001.sqlite", "manifest.000001.json"} <= set(names)
    assert {"codes.000002.hidx", "metadata.000002.sqlite", "features.000001.npy", "features.000002.npy"} <= set(names)
    assert verify_index(index_copy, files="all").ok
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    (only_bad / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    report = pipe.add(only_bad)
    assert (report.n_added, report.n_bad, report.generation, report.count) == (0, 1, 2, 18)
    reloaded = ImageIndex.load(index_copy)
    assert len(reloaded) == 18 and reloaded.info()["stats"] == {"n_bad": 2, "n_duplicates": 1}


def test_a_loaded_index_follows_writes_of_another(world, index_copy, tmp_path):
    reader, writer = ImageIndex.load(index_copy), ImageIndex.load(index_copy)
    writer.add(make_image_folder(tmp_path / "more", n_classes=2, per_class=2, seed=3))
    assert len(reader) == 12
    query = tmp_path / "more" / "class_1" / "001.jpg"
    assert all(h.id < 12 for h in reader.search(query, k=12))
    assert reader.refresh() and len(reader) == 16
    assert not reader.refresh()
    assert any(h.path == str(query.resolve()) and h.distance == 0 for h in reader.search(query, k=16))


@pytest.mark.parametrize("fail_at", ["codes", "features", "metadata", "manifest"])
def test_a_failed_write_leaves_the_previous_index_intact(world, index_copy, tmp_path, monkeypatch, fail_at):
    """Fault injection at each step of the commit (the SIGKILL test is in tests/commands)."""
    from dfsnet.index import HammingIndex

    before = (index_copy / "manifest.json").read_bytes()
    new = make_image_folder(tmp_path / "new", n_classes=2, per_class=2, seed=5)

    class Crash(Exception):
        pass

    def crash(*args, **kwargs):
        raise Crash(fail_at)

    target = {"codes": (HammingIndex, "save"), "features": (np, "save"),
              "metadata": (builder_module, "write_metadata"),
              "manifest": (builder_module, "write_manifest")}[fail_at]
    with monkeypatch.context() as patch:
        patch.setattr(*target, crash)
        with pytest.raises(Crash):
            ImageIndex.load(index_copy).add(new)
    assert (index_copy / "manifest.json").read_bytes() == before
    pipe = ImageIndex.load(index_copy)
    assert len(pipe) == 12 and verify_index(index_copy, files="all").ok
    # The next write clears the debris of the failed one and succeeds.
    report = pipe.add(new)
    assert report.n_added == 4 and report.generation == 2
    names = {p.name for p in index_copy.iterdir()}
    assert not any(n.endswith(".tmp") or "000003" in n for n in names)
    assert {"codes.000001.hidx", "manifest.000001.json", "codes.000002.hidx", "manifest.000002.json"} <= names
    assert verify_index(index_copy, files="all").ok


def test_verify_reports_each_kind_of_damage(world, tmp_path, index_copy):
    from dfsnet.models import checkpoint_hash

    assert verify_index(index_copy).ok
    other = _tiny_checkpoint(tmp_path / "other", seed=2)
    errors = verify_index(index_copy, model=other).errors
    assert len(errors) == 1 and checkpoint_hash(other) in errors[0] and checkpoint_hash(world["ckpt"]) in errors[0]

    def damaged(edit) -> list[str]:
        dst = tmp_path / f"damaged{len(list(tmp_path.iterdir()))}"
        shutil.copytree(index_copy, dst)
        edit(dst)
        return verify_index(dst, files="all").errors

    def set_count(d, n):
        m = json.loads((d / "manifest.json").read_text())
        m["count"] = n
        (d / "manifest.json").write_text(json.dumps(m))

    errors = damaged(lambda d: set_count(d, 13))
    assert any("13" in e and "12 codes" in e for e in errors) and any("12 images" in e for e in errors)
    errors = damaged(lambda d: (d / "codes.000001.hidx").unlink())
    assert errors == ["files named by the manifest are missing: codes.000001.hidx"]
    errors = damaged(lambda d: (d / "encoder.npz").write_bytes(b"junk"))
    assert any("encoder.npz" in e for e in errors)

    def flip_byte(d):
        raw = bytearray((d / "codes.000001.hidx").read_bytes())
        raw[-1] ^= 0xFF
        (d / "codes.000001.hidx").write_bytes(bytes(raw))

    assert any("codes.000001.hidx" in e for e in damaged(flip_byte))
    with pytest.raises(ValueError, match="not valid JSON"):
        damaged(lambda d: (d / "manifest.json").write_text("{"))


def test_verify_notices_changed_and_missing_image_files(tmp_path, world):
    images = make_image_folder(tmp_path / "imgs", n_classes=2, per_class=2, seed=9)
    index = tmp_path / "idx"
    ImageIndex.build(world["ckpt"], images, index, bits=BITS, fit_on=world["images"])
    assert verify_index(index, files="all").ok
    Image.new("RGB", (32, 32), "white").save(images / "class_0" / "000.jpg")
    (images / "class_1" / "001.jpg").unlink()
    errors = verify_index(index, files="all").errors
    assert len(errors) == 2
    assert "changed since it was indexed" in errors[0] and "cannot be read" in errors[1]
    assert verify_index(index, files="none").ok


def test_concurrent_searches_agree(world):
    pipe = ImageIndex.load(world["index"])
    queries = sorted(world["images"].rglob("*.jpg"))
    expected = [pipe.search(q, k=5) for q in queries]
    results: dict[int, list] = {}

    def worker(i: int) -> None:
        results[i] = [pipe.search(q, k=5) for q in queries]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 6 and all(r == expected for r in results.values())


def test_a_folder_with_hostile_images_indexes_the_good_ones_and_counts_the_rest(world, tmp_path):
    from tests.test_images import bad_image_files

    images = make_image_folder(tmp_path / "imgs", n_classes=2, per_class=2, seed=13)
    bad = bad_image_files(images / "class_0")
    index = ImageIndex.build(world["ckpt"], images, tmp_path / "idx", bits=BITS, fit_on=world["images"])
    report = index.last_report
    assert (report.n_added, report.n_bad, len(index)) == (4, len(bad), 4)
    assert sorted(report.bad_paths) == bad


def test_precision_is_recorded_and_an_index_is_searchable_in_the_other(world, tmp_path, monkeypatch):
    from dfsnet import precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    index = ImageIndex.build(world["ckpt"], world["images"], tmp_path / "bf16", bits=BITS, fit_on=world["images"],
                             precision="auto", device="cpu")
    assert index.manifest["precision"] == "bf16" and index.precision.name == "bf16"
    fp32 = ImageIndex.load(tmp_path / "bf16", precision="fp32", device="cpu")
    assert fp32.info()["precision"] == {"built": "bf16", "loaded": "fp32"}
    queries = sorted(world["images"].rglob("*.jpg"))
    codes = {p: (index.encoder.transform(index.embed([p])), fp32.encoder.transform(fp32.embed([p])))
             for p in queries}
    agree = np.mean([np.unpackbits(a ^ b).sum() == 0 for a, b in codes.values()])
    assert agree >= 0.5  # tiny random-weight model; real figures in BENCHMARKS.md
    for p in queries:  # each image is found again across precisions
        assert str(p.resolve()) in [h.path for h in fp32.search(p, k=3)]
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    plain = ImageIndex.build(world["ckpt"], world["images"] / "class_0", tmp_path / "fp32", bits=BITS,
                             fit_on=world["images"], device="cpu")
    assert plain.manifest["precision"] == "fp32"


def test_the_training_encoder_choice_is_recorded_and_shown(world, tmp_path, capsys):
    import json

    from dfsnet.cli import main

    ckpt = _tiny_checkpoint(tmp_path / "model")
    _encoder_beside(ckpt, world["images"], BITS)
    selection = {"choice": "itq", "selected_on": "validation", "n_bits": BITS,
                 "candidates": {"learned": {"map_at_k": 0.61, "map_all": 0.6, "k": 50},
                                "itq": {"map_at_k": 0.72, "map_all": 0.7, "k": 50}}}
    (ckpt.parent / "train_summary.json").write_text(json.dumps({"val_acc": 0.9, "encoder": selection}))
    index = ImageIndex.build(ckpt, world["images"], tmp_path / "idx", device="cpu")
    assert index.manifest["encoder"]["selection"] == selection and index.info()["encoder"]["selection"] == selection
    assert main(["index", "info", str(tmp_path / "idx")]) == 0
    assert "itq at 32 bits, by validation mAP@50 (learned 61.00, itq 72.00)" in capsys.readouterr().out
    plain = ImageIndex.build(ckpt, world["images"], tmp_path / "fit", bits=BITS, fit_on=world["images"], device="cpu")
    assert plain.manifest["encoder"]["selection"] is None  # fitted here, not chosen by training
