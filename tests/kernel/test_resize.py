"""Live resize of /dev/nbdX (pynbd.kernel.resize, ``pynbd resize``), in the guest.

- An in-process backend (attach_backend, netlink and ioctl): a mounted ext4 grows
  online (backend, then device, then resize2fs) and shrinks (umount, e2fsck -f,
  resize2fs, then device, then backend) with its files intact.
- Another server (nbdkit file): the file grows and shrinks under it; ``pynbd resize``
  asks the recorded server again and the device follows.
- What the kernel accepts: RECONFIGURE with a size on a netlink device, NBD_SET_SIZE on
  an ioctl device, and each refused on the other kind.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pynbd.kernel import ioctl
from pynbd.kernel.attach import Attachment, attach, attach_backend
from pynbd.kernel.device import sysfs_state
from pynbd.kernel.errors import KernelError
from pynbd.kernel.resize import (
    _ioctl_size,
    _reconfigure_size,
    read_state,
    remove_state,
    write_state,
)
from pynbd.server import FileBackend, MemoryBackend
from tests.kernel.helpers import run
from tests.peers import Server

MiB = 1 << 20
TIMEOUT = 30
CMD_TIMEOUT = 300  # TLS under TCG, resize2fs: slower than the other kernel tests


def _run(*argv: str | os.PathLike[str], env: dict[str, str] | None = None) -> str:
    return run(*argv, env=env, timeout=CMD_TIMEOUT)


def _files(mnt: Path, prefix: str, n: int, size: int) -> dict[str, bytes]:
    files = {f"{prefix}{i}": os.urandom(size) for i in range(n)}
    for name, data in files.items():
        (mnt / name).write_bytes(data)
    os.sync()
    return files


def _check_files(mnt: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        assert (mnt / name).read_bytes() == data, name


def _fs_blocks(mnt: Path) -> int:
    st = os.statvfs(mnt)
    return st.f_blocks * st.f_frsize


# --------------------------------------------------------------------------- in-process


@pytest.mark.parametrize("use_ioctl", [False, True], ids=["netlink", "ioctl"])
def test_ext4_grows_and_shrinks_with_the_backend(
    nbd_module: None, mnt: Path, use_ioctl: bool
) -> None:
    backend = MemoryBackend(32 * MiB)
    with attach_backend(backend, timeout=TIMEOUT, use_ioctl=use_ioctl) as att:
        try:
            _grow_then_shrink(att, backend, mnt)
        finally:
            if os.path.ismount(mnt):  # before the detach, which a mount would block
                subprocess.run(["umount", os.fspath(mnt)], timeout=CMD_TIMEOUT, check=False)


def _grow_then_shrink(att: Attachment, backend: MemoryBackend, mnt: Path) -> None:
    """Grow a mounted ext4 online, then shrink it offline; the files survive."""
    dev = att.device
    _run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", dev)
    _run("mount", dev, mnt)
    files = _files(mnt, "f", 4, MiB)
    before = _fs_blocks(mnt)
    # Grow online: backend, server, device; then the filesystem.
    assert att.resize(64 * MiB) == 64 * MiB
    assert sysfs_state(att.index).size == 64 * MiB
    assert backend.size == 64 * MiB
    _run("resize2fs", dev)
    assert _fs_blocks(mnt) > before * 1.5
    files |= _files(mnt, "g", 4, 3 * MiB)
    _check_files(mnt, files)
    # Shrink: the filesystem first, unmounted, then the device and the backend.
    for name in [n for n in files if n.startswith("g")][:3]:
        (mnt / name).unlink()
        del files[name]
    _run("umount", mnt)
    _run("e2fsck", "-f", "-y", dev)
    _run("resize2fs", dev, "40M")
    assert att.resize(40 * MiB) == 40 * MiB
    assert sysfs_state(att.index).size == 40 * MiB
    assert backend.size == 40 * MiB
    _run("e2fsck", "-f", "-n", dev)
    _run("mount", dev, mnt)
    _check_files(mnt, files)
    _run("umount", mnt)


def test_new_connections_see_the_new_size(nbd_module: None) -> None:
    backend = MemoryBackend(8 * MiB)
    with attach_backend(backend, timeout=TIMEOUT) as att:
        att.resize(24 * MiB)
        fd = os.open(att.device, os.O_RDWR)
        try:
            # A write past the old end reaches the backend through the live connection.
            os.pwrite(fd, b"z" * 4096, 20 * MiB)
            os.fsync(fd)
        finally:
            os.close(fd)
        buf = memoryview(bytearray(4096))
        backend.pread_into(buf, 20 * MiB)
        assert bytes(buf) == b"z" * 4096
        assert att._serve is not None
        spec = next(iter(att._serve[0].config.exports.values()))
        assert spec.size == 24 * MiB  # what a later handshake reports


def test_file_backend_resize(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"a" * MiB)
    with FileBackend(image) as backend:
        backend.resize(3 * MiB)
        assert backend.size == 3 * MiB == image.stat().st_size
        backend.resize(MiB // 2)
        assert backend.size == image.stat().st_size == MiB // 2


# --------------------------------------------------------------------------- other servers


@pytest.mark.timeout(300)  # one real `pynbd resize` process: slow to start under TCG
def test_pynbd_resize_rereads_nbdkit(
    nbd_module: None,
    nbdkit: Callable[..., Server],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(16 * MiB)
    server = nbdkit("file", os.fspath(image))
    monkeypatch.setenv("PYNBD_STATE_DIR", os.fspath(tmp_path / "state"))
    try:
        with attach(server.uri, timeout=TIMEOUT) as att:
            write_state(att.index, server.uri)
            assert read_state(att.device) is not None
            os.truncate(image, 48 * MiB + 100)  # rounded down to the block size (512)
            out = _run(sys.executable, "-m", "pynbd", "resize", att.device, env=dict(os.environ))
            assert int(out) == 48 * MiB == sysfs_state(att.index).size
            os.truncate(image, 20 * MiB)
            assert _cli("resize", att.device, capsys=capsys) == (0, str(20 * MiB))
            assert sysfs_state(att.index).size == 20 * MiB
            # --size may shrink below the export, never go past it.
            assert _cli("resize", att.device, "--size", "8M", capsys=capsys) == (0, str(8 * MiB))
            status, err = _cli("resize", att.device, "--size", "1G", capsys=capsys, out=False)
            assert status == 1 and "more than the export" in err
            remove_state(att.index)
            assert read_state(att.index) is None
    finally:
        server.stop()


def _cli(*argv: str, capsys: pytest.CaptureFixture[str], out: bool = True) -> tuple[int, str]:
    from pynbd.cli import main

    status = main(list(argv))
    captured = capsys.readouterr()
    return status, (captured.out if out else captured.err).strip()


# --------------------------------------------------------------------------- the kernel


def test_which_interface_resizes_which_device(
    nbd_module: None, nbdkit: Callable[..., Server]
) -> None:
    server = nbdkit("memory", str(64 * MiB))
    try:
        with attach(server.uri, timeout=TIMEOUT) as att:
            _reconfigure_size(att.index, 32 * MiB, None)
            assert _wait_size(att.index, 32 * MiB)
            with pytest.raises(KernelError) as info:
                _ioctl_size(att.index, 16 * MiB)
            assert info.value.errno == errno.EINVAL  # ioctls refused on netlink devices
        with attach(server.uri, timeout=TIMEOUT, use_ioctl=True) as att:
            with pytest.raises(KernelError) as info:
                _reconfigure_size(att.index, 32 * MiB, None)
            assert info.value.errno == errno.EINVAL  # not configured by netlink
            fd = os.open(att.device, os.O_RDONLY)
            try:
                ioctl.set_size(fd, 48 * MiB, device=att.device)
            finally:
                os.close(fd)
            assert _wait_size(att.index, 48 * MiB)
    finally:
        server.stop()


def _wait_size(index: int, size: int) -> bool:
    deadline = time.monotonic() + 30
    while sysfs_state(index).size != size:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
