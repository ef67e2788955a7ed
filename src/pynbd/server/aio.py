"""The asyncio NBD server: listeners, sessions, shutdown.

A :class:`Server` serves named exports over TCP and unix listeners (bound here, or
handed over already listening, as systemd socket activation does), or over any
connected stream socket (:meth:`Server.serve_socket`: one end of a ``socketpair``, an
inetd connection). Each connection is a :class:`~pynbd.server.session.Session`, an
``asyncio.BufferedProtocol`` over the sans-IO
:class:`~pynbd.proto.server.ServerConnection`: the core negotiates, validates every
request and builds every reply; the session moves bytes, runs backends and upgrades
to TLS on NBD_OPT_STARTTLS.

Shutdown (:meth:`Server.close`): listeners stop, every session stops reading (after
the payload of a request already under way), its in-flight requests finish and are
answered, then the connection is closed (the spec's "wait for inflight requests ...
prior to initiating a hard disconnect"). Sessions still busy after the grace period
are aborted.

Under exhaustion the server keeps serving: it takes no more connections than its
descriptor limit allows (:attr:`Server.connection_limit`; the next ones are refused
cleanly by their session), a connection that cannot get a thread is served in the
event loop, a request that cannot get a pool thread runs inline, and what asyncio
reports about the loop (a failed ``accept``) is logged at most once per kind and
interval (:data:`~pynbd.server.policy.limited_log`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import resource
import socket
import ssl
import stat
import sys
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeAlias

from ..proto.server import ServerConfig, TLSPolicy
from .backend import AnyBackend, AsyncBackend, Backend, Export
from .policy import Limits, limited_log
from .session import Session
from .tls import ServerTLSConfig, make_server_context

__all__ = ["Limits", "Server", "serve", "serve_socket"]

log = logging.getLogger("pynbd.server")

Exports: TypeAlias = AnyBackend | Export | Mapping[str, AnyBackend | Export]

#: create_unix_server takes ``cleanup_socket`` from 3.13 on.
_CLEANUP_ARG = sys.version_info >= (3, 13)
#: Descriptors per connection the connection limit counts on (its socket, and its
#: thread's waker), and those kept for the rest (listeners, backends' files, logs,
#: connections being refused).
_FDS_PER_CONNECTION = 2
_FD_RESERVE = 32


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
        tls: TLS credentials (a :class:`~pynbd.server.tls.ServerTLSConfig`) or a
            ready server :class:`ssl.SSLContext`; None: no TLS.
        tls_mode: :class:`~pynbd.proto.server.TLSPolicy`: REQUIRED (the default when
            ``tls`` is given: every option but STARTTLS and ABORT is refused with
            NBD_REP_ERR_TLS_REQD before TLS), OPTIONAL (clients choose) or NONE.

    Raises:
        ValueError: an export name or description over 4096 bytes, bad block sizes,
            an unknown default export, or a TLS mode without credentials.
        TLSError: the TLS credentials cannot be loaded.

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
        tls: ServerTLSConfig | ssl.SSLContext | None = None,
        tls_mode: TLSPolicy | None = None,
    ) -> None:
        self.exports = _normalize(exports)
        self.limits = limits or Limits()
        if tls_mode is None:
            tls_mode = TLSPolicy.NONE if tls is None else TLSPolicy.REQUIRED
        if tls is None and tls_mode is not TLSPolicy.NONE:
            raise ValueError(f"TLS mode {tls_mode.value} needs TLS credentials")
        #: The context sessions upgrade with (None: STARTTLS is refused).
        self.tls_context: ssl.SSLContext | None = None
        if tls_mode is not TLSPolicy.NONE:
            assert tls is not None  # checked above
            self.tls_context = tls if isinstance(tls, ssl.SSLContext) else make_server_context(tls)
        self.config = ServerConfig(
            {name: export.spec(name) for name, export in self.exports.items()},
            default_export=default_export,
            structured_replies=structured_replies,
            extended_headers=extended_headers,
            allow_list=allow_list,
            tls=tls_mode,
            max_option_length=self.limits.max_option_length,
            max_options=self.limits.max_options,
        )
        #: Connections served at once: ``Limits.max_connections``, or fewer if the
        #: descriptor limit allows fewer (None: no limit).
        self.connection_limit = _connection_limit(self.limits.max_connections)
        self.sessions: set[Session] = set()
        #: Connections over the limit, being refused (see Session).
        self.refusing: set[Session] = set()
        self._listeners: list[asyncio.Server] = []
        self._unix_paths: list[str] = []
        self._pool: ThreadPoolExecutor | None = None
        self._serial: dict[int, ThreadPoolExecutor] = {}  # one thread per backend
        self._closing = False
        self._closed: asyncio.Event | None = None

    # -- listening --------------------------------------------------------------------

    async def start(
        self,
        *,
        tcp: tuple[str, int] | None = None,
        unix: str | os.PathLike[str] | None = None,
        sockets: Iterable[socket.socket] = (),
    ) -> list[Any]:
        """Start listening; may be called again to add listeners.

        Args:
            tcp: ``(host, port)``. Every address of ``host`` is bound, except with port
                0, where the kernel picks a port for the first address only (so there
                is one port to report). A host of "" or None means all interfaces.
            unix: a unix socket path (a stale socket file there is replaced; the file
                is removed at :meth:`close`).
            sockets: listening stream sockets to accept on (systemd socket
                activation); the server takes them over.

        Returns:
            The addresses bound by this call (see :attr:`addresses`), in the order
            tcp, unix, sockets.

        Raises:
            OSError: an address cannot be bound.
        """
        loop = asyncio.get_running_loop()
        if self._closed is None:
            self._closed = asyncio.Event()
        _quiet_loop(loop)
        before = len(self._listeners)
        if tcp is not None:
            self._listeners.append(await self._listen_tcp(*tcp))
        if unix is not None:
            path = os.fspath(unix)
            listener = await loop.create_unix_server(self._session, path)
            self._listeners.append(listener)
            self._unix_paths.append(path)
        for sock in sockets:
            sock.setblocking(False)
            if sock.family == socket.AF_UNIX:
                # The socket file belongs to whoever made it (from 3.13 asyncio would
                # delete it at close unless told not to).
                extra: dict[str, Any] = {"cleanup_socket": False} if _CLEANUP_ARG else {}
                listener = await loop.create_unix_server(self._session, sock=sock, **extra)
            else:
                listener = await loop.create_server(self._session, sock=sock)
            self._listeners.append(listener)
        return [sock.getsockname() for lst in self._listeners[before:] for sock in lst.sockets]

    async def _listen_tcp(self, host: str | None, port: int) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        host = (host or "").strip("[]") or None
        if port != 0:
            return await loop.create_server(self._session, host, port, reuse_address=True)
        infos = await loop.getaddrinfo(host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        if not infos:  # pragma: no cover - getaddrinfo raises instead
            raise OSError(f"no address for {host!r}")
        family, type_, proto, _, address = infos[0]
        sock = socket.socket(family, type_, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and host is None:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(address)
            sock.listen(100)
            sock.setblocking(False)
            return await loop.create_server(self._session, sock=sock)
        except BaseException:
            sock.close()
            raise

    @property
    def addresses(self) -> list[Any]:
        """The bound addresses: (host, port, ...) tuples for TCP, paths for unix."""
        return [sock.getsockname() for lst in self._listeners for sock in lst.sockets]

    def _session(self) -> Session:
        return Session(self)

    async def serve_socket(self, sock: socket.socket) -> None:
        """Serve one connected stream socket until the client is done with it.

        The server takes the socket over (it is closed at the end).
        """
        loop = asyncio.get_running_loop()
        if self._closed is None:
            self._closed = asyncio.Event()
        _quiet_loop(loop)
        session = Session(self)
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
        sessions = [*self.sessions, *self.refusing]
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
        executors = [*self._serial.values(), *([self._pool] if self._pool else [])]
        self._pool, self._serial = None, {}
        if executors:
            # Backend calls of aborted sessions may still run in threads: give them
            # the grace period too, so the caller can close its backends afterwards.
            def shutdown() -> None:
                for executor in executors:
                    executor.shutdown(True, cancel_futures=True)

            try:
                await asyncio.wait_for(asyncio.to_thread(shutdown), grace)
            except TimeoutError:
                log.warning("backend calls still running after the grace period")
        if self._closed is not None:
            self._closed.set()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- for sessions -----------------------------------------------------------------

    @property
    def closing(self) -> bool:
        """:meth:`close` was called: no new connections are taken."""
        return self._closing

    def executor(self, backend: Backend) -> ThreadPoolExecutor:
        """Where ``backend``'s calls go when they do not run where their connection is
        read (see :mod:`pynbd.server.policy`): the server's thread pool
        (``Limits.threads``), or for a backend that takes one call at a time, a thread
        of its own, shared by its every export and connection. Call it in the event
        loop."""
        if not backend.capabilities.thread_safe:
            serial = self._serial.get(id(backend))
            if serial is None:
                serial = self._serial[id(backend)] = _Pool(1, thread_name_prefix="pynbd-serial")
            return serial
        if self._pool is None:
            self._pool = _Pool(self.limits.threads, thread_name_prefix="pynbd-server")
        return self._pool


class _Pool(ThreadPoolExecutor):
    """A thread pool that loses no call when it cannot start a thread.

    ``ThreadPoolExecutor.submit`` queues the call, then starts a thread for it; when
    the thread cannot be started it raises, and the call's future is lost, though the
    call may still run later. Here, while some thread runs, the call simply waits for
    it; with none, the call is cancelled (it will never run) before submit raises
    RuntimeError, so the caller may run it itself.
    """

    def _adjust_thread_count(self) -> None:
        try:
            super()._adjust_thread_count()
        except RuntimeError as exc:
            running = len(self._threads)
            if running:
                limited_log.warning(
                    "pool thread",
                    "cannot start another pool thread (%s): %d do the work",
                    exc,
                    running,
                )
                return
            while True:  # nothing would ever run what waits: cancel it
                try:
                    item = self._work_queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item.future.cancel()
            raise


def _connection_limit(configured: int | None) -> int | None:
    """``configured``, or fewer connections if RLIMIT_NOFILE allows fewer."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:  # pragma: no cover - Linux has /proc
        in_use = 16
    allowed = max(1, (soft - in_use - _FD_RESERVE) // _FDS_PER_CONNECTION)
    if configured is not None and configured <= allowed:
        return configured
    log.log(
        logging.DEBUG if configured is None else logging.INFO,
        "at most %d connections at once: the descriptor limit (RLIMIT_NOFILE) is %d%s",
        allowed,
        soft,
        "" if configured is None else f", not enough for max_connections {configured}",
    )
    return allowed


def _quiet_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Have what the loop reports (an error in a callback, a failed ``accept`` when
    descriptors run out: asyncio retries it, and may report it thousands of times a
    second) logged at most once per kind and interval, unless the loop's owner set a
    handler of its own."""
    if loop.get_exception_handler() is None:
        loop.set_exception_handler(_loop_exception)


def _loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    message = str(context.get("message") or "unhandled exception in the event loop")
    exc = context.get("exception")
    if message.startswith("socket.accept() out of system resource"):
        # (no traceback: the errno says it all, and asyncio retries in a second)
        limited_log.warning(message, "cannot accept a connection: %s", exc)
        return
    limited_log.log(logging.ERROR, message, "%s", message, exc_info=exc)


def _remove_socket_file(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
    except OSError:
        pass


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
