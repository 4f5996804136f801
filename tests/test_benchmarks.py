"""Each benchmark script runs end to end with ``--quick`` (toy sizes) and prints its table
(bench_scale's builds and runs a dozen processes: about a minute, with -m slow)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
GPU_LINE = "GPU: " + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not measured, no device lent")


def _run(script: str, tmp_path, *args: str) -> str:
    env = {**os.environ, "CIRCUITFIND_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", *args], capture_output=True, text=True, env=env, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert GPU_LINE in proc.stdout
    return proc.stdout


@pytest.mark.slow
def test_bench_patching_quick(tmp_path):
    out = _run("bench_patching.py", tmp_path)
    for row in (
        "plain forward pass",
        "heads, all pos (circuitfind)",
        "heads, all pos (transformer_lens)",
        "path patching -> logits (circuitfind)",
        "transformer_lens.patching's time (goal <= 0.55x)",
        "worst ratio over the grid",
    ):
        assert row in out, row
    grid = re.findall(r"^\s+(\d+)\s+(denoise|noise)\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+(?:met|NOT met)$", out, re.M)
    assert sorted(grid) == sorted((n, d) for n in ("4", "8") for d in ("denoise", "noise")), out


@pytest.mark.slow
def test_bench_edges_quick(tmp_path):
    out = _run("bench_edges.py", tmp_path)
    assert "ACDC functional, batches + incremental" in out and "EAP-IG, 5 steps" in out


@pytest.mark.slow
def test_bench_scale_quick(tmp_path):
    out = _run("bench_scale.py", tmp_path, "--max-memory", "1MB")
    for row in (
        "edges ",
        "plain forward pass",
        "masked forward, every mask active (functional)",
        "EAP over all edges",
        "ACDC, ",
        "(goal <= 1.5x)",
        "growth (base:",
        "layers x2",
        "heads x2",
        "prompts x2",
    ):
        assert row in out, row
    assert (tmp_path / "bench" / "llama-L2-H4-KV2-d64-m128-v1000" / "config.json").is_file()  # built in the cache


@pytest.mark.slow  # about 2.5 minutes on a loaded 2-core machine (three Dask clusters start)
def test_bench_sweep_runners_quick(tmp_path):
    out = _run("bench_sweep_runners.py", tmp_path)
    assert "| runner | torch threads per setting | settings | wall time (s) | ratio to threads |" in out
    for runner in (
        "threads (2)",
        "Dask, 1 worker process",
        "Dask, 1 worker process, 1 torch thread",
        "Dask, 2 worker processes",
    ):
        assert re.search(rf"\| {re.escape(runner)} \| \d+ \| 8 \| [\d.]+ \| [\d.]+ \|", out), runner


@pytest.mark.slow
def test_bench_methods_quick(tmp_path):
    """Every algorithm is a row of the known-answer model's table and of toy-ioi's; the ground-truth
    columns read as the tests of each method say (edge pruning, UGS and EAP-IG recover known-induction)."""
    out = _run("bench_methods.py", tmp_path)
    known, toy = out.split("\ntoy-ioi\n")
    rows = {line.split()[0]: line.split() for line in known.splitlines()[4:] if line.strip()}
    from circuitfind.methods.discover import ALGORITHMS

    assert set(rows) == set(ALGORITHMS)
    for algorithm in ("edge_pruning", "ugs", "eap_ig", "acdc"):
        assert rows[algorithm][1:4] == ["1.000", "1.00", "1.00"], rows[algorithm]  # AUROC, precision, recall
    assert {line.split()[0] for line in toy.splitlines()[1:] if line.strip()} == set(ALGORITHMS)


@pytest.mark.slow
def test_bench_hostile_quick(tmp_path):
    out = _run("bench_hostile.py", tmp_path)
    for row in ("valid task (baseline)", "2 rows of 50,000 answers", "FIFO named .jsonl", "metric that sleeps"):
        assert row in out, row
    assert "every goal met" in out, out


@pytest.mark.slow  # 25 s: like every benchmark's smoke test, outside `make test`'s 5 minutes
def test_bench_report_quick(tmp_path):
    out = _run("bench_report.py", tmp_path, "--outputs", str(tmp_path / "outputs"), "--repeats", "1")
    row = re.search(r"^bench-report-toy\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)\s+(\d+)\s+([\d.]+)$", out, re.M)
    assert row, out
    assert int(row.group(1)) == 4 and int(row.group(5)) <= 25  # 4 settings; no inline list over 25
    assert "longest inline list <= 25: met" in out
    assert (tmp_path / "outputs" / "bench-report-toy" / "report.html").is_file()


@pytest.mark.slow  # 21 s
def test_bench_workflows_quick(tmp_path):
    out = _run("bench_workflows.py", tmp_path)
    for workflow in ("study_str", "study_gn", "study_mlp", "edge_pruning", "ugs", "heads_by_pos"):
        assert re.search(rf"^\s+toy-ioi\s+{workflow}\s+[\d.]+\s+\d+\s+[\d.]+\s+\S", out, re.M), workflow
    assert "greater_than_eap" not in out  # SmolLM2 only
