"""Kernel tests: they run in a qemu guest that boots Debian's kernel (pynbd.testing.vm).

This conftest is the pytest plugin that makes ``pytest`` on the host run them there:

- On the host (``NBDVM`` unset), every test collected under ``tests/kernel/`` is
  replaced, after deselection, by a proxy with the same node id. The first proxy to run
  boots ONE guest for the whole session and runs ``python -m pytest <every selected
  kernel test id>`` in it (the host's interpreter and checkout, seen at the same paths),
  with junit xml written to the guest's xfer share. Each proxy then reports what the
  guest reported for its test: a guest failure fails the host test with the guest's
  report and captured output; a guest skip is a skip. A guest that cannot be prepared
  or booted, a guest pytest that crashed, timed out or never reported a test: every
  kernel test not reported fails, with the reason and the tail of the guest's output.
  Nothing is ever skipped for want of a guest.
- In the guest (``NBDVM=1``, set by the guest's stage 2) the tests run as written.

So ``scripts/test`` (the whole suite) and ``python3 -m pytest tests/kernel`` both include
them, and ``-k``/``-m``/node ids select kernel tests as usual. The summary ends with a
"kernel guest" line: kernel version, boot time to stage 2, guest pytest time.

Settings (environment): ``PYNBD_VM_TIMEOUT`` seconds the guest pytest may take (default
1200: the whole kernel suite takes 5 to 11 minutes under TCG on 2 shared cores),
``PYNBD_VM_BOOT_TIMEOUT`` (default 90), ``PYNBD_VM_MEMORY`` (default 1G),
``PYNBD_VM_CPUS`` (default 2), ``PYNBD_VM_CACHE`` (see pynbd.testing.vm). The guest gets
the host's PATH and every ``PYTHON*`` and ``PYNBD_*`` variable.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pynbd.testing import vm

_HERE = Path(__file__).parent.resolve()
# Seconds the guest's pytest may take for the whole kernel suite (PYNBD_VM_TIMEOUT).
GUEST_SUITE_TIMEOUT = 1200
# Lines of guest output shown with a failure that has no report of its own.
_TAIL = 60


def _setting(name: str, default: str) -> str:
    return os.environ.get(name) or default


class GuestTestFailure(Exception):
    """A kernel test failed in the guest, or the guest could not run it."""


@dataclass
class _GuestSession:
    """The one guest run of this pytest session, made by the first proxy that runs."""

    kver: str = ""
    prepare_seconds: float = 0.0
    error: str = ""
    pytest: vm.GuestPytest | None = None

    def summary(self) -> str:
        if self.pytest is None:
            return f"could not run: {self.error.splitlines()[0] if self.error else '?'}"
        result = self.pytest.result
        return (
            f"kernel {self.kver}; prepare {self.prepare_seconds:.1f} s, "
            f"boot to stage 2 {result.boot_seconds:.1f} s, guest pytest "
            f"{result.command_seconds:.1f} s (exit status {result.returncode}"
            f"{', timed out' if result.timed_out else ''}), total "
            f"{result.total_seconds:.1f} s"
        )

    def output_tail(self) -> str:
        if self.pytest is None:
            return ""
        lines = self.pytest.output.splitlines()
        return "\n".join(lines[-_TAIL:])


_SESSION = pytest.StashKey[_GuestSession]()


def _guest_env() -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if name.startswith(("PYTHON", "PYNBD_")) and not name.startswith("PYNBD_VM_")
    }
    env["PATH"] = os.environ.get("PATH", "")
    if "PYTHONPATH" in env:
        # The guest runs in the rootdir, which need not be where we were started.
        env["PYTHONPATH"] = os.pathsep.join(
            os.path.abspath(entry) for entry in env["PYTHONPATH"].split(os.pathsep) if entry
        )
    return env


def _run_guest(config: pytest.Config, nodeids: list[str]) -> _GuestSession:
    session = _GuestSession()
    start = time.monotonic()
    try:
        vm.require_programs(vm.GUEST_TEST_PROGRAMS)
        guest = vm.prepare()
    except vm.VMError as exc:
        session.error = f"the kernel test guest could not be prepared: {exc}"
        return session
    session.kver = guest.kver
    session.prepare_seconds = time.monotonic() - start
    try:
        session.pytest = vm.run_pytest(
            guest,
            ["-q", "-rfEs", "--rootdir", os.fspath(config.rootpath), *nodeids],
            cwd=config.rootpath,
            env=_guest_env(),
            timeout=float(_setting("PYNBD_VM_TIMEOUT", str(GUEST_SUITE_TIMEOUT))),
            boot_timeout=float(_setting("PYNBD_VM_BOOT_TIMEOUT", str(vm.BOOT_TIMEOUT))),
            memory=_setting("PYNBD_VM_MEMORY", "1G"),
            cpus=int(_setting("PYNBD_VM_CPUS", "2")),
        )
    except vm.VMError as exc:
        session.error = f"the kernel test guest failed: {exc}"
    return session


class GuestItem(pytest.Item):
    """Stands on the host for a kernel test; reports the guest's outcome of it."""

    def __init__(self, *, original: pytest.Item, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._reportinfo = original.reportinfo()
        # The test's own marks (-m has used them already; plugins may still look).
        for mark in original.own_markers:
            if mark.name != "timeout":
                self.own_markers.append(mark)
                self.keywords[mark.name] = mark
        if self.config.pluginmanager.hasplugin("timeout"):
            # The first proxy to run waits for the whole guest session.
            budget = (
                float(_setting("PYNBD_VM_TIMEOUT", str(GUEST_SUITE_TIMEOUT)))
                + float(_setting("PYNBD_VM_BOOT_TIMEOUT", str(vm.BOOT_TIMEOUT)))
                + vm.KILL_AFTER
                + vm.POWEROFF_GRACE
                + 300  # a first run fetches and unpacks the kernel
            )
            self.add_marker(pytest.mark.timeout(budget))

    def reportinfo(self) -> tuple[Any, int | None, str]:
        return self._reportinfo

    def runtest(self) -> None:
        stash = self.config.stash
        if _SESSION not in stash:
            nodeids = [item.nodeid for item in self.session.items if isinstance(item, GuestItem)]
            stash[_SESSION] = _run_guest(self.config, nodeids)
        session = stash[_SESSION]
        if session.pytest is None:
            raise GuestTestFailure(session.error)
        report = session.pytest
        case = report.cases.get(vm.junit_key(self.nodeid))
        if case is None:
            why = [f"the guest reported no result for {self.nodeid}"]
            if report.result.timed_out:
                why.append("the guest's timeout interrupted its pytest (PYNBD_VM_TIMEOUT)")
            why.append(f"guest pytest exit status {report.result.returncode}")
            if report.junit_error:
                why.append(report.junit_error)
            raise GuestTestFailure(
                "; ".join(why) + f"\n--- guest output (last lines)\n{session.output_tail()}"
            )
        if case.outcome == "skipped":
            # Reported at the test's own location, as a skip mark would be (the
            # argument is private to pytest but has been there since pytest 7).
            raise pytest.skip.Exception(f"in the guest: {case.message}", _use_item_location=True)
        if case.outcome in ("failed", "error"):
            what = "failed" if case.outcome == "failed" else "had an error (setup/teardown)"
            raise GuestTestFailure(
                f"{self.nodeid} {what} in the guest (kernel {session.kver}): {case.message}\n"
                f"{case.details}\n{case.output}".rstrip()
            )

    def repr_failure(
        self,
        excinfo: pytest.ExceptionInfo[BaseException],
        style: Any = None,
    ) -> Any:
        if isinstance(excinfo.value, GuestTestFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)


def _is_kernel_test(item: pytest.Item) -> bool:
    return item.path.resolve().is_relative_to(_HERE)


# trylast: -k, -m and other plugins have deselected already; only selected tests go.
@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    """On the host, put a :class:`GuestItem` in place of each kernel test."""
    if vm.in_guest():
        return
    for i, item in enumerate(items):
        if _is_kernel_test(item) and not isinstance(item, GuestItem):
            assert item.parent is not None
            items[i] = GuestItem.from_parent(item.parent, name=item.name, original=item)


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    """Say how the guest run went: kernel, boot time, guest pytest time."""
    if _SESSION in config.stash:
        terminalreporter.write_sep("-", "kernel guest")
        terminalreporter.write_line(config.stash[_SESSION].summary())


# --------------------------------------------------------------------------- in the guest


@pytest.fixture(scope="session")
def nbd_module() -> Iterator[None]:
    """Load the nbd driver (``modprobe nbd``) in the guest."""
    if not vm.in_guest():
        pytest.fail("kernel tests run only in the test guest (NBDVM=1)")
    subprocess.run(["modprobe", "nbd"], check=True, timeout=60)
    yield


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    """An empty mount point, unmounted after the test whatever happened."""
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    # Not tests.kernel.helpers.umount: tests/test_vm_harness.py runs this conftest alone.
    if os.path.ismount(path):
        subprocess.run(["umount", os.fspath(path)], timeout=120, check=False)
