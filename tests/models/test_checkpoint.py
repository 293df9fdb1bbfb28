"""Checkpoint round trips, hashing and the refusal of wrong, missing or damaged files."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from dfsnet._io import sha256_file
from dfsnet.models import DFSNet, checkpoint_hash, create_backbone, load_checkpoint, save_checkpoint
from dfsnet.models.checkpoint import read_checkpoint_meta


def _trained_like(name: str = "test_efficientnet", num_classes: int = 3, **kwargs) -> DFSNet:
    """A DFSNet whose BN running statistics moved away from their initial values."""
    torch.manual_seed(0)
    net = DFSNet(create_backbone(name), num_classes, **kwargs).train()
    with torch.no_grad():
        net(torch.randn(4, 3, 32, 32) * 2 + 1)
    return net.eval()


@pytest.mark.parametrize("dfs", [True, False])
def test_round_trip_gives_identical_outputs(tmp_path, dfs):
    net = _trained_like(dfs=dfs, class_names=["a", "b", "c"])
    extra = {"epoch": 7, "val_acc": 0.5, "split": "paper"}
    path = save_checkpoint(net, tmp_path / "sub" / "model.safetensors", extra=extra)
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["model.safetensors"]  # no temp files left behind

    loaded, loaded_extra = load_checkpoint(path)
    assert loaded_extra == extra
    assert loaded.meta == net.meta and not loaded.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
        assert torch.equal(loaded.features(x), net.features(x))
    state, loaded_state = net.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)


def test_meta_readable_without_weights(tmp_path):
    net = _trained_like()
    path = save_checkpoint(net, tmp_path / "m.safetensors", extra={"k": [1, 2], "val_acc": float("nan")})
    meta, extra = read_checkpoint_meta(path)
    assert meta == net.meta and extra["k"] == [1, 2] and math.isnan(extra["val_acc"])


def test_load_needs_no_network(tmp_path, monkeypatch):
    path = save_checkpoint(_trained_like(), tmp_path / "m.safetensors")

    def no_network(*args, **kwargs):
        raise AssertionError("load_checkpoint tried to open a network connection")

    monkeypatch.setattr("socket.socket.connect", no_network)
    model, _ = load_checkpoint(path)
    assert model.meta.timm_name == "test_efficientnet"


def test_hash_is_short_stable_and_tracks_content(tmp_path):
    net = _trained_like()
    a = save_checkpoint(net, tmp_path / "a.safetensors")
    b = save_checkpoint(net, tmp_path / "b.safetensors")
    assert len(checkpoint_hash(a)) == 16 and int(checkpoint_hash(a), 16) >= 0
    assert a.read_bytes() == b.read_bytes()  # same model, same bytes, same hash
    assert checkpoint_hash(a) == checkpoint_hash(b) == sha256_file(a)[:16]
    with torch.no_grad():
        net.fc.bias[0] += 1
    assert checkpoint_hash(save_checkpoint(net, tmp_path / "c.safetensors")) != checkpoint_hash(a)
    with pytest.raises(FileNotFoundError, match="path: no such checkpoint file"):
        checkpoint_hash(tmp_path / "missing.safetensors")


def test_data_parallel_wrapper_is_unwrapped(tmp_path):
    net = _trained_like()
    path = save_checkpoint(nn.DataParallel(net), tmp_path / "dp.safetensors")
    assert load_checkpoint(path)[0].meta == net.meta


def test_checkpoint_for_another_backbone_or_class_count_is_refused(tmp_path):
    path = save_checkpoint(_trained_like(num_classes=3), tmp_path / "m.safetensors")
    with pytest.raises(ValueError) as err:
        load_checkpoint(path, expect={"backbone": "efficientnet_lite0", "num_classes": 10})
    msg = str(err.value)
    assert "backbone='test_efficientnet'" in msg and "num_classes=3" in msg
    assert "backbone='efficientnet_lite0'" in msg and "num_classes=10" in msg
    with pytest.raises(ValueError, match="num_classes=3.*num_classes=4"):
        load_checkpoint(path, expect={"num_classes": 4})
    with pytest.raises(ValueError, match="dfs=True.*dfs=False"):
        load_checkpoint(path, expect={"dfs": False})
    with pytest.raises(ValueError, match="expect: unknown keys"):
        load_checkpoint(path, expect={"classes": 3})
    assert load_checkpoint(path, expect={"backbone": "test_efficientnet", "num_classes": 3})[0].meta.num_classes == 3


def test_expected_backbone_matches_by_alias_or_timm_name(tmp_path):
    torch.manual_seed(0)
    net = DFSNet(create_backbone("efficientnet_lite0"), 2, dfs=False)
    path = save_checkpoint(net, tmp_path / "lite.safetensors")
    for name in ("efficientnet_lite0", "tf_efficientnet_lite0"):
        model, _ = load_checkpoint(path, expect={"backbone": name, "num_classes": 2})
        assert model.meta.name == "efficientnet_lite0"
    with pytest.raises(ValueError, match="backbone='efficientnet_lite0'.*backbone='mobilenetv2'"):
        load_checkpoint(path, expect={"backbone": "mobilenetv2"})


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_truncated_file(tmp_path):
    path = save_checkpoint(_trained_like(), tmp_path / "m.safetensors")
    data = path.read_bytes()
    for cut in (4, 100, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="not a readable safetensors checkpoint"):
            load_checkpoint(bad)


def test_files_that_are_not_dfsnet_checkpoints(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello " * 100)
    with pytest.raises(ValueError, match="not a readable safetensors checkpoint"):
        load_checkpoint(text)

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a dfsnet checkpoint"):
        load_checkpoint(plain)
    with pytest.raises(ValueError, match="weights: .*does not fit"):  # and no backbone weights either
        create_backbone("test_efficientnet", weights=plain)

    pickled = tmp_path / "model.pth"
    torch.save(_trained_like().state_dict(), pickled)
    with pytest.raises(ValueError, match="not a readable safetensors checkpoint"):
        load_checkpoint(pickled)


def _save_raw(path, net, *, drop=(), **header_changes):
    """Write a checkpoint by hand, to damage its header or weights on purpose."""
    header = {"format": "dfsnet.checkpoint", "format_version": 1, "dfsnet_version": "0",
              "meta": net.meta.to_dict(), "extra": {}, **header_changes}
    state = {k: v.contiguous() for k, v in net.state_dict().items() if not k.startswith(drop)}
    save_file(state, str(path), metadata={"dfsnet": json.dumps(header)})
    return path


def test_hand_written_checkpoint_loads(tmp_path):
    net = _trained_like()
    assert load_checkpoint(_save_raw(tmp_path / "ok.safetensors", net))[0].meta == net.meta


def test_newer_format_version_is_refused(tmp_path):
    path = _save_raw(tmp_path / "future.safetensors", _trained_like(), format_version=99)
    with pytest.raises(ValueError, match="format version 99"):
        load_checkpoint(path)


def test_malformed_meta_is_refused(tmp_path):
    path = _save_raw(tmp_path / "bad.safetensors", _trained_like(), meta={"num_classes": 3})
    with pytest.raises(ValueError, match="malformed dfsnet header"):
        load_checkpoint(path)


def test_weights_that_do_not_fit_the_meta_are_refused(tmp_path):
    path = _save_raw(tmp_path / "partial.safetensors", _trained_like(), drop=("fc.",))
    with pytest.raises(ValueError, match=r"do not fit.*2 missing.*fc.weight"):
        load_checkpoint(path)


def test_save_argument_errors(tmp_path):
    with pytest.raises(TypeError, match="model: expected a DFSNet"):
        save_checkpoint(nn.Linear(2, 2), tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match="extra: expected JSON-serialisable"):
        save_checkpoint(_trained_like(), tmp_path / "x.safetensors", extra={"t": torch.zeros(1)})
    with pytest.raises(TypeError, match="extra: expected a mapping"):
        save_checkpoint(_trained_like(), tmp_path / "x.safetensors", extra=[1])
    assert not (tmp_path / "x.safetensors").exists()
