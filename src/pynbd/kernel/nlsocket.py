"""A thin generic-netlink socket: send a request, read its replies, receive events.

All the bytes are built and parsed by :mod:`pynbd.kernel.netlink`; this module only moves
them. One socket, blocking, with a timeout so that a call never hangs. Multicast events
that arrive while a request waits for its answer are kept for :meth:`GenlSocket.receive`.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import socket
import sys
from types import TracebackType

from ..errors import InvalidRequest
from .errors import FamilyNotFound, KernelError, NetlinkFormatError
from .netlink import (
    NBD_GENL_FAMILY_NAME,
    NBD_GENL_MCAST_GROUP_NAME,
    NETLINK_ADD_MEMBERSHIP,
    NETLINK_CAP_ACK,
    NETLINK_EXT_ACK,
    NETLINK_GENERIC,
    SOL_NETLINK,
    DoneMessage,
    ErrorMessage,
    FamilyInfo,
    GenlMessage,
    Message,
    decode_family,
    encode_getfamily,
    parse_messages,
    request_seq,
)

__all__ = ["GenlSocket"]


class GenlSocket:
    """An AF_NETLINK / NETLINK_GENERIC socket bound to a kernel-chosen port id.

    Args:
        timeout: seconds to wait for the kernel's answer (None: forever).

    Raises:
        KernelError: the socket could not be created (no netlink in this kernel).
    """

    def __init__(self, timeout: float | None = 10.0) -> None:
        try:
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        except OSError as exc:
            raise KernelError(exc.errno or errno.EIO, call="socket(AF_NETLINK)") from exc
        try:
            self._sock.bind((0, 0))
            self.port_id: int = self._sock.getsockname()[0]
            self._sock.settimeout(timeout)
            # Ask for error texts and do not get our requests echoed back in errors;
            # both options are missing from old kernels, which is fine.
            for opt in (NETLINK_EXT_ACK, NETLINK_CAP_ACK):
                with contextlib.suppress(OSError):
                    self._sock.setsockopt(SOL_NETLINK, opt, 1)
        except OSError as exc:
            self._sock.close()
            raise KernelError(exc.errno or errno.EIO, call="bind(AF_NETLINK)") from exc
        self._seq = 0
        self._pending: collections.deque[Message] = collections.deque()
        self._buf = bytearray(65536)

    def next_seq(self) -> int:
        """A fresh sequence number for the next request."""
        self._seq = self._seq % 0xFFFFFFFF + 1
        return self._seq

    def _recv(self, call: str) -> list[Message]:
        try:
            # Peek with MSG_TRUNC for the datagram's size, so that no reply is cut short.
            size = self._sock.recv_into(self._buf, 0, socket.MSG_PEEK | socket.MSG_TRUNC)
            if size > len(self._buf):
                self._buf = bytearray(size)
            size = self._sock.recv_into(self._buf)
        except TimeoutError as exc:
            raise KernelError(errno.ETIMEDOUT, "no answer from the kernel", call=call) from exc
        except OSError as exc:
            # ENOBUFS: the socket's receive buffer overran and messages were lost.
            raise KernelError(exc.errno or errno.EIO, call=call) from exc
        return parse_messages(memoryview(self._buf)[:size])

    def request(self, data: bytes, *, call: str, device: str | None = None) -> list[GenlMessage]:
        """Send one encoded request and return its replies once the kernel acks it.

        A dump (NLM_F_DUMP) ends with NLMSG_DONE instead of an ack; its replies come
        back in order as well.

        Args:
            data: the request, from an ``encode_*`` function of :mod:`.netlink`, with
                NLM_F_ACK set and a sequence number from :meth:`next_seq`.
            call: the request's name for errors (``"NBD_CMD_CONNECT"``).
            device: the device concerned, for errors.

        Raises:
            KernelError: the kernel answered with an error (its errno and extended-ack
                text), did not answer in time, or the socket failed.
            NetlinkFormatError: the answer could not be parsed.
        """
        seq = request_seq(data)
        try:
            self._sock.send(data)
        except OSError as exc:
            raise KernelError(exc.errno or errno.EIO, call=call, device=device) from exc
        replies: list[GenlMessage] = []
        end: ErrorMessage | DoneMessage | None = None
        while end is None:
            for msg in self._recv(call):
                if end is not None or msg.seq != seq or msg.pid != self.port_id:
                    self._pending.append(msg)  # an event, or a late answer to another call
                elif isinstance(msg, ErrorMessage | DoneMessage):
                    end = msg  # the ack, the error, or the end of a dump
                elif isinstance(msg, GenlMessage):
                    replies.append(msg)
        if end.errno:
            raise KernelError(end.errno, end.message, call=call, device=device)
        return replies

    @property
    def pending(self) -> bool:
        """True when messages already read wait in :meth:`receive`.

        Check it before polling :meth:`fileno`: a message kept while :meth:`request`
        waited does not make the descriptor readable again.
        """
        return bool(self._pending)

    def receive(self) -> list[Message]:
        """Return the events received so far, or wait (up to the timeout) for more.

        Raises:
            KernelError: nothing arrived in time (ETIMEDOUT), or ENOBUFS when events were
                lost because nobody read them.
            NetlinkFormatError: a message could not be parsed.
        """
        if not self._pending:
            self._pending.extend(self._recv("receive"))
        out = list(self._pending)
        self._pending.clear()
        return out

    def resolve_family(self, name: str) -> FamilyInfo:
        """Look a generic-netlink family up by name (CTRL_CMD_GETFAMILY).

        Raises:
            FamilyNotFound: the kernel has no such family (for "nbd": the driver is not
                loaded).
            KernelError, NetlinkFormatError: as :meth:`request`.
        """
        try:
            replies = self.request(encode_getfamily(name, seq=self.next_seq()), call="nlctrl")
        except KernelError as exc:
            if exc.errno == errno.ENOENT:
                raise FamilyNotFound(name) from exc
            raise
        if len(replies) != 1:
            raise NetlinkFormatError(f"CTRL_CMD_GETFAMILY: {len(replies)} replies, expected 1")
        return decode_family(replies[0])

    def resolve_nbd(self) -> tuple[FamilyInfo, int]:
        """Resolve the nbd family and its multicast group "nbd_mc_group".

        Returns:
            The family, and the id of its multicast group.

        Raises:
            FamilyNotFound: the nbd driver is not loaded (modprobe nbd).
            KernelError: the family has no "nbd_mc_group" (errno ENOENT).
        """
        family = self.resolve_family(NBD_GENL_FAMILY_NAME)
        group = family.group_id(NBD_GENL_MCAST_GROUP_NAME)
        if group is None:
            raise KernelError(errno.ENOENT, "the nbd family has no nbd_mc_group", call="nlctrl")
        return family, group

    def subscribe(self, group_id: int) -> None:
        """Join a multicast group; its events then come out of :meth:`receive`.

        Raises:
            KernelError: the kernel refused (no such group).
            InvalidRequest: the id does not fit 32 bits.
        """
        if not 0 <= group_id <= 0xFFFFFFFF:
            raise InvalidRequest(f"multicast group id {group_id} does not fit 32 bits")
        try:
            # A u32 in host order: the group ids are unsigned, Python's int option is not.
            value = group_id.to_bytes(4, sys.byteorder)
            self._sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, value)
        except OSError as exc:
            raise KernelError(exc.errno or errno.EIO, call="NETLINK_ADD_MEMBERSHIP") from exc

    def fileno(self) -> int:
        """The socket's descriptor, for select/poll."""
        return self._sock.fileno()

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()

    def __enter__(self) -> GenlSocket:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
