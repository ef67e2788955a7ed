"""The copy engine: plan the source into work, run it on several lanes at once.

The *plan* (:class:`Plan`) walks the source in offset order and cuts it into
:class:`Work`: data to read and write (at most ``request_size`` bytes, cut at multiples
of it), ranges to zero, and ranges to skip. What is data comes from the source's
``base:allocation`` (unless ``extents`` is off); with a dirty bitmap only what the bitmap
marks dirty is data or zero, the rest is skipped.

A *lane* is one connection to each end. Each lane has two threads and a ring of
``requests`` buffers: the reader takes a batch of work from the plan (up to
:data:`BATCH` requests), reads it into free buffers with the requests pipelined, and
passes it on; the writer finds the all-zero blocks of what was read (``sparse``),
writes the rest (pipelined too), zeroes those, and hands the buffers back. So reading
and writing overlap, and each connection is used by one thread only. The threads block
in the clients' socket calls, where Python lets the other threads run: the blocking
client costs a fraction of an event loop's work per request. A stream end has one lane, whose
reader and writer keep the plan's order.

The first failure stops the plan; every request already sent is finished (each thread
completes its call; nothing is abandoned on a socket) before the error is raised with
the offset it happened at. :meth:`Copier.stop` (Ctrl-C) does the same, then flushes the
destination, and :meth:`Copier.run` raises :class:`CopyInterrupted`.
"""

from __future__ import annotations

import contextlib
import enum
import mmap
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeAlias, TypeVar

from ..client import MappedExtent
from ..client.extents import intersect
from ..errors import NBDError
from ..proto.constants import BASE_ALLOCATION, StateFlag
from .endpoints import End

__all__ = [
    "Copier",
    "CopyError",
    "CopyInterrupted",
    "CopyOptions",
    "CopyResult",
    "Plan",
    "Progress",
    "Work",
    "zero_runs",
]

#: The block status window: how much of the source one planning step maps.
MAP_WINDOW = 1 << 30
#: The largest zero request the plan makes (big enough to be cheap, small enough that
#: progress moves and several lanes share a large hole).
ZERO_CHUNK = 1 << 26
#: The most requests a lane sends at once (pipelined) on each side.
BATCH = 16
#: How often (seconds) the progress callback is called at most while copying.
PROGRESS_PERIOD = 0.1

_ZERO = int(StateFlag.ZERO)
_T = TypeVar("_T")

#: progress(done_bytes, total_bytes or None)
Progress = Callable[[int, "int | None"], None]


class CopyError(NBDError):
    """The copy failed; the message names the end and the offset.

    Attributes:
        offset: where it failed (None when that is not known: an internal error).
        result: what had been done when it stopped.
    """

    def __init__(self, message: str, offset: int | None = None) -> None:
        super().__init__(message)
        self.offset = offset
        self.result: CopyResult | None = None


class CopyInterrupted(CopyError):
    """The copy was cancelled; in-flight requests were drained, the destination flushed."""


class Kind(enum.Enum):
    DATA = "data"
    ZERO = "zero"
    SKIP = "skip"


@dataclass(slots=True)
class Work:
    """One piece of the plan."""

    kind: Kind
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class CopyOptions:
    """How to copy (the arguments of :func:`pynbd.copy`)."""

    connections: int | None = None
    threads: int | None = None
    requests: int = 64
    request_size: int = 256 * 1024
    queue_size: int = 16 << 20
    sparse: int = 4096
    flush: bool = False
    destination_is_zero: bool = False
    allocated: bool = False
    extents: bool = True
    dirty_bitmap: str | None = None

    def check(self) -> None:
        """Raises ValueError for values out of range."""
        if self.connections is not None and self.connections < 1:
            raise ValueError("connections must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise ValueError("threads must be at least 1")
        if self.requests < 1:
            raise ValueError("requests must be at least 1")
        if not 512 <= self.request_size <= 32 << 20:
            raise ValueError("request size must be between 512 bytes and 32 MiB")
        if self.queue_size < self.request_size:
            raise ValueError("queue size must hold at least one request")
        if self.sparse < 0 or (self.sparse and self.request_size % self.sparse):
            raise ValueError("sparse block size must divide the request size (0: off)")

    @property
    def bitmap_context(self) -> str | None:
        return None if self.dirty_bitmap is None else f"qemu:dirty-bitmap:{self.dirty_bitmap}"


@dataclass(slots=True)
class CopyResult:
    """What a copy did. Byte counts are of the source's range.

    Attributes:
        size: the bytes of the source covered (read, zeroed or skipped).
        read_bytes: read from the source.
        written_bytes: written to the destination as data.
        zeroed_bytes: made zero on the destination (WRITE_ZEROES, holes, zero writes).
        skipped_bytes: left alone: zero already, or clean in the dirty bitmap.
        seconds: the wall time of the copy.
        connections: lanes used.
    """

    size: int = 0
    read_bytes: int = 0
    written_bytes: int = 0
    zeroed_bytes: int = 0
    skipped_bytes: int = 0
    seconds: float = 0.0
    connections: int = 1


class Plan:
    """The source cut into work, in offset order, taken by the lanes' readers.

    :meth:`take` is called with the plan's lock held and maps the source a window at
    a time on the calling lane's connection (each reader owns its lane's source side).
    """

    def __init__(self, src: End, options: CopyOptions, skip_zero: bool) -> None:
        self.src = src
        self.options = options
        self.skip_zero = skip_zero
        self.lock = threading.Lock()
        self.pos = 0  # what is planned so far: [0, pos)
        self.end: int | None = src.size  # None: a stream, until its end is read
        self._pending: deque[Work] = deque()
        self._use_alloc = options.extents and src.can_extents

    def take(self, lane: int) -> Work | None:
        """The next work, or None when the plan is done."""
        while not self._pending:
            if self.end is not None and self.pos >= self.end:
                return None
            self._map(lane)
        return self._pending.popleft()

    def stream_end(self, end: int) -> None:
        """A source stream ended at ``end``: nothing more to plan."""
        self.end = end
        self._pending.clear()

    def _map(self, lane: int) -> None:
        opts = self.options
        pos = self.pos
        if self.end is None:  # a stream: data until it ends
            self._pending.append(Work(Kind.DATA, pos, opts.request_size))
            self.pos += opts.request_size
            return
        end = min(self.end, pos + MAP_WINDOW)
        bitmap = opts.bitmap_context
        if bitmap is not None:
            contexts = (BASE_ALLOCATION, bitmap) if self._use_alloc else (bitmap,)
            maps = self.src.extents(lane, end - pos, pos, contexts)
            alloc = maps[BASE_ALLOCATION] if self._use_alloc else _all_data(pos, end)
            pieces = [
                (p.offset, p.length, _bitmap_kind(p.flags_a, p.flags_b))
                for p in intersect(alloc, maps[bitmap])
            ]
        elif self._use_alloc:
            got = self.src.extents(lane, end - pos, pos, (BASE_ALLOCATION,))
            pieces = [
                (e.offset, e.length, Kind.ZERO if e.flags & _ZERO else Kind.DATA)
                for e in got[BASE_ALLOCATION]
            ]
        else:
            pieces = [(pos, end - pos, Kind.DATA)]
        if not pieces or pieces[0][0] != pos:
            raise CopyError(f"the source gave no extent at offset {pos}", pos)
        for offset, length, kind in pieces:
            length = min(length, end - offset)
            if length > 0:
                self._pending.extend(self._cut(kind, offset, length))
        self.pos = min(end, pieces[-1][0] + pieces[-1][1])

    def _cut(self, kind: Kind, offset: int, length: int) -> Iterator[Work]:
        """One extent as requests, cut at multiples of their size."""
        if kind is Kind.ZERO and self.skip_zero:
            kind = Kind.SKIP
        if kind is Kind.SKIP:
            yield Work(kind, offset, length)
            return
        step = self.options.request_size if kind is Kind.DATA else ZERO_CHUNK
        stop = offset + length
        while offset < stop:
            n = min(step - offset % step, stop - offset)
            yield Work(kind, offset, n)
            offset += n


#: A lane's free buffers (None: stop) and its batches read, for the writer (None: end).
_Free: TypeAlias = "queue.SimpleQueue[memoryview | None]"
_Ready: TypeAlias = "queue.SimpleQueue[list[tuple[Work, memoryview | None]] | None]"


class _Stop(Exception):
    """Raised in a lane's thread when the copy is stopping."""


class Copier:
    """One copy from ``src`` to ``dst`` (both opened); :meth:`run` does it once.

    Args:
        src, dst: the ends.
        options: how to copy.
        progress: called with (bytes done, total or None) from the copying threads,
            at most every :data:`PROGRESS_PERIOD` seconds and once at the end.
    """

    def __init__(
        self, src: End, dst: End, options: CopyOptions, progress: Progress | None = None
    ) -> None:
        self.src = src
        self.dst = dst
        self.options = options
        self.progress = progress
        self.result = CopyResult()
        self._lock = threading.Lock()
        self._stopping = False
        self._interrupted = False
        # The first failure, and what caused it (the same error, or the end's).
        self._failure: tuple[CopyError, BaseException] | None = None
        self._free: list[_Free] = []
        self._last_report = 0.0
        self._report_lock = threading.Lock()

    def stop(self) -> None:
        """Stop the copy from any thread: :meth:`run` finishes the requests in flight,
        flushes the destination and raises CopyInterrupted."""
        self._interrupted = True
        self._halt()

    def run(self) -> CopyResult:
        """Copy; returns the result, or raises CopyError / CopyInterrupted.

        A KeyboardInterrupt while it waits is taken as :meth:`stop`.
        """
        opts = self.options
        start = time.monotonic()
        lanes = self._lanes()
        self.src.set_lanes(lanes)
        self.dst.set_lanes(lanes)
        self.result.connections = lanes
        self.dst.prepare(self.src.size, keep=opts.dirty_bitmap is not None)
        skip_zero = not (self.dst.stream or opts.allocated or opts.dirty_bitmap) and (
            self.dst.zero_start or opts.destination_is_zero
        )
        self._skip_zero = skip_zero
        self._sparse = 0 if opts.allocated else opts.sparse
        self.plan = Plan(self.src, opts, skip_zero)
        per_lane = max(1, min(opts.requests, opts.queue_size // opts.request_size))
        # A reader fills a batch while the writer sends the one before.
        self._batch = max(1, min(BATCH, per_lane // 2))
        buffers = self._buffers(lanes * per_lane)
        threads = []
        for lane in range(lanes):
            free: _Free = queue.SimpleQueue()
            for buf in buffers[lane * per_lane : (lane + 1) * per_lane]:
                free.put(buf)
            self._free.append(free)
            ready: _Ready = queue.SimpleQueue()
            for target in (self._reader, self._writer):
                threads.append(
                    threading.Thread(
                        target=self._guarded,
                        args=(target, lane, free, ready),
                        name=f"pynbd-copy-{target.__name__[1:]}-{lane}",
                    )
                )
        started: list[threading.Thread] = []
        try:
            for t in threads:
                t.daemon = True
                t.start()
                started.append(t)
            for t in started:
                t.join()
        except KeyboardInterrupt:
            self.stop()
            for t in started:
                t.join()
        self.result.seconds = time.monotonic() - start
        if self._failure is not None:
            err, cause = self._failure
            err.result = self.result
            raise err from cause
        if self._interrupted:
            with contextlib.suppress(OSError, NBDError):
                self.dst.flush()
            stopped = CopyInterrupted(self._stopped_message(), self.result.size)
            stopped.result = self.result
            raise stopped
        self.dst.finish(self.result.size)
        if opts.flush:
            self.dst.flush()
        self.result.seconds = time.monotonic() - start
        self._report(force=True)
        return self.result

    def _lanes(self) -> int:
        """Connections: the option (default 4), no more than the threads (default one
        per processor, as nbdcopy counts them) nor than either end allows."""
        if self.src.stream or self.dst.stream:
            return 1
        opts = self.options
        n = 4 if opts.connections is None else opts.connections
        n = min(n, opts.threads or os.cpu_count() or 1)
        for end in (self.src, self.dst):
            if end.lanes is not None:
                n = min(n, end.lanes)
        return n

    def _buffers(self, count: int) -> list[memoryview]:
        """The buffers, cut from one anonymous mapping: its pages cost nothing until a
        reader first fills them."""
        size = self.options.request_size
        arena = memoryview(mmap.mmap(-1, size * count))
        return [arena[i * size : (i + 1) * size] for i in range(count)]

    # -- the lanes -----------------------------------------------------------------------

    def _guarded(self, target: Callable[..., None], *args: object) -> None:
        """A lane's thread: whatever escapes it (a bug) still stops the copy."""
        try:
            target(*args)
        except BaseException as exc:  # kept as the copy error's cause
            self._fail(CopyError(f"internal error: {type(exc).__name__}: {exc}"), exc)

    def _reader(self, lane: int, free: _Free, ready: _Ready) -> None:
        """Take work, read it into free buffers, pass it on to the lane's writer.

        Up to a batch of reads go out together (pipelined); a source stream is read
        one request at a time, to find its end.
        """
        src = self.src
        batch = 1 if src.stream else self._batch
        try:
            while not self._stopping:
                first = free.get()
                if first is None:
                    return
                bufs = [first]
                while len(bufs) < batch:
                    try:
                        more = free.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        return
                    bufs.append(more)
                items, after, done = self._take(lane, len(bufs))
                for buf in bufs[len(items) :]:
                    free.put(buf)
                if items:
                    reads = [(bufs[k][: w.length], w.offset) for k, w in enumerate(items)]
                    try:
                        got = self._read(lane, reads)
                    except _Stop:
                        for buf in bufs[: len(items)]:
                            free.put(buf)
                        raise
                    ready.put(self._received(items, bufs, got, free))
                if after:
                    ready.put([(after, None)])
                if done:
                    return
        except _Stop:
            return
        finally:
            ready.put(None)

    def _take(self, lane: int, count: int) -> tuple[list[Work], Work | None, bool]:
        """Up to ``count`` data work from the plan, in order, skips counted; then the
        zero work that ended the run of data, if one did; and whether the plan is done."""
        plan = self.plan
        items: list[Work] = []
        with plan.lock:
            while len(items) < count:
                work = self._guard("mapping", self.src, plan.pos, plan.take, lane)
                if work is None:
                    return items, None, True
                if work.kind is Kind.SKIP:
                    self._count_skipped(work.length)
                elif work.kind is Kind.ZERO:
                    return items, work, False  # after the data before it
                else:
                    items.append(work)
        return items, None, False

    def _read(self, lane: int, reads: list[tuple[memoryview, int]]) -> list[int]:
        src = self.src
        if len(reads) == 1:
            view, offset = reads[0]
            return [self._guard("reading", src, offset, src.read, lane, view, offset)]
        self._guard("reading", src, reads[0][1], src.read_many, lane, reads)
        return [len(view) for view, _ in reads]

    def _received(
        self, items: list[Work], bufs: list[memoryview], got: list[int], free: _Free
    ) -> list[tuple[Work, memoryview | None]]:
        out: list[tuple[Work, memoryview | None]] = []
        for work, buf, n in zip(items, bufs, got, strict=False):
            if n < work.length:  # a source stream ended
                with self.plan.lock:
                    self.plan.stream_end(work.offset + n)
                if n == 0:
                    free.put(buf)
                    continue
                work.length = n
            self._check_room(work)
            out.append((work, buf))
        return out

    def _check_room(self, work: Work) -> None:
        """A source stream must fit a destination of fixed size."""
        limit = self.dst.size
        if limit is None or not self.src.stream or self.dst.grows:
            return
        if work.offset + work.length > limit:
            self._fail(
                CopyError(
                    f"the source is larger than the destination {self.dst.label} ({limit} bytes)",
                    limit,
                )
            )
            raise _Stop

    def _writer(self, lane: int, free: _Free, ready: _Ready) -> None:
        """Write or zero what the reader passes, in its order; hand the buffers back."""
        while (items := ready.get()) is not None:
            try:
                if not self._stopping:  # else read but not written: dropped
                    self._write(lane, items)
            except _Stop:
                pass
            finally:
                for _, buf in items:
                    if buf is not None:
                        free.put(buf)

    def _write(self, lane: int, items: list[tuple[Work, memoryview | None]]) -> None:
        """Write a batch: zero what is zero, skip it on a zero destination, and send
        the data pipelined (a stream: each piece at once, in order)."""
        stream = self.dst.stream
        writes: list[tuple[memoryview, int]] = []
        written = zeroed = skipped = read = 0
        for work, buf in items:
            if buf is None:
                self._zero(lane, work.length, work.offset)
                zeroed += work.length
                continue
            read += work.length
            view = buf[: work.length]
            for start, stop, zero in zero_runs(view, self._sparse):
                at = work.offset + start
                if not zero:
                    writes.append((view[start:stop], at))
                    written += stop - start
                elif self._skip_zero:
                    skipped += stop - start
                else:
                    self._zero(lane, stop - start, at)
                    zeroed += stop - start
                if stream and writes:
                    self._send(lane, writes)
                    writes = []
        if writes:
            self._send(lane, writes)
        res = self.result
        with self._lock:
            res.written_bytes += written
            res.zeroed_bytes += zeroed
            res.skipped_bytes += skipped
            res.read_bytes += read
            res.size += sum(work.length for work, _ in items)
        self._report()

    def _send(self, lane: int, writes: list[tuple[memoryview, int]]) -> None:
        dst = self.dst
        if len(writes) == 1:
            view, offset = writes[0]
            self._guard("writing", dst, offset, dst.write, lane, view, offset)
        else:
            self._guard("writing", dst, writes[0][1], dst.write_many, lane, writes)

    def _zero(self, lane: int, length: int, offset: int) -> None:
        allocated = self.options.allocated
        self._guard("zeroing", self.dst, offset, self.dst.zero, lane, length, offset, allocated)

    def _guard(
        self, doing: str, end: End, offset: int, func: Callable[..., _T], *args: object
    ) -> _T:
        """Call an end; a failure stops the copy (the first is kept) and raises _Stop."""
        try:
            return func(*args)
        except CopyError as exc:
            self._fail(exc)
            raise _Stop from exc
        except (OSError, NBDError, ValueError) as exc:
            # Which of several pipelined requests failed, when the end could tell.
            at = getattr(exc, "request_offset", None)
            offset = offset if at is None else at
            self._fail(
                CopyError(f"{doing} {end.label} at offset {offset}: {_why(exc)}", offset), exc
            )
            raise _Stop from exc

    # -- stopping and accounting ---------------------------------------------------------

    def _halt(self) -> None:
        self._stopping = True
        for free in self._free:
            free.put(None)  # wakes a reader waiting for a buffer

    def _fail(self, err: CopyError, cause: BaseException | None = None) -> None:
        with self._lock:
            if self._failure is not None:
                return
            self._failure = (err, cause or err)
        self._halt()

    def _count_skipped(self, n: int) -> None:
        res = self.result
        with self._lock:
            res.skipped_bytes += n
            res.size += n
        self._report()

    def _report(self, force: bool = False) -> None:
        if self.progress is None:
            return
        now = time.monotonic()
        if not force and now - self._last_report < PROGRESS_PERIOD:
            return
        # One thread reports at a time; the others go on copying.
        if self._report_lock.acquire(blocking=force):
            try:
                self._last_report = now
                self.progress(self.result.size, self.plan.end)
            finally:
                self._report_lock.release()

    def _stopped_message(self) -> str:
        total = "" if self.plan.end is None else f" of {self.plan.end}"
        return (
            f"interrupted after {self.result.size}{total} bytes; the requests in flight "
            f"were finished and {self.dst.label} flushed"
        )


def zero_runs(view: memoryview, block: int) -> list[tuple[int, int, bool]]:
    """Cut ``view`` into runs of data and of all-zero ``block``-sized blocks.

    Returns ``(start, stop, is_zero)`` triples covering the view, adjacent runs of the
    same kind merged. ``block`` 0 finds nothing (one data run); blocks are counted from
    the view's start, and a last partial block is zero only if it is all zero.
    """
    n = len(view)
    if not block or not n:
        return [(0, n, False)] if n else []
    # The first byte of every block, in one C-level copy: a block that starts with a
    # non-zero byte is data, so most data is settled without looking further.
    firsts = bytes(view[::block])
    if 0 not in firsts:
        return [(0, n, False)]
    if not firsts.strip(b"\0") and bytes(view) == _zeroes(n):
        return [(0, n, True)]
    # Only the blocks that start with a zero byte can be zero.
    zeroes = _zeroes(block)
    runs: list[tuple[int, int, bool]] = []
    pos = 0  # the end of the runs so far
    i = firsts.find(0)
    while i >= 0:
        start = i * block
        stop = min(start + block, n)
        if bytes(view[start:stop]) == zeroes[: stop - start]:
            if start > pos:
                runs.append((pos, start, False))
            if runs and runs[-1][2] and runs[-1][1] == start:
                runs[-1] = (runs[-1][0], stop, True)
            else:
                runs.append((start, stop, True))
            pos = stop
        i = firsts.find(0, i + 1)
    if pos < n:
        runs.append((pos, n, False))
    return runs


_ZERO_CACHE: dict[int, bytes] = {}


def _zeroes(n: int) -> bytes:
    z = _ZERO_CACHE.get(n)
    if z is None:
        z = _ZERO_CACHE[n] = bytes(n)
    return z


class _Abandoned(Exception):
    """A worker's turn to write a stream will not come: the copy is stopping."""


def _all_data(start: int, end: int) -> list[MappedExtent]:
    return [MappedExtent(start, end - start, 0)]


def _bitmap_kind(alloc: int, dirty: int) -> Kind:
    if not dirty & 1:
        return Kind.SKIP
    return Kind.ZERO if alloc & _ZERO else Kind.DATA


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, NBDError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
