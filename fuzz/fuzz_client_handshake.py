"""Atheris harness: arbitrary server bytes into the client handshake core.

Run: ``scripts/fuzz client-handshake -n EXECUTIONS``, or ``python3
fuzz/fuzz_client_handshake.py -max_total_time=60 [CORPUS_DIR]`` (an empty corpus
directory, or a temporary one, starts from the harness's seed transcripts). The only
exceptions allowed to escape the core are pynbd's documented ones
(:class:`pynbd.errors.NBDError` subclasses); anything else, or a handshake that neither
finishes nor fails, is a crash. ``tests/proto/test_fuzz_smoke.py`` runs :func:`one_input`
on Hypothesis-generated inputs so CI covers it without atheris.

Input layout: byte 0 picks the :class:`HandshakeConfig`, byte 1 the read size (0 means
one byte at a time), the rest is the server's byte stream.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fuzz_main  # (also puts src/ on the path)

from pynbd.errors import NBDError
from pynbd.proto.constants import BASE_ALLOCATION
from pynbd.proto.handshake import (
    NEED_DATA,
    ClientHandshake,
    HandshakeConfig,
    HandshakeDone,
    StartTLS,
    TLSMode,
)


def config_from(byte: int) -> HandshakeConfig:
    """Every config the plan distinguishes, from one byte."""
    return HandshakeConfig(
        export_name="disk" if byte & 0x80 else "",
        tls=(TLSMode.DISABLE, TLSMode.ALLOW, TLSMode.REQUIRE, TLSMode.DISABLE)[byte & 3],
        structured_replies=not byte & 0x04,
        extended_headers=not byte & 0x08,
        meta_contexts=() if byte & 0x40 else (BASE_ALLOCATION, "qemu:dirty-bitmap:b"),
        request_block_size=not byte & 0x40,
        go=not byte & 0x10,
        list_exports=bool(byte & 0x20),
        list_meta_contexts=bool(byte & 0x20),
    )


def check_result(hs: ClientHandshake, event: HandshakeDone) -> None:
    """What a finished handshake must satisfy, whatever the server said."""
    res = event.result
    if res.in_transmission:
        assert res.size is not None, "transmission without an export size"
    if res.extended_headers:
        assert res.structured_replies
    if res.meta_contexts:
        assert res.structured_replies, "meta contexts without structured replies"
    if hs.config.tls is TLSMode.REQUIRE:
        assert res.tls, "TLS was required but the handshake finished without it"
    if res.block_size_advertised:
        m, p, x = res.minimum_block, res.preferred_block, res.maximum_payload
        assert m & (m - 1) == 0 and 1 <= m <= 65536
        assert p & (p - 1) == 0 and p >= max(m, 512)
        assert x == 0xFFFFFFFF or x >= p
    hs.trailing_data  # noqa: B018 - must not raise


def one_input(data: bytes) -> None:
    """The harness body: feed ``data`` to a ClientHandshake; only NBDError may escape."""
    if len(data) < 2:
        return
    hs = ClientHandshake(config_from(data[0]))
    step = data[1] or 1
    stream = memoryview(data)[2:]
    pos = 0
    # Every round either consumes input, sends EOF, or finishes: bounded by the input.
    for _ in range(2 * len(stream) + 64):
        try:
            event = hs.next_event()
        except NBDError:
            return
        hs.data_to_send()
        if event is NEED_DATA:
            chunk = bytes(stream[pos : pos + step])
            pos += len(chunk)
            hs.receive_data(chunk)  # b"" once the input is used up: EOF
        elif isinstance(event, StartTLS):
            try:
                hs.tls_established()
            except NBDError:
                return
        else:
            assert isinstance(event, HandshakeDone)
            check_result(hs, event)
            return
    raise AssertionError("the handshake neither finished nor failed")


# --- seeds ------------------------------------------------------------------------------

_MAGIC = b"NBDMAGICIHAVEOPT"
_REPLY = bytes.fromhex("0003e889045565a9")


def _rep(option: int, reply: int, payload: bytes = b"") -> bytes:
    return _REPLY + struct.pack(">III", option, reply, len(payload)) + payload


def _go(option: int = 7) -> bytes:
    return (
        _rep(option, 3, struct.pack(">HQH", 0, 1 << 20, 0x1ED))
        + _rep(option, 3, struct.pack(">H", 1) + b"disk")
        + _rep(option, 3, struct.pack(">H", 2) + b"a disk")
        + _rep(option, 3, struct.pack(">HIII", 3, 512, 4096, 1 << 20))
        + _rep(option, 1)
    )


SEEDS: list[bytes] = [
    # oldstyle
    bytes([0, 0]) + b"NBDMAGIC" + bytes.fromhex("0000420281861253")
    + struct.pack(">QI", 1 << 20, 1) + bytes(124),
    # non-fixed newstyle, EXPORT_NAME with zeroes
    bytes([0, 7]) + _MAGIC + b"\0\0" + struct.pack(">QH", 1 << 20, 1) + bytes(124),
    # fixed newstyle: ext headers refused, structured ACK, meta context, GO
    bytes([0, 0]) + _MAGIC + b"\0\3" + _rep(11, 0x80000001) + _rep(8, 1)
    + _rep(10, 4, struct.pack(">I", 1) + BASE_ALLOCATION.encode()) + _rep(10, 1) + _go(),
    # extended headers ACK, meta context, GO
    bytes([0, 16]) + _MAGIC + b"\0\3" + _rep(11, 1)
    + _rep(10, 4, struct.pack(">I", 3) + BASE_ALLOCATION.encode()) + _rep(10, 1) + _go(),
    # STARTTLS accepted, then the same
    bytes([2, 0]) + _MAGIC + b"\0\3" + _rep(5, 1) + _rep(11, 1) + _rep(10, 1) + _go(),
    # GO unsupported: EXPORT_NAME fallback without zeroes
    bytes([0, 3]) + _MAGIC + b"\0\3" + _rep(11, 0x80000001) + _rep(8, 1) + _rep(10, 1)
    + _rep(7, 0x80000001) + struct.pack(">QH", 1 << 20, 1),
    # negotiation mode: LIST, ext headers, LIST_META_CONTEXT, INFO, (ABORT)
    bytes([0x30, 0]) + _MAGIC + b"\0\3"
    + _rep(3, 2, struct.pack(">I", 4) + b"disk" + b"desc") + _rep(3, 1) + _rep(11, 1)
    + _rep(9, 4, struct.pack(">I", 0) + BASE_ALLOCATION.encode()) + _rep(9, 1) + _go(6),
]  # fmt: skip


if __name__ == "__main__":
    fuzz_main("client-handshake", one_input, SEEDS)
