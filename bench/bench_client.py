#!/usr/bin/env python3
"""Benchmark pynbd's clients against libnbd's Python binding on one nbdkit export.

Run it with Debian's interpreter, the only one that has libnbd's ``nbd`` module::

    PYTHONPATH=src /usr/bin/python3 bench/bench_client.py --markdown   # from the checkout's root

One ``nbdkit memory`` server per transport (a unix socket, and TCP on 127.0.0.1 at a
kernel-chosen port) serves every contender in the same run. The region read is
pre-filled first, so reads copy real pages instead of nbdkit's sparse zeroes. For each
case the contenders take turns (A B C, then C B A, ...) for several rounds of a fixed
duration, and the table reports each contender's median; a ratio is the pynbd median
over the libnbd median. A benchmark measures: nothing here fails on a slow result.

Cases (ids are ``TRANSPORT/CASE``, for ``--only REGEX``):

* ``seq-read-256k``, ``seq-read-4m``: ``Client.pread`` (a new bytes per call) vs
  ``nbd.NBD.pread`` (a new bytes per call); ``Client.pread_into`` (the caller's buffer)
  vs ``nbd.NBD.aio_pread`` into a reused ``nbd.Buffer``, waited for one at a time
  (libnbd's zero-copy path: its blocking ``pread`` always returns new bytes).
* ``seq-write-256k``, ``seq-write-4m``: ``Client.pwrite`` vs ``nbd.NBD.pwrite``.
* ``seq-read-kept``: 256 KiB reads over a 64 MiB region, keeping every block until the
  region is read whole (then dropping them all): ``Client.pread`` and ``nbd.NBD.pread``
  into lists of new bytes, and ``Client.pread_into`` into slices of one 64 MiB buffer.
* ``rand-read-qd1``: 4 KiB random reads, ``Client.pread`` vs ``nbd.NBD.pread``.
* ``rand-read-qd16``: 4 KiB random reads with 16 in flight: ``AsyncClient`` with 16
  tasks (on the default asyncio loop, and on uvloop when it can be imported) vs libnbd
  ``aio_pread`` keeping 16 commands in flight, driven by ``nbd.NBD.poll``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib
import json
import os
import platform
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

REPO = Path(__file__).resolve().parent.parent

try:
    from pynbd.client import AsyncClient, Client
except ImportError:  # run from a checkout without PYTHONPATH=src
    sys.path.insert(0, str(REPO / "src"))
    from pynbd.client import AsyncClient, Client

KiB = 1024
MiB = 1024 * KiB
EXPORT_SIZE = "1G"
QUEUE_DEPTH = 16
KEPT_REGION = 64 * MiB  # what the seq-read-kept case reads whole before dropping it
# Offsets of the random reads: the same seeded list for every contender.
RANDOM_OFFSETS = 1 << 16


def _load(name: str) -> Any:
    """Import an optional module (libnbd's binding, uvloop) as an untyped object."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


nbd: Any = _load("nbd")


# -- measurement -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    """One timed run of one contender."""

    ops: int
    nbytes: int
    seconds: float
    cpu: float = 0.0  # this process's CPU seconds (user + system) during the run

    def cpu_per_op(self) -> float:
        """Client CPU microseconds per operation: steadier than rates on a busy machine."""
        return self.cpu / self.ops * 1e6 if self.ops else 0.0

    def rate(self, unit: str) -> float:
        """MB/s (10**6 bytes) or IOPS."""
        if unit == "MB/s":
            return self.nbytes / self.seconds / 1e6
        return self.ops / self.seconds


class Runner(Protocol):
    """A connected contender: runs its workload for a while, then closes."""

    def run(self, seconds: float) -> Sample: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Workload:
    """What a contender does: sequential or random I/O of ``block`` bytes in a region."""

    block: int
    start: int  # the region's first byte in the export
    size: int  # the region's length
    random: bool = False

    def offsets(self) -> list[int]:
        """The offsets to visit, cycled: the whole region in order, or seeded random."""
        count = self.size // self.block
        if not self.random:
            return [self.start + i * self.block for i in range(count)]
        rng = random.Random(42)
        return [self.start + rng.randrange(count) * self.block for _ in range(RANDOM_OFFSETS)]


def read_kept(
    pread: Callable[[int, int], bytes],
    block: int,
    offs: list[int],
    i: int,
    kept: list[bytes],
    end: float,
) -> tuple[int, int]:
    """Read ``block`` bytes at ``offs[i]``, ``offs[i + 1]``... until ``end`` (a
    ``time.perf_counter()`` value), keeping each result in ``kept`` until the region
    was read whole; return the next index and the reads made. Both libraries' kept
    contenders run this same loop."""
    n, clock, ops = len(offs), time.perf_counter, 0
    while True:
        kept.append(pread(block, offs[i]))
        i = (i + 1) % n
        if not i:
            kept.clear()  # the region was read whole: drop it, start again
        ops += 1
        if clock() >= end:
            return i, ops


# -- pynbd contenders --------------------------------------------------------------------


class PynbdSync:
    """pynbd's blocking Client: ``pread``, ``pread_into`` or ``pwrite``, one at a time.

    Two modes keep what they read until the region is read whole: ``pread_kept``
    holds the ``bytes`` in a list, ``pread_into_kept`` reads into slices of one
    region-sized buffer made once."""

    def __init__(self, uri: str, work: Workload, mode: str) -> None:
        self.client = Client(uri)
        self.work = work
        self.mode = mode
        self.offsets = work.offsets()
        self.pos = 0
        self.buf = bytearray(work.size if mode == "pread_into_kept" else work.block)
        self.data = pattern(work.block)
        self.kept: list[bytes] = []

    def run(self, seconds: float) -> Sample:
        c, offs, n = self.client, self.offsets, len(self.offsets)
        block, buf, data, i = self.work.block, self.buf, self.data, self.pos
        clock = time.perf_counter
        ops = 0
        t0 = clock()
        end = t0 + seconds
        # One loop per mode, so no contender pays for a branch the others skip.
        if self.mode == "pread":
            while True:
                c.pread(block, offs[i])
                i = (i + 1) % n
                ops += 1
                if clock() >= end:
                    break
        elif self.mode == "pread_into":
            while True:
                c.pread_into(buf, offs[i])
                i = (i + 1) % n
                ops += 1
                if clock() >= end:
                    break
        elif self.mode == "pread_kept":
            i, ops = read_kept(c.pread, block, offs, i, self.kept, end)
        elif self.mode == "pread_into_kept":
            view, start = memoryview(buf), self.work.start
            while True:
                offset = offs[i]
                c.pread_into(view[offset - start : offset - start + block], offset)
                i = (i + 1) % n
                ops += 1
                if clock() >= end:
                    break
        else:
            while True:
                c.pwrite(data, offs[i])
                i = (i + 1) % n
                ops += 1
                if clock() >= end:
                    break
        elapsed = clock() - t0
        self.pos = i
        return Sample(ops, ops * block, elapsed)

    def close(self) -> None:
        self.client.close()


class PynbdAsync:
    """pynbd's AsyncClient: ``depth`` tasks each awaiting ``pread`` in a loop."""

    def __init__(self, uri: str, work: Workload, depth: int, loop_kind: str) -> None:
        if loop_kind == "uvloop":
            uvloop = _load("uvloop")
            if uvloop is None:
                raise RuntimeError("uvloop is not importable")
            self.loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        else:
            self.loop = asyncio.new_event_loop()
        self.work = work
        self.depth = depth
        self.offsets = work.offsets()
        self.pos = 0
        self._elapsed = 0.0
        try:
            # Bounded: a client that cannot finish its handshake must not stall the run.
            self.client: AsyncClient = self.loop.run_until_complete(
                asyncio.wait_for(AsyncClient.connect(uri), 10)
            )
        except TimeoutError as exc:
            self.loop.close()
            raise RuntimeError(
                f"AsyncClient.connect on {loop_kind} did not finish in 10 s"
            ) from exc
        except BaseException:
            self.loop.close()
            raise

    def run(self, seconds: float) -> Sample:
        ops: int = self.loop.run_until_complete(self._run(seconds))
        return Sample(ops, ops * self.work.block, self._elapsed)

    async def _run(self, seconds: float) -> int:
        c, offs, n, block = self.client, self.offsets, len(self.offsets), self.work.block
        clock = time.perf_counter
        counter = [0, self.pos]  # ops done, next offset index (shared by the tasks)

        async def worker(end: float) -> None:
            while True:
                i = counter[1]
                counter[1] = (i + 1) % n
                await c.pread(block, offs[i])
                counter[0] += 1
                if clock() >= end:
                    return

        t0 = clock()
        end = t0 + seconds
        await asyncio.gather(*(worker(end) for _ in range(self.depth)))
        self._elapsed = clock() - t0
        self.pos = counter[1]
        return counter[0]

    def close(self) -> None:
        try:
            self.loop.run_until_complete(self.client.close())
        finally:
            self.loop.close()


# -- libnbd contenders -------------------------------------------------------------------


def libnbd_close(h: Any) -> None:
    """Disconnect politely; libnbd 1.14's binding frees the handle when it is dropped."""
    with contextlib.suppress(Exception):
        h.shutdown()


class LibnbdSync:
    """libnbd: blocking ``pread``/``pwrite``, or ``aio_pread`` into one reused Buffer."""

    def __init__(self, uri: str, work: Workload, mode: str) -> None:
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.work = work
        self.mode = mode
        self.offsets = work.offsets()
        self.pos = 0
        self.buf = nbd.Buffer(work.block)
        self.data = pattern(work.block)
        self.kept: list[bytes] = []

    def run(self, seconds: float) -> Sample:
        h, offs, n = self.h, self.offsets, len(self.offsets)
        block, buf, data, i = self.work.block, self.buf, self.data, self.pos
        clock = time.perf_counter
        ops = 0
        t0 = clock()
        end = t0 + seconds
        if self.mode == "pread":
            while True:
                h.pread(block, offs[i])
                i = (i + 1) % n
                ops += 1
                if clock() >= end:
                    break
        elif self.mode == "pread_kept":
            i, ops = read_kept(h.pread, block, offs, i, self.kept, end)
        elif self.mode == "aio_pread":
            aio_pread, completed, poll = h.aio_pread, h.aio_command_completed, h.poll
            while True:
                cookie = aio_pread(buf, offs[i])
                while not completed(cookie):  # raises if the read failed
                    poll(-1)
                i = (i + 1) % n
                ops += 1
                if clock() >= end:
                    break
        else:
            while True:
                h.pwrite(data, offs[i])
                i = (i + 1) % n
                ops += 1
                if clock() >= end:
                    break
        elapsed = clock() - t0
        self.pos = i
        return Sample(ops, ops * block, elapsed)

    def close(self) -> None:
        libnbd_close(self.h)
        self.h = None


class LibnbdAio:
    """libnbd: ``aio_pread`` keeping ``depth`` commands in flight, one Buffer each."""

    def __init__(self, uri: str, work: Workload, depth: int) -> None:
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.work = work
        self.depth = depth
        self.offsets = work.offsets()
        self.pos = 0
        self.bufs = [nbd.Buffer(work.block) for _ in range(depth)]
        self.free = list(range(depth))
        self.errors: list[int] = []
        # The completion callback hands the buffer back and auto-retires (returns 1).
        self.callbacks = [self._callback(slot) for slot in range(depth)]

    def _callback(self, slot: int) -> Callable[[Any], int]:
        free, errors = self.free, self.errors

        def done(err: Any) -> int:
            if err.value:
                errors.append(err.value)
            free.append(slot)
            return 1

        return done

    def run(self, seconds: float) -> Sample:
        h, offs, n, depth = self.h, self.offsets, len(self.offsets), self.depth
        bufs, free, callbacks, i = self.bufs, self.free, self.callbacks, self.pos
        aio_pread, poll = h.aio_pread, h.poll
        clock = time.perf_counter
        submitted = 0
        t0 = clock()
        end = t0 + seconds
        running = True
        while True:
            while running and free:
                slot = free.pop()
                aio_pread(bufs[slot], offs[i], completion=callbacks[slot])
                i = (i + 1) % n
                submitted += 1
            if not running and len(free) == depth:
                break
            poll(-1)
            if running and clock() >= end:
                running = False  # drain what is in flight, as the asyncio tasks do
        elapsed = clock() - t0
        if self.errors:
            raise RuntimeError(f"libnbd aio_pread failed: errno {self.errors[0]}")
        self.pos = i
        return Sample(submitted, submitted * self.work.block, elapsed)

    def close(self) -> None:
        libnbd_close(self.h)
        self.h = None


# -- cases -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the table: a pynbd contender against a libnbd one."""

    title: str
    pynbd: str
    libnbd: str
    target: float | None


@dataclass(frozen=True, slots=True)
class Case:
    """One workload and its contenders (name -> factory taking the URI)."""

    name: str
    unit: str
    contenders: dict[str, Callable[[str], Runner]]
    rows: tuple[Row, ...]


def build_cases(region: int, uvloop_ok: bool) -> list[Case]:
    """The benchmark's cases. Reads use [0, region); writes use [region, 2 * region)."""
    cases = []
    for block, label in ((256 * KiB, "256k"), (4 * MiB, "4m")):
        rd = Workload(block=block, start=0, size=region)
        wr = Workload(block=block, start=region, size=region)
        size = "256 KiB" if block == 256 * KiB else "4 MiB"
        cases.append(
            Case(
                f"seq-read-{label}",
                "MB/s",
                {
                    "pynbd Client.pread": partial(PynbdSync, work=rd, mode="pread"),
                    "libnbd pread": partial(LibnbdSync, work=rd, mode="pread"),
                    "pynbd Client.pread_into": partial(PynbdSync, work=rd, mode="pread_into"),
                    "libnbd aio_pread(Buffer)": partial(LibnbdSync, work=rd, mode="aio_pread"),
                },
                (
                    Row(
                        f"seq read {size}, new buffer per call",
                        "pynbd Client.pread",
                        "libnbd pread",
                        1.0,
                    ),
                    Row(
                        f"seq read {size}, into caller's buffer",
                        "pynbd Client.pread_into",
                        "libnbd aio_pread(Buffer)",
                        1.0,
                    ),
                ),
            )
        )
        cases.append(
            Case(
                f"seq-write-{label}",
                "MB/s",
                {
                    "pynbd Client.pwrite": partial(PynbdSync, work=wr, mode="pwrite"),
                    "libnbd pwrite": partial(LibnbdSync, work=wr, mode="pwrite"),
                },
                (Row(f"seq write {size}", "pynbd Client.pwrite", "libnbd pwrite", None),),
            )
        )
    # A program that keeps what it reads (an image read whole into memory): new bytes
    # need fresh pages each pass, one buffer made once does not. libnbd 1.14 cannot
    # read into part of a buffer from Python, so its new bytes are the reference. No
    # target: the rows show what reading into the caller's buffer saves.
    kept = Workload(block=256 * KiB, start=0, size=min(region, KEPT_REGION))
    cases.append(
        Case(
            "seq-read-kept",
            "MB/s",
            {
                "pynbd Client.pread, kept": partial(PynbdSync, work=kept, mode="pread_kept"),
                "libnbd pread, kept": partial(LibnbdSync, work=kept, mode="pread_kept"),
                "pynbd Client.pread_into, one buffer": partial(
                    PynbdSync, work=kept, mode="pread_into_kept"
                ),
            },
            (
                Row(
                    "seq read 256 KiB kept, new buffer per call",
                    "pynbd Client.pread, kept",
                    "libnbd pread, kept",
                    None,
                ),
                Row(
                    "seq read 256 KiB kept, into one buffer",
                    "pynbd Client.pread_into, one buffer",
                    "libnbd pread, kept",
                    None,
                ),
            ),
        )
    )
    rand = Workload(block=4 * KiB, start=0, size=region, random=True)
    cases.append(
        Case(
            "rand-read-qd1",
            "IOPS",
            {
                "pynbd Client.pread": partial(PynbdSync, work=rand, mode="pread"),
                "libnbd pread": partial(LibnbdSync, work=rand, mode="pread"),
            },
            (Row("4 KiB random read, QD1", "pynbd Client.pread", "libnbd pread", 0.8),),
        )
    )
    qd = QUEUE_DEPTH
    contenders: dict[str, Callable[[str], Runner]] = {
        "pynbd AsyncClient": partial(PynbdAsync, work=rand, depth=qd, loop_kind="asyncio"),
        "libnbd aio": partial(LibnbdAio, work=rand, depth=qd),
    }
    rows = [Row(f"4 KiB random read, QD{qd}, asyncio", "pynbd AsyncClient", "libnbd aio", 1.0)]
    if uvloop_ok:
        contenders["pynbd AsyncClient uvloop"] = partial(
            PynbdAsync, work=rand, depth=qd, loop_kind="uvloop"
        )
        rows.append(
            Row(f"4 KiB random read, QD{qd}, uvloop", "pynbd AsyncClient uvloop", "libnbd aio", 1.0)
        )
    cases.append(Case(f"rand-read-qd{qd}", "IOPS", contenders, tuple(rows)))
    return cases


# -- the server --------------------------------------------------------------------------


def pattern(length: int) -> bytes:
    """Deterministic, incompressible-looking bytes (the same in every process)."""
    return random.Random(length).randbytes(length)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def nbdkit(transport: str, workdir: str) -> Iterator[str]:
    """Start one ``nbdkit memory`` server; yield its URI; stop it by pid, always."""
    exe = shutil.which("nbdkit")
    if exe is None:
        raise SystemExit("nbdkit is not installed")
    for attempt in range(5):
        if transport == "unix":
            path = os.path.join(workdir, f"nbdkit-{attempt}.sock")
            listen = ["-U", path]
            uri = f"nbd+unix:///?socket={path}"
            address: Any = path
            family = socket.AF_UNIX
        else:
            # A free port can be taken between probing and nbdkit's bind: retry.
            port = free_port()
            listen = ["-i", "127.0.0.1", "-p", str(port)]
            uri = f"nbd://127.0.0.1:{port}/"
            address = ("127.0.0.1", port)
            family = socket.AF_INET
        log = open(os.path.join(workdir, f"nbdkit-{transport}-{attempt}.log"), "w+b")  # noqa: SIM115
        proc = subprocess.Popen(
            [exe, "-f", "--exit-with-parent", *listen, "memory", EXPORT_SIZE],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        try:
            if _wait_ready(proc, family, address):
                yield uri
                return
        finally:
            _stop(proc)
            log.seek(0)
            errors = log.read().decode(errors="replace")
            log.close()
        if transport == "unix":
            break
    raise SystemExit(f"nbdkit ({transport}) did not start:\n{errors}")


def _wait_ready(proc: subprocess.Popen[bytes], family: int, address: Any) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.connect(address)
                return True
            except OSError:
                time.sleep(0.02)
    return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def prefill(uri: str, region: int) -> None:
    """Write the pattern over both regions and check both libraries read it back."""
    chunk = 4 * MiB
    data = pattern(chunk)
    with Client(uri) as c:
        for offset in range(0, 2 * region, chunk):
            c.pwrite(data[: min(chunk, 2 * region - offset)], offset)
        c.flush()
        probe = region // 2 + 12345
        mine = bytes(c.pread(4096, probe))
    h = nbd.NBD()
    h.connect_uri(uri)
    theirs = h.pread(4096, probe)
    libnbd_close(h)
    expected = (data + data)[probe % chunk : probe % chunk + 4096]
    if not mine == theirs == expected:
        raise SystemExit("pynbd and libnbd read different data after the pre-fill")


# -- the run -----------------------------------------------------------------------------


@dataclass
class Result:
    """All samples of one contender in one case and transport."""

    transport: str
    case: str
    contender: str
    unit: str
    samples: list[Sample] = field(default_factory=list)
    error: str | None = None

    def median(self) -> float | None:
        """The median rate, or None when the contender failed."""
        if self.error is not None or not self.samples:
            return None
        return statistics.median(s.rate(self.unit) for s in self.samples)

    def cpu_median(self) -> float | None:
        """The median client CPU time per operation in microseconds, or None."""
        if self.error is not None or not self.samples:
            return None
        return statistics.median(s.cpu_per_op() for s in self.samples)

    def summary(self) -> str:
        """The median and the range of the rounds, or the error."""
        median = self.median()
        if median is None:
            return f"failed: {self.error}"
        rates = [s.rate(self.unit) for s in self.samples]
        low, high = fmt_rate(min(rates), self.unit), fmt_rate(max(rates), self.unit)
        return (
            f"median {fmt_rate(median, self.unit)} (rounds {low} .. {high}),"
            f" client CPU {self.cpu_median():.1f} us/op"
        )


def run_case(
    case: Case, transport: str, uri: str, rounds: int, seconds: float, warmup: float
) -> dict[str, Result]:
    """Connect every contender, warm each up, then interleave timed rounds.

    A contender that fails (to connect or mid-run) is closed and keeps its error; the
    others go on, so one broken client does not cost the whole run.
    """
    runners: dict[str, Runner] = {}
    results = {name: Result(transport, case.name, name, case.unit) for name in case.contenders}

    def attempt(name: str, step: Callable[[], object]) -> None:
        try:
            step()
        except Exception as exc:
            results[name].error = f"{type(exc).__name__}: {exc}" if str(exc) else repr(exc)
            print(f"  {name}: {results[name].error}", file=sys.stderr, flush=True)
            runner = runners.pop(name, None)
            if runner is not None:
                with contextlib.suppress(Exception):
                    runner.close()

    def connect(name: str) -> None:
        runners[name] = case.contenders[name](uri)

    def timed(name: str, duration: float, keep: bool) -> None:
        cpu = time.process_time()
        sample = runners[name].run(duration)
        if keep:
            cpu = time.process_time() - cpu
            results[name].samples.append(dataclasses.replace(sample, cpu=cpu))

    try:
        for name in case.contenders:
            attempt(name, partial(connect, name))
        for name in list(runners):
            attempt(name, partial(timed, name, warmup, False))
        for r in range(rounds):
            names = list(runners)
            # Alternate the order (A B C, C B A, ...) so no contender always goes first.
            for name in names if r % 2 == 0 else reversed(names):
                attempt(name, partial(timed, name, seconds, True))
    finally:
        for runner in runners.values():
            with contextlib.suppress(Exception):
                runner.close()
    return results


def fmt_rate(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "MB/s":
        return f"{value:,.0f} MB/s"
    return f"{value / 1000:,.1f}k IOPS"


def paired_ratio(mine: Result, theirs: Result) -> float | None:
    """The median over rounds of pynbd's rate over libnbd's in the same round.

    The contenders of a round run next to each other, so a round in which the machine
    was slower for both leaves this ratio alone, where it moves both medians apart.
    None when a side failed or the rounds do not pair up."""
    if mine.error or theirs.error or not mine.samples:
        return None
    if len(mine.samples) != len(theirs.samples):
        return None
    ratios = [
        a.rate(mine.unit) / b.rate(theirs.unit)
        for a, b in zip(mine.samples, theirs.samples, strict=True)
        if b.rate(theirs.unit) > 0
    ]
    return statistics.median(ratios) if len(ratios) == len(mine.samples) else None


def judge(ratio: float, target: float | None, low: float | None = None) -> str:
    """The verdict on ``ratio`` against ``target``; with ``low``, the low end of an
    interval around it, a ratio that reaches the target while ``low`` does not only
    "meets within noise"."""
    if target is None:
        return "no target"
    if ratio < target:
        return f"misses by {(1 - ratio / target) * 100:.1f}%"
    if low is not None and low < target:
        return "meets within noise"
    return "meets"


def table_rows(
    cases: list[Case], results: dict[tuple[str, str, str], Result]
) -> list[dict[str, Any]]:
    """The comparison rows (medians, ratio, verdict), in run order."""
    rows = []
    transports = list(dict.fromkeys(t for t, _, _ in results))
    for transport in transports:
        for case in cases:
            for row in case.rows:
                mine = results.get((transport, case.name, row.pynbd))
                theirs = results.get((transport, case.name, row.libnbd))
                if mine is None or theirs is None:
                    continue
                a, b = mine.median(), theirs.median()
                ratio = None if a is None or b is None or not b else a / b
                if ratio is None:
                    verdict = f"error: {mine.error or theirs.error}"
                else:
                    verdict = judge(ratio, row.target)
                rows.append(
                    {
                        "id": f"{transport}/{case.name}",
                        "test": row.title,
                        "transport": transport,
                        "pynbd_contender": row.pynbd,
                        "libnbd_contender": row.libnbd,
                        "unit": case.unit,
                        "pynbd": a,
                        "libnbd": b,
                        "ratio": ratio,
                        "paired_ratio": paired_ratio(mine, theirs),
                        "target": row.target,
                        "verdict": verdict,
                        "pynbd_cpu_us_per_op": mine.cpu_median(),
                        "libnbd_cpu_us_per_op": theirs.cpu_median(),
                    }
                )
    return rows


def pooled_rows(docs: list[dict[str, Any]], resamples: int = 2000) -> list[dict[str, Any]]:
    """Rows of several runs (their ``--json`` documents) with the rounds pooled.

    One run's ratio moves by several percent from run to run on a shared machine. Here
    each round's own ratio (pynbd's rate over libnbd's, as in :func:`paired_ratio`) is
    pooled over every run; a row gets their median and a 95% interval for it (the
    2.5th and 97.5th percentiles of the medians of ``resamples`` bootstrap resamples,
    seeded: the same files give the same table). The verdict says "meets" when the
    whole interval reaches the target, "meets within noise" when only the median does.
    """
    ratios: dict[str, list[float]] = {}
    first: dict[str, dict[str, Any]] = {}
    runs: dict[str, int] = {}
    for doc in docs:
        samples = {
            (r["transport"], r["case"], r["contender"]): r["samples"]
            for r in doc["results"]
            if not r["error"]
        }
        for row in doc["rows"]:
            key = f"{row['id']}|{row['test']}"
            transport, case = row["id"].split("/", 1)
            mine = samples.get((transport, case, row["pynbd_contender"]))
            theirs = samples.get((transport, case, row["libnbd_contender"]))
            if not mine or not theirs or len(mine) != len(theirs):
                continue
            first.setdefault(key, row)
            runs[key] = runs.get(key, 0) + 1
            ratios.setdefault(key, []).extend(
                a["rate"] / b["rate"] for a, b in zip(mine, theirs, strict=True) if b["rate"] > 0
            )
    rng = random.Random(0)
    pooled = []
    for key, row in first.items():
        values = ratios[key]
        if not values:
            continue
        median = statistics.median(values)
        medians = sorted(
            statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples)
        )
        low, high = medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]
        target = row["target"]
        verdict = judge(median, target, low)
        pooled.append(
            {
                "id": row["id"],
                "test": row["test"],
                "transport": row["transport"],
                "runs": runs[key],
                "rounds": len(values),
                "median": median,
                "low": low,
                "high": high,
                "target": target,
                "verdict": verdict,
            }
        )
    return pooled


def render_pooled(rows: list[dict[str, Any]], markdown: bool) -> str:
    """The table of :func:`pooled_rows`."""
    header = ["test", "transport", "runs", "rounds", "paired", "95% interval", "target", "verdict"]
    lines = [
        [
            r["test"],
            r["transport"],
            str(r["runs"]),
            str(r["rounds"]),
            f"{r['median']:.3f}x",
            f"{r['low']:.3f}x .. {r['high']:.3f}x",
            "-" if r["target"] is None else f">= {r['target']:.1f}x",
            r["verdict"],
        ]
        for r in rows
    ]
    return _table(header, lines, markdown)


def render(rows: list[dict[str, Any]], markdown: bool) -> str:
    """The comparison table, then the client CPU time per operation of each side."""
    header = ["test", "transport", "pynbd", "libnbd", "ratio", "paired", "target", "verdict"]
    lines = [
        [
            r["test"],
            r["transport"],
            fmt_rate(r["pynbd"], r["unit"]),
            fmt_rate(r["libnbd"], r["unit"]),
            "-" if r["ratio"] is None else f"{r['ratio']:.2f}x",
            "-" if r["paired_ratio"] is None else f"{r['paired_ratio']:.2f}x",
            "-" if r["target"] is None else f">= {r['target']:.1f}x",
            r["verdict"],
        ]
        for r in rows
    ]
    cpu_header = ["test", "transport", "pynbd CPU us/op", "libnbd CPU us/op"]
    cpu_lines = [
        [
            r["test"],
            r["transport"],
            fmt_us(r["pynbd_cpu_us_per_op"]),
            fmt_us(r["libnbd_cpu_us_per_op"]),
        ]
        for r in rows
    ]
    tables = [_table(header, lines, markdown), _table(cpu_header, cpu_lines, markdown)]
    return "\n\n".join(tables)


def fmt_us(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _table(header: list[str], lines: list[list[str]], markdown: bool) -> str:
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(line) + " |" for line in lines]
        return "\n".join(out)
    widths = [max(len(x) for x in col) for col in zip(header, *lines, strict=False)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    out += [
        "  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)).rstrip() for line in lines
    ]
    return "\n".join(out)


def environment() -> dict[str, Any]:
    def output(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip()
        except OSError:
            return ""

    debian = Path("/etc/debian_version")
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "debian": debian.read_text().strip() if debian.exists() else None,
        "cpus": os.cpu_count(),
        "nbdkit": output("nbdkit", "--version"),
        "libnbd": nbd.NBD().get_version(),
        "uvloop": getattr(_load("uvloop"), "__version__", None),
        "pynbd_commit": output("git", "-C", str(REPO), "rev-parse", "--short", "HEAD"),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="a smoke run: 2 short rounds")
    p.add_argument("--only", metavar="REGEX", help="run cases whose TRANSPORT/CASE id matches")
    p.add_argument("--json", metavar="FILE", help="write every sample and the table as JSON")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--rounds", type=int, help="timed rounds per contender (default 9)")
    p.add_argument("--seconds", type=float, help="length of one round (default 0.4)")
    p.add_argument("--list", action="store_true", help="list the case ids and exit")
    p.add_argument(
        "--pool",
        metavar="FILE",
        nargs="+",
        help="run nothing: pool the rounds of earlier runs' --json files into one table",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the table; return the exit status."""
    args = parse_args(argv)
    if args.pool:
        try:
            docs = [json.loads(Path(name).read_text()) for name in args.pool]
            rows = pooled_rows(docs)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            where = " ".join(args.pool)
            print(f"cannot pool {where}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 2
        print(render_pooled(rows, args.markdown))
        return 0
    uvloop_ok = _load("uvloop") is not None
    if args.quick:
        rounds, seconds, warmup, region = 2, 0.1, 0.02, 16 * MiB
    else:
        # Many short rounds: on a shared machine the load drifts, and finer interleaving
        # lets every contender see the same conditions.
        rounds, seconds, warmup, region = 9, 0.4, 0.2, 256 * MiB
    rounds = args.rounds or rounds
    seconds = args.seconds or seconds
    cases = build_cases(region, uvloop_ok)
    selected = [
        (transport, case)
        for transport in ("unix", "tcp")
        for case in cases
        if args.only is None or re.search(args.only, f"{transport}/{case.name}")
    ]
    if args.list:
        for transport in ("unix", "tcp"):
            for case in cases:
                print(f"{transport}/{case.name}")
        return 0
    if nbd is None:
        print(
            "libnbd's Python binding (module nbd) is missing: run this with /usr/bin/python3",
            file=sys.stderr,
        )
        return 2
    if not selected:
        print(f"no case matches {args.only!r} (see --list)", file=sys.stderr)
        return 2
    if not uvloop_ok:
        print("note: uvloop is not importable; its row is left out", file=sys.stderr)

    results: dict[tuple[str, str, str], Result] = {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pynbd-bench-") as workdir:
        for transport in dict.fromkeys(t for t, _ in selected):
            with nbdkit(transport, workdir) as uri:
                prefill(uri, region)
                for t, case in selected:
                    if t != transport:
                        continue
                    print(f"{transport}/{case.name} ...", file=sys.stderr, flush=True)
                    for name, result in run_case(
                        case, transport, uri, rounds, seconds, warmup
                    ).items():
                        results[(transport, case.name, name)] = result
                        print(f"  {name:28} {result.summary()}", file=sys.stderr, flush=True)
    rows = table_rows(cases, results)
    print(render(rows, args.markdown))
    elapsed = time.monotonic() - started
    print(f"({rounds} rounds x {seconds} s per contender; {elapsed:.0f} s)", file=sys.stderr)
    if args.json:
        doc = {
            "environment": environment(),
            "settings": {"rounds": rounds, "seconds": seconds, "region": region},
            "rows": rows,
            "results": [
                {
                    "transport": r.transport,
                    "case": r.case,
                    "contender": r.contender,
                    "unit": r.unit,
                    "median": r.median(),
                    "cpu_us_per_op": r.cpu_median(),
                    "error": r.error,
                    "samples": [
                        {
                            "ops": s.ops,
                            "bytes": s.nbytes,
                            "seconds": s.seconds,
                            "rate": s.rate(r.unit),
                            "cpu_us_per_op": s.cpu_per_op(),
                        }
                        for s in r.samples
                    ],
                }
                for r in results.values()
            ],
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
