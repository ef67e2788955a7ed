"""The Linux nbd device: the ioctl device object and the netlink control channel.

Two ways to drive ``/dev/nbdX`` (see :mod:`pynbd.kernel.ioctl` and
:mod:`pynbd.kernel.netlink` for the calls themselves):

- :class:`NBDDevice`, the historic ioctl interface, in the shape of the Perl
  ``Linux::NBD::Client`` this project descends from: open a device, hand it a negotiated
  socket, set size, block size, timeout and flags, then :meth:`NBDDevice.run` (NBD_DO_IT)
  blocks until the device is disconnected. :meth:`NBDDevice.run_async` runs it in a
  thread and :meth:`NBDDevice.kill_async` stops it without a signal;
- :class:`NetlinkControl`, the generic-netlink family "nbd": CONNECT hands the kernel
  every socket and setting in one message and needs no process to stay around;
  STATUS, DISCONNECT, RECONFIGURE, and LINK_DEAD events.

Device discovery (:func:`find_free_device`) asks netlink STATUS for a device nobody
holds, or reads sysfs (no ``/sys/block/nbdX/pid`` and size 0) when netlink is missing.
The old trick of probing with ``NBD_SET_SOCK(-1)`` no longer works on current kernels.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import select
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from ..errors import InvalidRequest
from . import ioctl
from .errors import FamilyNotFound, KernelError
from .netlink import (
    CFlag,
    DeviceConfig,
    DeviceStatus,
    GenlMessage,
    NbdCmd,
    decode_connect_reply,
    decode_link_dead,
    decode_status_reply,
    encode_connect,
    encode_disconnect,
    encode_reconfigure,
    encode_status,
)
from .nlsocket import GenlSocket

__all__ = [
    "NBD_MAJOR",
    "AsyncRun",
    "CFlag",
    "DeviceStatus",
    "Holder",
    "NBDDevice",
    "NetlinkControl",
    "SysfsState",
    "device_index",
    "device_path",
    "find_free_device",
    "find_holders",
    "list_devices",
    "max_block_size",
    "nbd_major",
    "netlink_available",
    "open_device",
    "sysfs_state",
    "validate_block_size",
    "wait_disconnected",
]

#: The block major number of nbd devices.
NBD_MAJOR = 43

SYS_BLOCK = Path("/sys/block")
#: Where the kernel lists the majors of its drivers.
PROC_DEVICES = Path("/proc/devices")
_NAME = re.compile(r"nbd(\d+)\Z")


# --- names and sysfs ------------------------------------------------------------------


def device_index(device: str | os.PathLike[str] | int) -> int:
    """The number X of ``/dev/nbdX`` (also accepts ``nbdX`` or X itself).

    Raises:
        InvalidRequest: the name is not that of an nbd device.
    """
    if isinstance(device, int):
        if device < 0:
            raise InvalidRequest(f"nbd device index {device} is negative")
        return device
    name = os.path.basename(os.fspath(device))
    found = _NAME.match(name)
    if found is None:
        # A symlink or a node of another name: the device number tells.
        try:
            st = os.stat(device)
        except OSError as exc:
            raise InvalidRequest(f"{os.fspath(device)} is not an nbd device") from exc
        return _index_of_node(os.fspath(device), st)
    return int(found.group(1))


def _part_shift() -> int:
    # Minors per device are 2**part_shift, part_shift = fls(max_part) (nbd.c).
    try:
        max_part = int(Path("/sys/module/nbd/parameters/max_part").read_text())
    except (OSError, ValueError):
        max_part = 16
    return max_part.bit_length() if max_part > 0 else 0


def nbd_major() -> int:
    """The block major number of the nbd driver: ``/proc/devices`` says, else 43."""
    with contextlib.suppress(OSError, ValueError):
        block = PROC_DEVICES.read_text().partition("Block devices:")[2]
        for line in block.splitlines():
            number, _, name = line.strip().partition(" ")
            if name.strip() == "nbd":
                return int(number)
    return NBD_MAJOR


def open_device(path: str | os.PathLike[str], flags: int) -> tuple[int, int]:
    """Open an nbd device; returns ``(descriptor, index)``.

    Only a whole nbd device is opened: a block device of the nbd driver's major
    (:func:`nbd_major`) and not a partition, whatever its name (udev symlinks welcome).
    The node is checked before it is opened (opening a fifo may block, some character
    devices act when opened), and the opened descriptor again with ``fstat``, so the
    name cannot be swapped for another disk between the check and the use.

    Args:
        path: the device.
        flags: ``os.O_RDONLY``, ``os.O_RDWR``... (``O_CLOEXEC`` is added).

    Raises:
        InvalidRequest: not an nbd device; the message says what it is instead
            (``/tmp/x/nbd3 is not an nbd device (a symlink to /dev/sda: a block
            device 8:0)``).
        OSError: it cannot be looked at or opened (ENOENT, EACCES...).
    """
    name = os.fspath(path)
    _index_of_node(name, os.stat(name))
    fd = os.open(name, flags | os.O_CLOEXEC)
    try:
        index = _index_of_node(name, os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return fd, index


def _index_of_node(path: str, st: os.stat_result) -> int:
    """The index of the nbd device with status ``st``; InvalidRequest for anything else."""
    if not stat.S_ISBLK(st.st_mode) or os.major(st.st_rdev) != nbd_major():
        raise InvalidRequest(f"{path} is not an nbd device ({_describe_node(path, st)})")
    part_shift = _part_shift()
    if os.minor(st.st_rdev) & ((1 << part_shift) - 1):
        raise InvalidRequest(f"{path} is a partition, not an nbd device")
    return os.minor(st.st_rdev) >> part_shift


def _describe_node(path: str, st: os.stat_result) -> str:
    """What a node is, for an error: ``a regular file``, ``a symlink to /dev/sda: ...``."""
    mode = st.st_mode
    if stat.S_ISBLK(mode) or stat.S_ISCHR(mode):
        kind = "block" if stat.S_ISBLK(mode) else "character"
        what = f"a {kind} device {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    elif stat.S_ISREG(mode):
        what = "a regular file"
    elif stat.S_ISDIR(mode):
        what = "a directory"
    elif stat.S_ISFIFO(mode):
        what = "a fifo"
    elif stat.S_ISSOCK(mode):
        what = "a socket"
    else:
        what = "not a device"
    if os.path.islink(path):
        return f"a symlink to {os.path.realpath(path)}: {what}"
    return what


def device_path(index: int) -> str:
    """``/dev/nbdX`` for an index."""
    return f"/dev/nbd{index}"


def list_devices() -> list[int]:
    """The indexes of the nbd devices that exist (``/sys/block/nbd*``), sorted."""
    out = []
    try:
        entries = list(SYS_BLOCK.iterdir())
    except OSError:
        return []
    for entry in entries:
        found = _NAME.match(entry.name)
        if found:
            out.append(int(found.group(1)))
    return sorted(out)


@dataclass(frozen=True, slots=True)
class SysfsState:
    """What sysfs says of ``/sys/block/nbdX``.

    Attributes:
        index: X.
        exists: the device exists.
        size: its size in bytes (0: not connected).
        pid: the pid in ``pid`` (present while connected), else None.
        backend: the netlink backend identifier (``backend``), or None.
        read_only: the ``ro`` attribute.
        block_size: the logical block size (``queue/logical_block_size``), or None.
    """

    index: int
    exists: bool
    size: int = 0
    pid: int | None = None
    backend: str | None = None
    read_only: bool = False
    block_size: int | None = None

    @property
    def busy(self) -> bool:
        """The device is in use (a pid file or a size)."""
        return self.pid is not None or self.size > 0


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def sysfs_state(device: str | os.PathLike[str] | int) -> SysfsState:
    """Read ``/sys/block/nbdX`` (size, pid, backend, ro, block size).

    Raises:
        InvalidRequest: not an nbd device name.
    """
    index = device_index(device)
    base = SYS_BLOCK / f"nbd{index}"
    size = _read(base / "size")
    if size is None:
        return SysfsState(index, exists=False)
    pid = _read(base / "pid")
    backend = _read(base / "backend")
    lbs = _read(base / "queue" / "logical_block_size")
    return SysfsState(
        index=index,
        exists=True,
        size=int(size) * 512 if size.isdigit() else 0,  # always 512-byte sectors
        pid=int(pid) if pid and pid.isdigit() else None,
        backend=backend or None,
        read_only=_read(base / "ro") == "1",
        block_size=int(lbs) if lbs and lbs.isdigit() else None,
    )


@dataclass(frozen=True, slots=True)
class Holder:
    """Something that holds an nbd device (or one of its partitions).

    Attributes:
        kind: ``"process"`` (an open descriptor), ``"mount"`` or ``"device"`` (a
            device-mapper or md device stacked on it).
        what: the holder: a command name, a mount point, a device name.
        pid: the process, for ``"process"``.
        detail: which partition, descriptor or filesystem.
    """

    kind: str
    what: str
    pid: int | None = None
    detail: str = ""

    def __str__(self) -> str:
        if self.kind == "process":
            return f"pid {self.pid} ({self.what}) {self.detail}".rstrip()
        if self.kind == "mount":
            return f"mounted on {self.what} {self.detail}".rstrip()
        return f"{self.what} {self.detail}".rstrip()


def find_holders(device: str | os.PathLike[str] | int) -> list[Holder]:
    """Who holds ``/dev/nbdX`` or a partition of it: open descriptors of every process
    (``/proc/*/fd``), mounts of this mount namespace (``/proc/self/mountinfo``), and
    stacked block devices (``/sys/block/nbdX/holders``).

    Raises:
        InvalidRequest: not an nbd device name.
    """
    index = device_index(device)
    shift = _part_shift()
    first, last = index << shift, ((index + 1) << shift) - 1
    nbd = nbd_major()

    def ours(major: int, minor: int) -> bool:
        return major == nbd and first <= minor <= last

    out = _mount_holders(ours) + _process_holders(ours)
    base = SYS_BLOCK / f"nbd{index}"
    for holders_dir in [base / "holders", *base.glob(f"nbd{index}p*/holders")]:
        with contextlib.suppress(OSError):
            for entry in sorted(holders_dir.iterdir()):
                part = holders_dir.parent.name
                out.append(Holder("device", entry.name, detail=f"(on {part})"))
    return out


def _mount_holders(ours: Callable[[int, int], bool]) -> list[Holder]:
    out = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            if len(fields) < 5 or ":" not in fields[2]:
                continue
            major, _, minor = fields[2].partition(":")
            if major.isdigit() and minor.isdigit() and ours(int(major), int(minor)):
                fstype = fields[fields.index("-") + 1] if "-" in fields[6:] else ""
                point = fields[4].replace("\\040", " ")
                out.append(Holder("mount", point, detail=f"({fstype})" if fstype else ""))
    return out


def _process_holders(ours: Callable[[int, int], bool]) -> list[Holder]:
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:
            continue  # gone, or not ours to look at
        for fd in fds:
            try:
                st = os.stat(fd)
            except OSError:
                continue
            if stat.S_ISBLK(st.st_mode) and ours(os.major(st.st_rdev), os.minor(st.st_rdev)):
                comm = _read(proc / "comm") or "?"
                out.append(Holder("process", comm, int(proc.name), f"fd {fd.name}"))
    return out


def wait_disconnected(device: str | int, timeout: float = 30.0) -> None:
    """Wait until ``/sys/block/nbdX/pid`` is gone or the size is 0.

    Raises:
        KernelError: ETIMEDOUT when the device is still connected after ``timeout``.
    """
    index = device_index(device)
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        state = sysfs_state(index)
        if not state.exists or state.pid is None or state.size == 0:
            return
        if time.monotonic() >= deadline:
            raise KernelError(
                errno.ETIMEDOUT,
                f"still connected after {timeout:g} s",
                call="disconnect",
                device=device_path(index),
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def validate_block_size(size: int) -> int:
    """Check a logical block size: a power of two from 512 to :func:`max_block_size`.

    Raises:
        InvalidRequest: it is not.
    """
    limit = max_block_size()
    if size < 512 or size > limit or size & (size - 1):
        raise InvalidRequest(f"block size {size} is not a power of two from 512 to {limit}")
    return size


def max_block_size() -> int:
    """The largest block size the running kernel takes: the page size, or 64 KiB on
    kernels from 6.15 on (which lifted the page-size limit)."""
    page = os.sysconf("SC_PAGE_SIZE")
    found = re.match(r"(\d+)\.(\d+)", os.uname().release)
    if found and (int(found.group(1)), int(found.group(2))) >= (6, 15):
        return max(page, 65536)
    return page


def netlink_available() -> bool:
    """True when the kernel has the "nbd" generic-netlink family (driver loaded)."""
    try:
        with GenlSocket(timeout=5.0) as sock:
            sock.resolve_nbd()
    except KernelError:
        return False
    return True


def find_free_device(*, use_netlink: bool = True) -> str:
    """Find an nbd device that nobody holds.

    With netlink: the first device that STATUS reports as not connected (no
    configuration: nobody has it open or attached). Else sysfs: the first device
    without a ``pid`` file and of size 0.

    Raises:
        KernelError: ENODEV when every device is in use, or no nbd device exists (then
            the message says ``modprobe nbd``).
    """
    candidates: list[int] = []
    if use_netlink:
        try:
            with NetlinkControl() as nl:
                candidates = sorted(d.index for d in nl.status() if not d.connected)
        except FamilyNotFound:
            use_netlink = False
    if not use_netlink:
        candidates = [i for i in list_devices() if not sysfs_state(i).busy]
    for index in candidates:
        if os.path.exists(device_path(index)):
            return device_path(index)
    if not list_devices():
        raise KernelError(errno.ENODEV, "no nbd devices: load the driver (modprobe nbd)")
    raise KernelError(errno.ENODEV, "every nbd device is in use", call="find free device")


# --- the ioctl device -----------------------------------------------------------------


class AsyncRun:
    """A :meth:`NBDDevice.run` in a thread of its own.

    Attributes:
        thread: the thread that blocks in NBD_DO_IT.
        pid: the process it runs in (this one).
    """

    def __init__(self, device: NBDDevice) -> None:
        self.pid = os.getpid()
        self.error: BaseException | None = None
        self._device = device
        self.thread = threading.Thread(
            target=self._main, name=f"nbd-do-it {device.path}", daemon=True
        )
        self.thread.start()

    def _main(self) -> None:
        # A signal delivered to this thread would interrupt NBD_DO_IT, and the kernel
        # then shuts the device's sockets down: let the other threads take them.
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            self._device.run()
        except BaseException as exc:  # kept for wait(); the thread must not die loudly
            self.error = exc

    def running(self) -> bool:
        """True while NBD_DO_IT has not returned."""
        return self.thread.is_alive()

    def wait(self, timeout: float | None = None) -> None:
        """Wait for NBD_DO_IT to return; re-raise its error, if any.

        Raises:
            KernelError: NBD_DO_IT failed (ETIMEDOUT when a request timed out...), or
                ETIMEDOUT when it is still running after ``timeout``.
        """
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise KernelError(
                errno.ETIMEDOUT,
                f"still running after {timeout:g} s",
                call="NBD_DO_IT",
                device=self._device.path,
            )
        if self.error is not None:
            raise self.error


class NBDDevice:
    """An open ``/dev/nbdX``, driven through ioctls (``Linux::NBD::Client`` in Python).

    ::

        dev = NBDDevice(sock)               # a negotiated socket; a free device
        dev.set_blocksize(512)
        dev.set_size(size)
        dev.set_timeout(30)
        dev.set_flags(flags)
        job = dev.run_async()               # NBD_DO_IT in a thread
        ...                                 # use dev.path
        dev.kill_async()                    # disconnect, clear the socket, join
        dev.close()

    Every setter must come before :meth:`run`; the kernel applies them when NBD_DO_IT
    starts. The ioctls that add sockets must all come from one thread (the kernel
    remembers the task that set the device up).

    Args:
        sock: a connected socket after the NBD handshake (or None: give it later).
        device: the device path; None finds a free one (see :meth:`device`).

    Raises:
        KernelError: the device cannot be opened (ENOENT: modprobe nbd; EACCES/EPERM:
            run as root), or the kernel refused the socket.
    """

    def __init__(
        self,
        sock: ioctl.FileLike | None = None,
        device: str | os.PathLike[str] | None = None,
    ) -> None:
        self._fd: int | None = None
        self._index: int | None = None
        self._path = ""
        self._sock: ioctl.FileLike | None = None
        self._job: AsyncRun | None = None
        self.device(device)
        if sock is not None:
            try:
                self.socket(sock)
            except BaseException:
                self.close()
                raise

    # -- the device ----------------------------------------------------------------------

    @property
    def path(self) -> str:
        """The device's path (``/dev/nbd0``)."""
        return self._path

    @property
    def index(self) -> int:
        """The device's number X (of the device opened, whatever its path's name)."""
        return device_index(self._path) if self._index is None else self._index

    def fileno(self) -> int:
        """The open device's descriptor.

        Raises:
            KernelError: EBADF when the device is closed.
        """
        if self._fd is None:
            raise KernelError(errno.EBADF, "the device is closed", device=self._path or None)
        return self._fd

    def device(self, path: str | os.PathLike[str] | None = None) -> str:
        """Open the device ``path``, or a free one when None; return its path.

        A device opened before is closed first (it must not be running).

        Raises:
            KernelError: no free device, or the open failed (ENOENT: modprobe nbd;
                EACCES: run as root).
        """
        if self._job is not None and self._job.running():
            raise KernelError(errno.EBUSY, "NBD_DO_IT is running", device=self._path)
        self.close()
        target = os.fspath(path) if path is not None else find_free_device()
        device_index(target)  # a name that is not nbdX must be an nbd node
        try:
            self._fd, self._index = open_device(target, os.O_RDWR)
        except OSError as exc:
            hint = "modprobe nbd" if exc.errno == errno.ENOENT else ""
            if exc.errno in (errno.EACCES, errno.EPERM):
                hint = "run as root"
            raise KernelError(exc.errno or errno.EIO, hint, call="open", device=target) from exc
        self._path = target
        return target

    def close(self) -> None:
        """Close the device (the kernel tears the setup down once nobody has it open)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        self._sock = None

    def __enter__(self) -> NBDDevice:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._job is not None and self._job.running():
            self.kill_async()
        self.close()

    # -- the ioctls ----------------------------------------------------------------------

    def socket(self, sock: ioctl.FileLike | None) -> None:
        """NBD_SET_SOCK with a negotiated socket, or NBD_CLEAR_SOCK with None.

        The socket must be blocking (no Python timeout): it is the kernel's from now on.
        A reference is kept until :meth:`close`.

        Raises:
            KernelError: EBUSY (another task set the device up, or it is attached
                through netlink), EINVAL (not a usable socket).
        """
        if sock is None:
            ioctl.clear_sock(self.fileno(), device=self._path)
            self._sock = None
        else:
            ioctl.set_sock(self.fileno(), sock, device=self._path)
            self._sock = sock

    def disconnect(self) -> None:
        """NBD_DISCONNECT: send NBD_CMD_DISC to the server (the sockets stay open).

        Raises:
            KernelError: the kernel refused.
        """
        ioctl.disconnect(self.fileno(), device=self._path)

    def clear_queue(self) -> None:
        """NBD_CLEAR_QUE (accepted and ignored by current kernels).

        Raises:
            KernelError: the kernel refused.
        """
        ioctl.clear_que(self.fileno(), device=self._path)

    def set_blocksize(self, size: int) -> None:
        """NBD_SET_BLKSIZE: the logical block size (a power of two, 512..PAGE_SIZE).

        Raises:
            InvalidRequest: not a valid block size (nothing is sent).
            KernelError: the kernel refused.
        """
        ioctl.set_blksize(self.fileno(), validate_block_size(size), device=self._path)

    def set_size(self, size: int) -> None:
        """NBD_SET_SIZE: the device size in bytes (a multiple of the block size).

        Raises:
            InvalidRequest: negative or too large.
            KernelError: the kernel refused.
        """
        ioctl.set_size(self.fileno(), size, device=self._path)

    def set_blocks(self, blocks: int) -> None:
        """NBD_SET_SIZE_BLOCKS: the device size in blocks of the current block size.

        Raises:
            InvalidRequest: negative or too large.
            KernelError: the kernel refused (the size in bytes overflows).
        """
        ioctl.set_size_blocks(self.fileno(), blocks, device=self._path)

    def set_timeout(self, seconds: int) -> None:
        """NBD_SET_TIMEOUT: the request timeout in seconds (0: never time out).

        Raises:
            InvalidRequest: negative.
            KernelError: the kernel refused.
        """
        ioctl.set_timeout(self.fileno(), int(seconds), device=self._path)

    def set_flags(self, flags: int) -> None:
        """NBD_SET_FLAGS: the server's transmission flags (READ_ONLY, SEND_FLUSH...).

        Raises:
            InvalidRequest: negative.
            KernelError: the kernel refused.
        """
        ioctl.set_flags(self.fileno(), int(flags), device=self._path)

    def run(self) -> None:
        """NBD_DO_IT: serve the device in this thread until it is disconnected.

        The GIL is released while it blocks, so other threads (an in-process server)
        run. When it returns the device's sockets are cleared (NBD_CLEAR_SOCK), so that
        the device can be set up again.

        Raises:
            KernelError: NBD_DO_IT failed: EINVAL (no socket, or several sockets and no
                CAN_MULTI_CONN), EBUSY (already running), ETIMEDOUT (a request timed
                out), EINTR (a signal: the sockets were shut down).
        """
        fd = self.fileno()
        try:
            ioctl.do_it(fd, device=self._path)
        finally:
            # The kernel shut the sockets down; release them so the device is free.
            with contextlib.suppress(KernelError):
                ioctl.clear_sock(fd, device=self._path)
            self._sock = None

    def run_async(self) -> AsyncRun:
        """Start :meth:`run` in a thread; returns its handle (``.thread``, ``.pid``,
        ``.wait()``).

        Raises:
            KernelError: EBUSY when it is already running.
        """
        if self._job is not None and self._job.running():
            raise KernelError(errno.EBUSY, "already running", call="NBD_DO_IT", device=self._path)
        self.fileno()
        self._job = AsyncRun(self)
        return self._job

    def kill_async(self, timeout: float = 30.0) -> None:
        """Stop a :meth:`run_async`: NBD_DISCONNECT, NBD_CLEAR_SOCK, then join the thread.

        No signal is sent: DISCONNECT asks the server to close, CLEAR_SOCK shuts the
        sockets down so NBD_DO_IT returns even when the server never answers. Errors of
        NBD_DO_IT itself (which a forced stop may cause) are not raised.

        Raises:
            KernelError: ETIMEDOUT when the thread has not ended after ``timeout``.
        """
        job = self._job
        if job is None:
            return
        if job.running():
            for call in (ioctl.disconnect, ioctl.clear_sock):
                # Either may fail: already disconnected, or not yet started.
                with contextlib.suppress(KernelError):
                    call(self.fileno(), device=self._path)
        job.thread.join(timeout)
        if job.thread.is_alive():
            raise KernelError(
                errno.ETIMEDOUT, "NBD_DO_IT did not return", call="kill_async", device=self._path
            )
        self._job = None


# --- netlink --------------------------------------------------------------------------


class NetlinkControl:
    """The nbd driver's generic-netlink interface.

    ::

        with NetlinkControl() as nl:
            index = nl.connect([sock.fileno()], size=1 << 30, timeout=30)
            nl.disconnect(index)

    Args:
        timeout: seconds to wait for each answer of the kernel.

    Raises:
        FamilyNotFound: the nbd driver is not loaded (modprobe nbd).
        KernelError: no netlink socket could be made.
    """

    def __init__(self, timeout: float = 10.0) -> None:
        self._sock = GenlSocket(timeout=timeout)
        try:
            self.family, self.group = self._sock.resolve_nbd()
        except BaseException:
            self._sock.close()
            raise

    def close(self) -> None:
        """Close the netlink socket."""
        self._sock.close()

    def __enter__(self) -> NetlinkControl:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _request(self, data: bytes, call: str, index: int | None) -> list[GenlMessage]:
        device = device_path(index) if index is not None else None
        return self._sock.request(data, call=call, device=device)

    def connect(
        self,
        sockets: Iterable[int],
        size: int,
        *,
        index: int | None = None,
        block_size: int | None = None,
        timeout: int | None = None,
        dead_conn_timeout: int | None = None,
        server_flags: int = 0,
        client_flags: int = 0,
        backend_id: str | None = None,
    ) -> int:
        """NBD_CMD_CONNECT: attach negotiated sockets to a device; returns its index.

        The kernel takes its own reference to each socket: close yours afterwards.

        Args:
            sockets: descriptors of connected sockets after the handshake (several need
                the server's CAN_MULTI_CONN).
            size: the export size in bytes.
            index: the device number; None lets the kernel pick (or create) a free one.
            block_size: the logical block size (None: the kernel's default, 1024).
            timeout: request timeout in seconds (None or 0: never).
            dead_conn_timeout: seconds to hold I/O while every connection is dead,
                waiting for :meth:`reconfigure`.
            server_flags: the server's transmission flags.
            client_flags: :class:`CFlag` bits.
            backend_id: shown in /sys/block/nbdX/backend; reconfigure must repeat it.

        Raises:
            KernelError: EBUSY (the device is in use), EINVAL (bad settings, several
                sockets without CAN_MULTI_CONN), EPERM (run as root).
            InvalidRequest: a value that does not fit, no socket.
        """
        config = DeviceConfig(
            index=index,
            size_bytes=size,
            block_size_bytes=validate_block_size(block_size) if block_size else None,
            timeout=timeout,
            server_flags=server_flags,
            client_flags=int(client_flags),
            sockets=tuple(sockets),
            dead_conn_timeout=dead_conn_timeout,
            backend_identifier=backend_id,
        )
        data = encode_connect(self.family.id, config, seq=self._sock.next_seq())
        replies = self._request(data, "NBD_CMD_CONNECT", index)
        for msg in replies:
            if msg.cmd == NbdCmd.CONNECT:
                return decode_connect_reply(msg)
        if index is not None:
            return index
        raise KernelError(errno.EBADMSG, "no index in the reply", call="NBD_CMD_CONNECT")

    def disconnect(self, index: int) -> None:
        """NBD_CMD_DISCONNECT: send NBD_CMD_DISC, shut the sockets, drop the setup.

        Works on devices attached through ioctls too. Returns at once: use
        :func:`wait_disconnected` to wait until the device is free.

        Raises:
            KernelError: EINVAL (no such device), EPERM.
        """
        data = encode_disconnect(self.family.id, index, seq=self._sock.next_seq())
        self._request(data, "NBD_CMD_DISCONNECT", index)

    def reconfigure(
        self,
        index: int,
        *,
        sockets: Iterable[int] = (),
        timeout: int | None = None,
        dead_conn_timeout: int | None = None,
        client_flags: int | None = None,
        backend_id: str | None = None,
    ) -> None:
        """NBD_CMD_RECONFIGURE: new sockets replace dead ones (only dead ones), and the
        timeouts and client flags change.

        Raises:
            KernelError: EINVAL (not connected, or a backend identifier that does not
                match), EPERM.
        """
        config = DeviceConfig(
            index=index,
            timeout=timeout,
            dead_conn_timeout=dead_conn_timeout,
            client_flags=None if client_flags is None else int(client_flags),
            sockets=tuple(sockets),
            backend_identifier=backend_id,
        )
        data = encode_reconfigure(self.family.id, config, seq=self._sock.next_seq())
        self._request(data, "NBD_CMD_RECONFIGURE", index)

    def status(self, index: int | None = None) -> tuple[DeviceStatus, ...]:
        """NBD_CMD_STATUS of one device, or of every device when index is None.

        ``connected`` means the device has a configuration: attached, being set up, or
        merely held open by someone.

        Raises:
            KernelError: EINVAL when there is no such device.
        """
        data = encode_status(self.family.id, index, seq=self._sock.next_seq())
        out: list[DeviceStatus] = []
        for msg in self._request(data, "NBD_CMD_STATUS", index):
            out.extend(decode_status_reply(msg))
        return tuple(out)

    def subscribe(self) -> None:
        """Join the "nbd_mc_group" multicast group: LINK_DEAD events for :meth:`events`.

        Raises:
            KernelError: the kernel refused.
        """
        self._sock.subscribe(self.group)

    def events(self, timeout: float | None = None) -> Iterator[int]:
        """Yield the index of each device whose connection died (NBD_CMD_LINK_DEAD),
        as events arrive, until ``timeout`` seconds pass without one (None: forever).

        Call :meth:`subscribe` first.

        Raises:
            KernelError, NetlinkFormatError: the socket failed or a message was bad.
        """
        while True:
            if not self._sock.pending:
                ready, _, _ = select.select([self._sock.fileno()], [], [], timeout)
                if not ready:
                    return
            for msg in self._sock.receive():
                if isinstance(msg, GenlMessage) and msg.cmd == NbdCmd.LINK_DEAD:
                    yield decode_link_dead(msg)
