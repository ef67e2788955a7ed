"""The asyncio server with our own clients, over unix sockets, TCP and socketpairs."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pynbd.client import AsyncClient, Client, connect_multi
from pynbd.errors import ExportNotFound, OptionError, RequestError, UnsupportedError
from pynbd.proto.constants import BASE_ALLOCATION, Rep, StateFlag
from pynbd.server import (
    AsyncBackend,
    Backend,
    Capabilities,
    Export,
    FileBackend,
    Limits,
    MemoryBackend,
    Server,
    Support,
    serve_socket,
)
from pynbd.server.aio import serve_socket as serve_socket_async

from .helpers import (
    PATIENCE,
    is_closed,
    raw_go,
    raw_option,
    read_option_reply,
    recv_exactly,
    running_server,
)

# Each test runs with connections served from threads, then from the event loop.
pytestmark = pytest.mark.usefixtures("serving_mode")

HOLE = int(StateFlag.HOLE | StateFlag.ZERO)
MODES: dict[str, dict[str, Any]] = {
    "simple": {"structured_replies": False, "extended_headers": False},
    "structured": {"extended_headers": False},
    "extended": {},
}


def exercise(c: Client) -> None:
    """Every command and flag the server advertised, checked by reading back."""
    data = os.urandom(100000)
    c.pwrite(data, 4096)
    assert c.pread(100000, 4096) == data
    c.pwrite(b"F" * 512, 0, fua=True)
    c.flush()
    c.trim(65536, 1 << 20)
    c.zero(4096, 4096, fua=True)
    c.zero(4096, 8192, no_hole=True)
    if c.can_fast_zero():
        c.zero(4096, 12288, fast=True)
    c.cache(65536, 0)
    got = c.pread(20000, 0)
    assert got[:512] == b"F" * 512
    assert got[4096:16384] == bytes(12288)
    assert got[16384:20000] == data[12288:15904]
    if c.structured_replies:
        assert c.pread(4096, 4096, df=True) == bytes(4096)
        extents = c.block_status(c.size, 0)
        assert sum(e.length for e in extents) == c.size
    buf = bytearray(512)
    c.pread_into(buf, 0)
    assert buf == b"F" * 512


@pytest.mark.parametrize("mode", list(MODES))
def test_every_command_on_memory(mode: str) -> None:
    with running_server(MemoryBackend(8 << 20)) as srv, Client(srv.uri, **MODES[mode]) as c:
        assert c.structured_replies is (mode != "simple")
        assert c.extended_headers is (mode == "extended")
        for name in ("flush", "fua", "trim", "zero", "fast_zero", "cache", "multi_conn"):
            assert getattr(c, f"can_{name}")(), name
        exercise(c)


@pytest.mark.parametrize("mode", list(MODES))
def test_every_command_on_a_file(mode: str, tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(8 << 20)
    with (
        FileBackend(path) as backend,
        running_server(backend) as srv,
        Client(srv.uri, **MODES[mode]) as c,
    ):
        exercise(c)
        c.pwrite(b"persisted", 7 << 20)
    assert path.read_bytes()[7 << 20 : (7 << 20) + 9] == b"persisted"


def test_block_status_on_sparse_memory() -> None:
    mem = MemoryBackend(1 << 40)
    with running_server(mem) as srv, Client(srv.uri) as c:
        assert c.size == 1 << 40
        c.pwrite(b"x" * 100, 1 << 30)
        c.pwrite(b"y" * 65536, 3 << 30)
        extents = c.block_status(4 << 30, 0)
        data = [(e.offset, e.length) for e in extents if e.flags == 0]
        assert data == [(1 << 30, 65536), (3 << 30, 65536)]
        assert all(e.flags == HOLE for e in extents if e.flags)
        assert sum(e.length for e in extents) == 4 << 30
        one = c.block_status(1 << 30, 0, req_one=True)
        assert [(e.offset, e.length, e.flags) for e in one] == [(0, 1 << 30, HOLE)]
        c.zero(65536, 3 << 30)
        assert c.block_status(65536, 3 << 30)[0].flags == HOLE
    assert mem.allocated == 65536


def test_big_requests_at_the_maximum_payload() -> None:
    with running_server(MemoryBackend(64 << 20)) as srv, Client(srv.uri) as c:
        data = os.urandom(32 << 20)
        c.pwrite(data, 1 << 20)  # exactly the maximum payload
        assert c.pread(32 << 20, 1 << 20) == data
        assert c.pread(40 << 20, 0)[1 << 20 : 33 << 20] == data  # split by the client


def test_named_exports_list_and_default() -> None:
    exports = {
        "a": Export(MemoryBackend(1 << 20), "first disk"),
        "b": Export(MemoryBackend(2 << 20), read_only=True),
    }
    with running_server(exports, default_export="b") as srv:
        result = Client.negotiate(srv.uri)
        assert result.exports is not None
        assert [(e.name, e.description) for e in result.exports] == [("a", "first disk"), ("b", "")]
        assert result.available_meta_contexts == (BASE_ALLOCATION,)
        with Client(srv.uri_for("a")) as c:
            assert c.size == 1 << 20 and not c.is_read_only()
            assert c.negotiated.description == "first disk"
        with Client(srv.uri) as c:  # the default export is "b"
            assert c.size == 2 << 20 and c.is_read_only()
            assert c.negotiated.canonical_name == "b"
            assert not c.can_trim() and not c.can_zero() and not c.can_fua()
            with pytest.raises(UnsupportedError):
                c.pwrite(b"no", 0)
        with pytest.raises(ExportNotFound):
            Client(srv.uri_for("nope"))


def test_list_can_be_refused() -> None:
    with running_server(MemoryBackend(4096), allow_list=False) as srv:
        assert Client.negotiate(srv.uri, list_meta_contexts=False).exports is None


def test_multi_conn() -> None:
    mem = MemoryBackend(1 << 20)
    with running_server({"m": mem, "single": Export(mem, multi_conn=False)}) as srv:
        clients = connect_multi(srv.uri_for("m"), 3)
        try:
            clients[0].pwrite(b"shared", 0)
            clients[0].flush()
            assert all(c.pread(6, 0) == b"shared" for c in clients)
        finally:
            for c in clients:
                c.close()
        with pytest.raises(UnsupportedError):
            connect_multi(srv.uri_for("single"), 2)


def test_async_client_pipelines(sock_path: str) -> None:
    async def main() -> None:
        server = Server(MemoryBackend(16 << 20))
        path = sock_path
        async with server:
            await server.start(unix=path)
            async with await AsyncClient.connect(path=path) as c:
                await asyncio.gather(*(c.pwrite(bytes([i]) * 65536, i << 16) for i in range(64)))
                reads = await asyncio.gather(*(c.pread(65536, i << 16) for i in range(64)))
                assert all(r == bytes([i]) * 65536 for i, r in enumerate(reads))

    asyncio.run(main())


@pytest.fixture
def sock_path() -> Iterator[str]:
    """A unix socket path in a short private directory, removed afterwards."""
    tmp = tempfile.mkdtemp(prefix="pynbd-test-")
    try:
        yield os.path.join(tmp, "s.sock")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_tcp_listener_on_a_free_port() -> None:
    async def main() -> None:
        async with Server(MemoryBackend(1 << 20)) as server:
            await server.start(tcp=("127.0.0.1", 0))
            host, port = server.addresses[0][:2]
            c = await AsyncClient.connect(host=host, port=port)
            await c.pwrite(b"tcp", 0)
            assert await c.pread(3, 0) == b"tcp"
            await c.close()

    asyncio.run(main())


def test_serve_socket_on_a_socketpair_async() -> None:
    async def main() -> None:
        ours, theirs = socket.socketpair()
        mem = MemoryBackend(1 << 20)
        task = asyncio.create_task(serve_socket_async(ours, mem))
        c = await AsyncClient.connect(sock=theirs)
        await c.pwrite(b"pair", 100)
        assert await c.pread(4, 100) == b"pair"
        await c.close()
        await asyncio.wait_for(task, 5)  # returns once the client disconnected

    asyncio.run(main())


def test_blocking_serve_socket_in_a_thread() -> None:
    ours, theirs = socket.socketpair()
    mem = MemoryBackend(1 << 20)
    thread = threading.Thread(target=serve_socket, args=(ours, mem), daemon=True)
    thread.start()
    try:
        with Client(sock=theirs, timeout=5) as c:
            c.pwrite(b"kernel-style", 0)
            assert c.pread(12, 0) == b"kernel-style"
    finally:
        theirs.close()
        thread.join(10)
    assert not thread.is_alive()
    assert ours.fileno() == -1  # the server closed its end


class Gate(AsyncBackend):
    """An async backend whose reads wait for a gate to open."""

    capabilities = Capabilities(can_flush=True)

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.gate = asyncio.Event()

    @property
    def size(self) -> int:
        return 1 << 20

    async def pread_into(self, buf: memoryview, offset: int) -> None:
        self.started.set()
        await self.gate.wait()
        buf[:] = b"g" * len(buf)

    async def flush(self) -> None:
        pass


def test_shutdown_finishes_in_flight_requests(sock_path: str) -> None:
    async def main() -> None:
        backend = Gate()
        server = Server(backend)
        path = sock_path
        await server.start(unix=path)
        c = await AsyncClient.connect(path=path)
        read = asyncio.create_task(c.pread(4096, 0))
        await backend.started.wait()
        closing = asyncio.create_task(server.close(grace=10))
        await asyncio.sleep(0.1)
        assert not closing.done()  # waiting for the in-flight read
        backend.gate.set()
        assert await read == b"g" * 4096
        await asyncio.wait_for(closing, 5)
        assert not os.path.exists(path)
        await c.close()

    asyncio.run(main())


def test_shutdown_aborts_after_grace(sock_path: str) -> None:
    async def main() -> None:
        backend = Gate()
        server = Server(backend)
        path = sock_path
        await server.start(unix=path)
        c = await AsyncClient.connect(path=path, timeout=5)
        read = asyncio.create_task(c.pread(4096, 0))
        await backend.started.wait()
        await server.close(grace=0.2)  # returns, though the read never will
        assert not server.sessions
        with pytest.raises(Exception):  # noqa: B017 - connection lost, as documented
            await read
        await c.close()

    asyncio.run(main())


def test_handshake_timeout() -> None:
    # The server's clock is moved past the limit: no test waits for it, and however
    # slow the host, a client is never late by the clock.
    limits = Limits(handshake_timeout=60)
    with running_server(MemoryBackend(4096), limits=limits) as srv:
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(srv.path)
        with sock:
            recv_exactly(sock, 18)
            srv.advance(59)
            sock.sendall(struct.pack(">I", 3) + raw_option(3))  # LIST, still in time
            assert read_option_reply(sock)[:2] == (3, Rep.SERVER)
            srv.advance(2)
            assert is_closed(sock)
        # A client that finished in time is not affected afterwards.
        with Client(srv.uri) as c:
            srv.advance(3600)
            assert c.pread(10, 0) == bytes(10)


class Failing(Backend):
    """A backend whose writes fail with a chosen exception."""

    capabilities = Capabilities(can_zero=Support.NONE)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    @property
    def size(self) -> int:
        return 1 << 20

    def pread_into(self, buf: memoryview, offset: int) -> None:
        buf[:] = bytes(len(buf))

    def pwrite(self, buf: memoryview, offset: int, fua: bool) -> None:
        raise self.exc


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (OSError(errno.EDQUOT, "quota"), errno.ENOSPC),
        (OSError(errno.EROFS, "ro"), errno.EPERM),
        (OSError(errno.ENOENT, "gone"), errno.EIO),
        (KeyError("bug"), errno.EIO),
    ],
)
@pytest.mark.parametrize("mode", ["simple", "extended"])
def test_backend_errors_reach_the_client(exc: BaseException, expected: int, mode: str) -> None:
    with running_server(Failing(exc)) as srv, Client(srv.uri, **MODES[mode]) as c:
        with pytest.raises(RequestError) as info:
            c.pwrite(b"x" * 512, 0)
        assert info.value.errno == expected
        assert c.pread(512, 0) == bytes(512)  # the connection lives on


class Counting(Backend):
    """A blocking backend that records how many calls overlap. A thread-safe one's
    first call waits for a second to join it (however long the host takes to start
    one), so a server that serialised them would be caught."""

    def __init__(self, thread_safe: bool) -> None:
        self.capabilities = Capabilities(thread_safe=thread_safe)
        self.active = 0
        self.peak = 0
        self.cond = threading.Condition()

    @property
    def size(self) -> int:
        return 1 << 20

    def pread_into(self, buf: memoryview, offset: int) -> None:
        with self.cond:
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.cond.notify_all()
            if self.capabilities.thread_safe:
                self.cond.wait_for(lambda: self.peak > 1, timeout=PATIENCE)
        time.sleep(0.01)  # (one at a time: a chance for calls to overlap, were they let)
        buf[:] = bytes(len(buf))
        with self.cond:
            self.active -= 1


@pytest.mark.parametrize("thread_safe", [False, True])
def test_blocking_backends_run_in_threads(thread_safe: bool, sock_path: str) -> None:
    backend = Counting(thread_safe)

    async def main() -> None:
        async with Server(backend, limits=Limits(threads=8)) as server:
            path = sock_path
            await server.start(unix=path)
            # Two connections: one at a time means across connections too.
            clients = [await AsyncClient.connect(path=path) for _ in range(2)]
            await asyncio.gather(*(c.pread(512, i * 512) for c in clients for i in range(8)))
            for c in clients:
                await c.close()

    asyncio.run(main())
    if thread_safe:
        assert backend.peak > 1
    else:
        assert backend.peak == 1


def test_half_closed_client_still_gets_replies() -> None:
    with running_server(MemoryBackend(1 << 20)) as srv:
        sock = socket.socket(socket.AF_UNIX)
        with sock:
            sock.connect(srv.path)
            raw_go(sock)
            sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 77, 0, 16))
            sock.shutdown(socket.SHUT_WR)
            magic, error, cookie = struct.unpack(">IIQ", recv_exactly(sock, 16))
            assert (magic, error, cookie) == (0x67446698, 0, 77)
            assert recv_exactly(sock, 16) == bytes(16)
            assert is_closed(sock)


def test_server_refuses_bad_configuration() -> None:
    with pytest.raises(ValueError):
        Server({"x" * 5000: MemoryBackend(1)})
    with pytest.raises(ValueError):
        Server({"a": MemoryBackend(1)}, default_export="b")


def test_unknown_default_export_refused_by_go() -> None:
    with running_server({"a": MemoryBackend(1)}) as srv, pytest.raises(OptionError):
        Client(srv.uri)
