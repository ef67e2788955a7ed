"""A local file or block device: positional reads and writes, holes, zeroes, extents.

:class:`LocalFile` is the I/O that the server's file backend
(:class:`pynbd.server.FileBackend`) and ``pynbd copy`` share. Reads and writes use
``os.preadv``/``os.pwritev`` (positional, so many threads can share one descriptor);
FUA uses ``RWF_DSYNC`` where the platform has it, else a flush. Holes are punched and
ranges zeroed with ``fallocate(2)`` (``PUNCH_HOLE|KEEP_SIZE`` when a hole is allowed,
else ``ZERO_RANGE|KEEP_SIZE``), called through ctypes; when the file system or device
refuses, zeroing falls back to writing zeroes (and a fast zero fails with ENOTSUP).
Extents come from ``SEEK_DATA``/``SEEK_HOLE``. Flushing is ``fdatasync``. Every call
may block. Standard library only, and light to import.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import threading
from collections.abc import Callable
from typing import TypeAlias

from .proto.constants import StateFlag

__all__ = [
    "FALLOC_FL_KEEP_SIZE",
    "FALLOC_FL_PUNCH_HOLE",
    "FALLOC_FL_ZERO_RANGE",
    "HAVE_FALLOCATE",
    "Extent",
    "LocalFile",
    "fallocate",
]

#: (length, block status flags) of one extent, from the offset asked for on.
Extent: TypeAlias = tuple[int, int]

# linux/falloc.h
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_HOLE = int(StateFlag.HOLE | StateFlag.ZERO)
_MAX_EXTENTS = 1024
_ZERO_CHUNK = 1 << 20
#: errno values meaning "this file or kernel cannot do that", not "it failed".
_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL})


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    try:
        # The C library this process already has (find_library would run ldconfig).
        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.fallocate
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    func.restype = ctypes.c_int
    return func


_fallocate = _load_fallocate()

#: Whether this platform has fallocate(2) at all.
HAVE_FALLOCATE = _fallocate is not None


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """Call fallocate(2); raises OSError (ENOSYS when libc has no fallocate)."""
    if _fallocate is None:
        raise OSError(errno.ENOSYS, "fallocate is not available")
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class LocalFile:
    """A regular file or a block device, open on one descriptor.

    Args:
        path: the file or device.
        read_only: open it read-only.
        fd: a descriptor already open on the file, used instead of opening ``path``
            (which then only names it); the object owns it from the call on, and
            closes it (at once when this raises).
        create: open ``path`` read-write, creating it (mode 0644) when missing.

    Raises:
        OSError: the file cannot be opened.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        read_only: bool = False,
        fd: int | None = None,
        create: bool = False,
    ) -> None:
        self.path = os.fspath(path)
        if fd is None:
            flags = os.O_RDONLY if read_only else os.O_RDWR | (os.O_CREAT if create else 0)
            fd = os.open(self.path, flags | os.O_CLOEXEC, 0o644)
        self.fd = fd
        try:
            mode = os.fstat(fd).st_mode
            self.is_block_device = stat.S_ISBLK(mode)
            self._size = os.lseek(fd, 0, os.SEEK_END)
        except BaseException:
            os.close(fd)
            raise
        self.read_only = read_only
        self._closed = False
        self._lock = threading.Lock()
        # Learned on first use: whether the file system can punch holes / zero ranges.
        self.can_punch = HAVE_FALLOCATE
        self.can_zero_range = HAVE_FALLOCATE
        self.dsync = getattr(os, "RWF_DSYNC", 0)
        #: SEEK_DATA means nothing on a block device.
        self.can_extents = not self.is_block_device and hasattr(os, "SEEK_DATA")

    @property
    def size(self) -> int:
        return self._size

    def resize(self, new_size: int) -> None:
        """Change the size of a regular file (ftruncate: growing adds a hole).

        Raises:
            ValueError: a negative size.
            OSError: ENOTSUP for a block device, or the truncate failed.
        """
        if new_size < 0:
            raise ValueError("size must not be negative")
        if self.is_block_device:
            raise OSError(errno.ENOTSUP, "a block device cannot be resized here")
        os.ftruncate(self.fd, new_size)
        self._size = new_size

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self.fd)

    def pread_into(self, buf: memoryview, offset: int) -> None:
        view = buf.cast("B") if buf.format != "B" else buf
        pos = 0
        while pos < len(view):
            n = os.preadv(self.fd, [view[pos:]], offset + pos)
            if n == 0:
                # The file shrank under us: what is past its end reads as zeroes.
                view[pos:] = bytes(len(view) - pos)
                return
            pos += n

    def pwrite(self, buf: memoryview, offset: int, fua: bool) -> None:
        view = buf.cast("B") if buf.format != "B" else buf
        flags = self.dsync if fua else 0
        pos = 0
        while pos < len(view):
            pos += os.pwritev(self.fd, [view[pos:]], offset + pos, flags)
        if fua and not flags:
            os.fdatasync(self.fd)

    def preadv_into(self, views: list[memoryview], offset: int) -> None:
        """Fill byte views that follow each other from ``offset`` on, in as few
        ``preadv`` calls as the kernel allows (one, as a rule)."""
        self._vectored(views, offset, write=False)

    def pwritev(self, views: list[memoryview], offset: int) -> None:
        """Write byte views that follow each other from ``offset`` on, in as few
        ``pwritev`` calls as the kernel allows (one, as a rule)."""
        self._vectored(views, offset, write=True)

    def _vectored(self, views: list[memoryview], offset: int, *, write: bool) -> None:
        total = sum(len(v) for v in views)
        done = 0
        while done < total:
            if write:
                n = os.pwritev(self.fd, views, offset + done)
            else:
                n = os.preadv(self.fd, views, offset + done)
                if n == 0:
                    # The file shrank under us: what is past its end reads as zeroes.
                    for v in views:
                        v[:] = bytes(len(v))
                    return
            done += n
            # Drop what was done: whole views, then the start of the next one.
            while views and n >= len(views[0]):
                n -= len(views[0])
                views = views[1:]
            if n:
                views = [views[0][n:], *views[1:]]

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def trim(self, length: int, offset: int, fua: bool) -> None:
        # TRIM is a hint: where holes cannot be punched, doing nothing is correct.
        if self.can_punch and length:
            try:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
                self.can_punch = False
        if fua:
            os.fdatasync(self.fd)

    def zero(self, length: int, offset: int, may_trim: bool, fast: bool, fua: bool) -> None:
        if length and not self._fast_zero(length, offset, may_trim):
            if fast:
                raise OSError(errno.ENOTSUP, "zeroing would be no faster than writing")
            zeroes = memoryview(bytearray(min(length, _ZERO_CHUNK)))
            end = offset + length
            while offset < end:
                n = min(len(zeroes), end - offset)
                self.pwrite(zeroes[:n], offset, False)
                offset += n
        if fua:
            os.fdatasync(self.fd)

    def _fast_zero(self, length: int, offset: int, may_trim: bool) -> bool:
        """Zero with fallocate; False when the file or device cannot."""
        # A punched hole reads back as zeroes (files and, since Linux 4.9, devices).
        if may_trim and self.can_punch:
            try:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                return True
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
                self.can_punch = False
        if self.can_zero_range:
            try:
                fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
                return True
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
                self.can_zero_range = False
        return False

    def cache(self, length: int, offset: int) -> None:
        os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)

    def extents(self, length: int, offset: int) -> list[Extent]:
        end = min(offset + length, self._size)
        out: list[Extent] = []
        pos = offset
        while pos < end and len(out) < _MAX_EXTENTS:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after pos: a hole to the end
                    data = end
                elif exc.errno in _UNSUPPORTED:
                    out.append((end - pos, 0))
                    break
                else:
                    raise
            if data > pos:
                stop = min(data, end)
                out.append((stop - pos, _HOLE))
            else:
                hole = os.lseek(self.fd, pos, os.SEEK_HOLE)
                stop = min(hole, end)
                out.append((stop - pos, 0))
            pos = stop
        return out
