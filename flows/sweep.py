"""The main job: head-level discovery on the shipped default model under many patching settings.

    python flows/sweep.py                      # toy-ioi, IOI, every corruption x metric x direction
    python flows/sweep.py --prompts 40 --corruptions str gn --metrics logit_diff kl

Each setting (corruption, metric, direction) is a Prefect task: it patches every attention head,
marks the heads whose effect is >= 2 SD from the mean (the IOI paper's rule), and writes the result
as JSON and as a GraphML circuit under ``outputs/<run>/settings/``. A final task compares the
circuits (Jaccard and overlap matrices, how often each head is found) and writes
``outputs/<run>/report.md`` and ``manifest.json``. Every file is written atomically.

Prefect runs embedded (a temporary local server) unless ``PREFECT_API_URL`` points to a server.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from itertools import product
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

from prefect import flow, get_run_logger, task  # noqa: E402

from circuitfind import compare, patching  # noqa: E402
from circuitfind.graph import head_name, node_graph, write_graph  # noqa: E402
from circuitfind.io import write_json, write_text  # noqa: E402
from circuitfind.models import load_model  # noqa: E402
from circuitfind.tasks import TaskBatch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CORRUPTIONS = ("str", "gn", "mean", "resample")
DEFAULT_METRICS = ("logit_diff", "prob", "kl")
DEFAULT_DIRECTIONS = ("denoise", "noise")

# Hooks live on the model object, so each worker thread patches its own copy.
_local = threading.local()


def _model(name: str):
    cache = _local.__dict__.setdefault("models", {})
    if name not in cache:
        cache[name] = load_model(name)
    return cache[name]


def setting_name(corruption: str, metric: str, direction: str) -> str:
    return f"{corruption.replace(':', '-')}__{metric}__{direction}"


@task(name="patch-heads", persist_result=False)
def run_setting(model_name: str, task_name: str, n_prompts: int, seed: int, corruption: str, metric: str,
                direction: str, out_dir: str, k: float = 2.0) -> dict:
    """Head patching under one setting; writes ``<setting>.json`` and ``<setting>.graphml``."""
    model = _model(model_name)
    batch = TaskBatch.build(model, task_name, n_prompts, seed=seed)
    setup = patching.prepare(model, batch, corruption, metric)
    result = patching.patch_heads(setup, direction)
    sign = "positive" if direction == "denoise" else "negative"
    found = [head_name(l, h) for l, h in patching.detect(result.effect, k=k, sign=sign)]
    name = setting_name(corruption, metric, direction)
    out = Path(out_dir) / "settings"
    graph = node_graph(model.cfg.n_layers, model.cfg.n_heads, result.normalised, set(found),
                       setting=name, model=model_name, task=task_name)
    write_graph(graph, out / f"{name}.graphml")
    record = {"setting": name, "corruption": corruption, "metric": metric, "direction": direction,
              "clean": result.clean, "corrupt": result.corrupt, "normalised": result.normalised.tolist(),
              "effect": result.effect.tolist(), "circuit": found, "k": k}
    write_json(out / f"{name}.json", record)
    return {"setting": name, "circuit": found, "json": str(out / f"{name}.json"), "graphml": str(out / f"{name}.graphml")}


def _matrix_table(names: list[str], values: dict[tuple[str, str], float]) -> str:
    short = [f"s{i}" for i in range(len(names))]
    lines = ["| | " + " | ".join(short) + " |", "|---" * (len(names) + 1) + "|"]
    for i, a in enumerate(names):
        lines.append(f"| **{short[i]}** | " + " | ".join(f"{values[(a, b)]:.2f}" for b in names) + " |")
    legend = "\n".join(f"- `{s}` = {n}" for s, n in zip(short, names))
    return "\n".join(lines) + "\n\n" + legend


@task(name="compare-circuits", persist_result=False)
def write_report(results: list[dict], out_dir: str, meta: dict) -> str:
    """Overlap matrices and per-head stability across settings, as Markdown."""
    circuits = {r["setting"]: r["circuit"] for r in results}
    names = sorted(circuits)
    jac = compare.pairwise(circuits, compare.jaccard)
    stab = compare.stability(circuits)
    lines = [f"# Circuit diff report: {meta['model']} on {meta['task']}", "",
             f"{len(names)} settings, {meta['prompts']} prompts, heads >= {meta['k']} SD from the mean effect.", "",
             "## Heads found per setting", "", "| setting | heads |", "|---|---|"]
    lines += [f"| {n} | {', '.join(circuits[n]) or '(none)'} |" for n in names]
    lines += ["", "## How often each head is found", "", "| head | fraction of settings |", "|---|---|"]
    lines += [f"| {c} | {f:.2f} |" for c, f in sorted(stab.items(), key=lambda kv: -kv[1])]
    robust = [c for c, f in stab.items() if f == 1.0]
    lines += ["", f"Found under every setting: {', '.join(robust) or 'none'}.", "",
              "## Jaccard overlap of circuits", "", _matrix_table(names, jac), ""]
    path = Path(out_dir) / "report.md"
    write_text(path, "\n".join(lines))
    write_json(Path(out_dir) / "manifest.json", {**meta, "settings": results, "report": str(path)})
    return str(path)


@flow(name="circuitfind-head-sweep", log_prints=True)
def head_sweep(model: str = "toy-ioi", task_name: str = "ioi", prompts: int = 60, seed: int = 0,
               corruptions: list[str] = list(DEFAULT_CORRUPTIONS), metrics: list[str] = list(DEFAULT_METRICS),
               directions: list[str] = list(DEFAULT_DIRECTIONS), run: str | None = None,
               outputs: str = str(REPO / "outputs"), k: float = 2.0) -> str:
    """Fan head patching out over every (corruption, metric, direction) and compare the circuits."""
    log = get_run_logger()
    run = run or time.strftime("%Y%m%d-%H%M%S")
    out_dir = str(Path(outputs) / run)
    grid = list(product(corruptions, metrics, directions))
    log.info("%d settings -> %s", len(grid), out_dir)
    futures = [run_setting.submit(model, task_name, prompts, seed, c, m, d, out_dir, k) for c, m, d in grid]
    results = [f.result() for f in futures]
    meta = {"model": model, "task": task_name, "prompts": prompts, "seed": seed, "k": k, "run": run}
    report = write_report(results, out_dir, meta)
    print(f"report: {report}")
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy-ioi")
    p.add_argument("--task", default="ioi")
    p.add_argument("--prompts", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corruptions", nargs="+", default=list(DEFAULT_CORRUPTIONS))
    p.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS))
    p.add_argument("--directions", nargs="+", default=list(DEFAULT_DIRECTIONS))
    p.add_argument("--run", default=None, help="run name (default: a timestamp)")
    p.add_argument("--outputs", default=str(REPO / "outputs"))
    args = p.parse_args(argv)
    head_sweep(args.model, args.task, args.prompts, args.seed, args.corruptions, args.metrics,
               args.directions, args.run, args.outputs)


if __name__ == "__main__":
    sys.exit(main())
