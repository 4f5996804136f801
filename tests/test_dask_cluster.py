"""The sweep on a real Dask cluster: a `dask scheduler` and `dask worker` processes on localhost, started
and stopped by the tests, reached through `--dask-address` as a user would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("prefect_dask")
distributed = pytest.importorskip("distributed")

from _processes import free_port, stop  # noqa: E402

from circuitfind.flows.sweep_flow import SweepError, parse_args, run_from_args  # noqa: E402

BIN = Path(sys.executable).parent
# 8 settings of about a second each (toy-ioi, 8 prompts)
GRID = [
    "--algorithms",
    "eap",
    "node",
    "--corruptions",
    "str",
    "gn",
    "--metrics",
    "logit_diff",
    "kl",
    "--directions",
    "noise",
    "--prompts",
    "8",
]


@contextmanager
def dask_cluster(tmp_path: Path, workers: list[list[str]], scheduler_env: dict[str, str] | None = None):
    """A `dask scheduler` and one `dask worker --nworkers 1 --nthreads 1` per entry of ``workers`` (its extra
    options); yields (address, client). The workers get no PREFECT_API_URL: the task's context carries it."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    logs = tmp_path / "dask-logs"
    logs.mkdir(exist_ok=True)
    processes = []

    def start(name: str, command: list[str], extra_env: dict[str, str] | None = None) -> None:
        with open(logs / f"{name}.log", "wb") as log:
            processes.append(
                subprocess.Popen(
                    command,
                    env={**env, **(extra_env or {})},
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    client = None
    try:
        start(
            "scheduler",
            [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
            scheduler_env,
        )
        for i, options in enumerate(workers):
            start(
                f"worker{i}",
                [
                    str(BIN / "dask"),
                    "worker",
                    address,
                    "--nworkers",
                    "1",
                    "--nthreads",
                    "1",
                    "--host",
                    "127.0.0.1",
                    "--no-dashboard",
                    *options,
                ],
            )
        client = distributed.Client(address, timeout=120)
        client.wait_for_workers(len(workers), timeout=180)
        yield address, client
    finally:
        if client is not None:
            client.close()
        for process in reversed(processes):
            stop(process)
        text = "".join(p.read_text(errors="replace") for p in logs.glob("worker*.log"))
        assert "Starting temporary server" not in text, "a Dask worker started a Prefect server of its own"


def _sweep(*options: str) -> dict:
    return run_from_args(parse_args([*GRID, *options]))


def _graphs(outputs: Path, run: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((outputs / run / "circuits").glob("*.graphml"))}


@pytest.fixture(scope="module")
def in_process(prefect_harness, tmp_path_factory):
    """The grid run in this process (thread runner): the graphs the cluster must reproduce byte for byte."""
    outputs = tmp_path_factory.mktemp("in-process")
    manifest = _sweep("--outputs", str(outputs), "--run", "ref")
    assert not manifest["failures"] and len(manifest["settings"]) == 8
    return _graphs(outputs, "ref")


@pytest.mark.slow  # 60-90 s on a loaded 2-core machine (three processes import torch, 16 settings)
def test_sweep_on_an_existing_dask_cluster_matches_the_in_process_sweep(in_process, tmp_path):
    with dask_cluster(tmp_path, [[], []]) as (address, client):
        worker_pids = set(client.run(os.getpid).values())
        manifest = _sweep("--dask-address", address, "--outputs", str(tmp_path / "out"), "--run", "dask")
    assert not manifest["failures"] and len(manifest["settings"]) == 8
    assert not any(s["from_cache"] for s in manifest["settings"])  # computed on the cluster, not copied
    assert _graphs(tmp_path / "out", "dask") == in_process
    # both worker processes ran settings, and each loaded the model once for all the settings it ran
    ran_on = {s["worker"]["pid"] for s in manifest["settings"]}
    assert ran_on == worker_pids and os.getpid() not in ran_on
    assert all(s["worker"]["models_loaded"] == 1 for s in manifest["settings"])
    assert (tmp_path / "out" / "dask" / "report.html").is_file()


def test_dask_address_from_the_environment(monkeypatch):
    monkeypatch.setenv("CIRCUITFIND_DASK_ADDRESS", "tcp://10.0.0.1:8786")
    assert parse_args([]).dask_address == "tcp://10.0.0.1:8786"
    assert parse_args(["--dask-address", "tcp://h:1"]).dask_address == "tcp://h:1"
    monkeypatch.delenv("CIRCUITFIND_DASK_ADDRESS")
    assert parse_args([]).dask_address is None


@pytest.mark.slow  # 45 s on a loaded 2-core machine
def test_cuda_settings_go_to_gpu_workers_and_fail_clearly_without_a_gpu(prefect_harness, tmp_path):
    # on this CPU machine the worker that offers GPU=1 has no CUDA device: every cuda setting lands on it
    # (none on the worker without the resource) and fails with a message naming it
    with dask_cluster(tmp_path, [["--resources", "GPU=1"], []]) as (address, client):
        gpu_worker = [w for w, info in client.scheduler_info()["workers"].items() if info["resources"].get("GPU")]
        (gpu_pid,) = client.run(os.getpid, workers=gpu_worker).values()
        with pytest.raises(SweepError, match="every setting failed") as failed:
            _sweep("--device", "cuda", "--dask-address", address, "--outputs", str(tmp_path / "out"), "--run", "gpu")
    assert f"(process {gpu_pid}) has no CUDA device" in str(failed.value)
    assert not list((tmp_path / "out" / "gpu" / "circuits").glob("*.json"))


@pytest.mark.slow
def test_cuda_settings_without_any_gpu_worker_are_refused(prefect_harness, tmp_path):
    with dask_cluster(tmp_path, [[]]) as (address, _):
        with pytest.raises(SweepError, match="none of the 1 workers of the cluster offers one"):
            _sweep("--device", "cuda", "--dask-address", address, "--outputs", str(tmp_path / "out"), "--run", "g")


@pytest.mark.slow
def test_a_worker_that_cannot_write_the_outputs_fails_clearly(prefect_harness, tmp_path):
    from circuitfind.flows.sweep_flow import discover_setting
    from circuitfind.runs.sweep import SweepConfig, WorkerError, mark_run_folder

    config = SweepConfig(
        algorithms=["node"], corruptions=["str"], metrics=["logit_diff"], directions=["noise"], prompts=8
    )
    (setting,) = config.settings()
    run, cache = tmp_path / "run", tmp_path / "cache"
    # a run folder this worker does not see (outputs not on a shared filesystem)
    with pytest.raises(WorkerError, match="does not see the run folder .* shares"):
        discover_setting.fn(setting, config, str(run), str(cache))
    # a cache it cannot write (here: a file stands where the cache folder should be)
    mark_run_folder(run, tmp_path / "elsewhere")
    cache.write_text("not a folder")
    with pytest.raises(WorkerError, match=f"on host .* cannot write {cache}"):
        discover_setting.fn(setting, config, str(run), str(cache))
    assert not list((run / "circuits").glob("*.json"))


# 8 settings of 1-9 s each: long enough that a worker can be killed in the middle of one
LONG_GRID = [
    "--algorithms",
    "acdc",
    "eap_ig",
    "--corruptions",
    "gn",
    "str",
    "--metrics",
    "logit_diff",
    "kl",
    "--directions",
    "noise",
    "--prompts",
    "32",
]


@pytest.mark.slow  # 3 minutes on a loaded 2-core machine (load 8)
def test_a_killed_worker_is_reported_and_a_rerun_finishes_only_what_is_missing(prefect_harness, tmp_path, sweep_env):
    from prefect.settings import PREFECT_API_URL

    reference = run_from_args(parse_args([*LONG_GRID, "--outputs", str(tmp_path / "ref"), "--run", "ref"]))
    assert not reference["failures"] and len(reference["settings"]) == 8
    outputs, run = tmp_path / "out", "killed"
    command = [sys.executable, "-m", "circuitfind", "sweep", *LONG_GRID, "--outputs", str(outputs), "--run", run]
    env = {**sweep_env(tmp_path / "home"), "PREFECT_API_URL": PREFECT_API_URL.value()}
    # Dask retries a task whose worker died (3 times by default): with 0 the kill fails the setting
    with dask_cluster(tmp_path, [[], []], {"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"}) as (address, client):
        sweep = subprocess.Popen(
            [*command, "--dask-address", address],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 300
            killed = None
            while killed is None:  # once a setting is done, kill a worker process in the middle of the next one
                assert time.monotonic() < deadline and sweep.poll() is None, sweep.communicate()
                busy = [w for w, keys in client.processing().items() if keys]
                if busy and list((outputs / run / "circuits").glob("*.json")):
                    (killed,) = client.run(os.getpid, workers=busy[:1]).values()
                    os.kill(killed, signal.SIGKILL)
                time.sleep(0.05)
            out, err = sweep.communicate(timeout=400)
        finally:
            stop(sweep)
        assert sweep.returncode == 1, err  # reported, not fatal: the report covers the other settings
        manifest = json.loads((outputs / run / "manifest.json").read_text())
        failed = [f["setting"] for f in manifest["failures"]]
        assert failed and all("KilledWorker" in f["error"] for f in manifest["failures"])
        assert f"settings failed ({', '.join(failed)}); run again with --run {run}" in err
        assert len(manifest["settings"]) + len(failed) == 8
        # no half-written file: every record is complete JSON with its graph beside it, no temporary file left
        records = list((outputs / run / "circuits").glob("*.json"))
        assert {r.stem for r in records} == {s["setting"] for s in manifest["settings"]}
        for record in records:
            assert Path(json.loads(record.read_text())["graphml"]).name == f"{record.stem}.graphml"
        assert not list(outputs.rglob("*.tmp"))
        # the rerun (the nanny has restarted the worker) computes the failed settings and copies the others
        client.wait_for_workers(2, timeout=120)
        again = subprocess.run(
            [*command, "--dask-address", address], env=env, capture_output=True, text=True, timeout=400
        )
    assert again.returncode == 0, again.stderr
    manifest = json.loads((outputs / run / "manifest.json").read_text())
    assert not manifest["failures"] and len(manifest["settings"]) == 8
    assert sorted(s["setting"] for s in manifest["settings"] if not s["from_cache"]) == sorted(failed)
    assert _graphs(outputs, run) == _graphs(tmp_path / "ref", "ref")
    assert not list(outputs.rglob("*.tmp"))


@pytest.mark.slow
def test_an_unreachable_scheduler_is_one_line_and_leaves_no_run_folder(tmp_path, capsys):
    from circuitfind.cli import main

    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    assert main(["sweep", *GRID, "--dask-address", address, "--outputs", str(tmp_path), "--run", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot reach a Dask scheduler at '{address}'" in err
    assert not (tmp_path / "x").exists()


def test_a_cluster_without_workers_is_refused(tmp_path, capsys):
    from distributed import LocalCluster

    from circuitfind.cli import main

    with LocalCluster(
        n_workers=0, processes=False, protocol="tcp", dashboard_address=None
    ) as cluster:  # a real scheduler, no worker
        argv = ["sweep", *GRID, "--dask-address", cluster.scheduler_address, "--outputs", str(tmp_path), "--run", "x"]
        assert main(argv) == 2
    assert "has no workers" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
