"""Which runtime computes the pretrained view (deepfusion.features.pretrained.view.runtime_of):
onnxruntime on the CPU where it is installed, torch elsewhere, an explicit choice obeyed; both
give the same rows within float32 rounding."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from deepfusion.features.pretrained import view


def test_an_explicit_runtime_is_obeyed():
    assert view.runtime_of("onnx", "cuda") == "onnx"
    assert view.runtime_of("torch") == "torch"


def test_another_device_runs_torch():
    assert view.runtime_of(None, "cuda") == "torch"
    assert view.runtime_of(None, "mps") == "torch"


def test_the_cpu_prefers_onnxruntime_where_installed(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    assert view.runtime_of() == view.runtime_of(None, "cpu") == "torch"
    monkeypatch.undo()
    installed = real("onnxruntime") is not None
    assert view.runtime_of() == ("onnx" if installed else "torch")


def test_both_runtimes_give_the_same_rows():
    pytest.importorskip("onnxruntime")
    y = (np.random.default_rng(5).standard_normal(22050 * 7) * 0.2).astype(np.float32)
    by_torch = view.pretrained_view(y, 22050, stride=1, runtime="torch")
    by_onnx = view.pretrained_view(y, 22050, stride=1, runtime="onnx")
    assert by_onnx.shape == by_torch.shape
    np.testing.assert_allclose(by_onnx, by_torch, rtol=0, atol=1e-5 * np.abs(by_torch).max())
    np.testing.assert_array_equal(view.pretrained_view(y, 22050, stride=1), by_onnx)
