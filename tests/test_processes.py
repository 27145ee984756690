"""The multi-process tests' launcher stops the other processes as soon as one fails (one left waiting in a
collective would otherwise hold the test until its timeout) and reports the failure's output."""

import sys
import time

import pytest

from tests.processes import run_together, worker_env


def test_a_failed_process_stops_the_others_at_once():
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match="process 0 of 2 exited with 3:\n.*no luck"):
        run_together([[sys.executable, "-c", "import sys; print('no luck'); sys.exit(3)"],
                      [sys.executable, "-c", "import time; time.sleep(60)"]], worker_env(1), timeout_s=60)
    assert time.monotonic() - t0 < 30


def test_outputs_come_back_in_order():
    logs = run_together([[sys.executable, "-c", f"print('process {i}')"] for i in range(3)], worker_env(1))
    assert [log.strip() for log in logs] == ["process 0", "process 1", "process 2"]
