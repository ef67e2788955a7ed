"""pynbd.kernel.device logic that needs no nbd driver: names, sysfs, block sizes, errors.

The sysfs readers take their root from ``device.SYS_BLOCK``, so a fake
``/sys/block`` tree in a temporary folder stands in for the kernel's. The kernel
itself is tested in the guest (tests/kernel/).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pynbd.errors import InvalidRequest
from pynbd.kernel import device
from pynbd.kernel.device import (
    NBD_MAJOR,
    NBDDevice,
    SysfsState,
    device_index,
    device_path,
    find_free_device,
    list_devices,
    max_block_size,
    netlink_available,
    sysfs_state,
    validate_block_size,
    wait_disconnected,
)
from pynbd.kernel.errors import KernelError
from tests.kernel_host.conftest import MakeDevice

# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("name", "index"),
    [(0, 0), (15, 15), ("nbd0", 0), ("nbd12", 12), ("/dev/nbd3", 3), (Path("/dev/nbd7"), 7)],
)
def test_device_index_of_names(name: str | int | Path, index: int) -> None:
    assert device_index(name) == index


def test_device_index_refuses_a_negative_number() -> None:
    with pytest.raises(InvalidRequest, match="negative"):
        device_index(-1)


@pytest.mark.parametrize("name", ["/dev/null", "/nonexistent/sda", "nbd", "nbdx", "nbd1p1"])
def test_device_index_refuses_other_names(name: str) -> None:
    # A name that is not nbdX is looked up by its device number: these are not nbd.
    with pytest.raises(InvalidRequest, match="not an nbd device"):
        device_index(name)


@pytest.fixture
def fake_node(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str, int, int], None]]:
    """Make os.stat report a block device node of the given major/minor at a path."""
    real_stat = os.stat
    nodes: dict[str, os.stat_result] = {}

    def fake_stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        found = nodes.get(os.fspath(path))
        return found if found is not None else real_stat(path, *args, **kwargs)

    def add(path: str, major: int, minor: int) -> None:
        fields = (stat.S_IFBLK | 0o660, 1, 1, 1, 0, 0, 0, 0, 0, 0)
        # st_rdev is not one of the tuple's fields: it comes in the dict of the others.
        nodes[path] = os.stat_result(fields, {"st_rdev": os.makedev(major, minor)})

    monkeypatch.setattr(os, "stat", fake_stat)
    yield add


def test_device_index_of_another_node_by_its_number(
    fake_node: Callable[[str, int, int], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(device, "_part_shift", lambda: 5)  # max_part=16: 32 minors each
    fake_node("/dev/disk/by-id/my-disk", NBD_MAJOR, 3 << 5)
    fake_node("/dev/disk/by-id/my-part", NBD_MAJOR, (3 << 5) + 1)
    fake_node("/dev/disk/by-id/scsi", 8, 0)
    assert device_index("/dev/disk/by-id/my-disk") == 3
    with pytest.raises(InvalidRequest, match="is a partition"):
        device_index("/dev/disk/by-id/my-part")
    with pytest.raises(InvalidRequest, match="not an nbd device"):
        device_index("/dev/disk/by-id/scsi")


def test_part_shift_without_the_module_is_that_of_max_part_16() -> None:
    if Path("/sys/module/nbd/parameters/max_part").exists():
        pytest.fail("this host has the nbd module: run the device tests in the guest")
    assert device._part_shift() == 5  # fls(16), as nbd.c computes it


def test_device_path() -> None:
    assert device_path(0) == "/dev/nbd0"
    assert device_path(31) == "/dev/nbd31"


# --------------------------------------------------------------------------- sysfs


def test_list_devices_sorts_and_keeps_only_whole_nbd_devices(
    sys_block: Path, make_device: MakeDevice
) -> None:
    for index in (10, 2, 0):
        make_device(index)
    (sys_block / "sda").mkdir()
    (sys_block / "nbd2p1").mkdir()
    (sys_block / "nbdx").mkdir()
    assert list_devices() == [0, 2, 10]


def test_list_devices_without_sysfs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(device, "SYS_BLOCK", tmp_path / "missing")
    assert list_devices() == []


def test_sysfs_state_of_an_attached_device(make_device: MakeDevice) -> None:
    make_device(4, size="131072", pid="1234", backend="pynbd:x", ro="1", block_size="4096")
    state = sysfs_state("/dev/nbd4")
    assert state == SysfsState(
        index=4,
        exists=True,
        size=64 << 20,  # the size attribute counts 512-byte sectors, whatever the block size
        pid=1234,
        backend="pynbd:x",
        read_only=True,
        block_size=4096,
    )
    assert state.busy


def test_sysfs_state_of_a_free_device(make_device: MakeDevice) -> None:
    make_device(1)
    state = sysfs_state(1)
    assert (state.exists, state.size, state.pid, state.backend) == (True, 0, None, None)
    assert state.read_only is False and state.block_size == 512
    assert not state.busy


def test_sysfs_state_of_a_missing_device(sys_block: Path) -> None:
    assert sysfs_state(9) == SysfsState(9, exists=False)
    assert not sysfs_state(9).busy


@pytest.mark.parametrize(
    ("pid", "size", "busy"), [("77", "0", True), (None, "8", True), (None, "0", False)]
)
def test_busy_is_a_pid_or_a_size(
    make_device: MakeDevice, pid: str | None, size: str, busy: bool
) -> None:
    make_device(0, pid=pid, size=size)
    assert sysfs_state(0).busy is busy


def test_sysfs_state_tolerates_odd_values(make_device: MakeDevice) -> None:
    base = make_device(2, size="garbage", pid="", backend="", block_size="x")
    state = sysfs_state(2)
    assert (state.size, state.pid, state.backend, state.block_size) == (0, None, None, None)
    (base / "queue" / "logical_block_size").unlink()
    assert sysfs_state(2).block_size is None


def test_wait_disconnected_returns_when_free(make_device: MakeDevice, sys_block: Path) -> None:
    make_device(0)
    wait_disconnected(0, timeout=0)
    wait_disconnected("/dev/nbd5", timeout=0)  # no such device: nothing to wait for
    make_device(1, pid="99", size="0")  # a pid but no size: the setup is going away
    wait_disconnected(1, timeout=0)


def test_wait_disconnected_times_out_naming_the_device(make_device: MakeDevice) -> None:
    make_device(3, pid="99", size="2048")
    with pytest.raises(KernelError) as excinfo:
        wait_disconnected(3, timeout=0.05)
    exc = excinfo.value
    assert exc.errno == errno.ETIMEDOUT
    assert (exc.device, exc.call) == ("/dev/nbd3", "disconnect")
    assert "/dev/nbd3: disconnect:" in str(exc) and "still connected after 0.05 s" in str(exc)


# --------------------------------------------------------------------------- block sizes


@pytest.mark.parametrize("size", [512, 1024, 2048, 4096])
def test_valid_block_sizes(size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "max_block_size", lambda: 4096)
    assert validate_block_size(size) == size


@pytest.mark.parametrize("size", [0, 1, 256, 511, 768, 1000, 3072, 8192, -512])
def test_invalid_block_sizes(size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "max_block_size", lambda: 4096)
    with pytest.raises(InvalidRequest, match="not a power of two from 512 to 4096"):
        validate_block_size(size)


@pytest.mark.parametrize(
    ("release", "page", "limit"),
    [
        ("6.1.0-56-amd64", 4096, 4096),
        ("6.14.11", 4096, 4096),
        ("6.15.0", 4096, 65536),
        ("6.18.2-cloud", 4096, 65536),
        ("7.0", 16384, 65536),
        ("6.1.0", 65536, 65536),
        ("odd", 4096, 4096),
    ],
)
def test_max_block_size_follows_the_kernel_version(
    monkeypatch: pytest.MonkeyPatch, release: str, page: int, limit: int
) -> None:
    real = os.uname()
    fake = os.uname_result((real.sysname, real.nodename, release, real.version, real.machine))
    monkeypatch.setattr(os, "uname", lambda: fake)
    monkeypatch.setattr(os, "sysconf", lambda name: page if name == "SC_PAGE_SIZE" else 0)
    assert max_block_size() == limit


# --------------------------------------------------------------------------- no driver


def _require_no_nbd_driver() -> None:
    if Path("/sys/module/nbd").exists():
        pytest.fail("this host has the nbd driver: these tests check the messages without it")


def test_netlink_is_unavailable_without_the_driver() -> None:
    _require_no_nbd_driver()
    assert netlink_available() is False


def test_find_free_device_without_devices_says_modprobe(sys_block: Path) -> None:
    _require_no_nbd_driver()
    with pytest.raises(KernelError, match=r"modprobe nbd") as excinfo:
        find_free_device()
    assert excinfo.value.errno == errno.ENODEV


def test_find_free_device_when_every_device_is_busy(make_device: MakeDevice) -> None:
    make_device(0, pid="1", size="8")
    make_device(1, size="8")
    with pytest.raises(KernelError, match="every nbd device is in use") as excinfo:
        find_free_device(use_netlink=False)
    assert excinfo.value.errno == errno.ENODEV


def test_opening_a_missing_device_says_modprobe() -> None:
    _require_no_nbd_driver()
    with pytest.raises(KernelError) as excinfo:
        NBDDevice(None, "/dev/nbd0")
    exc = excinfo.value
    assert exc.errno == errno.ENOENT
    assert (exc.device, exc.call) == ("/dev/nbd0", "open")
    assert str(exc).startswith("/dev/nbd0: open: ") and "(modprobe nbd)" in str(exc)


def test_device_object_refuses_a_path_that_is_not_nbd() -> None:
    with pytest.raises(InvalidRequest, match="/dev/null is not an nbd device"):
        NBDDevice(None, "/dev/null")


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_device_object_refuses_what_is_only_named_nbd(tmp_path: Path) -> None:
    # Each of these is called nbd5; none may be opened read-write as a device.
    disk = tmp_path / "disk.img"  # stands for another disk
    disk.write_bytes(b"precious" * 512)
    nodes = {name: tmp_path / name / "nbd5" for name in ("file", "fifo", "null", "disk")}
    for path in nodes.values():
        path.parent.mkdir()
    nodes["file"].write_bytes(b"data")
    os.mkfifo(nodes["fifo"])
    nodes["null"].symlink_to("/dev/null")
    nodes["disk"].symlink_to(disk)
    null = os.stat("/dev/null").st_rdev
    said = {
        "file": "a regular file",
        "fifo": "a fifo",
        "null": f"a symlink to /dev/null: a character device {os.major(null)}:{os.minor(null)}",
        "disk": f"a symlink to {disk}: a regular file",
    }
    before = _open_fds()
    for name, path in nodes.items():
        with pytest.raises(InvalidRequest) as excinfo:
            NBDDevice(None, path)
        assert str(excinfo.value) == f"{path} is not an nbd device ({said[name]})"
        with pytest.raises(InvalidRequest, match="is not an nbd device"):
            device.open_device(path, os.O_RDONLY)
    assert _open_fds() == before
    assert disk.read_bytes() == b"precious" * 512


def test_device_is_checked_on_the_open_descriptor(
    tmp_path: Path, fake_node: Callable[[str, int, int], None]
) -> None:
    # The name looked like an nbd device when checked, and is something else when
    # opened (swapped in between): the descriptor's fstat refuses it.
    path = tmp_path / "nbd2"
    path.write_bytes(b"data")
    fake_node(os.fspath(path), NBD_MAJOR, 2 << device._part_shift())
    before = _open_fds()
    with pytest.raises(InvalidRequest, match=f"{path} is not an nbd device \\(a regular file\\)"):
        device.open_device(path, os.O_RDWR)
    assert _open_fds() == before  # closed again


def test_nbd_nodes_by_number(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "_part_shift", lambda: 5)

    def node(major: int, minor: int) -> os.stat_result:
        fields = (stat.S_IFBLK | 0o660, 1, 1, 1, 0, 0, 0, 0, 0, 0)
        return os.stat_result(fields, {"st_rdev": os.makedev(major, minor)})

    assert device._index_of_node("/dev/nbd3", node(NBD_MAJOR, 3 << 5)) == 3
    with pytest.raises(InvalidRequest, match="/dev/nbd3p1 is a partition"):
        device._index_of_node("/dev/nbd3p1", node(NBD_MAJOR, (3 << 5) + 1))
    with pytest.raises(InvalidRequest, match=r"/dev/x is not an nbd device \(a block device 8:0\)"):
        device._index_of_node("/dev/x", node(8, 0))


def test_nbd_major_from_proc_devices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    devices = tmp_path / "devices"
    monkeypatch.setattr(device, "PROC_DEVICES", devices)
    assert device.nbd_major() == NBD_MAJOR  # no such file
    devices.write_text("Character devices:\n  1 mem\n 43 nbd\n\nBlock devices:\n  7 loop\n")
    assert device.nbd_major() == NBD_MAJOR  # not loaded (43 nbd is a character one here)
    devices.write_text("Character devices:\n  1 mem\n\nBlock devices:\n  7 loop\n252 nbd\n")
    assert device.nbd_major() == 252


def test_closed_device_object_says_so() -> None:
    dev = NBDDevice.__new__(NBDDevice)
    dev._fd, dev._path, dev._sock, dev._job = None, "/dev/nbd2", None, None
    with pytest.raises(KernelError, match="the device is closed") as excinfo:
        dev.fileno()
    assert excinfo.value.errno == errno.EBADF and excinfo.value.device == "/dev/nbd2"
    dev.kill_async()  # never started: nothing to stop
    dev.close()
