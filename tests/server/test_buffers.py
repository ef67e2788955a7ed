"""Buffer reuse: WRITE payloads and READ replies come from a per-connection pool.

A buffer may go back to the pool only when nothing uses it any more: a READ reply once
it is sent whole (not while the transport still holds part of it), a WRITE payload
once the backend returned (not while a thread-pool backend still writes it).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from pynbd.proto.constants import Cmd
from pynbd.proto.server import BufferPool, RequestReceived
from pynbd.server import Backend, Capabilities, MemoryBackend
from tests.peers import python313
from tests.serve_launcher import start_pynbd

from .helpers import (
    raw_go,
    raw_request,
    read_simple_reply,
    recv_exactly,
    running_server,
)
from .test_core_transmission import request, tx

KiB = 1024
_READ, _WRITE = 0, 1


def test_the_pool_hands_back_buffers_of_the_same_size() -> None:
    pool = BufferPool(max_bytes=3 * 4 * KiB, min_size=4 * KiB)
    first = pool.take(4 * KiB)
    pool.give(first)
    assert pool.held == 4 * KiB
    assert pool.take(4 * KiB) is first
    assert pool.take(4 * KiB) is not first  # taken: a new one
    assert pool.take(8 * KiB) is not first  # another size
    assert pool.held == 0


def test_the_pool_keeps_no_small_buffers_and_no_more_than_its_limit() -> None:
    pool = BufferPool(max_bytes=2 * 4 * KiB, min_size=4 * KiB)
    pool.give(bytearray(KiB))
    assert pool.held == 0
    kept = [bytearray(4 * KiB) for _ in range(3)]
    for buf in kept:
        pool.give(buf)
    assert pool.held == 2 * 4 * KiB
    assert len(pool.take(100)) == 100


@pytest.mark.parametrize("mode", ["simple", "structured", "extended"])
def test_a_read_answered_in_pieces_is_sent_as_one_buffer_would_be(mode: str) -> None:
    pieces: list[bytes | bytearray | memoryview] = [
        b"a" * 512,
        bytearray(b"b" * 512),
        memoryview(b"c" * 512),
    ]

    def answer(vector: bool) -> bytes:
        conn = tx(mode)
        conn.receive_data(request(conn, Cmd.READ, 4096, 3 * 512, cookie=5))
        event = conn.next_event()
        assert isinstance(event, RequestReceived)
        with pytest.raises(ValueError):
            conn.reply_read_vector(event, pieces[:2])
        if vector:
            conn.reply_read_vector(event, pieces)
        else:
            conn.reply_read(event, b"".join(pieces))
        return conn.data_to_send()

    assert answer(True) == answer(False)


def test_memory_views_show_the_stored_bytes_and_zeroes_for_holes() -> None:
    backend = MemoryBackend(4 * 64 * KiB)
    data = os.urandom(64 * KiB + 100)
    backend.pwrite(memoryview(data), 64 * KiB - 50, False)
    views = backend.pread_views(3 * 64 * KiB, 0)
    got = b"".join(bytes(v) for v in views)
    assert got == bytes(64 * KiB - 50) + data + bytes(64 * KiB - 50)


@pytest.mark.parametrize(
    ("length", "offset"),
    [
        (4096, 0),  # in a written page
        (100, 64 * KiB - 100),  # at a page's end
        (4096, 2 * 64 * KiB + 512),  # in a hole
        (64 * KiB, 64 * KiB),  # one whole page
        (200, 64 * KiB - 100),  # across two pages
        (0, 512),
    ],
)
def test_memory_views_of_small_reads(length: int, offset: int) -> None:
    backend = MemoryBackend(4 * 64 * KiB)
    data = os.urandom(2 * 64 * KiB)
    backend.pwrite(memoryview(data), 0, False)
    model = data + bytes(2 * 64 * KiB)
    views = backend.pread_views(length, offset)
    assert b"".join(bytes(v) for v in views) == model[offset : offset + length]
    assert len(views) == (offset % (64 * KiB) + length > 64 * KiB) + (length > 0)


@pytest.mark.parametrize(
    ("length", "offset"),
    [
        (4096, 512),  # in a written page
        (100, 64 * KiB - 100),  # up to a page's end
        (64 * KiB, 64 * KiB),  # one whole written page
        (4096, 2 * 64 * KiB + 512),  # in a hole
        (200, 2 * 64 * KiB - 100),  # across a written page and a hole
        (0, 512),
    ],
)
def test_memory_small_writes(length: int, offset: int) -> None:
    backend = MemoryBackend(4 * 64 * KiB)
    model = bytearray(os.urandom(2 * 64 * KiB) + bytes(2 * 64 * KiB))
    backend.pwrite(memoryview(model[: 2 * 64 * KiB]), 0, False)
    data = os.urandom(length)
    backend.pwrite(memoryview(data), offset, False)
    model[offset : offset + length] = data
    out = bytearray(len(model))
    backend.pread_into(memoryview(out), 0)
    assert out == model
    assert backend.allocated == 64 * KiB * (2 + (offset + length > 2 * 64 * KiB))


def _reads_and_writes(size: int, rounds: int) -> tuple[bytes, list[bytes]]:
    """READ, WRITE new data, READ... at offset 0; the requests and what each READ sees."""
    expected, out = [], []
    current = bytes(size)
    for i in range(rounds):
        out.append(raw_request(_READ, 0, size, cookie=2 * i))
        expected.append(current)
        current = os.urandom(size)
        out.append(raw_request(_WRITE, 0, size, cookie=2 * i + 1) + current)
    return b"".join(out), expected


def _check_reads_between_writes(path: str, size: int, rounds: int = 40) -> None:
    # The client reads nothing for a while, so the socket fills (the server asks for
    # a 4 MiB send buffer), replies are sent in part and the rest waits in the
    # transport; the WRITE after each READ (same size) would land in a reused buffer.
    requests, expected = _reads_and_writes(size, rounds)
    sock = socket.socket(socket.AF_UNIX)
    with sock:
        sock.connect(path)
        raw_go(sock)
        sender = threading.Thread(target=sock.sendall, args=(requests,), daemon=True)
        sender.start()
        try:
            time.sleep(1.0)
            for i in range(rounds):
                assert read_simple_reply(sock) == (0, 2 * i)
                assert recv_exactly(sock, size) == expected[i]
                assert read_simple_reply(sock) == (0, 2 * i + 1)
        finally:
            sender.join(30)


def test_a_read_reply_is_not_overwritten_by_a_later_request_before_it_is_sent() -> None:
    size = 256 * KiB
    with running_server(MemoryBackend(size)) as srv:
        _check_reads_between_writes(srv.path, size)


def test_the_same_under_python_3_13(tmp_path: Path) -> None:
    # From 3.12 the transport keeps a view of what it could not send (3.11 copies it):
    # a reply buffer handed to it must never come back to the pool.
    size = 256 * KiB
    with start_pynbd(tmp_path, "--memory", str(size), listen="unix", python=python313()) as srv:
        assert srv.socket_path is not None
        _check_reads_between_writes(str(srv.socket_path), size)


class _SlowFirstWrite(Backend):
    """Thread-pool backend whose first pwrite waits until released, then keeps a copy."""

    capabilities = Capabilities(thread_safe=True)

    def __init__(self, size: int) -> None:
        self._size = size
        self.release = threading.Event()
        self.entered = threading.Event()
        self.seen: dict[int, bytes] = {}
        self._first = True
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return self._size

    def pread_into(self, buf: memoryview, offset: int) -> None:
        buf[:] = bytes(len(buf))

    def pwrite(self, buf: memoryview, offset: int, fua: bool) -> None:
        with self._lock:
            first, self._first = self._first, False
        if first:
            self.entered.set()
            assert self.release.wait(20)
        self.seen[offset] = bytes(buf)


def test_a_write_payload_is_not_reused_while_a_threaded_backend_holds_it() -> None:
    size = 256 * KiB
    backend = _SlowFirstWrite(4 * size)
    a, b, c = os.urandom(size), os.urandom(size), os.urandom(size)
    with running_server(backend) as srv:
        sock = socket.socket(socket.AF_UNIX)
        with sock:
            sock.connect(srv.path)
            raw_go(sock)
            sock.sendall(raw_request(_WRITE, 0, size, cookie=1) + a)
            assert backend.entered.wait(20)
            # While the first write is held, two more arrive: neither may land in
            # the first payload's buffer.
            sock.sendall(raw_request(_WRITE, size, size, cookie=2) + b)
            assert read_simple_reply(sock) == (0, 2)
            sock.sendall(raw_request(_WRITE, 2 * size, size, cookie=3) + c)
            assert read_simple_reply(sock) == (0, 3)
            backend.release.set()
            assert read_simple_reply(sock) == (0, 1)
    assert backend.seen == {0: a, size: b, 2 * size: c}
