"""DFS module widths and shapes, DFS-Net forward/features/head paths, gradients and meta."""
from __future__ import annotations

import copy
import itertools
import json

import numpy as np
import pytest
import torch
from torch import nn

from dfsnet.errors import InputError
from dfsnet.models import DFSModule, DFSNet, create_backbone
from dfsnet.models.network import DFSNetMeta, dfs_branch_widths

INCEPTION_E = (320, 768, 768, 192)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def tiny_backbone():
    torch.manual_seed(0)
    return create_backbone("test_efficientnet")


def test_branch_widths_for_the_paper_backbones():
    assert dfs_branch_widths(2048) == INCEPTION_E
    assert dfs_branch_widths(1280) == (200, 480, 480, 120)


@pytest.mark.parametrize("out_channels", [6, 7, 16, 100, 256, 333, 960, 1024, 1536, 1280, 2048, 2049])
def test_branch_widths_sum_exactly_and_keep_the_ratio(out_channels):
    widths = dfs_branch_widths(out_channels)
    assert sum(widths) == out_channels
    for w, r in zip(widths, INCEPTION_E):
        assert abs(w - out_channels * r / sum(INCEPTION_E)) < 1  # each branch is within rounding of its share


def test_branch_widths_too_narrow():
    with pytest.raises(ValueError, match="out_channels: expected at least 6"):
        dfs_branch_widths(5)
    with pytest.raises(TypeError, match="out_channels"):
        dfs_branch_widths(64.0)


@pytest.mark.parametrize("size", [1, 2, 5])
def test_dfs_module_preserves_spatial_size(size):
    module = DFSModule(48, 100, reduce_channels=16).eval()
    assert module.widths == (16, 38, 37, 9)
    out = module(torch.randn(2, 48, size, size))
    assert out.shape == (2, 100, size, size)
    # Every branch ends in a ReLU, so each branch's channel block is non-negative and some of it active.
    bounds = torch.cumsum(torch.tensor((0,) + module.widths), 0).tolist()
    for lo, hi in itertools.pairwise(bounds):
        block = out[:, lo:hi]
        assert (block >= 0).all() and (block > 0).any()


def test_dfs_module_layers_follow_inception_e():
    module = DFSModule(2048, 2048)
    convs = {name: m for name, m in module.named_modules() if isinstance(m, nn.Conv2d)}
    kernels = {name: (m.in_channels, m.out_channels, m.kernel_size) for name, m in convs.items()}
    assert kernels["reduce.0"] == (2048, 192, (1, 1))
    assert kernels["branch1.0"] == (192, 320, (1, 1))
    assert kernels["branch2.0.0"] == (192, 384, (1, 1))
    assert kernels["branch2.1.conv_1x3.0"] == (384, 384, (1, 3))
    assert kernels["branch2.1.conv_3x1.0"] == (384, 384, (3, 1))
    assert kernels["branch3.0.0"] == (192, 448, (1, 1))
    assert kernels["branch3.1.0"] == (448, 384, (3, 3))
    assert kernels["branch3.2.conv_1x3.0"][1:] == (384, (1, 3))
    assert kernels["branch4.1.0"] == (192, 192, (1, 1))
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in module.modules())
    n_relu = sum(isinstance(m, nn.ReLU) for m in module.modules())
    assert n_bn == n_relu == len(convs) == 10  # 1 + 1 + 3 + 4 + 1


@pytest.mark.parametrize("name,px", [("efficientnet_lite0", 64), ("test_efficientnet", 32)])
@pytest.mark.parametrize("dfs", [True, False])
def test_one_backward_pass_reaches_every_trainable_parameter(name, px, dfs):
    net = DFSNet(create_backbone(name), 4, dfs=dfs).train()
    x, y = torch.randn(2, 3, px, px), torch.tensor([0, 3])
    nn.functional.cross_entropy(net(x), y).backward()
    params = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    assert params
    missing = [n for n, p in params if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.any()]
    assert missing == []


def test_head_paths_match_the_full_network(tiny_backbone):
    net = DFSNet(tiny_backbone, 3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fmap = net.backbone(x)
        torch.testing.assert_close(net.head_forward(fmap), net(x))
        torch.testing.assert_close(net.head_features(fmap), net.features(x))
    with pytest.raises(ValueError, match=r"fmap: expected a feature map of shape \(N, 256, h, w\)"):
        net.head_forward(torch.randn(2, 255, 1, 1))


def test_ori_network_has_no_dfs_module(tiny_backbone):
    ori, dfs = DFSNet(tiny_backbone, 3, dfs=False), DFSNet(tiny_backbone, 3, dfs=True)
    assert isinstance(ori.dfs, nn.Identity) and isinstance(dfs.dfs, DFSModule)
    assert not ori.meta.dfs and dfs.meta.dfs
    head_params = sum(p.numel() for p in ori.parameters()) - sum(p.numel() for p in tiny_backbone.parameters())
    assert head_params == 256 * 3 + 3  # GAP + dropout + FC only


def test_dropout_acts_on_logits_not_on_features(tiny_backbone):
    net = DFSNet(tiny_backbone, 3, dropout=0.5).train()
    net.backbone.eval()
    net.dfs.eval()  # fixed BN statistics: only dropout is random now
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(net.features(x), net.features(x))
    assert not torch.allclose(net(x), net(x))
    net.eval()
    torch.testing.assert_close(net(x), net(x))


@pytest.mark.parametrize("kwargs,error,match", [
    ({"num_classes": 1}, ValueError, "num_classes: expected at least 2 classes, got 1"),
    ({"num_classes": 2.5}, TypeError, "num_classes"),
    ({"num_classes": 3, "dropout": 1.0}, ValueError, r"dropout: expected a probability in \[0, 1\)"),
    ({"num_classes": 3, "class_names": ["a", "b"]}, ValueError, "class_names: expected 3 names"),
    ({"num_classes": 3, "class_names": "abc"}, TypeError, "class_names"),
])
def test_bad_arguments(tiny_backbone, kwargs, error, match):
    with pytest.raises(error, match=match):
        DFSNet(tiny_backbone, **kwargs)


def test_inputs_must_be_tensors(tiny_backbone):
    net = DFSNet(tiny_backbone, 3).eval()
    with pytest.raises(TypeError, match=r"x: expected a torch.Tensor of shape \(N, 3, H, W\), got ndarray"):
        net(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(TypeError, match="fmap: expected a torch.Tensor .* got ndarray"):
        net.head_forward(np.zeros((1, net.meta.feature_dim, 2, 2), np.float32))


def test_backbone_must_be_a_backbone():
    with pytest.raises(TypeError, match="backbone: expected a dfsnet.models.Backbone"):
        DFSNet(nn.Conv2d(3, 8, 3), 3)


def test_meta_is_dict_like_and_round_trips_through_json(tiny_backbone):
    net = DFSNet(tiny_backbone, 3, class_names=["cat", "dog", "emu"], dropout=0.1)
    meta = net.meta
    assert meta["num_classes"] == meta.num_classes == 3
    assert meta.class_names == ("cat", "dog", "emu")
    assert meta["input_size"] == meta.input_size == tiny_backbone.meta.input_size
    assert meta.feature_dim == 256 and meta.mean == tiny_backbone.meta.mean
    assert "reduce_channels" in meta and "nope" not in meta
    with pytest.raises(KeyError):
        meta["nope"]
    with pytest.raises(AttributeError, match="nope"):
        _ = meta.nope
    restored = DFSNetMeta.from_dict(json.loads(json.dumps(meta.to_dict())))
    assert restored == meta and copy.deepcopy(meta) == meta
    with pytest.raises(ValueError, match="meta: expected keys"):
        DFSNetMeta.from_dict({"num_classes": 3})


def test_hash_head_outputs_meta_and_export():
    import torch

    from dfsnet.models import DFSNet, DFSNetMeta, create_backbone

    torch.manual_seed(0)
    backbone = create_backbone("test_efficientnet")
    d = backbone.meta.feature_dim
    plain = DFSNet(backbone, 3)
    torch.manual_seed(0)
    hashed = DFSNet(create_backbone("test_efficientnet"), 3, hash_bits=12)
    fmap = torch.randn(2, d, 2, 2)
    logits, codes = hashed.eval().head_outputs(fmap)
    assert logits.shape == (2, 3) and codes.shape == (2, 12)
    assert plain.eval().head_outputs(fmap)[1] is None
    # The hash layer is built last: the rest of the head draws the same initial weights.
    for key, value in plain.state_dict().items():
        assert torch.equal(value, hashed.state_dict()[key]), key
    meta = hashed.meta.to_dict()
    assert meta["hash_bits"] == 12 and DFSNetMeta.from_dict(meta) == hashed.meta
    legacy = {k: v for k, v in plain.meta.to_dict().items() if k != "hash_bits"}
    assert DFSNetMeta.from_dict(legacy).hash_bits is None  # a meta written before hash heads
    hasher = hashed.export_hasher()
    feats = hashed.head_features(fmap).detach()
    expected = np.packbits((hashed.hash(feats) >= 0).numpy(), axis=1, bitorder="big")
    np.testing.assert_array_equal(hasher.transform(feats.numpy()), expected)
    images = torch.randn(2, 3, 32, 32)
    assert hashed.hash_logits(images).shape == (2, 12)
    assert hashed.without_hash().hash is None and hashed.meta.hash_bits is None
    with pytest.raises(InputError, match="no hash layer"):
        hashed.export_hasher()
