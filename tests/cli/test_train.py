"""`dfsnet train` and `dfsnet extract` end to end on a tiny folder, and their user errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dfsnet.cli import main
from tests.conftest import make_image_folder

TINY = ["--backbone", "test_efficientnet", "--no-pretrained", "--image-size", "32", "--batch-size", "8"]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("cli_train") / "images", n_classes=3, per_class=8)


def test_train_then_extract(images, tmp_path, capsys):
    from dfsnet.data import ImageFolder, Split, build_transforms
    from dfsnet.features import extract_features
    from dfsnet.hashing import Encoder
    from dfsnet.models import checkpoint_hash, load_checkpoint

    out = tmp_path / "run"
    code, stdout, err = run(capsys, "train", "--data", images, *TINY, "--epochs", "1", "--bits", "16",
                            "--val-fraction", "0.3", "--out", out)
    assert code == 0, err
    assert "val top-1 accuracy" in stdout and "16 bits" in stdout
    for name in ("model.safetensors", "encoder.npz", "split.json", "train_summary.json"):
        assert (out / name).is_file(), name
    split = Split.load(out / "split.json")
    assert split.protocol == "per-class" and split.val.size > 0
    assert Encoder.load(out / "encoder.npz").n_bits_ == 16
    model, extra = load_checkpoint(out / "model.safetensors")
    assert extra["image_size"] == 32 and extra["mode"] == "head" and model.meta.dfs
    assert json.loads((out / "train_summary.json").read_text())["epochs"] == 1

    features = tmp_path / "features.npz"
    code, stdout, err = run(capsys, "extract", "--model", out / "model.safetensors", "--data", images,
                            "--out", features, "--batch-size", "8")
    assert code == 0, err
    with np.load(features, allow_pickle=False) as z:
        assert z["features"].shape == (24, model.meta.feature_dim) and z["features"].dtype == np.float32
        assert z["labels"].tolist() == sorted(z["labels"].tolist()) and z["paths"].shape == (24,)
        assert str(z["checkpoint"]) == checkpoint_hash(out / "model.safetensors")
        ds = ImageFolder(images, transform=build_transforms(model.meta, train=False, image_size=32))
        np.testing.assert_allclose(z["features"], extract_features(model, ds), rtol=1e-4, atol=1e-5)
        assert z["paths"].tolist() == [p for p, _ in ds.samples]

    code, _, err = run(capsys, "extract", "--model", out / "model.safetensors", "--data", images / "class_1",
                       "--unlabeled", "--out", features)
    assert code == 0, err
    with np.load(features, allow_pickle=False) as z:
        assert z["features"].shape == (8, model.meta.feature_dim) and (z["labels"] == -1).all()


def _assert_clean_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def test_one_class_folder_is_a_clean_error(tmp_path, capsys):
    root = make_image_folder(tmp_path / "one", n_classes=1, per_class=3)
    code, _, err = run(capsys, "train", "--data", root, *TINY, "--out", tmp_path / "run")
    _assert_clean_error(code, err, "dfsnet train: error:", "only one class")


def test_unknown_backbone_is_a_clean_error(images, tmp_path, capsys):
    code, _, err = run(capsys, "train", "--data", images, "--backbone", "resnet_50x", "--no-pretrained",
                       "--out", tmp_path / "run")
    _assert_clean_error(code, err, "unknown backbone 'resnet_50x'", "resnet50")


def test_init_checkpoint_for_other_classes_names_both(images, tmp_path, capsys):
    import torch

    from dfsnet.models import DFSNet, create_backbone, save_checkpoint

    torch.manual_seed(0)
    ckpt = save_checkpoint(DFSNet(create_backbone("test_efficientnet"), 5), tmp_path / "five.safetensors")
    code, _, err = run(capsys, "train", "--data", images, *TINY, "--init", ckpt, "--out", tmp_path / "run")
    _assert_clean_error(code, err, "num_classes=5", "num_classes=3")


def test_missing_files_are_clean_errors(images, tmp_path, capsys):
    code, _, err = run(capsys, "extract", "--model", tmp_path / "nope.safetensors", "--data", images,
                       "--out", tmp_path / "f.npz")
    _assert_clean_error(code, err, "dfsnet extract: error:", "nope.safetensors")
    code, _, err = run(capsys, "train", "--data", images, *TINY, "--weights", tmp_path / "w.pt",
                       "--out", tmp_path / "run")
    _assert_clean_error(code, err, "w.pt")


def test_encoder_settings_are_checked_before_training(images, tmp_path, capsys):
    out = tmp_path / "run"
    for argv, needles in [
        (("--hasher", "lsh"), ("hasher: expected one of", "'itq'")),
        (("--selector", "mrmr"), ("selector: expected one of", "'random'")),
        (("--bits", "5000"), ("bits: expected at most the backbone's feature width",)),
        (("--selector", "none", "--bits", "16"), ("bits: with no selector", "one bit per feature")),
        (("--hasher", "itq", "--bits", "64"), ("bits: ITQ learns 64 principal directions from the",)),
    ]:
        code, _, err = run(capsys, "train", "--data", images, *TINY, "--val-fraction", "0.3", *argv, "--out", out)
        _assert_clean_error(code, err, "dfsnet train: error:", *needles)
        assert not (out / "model.safetensors").exists(), argv  # refused before any training


def test_selector_none_hashes_every_feature(images, tmp_path, capsys):
    from dfsnet.hashing import Encoder
    from dfsnet.models import read_checkpoint_meta

    out = tmp_path / "run"
    code, stdout, err = run(capsys, "train", "--data", images, *TINY, "--epochs", "1", "--val-fraction", "0.3",
                            "--selector", "none", "--out", out)
    assert code == 0, err
    encoder = Encoder.load(out / "encoder.npz")
    assert encoder.selector is None
    assert encoder.n_bits_ == read_checkpoint_meta(out / "model.safetensors")[0].feature_dim


def test_unusable_paths_and_devices_are_clean_errors(images, tmp_path, capsys, monkeypatch):
    import torch

    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run(capsys, "train", "--data", images, *TINY, "--out", blocker)
    _assert_clean_error(code, err, "--out: expected an output folder", "is a file")
    code, _, err = run(capsys, "train", "--data", images, *TINY, "--split", tmp_path, "--out", tmp_path / "run")
    _assert_clean_error(code, err, "path: no such split file")

    torch.manual_seed(0)
    from dfsnet.models import DFSNet, create_backbone, save_checkpoint

    ckpt = save_checkpoint(DFSNet(create_backbone("test_efficientnet"), 3), tmp_path / "m.safetensors")
    extract = ["extract", "--model", ckpt, "--data", images, "--image-size", "32"]
    code, _, err = run(capsys, *extract, "--out", tmp_path)
    _assert_clean_error(code, err, "--out: expected the path of an .npz file", "is a folder")
    code, _, err = run(capsys, *extract, "--cache-dir", blocker, "--out", tmp_path / "f.npz")
    _assert_clean_error(code, err, "cache_dir: expected a folder")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run(capsys, *extract, "--device", "cuda", "--out", tmp_path / "f.npz")
    _assert_clean_error(code, err, "device: got 'cuda', but this machine has 0 usable CUDA device(s)")
    assert not (tmp_path / "f.npz").exists()


def test_help_documents_every_option(capsys):
    for command in ("train", "extract"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        parser_options = [o for o in text.split() if o.startswith("--")]
        assert "--out" in text and len(parser_options) > 5
        assert "--no-progress" in text and "--device" in text and "cuda when available" in text


def test_a_split_that_cannot_be_drawn_fails_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import dfsnet.models

    data = make_image_folder(tmp_path / "imgs", n_classes=3, per_class=6)
    for extra in sorted((data / "class_1").iterdir())[1:]:
        extra.unlink()  # class_1 keeps one image: too few for a query and a training image

    def no_model(*args, **kwargs):
        raise AssertionError("the backbone was created before the split was checked")

    monkeypatch.setattr(dfsnet.models, "create_backbone", no_model)
    code, _, err = run(capsys, "train", "--data", data, *TINY, "--split-protocol", "per-class", "--out",
                       tmp_path / "run")
    assert code == 2 and "'class_1' (1)" in err and "Traceback" not in err
