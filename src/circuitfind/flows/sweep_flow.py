"""The main job: circuit discovery under every setting of a grid, then the circuit diff report.

    circuitfind sweep                                       # the default grid on the shipped toy-ioi model
    circuitfind sweep --algorithms eap_ig acdc --corruptions str gn --metrics kl --run my-run
    circuitfind sweep --dask --workers 4                    # fan out on 4 local Dask worker processes
    circuitfind sweep --dask-address tcp://HOST:8786        # run the settings on an existing Dask cluster

(``python flows/sweep.py ...`` in a checkout takes the same options.) Each (model, task, algorithm,
corruption, metric, direction) is one Prefect task that writes ``<outputs>/<run>/circuits/<setting>.graphml``
/ ``.json`` (and per-prompt scores for EAP/EAP-IG), cached by its inputs in ``<outputs>/.cache`` so a
rerun or a crashed sweep resumes. The ``circuitfind-compare`` flow then writes ``<outputs>/<run>/report.html``
and ``report.md`` (also a Prefect Markdown artifact) and ``manifest.json``. ``<outputs>`` defaults to the
checkout's ``outputs/``, or ``./outputs`` when circuitfind is installed from a wheel.

The grid is checked before Prefect starts. Prefect reports to ``PREFECT_API_URL`` when it is set;
otherwise the command runs a local Prefect server for as long as it runs
(:mod:`circuitfind.flows.server`).

On Dask (prefect-dask) every setting is a Dask task. Each worker process loads a model once and reuses
it (:data:`circuitfind.runs.sweep.MODELS`); a worker that does not see or cannot write the outputs folder,
or lacks the CUDA device a setting asks for, fails that setting with a message naming the worker. With
``--device cuda`` each setting asks Dask for one ``GPU`` resource, so workers started with
``--resources GPU=1`` run one setting per GPU at a time.
"""

from __future__ import annotations

import argparse
import contextlib
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
from circuitfind.errors import USER_ERRORS, CircuitfindError
from circuitfind.flows.diff_flow import check_series, diff_with_previous, record_completed
from circuitfind.flows.server import prefect_api, probe_dask_scheduler
from circuitfind.flows.stages import logged_stages
from circuitfind.io import write_json
from circuitfind.methods import registry
from circuitfind.paths import check_run_name, check_writable_folder, default_outputs
from circuitfind.reports import write_run_report
from circuitfind.runs.health import check_run
from circuitfind.runs.sweep import (
    Setting,
    SweepConfig,
    check_run_folder,
    check_run_lock,
    check_worker,
    describe,
    mark_run_folder,
    run_lock,
    run_setting,
    worker_info,
)
from circuitfind.tasks.corruptions import CORRUPTIONS
from circuitfind.tasks.metrics import METRICS
from circuitfind.threads import THREADS_ENV, apply_worker_threads, threads_per_worker, torch_threads

GRID_HELP = {
    "models": "shipped or fetched model (circuitfind models), HF folder or hub name",
    "tasks": "task name (circuitfind tasks) or JSON file",
    "algorithms": ", ".join(registry.names()) + ", package.module:Class",
    "corruptions": ", ".join(c if c != "str" else "str, str:<variant>" for c in CORRUPTIONS),
    "metrics": ", ".join(METRICS) + ", package.module:function",
    "directions": "noise, denoise",
}
DASK_ADDRESS_ENV = "CIRCUITFIND_DASK_ADDRESS"
SHARED_OPTIONS = ("prompts", "seed", "max_batch")  # besides the methods' options (circuitfind.methods.registry)


class SweepError(CircuitfindError, RuntimeError):
    """The sweep cannot go on: every setting failed, or no Dask worker offers the GPU the settings ask for."""


@task(name="discover", task_run_name="{setting.name}", persist_result=False)
def discover_setting(setting: Setting, config: SweepConfig, run_dir: str, cache_dir: str) -> dict:
    """One setting's circuit; files are written by the task, only paths travel through Prefect."""
    apply_worker_threads()
    check_worker(setting, config, run_dir, cache_dir)
    with logged_stages(setting.name):  # each stage (baselines, searching, faithfulness, curve) in the Prefect log
        return {**run_setting(setting, config, run_dir, cache_dir), "worker": worker_info()}


def gpu_resources(config: SweepConfig):
    """A context in which submitted settings ask Dask for one ``GPU`` resource, when they run on CUDA (other task
    runners ignore Dask annotations); a no-op otherwise."""
    if config.device is None or not config.device.startswith("cuda"):
        return contextlib.nullcontext()
    try:
        import dask
    except ImportError:  # no Dask, so no Dask task runner either
        return contextlib.nullcontext()
    return dask.annotate(resources={"GPU": 1})


def check_gpu_workers(config: SweepConfig) -> None:
    """On Dask, the cluster must have workers, and with CUDA settings some worker must offer the
    ``GPU`` resource: else Dask would hold the settings forever."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    runner = context.task_runner if context else None
    if not hasattr(runner, "client"):
        return
    workers = runner.client.scheduler_info().get("workers", {})
    if not workers:  # Dask would hold every setting until a worker joins: a sweep that never ends
        raise SweepError(
            f"the Dask cluster at {runner.client.scheduler.address} has no workers: start some with "
            "`dask worker SCHEDULER --nworkers 1 --nthreads 1`"
        )
    if config.device is None or not config.device.startswith("cuda"):
        return
    if not any(w.get("resources", {}).get("GPU", 0) >= 1 for w in workers.values()):
        raise SweepError(
            f"the settings run on {config.device!r} and ask Dask for a GPU, but none of the "
            f"{len(workers)} workers of the cluster offers one: start GPU workers with "
            "`dask worker SCHEDULER --resources GPU=1` (one per GPU)"
        )


@task(name="diff-report", persist_result=False)
def report_task(run_dir: str, reference: str | None, title: str) -> dict:
    paths = write_run_report(run_dir, reference, title)
    create_markdown_artifact(paths.pop("markdown_text"), key="circuit-diff-report", description=title)
    create_report_artifacts(run_dir, paths["html"])
    return paths


def create_report_artifacts(run_dir: str, html: str) -> None:
    """What a scheduled run's reader needs in the Prefect UI: the report's location (a link artifact),
    the axis ranking and each setting's circuit summary (edges, faithfulness, health flags) as tables."""
    from prefect.artifacts import create_link_artifact, create_table_artifact

    from circuitfind.runs.health import check_records
    from circuitfind.runs.statistics import axis_effects
    from circuitfind.runs.sweep import load_records

    create_link_artifact(
        Path(html).resolve().as_uri(), link_text=str(Path(html).resolve()), key="circuit-diff-report-link"
    )
    records = load_records(run_dir)
    ranking = [
        {
            "axis": e["axis"],
            "values": ", ".join(e["values"]),
            "pairs": len(e["pairs"]),
            "moves the circuit (1 - edge Jaccard)": e["movement"],
        }
        for e in axis_effects(records)
    ]
    create_table_artifact(ranking or [{"axis": "(no axis takes two values)"}], key="axis-ranking")
    health = check_records(records)
    summary = [
        {
            "setting": r["setting"],
            "edges": r["n_edges"],
            "faithfulness": r.get("faithfulness"),
            "faithfulness status": r.get("faithfulness_status") or "ok",
            "flags": ", ".join(health[r["setting"]]["flags"]) or "none",
        }
        for r in records
    ]
    create_table_artifact(summary, key="circuit-summary")


@task(name="circuit-explorer", persist_result=False)
def explorer_task(run_dir: str) -> str | None:
    """Write the run's interactive circuit explorer (``<run>/explorer.html``) and a link artifact to it. A run
    whose circuits the page cannot show (unusable records) keeps its report: the problem is logged, not raised."""
    from prefect.artifacts import create_link_artifact

    from circuitfind.reports.explorer import write_explorer

    try:
        page = write_explorer(run_dir).resolve()
    except (ValueError, OSError) as err:
        get_run_logger().warning("no circuit explorer for %s: %s", run_dir, err)
        return None
    create_link_artifact(page.as_uri(), link_text=str(page), key="circuit-explorer-link")
    return str(page)


@flow(name="circuitfind-compare", log_prints=True)
def compare_run(run_dir: str, reference: str | None = None, title: str | None = None) -> dict:
    """Write the run's circuit explorer, then compare every circuit in the run folder in the diff report
    (which links to the explorer when it was written)."""
    if not title:  # the run's name and what it studies (a run named by the clock still says what it is)
        from circuitfind.reports.sweep_report import default_title
        from circuitfind.runs.records import load_records

        title = default_title(run_dir, load_records(run_dir))
    explorer = explorer_task(run_dir)
    return {**report_task(run_dir, reference, title), "explorer": explorer}


@flow(name="circuitfind-sweep", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=2))
def sweep(
    config: SweepConfig | None = None,
    run: str | None = None,
    outputs: str | None = None,
    reference: str | None = None,
    series: str | None = None,
) -> dict:
    """Discover circuits over the grid of ``config`` (default: :class:`SweepConfig`'s) and compare them.

    ``outputs`` defaults to :func:`circuitfind.paths.default_outputs`. With ``series`` (the scheduled
    deployment passes its name), the run is then diffed against the series' last completed run
    (:func:`circuitfind.flows.diff_flow.diff_with_previous`) and becomes that run."""
    if series is not None:
        check_series(series)
    config = config or SweepConfig()
    run = check_run_name(run) if run is not None else time.strftime("%Y%m%d-%H%M%S")
    outputs = outputs or str(default_outputs())
    run_dir, cache_dir = Path(outputs) / run, Path(outputs) / ".cache"
    settings = config.settings()
    with run_lock(run_dir, config):  # a concurrent sweep with other parameters would replace this run's manifest
        check_run_folder(run_dir, settings, config)
        return _sweep(config, run, outputs, reference, series, run_dir, cache_dir, settings)


def _sweep(
    config: SweepConfig,
    run: str,
    outputs: str,
    reference: str | None,
    series: str | None,
    run_dir: Path,
    cache_dir: Path,
    settings: list[Setting],
) -> dict:
    """The sweep's body, run while it holds the run folder (:func:`circuitfind.runs.sweep.run_lock`)."""
    log = get_run_logger()
    log.info("%d settings -> %s", len(settings), run_dir)
    check_gpu_workers(config)
    mark_run_folder(run_dir, cache_dir)
    with gpu_resources(config):
        futures = discover_setting.map(settings, unmapped(config), unmapped(str(run_dir)), unmapped(str(cache_dir)))
    results: list[dict] = []
    failures: list[dict] = []
    by_future = {f.task_run_id: s for f, s in zip(futures, settings, strict=True)}
    for done, future in enumerate(as_completed(futures), 1):
        setting = by_future[future.task_run_id]
        outcome: dict | BaseException
        try:
            outcome = future.result(raise_on_failure=False)
        except Exception as err:  # the runner lost the task (e.g. Dask's KilledWorker: its worker process died)
            outcome = err
        if isinstance(outcome, BaseException):
            failures.append({"setting": setting.name, "error": f"{type(outcome).__name__}: {outcome}"})
            log.warning("[%d/%d] %s failed: %s", done, len(settings), setting.name, outcome)
        else:
            results.append(outcome)
            log.info("[%d/%d] %s: %s", done, len(settings), setting.name, describe(outcome))
    if not results:
        raise SweepError(f"every setting failed; first error: {failures[0]['error'] if failures else 'none'}")
    manifest = {
        "run": run,
        "version": circuitfind.__version__,
        "config": config.model_dump(),
        "settings": sorted(results, key=lambda r: r["setting"]),
        "failures": failures,
        "health": check_run(run_dir),  # per setting: its flags and pitfalls
    }
    write_json(run_dir / "manifest.json", manifest)  # first without the report: the report reads the run's parameters
    report = compare_run(str(run_dir), reference)
    manifest["report"] = report
    write_json(run_dir / "manifest.json", manifest)
    if series is not None:  # after the manifest: the diff reads it, and only a completed run becomes the baseline
        manifest["previous_run_diff"] = diff_with_previous(outputs, series, run_dir)
        write_json(run_dir / "manifest.json", manifest)
        record_completed(outputs, series, run_dir)
    print(f"report: {report['html']}")
    if report.get("explorer"):
        print(f"explorer: {report['explorer']}")
    return manifest


def dask_runner(workers: int = 2, address: str | None = None, torch_threads: int | None = None):
    """Dask as the task runner (the ``dask`` extra, prefect-dask): the existing cluster whose scheduler is at
    ``address``, else a local cluster of ``workers`` worker processes, one thread each, each with
    ``torch_threads`` intra-op threads (default: its share of this machine's cores,
    :func:`circuitfind.threads.threads_per_worker`).

    Worker processes report task runs to the flow's Prefect API (the task's context carries it; a local cluster
    also gets ``PREFECT_API_URL`` in its environment)."""
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as err:  # pragma: no cover - depends on the installed extras
        raise SystemExit("--dask and --dask-address need prefect-dask: pip install 'circuitfind[dask]'") from err
    if address:
        return DaskTaskRunner(address=address)
    env = {THREADS_ENV: str(torch_threads or threads_per_worker(workers))}
    if os.environ.get("PREFECT_API_URL"):
        env["PREFECT_API_URL"] = os.environ["PREFECT_API_URL"]
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": workers,
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": None,
            "env": env,
        }
    )


def check_dask_cluster(address: str, timeout: float = 10) -> None:
    """Reach the scheduler at ``address`` before the run starts: an unreachable address, a service that is
    not Dask, or a cluster without workers is one clear error in seconds
    (:func:`circuitfind.flows.server.probe_dask_scheduler`), not a traceback or a sweep that waits forever."""
    if not probe_dask_scheduler(address, timeout):
        raise ValueError(
            f"--dask-address: the Dask cluster at {address!r} has no workers: start some with "
            "`dask worker SCHEDULER --nworkers 1 --nthreads 1`"
        )


# --------------------------------------------------------------------------------------------
# The command line: `circuitfind sweep` and `python flows/sweep.py` share these options.


def _option(field: str) -> str:
    return f"--{field.replace('_', '-')}"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The sweep's options (the grid and the shared parameters of :class:`SweepConfig`, and the run's)."""
    defaults = SweepConfig()
    grid = parser.add_argument_group("grid (every combination is one setting; ACDC runs noising only)")
    for name, choices in GRID_HELP.items():
        grid.add_argument(
            _option(name),
            nargs="+",
            default=getattr(defaults, name),
            metavar=name.upper().rstrip("S"),
            help=f"{choices} (default: {' '.join(getattr(defaults, name))})",
        )
    shared = parser.add_argument_group("parameters shared by every setting")
    for name in SHARED_OPTIONS:
        shared.add_argument(
            _option(name),
            dest=name,
            type=int,
            default=getattr(defaults, name),
            help=f"{SweepConfig.model_fields[name].description} (default: {getattr(defaults, name)})",
        )
    registry.add_arguments(parser.add_argument_group("method options (each method reads its own)"), defaults)
    shared.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    shared.add_argument(
        "--dtype",
        default=defaults.dtype,
        choices=("float32", "bfloat16", "float16"),
        help=f"model weights and activations (default: {defaults.dtype}; float16 needs a GPU)",
    )
    run = parser.add_argument_group("the run")
    run.add_argument("--run", default=None, help="run name (default: a timestamp); reuse one to resume")
    run.add_argument(
        "--outputs",
        default=None,
        help="folder of runs and of the cache (default: ./outputs of the current folder)",
    )
    run.add_argument("--reference", default=None, help="setting name whose circuit is the reference")
    run.add_argument(
        "--dask", action="store_true", help="run settings on a local Dask cluster of --workers processes (prefect-dask)"
    )
    run.add_argument(
        "--dask-address",
        default=os.environ.get(DASK_ADDRESS_ENV) or None,
        metavar="ADDRESS",
        help=f"run settings on the existing Dask scheduler at ADDRESS, e.g. tcp://host:8786 "
        f"(default: ${DASK_ADDRESS_ENV}); outputs must be on a filesystem every worker shares",
    )
    run.add_argument("--workers", type=int, default=2, help="parallel settings on this machine (default: 2)")
    run.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        metavar="N",
        help="torch intra-op threads of each parallel setting on this machine (default: cores // --workers)",
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="circuitfind sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
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


def config_from_args(args: argparse.Namespace, device_here: bool = True) -> SweepConfig:
    """The checked :class:`SweepConfig` of parsed options; ValueError (one line) when they cannot work.
    ``device_here=False``: the settings run elsewhere (a Dask cluster), so the device is not looked for here."""
    try:
        config = SweepConfig(**{k: v for k, v in vars(args).items() if k in SweepConfig.model_fields})
    except ValidationError as err:
        raise ValueError(_one_line(err)) from None
    return config.check(device_here=device_here)


def check_run_options(args: argparse.Namespace, config: SweepConfig) -> None:
    """The run's own options: a plain run name (an existing run folder only with the same grid),
    workers >= 1, a reference setting of the grid."""
    if args.workers < 1:
        raise ValueError(f"--workers: must be at least 1 (got {args.workers})")
    if getattr(args, "torch_threads", None) is not None and args.torch_threads < 1:
        raise ValueError(f"--torch-threads: must be at least 1 (got {args.torch_threads})")
    outputs = Path(args.outputs) if args.outputs else default_outputs()
    check_writable_folder(outputs)  # before Prefect starts: else every setting fails on it
    if outputs.is_dir():
        for name in (".cache", *([args.run] if args.run is not None else [])):
            if (outputs / name).exists() and not (outputs / name).is_dir():
                raise ValueError(f"--outputs: {outputs / name} is a file, not a folder")
    if args.run is not None:
        check_run_name(args.run)
        check_run_folder(outputs / args.run, config.settings(), config)
        check_run_lock(outputs / args.run, config)
    if args.reference is not None:
        names = {s.name for s in config.settings()}
        if args.reference not in names:
            raise ValueError(f"--reference: {args.reference!r} is not a setting of this grid (e.g. {min(names)!r})")


def run_from_args(args: argparse.Namespace) -> dict:
    """Check the options, then run the sweep against the configured Prefect API or a local server."""
    address = getattr(args, "dask_address", None)
    config = config_from_args(args, device_here=not address)
    check_run_options(args, config)
    if address:
        check_dask_cluster(address)
    run = args.run if args.run is not None else time.strftime("%Y%m%d-%H%M%S")
    outputs = Path(args.outputs) if args.outputs else default_outputs()
    # Held before Prefect starts, so a concurrent sweep of another grid is refused in one line (inside the
    # flow the refusal came after Prefect's traceback); the flow takes the same lock again, shared.
    with run_lock(outputs / run, config), prefect_api():
        if address or args.dask:
            runner = dask_runner(args.workers, address, getattr(args, "torch_threads", None))
            threads: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        else:  # torch's threads are per process: each of the settings run at once gets its share of them
            runner = ThreadPoolTaskRunner(max_workers=args.workers)
            threads = torch_threads(getattr(args, "torch_threads", None) or threads_per_worker(args.workers))
        with threads:
            manifest = sweep.with_options(task_runner=runner)(config, run, str(outputs), args.reference)
    print(
        json.dumps(
            {
                "report": manifest["report"]["html"],
                "settings": len(manifest["settings"]),
                "failures": len(manifest["failures"]),
            }
        )
    )
    if manifest["failures"]:
        names = ", ".join(f["setting"] for f in manifest["failures"])
        print(
            f"circuitfind: warning: {len(manifest['failures'])} of {len(manifest['failures']) + len(manifest['settings'])} "
            f"settings failed ({names}); run again with --run {manifest['run']} to compute only those",
            file=sys.stderr,
        )
    return manifest


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        manifest = run_from_args(args)
    except USER_ERRORS as err:
        print(f"circuitfind: error: {err}", file=sys.stderr)
        return 2
    return 1 if manifest["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
