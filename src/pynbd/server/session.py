"""One server connection: an ``asyncio.BufferedProtocol`` over the sans-IO core.

A :class:`Session` moves bytes between its transport and a
:class:`~pynbd.proto.server.ServerConnection`, which negotiates, validates every
request and builds every reply; the session runs backends and upgrades the transport
to TLS when the core says so (:class:`~pynbd.proto.server.StartTLS`).

When the connection enters transmission, the session draws its plan from what the
export's backend declares (:mod:`pynbd.server.policy`): a
:class:`~pynbd.server.runner.Runner` performs its requests as the plan says, and a
:class:`~pynbd.server.responder.Responder` answers them. A plain (not TLS) connection
to a thread-safe :class:`~pynbd.server.backend.Backend` is handed over, socket and
core, to a :class:`~pynbd.server.conn_thread.ConnectionThread` when its first request
arrives (until then it is *parked*: the event loop watches it, and an idle connection
costs no thread), and the session keeps only the paused transport, to close it when
the thread is done, or to watch it again when the thread hands it back idle. When no
thread can be had (no descriptor for its waker, no thread), the event loop serves the
connection itself. What follows describes the connections the event loop serves.

Requests on a connection run concurrently; reading pauses while
``Limits.max_in_flight`` requests, or ``Limits.max_in_flight_bytes`` bytes, are in
flight (requests already parsed wait in the core), the transport's write buffer is
full, or the TLS handshake runs.

Limits on connections (:class:`~pynbd.server.policy.Limits`): past the server's
connection limit a new connection is refused cleanly: the greeting, then
NBD_REP_ERR_SHUTDOWN "too many connections (limit N)" to each option (at most
``_REFUSING_MAX`` such refusals at once; beyond, connections are closed at once).
``Limits.handshake_timeout`` closes a connection that takes too long to reach
transmission, and ``Limits.idle_timeout`` one idle in transmission.

Flow control: while the transport's write buffer is above its high-water mark no
request is started (requests already parsed wait in the core), so replies are made
only as fast as the client takes them. Without TLS, replies go out with one
``writev`` of header and data straight to the socket while the transport has nothing
buffered (what the transport's own ``write`` does, minus its copy of a partial send on
Python 3.11); only a remainder is handed to the transport.

Per-request costs of bulk transfers: WRITE payloads and READ reply buffers come from a
per-connection :class:`~pynbd.proto.server.BufferPool`; a zero-copy backend's READs
are sent from views of its memory; and the bytes a client has already sent are read
straight from the socket in the same pass of the event loop, a payload into its own
buffer, with the replies of the burst sent in one ``writev``.

When the connection ends, one line is logged at INFO on ``pynbd.server``: the peer,
the export, what was negotiated, and the requests and bytes served.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import select
import socket
import ssl
import struct
import sys
import time
from collections.abc import Coroutine, Mapping
from concurrent.futures import Executor
from typing import Any, Protocol

from ..errors import ProtocolError
from ..proto.server import (
    NEED_DATA,
    Disconnect,
    RequestReceived,
    ServerConfig,
    ServerConnection,
    StartTLS,
    TransmissionStarted,
)
from .backend import Backend, Export
from .conn_thread import PARK_AFTER, ConnectionThread
from .policy import Limits, Plan, limited_log, plan
from .responder import IOV_MAX, Pending, Responder, SessionStats, SharedPool, written
from .runner import Runner

__all__ = ["Host", "Session", "SessionStats"]

log = logging.getLogger("pynbd.server")

#: From 3.12 the transport keeps the buffers it is given (3.11 copies them).
_TRANSPORT_KEEPS = sys.version_info >= (3, 12)
#: From 3.12, ``writelines`` sends the buffers with one ``sendmsg`` and no copy. Before
#: 3.12.9 and 3.13.2 it never paused the protocol at the high-water mark (CPython
#: gh-127655), which is this server's flow control: there, as on 3.11, ``write`` is
#: used instead.
_WRITELINES = sys.version_info >= (3, 13, 2) or (3, 12, 9) <= sys.version_info < (3, 13)
#: Without writelines, replies up to this size are joined into one write, and larger
#: data is written apart from its header (a copy saved for a syscall).
_JOIN_LIMIT = 64 * 1024
#: Seconds a closing TLS connection waits for the client's close_notify.
_TLS_SHUTDOWN_TIMEOUT = 5.0
_UCRED = struct.Struct("3i")
#: poll's flag for a peer that closed its end (Linux).
_POLLRDHUP: int | None = getattr(select, "POLLRDHUP", None)
#: The transport's write buffer above which no request is started (the low mark,
#: where they start again, is a quarter of it).
_WRITE_HIGH = 1024 * 1024
#: The socket's send buffer (the kernel caps it at net.core.wmem_max). The default
#: (about 200 KiB) takes a fraction of a big READ reply per send: the rest would wait in
#: the transport's buffer, copied there (and shifted as it drains) on Python 3.11, and
#: go out over several loop iterations. nbdkit's threads simply block in send instead.
_SNDBUF = 4 * 1024 * 1024
#: Most bytes one pass of the event loop reads for a session beyond the transport's
#: own read (see Session._read_more).
_BURST = 1024 * 1024
#: Connections over the limit that may be refused cleanly at once (each holds a
#: descriptor until its client reads the refusal, or the handshake timeout); the
#: next ones are closed at once.
_REFUSING_MAX = 16


class Host(Protocol):
    """What a session needs of its server (:class:`~pynbd.server.aio.Server` is one)."""

    @property
    def config(self) -> ServerConfig: ...

    @property
    def limits(self) -> Limits: ...

    @property
    def exports(self) -> Mapping[str, Export]: ...

    @property
    def sessions(self) -> set[Session]:
        """The live sessions: a session adds itself, and leaves when it ends."""
        ...

    @property
    def refusing(self) -> set[Session]:
        """The sessions of connections over the limit, being refused (not counted in
        :attr:`sessions`)."""
        ...

    @property
    def connection_limit(self) -> int | None:
        """Connections served at once (``Limits.max_connections``, or fewer if the
        descriptor limit allows fewer); None: no limit."""
        ...

    @property
    def tls_context(self) -> ssl.SSLContext | None: ...

    @property
    def closing(self) -> bool:
        """The server is shutting down: no new connections."""
        ...

    def executor(self, backend: Backend) -> Executor:
        """Where ``backend``'s calls go when they do not run inline. Its ``submit``
        raises RuntimeError only for a call that will never run (no thread)."""
        ...


class Session(asyncio.BufferedProtocol):
    """One client connection of a :class:`~pynbd.server.aio.Server`."""

    def __init__(self, server: Host) -> None:
        self.server = server
        self._loop = asyncio.get_running_loop()
        # WRITE payloads and READ replies of bulk sizes, reused (see responder).
        self._pool = SharedPool()
        self.core = ServerConnection(
            server.config, buffer_size=server.limits.buffer_size, pool=self._pool
        )
        self.transport: asyncio.Transport | None = None
        self.export: Export | None = None
        self.export_name: str | None = None
        self.peer = "?"
        self.tls: str | None = None  # the TLS version once upgraded
        self.stats = SessionStats()
        self.done: asyncio.Future[None] = self._loop.create_future()
        limits = server.limits
        self._max_in_flight = limits.max_in_flight
        self._max_bytes = limits.max_in_flight_bytes
        self._idle_timeout = limits.idle_timeout
        self._idle_timer: asyncio.TimerHandle | None = None
        # (loop time) the last byte received, backend call done or reply taken
        self._last_active = 0.0
        self._idle_unsent = 0  # the transport's write buffer at the last idle check
        self._tasks: set[asyncio.Future[Any]] = set()
        self._paused: set[str] = set()
        self._write_paused = False
        # In transmission: how requests run, what runs them, what answers them.
        self._plan = Plan()
        self._runner: Runner | None = None
        self._responder: Responder | None = None
        self._offered = 0  # the size of the last receive buffer given to the transport
        # The socket's descriptor for direct writes (-1: go through the transport).
        self._fd = -1
        self._ending: Disconnect | None = None
        self._timer: asyncio.TimerHandle | None = None
        # Once in transmission, a plain connection may be served from a thread.
        self._thread: ConnectionThread | None = None
        # While the TLS handshake runs, decrypted bytes may arrive before the core
        # knows TLS is up: they wait here (see _upgrade).
        self._upgrading = False
        self._early = bytearray()
        self._early_buf = bytearray(16 * 1024)

    # -- asyncio callbacks ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peer = _describe_peer(transport)
        server = self.server
        if server.closing:
            log.debug("%s: connection closed: the server is shutting down", self.peer)
            transport.abort()
            return
        limit = server.connection_limit
        if limit is not None and _connections(server) >= limit:
            self._refuse(limit)
            return
        server.sessions.add(self)
        transport.set_write_buffer_limits(high=_WRITE_HIGH)
        sock = transport.get_extra_info("socket")
        if sock is not None and transport.get_extra_info("sslcontext") is None:
            self._fd = sock.fileno()
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF)
        timeout = self.server.limits.handshake_timeout
        if timeout is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(timeout, self.abort, "handshake took too long")
        log.debug("%s: connected", self.peer)
        self.send()

    def _refuse(self, limit: int) -> None:
        """Refuse a connection over the limit: the greeting, then NBD_REP_ERR_SHUTDOWN
        and why to every option (until the client gives up, or the handshake timeout)."""
        assert self.transport is not None
        reason = f"too many connections (limit {limit})"
        refusing = self.server.refusing
        if len(refusing) >= _REFUSING_MAX:
            limited_log.warning(
                "closed at once",
                "%s: connection closed at once: %s, and %d refusals under way",
                self.peer,
                reason,
                len(refusing),
            )
            self.transport.abort()
            return
        limited_log.warning("refused", "%s: connection refused: %s", self.peer, reason)
        refusing.add(self)
        self.core.shutdown(reason)
        timeout = self.server.limits.handshake_timeout
        if timeout is not None:
            self._timer = self._loop.call_later(timeout, self.abort, "handshake took too long")
        self.send()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._upgrading:
            return memoryview(self._early_buf)
        buf = self.core.receive_buffer()
        self._offered = len(buf)
        return buf

    def buffer_updated(self, nbytes: int) -> None:
        if self._upgrading:
            self._early += self._early_buf[:nbytes]
            return
        try:
            self.core.buffer_updated(nbytes)
        except ProtocolError as exc:
            self.abort(f"protocol error: {exc}")
            return
        if self._idle_timeout is not None:
            self._last_active = self._loop.time()
        if self._plan.threaded:  # parked: a request is coming, for the thread
            self._pause("thread")
            self._hand_over()
            return
        if self._fd < 0:
            self._process()
            return
        # The replies of the whole burst go out together (one writev, not one each).
        self._process(flush=False)
        self._read_more(nbytes == self._offered)
        self.send()

    def _read_more(self, full: bool) -> None:
        """Take what the client has already sent, straight from the socket.

        Each ``recv`` of the transport is a pass of the event loop (``epoll_wait``, the
        callbacks) and takes at most one receive buffer, so a WRITE bigger than the
        buffer would take several passes.
        Here the bytes already in the socket are read at once, a payload into its own
        buffer, up to ``_BURST`` bytes (the other connections get their turn) and only
        while the session takes requests. It tries only while a payload is coming
        or the last read filled its buffer (``full``): a read that found the socket
        drained (a small request at depth 1) would cost a failed ``recv`` per request.
        End of stream and errors are left for the transport's next read to find (as
        end of stream, or the error again).
        """
        core, fd = self.core, self._fd
        budget = _BURST
        while full or core.receiving_payload:
            # (parked: what comes is the connection thread's to read)
            if budget <= 0 or self._paused or self._plan.threaded or self.transport_closed:
                return
            bufs = core.receive_buffers()
            try:
                n = os.readv(fd, bufs)
            except OSError:  # EAGAIN: nothing more yet; or the peer failed
                return
            if not n:
                return
            budget -= n
            try:
                core.buffer_updated(n)
            except ProtocolError as exc:
                self.abort(f"protocol error: {exc}")
                return
            if core.events_pending:
                self._process(flush=False)
            # (full matters only once no payload is coming)
            full = not core.receiving_payload and n == sum(map(len, bufs))

    def eof_received(self) -> bool:
        if self._plan.threaded:  # parked: no thread just to see the client go
            self._serve_in_loop()
        try:
            self.core.buffer_updated(0)
        except ProtocolError as exc:
            self.abort(f"protocol error: {exc}")
            return False
        self._process()
        # Keep the transport: in-flight replies still go out to a half-closed client.
        # TLS has no half-close (asyncio warns when asked to keep one open).
        return self.tls is None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if self._responder is not None and self._thread is None:  # (else the thread's)
            self._responder.views_sent()  # what was not sent never will be
        for task in self._tasks:
            task.cancel()
        self.server.refusing.discard(self)
        if self in self.server.sessions:
            self.server.sessions.discard(self)
            self._log_end()
        if not self.done.done():
            self.done.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True
        self._pause("writing")

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._idle_timeout is not None:
            self._last_active = self._loop.time()  # the client read its replies
        self._resume("writing")
        if self.core.events_pending:
            self._process()  # the requests that waited for the client to read

    # -- the session ------------------------------------------------------------------

    def shutdown(self) -> None:
        """The server is closing: take no more requests, finish in-flight ones, close.

        A request whose payload is still arriving is received and performed first.
        """
        if self._thread is not None:
            self._thread.shutdown()
            return
        self.core.shutdown()
        if self._upgrading:
            self.abort("the server is shutting down")  # in the middle of a TLS handshake
            return
        if self._ending is None:
            self._ending = Disconnect("the server is shutting down", soft=False)
        if not self.core.receiving_payload:
            self._pause("ending")
        self._maybe_close()

    def abort(self, reason: str) -> None:
        """Hard disconnect now (the reason goes into the connection's log line)."""
        if self._thread is not None:
            self._thread.abort(reason)
            return
        log.debug("%s: closing the connection: %s", self.peer, reason)
        if self._ending is not None and not self.transport_closed:
            reason = f"{self._ending.reason}, then {reason}"  # a shutdown cut short
        if self._ending is None or not self.transport_closed:
            self._ending = Disconnect(reason, soft=False)
        if self.transport is not None:
            self.transport.abort()

    @property
    def transport_closed(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def _pause(self, reason: str) -> None:
        transport = self._reading_transport()
        if not self._paused and transport is not None:
            transport.pause_reading()
        self._paused.add(reason)

    def _resume(self, reason: str) -> None:
        self._paused.discard(reason)
        transport = self._reading_transport()
        if not self._paused and transport is not None:
            transport.resume_reading()

    def _reading_transport(self) -> asyncio.Transport | None:
        # During the TLS handshake the old transport belongs to asyncio's TLS layer:
        # pausing it would stall the handshake. _upgrade applies the state afterwards.
        transport = self.transport
        if transport is None or transport.is_closing() or self._upgrading:
            return None
        return transport

    def _process(self, *, flush: bool = True) -> None:
        """Handle every event the core has for us, then send what it queued (unless
        the caller sends it later)."""
        try:
            # Requests parsed before a Disconnect or a shutdown are still performed.
            # None is started while the client does not read its replies.
            core = self.core
            # (nothing more once the connection is the thread's: see _hand_over)
            while not self._write_paused and not self._plan.threaded and not self._full():
                event = core.next_event()
                if event is NEED_DATA:
                    break
                if type(event) is RequestReceived:
                    self._dispatch(event)
                elif isinstance(event, TransmissionStarted):
                    self._started(event)
                    if self._plan.threaded:
                        if core.events_pending or core.receiving_payload:
                            # Requests came with the handshake: the thread's, once
                            # this pass is over.
                            self._pause("thread")
                            self._loop.call_soon(self._hand_over)
                        break  # (else parked: the first request starts the thread)
                elif isinstance(event, Disconnect):
                    log.debug("%s: %s", self.peer, event.reason)
                    self._ending = self._ending or event
                    self._pause("ending")
                    break  # the last event of a session
                elif isinstance(event, StartTLS):
                    self._start_tls()
                    break  # nothing more until the TLS handshake is done
        except ProtocolError as exc:
            self.abort(f"protocol error: {exc}")
            return
        if self._ending is not None and not self.core.receiving_payload:
            self._pause("ending")  # a shutdown that waited for a payload
        if flush:
            self.send()
        self._maybe_close()

    def _started(self, event: TransmissionStarted) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._idle_timeout is not None:
            self._last_active = self._loop.time()
            self._idle_timer = self._loop.call_later(self._idle_timeout, self._idle_check)
        self.export_name = event.export.name
        self.export = export = self.server.exports[event.export.name]
        tx = self.core.transmission
        assert tx is not None
        backend = export.backend
        self._plan = plan(backend, self.server.limits, plain=self._fd >= 0)
        lender = None
        if self._plan.zero_copy:
            assert isinstance(backend, Backend)
            lender = backend
            # Writes may be received into the backend's own buffers (see Runner).
            tx.payload_sink = backend.receive_pages
        self._responder = Responder(tx, self._pool, self.stats, self.peer, lender)
        if not self._plan.threaded:
            self._serve_here()
        log.debug("%s: serving export %r", self.peer, event.export.name)

    def _executor(self) -> Executor | None:
        """The executor of the export's backend, if the plan hands calls off to one."""
        backend = self.export.backend if self.export is not None else None
        if not self._plan.offloads or not isinstance(backend, Backend):
            return None
        return self.server.executor(backend)

    def _serve_here(self) -> None:
        """The event loop runs the connection's requests."""
        assert self.export is not None and self._responder is not None
        executor = self._executor()
        submit = None
        if executor is not None:
            submit = functools.partial(self._loop.run_in_executor, executor)
        self._runner = Runner(self.export.backend, self._plan, self._responder, self, submit)

    def _serve_in_loop(self) -> None:
        """A connection planned for a thread is served by the event loop after all."""
        self._plan = dataclasses.replace(self._plan, threaded=False)
        self._serve_here()

    def _full(self) -> bool:
        """As many requests, or bytes, in flight as the limits allow (reading is paused
        then: see _dispatch)."""
        return "in flight" in self._paused

    # -- the connection's thread ------------------------------------------------------

    def _hand_over(self) -> None:
        """Give the connection to a :class:`ConnectionThread` (reading is paused)."""
        transport = self.transport
        if transport is None or transport.is_closing() or self._thread is not None:
            return
        assert self.export is not None and self._responder is not None
        if self._ending is not None or transport.get_write_buffer_size():
            # A shutdown under way, or the handshake's last replies still in the
            # transport (a client that does not read them): the loop keeps it.
            self._keep_in_loop()
            return
        backend = self.export.backend
        assert isinstance(backend, Backend)  # (the plan's promise)
        idle = self._idle_timeout
        try:
            thread = ConnectionThread(
                self.core,
                self._responder,
                backend,
                self._plan,
                self._executor(),
                transport.get_extra_info("socket"),
                max_in_flight=self._max_in_flight,
                max_in_flight_bytes=self._max_bytes,
                ending=self._ending,
                ended=self.thread_ended,
                parked=self.thread_parked,
                park_after=PARK_AFTER if idle is None else min(idle, PARK_AFTER),
                idle_timeout=idle,
            )
            thread.start()
        except (OSError, RuntimeError) as exc:  # no descriptor, or no thread, for it
            limited_log.warning(
                "no connection thread",
                "%s: cannot start a connection thread (%s): serving it in the event loop",
                self.peer,
                exc,
            )
            self._keep_in_loop()
            return
        self._thread = thread

    def _keep_in_loop(self) -> None:
        self._serve_in_loop()
        self._resume("thread")
        self._process()

    def thread_parked(self, idle: float) -> None:
        """The connection's thread handed it back, idle for ``idle`` seconds: watch it
        again (in the event loop); its next request starts a thread again."""
        thread, self._thread = self._thread, None
        assert thread is not None
        self._pool.clear()  # an idle connection keeps no buffers
        self._last_active = self._loop.time() - idle
        if thread.aborted is not None:
            self.abort(thread.aborted)
            return
        if self.transport_closed:
            return
        self._resume("thread")
        if thread.stopping:
            self.shutdown()
        elif self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_check()  # idle long enough already?

    def thread_ended(self, hard: bool, ending: Disconnect | None) -> None:
        """The connection's thread is done: close the transport (in the event loop)."""
        self._ending = ending
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if hard:
                transport.abort()
            else:
                transport.close()

    @property
    def threaded(self) -> bool:
        """The connection is served from a thread of its own."""
        return self._thread is not None

    def client_gone(self) -> bool:
        """The client has closed its end of the connection (the session may still be
        finishing: a connection thread tells the event loop a moment later)."""
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sock is None or _POLLRDHUP is None:
            return False
        poller = select.poll()
        poller.register(sock.fileno(), _POLLRDHUP)
        return bool(poller.poll(0))

    # -- TLS --------------------------------------------------------------------------

    def _start_tls(self) -> None:
        context = self.server.tls_context
        if context is None:  # pragma: no cover - the core refuses STARTTLS without TLS
            self.abort("TLS is not configured")
            return
        self.send()  # the ACK of STARTTLS goes out in plaintext, first
        self._fd = -1  # from now on every byte goes through the TLS transport
        self._pause("tls")
        self._upgrading = True
        self._spawn(self._upgrade(context))

    async def _upgrade(self, context: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        old = self.transport
        assert old is not None
        timeout = self.server.limits.handshake_timeout
        try:
            new = await loop.start_tls(
                old,
                self,
                context,
                server_side=True,
                ssl_handshake_timeout=timeout or 60.0,
                ssl_shutdown_timeout=_TLS_SHUTDOWN_TIMEOUT,
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            # asyncio tells the protocol nothing when the handshake fails.
            self._upgrading = False
            self.abort(f"TLS handshake failed: {_tls_reason(exc)}")
            self.connection_lost(None)
            return
        if new is None:  # the connection was closed (aborted) during the handshake
            self._upgrading = False
            self.connection_lost(None)
            return
        self.transport = new
        ssl_object = new.get_extra_info("ssl_object")
        self.tls = ssl_object.version() if ssl_object is not None else "TLS"
        self._upgrading = False
        # Whatever arrived while the handshake ended is the next option, under TLS.
        early, self._early = bytes(self._early), bytearray()
        try:
            self.core.tls_established()
            if early:
                self.core.receive_data(early)
        except ProtocolError as exc:
            self.abort(f"protocol error: {exc}")
            return
        log.debug("%s: TLS established (%s)", self.peer, self.tls)
        # The new transport reads already; bring it in line with the session's state.
        self._paused.discard("tls")
        if self._paused:
            new.pause_reading()
        self._process()

    # -- sending ----------------------------------------------------------------------

    def send(self) -> None:
        """Send what the core has queued (also the runner's driver's send)."""
        responder = self._responder
        buffers = self.core.buffers_to_send()
        if responder is not None:
            responder.unsent = 0
        transport = self.transport
        if not buffers or transport is None or transport.is_closing():
            return
        if self._fd >= 0 and not transport.get_write_buffer_size():
            # READ data sent whole goes back to the pool; what the transport takes
            # it may keep a view of (3.12+, TLS), so that is left to the collector.
            buffers = written(self._pool, buffers, self._send_direct(buffers))
            if not buffers:
                if responder is not None:
                    responder.views_sent()
                return
        views = responder is not None and responder.lent
        if views and _TRANSPORT_KEEPS:
            # From 3.12 the transport keeps what it is given (3.11 copies it): a view
            # of the backend's memory must not show a later write: it gets a copy.
            buffers = [bytes(b) if type(b) is memoryview else b for b in buffers]
        if len(buffers) == 1:
            transport.write(buffers[0])
        elif _WRITELINES:
            transport.writelines(buffers)
        elif sum(len(b) for b in buffers) <= _JOIN_LIMIT:
            transport.write(b"".join(buffers))
        else:
            for buffer in buffers:
                transport.write(buffer)
        if views:
            assert responder is not None
            responder.views_sent()  # sent or copied: the memory may be recycled

    def _send_direct(self, buffers: list[Any]) -> int:
        """Write what the socket takes now; returns how many bytes it took."""
        try:
            return os.writev(self._fd, buffers[:IOV_MAX])
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            return 0  # the transport meets the error again, and reports it

    def _maybe_close(self) -> None:
        if self._ending is None or self.core.in_flight or self._tasks:
            return
        if self.core.events_pending:
            return  # requests waiting for the client to read (resume_writing starts them)
        if self.core.receiving_payload:
            return  # a request still arriving (the server is shutting down)
        if self._timer is not None:
            self._timer.cancel()
        if self.transport is not None and not self.transport.is_closing():
            self.send()
            # close() sends what is buffered first; a soft or hard disconnect alike.
            self.transport.close()

    # -- requests ---------------------------------------------------------------------

    def _dispatch(self, request: RequestReceived) -> None:
        assert self._runner is not None  # requests only come after TransmissionStarted
        self._runner.run(request)
        responder = self._responder
        assert responder is not None
        if responder.in_flight >= self._max_in_flight or responder.held >= self._max_bytes:
            self._pause("in flight")  # the next requests wait in the core

    def later(self, request: RequestReceived, future: Pending) -> None:
        """``request`` was handed off (the runner's driver): answer it once done."""
        if not isinstance(future, asyncio.Future):  # (run here: no thread for it)
            future = asyncio.wrap_future(future, loop=self._loop)
        self._tasks.add(future)
        future.add_done_callback(functools.partial(self._finished, request))

    def _finished(self, request: RequestReceived, future: asyncio.Future[Any]) -> None:
        """A backend call handed off ended: answer it, then as _task_done."""
        self._tasks.discard(future)
        if future.cancelled():
            return  # the connection is gone
        assert self._responder is not None
        try:
            self._responder.settle(request, future)
        except Exception as err:
            self.abort(f"internal error: {err!r}")
            return
        self._request_done()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.abort(f"internal error: {task.exception()!r}")
            return
        self._request_done()

    def _request_done(self) -> None:
        if self._idle_timeout is not None:
            self._last_active = self._loop.time()
        self.send()
        responder = self._responder
        if (
            "in flight" in self._paused
            and responder is not None
            and responder.in_flight < self._max_in_flight
            and responder.held < self._max_bytes
        ):
            self._resume("in flight")
            if self.core.events_pending:
                self._process()  # the requests that waited for room
                return
        self._maybe_close()

    # -- the idle timeout -------------------------------------------------------------

    def _idle_check(self) -> None:
        """``Limits.idle_timeout``: close the connection if nothing was received from
        the client, nor sent to it, and no backend call was under way, for that long;
        else look again when it might be."""
        self._idle_timer = None
        timeout = self._idle_timeout
        transport = self.transport
        if timeout is None or transport is None or transport.is_closing() or self._ending:
            return
        now = self._loop.time()
        unsent = transport.get_write_buffer_size()
        # (a thread is busy until it hands the connection back; it sees to its sends)
        if self._thread is not None or self._tasks or unsent < self._idle_unsent:
            self._last_active = now
        self._idle_unsent = unsent
        if now - self._last_active < timeout:
            self._idle_timer = self._loop.call_later(
                self._last_active + timeout - now, self._idle_check
            )
            return
        core = self.core
        if unsent or core.events_pending or core.receiving_payload:
            # It reads nothing, or sent half a request: no clean end to this.
            self.abort(f"idle for {timeout:g} s")
            return
        self._ending = Disconnect(f"idle for {timeout:g} s", soft=False)
        log.debug("%s: closing the connection: %s", self.peer, self._ending.reason)
        self._pause("ending")
        self._maybe_close()

    # -- the log line -----------------------------------------------------------------

    def _log_end(self) -> None:
        elapsed = time.monotonic() - self.stats.started
        reason = self._ending.reason if self._ending is not None else "connection lost"
        if self.export_name is None:
            log.info("%s: no export (%s), %.1f s", self.peer, reason, elapsed)
            return
        s = self.stats
        log.info(
            "%s: export %r (%s): %d request%s, %s read, %s written, %.1f s (%s)",
            self.peer,
            self.export_name,
            ", ".join(self.features()),
            s.requests,
            "" if s.requests == 1 else "s",
            _bytes(s.bytes_read),
            _bytes(s.bytes_written),
            elapsed,
            reason,
        )

    def features(self) -> list[str]:
        """What this connection negotiated, in words."""
        n = self.core.negotiated
        out = [self.tls or "no TLS"]
        if n.extended_headers:
            out.append("extended headers")
        elif n.structured_replies:
            out.append("structured replies")
        else:
            out.append("simple replies")
        out += n.meta_contexts.values()
        if n.block_size_requested:
            out.append("block sizes")
        if n.entered_by == "export name":
            out.append("NBD_OPT_EXPORT_NAME")
        return out


def _connections(server: Host) -> int:
    """The server's connections, for its connection limit: a client that has
    closed its end leaves its place to the next one, even if its session is still
    closing."""
    sessions = server.sessions
    limit = server.connection_limit
    if limit is None or len(sessions) < limit:
        return len(sessions)
    return sum(not session.client_gone() for session in sessions)


def _bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    units = ("KiB", "MiB", "GiB", "TiB")
    value, i = n / 1024, 0
    while value >= 1024 and i < len(units) - 1:
        value, i = value / 1024, i + 1
    return f"{value:.1f} {units[i]}"


def _describe_peer(transport: asyncio.BaseTransport) -> str:
    """``HOST:PORT`` for TCP; ``unix pid N uid N`` for a unix socket (SO_PEERCRED)."""
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family == socket.AF_UNIX and hasattr(socket, "SO_PEERCRED"):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
            pid, uid, _gid = _UCRED.unpack(raw)
            return f"unix pid {pid} uid {uid}"
        except OSError:
            pass
    return "unix" if peer == "" else str(peer or "socket")


def _tls_reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionError):
        return "the client closed the connection"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return str(exc) or type(exc).__name__
