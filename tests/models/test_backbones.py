"""Backbone creation, name resolution, layout checks and local weight files (random weights, tiny inputs)."""
from __future__ import annotations

import pickle

import pytest
import timm
import torch
from safetensors.torch import save_file

from dfsnet.models import DEFAULT_BACKBONE, Backbone, DFSNet, create_backbone, list_backbones

# The paper's backbones, the width of their pooled features, and a small input they accept.
PAPER_BACKBONES = [
    ("resnet50", "resnet50", 2048, 64),
    ("inception_v3", "inception_v3", 2048, 75),  # Inception-v3 needs at least 75 px
    ("mobilenetv2", "mobilenetv2_100", 1280, 64),
    ("efficientnet_lite0", "tf_efficientnet_lite0", 1280, 64),
]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_list_backbones_names_the_paper_models_and_default():
    assert list_backbones() == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "inception_v3",
                                "mobilenetv2", "resnet50"]
    assert DEFAULT_BACKBONE == "efficientnet_lite0"


@pytest.mark.parametrize("name,timm_name,dim,px", PAPER_BACKBONES)
def test_paper_backbones_build_with_and_without_dfs(name, timm_name, dim, px):
    backbone = create_backbone(name)
    assert isinstance(backbone, Backbone)
    meta = backbone.meta
    assert (meta.name, meta.timm_name, meta.feature_dim, meta.weights) == (name, timm_name, dim, None)
    assert meta.input_size[0] == 3 and len(meta.mean) == len(meta.std) == 3
    x = torch.randn(2, 3, px, px)
    with torch.no_grad():
        fmap = backbone.eval()(x)
        assert fmap.shape[:2] == (2, dim) and fmap.dim() == 4
        for dfs in (True, False):
            net = DFSNet(backbone, 5, dfs=dfs).eval()
            assert net.features(x).shape == (2, dim)
            assert net(x).shape == (2, 5)


def test_backbone_meta_follows_timm_config():
    meta = create_backbone("inception_v3").meta
    cfg = timm.models.get_pretrained_cfg("inception_v3")
    assert meta.input_size == cfg.input_size == (3, 299, 299)
    assert (meta.mean, meta.std, meta.interpolation, meta.crop_pct) == (cfg.mean, cfg.std, cfg.interpolation,
                                                                       cfg.crop_pct)


def test_any_timm_cnn_name_works():
    backbone = create_backbone("test_efficientnet")
    assert backbone.meta.timm_name == "test_efficientnet"
    assert backbone.meta.feature_dim == backbone.model.num_features
    assert backbone(torch.randn(2, 3, 32, 32)).shape[:2] == (2, backbone.meta.feature_dim)


@pytest.mark.parametrize("typo,expected", [("resnt50", "resnet50"), ("mobilenetv_2", "mobilenetv2"),
                                           ("efficientnet_lite", "efficientnet_lite0")])
def test_unknown_name_lists_close_valid_names(typo, expected):
    with pytest.raises(ValueError, match="unknown backbone") as err:
        create_backbone(typo)
    assert expected in str(err.value).split("closest valid names:")[1].split(".")[0]


def test_non_cnn_model_is_refused():
    with pytest.raises(ValueError, match=r"test_vit.*not a CNN backbone.*\(1, \d+, \d+\)"):
        create_backbone("test_vit")


def test_in_chans_adapts_input_and_meta():
    backbone = create_backbone("test_efficientnet", in_chans=1)
    assert backbone.meta.input_size[0] == 1 and len(backbone.meta.mean) == len(backbone.meta.std) == 1
    assert backbone(torch.randn(2, 1, 32, 32)).shape[1] == backbone.meta.feature_dim
    with pytest.raises(ValueError, match=r"x: expected a batch of shape \(N, 1, H, W\), got \(2, 3, 32, 32\)"):
        backbone(torch.randn(2, 3, 32, 32))


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="name"):
        create_backbone(None)
    with pytest.raises(ValueError, match="in_chans"):
        create_backbone("test_efficientnet", in_chans=0)


# --- local weights files ------------------------------------------------------------------------------

def _full_state_dict(name: str) -> dict[str, torch.Tensor]:
    """A state dict as timm saves it, classifier included."""
    torch.manual_seed(1)
    return timm.create_model(name).state_dict()


@pytest.mark.parametrize("fmt", ["safetensors", "torch", "torch-nested"])
def test_weights_file_loads_every_tensor(tmp_path, fmt):
    state = _full_state_dict("test_efficientnet")
    path = tmp_path / f"w.{fmt}"
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state, "epoch": 3} if fmt == "torch-nested" else state, path)
    backbone = create_backbone("test_efficientnet", weights=path)
    assert backbone.meta.weights == f"file:{path.name}"
    loaded = backbone.model.state_dict()
    assert set(loaded) == {k for k in state if not k.startswith("classifier.")}
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)


def test_rgb_weights_file_adapts_to_one_input_channel(tmp_path):
    state = _full_state_dict("test_efficientnet")
    path = tmp_path / "rgb.safetensors"
    save_file(state, str(path))
    backbone = create_backbone("test_efficientnet", weights=path, in_chans=1)
    torch.testing.assert_close(backbone.model.conv_stem.weight, state["conv_stem.weight"].sum(dim=1, keepdim=True))


def test_weights_file_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"weights: no such file: .*nope\.pth"):
        create_backbone("test_efficientnet", weights=tmp_path / "nope.pth")


def test_weights_file_that_is_not_a_state_dict(tmp_path):
    listing = tmp_path / "list.pth"
    torch.save([1, 2, 3], listing)
    with pytest.raises(ValueError, match=r"not a state dict.*found list"):
        create_backbone("test_efficientnet", weights=listing)

    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x00\x01not a checkpoint at all" * 10)
    with pytest.raises(ValueError, match="weights: .*garbage.bin"):
        create_backbone("test_efficientnet", weights=garbage)

    # A few stray bytes failed inside torch's unpickler with struct.error, a bare traceback.
    short = tmp_path / "short.pth"
    short.write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"weights: .*short\.pth is not a state dict"):
        create_backbone("test_efficientnet", weights=short)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_weights_file_with_arbitrary_pickle_is_refused_unexecuted(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"conv_stem.weight": _Evil()}, fh, protocol=2)
    with pytest.raises(ValueError, match="weights_only"):
        create_backbone("test_efficientnet", weights=path)
    assert "must never run" not in capsys.readouterr().out


def test_weights_for_another_model_are_refused(tmp_path):
    path = tmp_path / "resnet.safetensors"
    save_file(_full_state_dict("test_resnet"), str(path))
    with pytest.raises(ValueError, match=r"does not fit timm's 'test_efficientnet'.*missing.*unexpected"):
        create_backbone("test_efficientnet", weights=path)


# --- hub weights without a network ----------------------------------------------------------------------

@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """Huggingface hub in offline mode with an empty cache, as on a machine without network."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


def test_pretrained_without_network_explains_how_to_get_weights(offline_hub):
    with pytest.raises(FileNotFoundError) as err:
        create_backbone("test_efficientnet", pretrained=True)
    msg = str(err.value)
    assert "timm/test_efficientnet" in msg
    assert "pretrained=False" in msg and "weights=PATH" in msg


def test_pretrained_for_a_model_timm_has_no_weights_for():
    with pytest.raises(ValueError, match="no pretrained weights for 'mobilenetv2_035'"):
        create_backbone("mobilenetv2_035", pretrained=True)
