"""WRITE payloads received in place: the core's ``payload_sink``, the memory backend's
spare pages, and the server that puts the two together (no copy, no torn write)."""

from __future__ import annotations

import os
import random
import socket

import pytest

from pynbd.client import Client
from pynbd.proto.constants import Cmd
from pynbd.proto.server import NEED_DATA, Disconnect, RequestReceived, ServerConnection
from pynbd.server import Export, MemoryBackend

from .helpers import (
    ServerThread,
    is_closed,
    raw_request,
    raw_session,
    read_simple_reply,
    recv_exactly,
    running_server,
    wait_until,
)
from .test_core_transmission import ALL, events, parse, request, tx

# Each test runs with connections served from threads, then from the event loop.
pytestmark = pytest.mark.usefixtures("serving_mode")

PAGE = 4096


class Sink:
    """A payload_sink that hands out ``count`` buffers of PAGE bytes for writes of
    whole pages, and records its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.given: list[list[memoryview]] = []

    def __call__(self, length: int, offset: int) -> list[memoryview] | None:
        self.calls.append((length, offset))
        if length % PAGE:
            return None
        bufs = [memoryview(bytearray(PAGE)) for _ in range(length // PAGE)]
        self.given.append(bufs)
        return bufs


def sinking(mode: str) -> tuple[ServerConnection, Sink]:
    conn = tx(mode)
    assert conn.transmission is not None
    sink = Sink()
    conn.transmission.payload_sink = sink
    return conn, sink


def feed_scattered(conn: ServerConnection, data: bytes, step: int) -> None:
    """Feed ``data`` as a driver that reads with ``readv`` does: into every buffer
    ``receive_buffers`` gives, at most ``step`` bytes per read."""
    view = memoryview(data)
    while view:
        n = 0
        for buf in conn.receive_buffers():
            take = min(len(buf), len(view) - n, step - n)
            buf[:take] = view[n : n + take]
            n += take
            if n == step or n == len(view):
                break
        conn.buffer_updated(n)
        view = view[n:]


def read(mem: MemoryBackend, length: int, offset: int) -> bytes:
    buf = bytearray(length)
    mem.pread_into(memoryview(buf), offset)
    return bytes(buf)


def written(event: object) -> bytes:
    assert isinstance(event, RequestReceived)
    assert event.payload is None and event.segments is not None
    return b"".join(bytes(s) for s in event.segments)


@ALL
@pytest.mark.parametrize("feed", ["whole", "bytewise", "readv-7", "readv-5000"])
def test_payload_lands_in_the_sinks_buffers(mode: str, feed: str) -> None:
    conn, sink = sinking(mode)
    data = os.urandom(3 * PAGE)
    stream = (
        request(conn, Cmd.WRITE, 2 * PAGE, 3 * PAGE, payload=data, cookie=1)
        + request(conn, Cmd.READ, 0, 512, cookie=2)
        + request(conn, Cmd.WRITE, 0, 100, payload=b"u" * 100, cookie=3)  # not whole pages
    )
    if feed == "whole":
        conn.receive_data(stream)
    elif feed == "bytewise":
        for i in range(len(stream)):
            conn.receive_data(stream[i : i + 1])
    else:
        feed_scattered(conn, stream, int(feed.split("-")[1]))
    first, read, small = events(conn)
    assert sink.calls == [(3 * PAGE, 2 * PAGE), (100, 0)]  # only WRITEs, as they arrive
    assert written(first) == data
    assert first.segments == sink.given[0]  # the very buffers it gave
    assert (first.command, first.offset, first.length, first.cookie) == (
        Cmd.WRITE,
        2 * PAGE,
        3 * PAGE,
        1,
    )
    assert isinstance(read, RequestReceived) and read.command is Cmd.READ
    assert isinstance(small, RequestReceived) and small.segments is None
    assert small.payload is not None and bytes(small.payload) == b"u" * 100
    # Replies match as usual.
    conn.reply_ok(first)
    assert [(r.cookie, r.error) for r in parse(conn)] == [(1, 0)]


@ALL
def test_one_read_takes_the_payloads_rest_and_the_next_header(mode: str) -> None:
    conn, _sink = sinking(mode)
    data = os.urandom(32 * PAGE)  # at least the core's buffer: the next header comes alone
    first = request(conn, Cmd.WRITE, 0, len(data), payload=data, cookie=1)
    again = request(conn, Cmd.WRITE, 0, len(data), payload=data[::-1], cookie=2)
    header = len(first) - len(data)
    conn.receive_data(first[:header])
    bufs = conn.receive_buffers()
    assert [len(b) for b in bufs] == [PAGE] * 32 + [header]
    feed_scattered(conn, first[header:] + again[:header], len(data) + header)
    (write,) = events(conn)
    assert written(write) == data
    assert conn.receiving_payload  # the second header came in the same read
    conn.receive_data(again[header:])
    (write,) = events(conn)
    assert written(write) == data[::-1]
    # After a big payload, the next read is for one header only...
    assert len(conn.receive_buffer()) == header
    # ...and after a request without one, for as much as the buffer holds.
    conn.receive_data(request(conn, Cmd.READ, 0, 512, cookie=3))
    assert len(conn.receive_buffer()) > 1024


@ALL
def test_refused_writes_never_reach_the_sink(mode: str) -> None:
    conn, sink = sinking(mode)
    size = 1 << 20
    conn.receive_data(
        request(conn, Cmd.WRITE, size, PAGE, payload=bytes(PAGE), cookie=1)  # past the end
        + request(conn, Cmd.WRITE, 0, PAGE, payload=b"k" * PAGE, cookie=2)
    )
    (event,) = events(conn)
    assert sink.calls == [(PAGE, 0)]
    assert written(event) == b"k" * PAGE
    assert [(r.cookie, r.error) for r in parse(conn)] == [(1, 28)]  # ENOSPC


def test_a_sink_that_gives_the_wrong_size_is_a_driver_bug() -> None:
    conn = tx("structured")
    assert conn.transmission is not None
    conn.transmission.payload_sink = lambda length, offset: [memoryview(bytearray(length - 1))]
    with pytest.raises(ValueError, match="add up"):
        conn.receive_data(request(conn, Cmd.WRITE, 0, PAGE, payload=bytes(PAGE)))


def test_a_payload_cut_short_gives_no_event() -> None:
    conn, sink = sinking("structured")
    data = request(conn, Cmd.WRITE, 0, 2 * PAGE, payload=b"z" * 2 * PAGE)
    conn.receive_data(data[:-1])
    conn.receive_data(b"")  # end of stream
    (event,) = events(conn)
    assert isinstance(event, Disconnect)
    assert conn.next_event() is NEED_DATA
    assert sink.calls == [(2 * PAGE, 0)]


# -- the memory backend's pages --------------------------------------------------------


def test_receive_pages_only_for_whole_pages() -> None:
    mem = MemoryBackend(1 << 20, page_size=PAGE)
    assert mem.receive_pages(PAGE, 512) is None
    assert mem.receive_pages(PAGE + 512, 0) is None
    assert mem.receive_pages(0, 0) is None
    assert MemoryBackend(1 << 20, read_only=True).receive_pages(1 << 16, 0) is None
    pages = mem.receive_pages(2 * PAGE, PAGE)
    assert pages is not None and [len(p) for p in pages] == [PAGE, PAGE]
    assert mem.allocated == 0  # not part of the export until adopted


def test_adopt_pages_performs_the_write_and_recycles_the_old_pages() -> None:
    mem = MemoryBackend(1 << 20, page_size=PAGE)
    mem.pwrite(memoryview(b"a" * 3 * PAGE), 0, False)
    pages = mem.receive_pages(2 * PAGE, PAGE)
    assert pages is not None
    pages[0][:] = b"b" * PAGE
    pages[1][:] = b"c" * PAGE
    assert read(mem, 3 * PAGE, 0) == b"a" * 3 * PAGE  # nothing changes before adopting
    mem.adopt_pages(pages, PAGE)
    assert read(mem, 3 * PAGE, 0) == b"a" * PAGE + b"b" * PAGE + b"c" * PAGE
    # The replaced pages are the next spares (stale bytes, overwritten whole).
    again = mem.receive_pages(2 * PAGE, 5 * PAGE)
    assert again is not None and {bytes(p[:1]) for p in again} == {b"a"}
    again[0][:] = b"d" * PAGE
    again[1][:] = b"e" * PAGE
    mem.adopt_pages(again, 5 * PAGE)  # into a hole: new pages, indexed
    assert mem.allocated == 5 * PAGE
    assert mem.extents(8 * PAGE, 0) == [(3 * PAGE, 0), (2 * PAGE, 3), (2 * PAGE, 0), (PAGE, 3)]
    assert read(mem, 2 * PAGE, 5 * PAGE) == b"d" * PAGE + b"e" * PAGE


# -- the server ------------------------------------------------------------------------

BIG = 256 * 1024  # whole 64 KiB pages of the default memory backend


def wait_sessions(srv: ServerThread, count: int) -> None:
    wait_until(lambda: srv.call(lambda: len(srv.server.sessions)) == count, "the connection's end")


def test_a_client_that_disconnects_mid_payload_changes_nothing() -> None:
    mem = MemoryBackend(1 << 20)
    with running_server(mem) as srv, Client(srv.uri) as c:
        c.pwrite(b"o" * BIG, 0)
        with raw_session(srv) as raw:
            raw.sendall(raw_request(Cmd.WRITE, 0, BIG) + b"n" * (BIG - 1000))
            assert c.pread(BIG, 0) == b"o" * BIG  # a write still arriving shows nowhere
        wait_sessions(srv, 1)  # the server has read all of it, then the end
        assert c.pread(BIG, 0) == b"o" * BIG
        assert read(mem, BIG, 0) == b"o" * BIG
        c.pwrite(b"w" * BIG, 0)  # and whole-page writes still work
        assert c.pread(BIG, 0) == b"w" * BIG


def test_reads_before_a_write_in_one_burst_see_the_old_data() -> None:
    """A READ answered from views of the pages, then a WRITE that swaps those pages,
    in one burst: the READ's reply still carries the old bytes."""
    mem = MemoryBackend(1 << 20)
    mem.pwrite(memoryview(b"o" * BIG), 0, False)
    with running_server(Export(mem)) as srv, raw_session(srv) as raw:
        burst = (
            raw_request(Cmd.READ, 0, BIG, cookie=1)
            + raw_request(Cmd.WRITE, 0, BIG, cookie=2)
            + b"n" * BIG
            + raw_request(Cmd.READ, 0, BIG, cookie=3)
        )
        raw.sendall(burst)
        assert read_simple_reply(raw) == (0, 1)
        assert recv_exactly(raw, BIG) == b"o" * BIG
        assert read_simple_reply(raw) == (0, 2)
        assert read_simple_reply(raw) == (0, 3)
        assert recv_exactly(raw, BIG) == b"n" * BIG


@pytest.mark.parametrize("command", [Cmd.WRITE, Cmd.WRITE_ZEROES, Cmd.TRIM])
def test_reads_before_a_change_inside_a_page_in_one_burst_see_the_old_data(command: Cmd) -> None:
    """The same with a change made in place (part of a page): the READ's views are
    sent before it is made."""
    mem = MemoryBackend(1 << 20)
    mem.pwrite(memoryview(b"o" * BIG), 0, False)
    with running_server(Export(mem)) as srv, raw_session(srv) as raw:
        burst = raw_request(Cmd.READ, 0, 8192, cookie=1)
        burst += raw_request(command, 512, 1024, cookie=2)
        burst += b"n" * 1024 if command is Cmd.WRITE else b""
        raw.sendall(burst + raw_request(Cmd.READ, 0, 2048, cookie=3))
        assert read_simple_reply(raw) == (0, 1)
        assert recv_exactly(raw, 8192) == b"o" * 8192
        assert read_simple_reply(raw) == (0, 2)
        assert read_simple_reply(raw) == (0, 3)
        new = b"n" * 1024 if command is Cmd.WRITE else bytes(1024)
        assert recv_exactly(raw, 2048) == b"o" * 512 + new + b"o" * 512


def test_a_page_queued_for_a_reply_is_not_recycled_before_it_is_sent() -> None:
    """A small READ's reply waits as a view of a page; a WRITE replaces that page,
    which becomes a spare; the next WRITEs are received into spares. The READ still
    gets the old bytes (the server sends or copies queued views before any write).
    Whether the reply is still queued then depends on how the burst is read, so the
    scene is played several times."""
    page = 65536
    rounds = 8
    mem = MemoryBackend(64 * page)
    for i in range(rounds):
        mem.pwrite(memoryview(bytes([i]) * page), i * page, False)
    with running_server(Export(mem)) as srv, raw_session(srv) as raw:
        for i in range(rounds):
            raw.sendall(
                raw_request(Cmd.READ, i * page, 4096, cookie=1)
                + raw_request(Cmd.WRITE, i * page, page, cookie=2)
                + b"n" * page
                + raw_request(Cmd.WRITE, (20 + i) * page, page, cookie=3)
                + b"X" * page
                + raw_request(Cmd.WRITE, (40 + i) * page, page, cookie=4)
                + b"Y" * page
            )
            assert read_simple_reply(raw) == (0, 1)
            assert recv_exactly(raw, 4096) == bytes([i]) * 4096, f"round {i}"
            assert [read_simple_reply(raw) for _ in range(3)] == [(0, 2), (0, 3), (0, 4)]
    for i in range(rounds):
        assert read(mem, page, i * page) == b"n" * page
        assert read(mem, page, (20 + i) * page) == b"X" * page
        assert read(mem, page, (40 + i) * page) == b"Y" * page


def test_a_subclass_that_overrides_pwrite_sees_every_write() -> None:
    class Counting(MemoryBackend):
        writes = 0

        def pwrite(self, buf: memoryview, offset: int, fua: bool) -> None:
            type(self).writes += 1
            super().pwrite(buf, offset, fua)

    mem = Counting(1 << 20)
    with running_server(mem) as srv, Client(srv.uri) as c:
        c.pwrite(b"x" * BIG, 0)
        assert c.pread(16, 0) == b"x" * 16
    assert Counting.writes == 1


def test_many_whole_page_writes_from_several_connections_match_a_model() -> None:
    size = 4 << 20
    mem = MemoryBackend(size)
    model = bytearray(size)
    rng = random.Random(7)
    with running_server(mem) as srv:
        clients = [Client(srv.uri) for _ in range(3)]
        try:
            for i in range(120):
                c = clients[i % 3]
                pages = rng.randint(1, 4)
                offset = rng.randrange(0, size // 65536 - pages + 1) * 65536
                data = rng.randbytes(pages * 65536)
                if rng.random() < 0.2:  # and some that are not whole pages
                    offset += rng.randrange(1, 4096)
                    data = data[: min(len(data), size - offset)]
                c.pwrite(data, offset)
                model[offset : offset + len(data)] = data
            for c in clients:
                c.flush()
            assert clients[0].pread(size, 0) == bytes(model)
            assert read(mem, size, 0) == bytes(model)
        finally:
            for c in clients:
                c.close()


def test_the_connection_of_a_cut_payload_is_closed() -> None:
    with running_server(MemoryBackend(1 << 20)) as srv, raw_session(srv) as raw:
        raw.sendall(raw_request(Cmd.WRITE, 0, BIG) + b"n" * 10)
        raw.shutdown(socket.SHUT_WR)
        assert is_closed(raw)
