"""Attach an NBD export to ``/dev/nbdX``: handshake in userspace, then hand the kernel
the sockets.

The kernel driver speaks only the transmission phase, with simple replies. So pynbd
negotiates each connection itself (:class:`~pynbd.proto.handshake.ClientHandshake`
with NBD_OPT_GO, no structured replies, no extended headers, no meta contexts), then
gives the negotiated sockets to the driver: by netlink CONNECT (the default; nothing
has to stay running), or by the ioctls and NBD_DO_IT in a thread of this process (when
asked, or when the driver has no netlink family).

- :func:`attach`: a server given by URI (``nbd://``, ``nbd+unix://``; ``nbds://``
  through a TLS relay in this process, :class:`~pynbd.kernel.relay.TLSRelay`, since the
  driver cannot speak TLS).
- :func:`attach_backend`: a backend of this process (:class:`~pynbd.server.MemoryBackend`,
  :class:`~pynbd.server.FileBackend`...), served over socketpairs by a server thread.
  The device then lives only as long as this process. Beware that a process serving
  its own device can deadlock under memory pressure (writeback waits for the server,
  which waits for memory): use it for tests and tools, not for swap or big page caches.
- :func:`~pynbd.kernel.control.detach` and :func:`~pynbd.kernel.control.device_status`
  (in :mod:`pynbd.kernel.control`, re-exported here): disconnect any nbd device, and
  what each device is doing.
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

from ..client import Negotiated, Target
from ..errors import ConnectionClosed, InvalidRequest, ProtocolError
from ..proto.constants import TransmissionFlag
from ..transport.connect import open_stream
from ..transport.uri import NBDURI, parse_uri
from .control import SETTLE_TIMEOUT, DeviceInfo, detach, device_status, refuse_if_held
from .device import (
    AsyncRun,
    NBDDevice,
    NetlinkControl,
    device_index,
    device_path,
    list_devices,
    netlink_available,
    open_device,
    sysfs_state,
    validate_block_size,
    wait_disconnected,
)
from .dial import negotiate_for_kernel
from .errors import DeviceBusy, FamilyNotFound, KernelError
from .netlink import CFlag
from .relay import TLSRelay
from .resize import remove_state, resize_backend
from .supervisor import ExportIdentity, Keepalive, Opener, ReconnectPolicy, Supervisor

__all__ = [
    "Attachment",
    "DeviceInfo",
    "attach",
    "attach_backend",
    "attach_opener",
    "choose_block_size",
    "connect_for_kernel",
    "detach",
    "device_status",
    "kernel_opener",
]

log = logging.getLogger(__name__)

#: Seconds given to connecting and negotiating each connection.
HANDSHAKE_TIMEOUT = 30.0
#: The dead-connection timeout of a supervised (``persist``) device, when not given.
PERSIST_DEAD_TIMEOUT = 60


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
        supervisor: the reconnect supervisor of a ``persist`` attachment, else None.
    """

    device: str
    index: int
    size: int
    block_size: int
    flags: TransmissionFlag
    connections: int
    method: str
    negotiated: Negotiated
    supervisor: Supervisor | None = None
    _nbd: NBDDevice | None = field(default=None, repr=False)
    _job: AsyncRun | None = field(default=None, repr=False)
    _server: threading.Thread | None = field(default=None, repr=False)
    _cleanup: Callable[[], None] | None = field(default=None, repr=False)
    _detached: bool = field(default=False, repr=False)
    # attach_backend: the in-process server and its loop, for resize().
    _serve: tuple[Any, asyncio.AbstractEventLoop] | None = field(default=None, repr=False)

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

    def detach(self, timeout: float = SETTLE_TIMEOUT, *, force: bool = True) -> None:
        """Stop the supervisor, disconnect the device and wait until it is free; stop
        the in-process server.

        Idempotent. The ioctl path sends NBD_DISCONNECT and NBD_CLEAR_SOCK and joins
        the NBD_DO_IT thread; the netlink path is :func:`detach`.

        Args:
            timeout: seconds to wait for the device to be free.
            force: False refuses, as :func:`detach` does, when the device is mounted
                or held open; True (the owner's call) disconnects anyway.

        Raises:
            DeviceBusy: the device is held: not disconnected when ``force`` is False;
                disconnected (its holders get EIO) but not free when it is True.
            KernelError: the kernel refused, or the device was still connected after
                ``timeout`` seconds.
        """
        if self._detached:
            return
        if not force:
            refuse_if_held(self.index)
        self._detached = True
        try:
            if self.supervisor is not None:
                self.supervisor.stop(timeout)
            if self._nbd is not None:
                self._nbd.kill_async(timeout)
                self._nbd.close()
            else:
                holders = detach(self.index, timeout=timeout, force=True)
                if holders and sysfs_state(self.index).busy:
                    # Disconnected, but the holders keep the device: waiting is vain.
                    raise DeviceBusy(self.device, holders)
            wait_disconnected(self.index, timeout)
        finally:
            remove_state(self.index)
            if self._cleanup is not None:
                self._cleanup()
            if self._server is not None:
                self._server.join(timeout)

    def resize(self, new_size: int) -> int:
        """Resize the in-process backend of an :func:`attach_backend` attachment and
        the device with it (grow: backend first; shrink: device first); later
        handshakes see the new size. Returns the device's new size (``new_size``
        rounded down to the block size).

        Raises:
            InvalidRequest: not served by this process, a backend that cannot resize,
                a size below one block.
            OSError: the backend refused. KernelError: the kernel refused the size.
        """
        return resize_backend(self, new_size)

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


def _negotiate(
    sock: socket.socket, export_name: str, timeout: float, keepalive: Keepalive | None = None
) -> tuple[socket.socket, Negotiated]:
    """Run the handshake on ``sock`` and leave it ready for the kernel.

    The socket is closed on error.
    """
    sock, result = negotiate_for_kernel(sock, Target(), export_name, timeout)
    try:
        # No Nagle delay; keepalive and a user timeout find a peer that vanished
        # while the device is idle (the request timeout cannot).
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            (keepalive or Keepalive()).apply(sock)
    except BaseException:
        sock.close()
        raise
    return sock, result


def connect_for_kernel(
    uri: str | NBDURI, *, timeout: float = HANDSHAKE_TIMEOUT, keepalive: Keepalive | None = None
) -> tuple[socket.socket, Negotiated]:
    """Connect to a server and negotiate as the kernel needs it (GO, simple replies
    only); return the socket, ready for :meth:`NBDDevice.socket`, and the result.

    A TCP socket gets TCP_NODELAY and ``keepalive`` (default :class:`Keepalive`()).

    Raises:
        URIError, InvalidRequest (a TLS URI or an empty export), ConnectionClosed,
        NBDTimeout, OptionError, ProtocolError: as :func:`attach`.
    """
    parsed = parse_uri(uri) if isinstance(uri, str) else uri
    if parsed.tls:
        raise InvalidRequest(
            "the kernel's nbd driver cannot use TLS: attach() relays nbds:// URIs "
            "(pynbd.kernel.relay.TLSRelay)"
        )
    return _negotiate(open_stream(parsed, timeout=timeout), parsed.export_name, timeout, keepalive)


def kernel_opener(
    stream: Callable[[], socket.socket],
    export_name: str = "",
    *,
    timeout: float = HANDSHAKE_TIMEOUT,
    keepalive: Keepalive | None = None,
) -> Opener:
    """Make an :data:`~pynbd.kernel.supervisor.Opener` from a callable that opens a
    raw byte stream to a server: each call opens one, negotiates as the kernel needs
    it, and returns ``(socket, negotiated)``.

    Args:
        stream: returns a connected stream socket before the NBD handshake.
        export_name: the export to ask for.
        timeout: seconds for the handshake.
        keepalive: TCP settings for TCP sockets (default :class:`Keepalive`()).
    """

    def opener() -> tuple[socket.socket, Negotiated]:
        return _negotiate(stream(), export_name, timeout, keepalive)

    return opener


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
    persist: bool = False,
    policy: ReconnectPolicy | None = None,
    keepalive: Keepalive | None = None,
) -> Attachment:
    """Connect to an NBD server and attach its export to an nbd device.

    Args:
        uri: ``nbd://HOST[:PORT]/EXPORT`` or ``nbd+unix:///EXPORT?socket=PATH``;
            ``nbds://`` and ``nbds+unix://`` go through a TLS relay in this process
            (:class:`~pynbd.kernel.relay.TLSRelay`), which must then stay running.
        device: ``/dev/nbdX``, ``nbdX`` or X; None: a free device (netlink lets the
            kernel pick, or create, one).
        connections: sockets to open; more than one only when the server advertises
            CAN_MULTI_CONN (else one is used, and a warning logged).
        timeout: the kernel's request timeout in seconds (0: never time out).
        dead_timeout: netlink only: seconds to hold I/O while every connection is dead
            (default with ``persist``: 60).
        block_size: the logical block size (default: see :func:`choose_block_size`).
        read_only: make the device read-only even if the export is writable.
        use_ioctl: use the ioctls and NBD_DO_IT in a thread of this process instead of
            netlink; the device then lives as long as this process.
        backend_id: netlink only: shown in /sys/block/nbdX/backend (default with
            ``persist``: the URI, so that the kernel checks each reconnection).
        client_flags: netlink only: :class:`~pynbd.kernel.netlink.CFlag` bits.
        handshake_timeout: seconds for connecting and negotiating each connection
            (each reconnection attempt too).
        persist: run a :class:`~pynbd.kernel.supervisor.Supervisor` in a thread of this
            process (``Attachment.supervisor``) that reconnects dead connections;
            needs netlink and a request timeout. The supervision lasts as long as
            this process; :meth:`Attachment.detach` stops it.
        policy: how the supervisor retries (backoff, give-up time).
        keepalive: TCP keepalive and user timeout of TCP connections (default
            :class:`~pynbd.kernel.supervisor.Keepalive`()).

    Raises:
        URIError: a bad URI. InvalidRequest: bad settings, an empty export.
        TLSError: the TLS handshake with an ``nbds://`` server failed.
        ConnectionClosed, NBDTimeout, OptionError, ExportNotFound, ProtocolError: the
            server could not be reached or refused.
        KernelError: the driver refused (EBUSY: the device is in use; EPERM: run as
            root), or is not loaded (modprobe nbd).
    """
    parsed = parse_uri(uri) if isinstance(uri, str) else uri
    if persist and backend_id is None:
        backend_id = uri if isinstance(uri, str) else parsed.export_name
    relay: TLSRelay | None = None
    opener: Opener
    if parsed.tls:
        # The driver cannot speak TLS: a relay in this process carries it.
        tune = (keepalive or Keepalive()).apply
        relay = TLSRelay(parsed, handshake_timeout=handshake_timeout, tune=tune)
        opener = relay.dial
    else:

        def stream() -> socket.socket:
            return open_stream(parsed, timeout=handshake_timeout)

        opener = kernel_opener(
            stream, parsed.export_name, timeout=handshake_timeout, keepalive=keepalive
        )
    try:
        attachment = _attach(
            opener,
            device,
            connections=connections,
            timeout=timeout,
            dead_timeout=dead_timeout,
            block_size=block_size,
            read_only=read_only,
            use_ioctl=use_ioctl,
            backend_id=backend_id,
            client_flags=client_flags,
            server=None,
            persist=policy or ReconnectPolicy() if persist else None,
        )
    except BaseException:
        if relay is not None:
            relay.close()
        raise
    if relay is not None:
        attachment._cleanup = relay.close  # after detach: joins the pump threads
    return attachment


def attach_opener(
    opener: Opener,
    device: str | int | None = None,
    *,
    connections: int = 1,
    timeout: int = 30,
    dead_timeout: int | None = None,
    block_size: int | None = None,
    read_only: bool = False,
    backend_id: str | None = None,
    client_flags: int = 0,
    persist: bool = False,
    policy: ReconnectPolicy | None = None,
) -> Attachment:
    """Attach through netlink whatever ``opener`` connects to (a TLS relay, a test
    proxy...): each call returns one socket ready for the kernel and its
    negotiation; with ``persist`` the supervisor calls it again to reconnect.

    Args:
        opener: see :data:`~pynbd.kernel.supervisor.Opener` and :func:`kernel_opener`.
        others: as for :func:`attach`.

    Raises:
        As :func:`attach`, and whatever ``opener`` raises.
    """
    return _attach(
        opener,
        device,
        connections=connections,
        timeout=timeout,
        dead_timeout=dead_timeout,
        block_size=block_size,
        read_only=read_only,
        use_ioctl=False,
        backend_id=backend_id,
        client_flags=client_flags,
        server=None,
        persist=policy or ReconnectPolicy() if persist else None,
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
    dead_timeout: int | None = None,
    persist: bool = False,
    policy: ReconnectPolicy | None = None,
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
            client_flags, dead_timeout, policy: as for :func:`attach`.
        persist: as for :func:`attach`: a dead connection is replaced by a new
            socketpair served by the same in-process server.
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

    def stream() -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        sessions.append(asyncio.run_coroutine_threadsafe(server.serve_socket(theirs), loop))
        return ours

    try:
        attachment = _attach(
            kernel_opener(stream, ""),
            device,
            connections=connections,
            timeout=timeout,
            dead_timeout=dead_timeout,
            block_size=block_size,
            read_only=read_only,
            use_ioctl=use_ioctl,
            backend_id=backend_id,
            client_flags=client_flags,
            server=thread,
            persist=policy or ReconnectPolicy() if persist else None,
        )
    except BaseException:
        stop_server()
        thread.join(SETTLE_TIMEOUT)
        raise
    attachment._serve = (server, loop)
    if persist:
        # Sessions end and are replaced while supervised: the server stops on detach.
        attachment._cleanup = stop_server
        return attachment
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
    opener: Opener,
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
    server: threading.Thread | None,
    persist: ReconnectPolicy | None,
) -> Attachment:
    if connections < 1:
        raise InvalidRequest(f"connections must be at least 1, not {connections}")
    if timeout < 0:
        raise InvalidRequest(f"timeout must not be negative, not {timeout}")
    if persist is not None:
        if use_ioctl:
            raise InvalidRequest("persist needs netlink (RECONFIGURE), not the ioctls")
        if timeout == 0:
            # The kernel requeues a dead connection's requests on their timeout, and
            # marks the sockets it adopts with it (how the supervisor checks a handover).
            raise InvalidRequest("persist needs a request timeout above 0")
        if dead_timeout is None:
            dead_timeout = PERSIST_DEAD_TIMEOUT
    index = device_index(device) if device is not None else None
    if not use_ioctl and not netlink_available():
        if persist is not None:
            raise FamilyNotFound("nbd")
        if not list_devices():
            raise FamilyNotFound("nbd")
        use_ioctl = True  # a driver without netlink (or netlink refused): ioctls
    socks: list[socket.socket] = []
    try:
        sock, first = opener()
        socks.append(sock)
        if connections > 1 and not first.flags & TransmissionFlag.CAN_MULTI_CONN:
            log.warning("the server does not advertise multi-conn: using one connection")
            connections = 1
        while len(socks) < connections:
            sock, other = opener()
            socks.append(sock)
            _check_same(first, other)
        bs = choose_block_size(first, block_size)
        size = (first.size or 0) // bs * bs  # a partial last block cannot be addressed
        if size == 0:
            raise InvalidRequest(f"the export ({first.size} bytes) is smaller than a block")
        flags = first.flags | (TransmissionFlag.READ_ONLY if read_only else 0)
        if use_ioctl:
            return _attach_ioctl(socks, first, index, size, bs, flags, timeout, server)
        attachment = _attach_netlink(
            socks, first, index, size, bs, flags, timeout, dead_timeout, backend_id,
            client_flags, server,
        )  # fmt: skip
        if persist is not None:
            _supervise(attachment, opener, socks, first, backend_id, dead_timeout, persist)
        return attachment
    finally:
        # The kernel holds its own reference to every socket it took (and the
        # supervisor its duplicates).
        for sock in socks:
            sock.close()


def _supervise(
    attachment: Attachment,
    opener: Opener,
    socks: Sequence[socket.socket],
    negotiated: Negotiated,
    backend_id: str | None,
    dead_timeout: int | None,
    policy: ReconnectPolicy,
) -> None:
    try:
        attachment.supervisor = Supervisor(
            attachment.index,
            opener,
            ExportIdentity.of(negotiated, backend_id),
            socks,
            dead_timeout=dead_timeout,
            backoff=policy.backoff,
            give_up_after=policy.give_up_after,
            poll_interval=policy.poll_interval,
            hand_over_timeout=policy.hand_over_timeout,
        ).start()
    except BaseException:
        with contextlib.suppress(Exception):
            attachment.detach()
        raise


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
        fd, _ = open_device(attachment.device, os.O_RDONLY)
    except OSError as exc:
        raise KernelError(exc.errno or errno.EIO, call="open", device=attachment.device) from exc
    os.close(fd)
