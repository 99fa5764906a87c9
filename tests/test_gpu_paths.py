"""The GPU code paths, checked on the CPU: device choice and precision as pure functions of the
machine's capabilities (tables of GPUs), checkpoints that hold CPU tensors only, resume onto
another device, no CUDA initialisation in a CPU run, one-line errors for a missing device and
for out-of-memory, the memory estimate, float32 inference, the backend switches, and
``benchmarks/gpu_check.sh`` on a machine without a GPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepfusion.backbones import BACKBONES
from deepfusion.errors import DeviceError, DeviceMemoryError, ParameterError
from deepfusion.models.checkpoint import load_checkpoint, save_checkpoint, to_cpu
from deepfusion.runtime import device as runtime, memory, seed
from deepfusion.runtime.device import (backend_settings, choose_precision, default_num_workers,
                                       device_choice, inference_precision, precision_for,
                                       requested_precision, resolve_device, restore_scaler,
                                       to_device)
from deepfusion.runtime.memory import estimate_training_bytes, memory_warning, out_of_memory_message
from deepfusion.runtime.seed import set_rng_state
from deepfusion.testing import invoke, one_error_line

REPO = Path(__file__).resolve().parents[1]
RUN = ("--backbone", "light", "--no-pretrained", "--batch-size", "8", "--lr", "3e-3",
       "--val-size", "0.2", "--test-size", "0.2", "--quiet", "--device", "cpu")

#: What deepfusion could call that starts or queries CUDA: none of it may run in a --device
#: cpu run. (torch's own optimizer step asks torch.accelerator for the current stream whenever
#: CUDA is available, so torch.cuda._lazy_init is not on this list; benchmarks/gpu_check.sh
#: looks for a CUDA context after a CPU run on a real GPU.)
CUDA_CALLS = ("get_rng_state_all", "set_rng_state_all", "manual_seed_all", "manual_seed",
              "seed_all", "get_rng_state", "set_rng_state", "set_device", "current_device",
              "get_device_capability", "get_device_properties", "synchronize", "empty_cache",
              "reset_peak_memory_stats", "max_memory_allocated")


def _pretend_gpu_machine(mp: pytest.MonkeyPatch, *, count: int = 1) -> None:
    """This process sees ``count`` GPUs, and any call that would start CUDA fails the test."""
    def touched(name):
        def call(*args, **kwargs):
            raise AssertionError(f"a --device cpu run called torch.cuda.{name}")
        return call     # one function per name: torch._dynamo refuses one object under two

    mp.setattr(torch.cuda, "is_available", lambda: True)
    mp.setattr(torch.cuda, "device_count", lambda: count)
    # torch's optimizer asks for the accelerator's current stream (graph-capture check): torch's
    # own, and on this machine it would reach for a driver that is not there
    mp.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: None)
    for name in CUDA_CALLS:
        mp.setattr(torch.cuda, name, touched(name))


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


_TAG = torch.serialization.location_tag   # torch's, before any test patches it


class _OnGpu(torch.Tensor):
    """A tensor as a run on a GPU hands it over: it says it is on cuda:1, ``.cpu()`` and
    ``.to("cpu")`` copy it into a plain CPU tensor, and torch.save writes it as a plain tensor
    (its storage tagged cuda:1 by :func:`_on_gpu`'s patch)."""

    @property
    def device(self):
        return torch.device("cuda", 1)

    @property
    def is_cuda(self):
        return True

    def cpu(self, *args, **kwargs):
        return self.as_subclass(torch.Tensor).clone()

    def to(self, *args, **kwargs):
        target = kwargs.get("device", args[0] if args else None)
        if isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu":
            return self.cpu()
        return super().to(*args, **kwargs)

    def __reduce_ex__(self, protocol):
        return self.as_subclass(torch.Tensor).__reduce_ex__(protocol)


def _on_gpu(obj, mp: pytest.MonkeyPatch):
    """``obj`` with every tensor a copy "on cuda:1" (:class:`_OnGpu`); from now on torch.save
    writes their storages with the location cuda:1, as it would for real GPU tensors."""
    storages: set[int] = set()

    def move(o):
        if isinstance(o, torch.Tensor):
            t = o.clone().as_subclass(_OnGpu)
            storages.add(t.untyped_storage().data_ptr())
            return t
        if isinstance(o, dict):
            return {k: move(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return type(o)(move(v) for v in o)
        return o
    # torch's own tag, not an earlier call's patch: that one would tag freed addresses of its
    # own copies, which a later CPU copy may reuse (the test failed so, once in a full run)
    mp.setattr(torch.serialization, "location_tag",
               lambda storage: "cuda:1" if storage.data_ptr() in storages else _TAG(storage))
    moved = move(obj)
    assert all(t.device == torch.device("cuda", 1) for t in _tensors(moved))
    return moved


def _locations(path: Path) -> set[str]:
    """The device each storage of a saved file says it lives on."""
    seen: set[str] = set()

    def record(storage, location):
        seen.add(location)
        return storage
    torch.load(path, map_location=record, weights_only=True)
    return seen


@pytest.fixture(scope="module")
def cpu_run(tiny_features, tmp_path_factory):
    """A 2-epoch --device cpu run on a machine that pretends to have a GPU (any CUDA call
    fails it), trained in bf16 as on a CPU with native bf16, --deterministic, with the device's
    memory pretended tiny (the estimate's warning must show). Returns (model dir, output)."""
    out = tmp_path_factory.mktemp("gpu-paths") / "run"
    with pytest.MonkeyPatch.context() as mp:
        _pretend_gpu_machine(mp)
        mp.setattr(runtime, "cpu_supports_bf16", lambda: True)
        mp.setattr(memory, "device_memory", lambda device: 2**20)
        result = invoke("train", "--features", tiny_features, "--model-dir", out, "--epochs", "2",
                        "--deterministic", *RUN)
    assert result.exit_code == 0, result.output
    assert not torch.are_deterministic_algorithms_enabled()      # put back after the run
    return out, result.output


# ------------------------------------------------------------------------------- precision

@pytest.mark.parametrize("device, capability, cpu_bf16, requested, expected", [
    ("cuda", (6, 1), False, "amp", "fp16"),      # GTX 10xx / P40
    ("cuda", (7, 0), False, "amp", "fp16"),      # V100: bf16 only emulated
    ("cuda", (7, 5), False, "amp", "fp16"),      # T4, RTX 20xx
    ("cuda", (8, 0), False, "amp", "bf16"),      # A100
    ("cuda", (8, 6), False, "amp", "bf16"),      # RTX 30xx, A10
    ("cuda", (8, 9), False, "amp", "bf16"),      # L4, RTX 40xx
    ("cuda", (9, 0), False, "amp", "bf16"),      # H100
    ("cuda", (12, 0), False, "amp", "bf16"),
    ("cuda", None, False, "amp", "fp16"),        # unknown: the safe choice
    ("cuda", (8, 0), False, "fp16", "fp16"),     # asked for by name
    ("cuda", (9, 0), False, "bf16", "bf16"),
    ("cuda", (7, 5), False, "fp16", "fp16"),
    ("cuda", (9, 0), False, "fp32", "fp32"),
    ("cuda", (9, 0), False, False, "fp32"),
    ("cuda", (7, 5), False, True, "fp16"),
    ("cpu", None, True, "amp", "bf16"),
    ("cpu", None, False, "amp", "fp32"),         # emulated bf16 is slower than float32
    ("cpu", None, False, "bf16", "bf16"),        # by name: as asked
    ("cpu", None, True, "fp32", "fp32"),
    ("mps", None, False, "amp", "fp32"),
    ("mps", None, False, True, "fp32"),
])
def test_choose_precision_follows_the_chosen_devices_capability(device, capability, cpu_bf16,
                                                                requested, expected):
    assert choose_precision(device, capability=capability, cpu_bf16=cpu_bf16,
                            requested=requested) == expected


@pytest.mark.parametrize("device, capability, requested, words", [
    ("cuda", (7, 5), "bf16", "^--amp-dtype bf16: needs a GPU of compute capability 8.0"),
    ("cuda", None, "bf16", "^--amp-dtype bf16: needs a GPU of compute capability 8.0"),
    ("cpu", None, "fp16", "^--amp-dtype fp16: the CPU has no fast fp16; give --amp-dtype bf16"),
    ("mps", None, "bf16", "^--amp-dtype bf16: not used on mps"),
])
def test_a_precision_the_device_lacks_is_one_clear_error(device, capability, requested, words):
    with pytest.raises(DeviceError, match=words):
        choose_precision(device, capability=capability, requested=requested)


def test_an_unknown_precision_is_refused():
    with pytest.raises(ParameterError, match="half"):
        choose_precision("cuda", capability=(8, 0), requested="half")
    with pytest.raises(ParameterError, match="fp32 or amp"):
        inference_precision(torch.device("cpu"), "bf16")


@pytest.mark.parametrize("amp, amp_dtype, expected", [
    (True, "auto", "amp"), (True, "fp16", "fp16"), (True, "bf16", "bf16"),
    (False, "auto", "fp32"), (False, "fp16", "fp32")])
def test_requested_precision_of_the_runtime_options(amp, amp_dtype, expected):
    assert requested_precision(amp, amp_dtype) == expected


def test_the_capability_read_is_the_chosen_gpus_not_the_current_one(monkeypatch):
    """cuda:1 is an A100 and cuda:0 (the current device) a T4: cuda:1 trains in bf16."""
    gpus = {0: (7, 5), 1: (8, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: gpus[torch.device(d).index])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)   # emulation
    assert precision_for(torch.device("cuda", 1)) == "bf16"
    assert precision_for(torch.device("cuda", 0)) == "fp16"
    assert runtime.autocast_dtype(torch.device("cuda", 0)) == "fp16"


def test_inference_is_float32_unless_asked(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: True)
    assert inference_precision(cpu) == "fp32"
    assert inference_precision(cpu, "amp") == "bf16"
    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: False)
    assert inference_precision(cpu, "amp") == "fp32"
    assert isinstance(runtime.autocast_for(cpu, "fp32"), type(runtime.autocast_for(cpu, False)))
    with runtime.autocast_for(cpu, "bf16"):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")


# ---------------------------------------------------------------------------------- devices

@pytest.mark.parametrize("name, cuda_count, mps, expected", [
    ("auto", 0, False, "cpu"), ("auto", 0, True, "mps"), ("auto", 2, True, "cuda:0"),
    ("cpu", 4, True, "cpu"), ("cuda", 1, False, "cuda:0"), ("cuda:0", 1, False, "cuda:0"),
    ("cuda:3", 4, False, "cuda:3"), ("mps", 0, True, "mps"),
])
def test_device_choice(name, cuda_count, mps, expected):
    assert device_choice(name, cuda_count=cuda_count, mps=mps) == expected


@pytest.mark.parametrize("name, cuda_count, mps, message", [
    ("cuda:7", 1, False, "--device cuda:7: this machine has 1 CUDA device (cuda:0)"),
    ("cuda:2", 2, False, "--device cuda:2: this machine has 2 CUDA devices (cuda:0 to cuda:1)"),
    ("cuda", 0, False, "--device cuda: CUDA is not available here"),
    ("cuda:1", 0, True, "--device cuda:1: CUDA is not available here"),
    ("mps", 2, False, "--device mps: MPS is not available here"),
    ("cuda:x", 2, False, "--device cuda:x: not a device"),
])
def test_a_missing_device_is_one_line_saying_what_there_is(name, cuda_count, mps, message):
    with pytest.raises(DeviceError) as info:
        device_choice(name, cuda_count=cuda_count, mps=mps)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_a_cuda_device_becomes_the_current_one(monkeypatch):
    """cuda:1 is made current, so nothing of the run lands on (or starts a context on) cuda:0."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert chosen == [torch.device("cuda", 1), torch.device("cuda", 0)]


def test_cpu_asks_nothing_of_cuda(monkeypatch):
    _pretend_gpu_machine(monkeypatch)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1 / 0)
    assert resolve_device("cpu") == torch.device("cpu")
    assert precision_for(torch.device("cpu"), "fp32") == "fp32"


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_cli_missing_cuda_index_is_one_line(command, tiny_features, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    args = (["train", "--features", tiny_features, "--model-dir", tmp_path / "m", *RUN[:-2]]
            if command == "train" else ["evaluate", "--checkpoint", tmp_path / "none.pth"])
    result = invoke(*args, "--device", "cuda:7")
    assert result.exit_code == 2, result.output
    line = one_error_line(result.stderr)
    assert line.startswith("Error: --device cuda:7: this machine has 1 CUDA device (cuda:0)")
    assert not (tmp_path / "m").exists()        # refused before the folder is claimed


@pytest.mark.parametrize("device, cpus, processes, expected", [
    ("cuda", 16, 1, 4), ("cuda", 4, 1, 3), ("cuda", 2, 1, 1), ("cuda", 1, 1, 0),
    ("cuda", 16, 8, 1), ("cuda", None, 1, 0), ("cpu", 64, 1, 0), ("mps", 10, 1, 0)])
def test_default_num_workers(device, cpus, processes, expected):
    assert default_num_workers(device, cpu_count=cpus, processes=processes) == expected


def test_non_blocking_copies_only_from_pinned_memory(monkeypatch):
    calls = []
    real_to = torch.Tensor.to

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("non_blocking"))
        return self if str(args[0]).startswith(("cuda", "mps")) else real_to(self, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "to", spy)
    x = torch.zeros(3)
    to_device(x, torch.device("mps"))                    # freed at once after an async copy
    to_device(x, torch.device("cpu"))
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: False)
    to_device(x, torch.device("cuda", 0))
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: True)
    to_device(x, torch.device("cuda", 0))
    assert calls == [False, False, False, True]


# ------------------------------------------------------------------------------ checkpoints

def test_to_cpu_copies_every_tensor_of_nested_states(monkeypatch):
    """Optimizer states nest tensors in dicts of dicts and lists: each passes through .cpu()."""
    moved = []
    real_cpu = torch.Tensor.cpu

    def spy(self):
        moved.append(id(self))
        return real_cpu(self).clone()
    monkeypatch.setattr(torch.Tensor, "cpu", spy)
    payload = {"model_state": {"w": torch.ones(2)},
               "optimizer_state": {"state": {0: {"exp_avg": torch.ones(2), "step": torch.tensor(3.)}},
                                   "param_groups": [{"lr": 0.1, "params": [0]}]},
               "rng_state": {"torch": torch.zeros(4, dtype=torch.uint8),
                             "cuda": [torch.zeros(2, dtype=torch.uint8)]},
               "pair": (torch.zeros(1), 2), "scaler_state": {}}
    before = [id(t) for t in _tensors(payload)]
    out = to_cpu(payload)
    assert sorted(moved) == sorted(before)
    assert out["optimizer_state"]["param_groups"] == [{"lr": 0.1, "params": [0]}]
    assert isinstance(out["pair"], tuple) and out["scaler_state"] == {}


@pytest.mark.slow
def test_saved_checkpoints_hold_cpu_tensors_only(cpu_run, tmp_path, monkeypatch):
    """The run's files, and (what a CPU run cannot show) a GPU run's states: save_checkpoint
    given tensors on cuda:1 writes CPU tensors only."""
    out, _ = cpu_run
    for name in ("best.pth", "last.pth"):
        assert _locations(out / name) == {"cpu"}
        raw = torch.load(out / name, weights_only=True)        # no map_location needed
        assert all(t.device.type == "cpu" for t in _tensors(raw))
        raw.pop("format_version")
        save_checkpoint(tmp_path / name, _on_gpu(raw, monkeypatch))
        assert _locations(tmp_path / name) == {"cpu"}
        again = torch.load(tmp_path / name, weights_only=True)
        assert all(type(t) is torch.Tensor and t.device.type == "cpu" for t in _tensors(again))
        assert len(list(_tensors(again))) == len(list(_tensors(raw)))


@pytest.mark.slow
def test_a_checkpoint_written_on_a_gpu_loads_on_this_machine(cpu_run, tmp_path, monkeypatch):
    """A file whose tensors say cuda:1 (written by a run before this fix, or by torch.save of
    a GPU state) loads through load_checkpoint here, and saving it again makes it CPU-only."""
    out, _ = cpu_run
    raw = torch.load(out / "best.pth", weights_only=True)
    foreign = tmp_path / "gpu.pth"
    with monkeypatch.context() as mp:
        mp.setattr(torch.serialization, "location_tag", lambda storage: "cuda:1")
        torch.save(raw, foreign)
    assert _locations(foreign) == {"cuda:1"}
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="on a CUDA device but torch.cuda.is_available"):
            torch.load(foreign, weights_only=True)      # what a plain load does without CUDA
    ckpt = load_checkpoint(foreign)
    assert all(t.device.type == "cpu" for t in _tensors(ckpt))
    # saved again from its states on the GPU (as a resumed run on cuda:1 would)
    on_gpu = _on_gpu({k: v for k, v in ckpt.items() if k != "format_version"}, monkeypatch)
    save_checkpoint(tmp_path / "again.pth", on_gpu)
    assert _locations(tmp_path / "again.pth") == {"cpu"}


@pytest.mark.slow
def test_load_checkpoint_maps_to_the_cpu_and_loads_weights_only(cpu_run, monkeypatch):
    out, _ = cpu_run
    seen = {}
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real_load(*args, **kwargs)
    monkeypatch.setattr(torch, "load", spy)
    load_checkpoint(out / "best.pth")
    assert seen["map_location"] == "cpu" and seen["weights_only"] is True


# -------------------------------------------------------------------- runs and resume on CPU

@pytest.mark.slow
def test_a_cpu_run_on_a_gpu_machine_never_touches_cuda(cpu_run):
    """The fixture's run would have failed on any CUDA call; it trained in bf16 (as on a CPU
    with native bf16), and warned before training that the memory is too small."""
    out, output = cpu_run
    assert ", on cpu, bf16: " in output
    warnings = [ln for ln in output.splitlines() if ln.startswith("warning: a training step")]
    assert len(warnings) == 1 and "--batch-size (now 8)" in warnings[0]
    last = torch.load(out / "last.pth", weights_only=True)
    assert set(last["rng_state"]) == {"torch", "python", "python_version", "python_gauss"}
    assert last["scaler_state"] == {}
    assert last["runtime_config"]["deterministic"] is True


@pytest.mark.slow
def test_resume_from_another_machine_onto_this_device(cpu_run, tmp_path, monkeypatch):
    """last.pth as an 8-GPU fp16 run on cuda:1 would write it (every GPU's generator, a scaler
    state, cuda:1 in its runtime): a --device cpu resume on a machine with one GPU continues
    on the CPU without touching CUDA."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(cpu_run[0], out)
    raw = torch.load(out / "last.pth", weights_only=True)
    raw["rng_state"]["cuda"] = [torch.zeros(16, dtype=torch.uint8) for _ in range(8)]
    raw["scaler_state"] = {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                           "growth_interval": 2000, "_growth_tracker": 7}
    raw["runtime_config"] = {"device": "cuda:1", "amp": True, "amp_dtype": "fp16",
                             "channels_last": True, "num_workers": 4, "sync_bn": False,
                             "deterministic": False}
    torch.save(raw, out / "last.pth")
    _pretend_gpu_machine(monkeypatch)
    result = invoke("train", "--features", raw["features_file"], "--model-dir", out, "--resume",
                    "--epochs", "3", "--device", "cpu", "--no-amp", "--quiet")
    assert result.exit_code == 0, result.output
    assert "resuming after epoch 2" in result.output and ", on cpu, fp32: " in result.output
    resumed = torch.load(out / "last.pth", weights_only=True)
    assert resumed["epoch"] == 3 and resumed["runtime_config"]["device"] == "cpu"
    assert resumed["runtime_config"]["amp"] is False


def test_an_fp16_resume_accepts_the_empty_scaler_state_of_a_bf16_run():
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=4.0)
    with pytest.raises(RuntimeError, match="state dict is empty"):
        scaler.load_state_dict({})                   # what torch does with it
    restore_scaler(scaler, {})                       # a bf16, float32 or CPU run's state
    assert scaler.get_scale() == 4.0
    other = torch.amp.GradScaler("cpu", enabled=True, init_scale=64.0)
    restore_scaler(scaler, other.state_dict())       # an fp16 run's state
    assert scaler.get_scale() == 64.0
    off = torch.amp.GradScaler("cpu", enabled=False)
    restore_scaler(off, other.state_dict())          # an fp16 state resumed in bf16: unused
    assert not off.is_enabled()


def test_rng_restore_tolerates_fewer_gpus(monkeypatch):
    """A state saved with 8 GPUs' generators restores on a machine with one, onto the run's
    device only; on the CPU no CUDA call at all."""
    restored = []
    state = {**seed.rng_state(), "cuda": [torch.full((4,), i, dtype=torch.uint8) for i in range(8)]}
    _pretend_gpu_machine(monkeypatch)
    set_rng_state(state, torch.device("cpu"))
    set_rng_state(state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.append((int(s[0]), device)))
    set_rng_state(state, torch.device("cuda", 0))
    set_rng_state({**state, "cuda": state["cuda"][:1]}, torch.device("cuda", 3))
    set_rng_state({**state, "cuda_device": torch.full((4,), 42, dtype=torch.uint8)}, torch.device("cuda", 0))
    assert restored == [(0, torch.device("cuda", 0)), (0, torch.device("cuda", 3)),
                        (42, torch.device("cuda", 0))]


def test_rng_state_of_a_cuda_run_is_its_own_devices_generator(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: 1 / 0)
    monkeypatch.setattr(torch.cuda, "get_rng_state",
                        lambda device: asked.append(device) or torch.zeros(2, dtype=torch.uint8))
    assert "cuda_device" in seed.rng_state(torch.device("cuda", 1))
    assert "cuda_device" not in seed.rng_state(torch.device("cpu"))
    assert asked == [torch.device("cuda", 1)]


# ---------------------------------------------------------------------- float32 inference

@pytest.mark.slow
def test_stored_test_accuracy_equals_evaluates_on_another_machine(cpu_run, tmp_path, monkeypatch):
    """Trained in bf16 on a 'native bf16' CPU; evaluated on a CPU without bf16 (this one): the
    test numbers agree exactly, because both classify in float32."""
    from deepfusion.evaluate import evaluate

    out, _ = cpu_run
    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: False)
    best = torch.load(out / "best.pth", weights_only=True)
    stored = best["metrics"]["test"]
    assert stored["precision"] == "fp32"
    report = evaluate(out / "best.pth", device="cpu", out_dir=tmp_path / "r", echo=lambda s: None)
    assert report.metrics["accuracy"] == stored["clip_acc"]
    assert report.metrics["segment_accuracy"] == stored["segment_acc"]
    saved = json.loads((tmp_path / "r" / "evaluation.json").read_text())
    assert saved["precision"] == "fp32" and saved["device"] == "cpu"


@pytest.mark.slow
def test_evaluate_precision_amp_is_recorded(cpu_run, tmp_path, monkeypatch):
    from deepfusion.evaluate import evaluate

    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: True)
    evaluate(cpu_run[0] / "best.pth", device="cpu", precision="amp", out_dir=tmp_path,
             echo=lambda s: None)
    assert json.loads((tmp_path / "evaluation.json").read_text())["precision"] == "bf16"


# ---------------------------------------------------------------------------- out of memory

def _out_of_memory(kind: str):
    def forward(self, x):
        if kind == "cuda":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        raise RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB)")
    return forward


@pytest.mark.parametrize("kind", ["cuda", "mps"])
def test_out_of_memory_in_training_is_one_line(kind, tiny_features, tmp_path, monkeypatch):
    from deepfusion.models.net import MultiModalNet

    monkeypatch.setattr(MultiModalNet, "forward", _out_of_memory(kind))
    result = invoke("train", "--features", tiny_features, "--model-dir", tmp_path / "m",
                    "--epochs", "1", *RUN)
    assert result.exit_code == DeviceMemoryError.exit_code != 0
    line = one_error_line(result.stderr)
    assert line.startswith("Error: out of memory on cpu with --batch-size 8 (segments of ")
    assert line.endswith("use a smaller --batch-size or --segment-seconds")


@pytest.mark.slow
def test_out_of_memory_in_evaluate_is_one_line(cpu_run, tmp_path, monkeypatch):
    from deepfusion.models.net import MultiModalNet

    monkeypatch.setattr(MultiModalNet, "forward", _out_of_memory("cuda"))
    result = invoke("evaluate", "--checkpoint", cpu_run[0] / "best.pth", "--device", "cpu",
                    "--out-dir", tmp_path, "--batch-size", "64")
    assert result.exit_code != 0
    assert one_error_line(result.stderr) == ("Error: out of memory on cpu with --batch-size 64; "
                                             "use a smaller --batch-size")


def test_other_runtime_errors_are_not_taken_for_out_of_memory():
    with pytest.raises(RuntimeError, match="shape"):
        with memory.memory_guard(torch.device("cpu"), batch_size=8):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    with pytest.raises(DeviceMemoryError, match="^out of memory on cpu with --batch-size 8; "):
        with memory.memory_guard(torch.device("cpu"), batch_size=8):
            raise torch.OutOfMemoryError("CUDA out of memory")
    assert out_of_memory_message("cuda:0", batch_size=64, frames=1292) == (
        "out of memory on cuda:0 with --batch-size 64 (segments of 1292 frames); use a smaller "
        "--batch-size or --segment-seconds")


# ----------------------------------------------------------------------------------- memory

def test_memory_estimate_and_warning():
    full = dict(n_mels=128, frames=1292, batch_size=64, n_params=73_000_000)
    amp = estimate_training_bytes("resnet50", precision="bf16", **full)
    fp32 = estimate_training_bytes("resnet50", precision="fp32", **full)
    crop = estimate_training_bytes("resnet50", precision="bf16", **{**full, "frames": 129,
                                                                     "batch_size": 16})
    assert 25 * 2**30 < amp < 45 * 2**30 and 1.8 < fp32 / amp < 2.1
    assert crop < 3 * 2**30
    assert (estimate_training_bytes("light", precision="fp32", **full)
            < estimate_training_bytes("resnet18", precision="fp32", **full) < fp32)
    gpu16 = 16 * 2**30
    line = memory_warning(amp, gpu16, device="cuda:0", batch_size=64, frames=1292)
    assert line.startswith("warning: a training step needs about 3") and "\n" not in line
    assert "cuda:0 has 16.0 GiB" in line and "--batch-size (now 64)" in line
    assert memory_warning(crop, gpu16, device="cuda:0", batch_size=16, frames=129) is None
    assert memory_warning(amp, None, device="mps", batch_size=64, frames=1292) is None
    with pytest.raises(ParameterError, match="^backbone must be one of .*, got 'vgg'$"):
        estimate_training_bytes("vgg", n_mels=1, frames=1, batch_size=1)


def test_memory_estimate_matches_saved_activations_of_light():
    """The per-value constant of the light CNN against autograd's saved tensors, measured."""
    from deepfusion.models.net import MelCNN

    sizes = {}
    for frames in (64, 128):
        seen: dict[int, int] = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        net = MelCNN(backbone="light", embed_dim=32).train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            net(torch.randn(2, 64, frames))
        sizes[frames] = sum(seen.values())
    per_value = (sizes[128] - sizes[64]) / (2 * 64 * 64)
    assert math.isclose(per_value, BACKBONES["light"].activation_bytes, rel_tol=0.15)


# -------------------------------------------------------------------------- backend switches

def test_deterministic_switches_are_set_and_put_back(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    cudnn = torch.backends.cudnn
    before = (torch.are_deterministic_algorithms_enabled(), cudnn.deterministic, cudnn.benchmark,
              cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    with backend_settings(torch.device("cpu"), deterministic=True):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert cudnn.deterministic and not cudnn.benchmark
        assert not cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    after = (torch.are_deterministic_algorithms_enabled(), cudnn.deterministic, cudnn.benchmark,
             cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    assert after == before and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    with backend_settings(torch.device("cuda", 0)):
        assert cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
    with backend_settings(torch.device("cpu")):
        assert cudnn.benchmark == before[2]
    assert cudnn.benchmark == before[2]


def test_the_train_loop_waits_for_the_device_once_per_log_step(monkeypatch):
    """Loss and accuracy are summed on the device: over 45 batches the loop reads them back
    at the progress bar's updates (batches 0, 20, 40, 44) and once at the end, not 90 times."""
    import inspect

    from deepfusion.train import loop as train_module

    reads = []
    for name in ("__float__", "__int__", "item"):
        real = getattr(torch.Tensor, name)

        def spy(self, *a, _real=real, **k):
            if inspect.currentframe().f_back.f_code.co_filename == train_module.__file__:
                reads.append(1)
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, spy)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(6, 3)

        def forward(self, x):
            return {"logits": self.lin(x["a"].mean(-1))}

    class Bar:
        disable, n, posts = False, 0, 0

        def update(self, k):
            self.n += k

        def set_postfix(self, **kw):
            self.posts += 1

    torch.manual_seed(0)
    loader = [({"a": torch.randn(4, 6, 5)}, torch.randint(0, 3, (4,)), None) for _ in range(45)]
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    bar = Bar()
    loss, acc = train_module.train_one_epoch(
        net, loader, opt, sched, torch.amp.GradScaler("cpu", enabled=False),
        torch.nn.CrossEntropyLoss(), device=torch.device("cpu"), amp="fp32", progress=bar)
    assert bar.n == 45 and bar.posts == 4
    assert len(reads) == 4 + 2
    assert 0 <= acc <= 1 and loss > 0


# ------------------------------------------------------------------------- the GPU check script

def test_gpu_check_exits_non_zero_for_views_over_their_tolerance(tmp_path):
    """benchmarks/gpu_check.py views: the GPU's features of the same clips within each view's
    tolerance exit 0, one view over it exits 1; the table (the script's last step, whose exit
    status is the script's) exits 1 when a row failed or is over."""
    import importlib.util
    import pickle

    import numpy as np

    from deepfusion.features.torch_views import TOLERANCE
    from deepfusion.testing import small_rows

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    rows = small_rows(8, mfcc=5, chroma=12, tempogram=6)
    rng = np.random.default_rng(0)
    clips = [{k: rng.normal(size=(r, 20)).astype(np.float32) for k, r in rows.items()}
             for _ in range(4)]

    def features(name: str, moved: dict[str, float]) -> str:
        items = [{"features": {k: a + np.float32(moved.get(k, 0.0)) for k, a in clip.items()},
                  "label": ("rock", "jazz")[i % 2], "path": f"{i}.wav"}
                 for i, clip in enumerate(clips)]
        (tmp_path / name).write_bytes(pickle.dumps(items))
        return str(tmp_path / name)
    cpu = features("cpu.pkl", {})
    near = features("near.pkl", {k: TOLERANCE[k] / 2 for k in rows})
    far = features("far.pkl", {"mfcc": 2 * TOLERANCE["mfcc"]})
    ok, over = str(tmp_path / "ok.tsv"), str(tmp_path / "over.tsv")
    assert gpu_check.main(["views", ok, "views", cpu, near]) == 0
    assert gpu_check.main(["views", over, "views", cpu, far]) == 1
    assert "OVER the tolerance the shared cache key rests on: mfcc" in Path(over).read_text()
    assert gpu_check.main(["table", ok]) == 0
    assert gpu_check.main(["table", over]) == 1
    Path(ok).write_text(Path(ok).read_text() + "train light-fp16\tFAILED (exit 1): boom\t3.0\n")
    assert gpu_check.main(["table", ok]) == 1


@pytest.mark.slow
def test_gpu_check_script_on_a_machine_without_a_gpu(tmp_path):
    """Without a GPU the script runs its CPU mode: the machine line says "no GPU", a measured
    cell has a figure, and every figure only a GPU gives says it was not measured."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable,
           "GPU_CHECK_DIR": str(tmp_path), "PYTHONPATH": str(REPO), "GPU_CHECK_SECTIONS": "train",
           "GPU_CHECK_GRID": "light:16", "GPU_CHECK_PRECISIONS": "fp32 fp16",
           "GPU_CHECK_STEPS": "1", "GPU_CHECK_WARMUP": "1"}
    env.pop("GPU_CHECK_DEVICE", None)
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], env=env,
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Machine: ") and "no GPU" in lines[0]
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1] for line in lines if line.startswith("| ")}
    assert "segments/s" in rows["train: light fp32, batch 16, 3-s crops"]
    assert "peak RSS" in rows["train: light fp32, batch 16, 3-s crops"]
    assert rows["train: light fp16, batch 16,32,64,128"].startswith("not measured (no GPU")
    assert rows["train: light bf16, batch 16,32,64,128"] == \
        "not measured (left out by GPU_CHECK_PRECISIONS)"
    assert rows["train: light fp32, batch 32,64,128"] == "not measured (left out by GPU_CHECK_GRID)"
    assert not any(r.startswith("extract") or r.startswith("predict") for r in rows)
    assert (tmp_path / "results.tsv").is_file()
