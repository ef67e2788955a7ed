"""Reads against a server that breaks off a read's reply.

The blocking client receives a read's usual reply itself, past the core: a small read's
header and data with one recv into a buffer of its own, a big read's header alone and
then its data (into the bytes object ``pread`` returns, or into the caller's buffer for
``pread_into``); the asyncio client assembles it in a buffer. A recv that comes back
short (end of stream, a timeout, a signal) must never turn into a short or wrong result:
the documented exception, or (after a signal) the whole data. Both clients (the ``api``
fixture), every reply style, a small read and a big one.
"""

from __future__ import annotations

import signal
import struct
from collections.abc import Callable
from typing import Any

import pytest

from pynbd.client.sync import Client
from pynbd.errors import ConnectionClosed, ProtocolError, RequestError
from pynbd.proto.transmission import DIRECT_READ
from tests.drivers import Driver

from .checks import (
    CLIENT_TIMEOUT,
    TIMEOUT,
    Usr1,
    assert_dead,
    fails,
    gave_up_first,
    silence,
    times_out,
    transmission,
)
from .server import (
    Close,
    Drained,
    ExpectRequest,
    HalfClose,
    HostileServer,
    Send,
    Session,
    Silent,
    Sleep,
    Step,
    Style,
)

STYLES: list[Style] = ["simple", "structured", "extended"]
BIG = 4 * DIRECT_READ  # 256 KiB: the header is received alone, then the data
SMALL = 4096  # the header and the data in one recv
OFFSET = 8192
DATA = bytes((i * 13 + 7) & 0xFF for i in range(BIG))


@pytest.fixture(params=[SMALL, BIG], ids=["small", "big"])
def size(request: pytest.FixtureRequest) -> int:
    """The read's length: DATA[:size] at OFFSET."""
    n: int = request.param
    return n


def at(where: int | str, size: int) -> int:
    """A place in the data: a byte count, "half" or "last" (one byte before the end)."""
    if where == "half":
        return size // 2
    if where == "last":
        return size - 1
    assert isinstance(where, int)
    return where


def reply(s: Session) -> bytes:
    """The correct reply to the read of DATA[:size] at OFFSET (the last request's)."""
    return s.read_ok(DATA[: s.last.length])


def lead(s: Session) -> int:
    """The bytes of the reply before its data."""
    return len(reply(s)) - s.last.length


def head(extra: int) -> Send:
    """The reply's header and the first ``extra`` bytes of its data."""
    return Send(lambda s: reply(s)[: lead(s) + extra])


def read(c: Any, how: str, size: int, **kwargs: Any) -> bytes:
    """The read of DATA[:size] at OFFSET, by ``pread`` or ``pread_into``."""
    if how == "pread":
        got: bytes = c.pread(size, OFFSET, **kwargs)
        assert type(got) is bytes
        return got
    buf = bytearray(size)
    c.pread_into(buf, OFFSET, **kwargs)
    return bytes(buf)


HOW = pytest.mark.parametrize("how", ["pread", "pread_into"])


def tail(extra: int) -> Send:
    """The reply from ``extra`` bytes into its data."""
    return Send(lambda s: reply(s)[lead(s) + extra :])


@HOW
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("where", [-20, -8, -1, 0, 1, "half", "last"])
def test_data_in_pieces(
    api: Driver,
    serve: Callable[..., HostileServer],
    style: Style,
    where: int | str,
    how: str,
    size: int,
) -> None:
    """The reply arrives in two writes, the second once the client has read the first
    (negative splits cut the header itself): all of the data."""
    split = at(where, size)
    if split < 0 and style == "simple":
        split //= 4  # a simple reply's header is 16 bytes
    server = serve(transmission(style, head(split), Drained(), tail(split), Silent()))
    c = api.connect(server.uri)
    assert read(c, how, size) == DATA[:size]
    assert not c.closed


@HOW
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("close", [Close(), HalfClose()], ids=["close", "half-close"])
@pytest.mark.parametrize("sent", [-5, 0, 1, "half", "last"])
def test_eof_mid_data(
    api: Driver,
    serve: Callable[..., HostileServer],
    style: Style,
    close: Step,
    sent: int | str,
    how: str,
    size: int,
) -> None:
    """The header (or part of it) and part of the data, then end of stream: an error,
    never data."""
    server = serve(transmission(style, head(at(sent, size)), close))
    c = api.connect(server.uri)
    fails((ProtocolError, ConnectionClosed), read, c, how, size)
    assert c.closed
    if isinstance(close, HalfClose):
        assert_dead(c, server)


@HOW
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("sent", [-5, 0, "half"])
def test_silent_mid_data(
    api: Driver,
    serve: Callable[..., HostileServer],
    style: Style,
    sent: int | str,
    how: str,
    size: int,
) -> None:
    """The header (or part of it) and part of the data, then silence: NBDTimeout after
    the timeout."""
    server = serve(transmission(style, head(at(sent, size)), *silence()))
    c = api.connect(server.uri)
    times_out(read, c, how, size)
    assert_dead(c, server)


@HOW
@pytest.mark.parametrize("style", ["structured", "extended"])
def test_trickle_past_the_timeout(
    api: Driver, serve: Callable[..., HostileServer], style: Style, how: str, size: int
) -> None:
    """Data in small pieces, each well within the timeout, the whole far beyond it
    (10 s): the call's deadline holds (one recv of the rest must not outlive it), so
    the client gives up while the trickle goes on."""
    n = size // 200
    pieces = [step for i in range(1, 200) for step in (Sleep(TIMEOUT / 5), piece(i * n, n))]
    server = serve(transmission(style, head(n), *pieces, *silence()))
    c = api.connect(server.uri)
    times_out(read, c, how, size)
    assert_dead(c, server)
    gave_up_first(server)


@HOW
@pytest.mark.parametrize("style", STYLES)
def test_trickled_header_past_the_timeout(
    api: Driver, serve: Callable[..., HostileServer], style: Style, how: str, size: int
) -> None:
    """The reply's last 12 header bytes one at a time, then its data likewise, each
    well within the timeout, the whole far beyond it (10 s): the call's deadline holds
    while the client waits for the rest of the header it has begun to match, so it
    gives up while the trickle goes on."""
    pieces = [step for i in range(-12, 188) for step in (piece(i, 1), Sleep(TIMEOUT / 5))]
    server = serve(transmission(style, Send(lambda s: reply(s)[: lead(s) - 12]), *pieces))
    c = api.connect(server.uri)
    times_out(read, c, how, size)
    assert_dead(c, server)
    gave_up_first(server)


def piece(start: int, n: int) -> Send:
    """``n`` bytes of the data from ``start``."""
    return Send(lambda s: reply(s)[lead(s) + start : lead(s) + start + n])


# --- A signal during the blocking client's recv ---------------------------------------------


@HOW
@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
@pytest.mark.parametrize("style", STYLES)
def test_signal_mid_data(
    serve: Callable[..., HostileServer],
    sigusr1: Usr1,
    style: Style,
    tcp: bool,
    how: str,
    size: int,
) -> None:
    """A signal while the recv waits for the rest of the data (the server sends it
    once the client has read the first half and the handler has run): the recv returns
    what it has, the client receives the rest, and the result is whole."""
    rest = [Drained(), sigusr1.step(), tail(size // 2), Silent()]
    server = serve(transmission(style, head(size // 2), *rest), tcp=tcp)
    with Client(server.uri, timeout=CLIENT_TIMEOUT) as c:
        got = read(c, how, size)
        assert sigusr1.seen == [signal.SIGUSR1], "the signal did not arrive during the call"
        assert got == DATA[:size]
        assert not c.closed


def test_interrupted_call_closes_the_connection(
    serve: Callable[..., HostileServer], sigusr1: Usr1
) -> None:
    """A signal handler that raises mid-reply: the stream's position is lost, so the
    client closes; the next call raises ConnectionClosed instead of reading the old
    reply's data as its own."""
    rest = [Drained(), sigusr1.step(), tail(BIG // 2), Silent()]
    server = serve(transmission("structured", head(BIG // 2), *rest))

    class Interrupt(Exception):
        pass

    sigusr1.raises = Interrupt
    with Client(server.uri, timeout=CLIENT_TIMEOUT) as c:
        with pytest.raises(Interrupt):
            c.pread(BIG, OFFSET)
        assert c.closed
        with pytest.raises(ConnectionClosed):
            c.pread(BIG, OFFSET)


# --- Replies to a read other than the usual one ---------------------------------------------


def _error(s: Session) -> bytes:
    return s.error(5, b"no")  # EIO


def _hole_then_data(s: Session) -> bytes:
    # DATA's first bytes are not zero, so a hole there reads zeroes instead.
    size = s.last.length
    half = size // 2
    return s.hole(OFFSET, half) + s.data(OFFSET + half, DATA[half:size], done=True)


def _two_chunks(s: Session) -> bytes:
    size = s.last.length
    half = size // 2
    return s.data(OFFSET + half, DATA[half:size]) + s.data(OFFSET, DATA[:half], done=True)


def _hole_expected(size: int) -> bytes:
    return bytes(size // 2) + DATA[size // 2 : size]


def _two_expected(size: int) -> bytes:
    return DATA[:size]


@HOW
@pytest.mark.parametrize("style", ["structured", "extended"])
@pytest.mark.parametrize(
    ("make", "expected"),
    [(_hole_then_data, _hole_expected), (_two_chunks, _two_expected)],
    ids=["hole-then-data", "two-chunks-out-of-order"],
)
def test_other_reply_shapes(
    api: Driver,
    serve: Callable[..., HostileServer],
    style: Style,
    how: str,
    make: Callable[[Session], bytes],
    expected: Callable[[int], bytes],
    size: int,
) -> None:
    """Not the header the client looks for first: the general path reads the reply
    (all of it, in the right places), and the connection carries on."""
    server = serve(transmission(style, Send(make), ExpectRequest(), Send(reply), Silent()))
    c = api.connect(server.uri)
    assert read(c, how, size) == expected(size)
    assert read(c, how, size) == DATA[:size]
    assert not c.closed


@HOW
@pytest.mark.parametrize("style", STYLES)
def test_error_reply(
    api: Driver, serve: Callable[..., HostileServer], style: Style, how: str, size: int
) -> None:
    """An error instead of data: RequestError, and the connection is still usable."""
    server = serve(transmission(style, Send(_error), ExpectRequest(), Send(reply), Silent()))
    c = api.connect(server.uri)
    fails(RequestError, read, c, how, size)
    assert read(c, how, size) == DATA[:size]
    assert not c.closed


@HOW
@pytest.mark.parametrize("style", STYLES)
def test_reply_to_another_cookie(
    api: Driver, serve: Callable[..., HostileServer], style: Style, how: str, size: int
) -> None:
    """The header of the usual reply but for a cookie never sent: a protocol error."""
    bad = Send(lambda s: reply(s).replace(struct.pack(">Q", s.last.cookie), bytes(8), 1))
    server = serve(transmission(style, bad, Silent()))
    c = api.connect(server.uri)
    fails(ProtocolError, read, c, how, size)
    assert c.closed
