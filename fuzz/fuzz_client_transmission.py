"""Atheris harness: arbitrary server bytes into the client transmission core.

Run: ``scripts/fuzz client-transmission -n EXECUTIONS``, or ``python3
fuzz/fuzz_client_transmission.py -max_total_time=60 [CORPUS_DIR]`` (an empty corpus
directory, or a temporary one, starts from the harness's seed replies). Only pynbd's
documented exceptions (:class:`pynbd.errors.NBDError` subclasses) may escape; the core's
invariants are checked on the way (each request completes once, a failed core is closed,
``receive_buffer`` is never empty, extents obey the request). ``tests/proto/
test_fuzz_smoke.py`` runs :func:`one_input` on Hypothesis-generated inputs.

Input layout: byte 0 picks the reply style and export (see :func:`setup`), byte 1 the
read size (bits 0-6, see :func:`_common.read_size`; bit 7: feed through
``receive_buffer``/``buffer_updated``), byte 2 which requests are in flight (bit i:
``REQUESTS[i]``), the rest is the server's byte stream, then EOF.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fuzz_main, read_size  # (also puts src/ on the path)

from pynbd.errors import NBDError, ProtocolError
from pynbd.proto.constants import BASE_ALLOCATION, Cmd, CmdFlag, TransmissionFlag
from pynbd.proto.handshake import Negotiated
from pynbd.proto.limits import DEFAULT_LIMITS, ClientLimits
from pynbd.proto.transmission import ClientTransmission, Reply

SIZE = 1 << 20
CONTEXTS = {BASE_ALLOCATION: 1, "qemu:dirty-bitmap:b": 2}
TF = TransmissionFlag
FLAGS = (
    TF.HAS_FLAGS | TF.SEND_FLUSH | TF.SEND_FUA | TF.SEND_TRIM | TF.SEND_WRITE_ZEROES
    | TF.SEND_DF | TF.SEND_CACHE | TF.SEND_FAST_ZERO
)  # fmt: skip

# (command, offset, length, flags); submitted in this order, so cookies are 1, 2, ...
# for the requests that byte 2 selects.
REQUESTS: list[tuple[Cmd, int, int, int]] = [
    (Cmd.READ, 0, 1024, 0),
    (Cmd.READ, 4096, 512, CmdFlag.DF),
    (Cmd.WRITE, 8192, 512, CmdFlag.FUA),
    (Cmd.BLOCK_STATUS, 0, 8192, 0),
    (Cmd.BLOCK_STATUS, 4096, 4096, CmdFlag.REQ_ONE),
    (Cmd.FLUSH, 0, 0, 0),
    (Cmd.TRIM, 0, 4096, 0),
    (Cmd.READ, 65536, 0, 0),
]


def setup(byte: int) -> tuple[ClientTransmission, bool]:
    """Byte 0: bits 0-1 reply style (simple, structured, extended, extended with
    BLOCK_STATUS_PAYLOAD), bit 2 block sizes advertised, bit 3 a tiny receive buffer,
    bit 4 disconnect before EOF, bit 5 ``max_extents`` of 2 (status chunks are cut)."""
    style = byte & 3
    n = Negotiated(
        size=SIZE,
        flags=TransmissionFlag(FLAGS | (TF.BLOCK_STATUS_PAYLOAD if style == 3 else 0)),
        structured_replies=style >= 1,
        extended_headers=style >= 2,
        meta_contexts=dict(CONTEXTS) if style >= 1 else {},
        in_transmission=True,
    )
    if byte & 4:
        n.minimum_block, n.preferred_block, n.maximum_payload = 512, 4096, 1 << 20
        n.block_size_advertised = True
    limits = ClientLimits(max_extents=2) if byte & 32 else DEFAULT_LIMITS
    core = ClientTransmission(n, buffer_size=64 if byte & 8 else 128 * 1024, limits=limits)
    return core, bool(byte & 16)


def submit(core: ClientTransmission, mask: int) -> dict[int, tuple[Cmd, int, int, int]]:
    sent: dict[int, tuple[Cmd, int, int, int]] = {}
    for i, (cmd, offset, length, flags) in enumerate(REQUESTS):
        if not mask >> i & 1:
            continue
        if flags & CmdFlag.DF and not core.structured:
            flags = 0
        try:
            cookie = core.request(
                cmd,
                offset,
                length,
                flags,
                buffer=bytearray(b"\xa5" * length) if cmd is Cmd.READ else None,
                payload=b"w" * length if cmd is Cmd.WRITE else None,
                contexts=("qemu:dirty-bitmap:b",) if i == 4 and core.extended else None,
            )
        except NBDError:
            continue  # not possible with this export (alignment, no contexts...)
        sent[cookie] = (cmd, offset, length, flags)
    core.buffers_to_send()
    return sent


def check_reply(
    reply: Reply, sent: dict[int, tuple[Cmd, int, int, int]], done: set[int], max_extents: int
) -> None:
    assert reply.cookie in sent, "a reply for a request never made"
    assert reply.cookie not in done, "a request completed twice"
    done.add(reply.cookie)
    cmd, _, length, flags = sent[reply.cookie]
    assert reply.command is cmd
    if reply.error is not None:
        assert reply.extents is None
        return
    if cmd is Cmd.BLOCK_STATUS:
        assert reply.extents, "a successful block status without extents"
        for name, extents in reply.extents.items():
            assert name in CONTEXTS and extents
            assert all(e.length > 0 for e in extents)
            if flags & CmdFlag.REQ_ONE:
                assert len(extents) == 1 and extents[0].length <= length
            else:
                assert sum(e.length for e in extents[:-1]) < length
                # This request asks for every context: each keeps its share.
                assert len(extents) <= max(1, max_extents // len(CONTEXTS))
    else:
        assert reply.extents is None


def one_input(data: bytes) -> None:
    """The harness body: feed ``data`` to a ClientTransmission; only NBDError escapes."""
    if len(data) < 3:
        return
    core, disconnect = setup(data[0])
    step = read_size(data[1] & 0x7F, len(data) - 3)
    via_buffer = bool(data[1] & 0x80)
    sent = submit(core, data[2])
    done: set[int] = set()
    stream = memoryview(data)[3:]
    feed: Callable[[memoryview], None]

    def feed_data(piece: memoryview) -> None:
        core.receive_data(bytes(piece))

    def feed_buffer(piece: memoryview) -> None:
        while piece:
            buf = core.receive_buffer()
            assert len(buf) > 0, "receive_buffer returned an empty buffer"
            n = min(len(buf), len(piece))
            buf[:n] = piece[:n]
            piece = piece[n:]
            core.buffer_updated(n)

    feed = feed_buffer if via_buffer else feed_data
    try:
        for pos in range(0, len(stream), step):
            feed(stream[pos : pos + step])
            while (reply := core.next_event()) is not None:
                check_reply(reply, sent, done, core.limits.max_extents)
            assert core.in_flight == len(sent) - len(done)
        if disconnect:
            core.disconnect()
        core.receive_data(b"")
    except ProtocolError:
        assert core.closed, "a ProtocolError left the core open"
        with_replies = core.next_event()
        if with_replies is not None:
            check_reply(with_replies, sent, done, core.limits.max_extents)
        return
    except NBDError:
        return
    # A clean EOF: only after NBD_CMD_DISC with nothing left in flight.
    assert disconnect and core.in_flight == 0, "EOF accepted with requests in flight"


# --- seeds ------------------------------------------------------------------------------


def _simple(cookie: int, error: int = 0, data: bytes = b"") -> bytes:
    return struct.pack(">IIQ", 0x67446698, error, cookie) + data


def _chunk(ext: bool, cookie: int, type_: int, payload: bytes, done: bool, offset: int) -> bytes:
    if ext:
        return (
            struct.pack(">IHHQQQ", 0x6E8A278C, int(done), type_, cookie, offset, len(payload))
            + payload
        )
    return struct.pack(">IHHQI", 0x668E33EF, int(done), type_, cookie, len(payload)) + payload


def _structured_replies(ext: bool) -> bytes:
    out = _chunk(ext, 1, 1, struct.pack(">Q", 256) + bytes(range(256)) * 3, False, 0)
    out += _chunk(ext, 1, 2, struct.pack(">QI", 0, 256), False, 0)
    out += _chunk(
        ext, 2, 0x8002, struct.pack(">IH", 5, 2) + b"io" + struct.pack(">Q", 4096), False, 4096
    )
    out += _chunk(ext, 1, 0, b"", True, 0)
    out += _chunk(ext, 2, 0, b"", True, 4096)
    out += _chunk(ext, 3, 0, b"", True, 8192)
    if ext:
        bs = struct.pack(">II", 1, 2) + struct.pack(">QQQQ", 4096, 3, 8192, 0)
        out += _chunk(ext, 4, 6, bs, False, 0)
        out += _chunk(ext, 4, 6, struct.pack(">IIQQ", 2, 1, 8192, 1), True, 0)
        out += _chunk(ext, 5, 6, struct.pack(">IIQQ", 2, 1, 4096, 1), True, 4096)
    else:
        out += _chunk(ext, 4, 5, struct.pack(">IIIII", 1, 4096, 3, 8192, 0), False, 0)
        out += _chunk(ext, 4, 5, struct.pack(">III", 2, 8192, 1), True, 0)
        out += _chunk(ext, 5, 5, struct.pack(">III", 1, 4096, 1), False, 4096)
        out += _chunk(ext, 5, 5, struct.pack(">III", 2, 2048, 1), True, 4096)
    out += _chunk(ext, 6, 0x8001, struct.pack(">IH", 108, 4) + b"bye!", True, 0)
    out += _chunk(ext, 7, 0x8077, struct.pack(">IH", 22, 0) + b"??", True, 0)
    out += _chunk(ext, 8, 0, b"", True, 65536)
    return out


SEEDS: list[bytes] = [
    # simple replies: no block status, so cookies 1-6 are READ READ WRITE FLUSH TRIM READ
    bytes([0, 0, 0xFF]) + _simple(1, 0, bytes(1024)) + _simple(2, 0, bytes(512)) + _simple(3)
    + _simple(4, 5) + _simple(5, 9999) + _simple(6),
    bytes([0x10, 0x90, 0x25]) + _simple(3) + _simple(2) + _simple(1, 0, bytes(1024)),
    bytes([1, 7, 0xFF]) + _structured_replies(False),
    bytes([2, 0x83, 0xFF]) + _structured_replies(True),
    bytes([0x0D, 0x81, 0xFF]) + _structured_replies(False),
    bytes([0x21, 7, 0xFF]) + _structured_replies(False),
    bytes([0x22, 0x83, 0xFF]) + _structured_replies(True),
    bytes([3, 5, 0x18]) + _chunk(True, 1, 6, struct.pack(">IIQQ", 1, 1, 8192, 0), True, 0)
    + _chunk(True, 2, 6, struct.pack(">IIQQ", 2, 1, 4096, 0), True, 4096),
]  # fmt: skip


if __name__ == "__main__":
    fuzz_main("client-transmission", one_input, SEEDS)
