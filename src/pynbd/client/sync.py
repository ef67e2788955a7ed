"""The blocking NBD client: a thin driver over the sans-IO core.

A call submits its requests (split at the server's maximum payload, all pipelined on
the connection), then reads until every cookie completed, within one deadline. Read
payloads are received straight into the caller's buffer (``pread_into``) or into the
``bytes`` that ``pread`` returns; writes are sent with ``sendmsg`` from the caller's
buffer. A :class:`Client` is not thread-safe: use one per thread, or
:func:`connect_multi` for several connections to a multi-conn server.
"""

from __future__ import annotations

import socket
import ssl
import struct
import time
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any

from ..errors import (
    ConnectionClosed,
    NBDError,
    NBDTimeout,
    ProtocolError,
    UnsupportedError,
)
from ..proto.constants import BASE_ALLOCATION, Cmd, CmdFlag
from ..proto.handshake import Negotiated
from ..proto.limits import DEFAULT_LIMITS, ClientLimits
from ..proto.transmission import (
    DIRECT_DONE,
    DIRECT_OTHER,
    DIRECT_PARTIAL,
    DIRECT_READ,
    ClientTransmission,
    Reply,
)
from ..transport.tls import TLSConfig
from ..transport.uri import NBDURI
from .base import (
    DEFAULT,
    DEFAULT_TIMEOUT,
    Buffer,
    ClientBase,
    ExtentCollector,
    MappedExtent,
    Op,
    Timeout,
    resolve,
    submit_all,
    with_export_info,
)
from .connection import Connection, Deadline, negotiate

_IOV_MAX = 1024
_WAITALL = socket.MSG_WAITALL
_CUT = "server closed the connection in the middle of a reply"
_DF = int(CmdFlag.DF)
_FUA = int(CmdFlag.FUA)


class _KernelTimeout:
    """Per-call time limits enforced by the kernel (SO_RCVTIMEO / SO_SNDTIMEO).

    In transmission the socket stays in blocking mode, so a request costs one sendmsg
    and one recv, not Python's poll-then-recv with a mode switch for each timeout
    change. A recv that times out fails with EAGAIN; the call's deadline is checked
    after every recv, and the kernel limit shrinks when less than half of it is left,
    so a trickling server cannot stretch a call far beyond its timeout.
    """

    __slots__ = ("current", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.current: float | None = None
        sock.settimeout(None)

    def arm(self, seconds: float | None) -> None:
        if seconds == self.current:
            return
        usec = 0 if seconds is None else max(1, round(seconds * 1_000_000))
        tv = struct.pack("@ll", usec // 1_000_000, usec % 1_000_000)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        self.current = seconds

    def check(self, end: float | None) -> None:
        """Between two socket calls of one request: raise NBDTimeout once ``end`` (a
        ``time.monotonic()`` value, None for no limit) has passed, and shrink the kernel
        limit when less than half of it is left."""
        if end is None:
            return
        left = end - time.monotonic()
        if left <= 0:
            raise NBDTimeout("deadline passed")
        if self.current is not None and left < self.current / 2:
            self.arm(left)


def _send_all(
    sock: socket.socket,
    buffers: Iterable[Buffer],
    deadline: Deadline,
    timer: _KernelTimeout | None = None,
    skip: int = 0,
) -> None:
    """Write every buffer but the first ``skip`` bytes (sent already); with ``timer``
    the socket is blocking with kernel limits, else it is in Python's timeout mode and
    each write gets the time left."""
    views = []
    for b in buffers:
        view = memoryview(b).cast("B")
        if skip >= len(view):
            skip -= len(view)
            continue
        views.append(view[skip:] if skip else view)
        skip = 0
    if isinstance(sock, ssl.SSLSocket):
        for view in views:
            if timer is None:
                sock.settimeout(deadline.left())
            sock.sendall(view)
        return
    while views:
        if timer is None:
            sock.settimeout(deadline.left())
        else:
            timer.check(deadline.end)
        sent = sock.sendmsg(views[:_IOV_MAX])
        while sent:
            if sent >= len(views[0]):
                sent -= len(views.pop(0))
            else:
                views[0] = views[0][sent:]
                sent = 0


class Client(ClientBase):
    """A blocking NBD client connected to one export.

    Connect with a URI (``nbd://``, ``nbds://``, ``nbd+unix://``, ``nbds+unix://``), a
    host and port, a unix socket path, or an already connected socket::

        with Client("nbd+unix:///disk?socket=/tmp/nbd.sock") as c:
            data = c.pread(4096, 0)

    Args:
        uri: an NBD URI (string or :class:`~pynbd.transport.uri.NBDURI`).
        host, port: a TCP address (port 10809 by default).
        path: a unix socket path.
        sock: a connected stream socket, taken over by the client.
        export_name: the export to use (overrides the URI's).
        tls: TLS settings (``nbds`` URIs set them from the query); None: no TLS.
        structured_replies, extended_headers: ask the server for them (default yes).
        meta_contexts: contexts to select for :meth:`block_status`.
        request_block_size: ask for the server's block sizes and obey them.
        timeout: the time limit of connecting and of every call, in seconds (None: no
            limit). A call that exceeds it raises NBDTimeout and closes the connection.
            A call interrupted by an exception from a signal handler (such as
            KeyboardInterrupt) closes the connection too: the position in the stream
            is then unknown.
        limits: what the server may make the client hold: option replies and their
            bytes in the handshake, extents kept per block status reply, separate
            ranges of a read's chunks (see :class:`~pynbd.proto.limits.ClientLimits`;
            the defaults suit any well-behaved server). Going over one is a
            ProtocolError that names it; extents over the bound are dropped instead,
            and :meth:`block_status` asks again from where the kept ones end.

    Raises:
        URIError, ConnectionClosed, TLSError, OptionError, ExportNotFound,
        ProtocolError, NBDTimeout: when connecting or negotiating fails.
    """

    def __init__(
        self,
        uri: str | NBDURI | None = None,
        *,
        host: str | None = None,
        port: int | None = None,
        path: str | None = None,
        sock: socket.socket | None = None,
        export_name: str | None = None,
        tls: TLSConfig | None = None,
        structured_replies: bool = True,
        extended_headers: bool = True,
        meta_contexts: tuple[str, ...] = (BASE_ALLOCATION,),
        request_block_size: bool = True,
        timeout: float | None = DEFAULT_TIMEOUT,
        limits: ClientLimits = DEFAULT_LIMITS,
    ) -> None:
        target, self.options = resolve(
            uri,
            host=host,
            port=port,
            path=path,
            export_name=export_name,
            tls=tls,
            structured_replies=structured_replies,
            extended_headers=extended_headers,
            meta_contexts=meta_contexts,
            request_block_size=request_block_size,
            timeout=timeout,
            limits=limits,
        )
        self.target = target
        self.timeout = timeout
        self._conn = conn = Connection.open(target, self.options, sock=sock, timeout=timeout)
        self.negotiated = conn.negotiated
        assert conn.sock is not None  # just opened
        sock = conn.sock
        try:
            self._core = conn.core
        except BaseException:
            conn.abort()
            raise
        self._sock: socket.socket | None = sock
        self._timer = _KernelTimeout(sock)
        self._maxp = self._max_payload()
        # A TLS socket takes no recv flags (so a read's data cannot be received as one
        # bytes object with MSG_WAITALL) and has no sendmsg.
        self._tls = isinstance(sock, ssl.SSLSocket)
        # A big read's data goes into the caller's buffer with plain recv_into calls
        # over a unix socket (the faster there), and with MSG_WAITALL over TCP (which
        # wakes the reader less often there). Either way the data lands in place, and a
        # short receive (a timeout slice, a signal) is finished by the loop.
        self._into_flags = 0 if sock.family == socket.AF_UNIX else _WAITALL

    # -- negotiation mode --------------------------------------------------------------

    @staticmethod
    def negotiate(
        uri: str | NBDURI | None = None,
        *,
        host: str | None = None,
        port: int | None = None,
        path: str | None = None,
        sock: socket.socket | None = None,
        export_name: str | None = None,
        tls: TLSConfig | None = None,
        list_exports: bool = True,
        list_meta_contexts: bool = True,
        info: bool = True,
        go: bool = False,
        timeout: float | None = DEFAULT_TIMEOUT,
        limits: ClientLimits = DEFAULT_LIMITS,
    ) -> Negotiated:
        """Negotiate without using the export: list exports, meta contexts, export info.

        With ``go=False`` (the default) the client asks NBD_OPT_INFO (unless ``info``
        is False) and aborts, never entering transmission; with ``go=True`` it enters
        transmission with NBD_OPT_GO and disconnects at once (some servers, like
        nbd-server, report the right size only to GO). Arguments are as for
        :class:`Client`; :func:`pynbd.client.negotiate` is the same without the
        :meth:`resolve` step and without raising for a refused INFO.

        Returns:
            A :class:`~pynbd.proto.handshake.Negotiated`: ``exports`` (None if the
            server refused LIST: see ``refused``), ``available_meta_contexts``, size,
            flags, block sizes.

        Raises:
            ExportNotFound, OptionError: the server refused INFO (or GO) for the
            export; as :class:`Client` otherwise.
        """
        target, options = resolve(
            uri,
            host=host,
            port=port,
            path=path,
            export_name=export_name,
            tls=tls,
            timeout=timeout,
            limits=limits,
        )
        result = negotiate(
            target,
            options,
            sock=sock,
            list_exports=list_exports,
            list_meta_contexts=list_meta_contexts,
            info=info,
            go=go,
            timeout=timeout,
        )
        return with_export_info(result)

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._sock is None

    def close(self) -> None:
        """Disconnect (NBD_CMD_DISC when possible) and close the socket. Idempotent."""
        self._sock = None
        self._conn.close()

    def _die(self) -> None:
        self._sock = None
        self._conn.abort()

    # -- the request loop --------------------------------------------------------------

    def _live(self) -> tuple[socket.socket, ClientTransmission]:
        if self._sock is None or self._core is None or self._core.closed:
            raise ConnectionClosed("the connection is closed")
        return self._sock, self._core

    def _run(self, ops: list[Op], timeout: Timeout) -> list[Reply]:
        """Submit ``ops``, send them, and read until all completed (one deadline).

        Raises the first failed request's error, in request order.
        """
        sock, core = self._live()
        return self._exchange(submit_all(core, ops), timeout, sock, core)

    def _effect(self, ops: list[Op], timeout: Timeout) -> None:
        """Run FLUSH, TRIM, WRITE_ZEROES or CACHE requests (no payload, no data back):
        one request, the common case, goes through :meth:`_one`."""
        if len(ops) == 1:
            op = ops[0]
            self._one(op.command, op.offset, op.length, op.flags, timeout)
        else:
            self._run(ops, timeout)

    def _one(
        self,
        command: Cmd,
        offset: int,
        length: int,
        flags: int,
        timeout: Timeout,
        payload: Buffer | None = None,
    ) -> None:
        """One request other than a read, the common case: :meth:`_exchange`
        specialised for one cookie (a blocking client has nothing else in flight, so
        the next reply is this one).

        Its usual reply (a success, 16 bytes as a rule) is received into the room the
        core lends (``ClientTransmission.direct_request``), and the core judges it;
        anything else is parsed there by the core's general path. The usual case thus
        skips the core's send queue, its in-flight table, its parser and the Reply
        object."""
        sock, core = self._sock, self._core
        if sock is None or core is None:
            raise ConnectionClosed("the connection is closed")
        direct = core.direct_request(command, offset, length, flags, payload)
        if direct is None:
            core.request(command, offset, length, flags, payload=payload)
        limit = self.timeout if timeout is DEFAULT else timeout
        try:
            if direct is not None:
                _, request, room = direct
                end = self._send_one(
                    sock, (request,) if payload is None else (request, payload), limit
                )
                n = sock.recv_into(room)
                verdict = core.direct_received(n)
                if verdict == DIRECT_PARTIAL:
                    verdict = self._rest_of_reply(sock, core, room, n, end)
                if verdict == DIRECT_DONE:
                    return
                if not core.replies:
                    self._receive_rest(sock, core, end)
            else:
                end = self._send_one(sock, core.buffers_to_send(), limit)
                if not core.buffer_updated(sock.recv_into(core.receive_buffer())):
                    self._receive_rest(sock, core, end)
        except (OSError, NBDError) as exc:
            err = self._failure(exc, limit)
            if err is exc:
                raise
            raise err from exc
        except BaseException:
            self._die()  # interrupted mid-reply: the stream's position is lost
            raise
        self._take_reply(core)

    def _read(
        self, view: memoryview | None, length: int, offset: int, flags: int, timeout: Timeout
    ) -> bytes | None:
        """One READ: into ``view``, or (None) into a new ``bytes``, which is returned.

        A read's usual reply is received into the room the core lends and judged by
        the core (``ClientTransmission.direct_read``). A small read's header and data
        come with one recv, and the data is copied out once, without the core's parser,
        which a lone small read would otherwise pay in full. A big read's header comes
        alone, then its data straight into ``view`` (``recv_into``, plain over unix and
        with MSG_WAITALL over TCP, the faster on each: see ``_into_flags``), or as one
        ``bytes`` with ``recv(length, MSG_WAITALL)``, which Python does not zero-fill
        first. Anything else (an error, a hole, chunks) the core has already where its
        general path reads it, with every check. All in one method: this is the
        client's hottest path, and each call costs."""
        sock, core = self._sock, self._core
        if sock is None or core is None:
            raise ConnectionClosed("the connection is closed")
        # These raise ConnectionClosed when the core is closed.
        small = length < DIRECT_READ
        direct = None
        if small or not self._tls:
            direct = core.direct_read(view, length, offset, flags)
        if direct is None:
            if view is None:
                core.read_bytes(length, offset, flags)
            else:
                core.read(view, offset, flags)
        limit = self.timeout if timeout is DEFAULT else timeout
        try:
            if direct is None:
                end = self._send_one(sock, core.buffers_to_send(), limit)
                done = core.buffer_updated(sock.recv_into(core.receive_buffer()))
            else:
                cookie, request, room = direct
                end = self._send_one(sock, (request,), limit)
                n = sock.recv_into(room)
                verdict = core.direct_received(n)
                if verdict == DIRECT_PARTIAL:
                    verdict = self._rest_of_reply(sock, core, room, n, end)
                if verdict == DIRECT_OTHER:
                    done = bool(core.replies)
                elif verdict == DIRECT_DONE:  # a small read's data is in the room
                    got_data = room[-length:]
                    if view is None:
                        return bytes(got_data)
                    view[:] = got_data
                    return None
                elif view is None:  # a big read's data, as one new bytes
                    data = sock.recv(length, _WAITALL)
                    while len(data) < length:  # short (a timeout slice, a signal): rare
                        self._timer.check(end)
                        more = sock.recv(length - len(data), _WAITALL)
                        if not more:
                            raise ProtocolError(_CUT)
                        data += more
                    core.direct_done(cookie)
                    return data
                else:  # a big read's data, straight into the caller's buffer
                    got, into_flags = 0, self._into_flags
                    while True:
                        n = sock.recv_into(view[got:] if got else view, 0, into_flags)
                        if not n:
                            raise ProtocolError(_CUT)
                        got += n
                        if got == length:
                            core.direct_done(cookie)
                            return None
                        self._timer.check(end)  # short: a timeout slice, a signal
            if not done:
                self._receive_rest(sock, core, end)
        except (OSError, NBDError) as exc:
            err = self._failure(exc, limit)
            if err is exc:
                raise
            raise err from exc
        except BaseException:
            self._die()  # interrupted mid-reply: the stream's position is lost
            raise
        return self._take_reply(core).data

    def _rest_of_reply(
        self,
        sock: socket.socket,
        core: ClientTransmission,
        room: memoryview,
        n: int,
        end: float | None,
    ) -> int:
        """The first ``n`` bytes received into a direct request's ``room`` are its usual
        reply so far: receive more while that holds (nbdkit sends a reply's header and
        its data apart, and over unix about one recv in twenty gets only the header);
        return the core's last verdict."""
        verdict = DIRECT_PARTIAL
        while verdict == DIRECT_PARTIAL:
            self._timer.check(end)
            more = sock.recv_into(room[n:])
            n += more
            verdict = core.direct_received(n if more else 0)
        return verdict

    def _send_one(
        self, sock: socket.socket, buffers: Sequence[Buffer], limit: float | None
    ) -> float | None:
        """Send the request of :meth:`_one` or :meth:`_read` (``buffers``), with the
        socket's kernel timeout armed for ``limit``; return the reply's deadline."""
        timer = self._timer
        if timer.current != limit:
            timer.arm(limit)
        if len(buffers) == 1:
            sock.sendall(buffers[0])
        elif self._tls:  # no sendmsg
            _send_all(sock, buffers, Deadline(limit), timer)
        else:
            # A request and its payload: one sendmsg, as a rule. (Every buffer here is
            # bytes or a byte view, so len() is its size.)
            sent = sock.sendmsg(buffers)
            if sent != sum(map(len, buffers)):
                _send_all(sock, buffers, Deadline(limit), timer, skip=sent)
        return None if limit is None else time.monotonic() + limit

    def _take_reply(self, core: ClientTransmission) -> Reply:
        """The one reply of :meth:`_one` or :meth:`_read`; raise its error."""
        reply = core.replies.popleft()
        if core.shutdown_requested:
            self.close()  # the spec wants a soft disconnect after NBD_ESHUTDOWN
        if reply.error is not None:
            raise reply.error
        return reply

    def _receive_rest(
        self, sock: socket.socket, core: ClientTransmission, end: float | None
    ) -> None:
        """Receive until a reply completes (the first recv did not bring it whole)."""
        recv_into, receive_buffer, updated = (
            sock.recv_into,
            core.receive_buffer,
            core.buffer_updated,
        )
        check = self._timer.check
        while True:
            check(end)  # a trickling server cannot stretch the call
            if updated(recv_into(receive_buffer())):
                return

    def _failure(self, exc: BaseException, limit: float | None) -> BaseException:
        """The connection is dead after ``exc``: close it, say what to raise."""
        self._die()
        if isinstance(
            exc, TimeoutError | BlockingIOError | ssl.SSLWantReadError | ssl.SSLWantWriteError
        ):
            # EAGAIN from SO_RCVTIMEO/SO_SNDTIMEO, or our own deadline check.
            return NBDTimeout(f"no reply within {limit} s; connection closed")
        if isinstance(exc, ProtocolError | ConnectionClosed) or not isinstance(exc, OSError):
            return exc
        return ConnectionClosed(f"connection lost: {exc}")

    def _exchange(
        self, cookies: list[int], timeout: Timeout, sock: socket.socket, core: ClientTransmission
    ) -> list[Reply]:
        """Send what the core queued for ``cookies`` and read until they completed."""
        limit = self.timeout if timeout is DEFAULT else timeout
        timer = self._timer
        end = None if limit is None else time.monotonic() + limit
        want = len(cookies)
        done: dict[int, Reply] = {}
        try:
            if timer.current != limit:
                timer.arm(limit)
            buffers = core.buffers_to_send()
            if len(buffers) == 1:
                sock.sendall(buffers[0])
            else:
                _send_all(sock, buffers, Deadline(limit), timer)
            recv_into, receive_buffer = sock.recv_into, core.receive_buffer
            updated, next_event = core.buffer_updated, core.next_event
            # A read's payload is waited for whole (one call, not several; TLS sockets
            # take no flags): with several threads, each call is a handover of the GIL.
            payload_room = None if self._tls else core.payload_room
            while len(done) < want:
                room = payload_room() if payload_room is not None else None
                if room is not None:
                    updated(recv_into(room, 0, _WAITALL))
                else:
                    updated(recv_into(receive_buffer()))
                while (reply := next_event()) is not None:
                    done[reply.cookie] = reply
                timer.check(end)  # a trickling server cannot stretch the call
        except (OSError, NBDError) as exc:
            err = self._failure(exc, limit)
            if err is exc:
                raise
            raise err from exc
        except BaseException:
            self._die()  # interrupted mid-reply: the stream's position is lost
            raise
        replies = [done[c] for c in cookies]
        if core.shutdown_requested and core.in_flight == 0:
            self.close()  # the spec wants a soft disconnect after NBD_ESHUTDOWN
        for reply in replies:
            if reply.error is not None:
                raise reply.error
        return replies

    # -- the API -----------------------------------------------------------------------

    def pread_into(
        self, buf: Buffer, offset: int, *, df: bool = False, timeout: Timeout = DEFAULT
    ) -> None:
        """Read ``len(buf)`` bytes at ``offset`` into the caller's writable buffer.

        Requests over the server's maximum payload are split and pipelined.

        Args:
            buf: a writable buffer (bytearray, memoryview, mmap, array...).
            offset: where to read in the export.
            df: set NBD_CMD_FLAG_DF (the server must not fragment the reply).
            timeout: this call's limit in seconds (default: the client's).

        Raises:
            RequestError: the server failed the read. InvalidRequest, UnsupportedError:
            nothing was sent. ConnectionClosed, ProtocolError, NBDTimeout: fatal.
        """
        view = self._single(buf)
        if view is not None:
            self._read(view, len(view), offset, _DF if df else 0, timeout)
            return
        ops = self._plan_read(buf, offset, df)
        if ops:
            self._run(ops, timeout)

    def pread(
        self, length: int, offset: int, *, df: bool = False, timeout: Timeout = DEFAULT
    ) -> bytes:
        """Read ``length`` bytes at ``offset`` and return them as a new ``bytes``.

        A small reply is copied once out of the receive buffer; the data of a larger
        one is received straight into the bytes object returned (no buffer is
        zero-filled, nothing is copied; over TLS it is assembled in a buffer and copied
        once). A read over the server's maximum payload is split as :meth:`pread_into`
        does, into a buffer copied once at the end. :meth:`pread_into` into a reused
        buffer allocates nothing per call.

        Raises:
            As :meth:`pread_into`.
        """
        if 0 < length <= self._maxp:
            data = self._read(None, length, offset, _DF if df else 0, timeout)
            assert data is not None
            return data
        buf = bytearray(length)
        self.pread_into(buf, offset, df=df, timeout=timeout)
        return bytes(buf)

    def pwrite(
        self, data: Buffer, offset: int, *, fua: bool = False, timeout: Timeout = DEFAULT
    ) -> None:
        """Write ``data`` (any buffer) at ``offset``; ``fua`` forces it to stable storage.

        Raises as :meth:`pread_into`; UnsupportedError for a read-only export or for
        ``fua`` when the server did not advertise it.
        """
        view = self._single(data)
        if view is not None:
            self._one(Cmd.WRITE, offset, len(view), _FUA if fua else 0, timeout, view)
            return
        ops = self._plan_write(data, offset, fua)
        if ops:
            self._run(ops, timeout)

    def pread_many(
        self, reads: Iterable[tuple[Buffer, int]], *, timeout: Timeout = DEFAULT
    ) -> None:
        """Read several ranges, pipelined: every request is sent before the first reply
        is awaited. ``reads`` holds (writable buffer, offset) pairs.

        Raises as :meth:`pread_into`, once every reply has come: the error of the first
        request that failed, whose ``request_offset`` tells which it was.
        """
        ops = self._plan_reads(reads)
        if ops:
            self._run(ops, timeout)

    def pwrite_many(
        self,
        writes: Iterable[tuple[Buffer, int]],
        *,
        fua: bool = False,
        timeout: Timeout = DEFAULT,
    ) -> None:
        """Write several ranges, pipelined: every request is sent before the first
        reply is awaited. ``writes`` holds (buffer, offset) pairs; the buffers must not
        change until the call returns.

        Raises as :meth:`pwrite`, once every reply has come: the error of the first
        request that failed, whose ``request_offset`` tells which it was.
        """
        ops = self._plan_writes(writes, fua)
        if ops:
            self._run(ops, timeout)

    def flush(self, *, timeout: Timeout = DEFAULT) -> None:
        """Persist every write that has completed (NBD_CMD_FLUSH)."""
        self._effect(self._plan_flush(), timeout)

    def trim(
        self, length: int, offset: int, *, fua: bool = False, timeout: Timeout = DEFAULT
    ) -> None:
        """Tell the server the range is no longer needed (NBD_CMD_TRIM)."""
        self._effect(self._plan_effect(Cmd.TRIM, offset, length, _FUA if fua else 0), timeout)

    def zero(
        self,
        length: int,
        offset: int,
        *,
        fua: bool = False,
        no_hole: bool = False,
        fast: bool = False,
        timeout: Timeout = DEFAULT,
    ) -> None:
        """Write zeroes over the range (NBD_CMD_WRITE_ZEROES).

        Args:
            no_hole: the server must allocate, not punch a hole (NBD_CMD_FLAG_NO_HOLE).
            fast: fail with ENOTSUP rather than zero slowly (NBD_CMD_FLAG_FAST_ZERO).
        """
        flags = self._zero_flags(fua=fua, no_hole=no_hole, fast=fast)
        self._effect(self._plan_effect(Cmd.WRITE_ZEROES, offset, length, flags), timeout)

    def cache(self, length: int, offset: int, *, timeout: Timeout = DEFAULT) -> None:
        """Ask the server to prefetch the range (NBD_CMD_CACHE)."""
        self._effect(self._plan_effect(Cmd.CACHE, offset, length), timeout)

    def block_status(
        self,
        length: int,
        offset: int,
        context: str = BASE_ALLOCATION,
        *,
        req_one: bool = False,
        timeout: Timeout = DEFAULT,
    ) -> list[MappedExtent]:
        """The extents of one meta context over [offset, offset+length).

        Asks again from where the server stopped until the range is covered (with
        ``req_one``: one request, one extent). Extents are clipped to the range. For
        ``base:allocation`` the flags are ``StateFlag.HOLE | StateFlag.ZERO``.

        Raises:
            UnsupportedError: the context was not negotiated.
        """
        return self.block_status_all(
            length, offset, contexts=(context,), req_one=req_one, timeout=timeout
        )[context]

    def block_status_all(
        self,
        length: int,
        offset: int,
        *,
        contexts: tuple[str, ...] | None = None,
        req_one: bool = False,
        timeout: Timeout = DEFAULT,
    ) -> dict[str, list[MappedExtent]]:
        """The extents of several meta contexts (default: all negotiated), by name."""
        names = self._block_status_names(contexts)
        collect = ExtentCollector(offset, offset + length, names, req_one)
        while not collect.finished:
            start = collect.next_start()
            (reply,) = self._run(
                [self._plan_block_status(start, collect.end, names, req_one)], timeout
            )
            collect.add(start, reply)
        return collect.extents


def connect_multi(uri: str | NBDURI, connections: int, **kwargs: Any) -> list[Client]:
    """Open ``connections`` clients to one export, which must advertise multi-conn.

    Raises:
        UnsupportedError: the server does not allow multi-conn (nothing stays open).
    """
    first = Client(uri, **kwargs)
    if connections > 1 and not first.can_multi_conn():
        first.close()
        raise UnsupportedError("the server does not advertise NBD_FLAG_CAN_MULTI_CONN")
    clients = [first]
    try:
        for _ in range(connections - 1):
            clients.append(Client(uri, **kwargs))
    except BaseException:
        for c in clients:
            c.close()
        raise
    return clients


__all__ = ["Client", "connect_multi"]
