"""The server's policy: the plan it draws for a connection from what the backend
declares (every combination), which requests run inline, and a zero-copy backend
that is not the memory backend, served end to end."""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Sequence

import pytest

from pynbd.client import Client
from pynbd.proto.constants import Cmd, CmdFlag
from pynbd.proto.server import RequestReceived
from pynbd.server import (
    Backend,
    Blocking,
    Capabilities,
    FileBackend,
    Limits,
    MemoryBackend,
)
from pynbd.server.policy import Plan, plan

from .helpers import AsyncZeroes, Zeroes, running_server

KiB = 1024


@pytest.mark.parametrize(
    ("thread_safe", "blocking", "zero_copy", "plain", "threads"),
    list(
        itertools.product(
            [True, False], list(Blocking), [True, False], [True, False], [True, False]
        )
    ),
)
def test_the_plan_for_every_blocking_backend(
    thread_safe: bool, blocking: Blocking, zero_copy: bool, plain: bool, threads: bool
) -> None:
    caps = Capabilities(thread_safe=thread_safe, blocking=blocking, zero_copy=zero_copy)
    limits = Limits(connection_threads=threads, inline_max=123)
    got = plan(Zeroes(caps), limits, plain=plain)
    never = blocking is Blocking.NEVER
    assert got == Plan(
        # A thread of its own: plain, thread-safe, and not turned off.
        threaded=plain and thread_safe and threads,
        awaited=False,
        inline=never,
        # The server's threshold, for cached reads and writes that may overlap.
        inline_max=123 if blocking is Blocking.CACHED and thread_safe else 0,
        # Views are taken inline: never beside a call in the executor of a backend
        # that takes one call at a time; and never under TLS.
        zero_copy=zero_copy and plain and (thread_safe or never),
    )
    assert got.offloads is not never


@pytest.mark.parametrize("plain", [True, False])
def test_the_plan_for_an_async_backend(plain: bool) -> None:
    got = plan(AsyncZeroes(), Limits(), plain=plain)
    assert got == Plan(awaited=True)
    assert not got.offloads


def test_the_plans_of_the_backends_here(tmp_path: os.PathLike[str]) -> None:
    limits = Limits()
    memory = plan(MemoryBackend(1 << 20), limits, plain=True)
    assert memory == Plan(threaded=True, inline=True, zero_copy=True)
    path = os.path.join(tmp_path, "disk")
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    with FileBackend(path) as file:
        assert plan(file, limits, plain=True) == Plan(threaded=True, inline_max=limits.inline_max)

    class Changed(MemoryBackend):  # sees every read: not zero-copy
        def pread_into(self, buf: memoryview, offset: int) -> None:
            super().pread_into(buf, offset)

    assert plan(Changed(1 << 20), limits, plain=True) == Plan(threaded=True, inline=True)


def req(command: Cmd, length: int, flags: int = 0) -> RequestReceived:
    return RequestReceived(1, command, CmdFlag(flags), 0, length)


def test_which_requests_run_inline() -> None:
    small = Plan(inline_max=64 * KiB)
    assert small.runs_inline(req(Cmd.READ, 64 * KiB))
    assert not small.runs_inline(req(Cmd.READ, 64 * KiB + 1))
    assert small.runs_inline(req(Cmd.WRITE, 4 * KiB))
    assert not small.runs_inline(req(Cmd.WRITE, 4 * KiB, CmdFlag.FUA))  # waits for the disk
    for command in (Cmd.FLUSH, Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.CACHE, Cmd.BLOCK_STATUS):
        assert not small.runs_inline(req(command, 4 * KiB))
    assert not Plan().runs_inline(req(Cmd.READ, 1))
    every = Plan(inline=True)
    assert every.runs_inline(req(Cmd.FLUSH, 0))
    assert every.runs_inline(req(Cmd.WRITE, 1 << 30, CmdFlag.FUA))


class Lender(Backend):
    """A zero-copy backend of its own: a bytearray whose views it lends, and which
    receives writes of whole 4 KiB blocks into new blocks it adopts."""

    capabilities = Capabilities(minimum_block=4096, blocking=Blocking.NEVER, zero_copy=True)

    def __init__(self, size: int) -> None:
        self.blocks = [memoryview(bytearray(4096)) for _ in range(size // 4096)]
        self.lock = threading.Lock()
        self.lent = 0
        self.views = self.copies = self.adopted = self.written = 0

    @property
    def size(self) -> int:
        return len(self.blocks) * 4096

    def pread_into(self, buf: memoryview, offset: int) -> None:
        self.copies += 1
        for i in range(0, len(buf), 4096):
            buf[i : i + 4096] = self.blocks[(offset + i) // 4096]

    def pwrite(self, buf: memoryview, offset: int, fua: bool) -> None:
        self.written += 1
        for i in range(0, len(buf), 4096):
            self.blocks[(offset + i) // 4096][:] = buf[i : i + 4096]

    def pread_views(self, length: int, offset: int) -> list[memoryview]:
        with self.lock:
            self.views += 1
            self.lent += 1
            return self.blocks[offset // 4096 : (offset + length) // 4096]

    def return_views(self, count: int = 1) -> None:
        with self.lock:
            self.lent -= count

    def receive_pages(self, length: int, offset: int) -> Sequence[memoryview] | None:
        return [memoryview(bytearray(4096)) for _ in range(length // 4096)]

    def adopt_pages(self, pages: Sequence[memoryview], offset: int) -> None:
        with self.lock:
            self.adopted += 1
            self.blocks[offset // 4096 : offset // 4096 + len(pages)] = pages


@pytest.mark.parametrize("threads", [True, False])
def test_a_zero_copy_backend_of_ones_own(threads: bool) -> None:
    backend = Lender(1 << 20)
    data = os.urandom(64 * KiB)
    limits = Limits(connection_threads=threads)
    with running_server(backend, limits=limits) as srv, Client(srv.uri) as c:
        c.pwrite(data, 8 * KiB)
        assert c.pread(len(data), 8 * KiB) == data
        assert c.pread(4 * KiB, 0) == bytes(4 * KiB)
        c.zero(8 * KiB, 8 * KiB)  # emulated: written with pwrite
        assert c.pread(16 * KiB, 4 * KiB) == bytes(12 * KiB) + data[8 * KiB : 12 * KiB]
    assert (backend.adopted, backend.views, backend.copies) == (1, 3, 0)
    assert backend.written >= 1
    assert backend.lent == 0  # every view given back
