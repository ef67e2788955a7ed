"""Shared pytest configuration: the real-peer fixtures and a report header."""

from __future__ import annotations

from tests.peers import nbd_server as nbd_server
from tests.peers import nbdkit as nbdkit
from tests.peers import peer_versions
from tests.peers import peers as peers
from tests.peers import qemu_nbd as qemu_nbd


def pytest_report_header() -> list[str]:
    """Name the peer versions at the top of every run, for reading CI logs."""
    return ["peers: " + ", ".join(f"{k} {v}" for k, v in peer_versions().items())]
