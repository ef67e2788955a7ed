"""A copy-on-write overlay: writes land in a private store, the base stays untouched.

:class:`OverlayBackend` serves any blocking :class:`~pynbd.server.backend.Backend` as a
writable export without ever writing to it (a golden image shared by testers, a disk
image inspected with tools that insist on writing). The export is cut into blocks of
``block_size`` bytes; a state map (one byte per block) says where each block's bytes
are:

- ``BASE``: never written here: read from the base.
- ``DATA``: copied up: read from the overlay store (a sparse memory store, or a sparse
  temporary file that has no name: ``O_TMPFILE``, else removed as soon as it is made).
- ``ZERO``: trimmed or zeroed whole: reads as zeroes, stores nothing.

A write that covers part of a ``BASE`` block first copies that block up from the base
(read-modify-write), so the overlay's block size is the unit of copying: the preferred
block size advertised to clients. Block status merges the three: ``DATA`` blocks are
data, ``ZERO`` blocks are holes that read as zeroes, and ``BASE`` runs report what the
base reports. Nothing is written back to the base, and the overlay is lost when the
backend is closed.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
import threading
from collections.abc import Iterator

from ..proto.constants import StateFlag
from .backend import Backend, Blocking, Capabilities, Extent, Support
from .file import FileBackend
from .memory import MemoryBackend

__all__ = ["OverlayBackend"]

BASE, DATA, ZERO = 0, 1, 2
_HOLE = int(StateFlag.HOLE | StateFlag.ZERO)
#: Most extents one block status call reports (the client asks again for the rest).
_MAX_EXTENTS = 64 * 1024
#: For each state, a pattern that finds the next block in another state (in C).
_OTHER = {s: re.compile(b"[^" + re.escape(bytes([s])) + b"]") for s in (BASE, DATA, ZERO)}


class OverlayBackend(Backend):
    """A writable copy-on-write view of a read-only base.

    Args:
        base: the backend whose contents show through; it is only read.
        directory: keep the overlay in a sparse temporary file in this directory
            (removed at once, so nothing is left behind) instead of in memory.
        block_size: the unit of copy-up and of the state map, a power of two of at
            least 512 bytes.

    Raises:
        ValueError: a bad block size.
        TypeError: ``base`` is not a blocking :class:`Backend`.
        OSError: the temporary file cannot be made.
    """

    def __init__(
        self,
        base: Backend,
        *,
        directory: str | os.PathLike[str] | None = None,
        block_size: int = 64 * 1024,
    ) -> None:
        if not isinstance(base, Backend):
            raise TypeError("the base of an overlay must be a blocking Backend")
        if block_size < 512 or block_size & (block_size - 1):
            raise ValueError("overlay block size must be a power of two of at least 512")
        self.base = base
        self.block_size = block_size
        self._size = base.size
        self._store: Backend = (
            MemoryBackend(self._size, page_size=block_size)
            if directory is None
            else _temporary_file(directory, self._size)
        )
        self._map = bytearray(-(-self._size // block_size))
        self._lock = threading.Lock()
        caps = base.capabilities
        preferred = max(block_size, caps.preferred_block)
        if preferred > caps.maximum_payload:
            preferred = caps.preferred_block
        self.capabilities = Capabilities(
            can_write=True,
            can_flush=True,
            can_fua=Support.EMULATE,
            can_trim=True,
            can_zero=Support.NATIVE,
            can_fast_zero=True,
            can_extents=True,
            # One overlay for every connection, and nothing is cached on the way.
            can_multi_conn=True,
            is_rotational=caps.is_rotational,
            minimum_block=1,
            preferred_block=preferred,
            maximum_payload=caps.maximum_payload,
            # One call at a time (the map); a temporary file blocks.
            thread_safe=False,
            blocking=(
                Blocking.NEVER
                if caps.blocking is Blocking.NEVER and directory is None
                else Blocking.YES
            ),
        )

    @property
    def size(self) -> int:
        return self._size

    @property
    def copied(self) -> int:
        """Bytes held by the overlay (blocks in the DATA state)."""
        return self._map.count(DATA) * self.block_size

    def block_state(self, offset: int) -> int:
        """The state of the block holding ``offset``: BASE, DATA or ZERO."""
        return self._map[offset // self.block_size]

    def close(self) -> None:
        """Drop the overlay (the base is not closed: it belongs to the caller)."""
        self._store.close()

    # -- the state map ----------------------------------------------------------------

    def _runs(self, length: int, offset: int) -> Iterator[tuple[int, int, int]]:
        """(state, offset, length) for each run of blocks in one state, clipped."""
        bs = self.block_size
        end = offset + length
        pos = offset
        last = (end - 1) // bs + 1  # one past the last block touched
        while pos < end:
            block = pos // bs
            state = self._map[block]
            found = _OTHER[state].search(self._map, block + 1, last)
            stop = min(end, found.start() * bs) if found else end
            yield state, pos, stop - pos
            pos = stop

    def _blocks(self, length: int, offset: int) -> tuple[int, int]:
        """The whole blocks inside the range: (first, one past the last)."""
        bs = self.block_size
        first = -(-offset // bs)
        end = offset + length
        stop = len(self._map) if end == self._size else end // bs
        return first, max(first, stop)

    def _block_span(self, block: int) -> tuple[int, int]:
        """(offset, length) of a block (the last one may be short)."""
        start = block * self.block_size
        return start, min(self.block_size, self._size - start)

    def _copy_up(self, block: int) -> None:
        """Make a BASE or ZERO block a DATA block with the same contents."""
        state = self._map[block]
        if state == DATA:
            return
        start, n = self._block_span(block)
        if state == BASE:
            data = memoryview(bytearray(n))
            self.base.pread_into(data, start)
            self._store.pwrite(data, start, False)
        # A ZERO block's store range is already zero (see _mark_zero).
        self._map[block] = DATA

    def _mark_zero(self, first: int, stop: int) -> None:
        """Whole blocks [first, stop) read as zeroes; their store space is freed."""
        if first >= stop:
            return
        start = first * self.block_size
        end = min(self._size, stop * self.block_size)
        if DATA in self._map[first:stop]:
            self._store.zero(end - start, start, True, False, False)
        self._map[first:stop] = bytes([ZERO]) * (stop - first)

    # -- Backend ----------------------------------------------------------------------

    def pread_into(self, buf: memoryview, offset: int) -> None:
        view = buf.cast("B") if buf.format != "B" else buf
        with self._lock:
            for state, off, n in self._runs(len(view), offset):
                part = view[off - offset : off - offset + n]
                if state == BASE:
                    self.base.pread_into(part, off)
                elif state == DATA:
                    self._store.pread_into(part, off)
                else:
                    part[:] = bytes(n)

    def pwrite(self, buf: memoryview, offset: int, fua: bool) -> None:
        view = buf.cast("B") if buf.format != "B" else buf
        length = len(view)
        if not length:
            return
        bs = self.block_size
        first, last = offset // bs, (offset + length - 1) // bs
        with self._lock:
            # Partly covered blocks keep their other bytes: copy them up first.
            if offset % bs:
                self._copy_up(first)
            end = offset + length
            if end % bs and end != self._size:
                self._copy_up(last)
            self._store.pwrite(view, offset, False)
            self._map[first : last + 1] = bytes([DATA]) * (last + 1 - first)

    def flush(self) -> None:
        self._store.flush()

    def trim(self, length: int, offset: int, fua: bool) -> None:
        # A hint: whole blocks become holes; parts of blocks keep their data.
        with self._lock:
            self._mark_zero(*self._blocks(length, offset))

    def zero(self, length: int, offset: int, may_trim: bool, fast: bool, fua: bool) -> None:
        # Always fast: at most two partial blocks are copied up, whole ones only marked.
        if not length:
            return
        bs = self.block_size
        end = offset + length
        first, stop = self._blocks(length, offset)
        pieces = [(offset, first * bs), (stop * bs, end)] if first < stop else [(offset, end)]
        with self._lock:
            for start, finish in pieces:
                if finish <= start:
                    continue
                for block in range(start // bs, (finish - 1) // bs + 1):
                    if self._map[block] == BASE:
                        self._copy_up(block)
                self._zero_data(start, finish)
            self._mark_zero(first, stop)

    def _zero_data(self, start: int, finish: int) -> None:
        """Zero a range of DATA and ZERO blocks (ZERO ones are already zero)."""
        for state, off, n in self._runs(finish - start, start):
            if state == DATA:
                self._store.pwrite(memoryview(bytes(n)), off, False)

    def extents(self, length: int, offset: int) -> list[Extent]:
        out: list[Extent] = []
        with self._lock:
            for state, off, n in self._runs(length, offset):
                if state == BASE:
                    if not self._base_extents(out, n, off):
                        break
                else:
                    _add(out, n, 0 if state == DATA else _HOLE)
                if len(out) >= _MAX_EXTENTS:
                    break
        return out

    def _base_extents(self, out: list[Extent], length: int, offset: int) -> bool:
        """Append the base's extents for a BASE run; False when the list is full."""
        if not self.base.capabilities.can_extents:
            _add(out, length, 0)
            return True
        pos, end = offset, offset + length
        while pos < end:
            got = [(n, flags) for n, flags in self.base.extents(end - pos, pos) if n > 0]
            if not got:
                raise OSError(errno.EIO, "the overlay's base reported no extents")
            for n, flags in got:
                n = min(n, end - pos)
                _add(out, n, flags)
                pos += n
                if pos >= end:
                    break
            if len(out) >= _MAX_EXTENTS:
                return False
        return True


def _add(out: list[Extent], length: int, flags: int) -> None:
    """Append an extent, merging it into the last one when the flags match."""
    if out and out[-1][1] == flags:
        out[-1] = (out[-1][0] + length, flags)
    else:
        out.append((length, flags))


def _temporary_file(directory: str | os.PathLike[str], size: int) -> FileBackend:
    """A sparse file of ``size`` bytes in ``directory`` with no name left, mode 0600.

    Only the descriptor is used once the file exists, never its name: in a shared
    directory the name could be swapped for a symlink to another file between two
    calls. ``O_TMPFILE`` makes a file that never has a name; where the kernel or the
    filesystem cannot, :func:`tempfile.mkstemp` creates one (``O_EXCL|O_NOFOLLOW``)
    and the name is removed at once (unlink removes a symlink, never its target).
    """
    fd = _unnamed_file(os.fspath(directory))
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return FileBackend(os.path.join(directory, "(pynbd overlay, unnamed)"), fd=fd)


def _unnamed_file(directory: str) -> int:
    """A descriptor of a new empty file in ``directory`` that has no name."""
    tmpfile = getattr(os, "O_TMPFILE", 0)
    if tmpfile:
        try:
            return os.open(directory, tmpfile | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError:
            pass  # EOPNOTSUPP (the filesystem), EISDIR (an old kernel): use a name
    fd, path = tempfile.mkstemp(prefix="pynbd-overlay-", dir=directory)
    try:
        os.unlink(path)
    except BaseException:
        os.close(fd)
        raise
    return fd
