"""pynbd's clients against qemu-nbd: raw and qcow2 images, block sizes, multi-conn,
several meta contexts (allocation depth, dirty bitmaps).

Every test runs through both clients (the ``api`` fixture) against its own qemu-nbd,
started by the test and stopped after it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from pynbd.errors import ExportNotFound, UnsupportedError
from pynbd.proto.constants import StateFlag
from tests.drivers import Driver
from tests.peers import Server, make_qcow2_with_bitmap, make_raw_image

from .conftest import KiB, MiB, assert_covers, exercise_all

pytestmark = pytest.mark.interop

Factory = Callable[..., Server]

ALL_CAPS = {
    "read",
    "write",
    "split",
    "fua",
    "flush",
    "trim",
    "zero",
    "no_hole",
    "fast_zero",
    "cache",
    "df",
    "block_status",
    "req_one",
}

BITMAP = "b0"
DEPTH = "qemu:allocation-depth"
DIRTY = f"qemu:dirty-bitmap:{BITMAP}"


def test_raw_exercise_all(api: Driver, qemu_nbd: Factory, tmp_path: Path) -> None:
    image = make_raw_image(tmp_path / "disk.raw", 48 * MiB)
    server = qemu_nbd(image, "raw", "disk")
    c = api.connect(server.uri)
    assert c.export_name == "disk"
    assert c.size == 48 * MiB
    # qemu-nbd's block sizes: 1 / 4096 / 32 MiB, advertised.
    assert c.negotiated.block_size_advertised
    assert c.get_block_size("minimum") == 1
    assert c.get_block_size("preferred") == 4096
    assert c.get_block_size("maximum") == 32 * MiB
    assert c.can_multi_conn()  # --shared=16
    result = exercise_all(c)
    assert result.done == ALL_CAPS, result
    assert result.refused == set()
    # What the client writes reaches the image.
    data = os.urandom(100 * KiB)
    c.pwrite(data, 40 * MiB + 5, fua=True)
    c.close()
    with open(image, "rb") as f:
        f.seek(40 * MiB + 5)
        assert f.read(len(data)) == data


def test_qcow2_exercise_all(api: Driver, qemu_nbd: Factory, tmp_path: Path) -> None:
    image = make_qcow2_with_bitmap(tmp_path / "disk.qcow2", 48 * MiB, dirty=[(0, 64 * KiB)])
    server = qemu_nbd(image, "qcow2", "disk", allocation_depth=True, bitmaps=[BITMAP])
    c = api.connect(server.uri, meta_contexts=("base:allocation", DEPTH, DIRTY))
    assert set(c.meta_contexts) == {"base:allocation", DEPTH, DIRTY}
    # qemu-nbd ignores trims unless started with --discard=unmap: no zeroes expected.
    result = exercise_all(c)
    assert result.done == ALL_CAPS, result


def test_read_only(api: Driver, qemu_nbd: Factory, tmp_path: Path) -> None:
    image = make_raw_image(tmp_path / "disk.raw", 4 * MiB, fill=0x5A)
    server = qemu_nbd(image, "raw", "ro", readonly=True)
    c = api.connect(server.uri)
    assert c.is_read_only()
    result = exercise_all(c, readonly_content=lambda off, n: b"\x5a" * n)
    assert {"write", "trim", "zero"} <= result.refused
    assert {"read", "df", "cache", "block_status"} <= result.done


def test_unknown_export(api: Driver, qemu_nbd: Factory, tmp_path: Path) -> None:
    image = make_raw_image(tmp_path / "disk.raw", 1 * MiB)
    server = qemu_nbd(image, "raw", "disk")
    with pytest.raises(ExportNotFound):
        api.connect(server.uri, export_name="nope")
    # The refusal hurt nothing: the right name still connects.
    assert api.connect(server.uri).size == 1 * MiB


def test_list_exports_and_contexts(api: Driver, qemu_nbd: Factory, tmp_path: Path) -> None:
    image = make_qcow2_with_bitmap(tmp_path / "disk.qcow2", 4 * MiB)
    server = qemu_nbd(image, "qcow2", "disk", allocation_depth=True, bitmaps=[BITMAP])
    info = api.negotiate(server.uri, list_exports=True, list_meta_contexts=True)
    assert info.exports is not None
    assert [e.name for e in info.exports] == ["disk"]
    assert info.available_meta_contexts is not None
    assert {"base:allocation", DEPTH, DIRTY} <= set(info.available_meta_contexts)
    assert info.size == 4 * MiB
    assert (info.minimum_block, info.preferred_block, info.maximum_payload) == (1, 4096, 32 * MiB)


# --------------------------------------------------------------------------- multi-conn


def test_multi_conn_writes_visible_after_flush(
    api: Driver, qemu_nbd: Factory, tmp_path: Path
) -> None:
    image = make_raw_image(tmp_path / "disk.raw", 8 * MiB)
    server = qemu_nbd(image, "raw", "disk", shared=8)
    clients = api.connect_multi(server.uri, 4)
    assert len(clients) == 4
    assert all(c.can_multi_conn() for c in clients)
    blocks = [os.urandom(256 * KiB) for _ in clients]
    for i, (c, data) in enumerate(zip(clients, blocks, strict=True)):
        c.pwrite(data, i * MiB + 3)
    # With multi-conn, a flush on any connection covers every write that has replied,
    # on every connection (spec, NBD_FLAG_CAN_MULTI_CONN).
    clients[3].flush()
    for c in clients:
        for i, data in enumerate(blocks):
            assert c.pread(len(data), i * MiB + 3) == data
    # And the other way round: one client overwrites everything, another flushes.
    clients[0].pwrite(b"\x77" * (4 * MiB), 0)
    clients[2].flush()
    for c in clients:
        assert c.pread(4 * MiB, 0) == b"\x77" * (4 * MiB)


def test_multi_conn_refused_without_shared(api: Driver, qemu_nbd: Factory, tmp_path: Path) -> None:
    image = make_raw_image(tmp_path / "disk.raw", 1 * MiB)
    server = qemu_nbd(image, "raw", "disk", shared=1)
    with pytest.raises(UnsupportedError):
        api.connect_multi(server.uri, 4)
    # The refused attempt left no connection open: with --shared=1 the next one would
    # otherwise not be served.
    c = api.connect(server.uri, timeout=30)
    assert not c.can_multi_conn()
    assert c.pread(512, 0) == bytes(512)


# --------------------------------------------------------------------------- meta contexts


def _runs(extents: list[tuple[int, int, int]], flag: int) -> list[tuple[int, int]]:
    """Merged (offset, length) runs of the extents whose flags equal ``flag``."""
    runs: list[tuple[int, int]] = []
    for off, n, flags in extents:
        if flags != flag:
            continue
        if runs and runs[-1][0] + runs[-1][1] == off:
            runs[-1] = (runs[-1][0], runs[-1][1] + n)
        else:
            runs.append((off, n))
    return runs


def test_meta_contexts(api: Driver, qemu_nbd: Factory, tmp_path: Path) -> None:
    """base:allocation, qemu:allocation-depth and a dirty bitmap, all in one call; the
    bitmap's dirty extents are exactly what qemu-io wrote after the bitmap was added."""
    clean = [(0, 64 * KiB), (2 * MiB, 128 * KiB)]
    dirty = [(1 * MiB, 128 * KiB), (3 * MiB, 4 * KiB), (5 * MiB + 64 * KiB, 192 * KiB)]
    image = make_qcow2_with_bitmap(
        tmp_path / "disk.qcow2", 8 * MiB, bitmap=BITMAP, clean=clean, dirty=dirty
    )
    server = qemu_nbd(image, "qcow2", "disk", allocation_depth=True, bitmaps=[BITMAP])
    c = api.connect(server.uri, meta_contexts=("base:allocation", DEPTH, DIRTY))
    assert c.meta_contexts == ("base:allocation", DEPTH, DIRTY)
    size = c.size
    every = c.block_status_all(size, 0)
    assert set(every) == {"base:allocation", DEPTH, DIRTY}
    for extents in every.values():
        assert_covers(extents, 0, size)

    # The bitmap marks whole 64 KiB granules: the 4 KiB write dirties one granule.
    bitmap = [(e.offset, e.length, e.flags) for e in every[DIRTY]]
    assert _runs(bitmap, 1) == [
        (1 * MiB, 128 * KiB),
        (3 * MiB, 64 * KiB),
        (5 * MiB + 64 * KiB, 192 * KiB),
    ]
    # Allocation depth 1: allocated in the top (only) layer; qcow2 clusters are 64 KiB.
    depth = [(e.offset, e.length, e.flags) for e in every[DEPTH]]
    written = sorted(clean + [(o, max(n, 64 * KiB)) for o, n in dirty])
    assert _runs(depth, 1) == _merge(written)
    assert _runs(depth, 0) and all(flags in (0, 1) for _, _, flags in depth)
    # base:allocation: written clusters are allocated (the part of a cluster that
    # qemu-io did not write may be reported as zero), the rest reads as zeroes.
    for e in every["base:allocation"]:
        inside = any(o <= e.offset and e.offset + e.length <= o + n for o, n in _merge(written))
        if inside:
            assert not e.flags & StateFlag.HOLE, e
        else:
            assert e.flags & StateFlag.ZERO, e
    data = [
        (o, n)
        for o, n, f in ((e.offset, e.length, e.flags) for e in every["base:allocation"])
        if f == 0
    ]
    assert (1 * MiB, 128 * KiB) in _merge(data)

    # One context at a time, and REQ_ONE, agree with the combined answer.
    assert c.block_status(size, 0, DIRTY) == every[DIRTY]
    one = c.block_status(4 * MiB, 1 * MiB, DIRTY, req_one=True)
    assert len(one) == 1 and one[0].offset == 1 * MiB and one[0].flags == 1
    assert one[0].length <= 128 * KiB
    # Only some contexts: the client asks for what was named and returns only those.
    two = c.block_status_all(4 * MiB, 1 * MiB, contexts=(DEPTH, DIRTY))
    assert set(two) == {DEPTH, DIRTY}
    assert _runs([(e.offset, e.length, e.flags) for e in two[DIRTY]], 1)[0] == (1 * MiB, 128 * KiB)

    # Writing through the client dirties the bitmap (it is enabled) and allocates.
    c.pwrite(os.urandom(64 * KiB), 7 * MiB)
    after = c.block_status_all(1 * MiB, 7 * MiB)
    assert _runs([(e.offset, e.length, e.flags) for e in after[DIRTY]], 1) == [(7 * MiB, 64 * KiB)]
    assert _runs([(e.offset, e.length, e.flags) for e in after[DEPTH]], 1) == [(7 * MiB, 64 * KiB)]
    # A context that was not negotiated is refused without sending anything.
    with pytest.raises(UnsupportedError):
        c.block_status(4096, 0, "qemu:dirty-bitmap:other")
    assert c.pread(4096, 1 * MiB) == b"\xab" * 4096


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for off, n in sorted(ranges):
        if merged and merged[-1][0] + merged[-1][1] >= off:
            end = max(merged[-1][0] + merged[-1][1], off + n)
            merged[-1] = (merged[-1][0], end - merged[-1][0])
        else:
            merged.append((off, n))
    return merged


def test_meta_context_subset(api: Driver, qemu_nbd: Factory, tmp_path: Path) -> None:
    """Asking only for the bitmap: base:allocation is then not negotiated."""
    image = make_qcow2_with_bitmap(
        tmp_path / "disk.qcow2", 2 * MiB, bitmap=BITMAP, dirty=[(64 * KiB, 64 * KiB)]
    )
    server = qemu_nbd(image, "qcow2", "disk", bitmaps=[BITMAP])
    c = api.connect(server.uri, meta_contexts=(DIRTY, DEPTH))
    # -A was not given: the server knows no allocation-depth context and drops it.
    assert c.meta_contexts == (DIRTY,)
    extents = c.block_status(2 * MiB, 0, DIRTY)
    assert _runs([(e.offset, e.length, e.flags) for e in extents], 1) == [(64 * KiB, 64 * KiB)]
    with pytest.raises(UnsupportedError):
        c.block_status(4096, 0)  # base:allocation
