"""The blocking ``pynbd.server.serve`` in a child process, stopped by SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pynbd.client import Client
from pynbd.errors import ConnectionClosed, ProtocolError
from pynbd.server import MemoryBackend, serve
from tests.serve_launcher import child_env


@contextmanager
def child(code: str) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()


def test_serve_unix_until_sigterm(tmp_path: Path) -> None:
    path = tmp_path / "nbd.sock"
    code = (
        "from pynbd.server import serve, MemoryBackend\n"
        f"serve(MemoryBackend(1 << 20), unix={str(path)!r},"
        " ready=lambda s: print('ready', flush=True))\n"
    )
    with child(code) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline() == "ready\n", proc.stderr.read()
        with Client(path=str(path)) as c:
            c.pwrite(b"hello", 0)
            assert c.pread(5, 0) == b"hello"
        idle = Client(path=str(path))  # still connected at shutdown
        try:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0, proc.stderr.read()
            with pytest.raises((ConnectionClosed, ProtocolError)):
                idle.pread(1, 0)
        finally:
            idle.close()
    assert not path.exists()  # the socket file was removed


def test_serve_tcp_on_a_kernel_chosen_port() -> None:
    code = (
        "from pynbd.server import serve, MemoryBackend\n"
        "serve(MemoryBackend(4096), tcp=('127.0.0.1', 0),"
        " ready=lambda s: print(s.addresses[0][1], flush=True))\n"
    )
    with child(code) as proc:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        with Client(host="127.0.0.1", port=port) as c:
            assert c.size == 4096
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0


def test_serve_needs_an_address() -> None:
    with pytest.raises(ValueError):
        serve(MemoryBackend(1))
