#!/usr/bin/env python3
"""Race ``pynbd copy`` against nbdcopy, on the same servers in the same run.

::

    python3 bench/bench_copy.py                          # from the checkout's root
    python3 bench/bench_copy.py --quick --only '^unix/'

Cases (ids are ``TRANSPORT/CASE/SETTINGS``, for ``--only REGEX``):

* ``mem-to-mem``: ``nbdkit memory`` holding 1 GiB of random data to ``nbdkit memory``;
* ``file-to-nbd``: a 1 GiB file of random bytes on /dev/shm to ``nbdkit memory``;
* ``nbd-to-file``: the 1 GiB ``nbdkit memory`` to a new file on /dev/shm;
* ``sparse``: a 4 GiB ``nbdkit memory`` holding 5% data, in runs of about 256 KiB
  scattered over the whole export (copied from ``nbdkit sparse-random``), to a 4 GiB
  ``nbdkit memory``.

TRANSPORT is ``unix`` or ``tcp`` (127.0.0.1, a kernel-chosen port): both copiers reach
the same servers the same way. SETTINGS is ``default`` (each tool with no option) or
``matched`` (both with the same ``-C``, ``-R`` and ``--request-size``: nbdcopy's
effective defaults here, or ``--matched``).

First an untimed pass runs every copy once through counting relays, a thread of this
process between the copier and each server that splices the bytes through and counts
them each way, and checks with ``qemu-img compare`` that the destination equals the
source. Then the timed rounds: per case and settings the two copiers run back to back,
the order reversing from round to round, straight to the servers. Throughput is the
source's size over the copier's wall time, process start to exit. A benchmark
measures: the exit status is 0 unless something broke, whatever the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

# This script's folder is first on sys.path; bench_client puts src there when needed.
import bench_client
import bench_memory
from bench_client import _table, judge
from bench_server import SRC, Running, make_source, require, start_peer

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20
GiB = 1 << 30

OURS = "pynbd"
PEER = "nbdcopy"
TOOLS = (OURS, PEER)
TRANSPORTS = ("unix", "tcp")
SETTINGS = ("default", "matched")
#: Throughput target on the dense cases (ours over nbdcopy's); on the sparse case the
#: target is on the bytes: no more than nbdcopy's.
DENSE_TARGET = 0.9
BYTES_TARGET = 1.0
#: The sparse source: nbdkit sparse-random's share of data and mean run of data.
SPARSE_PERCENT = 5
SPARSE_RUNLENGTH = 256 * 1024
SPARSE_SEED = 17
#: A copy that takes longer than this has hung.
COPY_TIMEOUT = 600


@dataclass(frozen=True)
class Case:
    id: str
    title: str
    source: str  # "mem" (nbdkit memory), "sparse" (nbdkit memory, 5% data), "file"
    destination: str  # "mem", "sparse" (a memory export of the sparse size), "file"

    @property
    def dense(self) -> bool:
        return self.source != "sparse"


CASES = (
    Case("mem-to-mem", "nbdkit memory -> nbdkit memory", "mem", "mem"),
    Case("file-to-nbd", "file -> nbdkit memory", "file", "mem"),
    Case("nbd-to-file", "nbdkit memory -> file", "mem", "file"),
    Case("sparse", f"sparse, {SPARSE_PERCENT}% data -> nbdkit memory", "sparse", "sparse"),
)


def matched_options() -> list[str]:
    """nbdcopy's effective defaults on this machine, spelled out for both tools.

    nbdcopy opens up to 4 connections but no more than its threads, one per core
    (``nbdcopy -v`` says ``connections=2 requests=64 threads=2`` on 2 cores), keeps
    64 requests in flight on each, and reads 256 KiB per request (its man page: the
    16 MiB queue allows "up to 64 256k requests")."""
    connections = min(4, os.cpu_count() or 1)
    return ["-C", str(connections), "-R", "64", "--request-size", str(256 * 1024)]


# --------------------------------------------------------------------------- relay


def address_of(uri: str) -> tuple[int, Any]:
    """The socket family and address of an ``nbd+unix://`` or ``nbd://`` URI."""
    parts = urlsplit(uri)
    if parts.scheme == "nbd+unix":
        return socket.AF_UNIX, parse_qs(parts.query)["socket"][0]
    if parts.scheme == "nbd" and parts.hostname and parts.port:
        return socket.AF_INET, (parts.hostname, parts.port)
    raise ValueError(f"not an nbd+unix:// or nbd:// URI: {uri}")


@dataclass
class Counts:
    """Bytes a relay passed: ``sent`` from the copier to the server, ``received``
    from the server to the copier; ``connections`` the copier opened."""

    sent: int = 0
    received: int = 0
    connections: int = 0


class Relay:
    """A counting relay in front of one server, for the copies whose bytes are counted.

    It listens where the copier connects (a unix socket at ``path``, or 127.0.0.1 at a
    kernel-chosen port), connects each connection it accepts to the server, and moves
    the bytes both ways with ``splice`` through a pipe, counting what crosses each
    socket. The copier's view of the server is unchanged (the handshake, multi-conn,
    every reply passes through), so it counts what a copier really sends and
    receives, headers and all, not what it says it did."""

    def __init__(self, upstream: str, listen: Path | None) -> None:
        self.family, self.address = address_of(upstream)
        self.counts = Counts()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        if listen is not None:
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(str(listen))
            self.uri = f"nbd+unix:///?socket={listen}"
        else:
            self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.listener.bind(("127.0.0.1", 0))
            self.uri = f"nbd://127.0.0.1:{self.listener.getsockname()[1]}/"
        self.listener.listen(64)
        self.listener.settimeout(0.1)  # so that the accept loop sees close()
        self._acceptor = threading.Thread(target=self._accept, name="relay-accept", daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.setblocking(True)
            server = socket.socket(self.family, socket.SOCK_STREAM)
            try:
                server.connect(self.address)
            except OSError:
                client.close()
                server.close()
                continue
            with self._lock:
                self.counts.connections += 1
            t = threading.Thread(target=self._serve, args=(client, server), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, client: socket.socket, server: socket.socket) -> None:
        up = threading.Thread(target=self._pump, args=(client, server, True), daemon=True)
        up.start()
        self._pump(server, client, False)
        up.join()
        client.close()
        server.close()

    def _pump(self, src: socket.socket, dst: socket.socket, to_server: bool) -> None:
        r, w = os.pipe()
        moved = 0
        try:
            while True:
                n = os.splice(src.fileno(), w, 1 << 20)
                if n == 0:
                    break
                moved += n
                while n:
                    n -= os.splice(r, dst.fileno(), n)
        except OSError:
            pass  # a side went away: what crossed is counted
        finally:
            os.close(r)
            os.close(w)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            with self._lock:
                if to_server:
                    self.counts.sent += moved
                else:
                    self.counts.received += moved

    def close(self) -> Counts:
        """Stop listening, wait for the connections to end; return the counts."""
        self._stopping.set()
        self.listener.close()
        self._acceptor.join(10)
        for t in self._threads:
            t.join(30)
        return self.counts


# --------------------------------------------------------------------------- copies


@dataclass
class Outcome:
    """One copy: wall seconds (process start to exit), the copier's CPU seconds (user
    + system, from wait4), and pynbd's own ``-v`` summary when it printed one."""

    seconds: float
    cpu: float
    engine_seconds: float | None = None
    summary: str | None = None


#: ``pynbd copy -v``: "pynbd copy: SIZE bytes: read R, written W, zeroed Z, skipped K,
#: in T s (X MB/s)".
SUMMARY = re.compile(r"^pynbd copy: .* in ([0-9.]+) s\b.*$", re.MULTILINE)


def parse_summary(stderr: str) -> tuple[float | None, str | None]:
    """The seconds and the line of ``pynbd copy -v``'s summary in ``stderr``."""
    m = SUMMARY.search(stderr)
    if m is None:
        return None, None
    return float(m.group(1)), m.group(0)


def run_copy(argv: list[str], env: dict[str, str], timeout: float = COPY_TIMEOUT) -> Outcome:
    """Run one copier to its end; its wall time and CPU time.

    Raises:
        RuntimeError: it failed (its status and the end of its stderr), or hung.
    """
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env
        )
        timer = threading.Timer(timeout, proc.send_signal, (signal.SIGKILL,))
        timer.start()
        try:
            # wait4 rather than Popen.wait: it gives the child's own CPU time.
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if proc.returncode != 0:
        tail = "; ".join(stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"{Path(argv[0]).name} exited with {proc.returncode}: {tail}")
    engine, line = parse_summary(stderr)
    return Outcome(seconds, usage.ru_utime + usage.ru_stime, engine, line)


@dataclass
class Tools:
    """How each copier is run."""

    python: str
    matched: list[str]
    stand_in: str | None = None  # a program to run in pynbd's place (an A/A check)
    env: dict[str, str] = field(default_factory=dict)

    def argv(self, tool: str, settings: str, src: str, dst: str) -> list[str]:
        options = self.matched if settings == "matched" else []
        if tool == PEER:
            return [require("nbdcopy"), *options, src, dst]
        if self.stand_in is not None:
            return [*shlex.split(self.stand_in), *options, src, dst]
        return [self.python, "-m", "pynbd", "copy", "-v", *options, src, dst]


# --------------------------------------------------------------------------- the run


@dataclass
class Sample:
    seconds: float
    cpu: float
    size: int
    engine_seconds: float | None = None

    @property
    def rate(self) -> float:
        """MB/s (10^6 bytes) of the source's size over the wall time."""
        return self.size / self.seconds / 1e6


@dataclass
class Count:
    """The untimed pass of one copier: bytes each way on each socket (None where that
    side is a file), whether the destination came out equal to the source, and
    pynbd's own summary."""

    source: Counts | None
    destination: Counts | None
    identical: bool
    summary: str | None = None

    @property
    def total(self) -> int:
        return sum(c.sent + c.received for c in (self.source, self.destination) if c)


@dataclass
class Results:
    samples: dict[tuple[str, str, str], list[Sample]] = field(default_factory=dict)
    counts: dict[tuple[str, str, str], Count] = field(default_factory=dict)
    errors: dict[tuple[str, str, str], str] = field(default_factory=dict)


def case_id(transport: str, case: Case, settings: str) -> str:
    return f"{transport}/{case.id}/{settings}"


@dataclass
class Setup:
    """One transport's servers and files, for the whole run."""

    transport: str
    workdir: Path
    uris: dict[str, str]  # "mem", "sparse": sources; "dst-mem", "dst-sparse"
    source_file: Path
    sizes: dict[str, int]  # "mem" and "file": the dense size; "sparse"

    def source(self, case: Case) -> str:
        return str(self.source_file) if case.source == "file" else self.uris[case.source]

    def destination(self, case: Case) -> str:
        if case.destination == "file":
            return str(self.workdir / "destination.img")
        return self.uris[f"dst-{case.destination}"]

    def size(self, case: Case) -> int:
        return self.sizes[case.source]


@contextlib.contextmanager
def servers(
    transport: str, workdir: Path, source_file: Path, dense: int, sparse: int, needed: set[str]
) -> Iterator[Setup]:
    """Start the memory exports ``needed`` ("mem", "sparse") on ``transport``, with a
    destination of the same size each, and fill the sources; stop them by pid."""
    nbdkit = require("nbdkit")
    running: list[Running] = []
    uris: dict[str, str] = {}

    def memory(name: str, size: int) -> str:
        argv = lambda where: [nbdkit, "-f", *where, "memory", str(size)]  # noqa: E731
        server = start_peer(f"nbdkit-{name}", argv, transport, workdir)
        running.append(server)
        return server.uri

    try:
        for kind, size in (("mem", dense), ("sparse", sparse)):
            if kind in needed:
                uris[kind] = memory(kind, size)
                uris[f"dst-{kind}"] = memory(f"dst-{kind}", size)
        if "mem" in needed:
            run_checked([require("nbdcopy"), str(source_file), uris["mem"]])
        if "sparse" in needed:
            plugin = ["sparse-random", str(sparse), f"percent={SPARSE_PERCENT}",
                      f"runlength={SPARSE_RUNLENGTH}", f"seed={SPARSE_SEED}",
                      "random-content=true"]  # fmt: skip
            # nbdkit leaves its socket behind: the next transport's generator reuses the path.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(workdir / "nbdkit-sparse-random.sock")
            generator = start_peer(
                "nbdkit-sparse-random",
                lambda where: [nbdkit, "-f", *where, *plugin],
                "unix",
                workdir,
            )
            try:
                run_checked([require("nbdcopy"), generator.uri, uris["sparse"]])
            finally:
                generator.stop()
        sizes = {"mem": dense, "file": dense, "sparse": sparse}
        yield Setup(transport, workdir, uris, source_file, sizes)
    finally:
        for server in running:
            server.stop()


def run_checked(argv: list[str], timeout: float = COPY_TIMEOUT) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def identical(src: str, dst: str) -> bool:
    """``qemu-img compare`` of the two, as raw images (it skips what both report as
    holes, so the 4 GiB sparse pair is quick)."""
    done = subprocess.run(
        [require("qemu-img"), "compare", "-q", "-f", "raw", "-F", "raw", src, dst],
        capture_output=True,
        text=True,
        timeout=COPY_TIMEOUT,
        check=False,
    )
    return done.returncode == 0


def copy_once(
    setup: Setup, case: Case, tool: str, settings: str, tools: Tools, relays: bool
) -> tuple[Outcome, Count | None]:
    """One copy; through counting relays when ``relays``, then checked."""
    src, dst = setup.source(case), setup.destination(case)
    if case.destination == "file":
        with contextlib.suppress(FileNotFoundError):
            os.unlink(dst)  # every copy writes a new file
    if not relays:
        return run_copy(tools.argv(tool, settings, src, dst), tools.env), None
    src_relay = dst_relay = None
    try:
        unix = setup.transport == "unix"
        if case.source != "file":
            src_relay = Relay(src, setup.workdir / "src-relay.sock" if unix else None)
        if case.destination != "file":
            dst_relay = Relay(dst, setup.workdir / "dst-relay.sock" if unix else None)
        outcome = run_copy(
            tools.argv(
                tool,
                settings,
                src_relay.uri if src_relay else src,
                dst_relay.uri if dst_relay else dst,
            ),
            tools.env,
        )
    finally:
        counts = [r.close() if r else None for r in (src_relay, dst_relay)]
        for name in ("src-relay.sock", "dst-relay.sock"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(setup.workdir / name)
    same = identical(src, dst)
    return outcome, Count(counts[0], counts[1], same, outcome.summary)


def bench(
    selected: list[str],
    rounds: int,
    tools: Tools,
    workdir: Path,
    source_file: Path,
    dense: int,
    sparse: int,
    log: Callable[[str], None],
) -> Results:
    results = Results()
    for transport in TRANSPORTS:
        todo = [
            (case, settings)
            for case in CASES
            for settings in SETTINGS
            if case_id(transport, case, settings) in selected
        ]
        if not todo:
            continue
        needed = {c.source for c, _ in todo} | {c.destination for c, _ in todo}
        needed &= {"mem", "sparse"}
        with servers(transport, workdir, source_file, dense, sparse, needed) as setup:
            # The untimed pass: bytes on the sockets, the result checked, and every
            # destination filled before the timed rounds (each overwrites it).
            for case, settings in todo:
                cid = case_id(transport, case, settings)
                for tool in TOOLS:
                    try:
                        _, count = copy_once(setup, case, tool, settings, tools, relays=True)
                    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                        results.errors[(cid, tool, "count")] = str(exc)
                        log(f"{cid} {tool}: count pass: {exc}")
                        continue
                    assert count is not None
                    results.counts[(cid, tool, "count")] = count
                    log(f"{cid} {tool}: {describe_count(count)}")
            for rnd in range(rounds):
                for case, settings in todo:
                    cid = case_id(transport, case, settings)
                    order = TOOLS if rnd % 2 == 0 else TOOLS[::-1]
                    for tool in order:
                        key = (cid, tool, "timed")
                        if key in results.errors:
                            continue  # it failed once: its row says so
                        try:
                            outcome, _ = copy_once(setup, case, tool, settings, tools, False)
                        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                            results.errors[key] = str(exc)
                            log(f"round {rnd + 1}/{rounds} {cid} {tool}: {exc}")
                            continue
                        sample = Sample(
                            outcome.seconds, outcome.cpu, setup.size(case), outcome.engine_seconds
                        )
                        results.samples.setdefault(key, []).append(sample)
                        log(
                            f"round {rnd + 1}/{rounds} {cid} {tool}: {sample.rate:,.0f} MB/s, "
                            f"{sample.seconds:.2f} s, CPU {sample.cpu:.2f} s"
                        )
    return results


def describe_count(c: Count) -> str:
    parts = []
    for side, counts in (("source", c.source), ("destination", c.destination)):
        if counts is not None:
            parts.append(
                f"{side} {counts.connections} conn, sent {counts.sent:,} received "
                f"{counts.received:,}"
            )
    parts.append("identical" if c.identical else "DIFFERENT")
    return "; ".join(parts)


# --------------------------------------------------------------------------- tables


def title(cid: str) -> str:
    _, case, settings = cid.split("/")
    return f"{next(c.title for c in CASES if c.id == case)} ({settings})"


def target_of(cid: str) -> float | None:
    case = cid.split("/")[1]
    return DENSE_TARGET if next(c for c in CASES if c.id == case).dense else None


def median_rate(samples: list[Sample] | None) -> float | None:
    return statistics.median(s.rate for s in samples) if samples else None


def paired(mine: list[Sample], theirs: list[Sample]) -> float | None:
    """The median over rounds of each round's ratio (the two ran back to back)."""
    if not mine or len(mine) != len(theirs):
        return None
    return statistics.median(a.rate / b.rate for a, b in zip(mine, theirs, strict=True))


def rows(results: Results, selected: list[str]) -> list[dict[str, Any]]:
    """The comparison rows, in the shape bench_client's ``--pool`` reads."""
    out = []
    for cid in selected:
        transport = cid.split("/")[0]
        mine = results.samples.get((cid, OURS, "timed"), [])
        theirs = results.samples.get((cid, PEER, "timed"), [])
        error = results.errors.get((cid, OURS, "timed")) or results.errors.get((cid, PEER, "timed"))
        a, b = median_rate(mine), median_rate(theirs)
        ratio = a / b if a is not None and b else None
        target = target_of(cid)
        verdict = f"error: {error}" if error or ratio is None else judge(ratio, target)
        cpu = {
            tool: statistics.median(s.cpu / s.size * GiB for s in got) if got else None
            for tool, got in ((OURS, mine), (PEER, theirs))
        }
        engine = [s.size / s.engine_seconds / 1e6 for s in mine if s.engine_seconds]
        out.append(
            {
                "id": cid,
                "test": title(cid),
                "transport": transport,
                "pynbd_contender": OURS,
                "libnbd_contender": PEER,
                "unit": "MB/s",
                "pynbd": a,
                "libnbd": b,
                "ratio": ratio,
                "paired_ratio": paired(mine, theirs),
                "target": target,
                "verdict": verdict,
                "pynbd_cpu_s_per_gib": cpu[OURS],
                "nbdcopy_cpu_s_per_gib": cpu[PEER],
                "pynbd_engine_rate": statistics.median(engine) if engine else None,
            }
        )
    return out


def fmt(value: float | None, spec: str = ",.0f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def rate_table(table_rows: list[dict[str, Any]], markdown: bool) -> str:
    header = ["case", "transport", "nbdcopy MB/s", "pynbd MB/s", "ratio", "paired", "target",
              "verdict"]  # fmt: skip
    lines = [
        [
            r["test"],
            r["transport"],
            fmt(r["libnbd"]),
            fmt(r["pynbd"]),
            fmt(r["ratio"], ".2f", "x"),
            fmt(r["paired_ratio"], ".2f", "x"),
            "-" if r["target"] is None else f">= {r['target']:.1f}x",
            r["verdict"],
        ]
        for r in table_rows
    ]
    return _table(header, lines, markdown)


def cpu_table(table_rows: list[dict[str, Any]], markdown: bool) -> str:
    header = ["case", "transport", "nbdcopy CPU s/GiB", "pynbd CPU s/GiB", "pynbd / nbdcopy",
              "pynbd's own MB/s (-v)"]  # fmt: skip
    lines = []
    for r in table_rows:
        a, b = r["pynbd_cpu_s_per_gib"], r["nbdcopy_cpu_s_per_gib"]
        lines.append(
            [
                r["test"],
                r["transport"],
                fmt(b, ".2f"),
                fmt(a, ".2f"),
                fmt(a / b if a is not None and b else None, ".2f", "x"),
                fmt(r["pynbd_engine_rate"]),
            ]
        )
    return _table(header, lines, markdown)


def count(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def bytes_rows(results: Results, selected: list[str]) -> list[dict[str, Any]]:
    out = []
    for cid in selected:
        got = {tool: results.counts.get((cid, tool, "count")) for tool in TOOLS}
        theirs = got[PEER]
        for tool in (PEER, OURS):
            c = got[tool]
            error = results.errors.get((cid, tool, "count"))
            row: dict[str, Any] = {"id": cid, "test": title(cid), "tool": tool, "error": error}
            if c is not None:
                row.update(
                    source=c.source and asdict(c.source),
                    destination=c.destination and asdict(c.destination),
                    total=c.total,
                    identical=c.identical,
                    summary=c.summary,
                )
            if tool == OURS and c is not None and theirs is not None and theirs.total:
                row["ratio"] = c.total / theirs.total
                row["target"] = None if target_of(cid) else BYTES_TARGET
            out.append(row)
    return out


def bytes_table(brows: list[dict[str, Any]], markdown: bool) -> str:
    header = ["case", "transport", "tool", "connections (src/dst)", "source -> copier",
              "copier -> source", "copier -> destination", "destination -> copier",
              "total bytes", "identical", "vs nbdcopy", "verdict"]  # fmt: skip
    lines = []
    for r in brows:
        transport = r["id"].split("/")[0]
        if r["error"] or "total" not in r:
            lines.append([r["test"], transport, r["tool"], *["-"] * 8, f"error: {r['error']}"])
            continue
        src, dst = r["source"], r["destination"]
        conns = "/".join("file" if s is None else str(s["connections"]) for s in (src, dst))
        ratio, target = r.get("ratio"), r.get("target")
        if ratio is None:
            verdict = "-"
        elif target is None:
            verdict = "no target"
        else:
            verdict = "meets" if ratio <= target else f"misses by {(ratio - target) * 100:.2f}%"
        lines.append(
            [
                r["test"],
                transport,
                r["tool"],
                conns,
                count(src and src["received"]),
                count(src and src["sent"]),
                count(dst and dst["sent"]),
                count(dst and dst["received"]),
                count(r["total"]),
                "yes" if r["identical"] else "NO",
                fmt(ratio, ".4f", "x"),
                verdict,
            ]
        )
    return _table(header, lines, markdown)


# --------------------------------------------------------------------------- main


def environment(python: str) -> dict[str, Any]:
    nbdcopy = run_checked([require("nbdcopy"), "--version"]).splitlines()[0]
    return {**bench_memory.environment(python), "nbdcopy": nbdcopy, "loadavg": os.getloadavg()}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="a smoke run: 32 MiB, 128 MiB sparse")
    p.add_argument("--rounds", type=int, help="timed rounds (default 5; 1 with --quick)")
    p.add_argument("--size", type=int, help="dense copies' size in MiB (default 1024)")
    p.add_argument("--sparse-size", type=int, help="sparse source's size in MiB (default 4096)")
    p.add_argument("--only", help="the ids TRANSPORT/CASE/SETTINGS matching (re.search)")
    p.add_argument("--list", action="store_true", help="print the ids")
    p.add_argument("--json", type=Path, help="write every sample, count and table here")
    p.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    p.add_argument("--python", default=sys.executable, help="interpreter for pynbd copy")
    p.add_argument(
        "--matched",
        help="the options both tools get in the 'matched' settings "
        f"(default {shlex.join(matched_options())!r})",
    )
    p.add_argument(
        "--stand-in",
        metavar="COMMAND",
        help="run COMMAND in pynbd copy's place (--stand-in nbdcopy: an A/A check)",
    )
    p.add_argument(
        "--pool",
        metavar="FILE",
        nargs="+",
        help="run nothing: pool the rounds of earlier runs' --json files into one table",
    )
    args = p.parse_args(argv)
    ids = [case_id(t, c, s) for t in TRANSPORTS for c in CASES for s in SETTINGS]
    args.ids = [i for i in ids if args.only is None or re.search(args.only, i)]
    if not args.ids:
        p.error(f"no id matches {args.only!r} (see --list)")
    args.rounds = args.rounds or (1 if args.quick else 5)
    args.size = (args.size or (32 if args.quick else 1024)) * MiB
    args.sparse_size = (args.sparse_size or (128 if args.quick else 4096)) * MiB
    if args.rounds < 1 or args.size < MiB or args.sparse_size < MiB:
        p.error("--rounds, --size and --sparse-size must be at least 1")
    args.matched = shlex.split(args.matched) if args.matched else matched_options()
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.pool:  # the documents have bench_client's shape: its --pool reads them
        return bench_client.main(["--pool", *args.pool, *(["--markdown"] * args.markdown)])
    if args.list:
        print("\n".join(args.ids))
        return 0
    for program in ("nbdkit", "nbdcopy", "qemu-img"):
        require(program)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    tools = Tools(args.python, args.matched, args.stand_in, env)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    before = environment(args.python)
    t0 = time.monotonic()
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="pynbd-benchcopy-", dir=shm) as tmp:
        workdir = Path(tmp)
        # pynbd copy starts with its bytecode cached, as an installed package does: the
        # untimed pass writes the cache (here, not in the tree), the timed rounds read it.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(workdir / "pycache")
        source_file = workdir / "source.img"
        make_source(source_file, args.size)
        results = bench(
            args.ids, args.rounds, tools, workdir, source_file, args.size, args.sparse_size, log
        )
    elapsed = time.monotonic() - t0
    table_rows = rows(results, args.ids)
    brows = bytes_rows(results, args.ids)
    tables = "\n\n".join(
        [
            rate_table(table_rows, args.markdown),
            cpu_table(table_rows, args.markdown),
            bytes_table(brows, args.markdown),
        ]
    )
    load = os.getloadavg()
    stand_in = "" if args.stand_in is None else f" (stand-in: {args.stand_in})"
    print(
        f"pynbd copy vs {before['nbdcopy']}: {args.size // MiB} MiB dense, "
        f"{args.sparse_size // MiB} MiB sparse ({SPARSE_PERCENT}% data), {args.rounds} rounds; "
        f"matched: {shlex.join(args.matched)}; pynbd {before['pynbd_commit']} on Python "
        f"{before['server_python']}{stand_in}; "
        f"{os.cpu_count()} CPUs, load {before['loadavg'][0]:.2f} before, {load[0]:.2f} after; "
        f"{elapsed:.0f} s"
    )
    print(tables)
    if args.json:
        doc = {
            "environment": {**before, "loadavg_after": load},
            "settings": {
                "rounds": args.rounds,
                "size": args.size,
                "sparse_size": args.sparse_size,
                "matched": args.matched,
                "stand_in": args.stand_in,
            },
            "rows": table_rows,
            "results": [
                {
                    "transport": cid.split("/")[0],
                    "case": cid.split("/", 1)[1],
                    "contender": tool,
                    "unit": "MB/s",
                    "error": results.errors.get((cid, tool, "timed")),
                    "samples": [{**asdict(s), "rate": s.rate} for s in samples],
                }
                for (cid, tool, _), samples in results.samples.items()
            ],
            "bytes": brows,
            "tables": tables,
        }
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
