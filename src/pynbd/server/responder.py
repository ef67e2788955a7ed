"""Answering a connection's requests: what the event loop and the connection threads share.

A :class:`Responder` turns what a backend returned (or raised) into the core's replies,
gives the buffers of WRITE payloads and READ replies back to the connection's
:class:`SharedPool` (a payload once the backend returned, a reply buffer once sent
whole: :func:`written`), counts the connection's figures (:class:`SessionStats`) and
its requests in flight and the bytes they hold (:attr:`Responder.in_flight` and
:attr:`Responder.held`, for ``Limits.max_in_flight`` and ``max_in_flight_bytes``), and
keeps account of the views of a zero-copy
backend's memory lent to replies not sent yet. One serves each connection in
transmission, called from whichever of the event loop or the connection's own thread
serves it, never from both.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Future
from typing import Any, TypeAlias

from ..proto.constants import Cmd
from ..proto.server import BufferPool, RequestReceived, ServerTransmission
from .backend import Backend, Result, exception_to_nbd

__all__ = ["IOV_MAX", "Pending", "Responder", "SessionStats", "SharedPool", "written"]

log = logging.getLogger("pynbd.server")

#: Most buffers one writev takes (Linux IOV_MAX).
IOV_MAX = 1024

#: A backend call handed off: to a thread pool, or an async backend's task.
Pending: TypeAlias = asyncio.Future[Result] | Future[Result]

_READ = Cmd.READ
_WRITE = Cmd.WRITE


class SessionStats:
    """What one connection did (for its log line)."""

    __slots__ = ("bytes_read", "bytes_written", "requests", "started")

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.requests = 0
        self.bytes_read = 0
        self.bytes_written = 0


class SharedPool(BufferPool):
    """A connection's :class:`~pynbd.proto.server.BufferPool`, safe to use from several
    threads: a READ's reply buffer is taken where its backend call starts (a thread of
    the pool, see :mod:`pynbd.server.runner`), while the connection gives buffers back
    where it is served."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()

    def take(self, size: int) -> bytearray:
        if size < self.min_size:  # (never kept: nothing shared to guard)
            return bytearray(size)
        with self._lock:
            return BufferPool.take(self, size)

    def give(self, buf: bytearray) -> None:
        if len(buf) < self.min_size:
            return
        with self._lock:
            BufferPool.give(self, buf)

    def clear(self) -> None:
        """Drop the buffers kept for reuse (an idle connection keeps none)."""
        with self._lock:
            self._free.clear()
            self._held = 0


def written(pool: BufferPool, buffers: list[Any], sent: int) -> list[Any]:
    """What ``writev(buffers)`` left when it wrote ``sent`` bytes (a view of the first
    buffer's rest, then the others). The READ reply buffers it sent whole go back to
    ``pool``: they are the only bytearrays the core queues."""
    for i, buffer in enumerate(buffers):
        n = len(buffer) if type(buffer) is not memoryview else buffer.nbytes
        if sent < n:
            rest = buffers[i:]
            if sent:
                rest[0] = memoryview(buffer)[sent:]
            break
        sent -= n
    else:
        rest = []
    give = pool.give
    for buffer in buffers[: len(buffers) - len(rest)]:
        if type(buffer) is bytearray:
            give(buffer)
    return rest


class Responder:
    """Replies to one connection's requests (see the module's docstring).

    Args:
        tx: the core's transmission phase.
        pool: the connection's buffers (the core takes payload buffers from it).
        stats: the connection's figures.
        peer: the client, for log messages.
        lender: the zero-copy backend whose views READ replies may hold (None: none).
    """

    __slots__ = ("_lender", "held", "in_flight", "lent", "peer", "pool", "stats", "tx", "unsent")

    def __init__(
        self,
        tx: ServerTransmission,
        pool: BufferPool,
        stats: SessionStats,
        peer: str,
        lender: Backend | None = None,
    ) -> None:
        self.tx = tx
        self.pool = pool
        self.stats = stats
        self.peer = peer
        self._lender = lender
        #: READ reply bytes queued since the driver last sent (it resets this).
        self.unsent = 0
        #: ``pread_views`` calls whose views wait in the core (see :meth:`views_sent`).
        self.lent = 0
        #: Requests in flight: from :meth:`count` to their reply (the core's
        #: ``in_flight``, kept where it is cheap to read for ``Limits.max_in_flight``).
        self.in_flight = 0
        #: Bytes of the requests in flight: READs not answered yet, and WRITE payloads
        #: (``Limits.max_in_flight_bytes``).
        self.held = 0

    def count(self, request: RequestReceived) -> None:
        """A request starts: add it to the connection's figures, :attr:`in_flight` and
        :attr:`held`."""
        self.in_flight += 1
        stats = self.stats
        stats.requests += 1
        command = request.command
        if command is _READ:
            stats.bytes_read += request.length
            self.held += request.length
        elif command is _WRITE:
            stats.bytes_written += request.length
            self.held += request.length

    def ok(self, request: RequestReceived) -> None:
        """Reply that a request succeeded (and takes no data)."""
        self.in_flight -= 1
        if request.command is _WRITE:
            self.held -= request.length
        self.tx.reply_ok(request)

    def answer(self, request: RequestReceived, result: Result) -> None:
        """Reply to a request the backend is done with (its payload is free again)."""
        self.in_flight -= 1
        tx = self.tx
        command = request.command
        if command is _READ or command is _WRITE:
            self.held -= request.length
        if request.payload is not None:
            self._release(request.payload)
        if command is _READ:
            assert isinstance(result, bytearray)
            tx.reply_read(request, result)
            self.unsent += request.length
        elif command is Cmd.BLOCK_STATUS:
            assert isinstance(result, list)
            tx.reply_block_status(request, dict.fromkeys(request.contexts, result))
        else:
            tx.reply_ok(request)

    def answer_views(self, request: RequestReceived, views: list[memoryview]) -> None:
        """Reply to a READ with views the lender lent (until :meth:`views_sent`)."""
        self.in_flight -= 1
        self.held -= request.length
        self.lent += 1
        self.tx.reply_read_vector(request, views)
        self.unsent += request.length

    def fail(self, request: RequestReceived, exc: Exception) -> None:
        """Reply with the error for what the backend raised."""
        self.in_flight -= 1
        command = request.command
        if command is _READ or command is _WRITE:
            self.held -= request.length
        if request.payload is not None:
            self._release(request.payload)
        error, message = exception_to_nbd(exc)
        if isinstance(exc, OSError):
            log.debug("%s: NBD_CMD_%s failed: %s", self.peer, request.command.name, exc)
        else:
            log.error("%s: NBD_CMD_%s: backend bug", self.peer, request.command.name, exc_info=exc)
        self.tx.reply_error(request, error, message)

    def settle(self, request: RequestReceived, future: Pending) -> None:
        """Reply to a request whose backend call was handed off and is done."""
        exc = future.exception()
        if exc is None:
            self.answer(request, future.result())
        elif isinstance(exc, Exception):
            self.fail(request, exc)
        else:  # pragma: no cover - a BaseException from a backend thread
            raise exc

    def _release(self, payload: memoryview) -> None:
        """The backend returned: the payload's buffer (the core's, from our pool) is
        taken for the next one. Backends keep no view of it (their contract)."""
        buffer = payload.obj
        if type(buffer) is bytearray:
            self.pool.give(buffer)

    def views_sent(self) -> None:
        """The views queued so far are sent or copied: the lender may recycle its memory."""
        if self.lent:
            assert self._lender is not None
            self._lender.return_views(self.lent)
            self.lent = 0
