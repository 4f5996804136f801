"""Run the sweep on a schedule.

Start a Prefect server on this machine and point the client at it (schedules need a server; the
local one a command starts lives only as long as that command):

    prefect server start --host 127.0.0.1 &            # UI and API on http://127.0.0.1:4200
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python flows/deploy.py --cron "0 3 * * *"          # serves the deployment; runs nightly at 03:00

(``python -m circuitfind.flows.deploy`` when installed) or, with a work pool and worker instead of a
serving process, ``prefect deploy --all`` (see ``prefect.yaml``) and ``prefect worker start --pool local``.

Each run is diffed against the deployment's last completed run (``<run>/diff-previous/diff.html``,
a ``circuit-run-diff`` artifact): the deployment passes its name as the sweep's ``series``, and
``<outputs>/.series/<name>.json`` names the series' last completed run.
"""

from __future__ import annotations

import argparse
import os

from circuitfind.flows.sweep import sweep
from circuitfind.sweep import SweepConfig

DEFAULT_CRON = "0 3 * * *"


def build_deployment(name: str = "nightly-toy-sweep", cron: str = DEFAULT_CRON, config: SweepConfig | None = None,
                     timezone: str = "UTC"):
    """The sweep as a deployment with a cron schedule (``flow.to_deployment``). Its entrypoint is the
    module path ``circuitfind.flows.sweep.sweep``, so it runs wherever circuitfind is installed."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    # series: each scheduled run is diffed against the deployment's last completed run (circuitfind.flows.diff)
    params = {"config": (config or SweepConfig()).model_dump(), "series": name}
    return sweep.to_deployment(name=name, schedule=Cron(cron, timezone=timezone), parameters=params,
                               tags=["circuitfind", "sweep"], description="Scheduled circuit discovery sweep",
                               entrypoint_type=EntrypointType.MODULE_PATH)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="nightly-toy-sweep")
    p.add_argument("--cron", default=DEFAULT_CRON, help=f"cron expression (default {DEFAULT_CRON!r})")
    p.add_argument("--timezone", default="UTC")
    args = p.parse_args(argv)
    if not os.environ.get("PREFECT_API_URL"):
        raise SystemExit("set PREFECT_API_URL to a running Prefect server (prefect server start --host 127.0.0.1); "
                         "schedules need a server")
    from prefect import serve

    serve(build_deployment(args.name, args.cron, timezone=args.timezone))


if __name__ == "__main__":
    main()
