"""The server transmission core, sans-IO: validation, replies, and our client core."""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

import pytest

from pynbd.errors import ProtocolError
from pynbd.proto.constants import (
    EXTENDED_REPLY_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Chunk,
    Cmd,
    CmdFlag,
    Err,
    StateFlag,
    TransmissionFlag,
)
from pynbd.proto.handshake import HandshakeConfig
from pynbd.proto.server import (
    DOS_PAYLOAD,
    MAX_EXTENTS,
    NEED_DATA,
    Disconnect,
    ExportSpec,
    RequestReceived,
    ServerConfig,
    ServerConnection,
)

from .helpers import Pair, full_spec, handshake

MODES = {
    "simple": HandshakeConfig(structured_replies=False, extended_headers=False),
    "structured": HandshakeConfig(extended_headers=False),
    "extended": HandshakeConfig(),
}


def tx(mode: str, spec: ExportSpec | None = None) -> ServerConnection:
    """A server connection in transmission, negotiated by our client core."""
    spec = spec or full_spec()
    conn = ServerConnection(ServerConfig({spec.name: spec}, default_export=spec.name))
    handshake(conn, MODES[mode])
    assert conn.in_transmission
    return conn


def request(
    conn: ServerConnection,
    cmd: int,
    offset: int,
    length: int,
    *,
    flags: int = 0,
    cookie: int = 1,
    payload: bytes = b"",
    payload_len: bool = False,
) -> bytes:
    """A request header in the negotiated form (plus payload)."""
    assert conn.transmission is not None
    if conn.transmission.extended:
        if payload or payload_len:
            flags |= CmdFlag.PAYLOAD_LEN
            length = len(payload)
        head = struct.pack(">IHHQQQ", 0x21E41C71, flags, cmd, cookie, offset, length)
    else:
        head = struct.pack(">IHHQQI", 0x25609513, flags, cmd, cookie, offset, length)
    return head + payload


@dataclass
class Parsed:
    cookie: int
    error: int  # 0 on success
    kind: str  # "simple", or the chunk type's name
    payload: bytes
    done: bool = True
    offset: int | None = None


def parse(conn: ServerConnection, simple_data: int = 0) -> list[Parsed]:
    """Split the server's output into replies; a successful simple reply is followed by
    ``simple_data`` bytes (a read's data)."""
    out = conn.data_to_send()
    result = []
    while out:
        (magic,) = struct.unpack(">I", out[:4])
        if magic == SIMPLE_REPLY_MAGIC:
            _, error, cookie = struct.unpack(">IIQ", out[:16])
            size = 0 if error else simple_data
            result.append(Parsed(cookie, error, "simple", out[16 : 16 + size]))
            out = out[16 + size :]
            continue
        if magic == STRUCTURED_REPLY_MAGIC:
            _, flags, kind, cookie, length = struct.unpack(">IHHQI", out[:20])
            body, out, offset = out[20 : 20 + length], out[20 + length :], None
        else:
            assert magic == EXTENDED_REPLY_MAGIC, hex(magic)
            _, flags, kind, cookie, offset, length = struct.unpack(">IHHQQQ", out[:32])
            body, out = out[32 : 32 + length], out[32 + length :]
        error = struct.unpack(">I", body[:4])[0] if kind & 0x8000 else 0
        result.append(Parsed(cookie, error, Chunk(kind).name, body, bool(flags & 1), offset))
    return result


def one_error(conn: ServerConnection) -> int:
    (reply,) = parse(conn)
    assert reply.done
    return reply.error


def events(conn: ServerConnection) -> list[object]:
    found: list[object] = []
    while (event := conn.next_event()) is not NEED_DATA:
        found.append(event)
    return found


ALL = pytest.mark.parametrize("mode", list(MODES))
STRUCTURED = pytest.mark.parametrize("mode", ["structured", "extended"])


# -- validation -------------------------------------------------------------------------


@ALL
@pytest.mark.parametrize(
    ("cmd", "offset", "length", "flags", "error"),
    [
        (99, 0, 512, 0, Err.EINVAL),  # unknown command
        (Cmd.RESIZE, 0, 512, 0, Err.EINVAL),  # not supported
        (Cmd.READ, 0, 512, 0x40, Err.EINVAL),  # unknown flag bit
        (Cmd.READ, 0, 512, 0x8000, Err.EINVAL),  # unknown high flag bit
        (Cmd.READ, 0, 512, CmdFlag.REQ_ONE, Err.EINVAL),  # flag of another command
        (Cmd.TRIM, 0, 512, CmdFlag.NO_HOLE, Err.EINVAL),
        (Cmd.FLUSH, 512, 0, 0, Err.EINVAL),  # offset must be 0
        (Cmd.READ, 1 << 20, 1, 0, Err.EINVAL),  # past the end
        (Cmd.READ, 2**63, 512, 0, Err.EINVAL),
        (Cmd.TRIM, (1 << 20) - 512, 1024, 0, Err.EINVAL),
        (Cmd.CACHE, 1 << 21, 1, 0, Err.EINVAL),
        (Cmd.WRITE_ZEROES, (1 << 20) - 512, 1024, 0, Err.ENOSPC),  # writes: ENOSPC
    ],
)
def test_refused_requests(
    mode: str, cmd: int, offset: int, length: int, flags: int, error: Err
) -> None:
    conn = tx(mode)
    conn.receive_data(request(conn, cmd, offset, length, flags=flags, cookie=42))
    assert events(conn) == []
    (reply,) = parse(conn)
    assert (reply.cookie, reply.error) == (42, error)
    # The connection lives: the next request is served.
    conn.receive_data(request(conn, Cmd.FLUSH, 0, 0, cookie=43))
    (event,) = events(conn)
    assert isinstance(event, RequestReceived) and event.cookie == 43


@ALL
def test_block_status_needs_a_context(mode: str) -> None:
    conn = tx(mode, full_spec())
    conn.transmission.contexts.clear()  # type: ignore[union-attr]
    conn.receive_data(request(conn, Cmd.BLOCK_STATUS, 0, 512))
    assert one_error(conn) == Err.EINVAL


@ALL
def test_block_status_of_zero_bytes(mode: str) -> None:
    conn = tx(mode)
    conn.receive_data(request(conn, Cmd.BLOCK_STATUS, 0, 0))
    assert one_error(conn) == Err.EINVAL


@pytest.mark.parametrize(
    ("cmd", "flags", "missing"),
    [
        (Cmd.FLUSH, 0, "can_flush"),
        (Cmd.TRIM, 0, "can_trim"),
        (Cmd.WRITE_ZEROES, 0, "can_zero"),
        (Cmd.CACHE, 0, "can_cache"),
        (Cmd.WRITE, CmdFlag.FUA, "can_fua"),
        (Cmd.WRITE_ZEROES, CmdFlag.FAST_ZERO, "can_fast_zero"),
    ],
)
def test_unadvertised_commands_and_flags(cmd: Cmd, flags: int, missing: str) -> None:
    conn = tx("structured", full_spec("disk", 1 << 20, **{missing: False}))
    payload = b"x" * 512 if cmd is Cmd.WRITE else b""
    conn.receive_data(
        request(conn, cmd, 0, 0 if cmd is Cmd.FLUSH else 512, flags=flags, payload=payload)
    )
    assert events(conn) == []
    assert one_error(conn) == Err.EINVAL


def test_df_needs_structured_replies() -> None:
    conn = tx("simple")
    conn.receive_data(request(conn, Cmd.READ, 0, 512, flags=CmdFlag.DF))
    assert one_error(conn) == Err.EINVAL
    conn = tx("structured")
    conn.receive_data(request(conn, Cmd.READ, 0, 512, flags=CmdFlag.DF))
    (event,) = events(conn)
    assert isinstance(event, RequestReceived) and event.flags == CmdFlag.DF


@ALL
def test_fua_is_accepted_on_any_command_once_advertised(mode: str) -> None:
    conn = tx(mode)
    conn.receive_data(request(conn, Cmd.READ, 0, 512, flags=CmdFlag.FUA))
    (event,) = events(conn)
    assert isinstance(event, RequestReceived) and event.fua


@ALL
@pytest.mark.parametrize("cmd", [Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES])
def test_read_only_refuses_writes_with_eperm(mode: str, cmd: Cmd) -> None:
    conn = tx(mode, full_spec(read_only=True))
    payload = b"w" * 512 if cmd is Cmd.WRITE else b""
    conn.receive_data(request(conn, cmd, 0, 512, payload=payload, cookie=5))
    conn.receive_data(request(conn, Cmd.READ, 0, 512, cookie=6))
    (event,) = events(conn)  # the write's payload was consumed, the read follows
    assert isinstance(event, RequestReceived) and event.cookie == 6
    (reply,) = parse(conn)
    assert (reply.cookie, reply.error) == (5, Err.EPERM)


@ALL
def test_write_past_the_end_is_enospc_and_payload_consumed(mode: str) -> None:
    conn = tx(mode)
    conn.receive_data(request(conn, Cmd.WRITE, (1 << 20) - 100, 200, payload=b"p" * 200))
    conn.receive_data(request(conn, Cmd.FLUSH, 0, 0, cookie=2))
    assert [e.cookie for e in events(conn)] == [2]  # type: ignore[attr-defined]
    assert one_error(conn) == Err.ENOSPC


@ALL
def test_alignment(mode: str) -> None:
    spec = full_spec(size=(1 << 20) + 100, minimum_block=512)
    for offset, length in [(1, 512), (0, 100), (512, 513)]:
        conn = tx(mode, spec)
        conn.receive_data(request(conn, Cmd.READ, offset, length))
        assert one_error(conn) == Err.EINVAL, (offset, length)
    # The unaligned tail of an unaligned export is reachable.
    conn = tx(mode, spec)
    conn.receive_data(request(conn, Cmd.READ, 1 << 20, 100))
    assert len(events(conn)) == 1


@ALL
def test_read_over_max_payload(mode: str) -> None:
    conn = tx(mode, full_spec(size=1 << 30, maximum_payload=1 << 20))
    conn.receive_data(request(conn, Cmd.READ, 0, (1 << 20) + 4096))
    expected = Err.EINVAL if mode == "simple" else Err.EOVERFLOW
    assert one_error(conn) == expected


@ALL
def test_write_over_max_payload_is_consumed(mode: str) -> None:
    conn = tx(mode, full_spec(size=1 << 30, maximum_payload=1 << 20))
    data = b"z" * ((1 << 20) + 4096)
    conn.receive_data(request(conn, Cmd.WRITE, 0, len(data), payload=data))
    conn.receive_data(request(conn, Cmd.FLUSH, 0, 0, cookie=2))
    assert [e.cookie for e in events(conn)] == [2]  # type: ignore[attr-defined]
    assert one_error(conn) == Err.EINVAL


@ALL
def test_payload_beyond_dos_limit_is_fatal(mode: str) -> None:
    conn = tx(mode, full_spec(size=1 << 40))
    assert conn.transmission is not None
    if conn.transmission.extended:
        head = struct.pack(
            ">IHHQQQ", 0x21E41C71, CmdFlag.PAYLOAD_LEN, Cmd.WRITE, 1, 0, DOS_PAYLOAD + 1
        )
    else:
        head = struct.pack(">IHHQQI", 0x25609513, 0, Cmd.WRITE, 1, 0, DOS_PAYLOAD + 1)
    with pytest.raises(ProtocolError, match="too large"):
        conn.receive_data(head)
    with pytest.raises(ProtocolError):
        conn.next_event()


@ALL
def test_bad_magic_is_fatal(mode: str) -> None:
    conn = tx(mode)
    with pytest.raises(ProtocolError, match="magic"):
        conn.receive_data(struct.pack(">IHHQQQ", 0x12345678, 0, 0, 1, 0, 512))


def test_compact_request_magic_refused_under_extended_headers() -> None:
    conn = tx("extended")
    with pytest.raises(ProtocolError, match="magic"):
        conn.receive_data(struct.pack(">IHHQQI", 0x25609513, 0, 0, 1, 0, 512) + bytes(4))


def test_payload_len_needs_extended_headers() -> None:
    conn = tx("structured")
    conn.receive_data(request(conn, Cmd.READ, 0, 512, flags=CmdFlag.PAYLOAD_LEN))
    assert one_error(conn) == Err.EINVAL


def test_extended_write_needs_payload_len() -> None:
    conn = tx("extended")
    conn.receive_data(struct.pack(">IHHQQQ", 0x21E41C71, 0, Cmd.WRITE, 1, 0, 512))
    conn.receive_data(request(conn, Cmd.FLUSH, 0, 0, cookie=2))
    assert [e.cookie for e in events(conn)] == [2]  # type: ignore[attr-defined]
    assert one_error(conn) == Err.EINVAL


def test_extended_payload_on_a_read_is_consumed_and_refused() -> None:
    conn = tx("extended")
    conn.receive_data(request(conn, Cmd.READ, 0, 0, payload=b"junk" * 10))
    conn.receive_data(request(conn, Cmd.FLUSH, 0, 0, cookie=2))
    assert [e.cookie for e in events(conn)] == [2]  # type: ignore[attr-defined]
    assert one_error(conn) == Err.EINVAL


def status_payload(length: int, *ids: int) -> bytes:
    return struct.pack(f">Q{len(ids)}I", length, *ids)


def test_block_status_payload_form() -> None:
    conn = tx("extended")
    assert conn.transmission is not None
    assert conn.transmission.flags & TransmissionFlag.BLOCK_STATUS_PAYLOAD
    (cid,) = conn.transmission.contexts
    conn.receive_data(request(conn, Cmd.BLOCK_STATUS, 4096, 0, payload=status_payload(8192, cid)))
    (event,) = events(conn)
    assert isinstance(event, RequestReceived)
    assert (event.offset, event.length, event.contexts, event.payload) == (4096, 8192, (cid,), None)
    assert not event.flags & CmdFlag.PAYLOAD_LEN


@pytest.mark.parametrize(
    "payload",
    [
        status_payload(8192),  # no id
        status_payload(8192, 1, 1),  # repeated
        status_payload(8192, 99),  # unknown
        status_payload(8192, 1) + b"x",  # not 8 + 4n
        status_payload(1 << 40, 1),  # past the end
    ],
)
def test_block_status_payload_refused(payload: bytes) -> None:
    conn = tx("extended")
    conn.receive_data(request(conn, Cmd.BLOCK_STATUS, 0, 0, payload=payload))
    conn.receive_data(request(conn, Cmd.FLUSH, 0, 0, cookie=2))
    assert [e.cookie for e in events(conn)] == [2]  # type: ignore[attr-defined]
    assert one_error(conn) == Err.EINVAL


@ALL
@pytest.mark.parametrize("cmd", [Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.CACHE])
def test_zero_length_requests_succeed_without_a_backend(mode: str, cmd: Cmd) -> None:
    conn = tx(mode)
    conn.receive_data(request(conn, cmd, 4096, 0, cookie=3, payload_len=cmd is Cmd.WRITE))
    assert events(conn) == []
    (reply,) = parse(conn)
    assert (reply.cookie, reply.error) == (3, 0)
    if mode == "structured" and cmd is Cmd.READ:
        assert reply.kind == "NONE"  # a read never gets a simple reply here


@ALL
def test_disc_ends_the_session_and_later_input_is_ignored(mode: str) -> None:
    conn = tx(mode)
    conn.receive_data(request(conn, Cmd.READ, 0, 512, cookie=1))
    conn.receive_data(request(conn, Cmd.DISC, 0, 0) + b"garbage after DISC")
    read, disc = events(conn)
    assert isinstance(disc, Disconnect) and disc.soft
    assert isinstance(read, RequestReceived)
    conn.reply_read(read, bytes(512))  # in-flight requests are still answered
    assert parse(conn, simple_data=512)[0].cookie == 1
    conn.receive_data(b"")
    assert events(conn) == []


@ALL
def test_eof(mode: str) -> None:
    conn = tx(mode)
    conn.receive_data(b"")
    (event,) = events(conn)
    assert isinstance(event, Disconnect) and not event.soft
    conn = tx(mode)
    conn.receive_data(request(conn, Cmd.WRITE, 0, 512, payload=b"x" * 512)[:-10])
    conn.receive_data(b"")
    (event,) = events(conn)
    assert isinstance(event, Disconnect) and "middle" in event.reason


@ALL
def test_shutdown_refuses_new_requests(mode: str) -> None:
    conn = tx(mode)
    conn.receive_data(request(conn, Cmd.READ, 0, 512, cookie=1))
    (read,) = events(conn)
    conn.shutdown()
    conn.receive_data(request(conn, Cmd.READ, 0, 512, cookie=2))
    assert events(conn) == []
    assert [(r.cookie, r.error) for r in parse(conn)] == [(2, Err.ESHUTDOWN)]
    assert isinstance(read, RequestReceived)
    conn.reply_read(read, bytes(512))
    assert [(r.cookie, r.error) for r in parse(conn, simple_data=512)] == [(1, 0)]


# -- the reply API ----------------------------------------------------------------------


def test_reply_misuse_raises_value_error() -> None:
    conn = tx("structured")
    conn.receive_data(request(conn, Cmd.READ, 0, 512, cookie=1))
    conn.receive_data(request(conn, Cmd.FLUSH, 0, 0, cookie=2))
    read, flush = events(conn)
    assert isinstance(read, RequestReceived) and isinstance(flush, RequestReceived)
    with pytest.raises(ValueError):
        conn.reply_ok(read)
    with pytest.raises(ValueError):
        conn.reply_read(read, bytes(511))
    with pytest.raises(ValueError):
        conn.reply_error(flush, errno.EACCES)  # 13 is not an NBD error value
    conn.reply_ok(flush)
    with pytest.raises(ValueError, match="already"):
        conn.reply_ok(flush)
    with pytest.raises(ValueError):
        conn.reply_block_status(read, {})
    assert conn.in_flight == 1


@ALL
def test_error_reply_form(mode: str) -> None:
    conn = tx(mode)
    conn.receive_data(request(conn, Cmd.READ, 4096, 512, cookie=9))
    (read,) = events(conn)
    assert isinstance(read, RequestReceived)
    conn.reply_error(read, Err.EIO, "disk on fire" * 1000)
    (reply,) = parse(conn)
    assert reply.error == Err.EIO
    if mode == "simple":
        assert reply.kind == "simple"
    else:
        assert reply.kind == "ERROR"
        (mlen,) = struct.unpack(">H", reply.payload[4:6])
        assert mlen <= 4096 and reply.payload[6:].startswith(b"disk on fire")
    if mode == "extended":
        assert reply.offset == 4096


def block_status(conn: ServerConnection, length: int, flags: int = 0) -> RequestReceived:
    conn.receive_data(request(conn, Cmd.BLOCK_STATUS, 0, length, flags=flags))
    (event,) = events(conn)
    assert isinstance(event, RequestReceived)
    return event


def descriptors(conn: ServerConnection) -> list[tuple[int, int]]:
    (reply,) = parse(conn)
    if reply.kind == "BLOCK_STATUS_EXT":
        count = struct.unpack(">I", reply.payload[4:8])[0]
        pairs = list(struct.iter_unpack(">QQ", reply.payload[8:]))
        assert count == len(pairs)
        return pairs
    assert reply.kind == "BLOCK_STATUS"
    return list(struct.iter_unpack(">II", reply.payload[4:]))


@STRUCTURED
def test_block_status_extents_are_merged_and_clipped(mode: str) -> None:
    conn = tx(mode)
    event = block_status(conn, 10000)
    extents = [(1000, 0), (1000, 0), (3000, 3), (1 << 30, 0), (5, 3)]
    conn.reply_block_status(event, {c: extents for c in event.contexts})
    assert descriptors(conn) == [(2000, 0), (3000, 3), (5000, 0)]


@STRUCTURED
def test_block_status_req_one_and_empty(mode: str) -> None:
    conn = tx(mode)
    event = block_status(conn, 4096, CmdFlag.REQ_ONE)
    conn.reply_block_status(event, {c: [(512, 3), (512, 0)] for c in event.contexts})
    assert descriptors(conn) == [(512, 3)]
    event = block_status(conn, 4096)
    conn.reply_block_status(event, {})
    assert descriptors(conn) == [(4096, 0)]
    event = block_status(conn, 4096)
    with pytest.raises(ValueError):
        conn.reply_block_status(event, {c: [(0, 0)] for c in event.contexts})


def test_block_status_caps_the_extent_count() -> None:
    conn = tx("structured")
    event = block_status(conn, 1 << 20)
    flip = [(1, i & 1) for i in range(MAX_EXTENTS + 10)]
    conn.reply_block_status(event, {c: flip for c in event.contexts})
    assert len(descriptors(conn)) == MAX_EXTENTS


@ALL
def test_write_payload_lands_in_its_own_buffer(mode: str) -> None:
    conn = tx(mode)
    head = request(conn, Cmd.WRITE, 0, 200000, payload=b"q" * 200000)
    header_size = len(head) - 200000
    conn.receive_data(head[:header_size])
    buf = conn.receive_buffer()
    assert len(buf) == 200000  # a view of the payload buffer: no copy on the way
    buf[:] = head[header_size:]
    conn.buffer_updated(200000)
    (event,) = events(conn)
    assert isinstance(event, RequestReceived) and bytes(event.payload or b"") == b"q" * 200000


# -- against our client core ------------------------------------------------------------


@ALL
@pytest.mark.parametrize("bytewise", [False, True])
def test_client_core_every_command(mode: str, bytewise: bool) -> None:
    pair = Pair(config=MODES[mode])
    client = pair.client
    data = bytes(range(256)) * 40
    buf = bytearray(len(data))
    client.request(Cmd.WRITE, 1000, len(data), CmdFlag.FUA, payload=data)
    client.request(Cmd.READ, 1000, len(data), buffer=buf)
    client.request(Cmd.FLUSH, 0, 0)
    client.request(Cmd.TRIM, 0, 512, CmdFlag.FUA)
    client.request(Cmd.WRITE_ZEROES, 512, 512, CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO)
    client.request(Cmd.CACHE, 0, 4096)
    if mode != "simple":
        client.request(Cmd.BLOCK_STATUS, 0, 1 << 20, CmdFlag.REQ_ONE)
        client.request(Cmd.READ, 0, 512, CmdFlag.DF, buffer=bytearray(512))
    if bytewise:
        out = client.data_to_send()
        for i in range(len(out)):
            pair.server.receive_data(out[i : i + 1])
        pair.store.serve(pair.server)
        reply = pair.server.data_to_send()
        for i in range(len(reply)):
            client.receive_data(reply[i : i + 1])
        replies = []
        while (r := client.next_event()) is not None:
            replies.append(r)
    else:
        replies = pair.run()
    assert len(replies) == (8 if mode != "simple" else 6)
    assert all(r.error is None for r in replies), replies
    assert buf == data
    flags = [e.flags for e in pair.store.log]
    assert flags[0] == CmdFlag.FUA and flags[4] == CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO
    assert pair.server.in_flight == 0


@STRUCTURED
def test_client_core_reads_holes(mode: str) -> None:
    pair = Pair(config=MODES[mode])
    buf = bytearray(b"\xff" * 3000)
    pair.client.request(Cmd.READ, 1000, 3000, buffer=buf)
    pair.server.receive_data(pair.client.data_to_send())
    (event,) = events(pair.server)
    assert isinstance(event, RequestReceived)
    pair.server.reply_read_chunks(event, [(1000, b"a" * 1000), (2000, 1500), (3500, b"b" * 500)])
    pair.client.receive_data(pair.server.data_to_send())
    (reply,) = [pair.client.next_event()]
    assert reply is not None and reply.error is None
    assert buf == b"a" * 1000 + bytes(1500) + b"b" * 500


@ALL
def test_read_chunks_join_without_structured_replies_or_with_df(mode: str) -> None:
    conn = tx(mode)
    flags = CmdFlag.DF if mode != "simple" else 0
    conn.receive_data(request(conn, Cmd.READ, 0, 1024, flags=flags))
    (event,) = events(conn)
    assert isinstance(event, RequestReceived)
    with pytest.raises(ValueError):
        conn.reply_read_chunks(event, [(0, b"x" * 10)])  # does not cover the request
    conn.reply_read_chunks(event, [(0, b"x" * 24), (24, 1000)])
    out = conn.data_to_send()
    assert out.endswith(b"x" * 24 + bytes(1000))  # one content chunk / simple data


def test_client_core_block_status_on_a_second_context_list() -> None:
    pair = Pair(config=MODES["extended"])
    pair.client.request(Cmd.BLOCK_STATUS, 0, 8192)
    pair.server.receive_data(pair.client.data_to_send())
    (event,) = events(pair.server)
    assert isinstance(event, RequestReceived)
    hole = int(StateFlag.HOLE | StateFlag.ZERO)
    extents = [(4096, hole), (4096, 0)]
    pair.server.reply_block_status(event, {c: extents for c in event.contexts})
    pair.client.receive_data(pair.server.data_to_send())
    reply = pair.client.next_event()
    assert reply is not None and reply.extents is not None
    assert [(e.length, e.flags) for e in reply.extents["base:allocation"]] == [
        (4096, hole),
        (4096, 0),
    ]
