"""Hostile inputs (issue 25): each one answered by the command line with one line, exit 2, within
15 s of CPU and 1 GB above the model's own memory.

    python benchmarks/bench_hostile.py [--model smollm2-135m] [--quick]

Each input is built in a temporary folder and given to ``circuitfind evaluate`` (task files) or
``circuitfind export`` (circuit files) in a child process; its CPU seconds and peak RSS come from
``os.wait4``. The baseline row is a valid task on the same model: the memory column is the peak RSS
above it. ``--quick`` uses toy-ioi and leaves out the 1 GB files.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CPU_GOAL_S, MEMORY_GOAL_GB = 15.0, 1.0
ROW = {
    "clean": "When Mary and John went to the store, John gave a drink to",
    "corrupted": "When Mary and John went to the store, Mary gave a drink to",
    "answers": [" Mary"],
    "counter_answers": [" John"],
}


OTHER = {
    "clean": "When Alice and John went to the store, John gave a drink to",
    "corrupted": "When Alice and John went to the store, Alice gave a drink to",
    "answers": [" Alice"],
    "counter_answers": [" John"],
}


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _sparse(path: Path, head: bytes, size: int) -> Path:
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)
    return path


def _graphml_with_comment(folder: Path) -> Path:
    from circuitfind.circuits.circuit import Circuit
    from circuitfind.circuits.graph import ModelGraph

    graph = ModelGraph(3, 4)
    text = (
        Circuit(graph, torch.ones(graph.n_edges, dtype=torch.bool), torch.ones(graph.n_edges), {})
        .save(folder / "small.graphml")
        .read_text()
    )
    at = text.index("<edge ")
    padding = "".join(f'<node id="x{i}"/>\n' for i in range(2_000_000))
    text = text[:at] + padding + text[at:]
    path = folder / "comment.graphml"
    path.write_text(text.replace("<graph ", "<!-- a comment -->\n<graph ", 1))
    return path


def inputs(folder: Path, quick: bool) -> list[tuple[str, list[str]]]:
    """(name, command arguments) of each hostile input, built in ``folder``."""
    n_long = 3_000 if quick else 100_000
    long_row = {**ROW, "clean": "x " * n_long + ROW["clean"], "corrupted": "x " * n_long + ROW["corrupted"]}
    many = {**ROW, "answers": [f" w{i}" for i in range(50_000)]}
    metric = folder / "bench_metric.py"
    metric.write_text("import time\ndef sleeps(logits, ctx):\n    time.sleep(3600)\n")
    fifo = folder / "fifo.jsonl"
    os.mkfifo(fifo)
    out = [
        ("valid task (baseline)", ["evaluate", "--task", str(_jsonl(folder / "ok.jsonl", [ROW, OTHER]))]),
        (f"{n_long:,}-word prompt", ["evaluate", "--task", str(_jsonl(folder / "long.jsonl", [long_row]))]),
        ("2 rows of 50,000 answers", ["evaluate", "--task", str(_jsonl(folder / "many.jsonl", [many, many]))]),
        ("FIFO named .jsonl", ["evaluate", "--task", str(fifo)]),
        ("metric that sleeps", ["discover", "--task", "ioi", "--algorithm", "eap", "--metric", "bench_metric:sleeps"]),
        ("GraphML, comment + 2M nodes", ["export", str(_graphml_with_comment(folder)), str(folder / "o.json")]),
    ]
    if not quick:
        gb = 2**30
        out += [
            ("1 GB sparse .json", ["evaluate", "--task", str(_sparse(folder / "sparse.json", b"{", gb))]),
            ("1 GB sparse .jsonl", ["evaluate", "--task", str(_sparse(folder / "sparse.jsonl", b"", gb))]),
            ("1 GB sparse .graphml", ["export", str(_sparse(folder / "s.graphml", b"<", gb)), str(folder / "o.json")]),
        ]
    return out


def measure(args: list[str], model: str, env: dict) -> tuple[float, float, float, int, str]:
    """CPU seconds, wall seconds, peak RSS (GB), exit code and the last stderr line of one command."""
    command = [sys.executable, "-m", "circuitfind", *args]
    if args[0] in ("evaluate", "discover"):
        command += ["--model", model, "-n", "4"]
    start = time.monotonic()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    err = child.stderr.read().decode("utf-8", "replace") if child.stderr else ""
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - start
    last = err.strip().splitlines()[-1] if err.strip() else ""
    return usage.ru_utime + usage.ru_stime, wall, usage.ru_maxrss / 2**20, child.returncode, last


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--quick", action="store_true", help="toy-ioi, no 1 GB files (a smoke test)")
    args = p.parse_args()
    model = "toy-ioi" if args.quick else args.model
    print(f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'not measured, no device lent'}")
    print(f"model {model}; load average {os.getloadavg()[0]:.1f}; goal: exit 2 within {CPU_GOAL_S:g} s CPU, "
          f"{MEMORY_GOAL_GB:g} GB above the baseline")  # fmt: skip
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        env = {
            **os.environ,
            "CIRCUITFIND_METRIC_TIMEOUT": "5",
            "CIRCUITFIND_PROGRESS": "0",
            "PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]),
        }
        base_rss = 0.0
        print(f"{'input':<30} {'exit':>4} {'CPU s':>6} {'wall s':>7} {'+RSS GB':>8}  message")
        for name, command in inputs(folder, args.quick):
            cpu, wall, rss, code, last = measure(command, model, env)
            if name.endswith("(baseline)"):
                base_rss = rss
                ok = code == 0
            else:
                ok = code == 2 and cpu <= CPU_GOAL_S and rss - base_rss <= MEMORY_GOAL_GB
            failed |= not ok
            shown = last.replace(tmp, "TMP")
            shown = shown if len(shown) <= 110 else shown[:107] + "..."
            print(
                f"{name:<30} {code:>4} {cpu:>6.1f} {wall:>7.1f} {rss - base_rss:>8.2f}  {shown}{'' if ok else '  NOT met'}"
            )
    print("every goal met" if not failed else "some goals NOT met")
    return 1 if failed and not args.quick else 0


if __name__ == "__main__":
    sys.exit(main())
