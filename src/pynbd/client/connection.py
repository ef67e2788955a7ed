"""A blocking connection to an NBD server: the stream, the handshake, and what it settled.

:class:`Connection` opens the stream (or takes a connected socket), drives the sans-IO
handshake core over it, STARTTLS included, and holds the socket with the transmission
core once the export is in use. Everything that talks NBD over blocking sockets starts
here: :class:`~pynbd.client.Client`, the command line's ``info``, ``list`` and ``map``,
and the kernel side, which takes the negotiated socket over with
:meth:`Connection.release` and gives it to the nbd driver::

    conn = Connection.open(target, options, timeout=10)
    sock = conn.release()          # in transmission, nothing buffered: the kernel's now

:func:`negotiate` is negotiation mode: list exports and meta contexts, ask about an
export, and leave without using it.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time

from ..errors import (
    ConnectionClosed,
    NBDError,
    NBDTimeout,
    ProtocolError,
    TLSError,
)
from ..proto.handshake import (
    NEED_DATA,
    ClientHandshake,
    HandshakeDone,
    Negotiated,
    StartTLS,
)
from ..proto.limits import DEFAULT_LIMITS, ClientLimits
from ..proto.transmission import ClientTransmission
from ..transport.connect import open_stream
from ..transport.tls import start_client_tls
from .base import DEFAULT_TIMEOUT, ConnectOptions, Target


class Deadline:
    """The time left for one operation, from a timeout in seconds (None: no limit).

    Attributes:
        end: the ``time.monotonic()`` value at which it passes, or None.
    """

    __slots__ = ("end",)

    def __init__(self, timeout: float | None) -> None:
        self.end = None if timeout is None else time.monotonic() + timeout

    def left(self) -> float | None:
        """Seconds left (None: no limit). Raises NBDTimeout once none is left."""
        if self.end is None:
            return None
        left = self.end - time.monotonic()
        if left <= 0:
            raise NBDTimeout("the call timed out")
        return left


class Connection:
    """A blocking connection whose handshake is done. Make one with :meth:`open`.

    Attributes:
        sock: the socket in use (a TLS socket after STARTTLS).
        negotiated: what the handshake settled.
        target: where it is connected.
        limits: the bounds the transmission core keeps to.
    """

    def __init__(
        self,
        sock: socket.socket,
        negotiated: Negotiated,
        target: Target,
        trailing: bytes,
        limits: ClientLimits = DEFAULT_LIMITS,
    ) -> None:
        self.sock: socket.socket | None = sock
        self.negotiated = negotiated
        self.target = target
        self.limits = limits
        self._trailing = trailing
        self._core: ClientTransmission | None = None

    @property
    def core(self) -> ClientTransmission:
        """The transmission core, made on first use and fed with the bytes the server
        sent after the handshake.

        Raises:
            ConnectionClosed: negotiation mode (nothing is in use).
            ProtocolError: those bytes are not a valid reply.
        """
        if self._core is None:
            if not self.negotiated.in_transmission:
                raise ConnectionClosed("negotiation mode: the export is not in use")
            self._core = ClientTransmission(self.negotiated, self._trailing, limits=self.limits)
        return self._core

    @classmethod
    def open(
        cls,
        target: Target,
        options: ConnectOptions,
        *,
        sock: socket.socket | None = None,
        go: bool = True,
        list_exports: bool = False,
        list_meta_contexts: bool = False,
        info: bool = True,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> Connection:
        """Connect (or take ``sock``, connected and not yet spoken on) and negotiate.

        Args:
            target: where to connect, and the TLS settings.
            options: what to negotiate.
            go, list_exports, list_meta_contexts, info: as
                :class:`~pynbd.proto.handshake.HandshakeConfig`: with ``go`` the
                export is in use afterwards (``core`` is set).
            timeout: for connecting and the whole handshake.

        Raises:
            URIError, ConnectionClosed, TLSError, OptionError, ExportNotFound,
            ProtocolError, NBDTimeout. The socket is closed on any error.
        """
        deadline = Deadline(timeout)
        if sock is None:
            sock = open_stream(
                host=target.host, port=target.port, path=target.path, timeout=deadline.left()
            )
        config = options.handshake_config(
            go=go, list_exports=list_exports, list_meta_contexts=list_meta_contexts, info=info
        )
        handshake = ClientHandshake(config)
        sock, negotiated = _handshake(sock, handshake, target, deadline)
        return cls(sock, negotiated, target, handshake.trailing_data, options.limits)

    @property
    def closed(self) -> bool:
        return self.sock is None

    def release(self) -> socket.socket:
        """Hand the socket over, in transmission and in blocking mode (for the kernel's
        nbd driver); this connection forgets it.

        Raises:
            ProtocolError: negotiation did not enter transmission, or the server sent
            bytes before any request (they would be lost). The socket is then closed.
            ConnectionClosed: the socket was released or closed already.
        """
        sock, self.sock = self.sock, None
        if sock is None:
            raise ConnectionClosed("the connection is closed")
        try:
            if not self.negotiated.in_transmission:
                raise ProtocolError("the handshake ended without entering transmission")
            if self._trailing:
                raise ProtocolError("the server sent data before any request")
            # No Python timeout: it would leave O_NONBLOCK on the file.
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        return sock

    def close(self, timeout: float = 1.0) -> None:
        """Leave politely and close, within ``timeout``; idempotent. In transmission
        with nothing in flight, NBD_CMD_DISC is sent first (and a TLS session is shut
        down); in negotiation mode, the server's close is awaited. Errors on the way
        are ignored."""
        sock, self.sock = self.sock, None
        if sock is None:
            return
        core = self._core
        if core is None and self.negotiated.in_transmission:
            core = ClientTransmission(self.negotiated)  # only to say NBD_CMD_DISC
        deadline = Deadline(timeout)
        try:
            if core is None:
                # Negotiation mode: NBD_OPT_ABORT went out. Wait for the server to
                # answer and close, so that it does not see its answer refused.
                sock.settimeout(deadline.left())
                while sock.recv(4096):
                    sock.settimeout(deadline.left())
            elif not core.closed and core.in_flight == 0:
                core.disconnect()
                sock.settimeout(deadline.left())
                for buf in core.buffers_to_send():
                    sock.sendall(buf)
                if isinstance(sock, ssl.SSLSocket):
                    sock.unwrap()
        except (OSError, NBDError, ValueError):
            pass
        finally:
            sock.close()

    def abort(self) -> None:
        """Close at once, without a word (the stream's position is lost)."""
        if self._core is not None:
            self._core.fail_all()
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()


def negotiate(
    target: Target,
    options: ConnectOptions,
    *,
    sock: socket.socket | None = None,
    list_exports: bool = True,
    list_meta_contexts: bool = True,
    info: bool = True,
    go: bool = False,
    timeout: float | None = DEFAULT_TIMEOUT,
) -> Negotiated:
    """Negotiate without using the export, and disconnect.

    With ``go=False`` (negotiation mode) the export is asked about with NBD_OPT_INFO
    (unless ``info`` is False) and the session ends with NBD_OPT_ABORT; a refused
    option, INFO included, is recorded in ``refused`` with what was learned before
    it. With ``go=True`` transmission starts and NBD_CMD_DISC ends it at once (some
    servers, like nbd-server, report the right size only to GO).

    Raises:
        As :meth:`Connection.open`.
    """
    conn = Connection.open(
        target,
        options,
        sock=sock,
        go=go,
        list_exports=list_exports,
        list_meta_contexts=list_meta_contexts,
        info=info,
        timeout=timeout,
    )
    conn.close()
    return conn.negotiated


def _handshake(
    sock: socket.socket, handshake: ClientHandshake, target: Target, deadline: Deadline
) -> tuple[socket.socket, Negotiated]:
    """Drive ``handshake`` over a blocking socket; return the (maybe TLS) socket.

    Socket errors become pynbd errors (see :func:`handshake_error`). On any error the
    socket in use is closed (after STARTTLS it is the TLS socket, which the caller
    cannot see).
    """
    tls_quiet = False  # TLS is up and the server has not spoken since
    try:
        while True:
            event = handshake.next_event()
            out = handshake.data_to_send()
            if out:
                sock.settimeout(deadline.left())
                sock.sendall(out)
            if event is NEED_DATA:
                sock.settimeout(deadline.left())
                data = sock.recv(65536)
                tls_quiet = tls_quiet and not data
                handshake.receive_data(data)
            elif isinstance(event, StartTLS):
                if target.tls is None:  # the core sends STARTTLS only with a TLS config
                    raise ProtocolError("STARTTLS accepted, but no TLS was asked for")
                sock = start_client_tls(sock, target.tls, target.host, timeout=deadline.left())
                tls_quiet = True
                handshake.tls_established()
            elif isinstance(event, HandshakeDone):
                return sock, event.result
    except BaseException as exc:
        _send_parting(sock, handshake)
        sock.close()
        err = handshake_error(exc, tls_quiet)
        if err is exc:
            raise
        raise err from exc


def _send_parting(sock: socket.socket, handshake: ClientHandshake) -> None:
    """Best effort: send what the core queued as it gave up (NBD_OPT_ABORT)."""
    out = handshake.data_to_send()
    if out:
        with contextlib.suppress(OSError, ValueError):
            sock.settimeout(0.5)
            sock.sendall(out)


def handshake_error(exc: BaseException, tls_quiet: bool) -> BaseException:
    """The pynbd error to raise for ``exc``, raised while driving a handshake.

    NBDTimeout when the time ran out, ConnectionClosed when the connection broke,
    TLSError when the server hung up right after the TLS handshake (``tls_quiet``:
    with TLS 1.3 that is how a refused client certificate shows); pynbd errors and
    anything but OSError as they are.
    """
    if tls_quiet and isinstance(exc, OSError | ProtocolError) and not isinstance(exc, TimeoutError):
        return TLSError(
            "the server closed the connection right after the TLS handshake "
            "(was the client certificate refused?)"
        )
    if isinstance(exc, NBDError) or not isinstance(exc, OSError):
        return exc
    if isinstance(exc, TimeoutError):
        return NBDTimeout("the server did not finish the handshake in time")
    return ConnectionClosed(f"connection lost during the handshake: {exc}")


__all__ = ["Connection", "Deadline", "handshake_error", "negotiate"]
