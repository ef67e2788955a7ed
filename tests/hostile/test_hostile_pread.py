"""``pread`` (a new bytes per call) against a server that breaks off a read's data.

The blocking client receives a large read's data with one ``recv(n, MSG_WAITALL)`` into
the bytes object it returns; the asyncio client assembles it in a buffer. A recv that
comes back short (end of stream, a timeout, a signal) must never turn into a short or
wrong result: the documented exception, or (after a signal) the whole data. Both
clients (the ``api`` fixture of test_hostile), every reply style.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType

import pytest

from pynbd.client.sync import Client
from pynbd.errors import ConnectionClosed, NBDTimeout, ProtocolError
from pynbd.proto.transmission import DIRECT_READ

from . import test_hostile
from .server import Close, HalfClose, HostileServer, Send, Session, Silent, Sleep, Step, Style
from .test_hostile import (
    CLIENT_TIMEOUT,
    MAX_ELAPSED,
    Driver,
    assert_dead,
    fails,
    transmission,
)

# test_hostile's fixtures: both clients (``api``), hostile servers stopped at teardown.
api = test_hostile.api
serve = test_hostile.serve

STYLES: list[Style] = ["simple", "structured", "extended"]
BIG = 4 * DIRECT_READ  # 256 KiB: the header is received alone, then the data
OFFSET = 8192
DATA = bytes((i * 13 + 7) & 0xFF for i in range(BIG))


def reply(s: Session) -> bytes:
    """The correct reply to the read of DATA at OFFSET."""
    return s.read_ok(DATA)


def lead(s: Session) -> int:
    """The bytes of the reply before its data."""
    return len(reply(s)) - BIG


def head(extra: int) -> Send:
    """The reply's header and the first ``extra`` bytes of its data."""
    return Send(lambda s: reply(s)[: lead(s) + extra])


def tail(extra: int) -> Send:
    """The reply from ``extra`` bytes into its data."""
    return Send(lambda s: reply(s)[lead(s) + extra :])


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("split", [0, 1, 100_000, BIG - 1])
def test_data_in_pieces(
    api: Driver, serve: Callable[..., HostileServer], style: Style, split: int
) -> None:
    """The data arrives in two writes with a pause between: all of it, as bytes."""
    server = serve(transmission(style, head(split), Sleep(0.2), tail(split), Silent()))
    c = api.connect(server.uri)
    got = c.pread(BIG, OFFSET)
    assert type(got) is bytes and got == DATA
    assert not c.closed


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("close", [Close(), HalfClose()], ids=["close", "half-close"])
@pytest.mark.parametrize("sent", [0, 1, BIG // 2, BIG - 1])
def test_eof_mid_data(
    api: Driver, serve: Callable[..., HostileServer], style: Style, close: Step, sent: int
) -> None:
    """The header and part of the data, then end of stream: an error, never data."""
    server = serve(transmission(style, head(sent), close))
    c = api.connect(server.uri)
    fails((ProtocolError, ConnectionClosed), c.pread, BIG, OFFSET)
    assert c.closed
    if isinstance(close, HalfClose):
        assert_dead(c, server)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("sent", [0, BIG // 2])
def test_silent_mid_data(
    api: Driver, serve: Callable[..., HostileServer], style: Style, sent: int
) -> None:
    """The header and part of the data, then silence: NBDTimeout after the timeout."""
    server = serve(transmission(style, head(sent), Silent()))
    c = api.connect(server.uri)
    start = time.monotonic()
    fails(NBDTimeout, c.pread, BIG, OFFSET)
    assert time.monotonic() - start >= CLIENT_TIMEOUT * 0.9, "timed out too early"
    assert_dead(c, server)


@pytest.mark.parametrize("style", ["structured", "extended"])
def test_trickle_past_the_timeout(
    api: Driver, serve: Callable[..., HostileServer], style: Style
) -> None:
    """Data in small pieces, each well within the timeout, the whole far beyond it:
    the call's deadline holds (one recv of the rest must not outlive it)."""
    pieces = [head(1000)] + [
        step for i in range(1, 9) for step in (Sleep(0.5), piece(i * 1000, 1000))
    ]
    server = serve(transmission(style, *pieces, Silent()))
    c = api.connect(server.uri)
    fails(NBDTimeout, c.pread, BIG, OFFSET)
    assert_dead(c, server)


def piece(start: int, n: int) -> Send:
    """``n`` bytes of the data from ``start``."""
    return Send(lambda s: reply(s)[lead(s) + start : lead(s) + start + n])


# --- A signal during the blocking client's recv ---------------------------------------------


@pytest.fixture
def sigusr1() -> Iterator[list[int]]:
    """A SIGUSR1 handler that counts; the old handler is restored afterwards."""
    seen: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        seen.append(signum)

    old = signal.signal(signal.SIGUSR1, handler)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGUSR1, old)


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
@pytest.mark.parametrize("style", STYLES)
def test_signal_mid_data(
    serve: Callable[..., HostileServer], sigusr1: list[int], style: Style, tcp: bool
) -> None:
    """A signal while the recv waits for the rest of the data: the recv returns what
    it has, the client receives the rest, and the result is whole."""
    steps = transmission(style, head(BIG // 2), Sleep(0.6), tail(BIG // 2), Silent())
    server = serve(steps, tcp=tcp)
    with Client(server.uri, timeout=CLIENT_TIMEOUT) as c:
        target = threading.get_ident()
        timer = threading.Timer(0.3, signal.pthread_kill, (target, signal.SIGUSR1))
        timer.start()
        try:
            got = c.pread(BIG, OFFSET)
        finally:
            timer.cancel()
            timer.join()
        assert sigusr1 == [signal.SIGUSR1], "the signal did not arrive during the call"
        assert type(got) is bytes and got == DATA
        assert not c.closed


def test_interrupted_call_closes_the_connection(
    serve: Callable[..., HostileServer], sigusr1: list[int]
) -> None:
    """A signal handler that raises mid-reply: the stream's position is lost, so the
    client closes; the next call raises ConnectionClosed instead of reading the old
    reply's data as its own."""
    server = serve(transmission("structured", head(BIG // 2), Sleep(0.6), tail(BIG // 2), Silent()))

    class Interrupt(Exception):
        pass

    def raising(signum: int, frame: FrameType | None) -> None:
        raise Interrupt

    signal.signal(signal.SIGUSR1, raising)  # the fixture restores the old handler
    with Client(server.uri, timeout=CLIENT_TIMEOUT) as c:
        main = threading.get_ident()
        timer = threading.Timer(0.3, signal.pthread_kill, (main, signal.SIGUSR1))
        timer.start()
        try:
            with pytest.raises(Interrupt):
                c.pread(BIG, OFFSET)
        finally:
            timer.cancel()
            timer.join()
        assert c.closed
        start = time.monotonic()
        with pytest.raises(ConnectionClosed):
            c.pread(BIG, OFFSET)
        assert time.monotonic() - start < MAX_ELAPSED
