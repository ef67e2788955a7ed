"""A scripted NBD server made of bytes, for the client handshake's tests.

It is a few dozen lines of ``struct`` calls written from the spec's "Handshake" and
"Option types" sections (it does not use pynbd's records), so that the client's bytes
are checked against an independent reading of the spec. :class:`Served` puts one on
a socketpair, for clients that need a socket.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from pynbd.proto.constants import BASE_ALLOCATION, Info, Opt, Rep

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
CLISERV = bytes.fromhex("0000420281861253")
REPLY_MAGIC = bytes.fromhex("0003e889045565a9")
FLAGS = 0x1 | 0x4 | 0x8 | 0x20 | 0x40 | 0x100  # HAS_FLAGS FLUSH FUA TRIM WRITE_ZEROES MULTI
SIZE = 64 << 20


def h(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


def rep(option: int, reply: int, data: bytes = b"") -> bytes:
    """S: an option reply (spec "Fixed newstyle negotiation")."""
    return REPLY_MAGIC + struct.pack(">III", option, reply, len(data)) + data


def opt(option: int, data: bytes = b"") -> bytes:
    """C: an option request, as the client must send it."""
    return IHAVEOPT + struct.pack(">II", option, len(data)) + data


def info_export(size: int = SIZE, flags: int = FLAGS) -> bytes:
    return struct.pack(">HQH", Info.EXPORT, size, flags)


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return struct.pack(">HIII", Info.BLOCK_SIZE, minimum, preferred, maximum)


def lstr(text: str, width: str = ">I") -> bytes:
    raw = text.encode()
    return struct.pack(width, len(raw)) + raw


def parse_name(data: bytes) -> str:
    (n,) = struct.unpack_from(">I", data)
    return data[4 : 4 + n].decode()


def parse_queries(data: bytes) -> list[str]:
    (n,) = struct.unpack_from(">I", data)
    pos = 4 + n
    (count,) = struct.unpack_from(">I", data, pos)
    pos += 4
    out = []
    for _ in range(count):
        (qlen,) = struct.unpack_from(">I", data, pos)
        out.append(data[pos + 4 : pos + 4 + qlen].decode())
        pos += 4 + qlen
    return out


Handler = Callable[["FakeServer", int, bytes], bytes]


@dataclass
class FakeServer:
    """A scripted NBD server made of bytes (no sockets).

    ``feed`` takes what the client sent and returns what the server answers. Options are
    answered by ``handlers`` (per option, overriding the defaults below) and recorded in
    ``options``. After EXPORT_NAME, a GO ACK or ABORT, client bytes go to ``after``.
    """

    style: str = "fixed"  # "fixed", "newstyle" (not fixed) or "oldstyle"
    no_zeroes: bool = True
    extended: bool = False
    structured: bool = True
    tls: bool = False  # accept STARTTLS
    exports: dict[str, str] = field(default_factory=lambda: {"": "the default", "disk": "a disk"})
    contexts: dict[str, int] = field(default_factory=lambda: {BASE_ALLOCATION: 7})
    block_size: tuple[int, int, int] | None = (512, 4096, 1 << 25)
    handlers: dict[int, Handler] = field(default_factory=dict)
    options: list[tuple[int, bytes]] = field(default_factory=list)
    client_flags: int | None = None
    received: bytearray = field(default_factory=bytearray)
    after: bytearray = field(default_factory=bytearray)
    closed: bool = False
    in_tls: bool = False
    transmission: bool = False
    _buf: bytearray = field(default_factory=bytearray)

    def greeting(self) -> bytes:
        if self.style == "oldstyle":
            return NBDMAGIC + CLISERV + struct.pack(">QI", SIZE, FLAGS) + bytes(124)
        hflags = (1 if self.style == "fixed" else 0) | (2 if self.no_zeroes else 0)
        return NBDMAGIC + IHAVEOPT + struct.pack(">H", hflags)

    def feed(self, data: bytes) -> bytes:
        self.received += data
        if self.transmission or self.closed or self.style == "oldstyle":
            self.after += data
            return b""
        self._buf += data
        out = b""
        if self.client_flags is None:
            if len(self._buf) < 4:
                return b""
            (self.client_flags,) = struct.unpack_from(">I", self._buf)
            del self._buf[:4]
        while len(self._buf) >= 16 and not (self.transmission or self.closed):
            assert self._buf[:8] == IHAVEOPT, "client sent a bad option magic"
            option, length = struct.unpack_from(">II", self._buf, 8)
            if len(self._buf) < 16 + length:
                break
            payload = bytes(self._buf[16 : 16 + length])
            del self._buf[: 16 + length]
            self.options.append((option, payload))
            if self.style != "fixed":
                assert option == Opt.EXPORT_NAME, "non-fixed newstyle knows only EXPORT_NAME"
            out += self.handlers.get(option, FakeServer.default)(self, option, payload)
        if self.transmission or self.closed:
            self.after += self._buf
            self._buf.clear()
        return out

    def option_names(self) -> list[Opt]:
        return [Opt(o) for o, _ in self.options]

    def default(self, option: int, data: bytes) -> bytes:
        if option == Opt.EXPORT_NAME:
            if data.decode() not in self.exports:
                self.closed = True  # the spec's only way to refuse EXPORT_NAME
                return b""
            self.transmission = True
            zeroes = b"" if self.client_flags is not None and self.client_flags & 2 else bytes(124)
            return struct.pack(">QH", SIZE, FLAGS) + zeroes
        if option == Opt.ABORT:
            self.closed = True
            return rep(option, Rep.ACK)
        if option == Opt.STARTTLS:
            if self.tls and not self.in_tls:
                self.in_tls = True
                return rep(option, Rep.ACK)
            return rep(option, Rep.ERR_POLICY if not self.tls else Rep.ERR_INVALID)
        if option == Opt.EXTENDED_HEADERS:
            return rep(option, Rep.ACK if self.extended else Rep.ERR_UNSUP)
        if option == Opt.STRUCTURED_REPLY:
            return rep(option, Rep.ACK if self.structured else Rep.ERR_UNSUP)
        if option == Opt.LIST:
            out = b"".join(
                rep(option, Rep.SERVER, lstr(name) + desc.encode())
                for name, desc in self.exports.items()
            )
            return out + rep(option, Rep.ACK)
        if option == Opt.LIST_META_CONTEXT:
            out = b"".join(
                rep(option, Rep.META_CONTEXT, struct.pack(">I", 0) + name.encode())
                for name in self.contexts
            )
            return out + rep(option, Rep.ACK)
        if option == Opt.SET_META_CONTEXT:
            out = b""
            for query in parse_queries(data):
                if query in self.contexts:
                    cid = self.contexts[query]
                    out += rep(option, Rep.META_CONTEXT, struct.pack(">I", cid) + query.encode())
            return out + rep(option, Rep.ACK)
        if option in (Opt.INFO, Opt.GO):
            name = parse_name(data)
            if name not in self.exports:
                return rep(option, Rep.ERR_UNKNOWN, b"no such export")
            out = rep(option, Rep.INFO, info_export())
            out += rep(
                option, Rep.INFO, struct.pack(">H", Info.NAME) + b"canonical-" + name.encode()
            )
            out += rep(
                option, Rep.INFO, struct.pack(">H", Info.DESCRIPTION) + self.exports[name].encode()
            )
            if self.block_size is not None:
                out += rep(option, Rep.INFO, info_block_size(*self.block_size))
            if option == Opt.GO:
                self.transmission = True
            return out + rep(option, Rep.ACK)
        return rep(option, Rep.ERR_UNSUP)


class Served:
    """A FakeServer on one end of a socketpair, answered by a thread until either side
    closes; the client's end is ``client``."""

    def __init__(self, server: FakeServer) -> None:
        self.server = server
        self.client, self._ours = socket.socketpair()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sock = self._ours
        try:
            sock.sendall(self.server.greeting())
            while data := sock.recv(65536):
                out = self.server.feed(data)
                if out:
                    sock.sendall(out)
                if self.server.closed:
                    break
        except OSError:
            pass
        finally:
            sock.close()

    def join(self) -> None:
        self._thread.join(10)
        assert not self._thread.is_alive()
