"""Hostile NBD servers made of ``struct`` calls, for the client's bounds (issue 16).

Written from the spec (not from pynbd's records), like ``tests/proto/fake_server.py``.
Each server is a function that speaks on one connected socket until the client goes:

- :func:`info_flood`: answers NBD_OPT_GO (and INFO) with NBD_REP_INFO replies of 16 KiB
  of an unknown information type, as fast as the client reads them, never ending;
- :func:`list_flood`: answers NBD_OPT_LIST with NBD_REP_SERVER replies, never ending;
- :func:`status_flood`: a well-behaved handshake (structured replies,
  ``base:allocation``), then every NBD_CMD_BLOCK_STATUS answered with one chunk of
  ``extents`` descriptors of ``extent_length`` bytes.

The tests run them on a socketpair in a thread (:class:`Hostile`). For a measurement
with the client in a process of its own, serve them on a unix socket::

    python -m tests.client.hostile info-flood /tmp/hostile.sock
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import struct
import threading
from collections.abc import Callable

IHAVEOPT = b"IHAVEOPT"
REPLY_MAGIC = bytes.fromhex("0003e889045565a9")
STRUCTURED_MAGIC = 0x668E33EF
REQUEST_MAGIC = 0x25609513
SIZE = 1 << 40
#: HAS_FLAGS | SEND_FLUSH | CAN_MULTI_CONN (no writes: the servers are read-only).
FLAGS = 0x1 | 0x2 | 0x4 | 0x100
CONTEXT_ID = 1

# Option and reply numbers (spec "Option types", "Option reply types").
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_INFO, OPT_GO = 1, 2, 3, 6, 7
OPT_STRUCTURED_REPLY, OPT_SET_META_CONTEXT = 8, 10
REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
REP_ERR_UNSUP = (1 << 31) + 1
CMD_DISC, CMD_BLOCK_STATUS = 2, 7
REPLY_TYPE_NONE, REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_ERROR = 0, 5, (1 << 15) + 1


def rep(option: int, reply: int, data: bytes = b"") -> bytes:
    return REPLY_MAGIC + struct.pack(">III", option, reply, len(data)) + data


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        part = sock.recv(n - len(data))
        if not part:
            raise EOFError
        data += part
    return data


def _flood(sock: socket.socket, reply: bytes) -> None:
    """Send ``reply`` again and again, in batches, until the client goes."""
    batch = reply * max(1, (256 * 1024) // len(reply))
    while True:
        sock.sendall(batch)


def _negotiate(sock: socket.socket, answer: Callable[[int, bytes], bytes | None]) -> None:
    """The fixed newstyle greeting, then options until GO or EXPORT_NAME: ``answer``
    may answer an option (None: the default answer below)."""
    sock.sendall(b"NBDMAGIC" + IHAVEOPT + struct.pack(">H", 1 | 2))
    recv_exact(sock, 4)  # the client's flags
    while True:
        _, option, length = struct.unpack(">8sII", recv_exact(sock, 16))
        data = recv_exact(sock, length)
        out = answer(option, data)
        if out is not None:
            sock.sendall(out)
        elif option == OPT_STRUCTURED_REPLY:
            sock.sendall(rep(option, REP_ACK))
        elif option == OPT_SET_META_CONTEXT:
            ctx = struct.pack(">I", CONTEXT_ID) + b"base:allocation"
            sock.sendall(rep(option, REP_META_CONTEXT, ctx) + rep(option, REP_ACK))
        elif option in (OPT_GO, OPT_INFO):
            export = struct.pack(">HQH", 0, SIZE, FLAGS)
            sock.sendall(rep(option, REP_INFO, export) + rep(option, REP_ACK))
            if option == OPT_GO:
                return
        elif option == OPT_ABORT:
            sock.sendall(rep(option, REP_ACK))
            raise EOFError
        elif option == OPT_EXPORT_NAME:
            sock.sendall(struct.pack(">QH", SIZE, FLAGS))
            return
        else:
            sock.sendall(rep(option, REP_ERR_UNSUP))


def info_flood(sock: socket.socket) -> None:
    """GO and INFO answered with endless 16 KiB NBD_REP_INFO replies of type 0x7777."""

    def answer(option: int, data: bytes) -> bytes | None:
        if option in (OPT_GO, OPT_INFO):
            _flood(sock, rep(option, REP_INFO, struct.pack(">H", 0x7777) + bytes(16 * 1024 - 2)))
        return None

    _negotiate(sock, answer)


def list_flood(sock: socket.socket) -> None:
    """LIST answered with endless NBD_REP_SERVER replies (export "x", no description)."""

    def answer(option: int, data: bytes) -> bytes | None:
        if option == OPT_LIST:
            _flood(sock, rep(option, REP_SERVER, struct.pack(">I", 1) + b"x"))
        return None

    _negotiate(sock, answer)


def status_flood(sock: socket.socket, extents: int = (1 << 21) - 1, extent_length: int = 1) -> None:
    """Every BLOCK_STATUS answered with one NBD_REPLY_TYPE_BLOCK_STATUS chunk of up to
    ``extents`` descriptors of ``extent_length`` bytes each (flags 0): as many as the
    request's length holds (one at least), so that the answer is a valid one."""
    _negotiate(sock, lambda option, data: None)
    descriptor = struct.pack(">II", extent_length, 0)
    while True:
        _, _, cmd, cookie, _, length = struct.unpack(">IHHQQI", recv_exact(sock, 28))
        if cmd == CMD_DISC:
            return
        if cmd == CMD_BLOCK_STATUS:
            body = descriptor * min(extents, max(1, length // extent_length))
            head = struct.pack(
                ">IHHQII", STRUCTURED_MAGIC, 1, REPLY_TYPE_BLOCK_STATUS, cookie, 4 + len(body),
                CONTEXT_ID,
            )  # fmt: skip
            sock.sendall(head)
            sock.sendall(body)
        else:
            sock.sendall(struct.pack(">IHHQI", STRUCTURED_MAGIC, 1, REPLY_TYPE_NONE, cookie, 0))


SERVERS: dict[str, Callable[[socket.socket], None]] = {
    "info-flood": info_flood,
    "list-flood": list_flood,
    "status-flood": status_flood,
}


def _serve_one(server: Callable[[socket.socket], None], sock: socket.socket) -> None:
    with sock, contextlib.suppress(OSError, EOFError):
        server(sock)


class Hostile:
    """A hostile server on one end of a socketpair, in a thread; ``client`` is the
    client's end. :meth:`join` waits for the server to see the client go."""

    def __init__(self, server: Callable[[socket.socket], None]) -> None:
        self.client, ours = socket.socketpair()
        self._thread = threading.Thread(target=_serve_one, args=(server, ours), daemon=True)
        self._thread.start()

    def join(self) -> None:
        self.client.close()
        self._thread.join(30)
        assert not self._thread.is_alive(), "the hostile server did not see the client go"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("server", choices=sorted(SERVERS))
    parser.add_argument("socket", help="unix socket path to listen on")
    args = parser.parse_args()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(args.socket)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(args.socket)
    listener.listen(8)
    server = SERVERS[args.server]
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_serve_one, args=(server, conn), daemon=True).start()


if __name__ == "__main__":
    main()
