"""The Linux nbd driver's ioctl interface (include/uapi/linux/nbd.h).

Typed wrappers, one per ioctl, that call :func:`fcntl.ioctl` on an open ``/dev/nbdX``
and raise :class:`~pynbd.kernel.errors.KernelError` naming the device and the call when
the kernel refuses. They add no policy: the order of calls, block size choice and the
netlink-or-ioctl decision belong to the device object.

What the driver does with each call (drivers/block/nbd.c, ``__nbd_ioctl``):

- every call needs CAP_SYS_ADMIN (EPERM otherwise);
- SET_SOCK adds a connected stream socket (TCP or AF_UNIX); only the task that added the
  first socket may add more (EBUSY), and more than one needs the server's CAN_MULTI_CONN
  flag at DO_IT (EINVAL);
- DO_IT blocks until the device is disconnected; a signal that interrupts it shuts the
  sockets down (it is not retried: the call raises ``KernelError`` with EINTR);
- DISCONNECT only sends NBD_CMD_DISC; CLEAR_SOCK shuts the sockets and fails queued I/O;
- CLEAR_QUE and PRINT_DEBUG are accepted and do nothing on current kernels;
- on a device set up through netlink, only DISCONNECT and CLEAR_SOCK are allowed (the
  kernel logs "Cannot use ioctl interface on a netlink controlled device" and answers
  EINVAL).

The ioctl argument is a C ``unsigned long``. :func:`fcntl.ioctl` passes an integer
argument as a C ``int``, so a value above ``INT_MAX`` (a size of 2 GiB or more) goes
through libc's ``ioctl`` by :mod:`ctypes` instead.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import fcntl
import os
import platform
from collections.abc import Callable
from typing import Protocol, TypeAlias

from ..errors import InvalidRequest
from .errors import KernelError

__all__ = [
    "NBD_IOCTL_TYPE",
    "FileLike",
    "Ioctl",
    "clear_que",
    "clear_sock",
    "disconnect",
    "do_it",
    "ioc_none",
    "print_debug",
    "set_blksize",
    "set_flags",
    "set_size",
    "set_size_blocks",
    "set_sock",
    "set_timeout",
]

#: The ioctl "type" (magic) byte of every nbd ioctl.
NBD_IOCTL_TYPE = 0xAB

# _IOC_NONE and the direction shift differ by architecture (asm-generic/ioctl.h and the
# arch overrides): 0 on x86, arm, riscv, s390, parisc...; 1 << 29 on powerpc, mips,
# sparc and alpha, which use 3 direction bits above a 13-bit size field.
_DIR_NONE_ARCHES = ("ppc", "powerpc", "mips", "sparc", "alpha")


def ioc_none(kind: int, number: int, machine: str | None = None) -> int:
    """Return ``_IO(kind, number)``, the request code of an ioctl without argument data.

    Args:
        kind: the ioctl type byte (0xab for nbd).
        number: the ioctl number (0..255).
        machine: the ``uname -m`` architecture; this machine's when None.
    """
    arch = (machine if machine is not None else platform.machine()).lower()
    direction = 1 << 29 if arch.startswith(_DIR_NONE_ARCHES) else 0
    return direction | (kind & 0xFF) << 8 | (number & 0xFF)


class Ioctl(enum.IntEnum):
    """The nbd ioctl request codes (``NBD_*`` in linux/nbd.h), for this architecture."""

    SET_SOCK = ioc_none(NBD_IOCTL_TYPE, 0)
    SET_BLKSIZE = ioc_none(NBD_IOCTL_TYPE, 1)
    SET_SIZE = ioc_none(NBD_IOCTL_TYPE, 2)
    DO_IT = ioc_none(NBD_IOCTL_TYPE, 3)
    CLEAR_SOCK = ioc_none(NBD_IOCTL_TYPE, 4)
    CLEAR_QUE = ioc_none(NBD_IOCTL_TYPE, 5)
    PRINT_DEBUG = ioc_none(NBD_IOCTL_TYPE, 6)
    SET_SIZE_BLOCKS = ioc_none(NBD_IOCTL_TYPE, 7)
    DISCONNECT = ioc_none(NBD_IOCTL_TYPE, 8)
    SET_TIMEOUT = ioc_none(NBD_IOCTL_TYPE, 9)
    SET_FLAGS = ioc_none(NBD_IOCTL_TYPE, 10)


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


#: A file descriptor, or an object with ``fileno()`` (an open file, a socket).
FileLike: TypeAlias = "int | _HasFileno"

_INT_MAX = 2**31 - 1
_ULONG_MAX = 2 ** (8 * ctypes.sizeof(ctypes.c_ulong)) - 1


def _fd(obj: FileLike) -> int:
    return obj if isinstance(obj, int) else obj.fileno()


def _device_name(fd: int) -> str:
    # Name the device in errors even when the caller did not: /proc knows the path.
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"fd {fd}"


_libc_ioctl: Callable[[int, int, int], int] | None = None


def _ioctl_ulong(fd: int, request: int, arg: int) -> None:
    """ioctl(2) with a full unsigned long argument, through libc (see module docstring)."""
    global _libc_ioctl
    if _libc_ioctl is None:
        func = ctypes.CDLL(None, use_errno=True).ioctl
        # ioctl is variadic; fixed argument types match the Linux calling conventions.
        func.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong)
        func.restype = ctypes.c_int
        _libc_ioctl = func
    if _libc_ioctl(fd, request, arg) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _call(dev: FileLike, request: Ioctl, arg: int = 0, device: str | None = None) -> None:
    if not 0 <= arg <= _ULONG_MAX:
        raise InvalidRequest(f"NBD_{request.name}: argument {arg} is out of range")
    fd = _fd(dev)
    try:
        if arg <= _INT_MAX:
            fcntl.ioctl(fd, request, arg)
        else:
            _ioctl_ulong(fd, request, arg)
    except OSError as exc:
        err = exc.errno if exc.errno is not None else errno.EIO
        name = device if device is not None else _device_name(fd)
        raise KernelError(err, call=f"NBD_{request.name}", device=name) from exc


def set_sock(dev: FileLike, sock: FileLike, *, device: str | None = None) -> None:
    """NBD_SET_SOCK: hand a connected, negotiated stream socket to the device.

    Args:
        dev: the open nbd device (a descriptor or an object with ``fileno()``).
        sock: the socket (TCP or AF_UNIX stream) after the NBD handshake.
        device: the device's name for error messages; found from ``dev`` when None.

    Raises:
        KernelError: EBUSY (another task set the device up, or it is bound through
            netlink), EINVAL (not a usable socket), EPERM, ENOTTY (not an nbd device).
    """
    _call(dev, Ioctl.SET_SOCK, _fd(sock), device)


def set_blksize(dev: FileLike, size: int, *, device: str | None = None) -> None:
    """NBD_SET_BLKSIZE: set the logical block size (a power of two, 512..PAGE_SIZE).

    Raises:
        KernelError: EINVAL for a size the kernel refuses.
        InvalidRequest: ``size`` does not fit an unsigned long.
    """
    _call(dev, Ioctl.SET_BLKSIZE, size, device)


def set_size(dev: FileLike, size: int, *, device: str | None = None) -> None:
    """NBD_SET_SIZE: set the device size in bytes (any value up to ULONG_MAX).

    Raises:
        KernelError: EINVAL for a size the kernel refuses.
        InvalidRequest: ``size`` is negative or does not fit an unsigned long.
    """
    _call(dev, Ioctl.SET_SIZE, size, device)


def set_size_blocks(dev: FileLike, blocks: int, *, device: str | None = None) -> None:
    """NBD_SET_SIZE_BLOCKS: set the device size in blocks of the current block size.

    Raises:
        KernelError: EINVAL when blocks times the block size overflows.
        InvalidRequest: ``blocks`` is negative or does not fit an unsigned long.
    """
    _call(dev, Ioctl.SET_SIZE_BLOCKS, blocks, device)


def set_timeout(dev: FileLike, seconds: int, *, device: str | None = None) -> None:
    """NBD_SET_TIMEOUT: set the per-request timeout in seconds (0: never time out).

    Raises:
        KernelError: the kernel refused.
        InvalidRequest: ``seconds`` is negative or does not fit an unsigned long.
    """
    _call(dev, Ioctl.SET_TIMEOUT, seconds, device)


def set_flags(dev: FileLike, flags: int, *, device: str | None = None) -> None:
    """NBD_SET_FLAGS: pass the server's transmission flags (``TransmissionFlag``).

    Raises:
        KernelError: the kernel refused.
        InvalidRequest: ``flags`` is negative or does not fit an unsigned long.
    """
    _call(dev, Ioctl.SET_FLAGS, flags, device)


def do_it(dev: FileLike, *, device: str | None = None) -> None:
    """NBD_DO_IT: start the device and block until it is disconnected.

    Returns normally after a requested disconnect. Run it in a thread of its own: the
    GIL is released while it blocks.

    Raises:
        KernelError: EBUSY (already running), EINVAL (no socket, or several sockets
            without CAN_MULTI_CONN), ETIMEDOUT (a request timed out), EINTR (a signal
            arrived: the kernel has shut the sockets down), or another socket error.
    """
    _call(dev, Ioctl.DO_IT, 0, device)


def clear_sock(dev: FileLike, *, device: str | None = None) -> None:
    """NBD_CLEAR_SOCK: shut the device's sockets down and fail its queued requests.

    Raises:
        KernelError: the kernel refused.
    """
    _call(dev, Ioctl.CLEAR_SOCK, 0, device)


def clear_que(dev: FileLike, *, device: str | None = None) -> None:
    """NBD_CLEAR_QUE: accepted for compatibility; the kernel does nothing.

    Raises:
        KernelError: the kernel refused (not an nbd device, no permission).
    """
    _call(dev, Ioctl.CLEAR_QUE, 0, device)


def print_debug(dev: FileLike, *, device: str | None = None) -> None:
    """NBD_PRINT_DEBUG: accepted for compatibility; the kernel does nothing.

    Raises:
        KernelError: the kernel refused (not an nbd device, no permission).
    """
    _call(dev, Ioctl.PRINT_DEBUG, 0, device)


def disconnect(dev: FileLike, *, device: str | None = None) -> None:
    """NBD_DISCONNECT: send NBD_CMD_DISC on every socket (the sockets stay open).

    Raises:
        KernelError: the kernel refused.
    """
    _call(dev, Ioctl.DISCONNECT, 0, device)
