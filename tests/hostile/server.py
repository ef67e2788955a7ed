"""A scriptable fake NBD server that misbehaves on purpose.

A :class:`HostileServer` listens on a unix socket (or 127.0.0.1 on a kernel-chosen
port), accepts ONE connection in a thread, and runs a script: a list of steps, each an
object with ``run(session)``. The steps:

- :class:`Send`: write bytes, or bytes built from what the client sent so far (a
  callable taking the :class:`Session`: ``Send(lambda s: s.simple(error=5))``);
- :class:`Expect`, :class:`ExpectClientFlags`, :class:`ExpectOption`,
  :class:`ExpectRequest`: read an exact number of bytes, or one parsed option or
  request, and record it;
- :class:`Sleep` (say nothing, read nothing), :class:`Silent` (say nothing, but read
  and record until the client closes);
- :class:`Drained`: wait until the client has read everything sent so far, so that
  the next :class:`Send` reaches it in a recv of its own (a pause could only make
  that likely); :class:`Do`: call a function (signal the client's thread, say);
- :class:`Close`, :class:`HalfClose` (``shutdown(SHUT_WR)``: the client sees EOF while
  the server still records what it sends).

:class:`Negotiate` and :func:`handshake` play a correct fixed-newstyle negotiation
for a given export size, transmission flags and reply style (``"simple"``,
``"structured"`` or ``"extended"``), answering whatever options the client sends, so a
test can misbehave only in transmission. After the last step the server records
whatever the client still sends (``drained``) until the client closes.

Nothing here uses pynbd's codecs: the bytes are packed by hand from the spec, so a bug
in pynbd's records cannot hide by being on both sides. Only the enum values are shared.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import struct
import tempfile
import termios
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Protocol

from pynbd.proto.constants import (
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    IHAVEOPT,
    NBDMAGIC,
    OPT_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Chunk,
    ClientFlag,
    Cmd,
    CmdFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    ReplyFlag,
    TransmissionFlag,
)

__all__ = [
    "DEFAULT_FLAGS",
    "Close",
    "Do",
    "Drained",
    "Expect",
    "ExpectClientFlags",
    "ExpectOption",
    "ExpectRequest",
    "HalfClose",
    "HostileServer",
    "Negotiate",
    "PeerClosed",
    "ScriptError",
    "Send",
    "Session",
    "Silent",
    "Sleep",
    "Step",
    "Style",
    "WireOption",
    "WireRequest",
    "block_status_payload",
    "error_payload",
    "extended_chunk",
    "greeting",
    "handshake",
    "option_reply",
    "parse_requests",
    "simple_reply",
    "structured_chunk",
]

Style = Literal["simple", "structured", "extended"]

#: Transmission flags of the default export: writable, every optional command.
DEFAULT_FLAGS = (
    TransmissionFlag.HAS_FLAGS
    | TransmissionFlag.SEND_FLUSH
    | TransmissionFlag.SEND_FUA
    | TransmissionFlag.SEND_TRIM
    | TransmissionFlag.SEND_WRITE_ZEROES
    | TransmissionFlag.SEND_DF
    | TransmissionFlag.SEND_CACHE
)

_POLL = 0.02  # how often a blocked read looks at the stop flag
_MAX_OPTION = 1 << 20  # larger option data from the client is a script error


class ScriptError(Exception):
    """The client sent something the script cannot follow (bad magic, absurd length)."""


class PeerClosed(Exception):
    """The client closed its end while the script still expected bytes from it."""


class _Stopped(Exception):
    """The server is being stopped (test teardown)."""


# --- Packing (by hand, from the spec) ----------------------------------------------------


def greeting(
    flags: int = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES,
    *,
    magic: int = NBDMAGIC,
    option_magic: int = IHAVEOPT,
) -> bytes:
    """The newstyle greeting: NBDMAGIC, IHAVEOPT, u16 handshake flags."""
    return struct.pack(">QQH", magic, option_magic, flags)


def option_reply(
    option: int,
    reply: int,
    data: bytes = b"",
    *,
    magic: int = OPT_REPLY_MAGIC,
    length: int | None = None,
) -> bytes:
    """An option reply; ``length`` overrides the true data length (to lie)."""
    n = len(data) if length is None else length
    return struct.pack(">QIII", magic, option, reply, n) + data


def simple_reply(
    cookie: int, error: int = 0, data: bytes = b"", *, magic: int = SIMPLE_REPLY_MAGIC
) -> bytes:
    """A simple reply header (magic, error, cookie) followed by ``data``."""
    return struct.pack(">IIQ", magic, error, cookie) + data


def structured_chunk(
    cookie: int,
    type_: int,
    payload: bytes = b"",
    *,
    flags: int = ReplyFlag.DONE,
    length: int | None = None,
    magic: int = STRUCTURED_REPLY_MAGIC,
) -> bytes:
    """A structured reply chunk (20-byte header); ``length`` may lie about the payload."""
    n = len(payload) if length is None else length
    return struct.pack(">IHHQI", magic, flags, type_, cookie, n) + payload


def extended_chunk(
    cookie: int,
    type_: int,
    payload: bytes = b"",
    *,
    offset: int = 0,
    flags: int = ReplyFlag.DONE,
    length: int | None = None,
    magic: int = EXTENDED_REPLY_MAGIC,
) -> bytes:
    """An extended reply chunk (32-byte header echoing the request's offset)."""
    n = len(payload) if length is None else length
    return struct.pack(">IHHQQQ", magic, flags, type_, cookie, offset, n) + payload


def error_payload(
    error: int,
    message: bytes = b"",
    *,
    offset: int | None = None,
    message_length: int | None = None,
    extra: bytes = b"",
) -> bytes:
    """An error chunk's payload: u32 error, u16 message length, message[, u64 offset].

    ``message_length`` may lie; ``extra`` is appended (what an unknown error type carries).
    """
    mlen = len(message) if message_length is None else message_length
    data = struct.pack(">IH", error, mlen) + message
    if offset is not None:
        data += struct.pack(">Q", offset)
    return data + extra


def block_status_payload(
    context_id: int, extents: Sequence[tuple[int, int]], *, extended: bool = False
) -> bytes:
    """A BLOCK_STATUS (32-bit) or BLOCK_STATUS_EXT (64-bit) payload of (length, flags)."""
    if extended:
        head = struct.pack(">II", context_id, len(extents))
        return head + b"".join(struct.pack(">QQ", n, f) for n, f in extents)
    return struct.pack(">I", context_id) + b"".join(struct.pack(">II", n, f) for n, f in extents)


# --- What the client sent ------------------------------------------------------------------


class WireOption(NamedTuple):
    """One option the client sent during negotiation."""

    option: int
    data: bytes


class WireRequest(NamedTuple):
    """One transmission request the client sent (``payload``: a write's data)."""

    flags: int
    type: int
    cookie: int
    offset: int
    length: int
    payload: bytes = b""


def _request_payload_length(flags: int, type_: int, length: int, extended: bool) -> int:
    if extended:
        return length if flags & CmdFlag.PAYLOAD_LEN else 0
    return length if type_ == Cmd.WRITE else 0


def parse_requests(data: bytes, *, extended: bool) -> list[WireRequest]:
    """Parse a run of requests (as recorded in ``drained``); raises ScriptError."""
    out = []
    size = 32 if extended else 28
    pos = 0
    while pos < len(data):
        if len(data) - pos < size:
            raise ScriptError(f"{len(data) - pos} trailing bytes are not a request")
        if extended:
            magic, flags, type_, cookie, offset, length = struct.unpack_from(">IHHQQQ", data, pos)
        else:
            magic, flags, type_, cookie, offset, length = struct.unpack_from(">IHHQQI", data, pos)
        if magic != (EXTENDED_REQUEST_MAGIC if extended else REQUEST_MAGIC):
            raise ScriptError(f"bad request magic {magic:#x}")
        pos += size
        n = _request_payload_length(flags, type_, length, extended)
        out.append(WireRequest(flags, type_, cookie, offset, length, data[pos : pos + n]))
        pos += n
    return out


# --- The session -----------------------------------------------------------------------------


class Session:
    """One accepted connection: socket helpers, what was recorded, and reply builders.

    The reply builders default to the last request's cookie and offset, and pick the
    structured or extended chunk header from what :class:`Negotiate` agreed.
    """

    def __init__(self, conn: socket.socket, stop: threading.Event, io_timeout: float) -> None:
        self.conn = conn
        self.stop = stop
        self.io_timeout = io_timeout
        #: Every byte the client sent, in order.
        self.received = bytearray()
        #: Bytes the client sent after the script's last step.
        self.drained = bytearray()
        self.client_flags: int | None = None
        self.options: list[WireOption] = []
        self.requests: list[WireRequest] = []
        self.structured = False
        self.extended = False
        #: Meta contexts the client selected: name -> id.
        self.contexts: dict[str, int] = {}
        self.size = 0
        self.peer_eof = threading.Event()
        self.closed = False  # the server closed its socket
        conn.settimeout(_POLL)

    # -- socket --

    def _recv(self, n: int) -> bytes:
        """Up to ``n`` bytes; b"" at EOF; raises TimeoutError after one poll interval."""
        if self.stop.is_set():
            raise _Stopped
        try:
            data = self.conn.recv(n)
        except TimeoutError:
            raise
        except OSError:
            data = b""  # a reset is an end of stream as far as the script goes
        if not data:
            self.peer_eof.set()
        self.received += data
        return data

    def recv_exact(self, n: int) -> bytes:
        """Read exactly ``n`` bytes. Raises PeerClosed at EOF, ScriptError on timeout."""
        out = bytearray()
        deadline = time.monotonic() + self.io_timeout
        while len(out) < n:
            if self.peer_eof.is_set():
                raise PeerClosed(f"client closed after {len(out)} of {n} bytes")
            try:
                out += self._recv(min(n - len(out), 1 << 20))
            except TimeoutError as exc:
                if time.monotonic() > deadline:
                    raise ScriptError(f"client sent {len(out)} of {n} bytes, then nothing") from exc
        return bytes(out)

    def read_until_eof(self, seconds: float | None = None, into: bytearray | None = None) -> None:
        """Record what the client sends until it closes (or ``seconds`` pass)."""
        end = None if seconds is None else time.monotonic() + seconds
        while not self.peer_eof.is_set():
            if end is not None and time.monotonic() >= end:
                return
            try:
                data = self._recv(65536)
            except TimeoutError:
                continue
            if into is not None:
                into += data

    def wait_drained(self) -> None:
        """Wait until the client has read every byte sent (on TCP: until its kernel
        acknowledged them). Raises ScriptError if it stops reading for io_timeout."""
        # SIOCOUTQ: a unix socket's bytes the peer has not read yet; a TCP socket's
        # bytes the peer has not acknowledged.
        self._wait_until(lambda: self._ioctl(termios.TIOCOUTQ) == 0, "the client stopped reading")

    def wait_queued(self, n: int) -> None:
        """Wait until the client has sent ``n`` bytes that are not read yet. Raises
        ScriptError if they do not come within io_timeout."""
        self._wait_until(lambda: self._ioctl(termios.FIONREAD) >= n, f"fewer than {n} bytes came")

    def _ioctl(self, request: int) -> int:
        return int.from_bytes(fcntl.ioctl(self.conn, request, bytes(4)), "little", signed=True)

    def _wait_until(self, done: Callable[[], bool], failure: str) -> None:
        deadline = time.monotonic() + self.io_timeout
        while not done():
            if self.stop.is_set():
                raise _Stopped
            if time.monotonic() > deadline:
                raise ScriptError(failure)
            time.sleep(0.001)

    def send(self, data: bytes) -> None:
        """Write all of ``data``; raises PeerClosed if the client is gone."""
        self.conn.settimeout(self.io_timeout)
        try:
            self.conn.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as exc:
            self.peer_eof.set()
            raise PeerClosed(f"client gone while sending: {exc}") from exc
        except TimeoutError as exc:
            raise ScriptError("client stopped reading") from exc
        finally:
            self.conn.settimeout(_POLL)

    # -- what the client sent --

    @property
    def last(self) -> WireRequest:
        """The last request read by :class:`ExpectRequest`."""
        if not self.requests:
            raise ScriptError("no request was read yet")
        return self.requests[-1]

    def read_request(self) -> WireRequest:
        extended = self.extended
        head = self.recv_exact(32 if extended else 28)
        if extended:
            magic, flags, type_, cookie, offset, length = struct.unpack(">IHHQQQ", head)
        else:
            magic, flags, type_, cookie, offset, length = struct.unpack(">IHHQQI", head)
        if magic != (EXTENDED_REQUEST_MAGIC if extended else REQUEST_MAGIC):
            raise ScriptError(f"bad request magic {magic:#x}")
        n = _request_payload_length(flags, type_, length, extended)
        if n > 64 << 20:
            raise ScriptError(f"request payload of {n} bytes")
        request = WireRequest(flags, type_, cookie, offset, length, self.recv_exact(n))
        self.requests.append(request)
        return request

    def read_option(self) -> WireOption:
        magic, option, length = struct.unpack(">QII", self.recv_exact(16))
        if magic != IHAVEOPT:
            raise ScriptError(f"bad option magic {magic:#x}")
        if length > _MAX_OPTION:
            raise ScriptError(f"option data of {length} bytes")
        opt = WireOption(option, self.recv_exact(length))
        self.options.append(opt)
        return opt

    # -- reply builders (default: the last request) --

    def _cookie(self, cookie: int | None) -> int:
        return self.last.cookie if cookie is None else cookie

    def simple(self, error: int = 0, data: bytes = b"", *, cookie: int | None = None) -> bytes:
        """A simple reply to the last request."""
        return simple_reply(self._cookie(cookie), error, data)

    def chunk(
        self,
        type_: int,
        payload: bytes = b"",
        *,
        done: bool = True,
        cookie: int | None = None,
        echo: int | None = None,
        length: int | None = None,
    ) -> bytes:
        """A chunk (structured or extended header, as negotiated) for the last request.

        ``echo`` is the extended header's copy of the request offset (default: right);
        ``length`` lies about the payload length.
        """
        flags = ReplyFlag.DONE if done else 0
        if self.extended:
            echo = self.last.offset if echo is None else echo
            return extended_chunk(
                self._cookie(cookie), type_, payload, offset=echo, flags=flags, length=length
            )
        return structured_chunk(self._cookie(cookie), type_, payload, flags=flags, length=length)

    def data(self, offset: int, data: bytes, *, done: bool = False, **kw: int) -> bytes:
        """An OFFSET_DATA chunk carrying ``data`` for export offset ``offset``."""
        return self.chunk(Chunk.OFFSET_DATA, struct.pack(">Q", offset) + data, done=done, **kw)

    def hole(self, offset: int, size: int, *, done: bool = False) -> bytes:
        """An OFFSET_HOLE chunk."""
        return self.chunk(Chunk.OFFSET_HOLE, struct.pack(">QI", offset, size), done=done)

    def block_status(
        self, context_id: int, extents: Sequence[tuple[int, int]], *, done: bool = True
    ) -> bytes:
        """A BLOCK_STATUS (or, with extended headers, BLOCK_STATUS_EXT) chunk."""
        type_ = Chunk.BLOCK_STATUS_EXT if self.extended else Chunk.BLOCK_STATUS
        payload = block_status_payload(context_id, extents, extended=self.extended)
        return self.chunk(type_, payload, done=done)

    def none(self) -> bytes:
        """The NONE chunk with DONE that ends a reply."""
        return self.chunk(Chunk.NONE, b"", done=True)

    def read_ok(self, content: bytes) -> bytes:
        """A correct reply to the last request (a read of ``len(content)`` bytes)."""
        if self.structured:
            return self.data(self.last.offset, content, done=True)
        return self.simple(0, content)

    def error(self, error: int, message: bytes = b"") -> bytes:
        """A correct error reply to the last request, in the negotiated style."""
        if self.structured:
            return self.chunk(Chunk.ERROR, error_payload(error, message))
        return self.simple(error)

    # -- closing --

    def close(self) -> None:
        self.closed = True
        self.conn.close()


# --- Steps -----------------------------------------------------------------------------------


class Step(Protocol):
    """One step of a script."""

    def run(self, s: Session) -> None: ...


@dataclass(frozen=True)
class Send:
    """Write bytes, or the bytes a callable builds from the session."""

    data: bytes | Callable[[Session], bytes]

    def run(self, s: Session) -> None:
        s.send(self.data(s) if callable(self.data) else self.data)


@dataclass(frozen=True)
class Expect:
    """Read exactly ``n`` bytes (they are recorded in ``received``)."""

    n: int

    def run(self, s: Session) -> None:
        s.recv_exact(self.n)


@dataclass(frozen=True)
class ExpectClientFlags:
    """Read the client's u32 flags after the greeting."""

    def run(self, s: Session) -> None:
        (s.client_flags,) = struct.unpack(">I", s.recv_exact(4))


@dataclass(frozen=True)
class ExpectOption:
    """Read one option (header and data) and record it in ``options``."""

    def run(self, s: Session) -> None:
        s.read_option()


@dataclass(frozen=True)
class ExpectRequest:
    """Read one request (with its payload) and record it in ``requests``."""

    def run(self, s: Session) -> None:
        s.read_request()


@dataclass(frozen=True)
class Sleep:
    """Say nothing and read nothing for ``seconds``."""

    seconds: float

    def run(self, s: Session) -> None:
        if s.stop.wait(self.seconds):
            raise _Stopped


@dataclass(frozen=True)
class Drained:
    """Wait until the client has read everything sent so far (see Session.wait_drained)."""

    def run(self, s: Session) -> None:
        s.wait_drained()


@dataclass(frozen=True)
class Do:
    """Call ``fn(session)``."""

    fn: Callable[[Session], None]

    def run(self, s: Session) -> None:
        self.fn(s)


@dataclass(frozen=True)
class Silent:
    """Say nothing; record what the client sends until it closes (or ``seconds`` pass)."""

    seconds: float | None = None

    def run(self, s: Session) -> None:
        s.read_until_eof(self.seconds)


@dataclass(frozen=True)
class Close:
    """Close the connection (the script ends here)."""

    def run(self, s: Session) -> None:
        s.close()


@dataclass(frozen=True)
class HalfClose:
    """Shut down the sending side: the client reads EOF, the server still listens."""

    def run(self, s: Session) -> None:
        s.conn.shutdown(socket.SHUT_WR)


@dataclass(frozen=True)
class Negotiate:
    """Answer options correctly until NBD_OPT_GO (or EXPORT_NAME, or ABORT) is done.

    Args:
        style: ``"simple"`` refuses both structured replies and extended headers,
            ``"structured"`` accepts structured replies only, ``"extended"`` accepts
            extended headers.
        size, flags: the export's size and transmission flags.
        contexts: meta contexts the server knows, name -> id.
        block_sizes: (minimum, preferred, maximum) to advertise, or None.
        stop_at: read this option, record it, and return without answering it.
    """

    style: Style = "structured"
    size: int = 1 << 20
    flags: int = DEFAULT_FLAGS
    contexts: Mapping[str, int] = field(default_factory=lambda: {"base:allocation": 1})
    block_sizes: tuple[int, int, int] | None = None
    stop_at: Opt | None = None

    def run(self, s: Session) -> None:
        while True:
            opt = s.read_option()
            if opt.option == self.stop_at:
                return
            if self._answer(s, opt):
                return

    def _ack(self, s: Session, option: int, reply: int = Rep.ACK, data: bytes = b"") -> None:
        s.send(option_reply(option, reply, data))

    def _answer(self, s: Session, opt: WireOption) -> bool:
        """Answer one option; True when negotiation is over."""
        o = opt.option
        if o == Opt.EXTENDED_HEADERS:
            if self.style == "extended":
                s.extended = s.structured = True
                self._ack(s, o)
            else:
                self._ack(s, o, Rep.ERR_UNSUP)
        elif o == Opt.STRUCTURED_REPLY:
            if self.style != "simple":
                s.structured = True
                self._ack(s, o)
            else:
                self._ack(s, o, Rep.ERR_UNSUP)
        elif o in (Opt.SET_META_CONTEXT, Opt.LIST_META_CONTEXT):
            if not s.structured:
                self._ack(s, o, Rep.ERR_INVALID)
                return False
            queries = _meta_queries(opt.data)
            if o == Opt.LIST_META_CONTEXT and not queries:
                queries = list(self.contexts)
            for name in queries:
                if name in self.contexts:
                    cid = self.contexts[name]
                    if o == Opt.SET_META_CONTEXT:
                        s.contexts[name] = cid
                    entry = struct.pack(">I", cid) + name.encode()
                    self._ack(s, o, Rep.META_CONTEXT, entry)
            self._ack(s, o)
        elif o == Opt.LIST:
            self._ack(s, o, Rep.SERVER, struct.pack(">I", 0))
            self._ack(s, o)
        elif o in (Opt.INFO, Opt.GO):
            info = struct.pack(">HQH", Info.EXPORT, self.size, self.flags)
            self._ack(s, o, Rep.INFO, info)
            if self.block_sizes is not None:
                data = struct.pack(">HIII", Info.BLOCK_SIZE, *self.block_sizes)
                self._ack(s, o, Rep.INFO, data)
            self._ack(s, o)
            if o == Opt.GO:
                s.size = self.size
                return True
        elif o == Opt.ABORT:
            self._ack(s, o)
            return True
        elif o == Opt.EXPORT_NAME and not s.extended:
            zeroes = b"" if (s.client_flags or 0) & ClientFlag.NO_ZEROES else bytes(124)
            s.send(struct.pack(">QH", self.size, self.flags) + zeroes)
            s.size = self.size
            return True
        else:
            self._ack(s, o, Rep.ERR_UNSUP)
        return False


def _meta_queries(data: bytes) -> list[str]:
    """The queries of a (LIST|SET)_META_CONTEXT option: u32 len, name, u32 n, n strings."""
    try:
        (nlen,) = struct.unpack_from(">I", data)
        pos = 4 + nlen
        (count,) = struct.unpack_from(">I", data, pos)
        pos += 4
        out = []
        for _ in range(count):
            (qlen,) = struct.unpack_from(">I", data, pos)
            pos += 4
            out.append(data[pos : pos + qlen].decode())
            pos += qlen
    except (struct.error, UnicodeDecodeError) as exc:
        raise ScriptError(f"bad meta context option: {exc}") from exc
    return out


def handshake(
    style: Style = "structured",
    *,
    size: int = 1 << 20,
    flags: int = DEFAULT_FLAGS,
    contexts: Mapping[str, int] | None = None,
    block_sizes: tuple[int, int, int] | None = None,
    stop_at: Opt | None = None,
) -> list[Step]:
    """The steps of a correct fixed-newstyle handshake (greeting, flags, options, GO)."""
    negotiate = Negotiate(
        style=style,
        size=size,
        flags=flags,
        contexts={"base:allocation": 1} if contexts is None else dict(contexts),
        block_sizes=block_sizes,
        stop_at=stop_at,
    )
    return [Send(greeting()), ExpectClientFlags(), negotiate]


# --- The server ------------------------------------------------------------------------------


class HostileServer:
    """Serve one connection with a script, in a thread.

    Use as a context manager, or call :meth:`start` and (always) :meth:`stop`.

    Args:
        script: the steps to run once a client connects.
        tcp: listen on 127.0.0.1 with a kernel-chosen port instead of a unix socket.
        io_timeout: how long a step waits for the client's bytes before the script
            fails with ScriptError (the client is stuck, not the server).

    After the run: ``session`` (what the client sent), ``error`` (a ScriptError or a
    bug in a step; None when the script ran or the client left early), ``ended_early``
    (the index of the step during which the client closed, or None).
    """

    def __init__(
        self, script: Sequence[Step], *, tcp: bool = False, io_timeout: float = 30.0
    ) -> None:
        self.script = list(script)
        self.tcp = tcp
        self.io_timeout = io_timeout
        self.session: Session | None = None
        self.error: BaseException | None = None
        self.ended_early: int | None = None
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._dir: str | None = None
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --

    def start(self) -> HostileServer:
        if self.tcp:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.bind(("127.0.0.1", 0))
        else:
            # A short path of our own: sun_path holds only 108 bytes.
            self._dir = tempfile.mkdtemp(prefix="nbdh-")
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(os.path.join(self._dir, "s"))
        listener.listen(1)
        listener.settimeout(_POLL)
        self._listener = listener
        self._thread = threading.Thread(target=self._serve, name="hostile-nbd", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread (whatever step it is in), close everything. Idempotent."""
        self._stop.set()
        try:
            if self._thread is not None:
                self._thread.join(30.0)
                if self._thread.is_alive():
                    raise RuntimeError("hostile server thread did not stop")
        finally:
            if self._listener is not None:
                self._listener.close()
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None

    def __enter__(self) -> HostileServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- addresses --

    @property
    def address(self) -> str | tuple[str, int]:
        assert self._listener is not None, "start() the server first"
        addr: str | tuple[str, int] = self._listener.getsockname()
        return addr

    @property
    def uri(self) -> str:
        addr = self.address
        if isinstance(addr, tuple):
            return f"nbd://{addr[0]}:{addr[1]}/"
        return f"nbd+unix:///?socket={addr}"

    # -- results --

    def wait(self, timeout: float = 30.0) -> Session:
        """Wait for the script (and the final drain) to end; raise its error if any."""
        assert self._thread is not None
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"the script did not finish within {timeout} s")
        if self.error is not None:
            raise AssertionError(f"the script failed: {self.error!r}") from self.error
        return self.s

    def wait_peer_closed(self, timeout: float = 30.0) -> bool:
        """True once the client closed its end (seen as EOF or a reset)."""
        if not self._connected.wait(timeout):
            return False
        assert self.session is not None
        return self.session.peer_eof.wait(timeout)

    @property
    def s(self) -> Session:
        """The session (once a client connected)."""
        if self.session is None:
            raise AssertionError("no client connected")
        return self.session

    # -- the thread --

    def _serve(self) -> None:
        assert self._listener is not None
        conn = None
        try:
            while conn is None:
                if self._stop.is_set():
                    return
                try:
                    conn, _ = self._listener.accept()
                except TimeoutError:
                    continue
            s = self.session = Session(conn, self._stop, self.io_timeout)
            self._connected.set()
            for i, step in enumerate(self.script):
                if s.closed:
                    raise ScriptError(f"step {i} ({step!r}) comes after Close()")
                try:
                    step.run(s)
                except PeerClosed:
                    self.ended_early = i
                    return
            if not s.closed:
                s.read_until_eof(into=s.drained)
        except _Stopped:
            pass
        except BaseException as exc:  # reported by wait(); a thread must not die silently
            self.error = exc
        finally:
            if conn is not None:
                conn.close()
