"""The main job: circuit discovery under every setting of a grid, then the circuit diff report.

    circuitfind sweep                                       # the default grid on the shipped toy-ioi model
    circuitfind sweep --algorithms eap_ig acdc --corruptions str gn --metrics kl --run my-run
    circuitfind sweep --dask                                # fan out on a local Dask cluster (prefect-dask)

(``python flows/sweep.py ...`` in a checkout takes the same options.) Each (model, task, algorithm,
corruption, metric, direction) is one Prefect task that writes ``<outputs>/<run>/circuits/<setting>.graphml``
/ ``.json`` (and per-prompt scores for EAP/EAP-IG), cached by its inputs in ``<outputs>/.cache`` so a
rerun or a crashed sweep resumes. The ``circuitfind-compare`` flow then writes ``<outputs>/<run>/report.html``
and ``report.md`` (also a Prefect Markdown artifact) and ``manifest.json``. ``<outputs>`` defaults to the
checkout's ``outputs/``, or ``./outputs`` when circuitfind is installed from a wheel.

The grid is checked before Prefect starts. Prefect reports to ``PREFECT_API_URL`` when it is set;
otherwise the command runs a local Prefect server for as long as it runs
(:mod:`circuitfind.flows.server`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import ValidationError

import circuitfind
from circuitfind.corruptions import CORRUPTIONS
from circuitfind.discovery import ALGORITHMS
from circuitfind.errors import USER_ERRORS
from circuitfind.flows.diff import check_series, diff_with_previous, record_completed
from circuitfind.flows.server import prefect_api
from circuitfind.health import check_run
from circuitfind.io import write_json
from circuitfind.metrics import METRICS
from circuitfind.paths import default_outputs
from circuitfind.report import write_run_report
from circuitfind.sweep import Setting, SweepConfig, check_run_folder, describe, run_setting

GRID_HELP = {
    "models": "shipped or fetched model (circuitfind models), HF folder or hub name",
    "tasks": "task name (circuitfind tasks) or JSON file",
    "algorithms": ", ".join(ALGORITHMS),
    "corruptions": ", ".join(c if c != "str" else "str, str:<variant>" for c in CORRUPTIONS),
    "metrics": ", ".join(METRICS),
    "directions": "noise, denoise",
}
INT_OPTIONS = ("prompts", "seed", "top_k", "ig_steps", "path_depth", "max_batch")
FLOAT_OPTIONS = ("acdc_tau", "path_k", "node_k")


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
def sweep(config: SweepConfig | None = None, run: str | None = None, outputs: str | None = None,
          reference: str | None = None, series: str | None = None) -> dict:
    """Discover circuits over the grid of ``config`` (default: :class:`SweepConfig`'s) and compare them.

    ``outputs`` defaults to :func:`circuitfind.paths.default_outputs`. With ``series`` (the scheduled
    deployment passes its name), the run is then diffed against the series' last completed run
    (:func:`circuitfind.flows.diff.diff_with_previous`) and becomes that run."""
    log = get_run_logger()
    if series is not None:
        check_series(series)
    config = config or SweepConfig()
    run = run or time.strftime("%Y%m%d-%H%M%S")
    outputs = outputs or str(default_outputs())
    run_dir, cache_dir = Path(outputs) / run, Path(outputs) / ".cache"
    settings = config.settings()
    check_run_folder(run_dir, settings)
    log.info("%d settings -> %s", len(settings), run_dir)
    futures = discover_setting.map(settings, unmapped(config), unmapped(str(run_dir)), unmapped(str(cache_dir)))
    results: list[dict] = []
    failures: list[dict] = []
    by_future = {f.task_run_id: s for f, s in zip(futures, settings, strict=True)}
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
                "failures": failures, "report": report, "health": check_run(run_dir)}  # per setting: its flags and pitfalls
    write_json(run_dir / "manifest.json", manifest)
    if series is not None:  # after the manifest: the diff reads it, and only a completed run becomes the baseline
        manifest["previous_run_diff"] = diff_with_previous(outputs, series, run_dir)
        write_json(run_dir / "manifest.json", manifest)
        record_completed(outputs, series, run_dir)
    print(f"report: {report['html']}")
    return manifest


def dask_runner(workers: int = 2):
    """A local Dask cluster (threads) as the task runner: needs the ``dask`` extra (prefect-dask)."""
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as err:  # pragma: no cover - depends on the installed extras
        raise SystemExit("--dask needs prefect-dask: pip install 'circuitfind[dask]'") from err
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": False})


# --------------------------------------------------------------------------------------------
# The command line: `circuitfind sweep` and `python flows/sweep.py` share these options.


def _option(field: str) -> str:
    return f"--{field.replace('_', '-')}"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The sweep's options (the grid and the shared parameters of :class:`SweepConfig`, and the run's)."""
    defaults = SweepConfig()
    grid = parser.add_argument_group("grid (every combination is one setting; ACDC runs noising only)")
    for name, choices in GRID_HELP.items():
        grid.add_argument(_option(name), nargs="+", default=getattr(defaults, name), metavar=name.upper().rstrip("S"),
                          help=f"{choices} (default: {' '.join(getattr(defaults, name))})")
    shared = parser.add_argument_group("parameters shared by every setting")
    for names, kind in ((INT_OPTIONS, int), (FLOAT_OPTIONS, float)):
        for name in names:
            shared.add_argument(_option(name), dest=name, type=kind, default=getattr(defaults, name),
                                help=f"{SweepConfig.model_fields[name].description} (default: {getattr(defaults, name)})")
    shared.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    shared.add_argument("--dtype", default=defaults.dtype, choices=("float32", "bfloat16", "float16"),
                        help=f"model weights and activations (default: {defaults.dtype}; float16 needs a GPU)")
    run = parser.add_argument_group("the run")
    run.add_argument("--run", default=None, help="run name (default: a timestamp); reuse one to resume")
    run.add_argument("--outputs", default=None,
                     help="folder of runs and of the cache (default: the checkout's outputs/, else ./outputs)")
    run.add_argument("--reference", default=None, help="setting name whose circuit is the reference")
    run.add_argument("--dask", action="store_true", help="run tasks on a local Dask cluster (prefect-dask)")
    run.add_argument("--workers", type=int, default=2, help="parallel settings (default: 2)")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="circuitfind sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_arguments(parser)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    return build_parser().parse_args(argv[1:] if argv[:1] == ["--"] else argv)


def _one_line(err: ValidationError) -> str:
    """A pydantic validation error as one line naming the options."""
    problems = []
    for e in err.errors():
        where = _option(str(e["loc"][0])) if e["loc"] else "options"
        if e["type"] == "value_error":
            problems.append(f"{where}: {e['ctx']['error']}")
        else:
            problems.append(f"{where}: {e['msg'][0].lower()}{e['msg'][1:]} (got {e['input']!r})")
    return "; ".join(problems)


def config_from_args(args: argparse.Namespace) -> SweepConfig:
    """The checked :class:`SweepConfig` of parsed options; ValueError (one line) when they cannot work."""
    try:
        config = SweepConfig(**{k: v for k, v in vars(args).items() if k in SweepConfig.model_fields})
    except ValidationError as err:
        raise ValueError(_one_line(err)) from None
    return config.check()


def check_run_options(args: argparse.Namespace, config: SweepConfig) -> None:
    """The run's own options: a plain run name (an existing run folder only with the same grid),
    workers >= 1, a reference setting of the grid."""
    if args.workers < 1:
        raise ValueError(f"--workers: must be at least 1 (got {args.workers})")
    if args.run is not None and (not args.run.strip() or args.run in (".", "..") or "/" in args.run or os.sep in args.run):
        raise ValueError(f"--run: {args.run!r} is not a folder name (the run is a folder of --outputs)")
    if args.run is not None:
        check_run_folder((Path(args.outputs) if args.outputs else default_outputs()) / args.run, config.settings())
    if args.reference is not None:
        names = {s.name for s in config.settings()}
        if args.reference not in names:
            raise ValueError(f"--reference: {args.reference!r} is not a setting of this grid (e.g. {min(names)!r})")


def run_from_args(args: argparse.Namespace) -> dict:
    """Check the options, then run the sweep against the configured Prefect API or a local server."""
    config = config_from_args(args)
    check_run_options(args, config)
    runner = dask_runner(args.workers) if args.dask else ThreadPoolTaskRunner(max_workers=args.workers)
    with prefect_api():
        manifest = sweep.with_options(task_runner=runner)(config, args.run, args.outputs, args.reference)
    print(json.dumps({"report": manifest["report"]["html"], "settings": len(manifest["settings"]),
                      "failures": len(manifest["failures"])}))
    return manifest


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run_from_args(args)
    except USER_ERRORS as err:
        print(f"circuitfind: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
