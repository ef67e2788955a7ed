"""Wire constants of the NBD protocol.

Names keep the spec's spelling (doc/proto.md in the NetworkBlockDevice/nbd repository)
without the ``NBD_`` prefix, so that grepping the spec for ``NBD_CMD_WRITE_ZEROES`` finds
``Cmd.WRITE_ZEROES`` here. All values are big-endian on the wire.
"""

from __future__ import annotations

import enum

# "Handshake" section of the spec.
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC", also called INIT_PASSWD
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT", newstyle
CLISERV_MAGIC = 0x00420281861253  # oldstyle
OPT_REPLY_MAGIC = 0x3E889045565A9

# "Transmission" section.
REQUEST_MAGIC = 0x25609513
EXTENDED_REQUEST_MAGIC = 0x21E41C71
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXTENDED_REPLY_MAGIC = 0x6E8A278C

# Limits from the spec ("Option haggling", "Block size constraints").
MAX_STRING = 4096
DEFAULT_MIN_BLOCK = 1
DEFAULT_PREFERRED_BLOCK = 4096
DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024
MAX_MIN_BLOCK = 64 * 1024
OLDSTYLE_ZEROES = 124
NEWSTYLE_ZEROES = 124


class HandshakeFlag(enum.IntFlag):
    """Server handshake flags (u16 after IHAVEOPT)."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    """Client flags (u32 sent after the server's handshake flags)."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class Opt(enum.IntEnum):
    """Option types (``NBD_OPT_*``)."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4  # withdrawn
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


REP_ERROR_BIT = 1 << 31


class Rep(enum.IntEnum):
    """Option reply types (``NBD_REP_*``); errors have bit 31 set."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = REP_ERROR_BIT | 1
    ERR_POLICY = REP_ERROR_BIT | 2
    ERR_INVALID = REP_ERROR_BIT | 3
    ERR_PLATFORM = REP_ERROR_BIT | 4
    ERR_TLS_REQD = REP_ERROR_BIT | 5
    ERR_UNKNOWN = REP_ERROR_BIT | 6
    ERR_SHUTDOWN = REP_ERROR_BIT | 7
    ERR_BLOCK_SIZE_REQD = REP_ERROR_BIT | 8
    ERR_TOO_BIG = REP_ERROR_BIT | 9
    ERR_EXT_HEADER_REQD = REP_ERROR_BIT | 10


class Info(enum.IntEnum):
    """Information types carried by ``NBD_REP_INFO`` (``NBD_INFO_*``)."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TransmissionFlag(enum.IntFlag):
    """Transmission flags (u16 sent with the export size)."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STATUS_PAYLOAD = 1 << 12


class Cmd(enum.IntEnum):
    """Request types (``NBD_CMD_*``)."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CmdFlag(enum.IntFlag):
    """Command flags (``NBD_CMD_FLAG_*``), the u16 before the request type."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5


class ReplyFlag(enum.IntFlag):
    """Structured reply chunk flags."""

    DONE = 1 << 0


CHUNK_ERROR_BIT = 1 << 15


class Chunk(enum.IntEnum):
    """Structured reply chunk types (``NBD_REPLY_TYPE_*``).

    The nbd repository's nbd.h says BLOCK_STATUS is 3; the spec says 5, and every
    server follows the spec.
    """

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    BLOCK_STATUS_EXT = 6
    ERROR = CHUNK_ERROR_BIT | 1
    ERROR_OFFSET = CHUNK_ERROR_BIT | 2


class StateFlag(enum.IntFlag):
    """``base:allocation`` extent flags (``NBD_STATE_*``)."""

    HOLE = 1 << 0
    ZERO = 1 << 1


class Err(enum.IntEnum):
    """Error values allowed on the wire (``NBD_E*``); they match Linux errno values."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108

    @classmethod
    def from_wire(cls, value: int) -> Err:
        """Map an error value from the wire; an unknown value is EINVAL (spec)."""
        try:
            return cls(value)
        except ValueError:
            return cls.EINVAL


BASE_ALLOCATION = "base:allocation"

#: The transmission flag a server must advertise before the client may send a command
#: or a command flag (NBD-NOTES rule 8); both sides of the core check these.
COMMAND_NEEDS: dict[Cmd, TransmissionFlag] = {
    Cmd.FLUSH: TransmissionFlag.SEND_FLUSH,
    Cmd.TRIM: TransmissionFlag.SEND_TRIM,
    Cmd.WRITE_ZEROES: TransmissionFlag.SEND_WRITE_ZEROES,
    Cmd.CACHE: TransmissionFlag.SEND_CACHE,
}
FLAG_NEEDS: dict[CmdFlag, TransmissionFlag] = {
    CmdFlag.FUA: TransmissionFlag.SEND_FUA,
    CmdFlag.DF: TransmissionFlag.SEND_DF,
    CmdFlag.FAST_ZERO: TransmissionFlag.SEND_FAST_ZERO,
}
