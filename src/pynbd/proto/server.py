"""The server side of NBD, sans-IO: one object per connection, both phases.

:class:`ServerConnection` runs the handshake (:mod:`.server_handshake`) and then the
transmission phase (:mod:`.server_transmission`) behind one interface, moving the
bytes that arrive after NBD_OPT_GO or NBD_OPT_EXPORT_NAME from one to the other. A
driver does::

    conn = ServerConnection(config)
    send(conn.buffers_to_send())            # the greeting
    while True:
        buf = conn.receive_buffer()
        conn.buffer_updated(recv_into(buf))  # 0 at end of stream
        while (event := conn.next_event()) is not NEED_DATA:
            ...                              # see below
        send(conn.buffers_to_send())

Events: :class:`StartTLS` (upgrade the stream, then :meth:`tls_established`),
:class:`TransmissionStarted` (open the export), :class:`RequestReceived` (perform it,
then call one ``reply_*`` method), :class:`Disconnect` (finish the in-flight requests,
send their replies, close). The core raises :class:`~pynbd.errors.ProtocolError` when
the client broke the protocol beyond repair: close the connection at once. Nothing
else escapes from peer input.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TypeAlias

from ..errors import ProtocolError
from .constants import Err
from .server_common import (
    AVAILABLE_META_CONTEXTS,
    NEED_DATA,
    BufferPool,
    Disconnect,
    ExportSpec,
    RequestReceived,
    ServerConfig,
    ServerEvent,
    ServerNegotiated,
    StartTLS,
    TLSPolicy,
    TransmissionStarted,
    check_block_sizes,
)
from .server_handshake import ServerHandshake
from .server_transmission import DOS_PAYLOAD, MAX_EXTENTS, ServerTransmission

__all__ = [
    "AVAILABLE_META_CONTEXTS",
    "DOS_PAYLOAD",
    "MAX_EXTENTS",
    "NEED_DATA",
    "BufferPool",
    "Disconnect",
    "ExportSpec",
    "RequestReceived",
    "ServerConfig",
    "ServerConnection",
    "ServerEvent",
    "ServerHandshake",
    "ServerNegotiated",
    "ServerTransmission",
    "StartTLS",
    "TLSPolicy",
    "TransmissionStarted",
    "check_block_sizes",
]

Buffer: TypeAlias = bytes | bytearray | memoryview

#: The receive buffer during the handshake; options are small.
_HANDSHAKE_CHUNK = 16 * 1024


class ServerConnection:
    """One server connection: the handshake, then transmission.

    Args:
        config: the exports and the negotiation policy.
        buffer_size: size of the transmission phase's receive buffer.
        pool: where WRITE payload buffers come from (the driver gives each back once
            the backend is done with it); None: a new bytearray per payload.

    Raises (from ``buffer_updated``, ``receive_data``, ``next_event`` and
    ``tls_established``): :class:`ProtocolError` when the client broke the protocol;
    the connection must then be closed.
    """

    def __init__(
        self,
        config: ServerConfig,
        *,
        buffer_size: int = 64 * 1024,
        pool: BufferPool | None = None,
    ) -> None:
        self.config = config
        self._pool = pool
        self.handshake = ServerHandshake(config)
        self.transmission: ServerTransmission | None = None
        self._buffer_size = buffer_size
        self._scratch = bytearray(_HANDSHAKE_CHUNK)
        self._failed: ProtocolError | None = None
        # The handshake's last bytes were taken, after transmission started.
        self._handshake_sent = False

    # -- phase ------------------------------------------------------------------------

    @property
    def negotiated(self) -> ServerNegotiated:
        """What the handshake settled so far."""
        return self.handshake.result

    @property
    def in_transmission(self) -> bool:
        return self.transmission is not None

    @property
    def in_flight(self) -> int:
        """Requests handed out and not yet answered."""
        return self.transmission.in_flight if self.transmission is not None else 0

    @property
    def events_pending(self) -> bool:
        """True while transmission events wait for :meth:`next_event`."""
        return self.transmission is not None and self.transmission.events_pending

    @property
    def receiving_payload(self) -> bool:
        """True while a request's payload is still arriving."""
        return self.transmission is not None and self.transmission.receiving_payload

    def shutdown(self, reason: str = "the server is shutting down") -> None:
        """The server is shutting down: options get NBD_REP_ERR_SHUTDOWN (with
        ``reason``), requests NBD_ESHUTDOWN (in-flight requests still complete
        normally)."""
        self.handshake.shutdown(reason)
        if self.transmission is not None:
            self.transmission.shutdown()

    # -- receiving --------------------------------------------------------------------

    def receive_buffer(self) -> memoryview:
        """A buffer for the next bytes from the client (never empty)."""
        if self.transmission is not None:
            return self.transmission.receive_buffer()
        return memoryview(self._scratch)

    def receive_buffers(self) -> list[memoryview]:
        """Buffers for the next bytes, for a scattering read (``readv``); see
        :meth:`ServerTransmission.receive_buffers`."""
        if self.transmission is not None:
            return self.transmission.receive_buffers()
        return [memoryview(self._scratch)]

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written into the last :meth:`receive_buffer`; 0 means EOF."""
        self._check()
        try:
            if self.transmission is not None:
                self.transmission.buffer_updated(nbytes)
            else:
                self.handshake.receive_data(bytes(self._scratch[:nbytes]))
        except ProtocolError as exc:
            self._failed = exc
            raise

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the client (copying); ``b""`` means end of stream."""
        self._check()
        try:
            if self.transmission is not None:
                self.transmission.receive_data(data)
            else:
                self.handshake.receive_data(data)
        except ProtocolError as exc:
            self._failed = exc
            raise

    def next_event(self) -> ServerEvent:
        """The next thing the driver must handle; NEED_DATA when there is none."""
        self._check()
        try:
            if self.transmission is not None:
                return self.transmission.next_event()
            event = self.handshake.next_event()
            if isinstance(event, TransmissionStarted):
                self.transmission = ServerTransmission(
                    event.negotiated,
                    self.handshake.trailing_data(),
                    buffer_size=self._buffer_size,
                    pool=self._pool,
                )
                if self.handshake.eof:
                    self.transmission.buffer_updated(0)
            return event
        except ProtocolError as exc:
            self._failed = exc
            raise

    def tls_established(self) -> None:
        """The stream is now TLS (after :class:`StartTLS`); negotiation restarts."""
        self._check()
        try:
            self.handshake.tls_established()
        except ProtocolError as exc:
            self._failed = exc
            raise

    def _check(self) -> None:
        if self._failed is not None:
            raise self._failed

    # -- sending ----------------------------------------------------------------------

    def buffers_to_send(self) -> list[Buffer]:
        """The buffers to write now, in order (the list is handed over)."""
        tx = self.transmission
        if tx is not None and self._handshake_sent:
            return tx.buffers_to_send()
        out: list[Buffer] = []
        greeting = self.handshake.data_to_send()
        if greeting:
            out.append(greeting)
        if tx is not None:
            self._handshake_sent = True  # (the handshake's last reply, GO's ACK)
            out += tx.buffers_to_send()
        return out

    def data_to_send(self) -> bytes:
        """The bytes to write now, joined (a copy; prefer :meth:`buffers_to_send`)."""
        return b"".join(self.buffers_to_send())

    def _tx(self) -> ServerTransmission:
        if self.transmission is None:
            raise ValueError("no request can be answered before transmission")
        return self.transmission

    def reply_ok(self, request: RequestReceived) -> None:
        """Answer success to a request that has no reply data."""
        self._tx().reply_ok(request)

    def reply_read(self, request: RequestReceived, data: Buffer) -> None:
        """Answer a READ with its data."""
        self._tx().reply_read(request, data)

    def reply_read_vector(self, request: RequestReceived, buffers: Sequence[Buffer]) -> None:
        """See :meth:`ServerTransmission.reply_read_vector`."""
        self._tx().reply_read_vector(request, buffers)

    def reply_read_chunks(
        self, request: RequestReceived, chunks: Iterable[tuple[int, Buffer | int]]
    ) -> None:
        """Answer a READ with data and holes (see ServerTransmission.reply_read_chunks)."""
        self._tx().reply_read_chunks(request, chunks)

    def reply_block_status(
        self, request: RequestReceived, extents: Mapping[int, Sequence[tuple[int, int]]]
    ) -> None:
        """Answer BLOCK_STATUS with ``(length, flags)`` extents per context id."""
        self._tx().reply_block_status(request, extents)

    def reply_error(self, request: RequestReceived, error: Err | int, message: str = "") -> None:
        """Answer a request with an NBD error value and an optional message."""
        self._tx().reply_error(request, error, message)
