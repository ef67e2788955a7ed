"""``pynbd copy`` against real peers: every SRC/DST pairing ends with the source's sha256.

One source image (:data:`LAYOUT`) holds random data with two all-zero 4 KiB blocks in
it, a range of written (allocated) zeroes and holes, in a size that is a multiple of 512
but not of the request size. It is served by nbdkit (memory and file plugins), qemu-nbd
(raw, and converted to qcow2) and nbd-server, or read as a file, a block device (a loop
device) or a stream, and copied to each kind of destination. Every copy is checked by
the sha256 and the size of the whole destination, read by something other than pynbd
(the file itself, or ``nbdcopy URI -``), and by the counts the copy reports.

The copies run through the three doors: the CLI (``python -m pynbd copy -v``, whose
summary line is parsed into a :class:`~pynbd.CopyResult`), :func:`pynbd.copy` and
:func:`pynbd.copy_async` under :func:`asyncio.run`.

What sparseness promises is checked where it is promised: holes stay holes in a file
destination (``SEEK_DATA``), zero ranges reach an NBD destination as WRITE_ZEROES and
not as writes (nbdkit's log filter shows each request), and not at all with
``--destination-is-zero``; a copy between two multi-conn servers uses 4 connections with 4 threads
(nbd-server 3.24 advertises multi-conn too), one with a server without it (qemu-nbd
``--shared=1``) uses 1.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import itertools
import os
import random
import re
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest

import pynbd
from pynbd import Client, CopyResult
from tests.peers import Peers, Server, nbdinfo_json, peer_env, require_program, run_tool
from tests.serve_launcher import child_env

KiB = 1024
MiB = 1024 * KiB

# --------------------------------------------------------------------------- the source

#: (offset, length, kind) of the source: "data" is random bytes, "zero" is zeroes that
#: were written (allocated: block status calls them data), "hole" was never written.
#: The size is a multiple of 512 but not of 4 KiB, so of no request size used here.
LAYOUT = [
    (0, 640 * KiB, "data"),
    (640 * KiB, 384 * KiB, "zero"),
    (1 * MiB, 1 * MiB, "hole"),
    (2 * MiB, 512 * KiB, "data"),
    (2 * MiB + 512 * KiB, 512 * KiB, "hole"),
    (3 * MiB, 96 * KiB, "data"),
    (3 * MiB + 96 * KiB, 32 * KiB, "hole"),
    (3 * MiB + 128 * KiB, 32 * KiB + 1536, "data"),
]
SIZE = 3 * MiB + 160 * KiB + 1536
#: All-zero 4 KiB blocks inside the first data range (written, so allocated): what
#: ``--sparse 4096`` finds in data that was read.
ZERO_BLOCKS = [64 * KiB, 200 * KiB]
#: The grid on which the copy finds zero blocks (``-S``, the default).
BLOCK = 4096

Range = tuple[int, int]  # [start, stop)


def _make_source() -> bytes:
    rng = random.Random(17)
    buf = bytearray(SIZE)
    for offset, length, kind in LAYOUT:
        if kind == "data":
            buf[offset : offset + length] = rng.randbytes(length)
    for offset in ZERO_BLOCKS:
        buf[offset : offset + BLOCK] = bytes(BLOCK)
    return bytes(buf)


SOURCE = _make_source()
SOURCE_SHA = hashlib.sha256(SOURCE).hexdigest()
HOLES = [(o, o + n) for o, n, kind in LAYOUT if kind == "hole"]
WRITTEN = [(o, o + n) for o, n, kind in LAYOUT if kind != "hole"]


def _blocks(zero: bool) -> list[Range]:
    """The BLOCK-grid blocks of the source that are all zero (or not), merged."""
    out = [
        (start, min(start + BLOCK, SIZE))
        for start in range(0, SIZE, BLOCK)
        if (SOURCE[start : start + BLOCK].count(0) == min(BLOCK, SIZE - start)) == zero
    ]
    return merge(out)


def merge(ranges: Iterable[Range]) -> list[Range]:
    """Sort and merge touching or overlapping [start, stop) ranges."""
    out: list[Range] = []
    for start, stop in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], stop))
        else:
            out.append((start, stop))
    return out


def subtract(ranges: Iterable[Range], minus: Iterable[Range]) -> list[Range]:
    """The parts of ``ranges`` outside ``minus``."""
    out: list[Range] = []
    cuts = merge(minus)
    for start, stop in merge(ranges):
        for a, b in cuts:
            if b <= start or a >= stop:
                continue
            if a > start:
                out.append((start, a))
            start = max(start, b)
        if start < stop:
            out.append((start, stop))
    return out


def total(ranges: Iterable[Range]) -> int:
    return sum(stop - start for start, stop in ranges)


#: What the copy must write (the nonzero blocks) and what it must zero or skip.
DATA = _blocks(zero=False)
ZEROES = _blocks(zero=True)
DATA_BYTES = total(DATA)


def test_the_source_is_what_the_tests_assume() -> None:
    """The layout has each kind of range, the zero blocks are found, the size is odd."""
    assert SIZE % 512 == 0 and SIZE % (256 * KiB) and SIZE % BLOCK
    assert total(DATA) + total(ZEROES) == SIZE
    assert 0 < DATA_BYTES < SIZE - total(HOLES)
    for offset in ZERO_BLOCKS:
        assert any(a <= offset < b for a, b in ZEROES)
    assert SOURCE[-1] != 0  # the last, partial block is data


def write_image(path: Path) -> Path:
    """Write the source as a sparse file: data and zero ranges written, holes not."""
    with open(path, "wb") as f:
        for start, stop in WRITTEN:
            f.seek(start)
            f.write(SOURCE[start:stop])
        f.truncate(SIZE)
    return path


def fill_export(uri: str) -> None:
    """Write the source into an empty export (holes left unwritten), with a plain
    pynbd Client (not the copy engine)."""
    with Client(uri) as c:
        for start, stop in WRITTEN:
            c.pwrite(SOURCE[start:stop], start)
        c.flush()


def sha256_of_file(path: Path | str) -> tuple[int, str]:
    """(size, sha256) of a file or a device, read whole."""
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
            n += len(chunk)
    return n, h.hexdigest()


def sha256_of_export(uri: str) -> tuple[int, str]:
    """(size, sha256) of an export as libnbd's nbdcopy reads it (to a pipe)."""
    done = subprocess.run(
        [require_program("nbdcopy"), "--", uri, "-"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=peer_env(),
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return len(done.stdout), hashlib.sha256(done.stdout).hexdigest()


def assert_holes(path: Path, holes: Iterable[Range]) -> None:
    """No byte of the ranges is allocated in the file (SEEK_DATA skips them)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        for start, stop in holes:
            try:
                found = os.lseek(fd, start, os.SEEK_DATA)
            except OSError as exc:
                assert exc.errno == errno.ENXIO  # no data from there to the end
                continue
            assert found >= stop, f"{path}: data at {found}, in the hole [{start}, {stop})"
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- the copy

Via = Literal["cli", "api", "async"]
VIAS: list[Via] = ["cli", "api", "async"]

#: The summary ``pynbd copy -v`` writes on stderr.
SUMMARY = re.compile(
    r"pynbd copy: (?P<size>\d+) bytes: read (?P<read>\d+), written (?P<written>\d+), "
    r"zeroed (?P<zeroed>\d+), skipped (?P<skipped>\d+), in (?P<seconds>[\d.]+) s"
    r"[^,\n]*(?:, (?P<connections>\d+) connection)?"
)

#: CopyOptions field -> the CLI's option.
FLAGS = {
    "connections": "--connections",
    "requests": "--requests",
    "request_size": "--request-size",
    "sparse": "--sparse",
    "flush": "--flush",
    "destination_is_zero": "--destination-is-zero",
    "allocated": "--allocated",
    "extents": "--no-extents",
}


def cli_args(**options: Any) -> list[str]:
    args: list[str] = []
    for name, value in options.items():
        flag = FLAGS[name]
        if isinstance(value, bool):
            # --no-extents turns extents off; every other flag turns its option on.
            if value is (name != "extents"):
                args.append(flag)
        else:
            args += [flag, str(value)]
    return args


def parse_summary(stderr: str) -> CopyResult:
    found = SUMMARY.search(stderr)
    assert found is not None, f"no summary line in:\n{stderr}"
    return CopyResult(
        size=int(found["size"]),
        read_bytes=int(found["read"]),
        written_bytes=int(found["written"]),
        zeroed_bytes=int(found["zeroed"]),
        skipped_bytes=int(found["skipped"]),
        seconds=float(found["seconds"]),
        connections=int(found["connections"] or 0),
    )


def run_cli(
    src: str, dst: str, *, stdin: Any = subprocess.DEVNULL, stdout: Any = None, **options: Any
) -> tuple[CopyResult, bytes]:
    """``python -m pynbd copy -v [OPTIONS] SRC DST``; returns the parsed summary and
    what it wrote on stdout. ``stdin`` is a file object or bytes (sent through a pipe);
    ``stdout`` a file object (default: a pipe)."""
    data = stdin if isinstance(stdin, bytes) else None
    done = subprocess.run(
        [sys.executable, "-m", "pynbd", "copy", "-v", *cli_args(**options), src, dst],
        input=data,
        stdin=None if data is not None else stdin,
        stdout=subprocess.PIPE if stdout is None else stdout,
        stderr=subprocess.PIPE,
        env=child_env(),
        timeout=90,
        check=False,
    )
    err = done.stderr.decode(errors="replace")
    assert done.returncode == 0, f"exit {done.returncode}:\n{err}"
    assert "Traceback" not in err
    return parse_summary(err), done.stdout or b""


def run_copy(via: Via, src: str, dst: str, **options: Any) -> CopyResult:
    """One copy through the CLI, pynbd.copy or pynbd.copy_async."""
    if via == "cli":
        return run_cli(src, dst, **options)[0]
    if via == "api":
        return pynbd.copy(src, dst, **options)
    return asyncio.run(pynbd.copy_async(src, dst, **options))


def assert_counts(result: CopyResult, *, sparse: bool = True) -> None:
    """The whole source was covered, each byte once; with sparse detection on (the
    default), exactly its nonzero blocks were written."""
    assert result.size == SIZE, result
    assert result.written_bytes + result.zeroed_bytes + result.skipped_bytes == SIZE, result
    assert result.read_bytes <= SIZE, result
    assert result.read_bytes >= DATA_BYTES, result
    if sparse:
        assert result.written_bytes == DATA_BYTES, result


# --------------------------------------------------------------------------- the peers

#: Each NBD server kind; "qemu-nbd-qcow2" serves only as a source. "qemu-nbd-single"
#: (--shared=1, so no multi-conn) serves where a server without multi-conn is needed:
#: nbd-server (3.24 at least) advertises multi-conn.
NBD_KINDS = ["nbdkit-memory", "nbdkit-file", "qemu-nbd", "qemu-nbd-qcow2", "nbd-server"]
DST_KINDS = [k for k in NBD_KINDS if k != "qemu-nbd-qcow2"]


@dataclass
class Export:
    """An export served for one test: its server and the file behind it (if any)."""

    kind: str
    server: Server
    image: Path | None

    @property
    def uri(self) -> str:
        return self.server.uri

    def sha256(self) -> tuple[int, str]:
        return sha256_of_export(self.uri)

    def log(self) -> list[str]:
        """The lines of nbdkit's log filter so far (the server runs with it)."""
        logs = [a.partition("=")[2] for a in self.server.argv if a.startswith("logfile=")]
        assert logs, f"{self.kind} runs without --filter=log"
        return Path(logs[0]).read_text().splitlines()

    def mark(self) -> int:
        """Where the log is now: pass it as ``since`` to see only what came after."""
        return len(self.log())

    def requests(self, since: int = 0) -> list[Request]:
        """The requests logged after ``since`` (one line each, before the reply)."""
        out = []
        for line in self.log()[since:]:
            found = _REQUEST.search(line)
            if found is not None:
                start = int(found[3], 16)
                stop = start + int(found[4], 16)
                out.append(Request(int(found[1]), found[2], start, stop, found[5]))
        return out

    def connections(self, since: int = 0) -> set[int]:
        """The connections that completed the handshake after ``since``."""
        found = (_CONNECT.search(line) for line in self.log()[since:])
        return {int(m[1]) for m in found if m is not None}

    def multi_conn(self) -> bool:
        """Whether the server advertises multi-conn, as nbdinfo sees it."""
        return bool(nbdinfo_json(self.uri)["exports"][0]["can_multi_conn"])


def serve(
    peers: Peers, kind: str, *, source: bool, name: str, filters: Iterable[str] = ()
) -> Export:
    """Serve the source (``source=True``) or an empty export of its size as ``kind``.

    ``filters`` (nbdkit only) may hold "log": its log is kept beside the server's.
    """
    filters = tuple(filters)
    work = peers.workdir
    if kind.startswith("nbdkit"):
        args: list[str] = []
        if "log" in filters:
            args.append(f"logfile={work / f'{name}.nbdkit-log'}")
        if kind == "nbdkit-memory":
            server = peers.nbdkit("memory", str(SIZE), *args, filters=filters)
            if source:
                fill_export(server.uri)
            return Export(kind, server, None)
        image = _image(work / f"{name}.img", source)
        return Export(kind, peers.nbdkit("file", str(image), *args, filters=filters), image)
    assert not filters, f"{kind} takes no nbdkit filter"
    if kind == "qemu-nbd-qcow2":
        assert source, "the qcow2 export is a source only"
        raw = write_image(work / f"{name}.raw")
        image = work / f"{name}.qcow2"
        run_tool("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, image)
        return Export(kind, peers.qemu_nbd(image, "qcow2"), image)
    image = _image(work / f"{name}.img", source)
    if kind == "qemu-nbd":
        return Export(kind, peers.qemu_nbd(image, "raw"), image)
    if kind == "qemu-nbd-single":
        return Export(kind, peers.qemu_nbd(image, "raw", shared=1), image)
    if kind == "nbd-server":
        return Export(kind, peers.nbd_server({"disk": image}, tcp=False), image)
    raise AssertionError(f"unknown kind {kind}")


def _image(path: Path, source: bool) -> Path:
    if source:
        return write_image(path)
    # An empty destination that is not zero: the copy must overwrite every byte.
    path.write_bytes(b"\xee" * SIZE)
    return path


@dataclass(frozen=True)
class Request:
    connection: int
    command: str  # Read, Write, Zero, Trim, Flush, ...
    start: int
    stop: int
    line: str


_REQUEST = re.compile(
    r"connection=(\d+) (\w+) id=\d+ offset=0x([0-9a-f]+) count=0x([0-9a-f]+)(.*)$"
)
_CONNECT = re.compile(r"connection=(\d+) Connect ")


def assert_export_is_source(export: Export) -> None:
    assert export.sha256() == (SIZE, SOURCE_SHA)


def assert_file_is_source(path: Path) -> None:
    assert sha256_of_file(path) == (SIZE, SOURCE_SHA)
    assert path.stat().st_size == SIZE


def _vias() -> Iterator[Via]:
    return itertools.cycle(VIAS)


# --------------------------------------------------------------------------- NBD -> file


@pytest.mark.parametrize(
    ("kind", "via"), list(zip(NBD_KINDS, _vias(), strict=False)), ids=lambda x: str(x)
)
def test_nbd_to_a_new_file(peers: Peers, tmp_path: Path, kind: str, via: Via) -> None:
    """Each server's export copied to a file that does not exist: equal, and every
    zero block (holes, written zeroes, zero blocks in data) is a hole in the copy."""
    src = serve(peers, kind, source=True, name="src")
    dst = tmp_path / "copy.img"
    result = run_copy(via, src.uri, str(dst))
    assert_file_is_source(dst)
    assert_counts(result)
    assert_holes(dst, ZEROES)
    if kind == "nbd-server":  # no block status: everything is read
        assert result.read_bytes == SIZE


@pytest.mark.parametrize(
    ("existing", "via"), [(SIZE + MiB + 512, "cli"), (SIZE // 3 // 512 * 512, "api")]
)
def test_nbd_to_an_existing_file(peers: Peers, tmp_path: Path, existing: int, via: Via) -> None:
    """A file holding other bytes, bigger or smaller than the source, ends as the
    source: cut or grown to its size, the old bytes gone from the zero ranges, the
    holes holes."""
    src = serve(peers, "nbdkit-memory", source=True, name="src")
    dst = tmp_path / "old.img"
    dst.write_bytes(random.Random(existing).randbytes(existing))
    result = run_copy(via, src.uri, str(dst))
    assert_file_is_source(dst)
    assert_counts(result)
    assert_holes(dst, HOLES)


def test_allocated_leaves_no_hole_in_a_file(peers: Peers, tmp_path: Path) -> None:
    """--allocated: the zero ranges take blocks in the destination file."""
    src = serve(peers, "nbdkit-file", source=True, name="src")
    dst = tmp_path / "copy.img"
    result = run_copy("cli", src.uri, str(dst), allocated=True)
    assert_file_is_source(dst)
    assert_counts(result, sparse=False)
    assert result.skipped_bytes == 0
    # Every 4 KiB block is allocated (written, or zeroed with fallocate's ZERO_RANGE,
    # which SEEK_HOLE may call a hole, but st_blocks counts).
    assert dst.stat().st_blocks * 512 >= SIZE // BLOCK * BLOCK


# --------------------------------------------------------------------------- file -> NBD


@pytest.mark.parametrize(
    ("kind", "via"), list(zip(DST_KINDS, _vias(), strict=False)), ids=lambda x: str(x)
)
def test_file_to_nbd(peers: Peers, tmp_path: Path, kind: str, via: Via) -> None:
    """The sparse source file copied onto each server's export (which held other
    bytes): the export reads as the source."""
    image = write_image(tmp_path / "source.img")
    dst = serve(peers, kind, source=False, name="dst")
    result = run_copy(via, str(image), dst.uri)
    assert_export_is_source(dst)
    assert_counts(result)
    # Nothing may be skipped: the destination was not zero.
    assert result.skipped_bytes == 0


# --------------------------------------------------------------------------- NBD -> NBD

NBD_PAIRS = [
    # the same peer on both sides
    ("nbdkit-memory", "nbdkit-memory"),
    ("nbdkit-file", "nbdkit-file"),
    ("nbd-server", "nbd-server"),
    ("qemu-nbd", "qemu-nbd"),
    # across peers
    ("nbdkit-memory", "qemu-nbd"),
    ("qemu-nbd", "nbd-server"),
    ("nbd-server", "nbdkit-memory"),
    ("qemu-nbd-qcow2", "nbdkit-file"),
]


@pytest.mark.parametrize(
    ("pair", "via"),
    list(zip(NBD_PAIRS, _vias(), strict=False)),
    ids=[f"{a}-to-{b}-{v}" for (a, b), v in zip(NBD_PAIRS, _vias(), strict=False)],
)
def test_nbd_to_nbd(peers: Peers, pair: tuple[str, str], via: Via) -> None:
    """Between two servers, of one kind or of two: the destination (which held other
    bytes) reads as the source; DEFAULT_LANES connections where both advertise multi-conn (as
    nbdinfo sees it), else 1."""
    src_kind, dst_kind = pair
    src = serve(peers, src_kind, source=True, name="src")
    dst = serve(peers, dst_kind, source=False, name="dst")
    result = run_copy(via, src.uri, dst.uri)
    assert_export_is_source(dst)
    assert_counts(result)
    assert result.skipped_bytes == 0
    if via != "cli" or result.connections:
        both = src.multi_conn() and dst.multi_conn()
        assert result.connections == (DEFAULT_LANES if both else 1), result


def test_many_small_requests(peers: Peers) -> None:
    """--request-size 4K over 2 connections with 3 requests each: hundreds of requests,
    the last one short, still the source."""
    src = serve(peers, "nbdkit-memory", source=True, name="src", filters=["log"])
    dst = serve(peers, "qemu-nbd", source=False, name="dst")
    mark = src.mark()
    result = asyncio.run(
        pynbd.copy_async(src.uri, dst.uri, request_size=4096, requests=3, connections=2, threads=2)
    )
    reads = [r for r in src.requests(mark) if r.command == "Read"]
    assert len(reads) >= DATA_BYTES // 4096
    assert max(r.stop - r.start for r in reads) == 4096
    # Every data block is read; no hole is (nbdkit memory may call written zeroes a
    # hole too: it frees pages that become all zero).
    read = merge((r.start, r.stop) for r in reads)
    assert subtract(DATA, read) == []
    assert subtract(read, WRITTEN) == []
    assert {r.connection for r in reads} <= src.connections(mark)
    assert len(src.connections(mark)) == 2
    assert result.connections == 2
    assert_export_is_source(dst)
    assert_counts(result)


# --------------------------------------------------------------------------- streams


def test_nbd_to_stdout_pipe(peers: Peers) -> None:
    """``-`` as the destination, a pipe: the whole source, zeroes included, in order."""
    src = serve(peers, "qemu-nbd-qcow2", source=True, name="src")
    result, out = run_cli(src.uri, "-")
    assert len(out) == SIZE
    assert hashlib.sha256(out).hexdigest() == SOURCE_SHA
    assert_counts(result)
    assert result.skipped_bytes == 0


@pytest.mark.parametrize(
    ("kind", "request_size"), [("nbdkit-memory", None), ("nbd-server", 12 * KiB)]
)
def test_stdin_pipe_to_nbd(peers: Peers, kind: str, request_size: int | None) -> None:
    """``-`` as the source, a pipe whose length is known only at its end (the last
    read is short: the size is no multiple of the request size)."""
    dst = serve(peers, kind, source=False, name="dst")
    options = {} if request_size is None else {"request_size": request_size}
    result, _ = run_cli("-", dst.uri, stdin=SOURCE, **options)
    assert_export_is_source(dst)
    assert_counts(result)
    assert result.read_bytes == SIZE


def test_stdin_from_a_regular_file_to_nbd(peers: Peers, tmp_path: Path) -> None:
    """``- < disk.img``: a regular file on stdin is read as a file (its holes are
    known, so they are not read)."""
    image = write_image(tmp_path / "source.img")
    dst = serve(peers, "nbdkit-file", source=False, name="dst")
    with open(image, "rb") as stdin:
        result, _ = run_cli("-", dst.uri, stdin=stdin)
    assert_export_is_source(dst)
    assert_counts(result)
    assert result.read_bytes <= SIZE - total(HOLES)


def test_nbd_to_stdout_redirected_to_a_regular_file(peers: Peers, tmp_path: Path) -> None:
    """``> copy.img``: a regular file on stdout is written as a file: the old bytes
    go, the holes stay holes."""
    src = serve(peers, "nbd-server", source=True, name="src")
    dst = tmp_path / "copy.img"
    dst.write_bytes(b"\xee" * (2 * SIZE))
    with open(dst, "r+b") as stdout:
        result, _ = run_cli(src.uri, "-", stdout=stdout)
    assert_file_is_source(dst)
    assert_counts(result)
    assert_holes(dst, HOLES)


# --------------------------------------------------------------------------- files, null:


@pytest.mark.parametrize("via", VIAS)
def test_file_to_file(tmp_path: Path, via: Via) -> None:
    image = write_image(tmp_path / "source.img")
    dst = tmp_path / "copy.img"
    result = run_copy(via, str(image), str(dst))
    assert_file_is_source(dst)
    assert_counts(result)
    assert_holes(dst, ZEROES)
    assert result.read_bytes <= SIZE - total(HOLES)


@pytest.mark.parametrize(
    ("kind", "via", "extents"),
    [("nbdkit-memory", "api", True), ("nbd-server", "cli", True), ("qemu-nbd", "cli", False)],
)
def test_nbd_to_null(peers: Peers, kind: str, via: Via, extents: bool) -> None:
    """``null:`` reads every data byte (every byte without block status) and keeps
    none; it reads as zeroes, so zero blocks are skipped."""
    src = serve(peers, kind, source=True, name="src")
    result = run_copy(via, src.uri, "null:", extents=extents)
    assert_counts(result)
    assert result.zeroed_bytes == 0
    assert result.skipped_bytes == SIZE - DATA_BYTES
    if kind == "nbd-server" or not extents:
        assert result.read_bytes == SIZE
    else:  # the holes are known and not read
        assert result.read_bytes <= SIZE - total(HOLES)


# --------------------------------------------------------------------------- devices


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A loop device over a file of the source's size that holds other bytes:
    (device, backing file); detached at teardown."""
    if not os.path.exists("/dev/loop-control"):
        pytest.fail("no /dev/loop-control: the block device tests need loop devices")
    backing = tmp_path / "loop.img"
    backing.write_bytes(b"\xee" * SIZE)
    device = Path(run_tool("losetup", "--find", "--show", backing).stdout.strip())
    try:
        yield device, backing
    finally:
        run_tool("losetup", "--detach", device)


@pytest.mark.root
@pytest.mark.parametrize("via", ["cli", "api"])
def test_nbd_to_a_block_device_and_back(
    peers: Peers, loop_device: tuple[Path, Path], via: Via
) -> None:
    """A loop device as the destination (no size to take: it has the source's; its
    zero ranges are zeroed, not skipped), then as the source."""
    device, backing = loop_device
    src = serve(peers, "nbdkit-file", source=True, name="src")
    result = run_copy(via, src.uri, str(device), flush=True)
    assert sha256_of_file(device) == (SIZE, SOURCE_SHA)
    assert_counts(result)
    assert result.skipped_bytes == 0
    dst = serve(peers, "nbdkit-memory", source=False, name="dst")
    result = run_copy(via, str(device), dst.uri)
    assert_export_is_source(dst)
    assert_counts(result)
    # --flush reached the loop device's backing file through the kernel.
    assert sha256_of_file(backing) == (SIZE, SOURCE_SHA)


# --------------------------------------------------------------------------- zeroes on the wire


def covered(requests: Iterable[Request], command: str) -> list[Range]:
    return merge((r.start, r.stop) for r in requests if r.command == command)


@pytest.mark.parametrize("mode", ["default", "destination-is-zero", "allocated"])
def test_zero_ranges_reach_nbd_as_write_zeroes(peers: Peers, tmp_path: Path, mode: str) -> None:
    """nbdkit's log of the destination: every zero block (holes, written zeroes, zero
    blocks in data) arrives as a Zero request that may punch a hole, every data block
    as one Write, nothing twice; with --destination-is-zero the zero blocks do not
    arrive at all; with --allocated the holes arrive as Zero without a hole (trim=0)
    and the zeroes read are written."""
    image = write_image(tmp_path / "source.img")
    dst = serve(peers, "nbdkit-memory", source=False, name="dst", filters=["log"])
    options = {mode.replace("-", "_"): True} if mode != "default" else {}
    result = run_copy("cli", str(image), dst.uri, **options)
    requests = [r for r in dst.requests() if r.command in ("Write", "Zero", "Trim")]
    assert_export_is_source(dst)
    writes = covered(requests, "Write")
    zeroes = covered(requests, "Zero")
    write_bytes = sum(r.stop - r.start for r in requests if r.command == "Write")
    zero_bytes = sum(r.stop - r.start for r in requests if r.command == "Zero")
    assert covered(requests, "Trim") == []
    if mode == "allocated":
        assert writes == merge(WRITTEN)
        assert zeroes == merge(HOLES)
        assert all(" trim=0 " in r.line for r in requests if r.command == "Zero")
        assert result.skipped_bytes == 0
    else:
        assert writes == DATA
        assert_counts(result)
        if mode == "destination-is-zero":
            assert zeroes == []
            assert result.skipped_bytes == SIZE - DATA_BYTES
        else:
            assert zeroes == ZEROES
            assert all(" trim=1 " in r.line for r in requests if r.command == "Zero")
            assert result.zeroed_bytes == SIZE - DATA_BYTES
    # Each byte went out once.
    assert write_bytes == total(writes) and zero_bytes == total(zeroes)
    assert total(writes) + total(zeroes) == (DATA_BYTES if mode == "destination-is-zero" else SIZE)


# --------------------------------------------------------------------------- connections

#: The default lanes between two multi-conn ends: -C 4, at most one per processor.
DEFAULT_LANES = min(4, os.cpu_count() or 1)


def test_multi_conn_uses_four_connections(peers: Peers) -> None:
    """Both ends nbdkit memory (multi-conn): 4 connections to each (-C 4, the default,
    given 4 threads), and the requests go out on them."""
    src = serve(peers, "nbdkit-memory", source=True, name="src", filters=["log"])
    dst = serve(peers, "nbdkit-memory", source=False, name="dst", filters=["log"])
    marks = src.mark(), dst.mark()
    result = pynbd.copy(src.uri, dst.uri, threads=4)
    src_conns, dst_conns = src.connections(marks[0]), dst.connections(marks[1])
    assert len(src_conns) == len(dst_conns) == 4
    # The requests go out on those connections. (How many of them carry requests is
    # up to the lanes' threads: each takes a batch of work when it is ready, and one
    # may take a small copy's every batch.)
    reading = {r.connection for r in src.requests(marks[0]) if r.command == "Read"}
    writing = {r.connection for r in dst.requests(marks[1]) if r.command == "Write"}
    assert reading <= src_conns and reading
    assert writing <= dst_conns and writing
    assert result.connections == 4
    assert_counts(result)
    assert_export_is_source(dst)


@pytest.mark.parametrize("single_is", ["source", "destination"])
def test_one_connection_without_multi_conn(peers: Peers, single_is: str) -> None:
    """A server without multi-conn (qemu-nbd --shared=1) on either side: one
    connection to each end, even with -C 4."""
    other = serve(
        peers, "nbdkit-memory", source=single_is == "destination", name="o", filters=["log"]
    )
    single = serve(peers, "qemu-nbd-single", source=single_is == "source", name="s")
    assert not single.multi_conn() and other.multi_conn()
    src, dst = (single, other) if single_is == "source" else (other, single)
    mark = other.mark()
    result, _ = run_cli(src.uri, dst.uri, connections=4)
    assert len(other.connections(mark)) == 1
    assert result.connections in (0, 1)  # 0: the summary does not say
    assert_export_is_source(dst)
    assert_counts(result)
