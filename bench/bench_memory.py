#!/usr/bin/env python3
"""The memory a server holds, as a benchmark: ``pynbd serve`` and ``nbdkit`` in one run.

::

    python3 bench/bench_memory.py --markdown            # from the checkout's root
    python3 bench/bench_memory.py --quick               # a smoke run, a few seconds

Every scenario starts a fresh server on a unix socket (``pynbd serve`` from this tree's
src, and ``nbdkit`` as the reference peer), puts its load on it from this process, and
reads the server's ``/proc/PID``: resident memory (VmRSS), its peak (VmHWM), threads
and descriptors. Scenario ids, for ``--only REGEX``:

* ``baseline``: the server with no connection;
* ``idle-N``: N connections that finished the handshake (GO) and send nothing;
* ``noread-memory``, ``noread-file``: 16 clients that each send 16 READs of 32 MiB and
  never read a reply, on a memory export whose data was written first and on a sparse
  file; what the server holds once its memory stops growing;
* ``sparse-SIZE-FRACTION``: a sparse memory export of SIZE declared, after writing
  FRACTION of it in 64 KiB pieces spread evenly over the whole export.

Memory is read only once it settles: two samples 0.5 s apart that agree (RSS within
1 MiB or 0.5%, the same threads and descriptors), or at the end of ``--settle-timeout``,
which the row then says. A server whose RSS passes ``--rss-cap`` is not fed more and the
row says so: the machine is shared. A benchmark measures: the exit status is 0 unless
something broke, whatever the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# This script's folder is first on sys.path; bench_client puts src there when needed.
from bench_client import _table
from bench_server import SRC, Running, require, start_peer, start_pynbd

from pynbd.cli.common import human_size, parse_size
from pynbd.client import Client
from pynbd.client.base import resolve
from pynbd.client.connection import Connection
from pynbd.errors import NBDError

REPO = Path(__file__).resolve().parents[1]
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

SERVERS = ("pynbd", "nbdkit")
#: With --baseline: ``pynbd serve`` from another checkout.
BASE = "base"
#: Unit of the sparse scenarios' writes (the memory backend's page).
CHUNK = 64 * KiB
#: Written data: random, so that no server can skip it as zeroes.
PATTERN = os.urandom(CHUNK)
#: nbdkit's default worker threads per connection (``-t``) for a parallel plugin.
NBDKIT_THREADS = 16
SETTLE_INTERVAL = 0.5


# --------------------------------------------------------------------------- /proc


@dataclass(frozen=True)
class Usage:
    """What ``/proc/PID`` says of a process at one moment (bytes and counts)."""

    rss: int
    hwm: int
    threads: int
    fds: int


def usage(pid: int) -> Usage:
    """Read VmRSS, VmHWM and Threads from ``/proc/PID/status`` and count its fds.

    Raises:
        ProcessLookupError: the process is gone.
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except FileNotFoundError as exc:
        raise ProcessLookupError(f"process {pid} is gone") from exc

    def kib(key: str) -> int:
        return int(status[key].split()[0]) * KiB

    return Usage(kib("VmRSS"), kib("VmHWM"), int(status["Threads"]), fds)


@dataclass
class Settled:
    usage: Usage
    settled: bool
    waited: float
    over_cap: bool = False


def agree(a: Usage, b: Usage) -> bool:
    """Two samples that say the same: RSS within 1 MiB or 0.5%, same threads and fds."""
    close = abs(a.rss - b.rss) <= max(MiB, a.rss // 200)
    return close and a.threads == b.threads and a.fds == b.fds


def settle(pid: int, timeout: float, cap: int, interval: float = SETTLE_INTERVAL) -> Settled:
    """Sample ``pid`` every ``interval`` until two samples agree, ``timeout`` passes or
    its RSS passes ``cap``."""
    t0 = time.monotonic()
    last = usage(pid)
    while True:
        waited = time.monotonic() - t0
        if last.rss > cap:
            return Settled(last, False, waited, over_cap=True)
        if waited >= timeout:
            return Settled(last, False, waited)
        time.sleep(interval)
        now = usage(pid)
        if agree(last, now):
            return Settled(now, True, time.monotonic() - t0)
        last = now


def raise_nofile() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (the servers started
    from here inherit it); return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


def threads_available() -> int:
    """Threads the system may still start: pid_max less the threads visible now."""
    try:
        pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    except OSError:
        return 1 << 15
    running = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError):  # it may be gone already
                running += len(os.listdir(f"/proc/{pid}/task"))
    return pid_max - running


# --------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Scenario:
    """One load. ``size`` is the export's declared size; ``count`` the connections
    (idle) or clients (noread); ``reads`` x ``read_size`` what each noread client
    asks; ``written`` the bytes the sparse scenario writes."""

    id: str
    title: str
    kind: str  # baseline | idle | noread | sparse
    export: str  # memory | file
    size: int
    count: int = 0
    reads: int = 0
    read_size: int = 0
    written: int = 0


def parse_fraction(text: str) -> float:
    """``0.01%`` or ``0.0001``: a fraction from 0 to 1."""
    value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    if not 0 <= value <= 1:
        raise ValueError(f"not a fraction from 0 to 1: {text!r}")
    return value


def sparse_scenario(spec: str) -> Scenario:
    """A ``SIZE:FRACTION`` spec (``1T:0.01%``) as a sparse scenario."""
    size_text, sep, fraction_text = spec.partition(":")
    if not sep:
        raise ValueError(f"not SIZE:FRACTION: {spec!r}")
    size = parse_size(size_text)
    chunks = round(parse_fraction(fraction_text) * size / CHUNK)
    written = chunks * CHUNK
    return Scenario(
        f"sparse-{size_text}-{fraction_text}",
        f"sparse {human_size(size)}, {fraction_text} written"
        + (f" ({human_size(written)})" if written else ""),
        "sparse",
        "memory",
        size,
        written=written,
    )


def scenarios(
    idle: Sequence[int], noread: tuple[int, int, int], sparse: Sequence[str]
) -> list[Scenario]:
    clients, reads, read_size = noread
    out = [Scenario("baseline", "baseline, no connection", "baseline", "memory", GiB)]
    for n in idle:
        out.append(
            Scenario(f"idle-{n}", f"{n} idle connection{'s' * (n != 1)}", "idle", "memory", GiB, n)
        )
    what = f"{clients} clients x {reads} READs of {human_size(read_size)}, unread"
    for export in ("memory", "file"):
        out.append(
            Scenario(
                f"noread-{export}",
                f"{what}, {export}",
                "noread",
                export,
                reads * read_size,
                clients,
                reads,
                read_size,
            )
        )
    out += [sparse_scenario(spec) for spec in sparse]
    return out


# --------------------------------------------------------------------------- servers


def serve_options(python: str, src: Path) -> set[str]:
    """The long options ``pynbd serve --help`` of that tree lists (another tree may
    lack some)."""
    env = dict(os.environ, PYTHONPATH=str(src))
    done = subprocess.run(
        [python, "-m", "pynbd", "serve", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    return set(re.findall(r"--[a-z][a-z-]*", done.stdout))


@dataclass
class Contender:
    name: str
    src: Path | None  # a pynbd tree; None for nbdkit
    options: set[str] = field(default_factory=set)  # what its ``serve --help`` lists
    extra: list[str] = field(default_factory=list)  # --serve-arg


def start_server(
    who: Contender, scenario: Scenario, workdir: Path, python: str, notes: list[str]
) -> tuple[Running, list[str]]:
    """Start ``who`` serving the scenario's export on a unix socket; return it and the
    command's export arguments (for the record)."""
    image = workdir / "export.img"
    if scenario.export == "file":
        with open(image, "wb") as f:
            f.truncate(scenario.size)  # sparse: tmpfs holds nothing for it
    connections = scenario.count + 16
    if who.src is not None:
        what = ["--memory", str(scenario.size)] if scenario.export == "memory" else [str(image)]
        if "--max-connections" in who.options:
            what += ["--max-connections", str(connections)]
        what += who.extra
        return start_pynbd(who.name, what, "unix", workdir, python, who.src), what
    nbdkit = require("nbdkit")
    plugin = ["memory", str(scenario.size)] if scenario.export == "memory" else ["file", str(image)]
    threads: list[str] = []
    # nbdkit starts its worker threads with each connection: leave the machine room.
    room = int(threads_available() * 0.6)
    if scenario.count * (NBDKIT_THREADS + 1) > room:
        per = max(1, room // max(1, scenario.count) - 1)
        threads = ["-t", str(per)]
        notes.append(f"nbdkit -t {per} (pid_max)")
    what = [*threads, *plugin]
    return start_peer(who.name, lambda where: [nbdkit, "-f", *where, *what], "unix", workdir), what


def connect(uri: str) -> Connection:
    target, options = resolve(uri, timeout=60)
    return Connection.open(target, options, timeout=60)


# --------------------------------------------------------------------------- the loads


@dataclass
class Record:
    scenario: str
    title: str
    server: str
    argv: list[str] = field(default_factory=list)
    start: Usage | None = None  # fresh server
    before: Usage | None = None  # once the export is ready, before the load
    loaded: Settled | None = None  # the load in place
    written: int = 0
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def after(self) -> Usage | None:
        return None if self.loaded is None else self.loaded.usage

    @property
    def held(self) -> int | None:
        if self.after is None or self.before is None:
            return None
        return self.after.rss - self.before.rss


@dataclass
class Settings:
    settle_timeout: float
    rss_cap: int
    python: str
    interval: float = SETTLE_INTERVAL


def fill(uri: str, size: int) -> None:
    """Write the pattern over the whole export, 4 MiB at a time."""
    block = PATTERN * (4 * MiB // CHUNK)
    with Client(uri) as c:
        for offset in range(0, size, len(block)):
            c.pwrite(block[: min(len(block), size - offset)], offset)


def write_spread(uri: str, size: int, written: int) -> None:
    """Write ``written`` bytes in CHUNK pieces evenly spread over ``size``."""
    chunks = written // CHUNK
    if not chunks:
        return
    stride = size // chunks // CHUNK * CHUNK
    with Client(uri) as c:
        for i in range(chunks):
            c.pwrite(PATTERN, i * stride)


def load_idle(server: Running, scenario: Scenario, rec: Record, s: Settings) -> list[Connection]:
    conns: list[Connection] = []
    for _ in range(scenario.count):
        conns.append(connect(server.uri))
        if len(conns) % 100 == 0 and usage(server.pid).rss > s.rss_cap:
            rec.notes.append(f"{len(conns)} of {scenario.count} connected before the cap")
            break
    return conns


def load_noread(server: Running, scenario: Scenario, rec: Record, s: Settings) -> list[Connection]:
    """Each client sends its READs and never reads: the server's replies pile up
    wherever it keeps them."""
    conns: list[Connection] = []
    for _ in range(scenario.count):
        conn = connect(server.uri)
        conns.append(conn)
        core, sock = conn.core, conn.sock
        assert sock is not None
        for i in range(scenario.reads):
            core.read_bytes(scenario.read_size, i * scenario.read_size)
        for buf in core.buffers_to_send():
            sock.sendall(buf)
        time.sleep(0.1)
        if usage(server.pid).rss > s.rss_cap:
            rec.notes.append(f"{len(conns)} of {scenario.count} clients sent before the cap")
            break
    return conns


def measure(
    who: Contender, scenario: Scenario, workdir: Path, s: Settings, log: Callable[[str], None]
) -> Record:
    rec = Record(scenario.id, scenario.title, who.name)
    server: Running | None = None
    conns: list[Connection] = []
    try:
        server, rec.argv = start_server(who, scenario, workdir, s.python, rec.notes)
        rec.start = settle(server.pid, s.settle_timeout, s.rss_cap, s.interval).usage
        if scenario.kind == "noread" and scenario.export == "memory":
            fill(server.uri, scenario.size)
        rec.before = settle(server.pid, s.settle_timeout, s.rss_cap, s.interval).usage
        if scenario.kind == "idle":
            conns = load_idle(server, scenario, rec, s)
        elif scenario.kind == "noread":
            conns = load_noread(server, scenario, rec, s)
        elif scenario.kind == "sparse":
            write_spread(server.uri, scenario.size, scenario.written)
            rec.written = scenario.written
        rec.loaded = settle(server.pid, s.settle_timeout, s.rss_cap, s.interval)
    except (OSError, NBDError, RuntimeError, SystemExit) as exc:
        rec.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        if server is not None and server.proc.poll() is not None:
            rec.error += f" (server exited with status {server.proc.returncode})"
    finally:
        for conn in conns:
            conn.abort()
        if server is not None:
            server.stop()
    log(f"{scenario.id} {who.name}: " + (rec.error or describe(rec)))
    return rec


def describe(rec: Record) -> str:
    assert rec.after is not None
    return (
        f"RSS {mib(rec.after.rss)} MiB (held {mib(rec.held)}), peak {mib(rec.after.hwm)} MiB, "
        f"{rec.after.threads} threads, {rec.after.fds} fds, {note(rec)}"
    )


# --------------------------------------------------------------------------- output


def mib(value: int | None) -> str:
    if value is None:
        return "-"
    return f"{value / MiB:,.1f}"


def note(rec: Record) -> str:
    parts = list(rec.notes)
    got = rec.loaded
    if got is None:
        pass
    elif got.over_cap:
        parts.append("past the RSS cap: measured there")
    elif got.settled:
        parts.append(f"settled in {got.waited:.1f} s")
    else:
        parts.append(f"still moving after {got.waited:.0f} s")
    held = rec.held
    count = re.fullmatch(r"idle-(\d+)", rec.scenario)
    if held is not None and count:
        parts.append(f"{held / int(count.group(1)) / KiB:,.0f} KiB per connection")
    if held is not None and rec.written:
        parts.append(f"held / written {held / rec.written:.2f}")
    return "; ".join(parts)


HEADER = [
    "scenario",
    "server",
    "RSS before (MiB)",
    "RSS after (MiB)",
    "held (MiB)",
    "peak (MiB)",
    "threads",
    "fds",
    "notes",
]


def table(records: list[Record], markdown: bool) -> str:
    lines = []
    for r in records:
        if r.error is not None or r.after is None or r.before is None:
            lines.append([r.title, r.server, "-", "-", "-", "-", "-", "-", r.error or "?"])
            continue
        lines.append(
            [
                r.title,
                r.server,
                mib(r.before.rss),
                mib(r.after.rss),
                mib(r.held),
                mib(r.after.hwm),
                str(r.after.threads),
                str(r.after.fds),
                note(r),
            ]
        )
    return _table(HEADER, lines, markdown)


def environment(python: str) -> dict[str, Any]:
    def output(*cmd: str) -> str:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout.strip()

    meminfo = Path("/proc/meminfo").read_text().split("\n", 1)[0]
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "pynbd_commit": output("git", "-C", str(REPO), "rev-parse", "--short", "HEAD"),
        "server_python": output(python, "-c", "import platform; print(platform.python_version())"),
        "nbdkit": output(require("nbdkit"), "--version"),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "memory": meminfo.split(":", 1)[1].strip(),
    }


# --------------------------------------------------------------------------- main


def _counts(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _noread(text: str) -> tuple[int, int, int]:
    """CLIENTSxREADSxSIZE, e.g. 16x16x32M."""
    clients, reads, size = text.split("x")
    return int(clients), int(reads), parse_size(size)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="a smoke run: small loads, short waits")
    p.add_argument("--only", help="the scenario ids matching this (re.search)")
    p.add_argument("--list", action="store_true", help="print the scenario ids")
    p.add_argument("--servers", default=",".join(SERVERS), help="a subset of pynbd,nbdkit")
    p.add_argument("--idle", type=_counts, help="idle connection counts (default 1,100,1000)")
    p.add_argument(
        "--noread", type=_noread, help="CLIENTSxREADSxSIZE of unread READs (default 16x16x32M)"
    )
    p.add_argument(
        "--sparse",
        help="SIZE:FRACTION,... sparse memory exports and what is written "
        "(default 1T:0,1T:0.01%%,1T:0.1%%,64G:1%%)",
    )
    p.add_argument("--settle-timeout", type=float, help="seconds to wait for memory to settle")
    p.add_argument(
        "--rss-cap", type=parse_size, default=4 * GiB, help="stop loading a server past this"
    )
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--json", type=Path, help="write every figure here")
    p.add_argument("--python", default=sys.executable, help="interpreter for pynbd serve")
    p.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more argument for pynbd serve (repeatable; --serve-arg=--no-connection-threads)",
    )
    p.add_argument(
        "--baseline",
        type=Path,
        metavar="CHECKOUT",
        help="also run pynbd serve from this checkout's src (server 'base')",
    )
    args = p.parse_args(argv)
    quick = args.quick
    if args.idle is None:
        args.idle = [1, 10] if quick else [1, 100, 1000]
    if args.noread is None:
        args.noread = (2, 2, MiB) if quick else (16, 16, 32 * MiB)
    if args.sparse is None:
        args.sparse = "1T:0,1T:0.0001%" if quick else "1T:0,1T:0.01%,1T:0.1%,64G:1%"
    if args.settle_timeout is None:
        args.settle_timeout = 5.0 if quick else 30.0
    try:
        args.scenarios = scenarios(args.idle, args.noread, args.sparse.split(","))
    except (ValueError, argparse.ArgumentTypeError) as exc:
        p.error(str(exc))
    for sc in args.scenarios:
        if sc.written > args.rss_cap:
            p.error(f"{sc.id} writes {human_size(sc.written)}: more than --rss-cap")
    if args.only:
        args.scenarios = [sc for sc in args.scenarios if re.search(args.only, sc.id)]
        if not args.scenarios:
            p.error(f"no scenario matches {args.only!r}")
    args.servers = [x for x in args.servers.split(",") if x]
    if not args.servers or not set(args.servers) <= set(SERVERS):
        p.error(f"--servers: a subset of {','.join(SERVERS)}")
    if args.baseline is not None and not (args.baseline / "src" / "pynbd").is_dir():
        p.error(f"--baseline {args.baseline}: no src/pynbd there")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        print("\n".join(sc.id for sc in args.scenarios))
        return 0
    nofile = raise_nofile()
    contenders = [Contender(name, SRC if name == "pynbd" else None) for name in args.servers]
    if args.baseline is not None:
        contenders.append(Contender(BASE, args.baseline.resolve() / "src"))
    for who in contenders:
        if who.src is not None:
            who.options = serve_options(args.python, who.src)
            who.extra = args.serve_arg
    need = max((sc.count for sc in args.scenarios), default=0)
    if nofile < 4 * need + 64:
        warning = f"warning: RLIMIT_NOFILE {nofile} may be short for {need} connections"
        print(warning, file=sys.stderr)
    s = Settings(
        args.settle_timeout, args.rss_cap, args.python, 0.2 if args.quick else SETTLE_INTERVAL
    )

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    records: list[Record] = []
    t0 = time.monotonic()
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    for sc in args.scenarios:
        for who in contenders:
            with tempfile.TemporaryDirectory(prefix="pynbd-benchmem-", dir=shm) as tmp:
                records.append(measure(who, sc, Path(tmp), s, log))
    elapsed = time.monotonic() - t0
    env = environment(args.python)
    text = table(records, args.markdown)
    print(
        f"Server memory (VmRSS before and after each load, its growth, VmHWM, threads, fds): "
        f"pynbd {env['pynbd_commit']} on Python {env['server_python']}, {env['nbdkit']}; "
        f"RLIMIT_NOFILE {nofile}; cap {human_size(args.rss_cap)}; {elapsed:.0f} s"
    )
    print(text)
    if args.json:
        doc = {
            "environment": env,
            "settings": {
                "settle_timeout": args.settle_timeout,
                "rss_cap": args.rss_cap,
                "nofile": nofile,
                "scenarios": [asdict(sc) for sc in args.scenarios],
            },
            "records": [
                {**asdict(r), "after": r.after and asdict(r.after), "held": r.held, "note": note(r)}
                for r in records
            ],
            "table": text,
        }
        args.json.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
