"""The read fast path of the client transmission core (pynbd.proto.transmission).

A read's usual reply (one OFFSET_DATA chunk with DONE covering it, or a simple reply
without error) is matched byte for byte against the header it must have and completed
in one step; anything else must take the general path, with every rule checked. Each
test here gives the core a reply that starts like the usual one and then differs, or
arrives in pieces, and checks that the outcome is exactly the general path's.
"""

from __future__ import annotations

import errno
import struct

import pytest

from pynbd.errors import InvalidRequest, ProtocolError
from pynbd.proto.constants import Cmd, CmdFlag
from pynbd.proto.transmission import DIRECT_READ, ClientTransmission

from .test_transmission import R, feed_buffer, neg, pattern, simple

STYLES = ["simple", "structured", "extended"]


def usual(style: str, cookie: int, offset: int, data: bytes) -> bytes:
    """The usual reply of a read of ``data`` at ``offset``."""
    if style == "simple":
        return simple(cookie, 0, data)
    return R(style, cookie, offset).data(offset, data, done=True)


def lead(style: str) -> int:
    """The bytes before a usual reply's data."""
    return {"simple": 16, "structured": 28, "extended": 40}[style]


@pytest.mark.parametrize("style", STYLES)
def test_read_matches_request(style: str) -> None:
    """read() queues exactly the bytes request(Cmd.READ, ...) does."""
    a, b = ClientTransmission(neg(style)), ClientTransmission(neg(style))
    ca = a.read(bytearray(512), 4096)
    cb = b.request(Cmd.READ, 4096, 512, buffer=bytearray(512))
    assert ca == cb
    assert a.data_to_send() == b.data_to_send()


@pytest.mark.parametrize("style", STYLES)
def test_whole_reply_completes_at_once(style: str) -> None:
    core = ClientTransmission(neg(style))
    buf = bytearray(4096)
    c = core.read(buf, 8192)
    reply = usual(style, c, 8192, pattern(4096))
    view = core.receive_buffer()
    view[: len(reply)] = reply
    assert core.buffer_updated(len(reply)) is True
    got = core.next_event()
    assert got is not None and got.cookie == c and got.error is None
    assert buf == pattern(4096) and core.in_flight == 0


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("detached", [False, True])
def test_rest_of_big_payload_lands_in_callers_buffer(style: str, detached: bool) -> None:
    """Once a big read's usual header is in, the rest of the data is received into the
    caller's buffer itself (or, for read_bytes, one buffer of the read's own)."""
    core = ClientTransmission(neg(style))
    length = DIRECT_READ
    buf = bytearray(length)
    c = core.read_bytes(length, 0) if detached else core.read(buf, 0)
    data = pattern(length)
    reply = usual(style, c, 0, data)
    feed_buffer(core, reply[: lead(style) + 10])
    view = core.receive_buffer()
    assert len(view) == length - 10
    view[:] = data[10:]
    assert core.buffer_updated(length - 10) is True
    got = core.next_event()
    assert got is not None and got.error is None
    if detached:
        assert got.data == data
    else:
        assert buf == data
        view[:1] = b"!"  # the caller's buffer itself
        assert buf[10:11] == b"!"


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("detached", [False, True])
@pytest.mark.parametrize("split", [1, 15, 16, 30, 100, 4000])
def test_small_reply_in_pieces_waits_in_receive_buffer(
    style: str, detached: bool, split: int
) -> None:
    """A small read's usual reply that arrives in two pieces is completed when the
    second piece is in, from the receive buffer, with the data of both."""
    core = ClientTransmission(neg(style))
    length = 4096
    buf = bytearray(length)
    c = core.read_bytes(length, 0) if detached else core.read(buf, 0)
    c2 = core.read_bytes(512, 8192)
    data = pattern(length)
    reply = usual(style, c, 0, data) + usual(style, c2, 8192, pattern(512))
    assert core.buffer_updated(_put(core, reply[:split])) is False
    assert core.next_event() is None and core.in_flight == 2
    assert core.buffer_updated(_put(core, reply[split:])) is True
    got = core.next_event()
    assert got is not None and got.cookie == c and got.error is None
    assert (got.data if detached else buf) == data
    second = core.next_event()
    assert second is not None and second.cookie == c2 and second.data == pattern(512)
    assert core.in_flight == 0


def _put(core: ClientTransmission, data: bytes) -> int:
    """Copy ``data`` into the core's receive buffer (it fits); return its length."""
    view = core.receive_buffer()
    assert len(view) >= len(data)
    view[: len(data)] = data
    return len(data)


@pytest.mark.parametrize("style", ["structured", "extended"])
def test_lying_length_takes_the_general_path(style: str) -> None:
    """A header like the usual one but with a longer chunk is a protocol error."""
    core = ClientTransmission(neg(style))
    c = core.read(bytearray(100), 0)
    with pytest.raises(ProtocolError):
        core.receive_data(R(style, c).data(0, pattern(101), done=True))


@pytest.mark.parametrize("style", ["structured", "extended"])
def test_shorter_chunk_then_hole(style: str) -> None:
    """Several chunks: data without DONE, then a hole with DONE; all checked."""
    core = ClientTransmission(neg(style))
    buf = bytearray(b"\xff" * 200)
    c = core.read(buf, 0)
    r = R(style, c)
    core.receive_data(r.data(0, pattern(100)) + r.hole(100, 100, done=True))
    got = core.next_event()
    assert got is not None and got.error is None
    assert buf == pattern(100) + bytes(100)


@pytest.mark.parametrize("style", ["structured", "extended"])
def test_data_chunk_after_a_chunk_does_not_complete_twice(style: str) -> None:
    """A chunk covering the whole read, after another chunk of it: overlap."""
    core = ClientTransmission(neg(style))
    c = core.read(bytearray(200), 0)
    r = R(style, c)
    with pytest.raises(ProtocolError):
        core.receive_data(r.hole(0, 100) + r.data(0, pattern(200), done=True))


@pytest.mark.parametrize("style", ["structured", "extended"])
def test_error_chunk(style: str) -> None:
    core = ClientTransmission(neg(style))
    c = core.read(bytearray(64), 0)
    core.receive_data(R(style, c).error(errno.EIO, "bad"))
    got = core.next_event()
    assert got is not None and got.error is not None and got.error.errno == errno.EIO


def test_simple_error_reply() -> None:
    core = ClientTransmission(neg("simple"))
    c = core.read(bytearray(64), 0)
    core.receive_data(simple(c, errno.EPERM))
    got = core.next_event()
    assert got is not None and got.error is not None and got.error.errno == errno.EPERM


@pytest.mark.parametrize("style", STYLES)
def test_wrong_cookie(style: str) -> None:
    core = ClientTransmission(neg(style))
    c = core.read(bytearray(64), 0)
    with pytest.raises(ProtocolError):
        core.receive_data(usual(style, c + 1, 0, pattern(64)))


def test_wrong_offset() -> None:
    """The data offset must be the read's: else the general path judges the chunk."""
    core = ClientTransmission(neg("structured"))
    c = core.read(bytearray(64), 4096)
    with pytest.raises(ProtocolError):
        core.receive_data(R("structured", c).data(0, pattern(64), done=True))


def test_extended_header_offset_must_echo() -> None:
    core = ClientTransmission(neg("extended"))
    c = core.read(bytearray(64), 4096)
    wrong_echo = R("extended", c, offset=0).data(4096, pattern(64), done=True)
    with pytest.raises(ProtocolError):
        core.receive_data(wrong_echo)


def test_simple_reply_to_read_after_structured() -> None:
    core = ClientTransmission(neg("structured"))
    c = core.read(bytearray(64), 0)
    with pytest.raises(ProtocolError):
        core.receive_data(simple(c, 0, pattern(64)))


def test_df_read_still_uses_the_fast_path() -> None:
    core = ClientTransmission(neg("structured"))
    buf = bytearray(64)
    c = core.read(buf, 0, int(CmdFlag.DF))
    core.receive_data(usual("structured", c, 0, pattern(64)))
    got = core.next_event()
    assert got is not None and got.error is None and buf == pattern(64)


def test_replies_out_of_order_in_one_buffer() -> None:
    """Several usual replies in one recv, in another order than sent."""
    core = ClientTransmission(neg("structured"))
    bufs = [bytearray(100) for _ in range(4)]
    cookies = [core.read(b, i * 100) for i, b in enumerate(bufs)]
    data = b"".join(
        usual("structured", cookies[i], i * 100, pattern(100, seed=i)) for i in (2, 0, 3, 1)
    )
    feed_buffer(core, data)
    assert [r.cookie for r in core.replies] == [cookies[i] for i in (2, 0, 3, 1)]
    for i, b in enumerate(bufs):
        assert b == pattern(100, seed=i)


def test_empty_read_takes_the_general_path() -> None:
    """No usual reply for 0 bytes: OFFSET_DATA needs at least one byte."""
    core = ClientTransmission(neg("structured"))
    c = core.read(bytearray(0), 0)
    with pytest.raises(ProtocolError):
        core.receive_data(R("structured", c).raw(1, struct.pack(">Q", 0), done=True))


def test_bytewise_usual_reply() -> None:
    core = ClientTransmission(neg("extended"))
    buf = bytearray(300)
    c = core.read(buf, 512)
    for byte in usual("extended", c, 512, pattern(300)):
        core.receive_data(bytes([byte]))
    got = core.next_event()
    assert got is not None and got.error is None and buf == pattern(300)


# -- a driver that receives the usual reply itself (direct_read / direct_done) ----------


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("detached", [False, True], ids=["into", "bytes"])
@pytest.mark.parametrize("length", [1, 4096, DIRECT_READ])
def test_direct_read_lead_is_the_usual_replys_header(
    style: str, detached: bool, length: int
) -> None:
    core = ClientTransmission(neg(style))
    buf = bytearray(DIRECT_READ)
    direct = core.direct_read(None if detached else memoryview(buf)[:length], length, 4096)
    assert direct is not None
    c, request, lead_bytes = direct
    assert core.in_flight == 1
    # The request is read()'s, and it is the driver's to send: nothing is queued.
    other = ClientTransmission(neg(style))
    assert other.read(bytearray(length), 4096) == c
    assert request == other.data_to_send()
    assert core.data_to_send() == b""
    assert lead_bytes == usual(style, c, 4096, pattern(length))[: lead(style)]
    core.direct_done(c)
    assert core.in_flight == 0 and core.next_event() is None
    with pytest.raises(ValueError):
        core.direct_done(c)  # finished already
    # The stream goes on as usual afterwards, with a new cookie.
    c2 = core.read(buf, 0)
    assert c2 != c
    feed_buffer(core, usual(style, c2, 0, pattern(DIRECT_READ)))
    reply = core.next_event()
    assert reply is not None and reply.cookie == c2 and reply.error is None
    assert bytes(buf) == pattern(DIRECT_READ)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("detached", [False, True], ids=["into", "bytes"])
@pytest.mark.parametrize("split", [1, 5, "lead", "lead+10"])
@pytest.mark.parametrize("length", [512, DIRECT_READ])
def test_direct_read_handed_back_takes_the_general_path(
    style: str, detached: bool, split: int | str, length: int
) -> None:
    """A driver that hands the reply to the core (the lead did not match, or came
    short) gets exactly what read() or read_bytes() would have given, and the core is
    left as it was: its whole receive buffer is offered again."""
    core = ClientTransmission(neg(style))
    buf = bytearray(length)
    direct = core.direct_read(None if detached else memoryview(buf), length, 0)
    assert direct is not None
    c = direct[0]
    data = pattern(length)
    reply = usual(style, c, 0, data)
    cut = {"lead": lead(style), "lead+10": lead(style) + 10}.get(str(split), split)
    assert isinstance(cut, int)
    core.receive_data(reply[:cut])
    core.receive_data(reply[cut:])
    got = core.next_event()
    assert got is not None and got.cookie == c and got.error is None
    assert (got.data if detached else bytes(buf)) == data
    assert core.in_flight == 0
    assert len(core.receive_buffer()) == len(ClientTransmission(neg(style)).receive_buffer())


@pytest.mark.parametrize("style", ["structured", "extended"])
def test_direct_read_error_reply(style: str) -> None:
    core = ClientTransmission(neg(style))
    direct = core.direct_read(memoryview(bytearray(DIRECT_READ)), DIRECT_READ, 0)
    assert direct is not None
    core.receive_data(R(style, direct[0]).error(errno.EIO, "bad"))
    got = core.next_event()
    assert got is not None and got.error is not None and got.error.errno == errno.EIO


@pytest.mark.parametrize("style", STYLES)
def test_direct_read_then_other_requests_and_end(style: str) -> None:
    """Whatever the driver does next besides direct_done, the read is an ordinary
    request in flight: a second request, the end of the stream, fail_all."""
    core = ClientTransmission(neg(style))
    direct = core.direct_read(None, DIRECT_READ, 0)
    assert direct is not None
    c = direct[0]
    c2 = core.read_bytes(512, 0)
    assert c2 != c and core.in_flight == 2
    feed_buffer(core, usual(style, c, 0, pattern(DIRECT_READ)) + usual(style, c2, 0, pattern(512)))
    first, second = core.next_event(), core.next_event()
    assert first is not None and first.cookie == c and first.data == pattern(DIRECT_READ)
    assert second is not None and second.cookie == c2
    eof = ClientTransmission(neg(style))
    assert eof.direct_read(None, DIRECT_READ, 0) is not None
    with pytest.raises(ProtocolError):
        eof.buffer_updated(0)  # end of stream with the read in flight
    dead = ClientTransmission(neg(style))
    direct = dead.direct_read(None, DIRECT_READ, 0)
    assert direct is not None
    assert dead.fail_all() == [direct[0]] and dead.in_flight == 0


@pytest.mark.parametrize("style", STYLES)
def test_no_direct_read_unless_alone_and_nothing_buffered(style: str) -> None:
    buf = memoryview(bytearray(DIRECT_READ))
    core = ClientTransmission(neg(style))
    b = core.read(bytearray(512), 0)
    assert core.direct_read(buf, DIRECT_READ, 0) is None  # another is in flight
    assert core.in_flight == 1 and len(core.buffers_to_send()) == 1  # nothing queued
    feed_buffer(core, usual(style, b, 0, pattern(512))[:5])
    core.receive_data(usual(style, b, 0, pattern(512))[5:])
    assert core.next_event() is not None and core.in_flight == 0
    core2 = ClientTransmission(neg(style))
    c = core2.read(bytearray(512), 0)
    feed_buffer(core2, usual(style, c, 0, pattern(512)) + b"\x67")
    assert core2.next_event() is not None and core2.in_flight == 0
    assert core2.direct_read(buf, DIRECT_READ, 0) is None  # a received byte is buffered
    core3 = ClientTransmission(neg(style))
    assert core3.direct_read(buf[:0], 0, 0) is None  # an empty read has no data chunk
    assert core3.in_flight == 0 and core3.buffers_to_send() == []  # nothing queued
    assert core3.direct_read(None, DIRECT_READ, 0) is not None
    assert core3.direct_read(None, DIRECT_READ, 0) is None  # one is pending already
    with pytest.raises(InvalidRequest):
        ClientTransmission(neg(style)).direct_read(buf[:100], DIRECT_READ, 0)  # wrong size


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("detached", [False, True], ids=["into", "bytes"])
def test_small_reply_bigger_than_the_receive_buffer(style: str, detached: bool) -> None:
    """A small read's reply that cannot fit in the receive buffer does not wait there
    (receive_buffer would be empty): it goes on through the read's own buffer."""
    core = ClientTransmission(neg(style), buffer_size=64)
    buf = bytearray(4096)
    c = core.read_bytes(4096, 0) if detached else core.read(buf, 0)
    data = pattern(4096)
    feed_buffer(core, usual(style, c, 0, data))
    got = core.next_event()
    assert got is not None and got.cookie == c and got.error is None
    assert (got.data if detached else bytes(buf)) == data
