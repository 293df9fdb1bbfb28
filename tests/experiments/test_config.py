"""The experiment config: one coercion for TOML and CLI flags, clear errors, bundled configs."""
from __future__ import annotations

import typing

import pytest

from dfsnet.cli.main import build_parser
from dfsnet.experiments.config import (
    ExperimentConfig,
    bundled_configs,
    coerce_field,
    config_fields,
    config_from_dict,
    default_bits,
    load_config,
    parse_flag_values,
)

TOML = """
name = "same"
seed = 3
backbones = ["test_efficientnet", "resnet50"]
pretrained = false
datasets = ["folder"]
data_root = { folder = "/data/images" }
protocol = "paper"
split = { query_per_class = 2, train_fraction = 0.5, database_includes_train = false }
epochs = 4
lr = 0.01
finetune_budget_minutes = 2
bits = [8, 16]
k = 5
ties = ["expected"]
ablations = []
device = "cpu"
"""

FLAGS = ["--name", "same", "--seed", "3", "--backbones", "test_efficientnet", "resnet50", "--no-pretrained",
         "--datasets", "folder", "--data-root", "folder=/data/images", "--split-protocol", "paper",
         "--split-params", "query_per_class=2", "--split-params", "train_fraction=0.5",
         "--split-params", "database_includes_train=false", "--epochs", "4", "--lr", "0.01",
         "--finetune-budget-minutes", "2", "--bits", "8", "16", "-k", "5", "--ties", "expected",
         "--ablations", "--device", "cpu"]


def _from_flags(tmp_path, argv: list[str]) -> ExperimentConfig:
    from dfsnet.cli.experiment import config_from_args

    empty = tmp_path / "empty.toml"
    empty.write_text("")
    args = build_parser().parse_args(["experiment", str(empty), *argv])
    return config_from_args(args, str(empty))


def test_toml_and_cli_flags_give_the_same_config(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(TOML)
    from_file = load_config(path)
    from_flags = _from_flags(tmp_path, FLAGS)
    assert from_file == from_flags
    assert from_file.split == {"query_per_class": 2, "train_fraction": 0.5, "database_includes_train": False}
    assert isinstance(from_file.finetune_budget_minutes, float) and from_file.k == 5


def test_every_field_has_a_flag_and_a_known_type():
    parser_help = build_parser().parse_args(["experiment", "demo"])  # parses with every flag registered
    assert parser_help.config == "demo"
    for f in config_fields():
        assert f.flags and f.help, f.name
        origin = typing.get_origin(f.type)
        assert f.type in (bool, int, float, str) or origin in (list, dict), f.name


def test_text_coercion_matches_toml_types():
    assert parse_flag_values({"epochs": "3", "lr": "1e-3", "bits": ["8"], "pretrained": False}) == {
        "epochs": 3, "lr": 0.001, "bits": [8], "pretrained": False}
    assert coerce_field("split", ["a=1", "b=0.5", "c=true"], from_text=True) == {"a": 1, "b": 0.5, "c": True}
    assert coerce_field("checkpoints", ["dfs=/m.safetensors"], from_text=True) == {"dfs": "/m.safetensors"}
    assert coerce_field("lr", 1) == 1.0 and isinstance(coerce_field("lr", 1), float)
    assert coerce_field("bits", 16) == [16]  # a single value for a one-element list


def test_bad_types_are_named_for_toml_and_flags(tmp_path):
    with pytest.raises(TypeError, match=r"epochs: expected int, got '3'"):
        config_from_dict({"epochs": "3"})
    with pytest.raises(TypeError, match=r"epochs: expected int, got 'three'"):
        _from_flags(tmp_path, ["--epochs", "three"])
    with pytest.raises(TypeError, match=r"pretrained: expected bool, got 1"):
        config_from_dict({"pretrained": 1})
    with pytest.raises(TypeError, match=r"bits: expected list\[int\], got \['8', 'x'\]"):
        _from_flags(tmp_path, ["--bits", "8", "x"])
    with pytest.raises(TypeError, match=r"split\.n: expected int \| float \| bool, got 'many'"):
        _from_flags(tmp_path, ["--split-params", "n=many"])
    with pytest.raises(TypeError, match=r"data_root\.folder: expected str, got 3"):
        config_from_dict({"datasets": ["folder"], "data_root": {"folder": 3}})
    with pytest.raises(ValueError, match=r"checkpoints: expected KEY=VALUE, got 'dfs'"):
        _from_flags(tmp_path, ["--checkpoints", "dfs"])


def test_unknown_key_names_it_and_lists_valid_keys(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key 'epoch'.*did you mean 'epochs'.*valid: .*backbones"):
        config_from_dict({"epoch": 3})
    bad = tmp_path / "bad.toml"
    bad.write_text("lrate = 0.1\n")
    with pytest.raises(ValueError, match=r"unknown key 'lrate' in .*bad\.toml.*valid: .*epochs"):
        load_config(bad)


def test_wrong_value_type_is_named():
    with pytest.raises(ValueError, match=r"modes: unknown mode 'finetune'.*valid: full, head"):
        config_from_dict({"modes": ["finetune"]})
    with pytest.raises(ValueError, match=r"ablations: unknown ablation 'pca'.*valid: .*itq"):
        config_from_dict({"ablations": ["pca"]})


def test_bare_data_root_needs_one_dataset(tmp_path):
    cfg = _from_flags(tmp_path, ["--datasets", "folder", "--data-root", "/x"])
    assert cfg.data_root == {"folder": "/x"}
    with pytest.raises(ValueError, match=r"data_root: a bare PATH needs exactly one data set"):
        _from_flags(tmp_path, ["--datasets", "folder", "digits", "--data-root", "/x"])


def test_unknown_config_name_lists_bundled_ones():
    with pytest.raises(FileNotFoundError, match=r"bundled: .*demo"):
        load_config("demoo")


def test_bundled_configs_are_valid():
    assert {"demo", "cifar10_cpu", "paper_cifar10", "paper_caltech256"} <= set(bundled_configs())
    for name in bundled_configs():
        assert isinstance(load_config(name), ExperimentConfig)
    demo = load_config("demo")
    assert demo.backbones == ["efficientnet_lite0"] and demo.pretrained and demo.datasets == ["digits"]


def test_default_bits_end_with_the_feature_width():
    assert default_bits(1280) == [16, 32, 64, 128, 256, 512, 1024, 1280]
    assert default_bits(2048) == [16, 32, 64, 128, 256, 512, 1024, 2048]


def test_patience_zero_disables_early_stopping_as_in_train():
    from dfsnet.experiments.config import load_config

    assert load_config("demo", {"patience": 0}).patience == 0
    with pytest.raises(ValueError, match="patience"):
        load_config("demo", {"patience": -1})
