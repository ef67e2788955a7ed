"""The copy engine against ends written here: what it plans, in what order it writes
a stream, how it stops on a failure and on cancellation.

The ends are in memory; the engine calls them from its lanes' threads, which give way
to each other inside every call so that requests complete out of order. Nothing
depends on timing.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pynbd.client import MappedExtent
from pynbd.copier import CopyError, CopyInterrupted, CopyOptions, CopyResult, zero_runs
from pynbd.copier.endpoints import End
from pynbd.copier.engine import Copier
from pynbd.proto.constants import BASE_ALLOCATION

HOLE_ZERO = 3
BITMAP = "qemu:dirty-bitmap:b0"


class MemEnd(End):
    """An in-memory end with a base:allocation map (and a dirty bitmap) of its own."""

    def __init__(
        self,
        data: bytes | int,
        *,
        extents: list[tuple[int, int]] | None = None,
        bitmap: list[tuple[int, int]] | None = None,
        lanes: int | None = None,
        zero_start: bool = False,
        fail_at: int | None = None,
        seed: int = 0,
    ) -> None:
        self.data = bytearray(data)
        self.size = len(self.data)
        self.label = "mem"
        self.lanes = lanes
        self.zero_start = zero_start
        self.can_extents = extents is not None
        self._maps = {BASE_ALLOCATION: extents or [], BITMAP: bitmap or []}
        self.fail_at = fail_at
        self.log: list[tuple[str, int, int]] = []
        self.in_flight = 0
        self._lock = threading.Lock()
        self.flushed = 0
        self.lanes_set = 0
        self._rng = random.Random(seed)

    def _yield(self) -> None:
        if self._rng.randrange(3):
            time.sleep(0)

    def set_lanes(self, lanes: int) -> None:
        self.lanes_set = lanes

    def read(self, lane: int, view: memoryview, offset: int) -> int:
        with self._lock:
            self.in_flight += 1
        try:
            self._yield()
            if self.fail_at is not None and offset <= self.fail_at < offset + len(view):
                raise OSError(5, "Input/output error")
            view[:] = self.data[offset : offset + len(view)]
            self.log.append(("read", offset, len(view)))
            return len(view)
        finally:
            with self._lock:
                self.in_flight -= 1

    def write(self, lane: int, view: memoryview, offset: int) -> None:
        with self._lock:
            self.in_flight += 1
        try:
            self._yield()
            if self.fail_at is not None and offset <= self.fail_at < offset + len(view):
                raise OSError(28, "No space left on device")
            self.data[offset : offset + len(view)] = view
            self.log.append(("write", offset, len(view)))
        finally:
            with self._lock:
                self.in_flight -= 1

    def zero(self, lane: int, length: int, offset: int, allocated: bool) -> None:
        self._yield()
        self.data[offset : offset + length] = bytes(length)
        self.log.append(("zero", offset, length))

    def extents(
        self, lane: int, length: int, offset: int, contexts: tuple[str, ...]
    ) -> dict[str, list[MappedExtent]]:
        out = {}
        for name in contexts:
            pieces, pos = [], 0
            for n, flags in self._maps[name]:
                if pos + n > offset and pos < offset + length:
                    start = max(pos, offset)
                    pieces.append(MappedExtent(start, min(pos + n, offset + length) - start, flags))
                pos += n
            out[name] = pieces
        return out

    def flush(self) -> None:
        self.flushed += 1


class StreamOut(MemEnd):
    """A destination stream: fails the test if written out of order."""

    stream = True

    def __init__(self) -> None:
        super().__init__(b"")
        self.size = None
        self.pos = 0

    def write(self, lane: int, view: memoryview, offset: int) -> None:
        assert offset == self.pos, f"stream written at {offset}, expected {self.pos}"
        self._yield()
        assert offset == self.pos, "two writes of the stream at once"
        self.data += view
        self.pos += len(view)

    def zero(self, lane: int, length: int, offset: int, allocated: bool) -> None:
        self.write(lane, memoryview(bytes(length)), offset)


class StreamIn(MemEnd):
    stream = True

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.size = None
        self.pos = 0

    def read(self, lane: int, view: memoryview, offset: int) -> int:
        assert offset == self.pos
        n = min(len(view), len(self.data) - offset)
        view[:n] = self.data[offset : offset + n]
        self.pos += n
        return n


def run(src: End, dst: End, **options: object) -> CopyResult:
    opts = CopyOptions(**{"request_size": 4096, "requests": 4, **options})  # type: ignore[arg-type]
    return Copier(src, dst, opts).run()


def pattern(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


# -- zero_runs ------------------------------------------------------------------------


def _naive_runs(data: bytes, block: int) -> list[tuple[int, int, bool]]:
    out: list[tuple[int, int, bool]] = []
    for start in range(0, len(data), block):
        stop = min(start + block, len(data))
        zero = not any(data[start:stop])
        if out and out[-1][2] == zero:
            out[-1] = (out[-1][0], stop, zero)
        else:
            out.append((start, stop, zero))
    return out


@given(
    st.lists(st.sampled_from([b"\0" * 8, b"\0" * 7 + b"\1", b"\1" + b"\0" * 7, b"x" * 8])),
    st.sampled_from([1, 4, 8, 16]),
    st.integers(0, 7),
)
def test_zero_runs_agrees_with_the_naive_scan(parts: list[bytes], block: int, cut: int) -> None:
    data = b"".join(parts)
    data = data[: len(data) - cut] if cut < len(data) else data
    assert zero_runs(memoryview(bytearray(data)), block) == _naive_runs(data, block)


def test_zero_runs_off() -> None:
    assert zero_runs(memoryview(bytes(16)), 0) == [(0, 16, False)]
    assert zero_runs(memoryview(b""), 8) == []


# -- the plan -------------------------------------------------------------------------


def test_dense_copy_is_exact_and_cut_at_request_multiples() -> None:
    data = pattern(5 * 4096 + 1000)
    src, dst = MemEnd(data), MemEnd(len(data))
    result = run(src, dst)
    assert dst.data == data
    assert result.read_bytes == result.written_bytes == len(data) == result.size
    assert sorted(o for op, o, n in src.log) == [i * 4096 for i in range(6)]
    assert src.in_flight == dst.in_flight == 0


def test_zero_extents_become_zero_requests_and_holes_are_not_read() -> None:
    data = bytearray(pattern(16 * 4096))
    data[4096 : 3 * 4096] = bytes(2 * 4096)
    src = MemEnd(bytes(data), extents=[(4096, 0), (2 * 4096, HOLE_ZERO), (13 * 4096, 0)])
    dst = MemEnd(b"\xff" * len(data))
    result = run(src, dst)
    assert dst.data == data
    assert ("zero", 4096, 2 * 4096) in dst.log
    assert all(not (op == "read" and o in (4096, 8192)) for op, o, n in src.log)
    assert result.zeroed_bytes == 2 * 4096 and result.read_bytes == 14 * 4096


@pytest.mark.parametrize("why", ["zero_start", "destination_is_zero"])
def test_nothing_is_written_for_zeroes_on_a_zero_destination(why: str) -> None:
    data = bytearray(pattern(8 * 4096))
    data[0:4096] = bytes(4096)  # allocated zeroes, found by the sparse scan
    data[4096 * 4 : 4096 * 6] = bytes(2 * 4096)
    src = MemEnd(bytes(data), extents=[(4 * 4096, 0), (2 * 4096, HOLE_ZERO), (2 * 4096, 0)])
    dst = MemEnd(len(data), zero_start=why == "zero_start")
    result = run(src, dst, destination_is_zero=why == "destination_is_zero")
    assert dst.data == data
    assert [e for e in dst.log if e[0] == "zero"] == []
    assert result.skipped_bytes == 3 * 4096


def test_allocated_writes_every_zero() -> None:
    data = bytes(4 * 4096)
    src = MemEnd(data, extents=[(len(data), HOLE_ZERO)])
    dst = MemEnd(b"\x01" * len(data), zero_start=True)
    result = run(src, dst, allocated=True)
    assert dst.data == data and result.zeroed_bytes == len(data) and result.skipped_bytes == 0


def test_no_extents_reads_everything() -> None:
    data = bytes(4 * 4096)
    src = MemEnd(data, extents=[(len(data), HOLE_ZERO)])
    result = run(src, MemEnd(len(data)), extents=False)
    assert result.read_bytes == len(data)


def test_sparse_scan_finds_zero_blocks_inside_data() -> None:
    data = bytearray(pattern(4 * 4096))
    data[1024:3072] = bytes(2048)
    dst = MemEnd(b"\x01" * len(data))
    run(MemEnd(bytes(data)), dst, sparse=1024, request_size=16384)
    assert dst.data == data
    assert ("zero", 1024, 2048) in dst.log


def test_dirty_bitmap_copies_dirty_data_zeroes_dirty_zeroes_skips_clean() -> None:
    old = pattern(8 * 4096, seed=2)
    new = bytearray(old)
    new[0:4096] = pattern(4096, seed=3)  # dirty data
    new[2 * 4096 : 3 * 4096] = bytes(4096)  # dirty zero (a discard)
    new[6 * 4096 : 7 * 4096] = pattern(4096, seed=4)  # dirty data
    src = MemEnd(
        bytes(new),
        extents=[(2 * 4096, 0), (4096, HOLE_ZERO), (5 * 4096, 0)],
        bitmap=[(4096, 1), (4096, 0), (4096, 1), (3 * 4096, 0), (4096, 1), (4096, 0)],
    )
    dst = MemEnd(old, zero_start=True)  # zero_start must not matter: it holds a copy
    result = run(src, dst, dirty_bitmap="b0")
    assert dst.data == new
    assert result.read_bytes == 2 * 4096
    assert result.zeroed_bytes == 4096
    assert result.skipped_bytes == 5 * 4096
    assert {o for op, o, n in src.log} == {0, 6 * 4096}


def test_lanes_are_the_smallest_both_ends_allow() -> None:
    src, dst = MemEnd(4096, lanes=None), MemEnd(4096, lanes=2)
    assert run(src, dst).connections == 2 and src.lanes_set == dst.lanes_set == 2
    src, dst = MemEnd(4096, lanes=1), MemEnd(4096)
    assert run(src, dst, connections=3).connections == 1


# -- streams --------------------------------------------------------------------------


def test_a_destination_stream_is_written_in_order() -> None:
    data = bytearray(pattern(40 * 4096 + 17))
    data[4096 * 10 : 4096 * 20] = bytes(4096 * 10)
    src = MemEnd(bytes(data), extents=[(10 * 4096, 0), (10 * 4096, HOLE_ZERO), (20 * 4096 + 17, 0)])
    dst = StreamOut()
    run(src, dst, requests=8, connections=4)
    assert dst.data == data


def test_a_source_stream_is_read_to_its_end() -> None:
    data = pattern(9 * 4096 + 5)
    dst = MemEnd(len(data))
    result = run(StreamIn(data), dst)
    assert dst.data == data and result.size == len(data)


def test_a_source_stream_larger_than_the_destination_fails() -> None:
    with pytest.raises(CopyError, match="larger than the destination"):
        run(StreamIn(pattern(3 * 4096)), MemEnd(2 * 4096))


# -- failures and cancellation --------------------------------------------------------


@pytest.mark.parametrize("side", ["source", "destination"])
def test_a_failure_names_the_offset_and_drains(side: str) -> None:
    data = pattern(64 * 4096)
    bad = 21 * 4096 + 100  # inside a batch of requests, not at its start
    src = MemEnd(data, fail_at=bad if side == "source" else None)
    dst = MemEnd(len(data), fail_at=bad if side == "destination" else None)
    with pytest.raises(CopyError) as info:
        run(src, dst, requests=8, connections=2)
    err = info.value
    assert err.offset == 21 * 4096
    doing = "reading" if side == "source" else "writing"
    assert str(err) == f"{doing} mem at offset {21 * 4096}: " + (
        "Input/output error" if side == "source" else "No space left on device"
    )
    assert src.in_flight == dst.in_flight == 0  # nothing left waiting
    assert err.result is not None and err.result.size < len(data)


def test_stop_drains_flushes_and_raises_interrupted() -> None:
    data = pattern(256 * 4096)
    src, dst = MemEnd(data), MemEnd(len(data))
    copier = Copier(src, dst, CopyOptions(request_size=4096, requests=2, connections=1))
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            copier.run()
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    while len(dst.log) < 10 and thread.is_alive():
        time.sleep(0.001)
    copier.stop()
    thread.join()
    (err,) = outcome
    assert isinstance(err, CopyInterrupted)
    assert err.result is not None and 10 * 4096 <= err.result.size < len(data)
    assert "interrupted after" in str(err)
    assert dst.flushed == 1
    assert src.in_flight == dst.in_flight == 0
    # Every write that started, finished: what the destination holds is the source's.
    for _op, offset, n in dst.log:
        assert dst.data[offset : offset + n] == data[offset : offset + n]


def test_flush_option() -> None:
    dst = MemEnd(4096)
    run(MemEnd(4096), dst, flush=True)
    assert dst.flushed == 1


@pytest.mark.parametrize(
    "options",
    [
        {"connections": 0},
        {"requests": 0},
        {"request_size": 100},
        {"request_size": 4096, "sparse": 3000},
        {"request_size": 65536, "queue_size": 4096},
    ],
)
def test_options_out_of_range(options: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        CopyOptions(**options).check()  # type: ignore[arg-type]
