"""One run folder, one sweep's parameters at a time: a live sweep with other parameters is refused (it would
replace the run's manifest and report), the same parameters share the folder, a dead sweep's lock is taken over."""

import json
import os
import subprocess
import sys
import time

import pytest

from circuitfind.cli import main
from circuitfind.runs.sweep import RUN_LOCK, RunLockedError, SweepConfig, check_run_lock, run_lock

EIGHT = SweepConfig(prompts=8)
HOLD = """
import sys
from circuitfind.runs.sweep import SweepConfig, run_lock
with run_lock(sys.argv[1], SweepConfig(prompts=8)):
    print("held", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def held(tmp_path):
    """A live process holding ``tmp_path/run`` for a sweep of 8 prompts."""
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        yield run, proc.pid
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)


def test_a_live_sweep_with_other_parameters_is_refused(held):
    run, pid = held
    with pytest.raises(RunLockedError, match=rf"process {pid}\) with other parameters \(prompts 8, here 24\)"):
        check_run_lock(run, SweepConfig(prompts=24))
    with pytest.raises(RunLockedError, match="another sweep"):
        with run_lock(run, SweepConfig(prompts=24)):
            pass
    check_run_lock(run, EIGHT)  # the same grid and parameters share the folder (a resumed run)
    with run_lock(run, EIGHT):
        assert json.loads((run / RUN_LOCK).read_text())["pid"] == pid  # the first holder's file stays


def test_the_command_refuses_it_in_one_line_before_prefect_starts(held, capsys):
    run, _ = held
    start = time.monotonic()
    assert main(["sweep", "--run", run.name, "--outputs", str(run.parent), "--prompts", "24"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("circuitfind: error: run folder ") and "another sweep" in err and err.count("\n") == 1
    assert time.monotonic() - start < 10


def test_a_dead_sweeps_lock_is_taken_over(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = {"pid": int(dead.stdout), "host": "here", "config": {"prompts": 99}}
    (run / RUN_LOCK).write_text(json.dumps(stale))
    check_run_lock(run, EIGHT)
    with run_lock(run, EIGHT):
        assert json.loads((run / RUN_LOCK).read_text())["pid"] == os.getpid()
    with run_lock(run, SweepConfig(prompts=24)):  # released when the sweep ends
        pass
