"""``pynbd resize``: make an attached nbd device's capacity follow its export.

::

    pynbd resize /dev/nbd0                  # ask the recorded server for the size again
    pynbd resize /dev/nbd0 --uri nbd://h/e  # ask this server
    pynbd resize /dev/nbd0 --size 2G        # set this size (not above the export's)

When a server's export grew or shrank (``qemu-img resize`` under qemu-nbd, a bigger
file under nbdkit), the kernel does not know: this asks the server for the size again
(the URI that ``pynbd attach`` recorded in ``/run/pynbd/nbdX.json``, or ``--uri``) and
sets the device's capacity (netlink RECONFIGURE, or NBD_SET_SIZE for a device attached
with ``--ioctl``), rounded down to its block size. ``--size`` sets a given size, checked
against the export's when the server is known. A filesystem on the device is not
touched: grow it afterwards (resize2fs), shrink it before.

Prints the device's new size in bytes. Exit status 0 on success, 1 on an error, 2 on a
usage error.
"""

from __future__ import annotations

import argparse
import errno

from ..errors import InvalidRequest, NBDError
from .common import CommandError, Subparsers, parse_size
from .kernel import explain_kernel_error


def register(sub: Subparsers) -> None:
    """Add ``resize`` to the ``pynbd`` parser."""
    doc = __doc__ or ""
    p = sub.add_parser(
        "resize",
        help="make /dev/nbdX follow its export's new size (Linux)",
        description=doc[doc.index("When a server") :].split("\n\n")[0].replace("``", ""),
    )
    p.add_argument("device", metavar="DEVICE", help="/dev/nbdX, nbdX or X")
    p.add_argument("--size", type=parse_size, metavar="BYTES", help="set this size")
    p.add_argument("--uri", metavar="URI", help="the server (default: the recorded one)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``pynbd resize``."""
    from ..kernel.errors import KernelError
    from ..kernel.resize import reread_size

    try:
        size = reread_size(args.device, uri=args.uri, size=args.size)
    except KernelError as exc:
        if exc.errno == errno.EINVAL:  # both interfaces refuse a device not attached
            raise CommandError(f"{exc}: is {args.device} attached?") from exc
        raise explain_kernel_error(exc, args.device) from exc
    except InvalidRequest as exc:
        raise CommandError(str(exc)) from exc
    except NBDError as exc:
        raise CommandError(f"cannot ask the server: {exc}") from exc
    print(size, flush=True)
    return 0
