"""ClientTransmission.direct_request: a driver that receives a request's usual reply
(a success with no data) into a room the core lends, and lets the core judge it
(direct_received).

The request's bytes must be request()'s, the room exactly as long as the success reply
of the negotiated style, and a reply that is not that one must come out exactly as
through request(), with every check.
"""

from __future__ import annotations

import errno

import pytest

from pynbd.errors import ConnectionClosed, InvalidRequest, ProtocolError, UnsupportedError
from pynbd.proto.constants import Cmd, CmdFlag, TransmissionFlag
from pynbd.proto.transmission import (
    DIRECT_DONE,
    DIRECT_OTHER,
    DIRECT_PARTIAL,
    DIRECT_READ,
    ClientTransmission,
)

from .test_read_fast_path import (
    CLEAN_REFUSALS,
    PENDING_CALLS,
    full_receive_buffer,
    judged_other,
    receive_direct,
)
from .test_transmission import ALL_FLAGS, R, feed_buffer, neg, pattern, simple

STYLES = ["simple", "structured", "extended"]

#: (command, offset, length, flags, payload) of each request that may go direct.
REQUESTS = {
    "write": (Cmd.WRITE, 4096, 512, 0, pattern(512)),
    "write-fua": (Cmd.WRITE, 0, 4096, int(CmdFlag.FUA), pattern(4096)),
    "zero": (Cmd.WRITE_ZEROES, 8192, 65536, int(CmdFlag.NO_HOLE), None),
    "trim": (Cmd.TRIM, 512, 1024, 0, None),
    "flush": (Cmd.FLUSH, 0, 0, 0, None),
    "cache": (Cmd.CACHE, 0, 4096, 0, None),
}


def success(style: str, cookie: int, offset: int) -> bytes:
    """The usual success reply: simple unless extended headers are on."""
    return R(style, cookie, offset).none() if style == "extended" else simple(cookie)


def start(
    style: str, command: Cmd = Cmd.WRITE, offset: int = 4096, length: int = 512
) -> tuple[ClientTransmission, int, memoryview]:
    """A core with a direct request pending: (core, cookie, room)."""
    core = ClientTransmission(neg(style))
    payload = pattern(length) if command is Cmd.WRITE else None
    direct = core.direct_request(command, offset, length, 0, payload)
    assert direct is not None
    cookie, _, room = direct
    return core, cookie, room


def error_reply(style: str, cookie: int, offset: int, err: int) -> bytes:
    if style == "simple":
        return simple(cookie, err)
    return R(style, cookie, offset).error(err, "full")


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("name", REQUESTS)
def test_request_is_request_s_and_room_fits_the_success_reply(style: str, name: str) -> None:
    command, offset, length, flags, payload = REQUESTS[name]
    core = ClientTransmission(neg(style))
    direct = core.direct_request(command, offset, length, flags, payload)
    assert direct is not None
    cookie, request, room = direct
    assert core.in_flight == 1 and core.buffers_to_send() == []  # the driver sends it
    other = ClientTransmission(neg(style))
    assert other.request(command, offset, length, flags, payload=payload) == cookie
    queued = other.buffers_to_send()
    assert request == queued[0]
    assert [bytes(b) for b in queued[1:]] == ([] if payload is None else [payload])
    reply = success(style, cookie, offset)
    assert not room.readonly and len(room) == len(reply)
    assert receive_direct(core, room, reply) == ([DIRECT_DONE], len(reply))
    assert core.in_flight == 0 and core.next_event() is None
    with pytest.raises(ValueError):
        core.direct_received(len(room))  # finished already
    with pytest.raises(ValueError):
        core.direct_done(cookie)  # only a big read's data is the driver's
    # The room is the start of the core's receive buffer, all of it offered again.
    full_receive_buffer(core, style)
    core.receive_buffer()[:1] = b"!"
    assert room[:1] == b"!"
    # The stream goes on as usual, with a new cookie.
    c2 = core.request(Cmd.FLUSH, 0, 0)
    assert c2 != cookie
    feed_buffer(core, success(style, c2, 0))
    got = core.next_event()
    assert got is not None and got.cookie == c2 and got.error is None


@pytest.mark.parametrize("style", STYLES)
def test_success_in_pieces(style: str) -> None:
    """The success cut at every byte (a signal, a slow server): PARTIAL until it is
    whole, then DONE; and one byte at a time."""
    size = len(success(style, 1, 4096))
    for cuts in [[cut] for cut in range(1, size)] + [list(range(1, size))]:
        core, cookie, room = start(style)
        verdicts, n = receive_direct(core, room, success(style, cookie, 4096), cuts)
        assert verdicts == [DIRECT_PARTIAL] * len(cuts) + [DIRECT_DONE], cuts
        assert n == size and core.in_flight == 0 and core.next_event() is None
        full_receive_buffer(core, style)


@pytest.mark.parametrize("style", STYLES)
def test_error_reply_is_other_then_the_reply(style: str) -> None:
    """An error, cut at every byte of the room: OTHER (after PARTIAL while it looked
    like the success), then the core gives the Reply with the error."""
    size = len(success(style, 1, 8192))
    for cut in range(1, size + 1):
        core, cookie, room = start(style, Cmd.WRITE_ZEROES, 8192, 4096)
        reply = error_reply(style, cookie, 8192, errno.ENOSPC)
        verdicts, n = receive_direct(core, room, reply, [cut])
        assert verdicts == judged_other(reply, success(style, cookie, 8192), cut), cut
        feed_buffer(core, reply[n:])
        got = core.next_event()
        assert got is not None and got.cookie == cookie and got.error is not None
        assert got.error.errno == errno.ENOSPC and got.error.command is Cmd.WRITE_ZEROES
        assert core.in_flight == 0 and core.next_event() is None
        full_receive_buffer(core, style)


def test_structured_none_reply_is_a_success_too() -> None:
    """With structured replies, a server may answer a write with a NONE chunk instead
    of a simple reply: not the usual reply, so OTHER, and then a success."""
    for cut in range(1, 17):
        core, cookie, room = start("structured", Cmd.TRIM, 0, 4096)
        none = R("structured", cookie).none()
        verdicts, n = receive_direct(core, room, none, [cut])
        assert verdicts == [DIRECT_OTHER] and n == min(cut, 16)
        assert core.in_flight == 1 and core.next_event() is None
        feed_buffer(core, none[n:])
        got = core.next_event()
        assert got is not None and got.cookie == cookie
        assert got.error is None and got.command is Cmd.TRIM and core.in_flight == 0


#: (style, wrong reply) pairs: a success for another cookie; one that does not echo
#: the request's offset (only extended headers echo it); the success of another reply
#: style than the one agreed; garbage.
WRONG = [
    *((style, wrong) for style in STYLES for wrong in ("cookie", "other-style", "garbage")),
    ("extended", "echo"),
]
OTHER_STYLE = {"simple": "structured", "structured": "extended", "extended": "simple"}


@pytest.mark.parametrize(("style", "wrong"), WRONG)
@pytest.mark.parametrize("cut", [1, 5, 100])
def test_wrong_replies_break_the_protocol(style: str, wrong: str, cut: int) -> None:
    """What the general path refuses, found once the bytes are OTHER."""
    core, cookie, room = start(style, Cmd.TRIM, 4096, 512)
    reply = {
        "cookie": success(style, cookie + 1, 4096),
        "echo": R(style, cookie, 0).none(),
        "other-style": success(OTHER_STYLE[style], cookie, 4096)
        if style != "simple"
        else R("structured", cookie).none(),
        "garbage": b"\x00" * 40,
    }[wrong]
    with pytest.raises(ProtocolError):
        verdicts, n = receive_direct(core, room, reply, [cut])
        assert verdicts[-1] == DIRECT_OTHER
        feed_buffer(core, reply[n:])
    assert core.closed and core.next_event() is None
    assert core.fail_all() == [cookie]


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("cut", [0, 1, 5, 15])
def test_end_of_stream(style: str, cut: int) -> None:
    """direct_received(0) is the end of the stream, the request in flight."""
    core, cookie, room = start(style)
    if cut:
        room[:cut] = success(style, cookie, 4096)[:cut]
        assert core.direct_received(cut) == DIRECT_PARTIAL
    with pytest.raises(ProtocolError):
        core.direct_received(0)
    assert core.closed and core.next_event() is None
    assert core.fail_all() == [cookie] and core.in_flight == 0
    # buffer_updated(0) while pending is the end of the stream too.
    core, cookie, _ = start(style)
    with pytest.raises(ProtocolError):
        core.buffer_updated(0)
    assert core.closed and core.fail_all() == [cookie]


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("stage", ["sent", "partial"])
@pytest.mark.parametrize("call", sorted(PENDING_CALLS))
def test_pending_refuses_other_calls(style: str, stage: str, call: str) -> None:
    core, cookie, room = start(style)
    reply = success(style, cookie, 4096)
    cuts = [5] if stage == "partial" else []
    if cuts:
        room[:5] = reply[:5]
        assert core.direct_received(5) == DIRECT_PARTIAL
    with pytest.raises(RuntimeError):
        PENDING_CALLS[call](core)
    assert core.in_flight == 1 and core.buffers_to_send() == [] and core.next_event() is None
    if call not in CLEAN_REFUSALS:
        return
    assert core.direct_request(Cmd.FLUSH, 0, 0) is None
    assert core.direct_read(None, 512, 0) is None
    # The refusal changed nothing: the request finishes and the stream goes on.
    assert receive_direct(core, room, reply, cuts)[0][-1] == DIRECT_DONE
    assert core.in_flight == 0
    c2 = core.request(Cmd.FLUSH, 0, 0)
    feed_buffer(core, success(style, c2, 0))
    got = core.next_event()
    assert got is not None and got.cookie == c2 and got.error is None
    full_receive_buffer(core, style)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("stage", ["sent", "partial", "other"])
def test_fail_all_returns_the_cookie(style: str, stage: str) -> None:
    core, cookie, room = start(style)
    if stage == "partial":
        room[:5] = success(style, cookie, 4096)[:5]
        assert core.direct_received(5) == DIRECT_PARTIAL
    elif stage == "other":  # an error begun: the request is an ordinary one now
        verdicts, _ = receive_direct(core, room, error_reply(style, cookie, 4096, 5)[:10])
        assert verdicts[-1] == DIRECT_OTHER
    assert core.fail_all() == [cookie]
    assert core.in_flight == 0 and core.closed and core.next_event() is None
    with pytest.raises(ValueError):
        core.direct_received(len(room))
    with pytest.raises(ConnectionClosed):
        core.request(Cmd.FLUSH, 0, 0)


@pytest.mark.parametrize("style", STYLES)
def test_other_then_other_requests_and_end(style: str) -> None:
    """After OTHER the request is an ordinary one in flight: a second request, the
    end of the stream, fail_all."""

    def started() -> tuple[ClientTransmission, int, bytes]:
        core, cookie, room = start(style, Cmd.FLUSH, 0, 0)
        reply = error_reply(style, cookie, 0, errno.EIO)
        verdicts, n = receive_direct(core, room, reply[:10])  # a reply begun
        assert verdicts == [DIRECT_OTHER] and core.in_flight == 1
        return core, cookie, reply[n:]

    core, c, rest = started()
    c2 = core.request(Cmd.TRIM, 0, 512)
    assert c2 != c and core.in_flight == 2
    feed_buffer(core, rest + success(style, c2, 0))
    first, second = core.next_event(), core.next_event()
    assert first is not None and first.cookie == c and first.command is Cmd.FLUSH
    assert first.error is not None and first.error.errno == errno.EIO
    assert second is not None and second.cookie == c2 and second.command is Cmd.TRIM
    assert second.error is None and core.in_flight == 0
    core, c, _ = started()
    with pytest.raises(ProtocolError):
        core.buffer_updated(0)  # end of stream with the request in flight
    core, c, _ = started()
    assert core.fail_all() == [c] and core.in_flight == 0


@pytest.mark.parametrize("style", STYLES)
def test_none_unless_alone_and_nothing_buffered(style: str) -> None:
    core = ClientTransmission(neg(style))
    b = core.request(Cmd.FLUSH, 0, 0)
    assert core.direct_request(Cmd.TRIM, 0, 512) is None  # another is in flight
    assert core.in_flight == 1 and len(core.buffers_to_send()) == 1  # nothing queued
    feed_buffer(core, success(style, b, 0) + b"\x67")
    assert core.next_event() is not None and core.in_flight == 0
    assert core.direct_request(Cmd.TRIM, 0, 512) is None  # a received byte is buffered
    core2 = ClientTransmission(neg(style))
    assert core2.direct_request(Cmd.FLUSH, 0, 0) is not None
    assert core2.direct_request(Cmd.FLUSH, 0, 0) is None  # one is pending already
    assert core2.direct_read(None, 512, 0) is None
    assert core2.direct_read(None, DIRECT_READ, 0) is None
    assert core2.in_flight == 1 and core2.buffers_to_send() == []
    core3 = ClientTransmission(neg(style))
    core3.disconnect()
    with pytest.raises(ConnectionClosed):
        core3.direct_request(Cmd.FLUSH, 0, 0)


@pytest.mark.parametrize("style", STYLES)
def test_bad_requests_raise_and_change_nothing(style: str) -> None:
    core = ClientTransmission(neg(style))
    bad: list[tuple[type[Exception], tuple[Cmd, int, int, int, bytes | None]]] = [
        (InvalidRequest, (Cmd.READ, 0, 512, 0, None)),  # a reply with data
        (InvalidRequest, (Cmd.WRITE, 0, 512, 0, None)),  # no payload
        (InvalidRequest, (Cmd.WRITE, 0, 512, 0, b"short")),
        (InvalidRequest, (Cmd.TRIM, 0, 512, 0, b"x" * 512)),  # a payload it cannot carry
        (InvalidRequest, (Cmd.FLUSH, 0, 512, 0, None)),
        (InvalidRequest, (Cmd.TRIM, -1, 512, 0, None)),
        (InvalidRequest, (Cmd.TRIM, 0, 512, int(CmdFlag.DF), None)),  # not a TRIM flag
    ]
    if style != "simple":
        bad.append((InvalidRequest, (Cmd.BLOCK_STATUS, 0, 512, 0, None)))
    for exc, args in bad:
        with pytest.raises(exc):
            core.direct_request(*args)
    read_only = ClientTransmission(neg(style, flags=ALL_FLAGS | TransmissionFlag.READ_ONLY))
    with pytest.raises(UnsupportedError):
        read_only.direct_request(Cmd.WRITE, 0, 3, 0, b"abc")
    no_cache = ClientTransmission(neg(style, flags=ALL_FLAGS & ~TransmissionFlag.SEND_CACHE))
    with pytest.raises(UnsupportedError):
        no_cache.direct_request(Cmd.CACHE, 0, 512)
    for c in (core, read_only, no_cache):
        assert c.in_flight == 0 and c.buffers_to_send() == []
        full_receive_buffer(c, style)
    # No cookie was spent, and no direct request is pending: the next one is normal.
    direct = core.direct_request(Cmd.FLUSH, 0, 0)
    assert direct is not None
    fresh = ClientTransmission(neg(style))
    assert fresh.request(Cmd.FLUSH, 0, 0) == direct[0]
    assert receive_direct(core, direct[2], success(style, direct[0], 0))[0] == [DIRECT_DONE]
