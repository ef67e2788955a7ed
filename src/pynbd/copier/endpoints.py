"""The two ends of a copy: an NBD export, a file or block device, a stream, ``null:``.

Every end has the same asynchronous calls, each taking the *lane* (the connection) it
runs on, so the engine in :mod:`.engine` treats them alike:

- :class:`NBDEnd`: one :class:`~pynbd.client.AsyncClient` per lane (several only where
  the server allows multi-conn). Zeroes go out as WRITE_ZEROES, with FAST_ZERO while the
  server offers it (a refusal turns it off), or as written zeroes where the server has
  no WRITE_ZEROES.
- :class:`FileEnd`: a regular file or a block device, through
  :class:`~pynbd.server.file.FileBackend` (positional reads and writes, holes punched
  with ``fallocate``, ``SEEK_DATA``/``SEEK_HOLE`` for extents), its calls run in a small
  thread pool so the event loop keeps serving the sockets meanwhile.
- :class:`StreamEnd`: standard input or output (``-``) when it is a pipe, a terminal or
  a socket: read or written in order, never seeked. A ``-`` that is a regular file or
  a block device (``< disk.img``) is a :class:`FileEnd` on that descriptor.
- :class:`NullEnd`: ``null:``, a destination that discards what it is given.

:func:`open_end` turns a command-line word into the right end.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from ..client import AsyncClient, MappedExtent
from ..errors import RequestError, UnsupportedError
from ..proto.constants import BASE_ALLOCATION, StateFlag
from ..transport.tls import TLSConfig
from ..transport.uri import SCHEMES, parse_uri

__all__ = ["End", "FileEnd", "NBDEnd", "NullEnd", "StreamEnd", "is_uri", "open_end"]

T = TypeVar("T")

#: The size of the zero buffer written where an end cannot zero any other way.
ZERO_WRITE = 1 << 20
_ZEROES = memoryview(bytes(ZERO_WRITE))
_HOLE_ZERO = int(StateFlag.HOLE | StateFlag.ZERO)


def is_uri(word: str) -> bool:
    """Whether a command-line word names an NBD server rather than a file."""
    scheme, sep, _ = word.partition("://")
    return bool(sep) and scheme.lower() in SCHEMES


class End:
    """One side of a copy (the base: every call refuses).

    Attributes:
        label: how messages name this end (the URI or the path).
        size: the size in bytes, or None when unknown (a stream, ``null:``).
        lanes: how many lanes (connections) it can serve at once; None for any number.
        stream: written or read strictly in order.
        zero_start: it reads as zeroes before the copy writes anything (a new file,
            ``null:``), so zero ranges need not be written.
        can_extents: :meth:`extents` answers (else everything counts as data).
        grows: as a destination, it takes the source's size (a regular file).
    """

    label: str = ""
    size: int | None = None
    lanes: int | None = None
    stream: bool = False
    zero_start: bool = False
    can_extents: bool = False
    grows: bool = False

    async def set_lanes(self, lanes: int) -> None:
        """Get ready to serve ``lanes`` lanes (open the extra connections)."""

    async def prepare(self, size: int | None, *, keep: bool) -> None:
        """As a destination, get ready to take ``size`` bytes (None: unknown).

        ``keep``: what the destination holds must stay where the copy does not write
        (an incremental copy); else it may be cleared.
        """

    async def finish(self, size: int) -> None:
        """As a destination, after a copy of ``size`` bytes that ended well."""

    async def read(self, lane: int, view: memoryview, offset: int) -> int:
        """Fill ``view`` from ``offset``; returns the bytes read (short only at the
        end of a stream)."""
        raise UnsupportedError(f"{self.label} cannot be read")

    async def write(self, lane: int, view: memoryview, offset: int) -> None:
        """Write ``view`` at ``offset``."""
        raise UnsupportedError(f"{self.label} cannot be written")

    async def zero(self, lane: int, length: int, offset: int, *, allocated: bool) -> None:
        """Make [offset, offset+length) read as zeroes; ``allocated``: no hole."""
        raise UnsupportedError(f"{self.label} cannot be written")

    async def extents(
        self, length: int, offset: int, contexts: tuple[str, ...]
    ) -> dict[str, list[MappedExtent]]:
        """The extents of each context over [offset, offset+length), at least one each."""
        raise UnsupportedError(f"{self.label} has no extents")

    async def flush(self) -> None:
        """Make what was written durable."""

    async def close(self) -> None:
        """Release everything (called once, also after a failure)."""


class NBDEnd(End):
    """An NBD export: one client per lane.

    Create with :meth:`open`, which opens the first connection (the one that tells the
    size, the flags and the meta contexts); :meth:`set_lanes` opens the rest.
    """

    def __init__(self, label: str, first: AsyncClient, connect: Callable[[], Any]) -> None:
        self.label = label
        self.clients = [first]
        self._connect = connect
        self.size = first.size
        self.lanes = None if first.can_multi_conn() else 1
        self.can_extents = first.can_meta_context(BASE_ALLOCATION)
        self._fast_zero = first.can_fast_zero()
        self._can_zero = first.can_zero()

    @classmethod
    async def open(
        cls,
        uri: str,
        *,
        contexts: tuple[str, ...] = (),
        tls: TLSConfig | None = None,
        timeout: float | None,
    ) -> NBDEnd:
        """Connect to ``uri``, asking for the meta contexts ``contexts``."""
        parsed = parse_uri(uri)

        def connect() -> Any:
            return AsyncClient.connect(parsed, tls=tls, meta_contexts=contexts, timeout=timeout)

        return cls(parsed.to_uri(), await connect(), connect)

    async def set_lanes(self, lanes: int) -> None:
        more = await asyncio.gather(
            *(self._connect() for _ in range(lanes - len(self.clients))),
            return_exceptions=True,
        )
        opened = [c for c in more if isinstance(c, AsyncClient)]
        self.clients += opened
        for c in more:
            if isinstance(c, BaseException):
                raise c

    def readonly(self) -> bool:
        return self.clients[0].is_read_only()

    async def read(self, lane: int, view: memoryview, offset: int) -> int:
        await self.clients[lane].pread_into(view, offset)
        return len(view)

    async def write(self, lane: int, view: memoryview, offset: int) -> None:
        await self.clients[lane].pwrite(view, offset)

    async def zero(self, lane: int, length: int, offset: int, *, allocated: bool) -> None:
        client = self.clients[lane]
        if self._can_zero:
            if self._fast_zero:
                try:
                    await client.zero(length, offset, no_hole=allocated, fast=True)
                    return
                except RequestError as exc:
                    if exc.errno != errno.ENOTSUP:
                        raise
                    # Zeroing is no faster than writing here: stop asking.
                    self._fast_zero = False
            await client.zero(length, offset, no_hole=allocated)
            return
        await _write_zeroes(self, lane, length, offset)

    async def extents(
        self, length: int, offset: int, contexts: tuple[str, ...]
    ) -> dict[str, list[MappedExtent]]:
        return await self.clients[0].block_status_all(length, offset, contexts=contexts)

    async def flush(self) -> None:
        # With multi-conn, a flush on one connection covers the writes of all of them.
        if self.clients[0].can_flush():
            await self.clients[0].flush()

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.clients), return_exceptions=True)


async def _write_zeroes(end: End, lane: int, length: int, offset: int) -> None:
    stop = offset + length
    while offset < stop:
        n = min(ZERO_WRITE, stop - offset)
        await end.write(lane, _ZEROES[:n], offset)
        offset += n


class FileEnd(End):
    """A regular file or a block device.

    Args:
        path: the file (for messages, and to open it unless ``fd`` is given).
        writable: open it for writing (created when missing).
        fd: a descriptor already open on it; the end owns it from now on.
    """

    def __init__(self, path: str, *, writable: bool, fd: int | None = None) -> None:
        # Imported here: the server package is not needed for NBD-to-NBD copies.
        from ..server.file import FileBackend

        self.label = path
        if fd is None:
            flags = (os.O_RDWR | os.O_CREAT) if writable else os.O_RDONLY
            fd = os.open(path, flags | os.O_CLOEXEC, 0o644)
        self._backend = FileBackend(path, read_only=not writable, fd=fd)
        self._fd = fd
        self.grows = not self._backend.is_block_device
        self.size = self._backend.size
        self.can_extents = bool(self._backend.capabilities.can_extents)
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="pynbd-copy-file")

    async def _call(self, func: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, func, *args)

    async def prepare(self, size: int | None, *, keep: bool) -> None:
        if not self.grows:
            return
        if not keep:
            # Cleared, as nbdcopy and cp do: then the zero ranges need no writing.
            await self._call(os.ftruncate, self._fd, 0)
            self.zero_start = True
        if size is not None:
            await self._call(self._backend.resize, size)
        self.size = size

    async def finish(self, size: int) -> None:
        if self.grows and self.size != size:
            # A stream's length is known only at its end; its zero tail was not written.
            await self._call(self._backend.resize, size)

    async def read(self, lane: int, view: memoryview, offset: int) -> int:
        await self._call(self._backend.pread_into, view, offset)
        return len(view)

    async def write(self, lane: int, view: memoryview, offset: int) -> None:
        await self._call(self._backend.pwrite, view, offset, False)

    async def zero(self, lane: int, length: int, offset: int, *, allocated: bool) -> None:
        await self._call(self._backend.zero, length, offset, not allocated, False, False)

    async def extents(
        self, length: int, offset: int, contexts: tuple[str, ...]
    ) -> dict[str, list[MappedExtent]]:
        got = await self._call(self._backend.extents, length, offset)
        out: list[MappedExtent] = []
        for n, flags in got:
            out.append(MappedExtent(offset, n, flags))
            offset += n
        return {BASE_ALLOCATION: out}

    async def flush(self) -> None:
        await self._call(self._backend.flush)

    async def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._backend.close()


class StreamEnd(End):
    """Standard input or output as a stream: in order, never seeked."""

    stream = True

    def __init__(self, fd: int, label: str) -> None:
        self.label = label
        self._fd = fd
        self._pos = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pynbd-copy-stream")

    async def _call(self, func: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, func, *args)

    def _read_full(self, view: memoryview) -> int:
        got = 0
        while got < len(view):
            n = os.readv(self._fd, [view[got:]])
            if n == 0:
                break
            got += n
        return got

    def _write_all(self, view: memoryview) -> None:
        while view:
            view = view[os.write(self._fd, view) :]

    async def read(self, lane: int, view: memoryview, offset: int) -> int:
        self._check(offset)
        n = await self._call(self._read_full, view)
        self._pos += n
        return n

    async def write(self, lane: int, view: memoryview, offset: int) -> None:
        self._check(offset)
        await self._call(self._write_all, view)
        self._pos += len(view)

    async def zero(self, lane: int, length: int, offset: int, *, allocated: bool) -> None:
        await _write_zeroes(self, lane, length, offset)

    def _check(self, offset: int) -> None:
        if offset != self._pos:
            raise AssertionError(f"stream {self.label} at {self._pos}, asked for {offset}")

    async def flush(self) -> None:
        try:
            await self._call(os.fsync, self._fd)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EROFS, errno.ENOTSUP):
                raise  # a pipe or a terminal cannot be synced: nothing to flush

    async def close(self) -> None:
        self._pool.shutdown(wait=True)


class NullEnd(End):
    """``null:``: takes everything and keeps nothing."""

    label = "null:"
    zero_start = True

    async def write(self, lane: int, view: memoryview, offset: int) -> None:
        return

    async def zero(self, lane: int, length: int, offset: int, *, allocated: bool) -> None:
        return


async def open_end(
    word: str,
    *,
    destination: bool,
    contexts: tuple[str, ...] = (),
    tls: TLSConfig | None = None,
    timeout: float | None = None,
) -> End:
    """Open one end from its command-line word: a URI, a path, ``-`` or ``null:``.

    Raises:
        CopyUsageError-worthy ValueError: ``null:`` as a source.
        OSError: the file cannot be opened. NBDError: the server cannot be reached.
    """
    if word == "null:":
        if not destination:
            raise ValueError("null: can only be a destination")
        return NullEnd()
    if is_uri(word):
        return await NBDEnd.open(word, contexts=contexts, tls=tls, timeout=timeout)
    if word == "-":
        fd = 1 if destination else 0
        mode = os.fstat(fd).st_mode
        label = "standard output" if destination else "standard input"
        if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
            return FileEnd(label, writable=destination, fd=os.dup(fd))
        return StreamEnd(fd, label)
    return FileEnd(word, writable=destination)


def describes_zero(flags: int) -> bool:
    """Whether base:allocation flags say the range reads as zeroes."""
    return bool(flags & StateFlag.ZERO)
