"""dfsnet train's default encoder: chosen on the validation split; the same seed gives the same weights
through `dfsnet train` and `dfsnet experiment`."""
from __future__ import annotations

import json

import numpy as np
import pytest

from dfsnet.cli import main
from dfsnet.hashing import LinearHasher
from dfsnet.train.workflow import encoder_candidates, select_encoder
from tests.conftest import make_image_folder


def _parts(X, y, n_fit):
    return (X[:n_fit], y[:n_fit]), (X[n_fit:], y[n_fit:])


def test_selection_picks_itq_when_the_head_is_poor(rng):
    # Classes far apart in every direction: ITQ separates them; this head has collapsed (one code for all).
    means = rng.normal(0, 6, size=(4, 16))
    y = rng.integers(0, 4, 400)
    X = (means[y] + rng.normal(0, 1, size=(400, 16))).astype(np.float32)
    head = LinearHasher.from_weights(np.zeros((8, 16)), np.ones(8))
    fit, val = _parts(X, y, 300)
    candidates = encoder_candidates(16, 8, n_train=300, learned=head)
    assert list(candidates) == ["learned", "itq", "paper"]
    choice, scores = select_encoder(candidates, fit, val, k=100)
    assert choice == "itq" and scores["itq"]["map_at_k"] > scores["learned"]["map_at_k"]
    assert set(scores["itq"]) == {"map_at_k", "map_all", "k"} and scores["itq"]["k"] == 99  # the other val images


def test_selection_picks_the_head_when_it_wins(rng):
    # The class signal lives in 2 low-variance columns; 14 loud noise columns dominate ITQ's PCA.
    y = rng.integers(0, 2, 400)
    X = np.concatenate([rng.normal(0, 10, size=(400, 14)), (2 * y - 1)[:, None] + rng.normal(0, 0.1, (400, 2))],
                       axis=1).astype(np.float32)
    fit, val = _parts(X, y, 300)
    head = LinearHasher(n_bits=8, epochs=40, batch_size=64).fit(*fit)
    choice, scores = select_encoder(encoder_candidates(16, 8, n_train=300, learned=head), fit, val, k=100)
    assert choice == "learned" and scores["learned"]["map_at_k"] > scores["itq"]["map_at_k"] + 0.1


def test_itq_is_left_out_when_longer_than_the_fit_images():
    assert list(encoder_candidates(32, 16, n_train=10)) == ["paper"]


TINY = ["--backbone", "test_efficientnet", "--no-pretrained", "--image-size", "32", "--batch-size", "8"]


def test_same_seed_same_weights_through_train_and_experiment(tmp_path, capsys):
    import torch

    from dfsnet.experiments import config_from_dict, run_experiment
    from dfsnet.models import load_checkpoint

    images = make_image_folder(tmp_path / "images", n_classes=3, per_class=10, size=32)
    cfg = config_from_dict({
        "name": "tiny", "out_dir": str(tmp_path / "runs"), "backbones": ["test_efficientnet"],
        "pretrained": False, "datasets": ["folder"], "data_root": {"folder": str(images)},
        "protocol": "per-class", "split": {"query_per_class": 2, "train_per_class": 6, "val_fraction": 0.34},
        "image_size": 32, "epochs": 3, "batch_size": 8, "patience": 3, "bits": [8], "k": 5, "pr_bits": 8,
        "ablations": [], "ties": ["stable"], "learned_max_bits": 0,
    })
    results = run_experiment(cfg)
    (setting,) = results["settings"]
    dfs = setting["networks"]["dfs"]
    out = tmp_path / "train"
    code = main([str(a) for a in ("train", "--data", images, *TINY, "--epochs", 3, "--patience", 3,
                                  "--split", setting["split_file"], "--encoder", "paper", "--bits", 8, "--out", out)])
    assert code == 0, capsys.readouterr().err
    a, _ = load_checkpoint(dfs["checkpoint"])
    b, _ = load_checkpoint(out / "model.safetensors")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["encoder"]["choice"] == "paper" and summary["hash_head"] == "none"
    assert summary["monitor"] == "val_map_loo" and summary["augment"] == "flip"


def test_default_train_records_the_validation_choice(tmp_path, capsys):
    from dfsnet.hashing import Encoder
    from dfsnet.models import load_checkpoint

    images = make_image_folder(tmp_path / "images", n_classes=3, per_class=8, size=32)
    out = tmp_path / "run"
    code = main([str(a) for a in ("train", "--data", images, *TINY, "--epochs", 2, "--bits", 8,
                                  "--val-fraction", 0.3, "--out", out)])
    stdout = capsys.readouterr().out
    assert code == 0 and "chosen on the validation images" in stdout
    summary = json.loads((out / "train_summary.json").read_text())
    record = summary["encoder"]
    assert record["selected_on"] == "validation" and record["choice"] in record["candidates"]
    assert "learned" in record["candidates"] and record["n_bits"] == 8
    best = max(v["map_at_k"] for v in record["candidates"].values())
    assert record["candidates"][record["choice"]]["map_at_k"] == best
    assert Encoder.load(out / "encoder.npz").n_bits_ == 8
    model, extra = load_checkpoint(out / "model.safetensors")  # a plain DFSNet: the head went to the encoder
    assert model.hash is None and extra["hash_bits"] == [8] and extra["monitor"] == "val_map_loo"


@pytest.mark.parametrize("augment", ["flip", "flip_image"])
def test_head_augmentations_train_and_refit(tmp_path, capsys, augment):
    images = make_image_folder(tmp_path / "images", n_classes=2, per_class=8, size=32)
    out = tmp_path / "run"
    code = main([str(a) for a in ("train", "--data", images, *TINY, "--epochs", 2, "--bits", 8, "--augment", augment,
                                  "--mixup", 0.4, "--val-fraction", 0.3, "--refit", "--encoder", "learned",
                                  "--out", out)])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["augment"] == augment and summary["encoder"]["choice"] == "learned" and summary["mixup"] == 0.4
    assert summary["refit_epochs"] >= 1 and (out / "model.safetensors").is_file()
    if augment == "flip_image":
        assert len(list((out / "cache").glob("maps-*.npy"))) >= 3  # fit, val and the mirrored fit images
