"""The reconnect supervisor on a real /dev/nbdX: servers killed, cut, frozen, gone.

Runs in the test guest (see conftest.py). The server is a file-backed nbdkit on a TCP
port of 127.0.0.1 (so that it can be killed and restarted on the same address with
the data kept). Each test stops its servers and detaches its device even when it
fails; the timing figures each test measured are printed (``-s`` or the guest log).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import mmap
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest

from pynbd.kernel.attach import Attachment, attach, attach_backend, detach
from pynbd.kernel.device import sysfs_state
from pynbd.kernel.supervisor import Backoff, Keepalive, ReconnectPolicy, SupervisorState
from pynbd.server import MemoryBackend
from tests.kernel.helpers import Lines, Restartable
from tests.kernel.helpers import run as _run
from tests.kernel.helpers import umount as _umount
from tests.peers import Peers, make_raw_image

SIZE = 64 * 1024 * 1024
POLICY = ReconnectPolicy(backoff=Backoff(0.05, 2.0, 0.5), give_up_after=60, poll_interval=0.2)


@pytest.fixture
def server(nbd_module: None, peers: Peers, tmp_path: Path) -> Iterator[Restartable]:
    srv = Restartable(peers, make_raw_image(tmp_path / "disk.img", SIZE))
    yield srv  # the peers fixture stops every nbdkit started


def _attach(srv: Restartable, **kw: object) -> Attachment:
    options: dict[str, object] = {"timeout": 4, "dead_timeout": 30, "handshake_timeout": 3}
    options.update(kw)
    return attach(srv.uri, persist=True, policy=POLICY, **options)  # type: ignore[arg-type]


def _until(cond: Callable[[], bool], timeout: float, what: str) -> float:
    """Wait for ``cond``; return the seconds it took."""
    start = time.monotonic()
    while not cond():
        assert time.monotonic() - start < timeout, f"timed out waiting for {what}"
        time.sleep(0.02)
    return time.monotonic() - start


@dataclass
class Writer:
    """Writes files with fsync in a thread; each file's sha256 goes into the manifest
    once fsync returned (the write is acknowledged)."""

    LIVE: ClassVar[int] = 64

    root: Path
    manifest: dict[str, str] = field(default_factory=dict)
    written: int = 0
    slowest: float = 0.0
    error: BaseException | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Writer:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        rng = random.Random(7)
        i = 0
        try:
            while not self._stop.is_set():
                data = rng.randbytes(rng.randrange(4096, 96 * 1024))
                path = self.root / f"d{i % 8}" / f"f{i}"
                path.parent.mkdir(exist_ok=True)
                start = time.monotonic()
                with open(path, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                self.slowest = max(self.slowest, time.monotonic() - start)
                self.manifest[str(path.relative_to(self.root))] = hashlib.sha256(data).hexdigest()
                i += 1
                self.written = i
                # At most LIVE files exist at once (under 6 MiB of the 16 MiB file
                # system), however many the host's speed lets the test write.
                if i > self.LIVE:
                    old = i - self.LIVE - 1
                    (self.root / f"d{old % 8}" / f"f{old}").unlink()
                    del self.manifest[f"d{old % 8}/f{old}"]
        except BaseException as exc:  # the test reports it
            self.error = exc

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(120)
            assert not self._thread.is_alive(), "the writer is stuck"

    def verify(self, root: Path) -> None:
        for name, digest in self.manifest.items():
            assert hashlib.sha256((root / name).read_bytes()).hexdigest() == digest, name


# --------------------------------------------------------------------------- server kills


@pytest.mark.timeout(400)  # 20 kills, each a request timeout (3 s) at worst, under TCG
def test_ext4_survives_twenty_server_kills(server: Restartable, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    att = _attach(server, timeout=3)
    writer = Writer(mnt)
    times: list[float] = []
    started = time.monotonic()
    try:
        assert att.supervisor is not None
        _run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", att.device, "16M")
        _run("mount", att.device, mnt)
        writer.start()
        sup = att.supervisor
        for kill in range(20):
            time.sleep(random.uniform(0.2, 0.5))
            before, written = sup.reconnects, writer.written
            server.kill()
            server.start()

            def reconnected(n: int = before) -> bool:
                return sup.reconnects > n

            times.append(_until(reconnected, 60, f"reconnect {kill}"))

            def wrote_more(n: int = written) -> bool:
                return writer.written > n or writer.error is not None

            _until(wrote_more, 60, "the writer to go on")
            assert writer.error is None, writer.error
        writer.stop()
        assert writer.error is None, writer.error
        assert sup.state is SupervisorState.WATCHING
        total = time.monotonic() - started
        _run("umount", mnt)
        _run("e2fsck", "-f", "-n", att.device)
        _run("mount", "-o", "ro", att.device, mnt)
        writer.verify(mnt)
        _run("umount", mnt)
        print(
            f"\n20 kills: {total:.1f} s, {writer.written} files written with fsync, the "
            f"{len(writer.manifest)} kept all checked; reconnect "
            f"after kill+restart: median {sorted(times)[10]:.2f} s, max {max(times):.2f} s; "
            f"slowest write+fsync {writer.slowest:.2f} s"
        )
    finally:
        writer.stop()
        _umount(mnt)
        att.detach()


# --------------------------------------------------------------------------- one of four


def _established_fds(pid: int, port: int) -> list[int]:
    """The descriptors of process ``pid`` that are TCP connections accepted on ``port``."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        if local_port == port and fields[3] == "01":  # ESTABLISHED
            inodes.add(fields[9])
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:[") and link[8:-1] in inodes:
                out.append(int(fd))
    return out


def _cut_server_side(pid: int, fd: int) -> None:
    """Shut one of another process's sockets down (pidfd_getfd gives us a duplicate):
    the server end of one connection breaks, the others stay."""
    pidfd = os.pidfd_open(pid)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        dup = libc.syscall(438, pidfd, fd, 0)  # SYS_pidfd_getfd on x86_64
        if dup < 0:
            raise OSError(ctypes.get_errno(), "pidfd_getfd")
        with socket.socket(fileno=dup) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    finally:
        os.close(pidfd)


def test_one_of_four_connections_killed(server: Restartable) -> None:
    att = _attach(server, connections=4)
    try:
        sup = att.supervisor
        assert sup is not None and att.connections == 4
        assert sup.live_connections() == 4
        fds = _established_fds(server.server.pid, server.port)
        assert len(fds) == 4, fds
        fd = os.open(att.device, os.O_RDWR)
        try:
            baseline = _write_blocks(fd, 0)
            cut = time.monotonic()
            _cut_server_side(server.server.pid, fds[1])
            during = _write_blocks(fd, 64)  # I/O goes on while the link is repaired
            _until(lambda: sup.reconnects == 1 and sup.live_connections() == 4, 30,
                   "the link restored")  # fmt: skip
            assert sup.last_reconnect_at is not None
            restored = sup.last_reconnect_at - cut
            assert len(_established_fds(server.server.pid, server.port)) == 4
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            for i in range(128):
                assert os.pread(fd, 65536, i * 65536) == bytes([i]) * 65536
        finally:
            os.close(fd)
        # How long the writes took during the repair, against before the cut, is a
        # measurement (printed), not a verdict: it moves with the host's load.
        print(f"\none of four cut: 64 writes took {during:.2f} s (before the cut "
              f"{baseline:.2f} s); 4 live again {restored:.2f} s after the cut")  # fmt: skip
    finally:
        att.detach()


def _write_blocks(fd: int, first: int) -> float:
    """64 writes of 64 KiB, each fsync'd; the seconds they took."""
    start = time.monotonic()
    for i in range(first, first + 64):
        os.pwrite(fd, bytes([i]) * 65536, i * 65536)
        os.fsync(fd)
    return time.monotonic() - start


# --------------------------------------------------------------------------- never back


def _direct_write(device: str, offset: int) -> None:
    buf = mmap.mmap(-1, 4096)
    buf.write(b"x" * 4096)
    fd = os.open(device, os.O_RDWR | os.O_DIRECT)
    try:
        os.pwritev(fd, [buf], offset)
    finally:
        os.close(fd)
        buf.close()


def _d_state() -> list[str]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{pid}/stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] == "D":
                    out.append(stat.split(")")[0] + ")")
    return out


def test_server_never_returns(server: Restartable) -> None:
    policy = ReconnectPolicy(backoff=Backoff(0.05, 2.0, 0.5), give_up_after=12, poll_interval=0.2)
    att = attach(server.uri, persist=True, policy=policy, timeout=2, dead_timeout=6,
                 handshake_timeout=2)  # fmt: skip
    try:
        sup = att.supervisor
        assert sup is not None
        _direct_write(att.device, 0)
        server.kill()
        start = time.monotonic()
        with pytest.raises(OSError) as excinfo:
            _direct_write(att.device, 4096)
        eio_after = time.monotonic() - start
        assert excinfo.value.errno == errno.EIO
        # Held for the dead timeout (6 s): a timer, which no host's speed shortens.
        # (That it is not held for ever, pytest's timeout sees.)
        assert eio_after >= 5, eio_after
        start = time.monotonic()
        with pytest.raises(OSError):  # the device fails from now on, without waiting
            _direct_write(att.device, 8192)
        refused_after = time.monotonic() - start
        assert sup.done.wait(30), "the supervisor never gave up"
        assert sup.state is SupervisorState.GAVE_UP
        start = time.monotonic()
        att.detach()
        detach_seconds = time.monotonic() - start
        assert sysfs_state(att.index).pid is None
        _until(lambda: not _d_state(), 30, "no process left in D state")
        print(f"\nserver gone: EIO after {eio_after:.1f} s (dead timeout 6 s), the next "
              f"write refused in {refused_after:.2f} s; supervisor gave up; detach took "
              f"{detach_seconds:.2f} s")  # fmt: skip
    finally:
        att.detach()


# --------------------------------------------------------------------------- frozen peer


def test_frozen_server_is_detected_and_recovered(server: Restartable) -> None:
    att = _attach(server, timeout=3, handshake_timeout=2)
    pid = server.server.pid
    try:
        sup = att.supervisor
        assert sup is not None
        fd = os.open(att.device, os.O_RDWR)
        os.kill(pid, signal.SIGSTOP)
        try:
            frozen = time.monotonic()
            done = threading.Event()

            def write() -> None:
                os.pwrite(fd, b"\xab" * 65536, 1 << 20)
                os.fsync(fd)
                done.set()

            threading.Thread(target=write, daemon=True).start()
            # Found by the request timeout (3 s): the frozen server answers nothing.
            detected = _until(lambda: sup.state is SupervisorState.RECONNECTING, 30,
                              "the frozen link to be found dead")  # fmt: skip
            time.sleep(3)  # a few handshakes time out against the frozen server
            assert not done.is_set()
        finally:
            os.kill(pid, signal.SIGCONT)
        thawed = time.monotonic()
        recovered = _until(lambda: done.is_set() and sup.reconnects >= 1, 30, "recovery")
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(fd, 65536, 1 << 20) == b"\xab" * 65536
        os.close(fd)
        assert sup.state is SupervisorState.WATCHING and sup.live_connections() == 1
        print(
            f"\nSIGSTOP: dead link found after {detected:.1f} s (request timeout 3 s); "
            f"written {recovered:.1f} s after SIGCONT ({thawed - frozen:.1f} s frozen)"
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        att.detach()


# --------------------------------------------------------------------------- network cut

NETNS, HOST_IP, SERVER_IP, PORT = "pynbd-srv", "10.99.0.1", "10.99.0.2", 10809


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, timeout=30, capture_output=True)


@pytest.fixture
def far_server(nbd_module: None, tmp_path: Path) -> Iterator[str]:
    """nbdkit in a network namespace, reached over a veth pair whose far end the test
    can take down: packets are then dropped silently, as on a cut network."""
    subprocess.run(["modprobe", "veth"], check=True, timeout=60)
    image = make_raw_image(tmp_path / "far.img", SIZE)
    _ip("netns", "add", NETNS)
    proc = None
    try:
        _ip("link", "add", "pynbd-v0", "type", "veth", "peer", "name", "pynbd-v1",
            "netns", NETNS)  # fmt: skip
        _ip("addr", "add", f"{HOST_IP}/24", "dev", "pynbd-v0")
        _ip("link", "set", "pynbd-v0", "up")
        _ip("-n", NETNS, "addr", "add", f"{SERVER_IP}/24", "dev", "pynbd-v1")
        _ip("-n", NETNS, "link", "set", "pynbd-v1", "up")
        _ip("-n", NETNS, "link", "set", "lo", "up")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", NETNS, "nbdkit", "-f", "--exit-with-parent",
             "-i", SERVER_IP, "-p", str(PORT), "file", os.fspath(image)],
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        _until(lambda: _listening(SERVER_IP, PORT), 60, "nbdkit in the namespace")
        yield f"nbd://{SERVER_IP}:{PORT}/"
    finally:
        if proc is not None:
            proc.kill()
            proc.wait(30)
        _ip("netns", "del", NETNS)  # takes the veth pair with it


def _listening(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
        return True
    return False


def test_idle_dead_peer_found_by_keepalive(far_server: str) -> None:
    keepalive = Keepalive(idle=1, interval=1, count=2, user_timeout=4)
    att = attach(far_server, persist=True, policy=POLICY, keepalive=keepalive, timeout=10,
                 dead_timeout=60, handshake_timeout=2)  # fmt: skip
    try:
        sup = att.supervisor
        assert sup is not None
        fd = os.open(att.device, os.O_RDWR)
        try:
            os.pwrite(fd, b"k" * 65536, 0)
            os.fsync(fd)
            _ip("-n", NETNS, "link", "set", "pynbd-v1", "down")  # the device is idle
            try:
                found = _until(lambda: sup.state is SupervisorState.RECONNECTING, 30,
                               "the dead idle link to be found")  # fmt: skip
            finally:
                _ip("-n", NETNS, "link", "set", "pynbd-v1", "up")
            back = _until(lambda: sup.reconnects == 1, 30, "the reconnection")
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            assert os.pread(fd, 65536, 0) == b"k" * 65536
        finally:
            os.close(fd)
        # Only keepalive finds a dead idle link (no request times out): that it was
        # found at all is the verdict; how soon (the user timeout, 4 s) is printed.
        print(f"\nnetwork cut while idle: found dead after {found:.1f} s (TCP user timeout "
              f"4 s); reconnected {back:.1f} s after the link came back")  # fmt: skip
    finally:
        att.detach()


# --------------------------------------------------------------------------- detached


def test_a_detach_by_someone_else_ends_the_supervisor(server: Restartable) -> None:
    """pynbd detach --force of a supervised device that is held open: the kernel shuts
    every connection down without LINK_DEAD; the supervisor must not bring it back."""
    att = _attach(server)
    try:
        sup = att.supervisor
        assert sup is not None
        fd = os.open(att.device, os.O_RDONLY)  # keeps the device's configuration alive
        try:
            assert detach(att.index, force=True) != []
            assert sup.done.wait(30)
            assert sup.state is SupervisorState.DETACHED and sup.reconnects == 0
            with pytest.raises(OSError) as excinfo:
                os.pread(fd, 4096, 1 << 20)
            assert excinfo.value.errno == errno.EIO
        finally:
            os.close(fd)
        _until(lambda: sysfs_state(att.index).pid is None, 30, "the device released")
    finally:
        att.detach()


# --------------------------------------------------------------------------- in-process


def test_in_process_backend_link_replaced(nbd_module: None) -> None:
    att = attach_backend(MemoryBackend(SIZE), connections=2, persist=True, policy=POLICY,
                         timeout=4, dead_timeout=30)  # fmt: skip
    try:
        sup = att.supervisor
        assert sup is not None
        fd = os.open(att.device, os.O_RDWR)
        try:
            os.pwrite(fd, b"a" * 65536, 0)
            os.fsync(fd)
            cut = time.monotonic()
            sup.drop_connection(0)  # a dead link: a new socketpair is served
            _until(lambda: sup.reconnects == 1, 30, "the link replaced")
            assert sup.live_connections() == att.connections
            os.pwrite(fd, b"b" * 65536, 65536)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            assert os.pread(fd, 131072, 0) == b"a" * 65536 + b"b" * 65536
        finally:
            os.close(fd)
        assert sup.last_reconnect_at is not None
        print(f"\nin-process link replaced in {sup.last_reconnect_at - cut:.2f} s")
    finally:
        att.detach()
    assert att._server is not None and not att._server.is_alive()


# --------------------------------------------------------------------------- command line


def test_cli_attach_persist(server: Restartable) -> None:
    argv = [sys.executable, "-m", "pynbd", "attach", server.uri, "--persist", "--timeout", "4",
            "--keepalive", "5,2,2", "--user-timeout", "9"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    out, err = Lines(proc.stdout), Lines(proc.stderr)
    try:
        device = out.wait_for("/dev/nbd", 90).strip()
        err.wait_for("supervising 1 connection", 30)
        assert sysfs_state(device).backend == server.uri  # the kernel checks it on RECONFIGURE
        server.kill()
        server.start()
        err.wait_for("link dead: 1 of 1", 30)
        err.wait_for("reconnected connection 1/1", 30)
        fd = os.open(device, os.O_RDWR)
        try:
            os.pwrite(fd, b"z" * 4096, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, err.seen
        assert sysfs_state(device).pid is None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    print("\n" + "\n".join(err.seen))
