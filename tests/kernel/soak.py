"""A soak of the kernel path, in the test guest: many attach/IO/detach cycles, then many
server SIGKILLs in the middle of writes under ``pynbd attach --persist``.

Not part of CI (it takes tens of minutes under TCG); ``test_soak.py`` runs it with a
few cycles and kills to show that it works. From the checkout's root::

    python -m tests.kernel.soak                    # 200 cycles, 50 kills, in a guest
    python -m tests.kernel.soak --cycles 20 --kills 5 --seed 3

On the host it boots the test guest (:mod:`tests.guest`) and runs itself there, with
this checkout's ``src`` first on ``PYTHONPATH``; in the guest (``NBDVM=1``) it soaks:

1. **Cycles**: an nbdkit ``file`` server on a unix socket; each cycle attaches it
   (netlink and the ioctls in turn, through :func:`pynbd.kernel.attach.attach`),
   writes 128 KiB of the cycle's own pattern with ``fsync``, drops the page cache,
   reads it back and compares checksums, reads the previous cycle's pattern again
   (written through the other method), detaches, and checks that the device is free
   (no pid, no size, netlink says not connected) and that the server's file holds the
   pattern. The soak process's descriptors and threads after the first cycle and after
   the last must be the same.
2. **Kills**: a file-backed nbdkit on a TCP port of 127.0.0.1, attached by ``pynbd
   attach URI --persist`` (a separate process, which supervises the device), an ext4
   at the start of the device and a thread writing, in turn, files to it and blocks
   to the device itself past it: each write()+fsync() that returned is an
   acknowledged write, whose sha256 is kept. Each round SIGKILLs the server by its pid
   while a write is in flight (mostly), starts it again on the same port and file,
   waits for the supervisor's "reconnected" and for the writer to go on, then pauses
   the writer, drops the page cache and checks every acknowledged write still kept. A
   file is deleted, or a block overwritten, only once it has been checked after a
   restart, so every acknowledged write is checked at least once. At the end the file
   system is unmounted and ``e2fsck -fn`` must find it clean, on the device and in
   the server's file; a read-only mount checks every write again, and the server's
   file every block once the device is detached.

The kernel log is read throughout: a WARNING, BUG, Oops, hung task or "blocked for more
than" line fails the soak. It prints its figures (cycles and time per cycle, kills,
writes acknowledged/verified/lost, kernel warnings, fsck) and exits 0 only when every
check passed; 1 when one failed; 125 when the guest could not run it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from pynbd.kernel.attach import attach, detach, device_status
from pynbd.kernel.device import device_index, sysfs_state
from tests.guest import cli, qemu
from tests.kernel.helpers import (
    BAD_KERNEL_WORDS,
    CMD_TIMEOUT,
    KernelLog,
    Lines,
    Restartable,
    umount,
)
from tests.kernel.helpers import run as _run
from tests.peers import Peers, make_raw_image

CYCLES = 200
KILLS = 50
#: The export of both phases (sparse: only what is written takes guest memory).
SIZE = 64 * 1024 * 1024
#: Bytes each cycle writes and reads back.
BLOCK = 128 * 1024
#: The kernel's request timeout for the cycles (as the attach tests use).
CYCLE_TIMEOUT = 30
#: The file system of the kills, at the start of the device: TCG makes mkfs and fsck of
#: more slow.
FS_SIZE = "16M"
#: The blocks the kills' writer writes on the device itself, past the file system.
RAW_BASE = 32 * 1024 * 1024
RAW_BLOCK = 64 * 1024
RAW_SLOTS = 128
#: Files the writer keeps once checked; at most MAX_UNCHECKED more wait for a check.
LIVE = 64
MAX_UNCHECKED = 256
#: Seconds any one wait may take (a reconnection, the writer going on, the device line):
#: a bound against a hang, not a figure.
WAIT = 90.0

_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Figures:
    """What a soak did and found; :meth:`report` prints it."""

    cycles_wanted: int = 0
    cycles: int = 0
    netlink: int = 0
    ioctl: int = 0
    cycle_seconds: list[float] = field(default_factory=list)
    patterns_checked: int = 0
    fds: tuple[int, int] = (0, 0)
    threads: tuple[int, int] = (0, 0)
    kills_wanted: int = 0
    kills: int = 0
    kills_mid_write: int = 0
    reconnects: int = 0
    reconnect_seconds: list[float] = field(default_factory=list)
    kill_to_reconnect_seconds: list[float] = field(default_factory=list)
    kill_phase_seconds: float = 0.0
    acknowledged: int = 0
    files: int = 0
    blocks: int = 0
    slowest_write: float = 0.0
    verified: int = 0
    checks: int = 0
    lost: set[int] = field(default_factory=set)
    fsck: str = "not run"
    kernel_lines: list[str] = field(default_factory=list)
    kernel_said: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures and not self.kernel_lines and not self.lost

    def report(self) -> str:
        cyc = self.cycle_seconds or [0.0]
        rec = self.reconnect_seconds or [0.0]
        dead = self.kill_to_reconnect_seconds or [0.0]
        lines = [
            f"cycles: {self.cycles}/{self.cycles_wanted} attach/IO/detach ({self.netlink} "
            f"netlink, {self.ioctl} ioctl) in {sum(cyc):.0f} s; per cycle median "
            f"{statistics.median(cyc):.2f} s, max {max(cyc):.2f} s; {self.patterns_checked} "
            f"pattern checksums compared; soak process descriptors {self.fds[0]} -> "
            f"{self.fds[1]}, threads {self.threads[0]} -> {self.threads[1]}",
            f"kills: {self.kills}/{self.kills_wanted} server SIGKILLs ({self.kills_mid_write} "
            f"with a write+fsync in flight) in {self.kill_phase_seconds:.0f} s; "
            f"{self.reconnects} reconnections; from kill to reconnected median "
            f"{statistics.median(dead):.2f} s, max {max(dead):.2f} s (from restart "
            f"median {statistics.median(rec):.2f} s, max {max(rec):.2f} s)",
            f"writes: {self.acknowledged} acknowledged ({self.files} files on ext4, "
            f"{self.blocks} blocks on the device), {self.verified} verified by checksum "
            f"({self.checks} checksums compared), {len(self.lost)} lost; slowest "
            f"write+fsync {self.slowest_write:.2f} s",
            f"fsck: {self.fsck}",
            f"kernel log: {len(self.kernel_lines)} warnings",
            *(f"  {line}" for line in self.kernel_lines[:20]),
            "kernel log, the most frequent lines (digits as N):",
            *(f"  {n:5d} x {line}" for line, n in self.kernel_said.most_common(8)),
            *(f"FAILED: {what}" for what in self.failures),
            "soak: " + ("PASSED" if self.ok else "FAILED"),
        ]
        return "\n".join(lines)


class Soak:
    """The two phases, sharing the figures, the kernel log and the output."""

    def __init__(self, workdir: Path, figures: Figures, out: TextIO, seed: int) -> None:
        self.workdir, self.figures, self.out, self.seed = workdir, figures, out, seed
        self.log = KernelLog()
        self.started = time.monotonic()

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:7.1f}] {text}", file=self.out, flush=True)

    def check_kernel_log(self, where: str) -> None:
        lines = self.log.read()
        self.figures.kernel_said.update(re.sub(r"\d+", "N", line) for line in lines)
        bad = [line for line in lines if any(w in line for w in BAD_KERNEL_WORDS)]
        if bad:
            self.say(f"kernel log, {where}: " + " | ".join(bad))
        self.figures.kernel_lines += [f"{where}: {line}" for line in bad]

    # ----------------------------------------------------------------- cycles

    def cycles(self, n: int) -> None:
        fig = self.figures
        fig.cycles_wanted = n
        with Peers(self.workdir / "cycles") as peers:
            image = make_raw_image(self.workdir / "cycles.img", SIZE)
            server = peers.nbdkit("file", os.fspath(image))
            for i in range(n):
                start = time.monotonic()
                use_ioctl = i % 2 == 1
                try:
                    self._cycle(server.uri, image, i, use_ioctl)
                except Exception as exc:
                    fig.failures.append(f"cycle {i} ({_method(use_ioctl)}): {exc!r}")
                    break
                finally:
                    self.check_kernel_log(f"cycle {i}")
                fig.cycle_seconds.append(time.monotonic() - start)
                fig.cycles += 1
                fig.ioctl += use_ioctl
                fig.netlink += not use_ioctl
                # After the first cycle everything lazily made exists (imports, the
                # netlink family's id): from there on a cycle must leave nothing behind.
                if i == 0:
                    fig.fds, fig.threads = (_fd_count(), 0), (_thread_count(), 0)
                if i % 10 == 9 or i == n - 1:
                    self.say(
                        f"cycle {i + 1}/{n}: {fig.cycle_seconds[-1]:.2f} s ({_method(use_ioctl)})"
                    )
            if fig.cycles:
                fig.fds = (fig.fds[0], _fd_count())
                fig.threads = (fig.threads[0], _thread_count())
                if fig.fds[1] != fig.fds[0] or fig.threads[1] != fig.threads[0]:
                    fig.failures.append(
                        f"the cycles left descriptors or threads behind: fds {fig.fds}, "
                        f"threads {fig.threads}"
                    )
            self._check_image(image, fig.cycles)

    def _cycle(self, uri: str, image: Path, i: int, use_ioctl: bool) -> None:
        data = _pattern(self.seed, i)
        with attach(uri, timeout=CYCLE_TIMEOUT, use_ioctl=use_ioctl) as att:
            if att.method != _method(use_ioctl):
                raise AssertionError(f"attached by {att.method}, not {_method(use_ioctl)}")
            fd = os.open(att.device, os.O_RDWR)
            try:
                os.pwrite(fd, data, i * BLOCK)
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                self._compare(os.pread(fd, BLOCK, i * BLOCK), data, f"cycle {i}, read back")
                if i:  # written in the previous cycle, by the other method
                    old = os.pread(fd, BLOCK, (i - 1) * BLOCK)
                    self._compare(old, _pattern(self.seed, i - 1), f"cycle {i}, cycle {i - 1}")
            finally:
                os.close(fd)
        busy = _busy(att.index)
        if busy:
            raise AssertionError(f"{att.device} not free after detach: {busy}")
        with open(image, "rb") as f:  # the server's copy
            f.seek(i * BLOCK)
            self._compare(f.read(BLOCK), data, f"cycle {i}, the server's file")

    def _compare(self, got: bytes, want: bytes, what: str) -> None:
        self.figures.patterns_checked += 1
        if hashlib.sha256(got).digest() != hashlib.sha256(want).digest():
            raise AssertionError(f"{what}: checksum differs")

    def _check_image(self, image: Path, cycles: int) -> None:
        """Every cycle's pattern, once more, in the server's file."""
        with open(image, "rb") as f:
            for i in range(cycles):
                f.seek(i * BLOCK)
                try:
                    self._compare(f.read(BLOCK), _pattern(self.seed, i), f"cycle {i}, at the end")
                except AssertionError as exc:
                    self.figures.failures.append(str(exc))

    # ----------------------------------------------------------------- kills

    def kills(self, n: int) -> None:
        fig = self.figures
        fig.kills_wanted = n
        rng = random.Random(self.seed)
        mnt = self.workdir / "mnt"
        mnt.mkdir(exist_ok=True)
        image = make_raw_image(self.workdir / "kills.img", SIZE)
        started = time.monotonic()
        with Peers(self.workdir / "kills") as peers:
            server = Restartable(peers, image)
            argv = [
                sys.executable,
                "-m",
                "pynbd",
                "attach",
                server.uri,
                "--persist",
                "--timeout",
                "10",
            ]
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            assert proc.stdout is not None and proc.stderr is not None
            out, err = Lines(proc.stdout), Lines(proc.stderr)
            writer = None
            device = None
            try:
                device = out.wait_for("/dev/nbd", WAIT).strip()
                writer = Writer(mnt, device, random.Random(rng.random()))
                err.wait_for("supervising 1 connection", WAIT)
                self.say(f"kills: {device} attached by pynbd attach --persist (pid {proc.pid})")
                _run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", device, FS_SIZE)
                _run("mount", device, mnt)
                self.say(f"kills: ext4 of {FS_SIZE} mounted; writing")
                writer.start()
                for k in range(n):
                    self._kill(k, n, server, err, writer, rng)
                    self.check_kernel_log(f"kill {k}")
                writer.stop()
                self._verify(writer, "the last")
                _run("umount", mnt)
                fsck = [_fsck(device, "the device")]
                self.say(f"kills: {fsck[0]}")
                _run("mount", "-o", "ro", device, mnt)
                self._verify(writer, "read-only mount")
                _run("umount", mnt)
                proc.send_signal(signal.SIGTERM)
                if proc.wait(WAIT) != 0:
                    fig.failures.append(f"pynbd attach exited with {proc.returncode}")
                busy = _busy(device_index(device))
                if busy:
                    fig.failures.append(f"{device} not free after pynbd attach ended: {busy}")
                self._verify(writer, "the end, in the server's file", image)
                fsck.append(_fsck(image, "the server's file"))
                self.say(f"kills: pynbd attach ended, device free; {fsck[1]}")
                fig.fsck = "; ".join(fsck)
                if any("clean" not in f for f in fsck):
                    fig.failures.append(f"fsck: {fig.fsck}")
            except Exception as exc:
                fig.failures.append(f"kills, after {fig.kills}: {exc!r}")
            finally:
                if writer is not None:
                    writer.stop(raise_stuck=False)
                    fig.acknowledged, fig.files, fig.blocks = (
                        writer.written,
                        writer.files,
                        writer.blocks,
                    )
                    fig.slowest_write = writer.slowest
                    if writer.error is not None:
                        fig.failures.append(f"the writer failed: {writer.error!r}")
                umount(mnt)
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(WAIT)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait(30)
                if device is not None and _busy(device_index(device)):
                    with contextlib.suppress(Exception):
                        detach(device, force=True)
                fig.kill_phase_seconds = time.monotonic() - started
                self.say("pynbd attach said:\n  " + "\n  ".join(_drain(err)))
                self.check_kernel_log("the end of the kills")

    def _kill(
        self, k: int, n: int, server: Restartable, err: Lines, writer: Writer, rng: random.Random
    ) -> None:
        fig = self.figures
        time.sleep(rng.uniform(0.1, 0.6))
        deadline = time.monotonic() + 5
        while not writer.in_flight and time.monotonic() < deadline:
            time.sleep(0.005)  # a kill between two writes still counts, and is rarer
        before = _count(_drain(err), "reconnected connection")
        mid_write = writer.in_flight
        killed = time.monotonic()
        server.kill()  # SIGKILL by pid
        time.sleep(rng.uniform(0.0, 0.5))  # some re-dials find nobody listening
        server.start()
        restarted = time.monotonic()
        _until(lambda: _count(_drain(err), "reconnected connection") > before, "reconnected")
        fig.reconnect_seconds.append(time.monotonic() - restarted)
        fig.kill_to_reconnect_seconds.append(time.monotonic() - killed)
        written = writer.written
        _until(
            lambda: writer.written > written or writer.full or writer.error is not None,
            "the writer to go on",
        )
        if writer.error is not None:
            raise AssertionError(f"the writer failed: {writer.error!r}")
        fig.kills += 1
        fig.kills_mid_write += mid_write
        fig.reconnects = _count(err.seen, "reconnected connection")
        self._verify(writer, f"kill {k}")
        self.say(
            f"kill {k + 1}/{n}: {'mid-write' if mid_write else 'between writes'}, reconnected "
            f"{fig.kill_to_reconnect_seconds[-1]:.2f} s after the kill; {writer.written} writes "
            f"acknowledged, {len(writer.manifest)} kept and checked, {len(fig.lost)} lost"
        )

    def _verify(self, writer: Writer, when: str, image: Path | None = None) -> None:
        """Check every acknowledged write kept, with the writer paused: read from the
        device, the page cache dropped; with ``image``, only the blocks, read from the
        server's file."""
        with writer.paused(), open(image or writer.device, "rb", buffering=0) as dev:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            for key, acked in list(writer.manifest.items()):
                data: bytes | None = None
                if key.startswith("@"):
                    data = os.pread(dev.fileno(), acked.length, int(key[1:]))
                elif image is not None:
                    continue
                else:
                    with contextlib.suppress(FileNotFoundError):
                        data = (writer.root / key).read_bytes()
                self.figures.checks += 1
                if data is None or hashlib.sha256(data).hexdigest() != acked.digest:
                    if acked.number not in self.figures.lost:
                        why = "missing" if data is None else "checksum differs"
                        self.say(f"LOST, checked after {when}: write {acked.number}, {key} ({why})")
                    self.figures.lost.add(acked.number)
                writer.checked.add(acked.number)
            self.figures.verified = len(writer.checked)

    def close(self) -> None:
        self.log.close()


@dataclass(frozen=True)
class Acked:
    """An acknowledged write: its number (in the order written), length and sha256."""

    number: int
    length: int
    digest: str


class Writer:
    """Writes in a thread, with fsync: files on the mounted file system and raw blocks
    on the device past it, in turn. Once a write()+fsync() returned (the write is
    acknowledged) its sha256 goes into :attr:`manifest`, keyed by the file's name or
    by ``@OFFSET`` for a block on the device.

    At most :data:`LIVE` checked files are kept (older checked ones are deleted), a
    block is overwritten only once checked, and it waits while :data:`MAX_UNCHECKED`
    writes wait for a check: the space used stays small however fast the host is.
    """

    def __init__(self, root: Path, device: str, rng: random.Random) -> None:
        self.root, self.device, self.rng = root, device, rng
        self.manifest: dict[str, Acked] = {}
        self.checked: set[int] = set()  # numbers of the writes checked
        self.written = self.files = self.blocks = 0
        self.slowest = 0.0  # seconds of the slowest write()+fsync()
        self.in_flight = False
        self.full = False
        self.error: BaseException | None = None
        self._order: deque[str] = deque()  # the files, oldest first
        self._lock = threading.Lock()  # held for each write
        self._go = threading.Event()
        self._go.set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fd = -1

    def start(self) -> None:
        self._fd = os.open(self.device, os.O_RDWR)
        self._thread = threading.Thread(target=self._run, name="soak writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._go.wait(0.1):
                    continue
                with self._lock:
                    self.full = not self._write_one()
                if self.full:
                    time.sleep(0.05)
        except BaseException as exc:  # the soak reports it
            self.error = exc

    def _write_one(self) -> bool:
        """Write the next file or block; False when it must wait for a check."""
        i = self.written
        if sum(a.number not in self.checked for a in self.manifest.values()) >= MAX_UNCHECKED:
            return False
        if i % 2:
            offset = RAW_BASE + (i // 2 % RAW_SLOTS) * RAW_BLOCK
            key = f"@{offset}"
            if key in self.manifest and self.manifest[key].number not in self.checked:
                return False
        else:
            key = f"d{i % 8}/f{i}"
        data = self.rng.randbytes(self.rng.randrange(1, RAW_BLOCK // 4096 + 1) * 4096)
        start = time.monotonic()
        self.in_flight = True
        if i % 2:
            os.pwrite(self._fd, data, offset)
            os.fsync(self._fd)
            self.blocks += 1
        else:
            path = self.root / key
            path.parent.mkdir(exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            self.files += 1
            self._order.append(key)
        self.in_flight = False
        self.slowest = max(self.slowest, time.monotonic() - start)
        self.manifest[key] = Acked(i, len(data), hashlib.sha256(data).hexdigest())
        self.written = i + 1
        while len(self._order) > LIVE and self.manifest[self._order[0]].number in self.checked:
            old = self._order.popleft()
            (self.root / old).unlink()
            del self.manifest[old]
        return True

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Between two writes: the writer waits until the block ends."""
        self._go.clear()
        try:
            with self._lock:
                yield
        finally:
            self._go.set()

    def stop(self, *, raise_stuck: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(WAIT)
            if self._thread.is_alive():
                if raise_stuck:
                    raise AssertionError("the writer is stuck")
                return
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# --------------------------------------------------------------------------- helpers


def _method(use_ioctl: bool) -> str:
    return "ioctl" if use_ioctl else "netlink"


def _pattern(seed: int, i: int) -> bytes:
    return random.Random(seed * 1_000_003 + i).randbytes(BLOCK)


def _busy(index: int) -> str:
    """What still holds device ``index`` after a detach ("" when it is free)."""
    info = device_status(index)[0]
    state = sysfs_state(index)
    why = []
    if info.connected:
        why.append("netlink says connected")
    if state.pid is not None:
        why.append(f"pid {state.pid}")
    if state.size:
        why.append(f"size {state.size}")
    return ", ".join(why)


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


def _drain(lines: Lines) -> list[str]:
    """Every line the reader has seen so far (EOF's empty line left out)."""
    while not lines.queue.empty():
        line = lines.queue.get_nowait()
        if line:
            lines.seen.append(line)
    return lines.seen


def _count(lines: Sequence[str], word: str) -> int:
    return sum(word in line for line in lines)


def _until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} in {WAIT:.0f} s")
        time.sleep(0.02)


def _fsck(target: str | os.PathLike[str], what: str) -> str:
    done = subprocess.run(
        ["e2fsck", "-f", "-n", os.fspath(target)],
        capture_output=True,
        text=True,
        timeout=CMD_TIMEOUT,
        check=False,
    )
    if done.returncode == 0:
        return f"e2fsck -fn on {what}: clean"
    tail = " | ".join((done.stdout + done.stderr).strip().splitlines()[-5:])
    return f"e2fsck -fn on {what}: exit {done.returncode}: {tail}"


# --------------------------------------------------------------------------- entry points


def soak(
    workdir: Path,
    *,
    cycles: int = CYCLES,
    kills: int = KILLS,
    seed: int = 1,
    out: TextIO = sys.stdout,
) -> Figures:
    """Run both phases in the guest, files under ``workdir``; return the figures.

    Needs root and the nbd driver (it runs ``modprobe nbd``). Never raises for what it
    finds: a failure is in :attr:`Figures.failures`.
    """
    figures = Figures()
    run = Soak(workdir, figures, out, seed)
    try:
        subprocess.run(["modprobe", "nbd"], check=True, timeout=60)
        run.check_kernel_log("modprobe nbd")
        for phase, count in ((run.cycles, cycles), (run.kills, kills)):
            try:
                phase(count)
            except Exception as exc:  # a server that would not start, ...
                figures.failures.append(f"{phase.__name__}: {exc!r}")
    finally:
        run.close()
    return figures


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.kernel.soak",
        description="Soak the kernel path in the test guest: attach/IO/detach cycles "
        "(netlink and ioctl in turn), then server SIGKILLs mid-write under pynbd attach "
        "--persist. Exits 0 when every check passed.",
    )
    parser.add_argument("--cycles", type=int, default=CYCLES, help=f"default {CYCLES}")
    parser.add_argument("--kills", type=int, default=KILLS, help=f"default {KILLS}")
    parser.add_argument("--seed", type=int, default=1, help="of the data and the kill times")
    parser.add_argument(
        "--guest-timeout",
        type=float,
        help="seconds the soak may run in the guest (default: 600 + 20 per cycle + 60 per kill)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """On the host: run the soak in a guest. In the guest: soak, print the figures."""
    args = _parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not qemu.in_guest():
        timeout = args.guest_timeout or 600 + 20 * args.cycles + 60 * args.kills
        paths = [os.fspath(_ROOT / "src"), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
        pythonpath = os.pathsep.join(os.path.abspath(p) for p in paths if p)
        return cli.main(
            [
                "-v",
                "--timeout",
                str(timeout),
                "-C",
                os.fspath(_ROOT),
                "-e",
                f"PYTHONPATH={pythonpath}",
                "--",
                sys.executable,
                "-m",
                "tests.kernel.soak",
                *argv,
            ]
        )
    with tempfile.TemporaryDirectory(prefix="pynbd-soak-") as tmp:
        started = time.monotonic()
        figures = soak(Path(tmp), cycles=args.cycles, kills=args.kills, seed=args.seed)
        print(
            f"\nsoak of {args.cycles} cycles and {args.kills} kills, seed {args.seed}, "
            f"kernel {os.uname().release}: {time.monotonic() - started:.0f} s"
        )
        print(figures.report(), flush=True)
    return 0 if figures.ok else 1


if __name__ == "__main__":
    sys.exit(main())
