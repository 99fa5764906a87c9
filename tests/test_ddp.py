"""Training under torchrun: two CPU processes (gloo) with DistributedDataParallel.

The share of an epoch's order each process trains on is checked as a pure function; the runs
go through the real launcher (``python -m torch.distributed.run``) and the real command.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deepfusion.data.dataset import epoch_order
from deepfusion.runtime import ddp
from deepfusion.testing import assert_same_training, history_rows, run_command, subprocess_env
from deepfusion.testing.damage import history_epochs, kill_when

RUN = ("--backbone", "light", "--no-pretrained", "--batch-size", "4")
START_LINE = "distributed: 2 processes (gloo), batch size 4 per process (8 per step)"


def torchrun_command(*args) -> list[str]:
    """``deepfusion train ARGS`` in two processes on this machine, as an argument list."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            "2", "-m", "deepfusion", "train", *map(str, args)]


def torchrun(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_command(*args), env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)


# ------------------------------------------------------------------------ shares of the order

@pytest.mark.parametrize("n, world", [(12, 2), (13, 2), (10, 3), (7, 4), (1, 2)])
def test_each_rank_takes_an_equal_share_of_the_same_epoch_order(n, world):
    whole = epoch_order(n, seed=3, epoch=5)
    assert sorted(whole) == list(range(n))
    shares = [epoch_order(n, seed=3, epoch=5, rank=r, world_size=world) for r in range(world)]
    assert {len(s) for s in shares} == {-(-n // world)}          # as many steps on every rank
    taken = [i for s in shares for i in s]
    assert set(taken) == set(whole)                                 # the shares cover the epoch
    assert len(taken) - n == -n % world                             # repeats: the padding only
    if n % world == 0:
        assert len(set(taken)) == len(taken)                        # disjoint
    padded = (whole * world)[:len(taken)]                           # strided over one order
    assert [padded[r::world] for r in range(world)] == shares
    # (seed, epoch) alone: the same call again, another epoch or seed another order
    assert shares == [epoch_order(n, seed=3, epoch=5, rank=r, world_size=world)
                      for r in range(world)]
    if n > 3:
        assert epoch_order(n, seed=3, epoch=6) != whole
        assert epoch_order(n, seed=4, epoch=5) != whole


def test_one_process_trains_on_the_whole_order_as_before():
    g = torch.Generator().manual_seed(7 * 1_000_033 + 2)
    assert epoch_order(10, seed=7, epoch=2) == torch.randperm(10, generator=g).tolist()
    assert ddp.epoch_share([4, 2, 0], 0, 1) == [4, 2, 0]


@pytest.mark.parametrize("n, world", [(7, 2), (3, 4), (9, 3), (5, 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.int64, "<U5"])
def test_evaluation_shards_go_back_in_order(n, world, dtype, monkeypatch):
    """Probabilities, labels and names alike come back in their order, shape and dtype."""
    items = np.arange(n * 2).reshape(n, 2).astype(dtype)
    parts = []
    for r in range(world):       # each rank's own ddp.shard, as in a group of `world`
        monkeypatch.setattr(ddp, "_GROUP", ddp.Group(r, world, r, "gloo", torch.device("cpu")))
        parts.append(ddp.shard(items))
    monkeypatch.setattr(ddp, "_GROUP", None)
    sizes = [len(p) for p in parts]
    assert sum(sizes) == n and max(sizes) - min(sizes) <= 1                 # shares, not copies
    back = ddp.unshard(parts)
    assert back.dtype == items.dtype and back.shape == items.shape
    np.testing.assert_array_equal(back, items)
    np.testing.assert_array_equal(ddp.shard(items), items)                  # without a group


def test_without_torchrun_nothing_is_distributed(monkeypatch):
    for name in ddp.ENV:
        monkeypatch.delenv(name, raising=False)
    assert ddp.launched() is None
    with ddp.process_group() as group:
        assert group is None and ddp.world_size() == 1 and ddp.rank() == 0
        assert ddp.on_main(lambda x: x + 1, 1) == 2
        assert ddp.mean(0.5, 2.0) == (0.5, 2.0)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")            # torchrun with one process: as without
    assert ddp.launched() is None


# ----------------------------------------------------------------------------- torchrun runs

@pytest.fixture(scope="module")
def ddp_run(tiny_features, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A 3-epoch run in two processes."""
    model_dir = tmp_path_factory.mktemp("ddp") / "run"
    done = torchrun("--features", tiny_features, "--model-dir", model_dir, "--epochs", 3, *RUN)
    assert done.returncode == 0, done.stderr
    return model_dir, done


@pytest.mark.slow
def test_two_processes_write_one_run_that_evaluates_without_torchrun(ddp_run, tmp_path):
    model_dir, done = ddp_run
    assert sorted(p.name for p in model_dir.iterdir() if not p.name.startswith(".")) == \
        ["best.pth", "last.pth", "training_history.csv", "training_history.png"]
    assert [row["epoch"] for row in history_rows(model_dir)] == ["1", "2", "3"]
    # rank 0 alone prints: each line once
    assert done.stdout.count(START_LINE) == 1, done.stdout
    assert len([ln for ln in done.stdout.splitlines() if ln.startswith("epoch ")]) == 3
    assert len([ln for ln in done.stdout.splitlines() if ln.startswith("best.pth: ")]) == 1
    ckpt = torch.load(model_dir / "best.pth", map_location="cpu", weights_only=True)
    assert not any(k.startswith("module.") for k in ckpt["model_state"])   # the plain module's
    evaluated = run_command("evaluate", "--checkpoint", model_dir / "best.pth",
                            "--out-dir", tmp_path / "report", timeout=120)
    assert evaluated.returncode == 0, evaluated.stderr
    # a used folder: rank 0 refuses it in one line, the other process leaves quietly
    again = torchrun("--features", ckpt["features_file"], "--model-dir", model_dir,
                     "--epochs", 3, *RUN)
    assert again.returncode != 0
    errors = [ln for ln in again.stderr.splitlines() if ln.startswith("Error: ")]
    assert len(errors) == 1 and "holds a run" in errors[0], again.stderr


@pytest.mark.slow
def test_two_process_runs_are_reproducible(ddp_run, tiny_features, tmp_path):
    first, _ = ddp_run
    second = tmp_path / "run"
    done = torchrun("--features", tiny_features, "--model-dir", second, "--epochs", 3, *RUN)
    assert done.returncode == 0, done.stderr
    assert_same_training(first, second)      # history, best epoch, metrics, every tensor


@pytest.mark.slow
def test_resume_under_torchrun(tiny_features, tmp_path):
    model_dir = tmp_path / "run"
    first = torchrun("--features", tiny_features, "--model-dir", model_dir, "--epochs", 2, *RUN)
    assert first.returncode == 0, first.stderr
    resumed = torchrun("--features", tiny_features, "--model-dir", model_dir, "--resume",
                       "--epochs", 4, *RUN)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch 2" in resumed.stdout
    assert [row["epoch"] for row in history_rows(model_dir)] == ["1", "2", "3", "4"]
    ckpt = torch.load(model_dir / "last.pth", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 4 and len(ckpt["history"]) == 4


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_to_the_uninterrupted_one(ddp_run, tiny_features,
                                                                     tmp_path):
    full, _ = ddp_run
    killed = tmp_path / "run"
    args = ("--features", tiny_features, "--model-dir", killed, "--epochs", 3, *RUN)
    stopped, status, stderr = kill_when(torchrun_command(*args), history_epochs(killed), 1, 0.0,
                                        env=subprocess_env(), timeout=120)
    assert stopped, f"the run ended by itself first ({status}): {stderr}"
    resumed = torchrun("--features", tiny_features, "--model-dir", killed, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_training(full, killed)


@pytest.mark.slow
def test_an_error_is_said_once_by_rank_0(tiny_features, tmp_path):
    """Every rank refuses the same bad option; the user reads one line, not one per rank
    (torchrun then prints its own report of a failed worker, which is the launcher's)."""
    done = torchrun("--features", tiny_features, "--model-dir", tmp_path / "run", "--epochs", 1,
                    "--segment-seconds", "0.05", *RUN)
    assert done.returncode != 0
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "--segment-seconds" in errors[0], done.stderr
    assert "/deepfusion/" not in done.stderr and "internal error" not in done.stderr
    assert not (tmp_path / "run" / "best.pth").exists()


def _children(pid: int) -> list[int]:
    """Child processes of ``pid`` (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(c) for c in text]
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_one_rank_crashing_ends_the_run_and_resume_recovers(ddp_run, tiny_features, tmp_path):
    """A worker process dying mid-run (out of memory, a node lost) ends the whole run in
    bounded time, never a hang of the survivor; the epochs already written resume to the
    uninterrupted run."""
    import os
    import signal
    import time

    full, _ = ddp_run
    model_dir = tmp_path / "run"
    # checkpoints after every epoch (not on the 300-s budget): the kill lands between them
    proc = subprocess.Popen(torchrun_command("--features", tiny_features, "--model-dir",
                                             model_dir, "--epochs", 3, *RUN,
                                             "--save-every", 0),
                            env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while history_epochs(model_dir)() < 1 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, proc.stderr.read()
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        ranks = {}
        for pid in workers:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            ranks[int(next(e for e in env if e.startswith(b"RANK=")).split(b"=")[1])] = pid
        os.kill(ranks[1], signal.SIGKILL)
        status = proc.wait(timeout=90)       # the launcher stops the survivor
        assert status != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stderr.close()
    assert history_epochs(model_dir)() >= 1
    resumed = torchrun("--features", tiny_features, "--model-dir", model_dir, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_training(full, model_dir)
