"""Reads whose data comes back as new bytes (``ClientTransmission.read_bytes``).

Such a read has no buffer: a usual reply that is whole in the receive buffer is copied
out once; a usual reply whose header arrived but whose data did not, or any reply other
than the usual one, is assembled in a buffer of the read's own, into which
``receive_buffer`` then lets the data be received (one more copy at the end). Every
reply scenario of test_transmission runs here again with its reads queued this way, fed
through ``receive_buffer``/``buffer_updated`` in pieces of many sizes; the outcome must
be the same, data included. (A blocking driver that receives a read's data itself uses
``direct_read``: see test_read_fast_path.)
"""

from __future__ import annotations

import errno

import pytest

from pynbd.errors import ConnectionClosed, ProtocolError
from pynbd.proto.transmission import DIRECT_READ, ClientTransmission, Reply

from . import test_transmission as tt
from .test_read_fast_path import STYLES, lead, usual
from .test_transmission import R, feed_buffer, neg, pattern, simple


def hand_over(core: ClientTransmission, data: bytes, sizes: list[int]) -> None:
    """Deliver ``data`` through receive_buffer/buffer_updated, at most ``sizes`` bytes
    (cycled) at a time."""
    view = memoryview(data)
    i = 0
    while view:
        buf = core.receive_buffer()
        assert len(buf) > 0, "receive_buffer must never be empty"
        n = min(len(buf), len(view), max(1, sizes[i % len(sizes)]))
        i += 1
        buf[:n] = view[:n]
        core.buffer_updated(n)
        view = view[n:]


def big_read(style: str, length: int = DIRECT_READ) -> tuple[ClientTransmission, int, bytes]:
    """A read_bytes read whose usual header has arrived alone: the whole of its data
    goes to a buffer of its own."""
    core = ClientTransmission(neg(style))
    c = core.read_bytes(length, 4096)
    data = pattern(length)
    reply = usual(style, c, 4096, data)
    feed_buffer(core, reply[: lead(style)])
    assert len(core.receive_buffer()) == length and core.next_event() is None
    return core, c, data


def only_reply(core: ClientTransmission) -> Reply:
    reply = core.next_event()
    assert reply is not None and core.next_event() is None
    return reply


@pytest.mark.parametrize("style", STYLES)
def test_queues_the_same_request_as_read(style: str) -> None:
    a, b = ClientTransmission(neg(style)), ClientTransmission(neg(style))
    assert a.read(bytearray(512), 4096, 0) == b.read_bytes(512, 4096, 0)
    assert a.data_to_send() == b.data_to_send()


@pytest.mark.parametrize("style", STYLES)
def test_whole_reply_is_copied_out_once(style: str) -> None:
    core = ClientTransmission(neg(style))
    c = core.read_bytes(4096, 8192)
    feed_buffer(core, usual(style, c, 8192, pattern(4096)))
    reply = only_reply(core)
    assert reply.cookie == c and reply.error is None
    assert type(reply.data) is bytes and reply.data == pattern(4096)
    assert core.in_flight == 0


@pytest.mark.parametrize("style", STYLES)
def test_data_after_a_split_header_lands_in_its_own_buffer(style: str) -> None:
    """The data received in one go into the read's own buffer is the reply's data."""
    core, _, data = big_read(style)
    view = core.receive_buffer()
    view[:] = data
    assert core.buffer_updated(len(data)) is True
    reply = only_reply(core)
    assert type(reply.data) is bytes and reply.data == data
    assert core.in_flight == 0
    # The core is back to headers: a second read works as usual.
    c2 = core.read_bytes(100, 0)
    feed_buffer(core, usual(style, c2, 0, pattern(100, seed=3)))
    assert only_reply(core).data == pattern(100, seed=3)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("first", [1, 1000, DIRECT_READ - 1])
def test_data_in_pieces_is_assembled(style: str, first: int) -> None:
    """A short receive (a timeout, a signal): the rest goes to the rest of the buffer."""
    core, _, data = big_read(style)
    view = core.receive_buffer()
    view[:first] = data[:first]
    assert core.buffer_updated(first) is False
    view = core.receive_buffer()
    assert len(view) == DIRECT_READ - first
    view[:] = data[first:]
    assert core.buffer_updated(len(view)) is True
    reply = only_reply(core)
    assert reply.error is None and reply.data == data and type(reply.data) is bytes


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("sizes", [[1], [7], [5, 1000, 3], [1 << 30]])
def test_whole_reply_in_pieces(style: str, sizes: list[int]) -> None:
    """The usual reply of a small and of a big read, cut in pieces of many sizes."""
    for length in (300, DIRECT_READ):
        core = ClientTransmission(neg(style))
        c = core.read_bytes(length, 512)
        hand_over(core, usual(style, c, 512, pattern(length, seed=length)), sizes)
        reply = only_reply(core)
        assert reply.error is None and reply.data == pattern(length, seed=length)
        assert core.in_flight == 0


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("got", [0, 10])
def test_end_of_stream_in_the_middle_of_the_data(style: str, got: int) -> None:
    core, _, data = big_read(style)
    if got:
        core.receive_data(data[:got])
    with pytest.raises(ProtocolError):
        core.buffer_updated(0)
    assert core.closed and core.next_event() is None
    with pytest.raises(ConnectionClosed):
        core.receive_data(b"x")


def test_fail_all_forgets_the_read() -> None:
    core, c, data = big_read("extended")
    core.receive_data(data[:10])
    assert core.fail_all() == [c]
    assert core.in_flight == 0 and core.closed


@pytest.mark.parametrize("style", ["structured", "extended"])
def test_chunks_and_holes_are_assembled(style: str) -> None:
    core = ClientTransmission(neg(style))
    c = core.read_bytes(300, 0)
    r = R(style, c)
    reply = r.data(0, pattern(100)) + r.hole(100, 100) + r.data(200, pattern(100, 2), done=True)
    hand_over(core, reply, [7])
    got = only_reply(core)
    assert got.error is None and got.data == pattern(100) + bytes(100) + pattern(100, 2)


@pytest.mark.parametrize("style", ["structured", "extended"])
def test_error_chunk_gives_no_data(style: str) -> None:
    core = ClientTransmission(neg(style))
    c = core.read_bytes(DIRECT_READ, 0)
    core.receive_data(R(style, c).error(errno.EIO, "bad"))
    reply = only_reply(core)
    assert reply.error is not None and reply.error.errno == errno.EIO and reply.data is None


def test_simple_error_gives_no_data() -> None:
    core = ClientTransmission(neg("simple"))
    c = core.read_bytes(DIRECT_READ, 0)
    core.receive_data(simple(c, errno.EPERM))
    reply = only_reply(core)
    assert reply.error is not None and reply.error.errno == errno.EPERM and reply.data is None


@pytest.mark.parametrize("style", ["simple", "structured"])
def test_empty_read(style: str) -> None:
    core = ClientTransmission(neg(style))
    c = core.read_bytes(0, 0)
    core.receive_data(simple(c) if style == "simple" else R(style, c).none())
    assert only_reply(core).data == b""


@pytest.mark.parametrize("style", STYLES)
def test_bytewise(style: str) -> None:
    core = ClientTransmission(neg(style))
    c = core.read_bytes(300, 512)
    for byte in usual(style, c, 512, pattern(300)):
        core.receive_data(bytes([byte]))
    assert only_reply(core).data == pattern(300)


@pytest.mark.parametrize("style", STYLES)
def test_lying_length_never_completes(style: str) -> None:
    """A usual-looking header with a wrong cookie: no data."""
    core = ClientTransmission(neg(style))
    c = core.read_bytes(DIRECT_READ, 0)
    bad = usual(style, c + 1, 0, pattern(DIRECT_READ))
    with pytest.raises(ProtocolError):
        hand_over(core, bad, [1 << 30])
    assert core.next_event() is None and core.closed


# --- Every scenario of test_transmission, its reads detached --------------------------------


def run_detached(name: str, sizes: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """tt.run_scenario with tt.read() queuing read_bytes; each reply's data is copied
    into the buffer the scenario checks."""
    placeholders: dict[int, bytearray] = {}

    def read_bytes(
        core: ClientTransmission, offset: int, length: int, flags: int = 0
    ) -> tuple[int, bytearray]:
        cookie = core.read_bytes(length, offset, flags)
        placeholders[cookie] = buf = bytearray(b"\xff" * length)
        return cookie, buf

    monkeypatch.setattr(tt, "read", read_bytes)
    sc = tt.SCENARIOS[name]
    core = ClientTransmission(
        sc.negotiated() if sc.negotiated else neg(sc.style), buffer_size=sc.buffer_size
    )
    out = sc.build(core)
    core.buffers_to_send()
    replies: list[Reply] = []
    try:
        for pos in range(0, len(out.data), max(sizes[0], 1)):
            hand_over(core, out.data[pos : pos + max(sizes[0], 1)], sizes)
            while (reply := core.next_event()) is not None:
                replies.append(reply)
        if out.eof:
            core.receive_data(b"")
    except ProtocolError:
        assert out.fails, f"{name}: unexpected ProtocolError"
        replies += list(core.replies)
        for reply in replies:
            assert not (reply.cookie in out.doomed and reply.error is None), reply
        return
    assert not out.fails, f"{name}: no ProtocolError"
    for reply in replies:
        if reply.cookie in placeholders:
            assert (reply.data is None) == (reply.error is not None)
            if reply.data is not None:
                assert type(reply.data) is bytes
                placeholders[reply.cookie][:] = reply.data
    got = {r.cookie: (r.error.errno if r.error is not None else None) for r in replies}
    assert got == out.replies
    # A failed read has no data: what the scenario expects in its buffer is moot.
    failed = {id(placeholders[r.cookie]) for r in replies if r.error and r.cookie in placeholders}
    for buf, expected in out.buffers:
        if id(buf) not in failed:
            assert bytes(buf) == expected
    if out.check is not None:
        out.check(core, replies)


@pytest.mark.parametrize("sizes", [[1 << 30], [1], [5, 1000, 3]], ids=["whole", "bytes", "mixed"])
@pytest.mark.parametrize("name", sorted(tt.SCENARIOS))
def test_scenario_detached(name: str, sizes: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    run_detached(name, sizes, monkeypatch)
