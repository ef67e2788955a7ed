"""What the kernel tests share: running a command, unmounting, reading the kernel log,
stopping a server process, an ext4 round trip through a device, a file-backed nbdkit
that can be killed and started again, and the lines of a child's pipe."""

from __future__ import annotations

import os
import queue
import subprocess
import threading
import time
from pathlib import Path
from typing import IO

from tests.peers import Peers, Server

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


class KernelLog:
    """The kernel log from here on: the records logged after it was opened.

    Reads ``/dev/kmsg``, where each open descriptor has a position of its own, so that
    readers do not disturb each other and no test's lines are another's. Use it as a
    context manager, or call :meth:`close`.
    """

    def __init__(self) -> None:
        self._fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
        os.lseek(self._fd, 0, os.SEEK_END)  # past the newest record

    def read(self) -> list[str]:
        """Return the messages logged since the last call (or since opening)."""
        lines: list[str] = []
        while True:
            try:
                record = os.read(self._fd, 65536)  # one record per read
            except BlockingIOError:  # no newer record
                return lines
            except BrokenPipeError:  # the ring buffer overwrote records not read yet
                lines.append("(kernel log records lost: the ring buffer wrapped)")
                continue
            if not record:
                return lines
            # "PRIORITY,SEQUENCE,MICROSECONDS,FLAGS;MESSAGE\n" then " KEY=VALUE" lines.
            lines.append(record.decode(errors="replace").partition(";")[2].split("\n")[0])

    def bad_lines(self) -> list[str]:
        """Return the messages logged since the last read that name a warning, a bug,
        an oops or a hung task."""
        return [line for line in self.read() if any(w in line for w in BAD_KERNEL_WORDS)]

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> KernelLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


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


class Restartable:
    """A file-backed nbdkit on a fixed TCP port that can be killed and started again."""

    def __init__(self, peers: Peers, image: Path) -> None:
        self.peers, self.image = peers, image
        self.server: Server = peers.nbdkit("file", os.fspath(image), tcp=True)
        assert self.server.port is not None
        self.port: int = self.server.port

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/"

    def kill(self) -> None:
        self.server.kill()

    def start(self) -> None:
        self.server = self.peers.nbdkit("file", os.fspath(self.image), tcp=True, port=self.port)


class Lines:
    """The lines of a pipe, read by a thread (select on a buffered pipe can miss
    lines that arrived together)."""

    def __init__(self, stream: IO[str]) -> None:
        self.queue: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        with stream:
            for line in stream:
                self.queue.put(line.rstrip())
        self.queue.put("")  # EOF

    def wait_for(self, want: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line with {want!r} in {timeout} s: {self.seen}") from None
            assert line, f"EOF before a line with {want!r}: {self.seen}"
            self.seen.append(line)
            if want in line:
                return line
