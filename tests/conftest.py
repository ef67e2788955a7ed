"""Shared pytest configuration: the real-peer fixtures, what each test needs, a header.

Each test is marked with what it needs beyond the venv (the markers are registered in
pyproject.toml), so that ``scripts/check`` can run, without root, the tests that need
none of it (``-m "not interop and not root and not guest"``):

- ``guest``: every test under tests/kernel/ (they run in a qemu guest).
- ``interop``: every test under tests/interop/, every test that uses a peer fixture
  (``peers``, ``nbdkit``, ``qemu_nbd``, ``nbd_server``), the tests marked so in their
  module, and those of :data:`NEEDS` (they run a peer program, or Python 3.13,
  themselves).
- ``root``: the tests of :data:`NEEDS` that need root.

Hypothesis runs with no deadline and without its too_slow health check: both fail a
test when the host is slow or loaded, whatever the code does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.peers import nbd_server as nbd_server
from tests.peers import nbdkit as nbdkit
from tests.peers import peer_versions
from tests.peers import peers as peers
from tests.peers import qemu_nbd as qemu_nbd

_TESTS = Path(__file__).parent

settings.register_profile("pynbd", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("pynbd")

#: Directories whose every test has a marker.
BY_DIRECTORY = {"interop": "interop", "kernel": "guest"}

#: Fixtures that start a peer server.
PEER_FIXTURES = {"peers", "nbdkit", "qemu_nbd", "nbd_server"}

#: Tests that need more than the venv and say so neither by their directory nor by a
#: fixture nor in their module (which belongs to tests/server/ or tests/kernel_host/):
#: node id (without parameters) -> marker.
NEEDS = {
    # nbdinfo
    "tests/server/test_overlay.py::test_served_over_a_read_only_file": "interop",
    "tests/server/test_tls.py::test_x509_nbdinfo": "interop",
    "tests/server/test_tls.py::test_verify_peer": "interop",
    # Python 3.13 (and nbdinfo)
    "tests/server/test_tls.py::test_psk_under_python313": "interop",
    "tests/server/test_tls.py::test_nbdinfo_psk_against_a_python313_server": "interop",
    "tests/server/test_buffers.py::test_the_same_under_python_3_13": "interop",
    # sending to another netlink socket's port needs CAP_NET_ADMIN
    "tests/kernel_host/test_nlsocket.py::test_unsolicited_messages_wait_for_receive": "root",
    "tests/kernel_host/test_nlsocket.py::test_messages_after_the_ack_are_kept": "root",
}


@pytest.hookimpl(tryfirst=True)  # before -m selects by the markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test with what it needs (see the module's docstring)."""
    for item in items:
        path = item.path.relative_to(_TESTS.parent) if item.path.is_relative_to(_TESTS) else None
        if path is None:
            continue
        marker = BY_DIRECTORY.get(path.parts[1]) if len(path.parts) > 2 else None
        if marker is None and PEER_FIXTURES & set(getattr(item, "fixturenames", ())):
            marker = "interop"
        if marker is None:
            marker = NEEDS.get(item.nodeid.partition("[")[0])
        if marker is not None:
            item.add_marker(marker)


def pytest_report_header() -> list[str]:
    """Name the peer versions at the top of every run, for reading CI logs."""
    return ["peers: " + ", ".join(f"{k} {v}" for k, v in peer_versions().items())]
