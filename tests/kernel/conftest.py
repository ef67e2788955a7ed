"""Kernel tests: they run in a qemu guest that boots Debian's kernel (see tests/guest).

On the host, the hooks below hand every selected test of this folder to
:mod:`tests.guest.bridge`: one guest boots for the session, runs them all under pytest,
and each host test reports the guest's outcome of it. So ``scripts/test`` (the whole
suite) and ``python3 -m pytest tests/kernel`` both include them, and ``-k``/``-m``/node
ids select kernel tests as usual. The summary ends with a "kernel guest" line: kernel
version, boot time to stage 2, guest pytest time. The settings (``PYNBD_VM_TIMEOUT``
and others) are in :mod:`tests.guest.bridge`.

In the guest (``NBDVM=1``) the tests run as written, with the fixtures below. Every
test that uses the nbd driver fails when the kernel logs a warning, a bug, an oops or a
hung task while it runs (:func:`kernel_log_clean`).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.guest import bridge, qemu
from tests.kernel.helpers import KernelLog, umount


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
    """Load the nbd driver (``modprobe nbd``) in the guest; the kernel logs nothing bad
    while it loads."""
    if not qemu.in_guest():
        pytest.fail("kernel tests run only in the test guest (NBDVM=1)")
    with KernelLog() as log:
        subprocess.run(["modprobe", "nbd"], check=True, timeout=60)
        bad = log.bad_lines()
    assert not bad, "kernel log while loading nbd:\n" + "\n".join(bad)
    yield


@pytest.fixture(autouse=True)
def kernel_log_clean(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that uses the nbd driver (``nbd_module``) when the kernel logs a
    warning, a bug, an oops or a hung task from its setup to its teardown.

    Only the lines logged meanwhile count, so the check depends on no other test and
    on no order. Autouse fixtures are set up before, and torn down after, the test's
    other fixtures of its scope: a device detached or a server stopped in a fixture's
    teardown is inside the window.
    """
    if "nbd_module" not in request.fixturenames:
        yield
        return
    with KernelLog() as log:
        yield
        bad = log.bad_lines()
    assert not bad, "the kernel logged, during this test:\n" + "\n".join(bad)


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    """An empty mount point, unmounted after the test whatever happened."""
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    umount(path)
