"""Mutation testing of the modules whose correctness is a promise (issue 23).

For each target below, mutmut (3.x) mutates that one module (every comparison, constant,
operator, argument and string of every function, one change at a time) and runs the target's
fast tests against each mutant; a mutant no test notices is a survivor. The script prints a
table (module, mutants, killed, survived, timeout, equivalent, score) and each survivor
(file:line, the original line and the mutant). ``EQUIVALENT`` below lists the survivors that
behave exactly as the code does, each with its reason; they count neither for nor against
the score: score = (killed + timeout) / (mutants - equivalent). Not run by CI, not collected
by pytest.

Each target runs in a temporary copy of ``deepfusion/`` and ``tests/`` with mutmut's
configuration written there (the repository's setup.cfg keeps no ``[mutmut]`` section), so the
checkout is never touched. mutmut attributes tests to functions by tracing the calls a test
makes in its own process: a test that only exercises the module in a child process (the
unpickler's time and memory bounds, measured in a process of their own) is never run against
a mutant, and is deselected here since its wall-clock bounds do not hold under mutmut's
trampolines anyway.

Usage (from a checkout; needs ``pip install 'mutmut>=3.8,<4'``, which the script names in one
line when it is missing):

    python benchmarks/mutation.py                    # every target
    python benchmarks/mutation.py --module unpickle  # one (repeatable)
    python benchmarks/mutation.py --jobs 1 --keep    # one worker; keep the work folders

Targets: unpickle, pickle_meter, guard, metrics, ddp (shard, unshard and the rank/world size
they read), meta (the checkpoint checks). Splits and the feature cache's entry validation are
not targets yet (being reorganised).

Took here (2 shared cores, ``--jobs 2``): see the table printed at the end of a run; the whole
set ran in about 10 minutes.
"""

from __future__ import annotations

import argparse
import ast
import configparser
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Target:
    path: str                       # the module mutated, relative to the checkout
    tests: tuple[str, ...]          # the test files or ids run against its mutants
    deselect: tuple[str, ...] = ()  # test ids left out (see the docstring)
    functions: tuple[str, ...] = () # only these functions' mutants (all when empty)
    isolation: str = "fork"         # mutmut's process_isolation ("forkserver" after torch)


TARGETS = {
    "unpickle": Target("deepfusion/io/unpickle.py", ("tests/test_unpickle.py",), deselect=(
        "tests/test_unpickle.py::test_costly_pickles_are_refused_within_the_bound",
        "tests/test_unpickle.py::test_fuzz_findings_stay_within_the_bound")),
    "pickle_meter": Target("deepfusion/io/pickle_meter.py", ("tests/test_unpickle.py",), deselect=(
        "tests/test_unpickle.py::test_costly_pickles_are_refused_within_the_bound",
        "tests/test_unpickle.py::test_fuzz_findings_stay_within_the_bound")),
    # the rule's own tests: those through the commands (test_output_rule, test_guards,
    # test_hardening) train a model per session, far too slow to run once per mutant
    "guard": Target("deepfusion/io/guard.py", tuple(
        f"tests/test_output_rule.py::test_{t}" for t in (
            "an_input_is_found_however_the_output_spells_it",
            "each_kind_recognises_its_own_files_only", "the_sniffers_read_only_so_much",
            "destinations_of_another_kind_need_overwrite", "destinations_that_are_folders_or_inputs",
            "inputs_that_are_not_regular_files_are_named", "free_space_counts_what_is_replaced",
            "the_sniffer_factories_on_files_of_each_kind",
            "each_destination_is_checked_after_one_that_may_be_replaced",
            "an_input_not_yet_there_and_one_file_under_two_names",
            "a_block_device_is_named_a_device"))),
    "metrics": Target("deepfusion/metrics.py", tuple(
        f"tests/test_evaluate.py::test_{t}" for t in (
            "confusion_matrix_counts_true_by_predicted", "per_class_scores_by_hand",
            "per_class_scores_are_exactly_zero_where_undefined",
            "summary_metrics_by_hand", "summary_metrics_perfect_and_all_wrong",
            "bootstrap_interval_contains_estimate_narrows_and_is_seeded",
            "softmax_and_log_loss_by_hand", "summary_metrics_of_no_clips_and_of_single_clip_classes",
            "wilson_interval_by_hand_and_at_its_edges",
            "accuracy_interval_by_hand_with_and_without_groups"))
        + ("tests/test_metadata.py::test_intervals_are_honest_for_few_clips_and_groups",)),
    "ddp": Target("deepfusion/runtime/ddp.py", ("tests/test_ddp.py",),
                  functions=("shard", "unshard", "rank", "world_size"), isolation="forkserver"),
    "meta": Target("deepfusion/models/meta.py", ("tests/test_model_metadata.py",),
                   isolation="fork"),
}

#: Survivors that behave exactly as the code does: (target, function, original line, mutant
#: line) -> why. Lines are compared stripped of surrounding blanks.
EQUIVALENT: dict[tuple[str, str, str, str], str] = {}

STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "untested", 33: "untested",
          36: "timeout", -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout",
          -11: "killed", -9: "killed", None: "not run"}   # a segfault or a kill is a kill


def _mutmut_ok() -> bool:
    try:
        import mutmut
    except ImportError:
        return False
    major = int(re.match(r"\d+", getattr(mutmut, "__version__", "0")).group())
    return major == 3


def _pytest_section() -> str:
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(REPO / "setup.cfg")
    lines = ["[tool:pytest]"]
    if cfg.has_section("tool:pytest"):
        for key, value in cfg.items("tool:pytest"):
            if key != "addopts":
                lines.append(f"{key} = " + value.replace("\n", "\n    "))
    return "\n".join(lines) + "\n"


def _listing(values) -> str:
    return "".join(f"\n    {v}" for v in values)


def _prepare(name: str, target: Target, work: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "deepfusion", work / "deepfusion", ignore=ignore)
    shutil.copytree(REPO / "tests", work / "tests", ignore=ignore)
    args = ["-m", "not slow", "-p", "no:cacheprovider", "-p", "no:randomly"]
    for test in target.deselect:
        args += ["--deselect", test]
    (work / "setup.cfg").write_text(
        _pytest_section() + "\n[mutmut]\nsource_paths = deepfusion\n"
        f"only_mutate = {target.path}\n"
        f"pytest_add_cli_args ={_listing(args)}\n"
        f"pytest_add_cli_args_test_selection ={_listing(target.tests)}\n"
        f"process_isolation = {target.isolation}\n"
        "use_git_change_detection = false\n")


_REPORT = r"""
import json, sys
from pathlib import Path
from mutmut.mutation.diff_apply import get_diff_for_mutant
path = sys.argv[1]
codes = json.loads(Path("mutants", path + ".meta").read_text())["exit_code_by_key"]
out = {}
for key, code in codes.items():
    out[key] = [code, None if code in (1, 3) else get_diff_for_mutant(key, path=path)]
print(json.dumps(out))
"""


def _function_spans(source: str) -> dict[str, tuple[int, int]]:
    """mutmut's mangled name (x_f, xǁClassǁmethod) -> the function's first and last lines."""
    spans = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            spans[f"x_{node.name}"] = (node.lineno, node.end_lineno)
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    spans[f"x\u01c1{node.name}\u01c1{item.name}"] = (item.lineno, item.end_lineno)
    return spans


def _change(diff: str) -> tuple[list[str], list[str]]:
    lines = diff.splitlines()[2:]
    return ([x[1:].strip() for x in lines if x.startswith("-")],
            [x[1:].strip() for x in lines if x.startswith("+")])


def run_target(name: str, target: Target, jobs: int, keep: bool) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"deepfusion-mutation-{name}-"))
    _prepare(name, target, work)
    module = target.path[:-3].replace("/", ".")
    names = [f"{module}.x_{f}__mutmut_*" for f in target.functions]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MUTANT_UNDER_TEST")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    start = time.perf_counter()
    log = work / "mutmut.log"
    with open(log, "w") as fh:
        proc = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(jobs),
                               *names], cwd=work, env=env, stdout=fh, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{name}: mutmut failed ({proc.returncode}); its log ({log}) ends:\n{tail}")
    report = subprocess.run([sys.executable, "-c", _REPORT, target.path], cwd=work, env=env,
                            capture_output=True, text=True, check=True)
    results = json.loads(report.stdout)
    source = (REPO / target.path).read_text()
    source_lines = source.splitlines()
    spans = _function_spans(source)
    wanted = {f"x_{f}" for f in target.functions}
    counts = dict(mutants=0, killed=0, survived=0, timeout=0, equivalent=0)
    survivors = []
    for key, (code, diff) in results.items():
        function = key.rpartition(".")[2].rsplit("__mutmut_", 1)[0]
        if wanted and function not in wanted:
            continue
        status = STATUS.get(code, "survived")
        if status == "not run":
            continue
        counts["mutants"] += 1
        if status in ("killed", "timeout"):
            counts[status] += 1
            continue
        removed, added = _change(diff)
        why = EQUIVALENT.get((name, function, " / ".join(removed), " / ".join(added)))
        if why:
            counts["equivalent"] += 1
        else:
            counts["survived"] += 1
        first, last = spans.get(function, (1, len(source_lines)))
        line = next((i for i in range(first, last + 1) if removed
                     and source_lines[i - 1].strip() == removed[0]), first)
        survivors.append(dict(where=f"{target.path}:{line}", mutant=key.rpartition(".")[2],
                              status=status, removed=removed, added=added, equivalent=why))
    counts["score"] = (counts["killed"] + counts["timeout"]) / max(
        1, counts["mutants"] - counts["equivalent"])
    counts["seconds"] = seconds
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"{name}: work folder kept in {work}")
    return dict(name=name, counts=counts, survivors=sorted(survivors, key=_line_order))


def _line_order(s: dict):
    path, _, line = s["where"].rpartition(":")
    return path, int(line)


def _table(runs: list[dict]) -> str:
    head = f"{'module':<14}{'mutants':>8}{'killed':>8}{'survived':>9}{'timeout':>8}" \
           f"{'equiv.':>7}{'score':>8}{'time':>8}"
    rows = [head, "-" * len(head)]
    total = dict(mutants=0, killed=0, survived=0, timeout=0, equivalent=0, seconds=0.0)
    for run in runs:
        c = run["counts"]
        for k in total:
            total[k] += c[k]
        rows.append(f"{run['name']:<14}{c['mutants']:>8}{c['killed']:>8}{c['survived']:>9}"
                    f"{c['timeout']:>8}{c['equivalent']:>7}{c['score']:>8.1%}{c['seconds']:>7.0f}s")
    if len(runs) > 1:
        score = (total["killed"] + total["timeout"]) / max(1, total["mutants"] - total["equivalent"])
        rows.append("-" * len(head))
        rows.append(f"{'all':<14}{total['mutants']:>8}{total['killed']:>8}{total['survived']:>9}"
                    f"{total['timeout']:>8}{total['equivalent']:>7}{score:>8.1%}"
                    f"{total['seconds']:>7.0f}s")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--module", action="append", choices=sorted(TARGETS),
                        help="a target to run (repeatable; default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested at once (default 2)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work folders")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if not _mutmut_ok():
        print("mutation.py needs mutmut 3: pip install 'mutmut>=3.8,<4'", file=sys.stderr)
        return 2
    runs = []
    for name in args.module or list(TARGETS):
        run = run_target(name, TARGETS[name], args.jobs, args.keep)
        c = run["counts"]
        print(f"{name}: {c['mutants']} mutants, {c['killed'] + c['timeout']} killed, "
              f"{c['survived']} survived, {c['equivalent']} equivalent ({c['seconds']:.0f} s)",
              flush=True)
        runs.append(run)
    print()
    print(_table(runs))
    for run in runs:
        if not run["survivors"]:
            continue
        print(f"\nsurvivors of {run['name']}:")
        for s in run["survivors"]:
            note = f"   equivalent: {s['equivalent']}" if s["equivalent"] else f"   [{s['status']}]"
            print(f"  {s['where']}  {s['mutant']}{note}")
            for line in s["removed"]:
                print(f"      - {line}")
            for line in s["added"]:
                print(f"      + {line}")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
