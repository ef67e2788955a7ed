"""What the server side of the sans-IO core shares: exports, configuration, events.

An :class:`ExportSpec` is everything the protocol needs to know about one export (size,
what it supports, block sizes); it says nothing about where the bytes live, which is
the driver's business (:mod:`pynbd.server`). A :class:`ServerConfig` gathers the exports
and the server's negotiation policy. The events are what
:meth:`~pynbd.proto.server.ServerConnection.next_event` hands the driver.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

from .constants import (
    BASE_ALLOCATION,
    DEFAULT_MAX_PAYLOAD,
    DEFAULT_MIN_BLOCK,
    DEFAULT_PREFERRED_BLOCK,
    MAX_MIN_BLOCK,
    Cmd,
    CmdFlag,
    TransmissionFlag,
)
from .events import NEED_DATA, NeedData, StartTLS
from .records import encode_string

__all__ = [
    "AVAILABLE_META_CONTEXTS",
    "NEED_DATA",
    "BufferPool",
    "Disconnect",
    "ExportSpec",
    "RequestReceived",
    "ServerConfig",
    "ServerEvent",
    "ServerNegotiated",
    "StartTLS",
    "TLSPolicy",
    "TransmissionStarted",
]

#: The meta contexts this server can serve (spec "Metadata querying").
AVAILABLE_META_CONTEXTS: tuple[str, ...] = (BASE_ALLOCATION,)

U32_MAX = 0xFFFFFFFF
U64_MAX = 0xFFFFFFFFFFFFFFFF


class BufferPool:
    """Reusable bytearrays for big WRITE payloads and READ replies (one per connection).

    A fresh ``bytearray(n)`` costs a memset of ``n`` bytes and, for the sizes of bulk
    transfers, page faults (and often an ``mmap``/``munmap`` or ``brk`` pair) on every
    request. Buffers of at least ``min_size`` bytes come back here once their user is
    done with them and are handed out again for a request of the same size.

    Ownership is the caller's business: :meth:`give` a buffer only when nothing holds a
    view of it any more (the backend returned, the reply was sent). A buffer handed out
    may hold stale bytes.

    Args:
        max_bytes: most bytes kept free (beyond that, given buffers are dropped).
        min_size: smaller requests get a plain new bytearray (cheap, and not kept).
    """

    __slots__ = ("_free", "_held", "max_bytes", "min_size")

    def __init__(self, max_bytes: int = 16 * 1024 * 1024, min_size: int = 32 * 1024) -> None:
        self.max_bytes = max_bytes
        self.min_size = min_size
        self._free: dict[int, list[bytearray]] = {}
        self._held = 0

    @property
    def held(self) -> int:
        """Bytes kept free for reuse."""
        return self._held

    def take(self, size: int) -> bytearray:
        """A bytearray of ``size`` bytes (contents unspecified unless new)."""
        if size >= self.min_size:
            free = self._free.get(size)
            if free:
                self._held -= size
                return free.pop()
        return bytearray(size)

    def give(self, buf: bytearray) -> None:
        """Take ``buf`` back for reuse (nothing may use it afterwards)."""
        size = len(buf)
        if size < self.min_size or self._held + size > self.max_bytes:
            return
        self._held += size
        free = self._free.get(size)
        if free is None:
            self._free[size] = [buf]
        else:
            free.append(buf)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class TLSPolicy(enum.Enum):
    """The spec's three server modes ("TLS support", "Server-side requirements")."""

    NONE = "none"  # NOTLS: NBD_OPT_STARTTLS is refused with NBD_REP_ERR_POLICY
    OPTIONAL = "optional"  # SELECTIVETLS: STARTTLS accepted; tls_only exports need it
    REQUIRED = "required"  # FORCEDTLS: every option but STARTTLS and ABORT needs TLS


@dataclass(frozen=True, slots=True)
class ExportSpec:
    """What the protocol needs to know about one export.

    Attributes:
        name: the export's canonical name.
        size: its size in bytes.
        description: shown by NBD_OPT_LIST and NBD_INFO_DESCRIPTION.
        read_only: refuse writes, trims and zeroing (NBD_FLAG_READ_ONLY).
        can_flush, can_fua, can_trim, can_zero, can_fast_zero, can_cache: advertise
            the matching command or flag.
        can_multi_conn: advertise NBD_FLAG_CAN_MULTI_CONN (only when every connection
            sees the same data and a flush on one covers writes made on all).
        rotational: advertise NBD_FLAG_ROTATIONAL.
        minimum_block, preferred_block, maximum_payload: the size constraints
            (spec "Size constraints"); the defaults are the spec's.
        block_size_required: refuse NBD_OPT_GO without NBD_INFO_BLOCK_SIZE
            (NBD_REP_ERR_BLOCK_SIZE_REQD) and NBD_OPT_EXPORT_NAME (by closing).
        tls_only: in TLSPolicy.OPTIONAL, the export needs TLS.

    Raises:
        ValueError: a string over 4096 bytes, a size out of range, or block sizes
            that break the spec's constraints.
    """

    name: str
    size: int
    description: str = ""
    read_only: bool = False
    can_flush: bool = False
    can_fua: bool = False
    can_trim: bool = False
    can_zero: bool = False
    can_fast_zero: bool = False
    can_cache: bool = False
    can_multi_conn: bool = False
    rotational: bool = False
    minimum_block: int = DEFAULT_MIN_BLOCK
    preferred_block: int = DEFAULT_PREFERRED_BLOCK
    maximum_payload: int = DEFAULT_MAX_PAYLOAD
    block_size_required: bool = False
    tls_only: bool = False

    def __post_init__(self) -> None:
        encode_string(self.name, "export name")
        encode_string(self.description, "export description")
        if not 0 <= self.size <= U64_MAX:
            raise ValueError(f"export size {self.size} does not fit in 64 bits")
        check_block_sizes(self.minimum_block, self.preferred_block, self.maximum_payload)

    @property
    def default_block_sizes(self) -> bool:
        """True when the constraints are the spec's defaults (nothing to advertise)."""
        return (self.minimum_block, self.preferred_block, self.maximum_payload) == (
            DEFAULT_MIN_BLOCK,
            DEFAULT_PREFERRED_BLOCK,
            DEFAULT_MAX_PAYLOAD,
        )

    def transmission_flags(
        self, *, structured: bool, extended: bool, meta_contexts: bool
    ) -> TransmissionFlag:
        """The transmission flags for a client that negotiated what the arguments say.

        Write-side flags are left out of read-only exports; DF needs structured
        replies; BLOCK_STATUS_PAYLOAD needs extended headers and a selected context
        (spec "Transmission flags").
        """
        flags = TransmissionFlag.HAS_FLAGS
        if self.read_only:
            flags |= TransmissionFlag.READ_ONLY
        else:
            if self.can_fua:
                flags |= TransmissionFlag.SEND_FUA
            if self.can_trim:
                flags |= TransmissionFlag.SEND_TRIM
            if self.can_zero:
                flags |= TransmissionFlag.SEND_WRITE_ZEROES
                if self.can_fast_zero:
                    flags |= TransmissionFlag.SEND_FAST_ZERO
        if self.can_flush:
            flags |= TransmissionFlag.SEND_FLUSH
        if self.rotational:
            flags |= TransmissionFlag.ROTATIONAL
        if self.can_multi_conn:
            flags |= TransmissionFlag.CAN_MULTI_CONN
        if self.can_cache:
            flags |= TransmissionFlag.SEND_CACHE
        if structured or extended:
            flags |= TransmissionFlag.SEND_DF
        if extended and meta_contexts:
            flags |= TransmissionFlag.BLOCK_STATUS_PAYLOAD
        return flags


def check_block_sizes(minimum: int, preferred: int, maximum: int) -> None:
    """Raise ValueError unless the size constraints obey the spec's rules."""
    if not _pow2(minimum) or minimum > MAX_MIN_BLOCK:
        raise ValueError(f"minimum block size {minimum} is not a power of 2 <= 64 KiB")
    if not _pow2(preferred) or preferred < max(minimum, 512):
        raise ValueError(f"preferred block size {preferred} is not a power of 2 >= max(min, 512)")
    if maximum > U32_MAX or maximum < preferred:
        raise ValueError(f"maximum payload {maximum} is not in [preferred, 2**32 - 1]")
    if maximum != U32_MAX and maximum % minimum:
        raise ValueError(f"maximum payload {maximum} is not a multiple of the minimum")


@dataclass(frozen=True)
class ServerConfig:
    """The server's exports and negotiation policy (shared by all its connections).

    Attributes:
        exports: name -> export; each key must be its spec's name.
        default_export: the export that the empty name ("") selects; None means ""
            selects only an export actually named "".
        structured_replies: accept NBD_OPT_STRUCTURED_REPLY.
        extended_headers: accept NBD_OPT_EXTENDED_HEADERS.
        allow_list: answer NBD_OPT_LIST (else NBD_REP_ERR_POLICY).
        tls: the TLS mode; anything but NONE needs a driver that can do TLS.
        max_option_length: longest option data accepted; a longer one closes the
            connection (a lying length is a denial of service).
        max_options: most options one connection may send, STARTTLS and refused
            ones included (TLS resets the negotiation, not the count); the next one
            gets NBD_REP_ERR_POLICY and the connection is closed (nbdkit allows 32).

    Raises:
        ValueError: a key that is not its export's name, an unknown default, or a
            limit below 1.
    """

    exports: Mapping[str, ExportSpec]
    default_export: str | None = None
    structured_replies: bool = True
    extended_headers: bool = True
    allow_list: bool = True
    tls: TLSPolicy = TLSPolicy.NONE
    max_option_length: int = 64 * 1024
    max_options: int = 32

    def __post_init__(self) -> None:
        if self.max_options < 1:
            raise ValueError(f"max_options must be at least 1, not {self.max_options}")
        for name, spec in self.exports.items():
            if name != spec.name:
                raise ValueError(f"export key {name!r} differs from its name {spec.name!r}")
        if self.default_export is not None and self.default_export not in self.exports:
            raise ValueError(f"default export {self.default_export!r} is not an export")

    def lookup(self, name: str) -> ExportSpec | None:
        """The export a client's name selects, or None."""
        if name == "" and self.default_export is not None:
            name = self.default_export
        return self.exports.get(name)


@dataclass(slots=True)
class ServerNegotiated:
    """What one connection's handshake settled."""

    export: ExportSpec | None = None
    flags: TransmissionFlag = TransmissionFlag.HAS_FLAGS
    fixed_newstyle: bool = False
    no_zeroes: bool = False
    tls: bool = False
    structured_replies: bool = False
    extended_headers: bool = False
    #: context id -> name, as selected by NBD_OPT_SET_META_CONTEXT for ``export``.
    meta_contexts: dict[int, str] = field(default_factory=dict)
    #: The client asked for NBD_INFO_BLOCK_SIZE in its NBD_OPT_GO (so it obeys it).
    block_size_requested: bool = False
    #: The option that entered transmission: "go" or "export name".
    entered_by: str = ""


# --- Events ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TransmissionStarted:
    """The handshake is over; requests for ``negotiated.export`` follow."""

    negotiated: ServerNegotiated

    @property
    def export(self) -> ExportSpec:
        assert self.negotiated.export is not None  # set before this event is made
        return self.negotiated.export


@dataclass(slots=True, eq=False)
class RequestReceived:
    """A request that passed validation; the driver performs it and replies.

    Treat it as read-only. It is not a frozen dataclass only because a frozen one
    sets every field through ``object.__setattr__``, a call per field on every request.

    Attributes:
        cookie: the client's cookie (opaque; echoed in the reply).
        command: the command.
        flags: the command flags (FUA, NO_HOLE, FAST_ZERO, REQ_ONE, DF...).
        offset, length: the range in the export (``length`` is the effect length,
            also for a block status request that carried a payload).
        payload: the data of a WRITE (a view of a buffer the core allocated), else None.
        contexts: for BLOCK_STATUS, the meta context ids to answer for.
        seq: the core's number for this request (replies are matched on it).
        segments: for a WRITE received in place by the driver's ``payload_sink``
            (:class:`~pynbd.proto.server_transmission.ServerTransmission`), the
            buffers the sink gave, now full of the data (``payload`` is then None).
    """

    cookie: int
    command: Cmd
    flags: CmdFlag
    offset: int
    length: int
    payload: memoryview | None = None
    contexts: tuple[int, ...] = ()
    seq: int = 0
    segments: Sequence[memoryview] | None = None

    @property
    def fua(self) -> bool:
        return bool(self.flags & CmdFlag.FUA)


@dataclass(frozen=True, slots=True)
class Disconnect:
    """The session is over; after the in-flight replies, close the connection.

    ``soft`` is True when the client ended it by the book (NBD_OPT_ABORT, NBD_CMD_DISC),
    False when it closed the stream or the server refused to go on (an unknown export
    after NBD_OPT_EXPORT_NAME). No event follows this one.
    """

    reason: str
    soft: bool


ServerEvent: TypeAlias = NeedData | StartTLS | TransmissionStarted | RequestReceived | Disconnect
