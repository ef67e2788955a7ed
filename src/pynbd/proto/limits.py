"""The client's bounds on what a server may make it hold: one frozen record.

A server decides how many option replies it sends and how long its reply chunks are;
without bounds a hostile or broken one can make a client (and the kernel attach, which
runs as root) hold gigabytes. :class:`ClientLimits` gathers every such bound in one
place. The handshake core (:class:`~pynbd.proto.handshake.ClientHandshake`, through
:attr:`~pynbd.proto.handshake.HandshakeConfig.limits`) and the transmission core
(:class:`~pynbd.proto.transmission.ClientTransmission`) read it; the clients take it as
``limits=`` and pass it down; kernel attach and the command line use the defaults.

Going over a bound is a :class:`~pynbd.errors.ProtocolError` that names the bound,
raised before the bytes that would go over it are buffered, except for block status:
a server may describe less than was asked (spec "NBD_CMD_BLOCK_STATUS"), so the
extents after the first ``max_extents`` are dropped unread and the caller asks again
from where the kept ones end.

Bounds elsewhere, which are not choices but the protocol's: an option reply carries
at most 16 KiB (``MAX_OPTION_REPLY``: its strings are at most 4096 bytes each); a
non-data reply chunk at most 16 MiB + 4104 bytes (``MAX_METADATA_CHUNK``: 2^20
extended descriptors, the spec's "SHOULD NOT send more"); an error chunk's message at
most 4096 bytes, and nothing after it is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

#: Bytes of all option replies in one handshake (headers included).
DEFAULT_MAX_HANDSHAKE_BYTES = 16 * 1024 * 1024
#: Option replies in one handshake, final replies included.
DEFAULT_MAX_OPTION_REPLIES = 65_536
#: Extents kept from one block status reply.
DEFAULT_MAX_EXTENTS = 65_536
#: Separate ranges the chunks of one read's reply may leave before they join up.
DEFAULT_MAX_READ_RANGES = 4096


@dataclass(frozen=True, slots=True)
class ClientLimits:
    """What a server may make a client hold; every field has a documented default.

    Attributes:
        max_handshake_bytes: bytes of option replies (20-byte headers and payloads)
            accepted in one handshake, STARTTLS included. Default 16 MiB: a LIST of
            10,000 exports (nbdkit's own cap on a list) with names and descriptions of
            800 bytes fits. A reply that would go over it fails when its header
            arrives, before its payload is read.
        max_option_replies: option replies accepted in one handshake, final replies
            included (a LIST of N exports takes N + 1). Default 65,536. With the bytes
            bound it caps what LIST and LIST_META_CONTEXT entries can cost in objects.
            NBD_REP_INFO replies of a type this client does not know are dropped, and
            of a known type only the last is kept, so an export's information never
            grows with the number of replies.
        max_extents: extents kept from one block status reply, all its meta contexts
            together: each context's chunk keeps at most ``max(1, max_extents //
            contexts asked)``; the descriptors after those are drained without being
            buffered or parsed. The kept ones describe a prefix of the range, so
            ``block_status`` asks again from where they end. Default 65,536 (about 4
            MiB of :class:`~pynbd.proto.records.Extent` objects); the spec asks servers
            not to send more than 2^20 in a chunk, which nbdkit honours.
        max_read_ranges: separate byte ranges the content chunks of one read's reply
            (OFFSET_DATA, OFFSET_HOLE) may leave before they join up. Chunks that come
            in order, or in reverse order, join into one range however many they are;
            only chunks sent out of order with gaps between them make more, and each
            costs the client a record until the gap is filled. Default 4096 (about
            0.5 MiB a read); without it a 32 MiB read answered with one-byte chunks at
            every other offset would cost some 2 GiB.

    Raises:
        ValueError: a bound is below 1.
    """

    max_handshake_bytes: int = DEFAULT_MAX_HANDSHAKE_BYTES
    max_option_replies: int = DEFAULT_MAX_OPTION_REPLIES
    max_extents: int = DEFAULT_MAX_EXTENTS
    max_read_ranges: int = DEFAULT_MAX_READ_RANGES

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if type(value) is not int or value < 1:
                raise ValueError(
                    f"ClientLimits.{f.name} must be an int of at least 1, not {value!r}"
                )


#: The defaults, shared.
DEFAULT_LIMITS = ClientLimits()

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_MAX_EXTENTS",
    "DEFAULT_MAX_HANDSHAKE_BYTES",
    "DEFAULT_MAX_OPTION_REPLIES",
    "DEFAULT_MAX_READ_RANGES",
    "ClientLimits",
]
