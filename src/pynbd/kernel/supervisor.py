"""Keep an nbd device alive across server deaths: the reconnect supervisor.

The kernel driver never reconnects by itself. When a connection dies it marks the
socket dead, multicasts NBD_CMD_LINK_DEAD and, with a dead-connection timeout, holds
the device's I/O while every connection is down. It takes a fresh, already negotiated
socket with NBD_CMD_RECONFIGURE, but only in place of a socket it has marked dead:
otherwise the new socket is silently dropped (the call still succeeds).

:class:`Supervisor` does the rest, in a thread of its own:

- it listens on the "nbd_mc_group" multicast group for LINK_DEAD, and watches each
  connection itself: it keeps its own descriptor of every socket it handed to the
  kernel and polls them. The kernel shuts a socket down when it marks it dead, so
  POLLHUP on our descriptor names exactly which connections died;
- it re-dials with capped exponential backoff through an *opener*
  (:data:`Opener`: a callable returning a socket in the transmission phase, ready for
  the kernel, and what its handshake negotiated), checks that the export is the same
  one (size, transmission flags; the backend identifier is repeated to the kernel,
  which checks it), and hands the socket over with RECONFIGURE;
- it checks that the kernel took the socket: the driver stamps every socket it adopts
  with the device's request timeout as SO_SNDTIMEO, which we read back. A dropped
  socket (RECONFIGURE raced the kernel marking the old one dead) is offered again;
- a server that never returns: it keeps trying until ``give_up_after`` seconds, then
  says so and stops. The kernel has failed the held I/O with EIO at the end of the
  dead-connection timeout; the device stays attached until detached.
- when every connection goes down without a LINK_DEAD event (which the kernel sends
  only for deaths it did not ask for), or the device loses its size or pid, someone
  detached the device: the supervisor stops.

Each event is logged in one line on the ``pynbd.kernel`` logger.

What the driver decides, and the supervisor cannot change:

- requests in flight on a connection that dies are resent (on another connection, or
  once one is back) only when their request timeout fires: that timeout is the worst
  delay a workload sees per death, so supervised devices want a short one (the guest
  tests use 3-4 s; the default is 30);
- with every connection down, new requests wait up to the dead-connection timeout, then
  fail with EIO, and so does everything after (until a reconnection);
- a resent request may also have reached the old server: a server that was only frozen
  (SIGSTOP, a long pause) may still execute its copy when it resumes. NBD has no way to
  fence the old connection; a server that died cannot.

The :data:`Opener` is the seam for other transports: :func:`pynbd.kernel.attach.
kernel_opener` wraps any raw stream (TCP, unix, a socketpair to the in-process server);
a TLS relay passes its own ``dial() -> (kernel_end, negotiated)``;
:func:`pynbd.kernel.attach.attach_opener` attaches through any of them.

:class:`Keepalive` holds the TCP settings (SO_KEEPALIVE, TCP_KEEPIDLE/INTVL/CNT,
TCP_USER_TIMEOUT) applied to every TCP socket before it is handed to the kernel.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..client import Negotiated
from ..errors import InvalidRequest, ProtocolError
from ..proto.constants import TransmissionFlag
from .device import NetlinkControl, device_path, sysfs_state
from .errors import KernelError

__all__ = [
    "Backoff",
    "ExportIdentity",
    "Keepalive",
    "Opener",
    "ReconnectPolicy",
    "Supervisor",
    "SupervisorState",
    "adopted_by_kernel",
]

log = logging.getLogger("pynbd.kernel")

#: A callable that opens one connection for the kernel: connect, negotiate (GO, simple
#: replies only), tune the socket, and return it with what the handshake negotiated.
#: It raises on failure (any exception counts as a failed attempt).
Opener = Callable[[], tuple[socket.socket, Negotiated]]

_DEAD_EVENTS = select.POLLHUP | select.POLLERR | select.POLLNVAL | select.POLLRDHUP


# --- TCP settings ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Keepalive:
    """TCP settings that let a connection notice a peer that vanished.

    The kernel's request timeout fires only while requests are outstanding; an idle
    connection to a host that died or a network that was cut stays "up" for ever
    without these. Linux's own defaults (probe after 2 h) are useless for a disk.

    Defaults: the first probe after 30 s of silence, then every 10 s, 3 unanswered
    probes: a vanished peer is found within about a minute, for one small packet per
    connection every 30 s. TCP_USER_TIMEOUT (default idle + interval * count = 60 s)
    ends a connection whose sent data stays unacknowledged that long (a write to a
    host that disappeared), instead of ~15 minutes of retransmissions; with it set,
    Linux also ends a connection on keepalive by this time rather than by the count.

    Keepalive probes are answered by the server's kernel, not by the server: a server
    process that hangs (SIGSTOP) is found only by the request timeout, when I/O waits.

    Attributes:
        idle: seconds of silence before the first probe (TCP_KEEPIDLE).
        interval: seconds between probes (TCP_KEEPINTVL).
        count: unanswered probes before the connection is dropped (TCP_KEEPCNT).
        user_timeout: seconds sent data may stay unacknowledged (TCP_USER_TIMEOUT);
            None: idle + interval * count; 0: the kernel's default (off).
        enabled: False leaves SO_KEEPALIVE off (and TCP_USER_TIMEOUT unless given).
    """

    idle: int = 30
    interval: int = 10
    count: int = 3
    user_timeout: float | None = None
    enabled: bool = True

    def __post_init__(self) -> None:
        for name in ("idle", "interval", "count"):
            value = getattr(self, name)
            if not 1 <= value <= 32767:
                raise InvalidRequest(f"keepalive {name} must be 1..32767, not {value}")
        if self.user_timeout is not None and not 0 <= self.user_timeout <= 2**31 // 1000:
            raise InvalidRequest(f"user timeout must be 0..2147483 s, not {self.user_timeout}")

    @classmethod
    def off(cls) -> Keepalive:
        """No keepalive and no user timeout."""
        return cls(enabled=False, user_timeout=0)

    @property
    def effective_user_timeout(self) -> float:
        """The TCP_USER_TIMEOUT applied, in seconds (0: none)."""
        if self.user_timeout is not None:
            return self.user_timeout
        return self.idle + self.interval * self.count if self.enabled else 0

    def apply(self, sock: socket.socket) -> None:
        """Set the options on ``sock`` if it is TCP (anything else is left alone).

        Raises:
            OSError: the kernel refused an option.
        """
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        if sock.type != socket.SOCK_STREAM:
            return
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, int(self.enabled))
        if self.enabled:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, self.idle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, self.interval)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, self.count)
        user_timeout = getattr(socket, "TCP_USER_TIMEOUT", 18)
        sock.setsockopt(socket.IPPROTO_TCP, user_timeout, int(self.effective_user_timeout * 1000))


# --- what the supervisor checks -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExportIdentity:
    """What must not change across a reconnection.

    Attributes:
        size: the export size the server announced.
        flags: its transmission flags.
        backend_id: the backend identifier given to the kernel (it refuses a
            RECONFIGURE that does not repeat it), or None.
    """

    size: int
    flags: TransmissionFlag
    backend_id: str | None = None

    @classmethod
    def of(cls, negotiated: Negotiated, backend_id: str | None = None) -> ExportIdentity:
        """The identity of a negotiated connection."""
        return cls(negotiated.size or 0, negotiated.flags, backend_id)

    def check(self, negotiated: Negotiated) -> None:
        """Raise unless ``negotiated`` is the same export.

        Raises:
            ProtocolError: another size or other transmission flags.
        """
        if negotiated.size != self.size:
            raise ProtocolError(f"the export's size changed: {self.size} -> {negotiated.size}")
        if negotiated.flags != self.flags:
            raise ProtocolError(
                f"the export's flags changed: {int(self.flags):#x} -> {int(negotiated.flags):#x}"
            )


@dataclass(frozen=True, slots=True)
class ReconnectPolicy:
    """How a supervisor reconnects (see :class:`Supervisor` for each field).

    Attributes:
        backoff: delays between failed attempts (default 0.1 s doubling up to 5 s).
        give_up_after: seconds of failed attempts before giving up; None: never.
        poll_interval: seconds between checks of the connections and the device.
        hand_over_timeout: seconds to keep offering a socket the kernel dropped.
    """

    backoff: Backoff | None = None
    give_up_after: float | None = 300.0
    poll_interval: float = 0.5
    hand_over_timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential backoff between reconnection attempts.

    Attributes:
        initial: the first delay, in seconds.
        factor: each delay is the previous one times this.
        cap: no delay is longer.
    """

    initial: float = 0.1
    factor: float = 2.0
    cap: float = 5.0

    def __post_init__(self) -> None:
        if self.initial <= 0 or self.factor < 1 or self.cap < self.initial:
            raise InvalidRequest(f"bad backoff {self}")

    def delays(self) -> Iterator[float]:
        """The delays, for ever: initial, initial * factor, ... up to cap."""
        delay = self.initial
        while True:
            yield delay
            delay = min(delay * self.factor, self.cap)


def adopted_by_kernel(sock: socket.socket) -> bool:
    """True when the nbd driver has adopted ``sock``.

    The driver sets SO_SNDTIMEO to the device's request timeout on every socket it
    starts using (CONNECT, RECONFIGURE); a socket we made has none. So this holds only
    for devices with a request timeout, which the supervisor requires.
    """
    with contextlib.suppress(OSError):
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, 16)
        seconds, micros = struct.unpack("@qq", raw)
        return bool(seconds > 0 or micros > 0)
    return False


class Control(Protocol):
    """The netlink calls the supervisor makes (a :class:`NetlinkControl`, or a fake)."""

    def subscribe(self) -> None: ...
    def events(self, timeout: float | None = None) -> Iterator[int]: ...
    def reconfigure(
        self, index: int, *, sockets: Sequence[int] = (), backend_id: str | None = None
    ) -> None: ...
    def close(self) -> None: ...


def _sysfs_attached(index: int) -> bool:
    state = sysfs_state(index)
    return state.exists and state.pid is not None and state.size > 0


class SupervisorState(enum.Enum):
    """Where a :class:`Supervisor` is."""

    STARTING = "starting"
    WATCHING = "watching"  # every connection is up
    RECONNECTING = "reconnecting"
    GAVE_UP = "gave up"  # the server did not come back in time
    DETACHED = "detached"  # someone detached the device
    STOPPED = "stopped"  # stop() was called
    FAILED = "failed"  # an unexpected error ended it (see last_error)


@dataclass
class _Slot:
    sock: socket.socket
    announced: bool = False  # a LINK_DEAD event was matched to its death

    def dead(self) -> bool:
        if self.sock.fileno() < 0:
            return True
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN | select.POLLRDHUP)
        return any(ev & _DEAD_EVENTS for _, ev in poller.poll(0))


class Supervisor:
    """Reconnect the connections of one netlink-attached nbd device as they die.

    Build it with the sockets just handed to the kernel (it keeps duplicates), then
    :meth:`start` its thread (or call :meth:`run` in a thread of yours) and
    :meth:`stop` it before detaching the device.

    Args:
        index: the device number.
        opener: makes one new connection (see :data:`Opener`).
        identity: what each new connection must match.
        sockets: the sockets handed to the kernel, in order.
        dead_timeout: the device's dead-connection timeout, for the log.
        backoff: delays between failed attempts.
        give_up_after: seconds of failed attempts before giving up (None: never).
        poll_interval: seconds between checks of the connections and the device.
        hand_over_timeout: seconds to keep offering a socket the kernel dropped.
        announce_grace: seconds to wait for LINK_DEAD once connections are seen dead.
        control: makes the netlink channel (default :class:`NetlinkControl`).
        adopted: tells whether the kernel adopted a socket (default
            :func:`adopted_by_kernel`).
        attached: tells whether the device is still attached (default: sysfs has
            its pid and a size).

    Raises:
        InvalidRequest: no socket.
    """

    def __init__(
        self,
        index: int,
        opener: Opener,
        identity: ExportIdentity,
        sockets: Sequence[socket.socket],
        *,
        dead_timeout: float | None = None,
        backoff: Backoff | None = None,
        give_up_after: float | None = 300.0,
        poll_interval: float = 0.5,
        hand_over_timeout: float = 5.0,
        announce_grace: float = 2.0,
        control: Callable[[], Control] = NetlinkControl,
        adopted: Callable[[socket.socket], bool] = adopted_by_kernel,
        attached: Callable[[int], bool] | None = None,
    ) -> None:
        if not sockets:
            raise InvalidRequest("the supervisor needs the device's sockets")
        self.index = index
        self.device = device_path(index)
        self._opener = opener
        self.identity = identity
        self._slots = [_Slot(s.dup()) for s in sockets]
        self._dead_timeout = dead_timeout
        self._backoff = backoff or Backoff()
        self._give_up_after = give_up_after
        self._poll = poll_interval
        self._hand_over_timeout = hand_over_timeout
        self._grace = announce_grace
        self._control_factory = control
        self._adopted = adopted
        self._attached = attached or _sysfs_attached
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._unclaimed = 0  # LINK_DEAD events for us not yet matched to a dead slot
        self._events_lost = False  # ENOBUFS: some events were lost
        self.state = SupervisorState.STARTING
        #: Connections replaced so far.
        self.reconnects = 0
        #: Seconds the last reconnection took, from the death seen to the hand-over.
        self.last_reconnect_seconds: float | None = None
        #: When (time.monotonic()) the last connection was handed over.
        self.last_reconnect_at: float | None = None
        #: The last error met (a failed attempt, or what ended the supervisor).
        self.last_error: BaseException | None = None
        #: Set when the supervisor ends (gave up, detached, stopped, failed).
        self.done = threading.Event()

    # -- control ---------------------------------------------------------------------

    def start(self) -> Supervisor:
        """Run :meth:`run` in a daemon thread; returns self."""
        self._thread = threading.Thread(
            target=self.run, name=f"pynbd supervisor {self.device}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop supervising (the device stays as it is) and wait for the thread.

        An attempt under way (a handshake) is left to its own timeout; the thread
        does not hand anything over after this call.
        """
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if not self.done.is_set():
            self._close_slots()

    @property
    def total_connections(self) -> int:
        """How many connections the device has."""
        return len(self._slots)

    def live_connections(self) -> int:
        """How many of the device's connections are up (adopted and not shut down)."""
        with self._lock:
            return sum(1 for s in self._slots if not s.dead() and self._adopted(s.sock))

    def drop_connection(self, n: int) -> None:
        """Fault injection: shut connection ``n`` down, as a cut network would.

        Raises:
            IndexError: no such connection.
        """
        with self._lock, contextlib.suppress(OSError):
            self._slots[n].sock.shutdown(socket.SHUT_RDWR)

    # -- the loop --------------------------------------------------------------------

    def run(self) -> None:
        """Supervise until stopped, given up, or the device is detached."""
        try:
            control = self._control_factory()
        except BaseException as exc:
            self._finish(SupervisorState.FAILED, exc, f"cannot open netlink: {exc}")
            return
        try:
            control.subscribe()
            self._set_state(SupervisorState.WATCHING)
            log.info("%s: supervising %d connection(s)", self.device, len(self._slots))
            self._loop(control)
        except BaseException as exc:
            self._finish(SupervisorState.FAILED, exc, f"supervisor failed: {exc!r}")
        finally:
            control.close()
            if not self.done.is_set():
                self._finish(SupervisorState.STOPPED, None, "supervisor stopped")

    def _loop(self, control: Control) -> None:
        while not self._stop.is_set():
            self._wait_events(control, self._poll)
            if self._stop.is_set():
                return
            if self._device_gone():
                self._finish(SupervisorState.DETACHED, None, "detached: supervisor ends")
                return
            dead = self._dead_slots()
            if not dead:
                continue
            if not self._announced_since(dead) and not self._wait_announcement(control, dead):
                return
            self._recover(control, dead)
            if self.done.is_set():
                return

    def _wait_events(self, control: Control, timeout: float) -> None:
        """Wait up to ``timeout`` for netlink events; note LINK_DEAD for our device."""
        try:
            for index in control.events(timeout):
                self._note(index)
                break
            for index in control.events(0):  # drain what is queued, without waiting
                self._note(index)
        except KernelError as exc:
            if exc.errno != errno.ENOBUFS:
                raise
            # Events were lost: assume ours were among them.
            self._events_lost = True

    def _note(self, index: int) -> None:
        if index == self.index:
            self._unclaimed += 1

    def _dead_slots(self) -> list[_Slot]:
        with self._lock:
            return [s for s in self._slots if s.dead()]

    def _announced_since(self, dead: Sequence[_Slot]) -> bool:
        """Match LINK_DEAD events to the dead connections (the kernel sends one per
        death it did not ask for); True when every one of them got one."""
        for slot in dead:
            if not slot.announced and (self._unclaimed or self._events_lost):
                self._unclaimed = max(0, self._unclaimed - 1)
                slot.announced = True
        if dead:
            self._events_lost = False
        return all(slot.announced for slot in dead)

    def _wait_announcement(self, control: Control, dead: Sequence[_Slot]) -> bool:
        """Connections are down and no LINK_DEAD came (yet). The kernel announces
        every death it did not cause itself; a disconnect it was asked for is silent.
        Returns False when the device was detached."""
        deadline = time.monotonic() + self._grace
        while time.monotonic() < deadline and not self._stop.is_set():
            self._wait_events(control, min(self._poll, 0.2))
            if self._announced_since(dead):
                return True
        if self._stop.is_set():
            return False
        if len(dead) == len(self._slots) and not self._announced_since(dead):
            self._finish(
                SupervisorState.DETACHED,
                None,
                "every connection was shut down without LINK_DEAD: the device was "
                "disconnected (pynbd detach?); supervisor ends",
            )
            return False
        return True  # some connections died and the event was lost: repair them

    def _device_gone(self) -> bool:
        return not self._attached(self.index)

    # -- recovery --------------------------------------------------------------------

    def _recover(self, control: Control, dead: Sequence[_Slot]) -> None:
        started = time.monotonic()
        self._set_state(SupervisorState.RECONNECTING)
        log.warning(
            "%s: link dead: %d of %d connection(s) down%s",
            self.device,
            len(dead),
            len(self._slots),
            f" (I/O held up to {self._dead_timeout:g} s)"
            if self._dead_timeout and len(dead) == len(self._slots)
            else "",
        )
        delays = self._backoff.delays()
        attempt = 0
        all_dead = len(dead) == len(self._slots)
        for slot in dead:
            while True:
                if self._stop.is_set():
                    return
                attempt += 1
                if self._replace(control, slot, attempt, started):
                    break
                elapsed = time.monotonic() - started
                if self._give_up_after is not None and elapsed >= self._give_up_after:
                    self._finish(
                        SupervisorState.GAVE_UP,
                        self.last_error,
                        f"giving up after {attempt} attempt(s) in {elapsed:.1f} s "
                        f"(last error: {self.last_error}); the device stays attached and "
                        f"its I/O fails: detach it (pynbd detach {self.device})",
                    )
                    return
                if all_dead and self._dead_timeout and elapsed >= self._dead_timeout:
                    all_dead = False  # said once
                    log.error(
                        "%s: dead timeout (%g s) passed: held I/O failed with EIO; still trying",
                        self.device,
                        self._dead_timeout,
                    )
                delay = next(delays)
                log.info("%s: attempt %d failed (%s); next in %.2g s",
                         self.device, attempt, self.last_error, delay)  # fmt: skip
                self._wait_events(control, delay)
                if self._device_gone():
                    self._finish(SupervisorState.DETACHED, None, "detached: supervisor ends")
                    return
        self.last_reconnect_seconds = time.monotonic() - started
        self._set_state(SupervisorState.WATCHING)

    def _replace(self, control: Control, slot: _Slot, attempt: int, started: float) -> bool:
        """One attempt: dial, check, hand over. True when the kernel took the socket."""
        try:
            sock, negotiated = self._opener()
        except Exception as exc:  # any failure of the opener is a failed attempt
            self.last_error = exc
            return False
        try:
            self.identity.check(negotiated)
            if not self._hand_over(control, sock):
                raise KernelError(
                    errno.EAGAIN,
                    f"the kernel took no socket in {self._hand_over_timeout:g} s",
                    call="NBD_CMD_RECONFIGURE",
                    device=self.device,
                )
        except BaseException as exc:
            sock.close()
            self.last_error = exc
            if isinstance(exc, ProtocolError):
                log.error("%s: not the same export, not handed over: %s", self.device, exc)
            if not isinstance(exc, Exception):
                raise
            return False
        with self._lock:
            position = self._slots.index(slot)
            self._slots[position] = _Slot(sock)
            slot.sock.close()
        self.reconnects += 1
        self.last_reconnect_at = time.monotonic()
        log.warning(
            "%s: reconnected connection %d/%d in %.2f s (attempt %d)",
            self.device,
            position + 1,
            len(self._slots),
            time.monotonic() - started,
            attempt,
        )
        return True

    def _hand_over(self, control: Control, sock: socket.socket) -> bool:
        """RECONFIGURE with ``sock`` until the kernel adopts it. The kernel drops a
        socket when no connection is marked dead yet (its own shutdown may lag the
        peer's close that we saw): offer it again for a while."""
        deadline = time.monotonic() + self._hand_over_timeout
        delay = 0.02
        while True:
            if self._stop.is_set():
                return False
            try:
                control.reconfigure(
                    self.index, sockets=[sock.fileno()], backend_id=self.identity.backend_id
                )
            except KernelError:
                # No answer in time may still mean the kernel took it.
                if self._adopted(sock):
                    return True
                raise
            if self._adopted(sock):
                return True
            if time.monotonic() >= deadline:
                return False
            log.info("%s: RECONFIGURE took no socket (none dead yet): again", self.device)
            self._stop.wait(delay)
            delay = min(delay * 2, 0.5)

    # -- bookkeeping -----------------------------------------------------------------

    def _set_state(self, state: SupervisorState) -> None:
        self.state = state

    def _finish(self, state: SupervisorState, exc: BaseException | None, text: str) -> None:
        self.state = state
        if exc is not None:
            self.last_error = exc
        level = (
            logging.INFO
            if state in (SupervisorState.STOPPED, SupervisorState.DETACHED)
            else (logging.ERROR)
        )
        log.log(level, "%s: %s", self.device, text)
        self._close_slots()
        self.done.set()

    def _close_slots(self) -> None:
        with self._lock:
            for slot in self._slots:
                slot.sock.close()
