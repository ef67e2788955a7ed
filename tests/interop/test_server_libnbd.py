"""libnbd as the strict client of ``pynbd serve``: nbdinfo, nbdcopy, and scripts for
libnbd's Python module (run with Debian's /usr/bin/python3, the only interpreter that
has ``import nbd``) that send every command and flag, with structured replies on and
off, and check block status on a sparse memory export and on a sparse file.

Every test starts its own server (the ``pynbd_server`` fixture of
``tests/serve_launcher.py``), which is stopped by pid at teardown.
"""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.peers import nbdinfo_json, peer_env, require_program, run_tool
from tests.serve_launcher import PynbdServer

KiB = 1024
MiB = 1024 * KiB

Start = Callable[..., PynbdServer]

pytestmark = pytest.mark.interop

#: libnbd's Python module exists only for this interpreter.
LIBNBD_PYTHON = "/usr/bin/python3"


def run_libnbd_script(tmp_path: Path, script: str, *args: str, timeout: float = 60) -> str:
    """Run *script* with /usr/bin/python3 (``import nbd`` works there); return stdout.

    A failure (an assertion in the script, an nbd.Error) fails the test with the output.
    """
    if not os.path.exists(LIBNBD_PYTHON):
        raise AssertionError(f"{LIBNBD_PYTHON} is missing: install python3-libnbd")
    path = tmp_path / f"libnbd-script-{len(list(tmp_path.iterdir()))}.py"
    path.write_text(textwrap.dedent(script))
    done = subprocess.run(
        [LIBNBD_PYTHON, str(path), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=peer_env(),
        check=False,
    )
    assert done.returncode == 0, (
        f"libnbd script failed ({done.returncode})\n--- stdout\n{done.stdout}"
        f"--- stderr\n{done.stderr}"
    )
    return done.stdout


# --------------------------------------------------------------------------- nbdinfo


def test_nbdinfo_list_json_and_descriptions(pynbd_server: Start) -> None:
    srv = pynbd_server(
        "--memory",
        "64M",
        "--export",
        "small=memory:1M",
        "--export",
        "other=memory:3M",
        "--description",
        "small=a small disk",
    )
    listed = nbdinfo_json(srv.uri, "--list")
    by_name = {e["export-name"]: e for e in listed["exports"]}
    assert set(by_name) == {"", "small", "other"}
    assert by_name[""]["export-size"] == 64 * MiB
    assert by_name["small"]["export-size"] == 1 * MiB
    assert by_name["other"]["export-size"] == 3 * MiB
    assert by_name["small"].get("description") == "a small disk"
    text = run_tool("nbdinfo", "--list", srv.uri).stdout
    assert 'export="small"' in text and 'export="other"' in text

    info = nbdinfo_json(srv.uri_for("other"))
    assert info["protocol"] == "newstyle-fixed"
    assert info["structured"] is True
    (export,) = info["exports"]
    assert export["export-size"] == 3 * MiB
    for flag in (
        "can_cache",
        "can_df",
        "can_fast_zero",
        "can_flush",
        "can_fua",
        "can_multi_conn",
        "can_trim",
        "can_zero",
    ):
        assert export[flag] is True, flag
    assert export["is_read_only"] is False
    assert "base:allocation" in export["contexts"]
    assert export["block_size_minimum"] <= export["block_size_preferred"]
    assert export["block_size_preferred"] <= export["block_size_maximum"]


def test_nbdinfo_read_only_and_no_structured_replies(pynbd_server: Start) -> None:
    srv = pynbd_server("--memory", "8M", "--read-only", "--no-structured-replies")
    info = nbdinfo_json(srv.uri)
    assert info["structured"] is False
    (export,) = info["exports"]
    assert export["is_read_only"] is True
    assert export["export-size"] == 8 * MiB


def test_nbdinfo_map_sparse_memory(pynbd_server: Start, tmp_path: Path) -> None:
    srv = pynbd_server("--memory", "16M")
    # Data at [1 MiB, 1 MiB + 128 KiB) and [8 MiB, 8 MiB + 64 KiB); the rest a hole.
    run_libnbd_script(
        tmp_path,
        """
        import sys, nbd
        h = nbd.NBD()
        h.connect_uri(sys.argv[1])
        h.pwrite(b"\\x5a" * (128 * 1024), 1 << 20)
        h.pwrite(b"\\xa5" * (64 * 1024), 8 << 20)
        h.flush()
        h.shutdown()
        """,
        srv.uri,
    )
    mapped = json.loads(run_tool("nbdinfo", "--map", "--json", srv.uri).stdout)
    data = [(e["offset"], e["length"]) for e in mapped if not e["type"] & 1]
    assert data == [(1 * MiB, 128 * KiB), (8 * MiB, 64 * KiB)], mapped
    # The extents tile the export.
    pos = 0
    for e in mapped:
        assert e["offset"] == pos
        pos += e["length"]
    assert pos == 16 * MiB
    text = run_tool("nbdinfo", "--map", srv.uri).stdout
    assert "hole,zero" in text and "data" in text


def test_nbdinfo_map_sparse_file(pynbd_server: Start, tmp_path: Path) -> None:
    image = tmp_path / "sparse.img"
    with open(image, "wb") as f:
        f.truncate(32 * MiB)
        f.seek(2 * MiB)
        f.write(b"\x11" * (256 * KiB))
        f.seek(20 * MiB)
        f.write(b"\x22" * (1 * MiB))
    # What the file system itself says, so the test holds on any file system.
    expected: list[tuple[int, int]] = []
    with open(image, "rb") as f:
        fd, pos = f.fileno(), 0
        while pos < 32 * MiB:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            expected.append((start, end - start))
            pos = end
    assert len(expected) == 2, f"this file system did not keep the holes: {expected}"
    srv = pynbd_server(str(image))
    mapped = nbdinfo_json(srv.uri, "--map")
    data = [(e["offset"], e["length"]) for e in mapped if not e["type"] & 1]
    assert data == expected, mapped
    holes = [e for e in mapped if e["type"] & 1]
    assert holes and all(e["type"] == 3 for e in holes), mapped  # hole,zero
    assert sum(e["length"] for e in mapped) == 32 * MiB


# --------------------------------------------------------------------------- nbdcopy


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_nbdcopy_both_ways(pynbd_server: Start, tmp_path: Path, tcp: bool) -> None:
    source = tmp_path / "random.img"
    source.write_bytes(os.urandom(64 * MiB))
    for conns in (1, 4):
        srv = pynbd_server("--memory", "64M", tcp=tcp)
        back = tmp_path / f"back-{conns}.img"
        run_tool("nbdcopy", "-C", str(conns), source, srv.uri, timeout=60)
        run_tool("nbdcopy", "-C", str(conns), srv.uri, back, timeout=60)
        assert filecmp.cmp(source, back, shallow=False), f"-C {conns}: data differs"
        srv.stop()
    # And into a file export: a file on disk must end up byte for byte the source.
    target = tmp_path / "target.img"
    with open(target, "wb") as f:
        f.truncate(64 * MiB)
    srv = pynbd_server(str(target), tcp=tcp)
    run_tool("nbdcopy", "-C", "4", source, srv.uri, timeout=60)
    srv.stop()
    assert filecmp.cmp(source, target, shallow=False)


def test_nbdcopy_sparse_memory_to_null_and_file(pynbd_server: Start, tmp_path: Path) -> None:
    srv = pynbd_server("--memory", "1G")
    # An empty 1 GiB memory export is one hole: nbdcopy must not read it byte by byte
    # into a file that stays sparse.
    out = tmp_path / "out.img"
    run_tool("nbdcopy", srv.uri, out, timeout=60)
    assert out.stat().st_size == 1 << 30
    assert out.stat().st_blocks * 512 < 1 * MiB
    run_tool("nbdcopy", srv.uri, "null:", timeout=60)


# --------------------------------------------------------------------------- libnbd scripts

#: Every command and flag through libnbd's Python module, checked against a model of the
#: export's bytes. argv: URI, "sr" or "nosr".
EVERY_COMMAND = """
import sys
import nbd

uri, mode = sys.argv[1], sys.argv[2]
structured = mode == "sr"
KiB, MiB = 1024, 1024 * 1024
size = 16 * MiB
model = bytearray(size)

h = nbd.NBD()
h.set_request_structured_replies(structured)
h.add_meta_context("base:allocation")
h.connect_uri(uri)
assert h.get_structured_replies_negotiated() == structured, "structured replies"
assert h.get_size() == size
for name in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero",
             "can_cache", "can_multi_conn"):
    assert getattr(h, name)(), name
assert h.can_df() == structured, "can_df"
assert h.can_meta_context("base:allocation") == structured, "meta context"
assert not h.is_read_only()


def put(data, offset, flags=0):
    h.pwrite(data, offset, flags)
    model[offset:offset + len(data)] = data


def check(offset, length):
    got = h.pread(length, offset)
    assert got == bytes(model[offset:offset + length]), f"data at {offset}+{length}"


def extents(length, offset, flags=0):
    found = []

    def cb(metacontext, off, entries, err):
        assert metacontext == "base:allocation", metacontext
        found.append((off, list(entries)))
        return 0

    h.block_status(length, offset, cb, flags)
    assert len(found) == 1, found
    off, entries = found[0]
    assert off == offset
    pairs = list(zip(entries[0::2], entries[1::2]))
    assert all(n > 0 for n, _ in pairs), pairs
    return pairs


# pread / pwrite, plain and FUA, odd offsets and lengths
put(bytes(range(256)) * 256, 0)                          # 64 KiB at 0
put(b"\\xab" * 4096, 1 * MiB, nbd.CMD_FLAG_FUA)
put(b"\\x01\\x02\\x03" * 1000, 2 * MiB + 7)              # unaligned
put(b"\\xcd" * (4 * MiB), 4 * MiB)                       # bigger than one page
check(0, 64 * KiB)
check(1 * MiB - 100, 4096 + 200)
check(2 * MiB, 8192)
check(4 * MiB - 1, 4 * MiB + 2)
h.flush()

# cache: advisory, must succeed and not change data
h.cache(1 * MiB, 4 * MiB)
check(4 * MiB, 1 * MiB)

# trim: the memory backend drops whole pages; trimmed pages read as zeroes
h.trim(1 * MiB, 6 * MiB)
model[6 * MiB:7 * MiB] = bytes(1 * MiB)
check(6 * MiB - 4096, 1 * MiB + 8192)
h.trim(4096, 8 * MiB, nbd.CMD_FLAG_FUA)

# write zeroes: plain, NO_HOLE, FAST_ZERO, FUA, and combined
for i, flags in enumerate((0, nbd.CMD_FLAG_NO_HOLE, nbd.CMD_FLAG_FAST_ZERO,
                           nbd.CMD_FLAG_FUA | nbd.CMD_FLAG_NO_HOLE,
                           nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)):
    off = 4 * MiB + i * 256 * KiB + 1000
    h.zero(100 * KiB, off, flags)
    model[off:off + 100 * KiB] = bytes(100 * KiB)
check(4 * MiB, 2 * MiB)
h.flush()

if structured:
    # block status without REQ_ONE: several extents tiling at most the request
    pairs = extents(16 * MiB, 0)
    assert sum(n for n, _ in pairs) <= 16 * MiB
    assert pairs[0][1] & nbd.STATE_HOLE == 0, pairs      # data at 0
    # without REQ_ONE, one call over a region with data then hole must say both
    pairs = extents(2 * MiB, 5 * MiB + 512 * KiB)        # data then trimmed hole
    kinds = [f & nbd.STATE_HOLE for _, f in pairs]
    assert 0 in kinds and nbd.STATE_HOLE in kinds, pairs
    # the trimmed megabyte is a hole that reads as zeroes
    pairs = extents(1 * MiB, 6 * MiB)
    assert pairs == [(1 * MiB, nbd.STATE_HOLE | nbd.STATE_ZERO)], pairs
    # far past any write: one hole up to the end
    pairs = extents(4 * MiB, 12 * MiB)
    assert all(f == nbd.STATE_HOLE | nbd.STATE_ZERO for _, f in pairs), pairs
    assert sum(n for n, _ in pairs) == 4 * MiB, pairs
    # REQ_ONE: exactly one extent, not longer than asked
    for off in (0, 5 * MiB + 512 * KiB, 6 * MiB, 12 * MiB):
        pairs = extents(2 * MiB, off, nbd.CMD_FLAG_REQ_ONE)
        assert len(pairs) == 1 and pairs[0][0] <= 2 * MiB, (off, pairs)
    pairs = extents(2 * MiB, 6 * MiB, nbd.CMD_FLAG_REQ_ONE)
    assert pairs == [(1 * MiB, nbd.STATE_HOLE | nbd.STATE_ZERO)], pairs

    # DF reads: one data chunk (or hole chunks), never fragmented data
    for off, length in ((0, 64 * KiB), (4 * MiB, 1 * MiB), (6 * MiB, 256 * KiB),
                        (2 * MiB + 3, 5000)):
        chunks = []

        def chunk(subbuf, offset, status, err):
            chunks.append((offset, status, bytes(subbuf)))
            return 0

        buf = h.pread_structured(length, off, chunk, nbd.CMD_FLAG_DF)
        assert buf == bytes(model[off:off + length]), off
        datas = [c for c in chunks if c[1] == nbd.READ_DATA]
        assert len(datas) <= 1, (off, [(o, s, len(b)) for o, s, b in chunks])
        assert all(c[1] in (nbd.READ_DATA, nbd.READ_HOLE) for c in chunks)
        covered = sorted((o, len(b)) for o, _, b in chunks)
        pos = off
        for o, n in covered:
            assert o == pos, covered
            pos += n
        assert pos == off + length, covered
else:
    # no structured replies: no block status and no DF; libnbd refuses them itself
    try:
        extents(1 * MiB, 0)
    except nbd.Error:
        pass
    else:
        raise AssertionError("block status without structured replies")
    chunks = []

    def chunk(subbuf, offset, status, err):
        chunks.append((offset, status, len(subbuf)))
        return 0

    buf = h.pread_structured(64 * KiB, 0, chunk)
    assert buf == bytes(model[:64 * KiB])
    assert chunks == [(0, nbd.READ_DATA, 64 * KiB)], chunks

# errors: out of range requests fail, the connection stays usable
for call in (lambda: h.pread(4096, size - 1),
             lambda: h.pwrite(b"x" * 10, size - 5),
             lambda: h.zero(4096, size),
             lambda: h.trim(8192, size - 4096)):
    try:
        call()
    except nbd.Error as exc:
        assert exc.errno is not None
    else:
        raise AssertionError("out of range request succeeded")
check(0, 4096)

# many requests in flight at once on the one connection (aio), then all checked
bufs = []
for i in range(64):
    data = bytes([i]) * 8192
    model[10 * MiB + i * 8192:10 * MiB + (i + 1) * 8192] = data
    h.aio_pwrite(data, 10 * MiB + i * 8192)
while h.aio_in_flight() > 0:
    h.poll(-1)
for i in range(64):
    b = nbd.Buffer(8192)
    h.aio_pread(b, 10 * MiB + i * 8192)
    bufs.append((i, b))
while h.aio_in_flight() > 0:
    h.poll(-1)
for i, b in bufs:
    assert b.to_bytearray() == bytes([i]) * 8192, i
h.flush()
check(0, size)
h.shutdown()
print("OK", mode)
"""


@pytest.mark.parametrize("mode", ["sr", "nosr"])
def test_libnbd_every_command(pynbd_server: Start, tmp_path: Path, mode: str) -> None:
    srv = pynbd_server("--memory", "16M")
    out = run_libnbd_script(tmp_path, EVERY_COMMAND, srv.uri, mode)
    assert out.strip() == f"OK {mode}"
    log = srv.log()
    assert "structured replies" in log or mode == "nosr", log


def test_libnbd_every_command_tcp(pynbd_server: Start, tmp_path: Path) -> None:
    srv = pynbd_server("--memory", "16M", tcp=True)
    assert run_libnbd_script(tmp_path, EVERY_COMMAND, srv.uri, "sr").strip() == "OK sr"


#: Block status of a sparse file through libnbd, with and without REQ_ONE. argv: URI,
#: then the file's data extents as OFFSET:LENGTH.
FILE_EXTENTS = """
import sys
import nbd

uri = sys.argv[1]
data = [tuple(map(int, a.split(":"))) for a in sys.argv[2:]]
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(uri)
size = h.get_size()


def walk(flags):
    got, pos = [], 0
    while pos < size:
        found = []

        def cb(metacontext, off, entries, err):
            found.extend(zip(entries[0::2], entries[1::2]))
            return 0

        h.block_status(min(size - pos, 64 << 20), pos, cb, flags)
        if flags & nbd.CMD_FLAG_REQ_ONE:
            assert len(found) == 1, found
        for n, f in found:
            got.append((pos, n, f))
            pos += n
    return got


for flags in (0, nbd.CMD_FLAG_REQ_ONE):
    got = walk(flags)
    # merge neighbours of the same kind, then compare with what the file system says
    merged = []
    for off, n, f in got:
        if merged and merged[-1][2] == f and merged[-1][0] + merged[-1][1] == off:
            merged[-1] = (merged[-1][0], merged[-1][1] + n, f)
        else:
            merged.append((off, n, f))
    assert [(o, n) for o, n, f in merged if f & nbd.STATE_HOLE == 0] == data, merged
    assert all(f == nbd.STATE_HOLE | nbd.STATE_ZERO for o, n, f in merged
               if f & nbd.STATE_HOLE), merged
    for o, n, f in merged:
        if f & nbd.STATE_HOLE:
            assert h.pread(min(n, 1 << 20), o) == bytes(min(n, 1 << 20))
h.shutdown()
print("OK")
"""


def test_libnbd_block_status_sparse_file(pynbd_server: Start, tmp_path: Path) -> None:
    image = tmp_path / "holes.img"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
        for off, n in ((0, 64 * KiB), (5 * MiB, 1 * MiB), (40 * MiB + 4 * KiB, 8 * KiB)):
            f.seek(off)
            f.write(os.urandom(n))
    # The file system's own view of the data, in its granularity.
    expected: list[str] = []
    with open(image, "rb") as f:
        pos = 0
        while True:
            try:
                start = os.lseek(f.fileno(), pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(f.fileno(), start, os.SEEK_HOLE)
            expected.append(f"{start}:{end - start}")
            pos = end
    assert len(expected) == 3, expected
    srv = pynbd_server(str(image))
    assert run_libnbd_script(tmp_path, FILE_EXTENTS, srv.uri, *expected).strip() == "OK"


def test_nbdsh_available() -> None:
    # nbdsh must run against Debian's python (peer_env puts /usr/bin first).
    require_program("nbdsh")
    done = run_tool("nbdsh", "-c", "print(h.get_version())")
    assert done.stdout.strip()
