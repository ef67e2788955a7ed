"""The two ends of a copy: an NBD export, a file or block device, a stream, ``null:``.

Every end has the same blocking calls, each taking the *lane* it runs on, so the engine
in :mod:`.engine` treats them alike. A lane is one connection: the engine calls an end
from two threads per lane (the lane's reader and writer), each using only its own side,
so no connection is ever used by two threads at once.

- :class:`NBDEnd`: one blocking :class:`~pynbd.client.Client` per lane (several only
  where the server allows multi-conn). Zeroes go out as WRITE_ZEROES, with FAST_ZERO
  while the server offers it (a refusal turns it off), or as written zeroes where the
  server has no WRITE_ZEROES.
- :class:`FileEnd`: a regular file or a block device, through
  :class:`~pynbd.localfile.LocalFile` (positional reads and writes, which many threads
  may make at once; holes punched with ``fallocate``; ``SEEK_DATA`` and ``SEEK_HOLE``
  for extents).
- :class:`StreamEnd`: standard input or output (``-``) when it is a pipe, a terminal or
  a socket: read or written in order, never seeked. A ``-`` that is a regular file or
  a block device (``< disk.img``) is a :class:`FileEnd` on that descriptor.
- :class:`NullEnd`: ``null:``, a destination that discards what it is given.

:func:`open_end` turns a command-line word into the right end.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

from ..client import Client, MappedExtent
from ..errors import NBDError, RequestError, UnsupportedError
from ..localfile import LocalFile
from ..proto.constants import BASE_ALLOCATION
from ..transport.tls import TLSConfig
from ..transport.uri import SCHEMES, parse_uri

__all__ = ["End", "FileEnd", "NBDEnd", "NullEnd", "StreamEnd", "is_uri", "open_end"]

#: The size of the zero buffer written where an end cannot zero any other way.
ZERO_WRITE = 1 << 20
_ZEROES = memoryview(bytes(ZERO_WRITE))


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

    def set_lanes(self, lanes: int) -> None:
        """Get ready to serve ``lanes`` lanes (open the extra connections)."""

    def prepare(self, size: int | None, *, keep: bool) -> None:
        """As a destination, get ready to take ``size`` bytes (None: unknown).

        ``keep``: what the destination holds must stay where the copy does not write
        (an incremental copy); else it may be cleared.
        """

    def finish(self, size: int) -> None:
        """As a destination, after a copy of ``size`` bytes that ended well."""

    def read(self, lane: int, view: memoryview, offset: int) -> int:
        """Fill ``view`` from ``offset``; returns the bytes read (short only at the
        end of a stream)."""
        raise UnsupportedError(f"{self.label} cannot be read")

    def write(self, lane: int, view: memoryview, offset: int) -> None:
        """Write ``view`` at ``offset``."""
        raise UnsupportedError(f"{self.label} cannot be written")

    def read_many(self, lane: int, reads: list[tuple[memoryview, int]]) -> None:
        """Fill each (view, offset) pair (not for a stream); an end that can pipeline
        sends them all before it waits. An error's ``request_offset`` is the offset of
        the pair that failed."""
        _each(self.read, lane, reads)

    def write_many(self, lane: int, writes: list[tuple[memoryview, int]]) -> None:
        """Write each (view, offset) pair, pipelined where the end can; errors as
        :meth:`read_many`'s."""
        _each(self.write, lane, writes)

    def zero(self, lane: int, length: int, offset: int, allocated: bool) -> None:
        """Make [offset, offset+length) read as zeroes; ``allocated``: no hole."""
        raise UnsupportedError(f"{self.label} cannot be written")

    def extents(
        self, lane: int, length: int, offset: int, contexts: tuple[str, ...]
    ) -> dict[str, list[MappedExtent]]:
        """The extents of each context over [offset, offset+length), at least one each."""
        raise UnsupportedError(f"{self.label} has no extents")

    def flush(self) -> None:
        """Make what was written durable."""

    def close(self) -> None:
        """Release everything (called once, also after a failure)."""


def _each(
    call: Callable[[int, memoryview, int], object], lane: int, pairs: list[tuple[memoryview, int]]
) -> None:
    for view, offset in pairs:
        try:
            call(lane, view, offset)
        except (OSError, NBDError) as exc:
            if getattr(exc, "request_offset", None) is None:
                exc.request_offset = offset  # type: ignore[union-attr]
            raise


class NBDEnd(End):
    """An NBD export: one client per lane.

    Create with :meth:`open`, which opens the first connection (the one that tells the
    size, the flags and the meta contexts); :meth:`set_lanes` opens the rest.
    """

    def __init__(self, label: str, first: Client, connect: Callable[[], Client]) -> None:
        self.label = label
        self.clients = [first]
        self._connect = connect
        self.size = first.size
        self.lanes = None if first.can_multi_conn() else 1
        self.can_extents = first.can_meta_context(BASE_ALLOCATION)
        self._fast_zero = first.can_fast_zero()
        self._can_zero = first.can_zero()

    @classmethod
    def open(
        cls,
        uri: str,
        *,
        contexts: tuple[str, ...] = (),
        tls: TLSConfig | None = None,
        timeout: float | None,
    ) -> NBDEnd:
        """Connect to ``uri``, asking for the meta contexts ``contexts``."""
        parsed = parse_uri(uri)

        def connect() -> Client:
            return Client(parsed, tls=tls, meta_contexts=contexts, timeout=timeout)

        return cls(parsed.to_uri(), connect(), connect)

    def set_lanes(self, lanes: int) -> None:
        while len(self.clients) < lanes:
            self.clients.append(self._connect())

    def readonly(self) -> bool:
        return self.clients[0].is_read_only()

    def read(self, lane: int, view: memoryview, offset: int) -> int:
        self.clients[lane].pread_into(view, offset)
        return len(view)

    def write(self, lane: int, view: memoryview, offset: int) -> None:
        self.clients[lane].pwrite(view, offset)

    def read_many(self, lane: int, reads: list[tuple[memoryview, int]]) -> None:
        self.clients[lane].pread_many(reads)

    def write_many(self, lane: int, writes: list[tuple[memoryview, int]]) -> None:
        self.clients[lane].pwrite_many(writes)

    def zero(self, lane: int, length: int, offset: int, allocated: bool) -> None:
        client = self.clients[lane]
        if not self._can_zero:
            _write_zeroes(self, lane, length, offset)
            return
        if self._fast_zero:
            try:
                client.zero(length, offset, no_hole=allocated, fast=True)
                return
            except RequestError as exc:
                if exc.errno != errno.ENOTSUP:
                    raise
                # Zeroing is no faster than writing here: stop asking.
                self._fast_zero = False
        client.zero(length, offset, no_hole=allocated)

    def extents(
        self, lane: int, length: int, offset: int, contexts: tuple[str, ...]
    ) -> dict[str, list[MappedExtent]]:
        return self.clients[lane].block_status_all(length, offset, contexts=contexts)

    def flush(self) -> None:
        # With multi-conn, a flush on one connection covers the writes of all of them.
        if self.clients[0].can_flush():
            self.clients[0].flush()

    def close(self) -> None:
        for client in self.clients:
            client.close()


def _write_zeroes(end: End, lane: int, length: int, offset: int) -> None:
    stop = offset + length
    while offset < stop:
        n = min(ZERO_WRITE, stop - offset)
        end.write(lane, _ZEROES[:n], offset)
        offset += n


class FileEnd(End):
    """A regular file or a block device.

    Args:
        path: the file (for messages, and to open it unless ``fd`` is given).
        writable: open it for writing (created when missing).
        fd: a descriptor already open on it; the end owns it from now on.
    """

    def __init__(self, path: str, *, writable: bool, fd: int | None = None) -> None:
        self.label = path
        self._file = LocalFile(path, read_only=not writable, fd=fd, create=writable)
        self.grows = not self._file.is_block_device
        self.size = self._file.size
        self.can_extents = self._file.can_extents

    def prepare(self, size: int | None, *, keep: bool) -> None:
        if not self.grows:
            return
        if not keep:
            # Cleared, as nbdcopy and cp do: then the zero ranges need no writing.
            self._file.resize(0)
            self.zero_start = True
        if size is not None:
            self._file.resize(size)
        self.size = size

    def finish(self, size: int) -> None:
        if self.grows and self.size != size:
            # A stream's length is known only at its end; its zero tail was not written.
            self._file.resize(size)

    def read(self, lane: int, view: memoryview, offset: int) -> int:
        self._file.pread_into(view, offset)
        return len(view)

    def write(self, lane: int, view: memoryview, offset: int) -> None:
        self._file.pwrite(view, offset, False)

    def read_many(self, lane: int, reads: list[tuple[memoryview, int]]) -> None:
        _vectored(self._file.preadv_into, self.read, lane, reads)

    def write_many(self, lane: int, writes: list[tuple[memoryview, int]]) -> None:
        _vectored(self._file.pwritev, self.write, lane, writes)

    def zero(self, lane: int, length: int, offset: int, allocated: bool) -> None:
        self._file.zero(length, offset, not allocated, False, False)

    def extents(
        self, lane: int, length: int, offset: int, contexts: tuple[str, ...]
    ) -> dict[str, list[MappedExtent]]:
        out: list[MappedExtent] = []
        for n, flags in self._file.extents(length, offset):
            out.append(MappedExtent(offset, n, flags))
            offset += n
        return {BASE_ALLOCATION: out}

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


#: The most buffers one preadv or pwritev takes (Linux's IOV_MAX).
_IOV_MAX = 1024


def _vectored(
    vectored: Callable[[list[memoryview], int], None],
    single: Callable[[int, memoryview, int], object],
    lane: int,
    pairs: list[tuple[memoryview, int]],
) -> None:
    """Requests that follow each other in the file in one vectored call; after a
    failure they are tried one by one, to name the one that fails."""
    for run in _runs(pairs):
        try:
            vectored([view for view, _ in run], run[0][1])
        except OSError:
            _each(single, lane, run)


def _runs(pairs: list[tuple[memoryview, int]]) -> list[list[tuple[memoryview, int]]]:
    """(view, offset) pairs cut into runs that follow each other in the file, each at
    most :data:`_IOV_MAX` long."""
    runs: list[list[tuple[memoryview, int]]] = []
    end = -1
    for view, offset in pairs:
        if offset == end and len(runs[-1]) < _IOV_MAX:
            runs[-1].append((view, offset))
        else:
            runs.append([(view, offset)])
        end = offset + len(view)
    return runs


class StreamEnd(End):
    """Standard input or output as a stream: in order, never seeked."""

    stream = True

    def __init__(self, fd: int, label: str) -> None:
        self.label = label
        self._fd = fd
        self._pos = 0

    def read(self, lane: int, view: memoryview, offset: int) -> int:
        self._check(offset)
        got = 0
        while got < len(view):
            n = os.readv(self._fd, [view[got:]])
            if n == 0:
                break
            got += n
        self._pos += got
        return got

    def write(self, lane: int, view: memoryview, offset: int) -> None:
        self._check(offset)
        left = view
        while left:
            left = left[os.write(self._fd, left) :]
        self._pos += len(view)

    def zero(self, lane: int, length: int, offset: int, allocated: bool) -> None:
        _write_zeroes(self, lane, length, offset)

    def _check(self, offset: int) -> None:
        if offset != self._pos:
            raise AssertionError(f"stream {self.label} at {self._pos}, asked for {offset}")

    def flush(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EROFS, errno.ENOTSUP):
                raise  # a pipe or a terminal cannot be synced: nothing to flush


class NullEnd(End):
    """``null:``: takes everything and keeps nothing."""

    label = "null:"
    zero_start = True

    def write(self, lane: int, view: memoryview, offset: int) -> None:
        return

    def zero(self, lane: int, length: int, offset: int, allocated: bool) -> None:
        return


def open_end(
    word: str,
    *,
    destination: bool,
    contexts: tuple[str, ...] = (),
    tls: TLSConfig | None = None,
    timeout: float | None = None,
) -> End:
    """Open one end from its command-line word: a URI, a path, ``-`` or ``null:``.

    Raises:
        ValueError: ``null:`` as a source.
        OSError: the file cannot be opened. NBDError: the server cannot be reached.
    """
    if word == "null:":
        if not destination:
            raise ValueError("null: can only be a destination")
        return NullEnd()
    if is_uri(word):
        return NBDEnd.open(word, contexts=contexts, tls=tls, timeout=timeout)
    if word == "-":
        fd = 1 if destination else 0
        mode = os.fstat(fd).st_mode
        label = "standard output" if destination else "standard input"
        if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
            return FileEnd(label, writable=destination, fd=os.dup(fd))
        return StreamEnd(fd, label)
    return FileEnd(word, writable=destination)
