"""Fast to start, fast for one file (issue 22, section 3): each path of extract and predict
against the bare interpreter importing what that path needs, from one run.

Prints one table. Per row: the median wall time of the command in a fresh process over
``--repeats`` runs (the page cache warm: one run first that is not counted), the median of its
baseline (``python -c "import ..."``) measured in the same run, each baseline run right before
a run of the command, their ratio, the goal and PASS/FAIL. The CPU seconds of each (user and
system, of the child process) stand beside: a busy machine moves them less than wall times.

Rows:
  * ``extract`` of one cached clip (a new ``--out`` each run) against
    ``import numpy, soundfile``: at most 5x;
  * ``predict`` (torch engine) of one cached file against ``import torch``: at most 1.3x;
  * ``predict`` (torch engine) of one new file (an empty ``--cache-dir`` each run) against
    ``import torch``: at most 2x;
  * ``predict --engine onnx`` of one cached file: under 1 s (its ratio to
    ``import numpy, onnxruntime`` for reference), and of one new file (for comparison);
  * unless ``--no-resnet50``: ``predict`` of one cached file with a ResNet-50 checkpoint (three
    ResNet-50 branches, about 300 MB, untrained: speed does not depend on the weights), its
    identity read from ``model-ids.json``, against the same call with that file removed
    before each run (the whole checkpoint hashed, as every call did before the file existed).

Then, per path, the heavy modules the command imported (``-X importtime``).

The work folder (a temporary one unless ``--work``) gets one real clip (copied from
``--audio-dir``, else rendered by ``deepfusion synth``), a light model trained for one epoch on
six synthetic clips, and its ONNX export. ``--repo`` times another checkout of deepfusion (a
``git archive`` of an older commit, say) with the same setup.

Usage: python benchmarks/startup.py [--repeats 5] [--work DIR] [--repo DIR] [--no-resnet50]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

REPO = Path(__file__).resolve().parents[1]
#: Modules whose import costs a second or more somewhere, looked for in each path's imports.
HEAVY = ("torch", "librosa", "scipy.signal", "numba", "joblib", "onnxruntime", "pandas",
         "matplotlib")

BUILD_RESNET50 = """
import dataclasses, sys
from deepfusion.models.checkpoint import load_checkpoint, save_checkpoint
from deepfusion.config import ModelConfig
from deepfusion.models.net import MultiModalNet
ckpt = load_checkpoint(sys.argv[1])
config = dataclasses.replace(ModelConfig.from_dict(ckpt["model_config"]), backbone="resnet50",
                             pretrained=False)
ckpt["model_config"] = dataclasses.asdict(config)
ckpt["model_state"] = MultiModalNet(config).state_dict()
save_checkpoint(sys.argv[2], ckpt)
"""


@dataclass
class Row:
    """One path: ``command(i)`` (the i-th run's argument list) against ``baseline``; ``goal``:
    the largest ratio, or ``"< N s"`` of wall time, or None (shown for comparison);
    ``prepare(i)`` runs before each run of the command, off the clock."""

    name: str
    command: Callable[[int], list]
    baseline: list
    goal: Union[float, str, None]
    prepare: Optional[Callable[[int], None]] = None


class Runner:
    """Runs commands in fresh processes with ``repo`` first on ``PYTHONPATH``."""

    def __init__(self, repo: Path, work: Path):
        self.work = work
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
        self.env.pop("PYTHONPROFILEIMPORTTIME", None)

    def deepfusion(self, *args) -> list[str]:
        return [sys.executable, "-m", "deepfusion", *map(str, args)]

    def run(self, cmd: list[str], *, check: bool = True, env: dict | None = None
            ) -> tuple[float, float, subprocess.CompletedProcess]:
        """``(wall seconds, CPU seconds, process)`` of one run of ``cmd``."""
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=self.work, env=env or self.env, capture_output=True,
                              text=True)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if check and proc.returncode != 0:
            sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return wall, cpu, proc

    def imports(self, cmd: list[str]) -> list[str]:
        """The modules of :data:`HEAVY` that ``cmd`` imports."""
        _, _, proc = self.run(cmd, env={**self.env, "PYTHONPROFILEIMPORTTIME": "1"})
        names = set(re.findall(r"^import time:.*\|\s*(\S+)\s*$", proc.stderr, re.M))
        return [m for m in HEAVY if m in names]


def timed(runner: Runner, command, baseline: list[str], repeats: int, prepare=None) -> dict:
    """Medians of ``command(i)`` and ``baseline`` over ``repeats`` alternated runs (one of
    each first, not counted); ``prepare(i)`` runs before each command, off the clock."""
    walls, cpus, base_walls, base_cpus = [], [], [], []
    for i in range(-1, repeats):
        b_wall, b_cpu, _ = runner.run(baseline)
        if prepare is not None:
            prepare(i)
        wall, cpu, _ = runner.run(command(i))
        if i >= 0:
            walls.append(wall), cpus.append(cpu), base_walls.append(b_wall), base_cpus.append(b_cpu)
    med = statistics.median
    return {"wall": med(walls), "cpu": med(cpus), "base_wall": med(base_walls),
            "base_cpu": med(base_cpus)}


def setup(runner: Runner, work: Path, audio_dir: Path, resnet50: bool) -> dict:
    """The clip, the light model and its ONNX export, the caches filled; the paths."""
    df = runner.deepfusion
    clip_dir = work / "one" / "clip"
    clip_dir.mkdir(parents=True, exist_ok=True)
    real = sorted(audio_dir.rglob("*.ogg"))[:1] if audio_dir.is_dir() else []
    if real:
        clip = clip_dir / real[0].name
        shutil.copyfile(real[0], clip)
    else:
        runner.run(df("synth", "--out", work / "render", "--genres", "1", "--clips-per-genre", "1",
                      "--seed", "7"))
        clip = clip_dir / "clip.wav"
        shutil.copyfile(next((work / "render").rglob("*.wav")), clip)
    model = work / "model" / "best.pth"
    if not model.is_file():
        runner.run(df("synth", "--out", work / "synth", "--genres", "2", "--clips-per-genre", "3"))
        runner.run(df("extract", "--audio-dir", work / "synth", "--out", work / "train.pkl",
                      "--cache-dir", work / "train-cache", "--quiet"))
        runner.run(df("train", "--features", work / "train.pkl", "--model-dir", model.parent,
                      "--backbone", "light", "--epochs", "1", "--val-size", "0.34",
                      "--test-size", "0", "--quiet"))
    onnx = work / "model.onnx"
    if not onnx.is_file():
        runner.run(df("export", "--checkpoint", model, "--out", onnx))
    paths = {"clip": clip, "model": model, "onnx": onnx, "cache": work / "cache"}
    runner.run(df("extract", "--audio-dir", work / "one", "--out", work / "one.pkl",
                  "--cache-dir", paths["cache"], "--quiet"))
    runner.run(df("predict", clip, "--checkpoint", model, "--cache-dir", paths["cache"]))
    runner.run(df("predict", clip, "--checkpoint", onnx, "--engine", "onnx",
                  "--cache-dir", paths["cache"]))
    if resnet50:
        big = work / "resnet50" / "best.pth"
        if not big.is_file():
            big.parent.mkdir(exist_ok=True)
            runner.run([sys.executable, "-c", BUILD_RESNET50, str(model), str(big)])
        runner.run(df("predict", clip, "--checkpoint", big, "--cache-dir", paths["cache"]))
        paths["resnet50"] = big
    return paths


def machine() -> str:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown CPU"
    return f"{os.cpu_count()} cores ({cpu}), load average {os.getloadavg()[0]:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--work", type=Path, help="work folder, kept (default: a temporary one)")
    ap.add_argument("--repo", type=Path, default=REPO, help="the deepfusion checkout to time")
    ap.add_argument("--audio-dir", type=Path, default=REPO.parent / "shared/data/minigenres")
    ap.add_argument("--no-resnet50", dest="resnet50", action="store_false")
    args = ap.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="startup-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    runner = Runner(args.repo.resolve(), work)
    t_setup = time.perf_counter()
    paths = setup(runner, work, args.audio_dir, args.resnet50)
    df, clip, cache = runner.deepfusion, paths["clip"], paths["cache"]
    print(f"setup {time.perf_counter() - t_setup:.0f} s in {work}; {machine()}", flush=True)

    py = [sys.executable, "-c"]
    base_sf, base_torch = py + ["import numpy, soundfile"], py + ["import torch"]
    base_ort = py + ["import numpy, onnxruntime"]
    new_cache = work / "new"

    def predict(model, *extra, cache_dir=cache):
        return lambda i: df("predict", clip, "--checkpoint", model, "--cache-dir", cache_dir,
                            *extra)

    rows = [   # name, command(i), baseline, goal (a ratio, or "< N s"), prepare(i)
        Row("extract, one cached clip", lambda i: df(
            "extract", "--audio-dir", work / "one", "--out", work / "out" / f"run{i}.pkl",
            "--cache-dir", cache, "--quiet"), base_sf, 5.0,
            lambda i: shutil.rmtree(work / "out", ignore_errors=True)),   # a new --out
        Row("predict (torch), one cached file", predict(paths["model"]), base_torch, 1.3),
        Row("predict (torch), one new file", predict(paths["model"], cache_dir=new_cache),
            base_torch, 2.0, lambda i: shutil.rmtree(new_cache, ignore_errors=True)),
        Row("predict --engine onnx, one cached file", predict(paths["onnx"], "--engine", "onnx"),
            base_ort, "< 1 s"),
        Row("predict --engine onnx, one new file", predict(
            paths["onnx"], "--engine", "onnx", cache_dir=new_cache), base_ort, None,
            lambda i: shutil.rmtree(new_cache, ignore_errors=True)),
    ]
    paths_rows = len(rows)
    if "resnet50" in paths:
        ids = cache / "model-ids.json"
        rows += [
            Row("predict, ResNet-50, cached, id known", predict(paths["resnet50"]), base_torch,
                1.3),
            Row("  the same, its id file removed", predict(paths["resnet50"]), base_torch, None,
                lambda i: ids.unlink(missing_ok=True)),
        ]

    print(f"\nmedian of {args.repeats} runs each: wall s (CPU s); each baseline run right "
          "before a run of the command")
    head = f"{'path':<40} {'command':>14} {'baseline':>14}  {'ratio':>12}  goal"
    print(head + "\n" + "-" * (len(head) + 16))
    for row in rows:
        r = timed(runner, row.command, row.baseline, args.repeats, row.prepare)
        ratio, ratio_cpu = r["wall"] / r["base_wall"], r["cpu"] / r["base_cpu"]
        if isinstance(row.goal, str):
            verdict = f"{row.goal} {'PASS' if r['wall'] < float(row.goal.split()[1]) else 'FAIL'}"
        elif row.goal is None:
            verdict = "(for comparison)"
        else:
            verdict = f"<= {row.goal:g}x {'PASS' if ratio <= row.goal else 'FAIL'}"
        print(f"{row.name:<40} {r['wall']:5.2f} ({r['cpu']:5.2f}) {r['base_wall']:5.2f} "
              f"({r['base_cpu']:5.2f})  {ratio:4.2f}x ({ratio_cpu:4.2f})  {verdict}", flush=True)
    print("baselines: python -c \"import ...\" of " + "; ".join(
        dict.fromkeys(row.baseline[-1] for row in rows)))
    if "resnet50" in paths:
        t0 = time.perf_counter()
        digest = hashlib.sha256()
        with open(paths["resnet50"], "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        print(f"the ResNet-50 checkpoint: {paths['resnet50'].stat().st_size / 2**20:.0f} MB, "
              f"read and hashed in {time.perf_counter() - t0:.2f} s here")

    print("\nheavy modules imported (-X importtime):")
    for row in rows[:paths_rows]:
        if row.prepare is not None:
            row.prepare(-1)
        print(f"  {row.name:<38} {', '.join(runner.imports(row.command(-1))) or '-'}")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
