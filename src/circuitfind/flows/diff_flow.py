"""Run against run as a Prefect flow, and the scheduled sweep's diff against its previous run.

    circuitfind diff outputs/<run A> outputs/<run B>      # the same, without Prefect
    python flows/diff.py outputs/<run A> outputs/<run B>  # the ``circuitfind-diff`` flow

The ``circuitfind-diff`` flow writes ``diff.html``, ``diff.md`` and ``diff.json`` (see
:mod:`circuitfind.runs.diff`) and the Markdown as a Prefect artifact (key ``circuit-run-diff``).

A sweep given a ``series`` name (the scheduled deployment passes its own name) diffs its run
against the last completed run of that series, into ``<run>/diff-previous/``, and then records
itself as the series' last completed run in ``<outputs>/.series/<series>.json``. A run counts as
completed once its manifest is written, so a crashed run is never the baseline of the next one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from circuitfind.errors import USER_ERRORS
from circuitfind.io import write_json
from circuitfind.runs.diff import write_diff

SERIES_DIR = ".series"
PREVIOUS_DIFF = "diff-previous"


@task(name="run-diff", persist_result=False)
def diff_task(run_a: str, run_b: str, out: str | None) -> dict:
    paths = write_diff(run_a, run_b, out)
    create_markdown_artifact(
        paths.pop("markdown_text"),
        key="circuit-run-diff",
        description=f"Run diff: {Path(run_a).name} -> {Path(run_b).name}",
    )
    return paths


@flow(name="circuitfind-diff", log_prints=True)
def diff_flow(run_a: str, run_b: str, out: str | None = None) -> dict:
    """Compare two sweep runs of the same grid; write the diff report (default into ``<run_b>/diff-<run A>``)."""
    paths = diff_task(run_a, run_b, out)
    print(f"run diff: {paths['html']}")
    return paths


def check_series(series: str) -> str:
    """A series name is a plain file name (it names ``<outputs>/.series/<series>.json``)."""
    if not series.strip() or series in (".", "..") or "/" in series or "\\" in series:
        raise ValueError(f"series {series!r} is not a plain name")
    return series


def last_completed(outputs: str | Path, series: str) -> Path | None:
    """The run folder of the series' last completed run, or None (none yet, or it is gone)."""
    pointer = Path(outputs) / SERIES_DIR / f"{check_series(series)}.json"
    try:
        run = json.loads(pointer.read_text())["run"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    run_dir = Path(outputs) / Path(str(run)).name
    return run_dir if (run_dir / "manifest.json").is_file() else None


def record_completed(outputs: str | Path, series: str, run_dir: str | Path) -> Path:
    """Make ``run_dir`` (a completed run folder of ``outputs``) the series' last completed run."""
    return write_json(Path(outputs) / SERIES_DIR / f"{check_series(series)}.json", {"run": Path(run_dir).name})


def diff_with_previous(outputs: str | Path, series: str, run_dir: str | Path) -> dict | None:
    """Diff ``run_dir`` against the series' last completed run (None when there is none, or it is
    this run); a diff that cannot be made is logged and returned as ``{"error": ...}``, never fatal."""
    log = get_run_logger()
    previous = last_completed(outputs, series)
    if previous is None or previous.resolve() == Path(run_dir).resolve():
        log.info("series %s: no earlier completed run to diff against", series)
        return None
    try:
        paths = diff_flow(str(previous), str(run_dir), str(Path(run_dir) / PREVIOUS_DIFF))
    except USER_ERRORS as err:
        log.warning("series %s: cannot diff against %s: %s", series, previous.name, err)
        return {"previous": previous.name, "error": str(err)}
    return {"previous": previous.name, **paths}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="flows/diff.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from circuitfind.flows.server import prefect_api

    try:
        with prefect_api():
            diff_flow(args.run_a, args.run_b, args.out)
    except USER_ERRORS as err:
        print(f"circuitfind: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
