"""What the hostile-server tests share: their limits, the standard read, and the checks.

Time. No check here depends on how fast the host is:

- Every client's own timeout (CLIENT_TIMEOUT) is far longer than any call that should
  succeed can take, even on a loaded host.
- A call that is meant to time out is given TIMEOUT (:func:`times_out`). It must raise
  NBDTimeout, not before TIMEOUT, and before the server gives up on it: a silent server
  closes the connection after LATE seconds (:func:`silence`), so a client that
  overstays its deadline sees the end of the stream instead, and a trickling server
  runs out of bytes to send long after TIMEOUT.
- A client that hangs fails its test after tests.drivers.HANG_LIMIT.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import pytest

from pynbd.errors import ConnectionClosed, NBDTimeout

from .server import (
    Close,
    Do,
    ExpectRequest,
    HostileServer,
    ScriptError,
    Send,
    Session,
    Silent,
    Step,
    Style,
    handshake,
)

CLIENT_TIMEOUT = 30.0  # every client's own timeout: no call that should succeed reaches it
TIMEOUT = 0.25  # the timeout of a call that is meant to time out
LATE = 20.0  # a silent server gives up (closes) after this long
SENTINEL = 0xA5
READ_OFFSET = 4096
READ_LENGTH = 512
PATTERN = bytes(range(256)) * 2  # what a correct reply to the read carries


def sentinel(n: int = READ_LENGTH) -> bytearray:
    return bytearray([SENTINEL]) * n


def fails(
    exc: type[BaseException] | tuple[type[BaseException], ...],
    fn: Callable[..., Any],
    *args: Any,
    **kwargs: Any,
) -> pytest.ExceptionInfo[BaseException]:
    """Call ``fn``; it must raise ``exc``.

    (A client that waited for more instead of failing at once would raise NBDTimeout
    after CLIENT_TIMEOUT, or hit HANG_LIMIT: neither is the error expected here.)
    """
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    return info


def times_out(fn: Callable[..., Any], *args: Any, limit: float = TIMEOUT, **kwargs: Any) -> None:
    """``fn(*args, timeout=limit, **kwargs)`` must raise NBDTimeout, not before ``limit``."""
    start = time.monotonic()
    fails(NBDTimeout, fn, *args, timeout=limit, **kwargs)
    assert time.monotonic() - start >= limit * 0.9, "timed out too early"


def read_fails(
    c: Any, exc: type[BaseException] | tuple[type[BaseException], ...]
) -> tuple[pytest.ExceptionInfo[BaseException], bytearray]:
    """The standard read must raise ``exc``; returns the error and the buffer."""
    buf = sentinel()
    info = fails(exc, c.pread_into, buf, READ_OFFSET)
    return info, buf


def assert_dead(c: Any, server: HostileServer) -> None:
    """After a fatal error: closed, the socket really closed, further calls refused."""
    assert c.closed, "client.closed is False after a fatal error"
    assert server.wait_peer_closed(), "the client's socket is still open"
    fails(ConnectionClosed, c.pread, READ_LENGTH, 0)


def assert_alive(c: Any, server: HostileServer) -> None:
    """The connection still works: the script answers one more read correctly."""
    assert not c.closed
    assert c.pread(READ_LENGTH, READ_OFFSET) == PATTERN


def gave_up_first(server: HostileServer) -> None:
    """The client closed while the server was still sending a trickle (so its
    deadline held): the script ended early, at a Send to the closed socket."""
    server.wait()
    assert server.ended_early is not None, "the client waited out the whole trickle"


def answer_read() -> list[Step]:
    """Steps that answer the next read correctly."""
    return [ExpectRequest(), Send(lambda s: s.read_ok(PATTERN))]


def silence() -> list[Step]:
    """Say nothing until the client closes; give up after LATE seconds and close."""
    return [Silent(LATE), Close()]


def bad_magic(reply: bytes) -> bytes:
    """``reply`` with its first four bytes (the magic) replaced."""
    return b"\xde\xad\xbe\xef" + reply[4:]


def stranger(s: Session) -> int:
    """A cookie the client never sent."""
    return s.last.cookie + 99


def transmission(style: Style, *steps: Step) -> list[Step]:
    """A correct handshake, the client's first request, then ``steps``."""
    return [*handshake(style), ExpectRequest(), *steps]


class Usr1:
    """SIGUSR1 for the thread that runs the test, sent by the server mid-script.

    :meth:`step` is a script step that sends the signal and waits until the handler has
    run, so the server goes on only once the client's call was interrupted (or the
    handler ran between two of its system calls: the result must be the same). The
    handler counts in ``seen``, then raises ``raises`` if that is set.
    """

    def __init__(self) -> None:
        self.thread = threading.get_ident()
        self.seen: list[int] = []
        self.raises: type[BaseException] | None = None
        self._ran = threading.Event()

    def handler(self, signum: int, frame: FrameType | None) -> None:
        self.seen.append(signum)
        self._ran.set()
        if self.raises is not None:
            raise self.raises

    def step(self) -> Step:
        def send(s: Session) -> None:
            signal.pthread_kill(self.thread, signal.SIGUSR1)
            if not self._ran.wait(s.io_timeout):
                raise ScriptError("the SIGUSR1 handler did not run")

        return Do(send)
