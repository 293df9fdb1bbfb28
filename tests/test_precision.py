"""Precision resolution: auto picks bf16 only where the hardware runs it natively."""
from __future__ import annotations

import logging

import pytest
import torch

from dfsnet import precision as precision_module
from dfsnet.precision import Precision, resolve_precision, resolve_training_precision


@pytest.fixture
def native(monkeypatch):
    def set_native(value: bool) -> None:
        monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: value)
    return set_native


def test_auto_is_fp32_on_a_cpu_without_bf16(native):
    native(False)
    assert resolve_precision("auto", "cpu") == Precision("fp32", "cpu")


def test_auto_is_bf16_channels_last_on_a_cpu_with_bf16(native):
    native(True)
    p = resolve_precision("auto", "cpu")
    assert p == Precision("bf16", "cpu", channels_last=True) and p.lightning() == "bf16-mixed"


def test_explicit_bf16_without_support_warns_and_runs_fp32(native, caplog):
    native(False)
    with caplog.at_level(logging.WARNING, logger="dfsnet.precision"):
        p = resolve_precision("bf16", "cpu")
    assert p.name == "fp32" and "no native bf16 support" in caplog.text


def test_explicit_fp32_is_fp32_everywhere(native):
    native(True)
    assert resolve_precision("fp32", "cpu") == Precision("fp32", "cpu")


@pytest.mark.parametrize("has_bf16", [True, False])
def test_training_on_a_cpu_is_fp32_channels_last_in_full_mode_and_nchw_for_heads(native, has_bf16):
    native(has_bf16)
    # Full fine-tuning measured fastest in fp32 channels_last, so auto trains there on any CPU.
    for precision in ("auto", "fp32"):
        assert resolve_training_precision(precision, "cpu", mode="full") == Precision("fp32", "cpu", channels_last=True)
    bf16 = resolve_training_precision("bf16", "cpu", mode="full")
    assert bf16 == Precision("bf16" if has_bf16 else "fp32", "cpu", channels_last=True)
    # Heads on cached maps: bf16 where native, never channels_last.
    head = resolve_training_precision("auto", "cpu", mode="head")
    assert head == Precision("bf16" if has_bf16 else "fp32", "cpu", channels_last=False)
    assert resolve_training_precision("fp32", "cpu", mode="head") == Precision("fp32", "cpu")
    with pytest.raises(ValueError, match="mode: expected 'full' or 'head', got 'both'"):
        resolve_training_precision("auto", "cpu", mode="both")


def test_unknown_precision_lists_the_valid_ones():
    with pytest.raises(ValueError, match="auto, fp32, bf16"):
        resolve_precision("fp16", "cpu")


def test_bf16_autocast_and_channels_last_agree_with_fp32():
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1))
    x = torch.randn(4, 3, 16, 16)
    with torch.inference_mode():
        ref = conv(x)
        p = Precision("bf16", "cpu", channels_last=True)
        p.prepare_model(conv)
        with p.autocast():
            out = conv(p.prepare_input(x))
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), ref, rtol=0.05, atol=0.05)
    assert Precision("fp32", "cpu").prepare_input(x) is x
