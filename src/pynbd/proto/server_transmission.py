"""The server side of the NBD transmission phase, sans-IO.

:class:`ServerTransmission` parses requests (compact or extended), validates each one
centrally before any backend sees it, and builds replies in the form negotiated
(simple, structured or extended). A request that fails validation is answered here
with the right NBD error and never becomes an event; its payload (a refused WRITE's
data) is consumed and dropped, so the connection lives on. Valid requests become
:class:`RequestReceived` events; the driver performs them and calls one ``reply_*``
method per request.

Receiving follows asyncio's ``BufferedProtocol`` shape, as the client core does: while
a WRITE payload is being received and nothing else is buffered, ``receive_buffer``
returns a view of the payload's own buffer, so the data is never copied. A driver may
also receive a WRITE's payload straight into buffers of its own choosing (its backend's
storage), through :attr:`ServerTransmission.payload_sink`. Replies are a list of buffers
for ``sendmsg``: a READ's data is never joined to its header.

Validation order (spec "Request types", "Error values", "Size constraints"): shutdown
(ESHUTDOWN); unknown command, payload flag misuse (EINVAL); a write or trim on a
read-only export (EPERM); flags not valid for the command or not advertised, command
not advertised, no meta context (EINVAL); range (ENOSPC for writes, else EINVAL);
alignment to the minimum block size (EINVAL); payload size (EOVERFLOW for a structured
READ, else EINVAL). Every payload is checked against what it may hold before a byte of
memory is taken for it: a WRITE's against the maximum payload and the export, a
BLOCK_STATUS payload against the meta contexts negotiated; a refused payload is
dropped as it arrives, without a buffer. Peer input that cannot be resynchronised (bad
magic, a payload too large to consume) raises :class:`ProtocolError`; the driver then
closes the connection.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeAlias

from ..errors import ProtocolError
from .constants import (
    COMMAND_NEEDS,
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    FLAG_NEEDS,
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
from .events import NeedData
from .server_common import (
    NEED_DATA,
    U32_MAX,
    BufferPool,
    Disconnect,
    RequestReceived,
    ServerNegotiated,
)
from .server_handshake import truncate_message
from .wire import (
    DESCRIPTOR,
    ERROR_CHUNK,
    EXTENDED_DATA,
    EXTENDED_DESCRIPTOR,
    EXTENDED_REPLY,
    EXTENDED_REQUEST,
    EXTENDED_STATUS_HEAD,
    HOLE,
    REQUEST,
    SIMPLE_REPLY,
    STRUCTURED_DATA,
    STRUCTURED_REPLY,
    U32,
    U64,
    ReceiveBuffer,
)

__all__ = ["DOS_PAYLOAD", "MAX_EXTENTS", "ServerTransmission"]

Buffer: TypeAlias = bytes | bytearray | memoryview


#: A payload up to this size is consumed even when it is refused; a larger one is a
#: denial of service and closes the connection (spec "Size constraints": 2**25 bytes
#: SHOULD NOT be considered one).
DOS_PAYLOAD = 1 << 25
#: The most descriptors sent in one block status chunk (spec: SHOULD NOT exceed 2**20).
MAX_EXTENTS = 1 << 20

_WRITES = frozenset({Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES})
#: Flags valid per command, besides FUA (valid on every command once advertised) and
#: PAYLOAD_LEN (checked on its own).
_CMD_FLAGS: dict[Cmd, CmdFlag] = {
    Cmd.READ: CmdFlag.DF,
    Cmd.WRITE: CmdFlag(0),
    Cmd.DISC: CmdFlag(0),
    Cmd.FLUSH: CmdFlag(0),
    Cmd.TRIM: CmdFlag(0),
    Cmd.CACHE: CmdFlag(0),
    Cmd.WRITE_ZEROES: CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
    Cmd.BLOCK_STATUS: CmdFlag.REQ_ONE,
}
#: Commands with a nonzero effect length that succeed at once when the length is 0.
_EMPTY_OK = frozenset({Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.CACHE, Cmd.WRITE_ZEROES})
# The hot path compares plain ints and members bound once: an enum constructor or an
# IntFlag operator is a Python-level call, and this runs for every request.
_READ = Cmd.READ
_WRITE = Cmd.WRITE
_FLUSH = Cmd.FLUSH
_BLOCK_STATUS = Cmd.BLOCK_STATUS
_WRITE_ZEROES = Cmd.WRITE_ZEROES
_INT_WRITE = int(Cmd.WRITE)
_INT_DISC = int(Cmd.DISC)
_PAYLOAD_LEN = int(CmdFlag.PAYLOAD_LEN)
_DF = int(CmdFlag.DF)
_DONE = int(ReplyFlag.DONE)
_OFFSET_DATA = int(Chunk.OFFSET_DATA)

# Receive states
_HEADER = 0  # expecting a request header
_PAYLOAD = 1  # payload bytes go to self._target
_DISCARD = 2  # dropping the payload of a refused request
_IGNORE = 3  # after NBD_CMD_DISC or EOF: input is dropped


class _Refused(Exception):
    """Internal: a request fails validation with ``error``."""

    def __init__(self, error: Err, message: str) -> None:
        super().__init__(message)
        self.error = error
        self.message = message


class _Pending:
    """A request header whose payload is still arriving."""

    __slots__ = ("command", "cookie", "flags", "length", "offset")

    def __init__(self, command: Cmd, flags: CmdFlag, cookie: int, offset: int, length: int) -> None:
        self.command = command
        self.flags = flags
        self.cookie = cookie
        self.offset = offset
        self.length = length


class ServerTransmission(ReceiveBuffer):
    """Server side of the transmission phase.

    Args:
        negotiated: what the handshake settled (``export`` must be set).
        initial_data: bytes received after the handshake.
        buffer_size: size of the internal receive buffer.
        pool: where WRITE payload buffers come from; the payload of a
            :class:`RequestReceived` is a view of the whole buffer, which the driver
            may give back to the pool once the backend is done with it. None: a new
            bytearray per payload.

    Attributes:
        payload_sink: None, or ``sink(length, offset)`` called for each valid WRITE as
            its header arrives: it returns None (the payload goes to a buffer of the
            core's, as usual) or non-empty, writable byte memoryviews whose lengths
            add up to ``length``, which the payload then fills in order. The
            request's event comes once they are full, with ``payload`` None and
            ``segments`` those buffers; what the sink gave must not change the export
            before the driver performs that event (requests are performed in order,
            and a client that disconnects mid-payload must change nothing).

    After a payload at least as big as the receive buffer, :meth:`receive_buffer`
    offers room for the next header alone (likely another big WRITE's), and
    :meth:`receive_buffers` ends a payload's buffers with that room: no payload byte
    then goes through the core's buffer, to be copied out again.
    """

    def __init__(
        self,
        negotiated: ServerNegotiated,
        initial_data: bytes = b"",
        *,
        buffer_size: int = 64 * 1024,
        pool: BufferPool | None = None,
    ) -> None:
        if negotiated.export is None:
            raise ValueError("transmission needs an export")
        self.negotiated = negotiated
        self.export = negotiated.export
        self.size = self.export.size
        self.flags = negotiated.flags
        self.extended = negotiated.extended_headers
        self.structured = negotiated.structured_replies or self.extended
        self.contexts = dict(negotiated.meta_contexts)
        self._minimum = self.export.minimum_block
        self._max_payload = self.export.maximum_payload
        self._payload_limit = max(self._max_payload, DOS_PAYLOAD)
        self._header = EXTENDED_REQUEST if self.extended else REQUEST
        self._magic = EXTENDED_REQUEST_MAGIC if self.extended else REQUEST_MAGIC
        self._events: deque[RequestReceived | Disconnect] = deque()
        self._out: list[Buffer] = []
        self._in_flight: set[int] = set()
        self._seq = 0
        self._shutdown = False
        ReceiveBuffer.__init__(self, buffer_size)
        self._state = _HEADER
        self._pending: _Pending | None = None
        self._target: memoryview | None = None
        self._target_buf: bytearray | None = None
        self._target_pos = 0
        self.payload_sink: Callable[[int, int], Sequence[memoryview] | None] | None = None
        # A payload going to the sink's buffers: all of them, and the next to fill.
        self._segments: Sequence[memoryview] | None = None
        self._next_segment = 0
        # The last request's payload was at least our buffer's size: the next
        # request's header is read alone (see receive_buffer).
        self._streaming = False
        self._discard = 0
        # (command << 16 | flags) -> (command, flags as CmdFlag) for the pairs that
        # passed _check_command: its verdict depends on nothing else but the shutdown,
        # which empties this cache.
        self._checked: dict[int, tuple[Cmd, CmdFlag]] = {}
        self._new_buffer: Callable[[int], bytearray] = bytearray if pool is None else pool.take
        if initial_data:
            self.receive_data(initial_data)

    # -- state ------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Requests handed to the driver and not yet replied to."""
        return len(self._in_flight)

    @property
    def events_pending(self) -> bool:
        """True while events wait for :meth:`next_event` (a driver that stops taking
        requests, to let its replies drain, must not close before they are taken)."""
        return bool(self._events)

    @property
    def finished(self) -> bool:
        """True once the client disconnected (DISC or end of stream)."""
        return self._state == _IGNORE

    @property
    def receiving_payload(self) -> bool:
        """True while a request's payload is still arriving (to be performed or
        dropped): a server that shuts down keeps reading until it is in."""
        return self._state in (_PAYLOAD, _DISCARD)

    def shutdown(self) -> None:
        """The server is shutting down: refuse further requests with NBD_ESHUTDOWN."""
        self._shutdown = True
        self._checked.clear()

    # -- receiving --------------------------------------------------------------------

    def receive_buffer(self) -> memoryview:
        """A buffer for the next bytes from the client (never empty)."""
        if self._state == _PAYLOAD and self._start == self._end:
            assert self._target is not None
            return self._target[self._target_pos :]
        if self._streaming and self._state == _HEADER:
            # Likely another big WRITE: its header alone, so that its payload goes
            # straight to its own buffer, not through this one (a copy).
            return self._room(self._header.size)
        return self._room(0)

    def receive_buffers(self) -> list[memoryview]:
        """Buffers for the next bytes, for a scattering read (``readv``): while a
        payload arrives, the rest of its buffer (or of each of the sink's), then
        room for what follows (one header after a big payload, see receive_buffer);
        else ``[receive_buffer()]``. :meth:`buffer_updated` takes the total received."""
        if self._state != _PAYLOAD or self._start != self._end:
            return [self.receive_buffer()]
        target = self._target
        assert target is not None
        self._start = self._end = 0
        after = self._view[: self._header.size] if self._streaming else self._view
        segments = self._segments
        if segments is None:
            return [target[self._target_pos :], after]
        return [target[self._target_pos :], *segments[self._next_segment :], after]

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written into the last :meth:`receive_buffer`; 0 means EOF.

        Raises ProtocolError if the client broke the protocol beyond repair.
        """
        if nbytes == 0:
            self._on_eof()
            return
        if self._state == _IGNORE:
            self._start = self._end = 0
            return
        if self._state == _PAYLOAD and self._start == self._end:
            pos = self._target_pos + nbytes
            target = self._target
            assert target is not None
            # (past the current buffer only after receive_buffers)
            while pos >= len(target):
                pos -= len(target)
                if not self._next_target():
                    # The payload is in; any more is the next header's start, in
                    # the room receive_buffers gave (at the start of our buffer).
                    if pos:
                        self._end = pos
                    break
                target = self._target
                assert target is not None
            else:
                self._target_pos = pos
        else:
            self._end += nbytes
        self._parse()

    def next_event(self) -> RequestReceived | Disconnect | NeedData:
        """The next valid request or the end of the session; NEED_DATA when none."""
        if not self._events:
            return NEED_DATA
        event = self._events.popleft()
        if isinstance(event, RequestReceived):
            # In flight from now on: the driver owes it a reply.
            self._in_flight.add(event.seq)
        return event

    def _on_eof(self) -> None:
        if self._state == _IGNORE:
            return
        midway = self._state != _HEADER or self._start != self._end
        self._state = _IGNORE
        reason = "client closed the connection" + (" in the middle of a request" if midway else "")
        self._events.append(Disconnect(reason, soft=False))

    def _parse(self) -> None:
        while True:
            avail = self._end - self._start
            if self._state == _HEADER:
                if avail < self._header.size:
                    return
                magic, flags, type_, cookie, offset, length = self._header.unpack_from(
                    self._buf, self._start
                )
                self._start += self._header.size
                if magic != self._magic:
                    raise ProtocolError(f"bad request magic {magic:#x}")
                self._on_header(flags, type_, cookie, offset, length)
            elif self._state == _PAYLOAD:
                if not avail:
                    return
                assert self._target is not None
                n = min(avail, len(self._target) - self._target_pos)
                self._target[self._target_pos : self._target_pos + n] = self._view[
                    self._start : self._start + n
                ]
                self._start += n
                self._target_pos += n
                if self._target_pos == len(self._target):
                    self._next_target()
            elif self._state == _DISCARD:
                if not avail:
                    return
                n = min(avail, self._discard)
                self._start += n
                self._discard -= n
                if not self._discard:
                    self._state = _HEADER
            else:  # _IGNORE
                self._start = self._end = 0
                return

    def _on_header(self, flags: int, type_: int, cookie: int, offset: int, length: int) -> None:
        # Whether a payload follows depends only on the header, even for a request
        # that will be refused: that keeps the stream in step (spec "Request message").
        if self.extended:
            payload = length if flags & _PAYLOAD_LEN else 0
        else:
            payload = length if type_ == _INT_WRITE else 0
        if payload > self._payload_limit:
            raise ProtocolError(f"request payload of {payload} bytes is too large")
        if type_ == _INT_DISC:
            # No reply; the session ends once in-flight requests are answered.
            self._state = _IGNORE
            self._start = self._end = 0
            self._events.append(Disconnect("client sent NBD_CMD_DISC", soft=True))
            return
        try:
            checked = self._checked.get(type_ << 16 | flags)
            if checked is None:
                checked = self._check_flags(type_, flags)
            command, cmd_flags = checked
            if command is _BLOCK_STATUS and payload:
                self._check_status_payload(payload)
            else:
                self._check_range(command, offset, length)
        except _Refused as refusal:
            self._refuse(cookie, offset, refusal)
            self._skip(payload)
            return
        if payload:
            self._pending = _Pending(command, cmd_flags, cookie, offset, length)
            sink = self.payload_sink
            segments = sink(payload, offset) if sink is not None and command is _WRITE else None
            if segments:
                if sum(map(len, segments)) != payload or not all(segments):
                    raise ValueError("payload_sink: buffers do not add up to the payload")
                self._segments = segments
                self._next_segment = 1
                self._target = segments[0]
            else:
                self._target_buf = self._new_buffer(payload)
                self._target = memoryview(self._target_buf)
            self._streaming = payload >= len(self._buf)
            self._target_pos = 0
            self._state = _PAYLOAD
            return
        self._streaming = False
        if length == 0 and command in _EMPTY_OK:
            self._queue_ok(command, cookie, offset)  # nothing to do for a backend
            return
        self._emit(command, cmd_flags, cookie, offset, length, None)

    def _check_flags(self, type_: int, flags: int) -> tuple[Cmd, CmdFlag]:
        """_check_command, remembered for the (command, flags) pair."""
        command = self._check_command(type_, flags)
        checked = (command, CmdFlag(flags & ~_PAYLOAD_LEN))
        self._checked[type_ << 16 | flags] = checked
        return checked

    def _check_status_payload(self, payload: int) -> None:
        # Spec "NBD_CMD_BLOCK_STATUS": 8 + 4*n bytes, n ids each negotiated and named
        # once, so no valid payload is longer than 8 + 4 * (contexts negotiated). A
        # payload that cannot be valid is refused by its length alone, before any
        # buffer is taken for it, and dropped as it arrives (the stream stays in step).
        if payload < 12 or payload % 4 or payload > 8 + 4 * len(self.contexts):
            raise _Refused(
                Err.EINVAL,
                f"block status payload of {payload} bytes is not 8 + 4*n bytes "
                f"with n from 1 to {len(self.contexts)}",
            )

    def _skip(self, payload: int) -> None:
        if payload:
            self._discard = payload
            self._state = _DISCARD

    def _next_target(self) -> bool:
        """The buffer being filled is full: on to the sink's next (True), or the
        payload is in (False)."""
        segments = self._segments
        if segments is not None and self._next_segment < len(segments):
            self._target = segments[self._next_segment]
            self._next_segment += 1
            self._target_pos = 0
            return True
        self._payload_done()
        return False

    def _payload_done(self) -> None:
        pending, data, segments = self._pending, self._target_buf, self._segments
        assert pending is not None
        self._pending = self._target = self._target_buf = self._segments = None
        self._state = _HEADER
        if segments is None and pending.command is Cmd.BLOCK_STATUS:
            assert data is not None
            self._on_status_payload(pending, data)
            return
        self._emit(
            pending.command,
            pending.flags,
            pending.cookie,
            pending.offset,
            pending.length,
            None if data is None else memoryview(data),
            segments=segments,
        )

    def _on_status_payload(self, pending: _Pending, data: bytearray) -> None:
        # Spec "NBD_CMD_BLOCK_STATUS": u64 effect length, then n u32 context ids.
        try:
            # (its size was checked against the contexts before it was received)
            (length,) = U64.unpack_from(data)
            ids = struct.unpack_from(f">{(len(data) - 8) // 4}I", data, 8)
            if len(set(ids)) != len(ids) or not set(ids) <= self.contexts.keys():
                raise _Refused(Err.EINVAL, "block status payload names unknown or repeated ids")
            self._check_range(Cmd.BLOCK_STATUS, pending.offset, length)
        except _Refused as refusal:
            self._refuse(pending.cookie, pending.offset, refusal)
            return
        self._emit(
            Cmd.BLOCK_STATUS, pending.flags, pending.cookie, pending.offset, length, None, ids
        )

    def _emit(
        self,
        command: Cmd,
        flags: CmdFlag,
        cookie: int,
        offset: int,
        length: int,
        payload: memoryview | None,
        contexts: tuple[int, ...] | None = None,
        segments: Sequence[memoryview] | None = None,
    ) -> None:
        self._seq += 1
        if command is _BLOCK_STATUS and contexts is None:
            contexts = tuple(self.contexts)
        self._events.append(
            RequestReceived(
                cookie, command, flags, offset, length, payload, contexts or (), self._seq, segments
            )
        )

    # -- validation -------------------------------------------------------------------

    def _check_command(self, type_: int, flags: int) -> Cmd:
        if self._shutdown:
            raise _Refused(Err.ESHUTDOWN, "the server is shutting down")
        try:
            command = Cmd(type_)
        except ValueError:
            raise _Refused(Err.EINVAL, f"unknown command {type_}") from None
        if command not in _CMD_FLAGS:
            raise _Refused(Err.EINVAL, f"NBD_CMD_{command.name} is not supported")
        name = f"NBD_CMD_{command.name}"
        if flags & CmdFlag.PAYLOAD_LEN:
            if not self.extended:
                raise _Refused(Err.EINVAL, "NBD_CMD_FLAG_PAYLOAD_LEN needs extended headers")
            if command is not Cmd.WRITE and not (
                command is Cmd.BLOCK_STATUS and self.flags & TransmissionFlag.BLOCK_STATUS_PAYLOAD
            ):
                raise _Refused(Err.EINVAL, f"{name} takes no payload")
        elif self.extended and command is Cmd.WRITE:
            raise _Refused(Err.EINVAL, "a write needs NBD_CMD_FLAG_PAYLOAD_LEN")
        # Before the flag checks: a read-only export advertises no TRIM, WRITE_ZEROES
        # or FUA, yet the spec wants EPERM for any write or trim there.
        if command in _WRITES and self.flags & TransmissionFlag.READ_ONLY:
            raise _Refused(Err.EPERM, "the export is read-only")
        # int(): ~ on an IntFlag would complement only the known bits.
        bad = flags & ~int(_CMD_FLAGS[command] | CmdFlag.FUA | CmdFlag.PAYLOAD_LEN)
        if bad:
            raise _Refused(Err.EINVAL, f"flags {bad:#x} are not valid for {name}")
        for flag, needed in FLAG_NEEDS.items():
            if flags & flag and not self.flags & needed:
                raise _Refused(Err.EINVAL, f"NBD_CMD_FLAG_{flag.name} was not advertised")
        needed_flag = COMMAND_NEEDS.get(command)
        if needed_flag is not None and not self.flags & needed_flag:
            raise _Refused(Err.EINVAL, f"{name} was not advertised")
        if command is Cmd.BLOCK_STATUS and not self.contexts:
            raise _Refused(Err.EINVAL, "no meta context was negotiated")
        return command

    def _check_range(self, command: Cmd, offset: int, length: int) -> None:
        if command is _FLUSH:
            if offset or length:
                raise _Refused(Err.EINVAL, "NBD_CMD_FLUSH needs offset and length 0")
            return
        size = self.size
        if offset > size or length > size - offset:
            # Spec "Error values": ENOSPC for writes past the end, EINVAL otherwise.
            error = Err.ENOSPC if command is _WRITE or command is _WRITE_ZEROES else Err.EINVAL
            raise _Refused(error, f"[{offset}, +{length}) is beyond the size {size}")
        minimum = self._minimum
        if minimum > 1:
            end = offset + length
            if offset % minimum or (end % minimum and end != size):
                raise _Refused(Err.EINVAL, f"request is not aligned to {minimum} bytes")
        if length > self._max_payload:
            if command is _READ:
                # A structured reply could split it, but the spec lets the server refuse.
                error = Err.EOVERFLOW if self.structured else Err.EINVAL
                raise _Refused(error, f"read of {length} bytes exceeds {self._max_payload}")
            if command is _WRITE:
                raise _Refused(Err.EINVAL, f"write of {length} bytes exceeds {self._max_payload}")
        elif length == 0 and command is _BLOCK_STATUS:
            raise _Refused(Err.EINVAL, "block status of 0 bytes")

    def _refuse(self, cookie: int, offset: int, refusal: _Refused) -> None:
        self._queue_error(cookie, offset, refusal.error, refusal.message)

    # -- sending ----------------------------------------------------------------------

    def buffers_to_send(self) -> list[Buffer]:
        """The buffers to write, in order (for ``sendmsg``); the list is handed over."""
        out, self._out = self._out, []
        return out

    def data_to_send(self) -> bytes:
        """The bytes to write, joined (a copy; prefer :meth:`buffers_to_send`)."""
        return b"".join(self.buffers_to_send())

    def _finish(self, request: RequestReceived) -> None:
        in_flight = self._in_flight
        if request.seq not in in_flight:
            raise ValueError(f"request {request.seq} was already answered")
        in_flight.discard(request.seq)

    def reply_ok(self, request: RequestReceived) -> None:
        """Answer success to a request without reply data (anything but READ, BLOCK_STATUS).

        Raises ValueError for a READ or BLOCK_STATUS, or a request already answered.
        """
        if request.command in (Cmd.READ, Cmd.BLOCK_STATUS):
            raise ValueError(f"NBD_CMD_{request.command.name} needs data in its reply")
        self._finish(request)
        self._queue_ok(request.command, request.cookie, request.offset)

    def reply_read(self, request: RequestReceived, data: Buffer) -> None:
        """Answer a READ with ``request.length`` bytes of data (one content chunk).

        Raises ValueError if ``data`` has the wrong length or the request is not a READ.
        """
        if type(data) is not bytearray and type(data) is not bytes:
            data = memoryview(data).cast("B")
        n = len(data)
        if request.command is not _READ or n != request.length:
            raise ValueError(f"a read reply needs exactly {request.length} bytes")
        self._finish(request)
        self._out += (self._data_header(request, n), data)

    def reply_read_vector(self, request: RequestReceived, buffers: Sequence[Buffer]) -> None:
        """Answer a READ with data given in pieces (sent one after the other, not
        joined): one content chunk, as :meth:`reply_read`.

        Raises ValueError if the pieces do not add up to the request's length or the
        request is not a READ.
        """
        n = 0
        for b in buffers:
            n += b.nbytes if type(b) is memoryview else len(b)
        if request.command is not _READ or n != request.length:
            raise ValueError(f"a read reply needs exactly {request.length} bytes")
        self._finish(request)
        out = self._out
        out.append(self._data_header(request, n))
        out += buffers

    def _data_header(self, request: RequestReceived, n: int) -> bytes:
        cookie, offset = request.cookie, request.offset
        if self.extended:
            return EXTENDED_DATA.pack(
                EXTENDED_REPLY_MAGIC, _DONE, _OFFSET_DATA, cookie, offset, n + 8, offset
            )
        if self.structured:
            return STRUCTURED_DATA.pack(
                STRUCTURED_REPLY_MAGIC, _DONE, _OFFSET_DATA, cookie, n + 8, offset
            )
        return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie)

    def reply_read_chunks(
        self, request: RequestReceived, chunks: Iterable[tuple[int, Buffer | int]]
    ) -> None:
        """Answer a READ with data and holes: ``(offset, data)`` or ``(offset, hole size)``.

        The chunks must cover the request exactly, in order. Without structured replies,
        or with NBD_CMD_FLAG_DF, they are joined into one data reply (holes as zeroes).

        Raises ValueError if the chunks do not tile the request.
        """
        pieces = list(chunks)
        pos = request.offset
        for offset, piece in pieces:
            size = piece if isinstance(piece, int) else memoryview(piece).nbytes
            if offset != pos or size <= 0:
                raise ValueError("read chunks must tile the request in order")
            pos += size
        if request.command is not Cmd.READ or pos != request.offset + request.length:
            raise ValueError("read chunks must cover the request exactly")
        if not self.structured or request.flags & _DF or len(pieces) <= 1:
            joined = b"".join(bytes(p) if isinstance(p, int) else p for _, p in pieces)
            self.reply_read(request, joined)
            return
        self._finish(request)
        last = len(pieces) - 1
        for i, (offset, piece) in enumerate(pieces):
            flags = ReplyFlag.DONE if i == last else 0
            if isinstance(piece, int):
                self._out.append(
                    self._chunk_header(flags, Chunk.OFFSET_HOLE, request, 12)
                    + HOLE.pack(offset, piece)
                )
            else:
                view = memoryview(piece).cast("B")
                head = self._chunk_header(flags, Chunk.OFFSET_DATA, request, len(view) + 8)
                self._out += [head + U64.pack(offset), view]

    def reply_block_status(
        self, request: RequestReceived, extents: Mapping[int, Sequence[tuple[int, int]]]
    ) -> None:
        """Answer BLOCK_STATUS: context id -> ``(length, flags)`` extents from the offset.

        The core merges neighbours with equal flags, stops at the request's end (the
        last extent is clipped to it), keeps one extent for REQ_ONE and at most 2**20.
        An empty or missing list becomes one extent of flags 0 ("allocated, contents
        unknown"), which is always true.

        Raises ValueError for a request that is not BLOCK_STATUS, or an extent length
        that is not positive.
        """
        if request.command is not Cmd.BLOCK_STATUS:
            raise ValueError("not a block status request")
        self._finish(request)
        last = len(request.contexts) - 1
        for i, cid in enumerate(request.contexts):
            descriptors = self._clip_extents(request, extents.get(cid, ()))
            if self.extended:
                body = EXTENDED_STATUS_HEAD.pack(cid, len(descriptors)) + b"".join(
                    EXTENDED_DESCRIPTOR.pack(length, flags) for length, flags in descriptors
                )
                kind = Chunk.BLOCK_STATUS_EXT
            else:
                body = U32.pack(cid) + b"".join(
                    DESCRIPTOR.pack(length, flags & U32_MAX) for length, flags in descriptors
                )
                kind = Chunk.BLOCK_STATUS
            flags = ReplyFlag.DONE if i == last else 0
            self._out.append(self._chunk_header(flags, kind, request, len(body)) + body)

    @staticmethod
    def _clip_extents(
        request: RequestReceived, extents: Sequence[tuple[int, int]]
    ) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        covered = 0
        for length, flags in extents:
            if length <= 0:
                raise ValueError(f"extent length {length} is not positive")
            length = min(length, request.length - covered)
            if out and out[-1][1] == flags:
                out[-1] = (out[-1][0] + length, flags)
            elif len(out) == MAX_EXTENTS:
                break
            else:
                out.append((length, flags))
            covered += length
            if covered >= request.length:
                break
        if not out:
            out = [(request.length, 0)]
        if request.flags & CmdFlag.REQ_ONE:
            out = out[:1]
        return out

    def reply_error(self, request: RequestReceived, error: Err | int, message: str = "") -> None:
        """Answer a request with an error (an ``Err`` value) and an optional message.

        Raises ValueError if ``error`` is not one of the spec's error values.
        """
        try:
            err = Err(error)
        except ValueError:
            raise ValueError(f"{error} is not an NBD error value; map it first") from None
        self._finish(request)
        self._queue_error(request.cookie, request.offset, err, message)

    def _chunk_header(self, flags: int, kind: int, request: RequestReceived, length: int) -> bytes:
        if self.extended:
            return EXTENDED_REPLY.pack(
                EXTENDED_REPLY_MAGIC, flags, kind, request.cookie, request.offset, length
            )
        return STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, flags, kind, request.cookie, length)

    def _queue_ok(self, command: int, cookie: int, offset: int) -> None:
        # A simple reply is allowed for a success without data unless extended headers
        # are in use, or the request is a READ under structured replies.
        if self.extended:
            self._out.append(
                EXTENDED_REPLY.pack(
                    EXTENDED_REPLY_MAGIC, ReplyFlag.DONE, Chunk.NONE, cookie, offset, 0
                )
            )
        elif self.structured and command == Cmd.READ:
            self._out.append(
                STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, ReplyFlag.DONE, Chunk.NONE, cookie, 0)
            )
        else:
            self._out.append(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie))

    def _queue_error(self, cookie: int, offset: int, error: Err, message: str) -> None:
        if not self.structured:
            self._out.append(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie))
            return
        # An error chunk carries a message for a human (the spec's preference).
        text = truncate_message(message)
        body = ERROR_CHUNK.pack(error, len(text)) + text
        if self.extended:
            head = EXTENDED_REPLY.pack(
                EXTENDED_REPLY_MAGIC, ReplyFlag.DONE, Chunk.ERROR, cookie, offset, len(body)
            )
        else:
            head = STRUCTURED_REPLY.pack(
                STRUCTURED_REPLY_MAGIC, ReplyFlag.DONE, Chunk.ERROR, cookie, len(body)
            )
        self._out.append(head + body)
