"""NBDDevice, the ioctl interface (the Perl Linux::NBD::Client API), on a real /dev/nbdX.

Runs in the test guest (see conftest.py) against nbdkit memory in the guest. Each test
detaches its device and stops its server, even when it fails.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pynbd.client.sync import Client
from pynbd.errors import InvalidRequest
from pynbd.kernel import KernelError
from pynbd.kernel.attach import connect_for_kernel
from pynbd.kernel.device import NBDDevice, find_free_device, sysfs_state, wait_disconnected
from tests.peers import Server

SIZE = 64 * 1024 * 1024
TIMEOUT = 30  # the device's request timeout: a test never hangs on a dead server


def _wait_size(path: str, size: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while sysfs_state(path).size != size:
        assert time.monotonic() < deadline, f"{path} never got size {size}"
        time.sleep(0.02)


def _pattern(n: int, seed: int) -> bytes:
    # Differs in every 512-byte sector and from one seed to the next.
    return b"".join(((seed << 32) | i).to_bytes(8, "big") * 64 for i in range(n // 512))


def _server_bytes(server: Server, offset: int, length: int) -> bytes:
    # Read what reached the server over a connection of its own (nbdkit memory is
    # multi-conn, so it sees every write the device completed).
    with Client(server.uri, timeout=60) as client:
        return bytes(client.pread(length, offset))


@pytest.fixture
def memory_server(nbd_module: None, nbdkit: Callable[..., Server]) -> Iterator[Server]:
    server = nbdkit("memory", str(SIZE))
    try:
        yield server
    finally:
        server.stop()


def test_every_method_of_the_seed_api(memory_server: Server) -> None:
    sock, negotiated = connect_for_kernel(memory_server.uri)
    dev = NBDDevice(sock)  # no device given: a free one
    try:
        assert dev.path.startswith("/dev/nbd")
        assert dev.path == f"/dev/nbd{dev.index}"
        dev.set_blocksize(4096)
        dev.set_blocksize(512)
        with pytest.raises(InvalidRequest):
            dev.set_blocksize(1000)
        with pytest.raises(InvalidRequest):
            dev.set_blocksize(256)
        dev.set_size(SIZE)
        dev.set_blocks(SIZE // 512)
        dev.set_timeout(TIMEOUT)
        dev.set_flags(int(negotiated.flags))
        dev.clear_queue()
        job = dev.run_async()
        assert job.pid == os.getpid()
        _wait_size(dev.path, SIZE)
        assert sysfs_state(dev.path).pid is not None
        assert sysfs_state(dev.path).block_size == 512
        data = _pattern(1 << 20, 1)
        fd = os.open(dev.path, os.O_RDWR)
        try:
            assert os.pwrite(fd, data, 3 << 20) == len(data)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            assert os.pread(fd, len(data), 3 << 20) == data
        finally:
            os.close(fd)
        assert _server_bytes(memory_server, 3 << 20, len(data)) == data
        dev.kill_async()
        assert not job.running()
        job.wait(0)
    finally:
        dev.kill_async()
        dev.close()
        sock.close()
    wait_disconnected(dev.path, 30)
    assert sysfs_state(dev.path).pid is None


def test_run_blocks_until_disconnect(memory_server: Server) -> None:
    """run() is NBD_DO_IT in the calling thread; another thread disconnects."""
    sock, negotiated = connect_for_kernel(memory_server.uri)
    with NBDDevice(sock, find_free_device()) as dev:
        dev.set_blocksize(512)
        dev.set_size(SIZE)
        dev.set_timeout(TIMEOUT)
        dev.set_flags(int(negotiated.flags))
        errors: list[BaseException] = []

        def stopper() -> None:
            try:
                _wait_size(dev.path, SIZE)
                dev.disconnect()
            except BaseException as exc:
                errors.append(exc)
                dev.socket(None)  # NBD_CLEAR_SOCK: DO_IT returns whatever happens

        thread = threading.Thread(target=stopper)
        thread.start()
        try:
            dev.run()
        finally:
            thread.join(30)
        assert not errors
    sock.close()
    wait_disconnected(dev.path, 30)


def test_socket_none_clears_and_errors_name_device_and_call(memory_server: Server) -> None:
    sock, _ = connect_for_kernel(memory_server.uri)
    with NBDDevice(None, find_free_device()) as dev:
        dev.socket(sock)
        dev.socket(None)  # NBD_CLEAR_SOCK: the socket is released again
        sock.close()
        r, w = os.pipe()
        try:
            with pytest.raises(KernelError) as excinfo:
                dev.socket(r)  # not a socket
        finally:
            os.close(r)
            os.close(w)
        assert excinfo.value.call == "NBD_SET_SOCK"
        assert excinfo.value.device == dev.path
        assert dev.path in str(excinfo.value) and "NBD_SET_SOCK" in str(excinfo.value)
    assert sysfs_state(dev.path).pid is None
    # DO_IT on a device that never got a socket is refused, and named.
    with NBDDevice() as fresh:
        with pytest.raises(KernelError) as excinfo:
            fresh.run()
        assert excinfo.value.call == "NBD_DO_IT"
        assert excinfo.value.device == fresh.path
    assert sysfs_state(fresh.path).pid is None


def test_device_method_switches_and_finds_free(memory_server: Server, tmp_path: Path) -> None:
    with NBDDevice() as dev:
        first = dev.path
        # Held open, the device is no longer free: the next search skips it.
        other = find_free_device()
        assert other != first
        assert dev.device(other) == other
        assert dev.path == other
        with pytest.raises(KernelError):
            dev.device(str(tmp_path / "nbd999999"))


def test_kill_async_with_a_dead_server(nbd_module: None, nbdkit: Callable[..., Server]) -> None:
    """A server gone mid-flight: kill_async still ends DO_IT without a signal."""
    server = nbdkit("memory", str(SIZE))
    try:
        sock, negotiated = connect_for_kernel(server.uri)
        with NBDDevice(sock) as dev:
            dev.set_size(SIZE)
            dev.set_timeout(5)
            dev.set_flags(int(negotiated.flags))
            job = dev.run_async()
            _wait_size(dev.path, SIZE)
            server.stop()
            dev.kill_async()
            assert not job.running()
        sock.close()
    finally:
        server.stop()
    wait_disconnected(dev.path, 30)


def test_socket_stays_usable_by_kernel_only(memory_server: Server) -> None:
    """The kernel holds its own reference: closing ours does not break the device."""
    sock, negotiated = connect_for_kernel(memory_server.uri)
    assert sock.gettimeout() is None
    with NBDDevice(sock) as dev:
        sock.close()
        dev.set_size(SIZE)
        dev.set_timeout(TIMEOUT)
        dev.set_flags(int(negotiated.flags))
        dev.run_async()
        _wait_size(dev.path, SIZE)
        fd = os.open(dev.path, os.O_RDONLY)
        try:
            assert os.pread(fd, 4096, 0) == bytes(4096)
        finally:
            os.close(fd)
        dev.kill_async()
    assert isinstance(sock, socket.socket)
