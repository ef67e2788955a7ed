"""The asyncio NBD server: listeners, one session per connection, request dispatch.

A :class:`Server` serves named exports over TCP and unix listeners, or over any
connected stream socket (:meth:`Server.serve_socket`, one end of a ``socketpair``).
Each connection is a :class:`_Session`, an ``asyncio.BufferedProtocol`` over the
sans-IO :class:`~pynbd.proto.server.ServerConnection`: the core negotiates, validates
every request and builds every reply; the session only moves bytes and runs backends.

Backends run according to their capabilities: inline in the event loop when cheap
(the memory backend), in a thread pool when blocking (the file backend, one call at a
time if not thread-safe), or awaited when async. Requests on a connection run
concurrently; reading pauses while ``Limits.max_in_flight`` requests are pending or
the transport's write buffer is full.

Shutdown (:meth:`Server.close`): listeners stop, every session stops reading, its
in-flight requests finish and are answered, then the connection is closed (the spec's
"wait for inflight requests ... prior to initiating a hard disconnect"). Sessions still
busy after the grace period are aborted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import sys
from collections.abc import Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeAlias

from ..errors import ProtocolError
from ..proto.constants import Cmd
from ..proto.server import (
    NEED_DATA,
    Disconnect,
    RequestReceived,
    ServerConfig,
    ServerConnection,
    StartTLS,
    TransmissionStarted,
)
from .backend import (
    AnyBackend,
    AsyncBackend,
    Backend,
    Export,
    Result,
    exception_to_nbd,
    run_request,
    run_request_async,
)

__all__ = ["Limits", "Server", "serve", "serve_socket"]

log = logging.getLogger("pynbd.server")

Exports: TypeAlias = AnyBackend | Export | Mapping[str, AnyBackend | Export]

#: From 3.12, ``writelines`` sends the buffers with one ``sendmsg`` and no copy.
_WRITELINES_SENDMSG = sys.version_info >= (3, 12)
#: Before that it joins them: replies up to this size are joined into one write, and
#: larger data is written apart from its header (a copy saved for a syscall).
_JOIN_LIMIT = 64 * 1024


@dataclass(frozen=True, slots=True)
class Limits:
    """Resource limits of a server.

    Attributes:
        handshake_timeout: seconds a client may take to reach transmission (None: no
            limit); the connection is closed after that.
        max_in_flight: requests per connection performed at once; reading pauses
            beyond (backpressure, and a bound on memory held by write payloads).
        max_connections: connections at once (None: no limit); more are closed at once.
        max_option_length: longest option data accepted in the handshake.
        threads: size of the thread pool for blocking backends (None: Python's default).
        buffer_size: receive buffer per connection.
    """

    handshake_timeout: float | None = 30.0
    max_in_flight: int = 64
    max_connections: int | None = None
    max_option_length: int = 64 * 1024
    threads: int | None = None
    buffer_size: int = 64 * 1024


def _normalize(exports: Exports) -> dict[str, Export]:
    if isinstance(exports, (Backend, AsyncBackend)):
        return {"": Export(exports)}
    if isinstance(exports, Export):
        return {"": exports}
    return {
        name: item if isinstance(item, Export) else Export(item) for name, item in exports.items()
    }


class Server:
    """An NBD server for one or more exports.

    Args:
        exports: a backend or an :class:`~pynbd.server.backend.Export` (served as the
            default export ""), or a mapping name -> backend or Export.
        default_export: the export the empty name selects (None: only an export
            named "").
        structured_replies, extended_headers: offer them to clients.
        allow_list: answer NBD_OPT_LIST.
        limits: resource limits.

    Raises:
        ValueError: an export name or description over 4096 bytes, bad block sizes,
            or an unknown default export.

    Use as ``async with Server(...) as server: await server.start(unix=path)``; leaving
    the block closes the server (see :meth:`close`).
    """

    def __init__(
        self,
        exports: Exports,
        *,
        default_export: str | None = None,
        structured_replies: bool = True,
        extended_headers: bool = True,
        allow_list: bool = True,
        limits: Limits | None = None,
    ) -> None:
        self.exports = _normalize(exports)
        self.limits = limits or Limits()
        self.config = ServerConfig(
            {name: export.spec(name) for name, export in self.exports.items()},
            default_export=default_export,
            structured_replies=structured_replies,
            extended_headers=extended_headers,
            allow_list=allow_list,
            max_option_length=self.limits.max_option_length,
        )
        self.sessions: set[_Session] = set()
        self._listeners: list[asyncio.Server] = []
        self._unix_paths: list[str] = []
        self._executor: ThreadPoolExecutor | None = None
        self._locks: dict[int, asyncio.Lock] = {}
        self._closing = False
        self._closed: asyncio.Event | None = None

    # -- listening --------------------------------------------------------------------

    async def start(
        self, *, tcp: tuple[str, int] | None = None, unix: str | os.PathLike[str] | None = None
    ) -> None:
        """Start listening on a TCP address (port 0: the kernel picks) and/or a unix
        socket path (a stale socket file there is replaced). May be called again to
        add listeners.

        Raises:
            OSError: the address cannot be bound.
        """
        loop = asyncio.get_running_loop()
        if self._closed is None:
            self._closed = asyncio.Event()
        if tcp is not None:
            host, port = tcp
            listener = await loop.create_server(self._session, host, port, reuse_address=True)
            self._listeners.append(listener)
        if unix is not None:
            path = os.fspath(unix)
            listener = await loop.create_unix_server(self._session, path)
            self._listeners.append(listener)
            self._unix_paths.append(path)

    @property
    def addresses(self) -> list[Any]:
        """The bound addresses: (host, port, ...) tuples for TCP, paths for unix."""
        return [sock.getsockname() for lst in self._listeners for sock in lst.sockets]

    def _session(self) -> _Session:
        return _Session(self)

    async def serve_socket(self, sock: socket.socket) -> None:
        """Serve one connected stream socket until the client is done with it.

        The server takes the socket over (it is closed at the end).
        """
        loop = asyncio.get_running_loop()
        if self._closed is None:
            self._closed = asyncio.Event()
        session = _Session(self)
        sock.setblocking(False)
        await loop.connect_accepted_socket(lambda: session, sock)
        await asyncio.shield(session.done)

    async def serve_forever(self) -> None:
        """Wait until :meth:`close` is called (listeners serve in the background)."""
        if self._closed is None:
            self._closed = asyncio.Event()
        await self._closed.wait()

    # -- shutdown ---------------------------------------------------------------------

    async def close(self, grace: float | None = 10.0) -> None:
        """Stop listening, let in-flight requests finish and answer them, then close
        every connection; sessions still busy after ``grace`` seconds are aborted."""
        if self._closing:
            if self._closed is not None:
                await self._closed.wait()
            return
        self._closing = True
        for listener in self._listeners:
            listener.close()
        sessions = list(self.sessions)
        for session in sessions:
            session.shutdown()
        pending = [s.done for s in sessions if not s.done.done()]
        if pending:
            _, late = await asyncio.wait(pending, timeout=grace)
            for session in sessions:
                if not session.done.done():
                    session.abort("the server's shutdown grace period ended")
            if late:
                await asyncio.wait(late, timeout=1.0)
        for listener in self._listeners:
            await listener.wait_closed()
        for path in self._unix_paths:
            _remove_socket_file(path)
        if self._executor is not None:
            # Backend calls of aborted sessions may still run in threads: give them
            # the grace period too, so the caller can close its backends afterwards.
            executor, self._executor = self._executor, None
            waiting = asyncio.to_thread(executor.shutdown, True, cancel_futures=True)
            try:
                await asyncio.wait_for(waiting, grace)
            except TimeoutError:
                log.warning("backend calls still running after the grace period")
        if self._closed is not None:
            self._closed.set()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- resources for sessions -------------------------------------------------------

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                self.limits.threads, thread_name_prefix="pynbd-server"
            )
        return self._executor

    def _lock(self, backend: Backend) -> asyncio.Lock | None:
        if backend.capabilities.thread_safe:
            return None
        return self._locks.setdefault(id(backend), asyncio.Lock())


def _remove_socket_file(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
    except OSError:
        pass


class _Session(asyncio.BufferedProtocol):
    """One client connection."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.core = ServerConnection(server.config, buffer_size=server.limits.buffer_size)
        self.transport: asyncio.Transport | None = None
        self.export: Export | None = None
        self.peer = "?"
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tasks: set[asyncio.Task[None]] = set()
        self._paused: set[str] = set()
        self._ending: Disconnect | None = None
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio callbacks ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peer = str(transport.get_extra_info("peername") or "socket")
        limit = self.server.limits.max_connections
        if self.server._closing or (limit is not None and len(self.server.sessions) >= limit):
            log.warning("refusing connection from %s: too many connections", self.peer)
            transport.abort()
            return
        self.server.sessions.add(self)
        timeout = self.server.limits.handshake_timeout
        if timeout is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(timeout, self.abort, "handshake took too long")
        log.debug("connection from %s", self.peer)
        self._flush()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.core.receive_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        try:
            self.core.buffer_updated(nbytes)
        except ProtocolError as exc:
            self.abort(f"protocol error: {exc}")
            return
        self._process()

    def eof_received(self) -> bool:
        try:
            self.core.buffer_updated(0)
        except ProtocolError as exc:
            self.abort(f"protocol error: {exc}")
            return False
        self._process()
        # Keep the transport: in-flight replies still go out to a half-closed client.
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for task in self._tasks:
            task.cancel()
        self.server.sessions.discard(self)
        if not self.done.done():
            self.done.set_result(None)
        log.debug("connection from %s closed", self.peer)

    def pause_writing(self) -> None:
        self._pause("writing")

    def resume_writing(self) -> None:
        self._resume("writing")

    # -- the session ------------------------------------------------------------------

    def shutdown(self) -> None:
        """The server is closing: take no more requests, finish in-flight ones, close."""
        self.core.shutdown()
        if self._ending is None:
            self._ending = Disconnect("the server is shutting down", soft=False)
        self._pause("ending")
        self._maybe_close()

    def abort(self, reason: str) -> None:
        """Hard disconnect now."""
        log.info("closing connection from %s: %s", self.peer, reason)
        self._ending = self._ending or Disconnect(reason, soft=False)
        if self.transport is not None:
            self.transport.abort()

    def _pause(self, reason: str) -> None:
        if not self._paused and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        self._paused.add(reason)

    def _resume(self, reason: str) -> None:
        self._paused.discard(reason)
        if not self._paused and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def _process(self) -> None:
        """Handle every event the core has for us, then send what it queued."""
        try:
            # Requests parsed before a Disconnect or a shutdown are still performed.
            while True:
                event = self.core.next_event()
                if event is NEED_DATA:
                    break
                if isinstance(event, RequestReceived):
                    self._dispatch(event)
                elif isinstance(event, TransmissionStarted):
                    self._started(event)
                elif isinstance(event, Disconnect):
                    log.debug("%s: %s", self.peer, event.reason)
                    self._ending = self._ending or event
                    self._pause("ending")
                    break  # the last event of a session
                elif isinstance(event, StartTLS):  # pragma: no cover - TLS not configured
                    self.abort("TLS is not implemented by this server")
                    return
        except ProtocolError as exc:
            self.abort(f"protocol error: {exc}")
            return
        self._flush()
        self._maybe_close()

    def _started(self, event: TransmissionStarted) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.export = self.server.exports[event.export.name]
        log.debug("%s: serving export %r", self.peer, event.export.name)

    def _flush(self) -> None:
        buffers = self.core.buffers_to_send()
        transport = self.transport
        if not buffers or transport is None or transport.is_closing():
            return
        if len(buffers) == 1:
            transport.write(buffers[0])
        elif _WRITELINES_SENDMSG:
            transport.writelines(buffers)
        elif sum(len(b) for b in buffers) <= _JOIN_LIMIT:
            transport.write(b"".join(buffers))
        else:
            for buffer in buffers:
                transport.write(buffer)

    def _maybe_close(self) -> None:
        if self._ending is None or self.core.in_flight or self._tasks:
            return
        if self._timer is not None:
            self._timer.cancel()
        if self.transport is not None and not self.transport.is_closing():
            self._flush()
            # close() sends what is buffered first; a soft or hard disconnect alike.
            self.transport.close()

    # -- requests ---------------------------------------------------------------------

    def _dispatch(self, request: RequestReceived) -> None:
        assert self.export is not None  # requests only come after TransmissionStarted
        backend = self.export.backend
        if isinstance(backend, AsyncBackend):
            self._spawn(self._run_async(backend, request))
        elif backend.capabilities.inline:
            try:
                result = run_request(backend, request)
            except Exception as exc:
                self._answer_failure(request, exc)
            else:
                self._answer(request, result)
        else:
            self._spawn(self._run_blocking(backend, request))
        if self.core.in_flight >= self.server.limits.max_in_flight:
            self._pause("in flight")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.abort(f"internal error: {task.exception()!r}")
            return
        self._flush()
        if self.core.in_flight < self.server.limits.max_in_flight:
            self._resume("in flight")
        self._maybe_close()

    async def _run_blocking(self, backend: Backend, request: RequestReceived) -> None:
        loop = asyncio.get_running_loop()
        pool = self.server._pool()
        lock = self.server._lock(backend)
        try:
            if lock is None:
                result = await loop.run_in_executor(pool, run_request, backend, request)
            else:
                async with lock:
                    result = await loop.run_in_executor(pool, run_request, backend, request)
        except Exception as exc:
            self._answer_failure(request, exc)
        else:
            self._answer(request, result)

    async def _run_async(self, backend: AsyncBackend, request: RequestReceived) -> None:
        try:
            result = await run_request_async(backend, request)
        except Exception as exc:
            self._answer_failure(request, exc)
        else:
            self._answer(request, result)

    def _answer(self, request: RequestReceived, result: Result) -> None:
        command = request.command
        if command is Cmd.READ:
            assert isinstance(result, bytearray)
            self.core.reply_read(request, result)
        elif command is Cmd.BLOCK_STATUS:
            assert isinstance(result, list)
            self.core.reply_block_status(request, dict.fromkeys(request.contexts, result))
        else:
            self.core.reply_ok(request)

    def _answer_failure(self, request: RequestReceived, exc: Exception) -> None:
        error, message = exception_to_nbd(exc)
        if isinstance(exc, OSError):
            log.debug("%s: NBD_CMD_%s failed: %s", self.peer, request.command.name, exc)
        else:
            log.error("%s: NBD_CMD_%s: backend bug", self.peer, request.command.name, exc_info=exc)
        self.core.reply_error(request, error, message)


async def serve(
    exports: Exports,
    *,
    tcp: tuple[str, int] | None = None,
    unix: str | os.PathLike[str] | None = None,
    **options: Any,
) -> Server:
    """Create a :class:`Server` and start its listeners; returns it, serving.

    ``options`` are :class:`Server`'s keyword arguments. Close it with
    :meth:`Server.close` (or ``async with``).
    """
    if tcp is None and unix is None:
        raise ValueError("give tcp=(host, port) and/or unix=PATH")
    server = Server(exports, **options)
    await server.start(tcp=tcp, unix=unix)
    return server


async def serve_socket(sock: socket.socket, exports: Exports, **options: Any) -> None:
    """Serve one connected stream socket (one end of a socketpair, an accepted
    connection) until the client disconnects; ``options`` as for :class:`Server`."""
    server = Server(exports, **options)
    try:
        await server.serve_socket(sock)
    finally:
        await server.close()
