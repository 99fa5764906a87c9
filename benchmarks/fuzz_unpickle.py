"""Fuzz the restricted unpickler: every file under 1 MB loads or is refused within the bound.

A round, time-boxed and seeded, feeds ``safe_pickle_load`` three kinds of files:

* random opcode streams: opcodes from pickle's own table (``pickletools.opcodes``) with plausible
  arguments (small memo indices, allowed and forbidden globals, lengths near their limits),
  and short random blocks repeated up to thousands of times, which is how a few bytes build
  deep, shared or hash-colliding structures;
* programs that build objects out of earlier ones through the memo (chains that share
  themselves, colliding keys) and hand the last one to a call, a dict key or a set;
* mutations of real features files written by the package (``write_features_file``, and every
  pickle protocol): byte flips, insertions, splices, truncations, repeated chunks and extra memo
  gets, DUPs and MEMOIZEs.

Cases run in batches in a child process with a watchdog, so a hang or a blowup is measured, not
suffered: each case's time, and its peak resident memory (VmHWM, reset before each case), are
reported; a case that passes ``--max-seconds`` (2 s) or ``--max-mb`` (300 MB), that kills the
child, or that raises anything but ``FeaturesFileError`` is a finding (a case over the time
bound only is measured again alone first: the machine may have been busy). Findings are written to
``--save`` (default ``tests/data/unpickle/``), xz-compressed and named by seed and case, and
``tests/test_unpickle.py`` loads every file there and asserts the bound. Case ``i`` of seed
``s`` is the same bytes on every run (``--replay s:i`` writes it out).

Usage:
    python benchmarks/fuzz_unpickle.py                      # 120 s, seed 0
    python benchmarks/fuzz_unpickle.py --seconds 600 --seed 7
    python benchmarks/fuzz_unpickle.py --replay 0:1234 --out case.pkl
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import pickle
import pickletools
import random
import select
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))       # this checkout's deepfusion, installed or not
FIXTURES = REPO / "tests" / "data" / "unpickle"
MAX_FILE = (1 << 20) - 1
#: What a watchdog allows a case before killing the child: a hang, counted over the bound.
WATCHDOG_S = 20.0
#: Memory a child may take (RLIMIT_DATA): a blowup raises MemoryError instead of swapping.
CHILD_DATA_LIMIT = 3 << 30

GLOBALS = [
    ("builtins", n) for n in ("str", "list", "tuple", "set", "frozenset", "dict", "int", "float",
                              "complex", "bool", "slice", "bytes", "bytearray", "range", "getattr")
] + [("__builtin__", "str"), ("__builtin__", "set"), ("__builtin__", "unicode"),
     ("collections", "OrderedDict"), ("_codecs", "encode"), ("numpy", "dtype"),
     ("numpy", "ndarray"), ("numpy.core.multiarray", "_reconstruct"),
     ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
     ("numpy._core.numeric", "_frombuffer"), ("numpy.dtypes", "Float32DType"),
     ("os", "system"), ("posix", "system"), ("copyreg", "_reconstructor")]
OPCODES = [op for op in pickletools.opcodes if op.name not in ("PERSID", "BINPERSID")]


# ------------------------------------------------------------------------------ generators

def _text(rng: random.Random) -> bytes:
    return rng.choice([b"", b"a", b"f4", b"<f4", b"latin1", b"utf-8", b"x" * rng.randrange(300),
                       b"9" * rng.randrange(6000), "é".encode(), b"\xff\xfe"])


def _arg(rng: random.Random, op: pickletools.OpcodeInfo) -> bytes:
    """A plausible argument for ``op``: mostly small and valid, sometimes at the limits."""
    name = op.arg.name if op.arg is not None else None
    if name is None:
        return b""
    small = rng.random() < 0.8
    if name == "uint1":
        return bytes([rng.randrange(12) if small else rng.randrange(256)])
    if name == "uint2":
        return struct.pack("<H", rng.randrange(12) if small else rng.randrange(1 << 16))
    if name in ("int4", "uint4"):
        n = rng.randrange(12) if small else rng.choice([rng.randrange(1 << 31), (1 << 31) - 1])
        return struct.pack("<i" if name == "int4" else "<I", n)
    if name == "uint8":
        return struct.pack("<Q", rng.randrange(64) if small else rng.randrange(1 << 64))
    if name == "long1":
        body = rng.randbytes(rng.randrange(10 if small else 256))
        return bytes([len(body)]) + body
    if name == "long4":
        body = rng.randbytes(rng.randrange(10 if small else 4000))
        return struct.pack("<i", len(body)) + body
    if name in ("string1", "bytes1", "unicodestring1"):
        body = _text(rng)[:255]
        return bytes([len(body)]) + body
    if name in ("string4", "bytes4", "unicodestring4"):
        body = _text(rng)
        return struct.pack("<i" if name == "string4" else "<I", len(body)) + body
    if name in ("bytes8", "unicodestring8", "bytearray8"):
        body = _text(rng)
        n = len(body) if small else rng.choice([len(body) + 1, 1 << 40])
        return struct.pack("<Q", n) + body
    if name in ("decimalnl_short", "decimalnl_long"):
        digits = rng.choice([b"0", b"1", b"00", b"01", b"-3", str(rng.randrange(12)).encode(),
                             b"9" * rng.randrange(1, 5000), b"0x" + b"f" * rng.randrange(1, 9000)])
        return digits + (b"L" if name == "decimalnl_long" and rng.random() < 0.5 else b"") + b"\n"
    if name == "floatnl":
        return rng.choice([b"1.5", b"nan", b"-inf", b"1e309", b"x"]) + b"\n"
    if name == "float8":
        return struct.pack(">d", rng.choice([0.0, 1.5, float(1 << 61), -1.0, float("nan")]))
    if name == "stringnl":
        return b"'" + _text(rng)[:40].replace(b"\n", b"") + b"'\n"
    if name in ("stringnl_noescape", "unicodestringnl"):
        return _text(rng)[:40].replace(b"\n", b"") + b"\n"
    if name == "stringnl_noescape_pair":
        module, attr = rng.choice(GLOBALS)
        return f"{module}\n{attr}\n".encode()
    return rng.randbytes(rng.randrange(9))


def _opcode(rng: random.Random) -> bytes:
    op = rng.choice(OPCODES)
    if op.name in ("BINGET", "LONG_BINGET", "GET") or rng.random() < 0.1:
        op = rng.choice([o for o in OPCODES if o.name in ("BINGET", "MEMOIZE", "BINPUT", "DUP",
                                                          "MARK", "TUPLE2", "APPENDS", "SETITEMS",
                                                          "EMPTY_LIST", "EMPTY_DICT", "REDUCE")])
    return op.code.encode("latin-1") + _arg(rng, op)


def random_stream(rng: random.Random) -> bytes:
    """PROTO, a random opcode stream (some of it a block repeated many times), STOP."""
    out = bytearray(b"\x80" + bytes([rng.randrange(6)]))
    for _ in range(rng.randrange(1, 4)):
        block = b"".join(_opcode(rng) for _ in range(rng.randrange(1, 12)))
        repeat = 1 if rng.random() < 0.5 else rng.choice([2, 30, 1000, 100_000])
        repeat = max(1, min(repeat, (MAX_FILE - len(out) - 1) // max(1, len(block))))
        out += block * repeat
    out += b"."
    return bytes(out[:MAX_FILE])


P61 = (1 << 61) - 1      # ints k * P61 all hash alike


def _leaf(rng: random.Random) -> bytes:
    choice = rng.randrange(7)
    if choice == 0:
        return b"K" + bytes([rng.randrange(256)])
    if choice == 1:
        value = rng.randrange(1, 1 << 20) * P61
        body = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
        return b"\x8a" + bytes([len(body)]) + body
    if choice == 2:
        body = _text(rng)[:200]
        return b"\x8c" + bytes([len(body)]) + body
    if choice == 3:
        return b"N"
    if choice == 4:
        return b"G" + struct.pack(">d", rng.choice([1.0, float(1 << 61), -2.0]))
    if choice == 5:
        body = rng.randbytes(rng.randrange(40))
        return b"C" + bytes([len(body)]) + body
    return b")"


def _get(index: int) -> bytes:
    return b"h" + bytes([index]) if index < 256 else b"j" + struct.pack("<I", index)


def structure(rng: random.Random) -> bytes:
    """A program that builds objects from earlier ones through the memo (most often the one just
    built: chains that share themselves), then hands the last one to a call, a key or a set.
    One theme per program: hashable chains (tuples, frozensets), mutable ones (lists, dicts),
    calls of one global, or a flood of colliding keys into one dict or set."""
    out = bytearray(b"\x80\x04")
    memo = 0
    theme = rng.choice(["hashable", "mutable", "calls", "flood"])
    steps = rng.choice([rng.randrange(1, 40), rng.randrange(40, 80), rng.randrange(1000, 40_000)])
    recent = rng.random() < 0.8
    func = rng.choice(GLOBALS[:12])

    def ref() -> bytes:
        if memo and rng.random() < 0.9:
            back = 1 if recent and rng.random() < 0.9 else rng.randrange(1, min(memo, 8) + 1)
            return _get(memo - back)
        return _leaf(rng)

    def global_(name: tuple[str, str]) -> bytes:
        module, attr = name
        return (b"\x8c" + bytes([len(module)]) + module.encode() + b"\x8c" + bytes([len(attr)])
                + attr.encode() + b"\x93")

    if theme == "flood":
        out += rng.choice([b"}(", b"\x8f("])
        leaf = rng.choice([b"\x8a", b"G"])
        for k in range(1, steps * 10):
            if len(out) > MAX_FILE - 40:
                break
            if leaf == b"\x8a":
                value = k * P61
                body = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
                out += b"\x8a" + bytes([len(body)]) + body
            else:
                out += b"G" + struct.pack(">d", float(k << 61))
            if out[2:3] == b"}":
                out += b"N"
        out += b"u." if out[2:3] == b"}" else b"\x90."
        return bytes(out[:MAX_FILE])
    if theme == "calls":
        out += global_(func) + b"\x94"
        memo += 1
    for _ in range(steps):
        if len(out) > MAX_FILE - 400:
            break
        k = rng.randrange(1, 4)
        if theme == "hashable":
            kind = rng.randrange(3)
            refs = b"".join(ref() for _ in range(k))
            body = (b"(" + refs + b"t", refs + b"\x85\x86\x87"[k - 1:k], b"(" + refs + b"\x91")[kind]
        elif theme == "mutable":
            kind = rng.randrange(3)
            if kind == 0:
                body = b"(" + b"".join(ref() for _ in range(k)) + b"l"
            elif kind == 1:
                body = b"}(" + b"".join(_leaf(rng) + ref() for _ in range(k)) + b"u"
            else:
                body = b"]" + b"".join(ref() + b"a" for _ in range(k))
        else:
            body = _get(0) + b"(" + b"".join(ref() for _ in range(k)) + b"tR"
        out += body + b"\x94"
        memo += 1
        out += b"0"
    last = _get(max(memo - 1, 0)) if memo else b"N"
    end = rng.randrange(5)
    if end == 0:
        out += global_(rng.choice(GLOBALS[:12])) + last + b"\x85R"
    elif end == 1:
        out += b"}" + last + b"Ns"
    elif end == 2:
        out += b"\x8f(" + last + b"\x90"
    elif end == 3:
        out += b"]" + last + b"a"
    else:
        out += last
    out += b"."
    return bytes(out[:MAX_FILE])


def features_seeds() -> list[bytes]:
    """Real features files: what ``write_features_file`` writes, and the same in every protocol."""
    import numpy as np

    from deepfusion.config import FeatureConfig
    from deepfusion.io.features_file import write_features_file
    from deepfusion.views import FEATURE_KEYS

    rng = np.random.default_rng(0)
    config = FeatureConfig(duration=2.0, pretrained_view=None).to_dict()   # the six views
    items = [{"features": {k: rng.random((6, 9), np.float32) for k in FEATURE_KEYS},
              "label": ("rock", "jazz")[i % 2], "path": f"{('rock', 'jazz')[i % 2]}/{i}.wav",
              "duplicate_group": i, "group": None, "audio_sha": f"{i:064x}", "file_sha": "ab" * 32,
              "source_sr": 22050, "channels": 1, "source_seconds": 2.0, "feature_config": config}
             for i in range(4)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "features.pkl"
        write_features_file(path, items)
        seeds = [path.read_bytes()]
    seeds += [pickle.dumps(items, protocol=p) for p in range(pickle.HIGHEST_PROTOCOL)]
    return seeds


def mutate(rng: random.Random, seeds: list[bytes]) -> bytes:
    """A real features file, mutated 1-6 times."""
    data = bytearray(rng.choice(seeds))
    for _ in range(rng.randrange(1, 7)):
        if len(data) < 4:
            break
        pos = rng.randrange(2, len(data))
        kind = rng.randrange(8)
        if kind == 0:                                  # flip bytes
            for _ in range(rng.randrange(1, 8)):
                data[rng.randrange(2, len(data))] = rng.randrange(256)
        elif kind == 1:                                # truncate
            del data[pos:]
        elif kind == 2:                                # insert an opcode
            data[pos:pos] = _opcode(rng)
        elif kind == 3:                                # splice from another seed
            other = rng.choice(seeds)
            start = rng.randrange(len(other))
            data[pos:pos] = other[start:start + rng.randrange(1, 400)]
        elif kind == 4:                                # repeat a chunk
            chunk = bytes(data[pos:pos + rng.randrange(1, 40)])
            times = rng.choice([2, 10, 1000, 20_000])
            data[pos:pos] = chunk * max(1, min(times, (MAX_FILE - len(data)) // max(1, len(chunk))))
        elif kind == 5:                                # more memo traffic
            data[pos:pos] = rng.choice([b"h\x00", b"h\x01", b"h\x05", b"\x94", b"2", b"0"])
        elif kind == 6:                                # delete a chunk
            del data[pos:pos + rng.randrange(1, 64)]
        else:                                          # overwrite a length field with a large one
            data[pos:pos + 4] = struct.pack("<I", rng.choice([1 << 20, 1 << 31, 0xFFFFFFFF]))
    return bytes(data[:MAX_FILE])


def make_case(seed: int, index: int, seeds: list[bytes]) -> tuple[str, bytes]:
    """Case ``index`` of ``seed``: the same bytes on every run."""
    rng = random.Random(f"{seed}:{index}")
    roll = rng.random()
    if roll < 0.3:
        return "stream", random_stream(rng)
    if roll < 0.65:
        return "structure", structure(rng)
    return "mutant", mutate(rng, seeds)


# ------------------------------------------------------------------------------- the child

CHILD = r"""
import os, resource, sys, time, traceback
resource.setrlimit(resource.RLIMIT_DATA, ({limit}, {limit}))
from deepfusion.errors import FeaturesFileError
from deepfusion.io.features_file import load_feature_set
from deepfusion.io.unpickle import safe_pickle_load

load = load_feature_set if {validate} else safe_pickle_load

def peak_kb():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass

for line in sys.stdin:
    path = line.strip()
    reset_peak()
    print("start", path, flush=True)
    t = time.perf_counter()
    try:
        load(path)
        outcome = "loaded"
    except FeaturesFileError as exc:
        outcome = "refused"
        if "\n" in str(exc):
            outcome = "crashed:multi-line message"
    except BaseException as exc:
        outcome = "crashed:" + "".join(traceback.format_exception_only(type(exc), exc))[-300:]
    seconds = time.perf_counter() - t
    print("done", repr((outcome, seconds, peak_kb())), flush=True)
"""


def run_batch(paths: list[Path], *, validate: bool) -> list[tuple[str, float, float]]:
    """(outcome, seconds, peak MB) of each path, in one child; a case that kills the child or
    outlives the watchdog is recorded as such and the rest go to a fresh child."""
    results: list[tuple[str, float, float]] = []
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    code = CHILD.format(limit=CHILD_DATA_LIMIT, validate=validate)
    while len(results) < len(paths):
        todo = paths[len(results):]
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env, cwd=REPO)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("".join(f"{p}\n" for p in todo))
        proc.stdin.close()
        started = None
        while len(results) < len(paths):
            ready, _, _ = select.select([proc.stdout], [], [], WATCHDOG_S)
            if not ready:
                proc.kill()
                proc.wait()
                results.append(("over:hang", WATCHDOG_S, 0.0))
                break
            line = proc.stdout.readline()
            if not line:                           # the child died in the middle of a case
                rc = proc.wait()
                if started is not None:
                    results.append((f"crashed:child exit {rc}", 0.0, 0.0))
                break
            if line.startswith("start"):
                started = time.perf_counter()
            elif line.startswith("done"):
                outcome, seconds, kb = eval(line[5:])   # noqa: S307 - our own child's repr
                results.append((outcome, seconds, kb / 1024))
                started = None
        else:
            proc.wait()
    return results


# ------------------------------------------------------------------------------ the round

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="length of the round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=40, help="cases per child process")
    parser.add_argument("--max-seconds", type=float, default=2.0)
    parser.add_argument("--max-mb", type=float, default=300.0)
    parser.add_argument("--validate", action="store_true",
                        help="run load_feature_set (the loader and the validation after it)")
    parser.add_argument("--save", type=Path, default=FIXTURES, help="where findings go")
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--replay", help="SEED:INDEX: write that case to --out and stop")
    parser.add_argument("--out", type=Path, default=Path("case.pkl"))
    args = parser.parse_args(argv)

    seeds = features_seeds()
    if args.replay:
        seed, index = map(int, args.replay.split(":"))
        kind, data = make_case(seed, index, seeds)
        args.out.write_bytes(data)
        print(f"{args.out}: {kind} case {seed}:{index}, {len(data)} bytes")
        return 0

    counts = {"tried": 0, "loaded": 0, "refused": 0, "crashed": 0, "over": 0}
    worst_s, worst_mb, worst_case = 0.0, 0.0, ""
    findings: list[dict] = []
    deadline = time.monotonic() + args.seconds
    index = 0
    with tempfile.TemporaryDirectory(prefix="fuzz-unpickle-") as tmp:
        while time.monotonic() < deadline:
            batch = []
            for _ in range(args.batch):
                kind, data = make_case(args.seed, index, seeds)
                path = Path(tmp) / f"{args.seed}-{index}-{kind}.pkl"
                path.write_bytes(data)
                batch.append((index, kind, path))
                index += 1
            results = run_batch([p for _, _, p in batch], validate=args.validate)
            for j, (outcome, seconds, mb) in enumerate(results):
                if seconds > args.max_seconds and not outcome.startswith(("over", "crashed")):
                    # slow only: measured again alone, the shared machine may have been busy
                    again = run_batch([batch[j][2]], validate=args.validate)[0]
                    results[j] = min(results[j], again, key=lambda r: r[1])
            for (i, kind, path), (outcome, seconds, mb) in zip(batch, results):
                counts["tried"] += 1
                over = outcome.startswith("over") or seconds > args.max_seconds \
                    or mb > args.max_mb
                counts["over" if over else outcome.split(":")[0]] += 1
                if seconds > worst_s:
                    worst_s, worst_case = seconds, f"{args.seed}:{i}"
                worst_mb = max(worst_mb, mb)
                if over or outcome.startswith("crashed"):
                    findings.append({"case": f"{args.seed}:{i}", "kind": kind, "outcome": outcome,
                                     "seconds": round(seconds, 3), "peak_mb": round(mb, 1),
                                     "bytes": path.stat().st_size})
                    if not args.no_save:
                        args.save.mkdir(parents=True, exist_ok=True)
                        (args.save / f"seed{args.seed}-case{i}-{kind}.pkl.xz").write_bytes(
                            lzma.compress(path.read_bytes(), preset=9))
                path.unlink()

    print(f"fuzz round: seed {args.seed}, {args.seconds:.0f} s, bound {args.max_seconds:g} s "
          f"and {args.max_mb:g} MB per file")
    print(f"{'tried':>7} {'refused':>8} {'loaded':>7} {'crashed':>8} {'worst s':>8} "
          f"{'worst MB':>9} {'over bound':>11}")
    print(f"{counts['tried']:7d} {counts['refused']:8d} {counts['loaded']:7d} "
          f"{counts['crashed']:8d} {worst_s:8.2f} {worst_mb:9.0f} {counts['over']:11d}")
    print(f"slowest case: {worst_case} (replay with --replay {worst_case})")
    for finding in findings:
        print("finding:", json.dumps(finding))
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
