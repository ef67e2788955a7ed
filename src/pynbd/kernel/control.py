"""Operate on any nbd device, whoever attached it: :func:`detach` it safely, and
report what each device is doing (:func:`device_status`).

Safe detach means: refuse a device that is mounted or held open, naming the holders
(unless forced), then netlink DISCONNECT, then the ioctls for a device whose server is
gone or hung, each kernel call bounded in time so that nothing here hangs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import ioctl
from .device import (
    Holder,
    NetlinkControl,
    device_index,
    device_path,
    find_holders,
    list_devices,
    open_device,
    sysfs_state,
    wait_disconnected,
)
from .errors import DeviceBusy, FamilyNotFound, KernelError
from .resize import remove_state

__all__ = ["SETTLE_TIMEOUT", "DeviceInfo", "detach", "device_status", "refuse_if_held"]

#: Seconds to wait for the device to become usable, or free after a detach.
SETTLE_TIMEOUT = 30.0
#: Seconds a kernel call of detach() gets at least (DISCONNECT to a hung server).
KERNEL_CALL_TIMEOUT = 5.0


def detach(
    device: str | int,
    *,
    timeout: float = SETTLE_TIMEOUT,
    use_ioctl: bool = False,
    force: bool = False,
) -> list[Holder]:
    """Disconnect an nbd device, whoever attached it, and wait until it is free.

    Safe for a device whose server is gone or hung. First, the device must not be held:
    mounted, held open by a process, or used by another block device (device mapper,
    md); else :class:`DeviceBusy` names the holders, unless ``force``. Then netlink
    DISCONNECT (unless ``use_ioctl`` or the driver has no netlink), then, when the
    device is still connected, NBD_DISCONNECT and NBD_CLEAR_SOCK on the opened device.
    Every kernel call runs in a worker thread with a time limit, so this never hangs
    (the kernel itself may spend up to the request timeout per connection sending
    NBD_CMD_DISC to a hung server). A device that is not connected is left alone.

    With ``force`` the holders get EIO from then on; the device is released once they
    let go of it (unmount, close), so this returns without waiting for that.

    Returns:
        The holders found (empty unless ``force``).

    Raises:
        InvalidRequest: not an nbd device name.
        DeviceBusy: the device is held and ``force`` is false.
        KernelError: the kernel refused (EPERM: run as root), or the device was still
            connected after ``timeout`` seconds.
    """
    index = device_index(device)
    holders = _disconnect(index, timeout, use_ioctl, force)
    remove_state(index)  # what `pynbd attach` recorded for `pynbd resize`
    return holders


def _disconnect(index: int, timeout: float, use_ioctl: bool, force: bool) -> list[Holder]:
    holders = refuse_if_held(index) if not force else find_holders(index)
    deadline = time.monotonic() + timeout
    # A kernel call gets at least a few seconds, whatever is left of the wait.
    limit = max(timeout, KERNEL_CALL_TIMEOUT)
    done = False
    if not use_ioctl:
        try:
            _bounded(lambda: _netlink_disconnect(index), limit, "NBD_CMD_DISCONNECT", index)
            done = True
        except FamilyNotFound:
            pass
    if holders:
        # The holders keep the device's configuration (its pid and size) alive.
        if not done:
            _bounded(lambda: _ioctl_disconnect(index), limit, "NBD_CLEAR_SOCK", index)
        with contextlib.suppress(KernelError):
            wait_disconnected(index, min(1.0, timeout))
        return holders
    if done:
        with contextlib.suppress(KernelError):
            wait_disconnected(index, max(0.0, deadline - time.monotonic()))
            return []
    # No netlink, or still connected: the ioctls shut the sockets down whatever the
    # server does.
    _bounded(lambda: _ioctl_disconnect(index), limit, "NBD_CLEAR_SOCK", index)
    wait_disconnected(index, max(1.0, deadline - time.monotonic()))
    return []


def refuse_if_held(index: int) -> list[Holder]:
    """Raise DeviceBusy when the device is held; a holder seen once may be a passing
    probe (udev, blkid): look again before refusing."""
    holders = find_holders(index)
    for _ in range(2):
        if not holders:
            return []
        time.sleep(0.2)
        holders = find_holders(index)
    if holders:
        raise DeviceBusy(device_path(index), holders)
    return []


def _netlink_disconnect(index: int) -> None:
    with NetlinkControl(timeout=SETTLE_TIMEOUT) as nl:
        nl.disconnect(index)  # a device that is not attached: a no-op


def _ioctl_disconnect(index: int) -> None:
    path = device_path(index)
    state = sysfs_state(index)
    if state.exists and not state.busy:
        return
    try:
        fd, _ = open_device(path, os.O_RDWR)
    except OSError as exc:
        raise KernelError(exc.errno or errno.EIO, call="open", device=path) from exc
    try:
        # DISCONNECT may fail on a device whose sockets are already gone; CLEAR_SOCK
        # is what frees it.
        with contextlib.suppress(KernelError):
            ioctl.disconnect(fd, device=path)
        ioctl.clear_sock(fd, device=path)
    finally:
        os.close(fd)


def _bounded(call: Callable[[], None], timeout: float, what: str, index: int) -> None:
    """Run ``call`` in a daemon thread; raise its error, or ETIMEDOUT after ``timeout``
    (the thread is left to finish in the kernel)."""
    box: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # handed to the caller
            box.append(exc)

    worker = threading.Thread(target=run, name=f"pynbd {what}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise KernelError(
            errno.ETIMEDOUT,
            f"the kernel did not finish in {timeout:g} s (a hung server?)",
            call=what,
            device=device_path(index),
        )
    if box:
        raise box[0]


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """One nbd device, as :func:`device_status` reports it.

    Attributes:
        index, device: its number and path.
        connected: it has a configuration (netlink STATUS), or, without netlink, a
            pid file or a size.
        size: bytes (0 when not attached).
        pid: the process that attached it (``/sys/block/nbdX/pid``), or None.
        backend: the netlink backend identifier, or None.
        read_only: the device is read-only.
        block_size: its logical block size.
    """

    index: int
    device: str
    connected: bool
    size: int
    pid: int | None
    backend: str | None
    read_only: bool
    block_size: int | None

    def as_dict(self) -> dict[str, object]:
        """The fields as a JSON-ready dict."""
        return {
            "index": self.index,
            "device": self.device,
            "connected": self.connected,
            "size": self.size,
            "pid": self.pid,
            "backend": self.backend,
            "read_only": self.read_only,
            "block_size": self.block_size,
        }


def device_status(device: str | int | None = None) -> list[DeviceInfo]:
    """Report one device, or every nbd device, from netlink STATUS and sysfs.

    Raises:
        InvalidRequest: not an nbd device name.
        KernelError: the device does not exist (ENODEV), or no nbd device exists
            (modprobe nbd).
    """
    connected: dict[int, bool] = {}
    index = device_index(device) if device is not None else None
    try:
        with NetlinkControl() as nl:
            connected = {d.index: d.connected for d in nl.status()}
    except FamilyNotFound:
        pass
    indexes = [index] if index is not None else sorted(set(list_devices()) | set(connected))
    if not indexes:
        raise KernelError(errno.ENODEV, "no nbd devices: load the driver (modprobe nbd)")
    out = []
    for i in indexes:
        state = sysfs_state(i)
        if not state.exists:
            raise KernelError(errno.ENODEV, "no such nbd device", device=device_path(i))
        out.append(
            DeviceInfo(
                index=i,
                device=device_path(i),
                connected=connected.get(i, state.busy),
                size=state.size,
                pid=state.pid,
                backend=state.backend,
                read_only=state.read_only,
                block_size=state.block_size,
            )
        )
    return out
