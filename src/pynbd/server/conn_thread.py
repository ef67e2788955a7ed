"""Serving a connection from a thread of its own, once the handshake is done.

An event loop serves its connections one after the other: while it copies one client's
256 KiB write out of the socket, the other clients' sockets fill up and their senders
wait, and then send in more, smaller pieces. nbdkit gives each connection a thread of
its own, and so does this module.

So a :class:`~pynbd.server.session.Session` hands a plain (not TLS) connection over to
a :class:`ConnectionThread` once it is in transmission and its first request arrives,
if its plan says so (a thread-safe :class:`~pynbd.server.backend.Backend`: see
:mod:`pynbd.server.policy`). A connection idle for ``PARK_AFTER`` seconds (nothing in
flight, nothing received; or ``Limits.idle_timeout``, if shorter, which the event loop
then applies) is handed back to the event loop, and its thread ends: an
idle connection costs its socket and no thread (a device the kernel leaves idle for
days, a thousand clients that connect and wait); its next request starts a thread
again.
The thread reads and writes the socket itself, blocking in ``readv`` and ``writev``:
the GIL is released in each of these calls, so the copies of several connections run
at once. Its requests run through the same :class:`~pynbd.server.runner.Runner` as
the event loop's: inline ones right there, the others handed to the backend's
executor, so that one slow request does not hold up the connection's next ones; while
any are there, the thread waits with ``poll`` on the socket and on a pipe that brings
their answers.

What the event loop did stays true here: requests are validated by the core, replies
go out in order of completion, no request is started while the client does not read
its replies (the send blocks instead), at most ``Limits.max_in_flight`` requests and
``Limits.max_in_flight_bytes`` bytes are in flight at once (beyond, the socket is not
read until some complete), and a shutdown receives the payload that is arriving and
answers every request before the connection closes. The event loop keeps the
transport, paused, until the thread ends, then closes (or aborts) it, which ends the
session as it always did. A shutdown reaches the thread through its waker (an
eventfd), and through the receive timeout (``SO_RCVTIMEO``, 0.2 s) when it is blocked
in a read; an abort also shuts the socket down, so that no call stays blocked.
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
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

from ..errors import ProtocolError
from ..proto.server import NEED_DATA, Disconnect, RequestReceived, ServerConnection
from .backend import Backend, Result
from .policy import Plan
from .responder import IOV_MAX, Pending, Responder, written
from .runner import Runner

__all__ = ["ConnectionThread"]

log = logging.getLogger("pynbd.server")

#: How long a read waits before the thread looks at what the event loop asked (a
#: shutdown): a struct timeval for SO_RCVTIMEO.
_TICK = 0.2
_RCVTIMEO = struct.pack("ll", 0, int(_TICK * 1_000_000))
_NO_TIMEO = struct.pack("ll", 0, 0)
#: Seconds without a request in flight or a byte received after which the thread
#: hands its connection back to the event loop (and ends).
PARK_AFTER = 5.0
#: What the waker writes: an eventfd adds this 8-byte number (a pipe takes any bytes).
_ONE = (1).to_bytes(8, sys.byteorder)


class _Waker:
    """What wakes the thread from ``poll``: an eventfd (one descriptor), or a pipe
    where there is none. ``wake`` may be called from any thread, also after ``close``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closed = False
        if hasattr(os, "eventfd"):
            self.fd = self._w = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        else:  # pragma: no cover - Linux has eventfd
            self.fd, self._w = os.pipe()
            os.set_blocking(self.fd, False)
            os.set_blocking(self._w, False)

    def wake(self) -> None:
        # The lock keeps the descriptor open while written to: a closed descriptor's
        # number may already be another file's.
        with self._lock:
            if not self._closed:
                with contextlib.suppress(BlockingIOError):  # (a full pipe: woken already)
                    os.write(self._w, _ONE)

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.fd, 4096):
                pass

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self.fd)
                if self._w != self.fd:
                    os.close(self._w)


class _Park(Exception):
    """The connection is idle: hand it back to the event loop (see ConnectionThread._run)."""


class _End(Exception):
    """The connection is over: ``hard`` closes abort it (see ConnectionThread._run)."""

    def __init__(self, reason: str | None, hard: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.hard = hard


class ConnectionThread:
    """The thread that serves one connection in transmission.

    Made and started in the event loop (:meth:`start`); the loop may then only call
    :meth:`shutdown` and :meth:`abort`. When the thread ends it calls ``ended(hard,
    ending)`` in the loop: whether to abort the connection rather than close it, and
    why it ended; or, when it hands an idle connection back, ``parked(idle)``: the
    socket is non-blocking again, and the loop serves it (``idle``: seconds since
    anything happened on it).

    Args:
        core: the connection's core, in transmission.
        responder: answers its requests.
        backend, plan: the export's backend, and how its requests run.
        executor: where requests that do not run inline go (None: nowhere).
        sock: the connected socket (without TLS).
        max_in_flight: ``Limits.max_in_flight``.
        max_in_flight_bytes: ``Limits.max_in_flight_bytes``.
        ending: why the connection is ending already (a shutdown), or None.
        ended: called in the event loop when the thread is done.
        parked: called in the event loop when the thread handed the connection back.
        park_after: seconds of idleness after which it does (None: never).
        idle_timeout: ``Limits.idle_timeout``: a send that makes no progress for that
            long (a client that reads nothing) ends the connection.

    Raises:
        OSError: no descriptor for its waker (:meth:`start` raises RuntimeError when
            no thread can be started); the loop then serves the connection itself.
    """

    def __init__(
        self,
        core: ServerConnection,
        responder: Responder,
        backend: Backend,
        plan: Plan,
        executor: Executor | None,
        sock: Any,
        *,
        max_in_flight: int,
        max_in_flight_bytes: int,
        ending: Disconnect | None,
        ended: Callable[[bool, Disconnect | None], None],
        parked: Callable[[float], None],
        park_after: float | None = PARK_AFTER,
        idle_timeout: float | None = None,
    ) -> None:
        tx = core.transmission
        assert tx is not None
        self.core = core
        self._tx = tx
        self._responder = responder
        submit = None if executor is None else executor.submit
        self._runner = Runner(backend, plan, responder, self, submit)
        self._fd: int = sock.fileno()
        self._sock = sock  # for shutdown() on abort
        self._loop = asyncio.get_running_loop()
        self._max_in_flight = max_in_flight
        self._max_bytes = max_in_flight_bytes
        #: Why the connection ends (for its log line), once it does.
        self.ending = ending
        self._ended = ended
        self._parked = parked
        # Receive timeouts in a row, with nothing in flight, after which to park.
        self._park_ticks = None if park_after is None else max(1, round(park_after / _TICK))
        self._idle_ticks = 0
        self._stall_ticks = None if idle_timeout is None else max(1, round(idle_timeout / _TICK))
        self._idle_timeout = idle_timeout
        self._results: collections.deque[tuple[RequestReceived, Future[Result]]]
        self._results = collections.deque()
        self._in_pool = 0
        self._stop = False  # set by the loop: the server is shutting down
        self._stopping = False
        self._abort: str | None = None  # set by the loop: close now, for this reason
        self._waker = _Waker()
        self._poll = select.poll()
        self._poll.register(self._waker.fd, select.POLLIN)
        self._watching = 0  # the events the poll asks of the socket
        self._thread = threading.Thread(
            target=self._run, name=f"pynbd-conn {responder.peer}", daemon=True
        )

    # -- called from the event loop ---------------------------------------------------

    def start(self) -> None:
        """Start the thread (RuntimeError: it cannot be started; nothing is left open)."""
        try:
            self._thread.start()
        except BaseException:
            self._waker.close()
            raise

    def shutdown(self) -> None:
        """The server is closing: take no more requests, finish, close."""
        self._stop = True
        self._waker.wake()

    def abort(self, reason: str) -> None:
        """Close now: blocked calls on the socket return at once."""
        if self._abort is None:
            self._abort = reason
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._waker.wake()

    @property
    def aborted(self) -> str | None:
        """Why the loop asked the thread to abort (None: it did not)."""
        return self._abort

    @property
    def stopping(self) -> bool:
        """The loop asked the thread to shut down."""
        return self._stop

    # -- the thread -------------------------------------------------------------------

    def _run(self) -> None:
        hard = True
        parked = False
        try:
            self._serve()
        except _Park:
            parked = True
        except _End as end:
            hard = end.hard
            if end.reason is not None:
                self._note_end(end.reason)
        except ProtocolError as exc:
            self._note_end(f"protocol error: {exc}")
        except Exception as exc:  # a bug: end this connection, say why
            log.exception("%s: connection thread failed", self._responder.peer)
            self._note_end(f"internal error: {exc!r}")
        finally:
            self._responder.views_sent()  # what was not sent never will be
            self._waker.close()
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody to tell
                if parked:
                    idle = self._idle_ticks * _TICK
                    self._loop.call_soon_threadsafe(self._parked, idle)
                else:
                    self._loop.call_soon_threadsafe(self._ended, hard, self.ending)

    def _note_end(self, reason: str) -> None:
        if self.ending is not None and self._abort is not None:
            reason = f"{self.ending.reason}, then {reason}"  # a shutdown cut short
        if self.ending is None or self._abort is not None:
            self.ending = Disconnect(reason, soft=False)
        log.debug("%s: closing the connection: %s", self._responder.peer, reason)

    def _serve(self) -> None:
        tx, fd, responder = self._tx, self._fd, self._responder
        most, most_bytes = self._max_in_flight, self._max_bytes
        # Blocking reads: cheaper than poll and non-blocking reads (a 256 KiB write
        # arrives in fewer, bigger pieces). The receive timeout lets the thread see a
        # shutdown; an abort shuts the socket down, which ends any wait.
        os.set_blocking(fd, True)
        # (and a send that waits for a client that reads nothing: see send)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _RCVTIMEO)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _RCVTIMEO)
        try:
            self._process()  # requests that came with the handshake's last bytes
            while True:
                self._check()
                if tx.events_pending and responder.in_flight < most and responder.held < most_bytes:
                    self._process()  # requests parsed before a shutdown are still performed
                if self._results:
                    self._take_results()
                self.send()
                receiving = tx.receiving_payload
                if self.ending is not None and not (
                    self._in_pool or receiving or tx.events_pending
                ):
                    raise _End(None, hard=False)  # every request answered: done
                if (
                    (self.ending is None or receiving)
                    and responder.in_flight < most
                    and responder.held < most_bytes
                ):
                    # With requests in the pool, a read must not block: their answers
                    # come through the waker.
                    if self._in_pool and not self._wait(select.POLLIN):
                        continue
                    try:
                        n = os.readv(fd, tx.receive_buffers())
                    except (BlockingIOError, InterruptedError):
                        # The receive timeout (or a signal): see to the loop's asks.
                        self._idle_tick()
                        continue
                    except OSError as exc:
                        raise _End(f"connection lost: {os.strerror(exc.errno or 0)}") from None
                    self._idle_ticks = 0
                    tx.buffer_updated(n)
                    self._process()
                else:
                    self._wait(0)  # for the pool, or the loop
        except _Park:
            # The event loop reads the socket again: as it was before the thread.
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _NO_TIMEO)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _NO_TIMEO)
            os.set_blocking(fd, False)
            raise

    def _idle_tick(self) -> None:
        """A receive timeout: park once idle long enough (see PARK_AFTER). Replies are
        all sent by now; a payload may be half received (the loop receives the rest)."""
        if self._park_ticks is None or self.ending is not None or self._stop or self._in_pool:
            self._idle_ticks = 0
            return
        self._idle_ticks += 1
        if self._idle_ticks >= self._park_ticks:
            raise _Park

    def _check(self) -> None:
        """Act on what the event loop asked (an abort, a shutdown)."""
        if self._abort is not None:
            raise _End(self._abort)
        if self._stop and not self._stopping:
            self._stopping = True
            self.core.shutdown()
            if self.ending is None:
                self.ending = Disconnect("the server is shutting down", soft=False)

    def _wait(self, events: int) -> bool:
        """Until the socket is ready for ``events`` (0: only the waker) or we are woken;
        True if the socket is ready."""
        if events != self._watching:
            if self._watching:
                self._poll.unregister(self._fd)
            if events:
                self._poll.register(self._fd, events)
            self._watching = events
        ready = False
        for fd, _ in self._poll.poll():
            if fd == self._waker.fd:
                self._waker.drain()
            else:
                ready = True
        self._check()
        return ready

    def _process(self) -> None:
        """Perform the requests the core has, up to the limits (call it below them);
        beyond, the requests wait in the core, and the socket is not read."""
        core, run, responder = self.core, self._runner.run, self._responder
        most, most_bytes = self._max_in_flight, self._max_bytes
        while True:
            event = core.next_event()
            if event is NEED_DATA:
                return
            if type(event) is RequestReceived:
                run(event)
                if responder.in_flight >= most or responder.held >= most_bytes:
                    return
            elif isinstance(event, Disconnect):
                log.debug("%s: %s", self._responder.peer, event.reason)
                self.ending = self.ending or event
                return  # the last event of a session
            else:  # pragma: no cover - the core has no other events in transmission
                raise ProtocolError(f"unexpected event in transmission: {event!r}")

    # -- the runner's driver ----------------------------------------------------------

    def later(self, request: RequestReceived, future: Pending) -> None:
        """``request`` went to the pool: its answer comes through the waker."""
        assert isinstance(future, Future)
        self._in_pool += 1
        future.add_done_callback(functools.partial(self._pool_done, request))

    def _pool_done(self, request: RequestReceived, future: Future[Result]) -> None:
        # In a pool thread (or here, if already done): the answer is made by us.
        self._results.append((request, future))
        self._waker.wake()

    def _take_results(self) -> None:
        results, settle = self._results, self._responder.settle
        while results:
            request, future = results.popleft()
            self._in_pool -= 1
            settle(request, future)

    def send(self) -> None:
        """Send everything the core has queued, waiting while the socket is full."""
        responder = self._responder
        buffers = self.core.buffers_to_send()
        responder.unsent = 0
        pool, fd = responder.pool, self._fd
        stalled = 0
        while buffers:
            try:
                sent = os.writev(fd, buffers[:IOV_MAX])  # blocks while the socket is full
            except (BlockingIOError, InterruptedError):
                # The send timeout (a tick with nothing sent), or a signal.
                self._check()
                stalled += 1
                if self._stall_ticks is not None and stalled >= self._stall_ticks:
                    reason = f"idle for {self._idle_timeout:g} s (the client reads nothing)"
                    raise _End(reason) from None
                continue
            except OSError as exc:
                raise _End(f"connection lost: {os.strerror(exc.errno or 0)}") from None
            stalled = 0
            buffers = written(pool, buffers, sent)
        responder.views_sent()
