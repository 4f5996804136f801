"""`circuitfind sweep` as a user runs it: its options, bad grids refused up front, the first run on a
fresh Prefect home, and no Prefect server left behind when the sweep is killed."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

import circuitfind.flows.sweep_flow  # noqa: F401  (imported here, so the timed calls below do not pay for it)
from circuitfind.cli import build_parser, main
from circuitfind.errors import ModelNotFoundError, TaskError
from circuitfind.runs.sweep import SweepConfig

SERVER_APP = b"prefect.server.api.server:create_app"
linux_only = pytest.mark.skipif(sys.platform != "linux", reason="finds server processes through /proc")


def prefect_servers(prefect_home: Path) -> list[int]:
    """PIDs of live Prefect API server processes (uvicorn serving Prefect's app) of this Prefect home."""
    marker = f"PREFECT_HOME={prefect_home}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if SERVER_APP not in (proc / "cmdline").read_bytes().split(b"\0"):
                continue
            environ = (proc / "environ").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if marker in environ and state not in ("Z", "X"):
            found.append(int(proc.name))
    return found


def wait_for(condition, seconds: float, interval: float = 0.2):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    return condition()


# --------------------------------------------------------------------------------------------
# Options


def test_sweep_command_takes_the_flow_options():
    args = build_parser().parse_args(
        [
            "sweep",
            "--algorithms",
            "eap",
            "acdc",
            "--run",
            "x",
            "--prompts",
            "12",
            "--acdc-tau",
            "0.05",
            "--dask",
            "--workers",
            "3",
        ]
    )
    assert args.algorithms == ["eap", "acdc"] and args.run == "x" and args.prompts == 12
    assert args.acdc_tau == 0.05 and args.dask and args.workers == 3
    assert build_parser().parse_args(["sweep", "--dask-address", "tcp://h:8786"]).dask_address == "tcp://h:8786"
    assert args.metrics == SweepConfig().metrics  # defaults come from SweepConfig


@pytest.mark.parametrize("argv", [["sweep", "--help"], ["sweep", "--", "--help"]])
def test_sweep_help_lists_the_flow_options(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for option in (
        "--models",
        "--tasks",
        "--algorithms",
        "--corruptions",
        "--metrics",
        "--directions",
        "--prompts",
        "--acdc-tau",
        "--top-k",
        "--run",
        "--outputs",
        "--reference",
        "--dask",
        "--dask-address",
        "--workers",
    ):
        assert option in out


def test_flow_script_and_command_share_one_parser():
    from circuitfind.flows import sweep_flow as sweep_flow

    argv = ["--algorithms", "node", "--corruptions", "gn", "mean", "--node-k", "1.5", "--run", "r"]
    standalone = vars(sweep_flow.build_parser().parse_args(argv))
    command = vars(build_parser().parse_args(["sweep", *argv]))
    assert {k: command[k] for k in standalone} == standalone


# --------------------------------------------------------------------------------------------
# Bad grids: one line, exit 2, before Prefect starts


BAD_GRIDS = [
    (["--models", "no-such-model-xyz"], "model 'no-such-model-xyz'"),
    (["--tasks", "no-such-task"], "unknown task 'no-such-task'"),
    (["--algorithms", "eap", "magic"], "unknown algorithm 'magic'"),
    (["--corruptions", "blur"], "unknown corruption 'blur'"),
    (["--corruptions", "str:nope"], "'nope'"),
    (["--tasks", "induction", "--models", "toy-induction", "--corruptions", "str:abc"], "'abc'"),
    (["--metrics", "accuracy"], "unknown metric 'accuracy'"),
    (["--directions", "sideways"], "'sideways'"),
    (["--metrics", "kl", "kl"], "twice"),
    (["--prompts", "0"], "--prompts"),
    (["--prompts", "-5"], "--prompts"),
    (["--acdc-tau", "nan"], "--acdc-tau"),
    (["--acdc-tau", "inf"], "--acdc-tau"),
    (["--acdc-tau", "-1"], "--acdc-tau"),
    (["--top-k", "0"], "--top-k"),
    (["--ig-steps", "0"], "--ig-steps"),
    (["--path-depth", "0"], "--path-depth"),
    (["--max-batch", "0"], "--max-batch"),
    (["--top-k", "100000"], "--top-k: must be at most the 262 edges"),
    (["--node-k", "0"], "--node-k"),
    (["--path-k", "0"], "--path-k"),
    (["--node-k", "nan"], "--node-k"),
    (["--path-k=-inf"], "--path-k"),
    (["--workers", "0"], "--workers"),
    (["--device", "gpu7"], "device"),
    (["--run", "../escape"], "--run"),
    (["--run", ".cache"], "--run: '.cache' is reserved"),
    (["--run", ".series"], "--run: '.series' is reserved"),
    (["--reference", "no-such-setting"], "reference"),
]


@pytest.mark.parametrize("options,message", BAD_GRIDS, ids=[" ".join(o) for o, _ in BAD_GRIDS])
def test_bad_grid_is_one_line_before_prefect_starts(options, message, capsys, monkeypatch, tmp_path):
    # nothing may talk to Prefect: a server here would refuse every connection
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    assert main(["sweep", *options, "--outputs", str(tmp_path)]) == 2
    assert time.monotonic() - start < 10
    err = capsys.readouterr().err
    assert err.startswith("circuitfind: error: ") and err.count("\n") == 1, err
    assert message in err
    assert not list(tmp_path.iterdir())


def test_outputs_that_cannot_be_written_are_refused_before_prefect_starts(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for outputs, message in [
        (tmp_path / "file", "is a file, not a folder"),
        (tmp_path / "file" / "below", "is a file, not a folder"),
    ]:
        assert main(["sweep", "--outputs", str(outputs)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("circuitfind: error: --outputs: ") and message in err and err.count("\n") == 1, err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".cache").write_text("x")
    assert main(["sweep", "--outputs", str(tmp_path / "out")]) == 2
    assert ".cache is a file" in capsys.readouterr().err
    if os.geteuid() != 0:
        (tmp_path / "ro").mkdir(mode=0o555)
        unwritable = tmp_path / "ro"
    else:  # root writes into a 0555 folder; sysfs refuses new files even to root
        unwritable = Path("/sys")
        if not unwritable.is_dir() or _can_create_in(unwritable):
            pytest.skip("root, and no folder here refuses root a new file")
    assert main(["sweep", "--outputs", str(unwritable / "circuitfind-runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"circuitfind: error: --outputs: cannot write into {unwritable} (") and err.count("\n") == 1
    assert not (unwritable / "circuitfind-runs").exists()


def _can_create_in(folder: Path) -> bool:
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


@pytest.mark.slow
def test_bad_grid_subprocess_exits_2_without_starting_prefect(tmp_path, sweep_env):
    home = tmp_path / "prefect-home"
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "circuitfind", "sweep", "--prompts", "0", "--outputs", str(tmp_path / "out")],
        env=sweep_env(home),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("circuitfind: error: --prompts") and proc.stderr.count("\n") == 1, proc.stderr
    assert not (home / "prefect.db").exists()  # no server ever opened the database
    assert seconds < 60  # imports only (a few seconds idle); a server's first start alone takes 15-20 s


def test_sweep_config_validates_and_checks_names():
    with pytest.raises(ValidationError, match="prompts"):
        SweepConfig(prompts=0)
    with pytest.raises(ValidationError, match="acdc_tau"):
        SweepConfig(acdc_tau=math.nan)
    with pytest.raises(ValidationError, match="unknown algorithm"):
        SweepConfig(algorithms=["eap", "magic"])
    with pytest.raises(ValidationError, match="models"):
        SweepConfig(models=[])
    with pytest.raises(ValidationError, match="extra"):
        SweepConfig(promtps=12)
    assert SweepConfig().check() == SweepConfig()
    with pytest.raises(ModelNotFoundError):
        SweepConfig(models=["no-such-model-xyz"]).check()
    with pytest.raises(TaskError, match="no-such-task"):
        SweepConfig(tasks=["no-such-task"]).check()
    with pytest.raises(TaskError, match="'abc'"):
        SweepConfig(models=["toy-induction"], tasks=["induction"], corruptions=["str:abc"]).check()


# --------------------------------------------------------------------------------------------
# The local Prefect server


def own_servers() -> set[int]:
    """Live Prefect server processes started by this (test) process."""
    found = set()
    for proc in Path("/proc").iterdir():
        try:
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if (
                int(stat[1]) == os.getpid()
                and stat[0] != "Z"
                and SERVER_APP in (proc / "cmdline").read_bytes().split(b"\0")
            ):
                found.add(int(proc.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def test_startup_timeout_setting(monkeypatch):
    from circuitfind.flows.server import DEFAULT_STARTUP_TIMEOUT, PrefectServerError, startup_timeout

    monkeypatch.delenv("CIRCUITFIND_PREFECT_STARTUP_TIMEOUT", raising=False)
    assert startup_timeout() == DEFAULT_STARTUP_TIMEOUT >= 300
    monkeypatch.setenv("CIRCUITFIND_PREFECT_STARTUP_TIMEOUT", "90")
    assert startup_timeout() == 90
    for bad in ("soon", "0", "-5", "nan"):
        monkeypatch.setenv("CIRCUITFIND_PREFECT_STARTUP_TIMEOUT", bad)
        with pytest.raises(PrefectServerError, match="CIRCUITFIND_PREFECT_STARTUP_TIMEOUT"):
            startup_timeout()


@linux_only
def test_server_that_does_not_answer_in_time_is_stopped_with_a_clear_error():
    from circuitfind.flows.server import LocalPrefectServer, PrefectServerError

    before = own_servers()
    server = LocalPrefectServer(timeout=0.5)  # far less than the server needs to start
    with pytest.raises(
        PrefectServerError, match=r"did not answer within 0.5 s; set CIRCUITFIND_PREFECT_STARTUP_TIMEOUT"
    ):
        server.start()
    assert server.process is None and own_servers() <= before


def test_a_configured_prefect_api_is_used_and_nothing_started():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from circuitfind.flows.server import prefect_api

    before = own_servers()
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        with prefect_api() as url:
            assert url == "http://127.0.0.1:9/api"
            assert own_servers() == before


# --------------------------------------------------------------------------------------------
# Real sweeps in subprocesses: a fresh Prefect home, and killing a sweep


@pytest.mark.slow
@linux_only
def test_first_sweep_on_a_fresh_prefect_home(first_sweep):
    proc = first_sweep.proc
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (first_sweep.home / "prefect.db").is_file()
    manifest = first_sweep.outputs / "first" / "manifest.json"
    assert manifest.is_file() and '"failures": []' in manifest.read_text()
    assert not prefect_servers(first_sweep.home)  # stopped when the sweep ended
    print(f"first sweep on a fresh Prefect home: {first_sweep.seconds:.1f} s")


@linux_only
@pytest.mark.parametrize(
    "sig", [signal.SIGKILL, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)], ids=["SIGKILL", "SIGTERM"]
)
@pytest.mark.slow
def test_killed_sweep_leaves_no_prefect_server(first_sweep, sweep_env, tmp_path, sig):
    home = first_sweep.home  # its database exists: the server starts in seconds
    log = (tmp_path / "sweep.log").open("w")
    sweep = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "circuitfind",
            "sweep",
            "--prompts",
            "8",
            "--run",
            "killed",
            "--outputs",
            str(tmp_path / "outputs"),
        ],
        env=sweep_env(home),
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        running = wait_for(lambda: "Beginning flow run" in (tmp_path / "sweep.log").read_text(), 180)
        assert running, "the sweep did not start: " + (tmp_path / "sweep.log").read_text()[-3000:]
        servers = prefect_servers(home)
        assert servers, "no Prefect server found for the running sweep"
        sweep.send_signal(sig)
        assert sweep.wait(timeout=120) == -sig  # killed while its flow ran (56 settings), not finished
        assert wait_for(lambda: not set(servers) & set(prefect_servers(home)), 10), (
            f"Prefect server {servers} outlived the sweep killed by {sig.name}"
        )
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.wait()
        for pid in prefect_servers(home):  # a survivor (old behaviour) must not outlive the test
            os.kill(pid, signal.SIGKILL)
        log.close()


def test_a_run_folder_of_another_grid_is_refused(tmp_path, capsys):
    """Reusing a run name resumes that run: a different grid would mix two runs in one folder and report."""
    from circuitfind.cli import main

    circuits = tmp_path / "w1" / "circuits"
    circuits.mkdir(parents=True)
    (circuits / "toy-ioi__ioi__eap__str__logit_diff__noise.json").write_text("{}")
    grid = [
        "sweep",
        "--algorithms",
        "eap",
        "--metrics",
        "logit_diff",
        "--directions",
        "noise",
        "--prompts",
        "4",
        "--outputs",
        str(tmp_path),
        "--run",
        "w1",
    ]
    assert main([*grid, "--corruptions", "gn"]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and "holds settings of another grid (1, e.g. toy-ioi__ioi__eap__str__logit_diff__noise)" in err
    )


def test_a_finished_run_of_other_parameters_is_refused(tmp_path, capsys):
    """Reusing a finished run's name with other shared parameters would silently replace its results."""
    from circuitfind.cli import main
    from circuitfind.runs.sweep import SweepConfig

    (tmp_path / "w2").mkdir()
    earlier = SweepConfig(prompts=8).model_dump()
    (tmp_path / "w2" / "manifest.json").write_text(json.dumps({"config": earlier, "settings": []}))
    grid = ["sweep", "--algorithms", "eap", "--corruptions", "str", "--metrics", "logit_diff", "--directions", "noise"]
    assert main([*grid, "--prompts", "16", "--outputs", str(tmp_path), "--run", "w2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was made with other parameters (prompts 8 -> 16)" in err


@linux_only
@pytest.mark.slow
def test_ctrl_c_ends_a_running_eap_ig_sweep_and_its_server_within_10_s(first_sweep, sweep_env, tmp_path):
    """SIGINT once left the sweep (its task runner waits for running settings) and its server alive after 35 s."""
    home = first_sweep.home
    log_path = tmp_path / "sweep.log"
    argv = ["sweep", "--prompts", "8", "--algorithms", "eap_ig", "--run", "ctrl-c", "--outputs", str(tmp_path / "o")]
    with log_path.open("w") as log:
        sweep = subprocess.Popen(
            [sys.executable, "-m", "circuitfind", *argv], env=sweep_env(home), cwd=tmp_path, stdout=log, stderr=log
        )
        try:
            assert wait_for(lambda: "Beginning flow run" in log_path.read_text(), 180), log_path.read_text()[-3000:]
            time.sleep(3)  # settings are running on the runner's threads
            servers = prefect_servers(home)
            assert servers, "no Prefect server found for the running sweep"
            start = time.monotonic()
            sweep.send_signal(signal.SIGINT)
            assert sweep.wait(timeout=30) == 130
            assert time.monotonic() - start < 10
            assert wait_for(lambda: not set(servers) & set(prefect_servers(home)), 5)
        finally:
            if sweep.poll() is None:
                sweep.kill()
                sweep.wait()
            for pid in prefect_servers(home):
                os.kill(pid, signal.SIGKILL)
