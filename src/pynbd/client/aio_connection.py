"""An asyncio connection to an NBD server: the protocol object, the handshake, and what
it settled.

:class:`ClientProtocol` is the one :class:`asyncio.BufferedProtocol` of a connection:
it feeds the handshake (small reads), then the transmission core, whose replies it
hands to the waiting futures. :class:`AsyncConnection` opens the transport, drives the
sans-IO handshake core over it (STARTTLS included) and holds the protocol with the
transmission core; :class:`~pynbd.client.AsyncClient` is built on it, as the blocking
:class:`~pynbd.client.Client` is on :class:`~pynbd.client.connection.Connection`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable
from typing import TypeVar, cast

from ..errors import ConnectionClosed, NBDError, NBDTimeout, TLSError
from ..proto.handshake import NEED_DATA, ClientHandshake, HandshakeDone, Negotiated, StartTLS
from ..proto.limits import DEFAULT_LIMITS, ClientLimits
from ..proto.transmission import ClientTransmission, Reply
from ..transport.tls import check_session, make_client_context, tls_error
from .base import DEFAULT_TIMEOUT, Buffer, ConnectOptions, Target
from .connection import handshake_error

_T = TypeVar("_T")
#: The clock of request deadlines: a C call, where the default loop's time() is Python.
now = time.monotonic


class ClientProtocol(asyncio.BufferedProtocol):
    """Feeds the handshake (small reads) and then the transmission core."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.core: ClientTransmission | None = None
        self.waiters: dict[int, asyncio.Future[Reply]] = {}
        #: cookie -> (deadline, limit) of requests whose call has a time limit.
        self.deadlines: dict[int, tuple[float, float]] = {}
        self.failure: NBDError | None = None
        # Handshake mode
        self._hs_buf = bytearray(65536)
        self.hs_data = bytearray()
        self.hs_eof = False
        self.hs_wakeup: asyncio.Event = asyncio.Event()
        self.lost: asyncio.Event = asyncio.Event()
        # Flow control
        self.paused = False
        self._drain: asyncio.Future[None] | None = None
        # Small requests issued in one loop iteration leave in one write (a "cork").
        self._corked: list[Buffer] = []
        self.flush_pending = False
        # The protocol is made inside the running loop. Kept: get_running_loop() costs a
        # getpid() system call each time.
        self._call_soon = asyncio.get_running_loop().call_soon

    # -- asyncio callbacks --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio.Transport: no isinstance here.
        self.transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.core is not None:
            return self.core.receive_buffer()
        return memoryview(self._hs_buf)

    def buffer_updated(self, nbytes: int) -> None:
        core = self.core
        if core is None:
            self.hs_data += self._hs_buf[:nbytes]
            self.hs_wakeup.set()
            return
        try:
            if not core.buffer_updated(nbytes):
                return
        except NBDError as exc:
            self.fail(exc)
            return
        waiters, deadlines, replies = self.waiters, self.deadlines, core.replies
        while replies:
            reply = replies.popleft()
            cookie = reply.cookie
            if deadlines:
                deadlines.pop(cookie, None)
            fut = waiters.pop(cookie, None)
            if fut is not None and not fut.done():
                fut.set_result(reply)
        if not self.flush_pending:
            # After the wakeups just scheduled: what the woken tasks ask next leaves at
            # the end of the same loop iteration, not in one more.
            self.schedule_flush()

    def eof_received(self) -> bool:
        if self.core is None:
            self.hs_eof = True
            self.hs_wakeup.set()
            return False
        try:
            self.core.buffer_updated(0)
        except NBDError as exc:
            self.fail(exc)
        else:
            self.fail(ConnectionClosed("server closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()
        self.hs_eof = True
        self.hs_wakeup.set()
        if self.failure is None:
            reason = f": {exc}" if exc else ""
            self.fail(ConnectionClosed(f"connection lost{reason}"))
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(self.failure or ConnectionClosed("connection lost"))

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    # -- helpers --

    def send(self, buffers: list[Buffer]) -> None:
        """Queue request bytes. Small ones are joined and written once per loop
        iteration; a large payload is written at once, from the caller's buffer."""
        transport = self.transport
        assert transport is not None
        if len(buffers) > 1 and len(buffers[-1]) > 65536:
            self.flush()
            for buf in buffers:
                transport.write(buf)
            return
        self._corked += buffers
        if not self.flush_pending:
            self.schedule_flush()

    def schedule_flush(self) -> None:
        """Write what is queued (here and in the core) at the end of this loop iteration.

        A request whose bytes the core still holds (a read's header) needs only this:
        :meth:`flush` takes them from the core, after what :meth:`send` queued before."""
        self.flush_pending = True
        self._call_soon(self.flush)

    def flush(self) -> None:
        self.flush_pending = False
        core = self.core
        if core is not None:
            self._corked += core.buffers_to_send()
        if self._corked and self.transport is not None and self.failure is None:
            data = b"".join(self._corked)
            self._corked.clear()
            self.transport.write(data)

    def fail(self, exc: NBDError) -> None:
        """The connection is dead: fail every waiter and close the transport."""
        if self.failure is None:
            self.failure = exc
        if self.core is not None:
            self.core.fail_all()
        waiters, self.waiters = self.waiters, {}
        for fut in waiters.values():
            if not fut.done():
                fut.set_exception(self.failure)
                fut.exception()  # an abandoned waiter must not warn "never retrieved"
        if self.transport is not None:
            self.transport.abort()

    async def drain(self) -> None:
        if self.failure is not None:
            raise self.failure
        if not self.paused:
            return
        if self._drain is None:
            self._drain = asyncio.get_running_loop().create_future()
        await self._drain


async def _run_handshake(
    proto: ClientProtocol,
    handshake: ClientHandshake,
    target: Target,
) -> Negotiated:
    loop = asyncio.get_running_loop()
    tls_quiet = False  # TLS is up and the server has not spoken since
    try:
        while True:
            event = handshake.next_event()
            out = handshake.data_to_send()
            if out:
                assert proto.transport is not None
                proto.transport.write(out)
            if event is NEED_DATA:
                while not proto.hs_data and not proto.hs_eof:
                    proto.hs_wakeup.clear()
                    await proto.hs_wakeup.wait()
                data, proto.hs_data = bytes(proto.hs_data), bytearray()
                tls_quiet = tls_quiet and not data
                handshake.receive_data(data)  # b"" is EOF
            elif isinstance(event, StartTLS):
                await _start_tls(loop, proto, target)
                tls_quiet = True
                handshake.tls_established()
            elif isinstance(event, HandshakeDone):
                return event.result
    except (OSError, NBDError) as exc:
        out = handshake.data_to_send()  # NBD_OPT_ABORT, when the core gave up cleanly
        if out and proto.transport is not None and not proto.transport.is_closing():
            proto.transport.write(out)
        err = handshake_error(exc, tls_quiet)
        if err is exc:
            raise
        raise err from exc


async def _start_tls(
    loop: asyncio.AbstractEventLoop, proto: ClientProtocol, target: Target
) -> None:
    assert target.tls is not None and proto.transport is not None
    ctx = make_client_context(target.tls, target.host)
    try:
        new = await loop.start_tls(
            proto.transport, proto, ctx, server_hostname=target.tls.server_name(target.host)
        )
    except (OSError, ValueError) as exc:
        raise tls_error(exc, psk=target.tls.is_psk) from exc
    if new is None:
        raise TLSError("the TLS handshake did not complete")
    session = new.get_extra_info("ssl_object")
    if session is not None:
        check_session(session, ctx)
    proto.transport = new


async def _open(
    target: Target, sock: socket.socket | None
) -> tuple[asyncio.Transport, ClientProtocol]:
    loop = asyncio.get_running_loop()
    try:
        if sock is not None:
            sock.setblocking(False)
            return await loop.create_connection(ClientProtocol, sock=sock)
        if target.path is not None:
            return await loop.create_unix_connection(ClientProtocol, target.path)
        if target.host is None:
            raise ValueError("give a URI, a host or a unix socket path")
        transport, proto = await loop.create_connection(
            ClientProtocol, target.host.strip("[]"), target.port or 10809
        )
        raw = transport.get_extra_info("socket")
        if raw is not None and raw.family in (socket.AF_INET, socket.AF_INET6):
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # rule 12
        return transport, proto
    except OSError as exc:
        raise ConnectionClosed(
            f"cannot connect to {target.describe()}: {exc.strerror or exc}"
        ) from exc


async def with_timeout(coro: Awaitable[_T], timeout: float | None, what: str) -> _T:
    try:
        return await asyncio.wait_for(coro, timeout)
    except TimeoutError as exc:
        raise NBDTimeout(f"{what} did not finish within {timeout} s") from exc


class AsyncConnection:
    """An asyncio connection whose handshake is done. Make one with :meth:`open`.

    Attributes:
        proto: the connection's protocol object (its transport is ``proto.transport``).
        negotiated: what the handshake settled.
        target: where it is connected.
        core: the transmission core (also ``proto.core``), fed with the bytes the
            server sent after the handshake; None in negotiation mode.
    """

    def __init__(
        self,
        proto: ClientProtocol,
        negotiated: Negotiated,
        target: Target,
        trailing: bytes,
        limits: ClientLimits = DEFAULT_LIMITS,
    ) -> None:
        self.proto = proto
        self.negotiated = negotiated
        self.target = target
        self.core = (
            ClientTransmission(negotiated, trailing, limits=limits)
            if negotiated.in_transmission
            else None
        )
        proto.core = self.core

    @classmethod
    async def open(
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
    ) -> AsyncConnection:
        """Connect (or take ``sock``) and negotiate, as
        :meth:`pynbd.client.connection.Connection.open`.

        Raises:
            As :meth:`pynbd.client.connection.Connection.open`.
        """
        config = options.handshake_config(
            go=go, list_exports=list_exports, list_meta_contexts=list_meta_contexts, info=info
        )
        handshake = ClientHandshake(config)

        async def run() -> tuple[Negotiated, ClientProtocol]:
            transport, proto = await _open(target, sock)
            try:
                return await _run_handshake(proto, handshake, target), proto
            except BaseException:
                (proto.transport or transport).abort()
                raise

        what = "connecting" if go else "negotiation"
        negotiated, proto = await with_timeout(run(), timeout, what)
        # Bytes the server sent right after GO are checked, not dropped.
        trailing = handshake.trailing_data + bytes(proto.hs_data)
        try:
            return cls(proto, negotiated, target, trailing, options.limits)
        except BaseException:
            if proto.transport is not None:
                proto.transport.abort()  # the core refused those bytes
            raise

    async def close(self, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """Leave politely and close: wait up to ``timeout`` for the requests in flight,
        send NBD_CMD_DISC when nothing is in flight (in transmission), close, and
        return once the transport is gone. Idempotent."""
        proto, core = self.proto, self.core
        transport = proto.transport
        if transport is None or transport.is_closing():
            return
        if proto.failure is None and core is not None:
            pending = list(proto.waiters.values())
            if pending:
                await asyncio.wait(pending, timeout=timeout)
            if proto.failure is None and core.in_flight == 0:
                core.disconnect()
                proto.send(core.buffers_to_send())
                proto.flush()
        transport.close()
        # Return once the transport is really gone (a TLS close takes a round trip).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proto.lost.wait(), 5.0)


async def negotiate_async(
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
    """:func:`pynbd.client.connection.negotiate` for asyncio."""
    conn = await AsyncConnection.open(
        target,
        options,
        sock=sock,
        go=go,
        list_exports=list_exports,
        list_meta_contexts=list_meta_contexts,
        info=info,
        timeout=timeout,
    )
    await conn.close()
    return conn.negotiated


__all__ = ["AsyncConnection", "ClientProtocol", "negotiate_async", "now", "with_timeout"]
