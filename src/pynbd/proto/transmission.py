"""The client side of the NBD transmission phase, sans-IO.

:class:`ClientTransmission` turns requests into bytes and the server's bytes into
completed :class:`Reply` events. It keeps the in-flight table (cookie -> request),
reads simple, structured and extended replies, reassembles OFFSET_DATA and OFFSET_HOLE
chunks into the caller's buffer, collects BLOCK_STATUS(_EXT) extents and error chunks,
and checks every rule of the spec's "Transmission" section on the way.

Receiving follows asyncio's ``BufferedProtocol`` shape so that read payloads land in
the caller's buffer without a copy::

    buf = core.receive_buffer()      # where the next bytes should go
    n = sock.recv_into(buf)
    core.buffer_updated(n)           # 0 means end of stream
    while (reply := core.next_event()) is not None: ...

While a large read payload is being received and nothing else is buffered,
``receive_buffer`` returns a view of the caller's own buffer. A read queued with
``read_bytes`` has no buffer: its data comes back as a new ``bytes`` in its reply.
Sending gives a list of buffers for ``sendmsg`` (the header and the caller's payload,
never joined).

Every request has a usual reply, known byte for byte when it is sent (its ``expect``):
a success, or for a read one OFFSET_DATA chunk with DONE that covers it. A reply that
starts so needs no other check; the parser completes it at once (``_fast_replies``),
and anything else takes the general path. A blocking driver with one request at a time
may go one step further (:meth:`ClientTransmission.direct_read`,
:meth:`~ClientTransmission.direct_request`): the core lends it the room where that
usual reply would land in the receive buffer, the driver receives into it, and the
core judges what came (:meth:`~ClientTransmission.direct_received`). The usual reply
then costs no bookkeeping at all; anything else is already where the general path
reads it, so the driver has nothing to hand back. That is the ``_DIRECT`` state: while
it lasts the core accepts only ``direct_received``, ``direct_done`` and ``fail_all``.

Errors: peer input raises only :class:`ProtocolError` (the connection is then dead);
a request the server may not be sent raises :class:`InvalidRequest` or
:class:`UnsupportedError` and sends nothing. Server-side errors for a request are
reported in its :class:`Reply` as a :class:`RequestError`.
"""

from __future__ import annotations

import bisect
import struct
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple, TypeAlias

from ..errors import (
    ConnectionClosed,
    InvalidRequest,
    ProtocolError,
    RequestError,
    UnsupportedError,
)
from .constants import (
    CHUNK_ERROR_BIT,
    COMMAND_NEEDS,
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    FLAG_NEEDS,
    MAX_STRING,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Chunk,
    Cmd,
    CmdFlag,
    Err,
    ReplyFlag,
    TransmissionFlag,
)
from .handshake import Negotiated
from .limits import DEFAULT_LIMITS, ClientLimits
from .records import (
    BlockStatusChunk,
    ErrorChunk,
    Extent,
    OffsetHole,
    Request,
)
from .wire import (
    EXTENDED_DATA,
    EXTENDED_REPLY,
    EXTENDED_REPLY_SIZE,
    EXTENDED_REQUEST,
    REPLY_COOKIE,
    REQUEST,
    SIMPLE_REPLY,
    SIMPLE_REPLY_SIZE,
    STRUCTURED_DATA,
    STRUCTURED_REPLY,
    STRUCTURED_REPLY_SIZE,
    U32,
    U64,
    ReceiveBuffer,
)

Buffer: TypeAlias = bytes | bytearray | memoryview

# The usual start of a read's reply (see _InFlight.expect): a simple reply without
# error; a structured OFFSET_DATA chunk with DONE and its data offset; the same with
# extended headers, which echo the request's offset in the header too.
_NO_CONTEXTS: frozenset[int] = frozenset()

U32_MAX = 0xFFFFFFFF
U64_MAX = 0xFFFFFFFFFFFFFFFF
#: Reads of at least this many bytes are received straight into the caller's buffer
#: (headers are then read on their own); smaller ones go through the receive buffer,
#: where one recv can bring several replies.
DIRECT_READ = 64 * 1024
# Plain ints for the hot paths: IntFlag operators run Python code on every use.
_DONE = int(ReplyFlag.DONE)
_READ = Cmd.READ
_READ_WIRE = int(Cmd.READ)
_WRITE = Cmd.WRITE
_NONE = int(Chunk.NONE)
_DF = int(CmdFlag.DF)
_REQ_ONE = int(CmdFlag.REQ_ONE)
_PAYLOAD_LEN = int(CmdFlag.PAYLOAD_LEN)
_BLOCK_STATUS_PAYLOAD = int(TransmissionFlag.BLOCK_STATUS_PAYLOAD)
_OFFSET_DATA = int(Chunk.OFFSET_DATA)
#: Largest payload accepted for a chunk that is not read data (block status, errors).
#: A status chunk SHOULD stay under 4 + 8 * 2**20 bytes; allow the 64-bit form twice
#: that, and treat anything bigger as a lying length. Only what is kept of it is
#: buffered (see ClientLimits.max_extents); the rest is drained.
MAX_METADATA_CHUNK = 8 + 16 * (1 << 20) + 4096
#: What is kept of an error chunk: the error, the message length and the message (at
#: most 4096 bytes, spec "Conventions"); ERROR_OFFSET's offset comes after them. Bytes
#: after the message of another error type are drained unread.
_ERROR_KEEP = 6 + MAX_STRING
_ERROR_OFFSET_MAX = _ERROR_KEEP + 8
#: The buffer a chunk's unkept bytes are drained into, at most this much at a time.
_DRAIN = 64 * 1024

_WRITE_CMDS = frozenset({Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES})
#: Which command flags each command may carry (spec "Command flags").
_ALLOWED_FLAGS: dict[Cmd, CmdFlag] = {
    Cmd.READ: CmdFlag.DF,
    Cmd.WRITE: CmdFlag.FUA,
    Cmd.FLUSH: CmdFlag(0),
    Cmd.TRIM: CmdFlag.FUA,
    Cmd.CACHE: CmdFlag(0),
    Cmd.WRITE_ZEROES: CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
    Cmd.BLOCK_STATUS: CmdFlag.REQ_ONE,
}


class Reply(NamedTuple):
    """A request has completed (a named tuple: cheap to make on the hot path).

    Attributes:
        cookie: the request's cookie.
        command: the request's ``Cmd``.
        error: the server's error, or None on success.
        extents: for BLOCK_STATUS, context name -> extents from the request's offset.
    """

    cookie: int
    command: Cmd
    error: RequestError | None = None
    extents: dict[str, tuple[Extent, ...]] | None = None
    #: For a read queued with :meth:`ClientTransmission.read_bytes` that succeeded: its
    #: data, a new ``bytes``.
    data: bytes | None = None


#: Makes a Reply without the Python-level __new__ of a named tuple (the fast path's).
_new_reply: Callable[[type[Reply], tuple[int, Cmd, None, None, bytes | None]], Reply] = (
    tuple.__new__
)


def _check_payload(payload: Buffer | None, length: int) -> None:
    """A WRITE's payload must be there and ``length`` bytes long."""
    if payload is None or memoryview(payload).nbytes != length:
        raise InvalidRequest(f"write payload must be {length} bytes long")


class _InFlight:
    __slots__ = (
        "buffer",
        "command",
        "contexts",
        "cookie",
        "covered",
        "covered_total",
        "detached",
        "error",
        "expect",
        "extents",
        "flags",
        "length",
        "offset",
    )

    def __init__(
        self,
        cookie: int,
        command: Cmd,
        flags: int,
        offset: int,
        length: int,
        buffer: memoryview | None = None,
        expect: bytes | None = None,
        detached: bool = False,
    ) -> None:
        self.cookie = cookie
        self.command = command
        self.flags = flags
        self.offset = offset
        self.length = length
        self.buffer = buffer
        #: A read queued by read_bytes(): its reply carries the data as new bytes. Its
        #: ``buffer`` stays None unless the data has to be assembled in pieces.
        self.detached = detached
        #: For a read: the exact bytes that start its usual reply (one OFFSET_DATA
        #: chunk with DONE covering the read, or a simple reply without error). A reply
        #: that starts so needs no other check: only its payload is left to come. Any
        #: other reply goes through the general path, which clears this.
        self.expect = expect
        # Made when first needed: most requests never use them.
        self.covered: list[tuple[int, int]] | None = None  # sorted, disjoint [start, end)
        self.covered_total = 0
        self.error: RequestError | None = None
        self.extents: dict[int, tuple[Extent, ...]] | None = None
        self.contexts: frozenset[int] = _NO_CONTEXTS

    def cover(self, start: int, end: int, max_ranges: int) -> None:
        """Record that [start, end) of the read has arrived; overlaps are protocol
        errors, and so is a chunk that would leave more than ``max_ranges`` separate
        ranges (ClientLimits.max_read_ranges)."""
        if start < self.offset or end > self.offset + self.length or end <= start:
            raise ProtocolError(
                f"chunk [{start}, {end}) lies outside the read [{self.offset}, "
                f"{self.offset + self.length})"
            )
        covered = self.covered
        if not covered:  # the common case: one chunk covers the read
            self.covered = [(start, end)]
            self.covered_total = end - start
            return
        if self.flags & _DF:
            raise ProtocolError("several content chunks for a read sent with NBD_CMD_FLAG_DF")
        i = bisect.bisect_left(covered, (start, end))
        if (i > 0 and covered[i - 1][1] > start) or (i < len(covered) and covered[i][0] < end):
            raise ProtocolError(f"chunk [{start}, {end}) overlaps an earlier chunk")
        self.covered_total += end - start
        # Join the neighbours it touches: chunks that come in order (as servers send
        # them) keep one range, however many there are.
        j = i
        if i > 0 and covered[i - 1][1] == start:
            i -= 1
            start = covered[i][0]
        if j < len(covered) and covered[j][0] == end:
            end = covered[j][1]
            j += 1
        if i == j and len(covered) >= max_ranges:
            raise ProtocolError(
                f"a read's chunks left more than {max_ranges} separate ranges "
                "(ClientLimits.max_read_ranges)"
            )
        covered[i:j] = [(start, end)]


# Receive states
_HEADER = 0  # expecting a reply header
_DATA_OFFSET = 1  # expecting the u64 offset that starts an OFFSET_DATA chunk
_INTO = 2  # payload bytes go to self._target
_CHUNK = 3  # expecting a whole metadata chunk payload in the buffer
_DIRECT = 4  # a direct request awaits direct_received() (see direct_read)
_DIRECT_DATA = 5  # a direct read's data is the driver's to receive: direct_done() is next

#: What :meth:`ClientTransmission.direct_received` found in the room it lent.
DIRECT_OTHER = 0  # not the usual reply: the general path has it
DIRECT_DONE = 1  # the usual reply, whole: the request succeeded
DIRECT_DATA = 2  # a big read's usual header: its data follows, for the driver
DIRECT_PARTIAL = 3  # the usual reply so far: receive more into the rest of the room


def split_range(
    offset: int, length: int, maximum: int, align: int = 1
) -> Iterator[tuple[int, int]]:
    """Cut [offset, offset+length) into pieces of at most ``maximum`` bytes.

    Pieces other than the last are multiples of ``align`` (the minimum block size), so
    that every piece stays aligned when the whole range is.
    """
    step = max(align, maximum - maximum % align)
    end = offset + length
    while offset < end:
        n = min(step, end - offset)
        yield offset, n
        offset += n


class ClientTransmission(ReceiveBuffer):
    """Client side of the transmission phase.

    Args:
        negotiated: what the handshake settled (size, flags, block sizes, reply style,
            meta contexts).
        initial_data: bytes that arrived after the handshake, if any.
        buffer_size: size of the internal receive buffer.
        limits: what the server may make the client hold: here ``max_extents`` and
            ``max_read_ranges`` (see :class:`~pynbd.proto.limits.ClientLimits`).
    """

    def __init__(
        self,
        negotiated: Negotiated,
        initial_data: bytes = b"",
        *,
        buffer_size: int = 128 * 1024,
        limits: ClientLimits = DEFAULT_LIMITS,
    ) -> None:
        self.negotiated = negotiated
        self.limits = limits
        self.size = negotiated.size or 0
        self.flags = negotiated.flags
        self.extended = negotiated.extended_headers
        self.structured = negotiated.structured_replies or self.extended
        self._context_names = {cid: name for name, cid in negotiated.meta_contexts.items()}
        self._tflags = int(negotiated.flags)
        self._align = negotiated.minimum_block if negotiated.block_size_advertised else 1
        self._max_payload = negotiated.maximum_payload
        #: The largest read that needs no closer look (see read()).
        self._read_max = min(self._max_payload, U64_MAX if self.extended else U32_MAX)
        self._verdicts: dict[tuple[int, int], Cmd | Exception] = {}
        #: READs in flight big enough that their payload should skip the receive buffer.
        self._big_reads = 0
        # The bytes before a read's payload: the reply header, plus the offset that
        # starts an OFFSET_DATA chunk.
        self._lead = (
            EXTENDED_REPLY_SIZE + 8
            if self.extended
            else STRUCTURED_REPLY_SIZE + 8
            if self.structured
            else SIMPLE_REPLY_SIZE
        )
        self._in_flight: dict[int, _InFlight] = {}
        #: In the _DIRECT state, the request whose usual reply the driver receives:
        #: (cookie, command, buffer, length, offset, flags, lead); its entry is made
        #: only if that reply does not come (see direct_received()).
        self._direct: tuple[int, Cmd, memoryview | None, int, int, int, bytes] | None = None
        #: The usual reply's start, the room's size, and the verdict when they match
        #: (see direct_received(); DIRECT_DATA only while a big read is direct).
        self._direct_lead = b""
        self._direct_want: int | None = None  # None: no room is lent
        self._direct_usual = DIRECT_DONE
        self._next_cookie = 1
        self._send: list[Buffer] = []
        self._replies: deque[Reply] = deque()
        #: The completed replies, oldest first (what :meth:`next_event` pops): a driver
        #: may pop them from here directly.
        self.replies = self._replies
        self._closed = False
        self._disconnecting = False
        self._eof = False
        #: True once the server answered NBD_ESHUTDOWN: the client must disconnect.
        self.shutdown_requested = False
        # Receive side
        ReceiveBuffer.__init__(self, buffer_size)
        #: Direct reads shorter than this get room for their whole usual reply.
        self._direct_small = min(DIRECT_READ, buffer_size - self._lead + 1)
        #: The room lent for a big read's usual header (it never changes).
        self._header_room = self._view[: self._lead]
        self._state = _HEADER
        self._target: memoryview | None = None
        self._target_pos = 0
        self._current: _InFlight | None = None
        self._chunk_flags = 0
        self._chunk_type = 0
        self._chunk_len = 0
        #: A non-data chunk's payload received into a buffer of its own: what is kept
        #: of it when too big for the receive buffer, or the drain (see _drain_next).
        self._large_chunk: bytearray | None = None
        #: Bytes of the current chunk to drain once what is kept of it is parsed.
        self._skip = 0
        #: Descriptors in the status chunk being received (what its length says).
        self._status_count = 0
        self._drain: bytearray | None = None  # made on first use
        if initial_data:
            self.receive_data(initial_data)

    # -- sending ---------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """How many requests await their reply."""
        return len(self._in_flight) + (self._direct is not None)

    @property
    def closed(self) -> bool:
        return self._closed

    def request(
        self,
        command: Cmd,
        offset: int,
        length: int,
        flags: int = 0,
        *,
        payload: Buffer | None = None,
        buffer: Buffer | None = None,
        contexts: tuple[str, ...] | None = None,
    ) -> int:
        """Queue a request and return its cookie.

        Args:
            command: any ``Cmd`` but DISC (use :meth:`disconnect`).
            offset, length: the range in the export.
            flags: ``CmdFlag`` bits; each must be valid for the command and advertised.
            payload: the data of a WRITE (``length`` bytes, kept by reference until sent).
            buffer: the writable buffer a READ fills (``length`` bytes).
            contexts: for BLOCK_STATUS, the negotiated context names wanted (default all).

        Raises:
            ConnectionClosed: the connection is closed or disconnecting.
            UnsupportedError: the server did not advertise the command or a flag.
            InvalidRequest: range, alignment, size or argument errors.
        """
        if self._closed or self._disconnecting:
            raise ConnectionClosed("the connection is closed")
        cmd = self._check(command, offset, length, flags)
        if cmd is Cmd.READ:
            if buffer is None:
                raise InvalidRequest("a read needs a buffer")
            view = buffer if type(buffer) is memoryview else memoryview(buffer)
            if view.format != "B" or view.ndim != 1:
                view = view.cast("B")
            if view.readonly or len(view) != length:
                raise InvalidRequest(f"read buffer must be writable and {length} bytes long")
            return self.read(view, offset, flags)
        if cmd is Cmd.WRITE:
            _check_payload(payload, length)
        cookie = self._take_cookie()
        entry = _InFlight(cookie, cmd, flags, offset, length)
        wire_flags = flags
        wire_len = length
        extra: Buffer | None = payload if cmd is Cmd.WRITE else None
        if cmd is Cmd.BLOCK_STATUS:
            entry.extents = {}
            entry.contexts = self._select_contexts(contexts)
            if (
                self.extended
                and self._tflags & _BLOCK_STATUS_PAYLOAD
                and len(entry.contexts) < len(self._context_names)
            ):
                ids = sorted(entry.contexts)
                extra = U64.pack(length) + struct.pack(f">{len(ids)}I", *ids)
                wire_flags |= _PAYLOAD_LEN
                wire_len = len(extra)
        if self.extended and cmd is Cmd.WRITE:
            wire_flags |= _PAYLOAD_LEN
        self._send.append(self._header(cmd, wire_flags, cookie, offset, wire_len))
        if extra is not None and wire_len:
            self._send.append(extra)
        self._in_flight[cookie] = entry
        return cookie

    def read(self, buffer: Buffer, offset: int, flags: int = 0) -> int:
        """Queue a READ that fills ``buffer`` from ``offset``; return its cookie.

        The same as ``request(Cmd.READ, offset, len(buffer), flags, buffer=buffer)``,
        with less work per call (the clients' hot path).

        Raises:
            As :meth:`request`; InvalidRequest if ``buffer`` is read-only.
        """
        if self._closed or self._disconnecting:
            raise ConnectionClosed("the connection is closed")
        view = buffer if type(buffer) is memoryview else memoryview(buffer)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        if view.readonly:
            raise InvalidRequest("read buffer must be writable")
        return self._queue_read(view, len(view), offset, flags)

    def read_bytes(self, length: int, offset: int, flags: int = 0) -> int:
        """Queue a READ of ``length`` bytes at ``offset`` whose data comes back as a new
        ``bytes`` in its :class:`Reply` (``data``); return its cookie.

        No buffer is made in advance: a usual reply that arrives whole in the receive
        buffer is copied out once; otherwise the data is assembled in a new buffer and
        copied once more at the end. (A blocking driver that wants the data received
        straight into a new ``bytes`` uses :meth:`direct_read`.)

        Raises:
            As :meth:`request`.
        """
        if self._closed or self._disconnecting:
            raise ConnectionClosed("the connection is closed")
        return self._queue_read(None, length, offset, flags)

    def _queue_read(self, view: memoryview | None, length: int, offset: int, flags: int) -> int:
        if self._direct is not None:
            raise self._direct_pending()
        cookie, request, expect = self._read_header(length, offset, flags)
        self._send.append(request)
        if length >= DIRECT_READ:
            self._big_reads += 1
        self._in_flight[cookie] = _InFlight(
            cookie, _READ, flags, offset, length, view, expect, view is None
        )
        return cookie

    def _read_header(self, length: int, offset: int, flags: int) -> tuple[int, bytes, bytes | None]:
        """Check a READ and take its cookie; return the cookie, the request's bytes and
        the start of its usual reply (see _InFlight.expect)."""
        align = self._align
        if (
            flags
            or offset < 0
            or offset + length > self.size
            or length > self._read_max
            or (align > 1 and (offset % align or length % align))
        ):
            self._check(_READ, offset, length, flags)  # the full check, which may pass
        # The cookie and the header are made here, not by _take_cookie() and _header():
        # this is every read's path, and it saves two Python calls per read. Keep the
        # three in step.
        in_flight = self._in_flight
        cookie = self._next_cookie
        while cookie in in_flight:
            cookie = (cookie + 1) & U64_MAX
        self._next_cookie = (cookie + 1) & U64_MAX
        if self.extended:
            request = EXTENDED_REQUEST.pack(
                EXTENDED_REQUEST_MAGIC, flags, _READ_WIRE, cookie, offset, length
            )
            if not length:
                return cookie, request, None  # no OFFSET_DATA chunk answers an empty read
            return (
                cookie,
                request,
                EXTENDED_DATA.pack(
                    EXTENDED_REPLY_MAGIC, _DONE, _OFFSET_DATA, cookie, offset, length + 8, offset
                ),
            )
        request = REQUEST.pack(REQUEST_MAGIC, flags, _READ_WIRE, cookie, offset, length)
        if not self.structured:
            return cookie, request, SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie)
        if not length:
            return cookie, request, None
        return (
            cookie,
            request,
            STRUCTURED_DATA.pack(
                STRUCTURED_REPLY_MAGIC, _DONE, _OFFSET_DATA, cookie, length + 8, offset
            ),
        )

    def direct_read(
        self, buffer: memoryview | None, length: int, offset: int, flags: int = 0
    ) -> tuple[int, bytes, memoryview] | None:
        """Start a READ whose usual reply the driver receives itself, into a room the
        core lends; return its cookie, the request's bytes and that ``room``. None when
        that is not allowed, with nothing done: then use :meth:`read` or
        :meth:`read_bytes`.

        ``buffer`` is the ``length``-byte writable byte view the data goes to, or None
        for data the driver returns as a new ``bytes``. It is allowed for a read that
        is not empty while nothing else is in flight and nothing received is buffered
        here. The request is not queued (see :meth:`buffers_to_send`): the driver sends
        it, all of it or the connection is lost. Then it receives into ``room`` (a view
        of the receive buffer, as long as the usual reply for a read under
        ``DIRECT_READ`` bytes, as its header for a bigger one) and asks
        :meth:`direct_received`. On ``DIRECT_DONE`` the read is over, and its data is
        the last ``length`` bytes of the room, to be copied out before the next call
        into the core. On ``DIRECT_DATA`` (a big read, or a receive buffer too small
        for the whole reply) the data follows the header: the driver receives all of it
        itself, into ``buffer`` or as one ``bytes``, then calls :meth:`direct_done`.

        Raises:
            As :meth:`read`.
        """
        if self._closed or self._disconnecting:
            raise ConnectionClosed("the connection is closed")
        if not length or self._in_flight or self._state != _HEADER or self._start != self._end:
            return None
        if buffer is not None and (buffer.readonly or len(buffer) != length):
            raise InvalidRequest(f"read buffer must be writable and {length} bytes long")
        cookie, request, lead = self._read_header(length, offset, flags)
        assert lead is not None  # the read is not empty
        self._direct = (cookie, _READ, buffer, length, offset, flags, lead)
        self._state = _DIRECT
        self._direct_lead = lead
        if length < self._direct_small:
            self._direct_want = want = self._lead + length
            return cookie, request, self._view[:want]
        self._direct_want = self._lead
        self._direct_usual = DIRECT_DATA
        return cookie, request, self._header_room

    def direct_request(
        self,
        command: Cmd,
        offset: int,
        length: int,
        flags: int = 0,
        payload: Buffer | None = None,
    ) -> tuple[int, bytes, memoryview] | None:
        """:meth:`direct_read` for a WRITE, WRITE_ZEROES, TRIM, FLUSH or CACHE: start
        it and return its cookie, its request header and the ``room`` for its usual
        reply (a simple reply without error; with extended headers, a NONE chunk with
        DONE that echoes the offset). None when that is not allowed, with nothing done:
        then use :meth:`request`.

        The driver sends the header, then a WRITE's ``payload``, which stays the
        caller's (the core keeps no reference to it), receives into the room and asks
        :meth:`direct_received`, as for a read. The conditions are those of
        :meth:`direct_read`.

        Raises:
            As :meth:`request`; InvalidRequest for a READ or BLOCK_STATUS.
        """
        if self._closed or self._disconnecting:
            raise ConnectionClosed("the connection is closed")
        if self._in_flight or self._state != _HEADER or self._start != self._end:
            return None
        cmd = self._check(command, offset, length, flags)
        if cmd is _READ or cmd is Cmd.BLOCK_STATUS:
            raise InvalidRequest(f"NBD_CMD_{cmd.name} has a reply with data: not a direct request")
        if cmd is _WRITE:
            _check_payload(payload, length)
        elif payload is not None:
            raise InvalidRequest(f"NBD_CMD_{cmd.name} takes no payload")
        cookie = self._take_cookie()
        if self.extended:
            wire_flags = flags | _PAYLOAD_LEN if cmd is _WRITE else flags
            lead = EXTENDED_REPLY.pack(EXTENDED_REPLY_MAGIC, _DONE, _NONE, cookie, offset, 0)
        else:
            wire_flags = flags
            lead = SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie)
        request = self._header(cmd, wire_flags, cookie, offset, length)
        self._direct = (cookie, cmd, None, length, offset, flags, lead)
        self._state = _DIRECT
        self._direct_lead = lead
        self._direct_want = want = len(lead)
        return cookie, request, self._view[:want]

    def direct_received(self, nbytes: int) -> int:
        """The first ``nbytes`` of the room lent by :meth:`direct_read` or
        :meth:`direct_request` are filled: judge them. Returns

        - ``DIRECT_DONE``: they are the usual reply, whole, matched byte for byte: the
          request succeeded and is over. A small read's data is the last ``length``
          bytes of the room, valid until the next call into the core.
        - ``DIRECT_DATA``: they are a big read's usual header: exactly ``length`` bytes
          of data follow on the stream. The driver receives all of them itself, into
          the read's buffer or as one ``bytes``, then calls :meth:`direct_done` (or, if
          that fails, the connection is lost: :meth:`fail_all`).
        - ``DIRECT_PARTIAL``: fewer than the room, and the usual reply so far: receive
          more into the rest of the room, then call again with the new total.
        - ``DIRECT_OTHER``: anything else (an error, a hole, chunks, garbage). The
          request is an ordinary one in flight now, and the bytes are parsed where they
          are with every check: go on with :meth:`receive_buffer` until its reply
          completes.

        Raises as :meth:`buffer_updated` does; ``nbytes`` of 0 is the end of the stream,
        which raises.
        """
        if nbytes == self._direct_want and self._buf.startswith(self._direct_lead):
            verdict = self._direct_usual
            if verdict == DIRECT_DONE:
                self._direct = None
                self._direct_want = None
                self._state = _HEADER
            else:
                self._direct_want = None  # the data is due: only direct_done() is next
                self._state = _DIRECT_DATA
            return verdict
        direct, want = self._direct, self._direct_want
        if direct is None or want is None:
            raise ValueError("no direct request awaits its reply")
        if not 0 <= nbytes <= want:
            raise ValueError(f"{nbytes} bytes received into a room of {want}")
        if nbytes and self._buf.startswith(self._direct_lead[:nbytes]):
            return DIRECT_PARTIAL  # (the slice is all of the lead once nbytes passed it)
        # Not the usual reply: the request becomes an ordinary one, and the general
        # path parses what came, in place (the room starts the buffer, which held no
        # unparsed bytes).
        self._end_direct()
        self._start = self._end = 0
        cookie, cmd, buffer, length, offset, flags, lead = direct
        if cmd is _READ:
            if length >= DIRECT_READ:
                self._big_reads += 1
            self._in_flight[cookie] = _InFlight(
                cookie, _READ, flags, offset, length, buffer, lead, buffer is None
            )
        else:
            self._in_flight[cookie] = _InFlight(cookie, cmd, flags, offset, length)
        self.buffer_updated(nbytes)
        return DIRECT_OTHER

    def direct_done(self, cookie: int) -> None:
        """The driver received all of a big read's data after ``DIRECT_DATA``: the read
        succeeded, and no :class:`Reply` is queued for it."""
        if self._state != _DIRECT_DATA or self._direct is None or self._direct[0] != cookie:
            raise ValueError(f"no direct read {cookie:#x} whose data was due")
        self._end_direct()

    def _end_direct(self) -> None:
        self._direct = None
        self._direct_want = None
        self._direct_usual = DIRECT_DONE
        self._state = _HEADER

    def _direct_pending(self) -> RuntimeError:
        assert self._direct is not None
        return RuntimeError(
            f"direct request {self._direct[0]:#x} awaits direct_received() or direct_done()"
        )

    def _header(self, cmd: Cmd, wire_flags: int, cookie: int, offset: int, length: int) -> bytes:
        """A request header in the negotiated form (``length``: its length field)."""
        if self.extended:
            return EXTENDED_REQUEST.pack(
                EXTENDED_REQUEST_MAGIC, wire_flags, cmd, cookie, offset, length
            )
        return REQUEST.pack(REQUEST_MAGIC, wire_flags, cmd, cookie, offset, length)

    def savepoint(self) -> int:
        """Mark the send queue, so that a batch of requests can be taken back whole."""
        return len(self._send)

    def rollback(self, savepoint: int, cookies: Iterable[int]) -> None:
        """Take back requests queued since ``savepoint`` whose bytes were not handed
        out yet (a split call whose later piece was refused must send nothing)."""
        if self._direct is not None:
            raise self._direct_pending()
        del self._send[savepoint:]
        for cookie in cookies:
            self._in_flight.pop(cookie, None)
        self._big_reads = sum(
            1 for e in self._in_flight.values() if e.command is Cmd.READ and e.length >= DIRECT_READ
        )

    def disconnect(self) -> None:
        """Queue NBD_CMD_DISC; nothing may be sent after it and no reply comes (rule 11)."""
        if self._closed or self._disconnecting:
            return
        cookie = self._take_cookie()  # raises while a direct request awaits its reply
        self._disconnecting = True
        req = Request(0, Cmd.DISC, cookie, 0, 0)
        self._send.append(req.pack(self.extended))

    def buffers_to_send(self) -> list[Buffer]:
        """The buffers to write, in order (for ``sendmsg``); the list is handed over."""
        out, self._send = self._send, []
        return out

    def data_to_send(self) -> bytes:
        """The bytes to write, joined (a copy; prefer :meth:`buffers_to_send`)."""
        return b"".join(self.buffers_to_send())

    def _take_cookie(self) -> int:
        if self._direct is not None:
            raise self._direct_pending()
        cookie = self._next_cookie
        while cookie in self._in_flight:
            cookie = (cookie + 1) & U64_MAX
        self._next_cookie = (cookie + 1) & U64_MAX
        return cookie

    def _check(self, command: int, offset: int, length: int, flags: int) -> Cmd:
        """Validate a request; raises InvalidRequest or UnsupportedError.

        What depends only on (command, flags) and the negotiation is judged once and
        remembered, so the common request costs a dict lookup and a few int tests.
        """
        key = (command, flags)
        verdict = self._verdicts.get(key)
        if verdict is None:
            try:
                verdict = self._check_static(command, flags)
            except (InvalidRequest, UnsupportedError) as exc:
                verdict = exc
            self._verdicts[key] = verdict
        if isinstance(verdict, Exception):
            raise type(verdict)(*verdict.args)  # a fresh one: no traceback piles up
        cmd = verdict
        if offset < 0 or length < 0:
            raise InvalidRequest("offset and length must not be negative")
        if offset + length > self.size:
            raise InvalidRequest(
                f"request [{offset}, {offset + length}) is beyond the export's size {self.size}"
            )
        if length == 0 and cmd is Cmd.BLOCK_STATUS:
            raise InvalidRequest("block status of 0 bytes")
        if cmd is Cmd.FLUSH and (offset or length):
            # Spec "NBD_CMD_FLUSH": offset and length are reserved and MUST be zero.
            raise InvalidRequest("NBD_CMD_FLUSH takes offset 0 and length 0")
        align = self._align
        if align > 1 and (offset % align or length % align):
            raise InvalidRequest(
                f"request [{offset}, +{length}) is not aligned to the minimum block size {align}"
            )
        if length > self._max_payload and (cmd is Cmd.READ or cmd is Cmd.WRITE):
            raise InvalidRequest(
                f"{length} bytes exceed the server's maximum payload "
                f"{self._max_payload}; split the request"
            )
        if length > U32_MAX and not self.extended:
            raise InvalidRequest("requests over 4 GiB need extended headers; split the request")
        return cmd

    def _check_static(self, command: int, flags: int) -> Cmd:
        try:
            cmd = Cmd(command)
        except ValueError:
            raise InvalidRequest(f"unknown command {command}") from None
        if cmd in (Cmd.DISC, Cmd.RESIZE):
            raise InvalidRequest(f"NBD_CMD_{cmd.name} cannot be sent with request()")
        need = COMMAND_NEEDS.get(cmd)
        if need is not None and not self.flags & need:
            raise UnsupportedError(f"the server does not support NBD_CMD_{cmd.name}")
        if cmd is Cmd.BLOCK_STATUS and not self._context_names:
            raise UnsupportedError("block status needs a meta context negotiated with the server")
        if cmd in _WRITE_CMDS and self.flags & TransmissionFlag.READ_ONLY:
            raise UnsupportedError("the export is read-only")
        # int(): "~" on an IntFlag complements only the defined bits, which would let
        # unknown bits (and values over 16 bits) through to the wire.
        bad = int(flags) & ~int(_ALLOWED_FLAGS[cmd])
        if bad:
            raise InvalidRequest(f"flags {bad:#x} are not valid for NBD_CMD_{cmd.name}")
        for flag, tflag in FLAG_NEEDS.items():
            if flags & flag and not self.flags & tflag:
                raise UnsupportedError(f"the server does not support NBD_CMD_FLAG_{flag.name}")
        if flags & CmdFlag.DF and not self.structured:
            raise UnsupportedError("NBD_CMD_FLAG_DF needs structured replies")
        return cmd

    def _select_contexts(self, names: tuple[str, ...] | None) -> frozenset[int]:
        if names is None:
            return frozenset(self._context_names)
        by_name = {name: cid for cid, name in self._context_names.items()}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise InvalidRequest(f"meta context {missing[0]!r} was not negotiated")
        return frozenset(by_name[n] for n in names)

    # -- receiving -------------------------------------------------------------------

    def receive_buffer(self) -> memoryview:
        """A buffer for the next bytes from the server (never empty)."""
        if self._state == _INTO and self._start == self._end:
            assert self._target is not None
            return self._target[self._target_pos :]
        if self._direct is not None:
            raise self._direct_pending()
        if self._big_reads:
            # A big read's payload should land in the caller's buffer, not here:
            # take only the bytes before it, so that the payload is read directly.
            return self._room(8 if self._state == _DATA_OFFSET else self._lead)
        return self._room(0)

    def payload_room(self) -> memoryview | None:
        """When the next bytes are all a read's payload, the rest of the caller's
        buffer they go to (the same view :meth:`receive_buffer` gives then), else None.

        All of it will come: a blocking client may wait for it whole (MSG_WAITALL),
        one call instead of several."""
        if self._state == _INTO and self._start == self._end and self._direct is None:
            assert self._target is not None
            return self._target[self._target_pos :]
        return None

    def buffer_updated(self, nbytes: int) -> bool:
        """``nbytes`` were written into the last :meth:`receive_buffer`; 0 means EOF.

        Returns True when a completed reply awaits :meth:`next_event`.

        Raises ProtocolError if the server broke the protocol.
        """
        if nbytes == 0:
            self._on_eof()
            return bool(self._replies)
        if self._closed:
            raise ConnectionClosed("the connection is closed")
        try:
            if self._state == _INTO and self._start == self._end:
                # The bytes went straight into the target (see receive_buffer);
                # finishing it may complete a reply, which can break a rule too.
                self._target_pos += nbytes
                if self._target_pos == len(self._target or b""):
                    self._target_done()
            else:
                if self._direct is not None:
                    raise self._direct_pending()
                self._end += nbytes
            self._parse()
        except ProtocolError:
            self._closed = True
            raise
        return bool(self._replies)

    def next_event(self) -> Reply | None:
        """The next completed request, or None when nothing has completed."""
        return self._replies.popleft() if self._replies else None

    def fail_all(self) -> list[int]:
        """Mark the connection dead and forget every request; returns their cookies."""
        self._closed = True
        cookies = list(self._in_flight)
        if self._direct is not None:
            cookies.append(self._direct[0])
            self._end_direct()
        self._in_flight.clear()
        self._big_reads = 0
        return cookies

    def _on_eof(self) -> None:
        self._eof = True
        self._closed = True
        if self._disconnecting and not self._in_flight:
            return
        if self._in_flight or self._start != self._end or self._state != _HEADER:
            raise ProtocolError(
                f"server closed the connection with {self.in_flight} request(s) in flight"
            )
        raise ConnectionClosed("server closed the connection")

    def _parse(self) -> None:
        buf = self._buf
        while True:
            state = self._state
            if state == _HEADER:
                if self._fast_replies():
                    return
                if self._state == _HEADER and (
                    self._end - self._start < 4 or not self._parse_header()
                ):
                    return
            elif state == _INTO:
                start = self._start
                if start == self._end:
                    return
                target = self._target
                assert target is not None
                pos = self._target_pos
                n = min(self._end - start, len(target) - pos)
                target[pos : pos + n] = self._view[start : start + n]
                self._start = start + n
                self._target_pos = pos = pos + n
                if pos == len(target):
                    self._target_done()
            elif state == _DATA_OFFSET:
                if self._end - self._start < 8:
                    return
                (offset,) = U64.unpack_from(buf, self._start)
                self._start += 8
                self._begin_data(offset)
            elif state == _CHUNK:
                if self._end - self._start < self._chunk_len:
                    return
                data = self._view[self._start : self._start + self._chunk_len].tobytes()
                self._start += self._chunk_len
                self._state = _HEADER
                self._on_metadata_chunk(data)
            else:  # _DIRECT, _DIRECT_DATA: only the direct_* calls move on
                raise self._direct_pending()

    def _fast_replies(self) -> bool:
        """Complete the usual replies to reads (see _InFlight.expect) at the head of the
        receive buffer, each matched byte for byte against the header it must have.

        Returns True when nothing is left to parse for now: the buffer is empty, or a
        small read's usual reply has begun and the rest of it is still to come (it
        will arrive in the receive buffer). Returns False when the general path must
        look at the next bytes."""
        buf, in_flight, view, replies = self._buf, self._in_flight, self._view, self._replies
        start, stop = self._start, self._end
        try:
            while stop - start >= 16:
                entry = in_flight.get(REPLY_COOKIE.unpack_from(buf, start)[0])
                if entry is None:
                    return False
                expect = entry.expect
                if expect is None:
                    return False
                head = start + len(expect)
                if head > stop:
                    return False
                if not buf.startswith(expect, start):
                    return False
                length = entry.length
                end = head + length
                if end > stop:
                    if length < DIRECT_READ and end - start <= len(buf):
                        return True  # a small reply: wait for the rest of it here
                    self._start = start = head
                    self._begin_whole(entry)  # the rest goes to the read's buffer
                    return False
                if entry.buffer is None:
                    data = bytes(view[head:end])
                else:
                    entry.buffer[:] = view[head:end]
                    data = None
                start = end
                del in_flight[entry.cookie]
                if length >= DIRECT_READ:
                    self._big_reads -= 1
                replies.append(_new_reply(Reply, (entry.cookie, _READ, None, None, data)))
            return start == stop
        finally:
            self._start = start

    def _begin_whole(self, entry: _InFlight) -> None:
        """The usual reply to ``entry`` has begun but its data is not all here: the rest
        goes to the caller's buffer (straight from the socket once nothing else is
        buffered), as if the general path had read the header."""
        entry.expect = None
        entry.covered = [(entry.offset, entry.offset + entry.length)]
        entry.covered_total = entry.length
        self._current = entry
        self._chunk_flags = _DONE
        if entry.buffer is None:  # a detached read: its data is assembled here
            entry.buffer = memoryview(bytearray(entry.length))
        self._start_into(entry.buffer, entry.length)

    def _parse_header(self) -> bool:
        buf, start = self._buf, self._start
        avail = self._end - start
        (magic,) = U32.unpack_from(buf, start)
        if self.extended:
            if magic != EXTENDED_REPLY_MAGIC:
                raise ProtocolError(f"bad reply magic {magic:#x} (extended headers expected)")
            if avail < EXTENDED_REPLY_SIZE:
                return False
            _, flags, type_, cookie, offset, length = EXTENDED_REPLY.unpack_from(buf, start)
            self._start = start + EXTENDED_REPLY_SIZE
            self._on_chunk_header(flags, type_, cookie, length, offset)
        elif magic == SIMPLE_REPLY_MAGIC:
            if avail < SIMPLE_REPLY_SIZE:
                return False
            _, error, cookie = SIMPLE_REPLY.unpack_from(buf, start)
            self._start = start + SIMPLE_REPLY_SIZE
            self._on_simple(error, cookie)
        elif magic == STRUCTURED_REPLY_MAGIC and self.structured:
            if avail < STRUCTURED_REPLY_SIZE:
                return False
            _, flags, type_, cookie, length = STRUCTURED_REPLY.unpack_from(buf, start)
            self._start = start + STRUCTURED_REPLY_SIZE
            self._on_chunk_header(flags, type_, cookie, length, None)
        else:
            raise ProtocolError(f"bad reply magic {magic:#x}")
        return True

    def _lookup(self, cookie: int) -> _InFlight:
        entry = self._in_flight.get(cookie)
        if entry is None:
            raise ProtocolError(f"reply for cookie {cookie:#x}, which is not in flight")
        entry.expect = None  # the general path has the request now: no fast path later
        if entry.buffer is None and entry.detached:
            entry.buffer = memoryview(bytearray(entry.length))
        return entry

    def _on_simple(self, error: int, cookie: int) -> None:
        entry = self._lookup(cookie)
        if entry.command is Cmd.READ and self.structured:
            raise ProtocolError("simple reply to a read after structured replies were agreed")
        if error:
            entry.error = self._error(entry, error)
            self._complete(entry)
        elif entry.command is Cmd.READ:
            self._current = entry
            assert entry.buffer is not None
            self._start_into(entry.buffer, entry.length)
            entry.covered = [(entry.offset, entry.offset + entry.length)]
            entry.covered_total = entry.length
        elif entry.command is Cmd.BLOCK_STATUS:
            raise ProtocolError("successful simple reply to a block status request")
        else:
            self._complete(entry)

    def _error(
        self, entry: _InFlight, value: int, message: str = "", offset: int | None = None
    ) -> RequestError:
        err = Err.from_wire(value)
        if err is Err.ESHUTDOWN:
            self.shutdown_requested = True
        return RequestError(
            int(err), message, offset=offset, command=entry.command, request_offset=entry.offset
        )

    def _on_chunk_header(
        self, flags: int, type_: int, cookie: int, length: int, offset: int | None
    ) -> None:
        entry = self._lookup(cookie)
        if offset is not None and offset != entry.offset:
            raise ProtocolError(
                f"extended reply offset {offset} does not echo the request's {entry.offset}"
            )
        self._current = entry
        self._chunk_flags = flags
        self._chunk_type = type_
        self._chunk_len = length
        if type_ == Chunk.OFFSET_DATA:
            if entry.command is not Cmd.READ:
                raise ProtocolError("NBD_REPLY_TYPE_OFFSET_DATA in reply to a non-read")
            if length < 9 or length - 8 > entry.length:
                raise ProtocolError(f"NBD_REPLY_TYPE_OFFSET_DATA with bad length {length}")
            self._state = _DATA_OFFSET
            return
        if type_ == Chunk.NONE:
            if length:
                raise ProtocolError("NBD_REPLY_TYPE_NONE with a payload")
            if not flags & _DONE:
                raise ProtocolError("NBD_REPLY_TYPE_NONE without NBD_REPLY_FLAG_DONE")
            self._chunk_done(entry)
            return
        # Judge the type and the length before reading the payload, so that a chunk
        # the reply cannot have fails at once, and only what is kept of it is buffered.
        if length > MAX_METADATA_CHUNK:
            raise ProtocolError(f"reply chunk of {length} bytes is too long")
        keep = length
        if type_ == Chunk.OFFSET_HOLE:
            if entry.command is not Cmd.READ:
                raise ProtocolError("NBD_REPLY_TYPE_OFFSET_HOLE in reply to a non-read")
            if length != 12:
                raise ProtocolError(f"NBD_REPLY_TYPE_OFFSET_HOLE with bad length {length}")
        elif type_ in (Chunk.BLOCK_STATUS, Chunk.BLOCK_STATUS_EXT):
            keep = self._status_keep(entry, type_, length)
        elif not type_ & CHUNK_ERROR_BIT:
            # Spec "Structured reply types": an unknown non-error type is fatal.
            raise ProtocolError(f"unknown reply chunk type {type_}")
        elif type_ == Chunk.ERROR_OFFSET:
            if length > _ERROR_OFFSET_MAX:
                raise ProtocolError(f"NBD_REPLY_TYPE_ERROR_OFFSET with bad length {length}")
        else:
            keep = min(length, _ERROR_KEEP)
        self._skip = length - keep
        self._chunk_len = keep
        if keep > len(self._buf):
            # Too big for the receive buffer: collect it in a buffer of its own.
            self._large_chunk = bytearray(keep)
            self._start_into(memoryview(self._large_chunk), keep)
        else:
            self._state = _CHUNK

    def _status_keep(self, entry: _InFlight, type_: int, length: int) -> int:
        """Judge a status chunk's header; return how many of its bytes to keep.

        The spec lets a server describe less than was asked ("NBD_CMD_BLOCK_STATUS"),
        so a chunk with more descriptors than this context's share of
        ``limits.max_extents`` is cut to the first ones, which still describe a prefix
        of the range; the rest is drained unread.
        """
        if entry.command is not Cmd.BLOCK_STATUS:
            raise ProtocolError("block status chunk in reply to another command")
        if (type_ == Chunk.BLOCK_STATUS_EXT) != self.extended:
            raise ProtocolError("block status chunk of the wrong width for the headers agreed")
        count = BlockStatusChunk.descriptors(length, self.extended)
        if entry.flags & _REQ_ONE:
            if count != 1:
                raise ProtocolError("NBD_CMD_FLAG_REQ_ONE answered with more than one extent")
        elif count > entry.length:
            # Each extent is a byte at least, and all but the last lie in the request.
            raise ProtocolError(
                f"block status chunk of {count} extents for a request of {entry.length} bytes"
            )
        self._status_count = count
        kept = min(count, max(1, self.limits.max_extents // len(entry.contexts)))
        return length - (count - kept) * (16 if self.extended else 8)

    def _begin_data(self, offset: int) -> None:
        entry = self._current
        assert entry is not None and entry.buffer is not None
        n = self._chunk_len - 8
        entry.cover(offset, offset + n, self.limits.max_read_ranges)
        rel = offset - entry.offset
        self._start_into(entry.buffer[rel : rel + n], n)

    def _start_into(self, target: memoryview, length: int) -> None:
        self._target = target[:length]
        self._target_pos = 0
        self._state = _INTO
        if length == 0:
            self._target_done()

    def _target_done(self) -> None:
        self._target = None
        self._state = _HEADER
        entry = self._current
        assert entry is not None
        if self._large_chunk is not None:
            data, self._large_chunk = self._large_chunk, None
            if data is self._drain:
                self._drain_next(entry)
            else:
                self._on_metadata_chunk(memoryview(data))
        elif self.structured:
            self._chunk_done(entry)
        else:
            self._complete(entry)  # simple reply payload

    def _drain_next(self, entry: _InFlight) -> None:
        """Drain the next piece of the current chunk's unkept bytes (see _skip), or,
        once they are all gone, finish the chunk."""
        skip = self._skip
        if not skip:
            self._chunk_done(entry)
            return
        drain = self._drain
        if drain is None:
            drain = self._drain = bytearray(_DRAIN)
        n = min(skip, _DRAIN)
        self._skip = skip - n
        self._large_chunk = drain  # so that _target_done() comes back here
        self._start_into(memoryview(drain), n)

    def _on_metadata_chunk(self, data: bytes | memoryview) -> None:
        entry = self._current
        assert entry is not None
        type_ = self._chunk_type
        if type_ & CHUNK_ERROR_BIT:
            # Unknown error chunk types share ERROR's prefix; the rest is ignored.
            chunk = ErrorChunk.unpack(type_, data)
            if chunk.offset is not None and not (
                entry.offset <= chunk.offset < entry.offset + max(entry.length, 1)
            ):
                raise ProtocolError(f"error offset {chunk.offset} lies outside the request")
            if entry.error is None:
                entry.error = self._error(entry, chunk.error, chunk.message, chunk.offset)
        elif type_ == Chunk.OFFSET_HOLE:
            if entry.command is not Cmd.READ:
                raise ProtocolError("NBD_REPLY_TYPE_OFFSET_HOLE in reply to a non-read")
            hole = OffsetHole.unpack(data)
            entry.cover(hole.offset, hole.offset + hole.size, self.limits.max_read_ranges)
            assert entry.buffer is not None
            rel = hole.offset - entry.offset
            entry.buffer[rel : rel + hole.size] = bytes(hole.size)
        elif type_ in (Chunk.BLOCK_STATUS, Chunk.BLOCK_STATUS_EXT):
            self._on_block_status(entry, data)
        else:
            raise ProtocolError(f"unknown reply chunk type {type_}")
        self._drain_next(entry)

    def _on_block_status(self, entry: _InFlight, data: bytes | memoryview) -> None:
        """The kept part of a status chunk (see _status_keep), judged."""
        chunk = BlockStatusChunk.unpack_prefix(data, self._status_count, self.extended)
        if chunk.context_id not in entry.contexts:
            raise ProtocolError(f"block status for meta context {chunk.context_id}, not asked for")
        assert entry.extents is not None  # made by request() for BLOCK_STATUS
        if chunk.context_id in entry.extents:
            raise ProtocolError(f"two block status chunks for meta context {chunk.context_id}")
        extents = chunk.extents
        # All extents but the chunk's last lie within the request; when some were cut,
        # every kept one is such an extent.
        within = extents if len(extents) < self._status_count else extents[:-1]
        if entry.flags & _REQ_ONE:
            if extents[0].length > entry.length:
                raise ProtocolError("NBD_CMD_FLAG_REQ_ONE answered with an extent past the request")
        elif sum(e.length for e in within) >= entry.length:
            raise ProtocolError("block status extents run past the requested length")
        entry.extents[chunk.context_id] = extents

    def _chunk_done(self, entry: _InFlight) -> None:
        if not self._chunk_flags & _DONE:
            return
        if entry.error is None:
            if entry.command is Cmd.READ and entry.covered_total != entry.length:
                raise ProtocolError(
                    f"read reply covered {entry.covered_total} of {entry.length} bytes"
                )
            if entry.command is Cmd.BLOCK_STATUS and not entry.extents:
                raise ProtocolError("block status reply without a status chunk")
        self._complete(entry)

    def _complete(self, entry: _InFlight) -> None:
        del self._in_flight[entry.cookie]
        if entry.command is Cmd.READ and entry.length >= DIRECT_READ:
            self._big_reads -= 1
        self._current = None
        extents = None
        if entry.command is Cmd.BLOCK_STATUS and entry.error is None and entry.extents:
            extents = {self._context_names[cid]: ext for cid, ext in entry.extents.items()}
        data = None
        if entry.detached and entry.error is None:
            assert entry.buffer is not None
            data = bytes(entry.buffer)  # assembled in pieces: one more copy
        self._replies.append(Reply(entry.cookie, entry.command, entry.error, extents, data))
