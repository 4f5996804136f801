"""The scheduled deployment run by a Prefect worker, end to end, started as the docs say (how-to: Prefect):
`prefect server start`, `python flows/deploy.py --pool P`, `prefect worker start --pool P`, then
`prefect deployment run`. Every process is started and stopped by the test."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
from _processes import free_port, stop  # noqa: E402

BIN = Path(sys.executable).parent


def _wait_healthy(url: str, server: subprocess.Popen, seconds: float) -> None:
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert server.poll() is None, "prefect server start exited"
        try:
            with direct.open(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"the Prefect server did not answer within {seconds} s")


@pytest.mark.slow  # 1-2 minutes on a loaded 2-core machine (a fresh server database, three Prefect processes)
def test_deployment_run_by_a_prefect_worker(tmp_path, sweep_env):
    port, pool, name = free_port(), "circuitfind-test-pool", "nightly-toy-sweep"
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **sweep_env(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
    }
    logs = {n: open(tmp_path / f"{n}.log", "wb") for n in ("server", "worker")}
    processes: list[subprocess.Popen] = []

    def start(log: str, *command: str) -> subprocess.Popen:
        processes.append(
            subprocess.Popen(
                command,
                env=env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=logs[log],
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        return processes[-1]

    def prefect(*args: str) -> str:
        done = subprocess.run(
            [str(BIN / "prefect"), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    try:
        server = start("server", str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port))
        _wait_healthy(api, server, 600)  # the first start creates the database
        deployed = subprocess.run(
            [sys.executable, "flows/deploy.py", "--pool", pool, "--name", name],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert deployed.returncode == 0 and f"work pool {pool!r}" in deployed.stdout, deployed.stderr
        assert 'type="process"' in prefect("work-pool", "inspect", pool).replace("'", '"')
        start("worker", str(BIN / "prefect"), "worker", "start", "--pool", pool)
        outputs = tmp_path / "outputs"
        params = {
            "config": {
                "algorithms": ["eap"],
                "corruptions": ["str"],
                "metrics": ["logit_diff"],
                "directions": ["noise"],
                "prompts": 8,
            },
            "run": "from-worker",
            "outputs": str(outputs),
        }
        triggered = prefect("deployment", "run", f"circuitfind-sweep/{name}", "--params", json.dumps(params))
        flow_run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", triggered).group(1)
        state = _wait_for_flow_run(api, flow_run_id, 600)
        assert state == "COMPLETED", (tmp_path / "worker.log").read_text(errors="replace")[-3000:]
        run = outputs / "from-worker"
        assert (run / "report.html").is_file() and (run / "report.md").is_file()
        manifest = json.loads((run / "manifest.json").read_text())
        assert len(manifest["settings"]) == 1 and not manifest["failures"]
    finally:
        for process in reversed(processes):
            stop(process)
        for log in logs.values():
            log.close()


def _wait_for_flow_run(api: str, flow_run_id: str, seconds: float) -> str:
    """The flow run's final state type, polled through the REST API."""
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline, state = time.monotonic() + seconds, None
    while time.monotonic() < deadline:
        with direct.open(f"{api}/flow_runs/{flow_run_id}", timeout=10) as response:
            state = json.loads(response.read())["state"]["type"]
        if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return state
        time.sleep(1)
    raise AssertionError(f"the flow run is still {state} after {seconds} s")
