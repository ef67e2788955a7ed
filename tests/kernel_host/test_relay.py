"""The TLS relay (pynbd.kernel.relay) without a kernel: the test plays the driver on the
kernel's end of the socketpair, speaking simple-reply NBD requests by hand, against
pynbd's TLS server in a thread and against nbdkit.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pynbd.errors import ConnectionClosed, InvalidRequest, TLSError
from pynbd.kernel.relay import TLSRelay
from pynbd.server import MemoryBackend, ServerTLSConfig
from tests.peers import Server, make_x509_dir
from tests.server.helpers import ServerThread, running_server

SIZE = 16 << 20
_REQ = struct.Struct(">IHHQQI")
_REPLY = struct.Struct(">IIQ")
REQUEST_MAGIC = 0x25609513
REPLY_MAGIC = 0x67446698
READ, WRITE, DISC, FLUSH = 0, 1, 2, 3
# Seconds to wait for what must happen (a hang guard, not a verdict on speed).
WAIT = 30.0


@pytest.fixture(scope="module")
def x509(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_x509_dir(tmp_path_factory.mktemp("relay"))


@pytest.fixture
def tls_server(x509: Path) -> Iterator[ServerThread]:
    with running_server(MemoryBackend(SIZE), tls=ServerTLSConfig(certificates=str(x509))) as s:
        yield s


def _uri(srv: ServerThread, x509: Path) -> str:
    return f"nbds+unix:///?socket={srv.path}&tls-certificates={x509}"


# --------------------------------------------------------------------------- the "kernel"


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    pos = 0
    while pos < n:
        got = sock.recv_into(view[pos:])
        if not got:
            raise EOFError(f"closed after {pos} of {n} bytes")
        pos += got
    return bytes(buf)


def _request(sock: socket.socket, cmd: int, cookie: int, offset: int, length: int) -> bytes:
    return _REQ.pack(REQUEST_MAGIC, 0, cmd, cookie, offset, length)


def _reply(sock: socket.socket, cookie: int, data_length: int = 0) -> bytes:
    magic, error, got = _REPLY.unpack(_recv_exactly(sock, _REPLY.size))
    assert (magic, error, got) == (REPLY_MAGIC, 0, cookie)
    return _recv_exactly(sock, data_length) if data_length else b""


def _write(sock: socket.socket, offset: int, data: bytes, cookie: int = 1) -> None:
    sock.sendall(_request(sock, WRITE, cookie, offset, len(data)) + data)
    _reply(sock, cookie)


def _read(sock: socket.socket, offset: int, length: int, cookie: int = 2) -> bytes:
    sock.sendall(_request(sock, READ, cookie, offset, length))
    return _reply(sock, cookie, length)


def _eof_within(sock: socket.socket, timeout: float = WAIT) -> bool:
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
        return True
    except (TimeoutError, BlockingIOError):
        return False
    except OSError:
        return True


def _wait(cond: Callable[[], bool], timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# --------------------------------------------------------------------------- pumping


def test_relay_moves_big_writes_and_reads(tls_server: ServerThread, x509: Path) -> None:
    with TLSRelay(_uri(tls_server, x509)) as relay:
        sock, negotiated = relay.dial()
        with sock:
            assert negotiated.size == SIZE
            assert negotiated.tls and not negotiated.structured_replies
            data = os.urandom(4 << 20)
            for i in range(4):
                _write(sock, i << 20, data[i << 20 : (i + 1) << 20], cookie=i)
            assert _read(sock, 0, 4 << 20) == data
            assert relay.active == 1
    assert relay.active == 0


def test_pipelined_requests_with_a_slow_reader(tls_server: ServerThread, x509: Path) -> None:
    """Many reads sent before any reply is read: the relay's buffers fill, the pump
    stops reading TLS until the 'kernel' reads, and nothing is lost."""
    with TLSRelay(_uri(tls_server, x509), buffer_size=64 * 1024) as relay:
        sock = relay.opener()
        with sock:
            data = os.urandom(SIZE)
            _write(sock, 0, data[: 8 << 20])
            _write(sock, 8 << 20, data[8 << 20 :])
            n = 32
            chunk = SIZE // n
            sock.sendall(b"".join(_request(sock, READ, c, c * chunk, chunk) for c in range(n)))
            time.sleep(0.3)  # let the server answer into full buffers
            got = b"".join(_reply(sock, c, chunk) for c in range(n))
            assert got == data


def test_four_connections_in_parallel(tls_server: ServerThread, x509: Path) -> None:
    with TLSRelay(_uri(tls_server, x509)) as relay:
        socks = [relay.opener() for _ in range(4)]
        errors: list[BaseException] = []

        def work(i: int, sock: socket.socket) -> None:
            try:
                blob = bytes([i]) * (1 << 20)
                for k in range(3):
                    _write(sock, (i * 3 + k) << 20, blob, cookie=k)
                assert _read(sock, i * 3 << 20, 1 << 20) == blob
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i, s)) for i, s in enumerate(socks)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        assert relay.active == 4
        assert len({t.name for t in relay.threads()}) == 4
        for s in socks:
            s.close()
        assert _wait(lambda: relay.active == 0)


# --------------------------------------------------------------------------- shutdown


def test_kernel_close_reaches_the_server(tls_server: ServerThread, x509: Path) -> None:
    relay = TLSRelay(_uri(tls_server, x509))
    try:
        sock = relay.opener()
        assert _wait(lambda: len(tls_server.call(lambda: tls_server.server.sessions)) == 1)
        sock.sendall(_request(sock, DISC, 9, 0, 0))
        sock.close()
        assert _wait(lambda: relay.active == 0)
        # The server saw its client leave: its session is gone.
        assert _wait(lambda: not tls_server.call(lambda: tls_server.server.sessions))
    finally:
        relay.close()


def test_server_close_reaches_the_kernel(x509: Path) -> None:
    with running_server(MemoryBackend(SIZE), tls=ServerTLSConfig(certificates=str(x509))) as srv:
        relay = TLSRelay(_uri(srv, x509))
        sock = relay.opener()
        _write(sock, 0, b"x" * 4096)
    # Leaving the block closed the server and its connections.
    try:
        assert _eof_within(sock), "the kernel's end never saw the server leave"
        assert _wait(lambda: relay.active == 0)
    finally:
        sock.close()
        relay.close()


def test_close_stops_live_pumps(tls_server: ServerThread, x509: Path) -> None:
    relay = TLSRelay(_uri(tls_server, x509))
    socks = [relay.opener() for _ in range(2)]
    try:
        threads = relay.threads()
        assert len(threads) == 2
        relay.close(timeout=WAIT)
        assert not any(t.is_alive() for t in threads)
        for s in socks:
            assert _eof_within(s)
        with pytest.raises(ValueError):
            relay.dial()
    finally:
        for s in socks:
            s.close()


def test_no_thread_left_after_many_dials(tls_server: ServerThread, x509: Path) -> None:
    before = threading.active_count()
    with TLSRelay(_uri(tls_server, x509)) as relay:
        for i in range(10):
            with relay.opener() as sock:
                _write(sock, 0, bytes([i]) * 512)
        assert _wait(lambda: relay.active == 0)
    assert _wait(lambda: threading.active_count() <= before)


# --------------------------------------------------------------------------- errors


def test_plain_uri_is_refused() -> None:
    with pytest.raises(InvalidRequest):
        TLSRelay("nbd://localhost/x")


def test_untrusted_server_fails_the_dial(tls_server: ServerThread, tmp_path: Path) -> None:
    other = make_x509_dir(tmp_path, "other-ca")
    relay = TLSRelay(_uri(tls_server, other))
    with pytest.raises(TLSError):
        relay.dial()
    assert relay.active == 0


def test_no_server(tmp_path: Path, x509: Path) -> None:
    relay = TLSRelay(f"nbds+unix:///?socket={tmp_path}/none.sock&tls-certificates={x509}")
    with pytest.raises(ConnectionClosed):
        relay.dial()


def test_nbdkit_over_tcp(nbdkit: Callable[..., Server]) -> None:
    server = nbdkit("memory", str(SIZE), tcp=True, tls="x509")
    with TLSRelay(server.uri) as relay:
        sock, negotiated = relay.dial()
        with sock:
            assert negotiated.size == SIZE
            data = os.urandom(1 << 20)
            _write(sock, 4096, data)
            assert _read(sock, 4096, len(data)) == data
            sock.sendall(_request(sock, FLUSH, 3, 0, 0))
            _reply(sock, 3)
            sock.sendall(_request(sock, DISC, 4, 0, 0))
            assert _eof_within(sock)
        assert _wait(lambda: relay.active == 0)
