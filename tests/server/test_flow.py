"""Flow control and the split between the event loop and the thread pool.

A client that does not read its replies must not make the server start every request
it sent (and hold every reply in memory); once it reads, everything arrives, in order
and intact. A file's small reads and writes run in the event loop, big ones and FUA
writes in the thread pool: both paths must give the same bytes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pynbd.client import Client
from pynbd.server import FileBackend, Limits, MemoryBackend

from .helpers import read_simple_reply, recv_exactly, running_server, unread_reads

# Each test runs with connections served from threads, then from the event loop.
pytestmark = pytest.mark.usefixtures("serving_mode")

MiB = 1 << 20
#: The biggest READ, and WRITE without FUA, to a file that runs where it is read.
INLINE_MAX = Limits().inline_max


def _pattern(size: int) -> bytes:
    block = os.urandom(64 * 1024)
    return (block * (size // len(block) + 1))[:size]


def _settled(read: Callable[[], int], timeout: float = 10.0) -> int:
    """The value once it is nonzero and has not changed for half a second."""
    deadline = time.monotonic() + timeout
    last = read()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = read()
        if now and now == last:
            return now
        last = now
    return last


def test_a_client_that_does_not_read_stops_the_server_starting_requests() -> None:
    count, size = 64, MiB
    backend = MemoryBackend(count * size)
    data = _pattern(count * size)
    backend.pwrite(memoryview(data), 0, False)
    with running_server(backend) as srv, unread_reads(srv, count, size) as sock:
        (session,) = srv.call(lambda: list(srv.server.sessions))
        started = _settled(lambda: srv.call(lambda: session.stats.requests))
        # The socket's and the transport's buffers hold some replies, not 64 MiB.
        assert 0 < started < count // 2
        for i in range(count):
            error, cookie = read_simple_reply(sock)
            assert (error, cookie) == (0, i)
            assert recv_exactly(sock, size) == data[i * size : (i + 1) * size]
        assert srv.call(lambda: session.stats.requests) == count


def test_file_requests_inline_and_in_the_pool_agree(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    size = 4 * INLINE_MAX
    with open(path, "wb") as f:
        f.truncate(size)
    big = _pattern(2 * INLINE_MAX)  # written in the pool, read in the pool
    small = os.urandom(4096)  # both in the event loop
    medium = os.urandom(INLINE_MAX)  # written in the pool (FUA), read inline
    with FileBackend(path) as backend, running_server(backend) as srv, Client(srv.uri) as c:
        c.pwrite(big, 0)
        c.pwrite(small, len(big))
        c.pwrite(medium, len(big) + 4096, fua=True)
        c.pwrite(small, size - 4096, fua=True)  # FUA: the pool, whatever the size
        assert c.pread(len(big), 0) == big
        assert c.pread(4096, len(big)) == small
        assert c.pread(len(medium), len(big) + 4096) == medium
        assert c.pread(4096, size - 4096) == small
        c.flush()
    assert path.read_bytes()[: len(big)] == big
