"""dfsnet.runtime: choosing torch or ONNX Runtime, exporting a network's features() and running the graph."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dfsnet import runtime as rt
from dfsnet.errors import InputError
from dfsnet.runtime import OnnxFeatures, effective_runtime, export_features, resolve_runtime

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

SHAPE = (3, 32, 32)


# ------------------------------------------------------------------------------------------------
# choosing a runtime


@pytest.fixture
def auto_env(monkeypatch):
    """"auto" as a user gets it (the suite's conftest makes it mean torch)."""
    monkeypatch.setenv("DFSNET_RUNTIME", "auto")


def test_an_unknown_runtime_lists_the_valid_ones(auto_env):
    with pytest.raises(InputError, match="auto, torch, onnx") as info:
        resolve_runtime("tensorrt")
    assert "'tensorrt'" in str(info.value)


def test_onnx_is_refused_off_the_cpu_and_with_bf16(auto_env):
    with pytest.raises(InputError, match="cuda"):
        resolve_runtime("onnx", device_type="cuda")
    with pytest.raises(InputError, match="bf16"):
        resolve_runtime("onnx", precision="bf16")
    assert resolve_runtime("onnx", precision="fp32") == "onnx"
    assert resolve_runtime("onnx", precision="auto", export=True) == "onnx"


def test_auto_means_torch_for_bf16_or_cuda_and_onnx_on_a_cpu(auto_env):
    assert resolve_runtime("auto", device_type="cpu", precision="bf16") == "torch"
    assert resolve_runtime("auto", device_type="cuda", precision="auto") == "torch"
    assert resolve_runtime("auto", device_type="cuda", precision="fp32") == "torch"
    assert resolve_runtime("auto", device_type="cpu", precision="auto") == "onnx"
    assert resolve_runtime("auto", device_type="cpu", precision="fp32", export=True) == "onnx"
    assert resolve_runtime("torch", device_type="cpu") == "torch"
    assert resolve_runtime() == "onnx"


def test_without_onnxruntime_auto_is_torch_and_onnx_names_the_package(auto_env, monkeypatch):
    monkeypatch.setattr(rt, "onnx_available", lambda *, export=False: False)
    assert resolve_runtime("auto") == "torch"
    assert resolve_runtime("auto", export=True) == "torch"
    with pytest.raises(InputError, match="onnxruntime package"):
        resolve_runtime("onnx")
    with pytest.raises(InputError, match="onnxruntime and onnxscript"):
        resolve_runtime("onnx", export=True)


def test_dfsnet_runtime_environment_variable(monkeypatch):
    monkeypatch.setenv("DFSNET_RUNTIME", "torch")
    assert effective_runtime("auto") == "torch"
    assert effective_runtime("onnx") == "onnx"  # an explicit choice wins
    assert resolve_runtime("auto") == "torch"
    monkeypatch.setenv("DFSNET_RUNTIME", "auto")
    assert effective_runtime("auto") == "auto"
    assert effective_runtime("torch") == "torch"
    monkeypatch.delenv("DFSNET_RUNTIME")
    assert effective_runtime("auto") == "auto"
    monkeypatch.setenv("DFSNET_RUNTIME", "onnx")  # only auto or torch are meaningful there
    with pytest.raises(InputError, match="DFSNET_RUNTIME.*'onnx'"):
        effective_runtime("auto")
    monkeypatch.setenv("DFSNET_RUNTIME", "bogus")
    with pytest.raises(InputError, match="DFSNET_RUNTIME"):
        resolve_runtime("torch")
    with pytest.raises(InputError, match="runtime: expected one of"):
        effective_runtime("ONNX")


# ------------------------------------------------------------------------------------------------
# exporting and running


def _dfsnet():
    from dfsnet.models import DFSNet, create_backbone

    torch.manual_seed(0)
    return DFSNet(create_backbone("test_efficientnet", pretrained=False), num_classes=3, dfs=True)


def _pooled():
    from dfsnet.models import create_backbone
    from dfsnet.store.unsupervised import PooledBackbone

    torch.manual_seed(1)
    return PooledBackbone(create_backbone("test_efficientnet", pretrained=False))


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module", params=["dfsnet", "pooled"])
def exported(request):
    """A tiny network, left in training mode, exported inside inference_mode; its state before."""
    model = _dfsnet() if request.param == "dfsnet" else _pooled()
    model.train()
    before = _snapshot(model)
    with torch.inference_mode():  # a caller's inference_mode must not break the export
        data = export_features(model, SHAPE)
    return {"kind": request.param, "model": model, "before": before, "data": data}


@pytest.fixture(scope="module")
def graph_bytes(exported):
    return exported["data"]


def test_export_leaves_the_model_unchanged(exported):
    model = exported["model"]
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert after.keys() == exported["before"].keys()
    for key, value in exported["before"].items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("batch", [1, 5])
def test_onnx_features_match_torch_fp32(exported, batch):
    model = exported["model"]
    runner = OnnxFeatures(exported["data"], threads=1)
    assert runner.input_shape == SHAPE and runner.feature_dim == model.meta.feature_dim
    x = torch.randn(batch, *SHAPE, generator=torch.Generator().manual_seed(batch))
    was = model.training
    model.eval()
    try:
        with torch.inference_mode():
            want = model.features(x).float().numpy()
    finally:
        model.train(was)
    got = runner(x.numpy())
    assert got.dtype == np.float32 and got.shape == want.shape == (batch, model.meta.feature_dim)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    if exported["kind"] == "pooled":
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-4)


def test_the_graph_also_loads_from_a_file(graph_bytes, tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(graph_bytes)
    x = np.random.default_rng(0).standard_normal((2, *SHAPE)).astype(np.float32)
    np.testing.assert_array_equal(OnnxFeatures(path, threads=1)(x), OnnxFeatures(graph_bytes, threads=1)(x))
    # float64 input is converted, not refused
    np.testing.assert_allclose(OnnxFeatures(str(path), threads=1)(x.astype(np.float64)),
                               OnnxFeatures(graph_bytes, threads=1)(x), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (2, 1, 32, 32), (3, 32, 32), (2, 3, 32, 32, 1)])
def test_a_wrong_input_shape_is_an_input_error(graph_bytes, shape):
    runner = OnnxFeatures(graph_bytes, threads=1)
    with pytest.raises(InputError, match=r"images: expected shape \(N, 3, 32, 32\)"):
        runner(np.zeros(shape, dtype=np.float32))


def _no_leak(info) -> None:
    """The error names no onnxruntime type as its cause: a user sees one line."""
    assert info.type is InputError
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_garbage_bytes_are_an_input_error():
    with pytest.raises(InputError, match="model: not a loadable ONNX graph") as info:
        OnnxFeatures(b"this is no onnx graph at all")
    _no_leak(info)


def test_a_truncated_graph_file_is_an_input_error_naming_it(graph_bytes, tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(graph_bytes[: len(graph_bytes) // 2])
    with pytest.raises(InputError, match="not a loadable ONNX graph") as info:
        OnnxFeatures(path)
    assert str(path) in str(info.value)
    _no_leak(info)
    missing = tmp_path / "nothing.onnx"
    with pytest.raises(InputError, match="nothing.onnx"):
        OnnxFeatures(missing)


def _graph(inputs, outputs, nodes):
    import onnx
    from onnx import TensorProto, helper

    def value(name, shape):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)

    graph = helper.make_graph(nodes, "g", [value(*i) for i in inputs], [value(*o) for o in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def test_a_graph_of_another_signature_is_refused():
    pytest.importorskip("onnx")
    from onnx import helper

    # images in, a 3-d output: neither (N, D) features nor (N, C, h, w) maps
    flat = _graph([("images", ["N", 3, 32, 32])], [("features", ["N", 3, 32])],
                  [helper.make_node("ReduceMean", ["images"], ["features"], axes=[3], keepdims=0)])
    with pytest.raises(InputError, match="expected an ONNX graph from"):
        OnnxFeatures(flat)
    # maps are a valid output
    identity = _graph([("images", ["N", 3, 32, 32])], [("features", ["N", 3, 32, 32])],
                      [helper.make_node("Identity", ["images"], ["features"])])
    assert OnnxFeatures(identity).output_shape == (3, 32, 32)
    # a dynamic image size: the graph does not say what it takes
    flatten = _graph([("images", ["N", 3, "H", "W"])], [("features", ["N", 3])],
                     [helper.make_node("ReduceMean", ["images"], ["features"], axes=[2, 3], keepdims=0)])
    with pytest.raises(InputError, match="expected an ONNX graph from"):
        OnnxFeatures(flatten)
    # two inputs
    two = _graph([("a", ["N", 3, 32, 32]), ("b", ["N", 3, 32, 32])], [("features", ["N", 3])],
                 [helper.make_node("Add", ["a", "b"], ["s"]),
                  helper.make_node("ReduceMean", ["s"], ["features"], axes=[2, 3], keepdims=0)])
    with pytest.raises(InputError, match="expected an ONNX graph from"):
        OnnxFeatures(two)
    # the accepted form, for contrast
    fine = _graph([("images", ["N", 3, 32, 32])], [("features", ["N", 3])],
                  [helper.make_node("ReduceMean", ["images"], ["features"], axes=[2, 3], keepdims=0)])
    runner = OnnxFeatures(fine)
    assert runner.input_shape == SHAPE and runner.feature_dim == 3
    x = np.random.default_rng(0).random((2, *SHAPE), dtype=np.float32)
    np.testing.assert_allclose(runner(x), x.mean(axis=(2, 3)), rtol=1e-5)


def test_a_failing_export_is_a_runtime_error():
    class NoFeatures(torch.nn.Module):
        def features(self, x):
            raise ValueError("boom")

    with pytest.raises(RuntimeError, match="model: the ONNX export failed: ") as info:
        export_features(NoFeatures(), SHAPE)
    assert "boom" in str(info.value)


def test_the_parity_check_refuses_a_graph_that_differs(monkeypatch):
    """A graph whose numbers differ from torch's (here: ONNX Runtime made to return zeros) is refused."""
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def features(self, x):
            return self.conv(x).mean(dim=(2, 3))

    model = Tiny()

    class Zeros:
        def __init__(self, data, threads=None):
            pass

        def __call__(self, images):
            return np.zeros((len(images), 4), dtype=np.float32)

    monkeypatch.setattr(rt, "OnnxFeatures", Zeros)
    with pytest.raises(RuntimeError, match="differ from torch's"):
        export_features(model, SHAPE)


# ------------------------------------------------------------------------------------------------
# feature maps and whole datasets through the graph


def test_feature_maps_through_onnx_equal_torch_fp32_and_share_its_cache_key(tmp_path):
    from torch.utils.data import TensorDataset

    from dfsnet.features import cached_feature_maps, extract_features
    from dfsnet.models import DFSNet, create_backbone

    torch.manual_seed(3)
    backbone = create_backbone("test_efficientnet", pretrained=False)
    data = TensorDataset(torch.randn(12, *SHAPE), torch.arange(12) % 3)
    onnx = cached_feature_maps(backbone, data, cache_dir=tmp_path / "a", batch_size=5, runtime="onnx",
                               device="cpu")
    ref = cached_feature_maps(backbone, data, cache_dir=tmp_path / "b", batch_size=5, runtime="torch",
                              precision="fp32", device="cpu")
    assert onnx.maps.shape == ref.maps.shape and onnx.maps.dtype == np.float16
    np.testing.assert_allclose(onnx.maps.astype(np.float32), ref.maps.astype(np.float32), rtol=2e-3, atol=2e-3)
    assert onnx.path.name == ref.path.name  # the same key: ONNX Runtime runs fp32
    net = DFSNet(backbone, num_classes=3).eval()
    got = extract_features(net, data, batch_size=5, runtime="onnx", device="cpu")
    want = extract_features(net, data, batch_size=5, runtime="torch", precision="fp32", device="cpu")
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_a_network_is_exported_once_for_several_extractions(monkeypatch):
    from torch.utils.data import TensorDataset

    from dfsnet.features import extract_features
    from dfsnet.models import DFSNet, create_backbone

    calls = []
    real = rt.export_features

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(rt, "export_features", counting)
    torch.manual_seed(4)
    net = DFSNet(create_backbone("test_efficientnet", pretrained=False), num_classes=3).eval()
    data = TensorDataset(torch.randn(6, *SHAPE), torch.zeros(6, dtype=torch.int64))
    first = extract_features(net, data, batch_size=4, runtime="onnx", device="cpu")
    second = extract_features(net, data, batch_size=4, runtime="onnx", device="cpu")
    assert len(calls) == 1 and np.array_equal(first, second)
    with torch.no_grad():  # new weights: a new graph
        next(net.backbone.parameters()).mul_(2)
    extract_features(net, data, batch_size=4, runtime="onnx", device="cpu")
    assert len(calls) == 2


# ------------------------------------------------------------------------------------------------
# one runtime for the maps of a whole head-only setting


def test_maps_runtime_is_chosen_for_all_parts_at_once(auto_env, monkeypatch):
    from dfsnet.features import _loader, maps_runtime

    monkeypatch.setattr(_loader, "ONNX_MIN_ITEMS", 50)
    assert maps_runtime(49, device="cpu") == "torch" and maps_runtime(50, device="cpu") == "onnx"
    assert maps_runtime(10**6, device="cpu", precision="bf16") == "torch"  # ONNX Runtime runs fp32 only
    assert maps_runtime(10**6, device="cpu", runtime="torch") == "torch"
    monkeypatch.setenv("DFSNET_RUNTIME", "torch")
    assert maps_runtime(10**6, device="cpu") == "torch"


def test_head_training_and_its_encoder_read_the_same_maps(auto_env, monkeypatch, tmp_path):
    # The validation part alone is below the ONNX threshold, the whole split above it: every part's
    # maps must still come from the one runtime, trained on and encoded alike (one cache entry each).
    import json

    from dfsnet.features import _loader
    from dfsnet.train.workflow import train_and_fit
    from tests.conftest import make_image_folder

    monkeypatch.setattr(_loader, "ONNX_MIN_ITEMS", 8)  # fit 9 and val 3 images
    images = make_image_folder(tmp_path / "images", n_classes=3, per_class=8, size=32)
    out = tmp_path / "run"
    train_and_fit(out_dir=out, data=images, backbone="test_efficientnet", pretrained=False, image_size=32,
                  batch_size=8, epochs=1, val_fraction=0.3, n_bits=8, encoder="paper", device="cpu")
    assert json.loads((out / "train_config.json").read_text())["maps_runtime"] == "onnx"
    assert len(list((out / "cache").glob("maps-*.npy"))) == 2  # fit and val, nothing computed twice


def test_train_chooses_the_maps_runtime_from_the_pool_as_experiment_does(auto_env, monkeypatch, tmp_path):
    # 12 training images of a pool of 24: below the threshold, the pool above it. `dfsnet experiment`
    # maps every part (database included) in one runtime chosen from the pool; `dfsnet train` on the
    # same split must train on those same maps, or one seed gives two networks.
    import json

    from dfsnet.features import _loader
    from dfsnet.train.workflow import train_and_fit
    from tests.conftest import make_image_folder

    monkeypatch.setattr(_loader, "ONNX_MIN_ITEMS", 20)
    images = make_image_folder(tmp_path / "images", n_classes=3, per_class=8, size=32)
    out = tmp_path / "run"
    train_and_fit(out_dir=out, data=images, backbone="test_efficientnet", pretrained=False, image_size=32,
                  batch_size=8, epochs=1, val_fraction=0.3, n_bits=8, encoder="paper", device="cpu")
    split = json.loads((out / "split.json").read_text())
    assert len(split["train"]) < 20 <= sum(len(split[p]) for p in ("query", "database"))
    assert json.loads((out / "train_config.json").read_text())["maps_runtime"] == "onnx"
