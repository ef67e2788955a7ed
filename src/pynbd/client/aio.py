"""The asyncio NBD client: a thin driver over the sans-IO core.

One :class:`asyncio.BufferedProtocol` feeds the core; every request's cookie maps to a
future that the protocol resolves when the core reports the reply, so concurrent
awaits on one :class:`AsyncClient` pipeline by themselves::

    async with await AsyncClient.connect("nbd+unix:///?socket=/tmp/s") as c:
        await asyncio.gather(*(c.pread(4096, i * 4096) for i in range(16)))

Read payloads are received straight into the caller's buffer (``get_buffer`` returns a
view of it while a large payload is in progress). Method names and arguments match the
blocking :class:`~pynbd.client.sync.Client`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable
from types import TracebackType
from typing import Any, TypeVar, cast

from ..errors import (
    ConnectionClosed,
    NBDError,
    NBDTimeout,
    TLSError,
    UnsupportedError,
)
from ..proto.constants import BASE_ALLOCATION, Cmd, CmdFlag
from ..proto.handshake import NEED_DATA, ClientHandshake, HandshakeDone, Negotiated, StartTLS
from ..proto.transmission import ClientTransmission, Reply
from ..transport.tls import TLSConfig, check_session, make_client_context, tls_error
from ..transport.uri import NBDURI
from .base import (
    DEFAULT,
    DEFAULT_TIMEOUT,
    Buffer,
    ClientBase,
    ConnectOptions,
    ExtentCollector,
    MappedExtent,
    Op,
    Target,
    Timeout,
    handshake_error,
    resolve,
    submit_all,
)

_T = TypeVar("_T")
#: The clock of request deadlines: a C call, where the default loop's time() is Python.
_now = time.monotonic
_DF = int(CmdFlag.DF)
_READ = Cmd.READ
_FUA = int(CmdFlag.FUA)


class _Protocol(asyncio.BufferedProtocol):
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
    proto: _Protocol,
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


async def _start_tls(loop: asyncio.AbstractEventLoop, proto: _Protocol, target: Target) -> None:
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


async def _open(target: Target, sock: socket.socket | None) -> tuple[asyncio.Transport, _Protocol]:
    loop = asyncio.get_running_loop()
    try:
        if sock is not None:
            sock.setblocking(False)
            return await loop.create_connection(_Protocol, sock=sock)
        if target.path is not None:
            return await loop.create_unix_connection(_Protocol, target.path)
        if target.host is None:
            raise ValueError("give a URI, a host or a unix socket path")
        transport, proto = await loop.create_connection(
            _Protocol, target.host.strip("[]"), target.port or 10809
        )
        raw = transport.get_extra_info("socket")
        if raw is not None and raw.family in (socket.AF_INET, socket.AF_INET6):
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # rule 12
        return transport, proto
    except OSError as exc:
        raise ConnectionClosed(
            f"cannot connect to {target.describe()}: {exc.strerror or exc}"
        ) from exc


async def _with_timeout(coro: Awaitable[_T], timeout: float | None, what: str) -> _T:
    try:
        return await asyncio.wait_for(coro, timeout)
    except TimeoutError as exc:
        raise NBDTimeout(f"{what} did not finish within {timeout} s") from exc


class AsyncClient(ClientBase):
    """An asyncio NBD client connected to one export. Create with :meth:`connect`.

    Concurrent calls on one client pipeline on its connection. Arguments, getters and
    errors are those of the blocking :class:`~pynbd.client.sync.Client`; a call that
    exceeds its timeout raises NBDTimeout and closes the connection.
    """

    _core: ClientTransmission

    def __init__(
        self,
        proto: _Protocol,
        negotiated: Negotiated,
        target: Target,
        options: ConnectOptions,
        initial_data: bytes = b"",
    ) -> None:
        self._proto = proto
        self.negotiated = negotiated
        self.target = target
        self.options = options
        self.timeout = options.timeout
        self._core = ClientTransmission(negotiated, initial_data)
        proto.core = self._core
        self._closed = False
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._period = 1.0
        self._maxp = self._max_payload()

    @classmethod
    async def connect(
        cls,
        uri: str | NBDURI | None = None,
        *,
        host: str | None = None,
        port: int | None = None,
        path: str | None = None,
        sock: socket.socket | None = None,
        export_name: str | None = None,
        tls: TLSConfig | None = None,
        structured_replies: bool = True,
        extended_headers: bool = True,
        meta_contexts: tuple[str, ...] = (BASE_ALLOCATION,),
        request_block_size: bool = True,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> AsyncClient:
        """Connect and negotiate; arguments as for :class:`~pynbd.client.sync.Client`."""
        target, options = resolve(
            uri,
            host=host,
            port=port,
            path=path,
            export_name=export_name,
            tls=tls,
            structured_replies=structured_replies,
            extended_headers=extended_headers,
            meta_contexts=meta_contexts,
            request_block_size=request_block_size,
            timeout=timeout,
        )
        handshake = ClientHandshake(options.handshake_config())
        negotiated, proto = await _with_timeout(
            cls._negotiate(target, sock, handshake), timeout, "connecting"
        )
        # Bytes the server sent right after GO are checked, not dropped.
        trailing = handshake.trailing_data + bytes(proto.hs_data)
        return cls(proto, negotiated, target, options, trailing)

    @staticmethod
    async def _negotiate(
        target: Target, sock: socket.socket | None, handshake: ClientHandshake
    ) -> tuple[Negotiated, _Protocol]:
        transport, proto = await _open(target, sock)
        try:
            return await _run_handshake(proto, handshake, target), proto
        except BaseException:
            (proto.transport or transport).abort()
            raise

    @staticmethod
    async def negotiate(
        uri: str | NBDURI | None = None,
        *,
        host: str | None = None,
        port: int | None = None,
        path: str | None = None,
        sock: socket.socket | None = None,
        export_name: str | None = None,
        tls: TLSConfig | None = None,
        list_exports: bool = True,
        list_meta_contexts: bool = True,
        go: bool = False,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> Negotiated:
        """Negotiation mode, as :meth:`pynbd.client.sync.Client.negotiate`."""
        target, options = resolve(
            uri, host=host, port=port, path=path, export_name=export_name, tls=tls, timeout=timeout
        )
        config = options.handshake_config(
            go=go, list_exports=list_exports, list_meta_contexts=list_meta_contexts
        )
        result, proto = await _with_timeout(
            AsyncClient._negotiate(target, sock, ClientHandshake(config)), timeout, "negotiation"
        )
        assert proto.transport is not None
        if result.in_transmission:
            core = ClientTransmission(result)
            core.disconnect()
            proto.transport.writelines(core.buffers_to_send())
        proto.transport.close()
        return result

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        return self._closed or self._proto.failure is not None

    async def close(self) -> None:
        """Wait for requests in flight, disconnect (NBD_CMD_DISC) and close. Idempotent."""
        if self._closed:
            return
        self._closed = True
        proto, core = self._proto, self._core
        transport = proto.transport
        if transport is None:
            return
        if proto.failure is None:
            pending = list(proto.waiters.values())
            if pending:
                await asyncio.wait(pending, timeout=self.timeout)
            if proto.failure is None and core.in_flight == 0:
                core.disconnect()
                proto.send(core.buffers_to_send())
                proto.flush()
        if self._timer is not None:
            self._timer.cancel()
        transport.close()
        # Return once the transport is really gone (a TLS close takes a round trip).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proto.lost.wait(), 5.0)

    # -- the request loop --------------------------------------------------------------

    async def _run(self, ops: list[Op], timeout: Timeout) -> list[Reply]:
        """Submit ``ops`` and await all their replies (one deadline for the call)."""
        proto = self._proto
        futures = self._submit(ops, timeout)
        if proto.paused:
            await proto.drain()
        replies = [await fut for fut in futures]
        if self._core.shutdown_requested and self._core.in_flight == 0:
            await self.close()  # the spec wants a soft disconnect after NBD_ESHUTDOWN
        for reply in replies:
            if reply.error is not None:
                raise reply.error
        return replies

    def _submit_one(
        self,
        command: Cmd,
        offset: int,
        length: int,
        flags: int,
        timeout: Timeout,
        payload: Buffer | None = None,
        buffer: memoryview | None = None,
    ) -> asyncio.Future[Reply]:
        """Queue one request, the common case (no plan, no list); return its future.

        A READ without ``buffer`` is queued with ``read_bytes`` (its reply carries the
        data). A plain function, not a coroutine: the calling coroutine awaits the
        future itself, which saves a coroutine per request."""
        proto, core = self._proto, self._core
        if proto.failure is not None or self._closed or proto.transport is None:
            raise ConnectionClosed("the connection is closed")
        if buffer is not None or command is _READ:
            if buffer is not None:
                cookie = core.read(buffer, offset, flags)
            else:
                cookie = core.read_bytes(length, offset, flags)
            if not proto.flush_pending:
                proto.schedule_flush()  # the header leaves with this iteration's others
        else:
            cookie = core.request(command, offset, length, flags, payload=payload)
            proto.send(core.buffers_to_send())
        fut: asyncio.Future[Reply] = self._loop.create_future()
        proto.waiters[cookie] = fut
        limit = self.timeout if timeout is DEFAULT else timeout
        if limit is not None:
            proto.deadlines[cookie] = (_now() + limit, limit)
            if self._timer is None or limit / 8 < self._period:
                self._arm_watchdog(limit)
        return fut

    async def _await_one(self, fut: asyncio.Future[Reply]) -> None:
        """Await what :meth:`_submit_one` queued; raise its error."""
        if self._proto.paused:
            await self._proto.drain()
        reply = await fut
        if reply.error is not None or self._core.shutdown_requested:
            await self._finish(reply)

    async def _finish(self, reply: Reply) -> None:
        """The rare end of a request: a soft disconnect after NBD_ESHUTDOWN (as the
        spec wants), the request's error."""
        if self._core.shutdown_requested and self._core.in_flight == 0:
            await self.close()
        if reply.error is not None:
            raise reply.error

    def _submit(self, ops: list[Op], timeout: Timeout) -> list[asyncio.Future[Reply]]:
        proto, core = self._proto, self._core
        if proto.failure is not None:
            raise ConnectionClosed(f"the connection is closed ({proto.failure})")
        if self._closed or proto.transport is None:
            raise ConnectionClosed("the connection is closed")
        loop = self._loop
        limit = self.timeout if timeout is DEFAULT else timeout
        cookies = [ops[0].submit(core)] if len(ops) == 1 else submit_all(core, ops)
        futures = []
        waiters = proto.waiters
        for cookie in cookies:
            fut: asyncio.Future[Reply] = loop.create_future()
            waiters[cookie] = fut
            futures.append(fut)
        if limit is not None:
            entry = (_now() + limit, limit)
            for cookie in cookies:
                proto.deadlines[cookie] = entry
            if self._timer is None or limit / 8 < self._period:
                self._arm_watchdog(limit)
        proto.send(core.buffers_to_send())
        return futures

    def _arm_watchdog(self, limit: float) -> None:
        """One periodic timer watches every deadline of the client (a dict scan of the
        requests in flight), instead of a timer per call: a call fails at most an
        eighth of its limit late."""
        if self._timer is not None:
            self._timer.cancel()
        self._period = min(1.0, max(0.01, limit / 8))
        self._timer = self._loop.call_later(self._period, self._watchdog)

    def _watchdog(self) -> None:
        self._timer = None
        deadlines = self._proto.deadlines
        if not deadlines:
            return
        now = _now()
        for deadline, limit in deadlines.values():
            if deadline <= now:
                deadlines.clear()
                self._proto.fail(NBDTimeout(f"no reply within {limit} s; connection closed"))
                return
        self._timer = self._loop.call_later(self._period, self._watchdog)

    # -- the API -----------------------------------------------------------------------

    async def pread_into(
        self, buf: Buffer, offset: int, *, df: bool = False, timeout: Timeout = DEFAULT
    ) -> None:
        """Read ``len(buf)`` bytes at ``offset`` into the caller's writable buffer."""
        view = self._single(buf)
        if view is not None:
            await self._await_one(
                self._submit_one(_READ, offset, 0, _DF if df else 0, timeout, None, view)
            )
            return
        ops = self._plan_read(buf, offset, df)
        if ops:
            await self._run(ops, timeout)

    async def pread(
        self, length: int, offset: int, *, df: bool = False, timeout: Timeout = DEFAULT
    ) -> bytes:
        """Read ``length`` bytes at ``offset`` and return them as a new ``bytes``.

        A reply that arrives whole is copied once out of the receive buffer; a bigger
        one is received into a buffer of its own, then copied once (a ``bytes`` cannot
        be received into): :meth:`pread_into` into a reused buffer is the fast path for
        large reads. Raises as :meth:`pread_into`.
        """
        if not 0 < length <= self._maxp:
            buf = bytearray(length)
            await self.pread_into(buf, offset, df=df, timeout=timeout)
            return bytes(buf)
        # pread_into's fast path, inline: the hot path of small random reads.
        fut = self._submit_one(_READ, offset, length, _DF if df else 0, timeout)
        if self._proto.paused:
            await self._proto.drain()
        reply = await fut
        if reply.error is not None or self._core.shutdown_requested:
            await self._finish(reply)
        assert reply.data is not None
        return reply.data

    async def pwrite(
        self, data: Buffer, offset: int, *, fua: bool = False, timeout: Timeout = DEFAULT
    ) -> None:
        """Write ``data`` at ``offset``; ``fua`` forces it to stable storage.

        The buffer must not change until the call returns.
        """
        view = self._single(data)
        if view is not None:
            await self._await_one(
                self._submit_one(Cmd.WRITE, offset, len(view), _FUA if fua else 0, timeout, view)
            )
            return
        ops = self._plan_write(data, offset, fua)
        if ops:
            await self._run(ops, timeout)

    async def flush(self, *, timeout: Timeout = DEFAULT) -> None:
        """Persist every write that has completed (NBD_CMD_FLUSH)."""
        await self._run(self._plan_flush(), timeout)

    async def trim(
        self, length: int, offset: int, *, fua: bool = False, timeout: Timeout = DEFAULT
    ) -> None:
        """Tell the server the range is no longer needed (NBD_CMD_TRIM)."""
        await self._run(
            self._plan_effect(Cmd.TRIM, offset, length, CmdFlag.FUA if fua else 0), timeout
        )

    async def zero(
        self,
        length: int,
        offset: int,
        *,
        fua: bool = False,
        no_hole: bool = False,
        fast: bool = False,
        timeout: Timeout = DEFAULT,
    ) -> None:
        """Write zeroes over the range (NBD_CMD_WRITE_ZEROES)."""
        flags = self._zero_flags(fua=fua, no_hole=no_hole, fast=fast)
        await self._run(self._plan_effect(Cmd.WRITE_ZEROES, offset, length, flags), timeout)

    async def cache(self, length: int, offset: int, *, timeout: Timeout = DEFAULT) -> None:
        """Ask the server to prefetch the range (NBD_CMD_CACHE)."""
        await self._run(self._plan_effect(Cmd.CACHE, offset, length), timeout)

    async def block_status(
        self,
        length: int,
        offset: int,
        context: str = BASE_ALLOCATION,
        *,
        req_one: bool = False,
        timeout: Timeout = DEFAULT,
    ) -> list[MappedExtent]:
        """The extents of one meta context over [offset, offset+length)."""
        result = await self.block_status_all(
            length, offset, contexts=(context,), req_one=req_one, timeout=timeout
        )
        return result[context]

    async def block_status_all(
        self,
        length: int,
        offset: int,
        *,
        contexts: tuple[str, ...] | None = None,
        req_one: bool = False,
        timeout: Timeout = DEFAULT,
    ) -> dict[str, list[MappedExtent]]:
        """The extents of several meta contexts (default: all negotiated), by name."""
        names = self._block_status_names(contexts)
        collect = ExtentCollector(offset, offset + length, names, req_one)
        while not collect.finished:
            start = collect.next_start()
            op = self._plan_block_status(start, collect.end, names, req_one)
            (reply,) = await self._run([op], timeout)
            collect.add(start, reply)
        return collect.extents


async def connect_multi_async(
    uri: str | NBDURI, connections: int, **kwargs: Any
) -> list[AsyncClient]:
    """Open ``connections`` clients to one export, which must advertise multi-conn.

    Raises:
        UnsupportedError: the server does not allow multi-conn (nothing stays open).
    """
    first = await AsyncClient.connect(uri, **kwargs)
    if connections > 1 and not first.can_multi_conn():
        await first.close()
        raise UnsupportedError("the server does not advertise NBD_FLAG_CAN_MULTI_CONN")
    results = await asyncio.gather(
        *(AsyncClient.connect(uri, **kwargs) for _ in range(connections - 1)),
        return_exceptions=True,
    )
    clients = [first, *(r for r in results if isinstance(r, AsyncClient))]
    for r in results:
        if isinstance(r, BaseException):
            for c in clients:
                await c.close()
            raise r
    return clients


__all__ = ["AsyncClient", "connect_multi_async"]
