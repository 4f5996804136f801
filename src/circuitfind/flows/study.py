"""The settings-sensitivity study as a Prefect flow.

    python flows/study.py                                  # IOI head detection on toy-ioi (about a minute)
    python flows/study.py --ioi-models toy-ioi smollm2-135m --factual-models smollm2-135m   # needs the fetched model;
                                                           # about 15 minutes on 2 CPUs

(``python -m circuitfind.flows.study`` when installed.) Writes ``<outputs>/<run>/study.html``,
``study.md`` and ``study.json``; ``<outputs>`` defaults to the checkout's ``outputs/``, or
``./outputs`` when circuitfind is installed from a wheel.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from circuitfind import patching as P
from circuitfind import study
from circuitfind.catalogue import load_model
from circuitfind.checks import positive_int
from circuitfind.errors import USER_ERRORS
from circuitfind.flows.server import prefect_api
from circuitfind.io import write_json
from circuitfind.paths import run_folder


@task(name="ioi-head-detection", task_run_name="heads-{model_name}", persist_result=False)
def heads_task(model_name: str, prompts: int, seed: int, direction: P.Direction = "denoise", n_boot: int = 500) -> dict:
    return study.head_detection(
        load_model(model_name), model_name, prompts=prompts, seed=seed, direction=direction, n_boot=n_boot
    )


@task(name="factual-mlp-localisation", task_run_name="mlps-{model_name}", persist_result=False)
def mlps_task(model_name: str, prompts: int, seed: int) -> dict:
    return study.mlp_localisation(load_model(model_name), model_name, prompts=prompts, seed=seed)


@flow(name="circuitfind-study", log_prints=True)
def settings_study(
    ioi_models: list[str] | None = None,
    factual_models: list[str] | None = None,
    ioi_prompts: int = 40,
    factual_prompts: int = 12,
    seed: int = 0,
    run: str | None = None,
    outputs: str | None = None,
    direction: P.Direction = "denoise",
    n_boot: int = 500,
) -> dict:
    """IOI head detection and factual-recall MLP localisation under many settings, and where they disagree.

    ``ioi_models`` defaults to ``["toy-ioi"]``; ``factual_models`` to none (the toy models know no facts);
    ``outputs`` to :func:`circuitfind.paths.default_outputs`. Head detection patches in ``direction``
    (``denoise`` or ``noise``) and resamples prompts ``n_boot`` times for intervals and stability."""
    P.check_direction(direction)
    positive_int("n_boot", n_boot)
    ioi_models = ["toy-ioi"] if ioi_models is None else ioi_models
    factual_models = factual_models or []
    run_dir = run_folder(outputs, run, "study-")
    heads = [heads_task(m, ioi_prompts, seed, direction, n_boot) for m in ioi_models]
    mlps = [mlps_task(m, factual_prompts, seed) for m in factual_models]
    paths = study.study_report(heads, mlps, run_dir)
    write_json(run_dir / "study.json", {"heads": heads, "mlps": mlps, "report": paths})
    create_markdown_artifact(Path(paths["markdown"]).read_text(), key="settings-study")
    print(f"study report: {paths['html']}")
    return {"heads": heads, "mlps": mlps, **paths}


def check_arguments(a: argparse.Namespace) -> None:
    """Every option checked before Prefect starts: a bad one is one line, not a flow's traceback."""
    from circuitfind.catalogue import locate_model
    from circuitfind.tasks import check_prompt_count

    if not a.ioi_models and not a.factual_models:
        raise ValueError("nothing to study: give --ioi-models and/or --factual-models")
    for name in [*a.ioi_models, *a.factual_models]:
        locate_model(name)
    check_prompt_count(a.ioi_prompts)
    check_prompt_count(a.factual_prompts)
    positive_int("n_boot", a.n_boot)
    run_folder(a.outputs, a.run)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ioi-models", nargs="*", default=["toy-ioi"])
    p.add_argument("--factual-models", nargs="*", default=[])
    p.add_argument("--ioi-prompts", type=int, default=40)
    p.add_argument("--factual-prompts", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--direction", choices=("denoise", "noise"), default="denoise", help="head patching direction")
    p.add_argument("--n-boot", type=int, default=500, help="prompt resamples for intervals and stability")
    p.add_argument("--run", default=None)
    p.add_argument("--outputs", default=None, help="default: the checkout's outputs/, else ./outputs")
    a = p.parse_args(argv)
    try:
        check_arguments(a)
        with prefect_api():
            settings_study(
                a.ioi_models,
                a.factual_models,
                a.ioi_prompts,
                a.factual_prompts,
                a.seed,
                a.run,
                a.outputs,
                a.direction,
                a.n_boot,
            )
    except USER_ERRORS as err:
        print(f"circuitfind: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
