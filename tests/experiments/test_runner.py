"""`dfsnet experiment` end to end on a tiny generated folder, its resume, and bad configs."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from dfsnet.cli import main
from dfsnet.experiments import SCHEMES, config_from_dict, run_experiment
from tests.conftest import make_image_folder


def _tiny_config(tmp_path: Path, images: Path, **kw) -> dict:
    return {
        "name": "tiny", "out_dir": str(tmp_path / "runs"), "backbones": ["test_efficientnet"],
        "pretrained": False, "datasets": ["folder"], "data_root": {"folder": str(images)},
        "protocol": "per-class", "split": {"query_per_class": 2, "train_per_class": 4, "val_fraction": 0.25},
        "image_size": 32, "epochs": 1, "batch_size": 8, "bits": [8, 16], "k": 5, "pr_bits": 8,
        **kw,
    }


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("experiment")
    images = make_image_folder(tmp_path / "images", n_classes=3, per_class=10, size=32)
    cfg = config_from_dict(_tiny_config(tmp_path, images))
    first = run_experiment(cfg)
    return tmp_path, images, cfg, first


def test_every_scheme_reported_with_both_tie_modes(tiny_run):
    _, _, cfg, results = tiny_run
    on_disk = json.loads(Path(results["results_path"]).read_text())
    (setting,) = on_disk["settings"]
    found = {(r["scheme"], r["bits"], r["ties"]) for r in setting["rows"]}
    for sid in SCHEMES:
        for ties in ("stable", "expected"):
            if SCHEMES[sid].metric == "euclidean":
                assert (sid, None, ties) in found
            elif sid in ("itq", "3h-itq"):  # capped at the 9 train images: PCA has at most that many axes
                assert (sid, 8, ties) in found and (sid, 16, ties) not in found
            else:
                assert {(sid, 8, ties), (sid, 16, ties)} <= found
    for row in setting["rows"]:
        assert 0.0 <= row["map_all"] <= 1.0 and 0.0 <= row["map_at_k"] <= 1.0 and row["k"] == 5
        assert row["search_seconds"] >= 0 and row["seconds_per_query"] >= 0
    for net in ("ori", "dfs"):
        assert 0.0 <= setting["networks"][net]["accuracy"] <= 1.0
        assert setting["networks"][net]["source"] == "trained"
    assert setting["split"]["n_query"] == 6 and setting["protocol"] == "per-class"
    assert on_disk["config"] == cfg.to_dict() and on_disk["seed"] == 0
    assert on_disk["environment"]["packages"]["torch"] and on_disk["environment"]["machine"]["cpu_count"]
    assert {"onnxruntime", "pillow"} <= set(on_disk["environment"]["packages"])
    assert {"cpu_model", "cpu_flags"} <= set(on_disk["environment"]["machine"])
    assert on_disk["wall_seconds"]["total"] > 0
    curves = setting["pr_curves"].values()
    assert curves and all(len(c["precision"]) == len(c["recall"]) for c in curves)


def test_report_and_figures_written(tiny_run):
    _, _, cfg, results = tiny_run
    report = Path(results["report"])
    text = report.read_text()
    for heading in ("Classification accuracy", "mAP by scheme", "mAP against code length",
                    "What each step adds", "Tie modes", "Retrieval time"):
        assert heading in text
    pngs = sorted(p.name for p in report.parent.glob("*.png"))
    assert pngs == ["fig_map_vs_bits_folder_head.png", "fig_pr_folder_head.png"]
    for name in pngs:
        assert (report.parent / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in text


def test_rerun_resumes_without_retraining(tiny_run):
    tmp_path, _, cfg, first = tiny_run
    setting_dir = cfg.run_dir / "test_efficientnet-folder-head"
    checkpoints = {net: setting_dir / net / "model.safetensors" for net in ("ori", "dfs")}
    mtimes = {net: p.stat().st_mtime_ns for net, p in checkpoints.items()}
    second = run_experiment(cfg)
    (setting,) = second["settings"]
    assert {"split", "train-ori", "train-dfs", "evaluate", "select"} <= set(setting["cached_stages"])
    assert setting["encoder_selection"] == first["settings"][0]["encoder_selection"]
    assert all(setting["networks"][n]["cached"] for n in ("ori", "dfs"))
    assert {n: p.stat().st_mtime_ns for n, p in checkpoints.items()} == mtimes
    log = (cfg.run_dir / "experiment.log").read_text()
    assert "stage train-dfs: resumed from cache" in log
    assert second["settings"][0]["rows"] == first["settings"][0]["rows"]
    assert second["settings"][0]["networks"]["dfs"]["accuracy"] == first["settings"][0]["networks"]["dfs"]["accuracy"]


def test_changed_training_setting_retrains_only_that_stage(tiny_run, caplog):
    tmp_path, images, cfg, _ = tiny_run
    changed = config_from_dict({**cfg.to_dict(), "lr": 0.01, "ablations": []})
    with caplog.at_level(logging.INFO, logger="dfsnet"):
        results = run_experiment(changed)
    (setting,) = results["settings"]
    assert "split" in setting["cached_stages"]
    assert not setting["networks"]["dfs"]["cached"]
    assert {r["scheme"] for r in setting["rows"]} == {"1", "1h", "2", "3", "1-csq", "3-csq"}


def test_cli_runs_a_config_file_with_flag_overrides(tmp_path, capsys):
    images = make_image_folder(tmp_path / "images", n_classes=2, per_class=8, size=32)
    cfg = _tiny_config(tmp_path, images)
    lines = [f"{k} = {json.dumps(v)}" for k, v in cfg.items() if not isinstance(v, dict)]
    lines += [f"{k} = {{ {', '.join(f'{kk} = {json.dumps(vv)}' for kk, vv in v.items())} }}"
              for k, v in cfg.items() if isinstance(v, dict)]
    path = tmp_path / "tiny.toml"
    path.write_text("\n".join(lines) + "\n")
    code = main(["experiment", str(path), "--no-progress", "--name", "cli", "--ablations",
                 "--ties", "stable", "--bits", "8"])
    out = capsys.readouterr().out
    assert code == 0
    assert "report: " in out and "1h" in out
    results = json.loads((tmp_path / "runs" / "cli" / "results.json").read_text())
    assert results["config"]["ablations"] == [] and results["config"]["bits"] == [8]
    assert {r["ties"] for r in results["settings"][0]["rows"]} == {"stable"}


# ------------------------------------------------------------------------------ bad input


def test_unknown_backbone_and_dataset_list_valid_ones(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"resnet50"):
        run_experiment(config_from_dict({"backbones": ["resnet_50x"], "pretrained": False,
                                         "out_dir": str(tmp_path)}))
    code = main(["experiment", "demo", "--datasets", "cifar100", "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "unknown dataset 'cifar100'" in err and "cifar10" in err and "digits" in err


def test_bits_larger_than_feature_width_is_an_error(tmp_path):
    cfg = config_from_dict({"backbones": ["test_efficientnet"], "pretrained": False, "bits": [16, 4096],
                            "out_dir": str(tmp_path)})
    with pytest.raises(ValueError, match=r"bits: \[4096\] larger than the feature width D = \d+"):
        run_experiment(cfg)


def test_missing_dataset_root_says_how_to_get_it(tmp_path):
    cfg = config_from_dict({"datasets": ["cifar10"], "data_root": {"cifar10": str(tmp_path / "nope")},
                            "backbones": ["test_efficientnet"], "pretrained": False, "out_dir": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match=r"(?s)CIFAR-10 not found.*download"):
        run_experiment(cfg)


def test_default_encoder_selection_is_recorded_and_reported(tiny_run):
    _, _, cfg, results = tiny_run
    (setting,) = results["settings"]
    sel = setting["encoder_selection"]
    assert sel["bits"] == cfg.pr_bits and sel["choice"] in sel["validation"] and sel["network"] == "dfs_h"
    assert set(sel["validation"]) <= {"learned", "itq", "paper"} and "learned" in sel["validation"]
    assert sel["schemes"]["learned"] == "3-csq" and set(setting["networks"]) == {"ori", "dfs", "ori_h", "dfs_h"}
    best = max(v["map_at_k"] for v in sel["query"].values())
    assert sel["gap_to_best"] == pytest.approx(best - sel["query"][sel["choice"]]["map_at_k"])
    report = Path(results["report"]).read_text()
    assert "The default encoder, chosen on the validation split" in report and "3-csq" in report


def test_a_split_file_is_used_as_given(tiny_run, tmp_path):
    from dfsnet.data import Split

    _, images, cfg, first = tiny_run
    drawn = Split.load(first["settings"][0]["split_file"])
    given = tmp_path / "my_split.json"
    drawn.save(given)
    results = run_experiment(config_from_dict(_tiny_config(tmp_path, images, name="given", split_file=str(given),
                                                           ablations=[], ties=["stable"], bits=[8])))
    used = Split.load(results["settings"][0]["split_file"])
    for part in ("train", "val", "query", "database"):
        assert (getattr(used, part) == getattr(drawn, part)).all(), part
    other = make_image_folder(tmp_path / "other", n_classes=3, per_class=9, size=32)
    with pytest.raises(ValueError, match="pool"):
        run_experiment(config_from_dict(_tiny_config(tmp_path, other, name="wrong", split_file=str(given))))
