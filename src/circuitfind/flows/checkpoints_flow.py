"""Circuits over training as a Prefect flow: discover the circuit at every checkpoint of a training
run and report when each edge appears and disappears, with accuracy and logit difference alongside.

    circuitfind train toy-ioi --out /tmp/zoo --checkpoints 26      # 26 checkpoints, every 100 steps (3 min idle CPU)
    python flows/checkpoints.py /tmp/zoo/toy-ioi                    # or: circuitfind checkpoints /tmp/zoo/toy-ioi
    python flows/checkpoints.py /tmp/zoo/toy-ioi --steps 0 200 300 2500 --algorithm eap_ig --metric logit_diff --direction denoise
    python flows/checkpoints.py /tmp/zoo/toy-ioi --task pairs.jsonl -n 16       # a dataset file as the task

(``python -m circuitfind.flows.checkpoints_flow`` when installed.) Writes ``<outputs>/<run>/checkpoints.html``,
``checkpoints.md`` and ``checkpoints.json``. Default setting: ACDC (tau 0.02) with STR corruption and KL,
the sweep's defaults.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from circuitfind.errors import USER_ERRORS
from circuitfind.flows.server import prefect_api
from circuitfind.flows.stages import logged_stages
from circuitfind.io import write_json
from circuitfind.methods import registry
from circuitfind.paths import run_folder
from circuitfind.runs import checkpoints as C


@task(name="checkpoint-circuit", task_run_name="step-{step}", persist_result=False)
def checkpoint_task(folder: str, step: int, setting: dict) -> dict:
    with logged_stages(f"step {step}"):  # the stages of the checkpoint's discovery in the Prefect log
        result = C.analyse_or_flag(folder, step, **setting)
    if "error" in result:
        get_run_logger().warning("checkpoint step %s skipped: %s", step, result["error"])
    return result


@flow(name="circuitfind-checkpoints", log_prints=True)
def circuits_over_training(
    checkpoints: str,
    steps: list[int] | None = None,
    task: str = "ioi",
    prompts: int = 40,
    seed: int = 0,
    algorithm: str = "acdc",
    corruption: str = "str",
    metric: str | None = None,
    direction: str = "noise",
    options: dict[str, Any] | None = None,
    device: str | None = None,
    run: str | None = None,
    outputs: str | None = None,
) -> dict:
    """The circuit of every checkpoint in ``checkpoints`` (or of ``steps`` only) under one setting, and
    the report of when each edge appears and disappears. ``task`` is a name, a spec file or a dataset
    file; the report and ``checkpoints.json`` name a file by its name and content hash. ``options`` are the
    method's options (:mod:`circuitfind.methods.registry`; others' are left out of the setting); ``metric``
    ``None`` is the method's default (:func:`resolve_metric`)."""
    from circuitfind.runs.sweep import task_fingerprint, task_label

    if Path(task).is_file():  # the checkpoint tasks may run elsewhere: the file by its absolute path
        task = str(Path(task).resolve())
    found = check_inputs(
        checkpoints,
        steps,
        task,
        prompts,
        algorithm,
        corruption,
        metric,
        direction,
        options,
        device,
        run,
        outputs,
    )
    metric = resolve_metric(metric, algorithm, task, prompts, seed)
    # the method's own options, every one of them (edge pruning once ran 200 steps whatever was asked)
    own = registry.get_method(algorithm).options(options).model_dump()
    setting = {
        "task": task,
        "prompts": prompts,
        "seed": seed,
        "algorithm": algorithm,
        "corruption": corruption,
        "metric": metric,
        "direction": direction,
        "device": device,
        **own,
    }
    run_dir = run_folder(outputs, run, "checkpoints-")
    analysed = [checkpoint_task(str(c.folder), c.step, setting) for c in found]
    results = [r for r in analysed if "error" not in r]
    skipped = [r for r in analysed if "error" in r]
    if not results:
        raise ValueError(
            f"no checkpoint in {checkpoints} could be analysed: "
            + "; ".join(f"step {r['step']}: {r['error']}" for r in skipped)
        )
    shown = {"model": str(checkpoints), **{k: v for k, v in setting.items() if v is not None}, "task": task_label(task)}
    paths = C.write_report(results, shown, run_dir, skipped=skipped)
    timeline = C.edge_timeline(results)
    write_json(
        run_dir / "checkpoints.json",
        {
            "setting": {**shown, "task_sha256": task_fingerprint(task)},
            "checkpoints": results,
            "skipped": skipped,
            "timeline": timeline,
            "report": paths,
        },
    )
    create_markdown_artifact(Path(paths["markdown"]).read_text(), key="circuits-over-training")
    for r in skipped:
        print(f"skipped checkpoint step {r['step']}: {r['error']}")
    print(f"circuits over training: {paths['html']}")
    return {"checkpoints": results, "skipped": skipped, "timeline": timeline, **paths}


def resolve_metric(metric: str | None, algorithm: str, task: str, prompts: int, seed: int) -> str:
    """``metric``, or when ``None`` the method's default for the task's prompts
    (:func:`circuitfind.methods.discover.default_metric`), said in a note on stderr."""
    if metric is not None:
        return metric
    from circuitfind.methods import discover as discovery
    from circuitfind.tasks.batch import generate_prompts, load_task

    spec = load_task(task)
    chosen, note = discovery.default_metric(algorithm, generate_prompts(spec, prompts, seed), spec.name)
    print(f"circuitfind: note: {note or f'--metric defaults to {chosen} for {algorithm}'}", file=sys.stderr)
    return chosen


def check_inputs(
    checkpoints: str,
    steps: list[int] | None,
    task: str,
    prompts: int,
    algorithm: str,
    corruption: str,
    metric: str | None,
    direction: str,
    options: dict[str, Any] | None,
    device: str | None,
    run: str | None,
    outputs: str | None,
) -> list[C.Checkpoint]:
    """Every input of :func:`circuits_over_training` checked (a bad one is one line, not a flow's
    traceback); returns the checkpoints to analyse. The command calls it before Prefect starts."""
    from circuitfind.methods import discover as discovery
    from circuitfind.models.loading import check_device
    from circuitfind.tasks.batch import check_prompt_count, load_task
    from circuitfind.tasks.corruptions import get_corruption
    from circuitfind.tasks.metrics import get_metric

    registry.check_values(options or {})
    discovery.check_options(algorithm, direction, options)
    check_prompt_count(prompts)
    load_task(task)
    get_corruption(corruption)
    if metric is not None:
        get_metric(metric)
    if device is not None:
        check_device(device)
    run_folder(outputs, run)
    return C.find_checkpoints(checkpoints, steps)


def run_from_args(a: argparse.Namespace) -> dict:
    # the flow's parameters are the command's options, by name; every one but the seed is checked first
    names = inspect.signature(circuits_over_training.fn).parameters
    params = {name: getattr(a, name) for name in names if name != "options"}
    params["options"] = {name: getattr(a, name) for name in registry.option_fields()}
    check_inputs(**{k: v for k, v in params.items() if k != "seed"})
    params["metric"] = resolve_metric(a.metric, a.algorithm, a.task, a.prompts, a.seed)
    with prefect_api():
        return circuits_over_training(**params)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_arguments(p)
    try:
        run_from_args(p.parse_args(argv))
    except USER_ERRORS as err:
        print(f"circuitfind: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
