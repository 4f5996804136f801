"""The sweep under several task runners, in one run: Prefect's thread runner (the default, 2 threads),
and Dask (prefect-dask) with 1 local worker process (with its default torch threads, all cores, and
with 1) and with 2 worker processes.

    python benchmarks/bench_sweep_runners.py [--quick] [--prompts 32]

Each runner computes the same grid (the default demo grid of ``circuitfind sweep``: 56 settings on
toy-ioi; ``--quick``: 8 settings, 8 prompts) from an empty cache, through the command's own code path
(:func:`circuitfind.flows.sweep_flow.run_from_args`), all against one local Prefect server. Wall time
counts everything the user waits for: the Dask cluster's start (worker processes import torch and
load the model), the settings, and the report. Ratios are to the thread runner. The machine's load
(``os.getloadavg``) is printed before and after: on a shared machine the numbers move with it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from circuitfind.flows.server import prefect_api
from circuitfind.flows.sweep_flow import parse_args, run_from_args
from circuitfind.threads import available_cores, threads_per_worker

QUICK_GRID = [
    "--algorithms",
    "eap",
    "node",
    "--corruptions",
    "str",
    "gn",
    "--metrics",
    "logit_diff",
    "kl",
    "--directions",
    "noise",
    "--prompts",
    "8",
]
RUNNERS = (
    ("threads (2)", ["--workers", "2"]),
    ("Dask, 1 worker process", ["--dask", "--workers", "1"]),
    ("Dask, 1 worker process, 1 torch thread", ["--dask", "--workers", "1", "--torch-threads", "1"]),
    ("Dask, 2 worker processes", ["--dask", "--workers", "2"]),
)


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="8 settings with 8 prompts instead of the demo grid")
    p.add_argument("--prompts", type=int, default=None, help="prompts per setting (default: the grid's)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    grid = list(QUICK_GRID) if args.quick else []
    if args.prompts:
        grid += ["--prompts", str(args.prompts)]
    print(f"cores: {available_cores()}, load before: {load()}")
    print("GPU: " + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not measured, no device lent"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp, prefect_api():
        for label, options in RUNNERS:
            outputs = Path(tmp) / str(len(rows))
            start = time.perf_counter()
            manifest = run_from_args(parse_args([*grid, *options, "--outputs", str(outputs), "--run", "bench"]))
            seconds = time.perf_counter() - start
            if manifest["failures"] or any(s["from_cache"] for s in manifest["settings"]):
                raise SystemExit(f"{label}: a setting failed or came from a cache: {manifest['failures']}")
            args_ = parse_args(options)
            threads = args_.torch_threads or threads_per_worker(args_.workers)
            rows.append(
                {
                    "runner": label,
                    "torch_threads": threads,
                    "settings": len(manifest["settings"]),
                    "seconds": round(seconds, 1),
                }
            )
    base = rows[0]["seconds"]
    print(f"load after: {load()}\n")
    print("| runner | torch threads per setting | settings | wall time (s) | ratio to threads |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        row["ratio"] = round(row["seconds"] / base, 2)
        print(
            f"| {row['runner']} | {row['torch_threads']} | {row['settings']} | {row['seconds']:.1f} | {row['ratio']:.2f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
