"""ClientTransmission.direct_request: a driver that receives a request's usual reply
(a success with no data) itself, and hands anything else to the core.

The request's bytes must be request()'s, the lead the exact success reply of the
negotiated style, and a reply handed back must come out exactly as through request().
"""

from __future__ import annotations

import errno

import pytest

from pynbd.errors import ConnectionClosed, InvalidRequest, ProtocolError, UnsupportedError
from pynbd.proto.constants import Cmd, CmdFlag, TransmissionFlag
from pynbd.proto.transmission import ClientTransmission

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


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("name", REQUESTS)
def test_request_is_request_s_and_lead_is_the_success_reply(style: str, name: str) -> None:
    command, offset, length, flags, payload = REQUESTS[name]
    core = ClientTransmission(neg(style))
    direct = core.direct_request(command, offset, length, flags, payload)
    assert direct is not None
    cookie, request, lead = direct
    assert core.in_flight == 1 and core.buffers_to_send() == []  # the driver sends it
    other = ClientTransmission(neg(style))
    assert other.request(command, offset, length, flags, payload=payload) == cookie
    queued = other.buffers_to_send()
    assert request == queued[0]
    assert [bytes(b) for b in queued[1:]] == ([] if payload is None else [payload])
    assert lead == success(style, cookie, offset)
    core.direct_done(cookie)
    assert core.in_flight == 0 and core.next_event() is None
    with pytest.raises(ValueError):
        core.direct_done(cookie)  # finished already
    # The stream goes on as usual, with a new cookie.
    c2 = core.request(Cmd.FLUSH, 0, 0)
    assert c2 != cookie
    feed_buffer(core, success(style, c2, 0))
    reply = core.next_event()
    assert reply is not None and reply.cookie == c2 and reply.error is None


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("split", [0, 1, 5, 15])
def test_handed_back_success_completes_as_through_request(style: str, split: int) -> None:
    """The lead came short (a signal, a slow server): the core takes the bytes and
    completes the request as an ordinary one, with its command."""
    core = ClientTransmission(neg(style))
    direct = core.direct_request(Cmd.WRITE, 4096, 512, 0, pattern(512))
    assert direct is not None
    cookie, _, lead = direct
    if split:
        core.receive_data(lead[:split])
    core.receive_data(lead[split:])
    reply = core.next_event()
    assert reply is not None and reply.cookie == cookie and reply.error is None
    assert reply.command is Cmd.WRITE and core.in_flight == 0
    assert len(core.receive_buffer()) == len(ClientTransmission(neg(style)).receive_buffer())


def test_structured_none_reply_is_a_success_too() -> None:
    """With structured replies, a server may answer a write with a NONE chunk instead
    of a simple reply: not the lead, so it goes to the core, which accepts it."""
    core = ClientTransmission(neg("structured"))
    direct = core.direct_request(Cmd.TRIM, 0, 4096)
    assert direct is not None
    none = R("structured", direct[0]).none()
    assert not none.startswith(direct[2])
    core.receive_data(none)
    reply = core.next_event()
    assert reply is not None and reply.error is None and reply.command is Cmd.TRIM


@pytest.mark.parametrize("style", STYLES)
def test_error_reply(style: str) -> None:
    core = ClientTransmission(neg(style))
    direct = core.direct_request(Cmd.WRITE_ZEROES, 0, 4096)
    assert direct is not None
    cookie = direct[0]
    if style == "simple":
        core.receive_data(simple(cookie, errno.ENOSPC))
    else:
        core.receive_data(R(style, cookie).error(errno.ENOSPC, "full"))
    reply = core.next_event()
    assert reply is not None and reply.error is not None
    assert reply.error.errno == errno.ENOSPC and reply.error.command is Cmd.WRITE_ZEROES


@pytest.mark.parametrize("style", STYLES)
def test_wrong_replies_break_the_protocol(style: str) -> None:
    """A success for another cookie, or (extended) one that does not echo the offset,
    is what the general path refuses."""
    core = ClientTransmission(neg(style))
    direct = core.direct_request(Cmd.FLUSH, 0, 0)
    assert direct is not None
    with pytest.raises(ProtocolError):
        core.receive_data(success(style, direct[0] + 1, 0))
    if style == "extended":
        core = ClientTransmission(neg(style))
        direct = core.direct_request(Cmd.TRIM, 4096, 512)
        assert direct is not None
        with pytest.raises(ProtocolError):
            core.receive_data(success(style, direct[0], 0))


@pytest.mark.parametrize("style", STYLES)
def test_then_other_requests_and_end(style: str) -> None:
    """Whatever the driver does next besides direct_done, the request is an ordinary
    one in flight: a second request, the end of the stream, fail_all."""
    core = ClientTransmission(neg(style))
    direct = core.direct_request(Cmd.FLUSH, 0, 0)
    assert direct is not None
    c = direct[0]
    c2 = core.request(Cmd.TRIM, 0, 512)
    assert c2 != c and core.in_flight == 2
    feed_buffer(core, success(style, c2, 0) + success(style, c, 0))
    first, second = core.next_event(), core.next_event()
    assert first is not None and first.cookie == c2 and first.command is Cmd.TRIM
    assert second is not None and second.cookie == c and second.command is Cmd.FLUSH
    eof = ClientTransmission(neg(style))
    assert eof.direct_request(Cmd.FLUSH, 0, 0) is not None
    with pytest.raises(ProtocolError):
        eof.buffer_updated(0)  # end of stream with the request in flight
    dead = ClientTransmission(neg(style))
    direct = dead.direct_request(Cmd.FLUSH, 0, 0)
    assert direct is not None
    assert dead.fail_all() == [direct[0]] and dead.in_flight == 0


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
    core2.disconnect()
    with pytest.raises(ConnectionClosed):
        core2.direct_request(Cmd.FLUSH, 0, 0)


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
    # No cookie was spent: the next request gets the first one.
    assert core.direct_request(Cmd.FLUSH, 0, 0) is not None
    fresh = ClientTransmission(neg(style))
    assert core.in_flight == 1 and fresh.request(Cmd.FLUSH, 0, 0) == core.fail_all()[0]
