"""A sparse in-memory backend: a dict of fixed-size pages.

Only written pages take memory, so a 1 TiB export costs nothing until written. Pages
never written (or trimmed, or zeroed whole) read as zeroes and are reported by block
status as ``HOLE | ZERO``. The methods never block (``Blocking.NEVER``), and each holds
the backend's lock while it looks at or changes the pages (``thread_safe``), so the
server calls them where it reads their connections: its event loop, or the threads
that serve them (see :mod:`pynbd.server.policy`).

Pages are kept as memoryviews of bytearrays: a slice assignment into a memoryview is one
``memcpy``, while one into a bytearray first copies any source that is not a bytearray
(a memoryview of a payload) into a temporary one: every write would be copied twice.

The backend is ``zero_copy``: a server sends READ replies from views of its pages
(:meth:`pread_views`), with no copy into a buffer of its own. It may skip even the copy
of writes of whole pages: :meth:`receive_pages` gives
spare pages for the payload to be received into, and :meth:`adopt_pages` puts them in
place of the old ones once it is all in (the old ones become spares). A client that
disconnects mid-payload thus changes nothing. An old page is only made a spare while no
views of pages are lent (:meth:`pread_views` lends them until :meth:`return_views`):
a view still waiting to be sent never shows another write's data.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence

from ..proto.constants import StateFlag
from .backend import Backend, Blocking, Capabilities, Extent, Support

__all__ = ["MemoryBackend"]

_HOLE = int(StateFlag.HOLE | StateFlag.ZERO)
#: Most extents one block status call reports (the client asks again for the rest).
_MAX_EXTENTS = 64 * 1024
#: Most bytes of replaced pages kept as spares for receive_pages.
_SPARE_BYTES = 8 * 1024 * 1024


class MemoryBackend(Backend):
    """A sparse RAM disk.

    Args:
        size: the export's size in bytes.
        page_size: allocation unit, a power of two of at least 512 bytes.
        read_only: refuse writes.

    A subclass that changes :meth:`pread_into` or :meth:`pwrite` is not ``zero_copy``:
    it sees every request.

    Raises:
        ValueError: a negative size or a bad page size.
    """

    def __init__(self, size: int, *, page_size: int = 64 * 1024, read_only: bool = False) -> None:
        if size < 0:
            raise ValueError("size must not be negative")
        if page_size < 512 or page_size & (page_size - 1):
            raise ValueError("page size must be a power of two of at least 512")
        self._size = size
        self.page_size = page_size
        self._pages: dict[int, memoryview] = {}  # views of bytearrays
        self._index: list[int] = []  # sorted page numbers present in _pages
        self._zeroes = memoryview(bytes(page_size))
        self._spares: list[memoryview] = []  # replaced pages, for receive_pages
        self._max_spares = max(1, _SPARE_BYTES // page_size)
        self._lent = 0  # pread_views calls not yet returned (return_views)
        self._lock = threading.Lock()
        kind = type(self)
        own = kind.pread_into is MemoryBackend.pread_into and kind.pwrite is MemoryBackend.pwrite
        self.capabilities = Capabilities(
            can_write=not read_only,
            can_flush=True,
            can_fua=Support.NATIVE,
            can_trim=True,
            can_zero=Support.NATIVE,
            can_fast_zero=True,
            can_cache=Support.NATIVE,
            can_extents=True,
            # One store for every connection, and nothing is cached on the way.
            can_multi_conn=True,
            thread_safe=True,
            blocking=Blocking.NEVER,
            zero_copy=own,
        )

    @property
    def size(self) -> int:
        return self._size

    def resize(self, new_size: int) -> None:
        """Change the size. Growing adds zeroes; shrinking frees the pages past the
        end and zeroes the tail of the last one, so a later grow reads zeroes there.

        Raises:
            ValueError: a negative size.
        """
        if new_size < 0:
            raise ValueError("size must not be negative")
        with self._lock:
            if new_size < self._size:
                self._clear(self._size - new_size, new_size)
            self._size = new_size

    @property
    def allocated(self) -> int:
        """Bytes of pages allocated."""
        return len(self._pages) * self.page_size

    def _spans(self, length: int, offset: int) -> list[tuple[int, int, int, int]]:
        """(page, start in page, position in buffer, count) for each page touched."""
        spans = []
        pos = 0
        ps = self.page_size
        while pos < length:
            page, inner = divmod(offset + pos, ps)
            count = min(ps - inner, length - pos)
            spans.append((page, inner, pos, count))
            pos += count
        return spans

    def pread_into(self, buf: memoryview, offset: int) -> None:
        view = buf.cast("B") if buf.format != "B" else buf
        with self._lock:
            for page, inner, pos, count in self._spans(len(view), offset):
                data = self._pages.get(page)
                if data is None:
                    view[pos : pos + count] = self._zeroes[:count]
                else:
                    view[pos : pos + count] = data[inner : inner + count]

    def pread_views(self, length: int, offset: int) -> list[memoryview]:
        """The bytes at ``offset`` as views of the pages (and of a zero page for holes),
        for a server that sends them without copying them first.

        The views are lent: call :meth:`return_views` once they are sent or copied
        (until then no page is recycled, see :meth:`adopt_pages`). They show later
        writes into the pages, trims and zeroes: send or copy them before the next
        change to the range (the server does so).
        """
        pages, zeroes, ps = self._pages, self._zeroes, self.page_size
        page, inner = divmod(offset, ps)
        with self._lock:
            if length and inner + length <= ps:  # within one page: the usual small read
                data = pages.get(page)
                out = [zeroes[:length] if data is None else data[inner : inner + length]]
            else:
                out = []
                for page, inner, _pos, count in self._spans(length, offset):
                    data = pages.get(page)
                    out.append(zeroes[:count] if data is None else data[inner : inner + count])
            self._lent += 1
            return out

    def return_views(self, count: int = 1) -> None:
        """``count`` calls' views of :meth:`pread_views` are sent, copied or dropped."""
        with self._lock:
            self._lent -= count

    def pwrite(self, buf: memoryview, offset: int, fua: bool) -> None:
        view = buf.cast("B") if buf.format != "B" else buf
        pages, ps = self._pages, self.page_size
        page, inner = divmod(offset, ps)
        with self._lock:
            if inner + len(view) <= ps and page in pages:  # the usual small write
                pages[page][inner : inner + len(view)] = view
                return
            for page, inner, pos, count in self._spans(len(view), offset):
                data = pages.get(page)
                if data is not None:
                    data[inner : inner + count] = view[pos : pos + count]
                elif count == ps:  # a new page written whole: one copy, no zeroing first
                    pages[page] = memoryview(bytearray(view[pos : pos + count]))
                    bisect.insort(self._index, page)
                else:
                    self._page(page)[inner : inner + count] = view[pos : pos + count]

    def receive_pages(self, length: int, offset: int) -> list[memoryview] | None:
        """Spare pages to receive a write of whole pages into, for :meth:`adopt_pages`;
        None when ``[offset, offset + length)`` is not whole pages (write it with
        :meth:`pwrite`).

        The pages hold stale bytes until filled. They are not part of the export, so
        the server may fill them as the data arrives and drop them if it never does.
        """
        ps = self.page_size
        if (offset | length) & (ps - 1) or not length or not self.capabilities.can_write:
            return None
        spares = self._spares
        with self._lock:
            return [
                spares.pop() if spares else memoryview(bytearray(ps)) for _ in range(length // ps)
            ]

    def adopt_pages(self, pages: Sequence[memoryview], offset: int) -> None:
        """Perform the write of ``pages`` (from :meth:`receive_pages`, now full of
        data) at ``offset``: they take the place of the pages there.

        The old pages become spares, unless views of :meth:`pread_views` are lent
        (one might show an old page): then they are left to the garbage collector.
        """
        store, spares = self._pages, self._spares
        with self._lock:
            recycle = not self._lent
            for page, data in enumerate(pages, offset // self.page_size):
                old = store.get(page)
                store[page] = data
                if old is None:
                    bisect.insort(self._index, page)
                elif recycle and len(spares) < self._max_spares:
                    spares.append(old)

    def _page(self, page: int) -> memoryview:
        data = self._pages.get(page)
        if data is None:
            data = self._pages[page] = memoryview(bytearray(self.page_size))
            bisect.insort(self._index, page)
        return data

    def _drop(self, page: int) -> None:
        if self._pages.pop(page, None) is not None:
            del self._index[bisect.bisect_left(self._index, page)]

    def flush(self) -> None:
        pass

    def trim(self, length: int, offset: int, fua: bool) -> None:
        with self._lock:
            self._clear(length, offset)

    def zero(self, length: int, offset: int, may_trim: bool, fast: bool, fua: bool) -> None:
        # NO_HOLE asks that later writes cannot fail for lack of space; RAM cannot
        # promise that by allocating ahead (a 1 TiB zero would exhaust it), so zeroing
        # frees whole pages either way.
        with self._lock:
            self._clear(length, offset)

    def _clear(self, length: int, offset: int) -> None:
        """Zero the range: whole pages are freed, partial ones zeroed if present."""
        if not length or not self._index:
            return
        ps = self.page_size
        end = offset + length
        lo = bisect.bisect_left(self._index, offset // ps)
        hi = bisect.bisect_right(self._index, (end - 1) // ps)
        for page in self._index[lo:hi]:
            start = max(offset, page * ps)
            stop = min(end, (page + 1) * ps)
            if stop - start == ps:
                self._drop(page)
            else:
                inner = start - page * ps
                self._pages[page][inner : inner + stop - start] = self._zeroes[: stop - start]

    def extents(self, length: int, offset: int) -> list[Extent]:
        with self._lock:
            return self._extents(length, offset)

    def _extents(self, length: int, offset: int) -> list[Extent]:
        ps = self.page_size
        end = min(offset + length, self._size)
        out: list[Extent] = []
        pos = offset
        i = bisect.bisect_left(self._index, pos // ps)
        while pos < end and len(out) < _MAX_EXTENTS:
            page = pos // ps
            if i < len(self._index) and self._index[i] == page:
                # A run of consecutive allocated pages is data.
                while i + 1 < len(self._index) and self._index[i + 1] == self._index[i] + 1:
                    i += 1
                stop = min(end, (self._index[i] + 1) * ps)
                out.append((stop - pos, 0))
                i += 1
            else:
                stop = min(end, self._index[i] * ps) if i < len(self._index) else end
                out.append((stop - pos, _HOLE))
            pos = stop
        return out

    def cache(self, length: int, offset: int) -> None:
        pass
