"""Progress of long work: stages to a listener (a Prefect run logger), bars on stderr, stdout unchanged."""

from __future__ import annotations

import os
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
