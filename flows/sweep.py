"""The main job: circuit discovery under every setting of a grid, then the circuit diff report.

    python flows/sweep.py                                   # the default grid on the shipped toy-ioi model
    python flows/sweep.py --algorithms eap_ig acdc --corruptions str gn --metrics kl --run my-run
    python flows/sweep.py --dask                            # fan out on a local Dask cluster (prefect-dask)

Each (model, task, algorithm, corruption, metric, direction) is one Prefect task that writes
``outputs/<run>/circuits/<setting>.graphml`` / ``.json`` (and per-prompt scores for EAP/EAP-IG),
cached by its inputs in ``outputs/.cache`` so a rerun or a crashed sweep resumes. The
``circuitfind-compare`` flow then writes ``outputs/<run>/report.html`` and ``report.md`` (also a
Prefect Markdown artifact) and ``manifest.json``.

Prefect runs embedded (a temporary local server) unless ``PREFECT_API_URL`` points to a server.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

from prefect import flow, get_run_logger, task, unmapped  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.futures import as_completed  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402

import circuitfind  # noqa: E402
from circuitfind.io import write_json  # noqa: E402
from circuitfind.report import write_run_report  # noqa: E402
from circuitfind.sweep import Setting, SweepConfig, describe, run_setting  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUTS = str(REPO / "outputs")


@task(name="discover", task_run_name="{setting.name}", persist_result=False)
def discover_setting(setting: Setting, config: SweepConfig, run_dir: str, cache_dir: str) -> dict:
    """One setting's circuit; files are written by the task, only paths travel through Prefect."""
    return run_setting(setting, config, run_dir, cache_dir)


@task(name="diff-report", persist_result=False)
def report_task(run_dir: str, reference: str | None, title: str) -> dict:
    paths = write_run_report(run_dir, reference, title)
    create_markdown_artifact(paths.pop("markdown_text"), key="circuit-diff-report", description=title)
    return paths


@flow(name="circuitfind-compare", log_prints=True)
def compare_run(run_dir: str, reference: str | None = None, title: str | None = None) -> dict:
    """Compare every circuit in a run folder and write the diff report."""
    title = title or f"Circuit diff report: {Path(run_dir).name}"
    return report_task(run_dir, reference, title)


@flow(name="circuitfind-sweep", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=2))
def sweep(config: SweepConfig | None = None, run: str | None = None, outputs: str = DEFAULT_OUTPUTS,
          reference: str | None = None) -> dict:
    """Discover circuits over the grid of ``config`` (default: :class:`SweepConfig`'s) and compare them."""
    log = get_run_logger()
    config = config or SweepConfig()
    run = run or time.strftime("%Y%m%d-%H%M%S")
    run_dir, cache_dir = Path(outputs) / run, Path(outputs) / ".cache"
    settings = config.settings()
    log.info("%d settings -> %s", len(settings), run_dir)
    futures = discover_setting.map(settings, unmapped(config), unmapped(str(run_dir)), unmapped(str(cache_dir)))
    results, failures = [], []
    by_future = {f.task_run_id: s for f, s in zip(futures, settings)}
    for done, future in enumerate(as_completed(futures), 1):
        setting = by_future[future.task_run_id]
        outcome = future.result(raise_on_failure=False)
        if isinstance(outcome, BaseException):
            failures.append({"setting": setting.name, "error": f"{type(outcome).__name__}: {outcome}"})
            log.warning("[%d/%d] %s failed: %s", done, len(settings), setting.name, outcome)
        else:
            results.append(outcome)
            log.info("[%d/%d] %s: %s", done, len(settings), setting.name, describe(outcome))
    if not results:
        raise RuntimeError(f"every setting failed; first error: {failures[0]['error'] if failures else 'none'}")
    report = compare_run(str(run_dir), reference)
    manifest = {"run": run, "version": circuitfind.__version__, "config": config.model_dump(), "settings": sorted(results, key=lambda r: r["setting"]),
                "failures": failures, "report": report}
    write_json(run_dir / "manifest.json", manifest)
    print(f"report: {report['html']}")
    return manifest


def dask_runner(workers: int = 2):
    """A local Dask cluster (threads) as the task runner: needs the ``dask`` extra (prefect-dask)."""
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as err:  # pragma: no cover - depends on the installed extras
        raise SystemExit("--dask needs prefect-dask: pip install 'circuitfind[dask]'") from err
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": False})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = SweepConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("models", "tasks", "algorithms", "corruptions", "metrics", "directions"):
        p.add_argument(f"--{name}", nargs="+", default=getattr(defaults, name))
    for name in ("prompts", "seed", "top_k", "ig_steps", "path_depth", "max_batch"):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int, default=getattr(defaults, name))
    for name in ("acdc_tau", "path_k", "node_k"):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=float, default=getattr(defaults, name))
    p.add_argument("--device", default=None)
    p.add_argument("--run", default=None, help="run name (default: a timestamp); reuse one to resume")
    p.add_argument("--outputs", default=DEFAULT_OUTPUTS)
    p.add_argument("--reference", default=None, help="setting name whose circuit is the reference")
    p.add_argument("--dask", action="store_true", help="run tasks on a local Dask cluster (prefect-dask)")
    p.add_argument("--workers", type=int, default=2)
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> SweepConfig:
    return SweepConfig(**{k: v for k, v in vars(args).items() if k in SweepConfig.model_fields})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = config_from_args(args)
    flow_fn = sweep.with_options(task_runner=dask_runner(args.workers)) if args.dask else sweep.with_options(
        task_runner=ThreadPoolTaskRunner(max_workers=args.workers))
    manifest = flow_fn(config, args.run, args.outputs, args.reference)
    print(json.dumps({"report": manifest["report"]["html"], "settings": len(manifest["settings"]), "failures": len(manifest["failures"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
