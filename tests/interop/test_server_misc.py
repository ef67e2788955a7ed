"""More independent clients of ``pynbd serve``: nbdkit's nbd plugin as a proxy in front
of it (data checked through the proxy), ``nbd-client -l`` listing its named exports
over TCP, and fio's nbd engine with a verifying random-write workload.

Every test starts its own server (the ``pynbd_server`` fixture of
``tests/serve_launcher.py``), which is stopped by pid at teardown.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from pynbd import Client
from tests.peers import run_tool
from tests.serve_launcher import PynbdServer

KiB = 1024
MiB = 1024 * KiB

Start = Callable[..., PynbdServer]

pytestmark = pytest.mark.interop


# --------------------------------------------------------------------------- nbdkit proxy


def test_nbdkit_nbd_plugin_proxy_info(pynbd_server: Start) -> None:
    srv = pynbd_server("--memory", "24M")
    assert srv.socket_path is not None
    out = run_tool(
        "nbdkit",
        "-U",
        "-",
        "nbd",
        f"socket={srv.socket_path}",
        "--run",
        'nbdinfo --json "$uri"',
        timeout=60,
    ).stdout
    info = json.loads(out)
    (export,) = info["exports"]
    assert export["export-size"] == 24 * MiB
    # nbdkit passes through what our server can do.
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"):
        assert export[flag] is True, flag
    assert export["is_read_only"] is False


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_nbdkit_proxy_data_both_ways(pynbd_server: Start, tmp_path: Path, tcp: bool) -> None:
    srv = pynbd_server("--memory", "16M", "--export", "named=memory:16M", tcp=tcp)
    where = (
        f"socket={srv.socket_path}"
        if srv.socket_path is not None
        else f"uri=nbd://{srv.host}:{srv.port}/named"
    )
    extra = ["export=named"] if srv.socket_path is not None else []
    source = tmp_path / "src.img"
    source.write_bytes(os.urandom(16 * MiB))
    back = tmp_path / "back.img"
    # Through the proxy: write the file in, read it back out, in one nbdkit run.
    run_tool(
        "nbdkit",
        "-U",
        "-",
        "nbd",
        where,
        *extra,
        "--run",
        f'nbdcopy -C 4 {source} "$uri" && nbdcopy "$uri" {back} && '
        f'qemu-io -f raw -c "write -P 0x3c 5M 64k" -c "read -P 0x3c 5M 64k" "$uri"',
        timeout=90,
    )
    expected = bytearray(source.read_bytes())
    expected[5 * MiB : 5 * MiB + 64 * KiB] = b"\x3c" * (64 * KiB)
    assert back.read_bytes() == source.read_bytes()
    # And directly from our server: what went through the proxy is really there.
    with Client(srv.uri_for("named")) as c:
        assert c.pread(16 * MiB, 0) == expected


def test_nbdkit_proxy_block_status(pynbd_server: Start) -> None:
    srv = pynbd_server("--memory", "8M")
    with Client(srv.uri) as c:
        c.pwrite(b"\x01" * (128 * KiB), 2 * MiB)
    assert srv.socket_path is not None
    out = run_tool(
        "nbdkit",
        "-U",
        "-",
        "nbd",
        f"socket={srv.socket_path}",
        "--run",
        'nbdinfo --map --json "$uri"',
        timeout=60,
    ).stdout
    mapped = json.loads(out)
    data = [(e["offset"], e["length"]) for e in mapped if not e["type"] & 1]
    assert data == [(2 * MiB, 128 * KiB)], mapped


# --------------------------------------------------------------------------- nbd-client


def test_nbd_client_lists_exports(pynbd_server: Start) -> None:
    srv = pynbd_server(
        "--memory", "1M", "--export", "alpha=memory:1M", "--export", "beta=memory:2M", tcp=True
    )
    done = run_tool("nbd-client", "-l", "127.0.0.1", str(srv.port), timeout=30)
    names = [line.strip() for line in done.stdout.splitlines()]
    assert "alpha" in names and "beta" in names, done.stdout
    # The export list is all it printed after the negotiation line, "" included.
    listed = [n for n in names if n and not n.startswith("Negotiation")]
    assert sorted(listed) == ["alpha", "beta"], done.stdout


# --------------------------------------------------------------------------- fio


def run_fio(uri: str, *extra: str, timeout: float = 90) -> dict[str, object]:
    """Run fio with the nbd engine on *uri* and return its JSON report; fio's status
    is non-zero when a verify fails."""
    out = run_tool(
        "fio",
        "--name=v",
        "--ioengine=nbd",
        f"--uri={uri}",
        "--output-format=json",
        # fio would leave a verify state file in the working directory.
        "--verify_state_save=0",
        *extra,
        timeout=timeout,
    ).stdout
    # fio may print notes before the JSON.
    report: dict[str, object] = json.loads(out[out.index("{") :])
    return report


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_fio_verify(pynbd_server: Start, tcp: bool) -> None:
    srv = pynbd_server("--memory", "32M", tcp=tcp)
    report = run_fio(
        srv.uri,
        "--rw=randwrite",
        "--bs=4k",
        "--size=32m",
        "--verify=crc32c",
        "--iodepth=16",
    )
    jobs = report["jobs"]
    assert isinstance(jobs, list)
    (job,) = jobs
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 32 * MiB
    # The verify phase read back every block written.
    assert job["read"]["io_bytes"] == 32 * MiB


def test_fio_verify_file_export_mixed_sizes(pynbd_server: Start, tmp_path: Path) -> None:
    image = tmp_path / "fio.img"
    with open(image, "wb") as f:
        f.truncate(32 * MiB)
    srv = pynbd_server(str(image))
    report = run_fio(
        srv.uri,
        "--rw=randwrite",
        "--bsrange=4k-256k",
        "--size=32m",
        "--verify=crc32c",
        "--iodepth=8",
        "--verify_fatal=1",
    )
    jobs = report["jobs"]
    assert isinstance(jobs, list)
    assert jobs[0]["error"] == 0
    log = srv.log()
    assert re.search(r"\d+ requests", log), log
