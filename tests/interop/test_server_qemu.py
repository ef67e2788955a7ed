"""qemu as an independent client of ``pynbd serve``: qemu-img info, convert both ways
and compare; qemu-io writes and reads with patterns, zeroes, discards and flushes.

Every test starts its own server (the ``pynbd_server`` fixture of
``tests/serve_launcher.py``), which is stopped by pid at teardown.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.peers import run_tool
from tests.serve_launcher import PynbdServer

KiB = 1024
MiB = 1024 * KiB

Start = Callable[..., PynbdServer]

pytestmark = pytest.mark.interop


def qemu_io(uri: str, *commands: str) -> str:
    """Run qemu-io on *uri* with each of *commands* (``-c``); return its output.

    qemu-io exits 0 even when a pattern check fails, so its output is checked too.
    """
    args = [a for c in commands for a in ("-c", c)]
    out = run_tool("qemu-io", "-f", "raw", *args, uri, timeout=60).stdout
    assert "Pattern verification failed" not in out, out
    assert "failed" not in out.lower(), out
    return out


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_qemu_img_info(pynbd_server: Start, tcp: bool) -> None:
    srv = pynbd_server("--memory", "48M", "--export", "b=memory:5M", tcp=tcp)
    info = json.loads(run_tool("qemu-img", "info", "--output=json", srv.uri).stdout)
    assert info["virtual-size"] == 48 * MiB
    assert info["format"] == "raw"
    info = json.loads(run_tool("qemu-img", "info", "--output=json", srv.uri_for("b")).stdout)
    assert info["virtual-size"] == 5 * MiB


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_qemu_img_convert_both_ways_and_compare(
    pynbd_server: Start, tmp_path: Path, tcp: bool
) -> None:
    source = tmp_path / "source.img"
    with open(source, "wb") as f:
        # Random data with holes in between, so qemu's zero detection is exercised.
        f.truncate(32 * MiB)
        for off in (0, 3 * MiB, 17 * MiB + 4 * KiB, 31 * MiB):
            f.seek(off)
            f.write(os.urandom(512 * KiB))
    srv = pynbd_server("--memory", "32M", tcp=tcp)
    run_tool("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", source, srv.uri)
    run_tool("qemu-img", "compare", "-f", "raw", "-F", "raw", source, srv.uri)
    back = tmp_path / "back.img"
    run_tool("qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri, back)
    assert back.read_bytes() == source.read_bytes()
    # qcow2 in the middle: convert from our export to qcow2 and back to another export.
    qcow = tmp_path / "copy.qcow2"
    run_tool("qemu-img", "convert", "-f", "raw", "-O", "qcow2", srv.uri, qcow)
    srv2 = pynbd_server("--memory", "32M", tcp=tcp)
    run_tool("qemu-img", "convert", "-n", "-f", "qcow2", "-O", "raw", qcow, srv2.uri)
    run_tool("qemu-img", "compare", "-f", "raw", "-F", "raw", srv.uri, srv2.uri)
    # compare must notice a difference: change one byte on one side.
    qemu_io(srv2.uri, "write -P 0x77 20M 512")
    done = run_tool("qemu-img", "compare", "-f", "raw", "-F", "raw", srv.uri, srv2.uri, check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "mismatch at offset 20971520" in done.stdout, done.stdout


def test_qemu_img_convert_file_export(pynbd_server: Start, tmp_path: Path) -> None:
    target = tmp_path / "target.img"
    with open(target, "wb") as f:
        f.truncate(16 * MiB)
    source = tmp_path / "source.img"
    source.write_bytes(os.urandom(16 * MiB))
    srv = pynbd_server(str(target))
    run_tool("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", source, srv.uri)
    srv.stop()
    assert target.read_bytes() == source.read_bytes()


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_qemu_io_patterns(pynbd_server: Start, tcp: bool) -> None:
    srv = pynbd_server("--memory", "16M", tcp=tcp)
    qemu_io(
        srv.uri,
        "write -P 0xab 0 64k",
        "read -P 0xab 0 64k",
        "write -P 0x11 1M 1M",
        "write -P 0x22 1536k 4k",  # overlaps the previous write
        "read -P 0x11 1M 512k",
        "read -P 0x22 1536k 4k",
        "read -P 0x11 1540k 508k",
        "write -z 1M 64k",  # write zeroes
        "read -P 0 1M 64k",
        "discard 4M 1M",
        "read -P 0 4M 1M",
        "write -P 0x5c -f 8M 128k",  # FUA
        "flush",
        "read -P 0x5c 8M 128k",
        "aio_write -P 0x33 12M 64k",
        "aio_write -P 0x44 13M 64k",
        "aio_flush",
        "read -P 0x33 12M 64k",
        "read -P 0x44 13M 64k",
        "read -P 0 15M 1M",
    )
    # A second qemu-io connection sees what the first wrote.
    qemu_io(srv.uri, "read -P 0xab 0 64k", "read -P 0x5c 8M 128k", "read -P 0x22 1536k 4k")
    # And a pattern check that must fail does fail: the test's check is not vacuous.
    done = run_tool("qemu-io", "-f", "raw", "-c", "read -P 0xee 0 4k", srv.uri, check=False)
    assert "Pattern verification failed" in done.stdout, done.stdout


def test_qemu_io_unaligned_and_read_only(pynbd_server: Start) -> None:
    srv = pynbd_server("--memory", "4M")
    qemu_io(srv.uri, "write -P 0x9 1 511", "read -P 0x9 1 511", "read -P 0 0 1", "read -P 0 512 1")
    ro = pynbd_server("--memory", "4M", "--read-only")
    done = run_tool("qemu-io", "-f", "raw", "-r", "-c", "read -P 0 0 4k", ro.uri)
    assert "Pattern verification failed" not in done.stdout
    done = run_tool("qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", ro.uri, check=False)
    assert "wrote" not in done.stdout, done.stdout
