"""Atheris harness: arbitrary client bytes into the server transmission core.

Run: ``scripts/fuzz server-transmission -n EXECUTIONS``, or ``python3
fuzz/fuzz_server_transmission.py -max_total_time=60 [CORPUS_DIR]`` (an empty corpus
directory, or a temporary one, starts from the harness's seed requests). Only
:class:`pynbd.errors.ProtocolError` may escape the core, and only where the spec has the
server close: a bad magic, or a payload too large to consume. Anything else, or a core
that has not ended the session once its input is over, is a crash. On the way the
harness checks, from the spec and its own framing of the client's bytes rather than
from the core's code:

- every request handed over is one the client sent (in order), valid for the export
  and what was negotiated (command and flags advertised, range, alignment, payload
  size, meta context ids), with its payload's bytes intact;
- every request gets exactly one reply, whose chunks are well formed and answer it;
  a request refused by the core is answered by the core, in the negotiated form;
- memory stays bounded: a payload gets a buffer only once it passed validation (no
  bigger than the maximum payload, or 8 + 4 * contexts for a block status), the
  receive buffer never grows, and the bytes the core sends of its own accord are
  bounded by a small multiple of the bytes it received.

``tests/server/test_core_fuzz.py`` runs :func:`one_input` on Hypothesis-generated inputs.

Input layout: byte 0 picks what was negotiated and the driver's setup (see
:func:`setup`), byte 1 the read size (bits 0-6, see :func:`_common.read_size`) and the
feeding method (bit 7: scattered into ``receive_buffers``, else ``receive_data``),
byte 2 how the driver answers (see :class:`Driver`), the rest is the client's byte
stream, then EOF.
"""

from __future__ import annotations

import struct
import sys
from collections import deque
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fuzz_main, read_size  # (also puts src/ on the path)

from pynbd.errors import ProtocolError
from pynbd.proto.constants import (
    BASE_ALLOCATION,
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    Err,
    TransmissionFlag,
)
from pynbd.proto.server import (
    DOS_PAYLOAD,
    NEED_DATA,
    BufferPool,
    Disconnect,
    ExportSpec,
    RequestReceived,
    ServerNegotiated,
    ServerTransmission,
)

TF = TransmissionFlag
EXPORTS = [
    ExportSpec(
        "full", 1 << 20, can_flush=True, can_fua=True, can_trim=True, can_zero=True,
        can_fast_zero=True, can_cache=True,
    ),
    ExportSpec("ro", (1 << 20) + 1000, read_only=True, can_flush=True, can_cache=True),
    ExportSpec(
        "blocks", 1 << 20, minimum_block=512, preferred_block=4096, maximum_payload=65536,
        can_flush=True, can_trim=True, can_zero=True,
    ),
    ExportSpec("tiny", 4096, minimum_block=512, preferred_block=4096, maximum_payload=4096),
]  # fmt: skip
#: Flags that each need a transmission flag (spec "Command flags").
FLAG_NEEDS = {
    CmdFlag.FUA: TF.SEND_FUA,
    CmdFlag.DF: TF.SEND_DF,
    CmdFlag.FAST_ZERO: TF.SEND_FAST_ZERO,
}
COMMAND_NEEDS = {
    Cmd.FLUSH: TF.SEND_FLUSH,
    Cmd.TRIM: TF.SEND_TRIM,
    Cmd.WRITE_ZEROES: TF.SEND_WRITE_ZEROES,
    Cmd.CACHE: TF.SEND_CACHE,
}
COMMAND_FLAGS = {
    Cmd.READ: CmdFlag.DF,
    Cmd.WRITE_ZEROES: CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
    Cmd.BLOCK_STATUS: CmdFlag.REQ_ONE,
}
WRITES = (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES)
ERRORS = frozenset(int(e) for e in Err)


@dataclass(frozen=True)
class Setup:
    negotiated: ServerNegotiated
    buffer_size: int
    sink: bool
    pool: bool
    shutdown: bool


@cache
def setup(byte: int) -> Setup:
    """Byte 0: bits 0-1 the replies (simple, structured, extended, extended without a
    meta context), bits 2-3 the export, bit 4 a 64-byte receive buffer (else 4 KiB),
    bit 5 WRITE payloads go to a ``payload_sink``, bit 6 payload buffers from a
    :class:`BufferPool`, bit 7 the server shuts down halfway through the input."""
    style = byte & 3
    export = EXPORTS[byte >> 2 & 3]
    structured, extended = style >= 1, style >= 2
    contexts = {1: BASE_ALLOCATION} if style in (1, 2) else {}
    n = ServerNegotiated(
        export=export,
        flags=export.transmission_flags(
            structured=structured, extended=extended, meta_contexts=bool(contexts)
        ),
        fixed_newstyle=True,
        structured_replies=structured,
        extended_headers=extended,
        meta_contexts=contexts,
        entered_by="go",
    )
    return Setup(
        n, 64 if byte & 0x10 else 4096, bool(byte & 0x20), bool(byte & 0x40), bool(byte & 0x80)
    )


@dataclass
class Sent:
    """One request as framed by the harness from the client's bytes."""

    flags: int
    type: int
    cookie: int
    offset: int
    length: int
    payload: bytes  # as much of it as arrived


def frame(stream: bytes, extended: bool, payload_limit: int) -> tuple[list[Sent], bool]:
    """The requests in the client's stream up to NBD_CMD_DISC or the end, and whether
    the stream breaks the protocol beyond repair (a bad magic, a payload too large)."""
    size = 32 if extended else 28
    out: list[Sent] = []
    pos = 0
    while pos + size <= len(stream):
        if extended:
            magic, flags, type_, cookie, offset, length = struct.unpack_from(">IHHQQQ", stream, pos)
            payload = length if flags & CmdFlag.PAYLOAD_LEN else 0
        else:
            magic, flags, type_, cookie, offset, length = struct.unpack_from(">IHHQQI", stream, pos)
            payload = length if type_ == Cmd.WRITE else 0
        if magic != (EXTENDED_REQUEST_MAGIC if extended else REQUEST_MAGIC):
            return out, True
        if payload > payload_limit:
            return out, True
        pos += size
        out.append(Sent(flags, type_, cookie, offset, length, stream[pos : pos + payload]))
        pos += payload
        if type_ == Cmd.DISC:
            break
    return out, False


def same_request(sent: Sent, ev: RequestReceived) -> bool:
    """Whether ``ev`` is ``sent``, as the spec has it read (WRITE data intact)."""
    if (sent.cookie, sent.type, sent.offset) != (ev.cookie, ev.command, ev.offset):
        return False
    if sent.flags & ~CmdFlag.PAYLOAD_LEN != int(ev.flags):
        return False
    if ev.command is Cmd.WRITE:
        if ev.segments is not None:
            data = b"".join(bytes(s) for s in ev.segments)
        else:
            data = bytes(ev.payload) if ev.payload is not None else b""
        return data == sent.payload
    p = sent.payload
    if ev.command is Cmd.BLOCK_STATUS and sent.flags & CmdFlag.PAYLOAD_LEN:
        # u64 effect length, then the context ids (spec "NBD_CMD_BLOCK_STATUS")
        if len(p) < 12 or len(p) % 4:
            return False
        ids = struct.unpack_from(f">{(len(p) - 8) // 4}I", p, 8)
        return struct.unpack_from(">Q", p)[0] == ev.length and ids == ev.contexts
    return sent.length == ev.length


@dataclass
class Driver:
    """Byte 2: bits 0-1 when requests are answered (at once; after each read, last
    first; at the end; at once, with an error for every other one), bit 2 READs
    answered in pieces (``reply_read_vector``) or with holes (``reply_read_chunks``),
    bits 3-4 how many extents a block status gets (1, 2, 5, or 0: none given)."""

    mode: int
    pieces: bool
    extents: int
    waiting: list[RequestReceived] = field(default_factory=list)

    @classmethod
    def from_byte(cls, byte: int) -> Driver:
        return cls(byte & 3, bool(byte & 4), (1, 2, 5, 0)[byte >> 3 & 3])


class Run:
    """One input's run: the core, the driver's choices, and what was checked so far."""

    def __init__(self, data: bytes) -> None:
        self.setup = s = setup(data[0])
        self.step = read_size(data[1] & 0x7F, len(data) - 3)
        self.scatter = bool(data[1] & 0x80)
        self.driver = Driver.from_byte(data[2])
        self.stream = data[3:]
        n = s.negotiated
        assert n.export is not None
        self.export = n.export
        self.extended = n.extended_headers
        self.structured = n.structured_replies
        self.contexts = n.meta_contexts
        limit = max(self.export.maximum_payload, DOS_PAYLOAD)
        self.sent, self.broken = frame(self.stream, self.extended, limit)
        self.core = ServerTransmission(
            n, buffer_size=s.buffer_size, pool=BufferPool(min_size=64) if s.pool else None
        )
        self.buffer_size = len(self.core._buf)
        if s.sink:
            self.core.payload_sink = self.sink
        # What the sink gave, in order; each becomes one WRITE's segments (the sink is
        # called at a header, perhaps before the previous write's event is taken).
        self.sunk: deque[list[memoryview]] = deque()
        self.matched = 0  # requests of self.sent matched with events so far
        self.events = 0
        self.finals = 0  # replies sent (final chunks or simple replies)
        self.received = 0  # bytes fed
        self.own_output = 0  # bytes the core sent of its own accord (refusals)
        self.ended = False
        self.shut_at: int | None = None  # events so far when the server shut down
        self.payload_at_shutdown = False

    def sink(self, length: int, offset: int) -> list[memoryview] | None:
        if offset & 1:
            return None  # the core's own buffer after all
        first = max(1, length // 3)
        pieces = [memoryview(bytearray(first))]
        if length > first:
            pieces.append(memoryview(bytearray(length - first)))
        self.sunk.append(pieces)
        return pieces

    # -- feeding ----------------------------------------------------------------------

    def feed(self, piece: bytes) -> None:
        core = self.core
        self.received += len(piece)
        if not self.scatter:
            core.receive_data(piece)
        else:
            while piece:
                bufs = core.receive_buffers()
                assert bufs and all(len(b) for b in bufs), "an empty receive buffer"
                total = 0
                for buf in bufs:
                    n = min(len(buf), len(piece) - total)
                    buf[:n] = piece[total : total + n]
                    total += n
                    if total == len(piece):
                        break
                piece = piece[total:]
                core.buffer_updated(total)
        self.own_output += self.take_output(None)
        self.check_memory()

    def check_memory(self) -> None:
        core = self.core
        assert len(core._buf) == self.buffer_size, "the receive buffer grew"
        target = core._target_buf
        pending = core._pending
        if target is not None:
            assert pending is not None
            if pending.command is Cmd.BLOCK_STATUS:
                assert len(target) <= 8 + 4 * len(self.contexts), "a block status buffer"
            else:
                assert pending.command is Cmd.WRITE
                assert len(target) <= self.export.maximum_payload, "a write buffer too big"
        assert self.own_output <= 6 * self.received + 256, "the core's replies outgrow input"

    # -- events and replies -----------------------------------------------------------

    def handle_events(self) -> None:
        core = self.core
        while (event := core.next_event()) is not NEED_DATA:
            if isinstance(event, Disconnect):
                assert not self.ended, "two Disconnects"
                self.ended = True
                continue
            assert isinstance(event, RequestReceived)
            assert not self.ended, "a request after the Disconnect"
            self.events += 1
            if self.shut_at is not None:
                assert self.payload_at_shutdown and self.events == self.shut_at + 1, (
                    "a request taken after the shutdown"
                )
            self.check_request(event)
            d = self.driver
            if d.mode in (1, 2):
                d.waiting.append(event)
            else:
                self.answer(event, error=d.mode == 3 and self.events % 2 == 0)
        if self.driver.mode == 1:
            self.answer_waiting()

    def answer_waiting(self) -> None:
        waiting, self.driver.waiting = self.driver.waiting, []
        for event in reversed(waiting):
            self.answer(event, error=False)

    def check_request(self, ev: RequestReceived) -> None:
        """The event is a request the client sent (the next one like it, after the last
        one matched: requests alike in every field get the same verdict), valid, with
        its payload intact."""
        while True:
            assert self.matched < len(self.sent), "a request the client never sent"
            sent = self.sent[self.matched]
            self.matched += 1
            if same_request(sent, ev):
                break
        flags = TF(self.setup.negotiated.flags)
        cmd = ev.command
        assert cmd is not Cmd.DISC and cmd in (*COMMAND_NEEDS, *COMMAND_FLAGS, Cmd.WRITE)
        if sent.flags & CmdFlag.PAYLOAD_LEN:
            assert self.extended and (
                cmd is Cmd.WRITE or (cmd is Cmd.BLOCK_STATUS and flags & TF.BLOCK_STATUS_PAYLOAD)
            ), f"a payload on {cmd.name}"
        elif self.extended:
            assert cmd is not Cmd.WRITE, "an extended write without NBD_CMD_FLAG_PAYLOAD_LEN"
        if cmd in WRITES:
            assert not flags & TF.READ_ONLY, "a write to a read-only export"
        if cmd in COMMAND_NEEDS:
            assert flags & COMMAND_NEEDS[cmd], f"{cmd.name} was not advertised"
        allowed = COMMAND_FLAGS.get(cmd, CmdFlag(0)) | CmdFlag.FUA
        assert not ev.flags & ~allowed, f"flags {ev.flags!r} on {cmd.name}"
        for flag, needed in FLAG_NEEDS.items():
            assert not ev.flags & flag or flags & needed, f"{flag!r} was not advertised"
        size, minimum = self.export.size, self.export.minimum_block
        if cmd is Cmd.FLUSH:
            assert ev.offset == ev.length == 0
        else:
            assert ev.length > 0, "an empty request handed over"
            assert ev.offset + ev.length <= size, "a request beyond the end"
            end = ev.offset + ev.length
            assert ev.offset % minimum == 0 and (end % minimum == 0 or end == size)
        if cmd in (Cmd.READ, Cmd.WRITE):
            assert ev.length <= self.export.maximum_payload
        if cmd is Cmd.WRITE:
            assert len(sent.payload) == ev.length
            if ev.segments is not None:
                assert ev.payload is None and self.sunk and ev.segments is self.sunk.popleft()
        else:
            assert ev.payload is None and ev.segments is None
        if cmd is Cmd.BLOCK_STATUS:
            assert ev.contexts and set(ev.contexts) <= self.contexts.keys()
            assert len(set(ev.contexts)) == len(ev.contexts)

    def answer(self, ev: RequestReceived, *, error: bool) -> None:
        core, cmd = self.core, ev.command
        if error:
            core.reply_error(ev, Err.EIO, "the harness says no")
        elif cmd is Cmd.READ:
            data = bytes(range(256)) * (ev.length // 256) + bytes(ev.length % 256)
            if not self.driver.pieces or ev.length < 2:
                core.reply_read(ev, data)
            elif ev.offset % 2:
                core.reply_read_vector(ev, [data[:1], memoryview(data)[1:]])
            else:
                half = ev.length // 2
                core.reply_read_chunks(
                    ev, [(ev.offset, data[:half]), (ev.offset + half, ev.length - half)]
                )
        elif cmd is Cmd.BLOCK_STATUS:
            n = self.driver.extents
            piece = max(1, ev.length // max(n, 1))
            core.reply_block_status(
                ev, {c: [(piece, i & 3) for i in range(n)] for c in ev.contexts}
            )
        else:
            core.reply_ok(ev)
        self.check_reply(ev, error)

    def take_output(self, ev: RequestReceived | None, error: bool = False) -> int:
        """Parse what the core queued: replies the core made itself (``ev`` None), or
        the reply to ``ev``. Returns its size."""
        out = b"".join(bytes(b) for b in self.core.buffers_to_send())
        pos, finals = 0, 0
        self.status_ids: list[int] = []
        while pos < len(out):
            assert ev is None or not finals, "bytes after a request's final reply"
            (magic,) = struct.unpack_from(">I", out, pos)
            if magic == SIMPLE_REPLY_MAGIC:
                assert not self.extended, "a simple reply under extended headers"
                _, err, cookie = struct.unpack_from(">IIQ", out, pos)
                pos += 16
                if ev is not None:
                    assert cookie == ev.cookie and (err != 0) == error
                    if not err and ev.command is Cmd.READ:
                        assert not self.structured, "a simple reply to a structured read"
                        pos += ev.length
                        assert pos <= len(out), "a read reply without all its data"
                else:
                    assert err in ERRORS or err == 0
                finals += 1
                continue
            if self.extended:
                assert magic == EXTENDED_REPLY_MAGIC, f"reply magic {magic:#x}"
                _, rflags, kind, cookie, offset, length = struct.unpack_from(">IHHQQQ", out, pos)
                pos += 32
                if ev is not None:
                    assert offset == ev.offset
            else:
                assert self.structured and magic == STRUCTURED_REPLY_MAGIC, f"magic {magic:#x}"
                _, rflags, kind, cookie, length = struct.unpack_from(">IHHQI", out, pos)
                pos += 20
            body = out[pos : pos + length]
            assert len(body) == length, "a chunk longer than what was sent"
            pos += length
            assert not rflags & ~1, f"reply flags {rflags:#x}"
            if ev is not None:
                assert cookie == ev.cookie
                self.check_chunk(ev, kind, body)
            else:
                assert kind in (0, 0x8001) and rflags & 1, "the core's own reply is not final"
            if kind & 0x8000:
                err, mlen = struct.unpack_from(">IH", body)
                assert err in ERRORS and 6 + mlen <= len(body) and mlen <= 4096
            finals += rflags & 1
        if ev is not None:
            assert finals == 1, f"{finals} final replies to one request"
            if ev.command is Cmd.BLOCK_STATUS and not error:
                assert sorted(self.status_ids) == sorted(ev.contexts), "a context unanswered"
        self.finals += finals
        return len(out)

    def check_chunk(self, ev: RequestReceived, kind: int, body: bytes) -> None:
        if kind in (1, 2):  # OFFSET_DATA, OFFSET_HOLE
            assert ev.command is Cmd.READ
            (offset,) = struct.unpack_from(">Q", body)
            size = len(body) - 8 if kind == 1 else struct.unpack_from(">I", body, 8)[0]
            assert ev.offset <= offset and offset + size <= ev.offset + ev.length
        elif kind in (5, 6):  # BLOCK_STATUS(_EXT)
            assert ev.command is Cmd.BLOCK_STATUS
            assert (kind == 6) == self.extended
            (cid,) = struct.unpack_from(">I", body)
            assert cid in ev.contexts
            self.status_ids.append(cid)
            if kind == 6:
                count = struct.unpack_from(">I", body, 4)[0]
                pairs = list(struct.iter_unpack(">QQ", body[8:]))
                assert count == len(pairs)
            else:
                pairs = list(struct.iter_unpack(">II", body[4:]))
            assert pairs and all(length > 0 for length, _ in pairs)
            assert sum(length for length, _ in pairs[:-1]) < ev.length
            if ev.flags & CmdFlag.REQ_ONE:
                assert len(pairs) == 1 and pairs[0][0] <= ev.length
        else:
            assert kind in (0, 0x8001), f"chunk type {kind:#x}"

    def check_reply(self, ev: RequestReceived, error: bool) -> None:
        self.take_output(ev, error)


def one_input(data: bytes) -> None:
    """The harness body: feed ``data`` to a ServerTransmission; only ProtocolError may
    escape, and only where the spec has the server close."""
    if len(data) < 3:
        return
    run = Run(data)
    core, stream, step = run.core, run.stream, run.step
    half = len(stream) // 2
    try:
        for pos in range(0, len(stream), step):
            if run.setup.shutdown and run.shut_at is None and pos >= half:
                run.shut_at = run.events
                run.payload_at_shutdown = core.receiving_payload
                core.shutdown()
            run.feed(stream[pos : pos + step])
            run.handle_events()
        core.buffer_updated(0)  # EOF
        run.handle_events()
    except ProtocolError:
        assert run.broken, "the core gave up on a stream the spec lets it read on"
        run.take_output(None)  # refusals queued before the end
        run.answer_waiting()  # the driver still answers what it took
        assert core.in_flight == 0
        return
    run.answer_waiting()
    assert not run.broken, "the core read on through a broken stream"
    assert run.ended and core.finished, "the input is over and the session is not"
    assert core.in_flight == 0 and core.next_event() is NEED_DATA
    # Every request framed got one reply (the last one's may be missing if its payload
    # never arrived and it was not refused at its header).
    requests = [s for s in run.sent if s.type != Cmd.DISC]
    assert run.finals in (len(requests), len(requests) - 1), (
        f"{run.finals} replies to {len(requests)} requests"
    )
    if run.finals < len(requests):
        last = requests[-1]
        if run.extended:
            expected = last.length if last.flags & CmdFlag.PAYLOAD_LEN else 0
        else:
            expected = last.length if last.type == Cmd.WRITE else 0
        assert len(last.payload) < expected, "a request left unanswered"


# --- seeds ------------------------------------------------------------------------------


def _req(ext: bool, cmd: int, offset: int, length: int, flags: int = 0, cookie: int = 1) -> bytes:
    if ext:
        return struct.pack(">IHHQQQ", EXTENDED_REQUEST_MAGIC, flags, cmd, cookie, offset, length)
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def _session(ext: bool) -> bytes:
    pl = CmdFlag.PAYLOAD_LEN if ext else 0
    out = _req(ext, Cmd.WRITE, 4096, 1024, CmdFlag.FUA | pl, 1) + bytes(range(256)) * 4
    out += _req(ext, Cmd.WRITE, 8192, 1024, pl, 14) + b"w" * 1024
    out += _req(ext, Cmd.READ, 4096, 1024, 0, 2)
    out += _req(ext, Cmd.READ, 0, 512, CmdFlag.DF, 3)
    out += _req(ext, Cmd.TRIM, 0, 4096, 0, 4)
    out += _req(ext, Cmd.WRITE_ZEROES, 8192, 4096, CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO, 5)
    out += _req(ext, Cmd.BLOCK_STATUS, 0, 65536, 0, 6)
    out += _req(ext, Cmd.BLOCK_STATUS, 0, 65536, CmdFlag.REQ_ONE, 7)
    out += _req(ext, Cmd.FLUSH, 0, 0, 0, 8)
    out += _req(ext, Cmd.CACHE, 0, 4096, 0, 9)
    out += _req(ext, Cmd.READ, (1 << 20) - 512, 1024, 0, 10)  # past the end
    out += _req(ext, Cmd.WRITE, 3, 5, pl, 11) + b"12345"  # unaligned for some exports
    out += _req(ext, 77, 0, 0, 0, 12)  # unknown command
    return out + _req(ext, Cmd.DISC, 0, 0, 0, 13)


_PL = CmdFlag.PAYLOAD_LEN

SEEDS: list[bytes] = [
    bytes([0, 0, 0]) + _session(False),
    bytes([1, 7, 1]) + _session(False),
    bytes([2, 0x90, 2]) + _session(True),
    bytes([0x2A, 0x81, 0x0C]) + _session(True),  # extended, the 512-byte export, a sink
    bytes([0x46, 3, 0x1B]) + _session(True),
    bytes([0x9D, 0x40, 0x03]) + _session(False),  # read-only, shutdown halfway
    # block status payloads: valid, long, repeated
    bytes([2, 0, 0x08])
    + _req(True, Cmd.BLOCK_STATUS, 0, 12, _PL, 1) + struct.pack(">QI", 4096, 1)
    + _req(True, Cmd.BLOCK_STATUS, 0, 20, _PL, 2) + struct.pack(">QIII", 4096, 1, 2, 3)
    + _req(True, Cmd.BLOCK_STATUS, 0, 16, _PL, 3) + struct.pack(">QII", 4096, 1, 1),
    # a write over the maximum payload (of the 4 KiB export), then a bad magic
    bytes([0x0C, 0x7F, 0]) + _req(False, Cmd.WRITE, 0, 5000) + bytes(5000) + b"JUNK" * 8,
]  # fmt: skip


if __name__ == "__main__":
    fuzz_main("server-transmission", one_input, SEEDS)
