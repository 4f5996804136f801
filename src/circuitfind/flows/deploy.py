"""Run the sweep on a schedule, by a Prefect worker or by this process.

Start a Prefect server on this machine and point the client at it (schedules need a server; the
local one a command starts lives only as long as that command), then register the deployment in a
work pool of type ``process`` and start a worker that runs its flow runs:

    prefect server start --host 127.0.0.1 &            # UI and API on http://127.0.0.1:4200
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python flows/deploy.py --pool local                # creates the pool and the deployment (nightly at 03:00)
    prefect worker start --pool local                  # runs each scheduled or triggered run in a subprocess
    prefect deployment run circuitfind-sweep/nightly-toy-sweep   # a run now, besides the schedule

Without ``--pool`` this process serves the deployment itself (no worker; it runs until stopped).
``python -m circuitfind.flows.deploy`` works the same when circuitfind is installed: the deployment's
entrypoint is the module ``circuitfind.flows.sweep_flow``, so the worker needs circuitfind installed, not
this checkout. ``prefect deploy --all`` registers ``prefect.yaml``'s deployment instead.

Each run is diffed against the deployment's last completed run (``<run>/diff-previous/diff.html``,
a ``circuit-run-diff`` artifact): the deployment passes its name as the sweep's ``series``, and
``<outputs>/.series/<name>.json`` names the series' last completed run.
"""

from __future__ import annotations

import argparse
import os

from circuitfind.flows.sweep_flow import sweep
from circuitfind.runs.sweep import SweepConfig

DEFAULT_CRON = "0 3 * * *"
POOL_TYPE = "process"  # the worker runs each flow run in a subprocess on its own machine


def build_deployment(
    name: str = "nightly-toy-sweep", cron: str = DEFAULT_CRON, config: SweepConfig | None = None, timezone: str = "UTC"
):
    """The sweep as a deployment with a cron schedule (``flow.to_deployment``). Its entrypoint is the
    module path ``circuitfind.flows.sweep_flow.sweep``, so it runs wherever circuitfind is installed."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    # series: each scheduled run is diffed against the deployment's last completed run (circuitfind.flows.diff_flow)
    params = {"config": (config or SweepConfig()).model_dump(), "series": name}
    return sweep.to_deployment(
        name=name,
        schedule=Cron(cron, timezone=timezone),
        parameters=params,
        tags=["circuitfind", "sweep"],
        description="Scheduled circuit discovery sweep",
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def deploy_to_pool(
    pool: str,
    name: str = "nightly-toy-sweep",
    cron: str = DEFAULT_CRON,
    timezone: str = "UTC",
    config: SweepConfig | None = None,
) -> str:
    """Register the deployment in the work pool ``pool``, creating the pool (type ``process``) when it does not
    exist; return the deployment's id. A ``prefect worker start --pool <pool>`` then runs its flow runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            found = client.read_work_pool(pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type=POOL_TYPE))
        else:
            if found.type != POOL_TYPE:
                raise SystemExit(
                    f"work pool {pool!r} has type {found.type!r}; the sweep needs one of type "
                    f"{POOL_TYPE!r} (choose another --pool)"
                )
    return str(build_deployment(name, cron, config, timezone).apply(work_pool_name=pool))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="nightly-toy-sweep")
    p.add_argument("--cron", default=DEFAULT_CRON, help=f"cron expression (default {DEFAULT_CRON!r})")
    p.add_argument("--timezone", default="UTC")
    p.add_argument(
        "--pool",
        default=None,
        help="register the deployment in this work pool (created, type process, "
        "when missing) for `prefect worker start --pool POOL`, instead of serving it from this process",
    )
    args = p.parse_args(argv)
    if not os.environ.get("PREFECT_API_URL"):
        raise SystemExit(
            "set PREFECT_API_URL to a running Prefect server (prefect server start --host 127.0.0.1); "
            "schedules need a server"
        )
    if args.pool:
        deployment_id = deploy_to_pool(args.pool, args.name, args.cron, args.timezone)
        print(
            f"deployment circuitfind-sweep/{args.name} ({deployment_id}) in work pool {args.pool!r}; "
            f"start a worker: prefect worker start --pool {args.pool}"
        )
        return
    from prefect import serve

    serve(build_deployment(args.name, args.cron, timezone=args.timezone))


if __name__ == "__main__":
    main()
