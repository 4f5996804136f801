"""Progress of long work: stages to a listener (a Prefect run logger), bars on stderr, stdout unchanged."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_SWEEP

from circuitfind import progress
from circuitfind.runs import study
from circuitfind.runs.sweep import Setting, SweepConfig, _compute_setting


def test_bar_descriptions_and_stages_reach_the_listener_and_never_stdout(capsys, monkeypatch):
    seen: list[str] = []
    with progress.stages(seen.append):
        with progress.bar(show=False, desc="eap: searching", total=3) as b:
            b.set_description("eap: faithfulness")
            b.set_description("eap: faithfulness")  # unchanged: announced once
        progress.stage("baselines")
    progress.stage("outside")  # no listener: nothing
    assert seen == ["eap: searching", "eap: faithfulness", "baselines"]
    monkeypatch.setenv(progress.ENV, "1")  # tqdm's bars without a terminal (off one, the default is a line per ~10 s)
    with progress.bar(show=True, desc="shown", total=2) as b:
        b.update(2)
    out = capsys.readouterr()
    assert out.out == "" and "shown" in out.err


def test_a_sweep_setting_announces_its_stages_in_order(ioi_model, capsys):
    setting = Setting(
        model="toy-ioi", task="ioi", algorithm="eap", corruption="str", metric="logit_diff", direction="noise"
    )
    config = SweepConfig(
        models=["toy-ioi"], algorithms=["eap"], corruptions=["str"], metrics=["logit_diff"], prompts=8, top_k=5
    )
    seen: list[str] = []
    with progress.stages(seen.append):
        _compute_setting(ioi_model, setting, config)
    assert seen == ["baselines", "eap: searching", "eap: faithfulness", "eap: faithfulness curve"]
    assert capsys.readouterr().out == ""


def test_the_study_head_sweeps_show_progress_on_stderr_only(ioi_model, capsys, monkeypatch):
    grid = dict(prompts=6, corruptions=("str:s2_io", "gn"), metrics=("logit_diff",), variants=(), n_boot=50)
    monkeypatch.setenv(progress.ENV, "0")
    seen: list[str] = []
    with progress.stages(seen.append):
        quiet = study.head_detection(ioi_model, "toy-ioi", **grid)
    assert seen == [
        "toy-ioi: head sweeps (denoise)",
        "toy-ioi: head sweep, str:s2_io (denoise)",
        "toy-ioi: head sweep, gn (denoise)",
    ]
    assert capsys.readouterr().err == ""
    monkeypatch.setenv(progress.ENV, "1")
    shown = study.head_detection(ioi_model, "toy-ioi", **grid)
    out = capsys.readouterr()
    assert out.out == "" and "head sweep, gn (denoise)" in out.err and "patching" in out.err
    assert shown["settings"] == quiet["settings"]  # progress changes nothing in the results


@pytest.mark.slow
def test_patch_command_progress_follows_the_switch_and_leaves_stdout_alone():
    argv = [sys.executable, "-m", "circuitfind", "patch", "-n", "8", "--what", "heads"]
    runs = {}
    for setting in ("1", "0"):
        env = {**os.environ, progress.ENV: setting, "OMP_NUM_THREADS": "1"}
        runs[setting] = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120, check=True)
    shown, quiet = runs["1"], runs["0"]
    assert shown.stdout == quiet.stdout and "heads patching" in shown.stdout
    assert "patching" in shown.stderr and "it/s" in shown.stderr
    assert "it/s" not in quiet.stderr and "patching" not in quiet.stderr


@pytest.mark.slow
def test_the_sweep_flow_logs_each_setting_stage(first_sweep, sweep_env, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "circuitfind", "sweep", *TINY_SWEEP, "--run", "staged", "--outputs", str(tmp_path)],
        # the package under test, wherever it is imported from (the worktree or the install)
        env={**sweep_env(first_sweep.home), "PYTHONPATH": str(Path(progress.__file__).parents[1])},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    for stage in ("baselines", "eap: searching", "eap: faithfulness", "eap: faithfulness curve"):
        assert any("toy-ioi__ioi__eap__str" in line and line.rstrip().endswith(stage) for line in lines), stage
    assert "baselines" not in proc.stdout and "searching" not in proc.stdout


def test_off_a_terminal_progress_is_one_plain_line_per_interval_and_nothing_for_short_work(monkeypatch, capsys):
    import time

    monkeypatch.delenv(progress.ENV, raising=False)
    monkeypatch.setenv(progress.INTERVAL_ENV, "0.05")
    assert progress.mode() == "lines"  # capsys's stderr is not a terminal
    with progress.bar(range(8), show=True, desc="edge pruning", unit="step") as b:
        for i in b:
            time.sleep(0.03)
            b.set_postfix(faith="0.830")
            if i == 4:
                b.set_description("edge pruning")  # tqdm's own form would add ": " to it
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err and len(lines) >= 2, err
    for line in lines:
        assert re.fullmatch(r"edge pruning: step \d/8, \d+ s, faith=0\.830", line), line
    monkeypatch.setenv(progress.INTERVAL_ENV, "30")
    with progress.bar(range(3), show=True, desc="quick", unit="step") as b:
        for _ in b:
            pass
    assert capsys.readouterr().err == ""  # work shorter than the interval writes no line
    monkeypatch.setenv(progress.INTERVAL_ENV, "soon")
    with pytest.raises(ValueError, match="CIRCUITFIND_PROGRESS_INTERVAL='soon' is not a number"):
        progress.interval()


@pytest.mark.slow  # 7 s: real edge pruning in a subprocess; make test stays under 5 minutes
def test_edge_pruning_logs_its_steps_when_stderr_is_a_pipe(tmp_path):
    code = (
        "from circuitfind import patching as P\n"
        "from circuitfind.edge_patching import EdgePatcher\n"
        "from circuitfind.methods.pruning import edge_pruning\n"
        "from circuitfind.models.catalogue import load_model\n"
        "from circuitfind.tasks.batch import TaskBatch\n"
        "m = load_model('toy-ioi')\n"
        "setup = P.prepare(m, TaskBatch.build(m, 'ioi', 4, seed=1), 'str', 'logit_diff')\n"
        "edge_pruning(EdgePatcher(setup), 20, steps=30)\n"
        "print('done')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != progress.ENV}
    env |= {
        progress.INTERVAL_ENV: "0.01",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(progress.__file__).parents[1]),
    }
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == "done\n"  # progress never reaches stdout
    steps = re.findall(
        r"^edge pruning: step (\d+)/30, \d+ s, faith=-?[\d.]+, kept=\d+, loss=-?[\d.]+$", proc.stderr, re.M
    )
    assert len(steps) >= 2 and [int(s) for s in steps] == sorted(int(s) for s in steps), proc.stderr[-2000:]
    assert len(steps) == len(set(steps)), proc.stderr[-2000:]  # one line per redraw, not one per postfix change too
