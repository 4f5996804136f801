"""The settings-sensitivity study as a Prefect flow.

    python flows/study.py                                  # IOI head detection on toy-ioi (about a minute)
    python flows/study.py --direction both                 # both directions, and the Jaccard between them
    python flows/study.py --ioi-models toy-ioi smollm2-135m --factual-models smollm2-135m   # needs the fetched model;
                                                           # 16-30 minutes per SmolLM2 model (16 prompts, 2 CPUs)
    python flows/study.py --ioi-task pairs.jsonl --corruptions str gn --variants   # a dataset file as the head task
    python flows/study.py ... --workers 2 --threads 1    # two parts at once (directions, models, MLP part), 1 thread each

(``python -m circuitfind.flows.study_flow`` when installed.) Writes ``<outputs>/<run>/study.html``,
``study.md`` and ``study.json``; ``<outputs>`` defaults to the checkout's ``outputs/``, or
``./outputs`` when circuitfind is installed from a wheel.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any, Literal

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from circuitfind import patching as P
from circuitfind.checks import positive_int
from circuitfind.errors import USER_ERRORS
from circuitfind.flows.server import prefect_api
from circuitfind.flows.stages import logged_stages
from circuitfind.io import write_json
from circuitfind.models.catalogue import load_model
from circuitfind.paths import run_folder
from circuitfind.runs import study
from circuitfind.tasks.corruptions import get_corruption
from circuitfind.tasks.metrics import get_metric
from circuitfind.threads import threads_per_worker, torch_threads


@task(name="ioi-head-detection", task_run_name="heads-{model_name}", persist_result=False)
def heads_task(
    model_name: str,
    prompts: int,
    seed: int,
    direction: P.Direction | Literal["both"] = "denoise",
    n_boot: int = 500,
    task: str = "ioi",
    **grid,
) -> dict:
    with logged_stages():  # each head sweep (corruption, direction) in the Prefect log
        return study.head_detection(
            load_model(model_name),
            model_name,
            prompts=prompts,
            seed=seed,
            direction=direction,
            n_boot=n_boot,
            task=task,
            **grid,
        )


@task(name="head-detection-direction", task_run_name="heads-{model_name}-{direction}", persist_result=False)
def head_direction_task(
    model_name: str, direction: P.Direction, prompts: int, seed: int, n_boot: int = 500, task: str = "ioi", **grid
) -> tuple[dict, dict]:
    """Head detection in one direction, with its resampled masks (:func:`circuitfind.runs.study.one_direction`);
    its own model, so that directions and models run at once in the flow's worker threads."""
    with logged_stages():
        return study.one_direction(
            load_model(model_name), model_name, direction, prompts=prompts, seed=seed, n_boot=n_boot, task=task, **grid
        )


@task(name="factual-mlp-localisation", task_run_name="mlps-{model_name}", persist_result=False)
def mlps_task(
    model_name: str, prompts: int, seed: int, cache_dir: str | None = None, task: str = "factual", **options
) -> dict:
    """The MLP localisation, read from ``cache_dir`` when the same model files, task, code and options
    were studied before (it does not depend on the head study's choices). The task counts by its
    content (a dataset file by its bytes and options), not by its name or path."""
    from circuitfind.runs.sweep import model_fingerprint, package_fingerprint, task_fingerprint

    blob: dict[str, Any] = {
        "model": model_fingerprint(model_name),
        "task": task_fingerprint(task),
        "code": package_fingerprint(),
    }
    blob |= {
        "name": model_name,
        "prompts": prompts,
        "seed": seed,
        **{k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
    }
    entry = None
    if cache_dir is not None:
        entry = Path(cache_dir) / (hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:20] + ".json")
        if entry.is_file():
            try:
                cached = json.loads(entry.read_text())
                print(f"MLP localisation of {model_name}: from the cache ({entry})")
                return {**cached, "cached": True}
            except (OSError, ValueError):  # a damaged entry is recomputed and replaced
                pass
    with logged_stages():
        out = study.mlp_localisation(
            load_model(model_name), model_name, prompts=prompts, seed=seed, task=task, **options
        )
    if entry is not None:
        write_json(entry, out)
    return out


ONE_AT_A_TIME: Any = ThreadPoolTaskRunner(max_workers=1)  # the flow's parts in turn unless main gives --workers


@flow(name="circuitfind-study", log_prints=True, task_runner=ONE_AT_A_TIME)
def settings_study(
    ioi_models: list[str] | None = None,
    factual_models: list[str] | None = None,
    ioi_prompts: int = 40,
    factual_prompts: int = 12,
    seed: int = 0,
    run: str | None = None,
    outputs: str | None = None,
    direction: P.Direction | Literal["both"] = "denoise",
    n_boot: int = 500,
    grid: dict | None = None,
    mlp: dict | None = None,
    ioi_task: str = "ioi",
    factual_task: str = "factual",
) -> dict:
    """IOI head detection and factual-recall MLP localisation under many settings, and where they disagree.

    ``ioi_models`` defaults to ``["toy-ioi"]``; ``factual_models`` to none (the toy models know no facts);
    ``outputs`` to :func:`circuitfind.paths.default_outputs`. Head detection patches in ``direction``
    (``denoise``, ``noise`` or ``both``) and resamples prompts ``n_boot`` times for intervals and stability;
    ``grid`` holds :func:`circuitfind.runs.study.head_detection`'s other choices (metrics, corruptions, variants,
    k, gn_scale, gn_samples, noise_seed), ``mlp`` :func:`circuitfind.runs.study.mlp_localisation`'s (windows,
    corruption, metric, position, direction), cached in ``<outputs>/.cache/study-mlp/``. ``ioi_task`` and
    ``factual_task`` are the two parts' tasks: a name, a spec file or a dataset file (by default the
    shipped ``ioi`` and ``factual``)."""
    if direction != "both":
        P.check_direction(direction)
    positive_int("n_boot", n_boot)
    ioi_models = ["toy-ioi"] if ioi_models is None else ioi_models
    factual_models = factual_models or []
    ioi_task, factual_task = task_path(ioi_task), task_path(factual_task)
    run_dir = run_folder(outputs, run, "study-")
    # every model x direction and every MLP part is a task of its own, run at once by the flow's task runner
    # (--workers threads; torch's ops release the GIL), each with its own copy of the model
    directions: list[P.Direction] = ["denoise", "noise"] if direction == "both" else [direction]
    parts = {
        (m, d): head_direction_task.submit(m, d, ioi_prompts, seed, n_boot, ioi_task, **(grid or {}))
        for m in ioi_models
        for d in directions
    }
    cache = str(run_dir.parent / ".cache" / "study-mlp")
    mlp_parts = [mlps_task.submit(m, factual_prompts, seed, cache, factual_task, **(mlp or {})) for m in factual_models]
    heads = []
    for m in ioi_models:
        done = [parts[(m, d)].result() for d in directions]
        heads.append(study.combine_directions(m, ioi_task, *done) if direction == "both" else done[0][0])
    mlps = [f.result() for f in mlp_parts]
    paths = study.study_report(heads, mlps, run_dir)
    write_json(run_dir / "study.json", {"heads": heads, "mlps": mlps, "report": paths})
    create_markdown_artifact(Path(paths["markdown"]).read_text(), key="settings-study")
    print(f"study report: {paths['html']}")
    return {"heads": heads, "mlps": mlps, **paths}


def task_path(task: str) -> str:
    """A task file as an absolute path (the flow's tasks may run elsewhere); a name as it is."""
    path = Path(task)
    return str(path.resolve()) if path.is_file() else task


def check_task(task: str, option: str, str_specs: list[str]) -> None:
    """The task loads (a dataset's rows are checked) and has every STR variant named in ``str_specs``."""
    from circuitfind.errors import TaskError
    from circuitfind.tasks.batch import load_task

    spec = load_task(task)
    for name in str_specs:
        kind, _, variant = name.partition(":")
        if kind == "str" and variant and variant not in spec.str_variants:
            raise TaskError(
                f"{option} {task}: no STR variant {variant!r} for {name!r}; the task has {spec.str_variants}"
            )


METRICS = ("prob", "logit_diff", "kl")
CORRUPTIONS = ("str:s2_io", "gn")
VARIANTS = ("str:s2_io", "str:s1_io")


def grid_of(a: argparse.Namespace) -> dict:
    """The head study's grid from the command line."""
    return {
        "metrics": tuple(a.metrics),
        "corruptions": tuple(a.corruptions),
        "variants": tuple(a.variants),
        "k": a.k,
        "gn_scale": a.gn_scale,
        "gn_samples": a.gn_samples,
        "noise_seed": a.noise_seed,
    }


def mlp_of(a: argparse.Namespace) -> dict:
    """The MLP localisation's options from the command line."""
    return {
        "windows": tuple(a.windows),
        "corruption": a.mlp_corruption,
        "metric": a.mlp_metric,
        "position": a.mlp_position,
        "direction": a.mlp_direction,
    }


def check_arguments(a: argparse.Namespace) -> None:
    """Every option checked before Prefect starts: a bad one is one line, not a flow's traceback."""
    from circuitfind.models.catalogue import locate_model
    from circuitfind.tasks.batch import check_prompt_count

    if not a.ioi_models and not a.factual_models:
        raise ValueError("nothing to study: give --ioi-models and/or --factual-models")
    for name in [*a.ioi_models, *a.factual_models]:
        locate_model(name)
    check_prompt_count(a.ioi_prompts)
    if a.ioi_models and a.ioi_prompts < 2:  # refused here, not after Prefect's start and two tracebacks
        raise ValueError(
            f"--ioi-prompts must be at least 2 (got {a.ioi_prompts}): the head study's intervals resample prompts"
        )
    check_prompt_count(a.factual_prompts)
    positive_int("n_boot", a.n_boot)
    positive_int("--gn-samples", a.gn_samples)
    positive_int("--workers", a.workers)
    if a.threads is not None:
        positive_int("--threads", a.threads)
    for name in a.metrics:
        get_metric(name)
    for spec in [*a.corruptions, *a.variants]:
        get_corruption(spec)
    if not a.metrics or not a.corruptions:
        raise ValueError("--metrics and --corruptions need at least one value")
    if not (math.isfinite(a.k) and a.k > 0):
        raise ValueError(f"--k must be a finite number > 0, got {a.k}")
    if not (math.isfinite(a.gn_scale) and a.gn_scale > 0):
        raise ValueError(f"--gn-scale must be a finite number > 0, got {a.gn_scale}")
    for w in a.windows:
        positive_int("--windows", w)
    get_corruption(a.mlp_corruption)
    get_metric(a.mlp_metric)
    if a.ioi_models:
        check_task(a.ioi_task, "--ioi-task", [*a.corruptions, *a.variants])
    if a.factual_models:
        check_task(a.factual_task, "--factual-task", [a.mlp_corruption])
    run_folder(a.outputs, a.run)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ioi-models", nargs="*", default=["toy-ioi"])
    p.add_argument("--factual-models", nargs="*", default=[])
    p.add_argument(
        "--ioi-task", default="ioi",
        help="the head study's task: a name, spec file or dataset file (default ioi); --corruptions and "
        "--variants name its STR variants",
    )  # fmt: skip
    p.add_argument(
        "--factual-task", default="factual",
        help="the MLP study's task, with the --mlp-position key token (default factual)",
    )  # fmt: skip
    p.add_argument("--ioi-prompts", type=int, default=40)
    p.add_argument("--factual-prompts", type=int, default=12)
    p.add_argument(
        "--seed", type=int, default=0, help="prompts, bootstrap resamples and (unless --noise-seed) GN noise; default 0"
    )
    p.add_argument(
        "--direction",
        choices=("denoise", "noise", "both"),
        default="denoise",
        help="head patching direction; both: each, and the Jaccard between them per setting (default denoise)",
    )
    p.add_argument("--n-boot", type=int, default=500, help="prompt resamples for intervals and stability (default 500)")
    p.add_argument("--metrics", nargs="+", default=list(METRICS), help=f"head metrics (default {' '.join(METRICS)})")
    p.add_argument(
        "--corruptions",
        nargs="+",
        default=list(CORRUPTIONS),
        help=f"head corruptions (default {' '.join(CORRUPTIONS)})",
    )
    p.add_argument(
        "--variants", nargs="*", default=list(VARIANTS),
        help=f"STR variants compared under logit_diff (default {' '.join(VARIANTS)}; none: no comparison)",
    )  # fmt: skip
    p.add_argument("--k", type=float, default=2.0, help="SD threshold: heads >= k SD from the mean (default 2.0)")
    p.add_argument("--gn-scale", type=float, default=3.0, help="GN noise in embedding SDs (default 3.0)")
    p.add_argument("--gn-samples", type=int, default=3, help="GN noise samples per prompt (default 3)")
    p.add_argument("--noise-seed", type=int, default=None, help="GN noise seed (default: --seed)")
    p.add_argument("--windows", nargs="+", type=int, default=[1, 3, 5], help="MLP window sizes (default 1 3 5)")
    p.add_argument("--mlp-corruption", default="gn", help="the MLP part's corruption (default gn)")
    p.add_argument("--mlp-metric", default="prob", help="the MLP part's metric (default prob)")
    p.add_argument(
        "--mlp-position", default="subject_last", help="token position the MLPs are patched at (default subject_last)"
    )
    p.add_argument(
        "--mlp-direction", choices=("denoise", "noise"), default="denoise",
        help="the MLP part's direction, independent of --direction (default denoise: restoration, as Meng et al.)",
    )  # fmt: skip
    p.add_argument(
        "--workers", type=int, default=2,
        help="parts run at once (each model's head study per direction, each MLP part; default 2)",
    )  # fmt: skip
    p.add_argument(
        "--threads", type=int, default=None,
        help="torch intra-op threads of each part run at once (default: cores // --workers)",
    )  # fmt: skip
    p.add_argument("--run", default=None, help="run folder name (default: a new study-<time>)")
    p.add_argument("--outputs", default=None, help="default: ./outputs of the current folder")
    a = p.parse_args(argv)
    try:
        check_arguments(a)
        runner: Any = ThreadPoolTaskRunner(max_workers=a.workers)
        with prefect_api(), torch_threads(a.threads or threads_per_worker(a.workers)):
            settings_study.with_options(task_runner=runner)(
                a.ioi_models,
                a.factual_models,
                a.ioi_prompts,
                a.factual_prompts,
                a.seed,
                a.run,
                a.outputs,
                a.direction,
                a.n_boot,
                grid_of(a),
                mlp_of(a),
                a.ioi_task,
                a.factual_task,
            )
    except USER_ERRORS as err:
        print(f"circuitfind: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
