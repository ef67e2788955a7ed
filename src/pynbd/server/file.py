"""A file or block device backend: :class:`pynbd.localfile.LocalFile` as an export.

The I/O is LocalFile's: reads and writes with ``os.preadv``/``os.pwritev``, FUA with
``RWF_DSYNC`` (else a flush), TRIM as a punched hole, WRITE_ZEROES with ``fallocate(2)``
falling back to writing zeroes (a fast zero request then fails with ENOTSUP, as the spec
asks), block status from ``SEEK_DATA``/``SEEK_HOLE``, FLUSH as ``fdatasync``. The
methods may block; a regular file's reads and writes without FUA are copies from and
to the page cache (``Blocking.CACHED``), which the server may run where it reads the
connection rather than in its thread pool (see :mod:`pynbd.server.policy`); a block
device's may all wait.
"""

from __future__ import annotations

import os

from ..localfile import HAVE_FALLOCATE, LocalFile, fallocate
from .backend import Backend, Blocking, Capabilities, Extent, Support

__all__ = ["FileBackend", "fallocate"]


class FileBackend(Backend):
    """A regular file or a block device as an export.

    Args:
        path: the file or device.
        read_only: open it read-only and refuse writes.
        fd: a descriptor already open on the file, used instead of opening ``path``
            (which then only names it); the backend owns it from the call on, and
            closes it (at once when this raises).

    Raises:
        OSError: the file cannot be opened.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, read_only: bool = False, fd: int | None = None
    ) -> None:
        self.file = LocalFile(path, read_only=read_only, fd=fd)
        self.path = self.file.path
        self.is_block_device = self.file.is_block_device
        self.capabilities = Capabilities(
            can_write=not read_only,
            can_flush=True,
            can_fua=Support.NATIVE if self.file.dsync else Support.EMULATE,
            can_trim=HAVE_FALLOCATE,
            can_zero=Support.NATIVE,
            can_fast_zero=True,
            can_cache=Support.NATIVE if hasattr(os, "posix_fadvise") else Support.NONE,
            can_extents=self.file.can_extents,
            # One descriptor for every connection; fdatasync covers all their writes.
            can_multi_conn=True,
            blocking=Blocking.YES if self.is_block_device else Blocking.CACHED,
        )

    @property
    def size(self) -> int:
        return self.file.size

    def resize(self, new_size: int) -> None:
        """Change the size of a regular file (ftruncate: growing adds a hole).

        Raises:
            ValueError: a negative size.
            OSError: ENOTSUP for a block device (resize the device itself, then make
                a new backend), or the truncate failed.
        """
        self.file.resize(new_size)

    def close(self) -> None:
        self.file.close()

    def pread_into(self, buf: memoryview, offset: int) -> None:
        self.file.pread_into(buf, offset)

    def pwrite(self, buf: memoryview, offset: int, fua: bool) -> None:
        self.file.pwrite(buf, offset, fua)

    def flush(self) -> None:
        self.file.flush()

    def trim(self, length: int, offset: int, fua: bool) -> None:
        self.file.trim(length, offset, fua)

    def zero(self, length: int, offset: int, may_trim: bool, fast: bool, fua: bool) -> None:
        self.file.zero(length, offset, may_trim, fast, fua)

    def cache(self, length: int, offset: int) -> None:
        self.file.cache(length, offset)

    def extents(self, length: int, offset: int) -> list[Extent]:
        return self.file.extents(length, offset)
