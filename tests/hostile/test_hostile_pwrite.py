"""Writes against a server that breaks off, delays or bends a write's reply.

The blocking client sends a write's header and payload with one sendmsg, then receives
the usual reply (a success: 16 bytes, or a 32-byte NONE chunk with extended headers)
itself, past the core, and hands anything else to the core's general path. A reply that
comes short, late or wrong must give the documented exception, never a success, and a
success in pieces must still succeed. Both clients (the ``api`` fixture), every reply
style, a small write and a big one.
"""

from __future__ import annotations

import errno
import signal
from collections.abc import Callable

import pytest

from pynbd.client.sync import Client
from pynbd.errors import ConnectionClosed, ProtocolError, RequestError
from pynbd.proto.constants import Chunk, Cmd
from tests.drivers import Driver, Handle

from .checks import (
    CLIENT_TIMEOUT,
    Usr1,
    answer_read,
    assert_alive,
    assert_dead,
    fails,
    gave_up_first,
    silence,
    stranger,
    times_out,
    transmission,
)
from .server import (
    Close,
    Do,
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
    handshake,
)
from .test_hostile_pread import at

STYLES: list[Style] = ["simple", "structured", "extended"]
OFFSET = 8192
DATA = bytes((i * 13 + 7) & 0xFF for i in range(256 * 1024))


@pytest.fixture(params=[4096, len(DATA)], ids=["small", "big"])
def size(request: pytest.FixtureRequest) -> int:
    """The write's length: DATA[:size] at OFFSET."""
    n: int = request.param
    return n


def ok(s: Session) -> bytes:
    """The usual success reply to the last request."""
    return s.none() if s.extended else s.simple()


def part(where: int | str) -> Send:
    """The success reply up to ``where``."""
    return Send(lambda s: ok(s)[: at(where, len(ok(s)))])


def rest(where: int | str) -> Send:
    """The success reply from ``where`` on."""
    return Send(lambda s: ok(s)[at(where, len(ok(s))) :])


def wrote(c: Handle, server: HostileServer, size: int) -> None:
    """Close ``c``: the server got a WRITE of DATA[:size] at OFFSET first."""
    c.close()
    first = server.wait().requests[0]
    assert (first.type, first.offset, first.length) == (Cmd.WRITE, OFFSET, size)
    assert first.payload == DATA[:size]


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("where", [1, 4, "half", "last"])
def test_reply_in_pieces(
    api: Driver, serve: Callable[..., HostileServer], style: Style, where: int | str, size: int
) -> None:
    """The success comes in two writes, the second once the client has read the first:
    the write succeeds."""
    steps = transmission(style, part(where), Drained(), rest(where), *answer_read())
    server = serve(steps)
    c = api.connect(server.uri)
    c.pwrite(DATA[:size], OFFSET)
    assert_alive(c, server)
    wrote(c, server, size)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("close", [Close(), HalfClose()], ids=["close", "half-close"])
@pytest.mark.parametrize("sent", [0, 1, "half", "last"])
def test_eof_mid_reply(
    api: Driver,
    serve: Callable[..., HostileServer],
    style: Style,
    close: Step,
    sent: int | str,
    size: int,
) -> None:
    """Part of the success (or nothing), then end of stream: an error, not a success."""
    server = serve(transmission(style, part(sent), close))
    c = api.connect(server.uri)
    fails((ProtocolError, ConnectionClosed), c.pwrite, DATA[:size], OFFSET)
    assert c.closed
    if isinstance(close, HalfClose):
        assert_dead(c, server)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("sent", [0, 1, "last"])
def test_silent_mid_reply(
    api: Driver, serve: Callable[..., HostileServer], style: Style, sent: int | str, size: int
) -> None:
    """Part of the success (or nothing), then silence: NBDTimeout after the timeout."""
    server = serve(transmission(style, part(sent), *silence()))
    c = api.connect(server.uri)
    times_out(c.pwrite, DATA[:size], OFFSET)
    assert_dead(c, server)


@pytest.mark.parametrize("style", STYLES)
def test_trickled_reply_past_the_timeout(
    api: Driver, serve: Callable[..., HostileServer], style: Style
) -> None:
    """The success one byte at a time (all but its last), each well within the
    timeout, the whole far beyond it (7 s or more): the call's deadline holds while the
    client waits for the rest of a reply that has begun as expected, so it gives up
    while the trickle goes on. (The reply has 16 bytes or more to trickle: a timeout
    of 1 s gives them gaps of 0.5 s.)"""
    limit = 1.0

    def trickle(s: Session) -> None:
        for i in range(1, len(ok(s)) - 1):
            Sleep(limit / 2).run(s)
            Send(ok(s)[i : i + 1]).run(s)

    server = serve(transmission(style, part(1), Do(trickle), *silence()))
    c = api.connect(server.uri)
    times_out(c.pwrite, DATA[:4096], OFFSET, limit=limit)
    assert_dead(c, server)
    gave_up_first(server)


CALLS: dict[str, tuple[Cmd, Callable[..., None]]] = {
    "flush": (Cmd.FLUSH, lambda c, **kw: c.flush(**kw)),
    "trim": (Cmd.TRIM, lambda c, **kw: c.trim(4096, OFFSET, **kw)),
    "zero": (Cmd.WRITE_ZEROES, lambda c, **kw: c.zero(4096, OFFSET, no_hole=True, **kw)),
    "cache": (Cmd.CACHE, lambda c, **kw: c.cache(4096, OFFSET, **kw)),
}


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("name", CALLS)
def test_other_requests_take_the_same_path(
    api: Driver, serve: Callable[..., HostileServer], style: Style, name: str
) -> None:
    """FLUSH, TRIM, WRITE_ZEROES and CACHE: a success in pieces succeeds, an error
    fails that call alone, silence times out."""
    command, call = CALLS[name]
    steps = [part(1), Drained(), rest(1), ExpectRequest(), Send(_eio), ExpectRequest()]
    server = serve(transmission(style, *steps, *silence()))
    c = api.connect(server.uri)
    call(c)
    info = fails(RequestError, call, c)
    assert isinstance(info.value, RequestError)
    assert info.value.errno == errno.EIO and info.value.command is command
    assert not c.closed
    times_out(call, c)
    assert_dead(c, server)
    assert [r.type for r in server.wait().requests] == [command] * 3


# --- Replies other than the usual success ------------------------------------------------


def _eio(s: Session) -> bytes:
    return s.error(errno.EIO, b"disk on fire")


def _eio_in_pieces(s: Session) -> bytes:
    return s.error(errno.EIO, b"disk on fire")[:10]


@pytest.mark.parametrize("style", STYLES)
def test_error_reply_fails_the_write_only(
    api: Driver, serve: Callable[..., HostileServer], style: Style, size: int
) -> None:
    """An error reply, the first 10 bytes apart: RequestError(EIO), the connection
    stays usable."""
    rest_of_error = Send(lambda s: s.error(errno.EIO, b"disk on fire")[10:])
    server = serve(
        transmission(style, Send(_eio_in_pieces), Drained(), rest_of_error, *answer_read())
    )
    c = api.connect(server.uri)
    info = fails(RequestError, c.pwrite, DATA[:size], OFFSET)
    assert isinstance(info.value, RequestError)
    assert info.value.errno == errno.EIO and info.value.command is Cmd.WRITE
    assert_alive(c, server)
    wrote(c, server, size)


def test_none_chunk_under_structured_replies_is_a_success(
    api: Driver, serve: Callable[..., HostileServer], size: int
) -> None:
    """With structured replies a server may answer a write with a NONE chunk instead
    of a simple reply (not the usual lead): the write succeeds."""
    server = serve(transmission("structured", Send(lambda s: s.none()), *answer_read()))
    c = api.connect(server.uri)
    c.pwrite(DATA[:size], OFFSET)
    assert_alive(c, server)


@pytest.mark.parametrize(
    ("style", "reply"),
    [
        pytest.param("simple", lambda s: s.simple(cookie=stranger(s)), id="simple-stranger"),
        pytest.param("structured", lambda s: s.simple(cookie=stranger(s)), id="struct-stranger"),
        pytest.param(
            "extended", lambda s: s.chunk(Chunk.NONE, cookie=stranger(s)), id="extended-stranger"
        ),
        pytest.param("simple", lambda s: b"\xde\xad\xbe\xef" + s.simple()[4:], id="bad-magic"),
        pytest.param("extended", lambda s: s.simple(), id="simple-under-extended"),
        pytest.param(
            "extended",
            lambda s: s.chunk(Chunk.NONE, echo=OFFSET + 512),
            id="extended-offset-mismatch",
        ),
        pytest.param(
            "structured", lambda s: s.chunk(Chunk.NONE, done=False), id="none-without-done"
        ),
        pytest.param(
            "structured", lambda s: s.chunk(Chunk.OFFSET_DATA, bytes(12)), id="data-to-a-write"
        ),
    ],
)
def test_wrong_reply_is_fatal(
    api: Driver, serve: Callable[..., HostileServer], style: Style, reply: Callable[..., bytes]
) -> None:
    server = serve(transmission(style, Send(reply), Silent()))
    c = api.connect(server.uri)
    fails(ProtocolError, c.pwrite, DATA[:4096], OFFSET)
    assert_dead(c, server)


@pytest.mark.parametrize("style", STYLES)
def test_eshutdown_makes_the_client_disconnect(
    api: Driver, serve: Callable[..., HostileServer], style: Style
) -> None:
    """NBD_ESHUTDOWN to a write: RequestError(ESHUTDOWN), then NBD_CMD_DISC."""
    server = serve(transmission(style, Send(lambda s: s.error(108)), ExpectRequest()))
    c = api.connect(server.uri)
    info = fails(RequestError, c.pwrite, DATA[:4096], OFFSET)
    assert isinstance(info.value, RequestError) and info.value.errno == errno.ESHUTDOWN
    s = server.wait()
    assert [r.type for r in s.requests] == [Cmd.WRITE, Cmd.DISC], "no NBD_CMD_DISC was sent"
    assert c.closed


# --- A signal during the blocking client's send or recv ------------------------------------


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
@pytest.mark.parametrize("style", STYLES)
def test_signal_mid_reply(
    serve: Callable[..., HostileServer], sigusr1: Usr1, style: Style, tcp: bool
) -> None:
    """A signal while the recv waits for the rest of the success (the server sends it
    once the client has read the first byte and the handler has run): it succeeds."""
    steps = [part(1), Drained(), sigusr1.step(), rest(1), Silent()]
    server = serve(transmission(style, *steps), tcp=tcp)
    with Client(server.uri, timeout=CLIENT_TIMEOUT) as c:
        c.pwrite(DATA[:4096], OFFSET)
        assert sigusr1.seen == [signal.SIGUSR1], "the signal did not arrive during the call"
        assert not c.closed


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
@pytest.mark.parametrize("style", STYLES)
def test_signal_mid_send(
    serve: Callable[..., HostileServer], sigusr1: Usr1, style: Style, tcp: bool
) -> None:
    """A signal while sendmsg waits for a server that reads the request late (16 MiB,
    more than the socket buffers hold; the server signals once 32 KiB are waiting,
    and reads once the handler has run): the send goes on from where it stopped, and
    the server gets every byte."""
    data = DATA * 64
    backlog = Do(lambda s: s.wait_queued(32 << 10))
    steps = [backlog, sigusr1.step(), ExpectRequest(), Send(ok), Silent()]
    server = serve([*handshake(style, size=64 << 20), *steps], tcp=tcp)
    with Client(server.uri, timeout=CLIENT_TIMEOUT) as c:
        c.pwrite(data, OFFSET)
        assert sigusr1.seen == [signal.SIGUSR1], "the signal did not arrive during the call"
        assert not c.closed
    (request,) = server.wait().requests[:1]
    assert (request.type, request.offset, request.length) == (Cmd.WRITE, OFFSET, len(data))
    assert request.payload == data
