"""The server's limits (issue 16): connections, idle connections, bytes in flight.

- A connection over the limit is refused cleanly (the greeting, then
  NBD_REP_ERR_SHUTDOWN and the reason to every option), and its place comes back once
  a client leaves; the server takes no more connections than its descriptor limit
  allows.
- An idle connection costs no thread: its thread starts with its first request, and
  ends when it has been idle a while (the event loop watches it again); with
  ``idle_timeout`` it is closed once idle that long, never while a request is in
  flight.
- Bytes in flight per connection are bounded: past ``max_in_flight_bytes`` no request
  is started (and the socket is not read) until some complete; a READ's reply buffer
  is taken only when its backend call starts.

Timeouts are tried by moving the server's clock (``srv.advance``), never by waiting.
"""

from __future__ import annotations

import socket
import struct
import threading
from typing import Any

import pytest

from pynbd.client import Client
from pynbd.errors import OptionError
from pynbd.proto.constants import Cmd, Opt, Rep
from pynbd.server import Limits, MemoryBackend, Server
from pynbd.server import aio as aio_module
from pynbd.server import conn_thread as conn_thread_module
from pynbd.server import session as session_module
from pynbd.server.responder import SharedPool
from pynbd.server.session import Session

from .helpers import (
    PATIENCE,
    Gated,
    ServerThread,
    is_closed,
    raw_go,
    raw_option,
    raw_request,
    raw_session,
    read_option_reply,
    read_simple_reply,
    recv_exactly,
    running_server,
    unread_reads,
    wait_until,
)

#: Run a test with connections served from threads, then from the event loop.
both_modes = pytest.mark.usefixtures("serving_mode")

KiB = 1024
MiB = 1024 * KiB


def sessions(srv: ServerThread) -> list[Session]:
    return srv.call(lambda: list(srv.server.sessions))


def only_session(srv: ServerThread) -> Session:
    found = sessions(srv)
    assert len(found) == 1
    return found[0]


def conn_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("pynbd-conn")]


# --------------------------------------------------------------------------- Limits


@pytest.mark.parametrize(
    "bad",
    [
        {"max_in_flight": 0},
        {"max_in_flight_bytes": 0},
        {"max_connections": 0},
        {"max_options": 0},
        {"idle_timeout": 0},
        {"handshake_timeout": -1},
    ],
)
def test_limits_below_their_minimum_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        Limits(**bad)


def test_the_defaults() -> None:
    limits = Limits()
    assert limits.max_connections == 1024
    assert limits.max_in_flight == 64
    assert limits.max_in_flight_bytes == 32 * MiB
    assert limits.max_options == 32
    assert limits.idle_timeout is None
    assert limits.handshake_timeout == 30.0


# --------------------------------------------------------------------------- connections


@both_modes
def test_a_connection_over_the_limit_is_told_why() -> None:
    with running_server(MemoryBackend(4096), limits=Limits(max_connections=1)) as srv:
        with Client(srv.uri) as first:
            with pytest.raises(OptionError) as refused:
                Client(srv.uri, timeout=PATIENCE)
            assert refused.value.reply == Rep.ERR_SHUTDOWN
            assert refused.value.message == "too many connections (limit 1)"
            assert first.pread(1, 0) == b"\0"
        # The first one left: its place is free again.
        with Client(srv.uri) as again:
            assert again.pread(1, 0) == b"\0"
        wait_until(lambda: not srv.call(lambda: srv.server.refusing), "the refusal's end")


def test_a_refused_connection_gets_the_greeting_and_an_error_to_each_option() -> None:
    with running_server(MemoryBackend(4096), limits=Limits(max_connections=1)) as srv:
        with raw_session(srv), raw_session(srv, go=False) as sock:
            assert recv_exactly(sock, 18)[:16] == b"NBDMAGICIHAVEOPT"
            sock.sendall(struct.pack(">I", 3) + raw_option(Opt.LIST))
            option, reply, message = read_option_reply(sock)
            assert (option, reply) == (Opt.LIST, Rep.ERR_SHUTDOWN)
            assert message == b"too many connections (limit 1)"
            # NBD_OPT_EXPORT_NAME cannot be refused politely: the connection is closed.
            sock.sendall(raw_option(Opt.EXPORT_NAME))
            assert is_closed(sock)
        wait_until(lambda: not srv.call(lambda: srv.server.refusing), "the refusal's end")


def test_an_abort_ends_a_refusal() -> None:
    limits = Limits(max_connections=1)
    with (
        running_server(MemoryBackend(4096), limits=limits) as srv,
        raw_session(srv),
        raw_session(srv, go=False) as sock,
    ):
        recv_exactly(sock, 18)
        sock.sendall(struct.pack(">I", 3) + raw_option(Opt.GO, bytes(6)))
        assert read_option_reply(sock)[1] == Rep.ERR_SHUTDOWN
        sock.sendall(raw_option(Opt.ABORT))
        assert read_option_reply(sock)[1] == Rep.ACK
        assert is_closed(sock)


def test_a_refused_connection_that_says_nothing_is_closed_after_the_handshake_timeout() -> None:
    limits = Limits(max_connections=1, handshake_timeout=60)
    with (
        running_server(MemoryBackend(4096), limits=limits) as srv,
        raw_session(srv),
        raw_session(srv, go=False) as sock,
    ):
        recv_exactly(sock, 18)
        srv.advance(61)
        assert is_closed(sock)


def test_refusals_beyond_a_few_at_once_are_closed_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(session_module, "_REFUSING_MAX", 2)
    with running_server(MemoryBackend(4096), limits=Limits(max_connections=1)) as srv:
        with raw_session(srv):
            held = []
            for _ in range(2):  # refused cleanly, and held by clients that say nothing
                sock = socket.socket(socket.AF_UNIX)
                sock.connect(srv.path)
                recv_exactly(sock, 18)
                held.append(sock)
            with socket.socket(socket.AF_UNIX) as third:
                third.connect(srv.path)
                assert is_closed(third)  # no greeting: closed at once
            for sock in held:
                sock.close()
        # Nothing of it lingers: a new client is served.
        with Client(srv.uri) as c:
            assert c.size == 4096


def test_the_connection_limit_follows_the_descriptor_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(aio_module.resource, "getrlimit", lambda _: (1000, 1000))
    in_use = len(aio_module.os.listdir("/proc/self/fd"))
    expected = (1000 - in_use - aio_module._FD_RESERVE) // aio_module._FDS_PER_CONNECTION
    assert expected < 1000
    assert Server(MemoryBackend(4096)).connection_limit == expected
    limits = Limits(max_connections=10)
    assert Server(MemoryBackend(4096), limits=limits).connection_limit == 10
    monkeypatch.setattr(
        aio_module.resource,
        "getrlimit",
        lambda _: (aio_module.resource.RLIM_INFINITY,) * 2,
    )
    assert Server(MemoryBackend(4096)).connection_limit == 1024
    assert Server(MemoryBackend(4096), limits=Limits(max_connections=None)).connection_limit is None


# --------------------------------------------------------------------------- idle


def test_an_idle_connection_has_no_thread() -> None:
    """Connections that finished their handshake and wait cost no thread; the first
    request starts one."""
    before = len(conn_threads())
    with running_server(MemoryBackend(MiB), limits=Limits(connection_threads=True)) as srv:
        socks = []
        try:
            for _ in range(20):
                sock = socket.socket(socket.AF_UNIX)
                sock.settimeout(PATIENCE)
                sock.connect(srv.path)
                raw_go(sock)
                socks.append(sock)
            wait_until(lambda: len(sessions(srv)) == 20, "20 sessions")
            assert len(conn_threads()) == before
            assert not any(srv.call(lambda: [s.threaded for s in srv.server.sessions]))
            socks[0].sendall(raw_request(Cmd.READ, 0, 512))
            assert read_simple_reply(socks[0]) == (0, 7)
            assert recv_exactly(socks[0], 512) == bytes(512)
            assert sum(srv.call(lambda: [s.threaded for s in srv.server.sessions])) == 1
            assert len(conn_threads()) == before + 1
        finally:
            for sock in socks:
                sock.close()


def test_a_thread_hands_an_idle_connection_back_and_a_request_brings_one_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(session_module, "PARK_AFTER", conn_thread_module._TICK)
    backend = MemoryBackend(MiB)
    limits = Limits(connection_threads=True)
    with running_server(backend, limits=limits) as srv, raw_session(srv) as sock:
        session = only_session(srv)
        for cookie in range(3):
            sock.sendall(raw_request(Cmd.WRITE, 0, 4096, cookie=cookie) + bytes([cookie]) * 4096)
            assert read_simple_reply(sock) == (0, cookie)
            assert srv.call(lambda: session.threaded)
            # Idle: handed back to the event loop, and the thread ends.
            wait_until(lambda: not srv.call(lambda: session.threaded), "the hand-back")
            sock.sendall(raw_request(Cmd.READ, 0, 4096, cookie=9))
            assert read_simple_reply(sock) == (0, 9)
            assert recv_exactly(sock, 4096) == bytes([cookie]) * 4096
        srv.run(srv.server.close(grace=10))
        assert is_closed(sock)


@both_modes
def test_the_idle_timeout_closes_an_idle_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session_module, "PARK_AFTER", conn_thread_module._TICK)
    limits = Limits(idle_timeout=600)
    with running_server(MemoryBackend(MiB), limits=limits) as srv, raw_session(srv) as sock:
        session = only_session(srv)
        sock.sendall(raw_request(Cmd.READ, 0, 512))
        assert read_simple_reply(sock) == (0, 7)
        recv_exactly(sock, 512)
        wait_until(lambda: not srv.call(lambda: session.threaded), "the hand-back")
        # (the clock moves with real time too: the margins leave minutes for that)
        srv.advance(300)
        sock.sendall(raw_request(Cmd.READ, 0, 512, cookie=8))  # in time: the clock restarts
        assert read_simple_reply(sock) == (0, 8)
        recv_exactly(sock, 512)
        wait_until(lambda: not srv.call(lambda: session.threaded), "the hand-back")
        srv.advance(300)
        assert srv.call(lambda: session in srv.server.sessions)
        srv.advance(301)
        assert is_closed(sock)
        assert srv.call(lambda: session._ending and session._ending.reason) == "idle for 600 s"


@both_modes
def test_the_idle_timeout_spares_a_connection_with_a_request_in_flight(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(session_module, "PARK_AFTER", conn_thread_module._TICK)
    backend = Gated()
    limits = Limits(idle_timeout=60)
    with running_server(backend, limits=limits) as srv, raw_session(srv) as sock:
        sock.sendall(raw_request(Cmd.READ, 0, 4096, cookie=1))
        wait_until(lambda: backend.started == 1, "the read")
        srv.advance(3600)
        backend.gate.set()
        assert read_simple_reply(sock) == (0, 1)
        assert recv_exactly(sock, 4096) == b"g" * 4096
        session = only_session(srv)
        wait_until(lambda: not srv.call(lambda: session.threaded), "the hand-back")
        srv.advance(61)
        assert is_closed(sock)


@both_modes
def test_the_idle_timeout_closes_a_connection_stuck_in_the_middle_of_a_payload(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(session_module, "PARK_AFTER", conn_thread_module._TICK)
    backend = MemoryBackend(MiB)
    limits = Limits(idle_timeout=60)
    with running_server(backend, limits=limits) as srv, raw_session(srv) as sock:
        sock.sendall(raw_request(Cmd.WRITE, 0, 64 * KiB) + bytes(1000))
        session = only_session(srv)
        wait_until(lambda: srv.call(lambda: session.core.receiving_payload), "the payload")
        wait_until(lambda: not srv.call(lambda: session.threaded), "the hand-back")
        srv.advance(61)
        assert is_closed(sock)


def test_the_idle_timeout_closes_a_connection_whose_client_reads_nothing() -> None:
    """Served from a thread, blocked in a send: the thread's own clock (its send
    timeouts) counts, so the timeout is short and real here; the test only waits
    for its outcome."""
    limits = Limits(idle_timeout=0.5, connection_threads=True)
    backend = MemoryBackend(8 * MiB)
    with running_server(backend, limits=limits) as srv, unread_reads(srv, 1, 8 * MiB) as sock:
        assert is_closed(sock)
        wait_until(lambda: not sessions(srv), "the session's end")


def test_the_idle_timeout_closes_a_connection_whose_client_reads_nothing_in_the_loop() -> None:
    limits = Limits(idle_timeout=60, connection_threads=False)
    backend = MemoryBackend(8 * MiB)
    with running_server(backend, limits=limits) as srv, unread_reads(srv, 1, 8 * MiB) as sock:
        session = only_session(srv)
        wait_until(lambda: srv.call(lambda: session.stats.requests) == 1, "the read")
        srv.advance(30)
        assert srv.call(lambda: session in srv.server.sessions)
        srv.advance(31)
        assert is_closed(sock)


@both_modes
def test_no_idle_timeout_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session_module, "PARK_AFTER", conn_thread_module._TICK)
    with running_server(MemoryBackend(MiB)) as srv, raw_session(srv) as sock:
        sock.sendall(raw_request(Cmd.READ, 0, 512))
        assert read_simple_reply(sock) == (0, 7)
        recv_exactly(sock, 512)
        session = only_session(srv)
        wait_until(lambda: not srv.call(lambda: session.threaded), "the hand-back")
        srv.advance(10 * 24 * 3600)  # ten days
        sock.sendall(raw_request(Cmd.READ, 0, 512, cookie=8))
        assert read_simple_reply(sock) == (0, 8)


# --------------------------------------------------------------------------- bytes in flight


@both_modes
def test_bytes_in_flight_are_bounded() -> None:
    """Ten READs of 256 KiB sent at once, to a backend that holds each: with room for
    three, three start and the others wait in the core, unread, until those end."""
    backend = Gated()
    limits = Limits(max_in_flight_bytes=3 * 256 * KiB - 1, threads=16)
    with running_server(backend, limits=limits) as srv, raw_session(srv) as sock:
        sock.sendall(b"".join(raw_request(Cmd.READ, 0, 256 * KiB, cookie=i) for i in range(10)))
        wait_until(lambda: backend.started == 3, "three reads")
        session = only_session(srv)
        assert srv.call(lambda: session.core.in_flight) == 3
        assert srv.call(lambda: session.core.events_pending)
        backend.gate.set()
        cookies = set()
        for _ in range(10):
            error, cookie = read_simple_reply(sock)
            assert error == 0
            assert recv_exactly(sock, 256 * KiB) == b"g" * (256 * KiB)
            cookies.add(cookie)
        assert cookies == set(range(10))
        assert backend.started == 10


@both_modes
def test_one_request_bigger_than_the_bound_is_still_served() -> None:
    backend = MemoryBackend(4 * MiB)
    limits = Limits(max_in_flight_bytes=64 * KiB)
    data = bytes(range(256)) * (8 * KiB)  # 2 MiB
    with running_server(backend, limits=limits) as srv, raw_session(srv) as sock:
        sock.sendall(raw_request(Cmd.WRITE, 0, len(data), cookie=1) + data)
        assert read_simple_reply(sock) == (0, 1)
        sock.sendall(raw_request(Cmd.READ, 0, len(data), cookie=2))
        assert read_simple_reply(sock) == (0, 2)
        assert recv_exactly(sock, len(data)) == data


@both_modes
def test_requests_in_flight_are_bounded() -> None:
    backend = Gated()
    limits = Limits(max_in_flight=2, threads=16)
    with running_server(backend, limits=limits) as srv, raw_session(srv) as sock:
        sock.sendall(b"".join(raw_request(Cmd.READ, 0, 512, cookie=i) for i in range(6)))
        wait_until(lambda: backend.started == 2, "two reads")
        session = only_session(srv)
        assert srv.call(lambda: session.core.in_flight) == 2
        backend.gate.set()
        cookies = set()
        for _ in range(6):
            error, cookie = read_simple_reply(sock)
            assert error == 0
            recv_exactly(sock, 512)
            cookies.add(cookie)
        assert cookies == set(range(6))


def test_a_read_buffer_is_taken_when_its_call_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Four READs of 1 MiB for a backend that takes one call at a time: three wait for
    the first, and hold no buffer meanwhile."""
    taken: list[int] = []
    take = SharedPool.take

    def counting_take(self: SharedPool, size: int) -> bytearray:
        if size == MiB:
            taken.append(size)
        return take(self, size)

    monkeypatch.setattr(SharedPool, "take", counting_take)
    backend = Gated(thread_safe=False)
    with running_server(backend) as srv, raw_session(srv) as sock:
        sock.sendall(b"".join(raw_request(Cmd.READ, 0, MiB, cookie=i) for i in range(4)))
        wait_until(lambda: backend.started == 1, "the first read")
        session = only_session(srv)
        wait_until(lambda: srv.call(lambda: session.core.in_flight) == 4, "four reads in flight")
        assert len(taken) == 1
        backend.gate.set()
        for _ in range(4):
            assert read_simple_reply(sock)[0] == 0
            recv_exactly(sock, MiB)
        assert len(taken) == 4
