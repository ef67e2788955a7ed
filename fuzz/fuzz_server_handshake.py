"""Atheris harness: arbitrary client bytes into the server handshake core.

Run: ``scripts/fuzz server-handshake -n EXECUTIONS``, or ``python3
fuzz/fuzz_server_handshake.py -max_total_time=60 [CORPUS_DIR]`` (an empty corpus
directory, or a temporary one, starts from the harness's seed transcripts). Only
:class:`pynbd.errors.ProtocolError` may escape the core, and a failed core stays failed;
anything else, or a handshake that neither finishes nor fails by the end of its input,
is a crash. On the way the harness checks, from the spec and not from the core's code:

- the server's bytes are the greeting, then option replies that answer the client's
  options in order (every reply names the option it answers; each option gets its
  final reply, ACK or an error, before the next one's replies), and nothing after
  NBD_OPT_EXPORT_NAME but its export reply;
- no more than ``max_options`` options are answered, plus the refusal of the next;
- what entered transmission is consistent (the export exists, TLS where required,
  NBD_INFO_BLOCK_SIZE where required, extended headers imply structured replies...);
- memory stays bounded: the core never holds more input than one option header, its
  largest allowed data and the last read, and the bytes it sends are bounded by the
  number of options answered, not by what the client sends.

``tests/server/test_core_fuzz.py`` runs :func:`one_input` on Hypothesis-generated inputs.

Input layout: byte 0 picks the :class:`ServerConfig` (see :func:`config_from`), byte 1
the read size (bits 0-6, 0 meaning one byte at a time) and the feeding method (bit 7:
the core's ``receive_buffer``/``buffer_updated`` rather than ``receive_data``), the rest
is the client's byte stream, then EOF.
"""

from __future__ import annotations

import struct
import sys
from functools import cache
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fuzz_main  # (also puts src/ on the path)

from pynbd.errors import ProtocolError
from pynbd.proto.constants import (
    BASE_ALLOCATION,
    IHAVEOPT,
    NBDMAGIC,
    OPT_REPLY_MAGIC,
    REP_ERROR_BIT,
    Opt,
    Rep,
)
from pynbd.proto.server import (
    NEED_DATA,
    Disconnect,
    ExportSpec,
    ServerConfig,
    ServerConnection,
    StartTLS,
    TLSPolicy,
    TransmissionStarted,
)
from pynbd.proto.server_handshake import State

EXPORTS = {
    "disk": ExportSpec(
        "disk", 1 << 20, description="a disk", can_flush=True, can_fua=True, can_trim=True,
        can_zero=True, can_fast_zero=True, can_cache=True, can_multi_conn=True,
    ),
    "ro": ExportSpec("ro", 4096, read_only=True, rotational=True),
    "bs": ExportSpec(
        "bs", 1 << 16, minimum_block=512, preferred_block=4096, maximum_payload=8192,
        block_size_required=True,
    ),
    "secret": ExportSpec("secret", 512, description="needs TLS", tls_only=True),
}  # fmt: skip
#: Bytes one option's replies may take at most with these exports: a few INFO replies
#: (a name or description up to 4096 bytes) and a final reply with a message of up to
#: 4096 bytes, or a LIST of every export.
OPTION_OUTPUT = 5 * (20 + 2 + 4096) + sum(
    20 + 4 + len(e.name) + len(e.description) for e in EXPORTS.values()
)


@cache
def config_from(byte: int) -> ServerConfig:
    """Byte 0: bits 0-1 the TLS policy (none, optional, required, none), bit 2 no
    structured replies, bit 3 no extended headers, bit 4 no NBD_OPT_LIST, bit 5 no
    default export, bit 6 a limit of 4 options (else the default, 32), bit 7 option
    data of at most 64 bytes (else the default)."""
    return ServerConfig(
        EXPORTS,
        default_export=None if byte & 0x20 else "disk",
        structured_replies=not byte & 0x04,
        extended_headers=not byte & 0x08,
        allow_list=not byte & 0x10,
        tls=(TLSPolicy.NONE, TLSPolicy.OPTIONAL, TLSPolicy.REQUIRED, TLSPolicy.NONE)[byte & 3],
        max_options=4 if byte & 0x40 else 32,
        max_option_length=64 if byte & 0x80 else 64 * 1024,
    )


def client_options(stream: bytes) -> list[int]:
    """The options in the client's stream, in order, as far as it can be framed (after
    the client flags; a bad magic ends it). Only the order matters here."""
    options: list[int] = []
    pos = 4
    while pos + 16 <= len(stream):
        magic, option, length = struct.unpack_from(">QII", stream, pos)
        if magic != IHAVEOPT:
            break
        options.append(option)
        pos += 16 + length
    return options


#: Reply types other than ACK and errors, and the options they may answer.
_NOT_FINAL = {
    Rep.SERVER: {Opt.LIST},
    Rep.INFO: {Opt.INFO, Opt.GO},
    Rep.META_CONTEXT: {Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT},
}
_KNOWN_REPLIES = frozenset(int(r) for r in Rep)


def check_replies(out: bytes, options: list[int], entered_by: str, no_zeroes: bool) -> int:
    """Check the server's bytes (after the greeting) against the client's options;
    return the number of options answered."""
    if entered_by == "export name":
        # Its reply ends the stream: u64 size, u16 flags, 124 zeroes unless NO_ZEROES.
        tail = 10 if no_zeroes else 134
        assert len(out) >= tail, "EXPORT_NAME accepted without its reply"
        assert out[len(out) - tail + 10 :] == bytes(tail - 10), "bad zeroes in export reply"
        out = out[: len(out) - tail]
    answered = 0
    pos = 0
    while pos < len(out):
        assert answered < len(options), "a reply to an option never sent"
        assert options[answered] != Opt.EXPORT_NAME, "an option reply to EXPORT_NAME"
        assert len(out) - pos >= 20, "a truncated option reply"
        magic, option, reply, length = struct.unpack_from(">QIII", out, pos)
        assert magic == OPT_REPLY_MAGIC, f"bad option reply magic {magic:#x}"
        assert option == options[answered], "a reply names another option"
        assert reply in _KNOWN_REPLIES, f"unknown reply type {reply:#x}"
        assert pos + 20 + length <= len(out), "a reply longer than what was sent"
        if reply & REP_ERROR_BIT:
            assert length <= 4096, "an error message over 4096 bytes"
        pos += 20 + length
        if reply in _NOT_FINAL:
            assert option in _NOT_FINAL[Rep(reply)], f"reply {reply} to option {option}"
        else:
            answered += 1
    return answered


def check_result(config: ServerConfig, conn: ServerConnection, event: TransmissionStarted) -> None:
    """What entered transmission must satisfy, whatever the client said."""
    res = event.negotiated
    export = res.export
    assert export is not None and config.exports.get(export.name) is export
    assert res.entered_by in ("go", "export name")
    if config.tls is TLSPolicy.REQUIRED or export.tls_only:
        assert res.tls, "transmission without TLS where it is required"
    if export.block_size_required:
        assert res.entered_by == "go" and res.block_size_requested
    if res.extended_headers:
        assert config.extended_headers and res.structured_replies
        assert res.entered_by == "go", "EXPORT_NAME after extended headers"
    if res.structured_replies and not res.extended_headers:
        assert config.structured_replies
    assert not res.meta_contexts or (
        res.structured_replies and res.meta_contexts == {1: BASE_ALLOCATION}
    )
    assert res.flags == export.transmission_flags(
        structured=res.structured_replies,
        extended=res.extended_headers,
        meta_contexts=bool(res.meta_contexts),
    )
    assert conn.transmission is not None and conn.in_transmission


def one_input(data: bytes) -> None:
    """The harness body: feed ``data`` to a ServerConnection; only ProtocolError escapes."""
    if len(data) < 2:
        return
    config = config_from(data[0])
    step = (data[1] & 0x7F) or 1
    via_buffer = bool(data[1] & 0x80)
    stream = data[2:]
    conn = ServerConnection(config)
    hs = conn.handshake
    greeting = conn.data_to_send()
    assert greeting == struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3)
    out = bytearray()
    # Input the core may hold between reads: an incomplete option.
    held_limit = 16 + config.max_option_length
    pos = 0
    done: TransmissionStarted | Disconnect | None = None
    failed = False
    # Each round consumes input, sends EOF, or ends: bounded by the input.
    for _ in range(2 * len(stream) + 64):
        try:
            event = conn.next_event()
            while isinstance(event, StartTLS):
                conn.tls_established()  # (raises if bytes came after STARTTLS)
                event = conn.next_event()
        except ProtocolError:
            failed = True
            break
        finally:
            out += conn.data_to_send()
        if isinstance(event, TransmissionStarted | Disconnect):
            done = event
            break
        assert event is NEED_DATA, f"unexpected event {event!r}"
        assert len(hs._in) < held_limit, f"the core holds {len(hs._in)} bytes of input"
        try:
            if via_buffer:
                buf = conn.receive_buffer()
                assert len(buf) > 0, "receive_buffer returned an empty buffer"
                n = min(step, len(buf), len(stream) - pos)
                buf[:n] = stream[pos : pos + n]
                pos += n
                conn.buffer_updated(n)  # 0 once the input is used up: EOF
            else:
                chunk = stream[pos : pos + step]
                pos += len(chunk)
                conn.receive_data(chunk)  # b"" once the input is used up: EOF
        except ProtocolError:
            failed = True
            break
    else:
        raise AssertionError("the handshake neither finished nor failed")
    if failed:
        # A failed core stays failed.
        try:
            conn.next_event()
        except ProtocolError:
            pass
        else:
            raise AssertionError("a failed core went on")
    # (when the bytes after the option that entered transmission are not a request,
    # ServerConnection raises at once: the handshake is over all the same)
    entered_by = hs.result.entered_by if hs.state is State.TRANSMISSION else ""
    answered = check_replies(bytes(out), client_options(stream), entered_by, hs.result.no_zeroes)
    assert answered <= config.max_options + 1, f"{answered} options answered"
    assert len(out) <= (answered + 1) * OPTION_OUTPUT + 134, "output beyond the options"
    if isinstance(done, TransmissionStarted):
        check_result(config, conn, done)
    elif isinstance(done, Disconnect):
        assert conn.next_event() is NEED_DATA, "an event after the Disconnect"
        assert not conn.data_to_send(), "bytes after the Disconnect"


# --- seeds ------------------------------------------------------------------------------


def _opt(option: int, payload: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, option, len(payload)) + payload


def _info(name: bytes, *infos: int) -> bytes:
    return struct.pack(">I", len(name)) + name + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def _meta(name: bytes, *queries: bytes) -> bytes:
    body = b"".join(struct.pack(">I", len(q)) + q for q in queries)
    return struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries)) + body


_FLAGS = struct.pack(">I", 3)
_BA = BASE_ALLOCATION.encode()

SEEDS: list[bytes] = [
    # extended headers, meta context, GO with every info
    bytes([0, 0]) + _FLAGS + _opt(Opt.EXTENDED_HEADERS)
    + _opt(Opt.SET_META_CONTEXT, _meta(b"disk", _BA)) + _opt(Opt.GO, _info(b"disk", 0, 1, 2, 3)),
    # structured replies, LIST, LIST_META_CONTEXT "base:", INFO, GO on the default
    bytes([0x08, 16]) + _FLAGS + _opt(Opt.STRUCTURED_REPLY) + _opt(Opt.LIST)
    + _opt(Opt.LIST_META_CONTEXT, _meta(b"", b"base:")) + _opt(Opt.INFO, _info(b"ro", 2))
    + _opt(Opt.GO, _info(b"")),
    # EXPORT_NAME without NO_ZEROES
    bytes([0, 0x85]) + struct.pack(">I", 1) + _opt(Opt.EXPORT_NAME, b"ro"),
    # STARTTLS (optional TLS), then the TLS-only export with block sizes
    bytes([1, 0]) + _FLAGS + _opt(Opt.STARTTLS) + _opt(Opt.GO, _info(b"secret")),
    # required TLS refusals, then STARTTLS and a block-size-required export
    bytes([2, 0]) + _FLAGS + _opt(Opt.LIST) + _opt(Opt.STARTTLS) + _opt(Opt.GO, _info(b"bs"))
    + _opt(Opt.GO, _info(b"bs", 3)),
    # the option limit (4), unknown options, ABORT
    bytes([0x40, 7]) + _FLAGS + _opt(99) + _opt(Opt.LIST, b"x") + _opt(Opt.STARTTLS)
    + _opt(Opt.INFO, b"\0") + _opt(Opt.STRUCTURED_REPLY) + _opt(Opt.ABORT),
    # ABORT at once; a too-long option
    bytes([0, 1]) + _FLAGS + _opt(Opt.ABORT, b"bye"),
    bytes([0x80, 3]) + _FLAGS + _opt(Opt.GO, bytes(100)),
]  # fmt: skip


if __name__ == "__main__":
    fuzz_main("server-handshake", one_input, SEEDS)
