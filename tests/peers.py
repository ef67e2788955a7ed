"""Start and stop real NBD peers (nbdkit, qemu-nbd, nbd-server) for tests.

Every server runs on its own private unix socket (or, with ``tcp=True``, on 127.0.0.1
and a port the kernel chose) and is stopped by pid: SIGTERM, then SIGKILL after a grace
period, then SIGKILL for anything left in the session the server ran in. Servers are
started through a :class:`Peers` object, which stops all of them when it closes::

    with Peers(workdir) as peers:
        server = peers.nbdkit("memory", "64M", tls="x509")
        run_tool("nbdinfo", "--size", server.uri)

In pytest use the fixtures (re-exported by ``tests/conftest.py``): ``peers`` is a
:class:`Peers` on the test's tmp_path, and ``nbdkit``, ``qemu_nbd`` and ``nbd_server``
are its bound methods. A missing peer program raises :class:`PeerError`; tests that
need a peer fail, they never skip.

Readiness is read from /proc (the server's own listening sockets) rather than by
connecting: a probe connection counts as a client, which ends ``qemu-nbd`` without
``-t``, nbdkit with ``--filter=exitlast``, and makes nbd-server fork a child. The same
scan finds the TCP port the kernel gave a server started with port 0, so no port is
guessed and no race is run (except for nbd-server, where port 0 means inetd mode: it
gets a free port and is retried on a clash).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from urllib.parse import quote

import pytest

__all__ = [
    "START_TIMEOUT",
    "STOP_GRACE",
    "PeerError",
    "Peers",
    "Server",
    "TLSMode",
    "free_port",
    "make_psk_file",
    "make_qcow2_with_bitmap",
    "make_raw_image",
    "make_x509_dir",
    "nbd_server",
    "nbdinfo_json",
    "nbdkit",
    "peer_env",
    "peer_versions",
    "peers",
    "python313",
    "qemu_nbd",
    "require_program",
    "run_tool",
    "wait_for_socket",
]

TLSMode = Literal["x509", "psk"]

#: Seconds a server may take to start listening.
START_TIMEOUT = 20.0
#: Seconds between SIGTERM and SIGKILL when a server is stopped.
STOP_GRACE = 5.0

# The Debian package that brings each program, for error messages.
_PACKAGES = {
    "nbdkit": "nbdkit",
    "qemu-nbd": "qemu-utils",
    "qemu-img": "qemu-utils",
    "qemu-io": "qemu-utils",
    "nbd-server": "nbd-server",
    "nbd-client": "nbd-client",
    "nbdinfo": "libnbd-bin",
    "nbdcopy": "libnbd-bin",
    "nbdsh": "libnbd-bin and python3-libnbd",
    "fio": "fio",
}

# RFC 7919 ffdhe2048 group, as PKCS#3 PEM. Without a dh-params.pem in its credentials
# directory a qemu server generates DH parameters at startup, which takes from under a
# second to many seconds and ignores SIGTERM meanwhile.
_FFDHE2048_PEM = """\
-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""

# sun_path is 108 bytes including the terminating NUL.
_SUN_PATH_MAX = 107


class PeerError(RuntimeError):
    """A peer program is missing, failed to start, or failed a command."""


# --------------------------------------------------------------------------- programs


def peer_env() -> dict[str, str]:
    """Return an environment for running peer programs.

    Debian's directories come first on PATH: nbdsh runs ``python3 -m nbd`` and libnbd's
    Python module exists only for Debian's /usr/bin/python3, and nbd-client lives in
    /usr/sbin.
    """
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join(["/usr/bin", "/usr/sbin", "/bin", "/sbin", env.get("PATH", "")])
    env.setdefault("LC_ALL", "C.UTF-8")
    return env


def require_program(name: str) -> str:
    """Return the full path of peer program *name*.

    Raises:
        PeerError: the program is not installed (the message names its Debian package).
    """
    path = shutil.which(name, path=peer_env()["PATH"])
    if path is None:
        package = _PACKAGES.get(name, name)
        raise PeerError(
            f"{name} is not installed: install the Debian package {package} "
            "(.ci/run installs every peer)"
        )
    return path


def run_tool(
    *argv: str | os.PathLike[str],
    timeout: float = 60.0,
    check: bool = True,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a peer program to completion and capture its output as text.

    Args:
        argv: the program name (looked up with :func:`require_program`) and arguments.
        timeout: seconds before the program is killed.
        check: raise when the exit status is not 0.
        input: text written to its standard input (none: /dev/null).

    Raises:
        PeerError: the program is missing, timed out, or (with *check*) failed; the
            message holds its exit status, stdout and stderr.
    """
    args = [require_program(os.fspath(argv[0])), *(os.fspath(a) for a in argv[1:])]
    try:
        done = subprocess.run(
            args,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=peer_env(),
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise PeerError(f"{_cmdline(args)} did not finish within {timeout} s") from exc
    if check and done.returncode != 0:
        raise PeerError(
            f"{_cmdline(args)} exited with status {done.returncode}\n"
            f"--- stdout\n{done.stdout}--- stderr\n{done.stderr}"
        )
    return done


#: Where the tests look for a Python 3.13 unless $PYNBD_PYTHON313 says.
PYTHON313_DEFAULT = "/root/.pyenv/versions/3.13.0/bin/python3"


def python313() -> str:
    """Return the path of a Python 3.13 interpreter, for the tests that run under it
    (TLS-PSK, the asyncio transport that keeps a view of unsent data).

    Raises:
        PeerError: there is none at $PYNBD_PYTHON313 (default :data:`PYTHON313_DEFAULT`).
    """
    path = os.environ.get("PYNBD_PYTHON313", PYTHON313_DEFAULT)
    if not os.access(path, os.X_OK):
        raise PeerError(
            f"Python 3.13 is needed to test TLS-PSK and 3.13's asyncio for real and {path} "
            "is not there; install it there or point $PYNBD_PYTHON313 at a 3.13 interpreter"
        )
    return path


def nbdinfo_json(uri: str, *options: str, timeout: float = 60.0) -> Any:
    """Run ``nbdinfo --json [OPTIONS] URI`` and return the decoded JSON.

    Raises:
        PeerError: nbdinfo is missing or failed, or printed something that is not JSON.
    """
    out = run_tool("nbdinfo", "--json", *options, uri, timeout=timeout).stdout
    try:
        return json.loads(out)
    except json.JSONDecodeError as exc:
        raise PeerError(f"nbdinfo printed no JSON:\n{out}") from exc


def peer_versions() -> dict[str, str]:
    """Return the version of each peer server and of libnbd's tools.

    A missing program maps to ``"missing"``; this never raises.
    """
    versions: dict[str, str] = {}
    for name, flag in (
        ("nbdkit", "--version"),
        ("qemu-nbd", "--version"),
        ("nbd-server", "-V"),
        ("nbdinfo", "--version"),
    ):
        try:
            done = run_tool(name, flag, timeout=10.0, check=False)
        except PeerError:
            versions[name] = "missing"
            continue
        # nbd-server -V prints to stderr and exits non-zero.
        first = (done.stdout or done.stderr).strip().partition("\n")[0]
        found = re.search(r"\d+(\.\d+)+", first)
        versions[name] = found.group(0) if found else first or f"exit {done.returncode}"
    return versions


@functools.cache
def _help_text(program: str) -> str:
    done = run_tool(program, "--help", check=False, timeout=10.0)
    return done.stdout + done.stderr


def _require_option(program: str, option: str, why: str) -> None:
    if option not in _help_text(program):
        raise PeerError(f"this {program} has no {option} option, needed {why}")


def _cmdline(args: Sequence[str]) -> str:
    return " ".join(args)


# --------------------------------------------------------------------------- sockets


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on *host* that was free a moment ago.

    Another process may take it before it is used: prefer servers that accept port 0
    (as :class:`Peers` does for nbdkit and qemu-nbd), and retry on a clash.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_socket(
    address: str | os.PathLike[str] | tuple[str, int],
    timeout: float = START_TIMEOUT,
    *,
    alive: Callable[[], bool] | None = None,
) -> None:
    """Wait until a stream socket accepts a connection, then close that connection.

    Args:
        address: a unix socket path, or a ``(host, port)`` pair.
        timeout: seconds to keep trying.
        alive: called between tries; when it returns False the wait stops at once
            (pass the server's liveness check to fail fast when it died).

    Raises:
        PeerError: no connection was accepted in time, or *alive* returned False.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            if isinstance(address, tuple):
                socket.create_connection(address, timeout=1.0).close()
            else:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(1.0)
                    sock.connect(os.fspath(address))
            return
        except OSError as exc:
            if alive is not None and not alive():
                raise PeerError(f"the server for {address!r} died before accepting") from exc
            if time.monotonic() >= deadline:
                raise PeerError(f"{address!r} accepted no connection within {timeout} s") from exc
        time.sleep(0.02)


def _socket_inodes(pid: int) -> set[int]:
    inodes: set[int] = set()
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return inodes
    for name in names:
        try:
            target = os.readlink(f"{fd_dir}/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _unix_listening(path: Path, inodes: set[int]) -> bool:
    # /proc/net/unix: Num RefCount Protocol Flags Type St Inode [Path];
    # Flags 00010000 is __SO_ACCEPTCON, i.e. listen() was called.
    want = os.fspath(path)
    with open("/proc/net/unix", encoding="utf-8", errors="replace") as table:
        next(table)
        for line in table:
            fields = line.split(None, 7)
            if (
                len(fields) == 8
                and fields[7].rstrip("\n") == want
                and int(fields[3], 16) & 0x10000
                and int(fields[6]) in inodes
            ):
                return True
    return False


def _tcp_listening_ports(inodes: set[int]) -> list[int]:
    # /proc/net/tcp{,6}: sl local_address rem_address st ... inode (field 9); st 0A is
    # LISTEN; local_address is HEXADDR:HEXPORT.
    ports: list[int] = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(name):  # no IPv6 in this kernel
            continue
        with open(name, encoding="ascii") as table:
            next(table)
            for line in table:
                fields = line.split()
                if fields[3] == "0A" and int(fields[9]) in inodes:
                    ports.append(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


# --------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class _Proc:
    """A process, named by pid and start time so that a reused pid is never signalled."""

    pid: int
    start_time: int

    @classmethod
    def of(cls, pid: int) -> _Proc | None:
        stat = _read_stat(pid)
        return None if stat is None else cls(pid, stat[2])

    def alive(self) -> bool:
        stat = _read_stat(self.pid)
        return stat is not None and stat[2] == self.start_time and stat[0] not in "ZX"

    def signal(self, signum: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)


def _read_stat(pid: int) -> tuple[str, int, int] | None:
    """Return (state, session id, start time) of *pid* from /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            data = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    rest = data[data.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state), rest[3] field 6 (session), rest[19] field 22 (starttime).
    return rest[0], int(rest[3]), int(rest[19])


def _session_members(sid: int) -> list[_Proc]:
    """Return the live processes of session *sid*.

    Each server is started as a session leader, so its session holds exactly the
    processes it started (nbd-server forks one per connection). The kernel does not hand
    out a pid still in use as a session id, so nothing else can be in it.
    """
    members: list[_Proc] = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        stat = _read_stat(int(name))
        if stat is not None and stat[1] == sid and stat[0] not in "ZX":
            members.append(_Proc(int(name), stat[2]))
    return members


def _wait_gone(proc: _Proc, popen: subprocess.Popen[bytes] | None, timeout: float) -> bool:
    if popen is not None and popen.pid == proc.pid:
        try:
            popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True
    deadline = time.monotonic() + timeout
    while proc.alive():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


# --------------------------------------------------------------------------- servers


_RUNNING: set[Server] = set()


@atexit.register
def _stop_leftovers() -> None:
    # Last resort when a Peers was never closed (an interrupted run): servers must not
    # outlive the test process.
    for server in list(_RUNNING):
        server.stop()


@dataclass(eq=False)
class Server:
    """A running NBD server started by :class:`Peers`.

    ``socket_path`` is set for a unix-socket server; ``host`` and ``port`` for a TCP
    one. ``tls_dir`` is the x509 credentials directory or the directory that holds the
    PSK file. A Server is a context manager that stops it on exit.
    """

    kind: str
    argv: tuple[str, ...]
    pid: int
    export: str
    exports: tuple[str, ...]
    socket_path: Path | None
    host: str | None
    port: int | None
    tls: TLSMode | None
    tls_dir: Path | None
    psk_file: Path | None
    tls_username: str | None
    log_path: Path
    _proc: _Proc = field(repr=False)
    _popen: subprocess.Popen[bytes] | None = field(repr=False)
    _cleanup: list[Path] = field(default_factory=list, repr=False)
    _stopped: bool = field(default=False, repr=False)

    @property
    def uri(self) -> str:
        """libnbd-style URI of the default export, TLS parameters included."""
        return self.uri_for()

    @property
    def address(self) -> str | tuple[str, int]:
        """The unix socket path, or the ``(host, port)`` pair."""
        if self.socket_path is not None:
            return os.fspath(self.socket_path)
        if self.host is None or self.port is None:
            raise PeerError(f"{self.kind} has neither a socket path nor a TCP port")
        return (self.host, self.port)

    def uri_for(self, export: str | None = None, *, tls_params: bool = True) -> str:
        """Return the libnbd-style URI of *export* (default: ``self.export``).

        Args:
            export: the export name; it is percent-encoded into the path.
            tls_params: add ``tls-certificates``/``tls-psk-file`` and the PSK username,
                which nbdinfo, nbdcopy and qemu-img need to connect.
        """
        name = self.export if export is None else export
        path = "/" + quote(name, safe="")
        user = ""
        query: list[tuple[str, str]] = []
        if self.socket_path is not None:
            query.append(("socket", os.fspath(self.socket_path)))
        if self.tls is not None and tls_params:
            if self.tls == "psk" and self.psk_file and self.tls_username:
                user = quote(self.tls_username, safe="") + "@"
                query.append(("tls-psk-file", os.fspath(self.psk_file)))
            elif self.tls == "x509" and self.tls_dir:
                query.append(("tls-certificates", os.fspath(self.tls_dir)))
        scheme = "nbds" if self.tls is not None else "nbd"
        if self.socket_path is not None:
            base = f"{scheme}+unix://{user}{path}"
        else:
            host = f"[{self.host}]" if self.host and ":" in self.host else self.host
            base = f"{scheme}://{user}{host}:{self.port}{path}"
        if not query:
            return base
        return base + "?" + "&".join(f"{k}={quote(v, safe='/')}" for k, v in query)

    def is_running(self) -> bool:
        """Return True while the server process is alive."""
        return self._proc.alive()

    def log(self) -> str:
        """Return what the server wrote to stdout and stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        """SIGKILL the server at once (to test a crashed peer), then clean up."""
        self._proc.signal(signal.SIGKILL)
        self.stop()

    def stop(self, grace: float = STOP_GRACE) -> None:
        """Stop the server: SIGTERM, SIGKILL after *grace* seconds, then SIGKILL
        whatever is left in its session; remove its socket. Idempotent; never raises
        for a server that already died.
        """
        if self._stopped:
            return
        self._stopped = True
        _RUNNING.discard(self)
        self._proc.signal(signal.SIGTERM)
        if not _wait_gone(self._proc, self._popen, grace):
            self._proc.signal(signal.SIGKILL)
            _wait_gone(self._proc, self._popen, grace)
        for straggler in _session_members(self._proc.pid):
            straggler.signal(signal.SIGKILL)
        if self._popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._popen.wait(grace)
        for path in self._cleanup:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def __enter__(self) -> Server:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class _DiedEarly(PeerError):
    """The server exited before it listened."""


class Peers:
    """Starts real NBD servers whose files live in one work directory.

    Every server started here is stopped by :meth:`close` (or on leaving the ``with``
    block), in reverse order, even when a test failed. TLS servers share one test CA
    (:meth:`x509_dir`) and one PSK file (:meth:`psk_file`) unless given others.

    Args:
        workdir: a directory for sockets, logs, configs and credentials; created if
            missing and left in place (pytest's tmp_path keeps it for post-mortems).
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir).absolute()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._servers: list[Server] = []
        self._counter = itertools.count()
        self._x509: Path | None = None
        self._psk: dict[str, Path] = {}

    def __enter__(self) -> Peers:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop every server started here."""
        while self._servers:
            self._servers.pop().stop()

    # ----------------------------------------------------------------- credentials

    def x509_dir(self) -> Path:
        """Return this work directory's x509 credentials (made on first use)."""
        if self._x509 is None:
            self._x509 = make_x509_dir(self.workdir)
        return self._x509

    def psk_file(self, username: str = "alice") -> Path:
        """Return this work directory's PSK file for *username* (made on first use)."""
        if username not in self._psk:
            self._psk[username] = make_psk_file(self.workdir, username, name=f"psk-{username}")
        return self._psk[username]

    # ----------------------------------------------------------------- servers

    def nbdkit(
        self,
        plugin: str | os.PathLike[str],
        *args: str,
        filters: Sequence[str] = (),
        tcp: bool = False,
        tls: TLSMode | None = None,
        tls_verify_peer: bool = False,
        tls_creds: Path | None = None,
        tls_username: str = "alice",
        export: str = "",
        extra: Sequence[str] = (),
        socket_path: Path | None = None,
        port: int | None = None,
        exit_with_parent: bool = True,
        timeout: float = START_TIMEOUT,
    ) -> Server:
        """Start ``nbdkit -f [--filter=F ...] PLUGIN ARGS``.

        Args:
            plugin: a plugin name (``memory``) or a script path (for ``python``, pass
                ``"python"`` and the script as the first of *args*).
            args: plugin parameters, such as ``"64M"`` or ``"size=1M"``.
            filters: filter names, outermost first.
            tcp: listen on 127.0.0.1 and a kernel-chosen port instead of a unix socket.
            tls: ``"x509"`` or ``"psk"`` to require TLS (``--tls=require``).
            tls_verify_peer: with x509, demand a client certificate signed by the CA.
            tls_creds: the x509 directory or PSK file to use (default: the shared ones).
            tls_username: the PSK identity put in the URI.
            export: the export name put in the URI (nbdkit plugins serve any name).
            extra: more nbdkit options, placed before the plugin.
            socket_path: a unix socket path to use (to restart a server in place).
            port: a TCP port to use instead of a kernel-chosen one.
            exit_with_parent: pass ``--exit-with-parent`` so that nbdkit dies with the
                test process even after a SIGKILL. nbdkit then also exits when the
                *thread* that started it exits: start servers from the main thread.
            timeout: seconds to wait for the server to listen.

        Raises:
            PeerError: nbdkit is missing, or exited or did not listen in time (the
                message holds its output).
        """
        exe = require_program("nbdkit")
        n = next(self._counter)
        argv = [exe, "-f", "-P", os.fspath(self.workdir / f"nbdkit-{n}.pid")]
        if exit_with_parent:
            argv.append("--exit-with-parent")
        sock, cleanup = self._listen_args(argv, "nbdkit", n, tcp, socket_path, port, "-U")
        psk_file, tls_dir = None, None
        if tls == "x509":
            tls_dir = tls_creds or self.x509_dir()
            argv += ["--tls=require", f"--tls-certificates={tls_dir}"]
            if tls_verify_peer:
                argv.append("--tls-verify-peer")
        elif tls == "psk":
            psk_file = tls_creds or self.psk_file(tls_username)
            tls_dir = psk_file.parent
            argv += ["--tls=require", f"--tls-psk={psk_file}"]
        argv += [f"--filter={f}" for f in filters]
        argv += [*extra, os.fspath(plugin), *args]
        return self._spawn(
            "nbdkit",
            n,
            argv,
            export=export,
            exports=(export,),
            socket_path=sock,
            tcp=tcp,
            tls=tls,
            tls_dir=tls_dir,
            psk_file=psk_file,
            tls_username=tls_username if tls == "psk" else None,
            cleanup=cleanup,
            timeout=timeout,
        )

    def qemu_nbd(
        self,
        image: str | os.PathLike[str],
        fmt: str = "raw",
        export: str = "",
        shared: int = 16,
        *,
        tcp: bool = False,
        tls: TLSMode | None = None,
        tls_verify_peer: bool = False,
        tls_creds: Path | None = None,
        tls_username: str = "alice",
        allocation_depth: bool = False,
        bitmaps: Sequence[str] = (),
        readonly: bool = False,
        extra: Sequence[str] = (),
        socket_path: Path | None = None,
        port: int | None = None,
        timeout: float = START_TIMEOUT,
    ) -> Server:
        """Start ``qemu-nbd -t -f FMT -x EXPORT --shared=N IMAGE`` in the foreground.

        qemu-nbd locks the image while it runs: open it elsewhere with ``-U``.

        Args:
            image: the image file.
            fmt: its format (``raw``, ``qcow2``).
            export: the export name (``-x``).
            shared: how many clients may connect at once; multi-conn is advertised
                only above 1.
            tcp: listen on 127.0.0.1 and a kernel-chosen port instead of a unix socket.
            tls: ``"x509"`` or ``"psk"``: serve only over TLS (``--tls-creds``).
            tls_verify_peer: with x509, demand a client certificate signed by the CA.
            tls_creds: the x509 directory, or the PSK file (qemu reads ``keys.psk`` in
                its directory, so the file must carry that name).
            tls_username: the PSK identity put in the URI.
            allocation_depth: ``-A``, exposing the ``qemu:allocation-depth`` context.
            bitmaps: ``-B NAME`` for each, exposing ``qemu:dirty-bitmap:NAME``.
            readonly: ``-r``.
            extra: more qemu-nbd options, placed before the image.
            socket_path: a unix socket path to use (to restart a server in place).
            port: a TCP port to use instead of a kernel-chosen one.
            timeout: seconds to wait for the server to listen.

        Raises:
            PeerError: qemu-nbd is missing or lacks a needed option (-A, -B), or exited
                or did not listen in time (the message holds its output).
        """
        exe = require_program("qemu-nbd")
        n = next(self._counter)
        argv = [exe, "-t", "-f", fmt, "-x", export, f"--shared={shared}"]
        sock, cleanup = self._listen_args(argv, "qemu-nbd", n, tcp, socket_path, port, "-k")
        if allocation_depth:
            _require_option("qemu-nbd", "--allocation-depth", "to expose qemu:allocation-depth")
            argv.append("-A")
        for name in bitmaps:
            _require_option("qemu-nbd", "--bitmap", "to expose a dirty bitmap")
            argv += ["-B", name]
        if readonly:
            argv.append("-r")
        psk_file, tls_dir = None, None
        if tls == "x509":
            tls_dir = tls_creds or self.x509_dir()
            verify = "on" if tls_verify_peer else "off"
            argv += [
                "--object",
                f"tls-creds-x509,id=tls0,dir={tls_dir},endpoint=server,verify-peer={verify}",
                "--tls-creds",
                "tls0",
            ]
        elif tls == "psk":
            psk_file = tls_creds or self.psk_file(tls_username)
            if psk_file.name != "keys.psk":
                raise PeerError(f"qemu-nbd reads keys.psk, not {psk_file.name}")
            tls_dir = psk_file.parent
            argv += [
                "--object",
                f"tls-creds-psk,id=tls0,dir={tls_dir},endpoint=server",
                "--tls-creds",
                "tls0",
            ]
        argv += [*extra, os.fspath(Path(image).absolute())]
        return self._spawn(
            "qemu-nbd",
            n,
            argv,
            export=export,
            exports=(export,),
            socket_path=sock,
            tcp=tcp,
            tls=tls,
            tls_dir=tls_dir,
            psk_file=psk_file,
            tls_username=tls_username if tls == "psk" else None,
            cleanup=cleanup,
            timeout=timeout,
        )

    def nbd_server(
        self,
        exports: Mapping[str, str | os.PathLike[str]],
        readonly: Collection[str] = (),
        tcp: bool = True,
        *,
        options: Mapping[str, Mapping[str, str]] | None = None,
        allowlist: bool = True,
        socket_path: Path | None = None,
        port: int | None = None,
        timeout: float = START_TIMEOUT,
    ) -> Server:
        """Start nbd-server with one config section per named export.

        nbd-server daemonizes (its ``-d`` serves a single connection and exits), so it
        is followed through its pid file; once daemonized its errors go to syslog
        only. Port 0 means inetd mode to it, so a TCP server gets a free port and is
        started again on another if that one was taken meanwhile.

        Args:
            exports: export name -> file (made absolute; nbd-server opens it only when
                a client selects the export). The first name is ``Server.export``.
            readonly: names of exports to serve read-only.
            tcp: listen on 127.0.0.1 (default) instead of a unix socket.
            options: export name -> more ``key = value`` lines for its section, such
                as ``{"disk": {"flush": "true", "fua": "true", "trim": "true"}}``
                (nbd-server advertises FLUSH, FUA and TRIM only when asked to).
            allowlist: answer NBD_OPT_LIST (False: refuse it, nbd-server's default).
            socket_path: a unix socket path to use (to restart a server in place).
            port: a TCP port to use (no retry then).
            timeout: seconds to wait for the server to listen.

        Raises:
            PeerError: nbd-server is missing, an export name cannot be written in its
                config, or it did not start.
        """
        exe = require_program("nbd-server")
        if not exports:
            raise PeerError("nbd-server needs at least one export")
        for name in exports:
            if not name or name == "generic" or any(c in name for c in "[]\n="):
                raise PeerError(f"export name {name!r} cannot be an nbd-server section")
        options = options or {}
        unknown = (set(readonly) | set(options)) - set(exports)
        if unknown:
            raise PeerError(f"readonly or options name no export: {sorted(unknown)}")
        for section in options.values():
            for key, value in section.items():
                if any(c in key + value for c in "\n=[]") or not key:
                    raise PeerError(f"{key!r} = {value!r} cannot be an nbd-server line")
        attempts = 5 if tcp and port is None else 1
        for attempt in range(attempts):
            n = next(self._counter)
            conf = self.workdir / f"nbd-server-{n}.conf"
            pidfile = self.workdir / f"nbd-server-{n}.pid"
            lines = ["[generic]", f"allowlist = {str(allowlist).lower()}"]
            cleanup: list[Path] = [pidfile]
            sock: Path | None = None
            if tcp:
                lines += ["listenaddr = 127.0.0.1", f"port = {port or free_port()}"]
            else:
                sock, cleanup = self._unix_path("nbd-server", n, socket_path)
                cleanup.append(pidfile)
                lines.append(f"unixsock = {sock}")
            for name, path in exports.items():
                lines += [f"[{name}]", f"exportname = {Path(path).absolute()}"]
                if name in readonly:
                    lines.append("readonly = true")
                lines += [f"{k} = {v}" for k, v in options.get(name, {}).items()]
            conf.write_text("\n".join(lines) + "\n")
            argv = [exe, "-C", os.fspath(conf), "-p", os.fspath(pidfile)]
            try:
                return self._spawn_daemon(
                    n,
                    argv,
                    pidfile,
                    export=next(iter(exports)),
                    exports=tuple(exports),
                    socket_path=sock,
                    tcp=tcp,
                    cleanup=cleanup,
                    timeout=timeout,
                )
            except _DiedEarly:
                if attempt + 1 == attempts:
                    raise
        raise AssertionError("unreachable")

    # ----------------------------------------------------------------- internals

    def _unix_path(self, kind: str, n: int, given: Path | None) -> tuple[Path, list[Path]]:
        if given is not None:
            return Path(given).absolute(), [Path(given).absolute()]
        path = self.workdir / f"{kind}-{n}.sock"
        if len(os.fsencode(path)) <= _SUN_PATH_MAX:
            return path, [path]
        # pytest's tmp_path can be too long for sun_path: use a short private dir.
        short = Path(tempfile.mkdtemp(prefix="pynbd-"))
        return short / f"{kind}.sock", [short]

    def _listen_args(
        self,
        argv: list[str],
        kind: str,
        n: int,
        tcp: bool,
        socket_path: Path | None,
        port: int | None,
        unix_flag: str,
    ) -> tuple[Path | None, list[Path]]:
        if tcp:
            # Both nbdkit and qemu-nbd bind port 0 to a kernel-chosen port, which
            # _wait_listening then reads back from /proc.
            host_flag = "-i" if kind == "nbdkit" else "-b"
            argv += [host_flag, "127.0.0.1", "-p", str(port or 0)]
            return None, []
        sock, cleanup = self._unix_path(kind, n, socket_path)
        argv += [unix_flag, os.fspath(sock)]
        return sock, cleanup

    def _spawn(
        self,
        kind: str,
        n: int,
        argv: list[str],
        *,
        export: str,
        exports: tuple[str, ...],
        socket_path: Path | None,
        tcp: bool,
        tls: TLSMode | None,
        tls_dir: Path | None,
        psk_file: Path | None,
        tls_username: str | None,
        cleanup: list[Path],
        timeout: float,
    ) -> Server:
        log_path = self.workdir / f"{kind}-{n}.log"
        with open(log_path, "wb") as log:
            # A new session: a terminal's Ctrl-C reaches pytest (which then tears down)
            # rather than the servers, and the session groups whatever the server forks.
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=peer_env(),
                start_new_session=True,
            )
        proc = _Proc.of(popen.pid) or _Proc(popen.pid, -1)
        server = Server(
            kind=kind,
            argv=tuple(argv),
            pid=popen.pid,
            export=export,
            exports=exports,
            socket_path=socket_path,
            host="127.0.0.1" if tcp else None,
            port=None,
            tls=tls,
            tls_dir=tls_dir,
            psk_file=psk_file,
            tls_username=tls_username,
            log_path=log_path,
            _proc=proc,
            _popen=popen,
            _cleanup=cleanup,
        )
        return self._until_listening(server, tcp, timeout)

    def _spawn_daemon(
        self,
        n: int,
        argv: list[str],
        pidfile: Path,
        *,
        export: str,
        exports: tuple[str, ...],
        socket_path: Path | None,
        tcp: bool,
        cleanup: list[Path],
        timeout: float,
    ) -> Server:
        log_path = self.workdir / f"nbd-server-{n}.log"
        deadline = time.monotonic() + timeout
        with open(log_path, "wb") as log:
            done = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=peer_env(),
                timeout=timeout,
                check=False,
            )
        output = log_path.read_text(errors="replace")
        if done.returncode != 0:
            raise PeerError(f"{_cmdline(argv)} exited with status {done.returncode}:\n{output}")
        # The daemon writes its pid file right after forking, before it binds.
        proc: _Proc | None = None
        while proc is None:
            with contextlib.suppress(FileNotFoundError, ValueError):
                proc = _Proc.of(int(pidfile.read_text()))
            if proc is None:
                if time.monotonic() >= deadline:
                    raise PeerError(f"{_cmdline(argv)} wrote no pid file:\n{output}")
                time.sleep(0.02)
        server = Server(
            kind="nbd-server",
            argv=tuple(argv),
            pid=proc.pid,
            export=export,
            exports=exports,
            socket_path=socket_path,
            host="127.0.0.1" if tcp else None,
            port=None,
            tls=None,
            tls_dir=None,
            psk_file=None,
            tls_username=None,
            log_path=log_path,
            _proc=proc,
            _popen=None,
            _cleanup=cleanup,
        )
        return self._until_listening(
            server, tcp, max(0.1, deadline - time.monotonic()), note="(see syslog)"
        )

    def _until_listening(self, server: Server, tcp: bool, timeout: float, note: str = "") -> Server:
        # Registered before waiting, so that a failed start is stopped like any other.
        self._servers.append(server)
        _RUNNING.add(server)
        deadline = time.monotonic() + timeout
        while True:
            if not server.is_running():
                server.stop()
                raise _DiedEarly(
                    f"{server.kind} exited before listening {note}\n"
                    f"command: {_cmdline(server.argv)}\n--- output\n{server.log()}"
                )
            inodes = _socket_inodes(server.pid)
            if tcp:
                ports = _tcp_listening_ports(inodes)
                if ports:
                    server.port = ports[0]
                    return server
            elif server.socket_path is not None and _unix_listening(server.socket_path, inodes):
                return server
            if time.monotonic() >= deadline:
                server.stop()
                raise PeerError(
                    f"{server.kind} did not listen within {timeout:.1f} s {note}\n"
                    f"command: {_cmdline(server.argv)}\n--- output\n{server.log()}"
                )
            time.sleep(0.02)


# --------------------------------------------------------------------------- files


def make_x509_dir(parent: Path, name: str = "x509") -> Path:
    """Make a test CA and certificates in ``parent/name`` and return that directory.

    It holds ca-cert.pem, server-cert.pem and server-key.pem (for localhost, 127.0.0.1
    and ::1), client-cert.pem and client-key.pem (what nbdkit, qemu and libnbd look
    for), plus dh-params.pem so that qemu need not generate DH parameters.
    """
    import trustme  # test-only dependency, imported where needed

    directory = Path(parent) / name
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="pynbd tests")
    server = ca.issue_cert("localhost", "127.0.0.1", "::1", common_name="localhost")
    client = ca.issue_cert("pynbd-client.localhost", common_name="pynbd-client")
    ca.cert_pem.write_to_path(os.fspath(directory / "ca-cert.pem"))
    # Only the leaf: the CA is given to peers separately as ca-cert.pem.
    server.cert_chain_pems[0].write_to_path(os.fspath(directory / "server-cert.pem"))
    server.private_key_pem.write_to_path(os.fspath(directory / "server-key.pem"))
    client.cert_chain_pems[0].write_to_path(os.fspath(directory / "client-cert.pem"))
    client.private_key_pem.write_to_path(os.fspath(directory / "client-key.pem"))
    (directory / "dh-params.pem").write_text(_FFDHE2048_PEM)
    for key in ("server-key.pem", "client-key.pem"):
        (directory / key).chmod(0o600)
    return directory


def make_psk_file(parent: Path, username: str = "alice", name: str = "psk") -> Path:
    """Write ``parent/name/keys.psk`` with the line ``USERNAME:HEXKEY`` and return it.

    The file name is the one qemu's tls-creds-psk reads; nbdkit takes any name. A
    dh-params.pem is written beside it for qemu. The 32-byte key is random.
    """
    directory = Path(parent) / name
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "keys.psk"
    path.write_text(f"{username}:{os.urandom(32).hex()}\n")
    path.chmod(0o600)
    (directory / "dh-params.pem").write_text(_FFDHE2048_PEM)
    return path


def make_raw_image(path: Path, size: int, fill: int | None = None) -> Path:
    """Make a raw image of *size* bytes: sparse zeros, or every byte *fill*."""
    with open(path, "wb") as f:
        if fill is None:
            f.truncate(size)
        else:
            chunk = bytes([fill]) * min(size, 1 << 20)
            left = size
            while left:
                left -= f.write(chunk[: min(left, len(chunk))])
    return Path(path)


def make_qcow2_with_bitmap(
    path: Path,
    size: int,
    *,
    bitmap: str = "b0",
    granularity: int = 65536,
    clean: Sequence[tuple[int, int]] = (),
    dirty: Sequence[tuple[int, int]] = (),
    clean_fill: int = 0x11,
    dirty_fill: int = 0xAB,
) -> Path:
    """Make a qcow2 image with a persistent, enabled dirty bitmap that has known bits.

    The *clean* ranges are written before the bitmap exists (allocated, not dirty), the
    *dirty* ones after (allocated and dirty). The bitmap marks whole *granularity*
    blocks, so a dirty range is reported rounded out to them. Serve it with
    ``peers.qemu_nbd(path, "qcow2", bitmaps=[bitmap])``.

    Raises:
        PeerError: qemu-img or qemu-io is missing, too old for ``qemu-img bitmap``, or
            the bitmap did not come out enabled.
    """
    if "bitmap (" not in _help_text("qemu-img"):
        raise PeerError("this qemu-img has no 'bitmap' command (needs qemu 5.2 or later)")
    require_program("qemu-io")
    run_tool("qemu-img", "create", "-q", "-f", "qcow2", path, str(size))

    def write(ranges: Sequence[tuple[int, int]], fill: int) -> None:
        if ranges:
            cmds = [a for off, n in ranges for a in ("-c", f"write -P {fill} {off} {n}")]
            run_tool("qemu-io", "-f", "qcow2", *cmds, path)

    write(clean, clean_fill)
    # An added bitmap is enabled: writes through the qemu block layer (qemu-io here)
    # set its bits, and it is stored in the image when qemu-io closes it.
    run_tool("qemu-img", "bitmap", "--add", "-g", str(granularity), path, bitmap)
    write(dirty, dirty_fill)
    info = json.loads(run_tool("qemu-img", "info", "--output=json", path).stdout)
    found = info.get("format-specific", {}).get("data", {}).get("bitmaps", [])
    if not any(b.get("name") == bitmap and "auto" in b.get("flags", []) for b in found):
        raise PeerError(f"bitmap {bitmap} is missing or not enabled in {path}: {found}")
    return Path(path)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[Peers]:
    """A :class:`Peers` on ``tmp_path/peers``, closed at teardown."""
    with Peers(tmp_path / "peers") as p:
        yield p


@pytest.fixture
def nbdkit(peers: Peers) -> Callable[..., Server]:
    """Factory: ``nbdkit("memory", "64M", tcp=True)``; see :meth:`Peers.nbdkit`."""
    return peers.nbdkit


@pytest.fixture
def qemu_nbd(peers: Peers) -> Callable[..., Server]:
    """Factory: ``qemu_nbd(image, "qcow2", bitmaps=["b0"])``; see :meth:`Peers.qemu_nbd`."""
    return peers.qemu_nbd


@pytest.fixture
def nbd_server(peers: Peers) -> Callable[..., Server]:
    """Factory: ``nbd_server({"a": path})``; see :meth:`Peers.nbd_server`."""
    return peers.nbd_server
