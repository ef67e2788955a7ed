"""Kernel tests: they run in a qemu guest that boots Debian's kernel (see tests/guest).

On the host, the hooks below hand every selected test of this folder to
:mod:`tests.guest.bridge`: one guest boots for the session, runs them all under pytest,
and each host test reports the guest's outcome of it. So ``scripts/test`` (the whole
suite) and ``python3 -m pytest tests/kernel`` both include them, and ``-k``/``-m``/node
ids select kernel tests as usual. The summary ends with a "kernel guest" line: kernel
version, boot time to stage 2, guest pytest time. The settings (``PYNBD_VM_TIMEOUT``
and others) are in :mod:`tests.guest.bridge`.

In the guest (``NBDVM=1``) the tests run as written, with the fixtures below.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.guest import bridge, qemu
from tests.kernel.helpers import umount


# trylast: -k, -m and other plugins have deselected already; only selected tests go.
@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    """On the host, put a proxy for the guest's result in place of each kernel test."""
    bridge.proxy_guest_tests(items, Path(__file__).parent)


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    """Say how the guest run went: kernel, boot time, guest pytest time."""
    bridge.report_summary(terminalreporter, config)


# --------------------------------------------------------------------------- in the guest


@pytest.fixture(scope="session")
def nbd_module() -> Iterator[None]:
    """Load the nbd driver (``modprobe nbd``) in the guest."""
    if not qemu.in_guest():
        pytest.fail("kernel tests run only in the test guest (NBDVM=1)")
    subprocess.run(["modprobe", "nbd"], check=True, timeout=60)
    yield


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    """An empty mount point, unmounted after the test whatever happened."""
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    umount(path)
