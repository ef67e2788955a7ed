"""How the server runs requests: its :class:`Limits`, and the :class:`Plan` it draws for
each connection from what the export's backend declares.

A backend says what it can do (:class:`~pynbd.server.backend.Capabilities`: whether its
calls may wait, whether they may overlap, whether it lends its memory); where each
request runs is the server's decision, made here once per connection, whatever the
backend (nbdkit's thread model is likewise data its one worker loop reads):

- A connection without TLS to a :class:`~pynbd.server.backend.Backend` (not async)
  whose calls may overlap (``thread_safe``) is served from a thread of its own
  (``Limits.connection_threads``, :mod:`pynbd.server.conn_thread`); every other
  connection, in the event loop.
- A request runs *inline*, where its connection is read (that thread, or the event
  loop), when it is cheap: every request of a backend that never blocks
  (``Blocking.NEVER``); a READ, or a WRITE without FUA, of at most
  ``Limits.inline_max`` bytes, of a backend whose reads and writes are ``CACHED`` and
  may overlap (a copy from or to the page cache costs less than the hop to a thread).
- The others are handed to the backend's executor (:meth:`Server.executor
  <pynbd.server.aio.Server.executor>`): the server's thread pool, or for a backend that
  takes one call at a time, a thread of its own, so that its calls never overlap and
  never hold up the pool. An async backend's calls are awaited in the event loop.
- A backend that lends its memory (``zero_copy``) has READs answered from views of it,
  and writes of whole pages received into it, on connections without TLS (whose
  transport may keep a view after a write), when those calls cannot overlap one
  handed to the executor.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..proto.constants import Cmd, CmdFlag
from ..proto.server import RequestReceived
from .backend import AnyBackend, AsyncBackend, Blocking

__all__ = ["Limits", "Plan", "plan"]

_READ = Cmd.READ
_WRITE = Cmd.WRITE
_FUA = int(CmdFlag.FUA)


@dataclass(frozen=True, slots=True)
class Limits:
    """Resource limits and scheduling options of a server.

    Attributes:
        handshake_timeout: seconds a client may take to reach transmission (None: no
            limit); the connection is closed after that.
        max_in_flight: requests per connection performed at once; reading pauses
            beyond (backpressure, and a bound on memory held by write payloads).
        max_connections: connections at once (None: no limit); more are closed at once.
        max_option_length: longest option data accepted in the handshake.
        threads: size of the thread pool for thread-safe backends (None: Python's
            default); a backend that takes one call at a time gets one thread of its
            own.
        buffer_size: receive buffer per connection.
        connection_threads: once in transmission, serve each plain (not TLS)
            connection from a thread of its own when its backend is a thread-safe
            :class:`~pynbd.server.backend.Backend` (see :mod:`pynbd.server.conn_thread`).
            False: every connection in the event loop.
        inline_max: READs, and WRITEs without FUA, of at most this many bytes to a
            thread-safe backend whose reads and writes are ``Blocking.CACHED`` run
            where the connection is read, not in the thread pool (0: never). A read
            that misses the cache, or a write the kernel throttles, holds that
            connection (and in the event loop, every other one) meanwhile.
    """

    handshake_timeout: float | None = 30.0
    max_in_flight: int = 64
    max_connections: int | None = None
    max_option_length: int = 64 * 1024
    threads: int | None = None
    buffer_size: int = 64 * 1024
    connection_threads: bool = True
    # A copy from or to the page cache of a few MiB costs less CPU than the hop to a
    # thread and back; bigger requests hold the connection too long.
    inline_max: int = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Plan:
    """How one connection's requests run (see the module's docstring).

    Attributes:
        threaded: the connection is served from a thread of its own.
        awaited: the backend is async: its calls are awaited in the event loop.
        inline: every request runs where the connection is read.
        inline_max: else READs, and WRITEs without FUA, of at most this many bytes do
            (0: none); the others go to the backend's executor.
        zero_copy: READs are answered from views of the backend's memory, and writes
            of whole pages received into it.
    """

    threaded: bool = False
    awaited: bool = False
    inline: bool = False
    inline_max: int = 0
    zero_copy: bool = False

    @property
    def offloads(self) -> bool:
        """Some requests go to the backend's executor."""
        return not (self.inline or self.awaited)

    def runs_inline(self, request: RequestReceived) -> bool:
        """Whether ``request`` runs where the connection is read."""
        if self.inline:
            return True
        if request.length > self.inline_max:
            return False
        command = request.command
        # (FUA waits for the disk: not inline, whatever the size)
        return command is _READ or (command is _WRITE and not int(request.flags) & _FUA)


def plan(backend: AnyBackend, limits: Limits, *, plain: bool) -> Plan:
    """The plan for a connection to ``backend``; ``plain``: without TLS."""
    if isinstance(backend, AsyncBackend):
        return Plan(awaited=True)
    caps = backend.capabilities
    overlap = caps.thread_safe
    never = caps.blocking is Blocking.NEVER
    return Plan(
        threaded=limits.connection_threads and plain and overlap,
        inline=never,
        inline_max=limits.inline_max if overlap and caps.blocking is Blocking.CACHED else 0,
        # Views are taken inline: with calls in the executor too, they must overlap.
        zero_copy=caps.zero_copy and plain and (overlap or never),
    )
