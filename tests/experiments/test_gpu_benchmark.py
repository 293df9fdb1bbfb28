"""benchmarks/gpu_cifar10.py runs end to end on the CPU with a tiny random backbone and folder."""
from __future__ import annotations

import importlib.util
import json

from tests.conftest import REPO, make_image_folder


def test_gpu_protocol_smoke_run_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_cifar10", REPO / "benchmarks" / "gpu_cifar10.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    make_image_folder(tmp_path / "data" / "train", n_classes=3, per_class=20, size=32)
    make_image_folder(tmp_path / "data" / "test", n_classes=3, per_class=6, size=32, seed=1)
    out = tmp_path / "gpu.json"
    code = bench.main(["--root", str(tmp_path / "data"), "--backbone", "test_efficientnet", "--no-pretrained",
                       "--image-size", "32", "--epochs", "1,1", "--device", "cpu", "--batch-size", "16",
                       "--out", str(out)])
    assert code == 0
    results = json.loads(out.read_text())
    assert set(results["protocols"]) == {"cifar10-1", "cifar10-2"}
    two = results["protocols"]["cifar10-2"]
    assert two["sizes"]["database"] == 60 and two["sizes"]["query"] == 18  # train = database, test = queries
    assert not set(results["protocols"]["cifar10-1"]["sizes"]) - {"fit", "val", "query", "database", "train"}
    for entry in results["protocols"].values():
        for net, e in entry["networks"].items():
            for b in ("16", "32", "64"):
                m = e["map"]["learned"][b]
                assert 0 <= m["map_all"] <= 1 and 0 <= m["map_at_1000"] <= 1
            assert ("paper" in e["map"]) == (net == "dfs")
            training = e["training"]
            assert training["monitor"] == "val_map_loo"
            assert all(0 <= h["val_map_loo"] <= 1 for h in training["history"])
            assert training["best_epoch"] in range(len(training["history"]))
