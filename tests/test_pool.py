"""The local pool (:func:`deepfusion.runtime.pool.pool_results`): at most ``in_flight`` results
done but not yet taken, a caller that stops early ends the workers quietly, a dead worker is
one line."""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import pytest

from deepfusion.errors import WorkerCrashError
from deepfusion.runtime.pool import pool_results


@pytest.mark.parametrize("ordered", [False, True])
def test_the_pool_runs_at_most_in_flight_ahead_of_a_slow_caller(tmp_path, ordered):
    """A task is submitted per result taken, not per result finished: while the caller is busy
    the workers run up to the bound and no further (joblib's pre_dispatch refills on
    completion, so its workers ran through all of them)."""
    marks = [tmp_path / f"{i}" for i in range(10)]
    taken, ahead = 0, []
    for _ in pool_results(Path.touch, [(m,) for m in marks], 2, ordered=ordered,
                          what="testing", in_flight=3):
        taken += 1
        time.sleep(0.25)                  # busy: every submitted task has long finished
        ahead.append(sum(m.exists() for m in marks) - taken)
    assert taken == 10 and all(m.exists() for m in marks)
    assert max(ahead) == 2, ahead         # in flight: the one in hand and two more, never more
    assert ahead[-3:] == [2, 1, 0], ahead


def test_a_caller_that_stops_early_ends_the_workers_quietly(capfd):
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        results = pool_results(time.sleep, [(0,)] + [(60,)] * 5, 2, ordered=False, what="testing")
        assert next(results) is None
        results.close()
    assert time.perf_counter() - t0 < 30
    assert capfd.readouterr().err == ""
    assert list(pool_results(abs, [(-1,), (-2,)], 2, ordered=True, what="testing")) == [1, 2]


def test_a_worker_that_dies_is_one_line():
    with pytest.raises(WorkerCrashError, match="a worker process died while testing"):
        list(pool_results(os._exit, [(3,), (3,)], 2, ordered=False, what="testing"))
    assert list(pool_results(abs, [(-1,), (-2,)], 2, ordered=True, what="testing")) == [1, 2]


def test_the_resource_tracker_started_with_the_pool_is_quiet(monkeypatch):
    """loky's resource tracker inherits the environment the pool leaves: its warnings (all
    "resource_tracker: ...") are filtered there, anyone else's are not, and a user's own
    filters are kept."""
    import subprocess
    import sys

    monkeypatch.delenv("DEEPFUSION_DEBUG", raising=False)
    monkeypatch.setenv("PYTHONWARNINGS", "ignore::DeprecationWarning")
    assert list(pool_results(abs, [(-1,)], 1, ordered=True, what="testing")) == [1]
    assert os.environ["PYTHONWARNINGS"].split(",")[0] == \
        "ignore::DeprecationWarning"
    code = ("import warnings; warnings.warn('resource_tracker: /loky-1-x: FileNotFoundError'); "
            "warnings.warn('something else')")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stderr
    assert "resource_tracker" not in err and "something else" in err, err
