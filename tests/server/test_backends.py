"""The memory and file backends, the errno table, and run_request's emulations."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from pynbd.proto.constants import Cmd, CmdFlag, Err, StateFlag
from pynbd.proto.server import RequestReceived
from pynbd.server import FileBackend, MemoryBackend
from pynbd.server.backend import (
    ERRNO_TO_NBD,
    Backend,
    Capabilities,
    Export,
    Support,
    errno_to_nbd,
    exception_to_nbd,
    run_request,
)

HOLE = int(StateFlag.HOLE | StateFlag.ZERO)


def read(backend: Backend, length: int, offset: int) -> bytes:
    buf = bytearray(length)
    backend.pread_into(memoryview(buf), offset)
    return bytes(buf)


def write(backend: Backend, data: bytes, offset: int) -> None:
    backend.pwrite(memoryview(data), offset, False)


# -- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (errno.EPERM, Err.EPERM),
        (errno.EROFS, Err.EPERM),
        (errno.EACCES, Err.EPERM),
        (errno.EIO, Err.EIO),
        (errno.ENOMEM, Err.ENOMEM),
        (errno.EINVAL, Err.EINVAL),
        (errno.ENOSPC, Err.ENOSPC),
        (errno.EDQUOT, Err.ENOSPC),
        (errno.EFBIG, Err.ENOSPC),
        (errno.EOVERFLOW, Err.EOVERFLOW),
        (errno.ENOTSUP, Err.ENOTSUP),
        (errno.EOPNOTSUPP, Err.ENOTSUP),
        (errno.ESHUTDOWN, Err.ESHUTDOWN),
        (errno.ENOENT, Err.EIO),
        (errno.EBADF, Err.EIO),
        (None, Err.EIO),
        (0, Err.EIO),
    ],
)
def test_errno_table(value: int | None, expected: Err) -> None:
    assert errno_to_nbd(value) is expected


def test_every_wire_error_maps_to_itself() -> None:
    for err in Err:
        assert ERRNO_TO_NBD[int(err)] is err


def test_exception_to_nbd() -> None:
    assert exception_to_nbd(OSError(errno.EDQUOT, "quota")) == (Err.ENOSPC, "quota")
    assert exception_to_nbd(MemoryError())[0] is Err.ENOMEM
    err, message = exception_to_nbd(KeyError("secret internals"))
    assert err is Err.EIO and "secret" not in message


def test_capabilities_are_checked() -> None:
    with pytest.raises(ValueError, match="flush"):
        Capabilities(can_fua=Support.EMULATE, can_flush=False)
    with pytest.raises(ValueError):
        Capabilities(minimum_block=3)
    with pytest.raises(ValueError):
        Capabilities(preferred_block=256)


def test_export_spec_from_capabilities() -> None:
    mem = MemoryBackend(1 << 20)
    spec = Export(mem, "d", read_only=True).spec("x")
    assert spec.read_only and spec.description == "d" and spec.size == 1 << 20
    assert spec.can_zero and spec.can_fua and spec.can_multi_conn
    assert not Export(mem, multi_conn=False).spec("x").can_multi_conn


# -- memory -------------------------------------------------------------------------------


def test_memory_is_sparse() -> None:
    mem = MemoryBackend(1 << 40)
    assert mem.allocated == 0
    assert read(mem, 100, (1 << 40) - 100) == bytes(100)
    assert mem.extents(1 << 40, 0) == [(1 << 40, HOLE)]
    assert mem.allocated == 0


def test_memory_read_write_across_pages() -> None:
    mem = MemoryBackend(1 << 20, page_size=4096)
    data = os.urandom(10000)
    write(mem, data, 4000)
    assert read(mem, 10000, 4000) == data
    assert read(mem, 20000, 0) == bytes(4000) + data + bytes(6000)
    assert mem.allocated == 4 * 4096  # pages 0..3


def test_memory_extents() -> None:
    mem = MemoryBackend(1 << 20, page_size=4096)
    write(mem, b"x", 8192)
    write(mem, b"y", 12288)
    write(mem, b"z", 40960)
    assert mem.extents(1 << 20, 0) == [
        (8192, HOLE),
        (8192, 0),
        (24576, HOLE),
        (4096, 0),
        ((1 << 20) - 45056, HOLE),
    ]
    # From the middle of a page, and clipped to the length.
    assert mem.extents(5000, 10000) == [(5000, 0)]
    assert mem.extents(10000, 10000) == [(6384, 0), (3616, HOLE)]
    assert mem.extents(100, 4000) == [(100, HOLE)]


def test_memory_trim_and_zero() -> None:
    mem = MemoryBackend(1 << 20, page_size=4096)
    write(mem, b"a" * 16384, 0)
    mem.trim(4096, 4096, False)  # a whole page: freed
    assert mem.allocated == 3 * 4096
    mem.zero(100, 10, True, False, False)  # part of a page: zeroed in place
    assert read(mem, 120, 0) == b"a" * 10 + bytes(100) + b"a" * 10
    mem.zero(1 << 20, 0, False, True, False)  # everything
    assert mem.allocated == 0
    assert read(mem, 16384, 0) == bytes(16384)


def test_memory_zero_of_a_huge_sparse_range_is_cheap() -> None:
    mem = MemoryBackend(1 << 50)
    write(mem, b"q", 1 << 45)
    mem.zero(1 << 50, 0, True, True, False)
    assert mem.allocated == 0


def test_memory_read_only_capabilities() -> None:
    assert not MemoryBackend(4096, read_only=True).capabilities.can_write


def test_memory_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        MemoryBackend(-1)
    with pytest.raises(ValueError):
        MemoryBackend(4096, page_size=1000)


# -- file ---------------------------------------------------------------------------------


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(4 << 20)
    return path


def test_file_read_write(image: Path) -> None:
    with FileBackend(image) as backend:
        assert backend.size == 4 << 20 and not backend.is_block_device
        data = os.urandom(70000)
        backend.pwrite(memoryview(data), 12345, True)  # with FUA (RWF_DSYNC)
        assert read(backend, 70000, 12345) == data
        backend.flush()
        backend.cache(4096, 0)
    assert image.read_bytes()[12345 : 12345 + 70000] == data


def test_file_read_only(image: Path) -> None:
    with FileBackend(image, read_only=True) as backend:
        assert not backend.capabilities.can_write
        with pytest.raises(OSError):
            backend.pwrite(memoryview(b"x"), 0, False)


def test_file_extents_follow_holes(image: Path) -> None:
    with FileBackend(image) as backend:
        assert backend.extents(4 << 20, 0) == [(4 << 20, HOLE)]
        write(backend, b"d" * 8192, 1 << 20)
        extents = backend.extents(4 << 20, 0)
        assert sum(n for n, _ in extents) == 4 << 20
        data = [(o, n) for o, (n, f) in zip(_offsets(extents), extents, strict=True) if f == 0]
        # The filesystem's block size decides the edges; the data must be covered.
        assert any(o <= 1 << 20 and o + n >= (1 << 20) + 8192 for o, n in data)


def _offsets(extents: list[tuple[int, int]]) -> list[int]:
    out, pos = [], 0
    for n, _ in extents:
        out.append(pos)
        pos += n
    return out


def test_file_trim_and_zero(image: Path) -> None:
    with FileBackend(image) as backend:
        write(backend, b"\xaa" * (1 << 20), 0)
        backend.trim(65536, 0, False)  # contents afterwards: unspecified
        backend.zero(65536, 65536, True, False, True)
        backend.zero(65536, 131072, False, False, False)
        assert read(backend, 131072, 65536) == bytes(131072)
        assert read(backend, 4096, 196608) == b"\xaa" * 4096


def test_file_zero_falls_back_to_writing(image: Path) -> None:
    with FileBackend(image) as backend:
        write(backend, b"\xbb" * 8192, 0)
        backend.file.can_punch = backend.file.can_zero_range = False
        with pytest.raises(OSError) as info:
            backend.zero(4096, 0, True, True, False)  # fast: refuse at once
        assert info.value.errno == errno.ENOTSUP
        assert read(backend, 4096, 0) == b"\xbb" * 4096  # untouched
        backend.zero(4096, 0, True, False, False)
        assert read(backend, 8192, 0) == bytes(4096) + b"\xbb" * 4096


def test_file_missing() -> None:
    with pytest.raises(FileNotFoundError):
        FileBackend("/nonexistent/pynbd/disk.img")


# -- run_request's emulations -----------------------------------------------------------


class Plain(Backend):
    """A backend with nothing optional: the server emulates zero, FUA and cache."""

    capabilities = Capabilities(can_flush=True, can_fua=Support.EMULATE, can_cache=Support.EMULATE)

    def __init__(self) -> None:
        self.data = bytearray(b"\x11" * (3 << 20))
        self.calls: list[str] = []

    @property
    def size(self) -> int:
        return len(self.data)

    def pread_into(self, buf: memoryview, offset: int) -> None:
        self.calls.append("read")
        buf[:] = self.data[offset : offset + len(buf)]

    def pwrite(self, buf: memoryview, offset: int, fua: bool) -> None:
        self.calls.append(f"write fua={fua}")
        self.data[offset : offset + len(buf)] = buf

    def flush(self) -> None:
        self.calls.append("flush")


def req(
    cmd: Cmd, offset: int, length: int, flags: int = 0, payload: bytes | None = None
) -> RequestReceived:
    view = memoryview(payload) if payload is not None else None
    return RequestReceived(1, cmd, CmdFlag(flags), offset, length, view, (1,), 1)


def test_emulated_zero_fua_and_cache() -> None:
    backend = Plain()
    assert run_request(backend, req(Cmd.WRITE_ZEROES, 100, (2 << 20) + 5, CmdFlag.FUA)) is None
    assert backend.data[100 : 100 + (2 << 20) + 5] == bytes((2 << 20) + 5)
    assert backend.data[99] == 0x11 and backend.data[100 + (2 << 20) + 5] == 0x11
    assert backend.calls == ["write fua=False"] * 3 + ["flush"]
    with pytest.raises(OSError) as info:
        run_request(backend, req(Cmd.WRITE_ZEROES, 0, 512, CmdFlag.FAST_ZERO))
    assert info.value.errno == errno.ENOTSUP
    backend.calls.clear()
    run_request(backend, req(Cmd.CACHE, 0, 3 << 20))
    assert backend.calls == ["read"] * 3
    backend.calls.clear()
    run_request(backend, req(Cmd.WRITE, 0, 4, CmdFlag.FUA, b"abcd"))
    assert backend.calls == ["write fua=False", "flush"]
    assert run_request(backend, req(Cmd.BLOCK_STATUS, 0, 4096)) == [(4096, 0)]
    data = run_request(backend, req(Cmd.READ, 0, 6))
    assert isinstance(data, bytearray) and bytes(data) == b"abcd\x11\x11"


def test_native_fua_is_passed_through() -> None:
    mem = MemoryBackend(4096)
    calls: list[bool] = []
    original = mem.pwrite

    def spy(buf: memoryview, offset: int, fua: bool) -> None:
        calls.append(fua)
        original(buf, offset, fua)

    mem.pwrite = spy  # type: ignore[method-assign]
    run_request(mem, req(Cmd.WRITE, 0, 2, CmdFlag.FUA, b"hi"))
    assert calls == [True]
