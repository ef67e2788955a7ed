"""The request runner: one connection's requests performed as its
:class:`~pynbd.server.policy.Plan` says, for the event loop and the connection threads
alike.

A :class:`Runner` is made once per connection, when it enters transmission, by the
:class:`Driver` that serves it (the session in the event loop, or its
:class:`~pynbd.server.conn_thread.ConnectionThread`), and given what it needs: the
backend, the plan, the :class:`~pynbd.server.responder.Responder`, and how to hand a
call off (an executor's ``submit``). For each request it does one of:

- a READ of a zero-copy backend: answered with views of the backend's memory, which
  the kernel copies straight to the socket; any other request first has the driver
  send (or copy) the views queued, as it may change what they show. A WRITE the core
  received into the backend's own buffers (``receive_pages``) is adopted by it.
- inline: performed at once, where the connection is read; READ replies are sent once
  ``SEND_AT`` bytes are queued, so that a client that does not read stops the server
  (its send blocks, or the transport pauses it) within a few requests.
- handed off: submitted to the backend's executor (an async backend's call is a task
  of the event loop); the driver gets the future (:meth:`Driver.later`) and has the
  responder answer it once done, in its own thread. A READ's reply buffer is taken
  when its backend call starts, not while it waits for a thread. When no thread can be
  started for it (the executor raises RuntimeError), the request runs inline instead:
  the connection is served more slowly, but served.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Future
from typing import Protocol

from ..proto.constants import Cmd
from ..proto.server import BufferPool, RequestReceived
from .backend import (
    AnyBackend,
    AsyncBackend,
    Backend,
    Result,
    run_request,
    run_request_async,
)
from .policy import Plan, limited_log
from .responder import Pending, Responder

__all__ = ["SEND_AT", "Driver", "Runner"]

#: READ reply bytes queued beyond this are sent before the next request starts.
SEND_AT = 256 * 1024

_READ = Cmd.READ


class Driver(Protocol):
    """What serves a connection, as its runner sees it."""

    def send(self) -> None:
        """Send the replies queued (it may block, or pause the connection)."""

    def later(self, request: RequestReceived, future: Pending) -> None:
        """``request`` was handed off: answer it once ``future`` is done."""


class Runner:
    """Performs one connection's requests (see the module's docstring).

    Args:
        backend: the export's backend.
        plan: how the connection's requests run.
        responder: answers them.
        driver: serves the connection.
        submit: ``submit(fn, *args)`` runs ``fn(*args)`` elsewhere and returns its
            future (an executor's ``submit``, or the event loop's
            ``run_in_executor`` for it); None for an async backend, whose calls are
            tasks of the running event loop, and when nothing is handed off.
    """

    def __init__(
        self,
        backend: AnyBackend,
        plan: Plan,
        responder: Responder,
        driver: Driver,
        submit: Callable[..., Pending] | None,
    ) -> None:
        # (a plan runs nothing of an async backend inline, nor zero-copy)
        self._blocking = None if isinstance(backend, AsyncBackend) else backend
        self._async = backend if isinstance(backend, AsyncBackend) else None
        self._plan = plan
        self._inline = plan.inline
        self._zero_copy = plan.zero_copy
        self._responder = responder
        self._driver = driver
        self._submit = submit

    def run(self, request: RequestReceived) -> None:
        """Perform ``request``, or hand it off."""
        responder = self._responder
        responder.count(request)
        command = request.command
        backend = self._blocking
        if self._zero_copy:
            assert backend is not None
            if command is _READ:
                try:
                    views = backend.pread_views(request.length, request.offset)
                except Exception as exc:
                    responder.fail(request, exc)
                    return
                responder.answer_views(request, views)
                if responder.unsent >= SEND_AT:
                    self._driver.send()
                return
            if responder.lent:
                self._driver.send()  # the views queued show the data as it was
            if request.segments is not None:  # a WRITE received into the backend's pages
                try:
                    backend.adopt_pages(request.segments, request.offset)
                except Exception as exc:
                    responder.fail(request, exc)
                else:
                    responder.ok(request)
                return
        if self._inline or self._plan.runs_inline(request):
            assert backend is not None
            # A READ's reply buffer comes from the pool and goes back once sent whole.
            buf = responder.pool.take(request.length) if command is _READ else None
            try:
                result = run_request(backend, request, buf)
            except Exception as exc:
                responder.fail(request, exc)
            else:
                responder.answer(request, result)
            if responder.unsent >= SEND_AT:
                self._driver.send()
            return
        future: Pending
        if self._async is not None:
            future = asyncio.ensure_future(_perform_async(self._async, request, responder.pool))
        else:
            assert self._submit is not None and backend is not None  # (a plan that offloads)
            try:
                future = self._submit(_perform, backend, request, responder.pool)
            except RuntimeError as exc:  # no thread could be started to run it
                limited_log.warning(
                    "no pool thread",
                    "%s: cannot start a thread for a request (%s): running it here",
                    responder.peer,
                    exc,
                )
                # (done already: the driver answers it as any other)
                future = _done(_perform, backend, request, responder.pool)
        self._driver.later(request, future)


def _done(fn: Callable[..., Result], *args: object) -> Future[Result]:
    """The future of ``fn(*args)``, called now."""
    future: Future[Result] = Future()
    try:
        future.set_result(fn(*args))
    except Exception as exc:
        future.set_exception(exc)
    return future


def _perform(backend: Backend, request: RequestReceived, pool: BufferPool) -> Result:
    """Perform a request handed off; a READ's reply buffer comes from ``pool`` now, as
    the call starts."""
    buf = pool.take(request.length) if request.command is _READ else None
    return run_request(backend, request, buf)


async def _perform_async(
    backend: AsyncBackend, request: RequestReceived, pool: BufferPool
) -> Result:
    """:func:`_perform` for an async backend."""
    buf = pool.take(request.length) if request.command is _READ else None
    return await run_request_async(backend, request, buf)
