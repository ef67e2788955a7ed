"""Boot a :class:`~tests.guest.boot.Guest` in qemu, run one command in it, power off.

The host and the guest talk through the xfer folder, shared as the guest's ``/xfer``:
the host writes ``command`` (a shell script) and ``settings``; the guest's stage 2
writes ``started`` (its uptime when the command starts) and ``exit`` ("STATUS
UPTIME"). The command's output goes to the virtio console, which is qemu's stdout.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tests.guest.boot import Guest
from tests.guest.host import SYSTEM_DIRS, VMError, which

#: Seconds from starting qemu until the guest starts the command.
BOOT_TIMEOUT = 90.0
#: Default seconds the command may run in the guest before it gets SIGINT.
RUN_TIMEOUT = 600.0
#: Seconds between the guest's SIGINT and SIGKILL to the command.
KILL_AFTER = 20.0
#: Seconds the host grants after the guest's own deadline before it kills qemu.
POWEROFF_GRACE = 30.0

_POLL = 0.05


def in_guest() -> bool:
    """Return True inside a guest started by :func:`run` (``NBDVM=1``)."""
    return os.environ.get("NBDVM") == "1"


@dataclass(frozen=True)
class RunResult:
    """How a guest run went.

    Attributes:
        returncode: the command's exit status (128 + N when signal N ended it).
        timed_out: the guest's timeout expired and sent the command SIGINT (then
            *returncode* is whatever the command made of it: 2 for pytest).
        boot_seconds: from starting qemu until the command started (host clock).
        command_seconds: how long the command ran (guest clock).
        total_seconds: from starting qemu until it exited (host clock).
        console: the guest kernel's and stage 1's console log (serial port).
        xfer: the xfer folder, when kept (``keep=True`` or a caller's *xfer*).
    """

    returncode: int
    timed_out: bool
    boot_seconds: float
    command_seconds: float
    total_seconds: float
    console: str
    xfer: Path | None = None


def run(
    guest: Guest,
    argv: Sequence[str],
    *,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = RUN_TIMEOUT,
    boot_timeout: float = BOOT_TIMEOUT,
    memory: str = "1G",
    cpus: int = 2,
    output: IO[bytes] | int | None = None,
    xfer: Path | None = None,
    keep: bool = False,
    qemu: str | None = None,
) -> RunResult:
    """Boot *guest*, run *argv* in it as root, power it off, return how it went.

    Args:
        guest: from :func:`~tests.guest.boot.prepare`.
        argv: the command and its arguments (run with ``exec``; use
            ``["sh", "-c", "..."]`` for a shell command line).
        cwd: where it runs (default: the current folder; the guest sees the same path).
        env: variables exported to the command. The guest starts from an empty
            environment with ``NBDVM=1``, ``HOME=/root``, ``LANG=C.UTF-8``, and a
            ``PATH`` of *env*'s ``PATH`` (if any) followed by the system folders.
        timeout: seconds the command may run; then it gets SIGINT, and SIGKILL
            :data:`KILL_AFTER` seconds later.
        boot_timeout: seconds from starting qemu until the command starts.
        memory: guest memory (qemu ``-m``); the guest's writes live in it (tmpfs).
        cpus: guest CPUs (TCG runs one host thread per CPU).
        output: where the command's output goes (a binary file or fd; default: our
            stdout).
        xfer: an empty folder to share as the guest's ``/xfer`` and to leave in place
            (the command may write results there); default: a temporary one.
        keep: keep the temporary xfer folder (named in :attr:`RunResult.xfer`).
        qemu: the qemu program (default ``$PYNBD_VM_QEMU`` or ``qemu-system-x86_64``).

    Raises:
        VMError: qemu is missing or failed to start, the guest did not start the
            command within *boot_timeout*, or did not power off in time, or reported
            no exit status; the message holds the tail of the console log and of qemu's
            own messages. qemu is never left running.
        ValueError: a name in *env* is not an environment variable name.
    """
    qemu = qemu or os.environ.get("PYNBD_VM_QEMU") or "qemu-system-x86_64"
    qemu_path = which(qemu)
    if qemu_path is None:
        raise VMError(f"{qemu} not found: install the Debian package qemu-system-x86")
    cwd_path = Path.cwd() if cwd is None else Path(cwd).resolve()
    exports = {"PATH": guest_path(None), **(env or {})}
    exports["PATH"] = guest_path(exports["PATH"])

    work = Path(tempfile.mkdtemp(prefix="pynbd-vm-"))
    if xfer is None:
        share = Path(tempfile.mkdtemp(prefix="pynbd-vm-xfer-"))
        remove_share = not keep
    else:
        share = xfer
        share.mkdir(parents=True, exist_ok=True)
        remove_share = False
    try:
        (share / "command").write_text(command_script(argv, cwd_path, exports))
        (share / "settings").write_text(
            f"MODDIR={shlex.quote(os.fspath(guest.moddir))}\n"
            f"TIMEOUT={max(1, round(timeout))}\n"
            f"KILL_AFTER={round(KILL_AFTER)}\n"
        )
        for name in ("started", "exit"):
            (share / name).unlink(missing_ok=True)
        serial = work / "console.log"
        qemu_log = work / "qemu.log"
        args = [
            qemu_path,
            "-machine", "q35,accel=tcg",
            "-cpu", "max",
            "-m", memory,
            "-smp", str(cpus),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", os.fspath(guest.kernel),
            "-initrd", os.fspath(guest.initrd),
            # panic=-1 with -no-reboot: a panic ends qemu at once.
            "-append", "console=ttyS0 quiet loglevel=3 panic=-1",
            "-chardev", f"file,id=serial0,path={_qemu_escape(serial)}",
            "-serial", "chardev:serial0",
            "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
            "-fsdev", f"local,id=xfer,path={_qemu_escape(share)},security_model=none",
            "-device", "virtio-9p-pci,fsdev=xfer,mount_tag=xfer",
            "-device", "virtio-serial-pci",
            "-chardev", "stdio,id=out,signal=off",
            "-device", "virtconsole,chardev=out",
        ]  # fmt: skip
        start = time.monotonic()
        with open(qemu_log, "wb") as qemu_err:
            try:
                proc = subprocess.Popen(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=qemu_err,
                    preexec_fn=_die_with_us(),
                )
            except OSError as exc:
                raise VMError(f"cannot start {qemu_path}: {exc}") from exc
            try:
                started = _wait(proc, share, start, boot_timeout, timeout, serial, qemu_log)
            finally:
                # Also on KeyboardInterrupt and pytest-timeout: qemu never outlives us.
                _stop(proc)
        result = _result(share, start, started, serial, qemu_log, proc.returncode, timeout)
        return result if remove_share else dataclasses.replace(result, xfer=share)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if remove_share:
            shutil.rmtree(share, ignore_errors=True)


def command_script(argv: Sequence[str], cwd: Path, env: Mapping[str, str]) -> str:
    """Return the shell script the guest's stage 2 runs: cd, export, exec.

    Raises:
        ValueError: a name in *env* is not an environment variable name.
    """
    lines = ["# written by tests/guest/qemu.py; run by the guest's stage 2"]
    lines.append(f"cd {shlex.quote(os.fspath(cwd))} || exit 125")
    for name, value in env.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"not an environment variable name: {name!r}")
        lines.append(f"export {name}={shlex.quote(value)}")
    lines.append("exec " + shlex.join(argv))
    return "\n".join(lines) + "\n"


def guest_path(host_path: str | None) -> str:
    """The host's PATH, with the system folders (sbin: modprobe, nbd-client) after it."""
    parts = [p for p in (host_path or "").split(os.pathsep) if p]
    return os.pathsep.join(parts + [d for d in SYSTEM_DIRS if d not in parts])


def _qemu_escape(value: str | os.PathLike[str]) -> str:
    # qemu's option syntax splits on commas; a literal comma is written twice.
    return os.fspath(value).replace(",", ",,")


def _die_with_us() -> Callable[[], None] | None:
    """Return a preexec_fn that makes the child get SIGKILL when we die, if possible.

    The ``finally`` in :func:`run` stops qemu on every exception, KeyboardInterrupt
    included; this covers our own SIGKILL, which no ``finally`` sees.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def set_pdeathsig() -> None:
        prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)

    return set_pdeathsig


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait(
    proc: subprocess.Popen[bytes],
    share: Path,
    start: float,
    boot_timeout: float,
    timeout: float,
    serial: Path,
    qemu_log: Path,
) -> float | None:
    """Wait for qemu to exit; return when the command started (monotonic), if it did."""
    started: float | None = None
    while proc.poll() is None:
        now = time.monotonic()
        if started is None and (share / "started").exists():
            started = now
        if started is None and now - start > boot_timeout:
            raise VMError(
                f"the guest did not start the command within {boot_timeout:.0f} s"
                + _diagnostics(serial, qemu_log)
            )
        if started is not None and now - started > timeout + KILL_AFTER + POWEROFF_GRACE:
            raise VMError(
                f"the guest did not power off within {timeout + KILL_AFTER:.0f} s "
                f"(+{POWEROFF_GRACE:.0f} s) of starting the command"
                + _diagnostics(serial, qemu_log)
            )
        time.sleep(_POLL)
    if started is None and (share / "started").exists():
        started = time.monotonic()
    return started


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _diagnostics(serial: Path, qemu_log: Path) -> str:
    text = ""
    console = _tail(serial)
    if console:
        text += "\n--- guest console (last lines)\n" + console
    messages = _tail(qemu_log)
    if messages:
        text += "\n--- qemu\n" + messages
    return text


def _read_float(path: Path, index: int = 0) -> float | None:
    try:
        return float(path.read_text().split()[index])
    except (OSError, ValueError, IndexError):
        return None


def _result(
    share: Path,
    start: float,
    started: float | None,
    serial: Path,
    qemu_log: Path,
    qemu_status: int | None,
    timeout: float,
) -> RunResult:
    end = time.monotonic()
    exit_fields: list[str] = []
    with contextlib.suppress(OSError):
        exit_fields = (share / "exit").read_text().split()
    if started is None or len(exit_fields) != 2 or not exit_fields[0].isdigit():
        where = "before starting the command" if started is None else "without an exit status"
        raise VMError(
            f"the guest stopped {where} (qemu exit status {qemu_status})"
            + _diagnostics(serial, qemu_log)
        )
    # Durations on the guest's clock when it gave them (the host's includes polling).
    t0 = _read_float(share / "started")
    t1 = _read_float(share / "exit", index=1)
    command_seconds = t1 - t0 if t0 is not None and t1 is not None and t1 >= t0 else end - started
    return RunResult(
        returncode=int(exit_fields[0]),
        # busybox timeout counts whole seconds; the status is whatever the command made
        # of its SIGINT (pytest: 2), so the duration tells.
        timed_out=command_seconds >= timeout - 1,
        boot_seconds=started - start,
        command_seconds=command_seconds,
        total_seconds=end - start,
        console=serial.read_text(errors="replace") if serial.exists() else "",
    )
