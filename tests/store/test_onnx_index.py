"""An index's ONNX graph: written by build, checked on load, used by search/embed/add, equal to torch fp32."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from dfsnet.errors import InputError
from dfsnet.store import ImageIndex, read_manifest, verify_index
from dfsnet.store.manifest import IndexDamagedError
from tests.conftest import make_image_folder
from tests.store.test_unsupervised import distinct_images

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

BITS = 16


def _tiny_weights(path: Path) -> Path:
    """A random test_efficientnet state dict in timm's layout, for indexing without a model."""
    import torch
    from safetensors.torch import save_file

    from dfsnet.models import create_backbone

    torch.manual_seed(0)
    backbone = create_backbone("test_efficientnet", pretrained=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in backbone.model.state_dict().items()}, str(path))
    return path


def _build(images, out, weights, *, bits: int = BITS, **kw) -> ImageIndex:
    return ImageIndex.build(images_dir=images, out_dir=out, backbone="test_efficientnet", weights=weights,
                            bits=bits, image_size=32, store_features=True, batch_size=8, device="cpu", **kw)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One index built with runtime onnx (one export for the module) and one with runtime torch."""
    root = tmp_path_factory.mktemp("onnx_index")
    weights = _tiny_weights(root / "weights" / "tiny.safetensors")
    images = make_image_folder(root / "images", n_classes=3, per_class=4, size=32, seed=4)
    distinct_images(images / "misc", 5, size=32, seed=5)
    built = _build(images, root / "onnx", weights, runtime="onnx")
    _build(images, root / "torch", weights, runtime="torch")
    return {"root": root, "weights": weights, "images": images, "onnx": root / "onnx", "torch": root / "torch",
            "built": built}


@pytest.fixture
def onnx_copy(world, tmp_path) -> Path:
    shutil.copytree(world["onnx"], tmp_path / "index")
    return tmp_path / "index"


def _paths(images: Path) -> list[Path]:
    return sorted(p for p in images.rglob("*.jpg"))


def test_build_writes_the_graph_and_records_it(world):
    index_dir = world["onnx"]
    manifest = read_manifest(index_dir)
    assert manifest["runtime"] == "onnx" and manifest["precision"] == "fp32"
    entry = manifest["onnx"]
    assert entry["file"] == "model.onnx"
    assert entry["sha256"] == hashlib.sha256((index_dir / "model.onnx").read_bytes()).hexdigest()
    assert entry["input_shape"] == [3, 32, 32] and entry["feature_dim"] == manifest["model"]["feature_dim"]
    assert entry["preprocess"]["input_size"] == [3, 32, 32]
    assert world["built"].runtime == "onnx" and len(world["built"]) == 17
    assert verify_index(index_dir, files="all").errors == []


def test_info_says_which_runtime_built_and_serves(world):
    onnx = ImageIndex.load(world["onnx"], runtime="onnx")
    assert onnx.info()["runtime"] == {"built": "onnx", "loaded": "onnx", "onnx_graph": True}
    assert onnx.info()["precision"]["loaded"] == "fp32"
    torch_ = ImageIndex.load(world["onnx"], runtime="torch", precision="fp32")
    assert torch_.info()["runtime"] == {"built": "onnx", "loaded": "torch", "onnx_graph": True}
    plain = ImageIndex.load(world["torch"], runtime="torch")
    assert plain.info()["runtime"] == {"built": "torch", "loaded": "torch", "onnx_graph": False}


def test_onnx_and_torch_fp32_agree(world):
    onnx = ImageIndex.load(world["onnx"], runtime="onnx")
    torch_ = ImageIndex.load(world["onnx"], runtime="torch", precision="fp32", device="cpu")
    assert onnx.runtime == "onnx" and torch_.runtime == "torch"
    paths = _paths(world["images"])
    a, b = onnx.embed(paths), torch_.embed(paths)
    assert a.shape == b.shape == (len(paths), onnx.manifest["model"]["feature_dim"])
    assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()
    for path in paths:
        hits_onnx, hits_torch = onnx.search(path, k=5), torch_.search(path, k=5)
        assert [(h.id, h.distance) for h in hits_onnx] == [(h.id, h.distance) for h in hits_torch]
        assert hits_onnx[0].distance == 0
        assert str(path.resolve()) in [h.path for h in hits_onnx if h.distance == 0]
        nearest = onnx.search(path, k=1, rerank=True)[0]  # by the float features: exactly itself
        assert nearest.path == str(path.resolve()) and nearest.score == pytest.approx(0, abs=1e-4)
    assert onnx._torch is None  # searching with ONNX Runtime never loaded the torch network


def test_onnx_on_an_index_without_a_graph_says_how_to_fix(world, monkeypatch):
    with pytest.raises(InputError, match=r"no ONNX graph.*runtime torch \(--runtime torch\)"):
        ImageIndex.load(world["torch"], runtime="onnx")
    monkeypatch.setenv("DFSNET_RUNTIME", "auto")
    assert ImageIndex.load(world["torch"]).runtime == "torch"  # auto falls back
    assert ImageIndex.load(world["onnx"]).runtime == "onnx"
    assert ImageIndex.load(world["onnx"], precision="bf16").runtime == "torch"
    with pytest.raises(InputError, match="bf16"):
        ImageIndex.load(world["onnx"], runtime="onnx", precision="bf16")
    monkeypatch.setenv("DFSNET_RUNTIME", "torch")
    assert ImageIndex.load(world["onnx"]).runtime == "torch"


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_graph_is_refused_but_torch_still_serves(onnx_copy, world, damage):
    graph = onnx_copy / "model.onnx"
    data = bytearray(graph.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
        graph.write_bytes(bytes(data))
    else:
        graph.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(IndexDamagedError, match="model.onnx"):
        ImageIndex.load(onnx_copy, runtime="onnx")
    report = verify_index(onnx_copy)
    assert not report.ok and any("model.onnx" in e for e in report.errors)
    index = ImageIndex.load(onnx_copy, runtime="torch", precision="fp32")
    query = _paths(world["images"])[0]
    assert index.search(query, k=1, rerank=True)[0].path == str(query.resolve())


def test_a_missing_graph_is_refused_naming_it(onnx_copy, monkeypatch):
    (onnx_copy / "model.onnx").unlink()
    with pytest.raises(IndexDamagedError, match="model.onnx"):
        ImageIndex.load(onnx_copy, runtime="onnx")
    report = verify_index(onnx_copy)
    assert not report.ok and any("model.onnx" in e for e in report.errors)
    # torch does not need the graph: the index still serves, and auto falls back to it
    assert ImageIndex.load(onnx_copy, runtime="torch").search(ImageIndex.load(onnx_copy, runtime="torch")
                                                              .record(0).path, k=1)[0].id == 0
    monkeypatch.setenv("DFSNET_RUNTIME", "auto")
    with pytest.raises(IndexDamagedError, match="model.onnx"):
        ImageIndex.load(onnx_copy, runtime="auto")


def test_add_with_onnx_stores_the_codes_torch_computes(onnx_copy, tmp_path, monkeypatch):
    from dfsnet.runtime import OnnxFeatures

    index = ImageIndex.load(onnx_copy, runtime="onnx")
    more = distinct_images(tmp_path / "more", 4, size=32, seed=11)
    run, rows = OnnxFeatures.__call__, []

    def counting(self, images):
        rows.append(len(images))
        return run(self, images)

    monkeypatch.setattr(OnnxFeatures, "__call__", counting)
    report = index.add(more)
    assert report.n_added == 4 and len(index) == 21
    assert sum(rows) == 4  # extracted with the graph
    assert index._torch is None  # ...without loading torch's network
    monkeypatch.undo()
    reference = ImageIndex.load(onnx_copy, runtime="torch", precision="fp32", device="cpu")
    paths = _paths(more)
    by_path = {r.path: r.id for r in reference.records(limit=100)}
    ids = np.array([by_path[str(p.resolve())] for p in paths], dtype=np.int64)
    features = reference.embed(paths)
    np.testing.assert_array_equal(reference._state.codes_of(ids), reference.encoder.transform(features))
    stored = reference._state.features_of(ids)
    assert np.abs(stored - features).max() <= 1e-4 * np.abs(features).max()
    assert verify_index(onnx_copy, files="all").errors == []


def test_a_torch_build_writes_no_graph(world):
    manifest = read_manifest(world["torch"])
    assert manifest["runtime"] == "torch" and manifest["onnx"] is None
    assert not (world["torch"] / "model.onnx").exists()
    assert verify_index(world["torch"], files="all").errors == []


def test_a_forced_torch_rebuild_removes_the_stale_graph(onnx_copy, world):
    index = _build(world["images"] / "class_0", onnx_copy, world["weights"], bits=4, runtime="torch", force=True)
    assert len(index) == 4 and index.runtime == "torch"
    manifest = read_manifest(onnx_copy)
    assert manifest["onnx"] is None and manifest["runtime"] == "torch"
    assert not (onnx_copy / "model.onnx").exists()
    assert verify_index(onnx_copy, files="all").errors == []


def test_onnx_build_refuses_bf16_before_writing(world, tmp_path):
    with pytest.raises(InputError, match="bf16"):
        _build(world["images"], tmp_path / "idx", world["weights"], runtime="onnx", precision="bf16")
    assert not (tmp_path / "idx").exists()


def test_export_onnx_gives_a_torch_built_index_the_graph_a_build_would_write(world, tmp_path, monkeypatch):
    from dfsnet.store import add_onnx_graph

    index_dir = tmp_path / "index"
    shutil.copytree(world["torch"], index_dir)
    before = read_manifest(index_dir)
    report = add_onnx_graph(index_dir)
    assert report.status == "added" and report.generation == before["generation"] + 1
    after = read_manifest(index_dir)
    graph_sha = hashlib.sha256((index_dir / "model.onnx").read_bytes()).hexdigest()
    assert after["onnx"]["sha256"] == report.sha256 == graph_sha
    assert {k: v for k, v in after["onnx"].items() if k != "sha256"} == \
        {k: v for k, v in read_manifest(world["onnx"])["onnx"].items() if k != "sha256"}
    assert after["runtime"] == "torch" and after["count"] == before["count"]  # what computed the codes
    assert verify_index(index_dir, files="all").errors == []
    monkeypatch.setenv("DFSNET_RUNTIME", "auto")
    onnx = ImageIndex.load(index_dir)
    torch_ = ImageIndex.load(index_dir, runtime="torch", precision="fp32", device="cpu")
    assert onnx.runtime == "onnx"
    for path in _paths(world["images"]):
        assert [(h.id, h.distance) for h in onnx.search(path, k=5)] == \
            [(h.id, h.distance) for h in torch_.search(path, k=5)]
    # Again: nothing to do. A damaged graph is written again.
    assert add_onnx_graph(index_dir).status == "present"
    assert read_manifest(index_dir)["generation"] == report.generation
    graph = index_dir / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:100])
    again = add_onnx_graph(index_dir)
    assert again.status == "replaced" and again.generation == report.generation + 1
    assert verify_index(index_dir, files="all").errors == []


def test_export_onnx_refuses_a_damaged_index_and_writes_nothing(world, tmp_path):
    from dfsnet.store import add_onnx_graph

    index_dir = tmp_path / "index"
    shutil.copytree(world["torch"], index_dir)
    metadata = index_dir / read_manifest(index_dir)["files"]["metadata"]
    data = bytearray(metadata.read_bytes())
    data[len(data) // 2] ^= 0xFF
    metadata.write_bytes(bytes(data))
    files = sorted(p.name for p in index_dir.iterdir())
    with pytest.raises(IndexDamagedError, match="metadata"):
        add_onnx_graph(index_dir)
    assert sorted(p.name for p in index_dir.iterdir()) == files


def test_export_onnx_without_the_exporter_says_what_to_install(world, tmp_path, monkeypatch):
    import dfsnet.runtime
    from dfsnet.store import add_onnx_graph

    monkeypatch.setattr(dfsnet.runtime, "onnx_available", lambda export=False: False)
    with pytest.raises(InputError, match="pip install onnxscript onnxruntime"):
        add_onnx_graph(world["torch"])
