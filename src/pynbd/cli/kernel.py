"""``pynbd attach``, ``pynbd detach``, ``pynbd status``: the Linux nbd driver.

::

    pynbd attach nbd://host/export                   # prints the device, e.g. /dev/nbd0
    pynbd attach nbd+unix:///?socket=/tmp/s /dev/nbd3 --connections 4 --read-only
    pynbd attach --memory 1G --foreground            # a RAM disk served by this process
    pynbd attach --file disk.img /dev/nbd1           # a file, served by this process
    pynbd attach nbd://host/export --persist         # reconnects while the server restarts
    pynbd attach nbds://host/export?tls-certificates=DIR   # TLS, relayed by this process
    pynbd detach /dev/nbd0 [--force]
    pynbd status [/dev/nbd0] [--json]

``attach`` negotiates with the server itself and hands the connections to the kernel
(netlink, or the ioctls with ``--ioctl``), waits until the device is usable (with its
partitions scanned), and prints the device's path. With netlink the command then exits
and the device stays attached until ``pynbd detach``; with ``--foreground`` (implied by
``--ioctl``, ``--memory``, ``--file`` and ``nbds://``: a process must stay) it stays until SIGINT or
SIGTERM, then detaches. ``--connections N`` opens N connections when the server allows
multi-conn. ``--timeout`` is the kernel's request timeout (0: never); ``--dead-timeout``
holds I/O that long while every connection is down. ``--block-size`` defaults to 512,
or the server's minimum block size when that is larger.

``--persist`` keeps this process running a reconnect supervisor (see
pynbd.kernel.supervisor): when connections die it re-dials with backoff, checks the
export is the same and hands the new connections to the kernel, which holds I/O for
``--dead-timeout`` seconds (default 60) meanwhile; it gives up after ``--give-up``
seconds (default 300). TCP connections get keepalive (``--keepalive IDLE,INTVL,CNT``,
default 30,10,3, or ``off``) and TCP_USER_TIMEOUT (``--user-timeout S``, default
IDLE+INTVL*CNT, 0 for none) so that a peer that vanished is noticed while idle.

The kernel cannot speak TLS: for ``nbds://`` this process relays each connection
(pynbd.kernel.relay): a socketpair to the kernel, TLS to the server. Do not swap onto
such a device. ``attach`` records the URI in /run/pynbd/nbdX.json for ``pynbd resize``.

``detach`` refuses a device that is mounted or held open, naming who holds it;
``--force`` disconnects it anyway (the holders then get EIO). It works when the
server is gone or hung: netlink DISCONNECT, then the NBD_DISCONNECT and NBD_CLEAR_SOCK
ioctls, each with a time limit.

``status`` prints one line per device: path, ``attached`` or ``free``, size, the pid
that attached it and the backend identifier; ``--json`` prints a list of objects
(index, device, connected, size, pid, backend, read_only, block_size).

Exit status 0 on success, 1 on an error (one line saying what to do: run as root,
modprobe nbd, detach the busy device, ...), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import signal
import sys
import threading
from types import FrameType
from typing import TYPE_CHECKING

from ..errors import InvalidRequest
from .common import CommandError, Subparsers, human_size, parse_size, positive_int

# pynbd.kernel is imported by the functions that use it: building the parser of every
# command must not (see pynbd.cli).
if TYPE_CHECKING:
    from ..kernel.attach import Attachment
    from ..kernel.errors import KernelError
    from ..kernel.supervisor import Keepalive


def register(sub: Subparsers) -> None:
    """Add ``attach``, ``detach`` and ``status`` to the ``pynbd`` parser."""
    doc = __doc__ or ""
    p = sub.add_parser(
        "attach",
        help="attach an NBD export to /dev/nbdX (Linux)",
        description=doc[doc.index("``attach`` negotiates") :].split("\n\n")[0].replace("``", ""),
        usage="pynbd attach (URI | --memory SIZE | --file PATH) [DEVICE] [OPTIONS]",
    )
    p.add_argument("args", nargs="*", metavar="URI DEVICE", help="the server and the device")
    g = p.add_argument_group("served by this process (implies --foreground)")
    g.add_argument("--memory", metavar="SIZE", type=parse_size, help="a sparse RAM disk")
    g.add_argument("--file", metavar="PATH", help="a file or block device")
    g = p.add_argument_group("device")
    g.add_argument("--connections", "-C", type=positive_int, default=1, metavar="N")
    g.add_argument("--timeout", type=_seconds, default=30, metavar="S", help="default 30")
    g.add_argument("--dead-timeout", type=_seconds, metavar="S",
                   help="hold I/O while every connection is down (60 with --persist)")  # fmt: skip
    g.add_argument("--block-size", type=parse_size, metavar="BYTES")
    g.add_argument("--read-only", "-r", action="store_true")
    g.add_argument("--ioctl", action="store_true", help="ioctls + NBD_DO_IT, not netlink")
    g.add_argument("--backend-id", metavar="TEXT", help="shown in /sys/block/nbdX/backend")
    g.add_argument("--foreground", "-f", action="store_true", help="detach on SIGINT/SIGTERM")
    g = p.add_argument_group("surviving the server")
    g.add_argument("--persist", action="store_true", help="stay, and reconnect dead connections")
    g.add_argument(
        "--give-up",
        type=_seconds,
        default=300,
        metavar="S",
        help="stop reconnecting after S (default 300; 0: never)",
    )
    g.add_argument("--keepalive", type=_keepalive, metavar="IDLE,INTVL,CNT|off",
                   help="TCP keepalive (default 30,10,3)")  # fmt: skip
    g.add_argument("--user-timeout", type=_seconds, metavar="S",
                   help="TCP_USER_TIMEOUT (default IDLE+INTVL*CNT; 0: none)")  # fmt: skip
    p.set_defaults(func=run_attach)

    p = sub.add_parser("detach", help="detach /dev/nbdX (Linux)")
    p.add_argument("device", metavar="DEVICE")
    p.add_argument("--ioctl", action="store_true", help="NBD_DISCONNECT, not netlink")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S")
    p.add_argument("--force", action="store_true", help="even when mounted or held open")
    p.set_defaults(func=run_detach)

    p = sub.add_parser("status", help="show the nbd devices (Linux)")
    p.add_argument("device", metavar="DEVICE", nargs="?")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_status)


def _seconds(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of seconds: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def _keepalive(text: str) -> Keepalive:
    from ..kernel.supervisor import Keepalive

    if text == "off":
        return Keepalive.off()
    try:
        idle, interval, count = (int(part) for part in text.split(","))
        return Keepalive(idle, interval, count)
    except (ValueError, InvalidRequest) as exc:
        raise argparse.ArgumentTypeError(f"want IDLE,INTVL,CNT (seconds, seconds, probes) "
                                         f"or off, not {text!r}") from exc  # fmt: skip


def explain_kernel_error(exc: KernelError, device: str | None = None) -> CommandError:
    """One line that says what failed and what to do."""
    from ..kernel.errors import DeviceBusy, FamilyNotFound

    text = str(exc)
    if isinstance(exc, DeviceBusy):
        return CommandError(f"{text}: unmount or close it first, or use --force")
    if (
        isinstance(exc, FamilyNotFound)
        or (exc.errno == errno.ENOENT and exc.call in ("open", None))
        or exc.errno == errno.ENODEV  # no /sys/block/nbdX: no driver, or beyond nbds_max
    ):
        if "modprobe nbd" in text:
            return CommandError(text)  # the error says it already
        hint = "is the nbd driver loaded? (modprobe nbd)"
    elif exc.errno in (errno.EPERM, errno.EACCES):
        hint = "run as root"
    elif exc.errno == errno.EBUSY:
        what = exc.device or device or "the device"
        hint = f"{what} is busy: detach it first (pynbd detach {what}) or choose another"
    else:
        return CommandError(text)
    return CommandError(f"{text}: {hint}" if hint not in text else text)


def run_attach(args: argparse.Namespace) -> int:
    """``pynbd attach``."""
    from ..kernel.attach import attach, attach_backend
    from ..kernel.errors import KernelError
    from ..kernel.resize import write_state
    from ..kernel.supervisor import ReconnectPolicy

    positional: list[str] = args.args
    local = args.memory is not None or args.file is not None
    if args.memory is not None and args.file is not None:
        raise CommandError("give --memory or --file, not both")
    if len(positional) > (1 if local else 2) or (not local and not positional):
        raise CommandError(
            "usage: pynbd attach URI [DEVICE], or pynbd attach --memory SIZE [DEVICE]"
        )
    uri = None if local else positional[0]
    device = positional[-1] if len(positional) == (1 if local else 2) else None
    # These need this process: the NBD_DO_IT thread, the in-process server, the
    # supervisor, the TLS relay.
    tls = uri is not None and uri.startswith("nbds")
    foreground = args.foreground or args.ioctl or local or args.persist or tls
    if args.persist and args.ioctl:
        raise CommandError("--persist needs netlink: drop --ioctl")
    options = {
        "connections": args.connections,
        "timeout": args.timeout,
        "block_size": args.block_size,
        "read_only": args.read_only,
        "use_ioctl": args.ioctl,
        "backend_id": args.backend_id,
        "dead_timeout": args.dead_timeout,
        "persist": args.persist,
        "policy": ReconnectPolicy(give_up_after=args.give_up or None),
    }
    if args.persist:
        _log_events()
    try:
        if uri is not None:
            attachment = attach(uri, device, keepalive=_tcp_options(args), **options)
        else:
            attachment = attach_backend(_backend(args), device, **options)
    except KernelError as exc:
        raise explain_kernel_error(exc, device) from exc
    if uri is not None:
        try:
            write_state(attachment.index, uri)
        except OSError as exc:  # only `pynbd resize` without --uri needs it
            reason = exc.strerror or str(exc)
            if exc.filename is not None:
                reason = f"{exc.filename}: {reason}"
            print(f"pynbd: not recording the server for `pynbd resize`: {reason}", file=sys.stderr)
    print(attachment.device, flush=True)
    if not foreground:
        return 0
    return _stay(attachment)


def _tcp_options(args: argparse.Namespace) -> Keepalive:
    from ..kernel.supervisor import Keepalive

    keepalive: Keepalive = args.keepalive or Keepalive()
    if args.user_timeout is None:
        return keepalive
    return Keepalive(
        keepalive.idle, keepalive.interval, keepalive.count, args.user_timeout,
        keepalive.enabled,
    )  # fmt: skip


def _log_events() -> None:
    """The supervisor's events, one line each, on stderr (unless --debug set up more)."""
    logger = logging.getLogger("pynbd.kernel")
    if logging.getLogger().handlers or logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("pynbd: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _backend(args: argparse.Namespace) -> object:
    from ..server import FileBackend, MemoryBackend

    if args.memory is not None:
        if args.memory <= 0:
            raise CommandError("--memory needs a size above 0")
        return MemoryBackend(args.memory)
    try:
        return FileBackend(args.file, read_only=args.read_only)
    except OSError as exc:
        raise CommandError(f"cannot open {args.file}: {exc.strerror}") from exc


def _stay(attachment: Attachment) -> int:
    """Wait for SIGINT or SIGTERM (or the device's end), then detach."""
    from ..kernel.errors import KernelError
    from ..kernel.supervisor import SupervisorState

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    supervisor = attachment.supervisor
    status = 0
    try:
        while not stop.wait(0.5):
            if not attachment.attached:
                print(f"pynbd: {attachment.device} was disconnected", file=sys.stderr)
                break
            if supervisor is not None and supervisor.done.is_set():
                # It said why (gave up, or saw the device detached). A device given up
                # on stays attached, failing I/O, for its holders to notice.
                if supervisor.state is not SupervisorState.DETACHED:
                    status = 1
                attachment._detached = True
                break
    finally:
        try:
            attachment.detach()
        except KernelError as exc:
            raise explain_kernel_error(exc, attachment.device) from exc
        finally:
            for signum, handler in old.items():
                signal.signal(signum, handler)
    return status


def run_detach(args: argparse.Namespace) -> int:
    """``pynbd detach``."""
    from ..kernel.attach import detach
    from ..kernel.device import sysfs_state
    from ..kernel.errors import KernelError

    try:
        state = sysfs_state(args.device)
    except InvalidRequest as exc:
        raise CommandError(str(exc)) from exc
    if not state.exists:
        raise CommandError(f"{args.device}: no such nbd device (is the nbd driver loaded?)")
    try:
        holders = detach(args.device, timeout=args.timeout, use_ioctl=args.ioctl, force=args.force)
    except KernelError as exc:
        raise explain_kernel_error(exc, args.device) from exc
    if holders:
        who = "; ".join(str(h) for h in holders)
        print(f"pynbd: {args.device} disconnected; its holders now get I/O errors and it "
              f"is released once they let go: {who}", file=sys.stderr)  # fmt: skip
    return 0


def run_status(args: argparse.Namespace) -> int:
    """``pynbd status``."""
    from ..kernel.attach import device_status
    from ..kernel.errors import KernelError

    try:
        devices = device_status(args.device)
    except InvalidRequest as exc:
        raise CommandError(str(exc)) from exc
    except KernelError as exc:
        raise explain_kernel_error(exc, args.device) from exc
    if args.json:
        print(json.dumps([d.as_dict() for d in devices], indent=2))
        return 0
    for d in devices:
        fields = [d.device, "attached" if d.size else ("in use" if d.connected else "free")]
        if d.size:
            fields.append(human_size(d.size))
            if d.read_only:
                fields.append("read-only")
            if d.block_size:
                fields.append(f"block {d.block_size}")
        if d.pid is not None:
            fields.append(f"pid {d.pid}")
        if d.backend:
            fields.append(f"backend {d.backend}")
        print("  ".join(fields))
    return 0
