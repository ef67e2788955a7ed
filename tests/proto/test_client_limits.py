"""The client's bounds (pynbd.proto.limits.ClientLimits) in the sans-IO cores.

Issue 16: a server that answers GO with INFO replies as fast as it can, or a block
status chunk of millions of descriptors, must not make the client hold what it sends.
The handshake fails with a ProtocolError naming the bound when the header of the reply
that goes over it arrives; a status chunk keeps its first extents and drains the rest.
Memory is checked with tracemalloc, which counts allocations (not time), with the
server's bytes made piece by piece so that only the core's own allocations count.
"""

from __future__ import annotations

import struct
import tracemalloc
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace

import pytest

from pynbd.errors import NBDError, ProtocolError, RequestError
from pynbd.proto.constants import BASE_ALLOCATION, Cmd, CmdFlag, Info, Opt, Rep, TransmissionFlag
from pynbd.proto.handshake import (
    NEED_DATA,
    ClientHandshake,
    HandshakeConfig,
    HandshakeDone,
    Negotiated,
)
from pynbd.proto.limits import DEFAULT_LIMITS, ClientLimits
from pynbd.proto.records import Extent
from pynbd.proto.transmission import ClientTransmission

MiB = 1 << 20
REPLY_MAGIC = bytes.fromhex("0003e889045565a9")
DIRTY = "qemu:dirty-bitmap:b"


def rep(option: int, reply: int, data: bytes = b"") -> bytes:
    """S: an option reply (spec "Fixed newstyle negotiation")."""
    return REPLY_MAGIC + struct.pack(">III", option, reply, len(data)) + data


def info_export() -> bytes:
    return struct.pack(">HQH", Info.EXPORT, 1 << 30, TransmissionFlag.HAS_FLAGS)


# --- the handshake ---------------------------------------------------------------------

#: Only GO: no extended headers, structured replies or meta contexts to negotiate.
GO_ONLY = HandshakeConfig(extended_headers=False, structured_replies=False, meta_contexts=())
GREETING = b"NBDMAGIC" + b"IHAVEOPT" + struct.pack(">H", 3)


def handshake(
    config: HandshakeConfig, replies: Callable[[int], Iterable[bytes]], *, bytewise: bool = False
) -> tuple[Negotiated | NBDError, int]:
    """Run a handshake whose server sends the greeting, then for each option the
    client sends the pieces ``replies(option)`` makes, each made only when the client
    asks for more. Returns the result (or the error) and how many bytes were given."""
    hs = ClientHandshake(config)
    pending: Iterator[bytes] = iter([GREETING])
    out = bytearray()
    flags = True  # the client's flags come first
    held = bytearray()  # a piece made, not all given yet
    given = 0
    while True:
        try:
            event = hs.next_event()
        except NBDError as exc:
            return exc, given
        out += hs.data_to_send()
        if flags and len(out) >= 4:
            del out[:4]
            flags = False
        while len(out) >= 16:  # the client's options, as the server parses them
            assert out[:8] == b"IHAVEOPT"
            option, length = struct.unpack_from(">II", out, 8)
            del out[: 16 + length]
            pending = iter(replies(option))
        if isinstance(event, HandshakeDone):
            return event.result, given
        assert event is NEED_DATA
        if not held:
            held = bytearray(next(pending, b""))
            assert held, "the client waits for more than the server says"
        n = 1 if bytewise else len(held)
        hs.receive_data(bytes(held[:n]))
        del held[:n]
        given += n


def go_with(before: Callable[[int], Iterable[bytes]]) -> Callable[[int], Iterable[bytes]]:
    """A GO answered with ``before(option)``, then NBD_INFO_EXPORT and an ACK."""

    def replies(option: int) -> Iterator[bytes]:
        if option == Opt.GO:
            yield from before(option)
            yield rep(option, Rep.INFO, info_export())
        yield rep(option, Rep.ACK)

    return replies


def unknown_infos(count: int, size: int) -> Callable[[int], Iterator[bytes]]:
    def make(option: int) -> Iterator[bytes]:
        for _ in range(count):
            yield rep(option, Rep.INFO, struct.pack(">H", 0x7777) + bytes(size - 2))

    return make


def peak_of(run: Callable[[], object]) -> tuple[object, int]:
    """What ``run`` returns, and the peak of what was allocated while it ran."""
    tracemalloc.start()
    try:
        result = run()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
def test_go_flood_stops_at_max_handshake_bytes(bytewise: bool) -> None:
    config = replace(GO_ONLY, limits=ClientLimits(max_handshake_bytes=16 * 1024))
    # Endless 1 KiB INFO replies of an unknown type (as many as the client reads).
    result, given = handshake(config, unknown_infos(10**9, 1024), bytewise=bytewise)
    assert isinstance(result, ProtocolError)
    assert "ClientLimits.max_handshake_bytes" in str(result)
    # 15 replies of 1044 bytes fit; the 16th fails on its header, before its payload.
    assert given == len(GREETING) + 15 * 1044 + (20 if bytewise else 1044)


def test_unknown_info_replies_are_not_kept() -> None:
    # 12 MiB of INFO replies of an unknown type, then the export: within the defaults,
    # and the client keeps none of them (it MUST ignore them, spec "NBD_OPT_INFO").
    count = 12 * MiB // 8192
    result, peak = peak_of(lambda: handshake(GO_ONLY, go_with(unknown_infos(count, 8192))))
    negotiated, _ = result  # type: ignore[misc]
    assert isinstance(negotiated, Negotiated) and negotiated.in_transmission
    assert negotiated.size == 1 << 30
    assert peak < 1 * MiB, f"the handshake held {peak} bytes"


def test_repeated_info_keeps_the_last() -> None:
    def names(option: int) -> Iterator[bytes]:
        for name in (b"first", b"second"):
            yield rep(option, Rep.INFO, struct.pack(">H", Info.NAME) + name)

    negotiated, _ = handshake(GO_ONLY, go_with(names))
    assert isinstance(negotiated, Negotiated)
    assert negotiated.canonical_name == "second"


def servers(count: int, name_size: int = 1) -> Callable[[int], Iterator[bytes]]:
    def replies(option: int) -> Iterator[bytes]:
        if option == Opt.LIST:
            for i in range(count):
                name = f"{i:0{name_size}d}".encode()
                yield rep(option, Rep.SERVER, struct.pack(">I", len(name)) + name + b"d" * 100)
        elif option == Opt.INFO:
            yield rep(option, Rep.INFO, info_export())
        yield rep(option, Rep.ACK)

    return replies


LIST = HandshakeConfig(
    extended_headers=False, structured_replies=False, meta_contexts=(), go=False, list_exports=True
)


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
def test_list_flood_stops_at_max_option_replies(bytewise: bool) -> None:
    config = replace(LIST, limits=ClientLimits(max_option_replies=100))
    result, given = handshake(config, servers(10**9, name_size=3), bytewise=bytewise)
    assert isinstance(result, ProtocolError)
    assert "ClientLimits.max_option_replies" in str(result)
    # 100 replies of 127 bytes; the 101st fails on its header.
    assert given == len(GREETING) + 100 * 127 + (20 if bytewise else 127)


def test_replies_are_counted_over_the_whole_handshake() -> None:
    # LIST of 2 exports (3 replies), then INFO (2): 5 replies in all.
    result, _ = handshake(replace(LIST, limits=ClientLimits(max_option_replies=4)), servers(2))
    assert isinstance(result, ProtocolError)
    assert "ClientLimits.max_option_replies" in str(result)
    result, _ = handshake(replace(LIST, limits=ClientLimits(max_option_replies=5)), servers(2))
    assert isinstance(result, Negotiated)


def test_a_list_of_ten_thousand_exports_fits_the_defaults() -> None:
    # nbdkit caps a list at 10,000 exports; names of 200 bytes and descriptions of 100.
    negotiated, _ = handshake(LIST, servers(10_000, name_size=200))
    assert isinstance(negotiated, Negotiated)
    assert negotiated.exports is not None and len(negotiated.exports) == 10_000
    assert negotiated.exports[-1].name == f"{9999:0200d}"


def test_limits_are_checked() -> None:
    import pynbd.client

    assert pynbd.client.ClientLimits is ClientLimits
    assert ClientLimits() == DEFAULT_LIMITS
    assert ClientLimits().max_handshake_bytes == 16 * MiB
    assert ClientLimits().max_option_replies == 65_536
    assert ClientLimits().max_extents == 65_536
    assert ClientLimits().max_read_ranges == 4096
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"ClientLimits\.max_extents"):
            ClientLimits(max_extents=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"ClientLimits\.max_read_ranges"):
            ClientLimits(max_read_ranges=bad)  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        DEFAULT_LIMITS.max_extents = 1  # type: ignore[misc]


# --- transmission: block status ----------------------------------------------------------

STATUS, STATUS_EXT, ERROR, ERROR_OFFSET = 5, 6, 0x8001, 0x8002


def core_for(
    style: str, limits: ClientLimits | None = None, dirty: bool = False
) -> ClientTransmission:
    """A core with base:allocation (and a dirty bitmap); ``limits``: None, the defaults."""
    contexts = {BASE_ALLOCATION: 1, DIRTY: 2} if dirty else {BASE_ALLOCATION: 1}
    n = Negotiated(
        size=1 << 40,
        flags=TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH,
        structured_replies=True,
        extended_headers=style == "extended",
        meta_contexts=contexts,
        in_transmission=True,
    )
    if limits is None:
        return ClientTransmission(n)
    return ClientTransmission(n, limits=limits)


def header(
    style: str, cookie: int, type_: int, length: int, done: bool = True, offset: int = 0
) -> bytes:
    if style == "extended":
        return struct.pack(">IHHQQQ", 0x6E8A278C, int(done), type_, cookie, offset, length)
    return struct.pack(">IHHQI", 0x668E33EF, int(done), type_, cookie, length)


def status_chunk(
    style: str,
    cookie: int,
    cid: int,
    lengths: Iterable[int],
    done: bool = True,
    count: int | None = None,
) -> bytes:
    lengths = list(lengths)
    if style == "extended":
        body = struct.pack(">II", cid, len(lengths) if count is None else count)
        body += b"".join(struct.pack(">QQ", n, 0) for n in lengths)
        return header(style, cookie, STATUS_EXT, len(body), done) + body
    body = struct.pack(">I", cid) + b"".join(struct.pack(">II", n, 0) for n in lengths)
    return header(style, cookie, STATUS, len(body), done) + body


def feed(core: ClientTransmission, data: bytes, how: str) -> None:
    """Whole, a byte at a time, or in pieces of 7 bytes (``receive_data`` goes through
    ``receive_buffer``/``buffer_updated``)."""
    step = {"whole": len(data) or 1, "bytewise": 1, "sevens": 7}[how]
    for i in range(0, len(data), step):
        core.receive_data(data[i : i + step])


STYLES = ["structured", "extended"]
HOW = ["whole", "bytewise", "sevens"]


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("style", STYLES)
def test_status_chunk_is_cut_to_max_extents(style: str, how: str) -> None:
    core = core_for(style, ClientLimits(max_extents=8))
    status = core.request(Cmd.BLOCK_STATUS, 0, 10_000)
    flush = core.request(Cmd.FLUSH, 0, 0)
    lengths = [10 + i for i in range(100)]
    feed(core, status_chunk(style, status, 1, lengths) + header(style, flush, 0, 0), how)
    reply = core.next_event()
    assert reply is not None and reply.cookie == status and reply.error is None
    assert reply.extents == {BASE_ALLOCATION: tuple(Extent(n, 0) for n in lengths[:8])}
    # The rest was drained: the stream is in step, and the next reply completes.
    after = core.next_event()
    assert after is not None and after.cookie == flush and after.error is None
    assert core.in_flight == 0 and not core.closed


def test_status_chunk_default_bound() -> None:
    core = core_for("structured")
    cookie = core.request(Cmd.BLOCK_STATUS, 0, 1 << 20)
    core.receive_data(status_chunk("structured", cookie, 1, [1] * 70_000))
    reply = core.next_event()
    assert reply is not None and reply.extents is not None
    assert len(reply.extents[BASE_ALLOCATION]) == 65_536


def test_status_share_per_context() -> None:
    core = core_for("structured", ClientLimits(max_extents=10), dirty=True)
    cookie = core.request(Cmd.BLOCK_STATUS, 0, 1000)
    core.receive_data(
        status_chunk("structured", cookie, 2, [1] * 20, done=False)
        + status_chunk("structured", cookie, 1, [2] * 3)
    )
    reply = core.next_event()
    assert reply is not None and reply.extents is not None
    assert len(reply.extents[DIRTY]) == 5 and len(reply.extents[BASE_ALLOCATION]) == 3


def pieces(head: bytes, unit: bytes, count: int, size: int = 64 * 1024) -> Iterator[bytes]:
    """``head`` then ``count`` copies of ``unit``, in pieces of ``size`` bytes, made
    one at a time (so that the wire itself is never in memory)."""
    yield head
    per = size // len(unit)
    block = unit * per
    while count:
        n = min(per, count)
        yield block if n == per else unit * n
        count -= n


@pytest.mark.parametrize("style", STYLES)
def test_a_16_mib_status_chunk_is_not_buffered(style: str) -> None:
    # The finding: one 16 MiB chunk (2^21 - 1 descriptors) took +128 MiB and 1.7 s.
    core = core_for(style)
    n = (1 << 20) - 1 if style == "extended" else (1 << 21) - 1
    cookie = core.request(Cmd.BLOCK_STATUS, 0, 1 << 22)
    if style == "extended":
        head = header(style, cookie, STATUS_EXT, 8 + 16 * n) + struct.pack(">II", 1, n)
        unit = struct.pack(">QQ", 1, 0)
    else:
        head = header(style, cookie, STATUS, 4 + 8 * n) + struct.pack(">I", 1)
        unit = struct.pack(">II", 1, 0)

    def run() -> None:
        for piece in pieces(head, unit, n):
            core.receive_data(piece)

    _, peak = peak_of(run)
    reply = core.next_event()
    assert reply is not None and reply.extents is not None
    assert len(reply.extents[BASE_ALLOCATION]) == 65_536
    # 65,536 Extent objects (about 4 MiB), the kept bytes (1 MiB at most), the drain.
    assert peak < 8 * MiB, f"the reply held {peak} bytes"


@pytest.mark.parametrize("style", STYLES)
def test_status_chunk_judged_on_its_header(style: str) -> None:
    """Chunks that cannot be valid fail when their header arrives, before a payload
    byte is awaited."""
    width = 16 if style == "extended" else 8
    head = 8 if style == "extended" else 4
    type_ = STATUS_EXT if style == "extended" else STATUS
    cases = [
        # REQ_ONE answered with two extents
        (CmdFlag.REQ_ONE, 4096, header(style, 1, type_, head + 2 * width), "REQ_ONE"),
        # more extents than bytes asked
        (0, 10, header(style, 1, type_, head + 11 * width), "11 extents"),
        # no whole number of descriptors
        (0, 4096, header(style, 1, type_, head + width + 1), "bad length"),
        (0, 4096, header(style, 1, type_, head), "bad length"),
        # the other width
        (0, 4096, header(style, 1, STATUS + STATUS_EXT - type_, head + width), "width"),
        # an error offset chunk longer than its fields
        (0, 4096, header(style, 1, ERROR_OFFSET, 6 + 4096 + 9), "ERROR_OFFSET"),
    ]
    for flags, length, data, match in cases:
        core = core_for(style)
        core.request(Cmd.BLOCK_STATUS, 0, length, flags)
        with pytest.raises(ProtocolError, match=match):
            core.receive_data(data)
        assert core.closed


def test_cut_extents_must_lie_in_the_request() -> None:
    # With some extents cut, every kept one is not the chunk's last: it must end
    # within the request.
    core = core_for("structured", ClientLimits(max_extents=3))
    cookie = core.request(Cmd.BLOCK_STATUS, 0, 100)
    with pytest.raises(ProtocolError, match="run past"):
        core.receive_data(status_chunk("structured", cookie, 1, [40, 40, 40, 40]))


def test_cut_extended_chunk_still_checks_its_count() -> None:
    core = core_for("extended", ClientLimits(max_extents=2))
    cookie = core.request(Cmd.BLOCK_STATUS, 0, 100)
    with pytest.raises(ProtocolError, match="count mismatch"):
        core.receive_data(status_chunk("extended", cookie, 1, [1] * 5, count=4))


# --- transmission: error chunks -------------------------------------------------------------


@pytest.mark.parametrize("type_", [ERROR, 0x8077])
@pytest.mark.parametrize("how", HOW)
def test_error_chunk_tail_is_drained(type_: int, how: str) -> None:
    core = core_for("structured")
    cookie = core.request(Cmd.FLUSH, 0, 0)
    other = core.request(Cmd.FLUSH, 0, 0)
    tail = bytes(1 * MiB if how == "whole" else 8192)
    payload = struct.pack(">IH", 5, 4) + b"oops" + tail
    data = header("structured", cookie, type_, len(payload)) + payload
    feed(core, data + header("structured", other, 0, 0), how)
    reply = core.next_event()
    assert reply is not None and isinstance(reply.error, RequestError)
    assert reply.error.errno == 5 and "oops" in str(reply.error)
    after = core.next_event()
    assert after is not None and after.cookie == other and after.error is None


def test_a_long_error_chunk_is_not_buffered() -> None:
    core = core_for("structured")
    cookie = core.request(Cmd.FLUSH, 0, 0)
    length = 16 * MiB

    def run() -> None:
        head = header("structured", cookie, ERROR, length) + struct.pack(">IH", 5, 0)
        for piece in pieces(head, bytes(1024), (length - 6) // 1024):
            core.receive_data(piece)
        core.receive_data(bytes((length - 6) % 1024))

    _, peak = peak_of(run)
    reply = core.next_event()
    assert reply is not None and isinstance(reply.error, RequestError)
    assert peak < 1 * MiB, f"the error chunk held {peak} bytes"


# --- transmission: the ranges of a read's chunks --------------------------------------------


def data_chunk(cookie: int, offset: int, data: bytes, done: bool = False) -> bytes:
    return header("structured", cookie, 1, 8 + len(data), done) + struct.pack(">Q", offset) + data


def hole_chunk(cookie: int, offset: int, size: int) -> bytes:
    return header("structured", cookie, 2, 12, done=False) + struct.pack(">QI", offset, size)


@pytest.mark.parametrize("order", ["forward", "backward"])
def test_read_chunks_in_order_join_into_one_range(order: str) -> None:
    core = core_for("structured", ClientLimits(max_read_ranges=1))
    buf = bytearray(2000)
    cookie = core.read(buf, 0)
    offsets = range(0, 2000, 2) if order == "forward" else range(1998, -1, -2)
    chunks = [
        hole_chunk(cookie, off, 2) if off % 4 else data_chunk(cookie, off, b"ab") for off in offsets
    ]
    core.receive_data(b"".join(chunks) + header("structured", cookie, 0, 0))
    reply = core.next_event()
    assert reply is not None and reply.error is None
    assert buf == b"ab\0\0" * 500


def test_read_chunks_with_gaps_stop_at_max_read_ranges() -> None:
    core = core_for("structured", ClientLimits(max_read_ranges=4))
    cookie = core.read(bytearray(100), 0)
    # Four separate one-byte pieces are allowed; filling a gap joins two of them.
    core.receive_data(b"".join(data_chunk(cookie, off, b"x") for off in (0, 2, 4, 6)))
    core.receive_data(data_chunk(cookie, 1, b"x"))
    core.receive_data(data_chunk(cookie, 8, b"x"))
    with pytest.raises(ProtocolError, match=r"ClientLimits\.max_read_ranges"):
        core.receive_data(hole_chunk(cookie, 10, 1))
    assert core.closed


def test_read_gaps_default_bound() -> None:
    # A read answered with one-byte chunks at every other offset: 1 Mi of them cost
    # 137 MiB and 11.6 s before the bound; the default stops at 4096 ranges.
    core = core_for("structured")
    cookie = core.read(bytearray(1 << 16), 0)
    chunks = b"".join(data_chunk(cookie, 2 * i, b"x") for i in range(4096))
    core.receive_data(chunks)
    with pytest.raises(ProtocolError, match=r"ClientLimits\.max_read_ranges"):
        core.receive_data(data_chunk(cookie, 2 * 4096, b"x"))
