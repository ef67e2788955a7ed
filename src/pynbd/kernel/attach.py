"""Attach an NBD export to ``/dev/nbdX``: handshake in userspace, then hand the kernel
the sockets.

The kernel driver speaks only the transmission phase, with simple replies. So pynbd
negotiates each connection itself (:class:`~pynbd.proto.handshake.ClientHandshake`
with NBD_OPT_GO, no structured replies, no extended headers, no meta contexts), then
gives the negotiated sockets to the driver: by netlink CONNECT (the default; nothing
has to stay running), or by the ioctls and NBD_DO_IT in a thread of this process (when
asked, or when the driver has no netlink family).

- :func:`attach`: a server given by URI (``nbd://``, ``nbd+unix://``; not TLS: the
  driver cannot speak it).
- :func:`attach_backend`: a backend of this process (:class:`~pynbd.server.MemoryBackend`,
  :class:`~pynbd.server.FileBackend`...), served over socketpairs by a server thread.
  The device then lives only as long as this process. Beware that a process serving
  its own device can deadlock under memory pressure (writeback waits for the server,
  which waits for memory): use it for tests and tools, not for swap or big page caches.
- :func:`detach`: disconnect any nbd device.
- :func:`device_status`: what each device is doing.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from ..client.base import ConnectOptions, Target
from ..client.sync import _Deadline, run_handshake
from ..errors import ConnectionClosed, InvalidRequest, ProtocolError
from ..proto.constants import TransmissionFlag
from ..proto.handshake import ClientHandshake, Negotiated
from ..transport.connect import open_stream
from ..transport.uri import NBDURI, parse_uri
from . import ioctl
from .device import (
    AsyncRun,
    NBDDevice,
    NetlinkControl,
    device_index,
    device_path,
    list_devices,
    netlink_available,
    sysfs_state,
    validate_block_size,
    wait_disconnected,
)
from .errors import FamilyNotFound, KernelError
from .netlink import CFlag

__all__ = [
    "Attachment",
    "DeviceInfo",
    "attach",
    "attach_backend",
    "choose_block_size",
    "connect_for_kernel",
    "detach",
    "device_status",
]

log = logging.getLogger(__name__)

#: Seconds given to connecting and negotiating each connection.
HANDSHAKE_TIMEOUT = 30.0
#: Seconds to wait for the device to become usable, or free after a detach.
SETTLE_TIMEOUT = 30.0


@dataclass
class Attachment:
    """An export attached to an nbd device.

    Attributes:
        device: the device path (``/dev/nbd0``).
        index: its number.
        size: the device size in bytes.
        block_size: its logical block size.
        flags: the transmission flags given to the kernel.
        connections: how many sockets the device uses.
        method: ``"netlink"`` or ``"ioctl"``.
        negotiated: what the first connection negotiated.
    """

    device: str
    index: int
    size: int
    block_size: int
    flags: TransmissionFlag
    connections: int
    method: str
    negotiated: Negotiated
    _nbd: NBDDevice | None = field(default=None, repr=False)
    _job: AsyncRun | None = field(default=None, repr=False)
    _server: threading.Thread | None = field(default=None, repr=False)
    _detached: bool = field(default=False, repr=False)

    @property
    def attached(self) -> bool:
        """True until :meth:`detach`, or until someone else disconnected the device."""
        if self._detached:
            return False
        if self._job is not None:
            return self._job.running()
        state = sysfs_state(self.index)
        return state.pid is not None and state.size > 0

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the device is disconnected (by :meth:`detach`, ``pynbd detach``,
        or the end of NBD_DO_IT); returns False when ``timeout`` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.attached:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            if self._job is not None:
                self._job.thread.join(0.2)
            else:
                time.sleep(0.2)
        return True

    def detach(self, timeout: float = SETTLE_TIMEOUT) -> None:
        """Disconnect the device and wait until it is free; stop the in-process server.

        Idempotent. The ioctl path sends NBD_DISCONNECT and NBD_CLEAR_SOCK and joins
        the NBD_DO_IT thread; the netlink path sends NBD_CMD_DISCONNECT.

        Raises:
            KernelError: the kernel refused, or the device was still connected after
                ``timeout`` seconds.
        """
        if self._detached:
            return
        self._detached = True
        try:
            if self._nbd is not None:
                self._nbd.kill_async(timeout)
                self._nbd.close()
            else:
                detach(self.index, timeout=timeout)
            wait_disconnected(self.index, timeout)
        finally:
            if self._server is not None:
                self._server.join(timeout)

    def __enter__(self) -> Attachment:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.detach()


# --- negotiation ----------------------------------------------------------------------


def _kernel_options(export_name: str) -> ConnectOptions:
    # The driver reads simple replies only, and never asks for block status.
    return ConnectOptions(
        export_name=export_name,
        tls=None,
        structured_replies=False,
        extended_headers=False,
        meta_contexts=(),
        request_block_size=True,
    )


def _negotiate(
    sock: socket.socket, export_name: str, timeout: float
) -> tuple[socket.socket, Negotiated]:
    """Run the handshake on ``sock`` and leave it ready for the kernel.

    The socket is closed on error.
    """
    handshake = ClientHandshake(_kernel_options(export_name).handshake_config())
    sock, result = run_handshake(sock, handshake, Target(), _Deadline(timeout))
    try:
        if not result.in_transmission:
            raise ProtocolError("the handshake ended without entering transmission")
        if handshake.trailing_data:
            raise ProtocolError("the server sent data before any request")
        if not result.size:
            raise InvalidRequest("the export's size is 0: nothing to attach")
        # The kernel owns the socket from now on: blocking, no Python timeout (which
        # would leave O_NONBLOCK on the file), no Nagle delay, keepalive to find a peer
        # that vanished while the device is idle (the request timeout cannot).
        sock.settimeout(None)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for opt, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
                if hasattr(socket, opt):
                    sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)
    except BaseException:
        sock.close()
        raise
    return sock, result


def connect_for_kernel(
    uri: str | NBDURI, *, timeout: float = HANDSHAKE_TIMEOUT
) -> tuple[socket.socket, Negotiated]:
    """Connect to a server and negotiate as the kernel needs it (GO, simple replies
    only); return the socket, ready for :meth:`NBDDevice.socket`, and the result.

    Raises:
        URIError, InvalidRequest (a TLS URI or an empty export), ConnectionClosed,
        NBDTimeout, OptionError, ProtocolError: as :func:`attach`.
    """
    parsed = parse_uri(uri) if isinstance(uri, str) else uri
    if parsed.tls:
        raise InvalidRequest("the kernel's nbd driver cannot use TLS: use an nbd:// URI")
    return _negotiate(open_stream(parsed, timeout=timeout), parsed.export_name, timeout)


def _check_same(first: Negotiated, other: Negotiated) -> None:
    if (other.size, other.flags) != (first.size, first.flags):
        raise ProtocolError(
            "the server gave another connection a different size or flags "
            f"({other.size}/{int(other.flags):#x} vs {first.size}/{int(first.flags):#x})"
        )


def choose_block_size(negotiated: Negotiated, block_size: int | None = None) -> int:
    """The logical block size for the device.

    Given: checked against the server's minimum. Else 512 (the unit partition tables
    are written in), raised to the server's minimum block size when it advertised a
    larger one.

    Raises:
        InvalidRequest: the size is not a power of two in 512..PAGE_SIZE, or below the
            server's minimum block size.
    """
    minimum = negotiated.minimum_block if negotiated.block_size_advertised else 1
    if block_size is None:
        block_size = max(512, minimum)
    validate_block_size(block_size)
    if block_size < minimum:
        raise InvalidRequest(
            f"block size {block_size} is below the server's minimum block size {minimum}"
        )
    return block_size


# --- attaching ------------------------------------------------------------------------


def attach(
    uri: str | NBDURI,
    device: str | int | None = None,
    *,
    connections: int = 1,
    timeout: int = 30,
    dead_timeout: int | None = None,
    block_size: int | None = None,
    read_only: bool = False,
    use_ioctl: bool = False,
    backend_id: str | None = None,
    client_flags: int = 0,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
) -> Attachment:
    """Connect to an NBD server and attach its export to an nbd device.

    Args:
        uri: ``nbd://HOST[:PORT]/EXPORT`` or ``nbd+unix:///EXPORT?socket=PATH``.
        device: ``/dev/nbdX``, ``nbdX`` or X; None: a free device (netlink lets the
            kernel pick, or create, one).
        connections: sockets to open; more than one only when the server advertises
            CAN_MULTI_CONN (else one is used, and a warning logged).
        timeout: the kernel's request timeout in seconds (0: never time out).
        dead_timeout: netlink only: seconds to hold I/O while every connection is dead.
        block_size: the logical block size (default: see :func:`choose_block_size`).
        read_only: make the device read-only even if the export is writable.
        use_ioctl: use the ioctls and NBD_DO_IT in a thread of this process instead of
            netlink; the device then lives as long as this process.
        backend_id: netlink only: shown in /sys/block/nbdX/backend.
        client_flags: netlink only: :class:`~pynbd.kernel.netlink.CFlag` bits.
        handshake_timeout: seconds for connecting and negotiating each connection.

    Raises:
        URIError: a bad URI. InvalidRequest: a TLS URI, bad settings, an empty export.
        ConnectionClosed, NBDTimeout, OptionError, ExportNotFound, ProtocolError: the
            server could not be reached or refused.
        KernelError: the driver refused (EBUSY: the device is in use; EPERM: run as
            root), or is not loaded (modprobe nbd).
    """
    parsed = parse_uri(uri) if isinstance(uri, str) else uri
    if parsed.tls:
        raise InvalidRequest("the kernel's nbd driver cannot use TLS: use an nbd:// URI")

    def opener() -> socket.socket:
        return open_stream(parsed, timeout=handshake_timeout)

    return _attach(
        opener,
        parsed.export_name,
        device,
        connections=connections,
        timeout=timeout,
        dead_timeout=dead_timeout,
        block_size=block_size,
        read_only=read_only,
        use_ioctl=use_ioctl,
        backend_id=backend_id,
        client_flags=client_flags,
        handshake_timeout=handshake_timeout,
        server=None,
    )


def attach_backend(
    backend: Any,
    device: str | int | None = None,
    *,
    connections: int = 1,
    timeout: int = 30,
    block_size: int | None = None,
    read_only: bool = False,
    use_ioctl: bool = False,
    backend_id: str | None = None,
    client_flags: int = 0,
    **server_options: Any,
) -> Attachment:
    """Serve ``backend`` in this process and attach it to an nbd device.

    A thread runs a :class:`~pynbd.server.aio.Server` over one end of a socketpair per
    connection; the other ends are negotiated and handed to the kernel. The server
    thread ends when the device is detached.

    Args:
        backend: a :class:`~pynbd.server.Backend`, an :class:`~pynbd.server.Export`, or
            anything :class:`~pynbd.server.aio.Server` takes as its exports.
        device, connections, timeout, block_size, read_only, use_ioctl, backend_id,
            client_flags: as for :func:`attach`.
        server_options: more :class:`~pynbd.server.aio.Server` keyword arguments.

    Raises:
        As :func:`attach`.
    """
    from ..server import Export, Server

    exports = (
        Export(backend, read_only=True)
        if read_only and not isinstance(backend, Export)
        else backend
    )
    server = Server(exports, **server_options)
    loop_ready = threading.Event()
    state: dict[str, Any] = {}

    async def main() -> None:
        state["loop"] = asyncio.get_running_loop()
        state["done"] = asyncio.Event()
        loop_ready.set()
        await state["done"].wait()
        await server.close()

    sessions: list[Any] = []

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # reported by the handshake that then fails
            log.error("in-process server: %s", exc)
        finally:
            loop_ready.set()

    thread = threading.Thread(target=run, name="pynbd in-process server", daemon=True)
    thread.start()
    loop_ready.wait(10)
    if "loop" not in state:
        raise ConnectionClosed("the in-process server did not start")
    loop: asyncio.AbstractEventLoop = state["loop"]

    def stop_server() -> None:
        # The loop may be gone already (the server thread failed): nothing to stop.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(state["done"].set)

    def opener() -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        sessions.append(asyncio.run_coroutine_threadsafe(server.serve_socket(theirs), loop))
        return ours

    try:
        attachment = _attach(
            opener,
            "",
            device,
            connections=connections,
            timeout=timeout,
            dead_timeout=None,
            block_size=block_size,
            read_only=read_only,
            use_ioctl=use_ioctl,
            backend_id=backend_id,
            client_flags=client_flags,
            handshake_timeout=HANDSHAKE_TIMEOUT,
            server=thread,
        )
    except BaseException:
        stop_server()
        thread.join(SETTLE_TIMEOUT)
        raise
    # Once every session ended (the kernel sent NBD_CMD_DISC and closed the socket),
    # stop the server's loop; that ends the server thread, which detach() joins.
    watcher = threading.Thread(
        target=_wait_all, args=(sessions, stop_server), name="pynbd in-process stop", daemon=True
    )
    watcher.start()
    return attachment


def _wait_all(sessions: Sequence[Any], then: Any) -> None:
    for fut in sessions:
        with contextlib.suppress(Exception):
            fut.result()
    then()


def _attach(
    opener: Callable[[], socket.socket],
    export_name: str,
    device: str | int | None,
    *,
    connections: int,
    timeout: int,
    dead_timeout: int | None,
    block_size: int | None,
    read_only: bool,
    use_ioctl: bool,
    backend_id: str | None,
    client_flags: int,
    handshake_timeout: float,
    server: threading.Thread | None,
) -> Attachment:
    if connections < 1:
        raise InvalidRequest(f"connections must be at least 1, not {connections}")
    if timeout < 0:
        raise InvalidRequest(f"timeout must not be negative, not {timeout}")
    index = device_index(device) if device is not None else None
    if not use_ioctl and not netlink_available():
        if not list_devices():
            raise FamilyNotFound("nbd")
        use_ioctl = True  # a driver without netlink (or netlink refused): ioctls
    socks: list[socket.socket] = []
    try:
        sock, first = _negotiate(opener(), export_name, handshake_timeout)
        socks.append(sock)
        if connections > 1 and not first.flags & TransmissionFlag.CAN_MULTI_CONN:
            log.warning("the server does not advertise multi-conn: using one connection")
            connections = 1
        while len(socks) < connections:
            sock, other = _negotiate(opener(), export_name, handshake_timeout)
            socks.append(sock)
            _check_same(first, other)
        bs = choose_block_size(first, block_size)
        size = (first.size or 0) // bs * bs  # a partial last block cannot be addressed
        if size == 0:
            raise InvalidRequest(f"the export ({first.size} bytes) is smaller than a block")
        flags = first.flags | (TransmissionFlag.READ_ONLY if read_only else 0)
        if use_ioctl:
            return _attach_ioctl(socks, first, index, size, bs, flags, timeout, server)
        return _attach_netlink(
            socks, first, index, size, bs, flags, timeout, dead_timeout, backend_id,
            client_flags, server,
        )  # fmt: skip
    finally:
        # The kernel holds its own reference to every socket it took.
        for sock in socks:
            sock.close()


def _attach_netlink(
    socks: list[socket.socket],
    negotiated: Negotiated,
    index: int | None,
    size: int,
    block_size: int,
    flags: TransmissionFlag,
    timeout: int,
    dead_timeout: int | None,
    backend_id: str | None,
    client_flags: int,
    server: threading.Thread | None,
) -> Attachment:
    with NetlinkControl() as nl:
        index = nl.connect(
            [s.fileno() for s in socks],
            size,
            index=index,
            block_size=block_size,
            timeout=timeout,
            dead_conn_timeout=dead_timeout,
            server_flags=int(flags),
            client_flags=client_flags,
            backend_id=backend_id,
        )
    attachment = Attachment(
        device=device_path(index),
        index=index,
        size=size,
        block_size=block_size,
        flags=flags,
        connections=len(socks),
        method="netlink",
        negotiated=negotiated,
        _server=server,
    )
    try:
        # With DISCONNECT_ON_CLOSE the settling open's close would disconnect at once.
        _settle(attachment, scan=not client_flags & CFlag.DISCONNECT_ON_CLOSE)
    except BaseException:
        with contextlib.suppress(Exception):
            attachment.detach()
        raise
    return attachment


def _attach_ioctl(
    socks: list[socket.socket],
    negotiated: Negotiated,
    index: int | None,
    size: int,
    block_size: int,
    flags: TransmissionFlag,
    timeout: int,
    server: threading.Thread | None,
) -> Attachment:
    nbd = NBDDevice(None, device_path(index) if index is not None else None)
    # The ioctls would reconfigure a device another process runs (a new size or block
    # size on a live device): refuse one that is in use, as netlink CONNECT does.
    if sysfs_state(nbd.index).busy:
        nbd.close()
        raise KernelError(errno.EBUSY, "already attached", call="attach", device=nbd.path)
    try:
        nbd.set_blocksize(block_size)
        nbd.set_size(size)
        nbd.set_timeout(timeout)
        nbd.set_flags(int(flags))
        for sock in socks:
            nbd.socket(sock)
        job = nbd.run_async()
    except BaseException:
        with contextlib.suppress(KernelError):
            nbd.socket(None)
        nbd.close()
        raise
    attachment = Attachment(
        device=nbd.path,
        index=nbd.index,
        size=size,
        block_size=block_size,
        flags=flags,
        connections=len(socks),
        method="ioctl",
        negotiated=negotiated,
        _nbd=nbd,
        _job=job,
        _server=server,
    )
    try:
        _settle(attachment)
    except BaseException:
        with contextlib.suppress(Exception):
            attachment.detach()
        raise
    return attachment


def _settle(attachment: Attachment, *, scan: bool = True) -> None:
    """Wait until the device has its size, then open it once: that open makes the
    kernel scan the partition table (no partprobe needed)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while sysfs_state(attachment.index).size == 0:
        job = attachment._job
        if job is not None and not job.running():
            job.wait(0)  # raises NBD_DO_IT's error
            raise KernelError(errno.EIO, "NBD_DO_IT returned at once", device=attachment.device)
        if time.monotonic() >= deadline:
            raise KernelError(errno.ETIMEDOUT, "the device never got its size",
                              device=attachment.device)  # fmt: skip
        time.sleep(0.01)
    if not scan:
        return
    try:
        fd = os.open(attachment.device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise KernelError(exc.errno or errno.EIO, call="open", device=attachment.device) from exc
    os.close(fd)


# --- detaching and status -------------------------------------------------------------


def detach(device: str | int, *, timeout: float = SETTLE_TIMEOUT, use_ioctl: bool = False) -> None:
    """Disconnect an nbd device, whoever attached it, and wait until it is free.

    Netlink DISCONNECT when the driver has netlink (and ``use_ioctl`` is false), else
    NBD_DISCONNECT and NBD_CLEAR_SOCK on the opened device. A device that is not
    connected is left alone.

    Raises:
        InvalidRequest: not an nbd device name.
        KernelError: the kernel refused (EPERM: run as root), or the device was still
            connected after ``timeout`` seconds.
    """
    index = device_index(device)
    path = device_path(index)
    done = False
    if not use_ioctl:
        try:
            with NetlinkControl() as nl:
                nl.disconnect(index)
            done = True
        except FamilyNotFound:
            pass
    if not done:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise KernelError(exc.errno or errno.EIO, call="open", device=path) from exc
        try:
            ioctl.disconnect(fd, device=path)
            ioctl.clear_sock(fd, device=path)
        finally:
            os.close(fd)
    wait_disconnected(index, timeout)


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
