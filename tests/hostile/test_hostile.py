"""The clients against a server that breaks the protocol on purpose.

Every scenario runs against both the blocking :class:`~pynbd.client.sync.Client` and the
asyncio :class:`~pynbd.client.aio.AsyncClient` (the ``api`` fixture). Each must raise
the exception :mod:`pynbd.errors` documents for it, never hang, never hand back data
that was not all received (reads go into a sentinel-filled buffer), and after a fatal
error be closed: ``closed`` is True, the server sees the socket close, and the next call
raises ConnectionClosed. How the tests deal with time: tests/hostile/checks.py.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest

from pynbd.client.base import MappedExtent
from pynbd.errors import ConnectionClosed, ProtocolError, RequestError
from pynbd.proto.constants import CHUNK_ERROR_BIT, Chunk, Cmd, Opt, Rep
from tests.drivers import Driver

from .checks import (
    PATTERN,
    READ_LENGTH,
    READ_OFFSET,
    answer_read,
    assert_alive,
    assert_dead,
    bad_magic,
    fails,
    read_fails,
    sentinel,
    silence,
    stranger,
    times_out,
    transmission,
)
from .server import (
    Close,
    ExpectClientFlags,
    ExpectOption,
    ExpectRequest,
    HalfClose,
    HostileServer,
    Send,
    Session,
    Silent,
    Step,
    Style,
    error_payload,
    greeting,
    handshake,
    option_reply,
    parse_requests,
    structured_chunk,
)

# --- The fake server itself behaves when asked to -------------------------------------------


@pytest.mark.parametrize("style", ["simple", "structured", "extended"])
def test_well_behaved_script(
    api: Driver, serve: Callable[..., HostileServer], style: Style
) -> None:
    """A correct script works end to end, so the failures below are the client's."""
    written = b"\x11" * 1024

    def ack(s: Session) -> bytes:
        return s.none() if s.structured else s.simple()

    script: list[Step] = [
        *handshake(style, size=1 << 20),
        *answer_read(),
        ExpectRequest(),
        Send(ack),
    ]
    if style != "simple":
        script += [ExpectRequest(), Send(lambda s: s.block_status(1, [(4096, 3)]))]
    server = serve(script)
    c = api.connect(server.uri)
    assert c.structured_replies == (style != "simple")
    assert c.extended_headers == (style == "extended")
    assert c.pread(READ_LENGTH, READ_OFFSET) == PATTERN
    c.pwrite(written, 8192)
    if style != "simple":
        assert c.block_status(4096, 0) == [MappedExtent(0, 4096, 3)]
    c.close()
    s = server.wait()
    assert c.closed
    kinds = [r.type for r in s.requests]
    assert kinds[:2] == [Cmd.READ, Cmd.WRITE]
    assert s.requests[1].payload == written
    # The close sent NBD_CMD_DISC and nothing after it (rule 11).
    assert [r.type for r in parse_requests(bytes(s.drained), extended=s.extended)] == [Cmd.DISC]


def test_tcp_listener(api: Driver, serve: Callable[..., HostileServer]) -> None:
    server = serve(transmission("structured", Send(lambda s: s.read_ok(PATTERN))), tcp=True)
    assert server.uri.startswith("nbd://127.0.0.1:")
    c = api.connect(server.uri)
    assert c.pread(READ_LENGTH, READ_OFFSET) == PATTERN


# --- Handshake ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "greet",
    [
        pytest.param(greeting(magic=0x4E42444D41474944), id="bad-NBDMAGIC"),
        pytest.param(greeting(option_magic=0x49484156454F5055), id="bad-IHAVEOPT"),
    ],
)
def test_bad_greeting(api: Driver, serve: Callable[..., HostileServer], greet: bytes) -> None:
    server = serve([Send(greet), Silent()])
    fails(ProtocolError, api.connect, server.uri)
    assert server.wait_peer_closed(), "the client's socket is still open"


def _other_option(s: Session) -> int:
    return int(Opt.LIST if s.options[-1].option != Opt.LIST else Opt.INFO)


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(
            lambda s: option_reply(s.options[-1].option, Rep.ACK, magic=0x3E889045565A8),
            id="wrong-magic",
        ),
        pytest.param(lambda s: option_reply(_other_option(s), Rep.ACK), id="other-option"),
        pytest.param(
            lambda s: option_reply(s.options[-1].option, Rep.INFO, b"\0\0", length=0xFFFFFFFF),
            id="length-4GiB",
        ),
        pytest.param(lambda s: option_reply(s.options[-1].option, 77), id="unknown-reply-type"),
        pytest.param(
            lambda s: option_reply(s.options[-1].option, Rep.ACK, b"junk"), id="ack-with-payload"
        ),
    ],
)
def test_bad_option_reply(
    api: Driver, serve: Callable[..., HostileServer], reply: Callable[[Session], bytes]
) -> None:
    # After the bad reply the server goes silent: the client must not wait for more
    # (the 4 GiB the lying length announces, say) but fail at once; one that waited
    # would raise NBDTimeout instead.
    server = serve([Send(greeting()), ExpectClientFlags(), ExpectOption(), Send(reply), Silent()])
    fails(ProtocolError, api.connect, server.uri)
    assert server.wait_peer_closed(), "the client's socket is still open"


@pytest.mark.parametrize(
    "script",
    [
        pytest.param(silence(), id="no-greeting"),
        pytest.param([Send(greeting()), ExpectClientFlags(), *silence()], id="no-option-reply"),
    ],
)
def test_silent_during_handshake(
    api: Driver, serve: Callable[..., HostileServer], script: list[Step]
) -> None:
    server = serve(script)
    times_out(api.connect, server.uri)
    assert server.wait_peer_closed(), "the client's socket is still open"


@pytest.mark.parametrize(
    "script",
    [
        pytest.param([Send(greeting()), Close()], id="after-greeting"),
        pytest.param([*handshake(stop_at=Opt.GO), Close()], id="at-GO"),
        pytest.param([*handshake(stop_at=Opt.GO), HalfClose()], id="at-GO-half"),
    ],
)
def test_server_closes_during_handshake(
    api: Driver, serve: Callable[..., HostileServer], script: list[Step]
) -> None:
    """EOF during negotiation: ProtocolError or ConnectionClosed (Client documents both)."""
    server = serve(script)
    fails((ProtocolError, ConnectionClosed), api.connect, server.uri)
    if not isinstance(script[-1], Close):
        assert server.wait_peer_closed(), "the client's socket is still open"


@pytest.mark.parametrize("close", [Close(), HalfClose()], ids=["close", "half-close"])
def test_server_closes_after_go(
    api: Driver, serve: Callable[..., HostileServer], close: Step
) -> None:
    """The server accepts GO, then leaves: the first read fails and the client is closed."""
    server = serve([*handshake(), close])
    c = api.connect(server.uri)
    _, buf = read_fails(c, (ConnectionClosed, ProtocolError))
    assert buf == sentinel()
    assert c.closed
    if isinstance(close, HalfClose):
        assert_dead(c, server)


# --- Transmission: replies that break the rules -----------------------------------------


@pytest.mark.parametrize(
    ("style", "reply"),
    [
        pytest.param("simple", lambda s: bad_magic(s.simple(0, PATTERN)), id="simple"),
        pytest.param(
            "structured",
            lambda s: bad_magic(s.data(READ_OFFSET, PATTERN, done=True)),
            id="structured",
        ),
        pytest.param(
            "extended", lambda s: bad_magic(s.data(READ_OFFSET, PATTERN, done=True)), id="extended"
        ),
        pytest.param("extended", lambda s: s.simple(0, PATTERN), id="simple-magic-under-extended"),
    ],
)
def test_bad_reply_magic(
    api: Driver, serve: Callable[..., HostileServer], style: Style, reply: Callable[..., bytes]
) -> None:
    server = serve(transmission(style, Send(reply), Silent()))
    c = api.connect(server.uri)
    _, buf = read_fails(c, ProtocolError)
    assert buf == sentinel()
    assert_dead(c, server)


def test_structured_magic_under_extended(api: Driver, serve: Callable[..., HostileServer]) -> None:
    """A 20-byte structured chunk after extended headers were agreed is a bad magic."""

    def reply(s: Session) -> bytes:
        payload = READ_OFFSET.to_bytes(8, "big") + PATTERN
        return structured_chunk(s.last.cookie, Chunk.OFFSET_DATA, payload)

    server = serve(transmission("extended", Send(reply), Silent()))
    c = api.connect(server.uri)
    _, buf = read_fails(c, ProtocolError)
    assert buf == sentinel()
    assert_dead(c, server)


@pytest.mark.parametrize("style", ["structured", "extended"])
def test_unknown_chunk_type_is_fatal(
    api: Driver, serve: Callable[..., HostileServer], style: Style
) -> None:
    """Rule 9: an unknown non-error chunk type ends the connection."""
    server = serve(transmission(style, Send(lambda s: s.chunk(100, b"\0" * 4)), Silent()))
    c = api.connect(server.uri)
    _, buf = read_fails(c, ProtocolError)
    assert buf == sentinel()
    assert_dead(c, server)


@pytest.mark.parametrize("style", ["structured", "extended"])
def test_unknown_error_chunk_type_is_not_fatal(
    api: Driver, serve: Callable[..., HostileServer], style: Style
) -> None:
    """Rule 9: an unknown error chunk (bit 15) fails the request, not the connection.

    Its payload starts like NBD_REPLY_TYPE_ERROR's; the extra bytes after the message
    belong to the unknown type and are skipped.
    """
    payload = error_payload(errno.EIO, b"strange", extra=b"\x01" * 7)
    server = serve(
        transmission(style, Send(lambda s: s.chunk(CHUNK_ERROR_BIT | 100, payload)), *answer_read())
    )
    c = api.connect(server.uri)
    info, _ = read_fails(c, RequestError)
    assert isinstance(info.value, RequestError)
    assert info.value.errno == errno.EIO
    assert info.value.message == "strange"
    assert_alive(c, server)


@pytest.mark.parametrize(
    ("style", "reply"),
    [
        pytest.param("simple", lambda s: s.simple(0, PATTERN, cookie=stranger(s)), id="simple"),
        pytest.param(
            "structured",
            lambda s: s.data(READ_OFFSET, PATTERN, done=True, cookie=stranger(s)),
            id="structured",
        ),
        pytest.param(
            "extended",
            lambda s: s.data(READ_OFFSET, PATTERN, done=True, cookie=stranger(s)),
            id="extended",
        ),
        pytest.param(
            "structured",
            lambda s: s.chunk(Chunk.ERROR, error_payload(5), cookie=stranger(s)),
            id="error-chunk",
        ),
    ],
)
def test_reply_to_a_cookie_never_sent(
    api: Driver, serve: Callable[..., HostileServer], style: Style, reply: Callable[..., bytes]
) -> None:
    server = serve(transmission(style, Send(reply), Silent()))
    c = api.connect(server.uri)
    _, buf = read_fails(c, ProtocolError)
    assert buf == sentinel()
    assert_dead(c, server)


@pytest.mark.parametrize(
    ("style", "reply"),
    [
        pytest.param(
            "structured",
            lambda s: s.data(READ_OFFSET, PATTERN * 2, done=True),
            id="structured-1KiB",
        ),
        pytest.param(
            "extended",
            lambda s: s.data(READ_OFFSET, PATTERN, done=True, length=1 << 62),
            id="extended-lying-2^62",
        ),
        pytest.param(
            "structured",
            lambda s: s.data(READ_OFFSET, b"", done=True, length=0xFFFFFFFF),
            id="structured-lying-4GiB",
        ),
    ],
)
def test_offset_data_longer_than_the_read(
    api: Driver, serve: Callable[..., HostileServer], style: Style, reply: Callable[..., bytes]
) -> None:
    server = serve(transmission(style, Send(reply), Silent()))
    c = api.connect(server.uri)
    _, buf = read_fails(c, ProtocolError)
    assert buf == sentinel(), "the client wrote data it was going to reject"
    assert_dead(c, server)


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(lambda s: s.data(0, PATTERN, done=True), id="data-before"),
        pytest.param(lambda s: s.data(READ_OFFSET + 256, PATTERN, done=True), id="data-past-end"),
        pytest.param(
            lambda s: s.data(READ_OFFSET + READ_LENGTH, PATTERN[:1], done=True),
            id="data-just-after",
        ),
        pytest.param(lambda s: s.hole(READ_OFFSET - 1, READ_LENGTH, done=True), id="hole-before"),
        pytest.param(lambda s: s.hole(READ_OFFSET, READ_LENGTH + 1, done=True), id="hole-past-end"),
        pytest.param(lambda s: s.hole(1 << 63, 1, done=True), id="hole-far-away"),
    ],
)
def test_chunk_outside_the_read(
    api: Driver, serve: Callable[..., HostileServer], reply: Callable[..., bytes]
) -> None:
    server = serve(transmission("structured", Send(reply), Silent()))
    c = api.connect(server.uri)
    _, buf = read_fails(c, ProtocolError)
    assert buf == sentinel(), "the client wrote data it was going to reject"
    assert_dead(c, server)


HALF = READ_LENGTH // 2


# Each pair adds up to exactly the read's length, so only the overlap check can catch it.
@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(
            lambda s: (
                s.data(READ_OFFSET, PATTERN[:HALF])
                + s.data(READ_OFFSET + HALF - 1, PATTERN[:HALF], done=True)
            ),
            id="data-data",
        ),
        pytest.param(
            lambda s: (
                s.data(READ_OFFSET, PATTERN[:HALF]) + s.data(READ_OFFSET, PATTERN[:HALF], done=True)
            ),
            id="data-twice",
        ),
        pytest.param(
            lambda s: (
                s.data(READ_OFFSET, PATTERN[:HALF]) + s.hole(READ_OFFSET + 128, HALF, done=True)
            ),
            id="data-hole",
        ),
        pytest.param(
            lambda s: (
                s.hole(READ_OFFSET + HALF, HALF)
                + s.data(READ_OFFSET + 1, PATTERN[:HALF], done=True)
            ),
            id="hole-data",
        ),
    ],
)
def test_overlapping_chunks(
    api: Driver, serve: Callable[..., HostileServer], reply: Callable[..., bytes]
) -> None:
    server = serve(transmission("structured", Send(reply), Silent()))
    c = api.connect(server.uri)
    read_fails(c, ProtocolError)
    assert_dead(c, server)


@pytest.mark.parametrize(
    ("style", "reply"),
    [
        pytest.param(
            "structured", lambda s: s.data(READ_OFFSET, PATTERN[:HALF], done=True), id="data-done"
        ),
        pytest.param(
            "structured", lambda s: s.data(READ_OFFSET, PATTERN[:HALF]) + s.none(), id="data-none"
        ),
        pytest.param(
            "structured",
            lambda s: (
                s.data(READ_OFFSET + HALF, PATTERN[:HALF])
                + s.hole(READ_OFFSET + 1, HALF - 1)
                + s.none()
            ),
            id="one-byte-missing",
        ),
        pytest.param("structured", lambda s: s.none(), id="none-only"),
        pytest.param(
            "extended", lambda s: s.data(READ_OFFSET, PATTERN[:HALF], done=True), id="extended"
        ),
    ],
)
def test_read_reply_incomplete_at_done(
    api: Driver, serve: Callable[..., HostileServer], style: Style, reply: Callable[..., bytes]
) -> None:
    """DONE before the whole range arrived: the rest of the buffer would be stale."""
    server = serve(transmission(style, Send(reply), Silent()))
    c = api.connect(server.uri)
    read_fails(c, ProtocolError)
    assert_dead(c, server)


def test_simple_reply_to_a_read_under_structured_replies(
    api: Driver, serve: Callable[..., HostileServer]
) -> None:
    server = serve(transmission("structured", Send(lambda s: s.simple(0, PATTERN)), Silent()))
    c = api.connect(server.uri)
    _, buf = read_fails(c, ProtocolError)
    assert buf == sentinel()
    assert_dead(c, server)


@pytest.mark.parametrize("close", [Close(), HalfClose()], ids=["close", "half-close"])
def test_simple_reply_short_then_eof(
    api: Driver, serve: Callable[..., HostileServer], close: Step
) -> None:
    """A simple reply with 100 of 512 bytes, then EOF: the read must not succeed."""
    server = serve(transmission("simple", Send(lambda s: s.simple(0, PATTERN[:100])), close))
    c = api.connect(server.uri)
    read_fails(c, (ProtocolError, ConnectionClosed))
    assert c.closed
    if isinstance(close, HalfClose):
        assert_dead(c, server)


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(
            lambda s: s.data(READ_OFFSET, PATTERN, done=True, echo=READ_OFFSET + 512), id="data"
        ),
        pytest.param(
            # A plausible server bug: each chunk echoes its own offset, not the request's.
            lambda s: (
                s.data(READ_OFFSET, PATTERN[:HALF])
                + s.data(READ_OFFSET + HALF, PATTERN[HALF:], done=True, echo=READ_OFFSET + HALF)
            ),
            id="second-chunk-echoes-its-offset",
        ),
        pytest.param(
            lambda s: s.chunk(Chunk.ERROR, error_payload(5), echo=READ_OFFSET - 1), id="error"
        ),
    ],
)
def test_extended_header_offset_mismatch(
    api: Driver, serve: Callable[..., HostileServer], reply: Callable[..., bytes]
) -> None:
    server = serve(transmission("extended", Send(reply), Silent()))
    c = api.connect(server.uri)
    _, buf = read_fails(c, ProtocolError)
    assert buf[HALF:] == sentinel(HALF)
    assert_dead(c, server)


@pytest.mark.parametrize("style", ["structured", "extended"])
def test_block_status_for_an_unknown_context(
    api: Driver, serve: Callable[..., HostileServer], style: Style
) -> None:
    server = serve(transmission(style, Send(lambda s: s.block_status(99, [(4096, 0)])), Silent()))
    c = api.connect(server.uri)
    fails(ProtocolError, c.block_status, 4096, 0)
    assert_dead(c, server)


@pytest.mark.parametrize(
    ("style", "reply"),
    [
        pytest.param(
            "structured",
            lambda s: s.chunk(Chunk.ERROR, error_payload(5, b"abc", message_length=100)),
            id="structured",
        ),
        pytest.param(
            "extended",
            lambda s: s.chunk(Chunk.ERROR, error_payload(5, b"abc", message_length=100)),
            id="extended",
        ),
        pytest.param(
            "structured",
            lambda s: s.chunk(
                Chunk.ERROR_OFFSET, error_payload(5, b"abc", message_length=20, offset=READ_OFFSET)
            ),
            id="error-offset",
        ),
        pytest.param(
            "structured",
            lambda s: s.chunk(CHUNK_ERROR_BIT | 100, error_payload(5, b"", message_length=9)),
            id="unknown-error-type",
        ),
        pytest.param(
            "structured",
            lambda s: s.chunk(Chunk.ERROR, error_payload(5), length=0xFFFFFFFF),
            id="lying-4GiB",
        ),
        pytest.param(
            "extended",
            lambda s: s.chunk(Chunk.ERROR, error_payload(5), length=1 << 40),
            id="extended-lying-1TiB",
        ),
    ],
)
def test_error_chunk_longer_than_itself(
    api: Driver, serve: Callable[..., HostileServer], style: Style, reply: Callable[..., bytes]
) -> None:
    server = serve(transmission(style, Send(reply), Silent()))
    c = api.connect(server.uri)
    _, buf = read_fails(c, ProtocolError)
    assert buf == sentinel()
    assert_dead(c, server)


# --- Transmission: a server that stops talking ------------------------------------------


def test_silent_mid_reply(api: Driver, serve: Callable[..., HostileServer]) -> None:
    """Half a chunk, then silence: NBDTimeout, and the connection is given up."""
    server = serve(
        transmission("structured", Send(lambda s: s.data(READ_OFFSET, PATTERN)[:-300]), *silence())
    )
    c = api.connect(server.uri)
    buf = sentinel()
    times_out(c.pread_into, buf, READ_OFFSET)
    assert_dead(c, server)


@pytest.mark.parametrize("close", [Close(), HalfClose()], ids=["close", "half-close"])
def test_server_closes_mid_payload(
    api: Driver, serve: Callable[..., HostileServer], close: Step
) -> None:
    """EOF inside a chunk with a request in flight: ProtocolError (ConnectionClosed is
    also documented for a lost connection)."""
    server = serve(
        transmission("structured", Send(lambda s: s.data(READ_OFFSET, PATTERN)[:-300]), close)
    )
    c = api.connect(server.uri)
    read_fails(c, (ProtocolError, ConnectionClosed))
    assert c.closed
    if isinstance(close, HalfClose):
        assert_dead(c, server)


# --- Transmission: error values ----------------------------------------------------------


@pytest.mark.parametrize("style", ["simple", "structured", "extended"])
def test_eshutdown_makes_the_client_disconnect(
    api: Driver, serve: Callable[..., HostileServer], style: Style
) -> None:
    """NBD_ESHUTDOWN: RequestError(ESHUTDOWN), then NBD_CMD_DISC and nothing after it."""
    server = serve(transmission(style, Send(lambda s: s.error(108)), ExpectRequest()))
    c = api.connect(server.uri)
    info, _ = read_fails(c, RequestError)
    assert isinstance(info.value, RequestError)
    assert info.value.errno == errno.ESHUTDOWN
    s = server.wait()
    assert [r.type for r in s.requests] == [Cmd.READ, Cmd.DISC], "no NBD_CMD_DISC was sent"
    assert s.drained == b"", "the client sent something after NBD_CMD_DISC"
    assert s.peer_eof.is_set()
    assert c.closed
    fails(ConnectionClosed, c.pread, READ_LENGTH, 0)


@pytest.mark.parametrize("style", ["simple", "structured", "extended"])
def test_unknown_error_value_is_einval(
    api: Driver, serve: Callable[..., HostileServer], style: Style
) -> None:
    """Rule 10: error 9999 is reported as EINVAL, and the connection stays usable."""
    server = serve(transmission(style, Send(lambda s: s.error(9999)), *answer_read()))
    c = api.connect(server.uri)
    info, _ = read_fails(c, RequestError)
    assert isinstance(info.value, RequestError)
    assert info.value.errno == errno.EINVAL
    assert_alive(c, server)
