"""pynbd's clients against nbdkit: plugins, filters, errors and timeouts.

Every test runs through both clients (the ``api`` fixture) against its own nbdkit,
started by the test and stopped after it.
"""

from __future__ import annotations

import errno
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pynbd.errors import ConnectionClosed, InvalidRequest, NBDTimeout, RequestError
from pynbd.proto.constants import Cmd
from tests.drivers import Driver
from tests.peers import Server, make_raw_image

from .conftest import KiB, MiB, assert_alive, exercise_all

pytestmark = pytest.mark.interop

Factory = Callable[..., Server]

#: What nbdkit's memory plugin advertises and the exercise must have run.
MEMORY_CAPS = {
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


# --------------------------------------------------------------------------- plugins


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_memory_exercise_all(api: Driver, nbdkit: Factory, tcp: bool) -> None:
    server = nbdkit("memory", "64M", tcp=tcp)
    c = api.connect(server.uri)
    assert c.size == 64 * MiB
    assert c.structured_replies
    assert c.meta_contexts == ("base:allocation",)
    # nbdkit advertises no block sizes by itself: the defaults apply.
    assert not c.negotiated.block_size_advertised
    assert (c.get_block_size("minimum"), c.get_block_size(), c.get_block_size("maximum")) == (
        1,
        4096,
        32 * MiB,
    )
    result = exercise_all(c, trim_zeroes=True)
    assert result.done == MEMORY_CAPS, result
    assert result.refused == set()


def test_file_exercise_all(api: Driver, nbdkit: Factory, tmp_path: Path) -> None:
    image = make_raw_image(tmp_path / "disk.raw", 48 * MiB)
    server = nbdkit("file", os.fspath(image))
    c = api.connect(server.uri)
    assert c.size == 48 * MiB
    result = exercise_all(c)
    # The file plugin has no fast zero on this version: it must be refused unsent.
    expected = MEMORY_CAPS if c.can_fast_zero() else MEMORY_CAPS - {"fast_zero"}
    assert result.done == expected, result
    # What the client writes reaches the file.
    data = os.urandom(64 * KiB)
    c.pwrite(data, 40 * MiB + 3)
    c.flush()
    c.close()
    with open(image, "rb") as f:
        f.seek(40 * MiB + 3)
        assert f.read(len(data)) == data


def test_without_structured_replies(api: Driver, nbdkit: Factory) -> None:
    """Asking for simple replies only: DF and block status must be refused, unsent."""
    server = nbdkit("memory", "40M")
    c = api.connect(server.uri, structured_replies=False)
    assert not c.structured_replies and not c.extended_headers
    assert c.meta_contexts == ()
    result = exercise_all(c, trim_zeroes=True)
    assert result.refused == {"df", "block_status"}, result
    assert result.done == MEMORY_CAPS - {"df", "block_status", "req_one"}


def test_read_only(api: Driver, nbdkit: Factory) -> None:
    server = nbdkit("pattern", "8M", extra=["-r"])
    c = api.connect(server.uri)
    assert c.is_read_only()

    def pattern(offset: int, length: int) -> bytes:
        # nbdkit-pattern-plugin: each 8-byte word holds its own offset, big-endian.
        first = offset - offset % 8
        words = b"".join(o.to_bytes(8, "big") for o in range(first, offset + length + 8, 8))
        return words[offset - first : offset - first + length]

    result = exercise_all(c, readonly_content=pattern)
    assert {"write", "trim", "zero"} <= result.refused
    assert {"read", "df", "block_status"} <= result.done


# --------------------------------------------------------------------------- filters


def test_blocksize_policy_obeyed(api: Driver, nbdkit: Factory, tmp_path: Path) -> None:
    """The client obeys advertised block sizes: aligned requests, split at the maximum;
    an unaligned request raises InvalidRequest and reaches no server."""
    log = tmp_path / "requests.log"
    server = nbdkit(
        "memory",
        "16M",
        "blocksize-minimum=512",
        "blocksize-preferred=8192",
        "blocksize-maximum=65536",
        "blocksize-error-policy=error",
        f"logfile={log}",
        # The log filter is outermost: it records exactly what the client sent.
        filters=["log", "blocksize-policy"],
    )
    c = api.connect(server.uri)
    assert c.negotiated.block_size_advertised
    assert (c.get_block_size("minimum"), c.get_block_size(), c.get_block_size("maximum")) == (
        512,
        8192,
        65536,
    )
    # Unaligned offset, unaligned length, either one too small: refused, nothing sent.
    for length, offset in ((512, 100), (700, 0), (100, 0)):
        with pytest.raises(InvalidRequest):
            c.pread(length, offset)
        with pytest.raises(InvalidRequest):
            c.pwrite(b"x" * length, offset)
    with pytest.raises(InvalidRequest):
        c.trim(100, 512)
    with pytest.raises(InvalidRequest):
        c.zero(512, 100)
    assert_alive(c)
    # A 200 KiB write and read are split into 64 KiB pieces.
    data = os.urandom(200 * KiB)
    c.pwrite(data, 1 * MiB)
    assert c.pread(len(data), 1 * MiB) == data
    # nbdkit logs a request before it runs it, so the log already holds these; the
    # pieces were pipelined and may be logged in any order.
    pieces = [(1 * MiB + i, min(65536, len(data) - i)) for i in range(0, len(data), 65536)]
    assert len(pieces) == 4
    split = [(k, o, n) for k, o, n in _logged_requests(log) if o >= 1 * MiB]
    assert sorted((o, n) for k, o, n in split if k == "Write") == pieces
    assert sorted((o, n) for k, o, n in split if k == "Read") == pieces

    result = exercise_all(c, trim_zeroes=True)
    assert result.done == MEMORY_CAPS, result
    c.close()
    requests = _logged_requests(log)
    assert len(requests) > 50, "the log filter recorded too few requests"
    for kind, offset, count in requests:
        assert offset % 512 == 0 and count % 512 == 0, (kind, offset, count)
        if kind in ("Read", "Write"):
            assert count <= 65536, (kind, offset, count)


def test_refused_split_sends_nothing(api: Driver, nbdkit: Factory, tmp_path: Path) -> None:
    log = tmp_path / "requests.log"
    server = nbdkit(
        "memory",
        "1M",
        "blocksize-minimum=512",
        "blocksize-maximum=65536",
        "blocksize-error-policy=error",
        f"logfile={log}",
        filters=["log", "blocksize-policy"],
    )
    c = api.connect(server.uri)
    # Three full 64 KiB pieces, then an unaligned tail.
    with pytest.raises(InvalidRequest):
        c.pwrite(b"\xaa" * (3 * 65536 + 100), 0)
    # Three full pieces, then a piece past the end of the export.
    with pytest.raises(InvalidRequest):
        c.pwrite(b"\xbb" * (3 * 65536), 1 * MiB - 65536)
    assert c.pread(512, 0) == bytes(512), "a refused write reached the server"
    assert c.pread(512, 1 * MiB - 65536) == bytes(512), "a refused write reached the server"
    c.close()
    assert [k for k, _, _ in _logged_requests(log)] == ["Read", "Read"]


def _logged_requests(log: Path) -> list[tuple[str, int, int]]:
    """(kind, offset, count) of each request nbdkit's log filter recorded."""
    found = []
    pattern = re.compile(r"connection=\d+ (\w+) id=\d+ offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+)")
    for line in log.read_text().splitlines():
        m = pattern.search(line)
        if m:
            found.append((m.group(1), int(m.group(2), 16), int(m.group(3), 16)))
    return found


def test_error_filter_eio_on_reads(api: Driver, nbdkit: Factory) -> None:
    server = nbdkit("memory", "4M", "error=EIO", "error-pread-rate=1", filters=["error"])
    c = api.connect(server.uri)
    for _ in range(3):
        with pytest.raises(RequestError) as info:
            c.pread(4096, 8192)
        assert info.value.errno == errno.EIO
        assert info.value.command == Cmd.READ
    assert not c.closed
    # The connection is still usable: other commands work.
    c.pwrite(b"z" * 4096, 0)
    c.flush()
    assert c.block_status(4096, 0)
    c.pwrite(b"y" * 4096, 4096)


def test_error_filter_enospc_on_writes(api: Driver, nbdkit: Factory) -> None:
    server = nbdkit(
        "memory",
        "4M",
        "error=ENOSPC",
        "error-pwrite-rate=1",
        "error-zero-rate=1",
        filters=["error"],
    )
    c = api.connect(server.uri)
    with pytest.raises(RequestError) as info:
        c.pwrite(b"a" * 4096, 0)
    assert info.value.errno == errno.ENOSPC
    assert info.value.command == Cmd.WRITE
    with pytest.raises(RequestError) as info:
        c.pwrite(b"a" * 4096, 0, fua=True)
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(RequestError) as info:
        c.zero(4096, 0)
    assert info.value.errno == errno.ENOSPC
    assert info.value.command == Cmd.WRITE_ZEROES
    # Reads, trims and flushes are not affected; nothing was written.
    assert c.pread(4096, 0) == bytes(4096)
    c.trim(4096, 0)
    c.flush()
    assert not c.closed


def test_error_filter_trigger_file(api: Driver, nbdkit: Factory, tmp_path: Path) -> None:
    """error-file: errors only while the trigger file exists."""
    trigger = tmp_path / "inject"
    server = nbdkit(
        "memory",
        "4M",
        "error=EPERM",
        "error-rate=1",
        f"error-file={trigger}",
        filters=["error"],
    )
    c = api.connect(server.uri)
    c.pwrite(b"q" * 512, 0)
    trigger.touch()
    with pytest.raises(RequestError) as info:
        c.pread(512, 0)
    assert info.value.errno == errno.EPERM
    with pytest.raises(RequestError) as info:
        c.pwrite(b"r" * 512, 0)
    assert info.value.errno == errno.EPERM
    trigger.unlink()
    assert c.pread(512, 0) == b"q" * 512


# A plugin failing reads and writes that touch [BAD, BAD+BAD_LEN) with EIO: the error
# filter has no offset setting, so this stands in for "an error at a given offset".
_BAD_REGION_PLUGIN = """\
import errno
import nbdkit

API_VERSION = 2
SIZE = 4 * 1024 * 1024
BAD, BAD_LEN = 1024 * 1024, 4096
disk = bytearray(SIZE)

def open(readonly):
    return 1

def get_size(h):
    return SIZE

def block_size(h):
    return (512, 4096, 65536)

def _check(offset, count):
    if offset < BAD + BAD_LEN and offset + count > BAD:
        nbdkit.set_error(errno.EIO)
        raise RuntimeError("bad region")

def pread(h, buf, offset, flags):
    _check(offset, len(buf))
    buf[:] = disk[offset:offset + len(buf)]

def pwrite(h, buf, offset, flags):
    _check(offset, len(buf))
    disk[offset:offset + len(buf)] = buf
"""


def test_error_at_offset(api: Driver, nbdkit: Factory, tmp_path: Path) -> None:
    script = tmp_path / "bad_region.py"
    script.write_text(_BAD_REGION_PLUGIN)
    server = nbdkit("python", os.fspath(script))
    c = api.connect(server.uri)
    # The plugin's block_size callback makes the client split reads at 64 KiB.
    assert c.get_block_size("maximum") == 65536
    good = os.urandom(256 * KiB)
    c.pwrite(good, 0)
    # 256 KiB across the bad block: four 64 KiB requests, the third fails.
    with pytest.raises(RequestError) as info:
        c.pread(256 * KiB, 1 * MiB - 128 * KiB)
    assert info.value.errno == errno.EIO
    with pytest.raises(RequestError):
        c.pwrite(good, 1 * MiB - 128 * KiB)
    # The pieces that do not touch the bad block are independent requests: around
    # it everything works, and the connection is intact.
    assert c.pread(len(good), 0) == good
    assert len(c.pread(64 * KiB, 1 * MiB - 64 * KiB)) == 64 * KiB
    assert len(c.pread(64 * KiB, 1 * MiB + 4096)) == 64 * KiB
    assert_alive(c)


def test_delay_filter_timeout_closes(api: Driver, nbdkit: Factory) -> None:
    """A read's own timeout: NBDTimeout (not before it, and long before the reply would
    come, 20 s on), and the connection is closed."""
    server = nbdkit("memory", "4M", "delay-read=20", filters=["delay"])
    c = api.connect(server.uri, timeout=30)
    c.pwrite(b"w" * 512, 0)  # writes are not delayed
    start = time.monotonic()
    with pytest.raises(NBDTimeout):
        c.pread(512, 0, timeout=0.5)
    assert time.monotonic() - start >= 0.45, "timed out too early"
    assert c.closed
    with pytest.raises(ConnectionClosed):
        c.pwrite(b"w" * 512, 0)
    with pytest.raises(ConnectionClosed):
        c.pread(512, 0)


def test_delay_filter_client_timeout(api: Driver, nbdkit: Factory) -> None:
    """The client's own timeout (2 s: far more than an undelayed request takes) applies
    to every call; a slow call (5 s) given a longer one succeeds."""
    server = nbdkit("memory", "4M", "delay-write=5", filters=["delay"])
    c = api.connect(server.uri, timeout=2)
    assert c.pread(512, 0) == bytes(512)
    assert c.many("pread", [(512, 512 * i) for i in range(8)]) == [bytes(512)] * 8
    c.pwrite(b"s" * 512, 0, timeout=60)
    with pytest.raises(NBDTimeout):
        c.pwrite(b"t" * 512, 0)
    assert c.closed
