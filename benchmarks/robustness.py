"""Hostile inputs, kill -9, concurrent runs and big inputs, summed up in one table.

Everything runs through the real ``deepfusion`` command in subprocesses, each under a hard time
limit (a limit that expires is a hang; a signal, a traceback or an "internal error" is a crash):

* broken inputs: damaged audio of every kind in ``deepfusion.testing.damage`` (truncated headers,
  random bytes, sizes of 0xFFFFFFFF, zero or 65,535 channels, a 0 Hz rate, a valid header over
  garbage, ...) mixed with good files, through ``extract --jobs 2`` and then ``predict``; and
  features pickles and checkpoints that would run code, given to train, evaluate and predict;
* kill -9 of the whole process group at random moments of extract and of train (triggered by
  progress: a random number of cache entries or epochs, then a random delay), each followed by
  a re-run or ``--resume``, whose outputs must equal an uninterrupted run's and leave no
  temporary file;
* two extract processes at once on one cache, writing separate or the same output;
* output folders nobody can write (``/proc``, ``/sys``: root ignores chmod);
* hardening II, a section per class: outputs naming inputs, files changing while read, one run
  per model folder, bounded inputs (shared-array pickles, forged checkpoints, inputs too small
  for the backbone, a full disk), shared caches, odd names and links, BOMs and FIFOs, SIGTERM;
* peak memory of a 10-minute file against a 30-s one, and of 5,000 short files against 1,000.

Usage:
    python benchmarks/robustness.py            # full run, about 10 minutes on 2 cores
    python benchmarks/robustness.py --quick    # 520 broken files, 4 + 2 kills, 250/1,000 files
"""

from __future__ import annotations

import argparse
import csv
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deepfusion.io.run_folder import LOCK_NAME
from deepfusion.testing import (HOLD_LOCK, assert_same_features, assert_same_training,
                                check_cache_entry, cli_command as cli, damage, leftovers,
                                load_own_pickle as load, subprocess_env as env, write_odd_names)
from deepfusion.views import FEATURE_KEYS

SMALL = ("--duration", "3", "--n-mels", "32", "--tempogram-win-length", "32")
TINY = ("--duration", "1.5", "--min-duration", "0.5", "--sr", "11025", "--n-fft", "1024",
        "--hop-length", "512", "--n-mels", "16", "--n-mfcc", "13", "--tempogram-win-length", "16")
HARD_LIMIT = 900          # seconds any one command may take before it counts as a hang


@dataclass
class Tally:
    """What went wrong, summed over every run."""

    runs: int = 0
    crashes: list[str] = field(default_factory=list)
    hangs: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)         # lost or corrupt outputs

    def lose(self, what: str) -> None:
        self.lost.append(what)


TALLY = Tally()


# ----------------------------------------------------------------------------- running commands

def _judge(name: str, returncode: int, stderr: str, ok_codes=(0,)) -> bool:
    """Count a finished run; True when it ended as it should."""
    TALLY.runs += 1
    if returncode < 0 or "Traceback" in stderr or "Error: internal error" in stderr:
        TALLY.crashes.append(f"{name}: exit {returncode}: {stderr.strip()[-300:]}")
        return False
    return returncode in ok_codes


def run(name: str, *args, ok_codes=(0,), timeout: float = HARD_LIMIT):
    """Run the command; returns the CompletedProcess, or None when it hung."""
    try:
        proc = subprocess.run(cli(*args), env=env(), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        TALLY.runs += 1
        TALLY.hangs.append(name)
        return None
    if not _judge(name, proc.returncode, proc.stderr, ok_codes):
        TALLY.lose(f"{name}: exit {proc.returncode}: {proc.stderr.strip()[-300:]}")
    return proc


_MAXRSS = damage.MAXRSS_SCRIPT


def peak_mb(name: str, *args) -> tuple[float, float]:
    """Peak resident memory (MB) of the command's main process and of its largest worker."""
    try:
        proc = subprocess.run([sys.executable, "-c", _MAXRSS, *map(str, args)], env=env(),
                              capture_output=True, text=True, timeout=HARD_LIMIT)
    except subprocess.TimeoutExpired:
        TALLY.hangs.append(name)
        return float("nan"), float("nan")
    if not _judge(name, proc.returncode, proc.stderr):
        TALLY.lose(f"{name}: exit {proc.returncode}")
    found = re.search(r"MAXRSS_KB (\d+) (\d+)", proc.stderr)
    return (int(found[1]) / 1024, int(found[2]) / 1024) if found else (float("nan"),) * 2


def kill_when(name: str, cmd: list[str], progress, target: int, delay: float) -> bool:
    """:func:`damage.kill_when`; a run that ended before its kill is judged. True if killed."""
    killed, code, stderr = damage.kill_when(cmd, progress, target, delay, env=env(),
                                             timeout=HARD_LIMIT)
    if not killed:
        _judge(name, code, stderr)
    return killed


# ----------------------------------------------------------------------------- checking outputs

def check_cache(name: str, cache: Path, expected: int) -> int:
    """Count cache entries that load with six float32 views and metadata; report the rest."""
    good = 0
    for entry in cache.rglob("*.npz"):
        try:
            check_cache_entry(entry)
            good += 1
        except Exception as exc:  # noqa: BLE001 - any failure is a corrupt entry
            TALLY.lose(f"{name}: corrupt cache entry {entry.name} ({exc})")
    if good != expected:
        TALLY.lose(f"{name}: {good} valid cache entries, expected {expected}")
    return good


def same_features(name: str, out: Path, reference: Path) -> None:
    try:
        assert_same_features(out, reference)
    except (AssertionError, OSError, pickle.UnpicklingError, EOFError) as exc:
        TALLY.lose(f"{name}: features differ from an uninterrupted run ({exc!r:.200})")


def same_training(name: str, model_dir: Path, reference: Path) -> None:
    try:
        assert_same_training(model_dir, reference)
    except (AssertionError, OSError, RuntimeError) as exc:
        TALLY.lose(f"{name}: training differs from an uninterrupted run ({exc!r:.200})")


# ----------------------------------------------------------------------------- the sections

def write_dataset(root: Path, n: int, seconds: float) -> Path:
    for i in range(n):
        path = root / ("blues", "jazz", "rock", "pop")[i % 4] / f"clip{i:02d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(damage.encode(damage.clip(i, seconds=seconds), "WAV", "PCM_16"))
    return root


def extract_args(audio: Path, out: Path, cache: Path, *extra) -> list:
    return ["extract", "--audio-dir", audio, "--out", out, "--cache-dir", cache, "--jobs", "2",
            "--quiet", *SMALL, *extra]


def train_args(features: Path, model_dir: Path) -> list:
    return ["train", "--features", features, "--model-dir", model_dir, "--backbone", "light",
            "--no-pretrained", "--epochs", "4", "--batch-size", "4", "--lr", "1e-3",
            "--val-size", "0.25", "--test-size", "0.25", "--seed", "5", "--quiet"]


def broken_inputs(work: Path, n_damaged: int, n_good: int, checkpoint: Path) -> dict:
    """Damaged and good audio through extract and predict: every file accounted for."""
    root = work / "broken" / "mixed"
    root.mkdir(parents=True)
    good = damage.good_files(n_good, seed=7)
    damaged = damage.damaged_files(n_damaged, seed=7)
    for name, data in good.items():
        (root / name).write_bytes(data)
    for name, (data, _) in damaged.items():
        (root / name).write_bytes(data)
    every = {f"mixed/{name}" for name in [*good, *damaged]}
    out = work / "broken-out" / "features.pkl"
    proc = run("extract (broken inputs)", "extract", "--audio-dir", root.parent, "--out", out,
               "--cache-dir", work / "broken-cache", "--jobs", "2", "--quiet", "--duration", "2",
               "--min-duration", "0.5", "--timeout", "30")
    reported = decoded = 0
    if proc is not None and out.exists():
        items = {it["path"]: it for it in load(out)}
        with open(out.with_name("extract_errors.csv"), newline="") as fh:
            errors = {row["path"]: row["reason"] for row in csv.DictReader(fh)}
        reported, decoded = len(errors), len(set(items) - {f"mixed/{n}" for n in good})
        for path in every - set(items) - set(errors):
            TALLY.lose(f"extract: {path} neither extracted nor reported")
        for path in {f"mixed/{n}" for n in good} - set(items):
            TALLY.lose(f"extract: good file {path} not extracted ({errors.get(path)})")
        for path, reason in errors.items():
            if not reason.strip():
                TALLY.lose(f"extract: {path} reported without a reason")
        for it in items.values():
            if not all(np.isfinite(it["features"][k]).all() for k in FEATURE_KEYS):
                TALLY.lose(f"extract: {it['path']} has non-finite features")
    # predict reads the same files window by window, with seeks: another decoder path
    proc = run("predict (broken inputs)", "predict", root, "--checkpoint", checkpoint, "--json")
    predicted = 0
    if proc is not None:
        import json

        done = {Path(json.loads(ln)["path"]).name for ln in proc.stdout.splitlines() if ln.strip()}
        skipped = {Path(ln[len("skipped "):].split(": ", 1)[0]).name
                   for ln in proc.stderr.splitlines() if ln.startswith("skipped ")}
        predicted = len(done)
        for name in set(good) - done:
            TALLY.lose(f"predict: good file {name} not classified")
        for name in {*good, *damaged} - done - skipped:
            TALLY.lose(f"predict: {name} neither classified nor reported")
    return {"damaged": n_damaged, "good": n_good, "kinds": len(damage.DAMAGES),
            "reported": reported, "decoded": decoded, "predicted": predicted}




def malicious_files(work: Path, features: Path, checkpoint: Path, audio: Path, quick: bool) -> dict:
    """Pickles and checkpoints that would run code: refused with one clear line, code never run."""
    import torch

    folder = work / "malicious"
    folder.mkdir()
    marker = folder / "MARKER"
    tried = refused = 0
    payloads = [damage.RunsShell] if quick else [damage.RunsShell, damage.RunsPython]
    cases = []
    for kind in payloads:
        evil = folder / f"{kind.__name__}.pkl"
        evil.write_bytes(pickle.dumps([{"features": kind(marker), "label": "rock"},
                                       {"features": {}, "label": "jazz"}], protocol=2))
        cases += [("train", ["train", "--features", evil, "--model-dir", folder / "m",
                             "--backbone", "light", "--no-pretrained", "--epochs", "1"]),
                  ("evaluate", ["evaluate", "--checkpoint", checkpoint, "--features", evil,
                                "--split", "all", "--out-dir", folder / "report"])]
        for zipped in (True, False):
            ckpt = {"extra": kind(marker), "format_version": 1, "model_state": {},
                    "model_config": {}}
            path = folder / f"{kind.__name__}-{'zip' if zipped else 'bare'}.pth"
            resume = folder / f"resume-{kind.__name__}-{zipped}"
            resume.mkdir()
            for target in (path, resume / "last.pth"):
                if zipped:
                    torch.save(ckpt, target)
                else:
                    target.write_bytes(pickle.dumps(ckpt, protocol=2))
            cases += [("evaluate", ["evaluate", "--checkpoint", path]),
                      ("predict", ["predict", audio, "--checkpoint", path]),
                      ("train --resume", ["train", "--features", features, "--model-dir", resume,
                                          "--resume"])]
    # a features pickle naming only allowed globals whose dtype state crashes numpy (SIGSEGV
    # before the loader checked states)
    _reconstruct = np.zeros(1).__reduce__()[0]   # numpy.(_)core.multiarray._reconstruct

    class Raw:
        def __init__(self, rv):
            self.rv = rv

        def __reduce__(self):
            return self.rv

    dtype = Raw((np.dtype, ("f4", False, True), (3, "<", None, "ab", -1, 0)))
    array = Raw((_reconstruct, (np.ndarray, (0,), b"b"), (1, (3, 4), dtype, False, bytes(48))))
    crash = folder / "numpy-state.pkl"
    crash.write_bytes(pickle.dumps([{"features": {"mfcc": array}, "label": "rock"}], protocol=2))
    cases.append(("train", ["train", "--features", crash, "--model-dir", folder / "m",
                            "--backbone", "light", "--no-pretrained", "--epochs", "1"]))
    for name, args in cases:
        tried += 1
        proc = run(f"{name} (malicious file)", *args, ok_codes=(1,))
        if proc is None:
            continue
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        if len(lines) == 1 and lines[0].startswith("Error: ") and "refused" in lines[0]:
            refused += 1
        else:
            TALLY.lose(f"{name} (malicious file): not refused with one clear line: {proc.stderr[-300:]}")
    ran = marker.exists()
    if ran:
        TALLY.lose("a malicious file ran its code")
    return {"tried": tried, "refused": refused, "ran": int(ran)}


def kill_trials(work: Path, audio: Path, ref_features: Path, ref_model: Path, n_extract: int,
                n_train: int) -> dict:
    rng = random.Random(2024)
    killed = {"extract": 0, "train": 0}
    for trial in range(n_extract):
        name = f"extract kill trial {trial}"
        out, cache = work / f"kill-x{trial}" / "features.pkl", work / f"kill-xcache{trial}"
        args = extract_args(audio, out, cache)
        target = rng.randint(0, 16)
        killed["extract"] += kill_when(name, cli(*args), damage.cache_entries(cache), target,
                                       rng.uniform(0, 1.5 if target == 0 else 0.3))
        if run(f"{name}: re-run", *args) is None:
            continue
        same_features(name, out, ref_features)
        check_cache(name, cache, 16)
        for path in leftovers(out.parent, cache):
            TALLY.lose(f"{name}: temporary file left: {path}")
    for trial in range(n_train):
        name = f"train kill trial {trial}"
        model_dir = work / f"kill-t{trial}"
        args = train_args(ref_features, model_dir)
        killed["train"] += kill_when(name, cli(*args), damage.history_epochs(model_dir),
                                     rng.randint(0, 3), rng.uniform(0, 0.3))
        if (model_dir / "last.pth").exists():
            rerun = run(f"{name}: --resume", "train", "--features", ref_features, "--model-dir",
                        model_dir, "--resume", "--quiet")
        else:
            rerun = run(f"{name}: re-run", *args)
        if rerun is None:
            continue
        same_training(name, model_dir, ref_model)
        for path in leftovers(model_dir):
            TALLY.lose(f"{name}: temporary file left: {path}")
    return {"extract": n_extract, "train": n_train, "killed": killed}


def concurrent_runs(work: Path, audio: Path, ref_features: Path) -> dict:
    """Two extracts at once on one empty cache, writing separate or the same output."""
    ok = started = 0
    for mode in ("separate", "same"):
        cache = work / f"concurrent-{mode}-cache"
        outs = [work / f"concurrent-{mode}-a" / "features.pkl",
                work / f"concurrent-{mode}-{'b' if mode == 'separate' else 'a'}" / "features.pkl"]
        procs = [subprocess.Popen(cli(*extract_args(audio, out, cache)), env=env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for out in outs]
        for proc in procs:
            started += 1
            try:
                _, stderr = proc.communicate(timeout=HARD_LIMIT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                TALLY.hangs.append(f"concurrent extract ({mode})")
                continue
            if _judge(f"concurrent extract ({mode})", proc.returncode, stderr):
                ok += 1
            else:
                TALLY.lose(f"concurrent extract ({mode}): exit {proc.returncode}")
        check_cache(f"concurrent ({mode})", cache, 16)
        for out in set(outs):
            same_features(f"concurrent ({mode})", out, ref_features)
        for path in leftovers(cache, *(o.parent for o in outs)):
            TALLY.lose(f"concurrent ({mode}): temporary file left: {path}")
    return {"started": started, "ok": ok}


def unwritable_outputs(work: Path, audio: Path, features: Path, checkpoint: Path) -> dict:
    """Outputs on file systems nobody may write: one clear line, before any work."""
    cases = [("extract", extract_args(audio, Path("/proc/deepfusion/features.pkl"), work / "ro-cache")),
             ("extract", extract_args(audio, Path("/proc/self/features.pkl"), work / "ro-cache")),
             ("train", train_args(features, Path("/sys/deepfusion/model"))),
             ("evaluate", ["evaluate", "--checkpoint", checkpoint, "--out-dir",
                           "/proc/deepfusion/report"])]
    clear = 0
    for name, args in cases:
        proc = run(f"{name} (unwritable output)", *args, ok_codes=(1,))
        if proc is None:
            continue
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        if len(lines) == 1 and re.match(r"Error: .*cannot (write|create)", lines[0]):
            clear += 1
        else:
            TALLY.lose(f"{name} (unwritable output): {proc.stderr[-300:]}")
    if (work / "ro-cache").exists():
        TALLY.lose("extract did work before finding its output unwritable")
    return {"tried": len(cases), "clear": clear}




def memory(work: Path, checkpoint: Path, few: int, many: int) -> dict:
    result = {}
    for name, seconds in (("30 s", 30), ("10 min", 600)):
        wav = damage.write_long_wav(work / f"long-{seconds}" / "g" / "clip.wav", seconds)
        result[f"extract {name}"] = peak_mb(f"extract ({name} file)", "extract", "--audio-dir",
                                            wav.parent.parent, "--out", work / f"long-{seconds}.pkl",
                                            "--cache-dir", work / f"long-cache-{seconds}", "--quiet")[0]
        result[f"predict {name}"] = peak_mb(f"predict ({name} file)", "predict", wav,
                                            "--checkpoint", checkpoint)[0]
    root = work / "many"
    for i in range(many):
        path = root / f"g{i % 10}" / f"c{i:05d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(damage.encode(damage.clip(i, seconds=1.5), "WAV", "PCM_16"))
    subset = work / "few"
    for path in sorted(root.rglob("*.wav"))[:: many // few]:
        (subset / path.parent.name).mkdir(parents=True, exist_ok=True)
        os.link(path, subset / path.parent.name / path.name)
    for label, folder, count in (("few", subset, few), ("many", root, many)):
        out = work / f"{label}.pkl"
        own, workers = peak_mb(f"extract ({count} files)", "extract", "--audio-dir", folder,
                               "--out", out, "--cache-dir", work / f"{label}-cache", "--jobs", "2",
                               "--quiet", *TINY)
        result[label] = {"count": count, "main": own, "workers": workers,
                         "features": out.stat().st_size / 2**20 if out.exists() else float("nan")}
    return result



# ----------------------------------------------------------------- hardening II (issue 10)

def refused(name: str, args: list, words: str, *, keep=(), timeout: float = HARD_LIMIT,
            prefix: tuple = ()) -> bool:
    """The command must end with one ``Error:`` line holding ``words``, files in ``keep``
    unchanged. ``prefix`` runs it through ``python -c`` instead (a patched module)."""
    before = {path: path.read_bytes() for path in keep}
    cmd = [sys.executable, "-c", *prefix, *map(str, args)] if prefix else cli(*args)
    try:
        proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        TALLY.runs += 1
        TALLY.hangs.append(name)
        return False
    _judge(name, proc.returncode, proc.stderr, ok_codes=(1, 2))
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    ok = (proc.returncode in (1, 2) and len(lines) == 1 and lines[0].startswith("Error: ")
          and words in lines[0])
    if not ok:
        TALLY.lose(f"{name}: not refused in one line with {words!r}: {proc.stderr.strip()[-300:]}")
    for path, data in before.items():
        if not path.exists() or path.read_bytes() != data:
            TALLY.lose(f"{name}: {path} was changed")
            ok = False
    return ok


_LOW_DISK = """
import collections, shutil, sys
shutil.disk_usage = lambda path: collections.namedtuple("u", "total used free")(2**30, 2**30, 2**20)
from deepfusion.cli import main
main(prog_name="deepfusion")
"""


#: What a case of each class must do (the table's words).
HARD_WORDS = {
    "outputs over inputs": "outputs naming an input (audio file, link to it, manifest, own "
                           "file, features) refused in one line, inputs unchanged",
    "changed while read": "runs with 4 files swapped mid-read: each extracted or reported, every "
                          "cache entry equal to a clean run's",
    "one run per model folder": "refused in one line (used folder, live writer), run intact",
    "bounded inputs": "refused in one line before allocation or work (shared-array pickle, 8 "
                      "forged checkpoints, 0.05-s segments, full disk)",
    "shared caches": "extracts left another container's fresh temporary file alone",
    "names and links": "cases (non-UTF-8 and newline names + symlinked folder and loop, BOM "
                       "manifest, 3 FIFOs) handled in one line each",
    "signals": "SIGTERMs mid-extract: exit 130 with the Ctrl-C line, no temporary file, "
               "re-run equal",
}


def hardening(work: Path, audio: Path, ref_features: Path, ref_model: Path) -> dict:
    """One entry per class of issue 10: (cases, cases that behaved)."""
    import torch

    root = work / "hard"
    root.mkdir()
    checkpoint = ref_model / "best.pth"
    clip = sorted(audio.rglob("*.wav"))[0]
    result: dict[str, list[int]] = {}

    def tally(key: str, ok: bool) -> None:
        counts = result.setdefault(key, [0, 0])
        counts[0] += 1
        counts[1] += int(ok)

    # 1. outputs over inputs
    manifest = root / "manifest.csv"
    manifest.write_text("path,label\n" + "".join(f"{p.relative_to(audio).as_posix()},"
                                                 f"{p.parent.name}\n" for p in audio.rglob("*.wav")))
    notes = root / "notes.txt"
    notes.write_text("a user's own file\n")
    link = root / "link.pkl"
    link.symlink_to(clip)
    for target, words in ((clip, "the audio file"), (link, "the audio file"),
                          (manifest, "the --manifest"), (notes, "not a features pickle")):
        tally("outputs over inputs", refused(
            f"extract --out {target.name}", extract_args(audio, target, root / "c1", "--manifest",
                                                         manifest), words, keep=(target, manifest)))
    tally("outputs over inputs", _report_over_input(root, checkpoint, ref_features))
    # 2. what is cached is what was read: files swapped between two contents during extract
    result["changed while read"] = list(_swapping_files(root, audio))
    # 3. one run per model folder
    used = root / "used"
    shutil.copytree(ref_model, used)
    tally("one run per model folder", refused(
        "train in a used folder", train_args(ref_features, used), "--resume continues it",
        keep=(used / "best.pth", used / "last.pth")))
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(used / LOCK_NAME)],
                              env=env(), stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()
        tally("one run per model folder", refused(
            "train --resume while another writes", ["train", "--features", ref_features,
                                                    "--model-dir", used, "--resume", "--quiet"],
            "another process is writing this model folder", keep=(used / "last.pth",)))
    finally:
        holder.kill()
        holder.wait()
    # 4. bounded inputs
    bomb = root / "bomb.pkl"
    shared = {k: np.zeros((64, 1000), np.float32) for k in FEATURE_KEYS}
    bomb.write_bytes(pickle.dumps([{"features": shared, "label": ("rock", "jazz")[i % 2],
                                    "path": f"{i}.wav"} for i in range(400)], protocol=5))
    tally("bounded inputs", refused("train on a pickle of shared arrays",
                                    train_args(bomb, root / "m-bomb"), "items share arrays"))
    best = torch.load(checkpoint, weights_only=True)
    forged = {"sample_rate": ("feature_config", "sample_rate", 10**9),
              "classes": ("class_names", None, [*best["class_names"], "polka"]),
              "mel bands": ("model_config", "n_mels", 7),
              "fusion": ("model_config", "fusion_hidden", [10**9])}
    for name, (part, key, value) in forged.items():
        ckpt = {k: (dict(v) if isinstance(v, dict) else v) for k, v in best.items()}
        if key is None:
            ckpt[part] = value
        else:
            ckpt[part][key] = value
        path = root / f"forged-{name.replace(' ', '-')}.pth"
        torch.save(ckpt, path)
        for command in (["evaluate", "--checkpoint", path, "--out-dir", root / "r"],
                        ["predict", clip, "--checkpoint", path]):
            tally("bounded inputs", refused(f"{command[0]} of a checkpoint with forged {name}",
                                            command, "damaged or inconsistent checkpoint"))
    tally("bounded inputs", refused("train with 0.05-s segments", [
        *train_args(ref_features, root / "m-short"), "--segment-seconds", "0.05"], "too short"))
    tally("bounded inputs", refused("train on a full disk", train_args(ref_features, root / "m-full"),
                                    "MB free", prefix=(_LOW_DISK,)))
    # 5. shared caches: another container's fresh temporary file stays
    cache = root / "shared-cache"
    shutil.copytree(work / "ref-cache", cache)
    foreign = next(cache.glob("features-*")) / ".x.npz.4242.00000000.0123abcd.tmp"
    foreign.write_bytes(b"a live writer elsewhere")
    proc = run("extract on a shared cache", *extract_args(audio, root / "g" / "f.pkl", cache))
    tally("shared caches", proc is not None and foreign.exists())
    # 6. names and encodings, links, BOMs, FIFOs
    tally("names and links", _odd_names(root, clip, checkpoint))
    bom = root / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + manifest.read_bytes())
    proc = run("extract with a BOM manifest", *extract_args(audio, root / "bom" / "f.pkl",
                                                            work / "ref-cache", "--manifest", bom))
    tally("names and links", proc is not None and proc.returncode == 0)
    fifo = root / "pipe"
    os.mkfifo(fifo)
    for name, args in (("--features", train_args(fifo, root / "m-fifo")),
                       ("--manifest", extract_args(audio, root / "h" / "f.pkl", root / "c2",
                                                   "--manifest", fifo)),
                       ("--split-file", [*train_args(ref_features, root / "m-fifo2"),
                                         "--split-file", fifo])):
        tally("names and links", refused(f"a FIFO as {name}", args, "FIFO", timeout=120))
    # 7. SIGTERM
    tally("signals", _sigterm(root, audio, ref_features))
    return result


def _report_over_input(root: Path, checkpoint: Path, features: Path) -> bool:
    """evaluate writing its report where the features file is named like a report file."""
    folder = root / "over"
    folder.mkdir()
    victim = folder / "evaluation.json"
    shutil.copy(features, victim)
    return refused("evaluate --out-dir over its features", [
        "evaluate", "--checkpoint", checkpoint, "--features", victim, "--out-dir", folder,
        "--split", "all"], "the features file", keep=(victim,))


def _swapping_files(root: Path, audio: Path) -> tuple[int, int]:
    """Four files flip between two contents (atomic renames) while extract reads them: each
    is extracted consistently or reported; every cache entry equals a clean run's."""
    import threading

    folder = root / "swap"
    shutil.copytree(audio, folder)
    victims = sorted(folder.rglob("*.wav"))[:4]
    other = sorted(folder.rglob("*.wav"))[-1].read_bytes()
    versions = {v: (v.read_bytes(), other[:44] + bytes(reversed(other[44:]))) for v in victims}
    clean = root / "swap-clean"
    for v, (a, b) in versions.items():          # a clean cache of every version of every file
        for i, data in enumerate((a, b)):
            path = clean / v.parent.name / f"{i}-{v.name}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    for path in folder.rglob("*.wav"):
        if path not in versions:
            target = clean / path.parent.name / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
    run("extract (clean versions)", *extract_args(clean, root / "swap-clean.pkl", root / "swap-ref"))
    stop = threading.Event()

    def flip():
        n = 0
        while not stop.is_set():
            for v, pair in versions.items():
                tmp = v.with_name(".swap.tmp")
                tmp.write_bytes(pair[n % 2])
                os.replace(tmp, v)
            n += 1
            time.sleep(0.01)

    flipper = threading.Thread(target=flip)
    flipper.start()
    try:
        proc = run("extract while files change", *extract_args(folder, root / "swap.pkl",
                                                               root / "swap-cache"))
    finally:
        stop.set()
        flipper.join()
    ok = proc is not None
    reference = {e.name: e for e in (root / "swap-ref").rglob("*.npz")}
    for entry in (root / "swap-cache").rglob("*.npz"):
        ref = reference.get(entry.name)
        if ref is None:
            TALLY.lose(f"changed while read: cache entry {entry.name} is of no version of any file")
            ok = False
            continue
        with np.load(entry) as got, np.load(ref) as want:
            if any(not np.array_equal(got[k], want[k]) for k in FEATURE_KEYS):
                TALLY.lose(f"changed while read: cache entry {entry.name} holds other features")
                ok = False
    if proc is not None:
        items = {it["path"] for it in load(root / "swap.pkl")} if (root / "swap.pkl").exists() else set()
        for v in victims:
            rel = v.relative_to(folder).as_posix()
            if rel not in items and f"skipped {rel}:" not in proc.stderr:
                TALLY.lose(f"changed while read: {rel} neither extracted nor reported")
                ok = False
        print(f"  4 files swapped while read: {len(set(items) & {v.relative_to(folder).as_posix() for v in victims})}"
              f" extracted, {proc.stderr.count('changed while it was read')} reported changed")
    return 1, int(ok)


def _odd_names(root: Path, clip: Path, checkpoint: Path) -> bool:
    """Names that are not UTF-8 or hold newlines, a symlinked genre folder and a link loop,
    through extract and predict on a strict UTF-8 terminal."""
    folder = root / "odd"
    write_odd_names(folder, clip)
    (folder / "linked").symlink_to(clip.parent, target_is_directory=True)
    (folder / "rock" / "loop").symlink_to("..", target_is_directory=True)
    strict = {**env(), "PYTHONIOENCODING": "utf-8"}
    ok = True
    for args in (extract_args(folder, root / "odd-f" / "features.pkl", root / "odd-cache"),
                 ["predict", folder, "--checkpoint", checkpoint],
                 ["predict", folder, "--checkpoint", checkpoint, "--json"]):
        proc = subprocess.run(cli(*args), env=strict, capture_output=True, text=True,
                              timeout=HARD_LIMIT)
        if not _judge(f"{args[0]} of odd names", proc.returncode, proc.stderr):
            TALLY.lose(f"{args[0]} of odd names: exit {proc.returncode}: {proc.stderr[-300:]}")
            ok = False
        elif "broken\\xfe.wav" not in proc.stderr:
            TALLY.lose(f"{args[0]} of odd names: the broken file was not reported: {proc.stderr[-300:]}")
            ok = False
    report = root / "odd-f" / "extract_errors.csv"
    try:
        report.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        TALLY.lose(f"extract of odd names: error report not UTF-8 ({exc})")
        ok = False
    items = load(root / "odd-f" / "features.pkl") if (root / "odd-f" / "features.pkl").exists() else []
    n_linked = len(list(clip.parent.glob("*.wav")))
    if len(items) != 2 + n_linked:
        TALLY.lose(f"extract of odd names: {len(items)} clips, expected {2 + n_linked} "
                   "(2 odd names and the symlinked folder, once)")
        ok = False
    return ok


def _sigterm(root: Path, audio: Path, ref_features: Path) -> bool:
    """SIGTERM mid-extract: exit 130 with the Ctrl-C line, no temporary file, the re-run equal."""
    import signal

    out, cache = root / "term" / "features.pkl", root / "term-cache"
    proc = subprocess.Popen(cli(*extract_args(audio, out, cache)), env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not any(cache.rglob("*.npz")):
        time.sleep(0.05)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        TALLY.hangs.append("extract after SIGTERM")
        return False
    ok = proc.returncode in (0, 130) and "Traceback" not in stderr
    if proc.returncode == 130 and not stderr.strip().endswith("run the same command again to continue."):
        ok = False
    TALLY.runs += 1
    for path in leftovers(cache, out.parent):
        TALLY.lose(f"SIGTERM: temporary file left: {path}")
        ok = False
    if run("extract after SIGTERM: re-run", *extract_args(audio, out, cache)) is not None:
        same_features("SIGTERM re-run", out, ref_features)
    if not ok:
        TALLY.lose(f"SIGTERM: exit {proc.returncode}: {stderr[-300:]}")
    return ok


# ----------------------------------------------------------------------------- the table

def table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    rule = "-" * (width + 2 + max(len(v) for _, v in rows))
    return "\n".join([rule, *(f"{k:<{width}}  {v}" for k, v in rows), rule])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run (about 3 minutes)")
    parser.add_argument("--damaged", type=int, help="damaged audio files (default 1,000; quick 520)")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    args = parser.parse_args()
    n_damaged = args.damaged or (520 if args.quick else 1000)
    n_good = 40 if args.quick else 100
    kills = (4, 2) if args.quick else (10, 5)
    few, many = (250, 1000) if args.quick else (1000, 5000)

    work = args.keep or Path(tempfile.mkdtemp(prefix="df-robust-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        audio = write_dataset(work / "audio", 16, 3.0)
        ref_features = work / "ref" / "features.pkl"
        ref_model = work / "ref-model"
        if run("extract (reference)", *extract_args(audio, ref_features, work / "ref-cache")) is None \
                or run("train (reference)", *train_args(ref_features, ref_model)) is None:
            sys.exit("the reference runs failed: " + "; ".join(TALLY.crashes + TALLY.lost))
        checkpoint = ref_model / "best.pth"
        print("broken inputs ...", flush=True)
        broken = broken_inputs(work, n_damaged, n_good, checkpoint)
        print("malicious files ...", flush=True)
        evil = malicious_files(work, ref_features, checkpoint, audio / "rock" / "clip02.wav", args.quick)
        print("kill trials ...", flush=True)
        killing = kill_trials(work, audio, ref_features, ref_model, *kills)
        print("concurrent runs ...", flush=True)
        together = concurrent_runs(work, audio, ref_features)
        print("unwritable outputs ...", flush=True)
        unwritable = unwritable_outputs(work, audio, ref_features, checkpoint)
        print("hardening II ...", flush=True)
        hard = hardening(work, audio, ref_features, ref_model)
        print("memory ...", flush=True)
        mem = memory(work, checkpoint, few, many)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    f, m = mem["few"], mem["many"]
    rows = [
        ("broken audio inputs tried", f"{broken['damaged'] + broken['good']:,} "
         f"({broken['damaged']:,} damaged of {broken['kinds']} kinds, {broken['good']} good)"),
        ("  extract: reported / decoded", f"{broken['reported']} reported with a reason, "
         f"{broken['decoded']} damaged ones still decoded, every good file extracted"
         if not [x for x in TALLY.lost if x.startswith("extract:")] else "see lost outputs"),
        ("  predict: classified", f"{broken['predicted']} files, the rest reported"),
        ("malicious pickles/checkpoints", f"{evil['tried']} given to train, evaluate, predict, "
         f"--resume: {evil['refused']} refused in one line, code ran {evil['ran']} times"),
        ("crashes", f"{len(TALLY.crashes)} in {TALLY.runs} runs"),
        ("hangs", f"{len(TALLY.hangs)} (limits: 30 s per file, {HARD_LIMIT} s per command)"),
        ("kill trials (extract / train)", f"{killing['extract']} / {killing['train']} "
         f"(killed mid-run {killing['killed']['extract']} / {killing['killed']['train']}), "
         "each re-run or --resume compared with an uninterrupted run"),
        ("lost or corrupt outputs", f"{len(TALLY.lost)} (features, errors CSV, cache entries, "
         "history, best.pth weights, leftover temporary files)"),
        ("concurrent runs", f"{together['ok']} of {together['started']} extracts succeeded "
         "(2 at once on one cache, separate and same output)"),
        ("unwritable outputs", f"{unwritable['clear']} of {unwritable['tried']} refused in one "
         "line before any work"),
        *((f"{key}", f"{ok} of {n} {HARD_WORDS[key]}") for key, (n, ok) in hard.items()),
        ("peak memory, 10-min vs 30-s file", f"extract {mem['extract 10 min']:.0f} vs "
         f"{mem['extract 30 s']:.0f} MB; predict {mem['predict 10 min']:.0f} vs "
         f"{mem['predict 30 s']:.0f} MB (predict classifies one window at a time)"),
        (f"peak memory, {m['count']:,} vs {f['count']:,} files",
         f"main {m['main']:.0f} vs {f['main']:.0f} MB (+{m['main'] - f['main']:.0f} MB for "
         f"+{m['features'] - f['features']:.0f} MB of features); workers {m['workers']:.0f} vs "
         f"{f['workers']:.0f} MB"),
        ("wall time", f"{time.perf_counter() - t0:.0f} s"),
    ]
    print(table(rows))
    for title, items in (("crash", TALLY.crashes), ("hang", TALLY.hangs), ("lost", TALLY.lost)):
        for item in items[:15]:
            print(f"{title}: {item}")
        if len(items) > 15:
            print(f"{title}: ... and {len(items) - 15} more")
    sys.exit(1 if TALLY.crashes or TALLY.hangs or TALLY.lost else 0)


if __name__ == "__main__":
    main()
