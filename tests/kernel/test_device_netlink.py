"""The netlink interface (NetlinkControl, and attach() over it) on a real /dev/nbdX.

Runs in the test guest (see conftest.py) against nbdkit in the guest. Each test
disconnects its device and stops its server, even when it fails.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pynbd.client.sync import Client
from pynbd.kernel import KernelError
from pynbd.kernel.attach import attach, connect_for_kernel
from pynbd.kernel.device import NetlinkControl, device_path, sysfs_state, wait_disconnected
from pynbd.kernel.netlink import CFlag
from pynbd.proto.constants import TransmissionFlag
from tests.peers import Server

SIZE = 64 * 1024 * 1024
TIMEOUT = 30


def _wait_size(index: int, size: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while sysfs_state(index).size != size:
        assert time.monotonic() < deadline, f"nbd{index} never got size {size}"
        time.sleep(0.02)


def _write_read(path: str, offset: int, data: bytes) -> bytes:
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return os.pread(fd, len(data), offset)
    finally:
        os.close(fd)


def _disconnect(nl: NetlinkControl, index: int) -> None:
    with contextlib.suppress(KernelError):
        nl.disconnect(index)
    wait_disconnected(index, 20)


@pytest.fixture
def server(nbd_module: None, nbdkit: Callable[..., Server]) -> Iterator[Server]:
    srv = nbdkit("memory", str(SIZE))
    try:
        yield srv
    finally:
        srv.stop()


def test_connect_without_index_status_disconnect_reuse(server: Server) -> None:
    with NetlinkControl() as nl:
        sock, negotiated = connect_for_kernel(server.uri)
        try:
            index = nl.connect([sock.fileno()], SIZE, block_size=512, timeout=TIMEOUT,
                               server_flags=int(negotiated.flags))  # fmt: skip
        finally:
            sock.close()
        try:
            _wait_size(index, SIZE)
            assert [s.connected for s in nl.status(index)] == [True]
            everyone = {s.index: s.connected for s in nl.status()}
            assert everyone[index] is True
            data = os.urandom(64 * 1024)
            assert _write_read(device_path(index), 1 << 20, data) == data
        finally:
            _disconnect(nl, index)
        assert [s.connected for s in nl.status(index)] == [False]
        assert sysfs_state(index).pid is None
        # The same device takes a new connection.
        sock, negotiated = connect_for_kernel(server.uri)
        try:
            again = nl.connect([sock.fileno()], SIZE, index=index, timeout=TIMEOUT,
                               server_flags=int(negotiated.flags))  # fmt: skip
        finally:
            sock.close()
        try:
            assert again == index
            _wait_size(index, SIZE)
            fd = os.open(device_path(index), os.O_RDONLY)
            try:
                assert os.pread(fd, len(data), 1 << 20) == data
            finally:
                os.close(fd)
        finally:
            _disconnect(nl, index)


def test_four_connections_to_a_multi_conn_server(server: Server) -> None:
    with attach(server.uri, connections=4, timeout=TIMEOUT) as att:
        assert att.method == "netlink"
        assert att.connections == 4
        assert att.flags & TransmissionFlag.CAN_MULTI_CONN
        # Enough parallel I/O to use every connection; all of it reaches the server.
        blobs = [os.urandom(256 * 1024) for _ in range(8)]
        fd = os.open(att.device, os.O_RDWR)
        try:
            for i, blob in enumerate(blobs):
                os.pwrite(fd, blob, i << 20)
            os.fsync(fd)
        finally:
            os.close(fd)
        with Client(server.uri, timeout=60) as client:
            for i, blob in enumerate(blobs):
                assert client.pread(len(blob), i << 20) == blob
    assert sysfs_state(att.index).pid is None


def test_busy_device_is_ebusy(server: Server) -> None:
    with attach(server.uri, timeout=TIMEOUT) as att:
        with pytest.raises(KernelError) as excinfo:
            attach(server.uri, att.device, timeout=TIMEOUT)
        assert excinfo.value.errno == 16  # EBUSY
        assert excinfo.value.device == att.device


def test_backend_id_link_dead_and_reconfigure(
    nbd_module: None, nbdkit: Callable[..., Server], tmp_path: Path
) -> None:
    """LINK_DEAD when the server dies; RECONFIGURE with a new server's socket revives
    the device (dead_conn_timeout holds the I/O meanwhile)."""
    path = tmp_path / "s.sock"
    srv = nbdkit("memory", str(SIZE), socket_path=path)
    att = None
    try:
        with NetlinkControl() as nl:
            nl.subscribe()
            att = attach(srv.uri, timeout=TIMEOUT, dead_timeout=30, backend_id="pynbd-test")
            assert sysfs_state(att.index).backend == "pynbd-test"
            srv.stop()
            dead = next(iter(nl.events(timeout=20)), None)
            assert dead == att.index
            srv = nbdkit("memory", str(SIZE), socket_path=path)
            sock, _ = connect_for_kernel(srv.uri)
            try:
                nl.reconfigure(att.index, sockets=[sock.fileno()], backend_id="pynbd-test")
            finally:
                sock.close()
            data = os.urandom(4096)
            assert _write_read(att.device, 0, data) == data
            with Client(srv.uri, timeout=60) as client:
                assert client.pread(4096, 0) == data
    finally:
        if att is not None:
            att.detach()
        srv.stop()


def test_disconnect_on_close_client_flag(server: Server) -> None:
    with NetlinkControl() as nl:
        sock, negotiated = connect_for_kernel(server.uri)
        try:
            index = nl.connect([sock.fileno()], SIZE, timeout=TIMEOUT,
                               server_flags=int(negotiated.flags),
                               client_flags=CFlag.DISCONNECT_ON_CLOSE)  # fmt: skip
        finally:
            sock.close()
        try:
            _wait_size(index, SIZE)
            fd = os.open(device_path(index), os.O_RDONLY)
            os.close(fd)  # the last close disconnects
            wait_disconnected(index, 20)
            assert [s.connected for s in nl.status(index)] == [False]
        finally:
            _disconnect(nl, index)


def test_destroy_on_disconnect_with_a_new_index(server: Server) -> None:
    """CONNECT with an index that does not exist creates the device; with
    DESTROY_ON_DISCONNECT it is removed again after the disconnect."""
    index = 100
    while Path(f"/sys/block/nbd{index}").exists():
        index += 1
    with NetlinkControl() as nl:
        sock, negotiated = connect_for_kernel(server.uri)
        try:
            got = nl.connect([sock.fileno()], SIZE, index=index, timeout=TIMEOUT,
                             server_flags=int(negotiated.flags),
                             client_flags=CFlag.DESTROY_ON_DISCONNECT)  # fmt: skip
        finally:
            sock.close()
        try:
            assert got == index
            _wait_size(index, SIZE)
            assert os.path.exists(device_path(index))
        finally:
            _disconnect(nl, index)
        deadline = time.monotonic() + 20
        while Path(f"/sys/block/nbd{index}").exists():
            assert time.monotonic() < deadline, f"nbd{index} was not destroyed"
            time.sleep(0.05)
