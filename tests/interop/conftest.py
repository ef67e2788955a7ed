"""What the interop tests of pynbd's clients share.

- ``api``: both clients, one after the other, driven by tests/drivers.py so that each
  test body is written once, in blocking style, for both.
- :func:`exercise_all`: every command and flag a server advertises, run with its data
  checked; every one it does not advertise must raise UnsupportedError and leave the
  connection usable.
- ``pynbd_server``: the factory of ``pynbd serve`` processes (tests/serve_launcher.py),
  for the interop tests of pynbd's server.
"""

from __future__ import annotations

import errno
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from pynbd.client.base import MappedExtent
from pynbd.errors import InvalidRequest, RequestError, UnsupportedError
from pynbd.proto.constants import StateFlag
from tests.drivers import KINDS, Driver, Handle, driving
from tests.peers import Peers
from tests.serve_launcher import pynbd_server as pynbd_server

KiB = 1024
MiB = 1024 * KiB

BASE_ALLOCATION = "base:allocation"


# --------------------------------------------------------------------------- drivers


@pytest.fixture(params=KINDS)
def api(request: pytest.FixtureRequest, peers: Peers) -> Iterator[Driver]:
    """Both clients, one after the other (see tests/drivers.py). Depends on ``peers``
    so that its clients are closed before the servers are stopped (nbdkit 1.32 can
    abort when a client drops mid-request)."""
    with driving(request.param) as driver:
        yield driver


# --------------------------------------------------------------------------- checks


@dataclass
class Exercised:
    """What :func:`exercise_all` did: capabilities run with data checked, and
    unadvertised ones that were refused with UnsupportedError."""

    done: set[str] = field(default_factory=set)
    refused: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)


def assert_alive(c: Handle) -> None:
    """The connection still works after a refused or failed request."""
    assert not c.closed
    n = c.get_block_size("minimum")
    assert len(c.pread(n, 0)) == n


def assert_covers(extents: list[MappedExtent], offset: int, length: int) -> None:
    """Extents are contiguous, non-empty and cover exactly [offset, offset+length)."""
    assert extents, "no extents"
    at = offset
    for ext in extents:
        assert ext.offset == at, f"gap or overlap at {at}: {extents}"
        assert ext.length > 0, f"empty extent: {extents}"
        at += ext.length
    assert at == offset + length, f"extents end at {at}, not {offset + length}: {extents}"


def refused(c: Handle, result: Exercised, name: str, fn: Callable[[], Any]) -> None:
    """``fn`` must raise UnsupportedError (nothing sent), and the connection live on."""
    with pytest.raises(UnsupportedError):
        fn()
    assert_alive(c)
    result.refused.add(name)


class _Layout:
    """Hands out disjoint regions of the export, each starting on a preferred block
    boundary plus ``shift`` (1 when the server takes any alignment, so that requests
    are unaligned), with lengths rounded up to the minimum block size."""

    def __init__(self, size: int, minimum: int, preferred: int) -> None:
        self.size = size
        self.minimum = minimum
        self.step = max(preferred, 64 * KiB)
        self.shift = 1 if minimum == 1 else 0
        self.cursor = 0

    def length(self, n: int) -> int:
        return -(-n // self.minimum) * self.minimum

    def take(self, n: int, *, aligned: bool = False) -> tuple[int, int]:
        n = self.length(n)
        start = self.cursor + (0 if aligned else self.shift)
        end = start + n
        if end > self.size:
            raise AssertionError(
                f"the export ({self.size} bytes) is too small for the exercise; "
                f"it needs at least {end}"
            )
        self.cursor = -(-end // self.step) * self.step
        return start, n


def exercise_all(
    c: Handle,
    *,
    seed: int = 1,
    trim_zeroes: bool = False,
    split: bool = True,
    readonly_content: Callable[[int, int], bytes] | None = None,
) -> Exercised:
    """Run every command and flag ``c``'s server advertises, with data checked.

    Writable exports: pwrite/pread round trips of several sizes (unaligned offsets when
    the minimum block size is 1, one payload over the maximum so that the client must
    split it, a pipelined batch), FUA writes, flush, trim (then reads: zeroes if
    ``trim_zeroes``), zero with and without NO_HOLE, FUA and FAST_ZERO (which may fail
    only with ENOTSUP), cache, DF reads, block status of every negotiated context with
    and without REQ_ONE. Read-only exports: reads (compared with ``readonly_content``
    when given) and write commands refused. Each unadvertised command or flag must
    raise UnsupportedError and leave the connection usable. Requests the client must
    refuse (past the end, unaligned) raise InvalidRequest.

    Args:
        c: a connected client.
        seed: for the random data.
        trim_zeroes: the server guarantees that trimmed ranges read back as zeroes.
        split: include the round trip over the maximum payload (needs an export a few
            MiB larger than the maximum).
        readonly_content: ``(offset, length) -> bytes`` expected from a read-only export.

    Returns:
        What was exercised and what was refused.
    """
    rng = random.Random(seed)
    result = Exercised()
    size = c.size
    minimum = c.get_block_size("minimum")
    preferred = c.get_block_size("preferred")
    maximum = c.get_block_size("maximum")
    assert size > 0
    assert minimum >= 1 and minimum & (minimum - 1) == 0, minimum
    assert preferred >= minimum and maximum >= preferred, (minimum, preferred, maximum)
    layout = _Layout(size, minimum, preferred)
    written: list[tuple[int, bytes]] = []

    # Client-side refusals: nothing is sent, the connection lives on.
    with pytest.raises(InvalidRequest):
        c.pread(minimum, size)
    if minimum > 1:
        with pytest.raises(InvalidRequest):
            c.pread(minimum, 1)
        with pytest.raises(InvalidRequest):
            c.pread(minimum + 1, 0)
    assert_alive(c)

    if c.is_read_only():
        _exercise_readonly(c, result, layout, readonly_content)
    else:
        _exercise_writes(c, result, layout, rng, written, split, trim_zeroes)

    # DF reads.
    off, n = layout.take(min(maximum, 256 * KiB))
    if not c.is_read_only():
        data = rng.randbytes(n)
        c.pwrite(data, off)
        written.append((off, data))
    else:
        data = bytes(c.pread(n, off))
    if c.can_df():
        assert c.pread(n, off, df=True) == data
        result.done.add("df")
    else:
        refused(c, result, "df", lambda: c.pread(n, off, df=True))

    # Cache.
    if c.can_cache():
        c.cache(n, off)
        assert c.pread(n, off) == data
        result.done.add("cache")
    else:
        refused(c, result, "cache", lambda: c.cache(n, off))

    _exercise_block_status(c, result, written, layout)

    # Everything written is still there (no request strayed outside its range).
    for off, data in written:
        assert c.pread(len(data), off) == data, f"data at {off} changed"
    assert_alive(c)
    return result


def _exercise_readonly(
    c: Handle,
    result: Exercised,
    layout: _Layout,
    content: Callable[[int, int], bytes] | None,
) -> None:
    for n in (1, 4096, 65536 + 3, 1 * MiB):
        off, n = layout.take(n)
        first = c.pread(n, off)
        assert len(first) == n
        if content is not None:
            assert first == content(off, n)
        assert c.pread(n, off) == first
    result.done.add("read")
    refused(c, result, "write", lambda: c.pwrite(b"\0" * layout.minimum, 0))
    refused(c, result, "trim", lambda: c.trim(layout.minimum, 0))
    refused(c, result, "zero", lambda: c.zero(layout.minimum, 0))


def _exercise_writes(
    c: Handle,
    result: Exercised,
    layout: _Layout,
    rng: random.Random,
    written: list[tuple[int, bytes]],
    split: bool,
    trim_zeroes: bool,
) -> None:
    minimum = layout.minimum
    maximum = c.get_block_size("maximum")

    def roundtrip(n: int, **kwargs: Any) -> tuple[int, bytes]:
        off, n = layout.take(n)
        data = rng.randbytes(n)
        c.pwrite(data, off, **kwargs)
        assert c.pread(n, off) == data, f"read back of {n} bytes at {off} differs"
        written.append((off, data))
        return off, data

    # Round trips of several sizes; unaligned offsets when the server allows them.
    for n in (1, 511, 4096, 65536 + 3):
        roundtrip(n)
    result.done |= {"read", "write"}
    if split:
        # Over the maximum payload: the client must split (and the pieces pipeline).
        off, data = roundtrip(maximum + 2 * layout.step + 1)
        buf = bytearray(len(data))
        c.pread_into(memoryview(buf), off)
        assert buf == data
        result.done.add("split")

    # A pipelined batch: 16 writes, then 16 reads, in flight together (asyncio).
    chunk = layout.length(4096)
    base, _ = layout.take(16 * chunk)
    blocks = [rng.randbytes(chunk) for _ in range(16)]
    c.many("pwrite", [(b, base + i * chunk) for i, b in enumerate(blocks)])
    assert c.many("pread", [(chunk, base + i * chunk) for i in range(16)]) == blocks
    written += [(base + i * chunk, b) for i, b in enumerate(blocks)]

    # A write past the end is refused before anything is sent.
    with pytest.raises(InvalidRequest):
        c.pwrite(b"\0" * minimum, c.size)

    if c.can_fua():
        roundtrip(8192, fua=True)
        result.done.add("fua")
    else:
        refused(c, result, "fua", lambda: c.pwrite(b"\0" * minimum, 0, fua=True))

    if c.can_flush():
        c.flush()
        result.done.add("flush")
    else:
        refused(c, result, "flush", c.flush)

    if c.can_trim():
        off, n = layout.take(256 * KiB, aligned=True)
        c.pwrite(rng.randbytes(n), off)
        c.trim(n, off)
        got = c.pread(n, off)
        if trim_zeroes:
            assert got == bytes(n), "trimmed range does not read as zeroes"
        if c.can_fua():
            c.trim(n, off, fua=True)
        result.done.add("trim")
    else:
        refused(c, result, "trim", lambda: c.trim(minimum, 0))

    if c.can_zero():
        off, n = layout.take(256 * KiB)
        for flags in ({}, {"no_hole": True}, {"fua": True} if c.can_fua() else {}):
            c.pwrite(rng.randbytes(n), off)
            c.zero(n, off, **flags)
            assert c.pread(n, off) == bytes(n), f"zero({flags}) left data"
        # A small zero inside written data clears exactly its range.
        buf = bytearray(rng.randbytes(n))
        c.pwrite(buf, off)
        zoff, zlen = (7, 100) if minimum == 1 else (minimum, minimum)
        c.zero(zlen, off + zoff)
        buf[zoff : zoff + zlen] = bytes(zlen)
        assert c.pread(n, off) == buf
        written.append((off, bytes(buf)))
        result.done |= {"zero", "no_hole"}
        off, n = layout.take(256 * KiB)
        if c.can_fast_zero():
            c.pwrite(rng.randbytes(n), off)
            try:
                c.zero(n, off, fast=True)
            except RequestError as exc:
                # The spec lets a server refuse a fast zero it cannot do quickly, but
                # only with ENOTSUP.
                assert exc.errno == errno.ENOTSUP, exc
                result.notes.append("fast zero refused with ENOTSUP")
                assert_alive(c)
            else:
                assert c.pread(n, off) == bytes(n)
            result.done.add("fast_zero")
        else:
            refused(c, result, "fast_zero", lambda: c.zero(n, off, fast=True))
    else:
        refused(c, result, "zero", lambda: c.zero(minimum, 0))
        refused(c, result, "fast_zero", lambda: c.zero(minimum, 0, fast=True))


def _exercise_block_status(
    c: Handle, result: Exercised, written: list[tuple[int, bytes]], layout: _Layout
) -> None:
    contexts = c.meta_contexts
    if not contexts:
        refused(c, result, "block_status", lambda: c.block_status(layout.minimum, 0))
        return
    # A range that starts in the middle of a written region and runs past several
    # (from 0 on a read-only export).
    first_off, first_data = written[min(3, len(written) - 1)] if written else (0, b"")
    start = first_off - first_off % layout.minimum
    length = layout.length(min(c.size - start, 4 * MiB))
    for name in contexts:
        extents = c.block_status(length, start, name)
        assert_covers(extents, start, length)
        one = c.block_status(length, start, name, req_one=True)
        assert len(one) == 1 and one[0].offset == start and 0 < one[0].length <= length, one
    every = c.block_status_all(length, start)
    assert set(every) == set(contexts)
    for extents in every.values():
        assert_covers(extents, start, length)
    if BASE_ALLOCATION in contexts:
        # Freshly written random data is allocated: never a hole.
        end = first_off + len(first_data)
        for ext in c.block_status(length, start, BASE_ALLOCATION):
            if ext.offset < end and ext.offset + ext.length > first_off:
                assert not ext.flags & StateFlag.HOLE, f"written data reported as hole: {ext}"
    result.done |= {"block_status", "req_one"}
