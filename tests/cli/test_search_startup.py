"""`dfsnet search` on an index with an ONNX graph: no torch, timm or scikit-learn at start-up, the
same ranking as torch, and the --runtime flag."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dfsnet.cli import main
from dfsnet.store import read_manifest
from tests.conftest import make_image_folder

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

HEAVY = ("torch", "torchvision", "timm", "sklearn", "scipy")
REPO = Path(__file__).resolve().parents[2]

# Runs the CLI's main() and reports, on the last line of stderr, which heavy modules it imported.
WRAPPER = (
    "import importlib, json, sys\n"
    "code = importlib.import_module('dfsnet.cli.main').main(sys.argv[1:])\n"
    f"heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)\n"
    "print('HEAVY=' + json.dumps(heavy), file=sys.stderr)\n"
    "sys.exit(code)\n"
)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    import torch
    from safetensors.torch import save_file

    from dfsnet.models import create_backbone

    root = tmp_path_factory.mktemp("search_startup")
    torch.manual_seed(0)
    weights = root / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in create_backbone("test_efficientnet").model.state_dict().items()},
              str(weights))
    images = make_image_folder(root / "images", n_classes=3, per_class=4, size=32, seed=7)
    index = root / "index"
    code = main(["index", "build", "--images", str(images), "--out", str(index), "--backbone", "test_efficientnet",
                 "--weights", str(weights), "--bits", "8", "--image-size", "32", "--runtime", "onnx",
                 "--device", "cpu", "--batch-size", "8", "--no-progress"])
    assert code == 0
    assert read_manifest(index)["onnx"] is not None
    return {"images": images, "index": index, "weights": weights, "query": images / "class_1" / "002.jpg"}


def _search(built, *args, env_runtime: str | None) -> tuple[subprocess.CompletedProcess, list[str]]:
    env = {k: v for k, v in os.environ.items() if k != "DFSNET_RUNTIME"}
    if env_runtime is not None:
        env["DFSNET_RUNTIME"] = env_runtime
    env["OMP_NUM_THREADS"] = "1"
    argv = ["search", str(built["index"]), str(built["query"]), "-k", "3", *args]
    out = subprocess.run([sys.executable, "-c", WRAPPER, *argv], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=120)
    marker = [line for line in out.stderr.splitlines() if line.startswith("HEAVY=")]
    assert marker, out.stderr
    return out, json.loads(marker[-1][len("HEAVY="):])


def _hits(out: subprocess.CompletedProcess) -> list[tuple[int, int, str]]:
    return [(h["id"], h["distance"], h["path"]) for h in json.loads(out.stdout)["hits"]]


@pytest.fixture(scope="module")
def onnx_json(built):
    out, heavy = _search(built, "--json", env_runtime="auto")
    assert out.returncode == 0, out.stderr
    return out, heavy


def test_search_imports_no_torch_timm_or_sklearn(built):
    out, heavy = _search(built, env_runtime=None)
    assert out.returncode == 0, out.stderr
    assert heavy == [], f"imported at start-up: {heavy}"
    lines = out.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["rank", "hamming", "label"] and len(lines) == 4
    assert lines[1].split()[:2] == ["1", "0"]
    assert str(built["query"].resolve()) in out.stdout


def test_auto_runtime_in_the_environment_also_uses_onnx(onnx_json, built):
    out, heavy = onnx_json
    assert heavy == []
    hits = _hits(out)
    assert len(hits) == 3 and hits[0][1] == 0
    assert str(built["query"].resolve()) in [p for _, d, p in hits if d == 0]


def test_runtime_torch_gives_the_same_ranking(onnx_json, built):
    out, heavy = _search(built, "--json", "--runtime", "torch", "--precision", "fp32", env_runtime=None)
    assert out.returncode == 0, out.stderr
    assert "torch" in heavy  # it really ran in torch
    assert _hits(out) == _hits(onnx_json[0])


def test_an_unknown_runtime_is_a_usage_error(built, capsys):
    with pytest.raises(SystemExit) as info:
        main(["search", str(built["index"]), str(built["query"]), "--runtime", "bogus"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--runtime" in err and "invalid choice: 'bogus'" in err


def test_runtime_onnx_on_an_index_without_a_graph_is_a_user_error(built, tmp_path, capsys):
    plain = tmp_path / "plain"
    assert main(["index", "build", "--images", str(built["images"] / "class_0"), "--out", str(plain),
                 "--backbone", "test_efficientnet", "--weights", str(built["weights"]), "--bits", "4",
                 "--image-size", "32", "--runtime", "torch", "--device", "cpu", "--no-progress"]) == 0
    assert not (plain / "model.onnx").exists()
    capsys.readouterr()
    assert main(["search", str(plain), str(built["query"]), "--runtime", "onnx"]) == 2
    assert "--runtime torch" in capsys.readouterr().err
