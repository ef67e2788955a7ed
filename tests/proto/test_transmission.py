"""The client transmission core (pynbd.proto.transmission).

Requests are checked against hand-written bytes from the spec's "Request message"
layout. Replies are built here with ``struct`` from the "Simple reply message",
"Structured reply chunk message", "Extended reply chunk message" and "Structured reply
types" sections, and every reply scenario is fed four ways (whole and one byte at a
time, through ``receive_data`` and through ``receive_buffer``/``buffer_updated``) plus
random splits from Hypothesis. A read's data must land in the caller's buffer, exact;
a broken reply must never complete a read successfully.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pynbd.errors import (
    ConnectionClosed,
    InvalidRequest,
    NBDError,
    ProtocolError,
    UnsupportedError,
)
from pynbd.proto.constants import BASE_ALLOCATION, Cmd, CmdFlag, TransmissionFlag
from pynbd.proto.handshake import Negotiated
from pynbd.proto.records import Extent
from pynbd.proto.transmission import DIRECT_READ, ClientTransmission, Reply, split_range

TF = TransmissionFlag
ALL_FLAGS = (
    TF.HAS_FLAGS
    | TF.SEND_FLUSH
    | TF.SEND_FUA
    | TF.SEND_TRIM
    | TF.SEND_WRITE_ZEROES
    | TF.SEND_DF
    | TF.SEND_CACHE
    | TF.SEND_FAST_ZERO
)
SIZE = 1 << 20
DIRTY = "qemu:dirty-bitmap:b"


def h(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


def neg(
    style: str = "structured",
    *,
    flags: int = ALL_FLAGS,
    size: int = SIZE,
    contexts: dict[str, int] | None = None,
    block: tuple[int, int, int] | None = None,
) -> Negotiated:
    """A Negotiated as the handshake would leave it: "simple", "structured", "extended"."""
    if contexts is None:
        contexts = {} if style == "simple" else {BASE_ALLOCATION: 1}
    n = Negotiated(
        size=size,
        flags=TransmissionFlag(flags),
        structured_replies=style != "simple",
        extended_headers=style == "extended",
        meta_contexts=dict(contexts),
        in_transmission=True,
    )
    if block is not None:
        n.minimum_block, n.preferred_block, n.maximum_payload = block
        n.block_size_advertised = True
    return n


# --- replies, built by hand ----------------------------------------------------------------


def simple(cookie: int, error: int = 0, data: bytes = b"") -> bytes:
    return struct.pack(">IIQ", 0x67446698, error, cookie) + data


@dataclass
class R:
    """Chunks of the reply to one request (``offset`` is the request's, echoed by
    extended headers)."""

    style: str
    cookie: int
    offset: int = 0

    def raw(self, type_: int, payload: bytes, done: bool = False, flags: int = 0) -> bytes:
        flags |= 1 if done else 0
        if self.style == "extended":
            head = struct.pack(
                ">IHHQQQ", 0x6E8A278C, flags, type_, self.cookie, self.offset, len(payload)
            )
        else:
            head = struct.pack(">IHHQI", 0x668E33EF, flags, type_, self.cookie, len(payload))
        return head + payload

    def none(self) -> bytes:
        return self.raw(0, b"", done=True)

    def data(self, offset: int, data: bytes, done: bool = False) -> bytes:
        return self.raw(1, struct.pack(">Q", offset) + data, done)

    def hole(self, offset: int, size: int, done: bool = False) -> bytes:
        return self.raw(2, struct.pack(">QI", offset, size), done)

    def error(self, err: int, msg: str = "", done: bool = True, type_: int = 0x8001) -> bytes:
        m = msg.encode()
        return self.raw(type_, struct.pack(">IH", err, len(m)) + m, done)

    def error_offset(self, err: int, offset: int, msg: str = "", done: bool = True) -> bytes:
        m = msg.encode()
        return self.raw(
            0x8002, struct.pack(">IH", err, len(m)) + m + struct.pack(">Q", offset), done
        )

    def bs(self, cid: int, extents: list[tuple[int, int]], done: bool = False) -> bytes:
        payload = struct.pack(">I", cid) + b"".join(struct.pack(">II", *e) for e in extents)
        return self.raw(5, payload, done)

    def bs_ext(self, cid: int, extents: list[tuple[int, int]], done: bool = False) -> bytes:
        payload = struct.pack(">II", cid, len(extents))
        payload += b"".join(struct.pack(">QQ", *e) for e in extents)
        return self.raw(6, payload, done)


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


# --- feeding ------------------------------------------------------------------------------


def feed_buffer(core: ClientTransmission, piece: bytes) -> None:
    """Deliver ``piece`` as a BufferedProtocol driver would."""
    view = memoryview(piece)
    while view:
        buf = core.receive_buffer()
        assert len(buf) > 0, "receive_buffer must never be empty"
        n = min(len(buf), len(view))
        buf[:n] = view[:n]
        view = view[n:]
        core.buffer_updated(n)


def feed(
    core: ClientTransmission,
    data: bytes,
    sizes: list[int],
    via_buffer: list[bool],
    replies: list[Reply],
) -> None:
    """Feed ``data`` in pieces of ``sizes`` (cycled), alternating methods per piece."""
    pos = i = 0
    while pos < len(data):
        n = max(1, sizes[i % len(sizes)])
        piece = data[pos : pos + n]
        pos += n
        if via_buffer[i % len(via_buffer)]:
            feed_buffer(core, piece)
        else:
            core.receive_data(piece)
        i += 1
        while (reply := core.next_event()) is not None:
            replies.append(reply)


MODES = {
    "data-whole": ([1 << 30], [False]),
    "data-bytewise": ([1], [False]),
    "buffer-whole": ([1 << 30], [True]),
    "buffer-bytewise": ([1], [True]),
}


# --- scenarios ------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What a scenario expects: replies (cookie -> errno or None) and buffers' contents,
    or a ProtocolError, with the cookies that must then never complete successfully."""

    data: bytes
    replies: dict[int, int | None] = field(default_factory=dict)
    buffers: list[tuple[bytearray, bytes]] = field(default_factory=list)
    extents: dict[int, dict[str, tuple[Extent, ...]]] = field(default_factory=dict)
    fails: bool = False
    doomed: tuple[int, ...] = ()
    eof: bool = False
    check: Callable[[ClientTransmission, list[Reply]], None] | None = None


@dataclass
class Scenario:
    style: str
    build: Callable[[ClientTransmission], Outcome]
    negotiated: Callable[[], Negotiated] | None = None
    buffer_size: int = 128 * 1024


SCENARIOS: dict[str, Scenario] = {}


def scenario(
    style: str,
    *,
    negotiated: Callable[[], Negotiated] | None = None,
    buffer_size: int = 128 * 1024,
) -> Callable[[Callable[[ClientTransmission], Outcome]], Callable[[ClientTransmission], Outcome]]:
    def register(fn: Callable[[ClientTransmission], Outcome]) -> Callable[..., Outcome]:
        SCENARIOS[fn.__name__] = Scenario(style, fn, negotiated, buffer_size)
        return fn

    return register


def read(
    core: ClientTransmission, offset: int, length: int, flags: int = 0
) -> tuple[int, bytearray]:
    # Pre-filled with 0xff so that a hole that is not zero-filled, or a byte never
    # written, shows.
    buf = bytearray(b"\xff" * length)
    return core.request(Cmd.READ, offset, length, flags, buffer=buf), buf


@scenario("simple")
def simple_read(core: ClientTransmission) -> Outcome:
    c, buf = read(core, 4096, 1000)
    payload = pattern(1000)
    return Outcome(simple(c, 0, payload), {c: None}, [(buf, payload)])


@scenario("simple")
def simple_reads_out_of_order(core: ClientTransmission) -> Outcome:
    c1, b1 = read(core, 0, 512)
    c2, b2 = read(core, 512, 512)
    w = core.request(Cmd.WRITE, 0, 3, payload=b"abc")
    data = simple(w) + simple(c2, 0, pattern(512, 2)) + simple(c1, 0, pattern(512, 1))
    return Outcome(
        data, {c1: None, c2: None, w: None}, [(b1, pattern(512, 1)), (b2, pattern(512, 2))]
    )


@scenario("simple")
def simple_read_error(core: ClientTransmission) -> Outcome:
    c, buf = read(core, 0, 512)
    f = core.request(Cmd.FLUSH, 0, 0)
    # An error reply carries no payload: the next reply header follows at once.
    return Outcome(simple(c, 5) + simple(f), {c: errno.EIO, f: None}, [(buf, b"\xff" * 512)])


@scenario("simple")
def simple_errno_mapping(core: ClientTransmission) -> Outcome:
    cookies = [core.request(Cmd.FLUSH, 0, 0) for _ in range(9)]
    wire = [1, 5, 12, 22, 28, 75, 95, 9999, 2]  # 9999 and ENOENT are not NBD errors
    local = [
        errno.EPERM, errno.EIO, errno.ENOMEM, errno.EINVAL, errno.ENOSPC,
        errno.EOVERFLOW, errno.ENOTSUP, errno.EINVAL, errno.EINVAL,
    ]  # fmt: skip
    data = b"".join(simple(c, e) for c, e in zip(cookies, wire, strict=True))
    return Outcome(data, dict(zip(cookies, local, strict=True)))


@scenario("simple")
def simple_eshutdown(core: ClientTransmission) -> Outcome:
    c = core.request(Cmd.FLUSH, 0, 0)

    def check(core: ClientTransmission, replies: list[Reply]) -> None:
        assert core.shutdown_requested

    return Outcome(simple(c, 108), {c: errno.ESHUTDOWN}, check=check)


@scenario("structured")
def simple_reply_to_write_under_structured(core: ClientTransmission) -> Outcome:
    w = core.request(Cmd.WRITE, 0, 2, payload=b"hi")
    t = core.request(Cmd.TRIM, 0, 512)
    return Outcome(simple(w) + simple(t, 1), {w: None, t: errno.EPERM})


@scenario("structured")
def structured_read_out_of_order(core: ClientTransmission) -> Outcome:
    c, buf = read(core, 8192, 4096)
    r = R("structured", c)
    data = (
        r.data(8192 + 2048, pattern(2048, 3))
        + r.data(8192, pattern(1024, 4))
        + r.hole(8192 + 1024, 1024)
        + r.none()
    )
    expect = pattern(1024, 4) + bytes(1024) + pattern(2048, 3)
    return Outcome(data, {c: None}, [(buf, expect)])


@scenario("extended")
def extended_read_out_of_order(core: ClientTransmission) -> Outcome:
    c, buf = read(core, 8192, 4096)
    r = R("extended", c, 8192)
    data = (
        r.hole(8192 + 3072, 1024)
        + r.data(8192 + 1024, pattern(2048, 5))
        + r.data(8192, pattern(1024, 6), done=False)
        + r.none()
    )
    expect = pattern(1024, 6) + pattern(2048, 5) + bytes(1024)
    return Outcome(data, {c: None}, [(buf, expect)])


@scenario("structured")
def structured_reads_interleaved(core: ClientTransmission) -> Outcome:
    c1, b1 = read(core, 0, 2048)
    c2, b2 = read(core, 4096, 1024)
    r1, r2 = R("structured", c1), R("structured", c2)
    data = (
        r1.data(1024, pattern(1024, 1))
        + r2.hole(4096, 1024, done=True)
        + r1.data(0, pattern(1024, 2), done=True)
    )
    return Outcome(
        data, {c1: None, c2: None}, [(b1, pattern(1024, 2) + pattern(1024, 1)), (b2, bytes(1024))]
    )


@scenario("structured")
def structured_read_single_chunk_done(core: ClientTransmission) -> Outcome:
    c, buf = read(core, 512, 512, CmdFlag.DF)
    return Outcome(
        R("structured", c).data(512, pattern(512), done=True), {c: None}, [(buf, pattern(512))]
    )


@scenario("structured")
def structured_read_all_hole(core: ClientTransmission) -> Outcome:
    c, buf = read(core, 0, 65536)
    return Outcome(R("structured", c).hole(0, 65536, done=True), {c: None}, [(buf, bytes(65536))])


@scenario("structured")
def structured_read_zero_length(core: ClientTransmission) -> Outcome:
    c, _ = read(core, 0, 0)
    return Outcome(R("structured", c).none(), {c: None})


@scenario("structured")
def structured_none_for_write(core: ClientTransmission) -> Outcome:
    w = core.request(Cmd.WRITE, 0, 4, payload=b"abcd")
    z = core.request(Cmd.WRITE_ZEROES, 0, 4096, CmdFlag.NO_HOLE)
    return Outcome(R("structured", w).none() + R("structured", z).none(), {w: None, z: None})


@scenario("extended")
def extended_none_for_flush(core: ClientTransmission) -> Outcome:
    f = core.request(Cmd.FLUSH, 0, 0)
    c = core.request(Cmd.CACHE, 4096, 4096)
    return Outcome(R("extended", f).none() + R("extended", c, 4096).none(), {f: None, c: None})


@scenario("structured")
def structured_error_chunk(core: ClientTransmission) -> Outcome:
    c, _ = read(core, 0, 1024)
    r = R("structured", c)
    data = r.data(0, pattern(512), done=False) + r.error(5, "disk on fire", done=True)

    def check(core: ClientTransmission, replies: list[Reply]) -> None:
        err = replies[0].error
        assert err is not None and err.message == "disk on fire" and err.offset is None
        assert err.command == Cmd.READ and "disk on fire" in str(err)

    return Outcome(data, {c: errno.EIO}, check=check)


@scenario("extended")
def extended_error_offset(core: ClientTransmission) -> Outcome:
    c, _ = read(core, 4096, 1024)
    r = R("extended", c, 4096)
    data = (
        r.error_offset(28, 4096 + 100, "full", done=False) + r.data(4096, pattern(100)) + r.none()
    )

    def check(core: ClientTransmission, replies: list[Reply]) -> None:
        err = replies[0].error
        assert err is not None and err.offset == 4096 + 100 and err.errno == errno.ENOSPC

    return Outcome(data, {c: errno.ENOSPC}, check=check)


@scenario("structured")
def structured_error_then_success_elsewhere(core: ClientTransmission) -> Outcome:
    w = core.request(Cmd.WRITE, 0, 1, payload=b"x")
    c, buf = read(core, 0, 512)
    data = R("structured", w).error(9999, "odd") + R("structured", c).data(0, pattern(512), True)
    return Outcome(data, {w: errno.EINVAL, c: None}, [(buf, pattern(512))])


@scenario("structured")
def unknown_error_chunk_type(core: ClientTransmission) -> Outcome:
    """An unknown error type (bit 15) fails the request; the connection lives on."""
    c1, _ = read(core, 0, 512)
    c2, b2 = read(core, 512, 512)
    # Unknown error type 0x8000|77 with a trailing field after the message.
    r1 = R("structured", c1)
    data = r1.raw(0x8000 | 77, struct.pack(">IH", 5, 2) + b"hm" + b"\0" * 6, done=True)
    data += R("structured", c2).data(512, pattern(512), done=True)
    return Outcome(data, {c1: errno.EIO, c2: None}, [(b2, pattern(512))])


@scenario("structured")
def eshutdown_chunk(core: ClientTransmission) -> Outcome:
    c, _ = read(core, 0, 512)

    def check(core: ClientTransmission, replies: list[Reply]) -> None:
        assert core.shutdown_requested

    return Outcome(R("structured", c).error(108), {c: errno.ESHUTDOWN}, check=check)


@scenario("structured")
def block_status(core: ClientTransmission) -> Outcome:
    c = core.request(Cmd.BLOCK_STATUS, 0, 65536)
    # The last extent may run past the requested length.
    data = R("structured", c).bs(1, [(4096, 3), (65536, 0)], done=True)
    want: dict[str, tuple[Extent, ...]] = {BASE_ALLOCATION: (Extent(4096, 3), Extent(65536, 0))}
    return Outcome(data, {c: None}, extents={c: want})


@scenario(
    "structured", negotiated=lambda: neg("structured", contexts={BASE_ALLOCATION: 1, DIRTY: 2})
)
def block_status_two_contexts(core: ClientTransmission) -> Outcome:
    c = core.request(Cmd.BLOCK_STATUS, 4096, 8192)
    r = R("structured", c)
    data = r.bs(2, [(8192, 1)]) + r.bs(1, [(4096, 0), (4096, 3)]) + r.none()
    want = {DIRTY: (Extent(8192, 1),), BASE_ALLOCATION: (Extent(4096, 0), Extent(4096, 3))}
    return Outcome(data, {c: None}, extents={c: want})


@scenario("extended")
def block_status_ext(core: ClientTransmission) -> Outcome:
    c = core.request(Cmd.BLOCK_STATUS, 0, 1 << 19, CmdFlag.REQ_ONE)
    data = R("extended", c).bs_ext(1, [(1 << 18, 2)], done=True)
    return Outcome(data, {c: None}, extents={c: {BASE_ALLOCATION: (Extent(1 << 18, 2),)}})


@scenario("structured")
def block_status_error(core: ClientTransmission) -> Outcome:
    c = core.request(Cmd.BLOCK_STATUS, 0, 4096)

    def check(core: ClientTransmission, replies: list[Reply]) -> None:
        assert replies[0].extents is None

    return Outcome(R("structured", c).error(22, "nope"), {c: errno.EINVAL}, check=check)


@scenario("structured", buffer_size=64)
def block_status_bigger_than_buffer(core: ClientTransmission) -> Outcome:
    """A metadata chunk larger than the internal receive buffer still parses."""
    c = core.request(Cmd.BLOCK_STATUS, 0, SIZE)
    extents = [(512, i & 3) for i in range(300)]
    w = core.request(Cmd.WRITE, 0, 1, payload=b"x")
    r = R("structured", c)
    data = r.bs(1, extents) + simple(w) + r.none()
    want = {BASE_ALLOCATION: tuple(Extent(n, f) for n, f in extents)}
    return Outcome(data, {c: None, w: None}, extents={c: want})


@scenario("structured", buffer_size=64)
def error_chunk_bigger_than_buffer(core: ClientTransmission) -> Outcome:
    c, _ = read(core, 0, 100)
    msg = "x" * 3000
    return Outcome(
        R("structured", c).error(5, msg), {c: errno.EIO},
        check=lambda core, replies: _message_is(replies[0], msg),
    )  # fmt: skip


def _message_is(reply: Reply, msg: str) -> None:
    assert reply.error is not None and reply.error.message == msg


@scenario("structured", buffer_size=64)
def read_bigger_than_buffer(core: ClientTransmission) -> Outcome:
    c, buf = read(core, 0, 5000)
    r = R("structured", c)
    data = r.data(1000, pattern(4000, 9)) + r.data(0, pattern(1000, 8), done=True)
    return Outcome(data, {c: None}, [(buf, pattern(1000, 8) + pattern(4000, 9))])


@scenario("simple")
def disconnect_then_eof(core: ClientTransmission) -> Outcome:
    c, buf = read(core, 0, 16)
    core.disconnect()
    # The server answers what was in flight, then closes: a clean end.
    return Outcome(simple(c, 0, pattern(16)), {c: None}, [(buf, pattern(16))], eof=True)


# Failures: every one of these must raise ProtocolError and close the core.


def failing(data: bytes, *doomed: int, eof: bool = False) -> Outcome:
    return Outcome(data, fails=True, doomed=doomed, eof=eof)


@scenario("structured")
def error_offset_outside(core: ClientTransmission) -> Outcome:
    c, _ = read(core, 4096, 512)
    return failing(R("structured", c).error_offset(5, 4096 + 512), c)


@scenario("structured")
def error_offset_before(core: ClientTransmission) -> Outcome:
    c, _ = read(core, 4096, 512)
    return failing(R("structured", c).error_offset(5, 4095), c)


@scenario("structured")
def unknown_non_error_chunk(core: ClientTransmission) -> Outcome:
    c, _ = read(core, 0, 512)
    return failing(R("structured", c).raw(3, b"\0" * 8, done=True), c)


@scenario("structured")
def unknown_non_error_chunk_huge(core: ClientTransmission) -> Outcome:
    """Refused from the header, before any of its claimed 4 GiB payload arrives."""
    c, _ = read(core, 0, 512)
    head = struct.pack(">IHHQI", 0x668E33EF, 1, 0x7FFF, c, 0xFFFFFFFF)
    return failing(head, c)


@scenario("structured")
def overlapping_chunks(core: ClientTransmission) -> Outcome:
    c, _ = read(core, 0, 2048)
    r = R("structured", c)
    return failing(r.data(0, pattern(1024)) + r.hole(1000, 1048, done=True), c)


@scenario("structured")
def overlapping_data_chunks(core: ClientTransmission) -> Outcome:
    c, _ = read(core, 0, 2048)
    r = R("structured", c)
    return failing(r.data(1024, pattern(1024)) + r.data(1023, pattern(1025), done=True), c)


@scenario("structured")
def chunk_before_request(core: ClientTransmission) -> Outcome:
    c, _ = read(core, 4096, 1024)
    return failing(R("structured", c).data(4095, pattern(1024), done=True), c)


@scenario("structured")
def chunk_after_request(core: ClientTransmission) -> Outcome:
    c, _ = read(core, 4096, 1024)
    return failing(R("structured", c).hole(4096 + 1, 1024, done=True), c)


@scenario("structured")
def data_chunk_longer_than_request(core: ClientTransmission) -> Outcome:
    c, _ = read(core, 0, 1024)
    return failing(R("structured", c).data(0, pattern(1025), done=True), c)


@scenario("structured")
def data_chunk_too_short(core: ClientTransmission) -> Outcome:
    c, _ = read(core, 0, 1024)
    return failing(R("structured", c).raw(1, struct.pack(">Q", 0), done=True), c)


@scenario("structured")
def hole_bad_length(core: ClientTransmission) -> Outcome:
    c, _ = read(core, 0, 1024)
    return failing(R("structured", c).raw(2, struct.pack(">QIB", 0, 1024, 0), done=True), c)


@scenario("structured")
def hole_zero_size(core: ClientTransmission) -> Outcome:
    c, _ = read(core, 0, 1024)
    r = R("structured", c)
    return failing(r.data(0, pattern(1024)) + r.hole(1024, 0, done=True), c)


@scenario("structured")
def incomplete_coverage(core: ClientTransmission) -> Outcome:
    c, _ = read(core, 0, 2048)
    r = R("structured", c)
    return failing(r.data(0, pattern(1024)) + r.hole(1536, 512) + r.none(), c)


@scenario("extended")
def incomplete_coverage_done_on_data(core: ClientTransmission) -> Outcome:
    c, _ = read(core, 0, 2048)
    return failing(R("extended", c).data(0, pattern(1024), done=True), c)


@scenario("structured")
def df_read_fragmented(core: ClientTransmission) -> Outcome:
    c, _ = read(core, 0, 2048, CmdFlag.DF)
    r = R("structured", c)
    return failing(r.data(0, pattern(1024)) + r.data(1024, pattern(1024), done=True), c)


@scenario("structured")
def data_chunk_for_write(core: ClientTransmission) -> Outcome:
    w = core.request(Cmd.WRITE, 0, 8, payload=b"12345678")
    return failing(R("structured", w).data(0, pattern(8), done=True), w)


@scenario("structured")
def hole_for_write(core: ClientTransmission) -> Outcome:
    w = core.request(Cmd.WRITE, 0, 8, payload=b"12345678")
    return failing(R("structured", w).hole(0, 8, done=True), w)


@scenario("structured")
def block_status_for_read(core: ClientTransmission) -> Outcome:
    c, _ = read(core, 0, 512)
    return failing(R("structured", c).bs(1, [(512, 0)], done=True), c)


@scenario("structured")
def cookie_never_sent(core: ClientTransmission) -> Outcome:
    c, _ = read(core, 0, 512)
    return failing(R("structured", c + 1000).data(0, pattern(512), done=True), c)


@scenario("simple")
def simple_cookie_never_sent(core: ClientTransmission) -> Outcome:
    c, _ = read(core, 0, 512)
    return failing(simple(c + 1, 0, pattern(512)), c)


@scenario("structured")
def chunk_after_done(core: ClientTransmission) -> Outcome:
    f = core.request(Cmd.FLUSH, 0, 0)
    r = R("structured", f)
    return failing(r.none() + r.none())


@scenario("simple")
def bad_magic(core: ClientTransmission) -> Outcome:
    c, _ = read(core, 0, 512)
    return failing(struct.pack(">IIQ", 0x67446699, 0, c) + pattern(512), c)


@scenario("simple")
def structured_magic_without_structured(core: ClientTransmission) -> Outcome:
    c, _ = read(core, 0, 512)
    return failing(R("structured", c).data(0, pattern(512), done=True), c)


@scenario("extended")
def simple_reply_under_extended(core: ClientTransmission) -> Outcome:
    f = core.request(Cmd.FLUSH, 0, 0)
    return failing(simple(f), f)


@scenario("extended")
def structured_chunk_under_extended(core: ClientTransmission) -> Outcome:
    f = core.request(Cmd.FLUSH, 0, 0)
    return failing(R("structured", f).none(), f)


@scenario("structured")
def simple_reply_to_read_under_structured(core: ClientTransmission) -> Outcome:
    c, _ = read(core, 0, 512)
    return failing(simple(c, 0, pattern(512)), c)


@scenario("structured")
def simple_error_to_read_under_structured(core: ClientTransmission) -> Outcome:
    c, _ = read(core, 0, 512)
    return failing(simple(c, 22), c)


@scenario("extended")
def extended_offset_mismatch(core: ClientTransmission) -> Outcome:
    c, _ = read(core, 4096, 512)
    return failing(R("extended", c, 0).data(4096, pattern(512), done=True), c)


@scenario("structured")
def none_with_payload(core: ClientTransmission) -> Outcome:
    f = core.request(Cmd.FLUSH, 0, 0)
    return failing(R("structured", f).raw(0, b"\0", done=True), f)


@scenario("structured")
def none_without_done(core: ClientTransmission) -> Outcome:
    f = core.request(Cmd.FLUSH, 0, 0)
    return failing(R("structured", f).raw(0, b"", done=False), f)


@scenario("structured")
def error_message_longer_than_chunk(core: ClientTransmission) -> Outcome:
    c, _ = read(core, 0, 512)
    return failing(R("structured", c).raw(0x8001, struct.pack(">IH", 5, 100) + b"x", True), c)


@scenario("structured")
def unknown_error_chunk_message_too_long(core: ClientTransmission) -> Outcome:
    c, _ = read(core, 0, 512)
    return failing(R("structured", c).raw(0x8077, struct.pack(">IH", 5, 100) + b"x", True), c)


@scenario("structured")
def error_chunk_error_zero(core: ClientTransmission) -> Outcome:
    c, _ = read(core, 0, 512)
    return failing(R("structured", c).error(0), c)


@scenario("extended")
def block_status_wrong_width_extended(core: ClientTransmission) -> Outcome:
    c = core.request(Cmd.BLOCK_STATUS, 0, 4096)
    return failing(R("extended", c).bs(1, [(4096, 0)], done=True), c)


@scenario("structured")
def block_status_wrong_width_structured(core: ClientTransmission) -> Outcome:
    c = core.request(Cmd.BLOCK_STATUS, 0, 4096)
    return failing(R("structured", c).bs_ext(1, [(4096, 0)], done=True), c)


@scenario("structured")
def block_status_unknown_context(core: ClientTransmission) -> Outcome:
    c = core.request(Cmd.BLOCK_STATUS, 0, 4096)
    return failing(R("structured", c).bs(2, [(4096, 0)], done=True), c)


@scenario("structured")
def block_status_context_twice(core: ClientTransmission) -> Outcome:
    c = core.request(Cmd.BLOCK_STATUS, 0, 4096)
    r = R("structured", c)
    return failing(r.bs(1, [(4096, 0)]) + r.bs(1, [(4096, 0)], done=True), c)


@scenario("structured")
def block_status_req_one_two_extents(core: ClientTransmission) -> Outcome:
    c = core.request(Cmd.BLOCK_STATUS, 0, 4096, CmdFlag.REQ_ONE)
    return failing(R("structured", c).bs(1, [(1024, 0), (1024, 3)], done=True), c)


@scenario("structured")
def block_status_req_one_too_long(core: ClientTransmission) -> Outcome:
    c = core.request(Cmd.BLOCK_STATUS, 0, 4096, CmdFlag.REQ_ONE)
    return failing(R("structured", c).bs(1, [(8192, 0)], done=True), c)


@scenario("structured")
def block_status_extents_past_length(core: ClientTransmission) -> Outcome:
    c = core.request(Cmd.BLOCK_STATUS, 0, 4096)
    return failing(R("structured", c).bs(1, [(4096, 0), (512, 3)], done=True), c)


@scenario("structured")
def block_status_without_status_chunk(core: ClientTransmission) -> Outcome:
    c = core.request(Cmd.BLOCK_STATUS, 0, 4096)
    return failing(R("structured", c).none(), c)


@scenario("structured")
def block_status_simple_success(core: ClientTransmission) -> Outcome:
    c = core.request(Cmd.BLOCK_STATUS, 0, 4096)
    return failing(simple(c), c)


@scenario("extended")
def block_status_ext_zero_count(core: ClientTransmission) -> Outcome:
    c = core.request(Cmd.BLOCK_STATUS, 0, 4096)
    return failing(R("extended", c).raw(6, struct.pack(">II", 1, 0), done=True), c)


@scenario("structured")
def metadata_chunk_too_long(core: ClientTransmission) -> Outcome:
    c = core.request(Cmd.BLOCK_STATUS, 0, 4096)
    return failing(struct.pack(">IHHQI", 0x668E33EF, 1, 5, c, 0xFFFFFFF0), c)


@scenario("simple")
def eof_with_request_in_flight(core: ClientTransmission) -> Outcome:
    c, _ = read(core, 0, 512)
    return failing(b"", c, eof=True)


@scenario("simple")
def eof_mid_payload(core: ClientTransmission) -> Outcome:
    c, _ = read(core, 0, 512)
    return failing(simple(c, 0, pattern(100)), c, eof=True)


@scenario("structured")
def eof_mid_chunk(core: ClientTransmission) -> Outcome:
    c, _ = read(core, 0, 512)
    r = R("structured", c)
    return failing(r.data(0, pattern(512))[:-1], c, eof=True)


@scenario("simple")
def eof_after_disconnect_with_request_in_flight(core: ClientTransmission) -> Outcome:
    c, _ = read(core, 0, 512)
    core.disconnect()
    return failing(b"", c, eof=True)


def run_scenario(name: str, sizes: list[int], via_buffer: list[bool]) -> None:
    sc = SCENARIOS[name]
    negotiated = sc.negotiated() if sc.negotiated else neg(sc.style)
    core = ClientTransmission(negotiated, buffer_size=sc.buffer_size)
    out = sc.build(core)
    core.buffers_to_send()
    replies: list[Reply] = []
    if out.fails:
        with pytest.raises(ProtocolError):
            feed(core, out.data, sizes, via_buffer, replies)
            if out.eof:
                core.receive_data(b"")
        assert core.closed
        with pytest.raises(ConnectionClosed):
            core.receive_data(b"more")
        with pytest.raises(ConnectionClosed):
            core.request(Cmd.FLUSH, 0, 0)
        # Never wrong data: a doomed request never completes as a success.
        for reply in replies + ([r] if (r := core.next_event()) else []):
            assert not (reply.cookie in out.doomed and reply.error is None), reply
        return
    feed(core, out.data, sizes, via_buffer, replies)
    if out.eof:
        core.receive_data(b"")
    got = {r.cookie: (r.error.errno if r.error is not None else None) for r in replies}
    assert got == out.replies
    assert len(replies) == len(out.replies)  # each request completes exactly once
    assert core.in_flight == 0
    for buf, expected in out.buffers:
        assert bytes(buf) == expected
    for reply in replies:
        if reply.cookie in out.extents:
            assert reply.extents == out.extents[reply.cookie]
        elif reply.command is not Cmd.BLOCK_STATUS:
            assert reply.extents is None
    if out.check is not None:
        out.check(core, replies)


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_reply(name: str, mode: str) -> None:
    sizes, via_buffer = MODES[mode]
    run_scenario(name, sizes, via_buffer)


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    name=st.sampled_from(sorted(SCENARIOS)),
    sizes=st.lists(st.integers(1, 300), min_size=1, max_size=12),
    via_buffer=st.lists(st.booleans(), min_size=1, max_size=5),
)
def test_reply_random_splits(name: str, sizes: list[int], via_buffer: list[bool]) -> None:
    run_scenario(name, sizes, via_buffer)


def test_zero_copy_read_lands_in_callers_buffer() -> None:
    """While a big read's payload is due and nothing is buffered, receive_buffer is a
    view of the caller's own buffer (no copy). A small read's payload comes through the
    receive buffer instead (see test_read_fast_path)."""
    core = ClientTransmission(neg("simple"))
    n = DIRECT_READ
    c, buf = read(core, 0, n)
    core.receive_data(simple(c))
    view = core.receive_buffer()
    assert len(view) == n
    view[:10] = b"0123456789"
    assert buf[:10] == b"0123456789"
    core.buffer_updated(10)
    rest = core.receive_buffer()
    assert len(rest) == n - 10
    rest[:] = bytes(n - 10)
    core.buffer_updated(n - 10)
    reply = core.next_event()
    assert reply is not None and reply.cookie == c and reply.error is None
    assert buf == b"0123456789" + bytes(n - 10)


def test_initial_data() -> None:
    """Bytes that came with the end of the handshake are parsed as replies."""
    negotiated = neg("simple")
    core = ClientTransmission(negotiated, b"")
    assert core.next_event() is None
    with pytest.raises(ProtocolError):
        ClientTransmission(negotiated, simple(1))  # nothing is in flight yet


def test_eof_idle_is_connection_closed() -> None:
    core = ClientTransmission(neg("structured"))
    with pytest.raises(ConnectionClosed):
        core.receive_data(b"")
    assert core.closed


def test_eof_mid_header_idle() -> None:
    core = ClientTransmission(neg("structured"))
    core.receive_data(b"\x66")
    with pytest.raises(ProtocolError):
        core.buffer_updated(0)


def test_fail_all() -> None:
    core = ClientTransmission(neg("structured"))
    cookies = [core.request(Cmd.FLUSH, 0, 0) for _ in range(3)]
    assert sorted(core.fail_all()) == sorted(cookies)
    assert core.closed and core.in_flight == 0


# --- requests ------------------------------------------------------------------------------


def sent(core: ClientTransmission) -> bytes:
    return core.data_to_send()


def test_request_bytes_compact() -> None:
    core = ClientTransmission(neg("structured"))
    buf = bytearray(512)
    assert core.request(Cmd.READ, 0x1000, 512, buffer=buf) == 1
    assert sent(core) == h("25609513 0000 0000 0000000000000001 0000000000001000 00000200")
    payload = bytearray(b"abcd")
    assert core.request(Cmd.WRITE, 0x200, 4, CmdFlag.FUA, payload=payload) == 2
    buffers = core.buffers_to_send()
    assert buffers[0] == h("25609513 0001 0001 0000000000000002 0000000000000200 00000004")
    assert buffers[1] is payload  # by reference, not joined
    assert len(buffers) == 2
    core.request(Cmd.FLUSH, 0, 0)
    assert sent(core) == h("25609513 0000 0003 0000000000000003 0000000000000000 00000000")
    core.request(Cmd.TRIM, 0x2000, 0x1000, CmdFlag.FUA)
    assert sent(core) == h("25609513 0001 0004 0000000000000004 0000000000002000 00001000")
    core.request(Cmd.CACHE, 0, 0x10000)
    assert sent(core) == h("25609513 0000 0005 0000000000000005 0000000000000000 00010000")
    core.request(Cmd.WRITE_ZEROES, 0, 0x8000, CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO)
    assert sent(core) == h("25609513 0012 0006 0000000000000006 0000000000000000 00008000")
    core.request(Cmd.BLOCK_STATUS, 0x1000, 0x4000, CmdFlag.REQ_ONE)
    assert sent(core) == h("25609513 0008 0007 0000000000000007 0000000000001000 00004000")
    core.request(Cmd.READ, 0, 512, CmdFlag.DF, buffer=buf)
    assert sent(core) == h("25609513 0004 0000 0000000000000008 0000000000000000 00000200")
    assert core.in_flight == 8
    core.disconnect()
    assert sent(core) == h("25609513 0000 0002 0000000000000009 0000000000000000 00000000")


def test_request_bytes_extended() -> None:
    core = ClientTransmission(neg("extended", size=1 << 40))
    buf = bytearray(512)
    core.request(Cmd.READ, 0x1000, 512, buffer=buf)
    assert sent(core) == h("21e41c71 0000 0000 0000000000000001 0000000000001000 0000000000000200")
    core.request(Cmd.WRITE, 0x200, 4, CmdFlag.FUA, payload=b"abcd")
    # Extended headers: a WRITE MUST carry NBD_CMD_FLAG_PAYLOAD_LEN (bit 5).
    assert sent(core) == h(
        "21e41c71 0021 0001 0000000000000002 0000000000000200 0000000000000004 61626364"
    )
    core.request(Cmd.TRIM, 0, 1 << 33, CmdFlag.FUA)
    assert sent(core) == h("21e41c71 0001 0004 0000000000000003 0000000000000000 0000000200000000")
    core.disconnect()
    assert sent(core) == h("21e41c71 0000 0002 0000000000000004 0000000000000000 0000000000000000")


def test_block_status_payload_form() -> None:
    """With BLOCK_STATUS_PAYLOAD, asking for a subset of contexts sends their ids."""
    n = neg(
        "extended",
        flags=ALL_FLAGS | TF.BLOCK_STATUS_PAYLOAD,
        contexts={BASE_ALLOCATION: 1, DIRTY: 5},
    )
    core = ClientTransmission(n)
    c = core.request(Cmd.BLOCK_STATUS, 0x1000, 0x4000, contexts=(DIRTY,))
    assert sent(core) == h(
        "21e41c71 0020 0007 0000000000000001 0000000000001000 000000000000000c"
        " 0000000000004000 00000005"
    )
    # All contexts: the plain form.
    core.request(Cmd.BLOCK_STATUS, 0, 0x4000)
    assert sent(core) == h("21e41c71 0000 0007 0000000000000002 0000000000000000 0000000000004000")
    assert c == 1


def test_block_status_subset_reply_checked() -> None:
    n = neg(
        "extended",
        flags=ALL_FLAGS | TF.BLOCK_STATUS_PAYLOAD,
        contexts={BASE_ALLOCATION: 1, DIRTY: 5},
    )
    core = ClientTransmission(n)
    c = core.request(Cmd.BLOCK_STATUS, 0x1000, 0x4000, contexts=(DIRTY,))
    with pytest.raises(ProtocolError):
        core.receive_data(R("extended", c, 0x1000).bs_ext(1, [(0x4000, 0)], done=True))
    core = ClientTransmission(n)
    c = core.request(Cmd.BLOCK_STATUS, 0x1000, 0x4000, contexts=(DIRTY,))
    core.receive_data(R("extended", c, 0x1000).bs_ext(5, [(0x4000, 1)], done=True))
    reply = core.next_event()
    assert reply is not None and reply.extents == {DIRTY: (Extent(0x4000, 1),)}


def test_cookies_skip_those_in_flight() -> None:
    core = ClientTransmission(neg("structured"))
    first = core.request(Cmd.FLUSH, 0, 0)
    core._next_cookie = first  # force a wrap onto a cookie still in flight
    assert core.request(Cmd.FLUSH, 0, 0) == first + 1
    core._next_cookie = 0xFFFFFFFFFFFFFFFF
    assert core.request(Cmd.FLUSH, 0, 0) == 0xFFFFFFFFFFFFFFFF
    assert core.request(Cmd.FLUSH, 0, 0) == 0
    assert core.in_flight == 4


ERR_CASES: list[tuple[str, type[NBDError], Negotiated, Callable[[ClientTransmission], object]]] = [
    ("flush-unadvertised", UnsupportedError, neg(flags=TF.HAS_FLAGS),
     lambda c: c.request(Cmd.FLUSH, 0, 0)),
    ("trim-unadvertised", UnsupportedError, neg(flags=TF.HAS_FLAGS),
     lambda c: c.request(Cmd.TRIM, 0, 512)),
    ("zero-unadvertised", UnsupportedError, neg(flags=TF.HAS_FLAGS),
     lambda c: c.request(Cmd.WRITE_ZEROES, 0, 512)),
    ("cache-unadvertised", UnsupportedError, neg(flags=TF.HAS_FLAGS),
     lambda c: c.request(Cmd.CACHE, 0, 512)),
    ("fua-unadvertised", UnsupportedError, neg(flags=ALL_FLAGS & ~TF.SEND_FUA),
     lambda c: c.request(Cmd.WRITE, 0, 1, CmdFlag.FUA, payload=b"x")),
    ("df-unadvertised", UnsupportedError, neg(flags=ALL_FLAGS & ~TF.SEND_DF),
     lambda c: c.request(Cmd.READ, 0, 1, CmdFlag.DF, buffer=bytearray(1))),
    ("df-simple", UnsupportedError, neg("simple"),
     lambda c: c.request(Cmd.READ, 0, 1, CmdFlag.DF, buffer=bytearray(1))),
    ("fast-zero-unadvertised", UnsupportedError, neg(flags=ALL_FLAGS & ~TF.SEND_FAST_ZERO),
     lambda c: c.request(Cmd.WRITE_ZEROES, 0, 512, CmdFlag.FAST_ZERO)),
    ("block-status-no-context", UnsupportedError, neg("structured", contexts={}),
     lambda c: c.request(Cmd.BLOCK_STATUS, 0, 512)),
    ("block-status-simple", UnsupportedError, neg("simple"),
     lambda c: c.request(Cmd.BLOCK_STATUS, 0, 512)),
    ("read-only-write", UnsupportedError, neg(flags=ALL_FLAGS | TF.READ_ONLY),
     lambda c: c.request(Cmd.WRITE, 0, 1, payload=b"x")),
    ("read-only-trim", UnsupportedError, neg(flags=ALL_FLAGS | TF.READ_ONLY),
     lambda c: c.request(Cmd.TRIM, 0, 512)),
    ("read-only-zero", UnsupportedError, neg(flags=ALL_FLAGS | TF.READ_ONLY),
     lambda c: c.request(Cmd.WRITE_ZEROES, 0, 512)),
    ("fua-on-read", InvalidRequest, neg(),
     lambda c: c.request(Cmd.READ, 0, 1, CmdFlag.FUA, buffer=bytearray(1))),
    ("req-one-on-read", InvalidRequest, neg(),
     lambda c: c.request(Cmd.READ, 0, 1, CmdFlag.REQ_ONE, buffer=bytearray(1))),
    ("no-hole-on-write", InvalidRequest, neg(),
     lambda c: c.request(Cmd.WRITE, 0, 1, CmdFlag.NO_HOLE, payload=b"x")),
    ("payload-len-by-hand", InvalidRequest, neg("extended"),
     lambda c: c.request(Cmd.WRITE, 0, 1, CmdFlag.PAYLOAD_LEN, payload=b"x")),
    ("unknown-flag", InvalidRequest, neg(),
     lambda c: c.request(Cmd.TRIM, 0, 512, 1 << 9)),
    ("flag-over-16-bits", InvalidRequest, neg(),
     lambda c: c.request(Cmd.TRIM, 0, 512, 1 << 16)),
    ("unknown-flag-on-flush", InvalidRequest, neg(),
     lambda c: c.request(Cmd.FLUSH, 0, 0, 1 << 6)),
    ("negative-flags", InvalidRequest, neg(),
     lambda c: c.request(Cmd.TRIM, 0, 512, -1)),
    ("unknown-command", InvalidRequest, neg(), lambda c: c.request(99, 0, 0)),  # type: ignore[arg-type]
    ("disc-by-request", InvalidRequest, neg(), lambda c: c.request(Cmd.DISC, 0, 0)),
    ("resize-by-request", InvalidRequest, neg(), lambda c: c.request(Cmd.RESIZE, 0, 0)),
    ("negative-offset", InvalidRequest, neg(),
     lambda c: c.request(Cmd.TRIM, -512, 512)),
    ("negative-length", InvalidRequest, neg(),
     lambda c: c.request(Cmd.TRIM, 512, -512)),
    ("past-end", InvalidRequest, neg(),
     lambda c: c.request(Cmd.READ, SIZE - 511, 512, buffer=bytearray(512))),
    ("zero-past-end", InvalidRequest, neg(),
     lambda c: c.request(Cmd.WRITE_ZEROES, SIZE, 1)),
    ("unaligned-offset", InvalidRequest, neg(block=(512, 4096, 1 << 20)),
     lambda c: c.request(Cmd.READ, 256, 512, buffer=bytearray(512))),
    ("unaligned-length", InvalidRequest, neg(block=(512, 4096, 1 << 20)),
     lambda c: c.request(Cmd.TRIM, 0, 1000)),
    ("read-over-max-payload", InvalidRequest, neg(block=(1, 4096, 1 << 16)),
     lambda c: c.request(Cmd.READ, 0, (1 << 16) + 1, buffer=bytearray((1 << 16) + 1))),
    ("write-over-max-payload", InvalidRequest, neg(block=(1, 4096, 1 << 16)),
     lambda c: c.request(Cmd.WRITE, 0, (1 << 16) + 1, payload=bytes((1 << 16) + 1))),
    ("compact-over-4g", InvalidRequest, neg(size=1 << 40),
     lambda c: c.request(Cmd.TRIM, 0, 1 << 32)),
    ("block-status-0", InvalidRequest, neg(),
     lambda c: c.request(Cmd.BLOCK_STATUS, 0, 0)),
    ("flush-with-range", InvalidRequest, neg(), lambda c: c.request(Cmd.FLUSH, 0, 512)),
    ("flush-with-offset", InvalidRequest, neg(), lambda c: c.request(Cmd.FLUSH, 512, 0)),
    ("read-no-buffer", InvalidRequest, neg(), lambda c: c.request(Cmd.READ, 0, 512)),
    ("read-short-buffer", InvalidRequest, neg(),
     lambda c: c.request(Cmd.READ, 0, 512, buffer=bytearray(511))),
    ("read-readonly-buffer", InvalidRequest, neg(),
     lambda c: c.request(Cmd.READ, 0, 512, buffer=bytes(512))),
    ("write-no-payload", InvalidRequest, neg(), lambda c: c.request(Cmd.WRITE, 0, 512)),
    ("write-short-payload", InvalidRequest, neg(),
     lambda c: c.request(Cmd.WRITE, 0, 512, payload=bytes(511))),
    ("unknown-context", InvalidRequest, neg(),
     lambda c: c.request(Cmd.BLOCK_STATUS, 0, 512, contexts=("nope:x",))),
]  # fmt: skip


@pytest.mark.parametrize(
    ("exc", "negotiated", "call"),
    [case[1:] for case in ERR_CASES],
    ids=[case[0] for case in ERR_CASES],
)
def test_request_refused(
    exc: type[NBDError], negotiated: Negotiated, call: Callable[[ClientTransmission], object]
) -> None:
    core = ClientTransmission(negotiated)
    with pytest.raises(exc):
        call(core)
    # Nothing was sent or recorded; the connection is still fine.
    assert core.buffers_to_send() == [] and core.in_flight == 0 and not core.closed


def test_request_accepted_at_limits() -> None:
    core = ClientTransmission(neg(block=(512, 4096, 1 << 16)))
    core.request(Cmd.READ, SIZE - (1 << 16), 1 << 16, buffer=bytearray(1 << 16))
    core.request(Cmd.TRIM, 0, SIZE)  # effect lengths may exceed the maximum payload
    # Extended headers carry 64-bit effect lengths.
    big = ClientTransmission(neg("extended", size=1 << 40))
    big.request(Cmd.TRIM, 0, 1 << 33)
    assert core.in_flight == 2 and big.in_flight == 1


def test_request_after_disconnect() -> None:
    core = ClientTransmission(neg())
    core.disconnect()
    core.disconnect()  # a second call sends nothing more
    assert len(core.buffers_to_send()) == 1
    with pytest.raises(ConnectionClosed):
        core.request(Cmd.FLUSH, 0, 0)
    assert core.buffers_to_send() == []


def test_disconnect_after_close_sends_nothing() -> None:
    core = ClientTransmission(neg())
    core.fail_all()
    core.disconnect()
    assert core.buffers_to_send() == []


# --- split_range -------------------------------------------------------------------------


def test_split_range() -> None:
    assert list(split_range(0, 10, 4)) == [(0, 4), (4, 4), (8, 2)]
    assert list(split_range(100, 0, 4)) == []
    assert list(split_range(0, 8192, 3000, 1024)) == [
        (0, 2048),
        (2048, 2048),
        (4096, 2048),
        (6144, 2048),
    ]
    assert list(split_range(0, 1000, 100, 512)) == [(0, 512), (512, 488)]


@settings(max_examples=200, deadline=None)
@given(
    offset=st.integers(0, 1 << 40),
    length=st.integers(0, 4096),
    maximum=st.integers(1, 1 << 16),
    align_log=st.integers(0, 12),
)
def test_split_range_covers(offset: int, length: int, maximum: int, align_log: int) -> None:
    align = 1 << align_log
    pieces = list(split_range(offset * align, length * align, maximum, align))
    pos = offset * align
    for start, n in pieces:
        assert start == pos and n > 0
        assert n <= max(maximum, align)
        assert n % align == 0
        pos += n
    assert pos == (offset + length) * align
