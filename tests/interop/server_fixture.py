"""Start ``python -m pynbd serve`` for the interop tests of pynbd's server.

:func:`start_pynbd` runs the server as a subprocess on a private unix socket (default)
or on 127.0.0.1 and a port the kernel chose (``tcp=True``), and waits for it through
``--ready-fd``: the server writes its URIs to a pipe and closes it once it listens, so
nothing polls or probes. The server is stopped by its pid (SIGTERM, then SIGKILL) when
the context manager exits, also when the test failed. The ``pynbd_server`` fixture is a
factory over it whose servers are all stopped at teardown::

    def test_x(pynbd_server):
        srv = pynbd_server("--memory", "64M")
        run_tool("nbdinfo", srv.uri)
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"

#: Seconds the server may take to start listening.
READY_TIMEOUT = 30.0
#: Seconds between SIGTERM and SIGKILL when a server is stopped.
STOP_GRACE = 10.0


def child_env() -> dict[str, str]:
    """Return an environment in which ``python -m pynbd`` imports this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    return env


@dataclass
class PynbdServer:
    """A running ``pynbd serve``: its process, the URIs it printed, its log file."""

    proc: subprocess.Popen[bytes]
    uris: list[str]
    log: Path
    socket_path: Path | None
    host: str | None
    port: int | None
    stopped: bool = field(default=False)

    @property
    def pid(self) -> int:
        """The server's process id."""
        return self.proc.pid

    @property
    def uri(self) -> str:
        """The URI of the default export."""
        return self.export_uri("")

    def export_uri(self, name: str) -> str:
        """Return the URI of export *name* (``nbd+unix:///NAME?socket=...`` or
        ``nbd://127.0.0.1:PORT/NAME``)."""
        if self.socket_path is not None:
            return f"nbd+unix:///{quote(name)}?socket={self.socket_path}"
        return f"nbd://{self.host}:{self.port}/{quote(name)}"

    def stderr(self) -> str:
        """The server's log so far (one line per connection when it ends)."""
        return self.log.read_text(errors="replace")

    def stop(self) -> int | None:
        """Stop the server by pid: SIGTERM, then SIGKILL after a grace period.

        Returns its exit status (None when it had to be killed).
        """
        if self.stopped:
            return self.proc.returncode
        self.stopped = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_GRACE)
                return None
        return self.proc.returncode


@contextlib.contextmanager
def start_pynbd(
    workdir: Path, *args: str, tcp: bool = False, python: str = sys.executable
) -> Iterator[PynbdServer]:
    """Run ``python -m pynbd serve ARGS`` until the ``with`` block ends.

    Args:
        workdir: a directory for the socket and the log.
        args: what to serve and options (``--memory 64M``, ``FILE``, ``--export ...``).
        tcp: listen on 127.0.0.1 and a kernel-chosen port instead of a unix socket.
        python: the interpreter to run the server with.

    Raises:
        RuntimeError: the server exited or printed no URI within READY_TIMEOUT.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    stamp = time.monotonic_ns()
    log = workdir / f"pynbd-serve-{stamp}.log"
    sock: Path | None = None
    if tcp:
        where = ["--tcp", "127.0.0.1:0"]
    else:
        sock = workdir / f"pynbd-{stamp}.sock"
        # sun_path holds 107 bytes; pytest's tmp_path can be longer than that.
        if len(os.fsencode(sock)) > 100:
            sock = Path(f"/tmp/pynbd-{os.getpid()}-{stamp}.sock")
        where = ["--unix", str(sock)]
    r, w = os.pipe()
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [python, "-m", "pynbd", "serve", *args, *where, "--ready-fd", str(w)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=logf,
            env=child_env(),
            pass_fds=(w,),
        )
    os.close(w)
    server: PynbdServer | None = None
    try:
        ready = b""
        deadline = time.monotonic() + READY_TIMEOUT
        with os.fdopen(r, "rb") as pipe:
            while time.monotonic() < deadline:
                readable, _, _ = select.select([pipe], [], [], 0.2)
                if readable:
                    chunk = os.read(pipe.fileno(), 4096)
                    if not chunk:
                        break
                    ready += chunk
        uris = ready.decode().split()
        if not uris:
            raise RuntimeError(
                f"pynbd serve {' '.join(args)} did not get ready:\n"
                f"{log.read_text(errors='replace')}"
            )
        host: str | None = None
        port: int | None = None
        if tcp:
            hostport = uris[0].split("://", 1)[1].split("/", 1)[0]
            host, _, port_text = hostport.rpartition(":")
            port = int(port_text)
        server = PynbdServer(proc, uris, log, sock, host, port)
        yield server
    finally:
        if server is not None:
            server.stop()
        elif proc.poll() is None:
            proc.kill()
            proc.wait(STOP_GRACE)
        if sock is not None:
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()


@pytest.fixture
def pynbd_server(tmp_path: Path) -> Iterator[Callable[..., PynbdServer]]:
    """Factory: ``pynbd_server("--memory", "64M", tcp=False)`` starts a server that is
    stopped by pid at teardown."""
    with contextlib.ExitStack() as stack:

        def start(*args: str, tcp: bool = False) -> PynbdServer:
            return stack.enter_context(start_pynbd(tmp_path / "pynbd", *args, tcp=tcp))

        yield start
