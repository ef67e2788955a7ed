"""Start ``python -m pynbd serve`` for tests: the one launcher of our own server.

:func:`start_pynbd` runs the server until its ``with`` block ends and waits for it
through ``--ready-fd``: the server writes its URIs to a pipe and closes it once it
listens, so nothing polls or probes. It listens where the arguments say (``--unix``,
``--tcp``, ``--inetd``, ``--socket-activation``), or on a private unix socket
(``listen="unix"``), or on 127.0.0.1 and a port the kernel chose (``listen="tcp"``). On
leaving the block the server is stopped by its pid (SIGTERM, then SIGKILL after a
grace period), also when the test failed. :func:`run_serve` runs a command that is
meant to exit by itself (errors, ``--help``). The ``pynbd_server`` fixture is a factory
over :func:`start_pynbd` whose servers are all stopped at teardown::

    def test_x(pynbd_server):
        srv = pynbd_server("--memory", "64M")
        run_tool("nbdinfo", srv.uri)

    def test_y(tmp_path):
        with start_pynbd(tmp_path, "--memory", "1M", "--unix", path) as srv:
            assert srv.stop(signal.SIGINT) == 0
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, quote, urlsplit

import pytest

__all__ = [
    "READY_TIMEOUT",
    "SRC",
    "STOP_GRACE",
    "PynbdServer",
    "child_env",
    "pynbd_server",
    "run_serve",
    "start_pynbd",
]

#: The checkout's source directory, which ``python -m pynbd`` must import.
SRC = Path(__file__).resolve().parent.parent / "src"
#: Seconds the server may take to get ready (only a broken server ever waits this long).
READY_TIMEOUT = 60.0
#: Seconds between the stopping signal and SIGKILL.
STOP_GRACE = 20.0

# sun_path holds 107 bytes and a NUL; pytest's tmp_path can be longer than that.
_SUN_PATH_MAX = 107
_counter = itertools.count()


def child_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return *base* (default: this process's environment) with this checkout's
    ``src`` first on PYTHONPATH, so that ``python -m pynbd`` imports it."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    return env


@dataclass(eq=False)
class PynbdServer:
    """A running ``pynbd serve``: its process, the URIs it announced, its log.

    ``socket_path``, or ``host`` and ``port``, are those of the first URI.
    """

    proc: subprocess.Popen[bytes]
    uris: list[str]
    log_path: Path
    socket_path: Path | None
    host: str | None
    port: int | None

    @property
    def pid(self) -> int:
        """The server's process id."""
        return self.proc.pid

    @property
    def uri(self) -> str:
        """The URI of the default export."""
        return self.uri_for("")

    def uri_for(self, export: str) -> str:
        """Return the URI of *export* on the first listener (``nbd+unix:///NAME?socket=``
        or ``nbd://HOST:PORT/NAME``, ``nbds`` with TLS)."""
        scheme, _, rest = self.uris[0].partition("://")
        authority, _, tail = rest.partition("/")
        query = tail.partition("?")[2]
        return f"{scheme}://{authority}/{quote(export, safe='')}" + (f"?{query}" if query else "")

    def log(self) -> str:
        """Return what the server wrote to stderr so far (a line per connection when
        it ends)."""
        return self.log_path.read_text(errors="replace")

    def stop(self, signum: int = signal.SIGTERM, grace: float = STOP_GRACE) -> int:
        """Stop the server by its pid: *signum*, then SIGKILL after *grace* seconds.

        Returns:
            Its exit status (negative: the signal that ended it). A server that
            already exited is not signalled; its status is returned again.
        """
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
            try:
                return self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(grace)


def _private_socket(workdir: Path, n: int) -> Path:
    sock = workdir / f"pynbd-serve-{n}.sock"
    if len(os.fsencode(sock)) <= _SUN_PATH_MAX:
        return sock
    return Path(f"/tmp/pynbd-{os.getpid()}-{n}.sock")


def _wait_ready(ready: int, timeout: float) -> list[str]:
    """Read the ready pipe until the server closes it (or dies); [] on timeout."""
    got = b""
    deadline = time.monotonic() + timeout
    with os.fdopen(ready, "rb", buffering=0) as pipe:
        while (left := deadline - time.monotonic()) > 0:
            if select.select([pipe], [], [], left)[0]:
                chunk = pipe.read(4096)
                if not chunk:
                    return got.decode().split()
                got += chunk
    return []


def _address(uri: str) -> tuple[Path | None, str | None, int | None]:
    parts = urlsplit(uri)
    if parts.scheme.endswith("+unix"):
        return Path(parse_qs(parts.query)["socket"][0]), None, None
    return None, parts.hostname, parts.port


@contextlib.contextmanager
def start_pynbd(
    workdir: Path,
    *args: str,
    listen: Literal["unix", "tcp"] | None = None,
    stdin: int = subprocess.DEVNULL,
    stdout: int = subprocess.DEVNULL,
    pass_fds: Sequence[int] = (),
    env: Mapping[str, str] | None = None,
    python: str = sys.executable,
    wrapper: Sequence[str] = (),
) -> Iterator[PynbdServer]:
    """Run ``[WRAPPER] PYTHON -m pynbd serve ARGS [LISTENER] --ready-fd W`` until the
    ``with`` block ends; stop it then (see :meth:`PynbdServer.stop`) if it still runs.

    Args:
        workdir: a directory for the log (``pynbd-serve-N.log``) and the socket.
        args: what to serve and options (``--memory 64M``, ``FILE``, ``--export ...``).
        listen: None: *args* say where; ``"unix"``: a private unix socket, removed
            afterwards; ``"tcp"``: 127.0.0.1 and a port the kernel chose. With
            ``--inetd`` the server announces no URI (it closes the pipe once it holds
            its connection) and ``uris`` is empty.
        stdin, stdout: the server's standard input and output (``subprocess.PIPE`` for
            stdout to read the ports it prints for ``--tcp HOST:0``).
        pass_fds: more descriptors the server inherits.
        env: its environment (default :func:`child_env`).
        python: the interpreter that runs the server.
        wrapper: a command that execs the rest (to set up fds as systemd does).

    Raises:
        RuntimeError: the server announced nothing within :data:`READY_TIMEOUT`.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    n = next(_counter)
    log_path = workdir / f"pynbd-serve-{n}.log"
    private: Path | None = None
    where: list[str] = []
    if listen == "unix":
        private = _private_socket(workdir, n)
        where = ["--unix", str(private)]
    elif listen == "tcp":
        where = ["--tcp", "127.0.0.1:0"]
    r, w = os.pipe()
    argv = [*wrapper, python, "-m", "pynbd", "serve", *args, *where, "--ready-fd", str(w)]
    try:
        with open(log_path, "wb") as log:
            # A session of its own: a terminal's Ctrl-C reaches pytest, which stops it.
            proc = subprocess.Popen(
                argv,
                stdin=stdin,
                stdout=stdout,
                stderr=log,
                env=child_env() if env is None else dict(env),
                pass_fds=(*pass_fds, w),
                start_new_session=True,
            )
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    server: PynbdServer | None = None
    try:
        uris = _wait_ready(r, READY_TIMEOUT)
        if not uris and "--inetd" not in args:
            raise RuntimeError(
                f"{' '.join(argv)} announced no URI within {READY_TIMEOUT} s "
                f"(exit status {proc.poll()}):\n{log_path.read_text(errors='replace')}"
            )
        socket_path, host, port = _address(uris[0]) if uris else (None, None, None)
        server = PynbdServer(proc, uris, log_path, socket_path, host, port)
        yield server
    finally:
        if server is not None:
            server.stop()
        else:
            proc.kill()
            proc.wait(STOP_GRACE)
        if proc.stdout is not None:
            proc.stdout.close()
        if private is not None:
            private.unlink(missing_ok=True)


def run_serve(
    *args: str,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = READY_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m pynbd serve ARGS`` to its exit (a usage error, ``--help``) and
    capture its output as text. Standard input is *input*, or /dev/null."""
    return subprocess.run(
        [sys.executable, "-m", "pynbd", "serve", *args],
        input=input,
        stdin=subprocess.DEVNULL if input is None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=child_env() if env is None else dict(env),
        check=False,
    )


@pytest.fixture
def pynbd_server(tmp_path: Path) -> Iterator[Callable[..., PynbdServer]]:
    """Factory: ``pynbd_server("--memory", "64M", tcp=False, **options)`` starts a
    server on a private unix socket (or TCP) that is stopped by pid at teardown; the
    options are :func:`start_pynbd`'s."""
    with contextlib.ExitStack() as stack:

        def start(*args: str, tcp: bool = False, **options: Any) -> PynbdServer:
            listen: Literal["unix", "tcp"] = "tcp" if tcp else "unix"
            return stack.enter_context(
                start_pynbd(tmp_path / "pynbd", *args, listen=listen, **options)
            )

        yield start
