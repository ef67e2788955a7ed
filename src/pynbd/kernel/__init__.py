"""The Linux nbd driver: attach an NBD export as a block device /dev/nbdX.

Two kernel interfaces reach the driver:

- :mod:`pynbd.kernel.ioctl`: the historic ioctls on an open ``/dev/nbdX`` (SET_SOCK,
  DO_IT, ...), typed wrappers around :func:`fcntl.ioctl`;
- :mod:`pynbd.kernel.netlink`: the generic-netlink family "nbd" (CONNECT, DISCONNECT,
  RECONFIGURE, STATUS, LINK_DEAD events), as a pure codec, and
  :mod:`pynbd.kernel.nlsocket`, the few lines that move its bytes through a socket.

Errors are :class:`~pynbd.kernel.errors.KernelError` (an :class:`OSError` that names the
device and the call) and its subclasses.
"""

from __future__ import annotations

from .errors import FamilyNotFound, KernelError, NetlinkFormatError

__all__ = ["FamilyNotFound", "KernelError", "NetlinkFormatError"]

# The device object, attach/detach and status (appended with pynbd.kernel part 2).
from .attach import (
    Attachment,
    DeviceInfo,
    attach,
    attach_backend,
    attach_opener,
    connect_for_kernel,
    detach,
    device_status,
)
from .device import NBDDevice, NetlinkControl, find_free_device
from .relay import TLSRelay
from .resize import reread_size, resize_backend
from .supervisor import Backoff, Keepalive, ReconnectPolicy, Supervisor

__all__ += [
    "Attachment",
    "Backoff",
    "DeviceInfo",
    "Keepalive",
    "NBDDevice",
    "NetlinkControl",
    "ReconnectPolicy",
    "Supervisor",
    "TLSRelay",
    "attach",
    "attach_backend",
    "attach_opener",
    "connect_for_kernel",
    "detach",
    "device_status",
    "find_free_device",
    "reread_size",
    "resize_backend",
]
