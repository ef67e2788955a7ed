"""Generic-netlink codec for the Linux nbd driver: pure functions, no sockets.

Builds and parses the messages that configure the nbd driver through netlink
(include/uapi/linux/nbd-netlink.h), the generic-netlink controller messages that find
the "nbd" family and its multicast group (include/uapi/linux/genetlink.h), and the
netlink framing around them (include/uapi/linux/netlink.h):

- ``struct nlmsghdr`` (16 bytes: u32 length, u16 type, u16 flags, u32 seq, u32 port id),
  each message padded to 4 bytes; one datagram may carry several messages;
- ``struct genlmsghdr`` (4 bytes: u8 cmd, u8 version, u16 reserved);
- attributes, ``struct nlattr`` (u16 length, u16 type, then the payload padded to 4
  bytes; the length counts the 4-byte header and the payload, not the padding). The top
  two bits of the type are flags (NLA_F_NESTED, NLA_F_NET_BYTEORDER) and are not part
  of the type.

Byte order: netlink headers and attribute values are in the host's byte order (native
endianness), unlike the NBD wire protocol, which is big-endian. Every ``struct`` format
here uses ``=`` (native order, standard sizes, no alignment). Messages built on one
machine are only meaningful to that machine's kernel.

The decoders raise only :class:`~pynbd.kernel.errors.NetlinkFormatError` on truncated
or malformed input, whatever they are given; the encoders raise only
:class:`~pynbd.errors.InvalidRequest` for arguments that do not fit the fields.
"""

from __future__ import annotations

import enum
import struct
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..errors import InvalidRequest
from .errors import NetlinkFormatError

# --- include/uapi/linux/netlink.h -----------------------------------------------------

NETLINK_GENERIC = 16  # protocol of AF_NETLINK sockets; not in Python's socket module
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_DROP_MEMBERSHIP = 2
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11

NLMSG_ALIGNTO = 4
NLMSG_HDRLEN = 16
NLMSG_MIN_TYPE = 0x10  # types below are netlink's own (NOOP, ERROR, DONE, OVERRUN)
NLA_ALIGNTO = 4
NLA_HDRLEN = 4
NLA_F_NESTED = 1 << 15
NLA_F_NET_BYTEORDER = 1 << 14
NLA_TYPE_MASK = ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER) & 0xFFFF


class NlMsgType(enum.IntEnum):
    """Netlink's own message types (``NLMSG_*``)."""

    NOOP = 1
    ERROR = 2
    DONE = 3
    OVERRUN = 4


class NlmFlag(enum.IntFlag):
    """Message flags (``NLM_F_*``) of requests."""

    REQUEST = 0x01
    MULTI = 0x02
    ACK = 0x04
    ECHO = 0x08
    DUMP_INTR = 0x10
    DUMP_FILTERED = 0x20
    ROOT = 0x100
    MATCH = 0x200
    ATOMIC = 0x400
    DUMP = ROOT | MATCH


# Flags of NLMSG_ERROR messages, which reuse the bits of ROOT and MATCH.
NLM_F_CAPPED = 0x100  # the request's payload is not echoed back
NLM_F_ACK_TLVS = 0x200  # extended-ack attributes follow


class NlErrAttr(enum.IntEnum):
    """Extended-ack attributes of NLMSG_ERROR and NLMSG_DONE (``NLMSGERR_ATTR_*``)."""

    MSG = 1
    OFFS = 2
    COOKIE = 3
    POLICY = 4
    MISS_TYPE = 5
    MISS_NEST = 6


# --- include/uapi/linux/genetlink.h ---------------------------------------------------

GENL_ID_CTRL = NLMSG_MIN_TYPE  # the controller family "nlctrl" has a fixed id
GENL_HDRLEN = 4
CTRL_VERSION = 2  # nlctrl's version; the kernel ignores the version of requests


class CtrlCmd(enum.IntEnum):
    """Controller commands (``CTRL_CMD_*``)."""

    NEWFAMILY = 1
    DELFAMILY = 2
    GETFAMILY = 3
    NEWOPS = 4
    DELOPS = 5
    GETOPS = 6
    NEWMCAST_GRP = 7
    DELMCAST_GRP = 8
    GETMCAST_GRP = 9
    GETPOLICY = 10


class CtrlAttr(enum.IntEnum):
    """Controller attributes (``CTRL_ATTR_*``)."""

    FAMILY_ID = 1  # u16
    FAMILY_NAME = 2  # string
    VERSION = 3  # u32
    HDRSIZE = 4  # u32
    MAXATTR = 5  # u32
    OPS = 6  # nested
    MCAST_GROUPS = 7  # nested: items numbered from 1, each {MCAST_GRP_NAME, MCAST_GRP_ID}
    POLICY = 8
    OP_POLICY = 9
    OP = 10


class CtrlMcastGrpAttr(enum.IntEnum):
    """Attributes of one multicast group (``CTRL_ATTR_MCAST_GRP_*``)."""

    MCAST_GRP_NAME = 1  # string
    MCAST_GRP_ID = 2  # u32


# --- include/uapi/linux/nbd-netlink.h -------------------------------------------------

NBD_GENL_FAMILY_NAME = "nbd"
NBD_GENL_VERSION = 1
NBD_GENL_MCAST_GROUP_NAME = "nbd_mc_group"


class NbdCmd(enum.IntEnum):
    """Commands of the nbd family (``NBD_CMD_*`` of nbd-netlink.h, not the wire's)."""

    CONNECT = 1
    DISCONNECT = 2
    RECONFIGURE = 3
    LINK_DEAD = 4  # multicast only
    STATUS = 5


class NbdAttr(enum.IntEnum):
    """Attributes of the nbd family (``NBD_ATTR_*``)."""

    INDEX = 1  # u32
    SIZE_BYTES = 2  # u64
    BLOCK_SIZE_BYTES = 3  # u64
    TIMEOUT = 4  # u64, seconds
    SERVER_FLAGS = 5  # u64, the transmission flags
    CLIENT_FLAGS = 6  # u64, CFlag
    SOCKETS = 7  # nested: SOCK_ITEM {SOCK_FD}
    DEAD_CONN_TIMEOUT = 8  # u64, seconds
    DEVICE_LIST = 9  # nested: DEVICE_ITEM {DEVICE_INDEX, DEVICE_CONNECTED}
    BACKEND_IDENTIFIER = 10  # string, shown in /sys/block/nbdX/backend


class SockItemAttr(enum.IntEnum):
    """Items of NBD_ATTR_SOCKETS (``NBD_SOCK_ITEM``)."""

    SOCK_ITEM = 1


class SockAttr(enum.IntEnum):
    """Attributes of one socket item (``NBD_SOCK_*``)."""

    SOCK_FD = 1  # u32


class DeviceItemAttr(enum.IntEnum):
    """Items of NBD_ATTR_DEVICE_LIST (``NBD_DEVICE_ITEM``)."""

    DEVICE_ITEM = 1


class DeviceAttr(enum.IntEnum):
    """Attributes of one device item (``NBD_DEVICE_*``)."""

    DEVICE_INDEX = 1  # u32
    DEVICE_CONNECTED = 2  # u8


class CFlag(enum.IntFlag):
    """Client flags of NBD_ATTR_CLIENT_FLAGS (``NBD_CFLAG_*`` in linux/nbd.h)."""

    DESTROY_ON_DISCONNECT = 1 << 0
    DISCONNECT_ON_CLOSE = 1 << 1


# --- headers --------------------------------------------------------------------------

_NLMSGHDR = struct.Struct("=IHHII")
_GENLMSGHDR = struct.Struct("=BBH")
_NLATTR = struct.Struct("=HH")
_I32 = struct.Struct("=i")
_U16_MAX = 0xFFFF


def align4(n: int) -> int:
    """Round ``n`` up to the 4-byte alignment of netlink messages and attributes."""
    return (n + 3) & ~3


def _pad(n: int) -> bytes:
    return b"\0" * (align4(n) - n)


def _check_uint(value: int, bits: int, what: str) -> int:
    if not 0 <= value < 1 << bits:
        raise InvalidRequest(f"{what}: {value} does not fit in an unsigned {bits}-bit field")
    return value


@dataclass(frozen=True, slots=True)
class NlMsgHdr:
    """``struct nlmsghdr``: the 16-byte header of every netlink message."""

    length: int
    type: int
    flags: int
    seq: int
    pid: int

    def pack(self) -> bytes:
        """Return the 16 header bytes (host byte order).

        Raises:
            InvalidRequest: a field does not fit its width.
        """
        _check_uint(self.length, 32, "nlmsg_len")
        _check_uint(self.type, 16, "nlmsg_type")
        _check_uint(self.flags, 16, "nlmsg_flags")
        _check_uint(self.seq, 32, "nlmsg_seq")
        _check_uint(self.pid, 32, "nlmsg_pid")
        return _NLMSGHDR.pack(self.length, self.type, self.flags, self.seq, self.pid)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> NlMsgHdr:
        """Parse exactly 16 bytes.

        Raises:
            NetlinkFormatError: ``data`` is not 16 bytes long.
        """
        if len(data) != NLMSG_HDRLEN:
            raise NetlinkFormatError(f"nlmsghdr: expected 16 bytes, got {len(data)}")
        return cls(*_NLMSGHDR.unpack(data))


# --- attributes -----------------------------------------------------------------------


def attr(type_: int, payload: bytes, *, nested: bool = False) -> bytes:
    """Encode one attribute: header, payload, zero padding to 4 bytes.

    Args:
        type_: the attribute type (14 bits).
        payload: the value's bytes.
        nested: set NLA_F_NESTED (the payload is itself a list of attributes).

    Raises:
        InvalidRequest: the type or the length does not fit its 16-bit field.
    """
    if not 0 <= type_ <= NLA_TYPE_MASK:
        raise InvalidRequest(f"attribute type {type_} does not fit in 14 bits")
    return _attr(type_ | (NLA_F_NESTED if nested else 0), payload)


def _attr(raw_type: int, payload: bytes) -> bytes:
    length = NLA_HDRLEN + len(payload)
    if length > _U16_MAX:
        what = raw_type & NLA_TYPE_MASK
        raise InvalidRequest(f"attribute {what}: {len(payload)} bytes do not fit a nlattr")
    return _NLATTR.pack(length, raw_type) + payload + _pad(length)


def _uint_bytes(value: int, size: int, type_: int) -> bytes:
    return _check_uint(value, 8 * size, f"attribute {type_}").to_bytes(size, sys.byteorder)


def attr_u8(type_: int, value: int) -> bytes:
    """Encode an NLA_U8 attribute.

    Raises:
        InvalidRequest: ``value`` is outside 0..255.
    """
    return attr(type_, _uint_bytes(value, 1, type_))


def attr_u16(type_: int, value: int) -> bytes:
    """Encode an NLA_U16 attribute.

    Raises:
        InvalidRequest: ``value`` does not fit 16 bits.
    """
    return attr(type_, _uint_bytes(value, 2, type_))


def attr_u32(type_: int, value: int) -> bytes:
    """Encode an NLA_U32 attribute.

    Raises:
        InvalidRequest: ``value`` does not fit 32 bits.
    """
    return attr(type_, _uint_bytes(value, 4, type_))


def attr_u64(type_: int, value: int) -> bytes:
    """Encode an NLA_U64 attribute.

    Raises:
        InvalidRequest: ``value`` does not fit 64 bits.
    """
    return attr(type_, _uint_bytes(value, 8, type_))


def attr_string(type_: int, value: str) -> bytes:
    """Encode a string attribute: UTF-8 and a terminating NUL (NLA_NUL_STRING wants it).

    Raises:
        InvalidRequest: ``value`` contains a NUL, or is too long for an attribute.
    """
    if "\0" in value:
        raise InvalidRequest(f"attribute {type_}: string contains a NUL byte")
    try:
        data = value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(f"attribute {type_}: string is not valid Unicode") from exc
    return attr(type_, data + b"\0")


def attr_nested(type_: int, children: Iterable[bytes]) -> bytes:
    """Encode a nested attribute from already encoded attributes, with NLA_F_NESTED set.

    Raises:
        InvalidRequest: the children do not fit in one attribute.
    """
    return attr(type_, b"".join(children), nested=True)


@dataclass(frozen=True, slots=True)
class Attribute:
    """One decoded attribute.

    Attributes:
        type: the attribute type, without the flag bits.
        payload: the value's bytes, without padding.
        nested: NLA_F_NESTED was set (the kernel does not always set it on nests).
        net_byteorder: NLA_F_NET_BYTEORDER was set.
    """

    type: int
    payload: bytes
    nested: bool = False
    net_byteorder: bool = False

    def pack(self) -> bytes:
        """Encode the attribute back, flags included.

        Raises:
            InvalidRequest: the type or the length does not fit.
        """
        if not 0 <= self.type <= NLA_TYPE_MASK:
            raise InvalidRequest(f"attribute type {self.type} does not fit in 14 bits")
        flags = (NLA_F_NESTED if self.nested else 0) | (
            NLA_F_NET_BYTEORDER if self.net_byteorder else 0
        )
        return _attr(self.type | flags, self.payload)

    def _uint(self, size: int) -> int:
        if len(self.payload) != size:
            raise NetlinkFormatError(
                f"attribute {self.type}: expected {size} bytes, got {len(self.payload)}"
            )
        # NLA_F_NET_BYTEORDER marks a big-endian value; everything else is native.
        return int.from_bytes(self.payload, "big" if self.net_byteorder else sys.byteorder)

    def u8(self) -> int:
        """The value as NLA_U8. Raises NetlinkFormatError if it is not 1 byte."""
        return self._uint(1)

    def u16(self) -> int:
        """The value as NLA_U16. Raises NetlinkFormatError if it is not 2 bytes."""
        return self._uint(2)

    def u32(self) -> int:
        """The value as NLA_U32. Raises NetlinkFormatError if it is not 4 bytes."""
        return self._uint(4)

    def u64(self) -> int:
        """The value as NLA_U64. Raises NetlinkFormatError if it is not 8 bytes."""
        return self._uint(8)

    def string(self) -> str:
        """The value as a string, up to its first NUL.

        Raises:
            NetlinkFormatError: the bytes are not UTF-8.
        """
        raw = self.payload.split(b"\0", 1)[0]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise NetlinkFormatError(f"attribute {self.type}: string is not UTF-8") from exc

    def attrs(self) -> tuple[Attribute, ...]:
        """The value parsed as nested attributes.

        Raises:
            NetlinkFormatError: the payload is not a list of attributes.
        """
        return parse_attrs(self.payload)


def parse_attrs(data: bytes | memoryview) -> tuple[Attribute, ...]:
    """Parse a run of attributes, as found after a genlmsghdr or inside a nest.

    Raises:
        NetlinkFormatError: an attribute is truncated, shorter than its header, or
            followed by stray bytes.
    """
    view = memoryview(data)
    out: list[Attribute] = []
    pos = 0
    while pos < len(view):
        if len(view) - pos < NLA_HDRLEN:
            raise NetlinkFormatError(f"{len(view) - pos} stray bytes after the attributes")
        length, raw_type = _NLATTR.unpack_from(view, pos)
        if length < NLA_HDRLEN or length > len(view) - pos:
            raise NetlinkFormatError(
                f"attribute {raw_type & NLA_TYPE_MASK}: bad length {length} "
                f"({len(view) - pos} bytes left)"
            )
        out.append(
            Attribute(
                type=raw_type & NLA_TYPE_MASK,
                payload=bytes(view[pos + NLA_HDRLEN : pos + length]),
                nested=bool(raw_type & NLA_F_NESTED),
                net_byteorder=bool(raw_type & NLA_F_NET_BYTEORDER),
            )
        )
        # The last attribute's padding may be missing; the loop then simply ends.
        pos += align4(length)
    return tuple(out)


def last_attr(attrs: Iterable[Attribute], type_: int) -> Attribute | None:
    """The last attribute of a type (the kernel's nla_parse lets a later one win)."""
    found = None
    for a in attrs:
        if a.type == type_:
            found = a
    return found


# --- messages -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GenlMessage:
    """A generic-netlink message: nlmsghdr, genlmsghdr, attributes.

    Attributes:
        family: the family id (the nlmsghdr type).
        cmd: the family's command.
        version: the family's interface version.
        attrs: the top-level attributes, in order.
        flags: the nlmsghdr flags (``NlmFlag``).
        seq: the sequence number (0 in multicast events).
        pid: the sender's or receiver's port id (0 for the kernel).
        reserved: the genlmsghdr's reserved field.
    """

    family: int
    cmd: int
    version: int
    attrs: tuple[Attribute, ...] = ()
    flags: int = 0
    seq: int = 0
    pid: int = 0
    reserved: int = 0

    def attr(self, type_: int) -> Attribute | None:
        """The last top-level attribute of that type, or None."""
        return last_attr(self.attrs, type_)

    def pack(self) -> bytes:
        """Encode the message.

        Raises:
            InvalidRequest: a field does not fit its width.
        """
        _check_uint(self.cmd, 8, "genl cmd")
        _check_uint(self.version, 8, "genl version")
        _check_uint(self.reserved, 16, "genl reserved")
        body = _GENLMSGHDR.pack(self.cmd, self.version, self.reserved)
        body += b"".join(a.pack() for a in self.attrs)
        return _frame(self.family, self.flags, self.seq, self.pid, body)


@dataclass(frozen=True, slots=True)
class ErrorMessage:
    """An NLMSG_ERROR message: the kernel's answer to a request (errno 0 is an ack).

    Attributes:
        errno: the error as a positive errno value; 0 for an acknowledgement.
        request: the header of the request this answers (echoed by the kernel).
        request_payload: the request's payload, echoed on errors unless the socket has
            NETLINK_CAP_ACK (then ``flags`` has NLM_F_CAPPED and this is empty).
        message: the extended-ack text (NLMSGERR_ATTR_MSG), possibly empty.
        offset: the offset in the request of the attribute blamed (NLMSGERR_ATTR_OFFS).
        missing_type: the type of a missing required attribute (NLMSGERR_ATTR_MISS_TYPE).
        missing_nest: the offset of the nest it was missing from (NLMSGERR_ATTR_MISS_NEST).
        flags, seq, pid: the message's own header fields.
    """

    errno: int
    request: NlMsgHdr
    request_payload: bytes = b""
    message: str = ""
    offset: int | None = None
    missing_type: int | None = None
    missing_nest: int | None = None
    flags: int = 0
    seq: int = 0
    pid: int = 0

    @property
    def is_ack(self) -> bool:
        """True for an acknowledgement (errno 0)."""
        return self.errno == 0

    def pack(self) -> bytes:
        """Encode the message as the kernel would.

        The request's payload is written when NLM_F_CAPPED is clear and errno is not 0;
        extended-ack attributes when NLM_F_ACK_TLVS is set.

        Raises:
            InvalidRequest: a field does not fit its width.
        """
        body = _I32.pack(-_check_uint(self.errno, 31, "errno")) + self.request.pack()
        if _echoes_request(self.flags, self.errno):
            body += self.request_payload + _pad(len(self.request_payload))
        if self.flags & NLM_F_ACK_TLVS:
            body += _pack_ext_ack(self.message, self.offset, self.missing_type, self.missing_nest)
        return _frame(NlMsgType.ERROR, self.flags, self.seq, self.pid, body)


@dataclass(frozen=True, slots=True)
class DoneMessage:
    """An NLMSG_DONE message: the end of a multi-part reply.

    Attributes:
        errno: the dump's error as a positive errno value; 0 on success.
        message: the extended-ack text, possibly empty.
        flags, seq, pid: the message's header fields.
    """

    errno: int = 0
    message: str = ""
    flags: int = NlmFlag.MULTI
    seq: int = 0
    pid: int = 0

    def pack(self) -> bytes:
        """Encode the message as the kernel would.

        Raises:
            InvalidRequest: a field does not fit its width.
        """
        body = _I32.pack(-_check_uint(self.errno, 31, "errno"))
        if self.flags & NLM_F_ACK_TLVS:
            body += _pack_ext_ack(self.message, None, None, None)
        return _frame(NlMsgType.DONE, self.flags, self.seq, self.pid, body)


@dataclass(frozen=True, slots=True)
class OtherMessage:
    """A netlink control message this codec does not interpret (NOOP, OVERRUN...)."""

    type: int
    payload: bytes = b""
    flags: int = 0
    seq: int = 0
    pid: int = 0

    def pack(self) -> bytes:
        """Encode the message.

        Raises:
            InvalidRequest: a field does not fit its width.
        """
        if self.type >= NLMSG_MIN_TYPE:
            raise InvalidRequest(f"message type {self.type} belongs to a family")
        return _frame(self.type, self.flags, self.seq, self.pid, self.payload)


Message = GenlMessage | ErrorMessage | DoneMessage | OtherMessage


def _frame(type_: int, flags: int, seq: int, pid: int, body: bytes) -> bytes:
    length = NLMSG_HDRLEN + len(body)
    return NlMsgHdr(length, type_, flags, seq, pid).pack() + body + _pad(length)


def _echoes_request(flags: int, errno: int) -> bool:
    # Acks never echo the request (older kernels set no CAPPED flag on them either).
    return errno != 0 and not flags & NLM_F_CAPPED


def _pack_ext_ack(
    message: str, offset: int | None, missing_type: int | None, missing_nest: int | None
) -> bytes:
    parts = []
    if message:
        parts.append(attr_string(NlErrAttr.MSG, message))
    if offset is not None:
        parts.append(attr_u32(NlErrAttr.OFFS, offset))
    if missing_type is not None:
        parts.append(attr_u32(NlErrAttr.MISS_TYPE, missing_type))
    if missing_nest is not None:
        parts.append(attr_u32(NlErrAttr.MISS_NEST, missing_nest))
    return b"".join(parts)


@dataclass(frozen=True, slots=True)
class _ExtAck:
    message: str = ""
    offset: int | None = None
    missing_type: int | None = None
    missing_nest: int | None = None


def _parse_ext_ack(data: bytes | memoryview) -> _ExtAck:
    attrs = parse_attrs(data)
    msg = last_attr(attrs, NlErrAttr.MSG)
    offs = last_attr(attrs, NlErrAttr.OFFS)
    mtype = last_attr(attrs, NlErrAttr.MISS_TYPE)
    mnest = last_attr(attrs, NlErrAttr.MISS_NEST)
    return _ExtAck(
        message=msg.string() if msg else "",
        offset=offs.u32() if offs else None,
        missing_type=mtype.u32() if mtype else None,
        missing_nest=mnest.u32() if mnest else None,
    )


def _parse_errno(body: memoryview, what: str) -> int:
    err: int = _I32.unpack_from(body)[0]
    if err > 0:
        raise NetlinkFormatError(f"{what}: positive error {err}")
    return -err


def _parse_error(hdr: NlMsgHdr, body: memoryview) -> ErrorMessage:
    if len(body) < 4 + NLMSG_HDRLEN:
        raise NetlinkFormatError(f"NLMSG_ERROR: {len(body)} bytes, expected at least 20")
    err = _parse_errno(body, "NLMSG_ERROR")
    request = NlMsgHdr.unpack(body[4:20])
    rest = body[20:]
    payload = b""
    if _echoes_request(hdr.flags, err):
        size = request.length - NLMSG_HDRLEN
        if size < 0 or size > len(rest):
            raise NetlinkFormatError(
                f"NLMSG_ERROR: echoed request of {request.length} bytes does not fit"
            )
        payload = bytes(rest[:size])
        rest = rest[align4(size) :]
    ext = _parse_ext_ack(rest) if hdr.flags & NLM_F_ACK_TLVS else _ExtAck()
    return ErrorMessage(
        errno=err,
        request=request,
        request_payload=payload,
        message=ext.message,
        offset=ext.offset,
        missing_type=ext.missing_type,
        missing_nest=ext.missing_nest,
        flags=hdr.flags,
        seq=hdr.seq,
        pid=hdr.pid,
    )


def _parse_done(hdr: NlMsgHdr, body: memoryview) -> DoneMessage:
    err = 0
    message = ""
    if body:
        if len(body) < 4:
            raise NetlinkFormatError(f"NLMSG_DONE: {len(body)} bytes, expected 4")
        err = _parse_errno(body, "NLMSG_DONE")
        if hdr.flags & NLM_F_ACK_TLVS:
            message = _parse_ext_ack(body[4:]).message
    return DoneMessage(errno=err, message=message, flags=hdr.flags, seq=hdr.seq, pid=hdr.pid)


def _parse_genl(hdr: NlMsgHdr, body: memoryview) -> GenlMessage:
    if len(body) < GENL_HDRLEN:
        raise NetlinkFormatError(f"family {hdr.type}: {len(body)} bytes, no genlmsghdr")
    cmd, version, reserved = _GENLMSGHDR.unpack_from(body)
    return GenlMessage(
        family=hdr.type,
        cmd=cmd,
        version=version,
        attrs=parse_attrs(body[GENL_HDRLEN:]),
        flags=hdr.flags,
        seq=hdr.seq,
        pid=hdr.pid,
        reserved=reserved,
    )


def parse_messages(data: bytes | memoryview) -> list[Message]:
    """Parse a datagram read from a generic-netlink socket into its messages.

    Raises:
        NetlinkFormatError: a message is truncated or malformed.
    """
    view = memoryview(data)
    out: list[Message] = []
    pos = 0
    while pos < len(view):
        if len(view) - pos < NLMSG_HDRLEN:
            raise NetlinkFormatError(f"{len(view) - pos} stray bytes after the messages")
        hdr = NlMsgHdr.unpack(view[pos : pos + NLMSG_HDRLEN])
        if hdr.length < NLMSG_HDRLEN or hdr.length > len(view) - pos:
            raise NetlinkFormatError(
                f"message of type {hdr.type}: bad length {hdr.length} "
                f"({len(view) - pos} bytes left)"
            )
        body = view[pos + NLMSG_HDRLEN : pos + hdr.length]
        msg: Message
        if hdr.type == NlMsgType.ERROR:
            msg = _parse_error(hdr, body)
        elif hdr.type == NlMsgType.DONE:
            msg = _parse_done(hdr, body)
        elif hdr.type < NLMSG_MIN_TYPE:
            msg = OtherMessage(hdr.type, bytes(body), hdr.flags, hdr.seq, hdr.pid)
        else:
            msg = _parse_genl(hdr, body)
        out.append(msg)
        pos += align4(hdr.length)
    return out


def encode_request(
    family: int,
    cmd: int,
    version: int,
    attrs: Iterable[bytes] = (),
    *,
    seq: int,
    pid: int = 0,
    flags: int = NlmFlag.REQUEST | NlmFlag.ACK,
) -> bytes:
    """Encode a generic-netlink request from already encoded attributes.

    Args:
        family: the family id.
        cmd: the family's command.
        version: the family's interface version.
        attrs: encoded attributes (``attr_u32(...)``...).
        seq: the sequence number the replies will echo.
        pid: the sender's port id; 0 lets the kernel fill it in.
        flags: REQUEST and ACK by default: the kernel answers every request with an
            NLMSG_ERROR, an ack on success.

    Raises:
        InvalidRequest: a field does not fit its width.
    """
    _check_uint(family, 16, "family")
    _check_uint(cmd, 8, "genl cmd")
    _check_uint(version, 8, "genl version")
    body = _GENLMSGHDR.pack(cmd, version, 0) + b"".join(attrs)
    return _frame(family, flags, seq, pid, body)


def request_seq(data: bytes | memoryview) -> int:
    """The sequence number of an encoded message.

    Raises:
        NetlinkFormatError: ``data`` is shorter than a header.
    """
    return NlMsgHdr.unpack(memoryview(data)[:NLMSG_HDRLEN]).seq


# --- the controller: CTRL_CMD_GETFAMILY -----------------------------------------------


@dataclass(frozen=True, slots=True)
class McastGroup:
    """A family's multicast group."""

    name: str
    id: int


@dataclass(frozen=True, slots=True)
class FamilyInfo:
    """A generic-netlink family, as CTRL_CMD_GETFAMILY describes it.

    Attributes:
        id: the family id, the nlmsghdr type of its messages.
        name: the family name.
        version: the family's interface version.
        hdrsize: the size of the family's own header after the genlmsghdr.
        maxattr: the highest attribute type it accepts.
        groups: its multicast groups.
    """

    id: int
    name: str
    version: int = 0
    hdrsize: int = 0
    maxattr: int = 0
    groups: tuple[McastGroup, ...] = ()

    def group_id(self, name: str) -> int | None:
        """The id of the multicast group of that name, or None."""
        for g in self.groups:
            if g.name == name:
                return g.id
        return None


def encode_getfamily(name: str, *, seq: int) -> bytes:
    """Encode CTRL_CMD_GETFAMILY for a family name.

    Raises:
        InvalidRequest: the name contains a NUL.
    """
    return encode_request(
        GENL_ID_CTRL,
        CtrlCmd.GETFAMILY,
        CTRL_VERSION,
        [attr_string(CtrlAttr.FAMILY_NAME, name)],
        seq=seq,
    )


def _required(msg: GenlMessage, type_: int, what: str) -> Attribute:
    found = msg.attr(type_)
    if found is None:
        raise NetlinkFormatError(f"{what}: attribute {type_} is missing")
    return found


def decode_family(msg: GenlMessage) -> FamilyInfo:
    """Decode the controller's reply to CTRL_CMD_GETFAMILY (a CTRL_CMD_NEWFAMILY).

    Raises:
        NetlinkFormatError: the message is not such a reply, or is malformed.
    """
    what = "CTRL_CMD_NEWFAMILY"
    if msg.family != GENL_ID_CTRL or msg.cmd != CtrlCmd.NEWFAMILY:
        raise NetlinkFormatError(f"{what}: got family {msg.family} command {msg.cmd}")
    ints = {}
    for a in (CtrlAttr.VERSION, CtrlAttr.HDRSIZE, CtrlAttr.MAXATTR):
        found = msg.attr(a)
        ints[a] = found.u32() if found else 0
    groups: list[McastGroup] = []
    nest = msg.attr(CtrlAttr.MCAST_GROUPS)
    for item in nest.attrs() if nest else ():
        sub = item.attrs()
        gname = last_attr(sub, CtrlMcastGrpAttr.MCAST_GRP_NAME)
        gid = last_attr(sub, CtrlMcastGrpAttr.MCAST_GRP_ID)
        if gname is None or gid is None:
            raise NetlinkFormatError(f"{what}: multicast group without name or id")
        groups.append(McastGroup(gname.string(), gid.u32()))
    return FamilyInfo(
        id=_required(msg, CtrlAttr.FAMILY_ID, what).u16(),
        name=_required(msg, CtrlAttr.FAMILY_NAME, what).string(),
        version=ints[CtrlAttr.VERSION],
        hdrsize=ints[CtrlAttr.HDRSIZE],
        maxattr=ints[CtrlAttr.MAXATTR],
        groups=tuple(groups),
    )


# --- the nbd family -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    """The attributes of NBD_CMD_CONNECT and NBD_CMD_RECONFIGURE; None leaves one out.

    Attributes:
        index: the device number (nbdX); CONNECT without it picks or creates a free one.
        size_bytes: the device size (required by CONNECT).
        block_size_bytes: the logical block size (a power of two, 512..PAGE_SIZE).
        timeout: the request timeout in seconds (0: never).
        server_flags: the server's transmission flags (``TransmissionFlag``).
        client_flags: ``CFlag`` bits.
        sockets: descriptors of connected, negotiated sockets (CONNECT needs one).
        dead_conn_timeout: seconds to hold I/O while every connection is dead, waiting
            for RECONFIGURE.
        backend_identifier: a string shown in /sys/block/nbdX/backend; RECONFIGURE must
            repeat it when CONNECT set it.
    """

    index: int | None = None
    size_bytes: int | None = None
    block_size_bytes: int | None = None
    timeout: int | None = None
    server_flags: int | None = None
    client_flags: int | None = None
    sockets: tuple[int, ...] = ()
    dead_conn_timeout: int | None = None
    backend_identifier: str | None = None


_U64_FIELDS = (
    (NbdAttr.SIZE_BYTES, "size_bytes"),
    (NbdAttr.BLOCK_SIZE_BYTES, "block_size_bytes"),
    (NbdAttr.TIMEOUT, "timeout"),
    (NbdAttr.SERVER_FLAGS, "server_flags"),
    (NbdAttr.CLIENT_FLAGS, "client_flags"),
    (NbdAttr.DEAD_CONN_TIMEOUT, "dead_conn_timeout"),
)


def encode_device_attrs(config: DeviceConfig) -> list[bytes]:
    """Encode the attributes of a DeviceConfig.

    The order is INDEX, the u64 attributes in NbdAttr order, SOCKETS (each a SOCK_ITEM
    holding one SOCK_FD, nests flagged NLA_F_NESTED), BACKEND_IDENTIFIER; the kernel does
    not care about the order.

    Raises:
        InvalidRequest: a value does not fit its attribute, or a socket is negative.
    """
    out: list[bytes] = []
    if config.index is not None:
        out.append(attr_u32(NbdAttr.INDEX, config.index))
    for type_, name in _U64_FIELDS:
        value = getattr(config, name)
        if value is not None:
            out.append(attr_u64(type_, value))
    if config.sockets:
        items = []
        for fd in config.sockets:
            # The kernel turns the u32 back into an int descriptor: keep it to INT_MAX.
            if not 0 <= fd <= 0x7FFFFFFF:
                raise InvalidRequest(f"socket descriptor {fd} is not valid")
            items.append(attr_nested(SockItemAttr.SOCK_ITEM, [attr_u32(SockAttr.SOCK_FD, fd)]))
        out.append(attr_nested(NbdAttr.SOCKETS, items))
    if config.backend_identifier is not None:
        out.append(attr_string(NbdAttr.BACKEND_IDENTIFIER, config.backend_identifier))
    return out


def decode_device_attrs(attrs: Sequence[Attribute]) -> DeviceConfig:
    """Decode the attributes of a CONNECT or RECONFIGURE request, as the kernel reads them.

    Socket items without SOCK_FD are skipped, as the kernel skips them.

    Raises:
        NetlinkFormatError: an attribute is malformed, or a socket list holds something
            other than SOCK_ITEMs.
    """
    values: dict[str, int | None] = {}
    for type_, name in _U64_FIELDS:
        found = last_attr(attrs, type_)
        values[name] = found.u64() if found else None
    index = last_attr(attrs, NbdAttr.INDEX)
    sockets: list[int] = []
    nest = last_attr(attrs, NbdAttr.SOCKETS)
    for item in nest.attrs() if nest else ():
        if item.type != SockItemAttr.SOCK_ITEM:
            raise NetlinkFormatError(f"NBD_ATTR_SOCKETS: item of type {item.type}")
        fd = last_attr(item.attrs(), SockAttr.SOCK_FD)
        if fd is not None:
            sockets.append(fd.u32())
    backend = last_attr(attrs, NbdAttr.BACKEND_IDENTIFIER)
    return DeviceConfig(
        index=index.u32() if index else None,
        sockets=tuple(sockets),
        backend_identifier=backend.string() if backend else None,
        **values,
    )


def encode_connect(family: int, config: DeviceConfig, *, seq: int) -> bytes:
    """Encode NBD_CMD_CONNECT.

    Args:
        family: the nbd family id (``FamilyInfo.id``).
        config: at least ``size_bytes`` and one socket.
        seq: the sequence number.

    Raises:
        InvalidRequest: no size or no socket (the kernel would refuse with EINVAL), or
            a value that does not fit.
    """
    if config.size_bytes is None:
        raise InvalidRequest("NBD_CMD_CONNECT needs size_bytes")
    if not config.sockets:
        raise InvalidRequest("NBD_CMD_CONNECT needs at least one socket")
    return encode_request(
        family, NbdCmd.CONNECT, NBD_GENL_VERSION, encode_device_attrs(config), seq=seq
    )


def encode_reconfigure(family: int, config: DeviceConfig, *, seq: int) -> bytes:
    """Encode NBD_CMD_RECONFIGURE (new sockets replace dead ones only).

    Raises:
        InvalidRequest: no index, or a value that does not fit.
    """
    if config.index is None:
        raise InvalidRequest("NBD_CMD_RECONFIGURE needs an index")
    return encode_request(
        family, NbdCmd.RECONFIGURE, NBD_GENL_VERSION, encode_device_attrs(config), seq=seq
    )


def encode_disconnect(family: int, index: int, *, seq: int) -> bytes:
    """Encode NBD_CMD_DISCONNECT for device ``index``.

    Raises:
        InvalidRequest: the index does not fit 32 bits.
    """
    return encode_request(
        family, NbdCmd.DISCONNECT, NBD_GENL_VERSION, [attr_u32(NbdAttr.INDEX, index)], seq=seq
    )


def encode_status(family: int, index: int | None = None, *, seq: int) -> bytes:
    """Encode NBD_CMD_STATUS for one device, or for every device when index is None.

    Raises:
        InvalidRequest: the index does not fit 32 bits.
    """
    attrs = [] if index is None else [attr_u32(NbdAttr.INDEX, index)]
    return encode_request(family, NbdCmd.STATUS, NBD_GENL_VERSION, attrs, seq=seq)


def _expect(msg: GenlMessage, cmd: NbdCmd) -> None:
    if msg.cmd != cmd:
        raise NetlinkFormatError(f"expected NBD_CMD_{cmd.name}, got command {msg.cmd}")


def decode_connect_reply(msg: GenlMessage) -> int:
    """The device index from the kernel's NBD_CMD_CONNECT reply.

    Raises:
        NetlinkFormatError: not a CONNECT reply, or no valid INDEX.
    """
    _expect(msg, NbdCmd.CONNECT)
    return _required(msg, NbdAttr.INDEX, "NBD_CMD_CONNECT").u32()


def decode_link_dead(msg: GenlMessage) -> int:
    """The device index from an NBD_CMD_LINK_DEAD multicast event.

    Raises:
        NetlinkFormatError: not a LINK_DEAD event, or no valid INDEX.
    """
    _expect(msg, NbdCmd.LINK_DEAD)
    return _required(msg, NbdAttr.INDEX, "NBD_CMD_LINK_DEAD").u32()


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    """One device of an NBD_CMD_STATUS reply."""

    index: int
    connected: bool


def decode_status_reply(msg: GenlMessage) -> tuple[DeviceStatus, ...]:
    """The devices listed in the kernel's NBD_CMD_STATUS reply.

    The kernel nests without NLA_F_NESTED here; the flag is not required.

    Raises:
        NetlinkFormatError: not a STATUS reply, no DEVICE_LIST, or a malformed item.
    """
    _expect(msg, NbdCmd.STATUS)
    out: list[DeviceStatus] = []
    for item in _required(msg, NbdAttr.DEVICE_LIST, "NBD_CMD_STATUS").attrs():
        if item.type != DeviceItemAttr.DEVICE_ITEM:
            continue  # an item type from a later kernel
        sub = item.attrs()
        index = last_attr(sub, DeviceAttr.DEVICE_INDEX)
        if index is None:
            raise NetlinkFormatError("NBD_CMD_STATUS: device item without an index")
        connected = last_attr(sub, DeviceAttr.DEVICE_CONNECTED)
        out.append(DeviceStatus(index.u32(), bool(connected.u8()) if connected else False))
    return tuple(out)


# What the kernel sends, for tests and fakes of the kernel side.


def encode_connect_reply(family: int, index: int, *, seq: int, pid: int) -> bytes:
    """Encode the kernel's reply to NBD_CMD_CONNECT (for tests).

    Raises:
        InvalidRequest: a value does not fit.
    """
    attrs = [attr_u32(NbdAttr.INDEX, index)]
    return encode_request(
        family, NbdCmd.CONNECT, NBD_GENL_VERSION, attrs, seq=seq, pid=pid, flags=0
    )


def encode_link_dead(family: int, index: int) -> bytes:
    """Encode the kernel's NBD_CMD_LINK_DEAD multicast event (for tests).

    Raises:
        InvalidRequest: the index does not fit.
    """
    attrs = [attr_u32(NbdAttr.INDEX, index)]
    return encode_request(family, NbdCmd.LINK_DEAD, NBD_GENL_VERSION, attrs, seq=0, flags=0)


def encode_status_reply(
    family: int, devices: Iterable[DeviceStatus], *, seq: int, pid: int
) -> bytes:
    """Encode the kernel's reply to NBD_CMD_STATUS, nests without NLA_F_NESTED (for tests).

    Raises:
        InvalidRequest: a value does not fit.
    """
    items = b"".join(
        attr(
            DeviceItemAttr.DEVICE_ITEM,
            attr_u32(DeviceAttr.DEVICE_INDEX, d.index)
            + attr_u8(DeviceAttr.DEVICE_CONNECTED, int(d.connected)),
        )
        for d in devices
    )
    attrs = [attr(NbdAttr.DEVICE_LIST, items)]
    return encode_request(family, NbdCmd.STATUS, NBD_GENL_VERSION, attrs, seq=seq, pid=pid, flags=0)
