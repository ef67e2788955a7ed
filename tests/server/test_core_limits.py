"""The server cores under a hostile client: payloads are checked before memory is taken
for them, and a handshake has a bounded number of options (issue 16, findings 1 and 7)."""

from __future__ import annotations

import struct
import tracemalloc
from typing import Any

import pytest

from pynbd.errors import OptionError
from pynbd.proto.constants import IHAVEOPT, NBDMAGIC, OPT_REPLY_MAGIC, Cmd, CmdFlag, Err, Opt, Rep
from pynbd.proto.handshake import HandshakeConfig
from pynbd.proto.server import (
    NEED_DATA,
    Disconnect,
    ExportSpec,
    RequestReceived,
    ServerConfig,
    ServerConnection,
    StartTLS,
    TLSPolicy,
    TransmissionStarted,
)

from .helpers import full_spec, handshake

EXTENDED = HandshakeConfig(meta_contexts=("base:allocation",))
STRUCTURED = HandshakeConfig(extended_headers=False, meta_contexts=("base:allocation",))
SIMPLE = HandshakeConfig(structured_replies=False, extended_headers=False)


def connect(config: HandshakeConfig, spec: ExportSpec | None = None) -> ServerConnection:
    spec = spec or full_spec(size=1 << 30, maximum_payload=1 << 20)
    conn = ServerConnection(ServerConfig({spec.name: spec}, default_export=spec.name))
    handshake(conn, config)
    assert conn.in_transmission
    return conn


def header(conn: ServerConnection, cmd: int, offset: int, length: int, flags: int = 0) -> bytes:
    assert conn.transmission is not None
    if conn.transmission.extended:
        return struct.pack(">IHHQQQ", 0x21E41C71, flags, cmd, 7, offset, length)
    return struct.pack(">IHHQQI", 0x25609513, flags, cmd, 7, offset, length)


def feed_and_measure(conn: ServerConnection, stream: bytes) -> int:
    """Feed ``stream`` as a driver does (into the core's receive buffers); return the
    peak of the memory Python allocated meanwhile (the stream itself is made before)."""
    data = memoryview(stream)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        while data:
            buf = conn.receive_buffer()
            n = min(len(buf), len(data))
            buf[:n] = data[:n]
            data = data[n:]
            conn.buffer_updated(n)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak


def error_of(reply: bytes, structured: bool) -> tuple[int, int]:
    """(cookie, error) of a one-message error reply."""
    if not structured:
        _, error, cookie = struct.unpack_from(">IIQ", reply)
        return cookie, error
    magic = struct.unpack_from(">I", reply)[0]
    if magic == 0x6E8A278C:  # extended
        _, _, kind, cookie, _, _ = struct.unpack_from(">IHHQQQ", reply)
        body = 32
    else:
        _, _, kind, cookie, _ = struct.unpack_from(">IHHQI", reply)
        body = 20
    assert kind & 0x8000, f"not an error chunk: {kind:#x}"
    return cookie, struct.unpack_from(">I", reply, body)[0]


PAYLOAD = 4 << 20  # well within DOS_PAYLOAD: refused, consumed, never buffered


def _unique_ids(n: int) -> bytes:
    return struct.pack(f">{n}I", *range(1, n + 1))


# (case, handshake, request bytes (header and payload), the errno)
REFUSED: dict[str, tuple[HandshakeConfig, Any, Err]] = {
    # Finding 1: the payload names far more ids than contexts were negotiated.
    "block status, long payload of distinct ids": (
        EXTENDED,
        lambda c: (
            header(c, Cmd.BLOCK_STATUS, 0, PAYLOAD, CmdFlag.PAYLOAD_LEN)
            + struct.pack(">Q", 4096)
            + _unique_ids((PAYLOAD - 8) // 4)
        ),
        Err.EINVAL,
    ),
    "block status, long payload of one id": (
        EXTENDED,
        lambda c: (
            header(c, Cmd.BLOCK_STATUS, 0, PAYLOAD, CmdFlag.PAYLOAD_LEN)
            + struct.pack(">Q", 4096)
            + struct.pack(">I", 1) * ((PAYLOAD - 8) // 4)
        ),
        Err.EINVAL,
    ),
    "block status, two ids for one context": (
        EXTENDED,
        lambda c: (
            header(c, Cmd.BLOCK_STATUS, 0, 16, CmdFlag.PAYLOAD_LEN)
            + struct.pack(">QII", 4096, 1, 1)
        ),
        Err.EINVAL,
    ),
    "block status, not 8 + 4n": (
        EXTENDED,
        lambda c: (
            header(c, Cmd.BLOCK_STATUS, 0, PAYLOAD + 1, CmdFlag.PAYLOAD_LEN) + bytes(PAYLOAD + 1)
        ),
        Err.EINVAL,
    ),
    "extended write over the maximum payload": (
        EXTENDED,
        lambda c: header(c, Cmd.WRITE, 0, PAYLOAD, CmdFlag.PAYLOAD_LEN) + bytes(PAYLOAD),
        Err.EINVAL,
    ),
    "compact write over the maximum payload": (
        STRUCTURED,
        lambda c: header(c, Cmd.WRITE, 0, PAYLOAD) + bytes(PAYLOAD),
        Err.EINVAL,
    ),
    "simple write past the end": (
        SIMPLE,
        lambda c: header(c, Cmd.WRITE, (1 << 30) - 512, PAYLOAD) + bytes(PAYLOAD),
        Err.ENOSPC,
    ),
    "read with a payload": (
        EXTENDED,
        lambda c: header(c, Cmd.READ, 0, PAYLOAD, CmdFlag.PAYLOAD_LEN) + bytes(PAYLOAD),
        Err.EINVAL,
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_payload_is_dropped_without_a_buffer(case: str) -> None:
    config, build, errno = REFUSED[case]
    conn = connect(config)
    # The request after it must be read as a request: the stream stays in step.
    after = header(conn, Cmd.FLUSH, 0, 0)
    peak = feed_and_measure(conn, build(conn) + after)
    # Only the core's fixed receive buffer existed before; nothing of the payload's size.
    assert peak < 256 * 1024, f"{peak} bytes allocated to refuse a {PAYLOAD}-byte payload"
    structured = config is not SIMPLE
    assert error_of(conn.data_to_send(), structured) == (7, errno)
    event = conn.next_event()
    assert isinstance(event, RequestReceived) and event.command is Cmd.FLUSH
    assert conn.next_event() is NEED_DATA


def test_valid_block_status_payload_still_served() -> None:
    conn = connect(EXTENDED)
    conn.receive_data(
        header(conn, Cmd.BLOCK_STATUS, 0, 12, CmdFlag.PAYLOAD_LEN) + struct.pack(">QI", 4096, 1)
    )
    event = conn.next_event()
    assert isinstance(event, RequestReceived)
    assert (event.command, event.length, event.contexts) == (Cmd.BLOCK_STATUS, 4096, (1,))


# -- options per handshake -----------------------------------------------------------------


def opened(**kwargs: Any) -> ServerConnection:
    spec = full_spec()
    conn = ServerConnection(ServerConfig({"disk": spec}, default_export="disk", **kwargs))
    assert conn.data_to_send() == struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3)
    conn.receive_data(struct.pack(">I", 3))
    assert conn.next_event() is NEED_DATA
    return conn


def send_option(conn: ServerConnection, opt: int, data: bytes = b"") -> tuple[object, list[int]]:
    """One option in; (the event, the reply types out). The last reply's data goes to
    REPLY_DATA."""
    conn.receive_data(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)
    event = conn.next_event()
    out, replies = conn.data_to_send(), []
    while out:
        magic, _, rep, length = struct.unpack_from(">QIII", out)
        assert magic == OPT_REPLY_MAGIC
        replies.append(rep)
        REPLY_DATA[id(conn)] = out[20 : 20 + length]
        out = out[20 + length :]
    return event, replies


REPLY_DATA: dict[int, bytes] = {}


@pytest.mark.parametrize("limit", [1, 3, 32])
def test_option_after_the_limit_is_refused_and_closes(limit: int) -> None:
    conn = opened(max_options=limit)
    for _ in range(limit):  # refused ones count too
        assert send_option(conn, Opt.LIST, b"x") == (NEED_DATA, [Rep.ERR_INVALID])
    event, replies = send_option(conn, Opt.STRUCTURED_REPLY)
    assert replies == [Rep.ERR_POLICY]
    reason = f"too many options: this server allows {limit} per connection"
    assert REPLY_DATA[id(conn)] == reason.encode()
    assert isinstance(event, Disconnect) and not event.soft
    assert "too many options" in event.reason
    # Nothing more is read or answered.
    assert send_option(conn, Opt.GO) == (NEED_DATA, [])


def test_default_limit_is_32() -> None:
    assert ServerConfig({}).max_options == 32
    conn = opened()
    for _ in range(32):
        assert send_option(conn, Opt.STRUCTURED_REPLY) == (NEED_DATA, [Rep.ACK])
    assert send_option(conn, Opt.STRUCTURED_REPLY)[1] == [Rep.ERR_POLICY]


def test_starttls_resets_negotiation_not_the_count() -> None:
    conn = opened(max_options=3, tls=TLSPolicy.OPTIONAL)
    assert send_option(conn, Opt.STRUCTURED_REPLY) == (NEED_DATA, [Rep.ACK])
    event, replies = send_option(conn, Opt.STARTTLS)
    assert replies == [Rep.ACK] and isinstance(event, StartTLS)
    conn.tls_established()
    assert send_option(conn, Opt.STRUCTURED_REPLY) == (NEED_DATA, [Rep.ACK])
    assert send_option(conn, Opt.STRUCTURED_REPLY)[1] == [Rep.ERR_POLICY]


def test_over_the_limit_option_data_is_never_waited_for() -> None:
    conn = opened(max_options=1)
    send_option(conn, Opt.STRUCTURED_REPLY)
    # A header that announces data which never comes: refused at once.
    conn.receive_data(struct.pack(">QII", IHAVEOPT, Opt.GO, 4000))
    assert isinstance(conn.next_event(), Disconnect)


def test_export_name_over_the_limit_just_closes() -> None:
    conn = opened(max_options=1)
    send_option(conn, Opt.STRUCTURED_REPLY)
    event, replies = send_option(conn, Opt.EXPORT_NAME, b"disk")
    assert replies == [] and isinstance(event, Disconnect) and not event.soft


def test_abort_over_the_limit_is_still_acknowledged() -> None:
    conn = opened(max_options=1)
    send_option(conn, Opt.STRUCTURED_REPLY)
    event, replies = send_option(conn, Opt.ABORT)
    assert replies == [Rep.ACK] and isinstance(event, Disconnect) and event.soft


def test_go_within_the_limit_enters_transmission() -> None:
    conn = opened(max_options=1)
    event, _ = send_option(conn, Opt.GO, struct.pack(">IH", 0, 0))
    assert isinstance(event, TransmissionStarted)


def test_our_client_shows_the_reason() -> None:
    spec = full_spec()
    conn = ServerConnection(ServerConfig({"disk": spec}, default_export="disk", max_options=2))
    with pytest.raises(OptionError, match="too many options: this server allows 2"):
        handshake(conn, EXTENDED)  # extended headers, SET_META_CONTEXT, GO


@pytest.mark.parametrize("limit", [0, -1])
def test_limit_below_one_is_refused(limit: int) -> None:
    with pytest.raises(ValueError, match="max_options"):
        ServerConfig({}, max_options=limit)
