"""Clients nobody here wrote (libnbd's nbdinfo and nbdcopy, qemu-io, qemu-img) against
our server on a unix socket."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from pynbd.server import Export, FileBackend, MemoryBackend

from .helpers import running_server

pytestmark = pytest.mark.interop


def run(*args: str, timeout: float = 60) -> str:
    env = dict(os.environ, PATH="/usr/bin:" + os.environ.get("PATH", ""))
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, f"{args[0]} failed: {result.stderr}"
    return result.stdout


def sparse_memory() -> MemoryBackend:
    mem = MemoryBackend(1 << 30)
    mem.pwrite(memoryview(b"\x01" * 65536), 1 << 20, False)
    mem.pwrite(memoryview(b"\x02" * 131072), 512 << 20, False)
    return mem


def test_nbdinfo_json() -> None:
    exports = {"disk": Export(sparse_memory(), "sparse test disk")}
    with running_server(exports) as srv:
        info = json.loads(run("nbdinfo", "--json", srv.uri_for("disk")))
    assert info["protocol"] == "newstyle-fixed"
    assert info["structured"] is True
    (export,) = info["exports"]
    assert export["export-name"] == "disk"
    assert export["export-size"] == 1 << 30
    assert export["description"] == "sparse test disk"
    assert export["contexts"] == ["base:allocation"]
    for key in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn", "can_cache"):
        assert export[key] is True, key
    assert export["is_read_only"] is False


def test_nbdinfo_map_matches_what_was_written() -> None:
    with running_server(sparse_memory()) as srv:
        extents = json.loads(run("nbdinfo", "--map", "--json", srv.uri))
    got = [(e["offset"], e["length"], e["type"]) for e in extents]
    assert got == [
        (0, 1 << 20, 3),
        (1 << 20, 65536, 0),
        ((1 << 20) + 65536, (511 << 20) - 65536, 3),
        (512 << 20, 131072, 0),
        ((512 << 20) + 131072, (512 << 20) - 131072, 3),
    ]


def test_nbdinfo_list() -> None:
    exports = {
        "one": Export(MemoryBackend(1 << 20), "first"),
        "two": Export(MemoryBackend(2 << 20), read_only=True),
    }
    with running_server(exports) as srv:
        info = json.loads(run("nbdinfo", "--list", "--json", srv.uri))
    by_name = {e["export-name"]: e for e in info["exports"]}
    assert set(by_name) == {"one", "two"}
    assert by_name["one"]["description"] == "first"
    assert by_name["two"]["export-size"] == 2 << 20
    assert by_name["two"]["is_read_only"] is True


def test_nbdcopy_round_trip(tmp_path: Path) -> None:
    source = tmp_path / "source.img"
    data = os.urandom(3 << 20)
    with open(source, "wb") as f:
        f.truncate(64 << 20)
        f.seek(5 << 20)
        f.write(data)
    mem = MemoryBackend(64 << 20)
    with running_server(mem) as srv:
        run("nbdcopy", str(source), srv.uri)  # into our server
        back = tmp_path / "back.img"
        run("nbdcopy", srv.uri, str(back))  # and out again
    assert back.read_bytes() == source.read_bytes()
    # The zeroes were not copied as data: the store stays sparse.
    assert mem.allocated <= 4 << 20


def test_qemu_io_and_qemu_img(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    with FileBackend(image) as backend, running_server(backend) as srv:
        uri = srv.uri
        run("qemu-io", "-f", "raw", "-c", "write -P 0xab 65536 64k", uri)
        out = run("qemu-io", "-f", "raw", "-c", "read -P 0xab 65536 64k", uri)
        assert "read 65536/65536" in out
        info = json.loads(run("qemu-img", "info", "--output=json", uri))
        assert info["virtual-size"] == 16 << 20
    assert image.read_bytes()[65536:131072] == b"\xab" * 65536
