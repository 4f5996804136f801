"""A local Prefect API server owned by the command that runs a flow.

Without ``PREFECT_API_URL`` Prefect starts a temporary server of its own for a flow run. Two things
go wrong with it on a fresh machine: its first start on a never-used ``PREFECT_HOME`` creates the
SQLite database (17-20 s on a loaded 2-core machine) against Prefect's 20 s limit, and when the
flow's process is killed (SIGKILL, or SIGTERM, which skips ``atexit``) its uvicorn process lives on.

:func:`prefect_api` starts the same server (Prefect's app under uvicorn, UI off, bound to
127.0.0.1 on a free port) as a child process that dies with its parent: on Linux the child asks
the kernel for SIGKILL when the thread that started it dies (``prctl(PR_SET_PDEATHSIG)``), it runs
in its own process group (a Ctrl-C in the terminal reaches the flow, which still reports to the
server, not the server), and it is stopped when the block ends, at exit and on SIGTERM. It waits
for the server's health endpoint for minutes (``CIRCUITFIND_PREFECT_STARTUP_TIMEOUT`` seconds,
default 600) and sets ``PREFECT_API_URL`` for the block, so worker processes started meanwhile
(Dask) use this server instead of each starting one.

The server runs with the UI off (it starts faster and lives only as long as the command), so a
"View at" link to it would answer 404 and then nothing. The runs are kept in ``PREFECT_HOME``'s
database, which ``prefect server start`` serves with the UI: the block sets ``PREFECT_UI_URL`` to
where that server will be (:func:`later_ui_url`: ``http://PREFECT_SERVER_API_HOST:PREFECT_SERVER_API_PORT``,
by default ``http://127.0.0.1:4200``, unless ``PREFECT_UI_URL`` is set), so the logged "View at ..."
link opens the run once ``prefect server start`` runs on the same ``PREFECT_HOME`` (README, "Opening a
run in the Prefect UI").
"""

from __future__ import annotations

import atexit
import ctypes
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from circuitfind.errors import CircuitfindError

STARTUP_TIMEOUT_ENV = "CIRCUITFIND_PREFECT_STARTUP_TIMEOUT"
DEFAULT_STARTUP_TIMEOUT = 600.0
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
UVICORN_STARTUP_FAILURE = 3  # uvicorn's exit code when it cannot start (e.g. the port was taken meanwhile)


class PrefectServerError(CircuitfindError, RuntimeError):
    """The local Prefect server did not start."""


def startup_timeout() -> float:
    """Seconds to wait for the server to answer: ``$CIRCUITFIND_PREFECT_STARTUP_TIMEOUT`` or 600."""
    text = os.environ.get(STARTUP_TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_STARTUP_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise PrefectServerError(f"{STARTUP_TIMEOUT_ENV}={text!r} is not a positive number of seconds")
    return seconds


_OWN_PROCESS_GROUP: dict[str, Any] = {"process_group": 0} if os.name == "posix" else {}


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    """Signal the server's process group (POSIX), or the process itself."""
    if os.name == "posix":
        os.killpg(process.pid, signum)
    elif signum == signal.SIGTERM:
        process.terminate()
    else:
        process.kill()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGKILL the child when the thread that starts it dies; ``None`` elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the child only calls it
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        if prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the parent died before the request took effect
            os._exit(1)

    return preexec


class LocalPrefectServer:
    """Prefect's API server in a child process bound to 127.0.0.1, started with :meth:`start`, stopped
    with :meth:`stop` (also at exit). Start it from the thread that outlives the server's use: on
    Linux the server is killed when that thread ends."""

    def __init__(self, timeout: float | None = None):
        self.timeout = startup_timeout() if timeout is None else timeout
        self.process: subprocess.Popen | None = None
        self.api_url: str | None = None

    @staticmethod
    def command(port: int) -> list[str]:
        """The command Prefect uses for its temporary server (``SubprocessASGIServer``)."""
        import prefect

        return [
            sys.executable,
            "-m",
            "uvicorn",
            "--app-dir",
            str(Path(prefect.__file__).resolve().parents[1]),
            "--factory",
            "prefect.server.api.server:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "error",
            "--lifespan",
            "on",
        ]

    @staticmethod
    def environment() -> dict[str, str]:
        from prefect.settings import get_current_settings

        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        env.update(get_current_settings().to_environment_variables(exclude_unset=True))
        env.pop("PREFECT_API_URL", None)
        return env

    def start(self) -> str:
        """Start the server and wait until it answers; return its API URL."""
        if self.process is not None:
            raise PrefectServerError("the local Prefect server is already running")
        began = time.monotonic()
        deadline = began + self.timeout
        env = self.environment()
        for _ in range(3):  # a port found free can be taken before uvicorn binds it: try another
            port = _free_port()
            self.process = subprocess.Popen(
                self.command(port),
                env=env,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent(),
                **_OWN_PROCESS_GROUP,
            )
            atexit.register(self.stop)
            url = f"http://127.0.0.1:{port}/api"
            if self._wait_healthy(url, deadline):
                self.api_url = url
                print(
                    f"circuitfind: local Prefect server at {url} (ready after {time.monotonic() - began:.1f} s; "
                    "stopped when this command ends). The runs stay in PREFECT_HOME's database: their "
                    f"'View at {later_ui_url()}/...' links open once 'prefect server start' runs on the "
                    "same PREFECT_HOME",
                    file=sys.stderr,
                    flush=True,
                )
                return url
            code = self.process.poll()
            self.stop()
            if code != UVICORN_STARTUP_FAILURE:
                break
        if code is None:
            raise PrefectServerError(
                f"the local Prefect server did not answer within {self.timeout:g} s; set {STARTUP_TIMEOUT_ENV} "
                "to wait longer, or PREFECT_API_URL to use a running server"
            )
        raise PrefectServerError(
            f"the local Prefect server exited with code {code} before answering (its messages "
            "are above); set PREFECT_API_URL to use a running server instead"
        )

    def _wait_healthy(self, api_url: str, deadline: float) -> bool:
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an HTTP proxy
        while self.process.poll() is None and time.monotonic() < deadline:
            try:
                with direct.open(f"{api_url}/health", timeout=5) as response:
                    if response.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        return False

    def stop(self) -> None:
        """Stop the server (SIGTERM to its process group, SIGKILL after 10 s). Safe to call twice."""
        process, self.process = self.process, None
        atexit.unregister(self.stop)
        if process is None:
            return
        if process.poll() is None:
            try:
                _signal_group(process, signal.SIGTERM)
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait()
            except ProcessLookupError:
                process.wait()


def _drain_prefect_workers() -> None:
    """Send the logs and events Prefect still holds before the server goes away (as Prefect's test harness does)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=10)
        except Exception:  # best effort: nothing is lost but log lines
            pass


def later_ui_url() -> str:
    """Where ``prefect server start`` on this ``PREFECT_HOME`` serves the UI: ``$PREFECT_UI_URL`` when
    set, else ``http://{PREFECT_SERVER_API_HOST}:{PREFECT_SERVER_API_PORT}`` (``http://127.0.0.1:4200``)."""
    from prefect.settings import Settings

    given = os.environ.get("PREFECT_UI_URL", "").strip()
    if given:
        return given.rstrip("/")
    api = Settings().server.api  # read now: the environment may have changed since Prefect's settings were loaded
    host = "127.0.0.1" if api.host in ("0.0.0.0", "::", "") else api.host
    return f"http://{host}:{api.port}"


@contextmanager
def _api_url(url: str) -> Iterator[None]:
    """``PREFECT_API_URL`` for this block, and ``PREFECT_UI_URL`` (:func:`later_ui_url`): in the
    environment (child processes) and in Prefect's settings."""
    import prefect.context
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

    values = {"PREFECT_API_URL": url, "PREFECT_UI_URL": later_ui_url()}
    previous = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    refresh = getattr(prefect.context, "refresh_global_settings_context", None)  # threads that copy no context
    try:
        if refresh:
            refresh()
        with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_UI_URL: values["PREFECT_UI_URL"]}):
            yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if refresh:
            refresh()


@contextmanager
def prefect_api(timeout: float | None = None) -> Iterator[str]:
    """The Prefect API flows run in this block report to: the configured ``PREFECT_API_URL`` when there is
    one, else a :class:`LocalPrefectServer` started here and stopped when the block ends (or on SIGTERM).

    ``timeout``: seconds to wait for the server's first answer (default ``$CIRCUITFIND_PREFECT_STARTUP_TIMEOUT``
    or 600; the first start on a fresh ``PREFECT_HOME`` creates the database)."""
    from prefect.settings import PREFECT_API_URL

    configured = PREFECT_API_URL.value()
    if configured:
        with _exit_soon_on_sigint(lambda: None):
            yield configured
        return
    server = LocalPrefectServer(timeout)
    on_sigterm = _stop_on_sigterm(server)
    try:
        url = server.start()
        with _api_url(url), _exit_soon_on_sigint(server.stop):
            try:
                yield url
            finally:
                _drain_prefect_workers()
    finally:
        server.stop()
        on_sigterm.restore()


INTERRUPT_GRACE_S = 5.0  # after Ctrl-C, how long the flow may unwind before the process ends anyway


@contextmanager
def _exit_soon_on_sigint(cleanup: Callable[[], None], grace: float = INTERRUPT_GRACE_S) -> Iterator[None]:
    """While installed (main thread only), SIGINT raises ``KeyboardInterrupt`` as usual and starts a
    watchdog: if the process is still alive ``grace`` seconds later, ``cleanup`` runs (the server is
    stopped) and the process exits 130. Without it a sweep outlived Ctrl-C for minutes: the flow's
    task runner waits for its running settings (threads cannot be interrupted) before it returns. Outputs
    are written atomically and the run lock is the kernel's, so nothing is left half-written or held."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def watchdog() -> None:
        time.sleep(grace)
        try:
            cleanup()
        finally:
            print("circuitfind: interrupted", file=sys.stderr, flush=True)
            os._exit(130)

    def handle(signum: int, frame: Any) -> None:
        threading.Thread(target=watchdog, name="circuitfind interrupt", daemon=True).start()
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts again
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGINT) == handle:
            signal.signal(signal.SIGINT, previous)


class _stop_on_sigterm:
    """While installed (main thread only), SIGTERM stops the server, then takes its previous course.

    During a flow run Prefect installs its own SIGTERM handler; when it has marked the run crashed it
    restores this one and signals again, so the server outlives the crash report."""

    def __init__(self, server: LocalPrefectServer):
        self.server = server
        self.installed = threading.current_thread() is threading.main_thread()
        if self.installed:
            self.previous = signal.signal(signal.SIGTERM, self.handle)

    def handle(self, signum: int, frame) -> None:
        self.server.stop()
        self.restore()
        os.kill(os.getpid(), signum)

    def restore(self) -> None:
        if self.installed and signal.getsignal(signal.SIGTERM) == self.handle:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self.previous is None else self.previous)
        self.installed = False


# --------------------------------------------------------------------------------------------
# A Dask scheduler, reached before a sweep starts

DASK_SCHEMES = ("tcp", "tls", "ws", "wss")  # the transports distributed ships without extra packages
_PROBE = (
    "import json, sys\n"
    "from distributed import Client\n"
    "print('ready', flush=True)\n"
    "try:\n"
    "    with Client(sys.argv[1], timeout=float(sys.argv[2])) as client:\n"
    "        print(json.dumps({'workers': len(client.scheduler_info().get('workers', {}))}), flush=True)\n"
    "except BaseException as err:\n"
    "    print(json.dumps({'error': f'{type(err).__name__}: {err}'}), flush=True)\n"
)


def probe_dask_scheduler(address: str, timeout: float = 10.0) -> int:
    """The number of workers of the Dask scheduler at ``address``; ``ValueError`` (one line) when there is none.

    The connection is tried in a child process that is killed after ``timeout`` seconds (counted once it has
    started): distributed's own timeout covers only the TCP connect, so a silent service would hang the sweep,
    and one that answers first with other bytes makes it try to allocate exabytes. An unsupported scheme
    (``ucx://`` needs ucx-py) is refused without connecting."""
    scheme = address.split("://", 1)[0] if "://" in address else "tcp"
    if scheme not in DASK_SCHEMES:
        raise ValueError(
            f"--dask-address: {address!r} uses the {scheme!r} transport; use one of {', '.join(DASK_SCHEMES)} "
            "(e.g. tcp://host:8786)"
        )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")])
        ),
    }
    child = subprocess.Popen(
        [sys.executable, "-c", _PROBE, address, str(timeout)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(child.stdout), daemon=True)
    reader.start()
    started = time.monotonic()
    while not lines and child.poll() is None and time.monotonic() - started < 120:  # importing distributed
        time.sleep(0.05)
    reader.join(timeout + 2)  # the child's own timeout first: its message says more
    if reader.is_alive():
        child.kill()
        child.wait()
        raise ValueError(
            f"--dask-address: nothing at {address!r} answered as a Dask scheduler within {timeout:g} s "
            "(is it the scheduler's port? the default is 8786)"
        )
    child.wait()
    try:
        answer = json.loads(lines[-1])
    except (IndexError, ValueError):
        answer = {"error": f"the check exited with code {child.returncode} (is distributed installed?)"}
    if "error" in answer:
        problem = " ".join(str(answer["error"]).split())[:300]
        raise ValueError(f"--dask-address: cannot reach a Dask scheduler at {address!r} ({problem})")
    return int(answer["workers"])
