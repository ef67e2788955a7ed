"""Safe detach on a real /dev/nbdX: the server gone or hung, the device mounted or
held open.

Runs in the test guest (see conftest.py). Each test stops its servers, its holders and
its device even when it fails.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pynbd.kernel.attach import Attachment, attach, detach
from pynbd.kernel.device import find_holders, sysfs_state
from pynbd.kernel.errors import DeviceBusy
from tests.kernel.helpers import run as _run
from tests.kernel.helpers import umount as _umount
from tests.kernel.test_kernel_cli import _one_line_error, _pynbd
from tests.peers import Server

SIZE = 64 * 1024 * 1024


@pytest.fixture
def server(nbd_module: None, nbdkit: Callable[..., Server]) -> Iterator[Server]:
    srv = nbdkit("memory", str(SIZE))
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def att(server: Server) -> Iterator[Attachment]:
    attachment = attach(server.uri, timeout=3)
    try:
        yield attachment
    finally:
        with contextlib.suppress(Exception):
            detach(attachment.index, force=True)


def _free(att: Attachment) -> bool:
    state = sysfs_state(att.index)
    return state.pid is None and state.size == 0


def _writes_in_flight(index: int) -> int:
    """Write requests the block layer has sent to the driver and not seen completed."""
    reads_and_writes = Path(f"/sys/block/nbd{index}/inflight").read_text().split()
    return int(reads_and_writes[1])


def _eio(device: str) -> bool:
    """A read of the device fails with EIO (page cache bypassed)."""
    buf = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT wants
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    try:
        os.preadv(fd, [buf], 0)
    except OSError as exc:
        return exc.errno == errno.EIO
    finally:
        os.close(fd)
        buf.close()
    return False


def test_detach_after_the_server_died(server: Server, att: Attachment) -> None:
    server.kill()
    done = _pynbd("detach", att.device)
    assert done.returncode == 0, done.stderr
    assert _free(att)


def test_detach_with_the_server_frozen(server: Server, att: Attachment) -> None:
    fd = os.open(att.device, os.O_RDWR)
    errors: list[OSError] = []

    def write() -> None:
        try:
            os.pwrite(fd, b"y" * 65536, 0)
            os.fsync(fd)
        except OSError as exc:
            errors.append(exc)

    writer = threading.Thread(target=write, daemon=True)
    os.kill(server.pid, signal.SIGSTOP)
    try:
        writer.start()
        # The write reaches the device before the detach, however slow the host: it
        # waits for the frozen server (or has failed already, on the request timeout).
        _until(lambda: _writes_in_flight(att.index) > 0 or not writer.is_alive())
        refused = _pynbd("detach", att.device)
        _one_line_error(refused, f"pid {os.getpid()}", "--force")
        start = time.monotonic()
        done = _pynbd("detach", "--force", att.device, "--timeout", "20")
        took = time.monotonic() - start
        assert done.returncode == 0, done.stderr
        writer.join(30)
        assert not writer.is_alive(), "the writer is stuck"
        assert [e.errno for e in errors] == [errno.EIO]
        print(f"\ndetach --force with the server frozen and a write waiting: {took:.1f} s")
    finally:
        os.close(fd)
        os.kill(server.pid, signal.SIGCONT)
    _until_free(att)


def test_detach_refuses_a_mounted_device(att: Attachment, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    _run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", att.device, "16M")
    _run("mount", att.device, mnt)
    try:
        holders = find_holders(att.device)
        assert [(h.kind, h.what) for h in holders] == [("mount", os.fspath(mnt))]
        with pytest.raises(DeviceBusy) as excinfo:
            detach(att.device)
        assert excinfo.value.errno == errno.EBUSY
        assert f"mounted on {mnt}" in str(excinfo.value)
        _one_line_error(_pynbd("detach", att.device), f"mounted on {mnt}", "--force")
        assert sysfs_state(att.index).size == SIZE  # untouched
        done = _pynbd("detach", "--force", att.device)
        assert done.returncode == 0, done.stderr
        assert f"mounted on {mnt}" in done.stderr
        assert _eio(att.device)  # the holder now gets EIO
    finally:
        _umount(mnt)
    _until_free(att)


def _until_free(att: Attachment) -> None:
    deadline = time.monotonic() + 30
    while not _free(att):
        assert time.monotonic() < deadline, "the device was never released"
        time.sleep(0.1)


def test_detach_refuses_a_device_held_open(att: Attachment) -> None:
    # The holder lives until the test kills it, however long the test takes.
    with open(att.device, "rb") as dev:
        holder = subprocess.Popen(["sleep", "infinity"], stdin=dev)
    try:
        _until(lambda: bool(find_holders(att.index)))
        with pytest.raises(DeviceBusy, match=rf"pid {holder.pid} \(sleep\)"):
            detach(att.index)
        _one_line_error(_pynbd("detach", att.device), f"pid {holder.pid} (sleep)")
        assert sysfs_state(att.index).size == SIZE
        holders = detach(att.index, force=True)
        assert [h.pid for h in holders] == [holder.pid]
        assert _eio(att.device)
    finally:
        holder.kill()
        holder.wait(30)
    _until_free(att)
    assert find_holders(att.index) == []


def test_detach_after_the_holder_left(att: Attachment) -> None:
    with open(att.device, "rb") as dev:
        holder = subprocess.Popen(["sleep", "infinity"], stdin=dev)
    holder.kill()
    holder.wait(30)
    assert detach(att.index) == []
    assert _free(att)


def _until(cond: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
