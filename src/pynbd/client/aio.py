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
import socket
from collections.abc import Iterable
from types import TracebackType
from typing import Any

from ..errors import ConnectionClosed, NBDTimeout, UnsupportedError
from ..proto.constants import BASE_ALLOCATION, Cmd, CmdFlag
from ..proto.handshake import Negotiated
from ..proto.limits import DEFAULT_LIMITS, ClientLimits
from ..proto.transmission import ClientTransmission, Reply
from ..transport.tls import TLSConfig
from ..transport.uri import NBDURI
from .aio_connection import AsyncConnection, negotiate_async, now
from .base import (
    DEFAULT,
    DEFAULT_TIMEOUT,
    Buffer,
    ClientBase,
    ConnectOptions,
    ExtentCollector,
    MappedExtent,
    Op,
    Timeout,
    resolve,
    submit_all,
    with_export_info,
)

_DF = int(CmdFlag.DF)
_READ = Cmd.READ
_FUA = int(CmdFlag.FUA)


class AsyncClient(ClientBase):
    """An asyncio NBD client connected to one export. Create with :meth:`connect`.

    Concurrent calls on one client pipeline on its connection. Arguments, getters and
    errors are those of the blocking :class:`~pynbd.client.sync.Client`; a call that
    exceeds its timeout raises NBDTimeout and closes the connection.
    """

    _core: ClientTransmission

    def __init__(self, conn: AsyncConnection, options: ConnectOptions) -> None:
        if conn.core is None:
            raise ValueError("the connection is not in transmission")
        self._conn = conn
        self._proto = conn.proto
        self.negotiated = conn.negotiated
        self.target = conn.target
        self.options = options
        self.timeout = options.timeout
        self._core = conn.core
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
        limits: ClientLimits = DEFAULT_LIMITS,
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
            limits=limits,
        )
        return cls(await AsyncConnection.open(target, options, sock=sock, timeout=timeout), options)

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
        info: bool = True,
        go: bool = False,
        timeout: float | None = DEFAULT_TIMEOUT,
        limits: ClientLimits = DEFAULT_LIMITS,
    ) -> Negotiated:
        """Negotiation mode, as :meth:`pynbd.client.sync.Client.negotiate`."""
        target, options = resolve(
            uri,
            host=host,
            port=port,
            path=path,
            export_name=export_name,
            tls=tls,
            timeout=timeout,
            limits=limits,
        )
        result = await negotiate_async(
            target,
            options,
            sock=sock,
            list_exports=list_exports,
            list_meta_contexts=list_meta_contexts,
            info=info,
            go=go,
            timeout=timeout,
        )
        return with_export_info(result)

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
        if self._timer is not None:
            self._timer.cancel()
        await self._conn.close(self.timeout)

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
            proto.deadlines[cookie] = (now() + limit, limit)
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
            entry = (now() + limit, limit)
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
        current = now()
        for deadline, limit in deadlines.values():
            if deadline <= current:
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

    async def pread_many(
        self, reads: Iterable[tuple[Buffer, int]], *, timeout: Timeout = DEFAULT
    ) -> None:
        """Read several ranges, pipelined: every request is sent before the first reply
        is awaited. ``reads`` holds (writable buffer, offset) pairs.

        Raises as :meth:`pread_into`, once every reply has come: the error of the first
        request that failed, whose ``request_offset`` tells which it was.
        """
        ops = self._plan_reads(reads)
        if ops:
            await self._run(ops, timeout)

    async def pwrite_many(
        self,
        writes: Iterable[tuple[Buffer, int]],
        *,
        fua: bool = False,
        timeout: Timeout = DEFAULT,
    ) -> None:
        """Write several ranges, pipelined: every request is sent before the first
        reply is awaited. ``writes`` holds (buffer, offset) pairs; the buffers must not
        change until the call returns.

        Raises as :meth:`pwrite`, once every reply has come: the error of the first
        request that failed, whose ``request_offset`` tells which it was.
        """
        ops = self._plan_writes(writes, fua)
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
