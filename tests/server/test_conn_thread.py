"""Connections served from a thread of their own (pynbd.server.conn_thread).

Which connections get a thread; a shutdown that finds a thread idle, waiting for the
pool, or in the middle of a payload; an abort that finds it blocked in a send; a client
that hangs up; and pages lent to one connection's replies while another connection
writes (no reply may ever show another offset's data).
"""

from __future__ import annotations

import asyncio
import os
import struct
import threading
import time
from typing import Any

import pytest

from pynbd.client import Client
from pynbd.proto.constants import Cmd
from pynbd.server import Backend, Blocking, Capabilities, Limits, MemoryBackend
from pynbd.server.session import Session

from .helpers import (
    AsyncZeroes,
    ServerThread,
    is_closed,
    raw_request,
    raw_session,
    read_simple_reply,
    recv_exactly,
    running_server,
    unread_reads,
    wait_until,
)

PAGE = 64 * 1024


def only_session(srv: ServerThread) -> Session:
    sessions = srv.call(lambda: list(srv.server.sessions))
    assert len(sessions) == 1
    return sessions[0]


def threaded(srv: ServerThread) -> bool:
    session = only_session(srv)
    return srv.call(lambda: session.threaded)


class GatedReads(Backend):
    """A thread-safe blocking backend (its requests go to the pool) whose reads wait
    for a gate."""

    capabilities = Capabilities(thread_safe=True)

    def __init__(self) -> None:
        self.started = threading.Event()
        self.gate = threading.Event()

    @property
    def size(self) -> int:
        return 1 << 20

    def pread_into(self, buf: memoryview, offset: int) -> None:
        self.started.set()
        self.gate.wait(10)
        buf[:] = b"g" * len(buf)

    def pwrite(self, buf: memoryview, offset: int, fua: bool) -> None:
        pass


class Lonely(GatedReads):
    """The same, but calls may not overlap: it stays in the event loop."""

    capabilities = Capabilities(thread_safe=False)


class NeverBlocks(GatedReads):
    """Thread-safe by default, and its calls never wait."""

    capabilities = Capabilities(blocking=Blocking.NEVER)


class NeverBlocksAlone(GatedReads):
    """Its calls never wait, but may not overlap: it stays in the event loop."""

    capabilities = Capabilities(blocking=Blocking.NEVER, thread_safe=False)


@pytest.mark.parametrize(
    ("backend", "threads", "expected"),
    [
        (MemoryBackend(1 << 20), True, True),
        (GatedReads(), True, True),
        (MemoryBackend(1 << 20), False, False),
        (Lonely(), True, False),
        (NeverBlocks(), True, True),
        (NeverBlocksAlone(), True, False),
        (AsyncZeroes(), True, False),
    ],
    ids=[
        "memory",
        "thread-safe",
        "turned-off",
        "not-thread-safe",
        "never-blocks",
        "never-blocks-alone",
        "async",
    ],
)
def test_which_connections_get_a_thread(backend: Any, threads: bool, expected: bool) -> None:
    if isinstance(backend, GatedReads):
        backend.gate.set()
    limits = Limits(connection_threads=threads)
    with running_server(backend, limits=limits) as srv, Client(srv.uri) as c:
        assert c.pread(512, 0) is not None
        assert threaded(srv) is expected


def test_a_shutdown_closes_an_idle_connection_at_once() -> None:
    with running_server(MemoryBackend(1 << 20)) as srv, raw_session(srv) as sock:
        sock.sendall(raw_request(Cmd.READ, 0, 512))
        assert read_simple_reply(sock) == (0, 7)
        recv_exactly(sock, 512)
        assert threaded(srv)
        # No waiting for the grace period (srv.run gives up long before it ends).
        srv.run(srv.server.close(grace=3600))
        assert is_closed(sock)


def test_a_shutdown_waits_for_the_pool_and_answers() -> None:
    backend = GatedReads()
    limits = Limits(connection_threads=True)
    with running_server(backend, limits=limits) as srv, raw_session(srv) as sock:
        sock.sendall(raw_request(Cmd.READ, 0, 4096, cookie=1))
        assert backend.started.wait(5)
        assert threaded(srv)
        closing = asyncio.run_coroutine_threadsafe(srv.server.close(grace=10), srv.loop)
        time.sleep(0.3)
        assert not closing.done()  # waiting for the read in the pool
        backend.gate.set()
        assert read_simple_reply(sock) == (0, 1)
        assert recv_exactly(sock, 4096) == b"g" * 4096
        closing.result(5)
        assert is_closed(sock)


def test_a_shutdown_receives_the_payload_under_way_first() -> None:
    backend = MemoryBackend(1 << 20)
    data = os.urandom(2 * PAGE)
    with running_server(backend) as srv, raw_session(srv) as sock:
        sock.sendall(raw_request(Cmd.WRITE, 0, len(data), cookie=3) + data[:1000])
        session = only_session(srv)
        wait_until(
            lambda: srv.call(lambda: session.core.receiving_payload), "the payload's arrival"
        )
        closing = asyncio.run_coroutine_threadsafe(srv.server.close(grace=10), srv.loop)
        time.sleep(0.5)
        assert not closing.done()
        sock.sendall(data[1000:])
        assert read_simple_reply(sock) == (0, 3)
        closing.result(5)
        assert is_closed(sock)
    buf = bytearray(len(data))
    backend.pread_into(memoryview(buf), 0)
    assert buf == data


def test_an_abort_ends_a_send_to_a_client_that_does_not_read() -> None:
    backend = MemoryBackend(64 << 20)
    backend.pwrite(memoryview(os.urandom(64 << 20)), 0, False)
    with running_server(backend) as srv, unread_reads(srv, 64, 1 << 20) as sock:
        session = only_session(srv)
        wait_until(lambda: srv.call(lambda: session.stats.requests) > 0, "a request")
        time.sleep(0.3)  # the thread is blocked in a send (on a slow host, soon)
        assert threaded(srv)
        srv.call(lambda: session.abort("the test ends it"))
        # The thread ended, and the session with it, though the client read nothing.
        wait_until(lambda: not srv.call(lambda: len(srv.server.sessions)), "the session's end")
        assert is_closed(sock)


def test_a_client_that_hangs_up_frees_its_place_at_once() -> None:
    with running_server(MemoryBackend(1 << 20), limits=Limits(max_connections=1)) as srv:
        for _ in range(20):
            with raw_session(srv) as sock:
                sock.sendall(raw_request(Cmd.READ, 0, 512))
                assert read_simple_reply(sock) == (0, 7)
                recv_exactly(sock, 512)
            # no NBD_CMD_DISC: the socket is just closed, and the next one comes in
        with Client(srv.uri) as c:
            assert c.pread(4, 0) == bytes(4)


def tagged(page: int, version: int) -> bytes:
    return struct.pack(">II", page, version) * (PAGE // 8)


def test_pages_lent_to_replies_never_show_another_offsets_data() -> None:
    """One connection reads while others overwrite whole pages: with the pages of
    overwritten data recycled for the next writes, a reply still waiting to be sent
    (its views lent) would show some other page's new data."""
    pages = 32
    backend = MemoryBackend(pages * PAGE)
    for page in range(pages):
        backend.pwrite(memoryview(tagged(page, 0)), page * PAGE, False)
    stop = threading.Event()
    errors: list[str] = []

    def writer(srv: ServerThread, first: int) -> None:
        version = 1
        with Client(srv.uri) as c:
            while not stop.is_set():
                start = first + (version % 4) * 4
                c.pwrite(
                    b"".join(tagged(p, version) for p in range(start, start + 4)), start * PAGE
                )
                version += 1

    def reader(srv: ServerThread) -> None:
        with Client(srv.uri) as c:
            while not stop.is_set():
                data = c.pread(pages * PAGE, 0)
                for page in range(pages):
                    chunk = data[page * PAGE : (page + 1) * PAGE]
                    got, version = struct.unpack(">II", chunk[:8])
                    if got != page or chunk != tagged(page, version):
                        errors.append(f"page {page} showed page {got}'s data")
                        stop.set()

    with running_server(backend, limits=Limits(connection_threads=True)) as srv:
        threads = [
            threading.Thread(target=writer, args=(srv, 0)),
            threading.Thread(target=writer, args=(srv, 16)),
            threading.Thread(target=reader, args=(srv,)),
            threading.Thread(target=reader, args=(srv,)),
        ]
        for t in threads:
            t.start()
        time.sleep(2)
        stop.set()
        for t in threads:
            t.join(10)
    assert not errors, errors[:3]
