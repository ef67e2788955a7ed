"""attach()/attach_backend()/detach() end to end: a filesystem on /dev/nbdX against
every server we know, partitions without partprobe, read-only exports, many cycles.

Runs in the test guest (see conftest.py); servers run in the guest. Each test detaches
its device and stops its server, even when it fails. The last test reads dmesg and
fails on kernel warnings, bugs, oopses and hung tasks.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pynbd.client.sync import Client
from pynbd.kernel.attach import Attachment, attach, attach_backend, device_status
from pynbd.kernel.device import sysfs_state
from pynbd.server import FileBackend, MemoryBackend
from tests.peers import Server, make_raw_image

SIZE = 64 * 1024 * 1024
TIMEOUT = 30
CMD_TIMEOUT = 120
# dmesg lines that mean the kernel is unhappy.
BAD_KERNEL_WORDS = ("WARNING:", "BUG:", "Oops", "hung task", "blocked for more than")


def _run(*argv: str | os.PathLike[str]) -> str:
    done = subprocess.run(
        [os.fspath(a) for a in argv],
        capture_output=True,
        text=True,
        timeout=CMD_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, f"{argv}: {done.returncode}\n{done.stdout}{done.stderr}"
    return done.stdout


def _umount(mnt: Path) -> None:
    if os.path.ismount(mnt):
        subprocess.run(["umount", os.fspath(mnt)], timeout=CMD_TIMEOUT, check=False)


def _filesystem_round_trip(att: Attachment, tmp_path: Path) -> None:
    """mkfs.ext4, mount, write, umount, fsck -f, mount again, compare."""
    mnt = tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    files = {f"f{i}": os.urandom(37_000 * (i + 1)) for i in range(4)}
    # 16 MiB of filesystem: TCG makes mkfs and fsck of more slow, for no more coverage.
    _run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", att.device, "16M")
    try:
        _run("mount", att.device, mnt)
        for name, data in files.items():
            (mnt / name).write_bytes(data)
        (mnt / "dir").mkdir()
        (mnt / "dir" / "small").write_text("hello")
        _run("umount", mnt)
        _run("e2fsck", "-f", "-n", att.device)
        _run("mount", "-o", "ro", att.device, mnt)
        for name, data in files.items():
            assert (mnt / name).read_bytes() == data
        assert (mnt / "dir" / "small").read_text() == "hello"
        _run("umount", mnt)
    finally:
        _umount(mnt)


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


def _partitions(index: int) -> list[str]:
    base = Path(f"/sys/block/nbd{index}")
    return sorted(p.name for p in base.iterdir() if p.name.startswith(f"nbd{index}p"))


def _mbr(block_size: int) -> bytes:
    """An MS-DOS partition table (sector 0): 16 MiB at 1 MiB, then the rest, in units
    of the logical block size, as sfdisk writes it (written here by hand: sfdisk is
    not installed everywhere)."""
    table = bytearray(512)
    first, second = (1 << 20) // block_size, (17 << 20) // block_size
    entries = [(first, (16 << 20) // block_size), (second, SIZE // block_size - second)]
    for i, (start, count) in enumerate(entries):
        entry = bytes([0, 0xFE, 0xFF, 0xFF, 0x83, 0xFE, 0xFF, 0xFF])
        entry += start.to_bytes(4, "little") + count.to_bytes(4, "little")
        table[446 + 16 * i : 462 + 16 * i] = entry
    table[510:512] = b"\x55\xaa"
    return bytes(table)


@pytest.mark.parametrize("block_size", [512, 4096])
def test_partitions_appear_without_partprobe(
    nbd_module: None, mnt_cleanup: Path, block_size: int
) -> None:
    image = mnt_cleanup / "disk.img"
    make_raw_image(image, SIZE)
    backend = FileBackend(image)
    try:
        with attach_backend(backend, timeout=TIMEOUT, block_size=block_size) as att:
            assert sysfs_state(att.index).block_size == block_size
            assert _partitions(att.index) == []
            fd = os.open(att.device, os.O_WRONLY)
            try:
                os.pwrite(fd, _mbr(block_size).ljust(block_size, b"\0"), 0)
                os.fsync(fd)
            finally:
                os.close(fd)
        # A fresh attach scans the table by itself: no partprobe, no blockdev --rereadpt.
        with attach_backend(backend, timeout=TIMEOUT, block_size=block_size) as att:
            parts = _partitions(att.index)
            assert parts == [f"nbd{att.index}p1", f"nbd{att.index}p2"]
            p1 = Path(f"/sys/block/nbd{att.index}/{parts[0]}")
            assert int((p1 / "size").read_text()) * 512 == 16 << 20
            assert int((p1 / "start").read_text()) * 512 == 1 << 20
            assert os.path.exists(f"{att.device}p1")
            if shutil.which("sfdisk"):
                listing = _run("sfdisk", "--dump", att.device)
                assert f"sector-size: {block_size}" in listing
    finally:
        backend.close()


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
    _check_dmesg()


def _check_dmesg() -> None:
    log = subprocess.run(
        ["dmesg"], capture_output=True, text=True, timeout=CMD_TIMEOUT, check=True
    ).stdout
    bad = [line for line in log.splitlines() if any(w in line for w in BAD_KERNEL_WORDS)]
    assert not bad, "kernel log:\n" + "\n".join(bad)


def test_zz_dmesg_is_clean(nbd_module: None) -> None:
    """Runs last in this module: nothing above upset the kernel."""
    _check_dmesg()
