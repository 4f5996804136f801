import json
import subprocess
import sys
from pathlib import Path

import pytest

from circuitfind.cli import main
from circuitfind.tasks.evaluation import evaluate


def test_toy_ioi_does_the_task(ioi_model, ioi_batch):
    report = evaluate(ioi_model, ioi_batch, corruptions=("str",))
    assert report.accuracy >= 0.95
    assert report.logit_diff > 3.0
    assert report.corrupted["str"]["logit_diff"] < 0.0  # s2_io swaps the roles of the names


def test_toy_induction_does_the_task(induction_model, induction_batch):
    report = evaluate(induction_model, induction_batch, corruptions=("str",))
    assert report.accuracy >= 0.95 and report.logit_diff > 3.0


@pytest.mark.slow
def test_evaluate_command_prints_accuracy_and_logit_diffs():
    out = subprocess.run(
        [sys.executable, "-m", "circuitfind", "evaluate", "--model", "toy-ioi", "-n", "50", "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    report = json.loads(out)
    assert report["accuracy"] >= 0.95
    assert report["logit_diff"] > 3.0 > report["corrupted"]["str"]["logit_diff"]
    assert set(report["corrupted"]) == {"str", "gn", "mean", "resample"}


def test_cli_errors_are_one_line(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["evaluate", "--model", "no-such-model-xyz"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("circuitfind: error: model 'no-such-model-xyz' is not a shipped model")
    assert "Traceback" not in err
    assert main(["patch", "--corruption", "blur"]) == 2
    assert "unknown corruption 'blur'" in capsys.readouterr().err


def test_patch_command_writes_json(tmp_path, capsys):
    out = tmp_path / "heads.json"
    assert (
        main(
            [
                "patch",
                "--what",
                "heads",
                "-n",
                "20",
                "--corruption",
                "gn",
                "--metric",
                "kl",
                "--direction",
                "noise",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    data = json.loads(out.read_text())
    assert data["axes"] == ["layer", "head"] and len(data["values"]) == 3
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow
def test_toy_model_retraining_is_deterministic(tmp_path):
    """Two trainings on one machine give the same bytes. Across CPU types the kernels round differently,
    so the full retraining is held to the shipped model's behaviour (same accuracy, logit diff to 1e-2),
    not its bytes (CI's machine and the one that trained it differ by up to 0.1 in a weight)."""
    import hashlib

    from circuitfind.models.loading import resolve_model_path
    from circuitfind.models.zoo.train import train

    digest = lambda p: hashlib.sha256(open(p, "rb").read()).hexdigest()  # noqa: E731
    twice = [train("toy-induction", tmp_path / f"short{i}", log_every=0, steps=40) for i in (0, 1)]
    assert digest(tmp_path / "short0" / "model.safetensors") == digest(tmp_path / "short1" / "model.safetensors")
    assert twice[0] == {**twice[1], "train_seconds": twice[0]["train_seconds"]}

    summary = train("toy-induction", tmp_path / "toy-induction", log_every=0)
    shipped = json.loads((Path(resolve_model_path("toy-induction")) / "training.json").read_text())
    assert summary["accuracy"] == shipped["accuracy"] == 1.0
    assert summary["logit_diff"] == pytest.approx(shipped["logit_diff"], abs=1e-2)


def test_discover_compare_export_commands(tmp_path, capsys):
    from circuitfind.circuits.circuit import Circuit

    acdc, eap = tmp_path / "acdc.graphml", tmp_path / "eap.json"
    assert main(["discover", "-n", "12", "--algorithm", "acdc", "--tau", "0.05", "--out", str(acdc)]) == 0
    assert (
        main(
            ["discover", "-n", "12", "--algorithm", "eap", "--metric", "logit_diff", "--top-k", "15", "--out", str(eap)]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "faithfulness" in out and "eap: 15 of 262 edges" in out
    assert main(["compare", str(acdc), str(eap), "--reference", str(acdc)]) == 0
    out = capsys.readouterr().out
    assert "edge J" in out and "precision 1.000 recall 1.000" in out
    dot = tmp_path / "eap.dot"
    assert main(["export", str(eap), str(dot)]) == 0
    assert Circuit.load(dot).edges == Circuit.load(eap).edges
    assert main(["discover", "--algorithm", "acdc", "--direction", "denoise", "-n", "8"]) == 2
    assert "use direction='noise'" in capsys.readouterr().err


def test_ctrl_c_ends_with_one_line_and_no_output_file(tmp_path):
    """SIGINT during a discovery: exit 130, 'interrupted' on one line, no traceback, no circuit file."""
    import os
    import signal

    out = tmp_path / "c.graphml"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "circuitfind",
            "discover",
            "-n",
            "300",
            "--algorithm",
            "acdc",
            "--tau",
            "0",
            "--out",
            str(out),
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "CIRCUITFIND_PROGRESS": "1"},  # bars on without a terminal
    )
    try:
        seen = proc.stderr.read(1)  # the first progress output: the command is inside its work
        assert seen, "the command ended before printing progress"
        proc.send_signal(signal.SIGINT)
        err = seen + proc.stderr.read()
        assert proc.wait(timeout=60) == 130
    finally:
        proc.kill()
    assert "Traceback" not in err and err.rstrip().endswith("circuitfind: interrupted")
    assert not out.exists()


@pytest.mark.parametrize(
    "device, message", [("banana", "'banana' is not a torch device"), ("cuda:0", "no CUDA device is available here")]
)
def test_a_bad_or_absent_device_is_one_line(device, message, capsys):
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    assert main(["evaluate", "-n", "4", "--device", device]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_an_unknown_output_format_is_refused_before_the_work(tmp_path, capsys, monkeypatch):
    from circuitfind import cli

    monkeypatch.setattr(cli, "_load", lambda args: pytest.fail("the model was loaded before the --out check"))
    assert main(["discover", "-n", "4", "--algorithm", "eap", "--out", str(tmp_path / "c.xyz")]) == 2
    assert "unknown graph format for 'c.xyz'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_discovered_circuits_record_the_model(tmp_path, capsys):
    from circuitfind.circuits.circuit import Circuit
    from circuitfind.models.loading import resolve_model_path

    out = tmp_path / "eap.graphml"
    argv = ["discover", "-n", "8", "--algorithm", "eap", "--metric", "logit_diff", "--top-k", "5", "--out", str(out)]
    assert main(argv) == 0
    settings = Circuit.load(out).settings
    assert settings["model"] == "toy-ioi" and settings["task"] == "ioi" and settings["prompts"] == 8
    folder = resolve_model_path("toy-ioi")
    assert main([*argv, "--model", folder]) == 0
    assert Circuit.load(out).settings["model"] == folder
    capsys.readouterr()


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["acdc", "eap_ig"])
def test_discover_shows_progress_on_stderr_and_leaves_stdout_alone(tmp_path, algorithm):
    import os

    argv = [sys.executable, "-m", "circuitfind", "discover", "-n", "8", "--algorithm", algorithm, "--top-k", "5"]
    runs = {}
    for setting in ("1", "0"):
        env = {**os.environ, "CIRCUITFIND_PROGRESS": setting, "OMP_NUM_THREADS": "1"}
        runs[setting] = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120, check=True)
    shown, quiet = runs["1"], runs["0"]
    assert shown.stdout == quiet.stdout and "edges" in shown.stdout
    assert "baselines" in shown.stderr and f"{algorithm}: faithfulness" in shown.stderr
    if algorithm == "acdc":
        assert "ACDC edges" in shown.stderr and "evaluated=" in shown.stderr
    assert "baselines" not in quiet.stderr and "it/s" not in quiet.stderr


def test_discover_warns_when_the_health_checks_flag_its_circuit(capsys):
    """EAP under KL when noising (discover's default metric) ranks float noise: the sweep flagged it,
    ``discover`` printed the circuit without a word."""
    from circuitfind.cli import main

    assert main(["discover", "--algorithm", "eap", "-n", "4", "--metric", "kl"]) == 0
    err = capsys.readouterr().err
    assert "circuitfind: warning: every edge score is zero" in err and "gradient of the KL divergence" in err
    assert main(["discover", "--algorithm", "eap", "-n", "4", "--metric", "logit_diff"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_threads_option_sets_torch_threads_and_refuses_bad_counts(capsys, monkeypatch):
    """On a busy machine torch's one thread per core crawls (UGS, 8 prompts, load 3.7: 139 s with 2 threads,
    12.8 s with 1), so the model commands take --threads, or $CIRCUITFIND_TORCH_THREADS."""
    import torch

    before = torch.get_num_threads()
    try:
        assert main(["evaluate", "--model", "toy-ioi", "-n", "4", "--threads", "0"]) == 2
        assert capsys.readouterr().err == "circuitfind: error: --threads must be >= 1, got 0\n"
        monkeypatch.setenv("CIRCUITFIND_TORCH_THREADS", "zero")
        assert main(["evaluate", "--model", "toy-ioi", "-n", "4"]) == 2
        assert "CIRCUITFIND_TORCH_THREADS='zero' is not a positive number" in capsys.readouterr().err
        torch.set_num_threads(2)
        monkeypatch.setenv("CIRCUITFIND_TORCH_THREADS", "1")
        assert main(["evaluate", "--model", "toy-ioi", "-n", "50"]) == 0 and torch.get_num_threads() == 1
        torch.set_num_threads(2)
        assert main(["evaluate", "--model", "toy-ioi", "-n", "50", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
