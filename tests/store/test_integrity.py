"""The hostile suite, kept: every file of an index damaged every way, and the defects of issue 13."""
from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from dfsnet.cli import main
from dfsnet.errors import UserError
from dfsnet.store import ImageIndex, read_manifest, verify_index
from tests.conftest import make_image_folder

BITS = 32
FILES = ("manifest", "model", "encoder", "codes", "metadata", "features")
DAMAGE = ("flip_first", "flip_middle", "flip_last", "half", "zero", "delete")


def _checkpoint(folder: Path, seed: int = 0) -> Path:
    import torch

    from dfsnet.models import DFSNet, create_backbone, save_checkpoint

    torch.manual_seed(seed)
    net = DFSNet(create_backbone("test_efficientnet", pretrained=False), num_classes=3)
    return save_checkpoint(net, folder / "best.safetensors", extra={"image_size": 32})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("integrity")
    ckpt = _checkpoint(root / "model")
    images = make_image_folder(root / "images", n_classes=3, per_class=3, size=32, seed=21)
    ImageIndex.build(ckpt, images, root / "index", bits=BITS, fit_on=images, store_features=True, batch_size=9)
    return {"root": root, "ckpt": ckpt, "images": images, "index": root / "index"}


@pytest.fixture
def copy(tiny, tmp_path) -> Path:
    shutil.copytree(tiny["index"], tmp_path / "index")
    return tmp_path / "index"


def file_of(index: Path, kind: str) -> str:
    m = json.loads((index / "manifest.json").read_text())
    return {"manifest": "manifest.json", "model": "model.safetensors", "encoder": "encoder.npz",
            "codes": m["files"]["codes"], "metadata": m["files"]["metadata"],
            "features": m["files"]["features"][-1]["file"]}[kind]


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "delete":
        path.unlink()
    elif how == "zero":
        path.write_bytes(b"")
    elif how == "half":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[{"flip_first": 0, "flip_middle": len(data) // 2, "flip_last": -1}[how]] ^= 0xFF
        path.write_bytes(bytes(data))


def _no_500(client: TestClient, query: bytes) -> None:
    for response in (client.get("/healthz"), client.get("/api/info"), client.get("/api/images/0"),
                     client.post("/api/search", files={"file": ("q.jpg", query)}, data={"k": "3", "rerank": "true"})):
        assert response.status_code < 500 or response.status_code == 503, (response.request.url, response.text)


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("kind", FILES)
def test_corruption_matrix(tiny, copy, kind, how, capsys):
    name = file_of(copy, kind)
    damage(copy / name, how)
    # verify names the damaged file; a manifest it cannot read is a one-line error naming it.
    try:
        report = verify_index(copy, files="none")
    except (UserError, OSError) as exc:
        assert kind == "manifest" and "manifest.json" in str(exc) and "\n" not in str(exc)
    else:
        assert report.errors, f"{how} of {name} passed verify"
        assert any(name in e for e in report.errors), report.errors
    # The CLI: a one-line error (rc 2) or a report (rc 1) naming it, never a traceback.
    code, (_, err) = main(["index", "verify", str(copy)]), capsys.readouterr()
    assert code in (1, 2) and name in err and "Traceback" not in err
    query = (tiny["images"] / "class_1" / "001.jpg").read_bytes()
    code = main(["search", str(copy), str(tiny["images"] / "class_1" / "001.jpg"), "-k", "2"])
    err = capsys.readouterr().err
    assert code in (0, 2) and "Traceback" not in err
    if code == 2:
        assert len(err.strip().splitlines()) == 1
    # The service refuses to start, or serves without a 500.
    try:
        app = ImageIndex.load(copy)
    except (UserError, OSError):
        return
    assert kind == "features" and how.startswith("flip") and how != "flip_first"  # size and header intact
    from dfsnet.web import create_app

    with TestClient(create_app(app), base_url="http://localhost") as client:
        _no_500(client, query)


def test_a_flipped_sign_bit_in_the_features_is_damage(copy):
    """D5: one sign bit flipped passed verify while re-ranking went wrong."""
    name = file_of(copy, "features")
    data = bytearray((copy / name).read_bytes())
    data[-1] ^= 0x80  # the sign bit of the last float (little-endian)
    (copy / name).write_bytes(bytes(data))
    errors = verify_index(copy, files="none").errors
    assert errors and all(name in e for e in errors)


@pytest.mark.parametrize("where", ["middle", "path"])
def test_metadata_flips_are_damage_not_changed_images(copy, where):
    """D5: a flip inside a row or a path passed the default verify, or read as "image changed"."""
    name = file_of(copy, "metadata")
    data = bytearray((copy / name).read_bytes())
    at = data.find(b"class_1") if where == "path" else len(data) // 2
    data[at] ^= 0x01
    (copy / name).write_bytes(bytes(data))
    errors = verify_index(copy).errors
    assert errors and f"{name} is damaged" in errors[0]
    with pytest.raises(UserError, match=name):
        ImageIndex.load(copy)


def test_empty_features_file_is_reported_not_a_crash(copy):
    """D4: an empty features file made verify raise EOFError."""
    name = file_of(copy, "features")
    (copy / name).write_bytes(b"")
    assert any(name in e for e in verify_index(copy).errors)


def test_a_codes_file_of_another_width_is_refused(tiny, copy, tmp_path):
    """D6: a 64-bit codes file in a 32-bit index let serve start and 500 on every search."""
    other = ImageIndex.build(tiny["ckpt"], tiny["images"], tmp_path / "other", bits=16, fit_on=tiny["images"])
    shutil.copy(other.index_dir / other.manifest["files"]["codes"], copy / file_of(copy, "codes"))
    with pytest.raises(UserError, match="codes"):
        ImageIndex.load(copy)
    assert any("codes" in e for e in verify_index(copy).errors)


def test_old_manifests_without_checksums_still_load(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["checksums"], manifest["next_id"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert len(ImageIndex.load(copy)) == 9
    report = verify_index(copy)
    assert report.ok and any("no checksum" in n for n in report.notes)


@pytest.mark.parametrize("drop", ["files", "count", "checkpoint"])
def test_a_manifest_missing_keys_is_a_clear_error(copy, drop):
    """D11: valid JSON without the keys was a KeyError (500 on live refresh)."""
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest[drop]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=f"'{drop}'"):
        read_manifest(copy)


def test_a_live_server_keeps_the_last_good_generation(tiny, copy, tmp_path):
    """D3/D6: a damaged or incompatible new generation is refused; /healthz says degraded."""
    from dfsnet.web import create_app

    query = (tiny["images"] / "class_0" / "000.jpg").read_bytes()
    with TestClient(create_app(copy, refresh_interval=0.01), base_url="http://localhost") as client:
        ImageIndex.load(copy).add(make_image_folder(tmp_path / "more", n_classes=1, per_class=2, seed=5))
        damage(copy / file_of(copy, "metadata"), "half")
        assert client.get("/api/info").json()["count"] == 9
        health = client.get("/healthz").json()
        assert health["status"] == "degraded" and "metadata" in health["problem"] and health["generation"] == 1
        response = client.post("/api/search", files={"file": ("q.jpg", query)}, data={"k": "3"})
        assert response.status_code == 200 and response.json()["count"] == 9


def test_a_live_server_refuses_another_bit_width(tiny, copy, tmp_path):
    from dfsnet.web import create_app

    with TestClient(create_app(copy, refresh_interval=0.01), base_url="http://localhost") as client:
        other = ImageIndex.build(tiny["ckpt"], tiny["images"], tmp_path / "other", bits=16, fit_on=tiny["images"])
        manifest = dict(other.manifest, generation=5)
        for f in other.index_dir.iterdir():
            if f.name not in (".lock", "manifest.json"):
                shutil.copy(f, copy / f.name)
        (copy / "manifest.json").write_text(json.dumps(manifest))
        time.sleep(0.02)
        health = client.get("/healthz").json()
        assert health["status"] == "degraded" and "bits" in health["problem"], health
        info = client.get("/api/info").json()
        assert info["bits"] == BITS and info["count"] == 9


def test_image_ids_outside_int64_are_404(tiny):
    """D2: ids past int64 were an OverflowError (500)."""
    from dfsnet.web import create_app

    with TestClient(create_app(tiny["index"]), base_url="http://localhost") as client:
        for image_id in (2**63, -(2**63) - 1, 10**40, 2**63 - 1):
            response = client.get(f"/api/images/{image_id}")
            assert response.status_code == 404, response.text


def test_search_output_escapes_control_characters(tiny, tmp_path, capsys):
    """D11: file names were printed raw, terminal escapes included."""
    images = tmp_path / "imgs"
    images.mkdir()
    name = "evil\x1b[2Jname\u202e.jpg"
    shutil.copy(tiny["images"] / "class_0" / "000.jpg", images / name)
    ImageIndex.build(tiny["ckpt"], images, tmp_path / "idx", bits=BITS, fit_on=tiny["images"])
    capsys.readouterr()
    assert main(["search", str(tmp_path / "idx"), str(images / name), "-k", "1"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\u202e" not in out and "evil\\x1b[2Jname\\u202e.jpg" in out


def test_build_refuses_bits_above_the_feature_width_before_extracting(tiny, tmp_path, monkeypatch, capsys):
    """CLI: `--bits 5000` failed only after the whole extraction."""
    from dfsnet.store import builder

    def never(*args, **kwargs):
        raise AssertionError("features were extracted before the bit width was checked")

    monkeypatch.setattr(builder.Builder, "extract", never)
    code = main(["index", "build", str(tmp_path / "x"), "--model", str(tiny["ckpt"]), "--images",
                 str(tiny["images"]), "--fit-on", str(tiny["images"]), "--bits", "5000"])
    err = capsys.readouterr().err
    assert code == 2 and "bits: expected at most the backbone's feature width 256, got 5000" in err


def test_io_of_a_damaged_index_over_http_is_503_not_500(tiny, copy):
    """A file of the served generation damaged while it is served: 503 and degraded, not 500."""
    from dfsnet.web import create_app

    with TestClient(create_app(copy, refresh_interval=0), base_url="http://localhost") as client:
        damage(copy / file_of(copy, "features"), "half")
        query = (tiny["images"] / "class_0" / "000.jpg").read_bytes()
        response = client.post("/api/search", files={"file": ("q.jpg", io.BytesIO(query))},
                               data={"k": "9", "rerank": "true"})
        assert response.status_code == 503 and "features" in response.json()["detail"]
        assert client.get("/healthz").json()["status"] == "degraded"
