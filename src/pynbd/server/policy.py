"""How the server runs requests: its :class:`Limits` (the one place where every limit of
the server is set, with its default and its ``pynbd serve`` option), the
:class:`Plan` it draws for each connection from what the export's backend declares,
and its rate-limited log (:class:`LogLimiter`) for what may repeat without bound.

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

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..proto.constants import Cmd, CmdFlag
from ..proto.server import RequestReceived
from .backend import AnyBackend, AsyncBackend, Blocking

__all__ = ["Limits", "LogLimiter", "Plan", "limited_log", "plan"]

_READ = Cmd.READ
_WRITE = Cmd.WRITE
_FUA = int(CmdFlag.FUA)


MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Limits:
    """Resource limits and scheduling options of a server: the one place they are set.

    Each limit, its default, and the ``pynbd serve`` option that sets it:

    - ``max_connections`` (1024; ``--max-connections N``): connections at once. The
      one over the limit gets the greeting, and every option it sends is refused with
      NBD_REP_ERR_SHUTDOWN and the message "too many connections (limit N)" (an
      NBD_OPT_EXPORT_NAME, which cannot be refused politely, is answered by closing);
      a client that has closed its end frees its place at once. The server also
      takes no more connections than its descriptor limit allows (RLIMIT_NOFILE: two
      descriptors per connection, after a reserve for itself); ``pynbd serve`` raises
      its soft limit to the hard one at start. None: no limit but that one.
    - ``handshake_timeout`` (30 s; ``--handshake-timeout S``, 0: none): seconds a
      client may take to reach transmission; the connection is closed after that.
    - ``max_options`` (32; ``--max-options N``): options one handshake may send; the
      next one is refused and the connection closed (as nbdkit does).
    - ``max_option_length`` (64 KiB; ``--max-option-length SIZE``): longest option
      data accepted; a longer option closes the connection.
    - ``idle_timeout`` (None: off; ``--idle-timeout S``): a connection in
      transmission with no request in flight (no backend call under way), nothing
      received and nothing sent for that many seconds is closed: cleanly, or at once
      when replies wait that its client does not read, or half a request came. Off
      by default: the kernel may leave a device idle for days.
    - ``max_in_flight`` (64; ``--max-in-flight N``): requests per connection
      performed at once.
    - ``max_in_flight_bytes`` (32 MiB; ``--max-in-flight-bytes SIZE``): bytes per
      connection held for requests in flight: WRITE payloads until the backend is
      done with them, READ replies until they are handed to the socket or to a
      transport that has room (a READ's buffer is taken only when its backend call
      starts). Past either bound the connection is not read (backpressure) until
      requests complete; one request is always taken when none is in flight, so a
      connection holds at most this much plus one request (32 MiB at most, the
      protocol's default maximum payload, which is also why this is the default).

    Scheduling options (see the module's docstring):

    Attributes:
        threads: size of the thread pool for thread-safe backends (None: Python's
            default; ``--threads N``); a backend that takes one call at a time gets
            one thread of its own.
        buffer_size: receive buffer per connection.
        connection_threads: once in transmission, serve each plain (not TLS)
            connection from a thread of its own when its backend is a thread-safe
            :class:`~pynbd.server.backend.Backend` (see :mod:`pynbd.server.conn_thread`).
            False (``--no-connection-threads``): every connection in the event loop.
        inline_max: READs, and WRITEs without FUA, of at most this many bytes to a
            thread-safe backend whose reads and writes are ``Blocking.CACHED`` run
            where the connection is read, not in the thread pool (0: never). A read
            that misses the cache, or a write the kernel throttles, holds that
            connection (and in the event loop, every other one) meanwhile.

    Raises:
        ValueError: a limit below 1 (or a timeout not above 0).
    """

    handshake_timeout: float | None = 30.0
    max_in_flight: int = 64
    max_in_flight_bytes: int = 32 * MiB
    max_connections: int | None = 1024
    max_options: int = 32
    max_option_length: int = 64 * 1024
    idle_timeout: float | None = None
    threads: int | None = None
    buffer_size: int = 64 * 1024
    connection_threads: bool = True
    # A copy from or to the page cache of a few MiB costs less CPU than the hop to a
    # thread and back; bigger requests hold the connection too long.
    inline_max: int = 4 * MiB

    def __post_init__(self) -> None:
        for name in ("max_in_flight", "max_in_flight_bytes", "max_options", "max_option_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"Limits.{name} must be at least 1")
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError("Limits.max_connections must be at least 1 (or None)")
        for name in ("handshake_timeout", "idle_timeout"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"Limits.{name} must be above 0 (or None)")


class LogLimiter:
    """At most one log line of each kind per ``interval`` seconds.

    A peer, or the lack of a resource, can make the same thing happen thousands of
    times a second (a refused connection, a failed ``accept``); the log gets the first
    line of each kind in an interval, and the first one after it says how many were
    left out. Safe to call from any thread.

    Args:
        logger: where lines go.
        interval: seconds between two lines of one kind.
        clock: the time, in seconds (a test's clock).
    """

    #: Kinds remembered at most (the oldest are forgotten beyond).
    MAX_KINDS = 256

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self._lock = threading.Lock()
        # kind -> [when its last line was logged, lines left out since]
        self._kinds: dict[str, list[float]] = {}

    def log(self, level: int, kind: str, msg: str, *args: object, exc_info: Any = None) -> bool:
        """Log ``msg % args`` at ``level`` unless a line of ``kind`` was logged less
        than ``interval`` seconds ago; True if it was logged."""
        now = self.clock()
        with self._lock:
            entry = self._kinds.get(kind)
            if entry is not None and now - entry[0] < self.interval:
                entry[1] += 1
                return False
            left_out = int(entry[1]) if entry is not None else 0
            if entry is None and len(self._kinds) >= self.MAX_KINDS:
                del self._kinds[next(iter(self._kinds))]
            self._kinds[kind] = [now, 0]
        if left_out:
            msg += " (and %d more like it in the last %.0f s)"
            args += (left_out, now - entry[0] if entry is not None else 0.0)
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True

    def warning(self, kind: str, msg: str, *args: object) -> bool:
        """:meth:`log` at WARNING."""
        return self.log(logging.WARNING, kind, msg, *args)


#: The server's rate-limited log (``pynbd.server``), shared by its every part.
limited_log = LogLimiter(logging.getLogger("pynbd.server"))


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
