"""``pynbd attach``, ``pynbd detach``, ``pynbd status`` on a real /dev/nbdX.

Runs in the test guest (see conftest.py). Every test detaches what it attached and
stops its servers and its pynbd processes, even when it fails.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import select
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from pynbd.cli import main
from pynbd.cli.kernel import explain_kernel_error as _explain
from pynbd.kernel import FamilyNotFound, KernelError
from pynbd.kernel.attach import detach
from pynbd.kernel.device import sysfs_state
from pynbd.kernel.resize import read_state
from tests.peers import Server, make_raw_image, make_x509_dir

SIZE = 64 * 1024 * 1024
CMD_TIMEOUT = 120
NOBODY = 65534


def _pynbd(*args: str, user: int | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``pynbd ARGS`` in this process (a new interpreter costs seconds under TCG);
    with ``user``, in a forked child that dropped root first."""
    if user is None:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(list(args))
        return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())
    r, w = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns about fork() in a process with threads; the child only
        # runs pynbd's main and exits.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        rc = 125
        try:
            os.close(r)
            os.setgid(user)
            os.setuid(user)
            sys.stdout = sys.stderr = open(w, "w")  # noqa: SIM115
            rc = main(list(args))
            sys.stderr.flush()
        finally:
            os._exit(rc)
    os.close(w)
    with open(r) as pipe:
        text = pipe.read()
    _, status = os.waitpid(pid, 0)
    return subprocess.CompletedProcess(args, os.waitstatus_to_exitcode(status), "", text)


def _one_line_error(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pynbd: "), done.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def server(nbd_module: None, nbdkit: Callable[..., Server]) -> Iterator[Server]:
    srv = nbdkit("memory", str(SIZE))
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def cleanup() -> Iterator[list[str]]:
    """Devices to detach at the end, whatever happened."""
    devices: list[str] = []
    yield devices
    for dev in devices:
        with contextlib.suppress(KernelError):
            detach(dev, timeout=20)


def test_attach_status_detach(server: Server, cleanup: list[str]) -> None:
    done = _pynbd("attach", server.uri, "--timeout", "30", "--backend-id", "cli-test")
    assert done.returncode == 0, done.stderr
    device = done.stdout.strip()
    cleanup.append(device)
    assert device.startswith("/dev/nbd")
    assert sysfs_state(device).size == SIZE  # attached after the command exited

    status = _pynbd("status", "--json")
    assert status.returncode == 0, status.stderr
    entry = next(d for d in json.loads(status.stdout) if d["device"] == device)
    assert entry["connected"] is True
    assert entry["size"] == SIZE
    assert entry["backend"] == "cli-test"
    assert entry["block_size"] == 512

    text = _pynbd("status", device)
    assert text.returncode == 0, text.stderr
    assert text.stdout.split()[:3] == [device, "attached", "64M"]

    done = _pynbd("detach", device)
    assert done.returncode == 0, done.stderr
    assert sysfs_state(device).pid is None
    text = _pynbd("status", device)
    assert text.stdout.split()[:2] == [device, "free"]


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "no output in time"
    return proc.stdout.readline().strip()


def _foreground(
    args: Sequence[str], cleanup: list[str], during: Callable[[str], None] | None = None
) -> None:
    """``pynbd attach ARGS`` stays in the foreground: data through the device, then
    ``during(device)`` while attached, then SIGTERM detaches."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pynbd", "attach", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        device = _read_line(proc, 60)
        assert device.startswith("/dev/nbd"), device + (proc.stderr.read() if proc.stderr else "")
        cleanup.append(device)
        assert sysfs_state(device).size == SIZE
        data = os.urandom(8192)
        fd = os.open(device, os.O_RDWR)
        try:
            os.pwrite(fd, data, 4096)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            assert os.pread(fd, len(data), 4096) == data
        finally:
            os.close(fd)
        if during is not None:
            during(device)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert sysfs_state(device).pid is None
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_attach_memory_foreground(nbd_module: None, cleanup: list[str]) -> None:
    _foreground(["--memory", "64M"], cleanup)


def test_attach_file_ioctl_foreground(nbd_module: None, cleanup: list[str], tmp_path: Path) -> None:
    image = make_raw_image(tmp_path / "disk.img", SIZE)
    _foreground(["--file", os.fspath(image), "--ioctl"], cleanup)
    assert image.read_bytes()[4096 : 4096 + 16] != bytes(16)


def test_uri_foreground_until_sigterm(server: Server, cleanup: list[str]) -> None:
    _foreground([server.uri, "--foreground", "--connections", "2"], cleanup)


def test_tls_uri_relayed_and_recorded_for_resize(
    nbd_module: None,
    nbdkit: Callable[..., Server],
    cleanup: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # nbds:// stays in the foreground (the relay lives there) without --foreground,
    # records its URI for `pynbd resize`, and forgets it on detach.
    monkeypatch.setenv("PYNBD_STATE_DIR", os.fspath(tmp_path / "state"))
    srv = nbdkit("memory", str(SIZE), tcp=True, tls="x509", tls_creds=make_x509_dir(tmp_path))
    recorded: list[str] = []

    def during(device: str) -> None:
        state = read_state(device)
        assert state is not None and state["uri"] == srv.uri
        done = _pynbd("resize", device)  # asks the server again, through TLS
        assert done.returncode == 0, done.stderr
        assert str(SIZE) in done.stdout
        recorded.append(device)

    try:
        _foreground([srv.uri, "--connections", "2"], cleanup, during)
    finally:
        srv.stop()
    assert recorded and read_state(recorded[0]) is None


def test_error_not_root(nbd_module: None) -> None:
    done = _pynbd("attach", "--memory", "64M", user=NOBODY)
    _one_line_error(done, "run as root")
    done = _pynbd("detach", "/dev/nbd0", user=NOBODY)
    _one_line_error(done, "run as root")


def test_error_device_busy(server: Server, cleanup: list[str]) -> None:
    done = _pynbd("attach", server.uri)
    assert done.returncode == 0, done.stderr
    device = done.stdout.strip()
    cleanup.append(device)
    again = _pynbd("attach", server.uri, device)
    _one_line_error(again, "busy", f"pynbd detach {device}")


def test_error_server_refused(
    nbd_module: None, qemu_nbd: Callable[..., Server], tmp_path: Path
) -> None:
    image = make_raw_image(tmp_path / "disk.img", SIZE)
    srv = qemu_nbd(image, export="disk")
    try:
        uri = srv.uri_for("nosuch")
        done = _pynbd("attach", uri)
        _one_line_error(done, "server refused")
    finally:
        srv.stop()


def test_error_no_driver_explained() -> None:
    """Without the driver the message says modprobe (explained, not provoked: the
    guest's other tests need the module loaded)."""
    text = str(_explain(FamilyNotFound("nbd")))
    assert "modprobe nbd" in text
    text = str(_explain(KernelError(errno.ENOENT, call="open", device="/dev/nbd0")))
    assert "modprobe nbd" in text


def test_usage_errors(nbd_module: None) -> None:
    done = _pynbd("attach")
    _one_line_error(done, "usage")
    done = _pynbd("attach", "--memory", "1M", "--file", "x")
    _one_line_error(done, "not both")
    done = _pynbd("detach", "/tmp")
    _one_line_error(done, "not an nbd device")
