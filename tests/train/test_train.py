"""train_model (head and full mode, resume, early stopping) and evaluate_accuracy on tiny data."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dfsnet.data import ImageFolder, Subset, build_transforms
from dfsnet.models import DFSNet, create_backbone, load_checkpoint
from dfsnet.train import TrainResult, evaluate_accuracy, train_model
from tests.conftest import make_image_folder

SIZE = 32
FAST = dict(batch_size=4, progress=False, num_workers=0)


def _net(dfs: bool = True) -> DFSNet:
    torch.manual_seed(0)
    return DFSNet(create_backbone("test_efficientnet"), 3, dfs=dfs)


def _sets(root: Path, meta, *, train_transform=None):
    ds = ImageFolder(root, transform=build_transforms(meta, train=False, image_size=SIZE))
    idx = np.arange(len(ds))
    return Subset(ds, idx[idx % 4 != 3], transform=train_transform), Subset(ds, idx[idx % 4 == 3])


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("train") / "images", n_classes=3, per_class=8, size=SIZE)


def test_head_training_resume_and_restart(data_root, tmp_path):
    model = _net()
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    train_set, val_set = _sets(data_root, model.backbone.meta)
    out = tmp_path / "run"
    result = train_model(model, train_set, val_set, mode="head", epochs=3, lr=1e-2, out_dir=out, **FAST)
    assert isinstance(result, TrainResult)
    assert result.epochs_run == 3 and result.start_epoch == 0
    assert [e["epoch"] for e in result.history] == [0, 1, 2]
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.cache_seconds > 0
    assert result.best_val_acc == max(e["val_acc"] for e in result.history)
    for k, v in model.backbone.state_dict().items():  # head-only training leaves the backbone alone
        assert torch.equal(v, backbone_before[k]), k
    assert all(p.requires_grad for p in model.parameters())  # and gives it back unfrozen
    assert result.checkpoint == out / "model.safetensors"
    loaded, extra = load_checkpoint(result.checkpoint)
    assert extra["mode"] == "head" and extra["epochs"] == 3
    assert extra["val_acc"] == pytest.approx(result.best_val_acc)
    for k, v in loaded.state_dict().items():  # the returned model holds the exported (best) weights
        assert torch.equal(v, model.state_dict()[k]), k
    assert (out / "checkpoints" / "last.ckpt").is_file() and (out / "checkpoints" / "best.ckpt").is_file()
    assert list(out.glob("logs/version_*/metrics.csv")) and list((out / "cache").glob("maps-*.npy"))

    # Resume: epochs count on from the previous run, and the maps come from the cache.
    resumed = train_model(_net(), train_set, val_set, mode="head", epochs=4, lr=1e-2, out_dir=out, **FAST)
    assert resumed.start_epoch == 3 and resumed.epochs_run == 4
    assert [e["epoch"] for e in resumed.history] == [0, 1, 2, 3]
    assert resumed.history[:3] == result.history
    assert resumed.cache_seconds == 0.0
    assert load_checkpoint(resumed.checkpoint)[1]["epochs"] == 4

    # A damaged resume point (e.g. a crash while Lightning wrote it) is a clean error.
    last = out / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"resume: .*last\.ckpt is unreadable .*resume=False"):
        train_model(_net(), train_set, val_set, mode="head", epochs=5, lr=1e-2, out_dir=out, **FAST)

    with pytest.raises(ValueError, match=r"resume: .*dfs: True -> False"):
        train_model(_net(dfs=False), train_set, val_set, mode="head", epochs=5, out_dir=out, **FAST)
    fresh = train_model(_net(dfs=False), train_set, val_set, mode="head", epochs=1, out_dir=out,
                        resume=False, **FAST)
    assert fresh.start_epoch == 0 and fresh.epochs_run == 1


def test_early_stopping_and_finished_run(data_root, tmp_path):
    model = _net(dfs=False)
    train_set, val_set = _sets(data_root, model.backbone.meta)
    # A negligible learning rate cannot improve val accuracy, so patience 1 stops after epoch 2.
    result = train_model(model, train_set, val_set, mode="head", epochs=6, lr=1e-12, patience=1,
                         out_dir=tmp_path, **FAST)
    assert result.stopped_early and result.epochs_run == 2
    again = train_model(model, train_set, val_set, mode="head", epochs=6, lr=1e-12, patience=1,
                        out_dir=tmp_path, **FAST)
    assert again.stopped_early and again.epochs_run == 2 and again.start_epoch == 2


def test_full_mode_trains_backbone(data_root, tmp_path):
    model = _net()
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    aug = build_transforms(model.backbone.meta, train=True, image_size=SIZE)
    train_set, val_set = _sets(data_root, model.backbone.meta, train_transform=aug)
    result = train_model(model, train_set, val_set, mode="full", epochs=1, lr=1e-2, backbone_lr_mult=1.0,
                         out_dir=tmp_path, **FAST)
    assert result.epochs_run == 1 and result.checkpoint.is_file()
    assert load_checkpoint(result.checkpoint)[1]["mode"] == "full"
    changed = [k for k, v in model.backbone.state_dict().items()
               if k.endswith("weight") and not torch.equal(v, before[k])]
    assert changed


def test_evaluate_accuracy_matches_argmax(data_root):
    model = _net().eval()
    _, val_set = _sets(data_root, model.backbone.meta)
    x = torch.stack([val_set[i][0] for i in range(len(val_set))])
    with torch.no_grad():
        expected = float((model(x).argmax(1).numpy() == val_set.targets).mean())
    assert evaluate_accuracy(model, val_set, batch_size=4) == pytest.approx(expected)


def test_train_model_rejects_bad_arguments(data_root, tmp_path):
    model = _net()
    train_set, val_set = _sets(data_root, model.backbone.meta)
    with pytest.raises(ValueError, match="mode"):
        train_model(model, train_set, val_set, mode="partial", out_dir=tmp_path)
    with pytest.raises(ValueError, match="val_set"):
        train_model(model, train_set, Subset(train_set, []), out_dir=tmp_path)
    with pytest.raises(TypeError, match="model"):
        train_model(torch.nn.Linear(2, 2), train_set, val_set, out_dir=tmp_path)
    with pytest.raises(ValueError, match="optimizer"):
        train_model(model, train_set, val_set, optimizer="lbfgs", out_dir=tmp_path)
    with pytest.raises(ValueError, match="lr: expected a finite non-negative number, got inf"):
        train_model(model, train_set, val_set, lr=float("inf"), out_dir=tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(NotADirectoryError, match="out_dir: expected a folder, but .*file is a file"):
        train_model(model, train_set, val_set, out_dir=blocker)
    # Labels beyond the classifier failed deep inside the loss, after caching.
    torch.manual_seed(0)
    two_classes = DFSNet(create_backbone("test_efficientnet"), 2)
    with pytest.raises(ValueError, match=r"train_set: expected class labels in \[0, 2\) .* found labels in \[0, 2\]"):
        train_model(two_classes, train_set, val_set, out_dir=tmp_path / "two")
    assert not (tmp_path / "two").exists()


@pytest.mark.parametrize("mode", ["head", "full"])
def test_bf16_training_runs_and_is_recorded(data_root, tmp_path, monkeypatch, mode):
    from dfsnet import precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    model = _net()
    train_set, val_set = _sets(data_root, model.backbone.meta)
    # Asked for by name: auto trains the full network in fp32 on a CPU (resolve_training_precision).
    result = train_model(model, train_set, val_set, mode=mode, epochs=2, lr=1e-2, out_dir=tmp_path / "run",
                         precision="bf16", accelerator="cpu", **FAST)
    assert result.precision == "bf16" and result.epochs_run == 2
    assert np.isfinite([e["train_loss"] for e in result.history]).all()
    loaded, extra = load_checkpoint(result.checkpoint)
    assert extra["precision"] == "bf16"
    assert all(p.dtype == torch.float32 for p in loaded.parameters())  # autocast keeps fp32 weights
    # The model comes back in the default memory format, for whoever uses it next.
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1))
    assert conv.weight.is_contiguous()


@pytest.mark.parametrize("hash_bits", [None, 8])
def test_leave_one_out_validation_map_selects_the_epoch(data_root, tmp_path, hash_bits):
    from dfsnet.eval.metrics import leave_one_out_map
    from dfsnet.features import cached_feature_maps, extract_from_maps

    torch.manual_seed(0)
    model = DFSNet(create_backbone("test_efficientnet"), 3, dfs=True, hash_bits=hash_bits)
    train_set, val_set = _sets(data_root, model.backbone.meta)
    result = train_model(model, train_set, val_set, mode="head", epochs=3, lr=1e-2, out_dir=tmp_path / "run",
                         monitor="val_map_loo", patience=None, accelerator="cpu", precision="fp32", **FAST)
    scores = [e["val_map_loo"] for e in result.history]
    assert len(scores) == 3 and "val_map" not in result.history[0]
    assert result.best_val_map == max(scores) and result.best_epoch == int(np.argmax(scores))
    # The best model's validation images, scored against each other, give the recorded figure.
    maps = cached_feature_maps(model.backbone, val_set, cache_dir=tmp_path / "run" / "cache", precision="fp32",
                               runtime="torch", device="cpu")
    feats = extract_from_maps(model, maps.maps, device="cpu", precision="fp32")
    y = val_set.targets
    if hash_bits:
        head = model.export_hasher(8)
        signs = np.where(feats @ head.coef_ + head.intercept_ >= 0, 1.0, -1.0)
        dist = (8 - signs @ signs.T) / 2
    else:
        f = feats.astype(np.float64)
        dist = ((f[:, None] - f[None]) ** 2).sum(axis=2)
    from dfsnet.train.workflow import validation_cutoff

    assert leave_one_out_map(dist, y, k=validation_cutoff(len(y)), ties="expected") == pytest.approx(
        result.best_val_map, abs=1e-6)


def test_leave_one_out_monitor_needs_two_validation_images(data_root, tmp_path):
    from dfsnet.errors import InputError

    model = _net()
    train_set, val_set = _sets(data_root, model.backbone.meta)
    one = Subset(val_set, [0])
    with pytest.raises(InputError, match="val_set: monitor 'val_map_loo'.*at least 2, got 1"):
        train_model(model, train_set, one, mode="head", epochs=1, out_dir=tmp_path / "run", monitor="val_map_loo",
                    accelerator="cpu", **FAST)
    with pytest.raises(InputError, match="maps_runtime: expected one of .*'onnx'.*'tensorrt'"):
        train_model(model, train_set, val_set, mode="head", epochs=1, out_dir=tmp_path / "run",
                    maps_runtime="tensorrt", accelerator="cpu", **FAST)


def test_full_mode_monitors_the_leave_one_out_map_but_not_the_maps_one(data_root, tmp_path):
    from dfsnet.errors import InputError

    model = _net()
    train_set, val_set = _sets(data_root, model.backbone.meta)
    with pytest.raises(InputError, match="monitor: 'val_map' ranks against the cached maps of head mode"):
        train_model(model, train_set, val_set, mode="full", epochs=1, out_dir=tmp_path / "a", monitor="val_map",
                    accelerator="cpu", **FAST)
    result = train_model(model, train_set, val_set, mode="full", epochs=2, out_dir=tmp_path / "b",
                         monitor="val_map_loo", patience=None, accelerator="cpu", **FAST)
    scores = [e["val_map_loo"] for e in result.history]
    assert len(scores) == 2 and result.best_val_map == max(scores) and 0 <= result.best_val_map <= 1
