"""``--dask-address`` to something that is not a Dask scheduler: one line within seconds, never a hang or a
traceback (a silent TCP service, one that answers first with other bytes, an unsupported transport)."""

import socket
import threading
import time

import pytest

pytest.importorskip("distributed")

from circuitfind.cli import main  # noqa: E402
from circuitfind.flows.server import probe_dask_scheduler  # noqa: E402


def serve(answer: bytes | None):
    """A local TCP server that accepts and then stays silent (``None``) or sends ``answer`` and waits."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    held = []

    def accept():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            held.append(conn)
            if answer is not None:
                conn.sendall(answer)

    threading.Thread(target=accept, daemon=True).start()
    return server, held


@pytest.fixture(params=[None, b"SSH-2.0-OpenSSH_9.6\r\n" + b"\xff" * 64], ids=["silent", "garbage"])
def not_dask(request):
    server, held = serve(request.param)
    yield f"tcp://127.0.0.1:{server.getsockname()[1]}"
    server.close()
    for conn in held:
        conn.close()


@pytest.mark.slow
def test_a_service_that_is_not_dask_is_one_line_in_seconds(not_dask, capsys):
    start = time.monotonic()
    with pytest.raises(ValueError, match="--dask-address: ") as err:
        probe_dask_scheduler(not_dask, timeout=5)
    assert "\n" not in str(err.value)
    assert time.monotonic() - start < 30  # 5 s for the answer, plus the check's own start on a loaded machine
    start = time.monotonic()
    assert main(["sweep", "--dask-address", not_dask, "--outputs", "/nonexistent-unused"]) == 2
    out = capsys.readouterr().err
    assert out.startswith("circuitfind: error: --dask-address: ") and out.count("\n") == 1, out
    assert time.monotonic() - start < 40


def test_an_unsupported_transport_is_refused_without_connecting(capsys):
    start = time.monotonic()
    assert main(["sweep", "--dask-address", "ucx://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("circuitfind: error: --dask-address: ") and "'ucx' transport" in err
    assert err.count("\n") == 1 and time.monotonic() - start < 5


@pytest.mark.slow  # 5.5 s waiting on the port; make test stays under 5 minutes
def test_a_closed_port_is_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends
    with pytest.raises(ValueError, match="cannot reach a Dask scheduler"):
        probe_dask_scheduler(f"tcp://127.0.0.1:{port}", timeout=5)
