"""The reconnect supervisor's logic (pynbd.kernel.supervisor), against a fake driver.

The fake plays the kernel's part with real socketpairs: it holds the sockets it was
given, "kills" a connection the way the driver does (shuts the socket down and
multicasts LINK_DEAD, or stays silent for a disconnect it was asked for), and adopts a
socket on RECONFIGURE only in place of a dead one, stamping it with SO_SNDTIMEO as
the driver does; otherwise it drops it silently. The real driver is exercised in the
guest (tests/kernel/test_supervisor.py).
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import socket
import struct
import threading
import time
from collections.abc import Iterator, Sequence

import pytest

from pynbd.errors import InvalidRequest
from pynbd.kernel.errors import KernelError
from pynbd.kernel.supervisor import (
    Backoff,
    ExportIdentity,
    Keepalive,
    Supervisor,
    SupervisorState,
    adopted_by_kernel,
)
from pynbd.proto.constants import TransmissionFlag
from pynbd.proto.handshake import Negotiated

INDEX = 3
SIZE = 1 << 20
FLAGS = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH
# Seconds to wait for what must happen (a hang guard, not a verdict on speed).
WAIT = 30.0


def _stamp(sock: socket.socket, seconds: int = 5) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("@qq", seconds, 0))


class FakeKernel:
    """The driver's side of one device, and the netlink control that reaches it."""

    def __init__(self, connections: int, backend_id: str | None = None) -> None:
        self.backend_id = backend_id
        self.events: queue.Queue[int] = queue.Queue()
        self.slots: list[socket.socket] = []
        self.dead: list[bool] = []
        self.given: list[socket.socket] = []  # what the test hands to the supervisor
        self.reconfigures = 0
        self.drop = 0  # RECONFIGUREs to drop as if no connection were dead yet
        self.attached = True
        self.peers: list[socket.socket] = []
        for _ in range(connections):
            ours, theirs = socket.socketpair()
            self.peers.append(theirs)
            self._adopt(ours.fileno(), len(self.slots))
            self.given.append(ours)

    def _adopt(self, fd: int, slot: int) -> None:
        sock = socket.socket(fileno=os.dup(fd))
        _stamp(sock)
        if slot == len(self.slots):
            self.slots.append(sock)
            self.dead.append(False)
        else:
            self.slots[slot].close()
            self.slots[slot], self.dead[slot] = sock, False

    def kill(self, slot: int, *, announce: bool = True) -> None:
        """The connection died: shut down (as nbd_mark_nsock_dead), LINK_DEAD."""
        self.slots[slot].shutdown(socket.SHUT_RDWR)
        self.dead[slot] = True
        if announce:
            self.events.put(INDEX)

    def disconnect(self, sup: Supervisor) -> None:
        """A disconnect the kernel was asked for: every connection shut down, no
        LINK_DEAD. The supervisor sees them all down at once, never one of them alone
        (which it would take for one death whose event was lost), however the threads
        are scheduled: its lock is held meanwhile."""
        with sup._lock:
            for slot in range(len(self.slots)):
                self.kill(slot, announce=False)

    def live(self) -> int:
        return self.dead.count(False)

    def close(self) -> None:
        for sock in [*self.slots, *self.given, *self.peers]:
            sock.close()

    # -- the Control protocol --------------------------------------------------------

    def subscribe(self) -> None:
        pass

    def events_iter(self, timeout: float | None) -> Iterator[int]:
        while True:
            try:
                if timeout == 0:
                    yield self.events.get_nowait()
                else:
                    yield self.events.get(timeout=timeout)
            except queue.Empty:
                return

    def reconfigure(
        self, index: int, *, sockets: Sequence[int] = (), backend_id: str | None = None
    ) -> None:
        assert index == INDEX
        if self.backend_id is not None and backend_id != self.backend_id:
            raise KernelError(errno.EINVAL, "backend image doesn't match")
        self.reconfigures += 1
        for fd in sockets:
            if self.drop:
                self.drop -= 1
                return  # -ENOSPC, swallowed: the socket is dropped silently
            if True not in self.dead:
                return
            self._adopt(fd, self.dead.index(True))

    def is_attached(self, index: int) -> bool:
        return self.attached


class _Control:
    """Adapts FakeKernel to the Control protocol (events() is a generator method)."""

    def __init__(self, kernel: FakeKernel) -> None:
        self.k = kernel

    def subscribe(self) -> None:
        self.k.subscribe()

    def events(self, timeout: float | None = None) -> Iterator[int]:
        return self.k.events_iter(timeout)

    def reconfigure(
        self, index: int, *, sockets: Sequence[int] = (), backend_id: str | None = None
    ) -> None:
        self.k.reconfigure(index, sockets=sockets, backend_id=backend_id)

    def close(self) -> None:
        pass


class Opener:
    """Dials the fake server: fails ``failures`` times first, then answers with
    ``sizes`` in turn (the last one repeated)."""

    def __init__(self, failures: int = 0, sizes: Sequence[int] = (SIZE,)) -> None:
        self.failures = failures
        self.sizes = list(sizes)
        self.calls = 0
        self.peers: list[socket.socket] = []

    def __call__(self) -> tuple[socket.socket, Negotiated]:
        self.calls += 1
        if self.failures:
            self.failures -= 1
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        size = self.sizes.pop(0) if len(self.sizes) > 1 else self.sizes[0]
        ours, theirs = socket.socketpair()
        self.peers.append(theirs)
        return ours, Negotiated(size=size, flags=FLAGS, in_transmission=True)

    def close(self) -> None:
        for sock in self.peers:
            sock.close()


def _supervisor(
    kernel: FakeKernel, opener: Opener, *, backend_id: str | None = None, **kw: object
) -> Supervisor:
    options: dict[str, object] = {
        "backoff": Backoff(0.01, 2.0, 0.05),
        "poll_interval": 0.05,
        "announce_grace": 0.3,
        "hand_over_timeout": 2.0,
    }
    options.update(kw)
    return Supervisor(
        INDEX,
        opener,
        ExportIdentity(SIZE, FLAGS, backend_id),
        kernel.given,
        control=lambda: _Control(kernel),
        attached=kernel.is_attached,
        **options,  # type: ignore[arg-type]
    ).start()


def _until(cond: object, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def caplog_info(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="pynbd.kernel")
    return caplog


# --------------------------------------------------------------------------- pieces


def test_backoff_doubles_up_to_the_cap() -> None:
    delays = Backoff(0.1, 2.0, 0.5).delays()
    assert [round(next(delays), 3) for _ in range(6)] == [0.1, 0.2, 0.4, 0.5, 0.5, 0.5]
    with pytest.raises(InvalidRequest):
        Backoff(1.0, 2.0, 0.5)


def test_identity_check() -> None:
    identity = ExportIdentity(SIZE, FLAGS)
    identity.check(Negotiated(size=SIZE, flags=FLAGS))
    with pytest.raises(Exception, match="size changed"):
        identity.check(Negotiated(size=SIZE * 2, flags=FLAGS))
    with pytest.raises(Exception, match="flags changed"):
        identity.check(Negotiated(size=SIZE, flags=FLAGS | TransmissionFlag.READ_ONLY))


def test_adopted_by_kernel_reads_the_send_timeout_the_driver_sets() -> None:
    a, b = socket.socketpair()
    with a, b:
        assert not adopted_by_kernel(a)
        _stamp(b, 30)  # the same socket seen through another descriptor: no
        assert not adopted_by_kernel(a)
        _stamp(a, 30)
        assert adopted_by_kernel(a)


def test_keepalive_on_tcp_and_not_on_unix() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    with listener, socket.create_connection(listener.getsockname()) as sock:
        Keepalive(idle=7, interval=3, count=4).apply(sock)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 7
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 3
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 4
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 19_000
        Keepalive(user_timeout=2.5).apply(sock)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 2_500
        Keepalive.off().apply(sock)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 0
    a, b = socket.socketpair()
    with a, b:
        Keepalive().apply(a)  # a unix socket: nothing to set, nothing raised
    with pytest.raises(InvalidRequest):
        Keepalive(idle=0)


# --------------------------------------------------------------------------- reconnecting


def test_a_dead_link_is_redialled_and_handed_over(caplog_info: pytest.LogCaptureFixture) -> None:
    kernel, opener = FakeKernel(1), Opener()
    sup = _supervisor(kernel, opener)
    try:
        _until(lambda: sup.state is SupervisorState.WATCHING)
        assert sup.live_connections() == 1
        kernel.kill(0)
        _until(lambda: sup.reconnects == 1)
        assert kernel.live() == 1 and sup.live_connections() == 1
        assert opener.calls == 1 and kernel.reconfigures == 1
        assert sup.last_reconnect_seconds is not None and sup.last_reconnect_seconds < WAIT
        lines = [r.getMessage() for r in caplog_info.records]
        assert any("link dead: 1 of 1" in line for line in lines), lines
        assert any("reconnected connection 1/1" in line for line in lines), lines
        assert all("\n" not in line for line in lines)
    finally:
        sup.stop()
        kernel.close()
        opener.close()
    assert sup.state is SupervisorState.STOPPED


def test_failed_attempts_back_off_then_succeed() -> None:
    kernel, opener = FakeKernel(1), Opener(failures=4)
    sup = _supervisor(kernel, opener)
    try:
        _until(lambda: sup.state is SupervisorState.WATCHING)
        start = time.monotonic()
        kernel.kill(0)
        _until(lambda: sup.reconnects == 1)
        # 0.01 + 0.02 + 0.04 + 0.05 s of backoff at least.
        assert time.monotonic() - start >= 0.12
        assert opener.calls == 5 and kernel.live() == 1
        assert isinstance(sup.last_error, ConnectionRefusedError)
    finally:
        sup.stop()
        kernel.close()
        opener.close()


def test_another_export_is_not_handed_over(caplog_info: pytest.LogCaptureFixture) -> None:
    kernel, opener = FakeKernel(1), Opener(sizes=[SIZE * 2, SIZE])
    sup = _supervisor(kernel, opener)
    try:
        _until(lambda: sup.state is SupervisorState.WATCHING)
        kernel.kill(0)
        _until(lambda: sup.reconnects == 1)
        assert opener.calls == 2 and kernel.reconfigures == 1  # the wrong one never went
        assert any("not the same export" in r.getMessage() for r in caplog_info.records)
    finally:
        sup.stop()
        kernel.close()
        opener.close()


def test_a_socket_the_kernel_dropped_is_offered_again(
    caplog_info: pytest.LogCaptureFixture,
) -> None:
    kernel, opener = FakeKernel(1), Opener()
    kernel.drop = 2  # RECONFIGURE raced the kernel marking the connection dead
    sup = _supervisor(kernel, opener)
    try:
        _until(lambda: sup.state is SupervisorState.WATCHING)
        kernel.kill(0)
        _until(lambda: sup.reconnects == 1)
        assert kernel.reconfigures == 3 and opener.calls == 1 and kernel.live() == 1
        assert any("took no socket" in r.getMessage() for r in caplog_info.records)
    finally:
        sup.stop()
        kernel.close()
        opener.close()


def test_one_of_four_connections(caplog_info: pytest.LogCaptureFixture) -> None:
    kernel, opener = FakeKernel(4, backend_id="nbd://server/disk"), Opener()
    sup = _supervisor(kernel, opener, backend_id="nbd://server/disk")
    try:
        _until(lambda: sup.state is SupervisorState.WATCHING)
        untouched = [kernel.slots[i] for i in (0, 1, 3)]
        kernel.kill(2)
        _until(lambda: sup.reconnects == 1)
        assert sup.live_connections() == 4 == kernel.live()
        assert [kernel.slots[i] for i in (0, 1, 3)] == untouched
        assert opener.calls == 1
        assert any("1 of 4" in r.getMessage() for r in caplog_info.records)
    finally:
        sup.stop()
        kernel.close()
        opener.close()


def test_giving_up(caplog_info: pytest.LogCaptureFixture) -> None:
    kernel, opener = FakeKernel(1), Opener(failures=10**6)
    sup = _supervisor(kernel, opener, give_up_after=0.3)
    try:
        _until(lambda: sup.state is SupervisorState.WATCHING)
        kernel.kill(0)
        assert sup.done.wait(WAIT)
        assert sup.state is SupervisorState.GAVE_UP
        assert sup.live_connections() == 0
        line = caplog_info.records[-1].getMessage()
        assert "giving up" in line and "pynbd detach" in line, line
        # How many attempts fit in 0.3 s depends on the host; the log counts them all.
        assert opener.calls >= 1 and f"after {opener.calls} attempt(s)" in line, line
    finally:
        sup.stop()
        kernel.close()
        opener.close()


def test_a_silent_shutdown_of_every_link_is_a_detach(
    caplog_info: pytest.LogCaptureFixture,
) -> None:
    kernel, opener = FakeKernel(2), Opener()
    sup = _supervisor(kernel, opener)
    try:
        _until(lambda: sup.state is SupervisorState.WATCHING)
        kernel.disconnect(sup)
        assert sup.done.wait(WAIT)
        assert sup.state is SupervisorState.DETACHED and opener.calls == 0
    finally:
        sup.stop()
        kernel.close()
        opener.close()


def test_a_silent_shutdown_after_a_repair_is_still_a_detach() -> None:
    kernel, opener = FakeKernel(2), Opener()
    sup = _supervisor(kernel, opener)
    try:
        _until(lambda: sup.state is SupervisorState.WATCHING)
        kernel.kill(1)  # announced, repaired
        _until(lambda: sup.reconnects == 1)
        kernel.disconnect(sup)  # then a requested disconnect: silent
        assert sup.done.wait(WAIT)
        assert sup.state is SupervisorState.DETACHED and opener.calls == 1
    finally:
        sup.stop()
        kernel.close()
        opener.close()


def test_a_lost_announcement_of_a_partial_death_is_repaired() -> None:
    kernel, opener = FakeKernel(2), Opener()
    sup = _supervisor(kernel, opener)
    try:
        _until(lambda: sup.state is SupervisorState.WATCHING)
        kernel.kill(0, announce=False)  # one of two, no event: repaired after the grace
        _until(lambda: sup.reconnects == 1)
        assert kernel.live() == 2
    finally:
        sup.stop()
        kernel.close()
        opener.close()


def test_the_device_detached_ends_the_supervisor() -> None:
    kernel, opener = FakeKernel(1), Opener(failures=10**6)
    sup = _supervisor(kernel, opener)
    try:
        _until(lambda: sup.state is SupervisorState.WATCHING)
        kernel.kill(0)
        _until(lambda: opener.calls >= 2)  # reconnecting, in vain
        kernel.attached = False
        assert sup.done.wait(WAIT)
        assert sup.state is SupervisorState.DETACHED
    finally:
        sup.stop()
        kernel.close()
        opener.close()


def test_stop_while_reconnecting_hands_nothing_over() -> None:
    kernel, opener = FakeKernel(1), Opener(failures=10**6)
    sup = _supervisor(kernel, opener)
    kernel.kill(0)
    _until(lambda: opener.calls >= 1)
    sup.stop()  # the opener fails for ever: only the stop ends the thread
    assert sup.done.is_set()
    assert sup.state is SupervisorState.STOPPED and kernel.reconfigures == 0
    assert not any(t.name.startswith("pynbd supervisor") for t in threading.enumerate())
    kernel.close()
    opener.close()


def test_a_timed_out_reconfigure_that_took_the_socket_counts() -> None:
    kernel, opener = FakeKernel(1), Opener()
    original = kernel.reconfigure

    def slow(index: int, *, sockets: Sequence[int] = (), backend_id: str | None = None) -> None:
        original(index, sockets=sockets, backend_id=backend_id)
        raise KernelError(errno.ETIMEDOUT, "no answer from the kernel")

    kernel.reconfigure = slow  # type: ignore[method-assign]
    sup = _supervisor(kernel, opener)
    try:
        _until(lambda: sup.state is SupervisorState.WATCHING)
        kernel.kill(0)
        _until(lambda: sup.reconnects == 1)
        assert opener.calls == 1 and kernel.live() == 1
    finally:
        sup.stop()
        kernel.close()
        opener.close()


def test_cli_keepalive_option() -> None:
    from argparse import ArgumentTypeError

    from pynbd.cli.kernel import _keepalive

    assert _keepalive("5,2,3") == Keepalive(5, 2, 3)
    assert _keepalive("off") == Keepalive.off()
    for bad in ("5,2", "a,b,c", "0,1,1"):
        with pytest.raises(ArgumentTypeError, match="IDLE,INTVL,CNT"):
            _keepalive(bad)


def test_device_busy_names_the_holders() -> None:
    from pynbd.kernel.device import Holder
    from pynbd.kernel.errors import DeviceBusy

    exc = DeviceBusy("/dev/nbd2", [Holder("mount", "/mnt", detail="(ext4)"),
                                   Holder("process", "sleep", 42, "fd 0")])  # fmt: skip
    assert exc.errno == errno.EBUSY and exc.device == "/dev/nbd2"
    assert str(exc) == (
        "/dev/nbd2: detach: Device or resource busy (held by mounted on /mnt (ext4); "
        "pid 42 (sleep) fd 0)"
    )
