"""Debian's nbd-client next to pynbd's attach: the same work on the same nbdkit export.

An ext4 round trip and a loop of attach, write, detach cycles, each done once with
``nbd-client`` and once with :func:`pynbd.kernel.attach.attach` (netlink both), timed.
The times are printed: run the guest's pytest with ``-s`` to see them (the junit xunit2
report the harness reads has no per-test properties). Nothing here fails on speed.
nbd-client's options differ between versions (Debian 12 has 3.24, Debian 13 3.26): they
are read from ``nbd-client -h``, never assumed from a version.

Runs in the test guest (see conftest.py). Each test disconnects its devices and stops its
server, even when it fails.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from pynbd.client.sync import Client
from pynbd.kernel.attach import attach, device_status
from pynbd.kernel.device import find_free_device, sysfs_state, wait_disconnected
from tests.kernel.helpers import filesystem_round_trip
from tests.kernel.helpers import run as _run
from tests.peers import Server

SIZE = 64 * 1024 * 1024
TIMEOUT = 30
CMD_TIMEOUT = 120
CYCLES = 10
CLIENTS = ("nbd-client", "pynbd")
# --------------------------------------------------------------------------- nbd-client


@dataclass(frozen=True)
class NbdClient:
    """How to call this machine's nbd-client, from what its ``-h`` says."""

    exe: str
    block_size: str  # the option that sets the block size
    timeout: str  # the option that sets the request timeout
    help: str

    def connect_argv(self, host: str, port: int, device: str, block_size: int) -> list[str]:
        # "nbd-client host [port] nbd_device [options]" in 3.24 and 3.26 alike; no
        # export name: nbdkit serves the same disk under any name, "" included.
        return [
            self.exe, host, str(port), device,
            self.block_size, str(block_size), self.timeout, str(TIMEOUT),
        ]  # fmt: skip


@cache
def nbd_client() -> NbdClient:
    exe = shutil.which("nbd-client")
    assert exe, "nbd-client is missing: install the Debian package nbd-client (.ci/run does)"
    done = subprocess.run(
        [exe, "-h"], capture_output=True, text=True, timeout=CMD_TIMEOUT, check=False
    )
    text = done.stdout + done.stderr

    def option(*spellings: str) -> str:
        for spelling in spellings:
            if spelling in text:
                return spelling.split("|")[-1]
        pytest.fail(f"nbd-client -h names none of {spellings}:\n{text}")

    # Usage line of 3.24 and 3.26: "nbd-client -name|-N name host [port] nbd_device".
    assert "host" in text and "nbd_device" in text, f"an nbd-client of another syntax:\n{text}"
    assert "-d nbd_device" in text, f"this nbd-client cannot disconnect (-d):\n{text}"
    return NbdClient(
        exe=exe,
        block_size=option("-block-size|-b", "-b"),
        timeout=option("-timeout|-t", "-t"),
        help=text,
    )


@contextmanager
def _attached_with_nbd_client(server: Server, block_size: int = 512) -> Iterator[str]:
    client = nbd_client()
    address = server.address
    assert isinstance(address, tuple), "nbd-client needs a TCP server here"
    host, port = address
    device = find_free_device()
    _run(*client.connect_argv(host, port, device, block_size))
    try:
        deadline = time.monotonic() + TIMEOUT
        while sysfs_state(device).size != SIZE:
            assert time.monotonic() < deadline, f"{device} never got its size"
            time.sleep(0.01)
        yield device
    finally:
        _run(client.exe, "-d", device)
        wait_disconnected(device, TIMEOUT)


@contextmanager
def _attached(client: str, server: Server) -> Iterator[str]:
    """The export on a free device, by nbd-client or by pynbd (both by netlink)."""
    if client == "nbd-client":
        with _attached_with_nbd_client(server) as device:
            yield device
    else:
        with attach(server.uri, timeout=TIMEOUT) as att:
            yield att.device


@pytest.fixture
def tcp_nbdkit(nbdkit: Callable[..., Server]) -> Iterator[Server]:
    """nbdkit memory on 127.0.0.1 (nbd-client takes a host and a port)."""
    server = nbdkit("memory", str(SIZE), tcp=True)
    try:
        yield server
    finally:
        server.stop()


def _report(client: str, name: str, seconds: float) -> None:
    print(f"\n[{client}] {name}: {seconds:.2f} s", flush=True)


# --------------------------------------------------------------------------- ext4


def _filesystem_round_trip(device: str, mnt: Path) -> None:
    filesystem_round_trip(device, mnt)


@pytest.mark.parametrize("client", CLIENTS)
def test_ext4_round_trip(
    nbd_module: None,
    tcp_nbdkit: Server,
    tmp_path: Path,
    client: str,
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    start = time.monotonic()
    with _attached(client, tcp_nbdkit) as device:
        attached = time.monotonic()
        _filesystem_round_trip(device, mnt)
        done = time.monotonic()
    _report(client, "attach", attached - start)
    _report(client, "ext4 round trip", done - attached)
    _report(client, "detach", time.monotonic() - done)
    _report(client, "total", time.monotonic() - start)


# --------------------------------------------------------------------------- cycles


@pytest.mark.parametrize("client", CLIENTS)
def test_attach_write_detach_cycles(nbd_module: None, tcp_nbdkit: Server, client: str) -> None:
    times = []
    for i in range(CYCLES):
        start = time.monotonic()
        with _attached(client, tcp_nbdkit) as device:
            fd = os.open(device, os.O_RDWR)
            try:
                os.pwrite(fd, i.to_bytes(4, "big") * 128, i * 512)
                os.fsync(fd)
            finally:
                os.close(fd)
        times.append(time.monotonic() - start)
    with Client(tcp_nbdkit.uri, timeout=60) as nbd:
        for i in range(CYCLES):
            assert nbd.pread(512, i * 512) == i.to_bytes(4, "big") * 128
    busy = [d.device for d in device_status() if d.connected or d.pid or d.size]
    assert busy == [], f"devices left busy: {busy}"
    _report(client, f"cycle median of {CYCLES}", statistics.median(times))
    _report(client, "cycle min", min(times))
    _report(client, "cycle max", max(times))


def test_nbd_client_options_are_probed(nbd_module: None) -> None:
    client = nbd_client()
    print(f"\n[nbd-client] {client.help.splitlines()[0]}", flush=True)
    assert client.block_size in ("-b", "-block-size") and client.timeout in ("-t", "-timeout")
