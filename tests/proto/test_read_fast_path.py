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
from collections.abc import Callable, Iterable

import pytest

from pynbd.errors import ConnectionClosed, InvalidRequest, ProtocolError
from pynbd.proto.constants import Cmd, CmdFlag
from pynbd.proto.transmission import (
    DIRECT_DATA,
    DIRECT_DONE,
    DIRECT_OTHER,
    DIRECT_PARTIAL,
    DIRECT_READ,
    ClientTransmission,
)

from .test_transmission import SIZE, R, feed_buffer, neg, pattern, simple

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


# -- a driver that receives the usual reply itself (direct_read / direct_received) ------
#
# The core lends a room in its receive buffer: the usual reply's header and data for a
# read under DIRECT_READ bytes, its header alone for a bigger one. The driver receives
# into it and the core judges: DONE, DATA, PARTIAL, or OTHER (then the bytes are parsed
# in place by the general path, and the driver goes on with receive_buffer()).


def receive_direct(
    core: ClientTransmission, room: memoryview, reply: bytes, cuts: Iterable[int] = ()
) -> tuple[list[int], int]:
    """Receive ``reply`` into ``room`` as a blocking driver does: a piece up to each of
    ``cuts``, then up to the end of the room (or of ``reply``), asking
    direct_received() for the total after each piece and stopping at the first verdict
    other than DIRECT_PARTIAL. Returns the verdicts and how many bytes of ``reply``
    went into the room."""
    verdicts: list[int] = []
    n = 0
    for cut in [*cuts, len(room)]:
        end = min(cut, len(room), len(reply))
        if end <= n:
            continue
        room[n:end] = reply[n:end]
        n = end
        verdicts.append(core.direct_received(n))
        if verdicts[-1] != DIRECT_PARTIAL:
            break
    return verdicts, n


def first_difference(reply: bytes, lead_bytes: bytes) -> int:
    """Where a reply that is not the usual one leaves the usual reply's lead."""
    d = next(i for i, (a, b) in enumerate(zip(reply, lead_bytes, strict=False)) if a != b)
    return d


def judged_other(reply: bytes, lead_bytes: bytes, cut: int) -> list[int]:
    """The verdicts receive_direct(..., [cut]) must get for a reply that leaves the
    lead: PARTIAL while the first piece is a prefix of the lead, then OTHER."""
    return [DIRECT_PARTIAL] * (cut <= first_difference(reply, lead_bytes)) + [DIRECT_OTHER]


def room_size(style: str, length: int) -> int:
    """A direct read's room: the usual reply whole when small, its header when big."""
    return lead(style) + length if length < DIRECT_READ else lead(style)


def start_direct(
    style: str, length: int, detached: bool, offset: int = 4096
) -> tuple[ClientTransmission, bytearray, int, memoryview]:
    """A core with a direct read pending: (core, its buffer, cookie, room)."""
    core = ClientTransmission(neg(style))
    buf = bytearray(length)
    direct = core.direct_read(None if detached else memoryview(buf), length, offset)
    assert direct is not None
    cookie, _, room = direct
    return core, buf, cookie, room


def full_receive_buffer(core: ClientTransmission, style: str) -> None:
    """The core is back to headers with nothing buffered: all its buffer is offered."""
    assert len(core.receive_buffer()) == len(ClientTransmission(neg(style)).receive_buffer())


#: The calls a core refuses while a direct request is pending (with RuntimeError).
PENDING_CALLS: dict[str, Callable[[ClientTransmission], object]] = {
    "request": lambda core: core.request(Cmd.TRIM, 0, 512),
    "request-write": lambda core: core.request(Cmd.WRITE, 0, 3, payload=b"abc"),
    "request-read": lambda core: core.request(Cmd.READ, 0, 512, buffer=bytearray(512)),
    "read": lambda core: core.read(bytearray(512), 0),
    "read_bytes": lambda core: core.read_bytes(512, 0),
    "rollback": lambda core: core.rollback(0, []),
    "disconnect": lambda core: core.disconnect(),
    "receive_buffer": lambda core: core.receive_buffer(),
    "receive_data": lambda core: core.receive_data(b"x"),
    "buffer_updated": lambda core: core.buffer_updated(1),
}
#: Those whose refusal leaves the core exactly as it was. (disconnect() sets its
#: "disconnecting" mark and buffer_updated() counts the bytes before they raise.)
CLEAN_REFUSALS = sorted(PENDING_CALLS)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("detached", [False, True], ids=["into", "bytes"])
@pytest.mark.parametrize("length", [1, 4096, DIRECT_READ - 1, DIRECT_READ, 2 * DIRECT_READ])
def test_direct_read_room_and_usual_reply(style: str, detached: bool, length: int) -> None:
    core, buf, c, room = start_direct(style, length, detached)
    assert core.in_flight == 1
    # The request is read()'s, and it is the driver's to send: nothing is queued.
    other = ClientTransmission(neg(style))
    assert other.read(bytearray(length), 4096) == c
    assert core.data_to_send() == b""
    direct = ClientTransmission(neg(style)).direct_read(None, length, 4096)
    assert direct is not None and direct[1] == other.data_to_send()
    assert not room.readonly and len(room) == room_size(style, length)
    data = pattern(length)
    reply = usual(style, c, 4096, data)
    verdicts, n = receive_direct(core, room, reply)
    assert n == len(room)
    if length < DIRECT_READ:
        assert verdicts == [DIRECT_DONE]
        assert bytes(room[-length:]) == data  # the driver copies it out
        assert buf == bytes(length)  # the core did not
    else:
        assert verdicts == [DIRECT_DATA] and bytes(room) == reply[: lead(style)]
        assert core.in_flight == 1  # until the driver has the data
        core.direct_done(c)
    assert core.in_flight == 0 and core.next_event() is None
    with pytest.raises(ValueError):
        core.direct_done(c)  # finished already
    with pytest.raises(ValueError):
        core.direct_received(len(room))
    # The room is the start of the core's own receive buffer, all of it offered again.
    full_receive_buffer(core, style)
    core.receive_buffer()[:1] = b"!"
    assert room[:1] == b"!"
    # The stream goes on as usual afterwards, with a new cookie.
    buf2 = bytearray(DIRECT_READ)
    c2 = core.read(buf2, 0)
    assert c2 != c
    feed_buffer(core, usual(style, c2, 0, pattern(DIRECT_READ, seed=5)))
    got = core.next_event()
    assert got is not None and got.cookie == c2 and got.error is None
    assert bytes(buf2) == pattern(DIRECT_READ, seed=5)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("detached", [False, True], ids=["into", "bytes"])
@pytest.mark.parametrize("length", [300, DIRECT_READ])
def test_direct_read_usual_reply_in_pieces(style: str, detached: bool, length: int) -> None:
    """The usual reply cut anywhere inside the room: PARTIAL, then DONE or DATA; and
    one byte at a time."""
    data = pattern(length)
    final = DIRECT_DONE if length < DIRECT_READ else DIRECT_DATA
    for cuts in [[cut] for cut in range(1, room_size(style, length))] + [
        list(range(1, room_size(style, length)))
    ]:
        core, _, c, room = start_direct(style, length, detached)
        reply = usual(style, c, 4096, data)
        verdicts, n = receive_direct(core, room, reply, cuts)
        assert verdicts == [DIRECT_PARTIAL] * len(cuts) + [final], cuts
        assert n == len(room) and core.in_flight == (final == DIRECT_DATA)
        if final == DIRECT_DONE:
            assert bytes(room[-length:]) == data
        else:
            core.direct_done(c)
        assert core.in_flight == 0 and core.next_event() is None
        full_receive_buffer(core, style)


def other_replies(
    style: str, cookie: int, offset: int, length: int
) -> dict[str, tuple[bytes, int | None, bytes | None]]:
    """Replies to a read that are not its usual one: name -> (reply, the errno it
    fails with or None, the read's data when it succeeds)."""
    if style == "simple":
        return {"error": (simple(cookie, errno.EPERM), errno.EPERM, None)}
    r = R(style, cookie, offset)
    data = pattern(length)
    half = length // 2
    return {
        "error": (r.error(errno.EIO, "bad"), errno.EIO, None),
        "hole": (r.hole(offset, length, done=True), None, bytes(length)),
        "data-and-hole": (
            r.data(offset, data[:half]) + r.hole(offset + half, length - half, done=True),
            None,
            data[:half] + bytes(length - half),
        ),
        "short-chunks": (
            r.data(offset, data[:half]) + r.data(offset + half, data[half:], done=True),
            None,
            data,
        ),
        "data-then-none": (r.data(offset, data) + r.none(), None, data),
        "data-then-error": (
            r.data(offset, data[:half]) + r.error_offset(errno.EIO, offset + half, done=True),
            errno.EIO,
            None,
        ),
    }


OTHER_KINDS = [
    (style, kind)
    for style in STYLES
    for kind in other_replies(style, 1, 0, 2)  # the kinds each style has
]


@pytest.mark.parametrize(("style", "kind"), OTHER_KINDS)
@pytest.mark.parametrize("detached", [False, True], ids=["into", "bytes"])
@pytest.mark.parametrize("length", [512, DIRECT_READ])
def test_direct_read_other_reply_takes_the_general_path(
    style: str, kind: str, detached: bool, length: int
) -> None:
    """A reply that is not the usual one, received into the room cut at every byte of
    the lead and more: judged OTHER (after PARTIAL while it looked usual), then it
    completes through receive_buffer()/buffer_updated() exactly as through read() or
    read_bytes()."""
    offset = 4096
    size = room_size(style, length)
    for cut in sorted({*range(1, lead(style) + 2), size - 1, size}):
        core, buf, c, room = start_direct(style, length, detached, offset)
        reply, err, data = other_replies(style, c, offset, length)[kind]
        lead_bytes = usual(style, c, offset, pattern(length))[: lead(style)]
        verdicts, n = receive_direct(core, room, reply, [cut])
        assert verdicts == judged_other(reply, lead_bytes, cut), cut
        assert core.in_flight == 1 or n == len(reply)
        feed_buffer(core, reply[n:])
        got = core.next_event()
        assert got is not None and got.cookie == c and got.command is Cmd.READ
        assert core.next_event() is None and core.in_flight == 0
        if err is not None:
            assert got.error is not None and got.error.errno == err and got.data is None
        else:
            assert got.error is None
            if detached:
                assert type(got.data) is bytes and got.data == data
            else:
                assert got.data is None and bytes(buf) == data
        full_receive_buffer(core, style)
        with pytest.raises(ValueError):
            core.direct_done(c)  # it was never DIRECT_DATA


WRONG_READ_REPLIES: dict[str, tuple[list[str], Callable[[str, int, int], bytes]]] = {
    # name: (styles, reply to a read of 64 bytes at 4096 with the given cookie)
    "cookie": (STYLES, lambda style, c, length: usual(style, c + 1, 4096, pattern(length))),
    "lying-length": (
        ["structured", "extended"],
        lambda style, c, length: R(style, c, 4096).data(4096, pattern(length + 1), done=True),
    ),
    "data-offset": (
        ["structured", "extended"],
        lambda style, c, length: R(style, c, 4096).data(0, pattern(length), done=True),
    ),
    "echo": (
        ["extended"],
        lambda style, c, length: R(style, c, 0).data(4096, pattern(length), done=True),
    ),
    "simple-after-structured": (
        ["structured", "extended"],
        lambda style, c, length: simple(c, 0, pattern(length)),
    ),
    "bad-magic": (STYLES, lambda style, c, length: b"\x00" * 64),
}


@pytest.mark.parametrize(
    ("style", "name"),
    [(style, name) for name, (styles, _) in WRONG_READ_REPLIES.items() for style in styles],
)
@pytest.mark.parametrize("length", [64, DIRECT_READ])
@pytest.mark.parametrize("cut", [1, 5, 30])
def test_direct_read_wrong_reply_breaks_the_protocol(
    style: str, name: str, length: int, cut: int
) -> None:
    core, _, c, room = start_direct(style, length, True)
    reply = WRONG_READ_REPLIES[name][1](style, c, length)
    with pytest.raises(ProtocolError):
        verdicts, n = receive_direct(core, room, reply, [cut])
        assert verdicts[-1] == DIRECT_OTHER
        feed_buffer(core, reply[n:])
    assert core.closed and core.next_event() is None
    assert core.fail_all() == [c]


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("length", [512, DIRECT_READ])
@pytest.mark.parametrize("cut", [0, 1, 5])
def test_direct_read_end_of_stream(style: str, length: int, cut: int) -> None:
    """direct_received(0) is the end of the stream: the read was in flight."""
    core, _, c, room = start_direct(style, length, True)
    if cut:
        room[:cut] = usual(style, c, 4096, pattern(length))[:cut]
        assert core.direct_received(cut) == DIRECT_PARTIAL
    with pytest.raises(ProtocolError):
        core.direct_received(0)
    assert core.closed and core.next_event() is None
    assert core.fail_all() == [c] and core.in_flight == 0


@pytest.mark.parametrize("style", STYLES)
def test_direct_done_only_after_data(style: str) -> None:
    """direct_done() is refused, changing nothing, unless direct_received() said
    DIRECT_DATA for that very cookie; after DATA, direct_received() is refused."""
    length = DIRECT_READ
    with pytest.raises(ValueError):
        ClientTransmission(neg(style)).direct_done(1)  # nothing pending
    core, _, c, room = start_direct(style, length, True)
    reply = usual(style, c, 4096, pattern(length))
    with pytest.raises(ValueError):
        core.direct_done(c)  # nothing received yet
    room[:3] = reply[:3]
    assert core.direct_received(3) == DIRECT_PARTIAL
    with pytest.raises(ValueError):
        core.direct_done(c)  # only part of the header
    room[3:] = reply[3 : len(room)]
    assert core.direct_received(len(room)) == DIRECT_DATA
    with pytest.raises(ValueError):
        core.direct_done(c + 1)  # another cookie
    with pytest.raises(ValueError):
        core.direct_received(len(room))  # the data is the driver's now
    with pytest.raises(ValueError):
        core.direct_received(0)
    assert core.in_flight == 1 and not core.closed
    core.direct_done(c)
    assert core.in_flight == 0 and core.next_event() is None
    # A small read is over at DIRECT_DONE; an OTHER read is an ordinary one.
    core, _, c, room = start_direct(style, 512, True)
    assert receive_direct(core, room, usual(style, c, 4096, pattern(512)))[0] == [DIRECT_DONE]
    with pytest.raises(ValueError):
        core.direct_done(c)
    core, _, c, room = start_direct(style, length, True)
    bad = simple(c, errno.EIO) if style == "simple" else R(style, c, 4096).error(errno.EIO)
    verdicts, n = receive_direct(core, room, bad)
    assert verdicts[-1] == DIRECT_OTHER
    with pytest.raises(ValueError):
        core.direct_done(c)
    feed_buffer(core, bad[n:])
    got = core.next_event()
    assert got is not None and got.error is not None and got.error.errno == errno.EIO


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("stage", ["sent", "partial", "data"])
@pytest.mark.parametrize("call", sorted(PENDING_CALLS))
def test_direct_read_pending_refuses_other_calls(style: str, stage: str, call: str) -> None:
    length = DIRECT_READ
    core, _, c, room = start_direct(style, length, True)
    reply = usual(style, c, 4096, pattern(length))
    if stage != "sent":
        cut = 5 if stage == "partial" else len(room)
        room[:cut] = reply[:cut]
        assert core.direct_received(cut) == (DIRECT_PARTIAL if cut == 5 else DIRECT_DATA)
    with pytest.raises(RuntimeError):
        PENDING_CALLS[call](core)
    assert core.in_flight == 1 and core.buffers_to_send() == [] and core.next_event() is None
    if call not in CLEAN_REFUSALS:
        return
    assert core.direct_read(None, 512, 0) is None
    assert core.direct_request(Cmd.FLUSH, 0, 0) is None
    # The refusal changed nothing: the read finishes and the stream goes on.
    if stage != "data":
        assert receive_direct(core, room, reply, [5])[0][-1] == DIRECT_DATA
    core.direct_done(c)
    c2 = core.read_bytes(512, 0)
    feed_buffer(core, usual(style, c2, 0, pattern(512)))
    got = core.next_event()
    assert got is not None and got.cookie == c2 and got.data == pattern(512)
    full_receive_buffer(core, style)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("stage", ["sent", "partial", "data"])
def test_direct_read_fail_all(style: str, stage: str) -> None:
    core, _, c, room = start_direct(style, DIRECT_READ, True)
    reply = usual(style, c, 4096, pattern(DIRECT_READ))
    if stage != "sent":
        cut = 5 if stage == "partial" else len(room)
        room[:cut] = reply[:cut]
        core.direct_received(cut)
    assert core.fail_all() == [c]
    assert core.in_flight == 0 and core.closed
    with pytest.raises(ValueError):
        core.direct_done(c)
    with pytest.raises(ValueError):
        core.direct_received(len(room))
    with pytest.raises(ConnectionClosed):
        core.read_bytes(512, 0)


@pytest.mark.parametrize("style", STYLES)
def test_direct_read_other_then_other_requests_and_end(style: str) -> None:
    """After DIRECT_OTHER the read is an ordinary request in flight: a second request,
    the end of the stream, fail_all."""

    def started() -> tuple[ClientTransmission, int, bytes, int | None, bytes | None]:
        core, _, c, room = start_direct(style, DIRECT_READ, True, 0)
        kind = "error" if style == "simple" else "hole"
        reply, err, data = other_replies(style, c, 0, DIRECT_READ)[kind]
        # Less than the room: the general path has a reply begun, not whole.
        verdicts, n = receive_direct(core, room, reply[:10])
        assert verdicts == [DIRECT_OTHER] and core.in_flight == 1
        return core, c, reply[n:], err, data

    core, c, rest, err, data = started()
    c2 = core.read_bytes(512, 0)
    assert c2 != c and core.in_flight == 2
    feed_buffer(core, rest + usual(style, c2, 0, pattern(512)))
    first, second = core.next_event(), core.next_event()
    assert first is not None and first.cookie == c and first.data == data
    assert (first.error.errno if first.error else None) == err
    assert second is not None and second.cookie == c2 and second.data == pattern(512)
    core, c, _, _, _ = started()
    with pytest.raises(ProtocolError):
        core.buffer_updated(0)  # end of stream with the read in flight
    core, c, _, _, _ = started()
    assert core.fail_all() == [c] and core.in_flight == 0


@pytest.mark.parametrize("style", STYLES)
def test_no_direct_read_unless_alone_and_nothing_buffered(style: str) -> None:
    buf = memoryview(bytearray(DIRECT_READ))
    core = ClientTransmission(neg(style))
    b = core.read(bytearray(512), 0)
    assert core.direct_read(buf, DIRECT_READ, 0) is None  # another is in flight
    assert core.in_flight == 1 and len(core.buffers_to_send()) == 1  # nothing queued
    feed_buffer(core, usual(style, b, 0, pattern(512))[:5])
    assert core.direct_read(buf, DIRECT_READ, 0) is None  # a reply is half received
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
    assert core3.direct_read(None, 512, 0) is None
    with pytest.raises(InvalidRequest):
        ClientTransmission(neg(style)).direct_read(buf[:100], DIRECT_READ, 0)  # wrong size
    with pytest.raises(InvalidRequest):
        ClientTransmission(neg(style)).direct_read(buf.toreadonly(), DIRECT_READ, 0)
    with pytest.raises(InvalidRequest):
        ClientTransmission(neg(style)).direct_read(None, 512, SIZE)  # past the end
    closed = ClientTransmission(neg(style))
    closed.disconnect()
    with pytest.raises(ConnectionClosed):
        closed.direct_read(None, 512, 0)


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


def test_direct_read_with_a_receive_buffer_too_small_for_the_reply() -> None:
    """A core made with a small receive buffer lends room for the header only, and the
    data follows it as a big read's does (DIRECT_DATA)."""
    core = ClientTransmission(neg("structured"), buffer_size=64)
    direct = core.direct_read(None, 4096, 0)
    assert direct is not None
    c, _, room = direct
    head = usual("structured", c, 0, pattern(4096))[: len(room)]
    assert len(room) == 28
    room[:] = head
    assert core.direct_received(len(room)) == DIRECT_DATA
    core.direct_done(c)
    assert core.in_flight == 0


def test_refused_disconnect_and_buffer_updated_change_nothing() -> None:
    core = ClientTransmission(neg("simple"))
    direct = core.direct_request(Cmd.FLUSH, 0, 0)
    assert direct is not None
    c, _, room = direct
    with pytest.raises(RuntimeError):
        core.disconnect()
    with pytest.raises(RuntimeError):
        core.buffer_updated(5)
    room[:] = simple(c)
    assert core.direct_received(16) == DIRECT_DONE
    c2 = core.request(Cmd.FLUSH, 0, 0)
    feed_buffer(core, simple(c2))  # no stale bytes before it
    got = core.next_event()
    assert got is not None and got.cookie == c2 and got.error is None
    core.disconnect()
    assert core.buffers_to_send() != []  # NBD_CMD_DISC is queued


def test_direct_received_refuses_counts_outside_the_room() -> None:
    core = ClientTransmission(neg("simple"))
    direct = core.direct_request(Cmd.FLUSH, 0, 0)
    assert direct is not None
    c, _, room = direct
    for bad in (-1, len(room) + 1):
        with pytest.raises(ValueError):
            core.direct_received(bad)
    room[:] = simple(c)
    assert core.direct_received(16) == DIRECT_DONE
    with pytest.raises(ValueError):
        core.direct_received(-1)  # nothing is lent any more
