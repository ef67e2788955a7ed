"""What the kernel tests share: running a command, unmounting, the kernel log check,
stopping a server process, and an ext4 round trip through a device."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

#: Seconds one command (mkfs, fsck, mount, dmesg...) may take under TCG.
CMD_TIMEOUT = 120
#: Lines of the kernel log that fail a test.
BAD_KERNEL_WORDS = ("WARNING:", "BUG:", "Oops", "hung task", "blocked for more than")


def run(
    *argv: str | os.PathLike[str], env: dict[str, str] | None = None, timeout: float = CMD_TIMEOUT
) -> str:
    """Run a command; fail the test with its output unless it exits 0. Returns stdout."""
    done = subprocess.run(
        [os.fspath(a) for a in argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    assert done.returncode == 0, f"{argv}: {done.returncode}\n{done.stdout}{done.stderr}"
    return done.stdout


def umount(mnt: Path) -> None:
    """Unmount ``mnt`` if it is mounted (cleanup: never fails)."""
    if os.path.ismount(mnt):
        subprocess.run(["umount", os.fspath(mnt)], timeout=CMD_TIMEOUT, check=False)


def check_dmesg() -> None:
    """Fail on any WARNING, BUG, Oops or hung-task line in the kernel log."""
    log = run("dmesg")
    bad = [line for line in log.splitlines() if any(w in line for w in BAD_KERNEL_WORDS)]
    assert not bad, "kernel log:\n" + "\n".join(bad)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it does not exit within 30 s."""
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def filesystem_round_trip(device: str, mnt: Path) -> None:
    """mkfs.ext4, mount, write files, umount, fsck -f, mount again, compare."""
    mnt.mkdir(exist_ok=True)
    files = {f"f{i}": os.urandom(37_000 * (i + 1)) for i in range(4)}
    # 16 MiB of filesystem: TCG makes mkfs and fsck of more slow, for no more coverage.
    run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", device, "16M")
    try:
        run("mount", device, mnt)
        for name, data in files.items():
            (mnt / name).write_bytes(data)
        (mnt / "dir").mkdir()
        (mnt / "dir" / "small").write_text("hello")
        run("umount", mnt)
        run("e2fsck", "-f", "-n", device)
        run("mount", "-o", "ro", device, mnt)
        for name, data in files.items():
            assert (mnt / name).read_bytes() == data
        assert (mnt / "dir" / "small").read_text() == "hello"
        run("umount", mnt)
    finally:
        umount(mnt)
