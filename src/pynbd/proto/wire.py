"""The NBD wire layouts, defined once, and the receive buffer both transmission cores
parse from.

Every fixed layout of the spec's "Handshake" and "Transmission" sections is one
:class:`struct.Struct` here (all integers big-endian); :mod:`.records` packs and parses
whole records with them, and the two transmission cores (:mod:`.transmission` for the
client, :mod:`.server_transmission` for the server) use them on their hot paths.
"""

from __future__ import annotations

import struct

from .constants import OLDSTYLE_ZEROES

# -- handshake ----------------------------------------------------------------------
#: S: NBDMAGIC, IHAVEOPT, u16 handshake flags.
GREETING = struct.Struct(">QQH")
#: S: NBDMAGIC, cliserv magic, u64 size, u32 flags (then 124 zero bytes).
OLDSTYLE = struct.Struct(">QQQI")
#: C: IHAVEOPT, u32 option, u32 length.
OPTION_REQUEST = struct.Struct(">QII")
#: S: reply magic, u32 option, u32 reply type, u32 length.
OPTION_REPLY = struct.Struct(">QIII")
#: S: u64 size, u16 flags: the answer to NBD_OPT_EXPORT_NAME (then 124 zero bytes).
EXPORT_NAME_REPLY = struct.Struct(">QH")
#: NBD_INFO_EXPORT: u16 type, u64 size, u16 flags.
INFO_EXPORT = struct.Struct(">HQH")
#: NBD_INFO_BLOCK_SIZE: u16 type, u32 minimum, u32 preferred, u32 maximum.
INFO_BLOCK_SIZE = struct.Struct(">HIII")

# -- transmission -------------------------------------------------------------------
#: C: magic, u16 flags, u16 type, u64 cookie, u64 offset, u32 length.
REQUEST = struct.Struct(">IHHQQI")
#: C (extended headers): magic, u16 flags, u16 type, u64 cookie, u64 offset, u64 length.
EXTENDED_REQUEST = struct.Struct(">IHHQQQ")
#: S: magic, u32 error, u64 cookie.
SIMPLE_REPLY = struct.Struct(">IIQ")
#: S: magic, u16 flags, u16 type, u64 cookie, u32 length.
STRUCTURED_REPLY = struct.Struct(">IHHQI")
#: S (extended headers): magic, u16 flags, u16 type, u64 cookie, u64 offset, u64 length.
EXTENDED_REPLY = struct.Struct(">IHHQQQ")
#: A structured OFFSET_DATA chunk's header with the u64 offset that starts its payload.
STRUCTURED_DATA = struct.Struct(">IHHQIQ")
#: The same with extended headers.
EXTENDED_DATA = struct.Struct(">IHHQQQQ")
#: Every reply header carries the cookie at byte 8.
REPLY_COOKIE = struct.Struct(">8xQ")
#: NBD_REPLY_TYPE_BLOCK_STATUS: u32 context id, then descriptors of u32 length, u32 flags.
DESCRIPTOR = struct.Struct(">II")
#: NBD_REPLY_TYPE_BLOCK_STATUS_EXT: u32 context id, u32 count, then descriptors of u64
#: length, u64 flags.
EXTENDED_STATUS_HEAD = struct.Struct(">II")
EXTENDED_DESCRIPTOR = struct.Struct(">QQ")
#: NBD_REPLY_TYPE_ERROR(_OFFSET) payload: u32 error, u16 message length.
ERROR_CHUNK = struct.Struct(">IH")
#: NBD_REPLY_TYPE_OFFSET_HOLE payload: u64 offset, u32 size.
HOLE = struct.Struct(">QI")

U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")

NEWSTYLE_GREETING_SIZE = GREETING.size  # 18
OLDSTYLE_GREETING_SIZE = OLDSTYLE.size + OLDSTYLE_ZEROES  # 152
OPTION_HEADER_SIZE = OPTION_REQUEST.size  # 16
OPTION_REPLY_HEADER_SIZE = OPTION_REPLY.size  # 20
EXPORT_NAME_REPLY_SIZE = EXPORT_NAME_REPLY.size  # 10, plus 124 zeroes without NO_ZEROES
REQUEST_SIZE = REQUEST.size  # 28
EXTENDED_REQUEST_SIZE = EXTENDED_REQUEST.size  # 32
SIMPLE_REPLY_SIZE = SIMPLE_REPLY.size  # 16
STRUCTURED_REPLY_SIZE = STRUCTURED_REPLY.size  # 20
EXTENDED_REPLY_SIZE = EXTENDED_REPLY.size  # 32


class ReceiveBuffer:
    """The receive buffer of a transmission core, in the shape of asyncio's
    ``BufferedProtocol``.

    Bytes ``[_start, _end)`` of ``_buf`` have arrived and are not parsed yet. A core
    says where the next bytes go (``receive_buffer``: this buffer, or a payload's own
    buffer so that it is not copied) and takes them (``buffer_updated``); both are the
    core's, since only the core knows what comes next. :meth:`receive_data` feeds
    bytes through them, for drivers that have bytes rather than a buffer to lend.
    """

    def __init__(self, size: int) -> None:
        self._buf = bytearray(max(size, 64))
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0

    def receive_buffer(self) -> memoryview:
        """A buffer for the next bytes from the peer (never empty)."""
        raise NotImplementedError

    def buffer_updated(self, nbytes: int) -> object:
        """``nbytes`` were written into the last :meth:`receive_buffer`; 0 means EOF."""
        raise NotImplementedError

    def _room(self, alone: int) -> memoryview:
        """The free part of the buffer, after the unparsed bytes.

        When nothing is left unparsed the buffer starts over, and ``alone`` (if not 0)
        limits the room to that many bytes: a header read alone, so that the big
        payload expected after it lands in its own buffer instead of being copied out
        of this one. A full tail is moved to the front first.
        """
        if self._start == self._end:
            self._start = self._end = 0
            return self._view[:alone] if alone else self._view
        if self._end == len(self._buf):
            pending = self._end - self._start
            self._buf[:pending] = self._buf[self._start : self._end]
            self._start, self._end = 0, pending
        return self._view[self._end :]

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer (copying them); ``b""`` means end of stream.

        Raises what :meth:`buffer_updated` raises.
        """
        if not data:
            self.buffer_updated(0)
            return
        view = memoryview(data)
        while view:
            buf = self.receive_buffer()
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            view = view[n:]
            self.buffer_updated(n)
