"""Test helpers: in-memory client/server pairs over the sans-IO cores, a real server
in a background thread, and raw-socket helpers."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pynbd.proto.constants import Cmd
from pynbd.proto.handshake import ClientHandshake, HandshakeConfig, HandshakeDone, Negotiated
from pynbd.proto.server import (
    NEED_DATA,
    Disconnect,
    ExportSpec,
    RequestReceived,
    ServerConfig,
    ServerConnection,
    TransmissionStarted,
)
from pynbd.proto.transmission import ClientTransmission, Reply
from pynbd.server import AsyncBackend, Backend, Capabilities
from pynbd.server.aio import Exports, Limits, Server


def full_spec(name: str = "disk", size: int = 1 << 20, **kwargs: Any) -> ExportSpec:
    """An export that advertises every optional command."""
    options: dict[str, Any] = {
        "can_flush": True,
        "can_fua": True,
        "can_trim": True,
        "can_zero": True,
        "can_fast_zero": True,
        "can_cache": True,
        "can_multi_conn": True,
    }
    options.update(kwargs)
    return ExportSpec(name, size, **options)


@dataclass
class Store:
    """A trivial in-memory backend for core tests."""

    data: bytearray
    log: list[RequestReceived] = field(default_factory=list)

    def serve(self, server: ServerConnection) -> list[object]:
        """Answer every pending request; returns the non-request events."""
        other: list[object] = []
        while (event := server.next_event()) is not NEED_DATA:
            if not isinstance(event, RequestReceived):
                other.append(event)
                continue
            self.log.append(event)
            cmd, off, n = event.command, event.offset, event.length
            if cmd is Cmd.READ:
                server.reply_read(event, self.data[off : off + n])
            elif cmd is Cmd.WRITE:
                assert event.payload is not None
                self.data[off : off + n] = event.payload
                server.reply_ok(event)
            elif cmd in (Cmd.TRIM, Cmd.WRITE_ZEROES):
                self.data[off : off + n] = bytes(n)
                server.reply_ok(event)
            elif cmd is Cmd.BLOCK_STATUS:
                server.reply_block_status(event, {c: [(n, 0)] for c in event.contexts})
            else:
                server.reply_ok(event)
        return other


def handshake(
    server: ServerConnection, config: HandshakeConfig, *, bytewise: bool = False
) -> Negotiated:
    """Run a client handshake against ``server`` in memory; returns the client's result."""
    client = ClientHandshake(config)
    while True:
        event = client.next_event()
        out = client.data_to_send()
        if out:
            if bytewise:
                for i in range(len(out)):
                    server.receive_data(out[i : i + 1])
            else:
                server.receive_data(out)
        sev = server.next_event()
        assert sev is NEED_DATA or isinstance(sev, (TransmissionStarted, Disconnect)), sev
        reply = server.data_to_send()
        if isinstance(event, HandshakeDone):
            # Nothing may follow GO's ACK; after ABORT the server's ACK is a courtesy.
            assert not reply or isinstance(sev, Disconnect)
            return event.result
        if bytewise:
            for i in range(len(reply)):
                client.receive_data(reply[i : i + 1])
        elif reply:
            client.receive_data(reply)


class Pair:
    """A client transmission core wired to a server connection and a :class:`Store`."""

    def __init__(
        self,
        spec: ExportSpec | None = None,
        config: HandshakeConfig | None = None,
        *,
        server_config: ServerConfig | None = None,
    ) -> None:
        spec = spec or full_spec()
        self.server = ServerConnection(
            server_config or ServerConfig({spec.name: spec}, default_export=spec.name)
        )
        self.negotiated = handshake(self.server, config or HandshakeConfig())
        self.client = ClientTransmission(self.negotiated)
        self.store = Store(bytearray(spec.size))

    def run(self) -> list[Reply]:
        """Move the client's requests to the server, serve them, return the replies."""
        data = self.client.data_to_send()
        if data:
            self.server.receive_data(data)
        self.store.serve(self.server)
        reply = self.server.data_to_send()
        if reply:
            self.client.receive_data(reply)
        replies = []
        while (r := self.client.next_event()) is not None:
            replies.append(r)
        return replies


class Zeroes(Backend):
    """1 MiB of zeroes, read-only in effect, with the capabilities given."""

    def __init__(self, capabilities: Capabilities | None = None) -> None:
        self.capabilities = capabilities or Capabilities()

    @property
    def size(self) -> int:
        return 1 << 20

    def pread_into(self, buf: memoryview, offset: int) -> None:
        buf[:] = bytes(len(buf))


class AsyncZeroes(AsyncBackend):
    """The same, async."""

    @property
    def size(self) -> int:
        return 1 << 20

    async def pread_into(self, buf: memoryview, offset: int) -> None:
        buf[:] = bytes(len(buf))


class Gated(Backend):
    """A blocking backend (every request goes to the pool) whose reads wait for a
    gate; it counts the reads begun."""

    def __init__(self, thread_safe: bool = True) -> None:
        self.capabilities = Capabilities(thread_safe=thread_safe)
        self.gate = threading.Event()
        self.lock = threading.Lock()
        self.started = 0

    @property
    def size(self) -> int:
        return 64 << 20

    def pread_into(self, buf: memoryview, offset: int) -> None:
        with self.lock:
            self.started += 1
        self.gate.wait(30)
        buf[:] = b"g" * len(buf)

    def pwrite(self, buf: memoryview, offset: int, fua: bool) -> None:
        pass


# --- A real server in a background thread -------------------------------------------------


_T = TypeVar("_T")

#: How long a test waits for something that happens at once when the code is right
#: (a hang guard: a slow or loaded host never comes near it).
PATIENCE = 30.0


def wait_until(check: Callable[[], bool], what: str, timeout: float = PATIENCE) -> None:
    """Return once ``check()`` is true; fail, saying ``what`` did not happen, after
    ``timeout`` seconds (a hang guard, not a measure)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} did not happen"
        time.sleep(0.01)


class ClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock a test moves forward (:meth:`advance`): timers come
    due without waiting, however fast or slow the host."""

    def __init__(self) -> None:
        super().__init__()
        self._skew = 0.0

    def time(self) -> float:
        return super().time() + self._skew

    def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` forward (from any thread)."""

        def bump() -> None:
            self._skew += seconds

        self.call_soon_threadsafe(bump)


class ServerThread:
    """An asyncio :class:`Server` running in its own thread and event loop."""

    def __init__(self, server: Server, loop: ClockLoop, path: str) -> None:
        self.server = server
        self.loop = loop
        self.path = path

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.path}"

    def uri_for(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.path}"

    def call(self, func: Callable[[], _T]) -> _T:
        """Run ``func`` in the server's loop and return its result."""

        async def wrapper() -> _T:
            return func()

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(PATIENCE)

    def run(self, coro: Any, timeout: float = PATIENCE) -> Any:
        """Run a coroutine in the server's loop."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def advance(self, seconds: float) -> None:
        """Move the server's clock ``seconds`` forward: its timers due by then fire."""
        self.loop.advance(seconds)
        # Two passes of the loop later: the bump is done, and the timers it made due
        # have run (the call's answer comes a pass after them).
        self.call(lambda: None)


#: How running_server serves plain connections: True, one thread each; False, in the
#: event loop; None, as the test's Limits say (see the serving_mode fixture).
connection_threads: bool | None = None


@contextlib.contextmanager
def running_server(exports: Exports, **options: Any) -> Iterator[ServerThread]:
    """Start a server on a private unix socket; it is closed (and its thread joined)
    on exit, even when the test fails."""
    if connection_threads is not None:
        limits = options.get("limits") or Limits()
        options["limits"] = dataclasses.replace(limits, connection_threads=connection_threads)
    tmp = tempfile.mkdtemp(prefix="pynbd-test-")
    path = os.path.join(tmp, "nbd.sock")
    loop = ClockLoop()
    started = threading.Event()
    holder: dict[str, Any] = {}

    async def main() -> None:
        try:
            server = Server(exports, **options)
            await server.start(unix=path)
        except BaseException as exc:
            holder["error"] = exc
            started.set()
            return
        holder["server"] = server
        started.set()
        await server.serve_forever()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    try:
        started.wait(PATIENCE)
        if "error" in holder:
            raise holder["error"]
        st = ServerThread(holder["server"], loop, path)
        yield st
    finally:
        if "server" in holder and not holder["server"].closing:  # (unless the test did)
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(holder["server"].close(5), loop).result(15)
        thread.join(15)
        if thread.is_alive():  # a hung event loop: say so rather than fail obscurely
            raise AssertionError("the server's event loop did not stop")
        loop.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        with contextlib.suppress(OSError):
            os.rmdir(tmp)


# --- Raw-socket helpers ------------------------------------------------------------------

IHAVEOPT = 0x49484156454F5054


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def is_closed(sock: socket.socket, timeout: float = PATIENCE) -> bool:
    """True when the peer closes the connection within ``timeout`` (data is drained;
    the timeout is a hang guard)."""
    sock.settimeout(timeout)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def raw_option(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, option, len(data)) + data


def read_option_reply(sock: socket.socket) -> tuple[int, int, bytes]:
    magic, option, reply, length = struct.unpack(">QIII", recv_exactly(sock, 20))
    assert magic == 0x3E889045565A9
    return option, reply, recv_exactly(sock, length)


def raw_go(sock: socket.socket, name: str = "", *, structured: bool = False) -> tuple[int, int]:
    """Greeting, client flags, optionally STRUCTURED_REPLY, then GO; returns (size, flags)."""
    greeting = recv_exactly(sock, 18)
    assert greeting[:16] == b"NBDMAGICIHAVEOPT"
    sock.sendall(struct.pack(">I", 3))
    if structured:
        sock.sendall(raw_option(8))
        assert read_option_reply(sock)[1] == 1
    encoded = name.encode()
    sock.sendall(raw_option(7, struct.pack(">I", len(encoded)) + encoded + struct.pack(">H", 0)))
    size = flags = -1
    while True:
        _, reply, data = read_option_reply(sock)
        if reply == 3 and struct.unpack(">H", data[:2])[0] == 0:
            size, flags = struct.unpack(">QH", data[2:])
        elif reply == 1:
            return size, flags
        elif reply != 3:  # other NBD_REP_INFO are fine
            raise AssertionError(f"GO failed with reply {reply:#x}: {data!r}")


@contextlib.contextmanager
def raw_session(srv: ServerThread, *, go: bool = True) -> Iterator[socket.socket]:
    """A raw unix connection to ``srv`` (10 s timeout), closed at the end; with ``go``,
    in transmission already (GO, simple replies)."""
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(10)
    sock.connect(srv.path)
    try:
        if go:
            raw_go(sock)
        yield sock
    finally:
        sock.close()


@contextlib.contextmanager
def unread_reads(srv: ServerThread, count: int, size: int) -> Iterator[socket.socket]:
    """A raw unix connection, with a small receive buffer, that has sent ``count``
    READs of ``size`` bytes (offset ``i * size``, cookie ``i``) and has read none of
    the replies; closed at the end."""
    sock = socket.socket(socket.AF_UNIX)
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.connect(srv.path)
        raw_go(sock)
        sock.sendall(
            b"".join(raw_request(Cmd.READ, i * size, size, cookie=i) for i in range(count))
        )
        yield sock


def raw_request(cmd: int, offset: int, length: int, *, flags: int = 0, cookie: int = 7) -> bytes:
    return struct.pack(">IHHQQI", 0x25609513, flags, cmd, cookie, offset, length)


def read_simple_reply(sock: socket.socket) -> tuple[int, int]:
    magic, error, cookie = struct.unpack(">IIQ", recv_exactly(sock, 16))
    assert magic == 0x67446698, hex(magic)
    return error, cookie
