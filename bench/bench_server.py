#!/usr/bin/env python3
"""Benchmark ``pynbd serve`` against nbdkit and qemu-nbd, with libnbd's tools as clients.

::

    python3 bench/bench_server.py                     # from the checkout's root
    python3 bench/bench_server.py --quick --only 'unix/.*qd16'

Servers (contenders), all started by this script in the same run and stopped by pid:

* ``pynbd-mem``: ``python -m pynbd serve --memory SIZE``
* ``pynbd-file``: ``python -m pynbd serve FILE`` (FILE on /dev/shm, a tmpfs)
* ``nbdkit-mem``: ``nbdkit memory SIZE``
* ``nbdkit-file``: ``nbdkit file FILE``
* ``qemu-nbd``: ``qemu-nbd -f raw --shared=16 FILE`` (cache and aio at their defaults)

each on a unix socket and on TCP 127.0.0.1 (a kernel-chosen port). Cases (ids are
``TRANSPORT/CASE`` for ``--only REGEX``):

* ``write-256k``, ``write-4m``: ``nbdcopy [--request-size] SRC URI``, SRC a file of
  random bytes on /dev/shm (nbdcopy's default 4 connections and 64 requests in flight);
* ``read-256k``, ``read-4m``: ``nbdcopy URI null:`` of the same, now written, export
  (so every server reads real data, not holes);
* ``randread-qd1``, ``randread-qd16``: ``fio --ioengine=nbd --rw=randread --bs=4k``
  at iodepth 1 and 16 on one connection, reported in IOPS.

Each round runs every case on every server, the servers' order rotating from round to
round, so slow phases of a noisy machine hit everyone alike; the table gives medians
and ratios of medians. Targets: pynbd at least 0.8x nbdkit on the same backend for the
nbdcopy cases, and at least 1.0x qemu-nbd at depth 16. A benchmark measures: nothing
here fails on a slow result (the exit status is 0 unless something broke).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
MiB = 1 << 20
GiB = 1 << 30

CONTENDERS = ("pynbd-mem", "pynbd-file", "nbdkit-mem", "nbdkit-file", "qemu-nbd")
#: With --baseline: pynbd serve from another checkout, in the same rounds.
BASELINES = ("base-mem", "base-file")
CASES = ("write-256k", "write-4m", "read-256k", "read-4m", "randread-qd1", "randread-qd16")
TRANSPORTS = ("unix", "tcp")
FIO_RAMP_MS = 200
#: (case prefix, our contender, reference contender, target ratio)
COMPARISONS = (
    ("write", "pynbd-mem", "nbdkit-mem", 0.8),
    ("write", "pynbd-file", "nbdkit-file", 0.8),
    ("read", "pynbd-mem", "nbdkit-mem", 0.8),
    ("read", "pynbd-file", "nbdkit-file", 0.8),
    ("randread-qd1", "pynbd-mem", "nbdkit-mem", None),
    ("randread-qd1", "pynbd-file", "nbdkit-file", None),
    ("randread-qd1", "pynbd-file", "qemu-nbd", None),
    ("randread-qd16", "pynbd-mem", "nbdkit-mem", None),
    ("randread-qd16", "pynbd-file", "nbdkit-file", None),
    ("randread-qd16", "pynbd-file", "qemu-nbd", 1.0),
    ("randread-qd16", "pynbd-mem", "qemu-nbd", 1.0),
)


def require(program: str) -> str:
    # Debian's directories first: nbdcopy, fio and qemu live there.
    path = shutil.which(
        program, path=os.pathsep.join(["/usr/bin", "/usr/sbin", os.environ["PATH"]])
    )
    if path is None:
        raise SystemExit(f"{program} is not installed")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of *pid* so far (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- servers


@dataclass
class Running:
    name: str
    uri: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        """Stop by pid: SIGTERM, SIGKILL after 10 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _wait_connectable(proc: subprocess.Popen[bytes], family: int, address: Any) -> bool:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.connect(address)
                return True
            except OSError:
                time.sleep(0.05)
    return False


def start_pynbd(
    name: str, what: list[str], transport: str, workdir: Path, python: str, src: Path = SRC
) -> Running:
    where = (
        ["--unix", str(workdir / f"{name}.sock")]
        if transport == "unix"
        else ["--tcp", "127.0.0.1:0"]
    )
    log = workdir / f"{name}-{transport}.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(src), env.get("PYTHONPATH")) if p)
    r, w = os.pipe()
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [python, "-m", "pynbd", "serve", "--quiet", *what, *where, "--ready-fd", str(w)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=logf,
            env=env,
            pass_fds=(w,),
        )
    os.close(w)
    ready = b""
    deadline = time.monotonic() + 30
    with os.fdopen(r, "rb") as pipe:
        while time.monotonic() < deadline:
            if select.select([pipe], [], [], 0.2)[0]:
                chunk = os.read(pipe.fileno(), 4096)
                if not chunk:
                    break
                ready += chunk
    uris = ready.decode().split()
    if not uris:
        proc.kill()
        proc.wait()
        raise SystemExit(f"pynbd serve did not start:\n{log.read_text()}")
    return Running(name, uris[0], proc, log)


def start_peer(
    name: str, argv: Callable[[list[str]], list[str]], transport: str, workdir: Path
) -> Running:
    """Start nbdkit or qemu-nbd in the foreground; *argv* gets the listening options."""
    log = workdir / f"{name}-{transport}.log"
    address: Any
    for _attempt in range(5):
        if transport == "unix":
            path = workdir / f"{name}.sock"
            uri = f"nbd+unix:///?socket={path}"
            family, address = socket.AF_UNIX, str(path)
            listen = ["-U", str(path)] if name.startswith("nbdkit") else ["-k", str(path)]
        else:
            # The port can be taken between probing and bind: retried below.
            port = free_port()
            uri = f"nbd://127.0.0.1:{port}/"
            family, address = socket.AF_INET, ("127.0.0.1", port)
            if name.startswith("nbdkit"):
                listen = ["-i", "127.0.0.1", "-p", str(port)]
            else:
                listen = ["-b", "127.0.0.1", "-p", str(port)]
        with open(log, "wb") as logf:
            proc = subprocess.Popen(
                argv(listen), stdin=subprocess.DEVNULL, stdout=logf, stderr=logf
            )
        if _wait_connectable(proc, family, address):
            return Running(name, uri, proc, log)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if transport == "unix":
            break
    raise SystemExit(f"{name} did not start:\n{log.read_text()}")


def start(
    name: str, transport: str, workdir: Path, size: int, python: str, baseline: Path | None
) -> Running:
    image = workdir / f"{name}.img"
    if name.endswith("file") or name == "qemu-nbd":
        with open(image, "wb") as f:
            f.truncate(size)
    if name.startswith(("pynbd-", "base-")):  # base-: from the --baseline checkout
        what = ["--memory", str(size)] if name.endswith("-mem") else [str(image)]
        src = SRC
        if name.startswith("base-"):
            assert baseline is not None
            src = baseline / "src"
        return start_pynbd(name, what, transport, workdir, python, src)
    nbdkit = require("nbdkit")
    if name == "nbdkit-mem":
        return start_peer(
            name, lambda where: [nbdkit, "-f", *where, "memory", str(size)], transport, workdir
        )
    if name == "nbdkit-file":
        return start_peer(
            name, lambda where: [nbdkit, "-f", *where, "file", str(image)], transport, workdir
        )
    qemu = require("qemu-nbd")
    return start_peer(
        name,
        lambda where: [qemu, "-t", *where, "-f", "raw", "-x", "", "--shared=16", str(image)],
        transport,
        workdir,
    )


# --------------------------------------------------------------------------- cases


@dataclass
class Sample:
    value: float  # MB/s (10^6 bytes per second) or IOPS
    seconds: float
    server_cpu: float  # server CPU seconds during the sample
    units: float  # MB copied, or reads done (IOPS x the run, ramp included)

    @property
    def cpu_per_unit(self) -> float:
        """Server CPU microseconds per MB copied or per 4 KiB read."""
        return self.server_cpu / self.units * 1e6 if self.units else 0.0


@dataclass
class Settings:
    size: int
    rounds: int
    fio_seconds: float
    source: Path


def run(argv: list[str], timeout: float = 600) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
        )
    return done.stdout


def measure(case: str, server: Running, s: Settings) -> Sample:
    cpu0 = cpu_seconds(server.pid)
    t0 = time.perf_counter()
    if case.startswith(("read", "write")):
        request = f"--request-size={4 * MiB if case.endswith('4m') else 256 * 1024}"
        if case.startswith("write"):
            run([require("nbdcopy"), request, str(s.source), server.uri])
        else:
            run([require("nbdcopy"), request, server.uri, "null:"])
        seconds = time.perf_counter() - t0
        value = s.size / seconds / 1e6
        units = s.size / 1e6
    else:
        depth = "16" if case.endswith("qd16") else "1"
        out = run(
            [
                require("fio"),
                "--name=r",
                "--ioengine=nbd",
                f"--uri={server.uri}",
                "--rw=randread",
                "--bs=4k",
                f"--iodepth={depth}",
                f"--size={s.size}",
                "--time_based",
                f"--runtime={int(s.fio_seconds * 1000)}ms",
                f"--ramp_time={FIO_RAMP_MS}ms",
                "--output-format=json",
            ]
        )
        seconds = time.perf_counter() - t0
        report = json.loads(out[out.index("{") :])
        value = float(report["jobs"][0]["read"]["iops"])
        # The server's CPU covers the ramp too, at about the same rate.
        units = value * (s.fio_seconds + FIO_RAMP_MS / 1000)
    return Sample(value, seconds, cpu_seconds(server.pid) - cpu0, units)


# --------------------------------------------------------------------------- the run


@dataclass
class Results:
    samples: dict[tuple[str, str, str], list[Sample]] = field(default_factory=dict)

    def median(self, transport: str, case: str, contender: str) -> float | None:
        got = self.samples.get((transport, case, contender))
        return statistics.median(x.value for x in got) if got else None

    def busy(self, transport: str, case: str, contender: str) -> float | None:
        got = self.samples.get((transport, case, contender))
        if not got:
            return None
        return statistics.median(x.server_cpu / x.seconds for x in got)

    def cpu_per_unit(self, transport: str, case: str, contender: str) -> float | None:
        got = self.samples.get((transport, case, contender))
        if not got:
            return None
        return statistics.median(x.cpu_per_unit for x in got)


def bench(
    s: Settings, selected: list[str], workdir: Path, python: str, baseline: Path | None
) -> Results:
    results = Results()
    contenders = CONTENDERS + (BASELINES if baseline is not None else ())
    for transport in TRANSPORTS:
        cases = [c for c in CASES if f"{transport}/{c}" in selected]
        if not cases:
            continue
        servers: list[Running] = []
        try:
            for name in contenders:
                servers.append(start(name, transport, workdir, s.size, python, baseline))
            # Fill every export first, so that reads read data.
            for server in servers:
                run([require("nbdcopy"), str(s.source), server.uri])
            for rnd in range(s.rounds):
                k = rnd % len(servers)
                order = servers[k:] + servers[:k]
                if rnd % 2:
                    order.reverse()
                for case in cases:
                    for server in order:
                        sample = measure(case, server, s)
                        results.samples.setdefault((transport, case, server.name), []).append(
                            sample
                        )
                        unit = "IOPS" if case.startswith("randread") else "MB/s"
                        busy = sample.server_cpu / sample.seconds
                        print(
                            f"round {rnd + 1}/{s.rounds} {transport}/{case} {server.name}: "
                            f"{sample.value:,.0f} {unit}, server CPU {busy:.0%}, "
                            f"{sample.cpu_per_unit:,.0f} us/{'read' if unit == 'IOPS' else 'MB'}",
                            file=sys.stderr,
                        )
        finally:
            for server in servers:
                server.stop()
    return results


def fmt(value: float | None, case: str) -> str:
    if value is None:
        return "-"
    if case.startswith("randread"):
        return f"{value / 1000:.1f}k"
    return f"{value:,.0f}"


def tables(results: Results, selected: list[str]) -> str:
    lines: list[str] = []
    for transport in TRANSPORTS:
        cases = [c for c in CASES if f"{transport}/{c}" in selected]
        if not cases:
            continue
        lines.append(f"\n**{transport}** (nbdcopy cases in MB/s, fio in IOPS; medians)\n")
        lines.append("| case | " + " | ".join(CONTENDERS) + " |")
        lines.append("|---" * (len(CONTENDERS) + 1) + "|")
        for case in cases:
            row = [fmt(results.median(transport, case, c), case) for c in CONTENDERS]
            lines.append(f"| {case} | " + " | ".join(row) + " |")
        lines.append("\n| case | ratio | value | target | verdict |")
        lines.append("|---|---|---|---|---|")
        for case in cases:
            for prefix, ours, ref, target in COMPARISONS:
                if case != prefix and not case.startswith(prefix + "-"):
                    continue
                a = results.median(transport, case, ours)
                b = results.median(transport, case, ref)
                if a is None or b is None or b == 0:
                    continue
                ratio = a / b
                verdict = "-" if target is None else ("ok" if ratio >= target else "MISSED")
                tgt = "-" if target is None else f">= {target:.1f}x"
                lines.append(f"| {case} | {ours} / {ref} | {ratio:.2f}x | {tgt} | {verdict} |")
        lines += cpu_tables(results, transport, cases)
        if results.samples.get((transport, cases[0], "base-mem")):
            lines += baseline_table(results, transport, cases)
    return "\n".join(lines)


def baseline_table(results: Results, transport: str, cases: list[str]) -> list[str]:
    """This checkout against --baseline's: the median over rounds of each round's
    ratio (both ran in the same round, so the machine's drift cancels), and the ratio
    of server CPU per unit."""
    lines = [
        "\nThis checkout / the --baseline checkout, paired by round (throughput; server"
        " CPU per unit, lower is better):\n",
        "| case | mem: throughput | mem: CPU per unit | file: throughput | file: CPU per unit |",
        "|---|---|---|---|---|",
    ]
    for case in cases:
        row = []
        for ours, base in (("pynbd-mem", "base-mem"), ("pynbd-file", "base-file")):
            a = results.samples.get((transport, case, ours), [])
            b = results.samples.get((transport, case, base), [])
            pairs = [(x, y) for x, y in zip(a, b, strict=False) if y.value and y.cpu_per_unit]
            if not pairs:
                row += ["-", "-"]
                continue
            row.append(f"{statistics.median(x.value / y.value for x, y in pairs):.3f}")
            row.append(
                f"{statistics.median(x.cpu_per_unit / y.cpu_per_unit for x, y in pairs):.3f}"
            )
        lines.append(f"| {case} | " + " | ".join(row) + " |")
    return lines


def cpu_tables(results: Results, transport: str, cases: list[str]) -> list[str]:
    """Server CPU per unit of work (robust on a shared machine), and cores busy."""
    lines = [
        "\nServer CPU per unit of work (median; us of CPU per MB copied, per 4 KiB read;"
        " lower is better), and ours / nbdkit's on the same backend:\n",
        "| case | " + " | ".join(CONTENDERS) + " | mem: ours / nbdkit | file: ours / nbdkit |",
        "|---" * (len(CONTENDERS) + 3) + "|",
    ]
    for case in cases:
        per = {c: results.cpu_per_unit(transport, case, c) for c in CONTENDERS}
        row = ["-" if v is None else f"{v:,.0f}" for v in per.values()]
        refs = ("nbdkit-mem", "nbdkit-file")  # the same backend
        for ours, ref in zip(("pynbd-mem", "pynbd-file"), refs, strict=True):
            a, b = per[ours], per[ref]
            row.append("-" if a is None or not b else f"{a / b:.2f}x")
        lines.append(f"| {case} | " + " | ".join(row) + " |")
    lines.append("\nServer CPU (cores busy, median) during each case:\n")
    lines.append("| case | " + " | ".join(CONTENDERS) + " |")
    lines.append("|---" * (len(CONTENDERS) + 1) + "|")
    for case in cases:
        busy = [results.busy(transport, case, c) for c in CONTENDERS]
        lines.append(
            f"| {case} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in busy) + " |"
        )
    return lines


def make_source(path: Path, size: int) -> None:
    # Random, so no client or server can skip zeroes; a 64 MiB block repeated is random
    # enough for that and quick to make.
    block = os.urandom(min(size, 64 * MiB))
    with open(path, "wb") as f:
        left = size
        while left:
            left -= f.write(block[: min(left, len(block))])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="256 MiB, 1 round, 0.5 s of fio")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--size", type=int, help="export and copy size in MiB (default 1024)")
    parser.add_argument("--fio-seconds", type=float)
    parser.add_argument("--only", help="run the case ids TRANSPORT/CASE matching (re.search)")
    parser.add_argument("--list", action="store_true", help="print the case ids")
    parser.add_argument("--json", type=Path, help="write every sample here")
    parser.add_argument("--markdown", action="store_true", help="(the table is Markdown always)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for pynbd serve")
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="CHECKOUT",
        help="also serve from this checkout's src (base-mem, base-file) in the same rounds, "
        "and print this checkout against it: an A/B of two trees",
    )
    args = parser.parse_args(argv)

    ids = [f"{t}/{c}" for t in TRANSPORTS for c in CASES]
    if args.list:
        print("\n".join(ids))
        return 0
    selected = [i for i in ids if args.only is None or re.search(args.only, i)]
    if not selected:
        raise SystemExit(f"no case matches {args.only!r}")
    for program in ("nbdkit", "qemu-nbd", "nbdcopy", "fio"):
        require(program)
    size = (args.size or (256 if args.quick else 1024)) * MiB
    settings_rounds = args.rounds or (1 if args.quick else 5)
    fio_seconds = args.fio_seconds or (0.5 if args.quick else 2.0)
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="pynbd-bench-", dir=shm) as tmp:
        workdir = Path(tmp)
        source = workdir / "source.img"
        make_source(source, size)
        s = Settings(size, settings_rounds, fio_seconds, source)
        t0 = time.monotonic()
        baseline = args.baseline.resolve() if args.baseline else None
        if baseline is not None and not (baseline / "src" / "pynbd").is_dir():
            raise SystemExit(f"--baseline {args.baseline}: no src/pynbd there")
        results = bench(s, selected, workdir, args.python, baseline)
        elapsed = time.monotonic() - t0
    table = tables(results, selected)
    server_python = run([args.python, "-c", "import platform; print(platform.python_version())"])
    header = (
        f"pynbd serve vs nbdkit vs qemu-nbd: {size // MiB} MiB, {s.rounds} rounds, "
        f"fio {fio_seconds:g} s; pynbd on Python {server_python.strip()}; "
        f"{os.cpu_count()} CPUs; {elapsed:.0f} s"
    )
    print(header)
    print(table)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "settings": {"size": size, "rounds": s.rounds, "fio_seconds": fio_seconds},
                    "samples": [
                        {
                            "transport": t,
                            "case": c,
                            "server": n,
                            **vars(x),
                            "cpu_per_unit": x.cpu_per_unit,
                        }
                        for (t, c, n), xs in results.samples.items()
                        for x in xs
                    ],
                    "table": table,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
