"""attach()/attach_backend()/detach() end to end: a filesystem on /dev/nbdX against
every server we know, partitions without partprobe, read-only exports, many cycles.

Runs in the test guest (see conftest.py); servers run in the guest. Each test detaches
its device and stops its server, even when it fails.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pynbd.client.sync import Client
from pynbd.kernel.attach import (
    Attachment,
    attach,
    attach_backend,
    connect_for_kernel,
    detach,
    device_status,
)
from pynbd.kernel.device import NetlinkControl, device_path, sysfs_state
from pynbd.server import FileBackend, MemoryBackend
from tests.kernel.helpers import CMD_TIMEOUT, filesystem_round_trip
from tests.kernel.helpers import run as _run
from tests.kernel.helpers import umount as _umount
from tests.peers import Server, make_raw_image

SIZE = 64 * 1024 * 1024
TIMEOUT = 30


def _filesystem_round_trip(att: Attachment, tmp_path: Path) -> None:
    filesystem_round_trip(att.device, tmp_path / "mnt")


@pytest.fixture
def mnt_cleanup(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    _umount(tmp_path / "mnt")


# --------------------------------------------------------------------------- filesystems


@pytest.mark.parametrize("use_ioctl", [False, True], ids=["netlink", "ioctl"])
def test_ext4_on_nbdkit(
    nbd_module: None, nbdkit: Callable[..., Server], mnt_cleanup: Path, use_ioctl: bool
) -> None:
    server = nbdkit("memory", str(SIZE))
    try:
        with attach(server.uri, timeout=TIMEOUT, use_ioctl=use_ioctl) as att:
            assert att.method == ("ioctl" if use_ioctl else "netlink")
            assert att.block_size == 512
            _filesystem_round_trip(att, mnt_cleanup)
        assert sysfs_state(att.index).pid is None
    finally:
        server.stop()


def test_ext4_on_qemu_nbd(
    nbd_module: None, qemu_nbd: Callable[..., Server], mnt_cleanup: Path
) -> None:
    image = make_raw_image(mnt_cleanup / "disk.img", SIZE)
    server = qemu_nbd(image, shared=4)
    try:
        with attach(server.uri, timeout=TIMEOUT, connections=2) as att:
            # qemu-nbd advertises 1/4096/32M: the minimum (1) keeps 512.
            assert att.block_size == 512
            assert att.connections == 2  # multi-conn with --shared > 1
            _filesystem_round_trip(att, mnt_cleanup)
    finally:
        server.stop()


def test_ext4_on_nbd_server(
    nbd_module: None, nbd_server: Callable[..., Server], mnt_cleanup: Path
) -> None:
    image = make_raw_image(mnt_cleanup / "disk.img", SIZE)
    server = nbd_server({"disk": image})
    try:
        with attach(server.uri, timeout=TIMEOUT) as att:
            assert att.size == SIZE
            _filesystem_round_trip(att, mnt_cleanup)
    finally:
        server.stop()


def test_ext4_on_pynbd_serve(nbd_module: None, mnt_cleanup: Path) -> None:
    sock = mnt_cleanup / "pynbd.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pynbd", "serve", "--memory", "64M", "--unix", os.fspath(sock),
         "--quiet"],
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert proc.poll() is None, "pynbd serve exited"
            assert time.monotonic() < deadline, "pynbd serve never listened"
            time.sleep(0.1)
        with attach(f"nbd+unix:///?socket={sock}", timeout=TIMEOUT) as att:
            _filesystem_round_trip(att, mnt_cleanup)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("use_ioctl", [False, True], ids=["netlink", "ioctl"])
def test_ext4_on_in_process_backend(nbd_module: None, mnt_cleanup: Path, use_ioctl: bool) -> None:
    backend = MemoryBackend(SIZE)
    with attach_backend(backend, timeout=TIMEOUT, use_ioctl=use_ioctl) as att:
        _filesystem_round_trip(att, mnt_cleanup)
    assert sysfs_state(att.index).pid is None
    assert att._server is not None and not att._server.is_alive()
    assert backend.allocated > 0  # the filesystem landed in our backend


# --------------------------------------------------------------------------- partitions


# sfdisk's script: 16 MiB at 1 MiB, then the rest. Offsets and sizes in bytes, so that
# one script serves every block size (sfdisk converts them to the device's sectors).
SFDISK_SCRIPT = "label: dos\nstart=1MiB, size=16MiB, type=83\nstart=17MiB, type=83\n"
# Where each partition lies, in bytes: (start, size).
PARTITIONS = [(1 << 20, 16 << 20), (17 << 20, SIZE - (17 << 20))]


def _partitions(index: int) -> list[str]:
    base = Path(f"/sys/block/nbd{index}")
    return sorted(p.name for p in base.iterdir() if p.name.startswith(f"nbd{index}p"))


def _sfdisk() -> str:
    found = shutil.which("sfdisk")
    assert found, "sfdisk is missing: install the Debian package fdisk (.ci/run does)"
    return found


def _write_partition_table(device: str) -> str:
    """Run sfdisk on the device; returns its output."""
    done = subprocess.run(
        [_sfdisk(), "--wipe", "always", device],
        input=SFDISK_SCRIPT,
        capture_output=True,
        text=True,
        timeout=CMD_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, f"sfdisk: {done.returncode}\n{done.stdout}{done.stderr}"
    return done.stdout + done.stderr


def _check_partitions(att: Attachment, block_size: int) -> None:
    """The kernel's partitions are sfdisk's, where sfdisk put them, in the right units."""
    index = att.index
    names = _partitions(index)
    assert names == [f"nbd{index}p1", f"nbd{index}p2"]
    for name, (start, size) in zip(names, PARTITIONS, strict=True):
        part = Path(f"/sys/block/nbd{index}/{name}")
        # sysfs counts 512-byte sectors, whatever the logical block size.
        assert int((part / "start").read_text()) * 512 == start, name
        assert int((part / "size").read_text()) * 512 == size, name
        assert os.path.exists(f"/dev/{name}")
    table = json.loads(_run(_sfdisk(), "--json", att.device))["partitiontable"]
    assert table["label"] == "dos" and table["sectorsize"] == block_size
    # sfdisk wrote the table in units of the device's logical block size.
    found = [(p["start"] * block_size, p["size"] * block_size) for p in table["partitions"]]
    assert found == PARTITIONS


def _write_through(path: str, data: bytes, offset: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_through(path: str, size: int, offset: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def _forget_partitions(index: int, block_size: int) -> None:
    """Attach a blank export to the device and detach it: the kernel's partitions of
    the device are then none. (A detach leaves the partitions of the last scan in
    sysfs; only the next scan drops them.)"""
    with attach_backend(MemoryBackend(SIZE), index, timeout=TIMEOUT, block_size=block_size):
        assert _partitions(index) == []


@pytest.mark.parametrize("block_size", [512, 4096])
def test_partitions_appear_without_partprobe(
    nbd_module: None, mnt_cleanup: Path, block_size: int
) -> None:
    image = make_raw_image(mnt_cleanup / "disk.img", SIZE)
    backend = FileBackend(image)
    data = os.urandom(8192)
    try:
        with attach_backend(backend, timeout=TIMEOUT, block_size=block_size) as att:
            index = att.index
            assert sysfs_state(index).block_size == block_size
            assert _partitions(index) == []
            # sfdisk asks the kernel to re-read the table itself (BLKRRPART).
            assert "re-read partition table" in _write_partition_table(att.device)
            _check_partitions(att, block_size)
            _write_through(f"{att.device}p2", data, 3 * 4096)
        # The data went through the partition to its offset on the server (the file).
        with open(image, "rb") as f:
            f.seek(PARTITIONS[1][0] + 3 * 4096)
            assert f.read(len(data)) == data
        _forget_partitions(index, block_size)
        # A fresh attach finds the table by itself: no partprobe, no blockdev --rereadpt.
        with attach_backend(backend, index, timeout=TIMEOUT, block_size=block_size) as att:
            _check_partitions(att, block_size)
            assert _read_through(f"{att.device}p2", len(data), 3 * 4096) == data
    finally:
        backend.close()


@pytest.mark.parametrize("block_size", [512, 4096])
def test_partition_scan_comes_from_the_first_open(
    nbd_module: None, nbdkit: Callable[..., Server], mnt_cleanup: Path, block_size: int
) -> None:
    """What makes partitions appear: the first open after CONNECT, which attach() does
    as it settles. Before it (netlink CONNECT alone) the kernel shows none."""
    image = make_raw_image(mnt_cleanup / "disk.img", SIZE)
    server = nbdkit("file", os.fspath(image))
    try:
        with attach(server.uri, timeout=TIMEOUT, block_size=block_size) as att:
            index = att.index
            _write_partition_table(att.device)
        print(f"\nafter detach, sysfs still lists {_partitions(index)}")
        _forget_partitions(index, block_size)
        sock, negotiated = connect_for_kernel(server.uri)
        with sock, NetlinkControl() as nl:
            nl.connect(
                [sock.fileno()],
                SIZE,
                index=index,
                block_size=block_size,
                timeout=TIMEOUT,
                server_flags=int(negotiated.flags),
            )
        try:
            deadline = time.monotonic() + TIMEOUT
            while sysfs_state(index).size != SIZE:
                assert time.monotonic() < deadline, "the device never got its size"
                time.sleep(0.05)
            assert _partitions(index) == []
            os.close(os.open(device_path(index), os.O_RDONLY))
            assert _partitions(index) == [f"nbd{index}p1", f"nbd{index}p2"]
        finally:
            detach(index)
    finally:
        server.stop()


# --------------------------------------------------------------------------- read-only


@pytest.mark.parametrize("how", ["server", "client"])
def test_read_only_export_refuses_writes(
    nbd_module: None, nbdkit: Callable[..., Server], how: str
) -> None:
    extra = ["-r"] if how == "server" else []
    server = nbdkit("memory", str(SIZE), extra=extra)
    try:
        before = _server_sha(server)
        with attach(server.uri, timeout=TIMEOUT, read_only=how == "client") as att:
            assert sysfs_state(att.index).read_only
            with pytest.raises(OSError) as excinfo:
                fd = os.open(att.device, os.O_RDWR)
                try:
                    os.pwrite(fd, b"x" * 4096, 0)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            assert excinfo.value.errno in (errno.EROFS, errno.EPERM, errno.EACCES)
        assert _server_sha(server) == before
    finally:
        server.stop()


def _server_sha(server: Server) -> bytes:
    with Client(server.uri, timeout=60) as client:
        return bytes(client.pread(1 << 20, 0))


# --------------------------------------------------------------------------- endurance


def test_fifty_attach_write_detach_cycles(nbd_module: None, nbdkit: Callable[..., Server]) -> None:
    server = nbdkit("memory", str(SIZE))
    try:
        used = set()
        for i in range(50):
            with attach(server.uri, timeout=TIMEOUT, use_ioctl=i % 5 == 4) as att:
                used.add(att.index)
                fd = os.open(att.device, os.O_RDWR)
                try:
                    os.pwrite(fd, i.to_bytes(4, "big") * 128, i * 512)
                    os.fsync(fd)
                finally:
                    os.close(fd)
        with Client(server.uri, timeout=60) as client:
            for i in range(50):
                assert client.pread(512, i * 512) == i.to_bytes(4, "big") * 128
        busy = [d.device for d in device_status() if d.connected or d.pid or d.size]
        assert busy == [], f"devices left busy: {busy}"
        assert len(used) <= 2  # freed devices are found again
    finally:
        server.stop()
