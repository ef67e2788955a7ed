"""TLS for /dev/nbdX through the userspace relay (pynbd.kernel.relay), in the guest.

The relay negotiates NBD and TLS in userspace and hands the kernel one end of a
socketpair per connection. Against nbdkit and ``pynbd serve`` with X.509 certificates
(made by trustme on the test's side): mkfs, mount, files written, fsck, read back; the
pump threads end after detach. Then the cost: dd throughput and this process's CPU
time (the relay's) on the device through the relay, against plain TCP to the same
server (TLS optional there), in the same run; printed (run with -s to see them).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pynbd.kernel.attach import connect_for_kernel, detach
from pynbd.kernel.device import NetlinkControl, sysfs_state, wait_disconnected
from pynbd.kernel.relay import TLSRelay
from pynbd.proto.handshake import Negotiated
from tests.kernel.helpers import run
from tests.kernel.helpers import stop_process as _stop
from tests.peers import Server, make_x509_dir, wait_for_socket

SIZE = 64 * 1024 * 1024
TIMEOUT = 30
CMD_TIMEOUT = 300  # TLS under TCG, resize2fs: slower than the other kernel tests


def _run(*argv: str | os.PathLike[str], env: dict[str, str] | None = None) -> str:
    return run(*argv, env=env, timeout=CMD_TIMEOUT)


# dd transfer for the throughput comparison (TCG: keep it modest).
DD_MIB = 32


@pytest.fixture
def x509(tmp_path: Path) -> Path:
    return make_x509_dir(tmp_path)


# --------------------------------------------------------------------------- attaching


def _connect(dial: Callable[[], tuple[object, Negotiated]], connections: int) -> int:
    """Dial ``connections`` times and give the sockets to the kernel by netlink
    (what attach does with an opener that returns negotiated sockets)."""
    socks = []
    try:
        first: Negotiated | None = None
        for _ in range(connections):
            sock, negotiated = dial()
            socks.append(sock)
            first = first or negotiated
        assert first is not None and first.size
        with NetlinkControl() as nl:
            index = nl.connect(
                [s.fileno() for s in socks],  # type: ignore[attr-defined]
                first.size,
                block_size=512,
                timeout=TIMEOUT,
                server_flags=int(first.flags),
            )
    finally:
        for s in socks:
            s.close()  # type: ignore[attr-defined]
    deadline = time.monotonic() + 30
    while sysfs_state(index).size == 0:
        assert time.monotonic() < deadline, "the device never got its size"
        time.sleep(0.05)
    return index


def _detach(index: int) -> None:
    detach(index, timeout=TIMEOUT)
    wait_disconnected(index, TIMEOUT)


def _round_trip(device: str, mnt: Path) -> None:
    files = {f"f{i}": os.urandom(300_000 * (i + 1)) for i in range(3)}
    _run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", device, "16M")
    _run("mount", device, mnt)
    for name, data in files.items():
        (mnt / name).write_bytes(data)
    _run("umount", mnt)
    _run("e2fsck", "-f", "-n", device)
    _run("mount", "-o", "ro", device, mnt)
    for name, data in files.items():
        assert (mnt / name).read_bytes() == data
    _run("umount", mnt)


def _pynbd_serve(tmp_path: Path, x509: Path, mode: str = "require") -> subprocess.Popen[bytes]:
    sock = tmp_path / "pynbd.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pynbd", "serve", "--memory", str(SIZE), "--unix",
         os.fspath(sock), "--tls-certificates", os.fspath(x509), "--tls", mode, "--quiet"],
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_socket(sock, 60, alive=lambda: proc.poll() is None)
    except BaseException:
        _stop(proc)
        raise
    return proc


# --------------------------------------------------------------------------- data


def test_ext4_through_relay_to_nbdkit(
    nbd_module: None, nbdkit: Callable[..., Server], x509: Path, mnt: Path
) -> None:
    server = nbdkit("memory", str(SIZE), tcp=True, tls="x509", tls_creds=x509)
    relay = TLSRelay(server.uri)
    try:
        index = _connect(relay.dial, 1)
        try:
            assert relay.active == 1
            _round_trip(f"/dev/nbd{index}", mnt)
        finally:
            _detach(index)
        assert _wait(lambda: relay.active == 0), "a pump outlived the detach"
    finally:
        relay.close()
        server.stop()
    assert not [t for t in threading.enumerate() if t.name.startswith("pynbd relay")]


def test_ext4_through_relay_to_pynbd_serve_two_connections(
    nbd_module: None, tmp_path: Path, x509: Path, mnt: Path
) -> None:
    proc = _pynbd_serve(tmp_path, x509)
    relay = TLSRelay(f"nbds+unix:///?socket={tmp_path}/pynbd.sock&tls-certificates={x509}")
    try:
        index = _connect(relay.dial, 2)
        try:
            assert relay.active == 2
            _round_trip(f"/dev/nbd{index}", mnt)
        finally:
            _detach(index)
        assert _wait(lambda: relay.active == 0), "a pump outlived the detach"
    finally:
        relay.close()
        _stop(proc)


def test_server_gone_kills_the_link(
    nbd_module: None, nbdkit: Callable[..., Server], x509: Path
) -> None:
    """The server dies: the pump ends and shuts the kernel's end, so the driver sees
    the link dead at once (I/O fails after the timeout, detach works)."""
    server = nbdkit("memory", str(SIZE), tcp=True, tls="x509", tls_creds=x509)
    relay = TLSRelay(server.uri)
    try:
        index = _connect(relay.dial, 1)
        try:
            server.kill()
            assert _wait(lambda: relay.active == 0), "the pump did not notice"
            fd = os.open(f"/dev/nbd{index}", os.O_RDONLY | os.O_DIRECT)
            try:
                with pytest.raises(OSError):
                    os.preadv(fd, [_aligned(4096)], 8 << 20)
            finally:
                os.close(fd)
        finally:
            _detach(index)
    finally:
        relay.close()
        server.stop()


def _aligned(n: int) -> memoryview:
    import mmap

    return memoryview(mmap.mmap(-1, n))


def _wait(cond: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# --------------------------------------------------------------------------- the cost


def _dd(device: str) -> tuple[float, float, float]:
    """Write then read DD_MIB MiB with O_DIRECT; (write MB/s, read MB/s, CPU s/GiB of
    this process during both)."""
    _run("dd", "if=/dev/urandom", "of=/tmp/relay-src", "bs=1M", f"count={DD_MIB}")
    t0, cpu0 = time.monotonic(), _cpu()
    _run("dd", "if=/tmp/relay-src", f"of={device}", "bs=1M", "oflag=direct", "conv=fsync")
    t1 = time.monotonic()
    _run("dd", f"if={device}", "of=/dev/null", "bs=1M", f"count={DD_MIB}", "iflag=direct")
    t2, cpu1 = time.monotonic(), _cpu()
    mb = DD_MIB * 1.048576
    return mb / (t1 - t0), mb / (t2 - t1), (cpu1 - cpu0) * 1024 / (2 * DD_MIB)


def _cpu() -> float:
    t = os.times()
    return t.user + t.system  # this process only: the pumps (dd is a child, not waited)


def test_throughput_relay_vs_plain_tcp(
    nbd_module: None,
    nbdkit: Callable[..., Server],
    x509: Path,
) -> None:
    # One nbdkit, TLS optional: the same server for both paths.
    server = nbdkit("memory", str(SIZE), tcp=True, extra=["--tls=on", f"--tls-certificates={x509}"])
    tls_uri = f"nbds://127.0.0.1:{server.port}/?tls-certificates={x509}"
    relay = TLSRelay(tls_uri)
    results = {}
    try:
        for name, dial in (
            ("plain", lambda: connect_for_kernel(server.uri)),
            ("relay", relay.dial),
        ):
            index = _connect(dial, 1)
            try:
                results[name] = _dd(f"/dev/nbd{index}")
            finally:
                _detach(index)
    finally:
        relay.close()
        server.stop()
    (pw, pr, pc), (rw, rr, rc) = results["plain"], results["relay"]
    line = (
        f"relay vs plain TCP, nbdkit memory, dd {DD_MIB} MiB O_DIRECT bs=1M: "
        f"write {rw:.1f} vs {pw:.1f} MB/s ({rw / pw:.2f}x), "
        f"read {rr:.1f} vs {pr:.1f} MB/s ({rr / pr:.2f}x); "
        f"relay CPU {rc:.2f} s/GiB (plain {pc:.2f})"
    )
    print(line)
    assert rw > 0 and rr > 0
