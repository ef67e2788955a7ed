"""The copy-on-write overlay: reads merge base and overlay, writes never reach the
base, trim and zero are tracked per block, block status merges.

A model (a bytearray plus the set of blocks known to read as zeroes) is run against
the backend by Hypothesis; the base's bytes are checked unchanged after every run.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pynbd.client import Client
from pynbd.proto.constants import StateFlag
from pynbd.server import (
    Backend,
    Blocking,
    Capabilities,
    FileBackend,
    MemoryBackend,
    OverlayBackend,
)
from pynbd.server.overlay import BASE, DATA, ZERO
from tests.peers import peer_env

from .helpers import running_server

# Each test runs with connections served from threads, then from the event loop.
pytestmark = pytest.mark.usefixtures("serving_mode")

HOLE = int(StateFlag.HOLE | StateFlag.ZERO)
BS = 4096


def patterned(size: int) -> MemoryBackend:
    """A base whose every byte is known, with a hole in the middle."""
    mem = MemoryBackend(size, page_size=4096)
    data = bytes(i * 7 % 251 + 1 for i in range(size))
    mem.pwrite(memoryview(data), 0, False)
    mid = size // 2 // 4096 * 4096
    mem.trim(4096 * 2, mid, False)
    return mem


def contents(backend: Backend) -> bytes:
    buf = bytearray(backend.size)
    backend.pread_into(memoryview(buf), 0)
    return bytes(buf)


def check_extents(ov: OverlayBackend, expect: bytes) -> None:
    """Extents cover the export; every ZERO-flagged one reads as zeroes."""
    pos = 0
    while pos < ov.size:
        extents = ov.extents(ov.size - pos, pos)
        assert extents and all(n > 0 for n, _ in extents)
        for n, flags in extents:
            if flags & StateFlag.ZERO:
                assert expect[pos : pos + n] == bytes(n), (pos, n, flags)
            pos += n
    assert pos >= ov.size


ops = st.lists(
    st.tuples(
        st.sampled_from(["write", "trim", "zero", "read"]),
        st.integers(0, 10 * BS + 123 - 1),
        st.integers(1, 3 * BS + 5),
    ),
    max_size=25,
)


@settings(max_examples=150, deadline=None)
@given(ops=ops, seed=st.integers(0, 255))
def test_overlay_against_a_model(ops: list[tuple[str, int, int]], seed: int) -> None:
    size = 10 * BS + 123  # the last block is short
    base = patterned(size)
    original = contents(base)
    ov = OverlayBackend(base, block_size=BS)
    model = bytearray(original)
    for kind, offset, length in ops:
        length = min(length, size - offset)
        if kind == "write":
            data = bytes((seed + i) % 256 for i in range(length))
            ov.pwrite(memoryview(data), offset, False)
            model[offset : offset + length] = data
        elif kind == "zero":
            ov.zero(length, offset, True, False, False)
            model[offset : offset + length] = bytes(length)
        elif kind == "trim":
            ov.trim(length, offset, False)
            # Only whole blocks are dropped (and then read as zeroes).
            first = -(-offset // BS)
            end = offset + length
            stop = (size + BS - 1) // BS if end == size else end // BS
            for b in range(first, stop):
                start = b * BS
                model[start : min(size, start + BS)] = bytes(min(size, start + BS) - start)
        else:
            buf = bytearray(length)
            ov.pread_into(memoryview(buf), offset)
            assert buf == model[offset : offset + length]
    assert contents(ov) == model
    assert contents(base) == original  # the base never changes
    check_extents(ov, bytes(model))


def test_states_and_block_status_merge() -> None:
    size = 64 * BS
    base = MemoryBackend(size, page_size=BS)
    base.pwrite(memoryview(b"\x01" * (8 * BS)), 8 * BS, False)  # base data: blocks 8-15
    ov = OverlayBackend(base, block_size=BS)
    assert ov.extents(size, 0) == [(8 * BS, HOLE), (8 * BS, 0), (48 * BS, HOLE)]
    ov.pwrite(memoryview(b"\x02" * 10), 2 * BS + 100, False)  # copies block 2 up
    ov.trim(4 * BS, 10 * BS, False)  # blocks 10-13 become ZERO
    ov.zero(BS + 10, 30 * BS, True, False, False)  # block 30 ZERO, part of 31 copied up
    assert [ov.block_state(b * BS) for b in (0, 2, 9, 10, 13, 14, 30, 31)] == [
        BASE,
        DATA,
        BASE,
        ZERO,
        ZERO,
        BASE,
        ZERO,
        DATA,
    ]
    got = ov.extents(size, 0)
    merged: list[tuple[int, int]] = []
    for n, flags in [
        (2 * BS, HOLE),  # base holes
        (BS, 0),  # copied up
        (5 * BS, HOLE),  # base holes
        (2 * BS, 0),  # base data
        (4 * BS, HOLE),  # trimmed in the overlay
        (2 * BS, 0),  # base data
        (14 * BS, HOLE),  # base holes
        (BS, HOLE),  # zeroed in the overlay
        (BS, 0),  # copied up by the partial zero
        (32 * BS, HOLE),  # base holes
    ]:
        if merged and merged[-1][1] == flags:
            merged[-1] = (merged[-1][0] + n, flags)
        else:
            merged.append((n, flags))
    assert got == merged
    assert ov.copied == 2 * BS
    assert contents(base)[8 * BS : 16 * BS] == b"\x01" * (8 * BS)


def test_base_without_extents_and_partial_answers() -> None:
    class Plain(Backend):
        capabilities = Capabilities(can_write=False)

        @property
        def size(self) -> int:
            return 16 * BS

        def pread_into(self, buf: memoryview, offset: int) -> None:
            buf[:] = b"\x07" * len(buf)

    ov = OverlayBackend(Plain(), block_size=BS)
    ov.trim(BS, 4 * BS, False)
    assert ov.extents(16 * BS, 0) == [(4 * BS, 0), (BS, HOLE), (11 * BS, 0)]
    # The overlay is writable even though its base is not.
    assert ov.capabilities.can_write
    ov.pwrite(memoryview(b"x"), 0, False)
    assert contents(ov)[:2] == b"x\x07"


def test_overlay_in_a_temporary_file(tmp_path: Path) -> None:
    base = patterned(32 * BS)
    original = contents(base)
    ov = OverlayBackend(base, directory=tmp_path, block_size=BS)
    assert list(tmp_path.iterdir()) == []  # unlinked at once: nothing to clean up
    assert ov.capabilities.blocking is Blocking.YES  # a file blocks
    ov.pwrite(memoryview(b"\xee" * 5000), 1000, False)
    ov.zero(3 * BS, 8 * BS, True, False, False)
    expect = bytearray(original)
    expect[1000:6000] = b"\xee" * 5000
    expect[8 * BS : 11 * BS] = bytes(3 * BS)
    assert contents(ov) == expect
    assert contents(base) == original
    ov.close()


@pytest.mark.parametrize("unnamed", [True, False], ids=["O_TMPFILE", "mkstemp"])
def test_overlay_file_is_never_reopened_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unnamed: bool
) -> None:
    # Someone who can write to a shared --overlay-dir replaces the name of the new
    # temporary file with a symlink to their victim, right after it is made.
    victim = tmp_path / "victim.img"
    victim.write_bytes(b"precious" * (32 * BS // 8))
    before = victim.read_bytes()
    shared = tmp_path / "shared"
    shared.mkdir()
    made = tempfile.mkstemp

    def swap(*args: object, **kwargs: object) -> tuple[int, str]:
        fd, path = made(*args, **kwargs)  # type: ignore[call-overload]
        os.unlink(path)
        os.symlink(victim, path)
        return fd, path

    monkeypatch.setattr(tempfile, "mkstemp", swap)
    if not unnamed:  # a kernel or filesystem without O_TMPFILE
        monkeypatch.delattr(os, "O_TMPFILE", raising=False)
    base = patterned(32 * BS)
    ov = OverlayBackend(base, directory=shared, block_size=BS)
    try:
        ov.pwrite(memoryview(b"\xee" * 3 * BS), BS, False)
        assert contents(ov)[BS : 4 * BS] == b"\xee" * 3 * BS
        assert victim.read_bytes() == before  # the writes went to the overlay's file
        store = os.fstat(ov._store.file.fd)  # type: ignore[attr-defined]
        assert store.st_nlink == 0  # no name anywhere
        assert store.st_mode & 0o777 == 0o600
    finally:
        ov.close()
    assert list(shared.iterdir()) == []  # the planted symlink was removed, not followed


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="power of two"):
        OverlayBackend(MemoryBackend(BS), block_size=1000)
    with pytest.raises(TypeError):
        OverlayBackend(object())  # type: ignore[arg-type,unused-ignore]


def test_served_over_a_read_only_file(tmp_path: Path) -> None:
    image = tmp_path / "golden.img"
    data = os.urandom(3 << 20)
    with open(image, "wb") as f:
        f.truncate(16 << 20)
        f.seek(4 << 20)
        f.write(data)
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    with FileBackend(image, read_only=True) as base:
        ov = OverlayBackend(base)
        with running_server(ov) as srv, Client(srv.uri) as c:
            assert not c.is_read_only()
            assert c.get_block_size("preferred") == 64 * 1024
            c.pwrite(b"\x55" * 100_000, (4 << 20) + 10)
            c.zero(1 << 20, 5 << 20)
            c.trim(1 << 20, 6 << 20, fua=True)
            c.flush()
            expect = bytearray(data)
            expect[10:100_010] = b"\x55" * 100_000
            expect[1 << 20 : 2 << 20] = bytes(1 << 20)
            expect[2 << 20 : 3 << 20] = bytes(1 << 20)
            assert c.pread(3 << 20, 4 << 20) == expect
            assert c.pread(4096, 0) == bytes(4096)
            extents = [(e.offset, e.length, e.flags) for e in c.block_status(16 << 20, 0)]
            # Zeroed and trimmed: holes now (merged with the base's hole after them).
            assert extents == [(0, 4 << 20, HOLE), (4 << 20, 1 << 20, 0), (5 << 20, 11 << 20, HOLE)]
            done = subprocess.run(
                ["nbdinfo", "--map", "--json", srv.uri],
                capture_output=True,
                text=True,
                timeout=60,
                env=peer_env(),
            )
            assert done.returncode == 0, done.stderr
            mapped = [(e["offset"], e["length"], e["type"]) for e in json.loads(done.stdout)]
            assert mapped == [(0, 4 << 20, 3), (4 << 20, 1 << 20, 0), (5 << 20, 11 << 20, 3)]
    assert hashlib.sha256(image.read_bytes()).hexdigest() == digest  # the base is untouched
