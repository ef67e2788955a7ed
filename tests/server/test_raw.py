"""Bad input on a raw socket against the real asyncio server."""

from __future__ import annotations

import dataclasses
import socket
import struct
from collections.abc import Iterator

import pytest

from pynbd.client import Client
from pynbd.proto.constants import Cmd, Err
from pynbd.server import Export, Limits, MemoryBackend

from .helpers import (
    ServerThread,
    is_closed,
    raw_go,
    raw_option,
    raw_request,
    raw_session,
    read_option_reply,
    read_simple_reply,
    recv_exactly,
    running_server,
)

# Each test runs with connections served from threads, then from the event loop.
pytestmark = pytest.mark.usefixtures("serving_mode")


class AlignedMemory(MemoryBackend):
    """A memory backend that insists on 512-byte blocks."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.capabilities = dataclasses.replace(self.capabilities, minimum_block=512)


@pytest.fixture
def server() -> Iterator[ServerThread]:
    exports: dict[str, MemoryBackend | Export] = {
        "": MemoryBackend(1 << 20),
        "ro": Export(MemoryBackend(1 << 20), read_only=True),
        "aligned": AlignedMemory(1 << 20),
    }
    with running_server(exports, limits=Limits(handshake_timeout=60)) as srv:
        yield srv


@pytest.fixture
def sock(server: ServerThread) -> Iterator[socket.socket]:
    with raw_session(server, go=False) as s:
        yield s


@pytest.mark.parametrize("flags", [4, 0xFFFFFFFF])
def test_unknown_client_flags_close_the_connection(sock: socket.socket, flags: int) -> None:
    recv_exactly(sock, 18)
    sock.sendall(struct.pack(">I", flags))
    assert is_closed(sock)


def test_option_with_huge_lying_length_closes(sock: socket.socket) -> None:
    recv_exactly(sock, 18)
    sock.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 7, 0xFFFFFF00))
    assert is_closed(sock)


def test_option_with_lying_length_times_out(server: ServerThread, sock: socket.socket) -> None:
    recv_exactly(sock, 18)
    # Claims 1000 bytes, sends 10, then waits: the handshake time limit ends it.
    sock.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 7, 1000))
    sock.sendall(b"x" * 10)
    server.advance(61)  # (the server's clock: no waiting, whatever the host's speed)
    assert is_closed(sock)


def test_bad_option_magic_closes(sock: socket.socket) -> None:
    recv_exactly(sock, 18)
    sock.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x1122334455667788, 3, 0))
    assert is_closed(sock)


def test_garbage_options_are_refused_politely(sock: socket.socket) -> None:
    recv_exactly(sock, 18)
    sock.sendall(struct.pack(">I", 3))
    sock.sendall(raw_option(7, b"\xff" * 9))  # GO with a name length past the end
    assert read_option_reply(sock)[1] == 0x80000003  # ERR_INVALID
    sock.sendall(raw_option(1234))
    assert read_option_reply(sock)[1] == 0x80000001  # ERR_UNSUP
    sock.sendall(raw_option(3))  # LIST still works
    replies = [read_option_reply(sock)[1] for _ in range(4)]
    assert replies == [2, 2, 2, 1]


def test_request_out_of_range_is_einval_and_the_connection_lives(sock: socket.socket) -> None:
    size, _ = raw_go(sock)
    assert size == 1 << 20
    sock.sendall(raw_request(Cmd.READ, 1 << 20, 512, cookie=1))
    assert read_simple_reply(sock) == (Err.EINVAL, 1)
    sock.sendall(raw_request(Cmd.READ, 0, 4, cookie=2))
    assert read_simple_reply(sock) == (0, 2)
    assert recv_exactly(sock, 4) == bytes(4)


def test_unaligned_request_is_einval(sock: socket.socket) -> None:
    raw_go(sock, "aligned")
    sock.sendall(raw_request(Cmd.READ, 1, 512, cookie=1))
    assert read_simple_reply(sock) == (Err.EINVAL, 1)
    sock.sendall(raw_request(Cmd.WRITE, 512, 100, cookie=2) + b"u" * 100)
    assert read_simple_reply(sock) == (Err.EINVAL, 2)
    sock.sendall(raw_request(Cmd.READ, 512, 512, cookie=3))
    assert read_simple_reply(sock) == (0, 3)
    assert recv_exactly(sock, 512) == bytes(512)  # the refused write changed nothing


def test_unknown_command_is_einval(sock: socket.socket) -> None:
    raw_go(sock)
    sock.sendall(raw_request(42, 0, 512, cookie=1))
    assert read_simple_reply(sock) == (Err.EINVAL, 1)
    sock.sendall(raw_request(Cmd.READ, 0, 512, flags=0x4000, cookie=2))
    assert read_simple_reply(sock) == (Err.EINVAL, 2)
    sock.sendall(raw_request(Cmd.FLUSH, 0, 0, cookie=3))
    assert read_simple_reply(sock) == (0, 3)


def test_write_to_read_only_is_eperm_and_data_unchanged(server: ServerThread) -> None:
    backend = server.server.exports["ro"].backend
    assert isinstance(backend, MemoryBackend)
    backend.pwrite(memoryview(b"original"), 0, False)
    s = socket.socket(socket.AF_UNIX)
    with s:
        s.settimeout(10)
        s.connect(server.path)
        raw_go(s, "ro")
        s.sendall(raw_request(Cmd.WRITE, 0, 8, cookie=1) + b"CHANGED!")
        assert read_simple_reply(s) == (Err.EPERM, 1)
        for cmd in (Cmd.TRIM, Cmd.WRITE_ZEROES):
            s.sendall(raw_request(cmd, 0, 8, cookie=2))
            assert read_simple_reply(s) == (Err.EPERM, 2)
        s.sendall(raw_request(Cmd.READ, 0, 8, cookie=3))
        assert read_simple_reply(s) == (0, 3)
        assert recv_exactly(s, 8) == b"original"
    with Client(server.uri_for("ro")) as c:
        assert c.pread(8, 0) == b"original"


def test_bad_request_magic_closes(sock: socket.socket) -> None:
    raw_go(sock)
    sock.sendall(struct.pack(">IHHQQI", 0xDEADBEEF, 0, 0, 1, 0, 512))
    assert is_closed(sock)


def test_huge_write_payload_closes(sock: socket.socket) -> None:
    raw_go(sock)
    sock.sendall(raw_request(Cmd.WRITE, 0, 0xFFFFFFFF, cookie=1))
    assert is_closed(sock)


def test_structured_read_error_is_a_chunk(sock: socket.socket) -> None:
    raw_go(sock, structured=True)
    sock.sendall(raw_request(Cmd.READ, 1 << 30, 512, cookie=5))
    magic, flags, kind, cookie, length = struct.unpack(">IHHQI", recv_exactly(sock, 20))
    assert (magic, flags, kind, cookie) == (0x668E33EF, 1, 0x8001, 5)
    error, mlen = struct.unpack(">IH", recv_exactly(sock, 6))
    assert error == Err.EINVAL and mlen == length - 6
    assert b"beyond" in recv_exactly(sock, mlen)


def test_disc_closes_after_replies(sock: socket.socket) -> None:
    raw_go(sock)
    sock.sendall(
        raw_request(Cmd.READ, 0, 16, cookie=1)
        + raw_request(Cmd.DISC, 0, 0, cookie=2)
        + b"ignored trailing junk"
    )
    assert read_simple_reply(sock) == (0, 1)
    assert recv_exactly(sock, 16) == bytes(16)
    assert is_closed(sock)


def test_abort_is_acknowledged_then_closed(sock: socket.socket) -> None:
    recv_exactly(sock, 18)
    sock.sendall(struct.pack(">I", 3) + raw_option(2))
    assert read_option_reply(sock)[1] == 1
    assert is_closed(sock)


def test_export_name_unknown_closes(sock: socket.socket) -> None:
    recv_exactly(sock, 18)
    sock.sendall(struct.pack(">I", 3) + raw_option(1, b"nonexistent"))
    assert is_closed(sock)


def test_export_name_with_zeroes(sock: socket.socket) -> None:
    recv_exactly(sock, 18)
    sock.sendall(struct.pack(">I", 1) + raw_option(1, b""))  # no NO_ZEROES
    size, _flags = struct.unpack(">QH", recv_exactly(sock, 10))
    assert size == 1 << 20
    assert recv_exactly(sock, 124) == bytes(124)
    sock.sendall(raw_request(Cmd.READ, 0, 8, cookie=9))
    assert read_simple_reply(sock) == (0, 9)
