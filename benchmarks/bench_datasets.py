"""Taking a few rows of a large dataset file: load_task + the first 16 rows (or a seeded sample).

    python benchmarks/bench_datasets.py [--rows 100000] [--take 16] [--quick]

Writes a JSONL and a CSV dataset of ``--rows`` IOI-shaped prompt pairs, and the same rows in MIB's layout
(JSON Lines, and Parquet when pyarrow is installed), in a temporary folder and times
``generate_prompts(load_task(file), take)``: the file's sha256 (one streaming pass, for the cache key),
the first row's check and the first ``take`` rows. Goal: under 1 s for 16 rows of 100,000. The seeded
sample (reservoir sampling) reads every row, so it is shown for comparison, without a goal.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from circuitfind.tasks.batch import generate_prompts, load_task

GOAL_S = 1.0


def _rows(n: int):
    names = ["Mary", "John", "Alice", "Bob", "Sarah", "Tom"]
    for i in range(n):
        a, b = names[i % 6], names[(i + 1) % 6]
        clean = f"Row {i}: when {a} and {b} went to the store, {b} gave a drink to"
        yield {
            "clean": clean,
            "corrupted": clean.replace(f", {b} gave", f", {a} gave"),
            "answers": [f" {a}"],
            "counter_answers": [f" {b}"],
            "keys": {"IO": clean.index(a)},
            "id": i,
        }


def write_datasets(folder: Path, n: int) -> dict[str, Path]:
    jsonl, csv_path = folder / "pairs.jsonl", folder / "pairs.csv"
    with open(jsonl, "w") as f:
        for row in _rows(n):
            f.write(json.dumps(row) + "\n")
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["clean", "corrupted", "answers", "counter_answers", "key.IO", "id"])
        for row in _rows(n):
            w.writerow(
                [
                    row["clean"],
                    row["corrupted"],
                    "|".join(row["answers"]),
                    "|".join(row["counter_answers"]),
                    row["keys"]["IO"],
                    row["id"],
                ]
            )
    files = {"jsonl": jsonl, "csv": csv_path}
    mib = [
        {
            "prompt": row["clean"],
            "metadata": {"indirect_object": row["answers"][0][1:], "subject": row["counter_answers"][0][1:]},
            "s2_io_flip_counterfactual": {"prompt": row["corrupted"]},
            "idx": row["id"],
        }
        for row in _rows(n)
    ]
    files["mib"] = folder / "mib.jsonl"
    files["mib"].write_text("".join(json.dumps(r) + "\n" for r in mib))
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return files
    files["parquet"] = folder / "mib.parquet"
    pq.write_table(pa.Table.from_pylist(mib), files["parquet"], row_group_size=10_000)
    return files


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000, help="rows in each file (default: 100000)")
    p.add_argument("--take", type=int, default=16, help="rows taken (default: 16)")
    p.add_argument("--quick", action="store_true", help="10,000 rows (a smoke test)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = 10_000 if args.quick else args.rows
    print(f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'not measured, no device lent'}")
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        files = write_datasets(Path(tmp), rows)
        spec_file = Path(tmp) / "sampled.json"
        print(
            f"{'file':<8} {'rows':>8} {'MB':>7} {'first ' + str(args.take) + ' rows (s)':>20} {'seeded sample (s)':>18}  goal"
        )
        for kind, path in files.items():
            first = min(_time(lambda path=path: generate_prompts(load_task(path), args.take)) for _ in range(3))
            spec_file.write_text(json.dumps({"kind": "dataset", "file": str(path), "sample": True}))
            sample = _time(lambda: generate_prompts(load_task(spec_file), args.take, seed=1))
            ok = first < GOAL_S
            failed |= not ok
            mb = path.stat().st_size / 1e6
            print(
                f"{kind:<8} {rows:>8} {mb:>7.1f} {first:>20.3f} {sample:>18.3f}  < {GOAL_S:.0f} s: {'ok' if ok else 'MISSED'}"
            )
    return 1 if failed and not args.quick else 0


if __name__ == "__main__":
    sys.exit(main())
