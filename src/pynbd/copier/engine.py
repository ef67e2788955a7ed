"""The copy engine: plan the source into work, run it on many lanes at once.

A *plan* walks the source in offset order and cuts it into :class:`Work`: data to read
and write (at most ``request_size`` bytes, cut at multiples of it), ranges to zero, and
ranges to skip. What is data comes from the source's ``base:allocation`` (unless
``extents`` is off); with a dirty bitmap only what the bitmap marks dirty is data or
zero, the rest is skipped.

*Workers* (``requests`` per lane, each with its own buffer) take work from a bounded
queue and carry it out: read from the source, find the all-zero blocks of what was read
(``sparse``), write the rest and zero those. A destination stream is written in plan
order (each worker waits for the work before its own); a source stream is read by the
planner, which hands the filled buffer on.

The first failure stops the plan; the work already in flight is finished (its replies
are awaited, nothing is abandoned on a socket) before the error is raised with the
offset it happened at. Cancelling the copy (Ctrl-C under :func:`asyncio.run`) does the
same, then flushes the destination and raises :class:`CopyInterrupted`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import mmap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

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
    "Progress",
    "Work",
    "zero_runs",
]

#: The block status window: how much of the source one planning step maps.
MAP_WINDOW = 1 << 30
#: The largest zero request the plan makes (big enough to be cheap, small enough that
#: progress moves and several lanes share a large hole).
ZERO_CHUNK = 1 << 26
#: How often (seconds) the progress callback is called at most while copying.
PROGRESS_PERIOD = 0.1

_ZERO = int(StateFlag.ZERO)
T = TypeVar("T")

#: progress(done_bytes, total_bytes or None)
Progress = Callable[[int, "int | None"], None]


class CopyError(NBDError):
    """The copy failed; the message names the end and the offset.

    Attributes:
        offset: where it failed (None before any byte was copied).
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
    """One piece of the plan. ``filled``: a buffer the planner already read it into
    (a source stream), with ``length`` valid bytes."""

    kind: Kind
    offset: int
    length: int
    seq: int = 0
    filled: memoryview | None = None


@dataclass(frozen=True, slots=True)
class CopyOptions:
    """How to copy (the arguments of :func:`pynbd.copy`)."""

    connections: int | None = None
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


@dataclass(slots=True)
class _Failure:
    exc: BaseException
    message: str
    offset: int


@dataclass
class Copier:
    """One copy from ``src`` to ``dst`` (both opened); :meth:`run` does it once."""

    src: End
    dst: End
    options: CopyOptions
    progress: Progress | None = None
    result: CopyResult = field(default_factory=CopyResult)
    _failure: _Failure | None = None
    _stopping: bool = False
    _done: int = 0
    _total: int | None = None
    _last_report: float = 0.0
    _skip_zero: bool = False

    async def run(self) -> CopyResult:
        """Copy; returns the result, or raises CopyError / CopyInterrupted."""
        opts = self.options
        start = time.monotonic()
        lanes = self._lanes()
        await self.src.set_lanes(lanes)
        await self.dst.set_lanes(lanes)
        self.result.connections = lanes
        self._total = self.src.size
        await self.dst.prepare(self.src.size, keep=opts.dirty_bitmap is not None)
        self._skip_zero = not (self.dst.stream or opts.allocated or opts.dirty_bitmap) and (
            self.dst.zero_start or opts.destination_is_zero
        )
        per_lane = max(1, min(opts.requests, opts.queue_size // opts.request_size))
        workers = lanes * per_lane
        self._queue: asyncio.Queue[Work | None] = asyncio.Queue(maxsize=workers)
        self._turns: dict[int, asyncio.Future[None]] = {}
        self._written_seq = 0
        self._free: asyncio.Queue[memoryview] = asyncio.Queue()
        buffers = self._buffers(workers + 1 if self.src.stream else workers)
        tasks = [asyncio.create_task(self._worker(i % lanes, buffers[i])) for i in range(workers)]
        if self.src.stream:
            # The planner reads a stream into these; the workers' own stay unused.
            for buf in buffers:
                self._free.put_nowait(buf)
        planner = asyncio.create_task(self._feed(workers))
        interrupted = False
        try:
            await asyncio.wait([planner, *tasks])
        except asyncio.CancelledError:
            interrupted = True
            self._stop()
            planner.cancel()
            # Drain: every worker finishes the work it holds; replies are awaited.
            await asyncio.wait([planner, *tasks])
        self.result.seconds = time.monotonic() - start
        if interrupted:
            await self._flush_after_stop()
            stopped = CopyInterrupted(self._stopped_message("interrupted"), self._done)
            stopped.result = self.result
            raise stopped
        if self._failure is not None:
            err = CopyError(self._failure.message, self._failure.offset)
            err.result = self.result
            raise err from self._failure.exc
        await self.dst.finish(self.result.size)
        if opts.flush:
            await self.dst.flush()
        self.result.seconds = time.monotonic() - start
        self._report(force=True)
        return self.result

    # -- the plan ----------------------------------------------------------------------

    def _lanes(self) -> int:
        wanted = self.options.connections
        if self.src.stream or self.dst.stream:
            return 1
        n = 4 if wanted is None else wanted
        for end in (self.src, self.dst):
            if end.lanes is not None:
                n = min(n, end.lanes)
        return n

    def _buffers(self, count: int) -> list[memoryview]:
        """One buffer per worker, cut from one anonymous mapping: its pages cost
        nothing until a worker first reads into them."""
        size = self.options.request_size
        arena = memoryview(mmap.mmap(-1, size * count))
        return [arena[i * size : (i + 1) * size] for i in range(count)]

    async def _feed(self, workers: int) -> None:
        seq = 0
        pos = 0
        try:
            async for work in self._plan():
                if self._stopping:
                    break
                pos = work.offset
                if work.kind is Kind.SKIP:
                    self._count(work.length, skipped=True)
                    continue
                work.seq = seq
                seq += 1
                await self._queue.put(work)
        except Exception as exc:
            self._fail(exc, f"mapping {self.src.label}", pos)
        finally:
            # One stop mark per worker, behind the work queued (which, once stopping,
            # the workers pass over).
            for _ in range(workers):
                await self._queue.put(None)

    async def _plan(self) -> AsyncIterator[Work]:
        if self.src.stream:
            async for work in self._plan_stream():
                yield work
            return
        size = self.src.size
        assert size is not None
        opts = self.options
        bitmap = opts.bitmap_context
        use_alloc = opts.extents and self.src.can_extents
        pos = 0
        while pos < size:
            end = min(size, pos + MAP_WINDOW)
            if bitmap is not None:
                contexts = (BASE_ALLOCATION, bitmap) if use_alloc else (bitmap,)
                maps = await self.src.extents(end - pos, pos, contexts)
                alloc = maps[BASE_ALLOCATION] if use_alloc else _all_data(pos, end)
                pieces = [
                    (p.offset, p.length, _bitmap_kind(p.flags_a, p.flags_b))
                    for p in intersect(alloc, maps[bitmap])
                ]
            elif use_alloc:
                got = await self.src.extents(end - pos, pos, (BASE_ALLOCATION,))
                pieces = [
                    (e.offset, e.length, Kind.ZERO if e.flags & _ZERO else Kind.DATA)
                    for e in got[BASE_ALLOCATION]
                ]
            else:
                pieces = [(pos, end - pos, Kind.DATA)]
            if not pieces:
                raise CopyError(f"the source gave no extent at offset {pos}", pos)
            for offset, length, kind in pieces:
                length = min(length, end - offset)
                if length <= 0:
                    continue
                for work in self._cut(kind, offset, length):
                    yield work
            pos = min(end, pieces[-1][0] + pieces[-1][1])

    def _cut(self, kind: Kind, offset: int, length: int) -> list[Work]:
        """One extent as requests, cut at multiples of their size."""
        if kind is Kind.ZERO and self._skip_zero:
            kind = Kind.SKIP
        if kind is Kind.SKIP:
            return [Work(kind, offset, length)]
        step = self.options.request_size if kind is Kind.DATA else ZERO_CHUNK
        out = []
        stop = offset + length
        while offset < stop:
            n = min(step - offset % step, stop - offset)
            out.append(Work(kind, offset, n))
            offset += n
        return out

    async def _plan_stream(self) -> AsyncIterator[Work]:
        pos = 0
        limit = self.dst.size
        while True:
            buf = await self._free.get()
            n = await self._do(self.src.read(0, buf, pos), "reading", self.src, pos)
            if n == 0:
                self._free.put_nowait(buf)
                self._total = pos
                return
            if limit is not None and pos + n > limit:
                raise CopyError(
                    f"the source is larger than the destination {self.dst.label} ({limit} bytes)",
                    pos,
                )
            yield Work(Kind.DATA, pos, n, filled=buf)
            pos += n
            if n < len(buf):
                self._total = pos
                return

    # -- the workers -------------------------------------------------------------------

    async def _worker(self, lane: int, buf: memoryview) -> None:
        while True:
            work = await self._queue.get()
            if work is None:
                return
            if self._failure is not None or self._stopping:
                self._release(work)
                self._pass_turn(work)
                continue
            try:
                await self._carry_out(lane, buf, work)
            except _Abandoned:
                pass
            except Exception as exc:
                self._fail(exc, "copying", work.offset)
                self._pass_turn(work)
            self._release(work)

    def _release(self, work: Work) -> None:
        if work.filled is not None:
            self._free.put_nowait(work.filled)
            work.filled = None

    async def _carry_out(self, lane: int, buf: memoryview, work: Work) -> None:
        src, dst, res = self.src, self.dst, self.result
        offset, length = work.offset, work.length
        if work.kind is Kind.ZERO:
            await self._turn(work)
            await self._do(
                dst.zero(lane, length, offset, allocated=self.options.allocated),
                "zeroing",
                dst,
                offset,
            )
            res.zeroed_bytes += length
            self._pass_turn(work)
            self._count(length)
            return
        if work.filled is not None:
            view = work.filled[:length]
        else:
            view = buf[:length]
            await self._do(src.read(lane, view, offset), "reading", src, offset)
        res.read_bytes += length
        await self._turn(work)
        for start, stop, zero in zero_runs(view, self._sparse_block()):
            n = stop - start
            if not zero:
                await self._do(
                    dst.write(lane, view[start:stop], offset + start),
                    "writing",
                    dst,
                    offset + start,
                )
                res.written_bytes += n
            elif self._skip_zero:
                res.skipped_bytes += n
            else:
                await self._do(
                    dst.zero(lane, n, offset + start, allocated=self.options.allocated),
                    "zeroing",
                    dst,
                    offset + start,
                )
                res.zeroed_bytes += n
        self._pass_turn(work)
        self._count(length)

    def _sparse_block(self) -> int:
        return 0 if self.options.allocated else self.options.sparse

    async def _do(self, aw: Awaitable[T], doing: str, end: End, offset: int) -> T:
        try:
            return await aw
        except (OSError, NBDError) as exc:
            raise CopyError(f"{doing} {end.label} at offset {offset}: {_why(exc)}", offset) from exc

    # -- a destination stream: written in plan order -------------------------------------

    async def _turn(self, work: Work) -> None:
        if not self.dst.stream or work.seq == self._written_seq:
            return
        fut = asyncio.get_running_loop().create_future()
        self._turns[work.seq] = fut
        await fut
        if self._stopping:
            raise _Abandoned  # the work before this one will never be written

    def _pass_turn(self, work: Work) -> None:
        if not self.dst.stream or work.seq != self._written_seq:
            return
        self._written_seq += 1
        nxt = self._turns.pop(self._written_seq, None)
        if nxt is not None and not nxt.done():
            nxt.set_result(None)

    # -- accounting --------------------------------------------------------------------

    def _stop(self) -> None:
        self._stopping = True
        for fut in self._turns.values():
            if not fut.done():
                fut.set_result(None)
        self._turns.clear()

    def _fail(self, exc: BaseException, doing: str, offset: int) -> None:
        if self._failure is not None:
            return
        self._stop()
        if isinstance(exc, CopyError):
            message, offset = str(exc), exc.offset if exc.offset is not None else offset
        else:
            message = f"{doing} at offset {offset}: {_why(exc)}"
        self._failure = _Failure(exc, message, offset)

    def _count(self, n: int, *, skipped: bool = False) -> None:
        if skipped:
            self.result.skipped_bytes += n
        self.result.size += n
        self._done += n
        self._report()

    def _report(self, force: bool = False) -> None:
        if self.progress is None:
            return
        now = time.monotonic()
        if force or now - self._last_report >= PROGRESS_PERIOD:
            self._last_report = now
            self.progress(self._done, self._total)

    async def _flush_after_stop(self) -> None:
        with contextlib.suppress(OSError, NBDError):
            await self.dst.flush()

    def _stopped_message(self, why: str) -> str:
        total = "" if self._total is None else f" of {self._total}"
        return (
            f"{why} after {self._done}{total} bytes; the requests in flight were finished "
            f"and {self.dst.label} flushed"
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
