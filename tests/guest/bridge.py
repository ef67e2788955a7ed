"""The pytest bridge: the host's pytest runs a folder's tests in one guest and reports
each as its own.

A conftest (``tests/kernel/conftest.py``) calls :func:`proxy_guest_tests` from its
``pytest_collection_modifyitems`` and :func:`report_summary` from its
``pytest_terminal_summary``:

- On the host (``NBDVM`` unset), every test collected under the conftest's folder is
  replaced, after deselection, by a :class:`GuestItem` with the same node id. The first
  proxy to run boots ONE guest for the whole session and runs ``python -m pytest <every
  selected guest test id>`` in it (:func:`run_pytest`; the host's interpreter and
  checkout, seen at the same paths), with junit xml written to the guest's xfer share.
  Each proxy then reports what the guest reported for its test: a guest failure fails
  the host test with the guest's report and captured output; a guest skip is a skip. A
  guest that cannot be prepared or booted, a guest pytest that crashed, timed out or
  never reported a test: every guest test not reported fails, with the reason and the
  tail of the guest's output. Nothing is ever skipped for want of a guest.
- In the guest (``NBDVM=1``, set by the guest's stage 2) the tests run as written.

Settings (environment): ``PYNBD_VM_TIMEOUT`` seconds the guest pytest may take (default
1200: the whole kernel suite takes 5 to 11 minutes under TCG on 2 shared cores),
``PYNBD_VM_BOOT_TIMEOUT`` (default 90), ``PYNBD_VM_MEMORY`` (default 1G),
``PYNBD_VM_CPUS`` (default 2), ``PYNBD_VM_CACHE`` (see :mod:`tests.guest.fetch`). The
guest gets the host's PATH and every ``PYTHON*`` and ``PYNBD_*`` variable.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.guest import boot, qemu
from tests.guest.host import VMError, require_programs
from tests.guest.junit import CaseResult, junit_key, parse_junit

#: Programs the kernel tests run inside the guest, and the Debian package of each.
GUEST_TEST_PROGRAMS: Mapping[str, str] = {
    "nbdkit": "nbdkit",
    "nbd-client": "nbd-client",
    "nbdcopy": "libnbd-bin",
    "mkfs.ext4": "e2fsprogs",
    "blockdev": "util-linux",
    "fio": "fio",
    "sfdisk": "fdisk",
    "qemu-nbd": "qemu-utils",
    "nbd-server": "nbd-server",
}
#: Seconds the guest's pytest may take for the whole kernel suite (PYNBD_VM_TIMEOUT).
GUEST_SUITE_TIMEOUT = 1200
# Lines of guest output shown with a failure that has no report of its own.
_TAIL = 60


# --------------------------------------------------------------------------- pytest in a guest


@dataclass(frozen=True)
class GuestPytest:
    """What a pytest session in the guest reported.

    Attributes:
        result: how the guest run went (pytest's exit status is ``result.returncode``).
        cases: every ``<testcase>`` of its junit xml, by :attr:`CaseResult.key`.
        output: pytest's terminal output in the guest.
        junit_error: why the junit xml could not be read ("" when it could).
    """

    result: qemu.RunResult
    cases: dict[tuple[str, str], CaseResult] = field(default_factory=dict)
    output: str = ""
    junit_error: str = ""


def run_pytest(
    guest: boot.Guest,
    args: Sequence[str],
    *,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    python: str = sys.executable,
    plugins: Sequence[str] = ("pytest_timeout",),
    timeout: float = qemu.RUN_TIMEOUT,
    boot_timeout: float = qemu.BOOT_TIMEOUT,
    memory: str = "1G",
    cpus: int = 2,
) -> GuestPytest:
    """Boot *guest* once and run ``PYTHON -m pytest ARGS`` in it, reporting to junit xml.

    The host's interpreter and checkout are visible at the same paths in the guest, so
    *python* defaults to ours. pytest runs without its cache provider, without its
    report header (pytest_report_header hooks may run programs), and with only the
    plugins named in *plugins* (``PYTEST_DISABLE_PLUGIN_AUTOLOAD``): under TCG each
    auto-loaded plugin costs seconds (hypothesis most of all). Its junit xml (captured
    output included) is written to the xfer share and read back here.

    Args:
        guest: from :func:`~tests.guest.boot.prepare`.
        args: pytest arguments (test ids, options).
        cwd, env, timeout, boot_timeout, memory, cpus: as for :func:`tests.guest.qemu.run`.
        python: the interpreter to run pytest with.
        plugins: modules loaded with ``-p`` (those *python* cannot import are left
            out, so that a missing optional plugin is not an error).

    Raises:
        VMError: as :func:`tests.guest.qemu.run`. A pytest that ran but failed, or
            wrote no junit xml, is not an error: see :attr:`GuestPytest.junit_error` and
            the exit status.
    """
    argv = [
        python, "-m", "pytest",
        "-p", "no:cacheprovider",
        "--no-header",
        "--junitxml=/xfer/junit.xml",
        "-o", "junit_family=xunit2",
        "-o", "junit_logging=all",
        "-o", "junit_log_passing_tests=false",
    ]  # fmt: skip
    if python == sys.executable:
        plugins = [name for name in plugins if importlib.util.find_spec(name) is not None]
    for name in plugins:
        argv += ["-p", name]
    argv += args
    env = {**(env or {}), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    with tempfile.TemporaryDirectory(prefix="pynbd-vm-pytest-") as tmp:
        xfer = Path(tmp) / "xfer"
        out_path = Path(tmp) / "output"
        with open(out_path, "wb") as out:
            result = qemu.run(
                guest,
                argv,
                cwd=cwd,
                env=env,
                timeout=timeout,
                boot_timeout=boot_timeout,
                memory=memory,
                cpus=cpus,
                output=out,
                xfer=xfer,
            )
        output = out_path.read_text(errors="replace")
        try:
            cases = {case.key: case for case in parse_junit(xfer / "junit.xml")}
            junit_error = ""
        except VMError as exc:
            cases, junit_error = {}, str(exc)
    return GuestPytest(
        result=dataclasses.replace(result, xfer=None),
        cases=cases,
        output=output,
        junit_error=junit_error,
    )


# --------------------------------------------------------------------------- the session's guest


def _setting(name: str, default: float | str) -> str:
    return os.environ.get(name) or str(default)


class GuestTestFailure(Exception):
    """A test failed in the guest, or the guest could not run it."""


@dataclass
class _GuestSession:
    """The one guest run of this pytest session, made by the first proxy that runs."""

    kver: str = ""
    prepare_seconds: float = 0.0
    error: str = ""
    pytest: GuestPytest | None = None

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
        require_programs(GUEST_TEST_PROGRAMS)
        guest = boot.prepare()
    except VMError as exc:
        session.error = f"the kernel test guest could not be prepared: {exc}"
        return session
    session.kver = guest.kver
    session.prepare_seconds = time.monotonic() - start
    try:
        session.pytest = run_pytest(
            guest,
            ["-q", "-rfEs", "--rootdir", os.fspath(config.rootpath), *nodeids],
            cwd=config.rootpath,
            env=_guest_env(),
            timeout=float(_setting("PYNBD_VM_TIMEOUT", GUEST_SUITE_TIMEOUT)),
            boot_timeout=float(_setting("PYNBD_VM_BOOT_TIMEOUT", qemu.BOOT_TIMEOUT)),
            memory=_setting("PYNBD_VM_MEMORY", "1G"),
            cpus=int(_setting("PYNBD_VM_CPUS", 2)),
        )
    except VMError as exc:
        session.error = f"the kernel test guest failed: {exc}"
    return session


# --------------------------------------------------------------------------- the proxies


class GuestItem(pytest.Item):
    """Stands on the host for a guest test; reports the guest's outcome of it."""

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
                float(_setting("PYNBD_VM_TIMEOUT", GUEST_SUITE_TIMEOUT))
                + float(_setting("PYNBD_VM_BOOT_TIMEOUT", qemu.BOOT_TIMEOUT))
                + qemu.KILL_AFTER
                + qemu.POWEROFF_GRACE
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
        case = report.cases.get(junit_key(self.nodeid))
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


def proxy_guest_tests(items: list[pytest.Item], folder: Path) -> None:
    """On the host, put a :class:`GuestItem` in place of each test under *folder*; in
    the guest, leave them be. Call it after deselection (``trylast``)."""
    if qemu.in_guest():
        return
    folder = folder.resolve()
    for i, item in enumerate(items):
        if item.path.resolve().is_relative_to(folder) and not isinstance(item, GuestItem):
            assert item.parent is not None
            items[i] = GuestItem.from_parent(item.parent, name=item.name, original=item)


def report_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """Say how the guest run went, if there was one: kernel, boot time, pytest time."""
    if _SESSION in config.stash:
        terminalreporter.write_sep("-", "kernel guest")
        terminalreporter.write_line(config.stash[_SESSION].summary())
