"""TLS for the kernel's nbd driver: a userspace relay between a socketpair and TLS.

The driver speaks plain NBD on a socket it is given and cannot do TLS. For an
``nbds://`` (or ``nbds+unix://``) server, :class:`TLSRelay` connects, runs the whole
handshake in userspace (NBD_OPT_STARTTLS, the TLS handshake with
:mod:`pynbd.transport.tls`, then NBD_OPT_GO with simple replies, as
:func:`~pynbd.kernel.attach.connect_for_kernel` does for plain sockets), makes a unix
socketpair, and starts a pump thread that moves bytes between one end and the TLS
socket. The other end is what the kernel gets. One relay connection per kernel
connection: multi-connection devices get one pump (and one thread) each.

::

    relay = TLSRelay("nbds://server/disk?tls-certificates=/etc/pki/nbd")
    sock, negotiated = relay.dial()     # the kernel's end, ready for NBD_CMD_CONNECT
    ...
    relay.close()                       # after detach: joins every pump thread

:meth:`TLSRelay.dial` has the shape of the supervisor's ``Opener`` (``() -> (socket,
Negotiated)``, as :func:`~pynbd.kernel.attach.attach_opener` takes), so the reconnect
supervisor re-dials through the relay; :meth:`TLSRelay.opener` returns the socket only.

Stopping: a pump ends when either side closes. When the kernel closes its end (detach,
or the driver gave the link up) the pump forwards what the kernel sent (NBD_CMD_DISC),
sends TLS close_notify and closes the TCP connection. When the server closes (or the
connection breaks) the pump passes what the server sent on, then shuts the kernel's
end down, so the driver sees a dead link at once (and a supervisor can re-dial).
:meth:`TLSRelay.close` stops the pumps that are left and joins their threads.

The cost. Every byte crosses user space (kernel -> socketpair -> Python -> OpenSSL ->
TCP and back), and OpenSSL reads one TLS record (16 KiB) per call, so the relay is
much slower than plain TCP and spends CPU on every byte (docs/perf-notes.md, "The TLS
relay", has the measurements, on the host and in the test guest).

The swap caveat. The relay is a userspace process in the kernel's I/O path: every
request to the device waits for it. A device used for swap (or with a large dirty page
cache under memory pressure) can deadlock: the kernel needs to write pages out to free
memory, the write needs the relay, and the relay needs memory (a page fault, a buffer,
a TLS record) to make progress. ``mlockall(MCL_CURRENT | MCL_FUTURE)`` (see
:func:`lock_memory`) keeps the relay's pages resident, which removes page faults from
the loop, but not allocations in the kernel's network stack and in OpenSSL: it makes
the deadlock less likely, not impossible. Do not swap onto a relayed device.

kTLS: with kernel TLS the TCP socket itself encrypts, and could be handed to the
driver with no relay. Python 3.11's :mod:`ssl` has no kTLS switch (``OP_ENABLE_KTLS``
is 3.12+). In the test guest (Linux 6.1, OpenSSL 3.0, Python 3.13) a TLS 1.2 AES-GCM
socket got both directions offloaded and carried the driver's I/O intact; TLS 1.3 got
transmit offload only. Not used here yet: docs/perf-notes.md ("The TLS relay") says
why.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import replace

from ..client import Negotiated, Target
from ..errors import InvalidRequest, ProtocolError
from ..transport.connect import open_stream
from ..transport.tls import TLSConfig
from ..transport.uri import NBDURI, parse_uri
from .dial import negotiate_for_kernel

__all__ = ["TLSRelay", "lock_memory"]

log = logging.getLogger("pynbd.kernel")

#: Seconds for connecting and negotiating one connection.
HANDSHAKE_TIMEOUT = 30.0
#: Bytes buffered in each direction of one connection. Large writes of the kernel (up
#: to max_sectors_kb, often 128 KiB..1 MiB with the header) then cross in few calls.
BUFFER_SIZE = 1 << 20
#: Most bytes given to one SSL write: OpenSSL cuts them into 16 KiB records anyway, and
#: a bounded write keeps the other direction moving.
_SSL_CHUNK = 256 * 1024
#: Seconds given to the TLS close_notify exchange when the kernel closed its end.
_CLOSE_TIMEOUT = 1.0

#: A hook applied to every TCP socket before the handshake (keepalive and such).
SocketTuner = Callable[[socket.socket], None]


class _Buffer:
    """A byte buffer filled at the end and drained from the start, without copies."""

    __slots__ = ("buf", "end", "start", "view")

    def __init__(self, size: int) -> None:
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0

    def data(self) -> memoryview:
        return self.view[self.start : self.end]

    def room(self) -> memoryview:
        """The free space after the data (call :meth:`has_room` first)."""
        if self.start == self.end:
            self.start = self.end = 0
        return self.view[self.end :]

    def __len__(self) -> int:
        return self.end - self.start

    def has_room(self) -> bool:
        """True when there is space after the data, moving the data to the front
        when it fills the end and at most half of it is left (a bounded copy)."""
        size = len(self.buf)
        if self.end < size or self.start == self.end:
            return True
        if self.start >= size // 2:
            n = self.end - self.start
            self.buf[:n] = self.view[self.start : self.end]
            self.start, self.end = 0, n
            return True
        return False


class _Pump:
    """One relayed connection: a thread moving bytes between the kernel's socketpair
    end (``plain``: our end of it) and the TLS socket, both non-blocking.

    One thread owns the SSL object: OpenSSL forbids concurrent use of one connection,
    and a TLS read may need to write (and a write to read).
    """

    def __init__(
        self, plain: socket.socket, tls: ssl.SSLSocket, name: str, buffer_size: int
    ) -> None:
        self.plain = plain
        self.tls = tls
        self.name = name
        self.up = _Buffer(buffer_size)  # kernel -> server
        self.down = _Buffer(buffer_size)  # server -> kernel
        self.bytes_up = 0
        self.bytes_down = 0
        self.error: BaseException | None = None
        self.why = ""
        self._plain_eof = False
        self._tls_eof = False
        self._tls_want: int = 0  # selector events the last SSL call asked for
        self._pending = 0  # length of an SSL write to be retried as it was
        self._wake_r, self._wake_w = socket.socketpair()
        self._stop = False
        self.thread = threading.Thread(target=self._run, name=f"pynbd relay {name}", daemon=True)

    def start(self) -> None:
        self.plain.setblocking(False)
        self.tls.setblocking(False)
        self._wake_r.setblocking(False)
        self.thread.start()

    def stop(self) -> None:
        """Ask the thread to end (it closes both sides); does not wait."""
        self._stop = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    # -- the loop -------------------------------------------------------------------

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        try:
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._stop:
                self._move()
                if self._finished():
                    break
                self._wait(sel)
        except BaseException as exc:  # reported by why/error; the thread must not die loud
            self.error = exc
            self.why = f"failed: {exc}"
        finally:
            sel.close()
            self._close()
            log.debug(
                "relay %s ended (%s): %d bytes up, %d down",
                self.name, self.why or "stopped", self.bytes_up, self.bytes_down,
            )  # fmt: skip

    def _finished(self) -> bool:
        if self._plain_eof and not len(self.up):
            self.why = self.why or "the kernel closed its end"
            return True
        if self._tls_eof and not len(self.down):
            self.why = self.why or "the server closed the connection"
            return True
        return False

    def _move(self) -> None:
        """Do every transfer that can be done now, until none makes progress."""
        progress = True
        while progress:
            progress = False
            if not self._plain_eof and self.up.has_room():
                progress |= self._read_plain()
            if len(self.up):
                progress |= self._write_tls()
            if not self._tls_eof and self.down.has_room():
                progress |= self._read_tls()
            if len(self.down):
                progress |= self._write_plain()

    def _read_plain(self) -> bool:
        try:
            n = self.plain.recv_into(self.up.room())
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            n = 0
        if n == 0:
            self._plain_eof = True
            return True
        self.up.end += n
        self.bytes_up += n
        return True

    def _write_tls(self) -> bool:
        data = self.up.data()
        n = self._pending or min(len(data), _SSL_CHUNK)
        try:
            sent = self.tls.send(data[:n])
        except ssl.SSLWantWriteError:
            self._pending, self._tls_want = n, selectors.EVENT_WRITE
            return False
        except ssl.SSLWantReadError:
            self._pending, self._tls_want = n, selectors.EVENT_READ
            return False
        except (OSError, ssl.SSLError) as exc:
            # The server is gone: what the kernel still sends has nowhere to go.
            self._tls_broken(exc)
            return True
        self._pending = self._tls_want = 0
        self.up.start += sent
        return True

    def _read_tls(self) -> bool:
        moved = False
        # One SSL read returns at most one record: read on while records are there.
        while self.down.has_room():
            try:
                n = self.tls.recv_into(self.down.room())
            except ssl.SSLWantReadError:
                return moved
            except ssl.SSLWantWriteError:
                self._tls_want = selectors.EVENT_WRITE
                return moved
            except (OSError, ssl.SSLError) as exc:
                self._tls_broken(exc)
                return True
            if n == 0:
                self._tls_eof = True
                return True
            self.down.end += n
            self.bytes_down += n
            moved = True
        return moved

    def _write_plain(self) -> bool:
        try:
            sent = self.plain.send(self.down.data())
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            # The kernel's end is gone: nothing more to deliver.
            self._plain_eof = True
            self.down.start = self.down.end
            return True
        self.down.start += sent
        return sent > 0

    def _tls_broken(self, exc: BaseException) -> None:
        self._tls_eof = True
        self.up.start = self.up.end
        self._pending = 0
        if not isinstance(exc, ssl.SSLZeroReturnError | ConnectionResetError | BrokenPipeError):
            self.error = exc
        self.why = f"the server connection broke: {exc}"

    def _wait(self, sel: selectors.BaseSelector) -> None:
        plain = 0
        if not self._plain_eof and self.up.has_room():
            plain |= selectors.EVENT_READ
        if len(self.down):
            plain |= selectors.EVENT_WRITE
        tls = self._tls_want
        if not self._tls_eof:
            if self.down.has_room():
                tls |= selectors.EVENT_READ
            if len(self.up) and not self._pending:
                tls |= selectors.EVENT_WRITE
        for sock, events in ((self.plain, plain), (self.tls, tls)):
            _set_events(sel, sock, events)
        for key, _ in sel.select():
            if key.fileobj is self._wake_r:
                with contextlib.suppress(OSError):
                    self._wake_r.recv(64)

    def _close(self) -> None:
        if self._plain_eof and not self._tls_eof and not self._stop:
            # The kernel is done (NBD_CMD_DISC went up): end TLS politely.
            with contextlib.suppress(OSError, ValueError, ssl.SSLError):
                self.tls.settimeout(_CLOSE_TIMEOUT)
                self.tls.unwrap().close()
        with contextlib.suppress(OSError):
            # The driver then sees the link dead at once, whoever still holds the file.
            self.plain.shutdown(socket.SHUT_RDWR)
        for sock in (self.tls, self.plain, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                sock.close()


def _set_events(sel: selectors.BaseSelector, sock: socket.socket, events: int) -> None:
    try:
        key = sel.get_key(sock)
    except KeyError:
        if events:
            sel.register(sock, events)
        return
    if not events:
        sel.unregister(sock)
    elif key.events != events:
        sel.modify(sock, events)


def _default_tune(sock: socket.socket) -> None:
    # Keepalive finds a peer that vanished while the device is idle; the pump then
    # sees the error and closes the kernel's end.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


class TLSRelay:
    """Connections to a TLS NBD server, relayed to sockets the kernel can use.

    Args:
        uri: an ``nbds://`` or ``nbds+unix://`` URI (``tls-certificates``,
            ``tls-psk-file``, ``tls-hostname``, ``tls-verify-peer`` honoured).
        tls: TLS settings that replace the URI's.
        handshake_timeout: seconds for connecting and negotiating each connection.
        buffer_size: bytes buffered per direction and connection.
        tune: called with each TCP socket before the handshake (keepalive,
            TCP_USER_TIMEOUT: e.g. ``Keepalive(...).apply``); the default sets
            SO_KEEPALIVE. TCP_NODELAY is always set (requests are latency-bound).

    Raises:
        URIError: a bad URI. InvalidRequest: a URI without TLS (use the plain path).
    """

    def __init__(
        self,
        uri: str | NBDURI,
        *,
        tls: TLSConfig | None = None,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        buffer_size: int = BUFFER_SIZE,
        tune: SocketTuner | None = None,
    ) -> None:
        self.uri = parse_uri(uri) if isinstance(uri, str) else uri
        cfg = tls or TLSConfig.from_uri(self.uri)
        if cfg is None:
            raise InvalidRequest("the relay is for TLS servers: give an nbds:// URI")
        self.tls = cfg
        self.handshake_timeout = handshake_timeout
        self.buffer_size = buffer_size
        self.tune = tune or _default_tune
        self.negotiated: Negotiated | None = None
        self._pumps: list[_Pump] = []
        self._lock = threading.Lock()
        self._count = 0
        self._closed = False

    @property
    def target(self) -> Target:
        """Where the relay connects."""
        u = self.uri
        return Target(u.host, u.port, u.socket_path, self.tls)

    def dial(self) -> tuple[socket.socket, Negotiated]:
        """Connect, negotiate over TLS, and start a pump; return the kernel's end of
        the socketpair (blocking, ready for NBD_CMD_CONNECT or NBD_SET_SOCK) and what
        was negotiated. Close your copy of the socket once the kernel has it.

        Raises:
            ConnectionClosed, NBDTimeout, TLSError, OptionError, ExportNotFound,
            ProtocolError: the server could not be reached, or refused.
            InvalidRequest: the export is empty. ValueError: the relay is closed.
        """
        if self._closed:
            raise ValueError("the relay is closed")
        ssock, result = self._negotiate()
        try:
            kernel, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except BaseException:
            ssock.close()
            raise
        with self._lock:
            self._count += 1
            pump = _Pump(
                ours, ssock, f"{self._count} to {self.target.describe()}", self.buffer_size
            )
            self._pumps = [p for p in self._pumps if p.thread.is_alive()]
            self._pumps.append(pump)
        pump.start()
        self.negotiated = result
        return kernel, result

    def opener(self) -> socket.socket:
        """:meth:`dial`, without the negotiation result (an attach.py opener)."""
        return self.dial()[0]

    def _negotiate(self) -> tuple[ssl.SSLSocket, Negotiated]:
        sock = open_stream(self.uri, timeout=self.handshake_timeout)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.tune(sock)
            except BaseException:
                sock.close()
                raise
        u = self.uri
        target = Target(u.host, u.port, u.socket_path, replace(self.tls, required=True))
        out, result = negotiate_for_kernel(sock, target, u.export_name, self.handshake_timeout)
        if not isinstance(out, ssl.SSLSocket):
            out.close()
            raise ProtocolError("the server did not start TLS")
        return out, result

    @property
    def active(self) -> int:
        """How many relayed connections are running."""
        with self._lock:
            return sum(1 for p in self._pumps if p.thread.is_alive())

    def threads(self) -> list[threading.Thread]:
        """The pump threads still running."""
        with self._lock:
            return [p.thread for p in self._pumps if p.thread.is_alive()]

    def close(self, timeout: float = 10.0) -> None:
        """Stop every pump (the kernel then sees its links dead) and join the threads.

        Call it after detaching the device: detach closes the kernel's ends, which
        ends the pumps by themselves; this only waits for them.
        """
        self._closed = True
        with self._lock:
            pumps = list(self._pumps)
        # Pumps whose kernel end is closing (a detach just now) finish on their own:
        # give them a moment to pass NBD_CMD_DISC on before stopping the rest.
        grace = time.monotonic() + min(timeout, 1.0)
        for pump in pumps:
            pump.thread.join(max(0.0, grace - time.monotonic()))
        for pump in pumps:
            pump.stop()
        for pump in pumps:
            pump.thread.join(timeout)
        with self._lock:
            self._pumps = [p for p in self._pumps if p.thread.is_alive()]

    def __enter__(self) -> TLSRelay:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def lock_memory() -> None:
    """``mlockall(MCL_CURRENT | MCL_FUTURE)``: keep this process's pages resident, so
    that the relay does not page-fault while the device it serves is writing pages out.
    This narrows the swap deadlock but cannot close it (see the module docstring).

    Raises:
        OSError: the call failed (ENOMEM under RLIMIT_MEMLOCK, EPERM without
            CAP_IPC_LOCK).
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    mcl_current, mcl_future = 1, 2  # <sys/mman.h> on Linux
    if libc.mlockall(mcl_current | mcl_future) != 0:
        err = ctypes.get_errno() or errno.EPERM
        raise OSError(err, os.strerror(err))
