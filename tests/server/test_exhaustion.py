"""The server under thread or descriptor exhaustion (issue 16, finding 4).

A connection that cannot get its thread (or the descriptor of its thread's waker) is
served by the event loop; a request that cannot get a pool thread runs inline; and
what repeats (the failures, asyncio's failed accepts) is logged once per kind and
interval, with a count of the lines left out. Exhaustion is simulated in-process
(thread starts and descriptors that fail); tests/cli/test_serve.py lowers the
descriptor limit of a real ``pynbd serve``. The tests assert outcomes (clients are
served, the log is bounded), never timing.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pynbd.client import Client
from pynbd.proto.constants import Cmd
from pynbd.server import FileBackend, Limits
from pynbd.server import aio as aio_module
from pynbd.server.policy import LogLimiter, limited_log

from .helpers import (
    PATIENCE,
    Gated,
    raw_request,
    raw_session,
    read_simple_reply,
    recv_exactly,
    running_server,
    wait_until,
)

#: Run a test with connections served from threads, then from the event loop.
both_modes = pytest.mark.usefixtures("serving_mode")

MiB = 1 << 20


class Clock:
    """A clock a test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def frozen_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[Clock]:
    """The server's rate-limited log, with a clock that stands still (one line per
    kind, whatever the host's speed) and no memory of earlier tests."""
    clock = Clock()
    monkeypatch.setattr(limited_log, "clock", clock)
    monkeypatch.setattr(limited_log, "_kinds", {})
    yield clock


def lines(caplog: pytest.LogCaptureFixture, fragment: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if fragment in r.getMessage()]


# --------------------------------------------------------------------------- LogLimiter


def test_one_line_per_kind_per_interval_then_the_count(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    limiter = LogLimiter(logging.getLogger("pynbd.test"), interval=10, clock=clock)
    with caplog.at_level(logging.WARNING, "pynbd.test"):
        for i in range(1000):
            limiter.warning("a", "a happened (%d)", i)
            limiter.warning("b", "b happened")
        clock.now += 9.9
        assert not limiter.warning("a", "a happened (%d)", -1)
        clock.now += 0.2
        assert limiter.warning("a", "a happened (%d)", 1001)
    assert [r.getMessage() for r in caplog.records] == [
        "a happened (0)",
        "b happened",
        "a happened (1001) (and 1000 more like it in the last 10 s)",
    ]


def test_the_kinds_remembered_are_bounded() -> None:
    limiter = LogLimiter(logging.getLogger("pynbd.test"), clock=Clock())
    for i in range(LogLimiter.MAX_KINDS * 3):
        limiter.log(logging.DEBUG, f"kind {i}", "x")
    assert len(limiter._kinds) == LogLimiter.MAX_KINDS


def test_failed_accepts_are_logged_once_per_interval(
    frozen_log: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    context = {
        "message": "socket.accept() out of system resource",
        "exception": OSError(errno.EMFILE, "Too many open files"),
    }
    with caplog.at_level(logging.WARNING, "pynbd.server"):
        for _ in range(10000):
            aio_module._loop_exception(None, context)  # type: ignore[arg-type]
        frozen_log.now += 60
        aio_module._loop_exception(None, context)  # type: ignore[arg-type]
    assert [r.getMessage() for r in caplog.records] == [
        "cannot accept a connection: [Errno 24] Too many open files",
        "cannot accept a connection: [Errno 24] Too many open files"
        " (and 9999 more like it in the last 60 s)",
    ]
    assert all(r.exc_info is None for r in caplog.records)  # no tracebacks


# --------------------------------------------------------------------------- serving


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[FileBackend]:
    """A 4 MiB file (its reads and writes are CACHED: over ``inline_max``, or with FUA,
    they go to the pool)."""
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(4 * MiB))
    backend = FileBackend(path)
    yield backend
    backend.close()


def exercise(uri: str) -> None:
    """Writes (with and without FUA), a flush and reads, checked."""
    data = os.urandom(MiB)
    with Client(uri, timeout=PATIENCE) as c:
        c.pwrite(data, 0)
        c.pwrite(data[:4096], 2 * MiB, fua=True)
        c.flush()
        assert c.pread(MiB, 0) == data
        assert c.pread(4096, 2 * MiB) == data[:4096]


def failing_thread_starts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every thread the server would start fail to start; returns their names."""
    refused: list[str] = []
    start = threading.Thread.start

    def failing_start(self: threading.Thread) -> None:
        if self.name.startswith("pynbd-"):
            refused.append(self.name)
            raise RuntimeError("can't start new thread")
        start(self)

    monkeypatch.setattr(threading.Thread, "start", failing_start)
    return refused


@both_modes
def test_no_thread_at_all(
    monkeypatch: pytest.MonkeyPatch,
    frozen_log: Clock,
    caplog: pytest.LogCaptureFixture,
    disk: FileBackend,
    serving_mode: str,
) -> None:
    """Neither connection threads nor pool threads: every request runs in the event
    loop, and each kind of failure is logged once."""
    limits = Limits(inline_max=0)  # (every request would go to the pool)
    with running_server(disk, limits=limits) as srv:
        refused = failing_thread_starts(monkeypatch)
        with caplog.at_level(logging.WARNING, "pynbd.server"):
            for _ in range(3):
                exercise(srv.uri)
        assert refused
    assert len(lines(caplog, "cannot start a thread for a request")) == 1
    expected = 1 if serving_mode == "threads" else 0
    assert len(lines(caplog, "cannot start a connection thread")) == expected
    assert not [r for r in caplog.records if r.exc_info]


@both_modes
def test_a_pool_thread_busy_and_no_other(
    monkeypatch: pytest.MonkeyPatch, frozen_log: Clock
) -> None:
    """The pool's one thread is busy and no other can start: the next request waits
    for that one (it is neither lost nor run twice)."""
    backend = Gated()
    with running_server(backend) as srv, raw_session(srv) as sock:
        sock.sendall(raw_request(Cmd.READ, 0, 4096, cookie=1))
        wait_until(lambda: backend.started == 1, "the first read")
        failing_thread_starts(monkeypatch)
        sock.sendall(raw_request(Cmd.READ, 4096, 4096, cookie=2))
        session = srv.call(lambda: next(iter(srv.server.sessions)))
        wait_until(lambda: srv.call(lambda: session.core.in_flight) == 2, "the second read")
        backend.gate.set()
        cookies = set()
        for _ in range(2):
            error, cookie = read_simple_reply(sock)
            assert error == 0
            assert recv_exactly(sock, 4096) == b"g" * 4096
            cookies.add(cookie)
        assert cookies == {1, 2}
        assert backend.started == 2


def test_no_descriptor_for_a_connection_thread(
    monkeypatch: pytest.MonkeyPatch,
    frozen_log: Clock,
    caplog: pytest.LogCaptureFixture,
    disk: FileBackend,
) -> None:
    def no_descriptor(*args: Any) -> Any:
        raise OSError(errno.EMFILE, "Too many open files")

    with (
        running_server(disk, limits=Limits(connection_threads=True)) as srv,
        caplog.at_level(logging.WARNING, "pynbd.server"),
        monkeypatch.context() as patch,
    ):
        patch.setattr(os, "eventfd", no_descriptor, raising=False)
        patch.setattr(os, "pipe", no_descriptor)
        for _ in range(3):
            exercise(srv.uri)
    found = lines(caplog, "cannot start a connection thread ([Errno 24] Too many open files)")
    assert len(found) == 1


def test_a_pool_that_cannot_start_its_first_thread_cancels_the_call(
    monkeypatch: pytest.MonkeyPatch, frozen_log: Clock
) -> None:
    pool = aio_module._Pool(2, thread_name_prefix="pynbd-test")
    ran: list[int] = []
    try:
        with monkeypatch.context() as patch:
            failing_thread_starts(patch)
            with pytest.raises(RuntimeError):
                pool.submit(ran.append, 1)
        # A thread starts for the next call; the first one never runs.
        assert pool.submit(ran.append, 2).result(PATIENCE) is None
    finally:
        pool.shutdown(wait=True)
    assert ran == [2]


def test_a_pool_that_cannot_start_another_thread_queues_the_call(
    monkeypatch: pytest.MonkeyPatch, frozen_log: Clock
) -> None:
    pool = aio_module._Pool(4, thread_name_prefix="pynbd-test")
    gate = threading.Event()
    try:
        first = pool.submit(gate.wait, PATIENCE)  # the one thread is busy
        failing_thread_starts(monkeypatch)
        second = pool.submit(lambda: "done")
        assert not second.done()
        gate.set()
        assert first.result(PATIENCE) is True
        assert second.result(PATIENCE) == "done"
    finally:
        gate.set()
        pool.shutdown(wait=True)
