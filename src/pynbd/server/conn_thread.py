"""Serving a connection from a thread of its own, once the handshake is done.

An event loop serves its connections one after the other: while it copies one client's
256 KiB write out of the socket, the other clients' sockets fill up and their senders
wait. With ``nbdcopy`` writing over four connections on two cores, the machine sat
idle a fifth of the time and the client spent more CPU per byte than against nbdkit,
whose threads each serve one connection.

So a :class:`~pynbd.server.session.Session` hands a plain (not TLS) connection over to
a :class:`ConnectionThread` when it enters transmission, if the export's backend takes
calls from several threads at once (``Capabilities.thread_safe`` and not ``inline``,
or the memory backend, which locks its pages itself). The thread reads and writes the socket itself,
blocking in ``readv`` and ``writev``: the GIL is released in each of these calls, so
the copies of several connections run at once. It performs the cheap requests (those
the session would run in the event loop) right there and hands the others to the
server's thread pool, so that one slow request does not hold up the connection's next
ones; while any are there, it waits with ``poll`` on the socket and on a pipe that
brings their answers.

What the event loop did stays true here: requests are validated by the core, replies
go out in order of completion, no request is started while the client does not read
its replies (the send blocks instead), at most ``Limits.max_in_flight`` requests run at
once, and a shutdown receives the payload that is arriving and answers every request
before the connection closes. The event loop keeps the transport, paused, until the
thread ends, then closes (or aborts) it, which ends the session as it always did. A
shutdown reaches the thread through the pipe, and through the receive timeout
(``SO_RCVTIMEO``, 0.2 s) when it is blocked in a read; an abort also shuts the socket
down, so that no call stays blocked.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import os
import select
import socket
import struct
import threading
from concurrent.futures import Executor, Future
from typing import TYPE_CHECKING, Any, cast

from ..errors import ProtocolError
from ..proto.constants import Cmd
from ..proto.server import NEED_DATA, Disconnect, RequestReceived
from .backend import Backend, Result, run_request, runs_inline
from .memory import MemoryBackend

if TYPE_CHECKING:
    from .session import Session

__all__ = ["ConnectionThread", "unsent"]

log = logging.getLogger("pynbd.server")

#: READ reply bytes queued beyond this are sent before the next request starts, so a
#: client that does not read stops the thread (in a blocked send) within a few requests.
_SEND_AT = 256 * 1024
#: Most buffers one writev takes (Linux IOV_MAX).
_IOV_MAX = 1024
#: How long a read waits before the thread looks at what the event loop asked (a
#: shutdown): a struct timeval for SO_RCVTIMEO.
_RCVTIMEO = struct.pack("ll", 0, 200_000)

_READ = Cmd.READ


def unsent(buffers: list[Any], sent: int) -> list[Any]:
    """What ``writev(buffers)`` left when it wrote ``sent`` bytes (a view of the first
    buffer's rest, then the others)."""
    for i, buffer in enumerate(buffers):
        n = len(buffer) if type(buffer) is not memoryview else buffer.nbytes
        if sent < n:
            rest = buffers[i:]
            if sent:
                rest[0] = memoryview(buffer)[sent:]
            return rest
        sent -= n
    return []


class _End(Exception):
    """The connection is over: ``hard`` closes abort it (see ConnectionThread._run)."""

    def __init__(self, reason: str | None, hard: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.hard = hard


class ConnectionThread:
    """The thread that serves one session's connection in transmission.

    Made and started by the session in the event loop (:meth:`start`); the loop may
    then only call :meth:`shutdown` and :meth:`abort`. When the thread ends it calls
    ``session.thread_ended(hard)`` in the loop.
    """

    def __init__(self, session: Session, sock: Any, *, views: bool) -> None:
        assert session.export is not None and session.core.transmission is not None
        self.session = session
        self.core = session.core
        self._tx = session.core.transmission
        self._fd: int = session.transport_fd
        self._sock = sock  # the transport's socket, for shutdown() on abort
        self._loop = asyncio.get_running_loop()
        backend = session.export.backend
        assert isinstance(backend, Backend)
        self._backend = backend
        caps = backend.capabilities
        # The memory backend: READs sent from views of its pages, whole-page WRITEs
        # received into spare pages (the session gave the core its payload_sink).
        self._views = views
        self._caps = caps
        # (the loop makes the pool: its creation is not thread-safe)
        self._executor: Executor | None = None if caps.inline else session.server._pool()
        self._max_in_flight = session.server.limits.max_in_flight
        self._results: collections.deque[tuple[RequestReceived, Future[Result]]]
        self._results = collections.deque()
        self._in_pool = 0
        self._lent = 0  # pread_views calls whose views are not sent yet
        self._unsent = 0  # READ reply bytes queued since the last send
        self._stop = False  # set by the loop: the server is shutting down
        self._stopping = False
        self._abort: str | None = None  # set by the loop: close now, for this reason
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._wake_lock = threading.Lock()
        self._wake_closed = False
        self._poll = select.poll()
        self._poll.register(self._wake_r, select.POLLIN)
        self._watching = 0  # the events the poll asks of the socket
        self._thread = threading.Thread(
            target=self._run, name=f"pynbd-conn {session.peer}", daemon=True
        )

    # -- called from the event loop ---------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        """The server is closing: take no more requests, finish, close."""
        self._stop = True
        self._wake()

    def abort(self, reason: str) -> None:
        """Close now: blocked calls on the socket return at once."""
        if self._abort is None:
            self._abort = reason
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._wake()

    def _wake(self) -> None:
        # (also from the pool's threads) The lock keeps the pipe open while written to:
        # a closed descriptor's number may already be another file's.
        with self._wake_lock:
            if not self._wake_closed:
                with contextlib.suppress(BlockingIOError):  # full: already woken
                    os.write(self._wake_w, b"!")

    # -- the thread -------------------------------------------------------------------

    def _run(self) -> None:
        hard = True
        try:
            self._serve()
        except _End as end:
            hard = end.hard
            if end.reason is not None:
                self._note_end(end.reason)
        except ProtocolError as exc:
            self._note_end(f"protocol error: {exc}")
        except Exception as exc:  # a bug: end this connection, say why
            log.exception("%s: connection thread failed", self.session.peer)
            self._note_end(f"internal error: {exc!r}")
        finally:
            self._return_views()
            with self._wake_lock:
                self._wake_closed = True
                os.close(self._wake_r)
                os.close(self._wake_w)
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody to tell
                self._loop.call_soon_threadsafe(self.session.thread_ended, hard)

    def _note_end(self, reason: str) -> None:
        session = self.session
        if session._ending is not None and self._abort is not None:
            reason = f"{session._ending.reason}, then {reason}"  # a shutdown cut short
        if session._ending is None or self._abort is not None:
            session._ending = Disconnect(reason, soft=False)
        log.debug("%s: closing the connection: %s", session.peer, reason)

    def _serve(self) -> None:
        session, tx, fd = self.session, self._tx, self._fd
        # Blocking reads: they took 15% less CPU than poll and non-blocking reads (a
        # 256 KiB write arrives in fewer, bigger pieces). The receive timeout lets the
        # thread see a shutdown; an abort shuts the socket down, which ends any wait.
        os.set_blocking(fd, True)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _RCVTIMEO)
        self._process()  # requests that came with the handshake's last bytes
        while True:
            self._check()
            if tx.events_pending:
                self._process()  # requests parsed before a shutdown are still performed
            if self._results:
                self._take_results()
            self._send()
            receiving = tx.receiving_payload
            if session._ending is not None and not (
                self._in_pool or receiving or tx.events_pending
            ):
                raise _End(None, hard=False)  # every request answered: done
            if (session._ending is None or receiving) and tx.in_flight < self._max_in_flight:
                # With requests in the pool, a read must not block: their answers
                # come through the pipe.
                if self._in_pool and not self._wait(select.POLLIN):
                    continue
                try:
                    n = os.readv(fd, tx.receive_buffers())
                except (BlockingIOError, InterruptedError):
                    continue  # the receive timeout (or a signal): see to the loop's asks
                except OSError as exc:
                    raise _End(f"connection lost: {os.strerror(exc.errno or 0)}") from None
                tx.buffer_updated(n)
                self._process()
            else:
                self._wait(0)  # for the pool, or the loop

    def _check(self) -> None:
        """Act on what the event loop asked (an abort, a shutdown)."""
        if self._abort is not None:
            raise _End(self._abort)
        if self._stop and not self._stopping:
            self._stopping = True
            self.core.shutdown()
            if self.session._ending is None:
                self.session._ending = Disconnect("the server is shutting down", soft=False)

    def _wait(self, events: int) -> bool:
        """Until the socket is ready for ``events`` (0: only the pipe) or we are woken;
        True if the socket is ready."""
        if events != self._watching:
            if self._watching:
                self._poll.unregister(self._fd)
            if events:
                self._poll.register(self._fd, events)
            self._watching = events
        ready = False
        for fd, _ in self._poll.poll():
            if fd == self._wake_r:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._wake_r, 4096):
                        pass
            else:
                ready = True
        self._check()
        return ready

    def _process(self) -> None:
        core, session = self.core, self.session
        while True:
            event = core.next_event()
            if event is NEED_DATA:
                return
            if type(event) is RequestReceived:
                self._dispatch(event)
            elif isinstance(event, Disconnect):
                log.debug("%s: %s", session.peer, event.reason)
                session._ending = session._ending or event
                return  # the last event of a session
            else:  # pragma: no cover - the core has no other events in transmission
                raise ProtocolError(f"unexpected event in transmission: {event!r}")

    # -- requests ---------------------------------------------------------------------

    def _dispatch(self, request: RequestReceived) -> None:
        session = self.session
        session.count(request)
        command = request.command
        backend = self._backend
        if self._views:
            if command is _READ:
                self._read_views(cast(MemoryBackend, backend), request)
                return
            # A change to the pages: the views queued must show them as they were.
            if self._lent:
                self._send()
            if request.segments is not None:  # a WRITE received into spare pages
                segments = cast(list[memoryview], request.segments)
                cast(MemoryBackend, backend).adopt_pages(segments, request.offset)
                self.core.reply_ok(request)
                return
        buf = session._pool.take(request.length) if command is _READ else None
        if not runs_inline(self._caps, request):
            assert self._executor is not None
            future = self._executor.submit(run_request, backend, request, buf)
            self._in_pool += 1
            future.add_done_callback(functools.partial(self._pool_done, request))
            return
        try:
            result = run_request(backend, request, buf)
        except Exception as exc:
            session._answer_failure(request, exc)
        else:
            session._answer(request, result)
        if command is _READ:
            self._queued(request.length)

    def _read_views(self, backend: MemoryBackend, request: RequestReceived) -> None:
        try:
            views = backend.pread_views(request.length, request.offset)
        except Exception as exc:
            self.session._answer_failure(request, exc)
            return
        self._lent += 1
        self._tx.reply_read_vector(request, views)
        self._queued(request.length)

    def _queued(self, nbytes: int) -> None:
        self._unsent += nbytes
        if self._unsent >= _SEND_AT:
            self._send()  # blocks while the client does not read

    def _pool_done(self, request: RequestReceived, future: Future[Result]) -> None:
        # In a pool thread (or here, if already done): the answer is made by us.
        self._results.append((request, future))
        self._wake()

    def _take_results(self) -> None:
        results, session = self._results, self.session
        while results:
            request, future = results.popleft()
            self._in_pool -= 1
            session._answer_future(request, future)
            if request.command is _READ:
                self._unsent += request.length

    # -- sending ----------------------------------------------------------------------

    def _send(self) -> None:
        """Send everything the core has queued, waiting while the socket is full."""
        buffers: list[Any] = self.core.buffers_to_send()
        self._unsent = 0
        give = self.session._pool.give
        fd = self._fd
        while buffers:
            try:
                sent = os.writev(fd, buffers[:_IOV_MAX])  # blocks while the socket is full
            except InterruptedError:
                self._check()
                continue
            except OSError as exc:
                raise _End(f"connection lost: {os.strerror(exc.errno or 0)}") from None
            rest = unsent(buffers, sent)
            for buffer in buffers[: len(buffers) - len(rest)]:
                if type(buffer) is bytearray:
                    give(buffer)  # a READ reply's buffer, from the session's pool
            buffers = rest
        self._return_views()

    def _return_views(self) -> None:
        if self._lent:
            cast(MemoryBackend, self._backend).return_views(self._lent)
            self._lent = 0
