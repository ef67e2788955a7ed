"""Errors raised by :mod:`pynbd.kernel` (the Linux nbd driver's ioctls and netlink).

They extend the tree drawn in :mod:`pynbd.errors`::

    NBDError
    └── KernelError              also an OSError: ``errno`` is the kernel's errno; names
        │                        the device and the call that failed
        ├── FamilyNotFound       the generic-netlink family is not registered (for
        │                        "nbd": the driver is not loaded)
        ├── DeviceBusy           the device is mounted or held open (errno EBUSY);
        │                        names the holders
        └── NetlinkFormatError   a netlink message could not be parsed (errno EBADMSG)

None of them closes an NBD connection: the kernel interface keeps no connection state
of ours (``fatal`` is False). The netlink codec (:mod:`pynbd.kernel.netlink`) raises
only :class:`NetlinkFormatError` on bad input and :class:`~pynbd.errors.InvalidRequest`
on bad arguments, whatever it is given.
"""

from __future__ import annotations

import errno as _errno
import os
from collections.abc import Sequence

from ..errors import NBDError

__all__ = ["DeviceBusy", "FamilyNotFound", "KernelError", "NetlinkFormatError"]


class KernelError(NBDError, OSError):
    """A call into the Linux nbd driver failed.

    Attributes:
        errno: the errno the kernel returned (``errno.EBUSY``...).
        call: what was called (``"NBD_SET_SOCK"``, ``"NBD_CMD_CONNECT"``...), or None.
        device: the device it was called on (``"/dev/nbd0"``), or None.
        detail: extra text from the kernel (a netlink extended ack) or from us.
    """

    def __init__(
        self,
        err: int,
        detail: str = "",
        *,
        call: str | None = None,
        device: str | None = None,
    ) -> None:
        parts = [p for p in (device, call) if p]
        text = ": ".join([*parts, os.strerror(err)])
        if detail:
            text += f" ({detail})"
        OSError.__init__(self, err, text)
        self.call = call
        self.device = device
        self.detail = detail

    def __str__(self) -> str:
        return str(self.strerror)


class FamilyNotFound(KernelError):
    """The kernel has no generic-netlink family of that name (errno ENOENT).

    For the family ``"nbd"`` this means the nbd driver is not loaded.

    Attributes:
        family: the family name that was looked up.
    """

    def __init__(self, family: str) -> None:
        if family == "nbd":
            text = "the nbd driver is not loaded (modprobe nbd)"
        else:
            text = f"generic netlink family {family!r} not found"
        super().__init__(_errno.ENOENT, text, call="CTRL_CMD_GETFAMILY")
        self.family = family
        # The whole message is the explanation: "No such file or directory" adds nothing.
        self.strerror = text
        self.args = (_errno.ENOENT, text)


class DeviceBusy(KernelError):
    """The device is mounted, held open, or used by another block device (EBUSY).

    Attributes:
        holders: who holds it (objects whose ``str()`` says who: ``pid 42 (sleep)``,
            ``mounted on /mnt``, ``dm-0``).
    """

    def __init__(self, device: str, holders: Sequence[object]) -> None:
        who = "; ".join(str(h) for h in holders) or "unknown"
        super().__init__(_errno.EBUSY, f"held by {who}", call="detach", device=device)
        self.holders = tuple(holders)


class NetlinkFormatError(KernelError):
    """A netlink message was truncated or malformed (errno EBADMSG)."""

    def __init__(self, detail: str) -> None:
        super().__init__(_errno.EBADMSG, detail, call="netlink")
