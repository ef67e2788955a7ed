"""Wire records of the NBD protocol: frozen dataclasses that pack to and parse from bytes.

Every record has ``pack() -> bytes`` and a ``unpack(data)`` class method that takes exactly
the record's bytes. Parsing never raises anything but :class:`~pynbd.errors.ProtocolError`,
whatever it is given, so that a driver can feed it peer input directly.

Layouts follow the spec's "Handshake" and "Transmission" sections; all integers are
big-endian. Both roles use these records: the client packs requests and parses replies,
the server the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from ..errors import ProtocolError
from .constants import (
    CLISERV_MAGIC,
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    IHAVEOPT,
    MAX_STRING,
    NBDMAGIC,
    OLDSTYLE_ZEROES,
    OPT_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Chunk,
    Info,
)
from .wire import (
    DESCRIPTOR,
    ERROR_CHUNK,
    EXPORT_NAME_REPLY,
    EXTENDED_DESCRIPTOR,
    EXTENDED_REPLY,
    EXTENDED_REQUEST,
    EXTENDED_STATUS_HEAD,
    GREETING,
    HOLE,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    OLDSTYLE,
    OLDSTYLE_GREETING_SIZE,
    OPTION_REPLY,
    OPTION_REQUEST,
    REQUEST,
    SIMPLE_REPLY,
    STRUCTURED_REPLY,
    U16,
    U32,
    U64,
)


def _need(data: bytes | memoryview, size: int, what: str) -> None:
    if len(data) != size:
        raise ProtocolError(f"{what}: expected {size} bytes, got {len(data)}")


def decode_string(data: bytes | memoryview, what: str) -> str:
    """Decode a protocol string: UTF-8, at most 4096 bytes (spec "Conventions")."""
    if len(data) > MAX_STRING:
        raise ProtocolError(f"{what}: string of {len(data)} bytes exceeds {MAX_STRING}")
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{what}: string is not valid UTF-8") from exc


def encode_string(text: str, what: str = "string") -> bytes:
    """Encode a protocol string; raises ValueError when it is over 4096 bytes."""
    data = text.encode("utf-8")
    if len(data) > MAX_STRING:
        raise ValueError(f"{what} is {len(data)} bytes; NBD strings are at most {MAX_STRING}")
    return data


# --- Handshake -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NewstyleGreeting:
    """S: NBDMAGIC, IHAVEOPT, u16 handshake flags."""

    flags: int

    def pack(self) -> bytes:
        return GREETING.pack(NBDMAGIC, IHAVEOPT, self.flags)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> NewstyleGreeting:
        _need(data, GREETING.size, "newstyle greeting")
        magic, opt_magic, flags = GREETING.unpack(data)
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            raise ProtocolError("newstyle greeting: bad magic")
        return cls(flags)


@dataclass(frozen=True, slots=True)
class OldstyleGreeting:
    """S: NBDMAGIC, cliserv magic, u64 size, u32 flags, 124 zero bytes."""

    size: int
    flags: int

    def pack(self) -> bytes:
        return OLDSTYLE.pack(NBDMAGIC, CLISERV_MAGIC, self.size, self.flags) + bytes(
            OLDSTYLE_ZEROES
        )

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> OldstyleGreeting:
        _need(data, OLDSTYLE_GREETING_SIZE, "oldstyle greeting")
        magic, cliserv, size, flags = OLDSTYLE.unpack_from(data)
        if magic != NBDMAGIC or cliserv != CLISERV_MAGIC:
            raise ProtocolError("oldstyle greeting: bad magic")
        # The upper 16 bits are reserved; the transmission flags are the low 16.
        return cls(size, flags & 0xFFFF)


@dataclass(frozen=True, slots=True)
class ClientFlags:
    """C: u32 client flags, sent after the newstyle greeting."""

    flags: int

    def pack(self) -> bytes:
        return U32.pack(self.flags)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> ClientFlags:
        _need(data, 4, "client flags")
        return cls(U32.unpack(data)[0])


@dataclass(frozen=True, slots=True)
class OptionRequest:
    """C: IHAVEOPT, u32 option, u32 length, data."""

    option: int
    data: bytes = b""

    def pack(self) -> bytes:
        return OPTION_REQUEST.pack(IHAVEOPT, self.option, len(self.data)) + self.data

    @staticmethod
    def unpack_header(data: bytes | memoryview) -> tuple[int, int]:
        """Parse the 16-byte header; returns (option, data length)."""
        _need(data, OPTION_REQUEST.size, "option request header")
        magic, option, length = OPTION_REQUEST.unpack(data)
        if magic != IHAVEOPT:
            raise ProtocolError("option request: bad magic")
        return option, length

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> OptionRequest:
        if len(data) < OPTION_REQUEST.size:
            raise ProtocolError("option request: too short")
        option, length = cls.unpack_header(data[: OPTION_REQUEST.size])
        _need(data[OPTION_REQUEST.size :], length, "option request data")
        return cls(option, bytes(data[OPTION_REQUEST.size :]))


@dataclass(frozen=True, slots=True)
class OptionReply:
    """S: reply magic, u32 option, u32 reply type, u32 length, data."""

    option: int
    reply: int
    data: bytes = b""

    def pack(self) -> bytes:
        return (
            OPTION_REPLY.pack(OPT_REPLY_MAGIC, self.option, self.reply, len(self.data)) + self.data
        )

    @staticmethod
    def unpack_header(data: bytes | memoryview) -> tuple[int, int, int]:
        """Parse the 20-byte header; returns (option, reply type, data length)."""
        _need(data, OPTION_REPLY.size, "option reply header")
        magic, option, reply, length = OPTION_REPLY.unpack(data)
        if magic != OPT_REPLY_MAGIC:
            raise ProtocolError(f"option reply: bad magic {magic:#x}")
        return option, reply, length

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> OptionReply:
        if len(data) < OPTION_REPLY.size:
            raise ProtocolError("option reply: too short")
        option, reply, length = cls.unpack_header(data[: OPTION_REPLY.size])
        _need(data[OPTION_REPLY.size :], length, "option reply data")
        return cls(option, reply, bytes(data[OPTION_REPLY.size :]))


@dataclass(frozen=True, slots=True)
class ExportNameReply:
    """S: u64 size, u16 transmission flags, then 124 zeroes unless NO_ZEROES.

    The reply to NBD_OPT_EXPORT_NAME; ``pack`` and ``unpack`` take the 10-byte form.
    """

    size: int
    flags: int

    def pack(self, no_zeroes: bool = True) -> bytes:
        data = EXPORT_NAME_REPLY.pack(self.size, self.flags)
        return data if no_zeroes else data + bytes(124)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> ExportNameReply:
        _need(data, EXPORT_NAME_REPLY.size, "export name reply")
        size, flags = EXPORT_NAME_REPLY.unpack(data)
        return cls(size, flags)


# --- Option payloads --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InfoRequest:
    """Data of NBD_OPT_INFO and NBD_OPT_GO: u32 name length, name, u16 n, u16 info types."""

    name: str
    infos: tuple[int, ...] = ()

    def pack(self) -> bytes:
        name = encode_string(self.name, "export name")
        return (
            U32.pack(len(name))
            + name
            + U16.pack(len(self.infos))
            + b"".join(U16.pack(i) for i in self.infos)
        )

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> InfoRequest:
        data = bytes(data)
        if len(data) < 6:
            raise ProtocolError("info request: too short")
        (nlen,) = U32.unpack_from(data)
        if nlen > len(data) - 6:
            raise ProtocolError("info request: name length exceeds option length")
        name = decode_string(data[4 : 4 + nlen], "export name")
        pos = 4 + nlen
        (count,) = U16.unpack_from(data, pos)
        pos += 2
        if len(data) - pos != 2 * count:
            raise ProtocolError("info request: information request count mismatch")
        infos = tuple(U16.unpack_from(data, pos + 2 * i)[0] for i in range(count))
        return cls(name, infos)


@dataclass(frozen=True, slots=True)
class MetaContextRequest:
    """Data of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT."""

    name: str
    queries: tuple[str, ...] = ()

    def pack(self) -> bytes:
        name = encode_string(self.name, "export name")
        parts = [U32.pack(len(name)), name, U32.pack(len(self.queries))]
        for query in self.queries:
            q = encode_string(query, "meta context query")
            parts += [U32.pack(len(q)), q]
        return b"".join(parts)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> MetaContextRequest:
        data = bytes(data)
        if len(data) < 8:
            raise ProtocolError("meta context request: too short")
        (nlen,) = U32.unpack_from(data)
        if nlen > len(data) - 8:
            raise ProtocolError("meta context request: name length exceeds option length")
        name = decode_string(data[4 : 4 + nlen], "export name")
        pos = 4 + nlen
        (count,) = U32.unpack_from(data, pos)
        pos += 4
        queries = []
        for _ in range(count):
            if len(data) - pos < 4:
                raise ProtocolError("meta context request: truncated query")
            (qlen,) = U32.unpack_from(data, pos)
            pos += 4
            if qlen > len(data) - pos:
                raise ProtocolError("meta context request: query length exceeds option length")
            queries.append(decode_string(data[pos : pos + qlen], "meta context query"))
            pos += qlen
        if pos != len(data):
            raise ProtocolError("meta context request: trailing bytes")
        return cls(name, tuple(queries))


@dataclass(frozen=True, slots=True)
class ServerEntry:
    """Data of NBD_REP_SERVER (a reply to NBD_OPT_LIST): u32 length, name, description."""

    name: str
    description: str = ""

    def pack(self) -> bytes:
        name = encode_string(self.name, "export name")
        return U32.pack(len(name)) + name + encode_string(self.description, "description")

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> ServerEntry:
        data = bytes(data)
        if len(data) < 4:
            raise ProtocolError("NBD_REP_SERVER: too short")
        (nlen,) = U32.unpack_from(data)
        if nlen > len(data) - 4:
            raise ProtocolError("NBD_REP_SERVER: name length exceeds reply length")
        name = decode_string(data[4 : 4 + nlen], "export name")
        return cls(name, decode_string(data[4 + nlen :], "export description"))


@dataclass(frozen=True, slots=True)
class MetaContextEntry:
    """Data of NBD_REP_META_CONTEXT: u32 context id, name (the rest)."""

    context_id: int
    name: str

    def pack(self) -> bytes:
        return U32.pack(self.context_id) + encode_string(self.name, "meta context")

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> MetaContextEntry:
        if len(data) < 4:
            raise ProtocolError("NBD_REP_META_CONTEXT: too short")
        (cid,) = U32.unpack_from(data)
        return cls(cid, decode_string(data[4:], "meta context name"))


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """NBD_INFO_EXPORT: u64 size, u16 transmission flags."""

    size: int
    flags: int

    def pack(self) -> bytes:
        return INFO_EXPORT.pack(Info.EXPORT, self.size, self.flags)


@dataclass(frozen=True, slots=True)
class NameInfo:
    """NBD_INFO_NAME: the export's canonical name."""

    name: str

    def pack(self) -> bytes:
        return U16.pack(Info.NAME) + encode_string(self.name, "export name")


@dataclass(frozen=True, slots=True)
class DescriptionInfo:
    """NBD_INFO_DESCRIPTION: a human-readable description."""

    description: str

    def pack(self) -> bytes:
        return U16.pack(Info.DESCRIPTION) + encode_string(self.description, "description")


@dataclass(frozen=True, slots=True)
class BlockSizeInfo:
    """NBD_INFO_BLOCK_SIZE: u32 minimum, preferred, maximum payload."""

    minimum: int
    preferred: int
    maximum: int

    def pack(self) -> bytes:
        return INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, self.minimum, self.preferred, self.maximum)


@dataclass(frozen=True, slots=True)
class UnknownInfo:
    """An NBD_REP_INFO of a type this side does not know; clients must ignore it."""

    info_type: int
    data: bytes

    def pack(self) -> bytes:
        return U16.pack(self.info_type) + self.data


InfoRecord: TypeAlias = ExportInfo | NameInfo | DescriptionInfo | BlockSizeInfo | UnknownInfo


def unpack_info(data: bytes | memoryview) -> InfoRecord:
    """Parse the data of an NBD_REP_INFO reply."""
    if len(data) < 2:
        raise ProtocolError("NBD_REP_INFO: too short")
    (kind,) = U16.unpack_from(data)
    body = data[2:]
    if kind == Info.EXPORT:
        _need(body, 10, "NBD_INFO_EXPORT")
        _, size, flags = INFO_EXPORT.unpack(data)
        return ExportInfo(size, flags)
    if kind == Info.NAME:
        return NameInfo(decode_string(body, "NBD_INFO_NAME"))
    if kind == Info.DESCRIPTION:
        return DescriptionInfo(decode_string(body, "NBD_INFO_DESCRIPTION"))
    if kind == Info.BLOCK_SIZE:
        _need(body, 12, "NBD_INFO_BLOCK_SIZE")
        _, minimum, preferred, maximum = INFO_BLOCK_SIZE.unpack(data)
        return BlockSizeInfo(minimum, preferred, maximum)
    return UnknownInfo(kind, bytes(body))


def check_block_sizes(info: BlockSizeInfo) -> None:
    """Enforce the spec's "Block size constraints" on an advertised NBD_INFO_BLOCK_SIZE."""

    def pow2(n: int) -> bool:
        return n > 0 and n & (n - 1) == 0

    if not pow2(info.minimum) or info.minimum > 64 * 1024:
        raise ProtocolError(f"minimum block size {info.minimum} is not a power of 2 <= 64 KiB")
    if not pow2(info.preferred) or info.preferred < max(info.minimum, 512):
        raise ProtocolError(
            f"preferred block size {info.preferred} is not a power of 2 >= max(minimum, 512)"
        )
    if info.maximum < info.preferred and info.maximum != 0xFFFFFFFF:
        raise ProtocolError(f"maximum payload {info.maximum} is below preferred block size")
    if info.maximum % info.minimum and info.maximum != 0xFFFFFFFF:
        raise ProtocolError(f"maximum payload {info.maximum} is not a multiple of the minimum")


# --- Transmission -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """C: a request header, compact (28 bytes) or extended (32 bytes).

    ``flags`` are the command flags (the upper 16 bits of the old u32 type field) and
    ``type`` the command; keeping them apart is rule 6 of NBD-NOTES.
    """

    flags: int
    type: int
    cookie: int
    offset: int
    length: int

    def pack(self, extended: bool = False) -> bytes:
        if extended:
            return EXTENDED_REQUEST.pack(
                EXTENDED_REQUEST_MAGIC, self.flags, self.type, self.cookie, self.offset, self.length
            )
        return REQUEST.pack(
            REQUEST_MAGIC, self.flags, self.type, self.cookie, self.offset, self.length
        )

    @classmethod
    def unpack(cls, data: bytes | memoryview, extended: bool = False) -> Request:
        if extended:
            _need(data, EXTENDED_REQUEST.size, "extended request")
            magic, flags, type_, cookie, offset, length = EXTENDED_REQUEST.unpack(data)
            if magic != EXTENDED_REQUEST_MAGIC:
                raise ProtocolError(f"extended request: bad magic {magic:#x}")
        else:
            _need(data, REQUEST.size, "request")
            magic, flags, type_, cookie, offset, length = REQUEST.unpack(data)
            if magic != REQUEST_MAGIC:
                raise ProtocolError(f"request: bad magic {magic:#x}")
        return cls(flags, type_, cookie, offset, length)


@dataclass(frozen=True, slots=True)
class SimpleReply:
    """S: simple reply magic, u32 error, u64 cookie (16 bytes)."""

    error: int
    cookie: int

    def pack(self) -> bytes:
        return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, self.error, self.cookie)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> SimpleReply:
        _need(data, SIMPLE_REPLY.size, "simple reply")
        magic, error, cookie = SIMPLE_REPLY.unpack(data)
        if magic != SIMPLE_REPLY_MAGIC:
            raise ProtocolError(f"simple reply: bad magic {magic:#x}")
        return cls(error, cookie)


@dataclass(frozen=True, slots=True)
class ChunkHeader:
    """S: a structured (20 bytes) or extended (32 bytes) reply chunk header.

    ``offset`` is only on the wire for extended replies, where it echoes the request's.
    """

    flags: int
    type: int
    cookie: int
    length: int
    offset: int = 0

    def pack(self, extended: bool = False) -> bytes:
        if extended:
            return EXTENDED_REPLY.pack(
                EXTENDED_REPLY_MAGIC, self.flags, self.type, self.cookie, self.offset, self.length
            )
        return STRUCTURED_REPLY.pack(
            STRUCTURED_REPLY_MAGIC, self.flags, self.type, self.cookie, self.length
        )

    @classmethod
    def unpack(cls, data: bytes | memoryview, extended: bool = False) -> ChunkHeader:
        if extended:
            _need(data, EXTENDED_REPLY.size, "extended reply")
            magic, flags, type_, cookie, offset, length = EXTENDED_REPLY.unpack(data)
            if magic != EXTENDED_REPLY_MAGIC:
                raise ProtocolError(f"extended reply: bad magic {magic:#x}")
            return cls(flags, type_, cookie, length, offset)
        _need(data, STRUCTURED_REPLY.size, "structured reply")
        magic, flags, type_, cookie, length = STRUCTURED_REPLY.unpack(data)
        if magic != STRUCTURED_REPLY_MAGIC:
            raise ProtocolError(f"structured reply: bad magic {magic:#x}")
        return cls(flags, type_, cookie, length)


# --- Chunk payloads ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OffsetHole:
    """NBD_REPLY_TYPE_OFFSET_HOLE: u64 offset, u32 size (nonzero)."""

    offset: int
    size: int

    def pack(self) -> bytes:
        return HOLE.pack(self.offset, self.size)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> OffsetHole:
        _need(data, HOLE.size, "NBD_REPLY_TYPE_OFFSET_HOLE")
        offset, size = HOLE.unpack(data)
        if size == 0:
            raise ProtocolError("NBD_REPLY_TYPE_OFFSET_HOLE: zero-length hole")
        return cls(offset, size)


@dataclass(frozen=True, slots=True)
class Extent:
    """One block status descriptor: a length and the context's status flags."""

    length: int
    flags: int


@dataclass(frozen=True, slots=True)
class BlockStatusChunk:
    """NBD_REPLY_TYPE_BLOCK_STATUS (32-bit) or BLOCK_STATUS_EXT (64-bit descriptors)."""

    context_id: int
    extents: tuple[Extent, ...]

    def pack(self, extended: bool = False) -> bytes:
        if extended:
            head = EXTENDED_STATUS_HEAD.pack(self.context_id, len(self.extents))
            body = (EXTENDED_DESCRIPTOR.pack(e.length, e.flags) for e in self.extents)
            return head + b"".join(body)
        return U32.pack(self.context_id) + b"".join(
            DESCRIPTOR.pack(e.length, e.flags) for e in self.extents
        )

    @staticmethod
    def descriptors(length: int, extended: bool = False) -> int:
        """How many descriptors a status chunk of ``length`` payload bytes holds.

        Raises ProtocolError when no whole number of them (one at least) fits.
        """
        head, size = (EXTENDED_STATUS_HEAD.size, 16) if extended else (4, 8)
        count, rest = divmod(length - head, size)
        if count < 1 or rest:
            name = "BLOCK_STATUS_EXT" if extended else "BLOCK_STATUS"
            raise ProtocolError(f"NBD_REPLY_TYPE_{name}: bad length {length}")
        return count

    @classmethod
    def unpack(cls, data: bytes | memoryview, extended: bool = False) -> BlockStatusChunk:
        return cls.unpack_prefix(data, cls.descriptors(len(data), extended), extended)

    @classmethod
    def unpack_prefix(
        cls, data: bytes | bytearray | memoryview, count: int, extended: bool = False
    ) -> BlockStatusChunk:
        """Parse the start of a status chunk of ``count`` descriptors: its head and
        the first whole descriptors, which is all of ``data`` (a client that keeps only
        the first extents reads no further). The extents not in ``data`` are not
        checked.
        """
        view = memoryview(data)
        kept = cls.descriptors(len(view), extended)
        if kept > count:
            raise ProtocolError(f"block status: {kept} descriptors in a chunk of {count}")
        if extended:
            cid, stated = EXTENDED_STATUS_HEAD.unpack_from(view)
            if stated != count:
                raise ProtocolError("NBD_REPLY_TYPE_BLOCK_STATUS_EXT: descriptor count mismatch")
            pairs = EXTENDED_DESCRIPTOR.iter_unpack(view[EXTENDED_STATUS_HEAD.size :])
        else:
            (cid,) = U32.unpack_from(view)
            pairs = DESCRIPTOR.iter_unpack(view[4:])
        extents = tuple(Extent(length, flags) for length, flags in pairs)
        if any(e.length == 0 for e in extents):
            raise ProtocolError("block status: zero-length extent")
        return cls(cid, extents)


@dataclass(frozen=True, slots=True)
class ErrorChunk:
    """NBD_REPLY_TYPE_ERROR (offset None) or ERROR_OFFSET: u32 error, u16 len, message[, u64]."""

    error: int
    message: str = ""
    offset: int | None = None

    def pack(self) -> bytes:
        msg = encode_string(self.message, "error message")
        data = ERROR_CHUNK.pack(self.error, len(msg)) + msg
        return data if self.offset is None else data + U64.pack(self.offset)

    @property
    def type(self) -> Chunk:
        return Chunk.ERROR if self.offset is None else Chunk.ERROR_OFFSET

    @classmethod
    def unpack(cls, chunk_type: int, data: bytes | memoryview) -> ErrorChunk:
        """Parse any error chunk (bit 15 set); unknown error types keep error and message."""
        data = bytes(data)
        if len(data) < 6:
            raise ProtocolError("error chunk: too short")
        error, mlen = ERROR_CHUNK.unpack_from(data)
        if mlen > len(data) - 6:
            raise ProtocolError("error chunk: message length exceeds chunk length")
        message = decode_string(data[6 : 6 + mlen], "error message")
        rest = data[6 + mlen :]
        offset = None
        if chunk_type == Chunk.ERROR_OFFSET:
            _need(rest, 8, "NBD_REPLY_TYPE_ERROR_OFFSET offset")
            (offset,) = U64.unpack(rest)
        # NBD_REPLY_TYPE_ERROR: the spec only bounds the message length by the chunk's
        # ("no more than header length - 6"), so bytes after the message are ignored,
        # as they are for error types this side does not know.
        if error == 0:
            raise ProtocolError("error chunk with error value 0")
        return cls(error, message, offset)
