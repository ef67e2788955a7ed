#!/usr/bin/env python3
"""fio on ``/dev/nbdX`` in the kernel test guest, against three servers of one device.

::

    PYTHONPATH=src python3 bench/bench_kernel.py      # from the checkout's root
    PYTHONPATH=src python3 bench/bench_kernel.py --rounds 1 --runtime 1 --profile

Boots the test guest once (:mod:`tests.guest`: Debian's kernel under qemu TCG) and
runs this script in it (``--in-guest``). There, devices of the same size are attached
by pynbd's netlink attach to three servers:

* ``pynbd-inproc``: :func:`pynbd.kernel.attach.attach_backend` with a
  :class:`~pynbd.server.MemoryBackend`: the server runs in a thread of the benchmark
  process, which waits for fio meanwhile;
* ``nbdkit-mem``: ``nbdkit memory SIZE`` on a unix socket (the reference);
* ``pynbd-serve``: ``python -m pynbd serve --memory SIZE`` on a unix socket.

All three stay attached (to three devices) while fio (libaio, direct=1) runs one job
at a time, each job on each device in turn, so that the slow and fast moments of a
shared machine hit every contender alike: 1 MiB sequential writes, 4 KiB random writes
at queue depths 16 and 1, then 1 MiB sequential reads and 4 KiB random reads at depths
1 and 16 (writes first, so that reads read data, not only holes). Rounds rotate the
contenders' order. The table gives the median MB/s or IOPS of the rounds, and each
pynbd contender's ratio to nbdkit; the target for the in-process backend is 0.7x. A
second table gives the server's CPU time per request (user + system of the server
process, the benchmark process for the in-process one, kernel work in its syscalls
included), read from /proc/PID/stat by fio's exec_prerun/exec_postrun around each job
(under TCG that CPU time includes the guest's share of a busy host: compare columns).

``--profile`` adds an unmeasured in-process pass under ``py-spy record`` and prints the
functions that take the most samples. Under TCG everything runs many times slower
than on the host, the kernel and nbdkit included: compare ratios within a run, not
numbers between runs. A benchmark measures: a slow result is not an error (the exit
status is 0 unless something broke).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
MiB = 1 << 20

CONTENDERS = ("pynbd-inproc", "nbdkit-mem", "pynbd-serve")
REFERENCE = "nbdkit-mem"
#: (contender, target ratio to REFERENCE or None)
COMPARED = (("pynbd-inproc", 0.7), ("pynbd-serve", None))
RESULTS_NAME = "bench-kernel.json"
TIMEOUT = 30


@dataclass(frozen=True)
class Job:
    """One fio job: ``rw`` at ``bs`` and ``iodepth``, for ``--runtime`` seconds."""

    name: str
    label: str
    rw: str
    bs: int
    iodepth: int

    @property
    def direction(self) -> str:
        return "write" if "write" in self.rw else "read"

    @property
    def unit(self) -> str:
        """What the table reports: MB/s for large requests, IOPS for small ones."""
        return "MB/s" if self.bs >= MiB else "IOPS"


# Writes first, so that the reads that follow read data (over the start of the device
# and wherever the random writes went), not only holes.
JOBS = (
    Job("seq-write-1m", "1 MiB sequential write, QD1", "write", MiB, 1),
    Job("rand-write-4k-qd16", "4 KiB random write, QD16", "randwrite", 4096, 16),
    Job("rand-write-4k-qd1", "4 KiB random write, QD1", "randwrite", 4096, 1),
    Job("seq-read-1m", "1 MiB sequential read, QD1", "read", MiB, 1),
    Job("rand-read-4k-qd1", "4 KiB random read, QD1", "randread", 4096, 1),
    Job("rand-read-4k-qd16", "4 KiB random read, QD16", "randread", 4096, 16),
)


def selected_jobs(only: str | None) -> tuple[Job, ...]:
    """The jobs whose name matches ``only`` (``re.search``), or every job."""
    return tuple(job for job in JOBS if only is None or re.search(only, job.name))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="fio on /dev/nbdX in the test guest: pynbd's in-process backend, "
        "nbdkit memory and pynbd serve --memory, attached by pynbd's netlink attach."
    )
    parser.add_argument("--size", type=int, default=64, help="device size in MiB (64)")
    parser.add_argument("--runtime", type=float, default=2.0, help="seconds per fio job (2)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every job (3)")
    parser.add_argument(
        "--contenders",
        default=",".join(CONTENDERS),
        help="comma-separated, of " + ", ".join(CONTENDERS),
    )
    parser.add_argument(
        "--only", metavar="REGEX", help="run the jobs whose name matches (re.search)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="add an in-process pass under py-spy"
    )
    parser.add_argument("--json", type=Path, help="write the results and tables here")
    parser.add_argument("--memory", default="2G", help="guest memory (2G)")
    parser.add_argument("--cpus", type=int, default=2, help="guest CPUs (2)")
    parser.add_argument("--timeout", type=float, default=900, help="guest run timeout, s (900)")
    parser.add_argument("--in-guest", type=Path, metavar="OUT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = [n for n in args.contenders.split(",") if n]
    unknown = sorted(set(names) - set(CONTENDERS))
    if unknown or not names:
        parser.error(f"unknown contenders {unknown}: choose from {', '.join(CONTENDERS)}")
    if REFERENCE not in names:
        parser.error(f"the reference {REFERENCE} must be among the contenders")
    args.contenders = names
    if not selected_jobs(args.only):
        parser.error(f"no job matches {args.only!r}: {', '.join(j.name for j in JOBS)}")
    if args.size < 16 or args.runtime <= 0 or args.rounds < 1:
        parser.error("--size must be at least 16, --runtime positive, --rounds at least 1")
    return args


# --------------------------------------------------------------------------- fio


def job_file(
    devices: dict[str, tuple[str, int]],
    runtime: float,
    marks: bool = True,
    jobs: Sequence[Job] = JOBS,
) -> str:
    """The fio job file of one round: each of ``jobs`` on each contender's
    device, one after the other (stonewall), contenders in the order of ``devices``
    (name -> (device, server pid)). Job sections are named ``JOB@CONTENDER``.

    With ``marks``, fio reads the server's /proc/PID/stat before and after each job
    (exec_prerun/exec_postrun: fio saves their output as ``SECTION.prerun.txt`` and
    ``SECTION.postrun.txt`` in its folder; a ";" would start a comment).
    """
    lines = ["[global]", "ioengine=libaio", "direct=1", "randrepeat=1", "time_based=1"]
    lines.append(f"runtime={round(runtime * 1000)}ms")
    for job in jobs:
        for name, (device, pid) in devices.items():
            section = f"{job.name}@{name}"
            lines += ["", f"[{section}]", f"filename={device}", f"rw={job.rw}", f"bs={job.bs}"]
            lines += [f"iodepth={job.iodepth}", "stonewall"]
            if marks:
                lines.append(f"exec_prerun=cat /proc/{pid}/stat")
                lines.append(f"exec_postrun=cat /proc/{pid}/stat")
    return "\n".join(lines) + "\n"


def _cpu_ticks(stat_line: str) -> int:
    # /proc/PID/stat: fields after the ")" that ends comm; utime and stime are the
    # 14th and 15th fields of the whole line.
    fields = stat_line.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def parse_marks(folder: Path, sections: Sequence[str]) -> dict[str, float]:
    """Server CPU seconds of each job section, from the stat lines fio saved."""
    hz = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for section in sections:
        try:
            start = _cpu_ticks((folder / f"{section}.prerun.txt").read_text())
            end = _cpu_ticks((folder / f"{section}.postrun.txt").read_text())
        except (OSError, IndexError, ValueError):
            continue  # no figure for this job: the table shows "-"
        out[section] = (end - start) / hz
    return out


def parse_fio(doc: dict[str, Any], cpu: dict[str, float]) -> dict[str, dict[str, dict[str, float]]]:
    """contender -> job -> MB/s, IOPS, requests, seconds, the server's CPU seconds."""
    by_name = {job.name: job for job in JOBS}
    out: dict[str, dict[str, dict[str, float]]] = {}
    for entry in doc["jobs"]:
        section = entry["jobname"]
        name, _, contender = section.partition("@")
        job = by_name.get(name)
        if job is None or not contender:
            continue
        side = entry[job.direction]
        out.setdefault(contender, {})[job.name] = {
            "mbps": side["bw_bytes"] / 1e6,
            "iops": side["iops"],
            "ops": side["total_ios"],
            "seconds": side["runtime"] / 1000,
            "server_cpu": cpu.get(section, float("nan")),
            "error": entry.get("error", 0),
        }
    return out


# --------------------------------------------------------------------------- in the guest


def _wait_for_socket(path: Path, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 120  # a Python start under TCG takes seconds
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not listen on {path}")
        time.sleep(0.1)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextlib.contextmanager
def attached(name: str, size: int, work: Path) -> Iterator[tuple[str, int]]:
    """Serve ``size`` bytes of memory by contender ``name``, attach it by netlink;
    yield the device and the pid of the server."""
    from pynbd.kernel.attach import attach, attach_backend
    from pynbd.server import MemoryBackend

    if name == "pynbd-inproc":
        with attach_backend(MemoryBackend(size), timeout=TIMEOUT) as att:
            yield att.device, os.getpid()
        return
    sock = work / f"{name}.sock"
    sock.unlink(missing_ok=True)
    if name == "nbdkit-mem":
        argv = ["nbdkit", "-f", "--exit-with-parent", "-U", os.fspath(sock), "memory", str(size)]
    else:
        argv = [sys.executable, "-m", "pynbd", "serve", "--memory", str(size), "--unix",
                os.fspath(sock), "--quiet"]  # fmt: skip
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    try:
        _wait_for_socket(sock, proc, name)
        with attach(f"nbd+unix:///?socket={sock}", timeout=TIMEOUT) as att:
            yield att.device, proc.pid
    finally:
        _stop(proc)


def run_fio(
    devices: dict[str, tuple[str, int]], args: argparse.Namespace, work: Path
) -> dict[str, dict[str, dict[str, float]]]:
    """Run one round of the selected jobs on every device (see :func:`job_file`)."""
    folder = Path(tempfile.mkdtemp(prefix="fio-", dir=work))
    jobs = folder / "jobs.fio"
    jobs.write_text(job_file(devices, args.runtime, jobs=selected_jobs(args.only)))
    out, err = folder / "fio.json", folder / "fio.err"
    with open(out, "wb") as out_file, open(err, "wb") as err_file:
        proc = subprocess.Popen(
            ["fio", "--output-format=json", os.fspath(jobs)],
            cwd=folder,
            stdin=subprocess.DEVNULL,
            stdout=out_file,
            stderr=err_file,
        )
    # A plain blocking wait: the in-process server's thread must have the GIL and the
    # CPU to itself, and communicate() with a timeout polls, taking both from it. The
    # guest has its own timeout.
    status = proc.wait()
    if status != 0:
        raise RuntimeError(f"fio failed ({status}): {err.read_text().strip()}")
    text = out.read_text()
    doc = json.loads(text[text.index("{") :])  # fio may print notes before the JSON
    sections = [entry["jobname"] for entry in doc["jobs"]]
    return parse_fio(doc, parse_marks(folder, sections))


def _log(text: str) -> None:
    print(f"bench_kernel: {text}", file=sys.stderr, flush=True)


def _py_spy() -> str | None:
    # Next to the interpreter first: a pyenv shim works in the guest, but slowly.
    beside = Path(sys.executable).parent / "py-spy"
    return os.fspath(beside) if beside.exists() else shutil.which("py-spy")


def profile_inproc(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One unmeasured in-process pass under ``py-spy record``; the top functions."""
    spy = _py_spy()
    if spy is None:
        return {"error": "py-spy not found"}
    raw = work / "py-spy.txt"
    with attached("pynbd-inproc", args.size * MiB, work) as (device, pid):
        argv = [spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "50",
                "--nonblocking", "--output", os.fspath(raw)]  # fmt: skip
        spy_proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        try:
            time.sleep(3)  # py-spy attaches
            run_fio({"pynbd-inproc": (device, pid)}, args, work)
        finally:
            spy_proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            try:
                spy_proc.wait(120)
            except subprocess.TimeoutExpired:
                spy_proc.kill()
                spy_proc.wait(10)
    if not raw.exists():
        return {"error": f"py-spy wrote nothing (exit status {spy_proc.returncode})"}
    return summarize_stacks(raw.read_text())


def summarize_stacks(text: str, top: int = 20) -> dict[str, Any]:
    """From py-spy's raw (collapsed) stacks: samples per function, by itself (leaf)
    and with its callees (inclusive)."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f.strip() for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    return {
        "samples": total,
        "own": own.most_common(top),
        "inclusive": inclusive.most_common(top),
    }


def _rotated(names: list[str], n: int) -> list[str]:
    n %= len(names)
    return names[n:] + names[:n]


def guest_main(args: argparse.Namespace) -> int:
    """Attach every contender, run the rounds, write the results to ``args.in_guest``."""
    subprocess.run(["modprobe", "nbd"], check=True, timeout=60)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-kernel-") as tmp:
        work = Path(tmp)
        with contextlib.ExitStack() as stack:
            devices = {}
            for name in args.contenders:
                try:
                    devices[name] = stack.enter_context(attached(name, args.size * MiB, work))
                except Exception as exc:  # reported in the table; the others go on
                    _log(f"{name} could not be attached: {exc}")
                    results.append({"round": 0, "contender": name, "error": str(exc)})
            _log(f"attached: {devices}")
            for rnd in range(args.rounds):
                order = _rotated(list(devices), rnd)
                _log(f"round {rnd + 1}/{args.rounds}: {', '.join(order)}")
                figures = run_fio({n: devices[n] for n in order}, args, work)
                for name, jobs in figures.items():
                    results.append({"round": rnd, "contender": name, "jobs": jobs})
        profile = profile_inproc(args, work) if args.profile else None
    doc = {
        "settings": {"size_mib": args.size, "runtime": args.runtime, "rounds": args.rounds,
                     "contenders": args.contenders, "only": args.only, "kernel": os.uname().release,
                     "cpus": os.cpu_count()},
        "results": results,
        "profile": profile,
    }  # fmt: skip
    args.in_guest.write_text(json.dumps(doc, indent=1))
    return 0


# --------------------------------------------------------------------------- tables


def medians(doc: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """contender -> job -> the median of the rounds of each figure."""
    samples: dict[str, dict[str, list[dict[str, float]]]] = {}
    for result in doc["results"]:
        for job, figures in result.get("jobs", {}).items():
            samples.setdefault(result["contender"], {}).setdefault(job, []).append(figures)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, jobs in samples.items():
        for job, rounds in jobs.items():
            out.setdefault(name, {})[job] = {
                key: statistics.median(r[key] for r in rounds) for key in rounds[0]
            }
    return out


def _value(job: Job, figures: dict[str, float] | None) -> float | None:
    if figures is None:
        return None
    return figures["mbps"] if job.unit == "MB/s" else figures["iops"]


def _fmt(job: Job, value: float | None) -> str:
    if value is None:
        return "-"
    if job.unit == "IOPS":
        return f"{value / 1000:.1f}k IOPS" if value >= 1000 else f"{value:.0f} IOPS"
    return f"{value:,.0f} MB/s" if value >= 100 else f"{value:.1f} MB/s"


def markdown(doc: dict[str, Any]) -> str:
    """The throughput table (with ratios and the target) and the server-CPU table."""
    med = medians(doc)
    names = list(doc["settings"]["contenders"])
    compared = [(n, t) for n, t in COMPARED if n in names]
    head = ["case", *names]
    head += [f"{n} / {REFERENCE}" for n, _ in compared] + ["target", "verdict"]
    rows = [head, ["---"] * len(head)]
    jobs = selected_jobs(doc["settings"].get("only"))
    ratios: dict[str, list[float]] = {n: [] for n, _ in compared}
    for job in jobs:
        values = {n: _value(job, med.get(n, {}).get(job.name)) for n in names}
        ref = values.get(REFERENCE)
        job_ratios: dict[str, float | None] = {}
        for n, _ in compared:
            value = values[n]
            ratio = value / ref if value is not None and ref else None
            job_ratios[n] = ratio
            if ratio is not None:
                ratios[n].append(ratio)
        cells = [job.label] + [_fmt(job, values[n]) for n in names]
        rows.append(cells + _ratio_cells(compared, job_ratios))
    if len(jobs) > 1:
        means = {n: math.exp(statistics.fmean(map(math.log, r))) if r else None
                 for n, r in ratios.items()}  # fmt: skip
        cells = ["geometric mean of the ratios"] + [""] * len(names)
        rows.append(cells + _ratio_cells(compared, means))
    cpu_head = ["case", *[f"{n} server CPU us/op" for n in names]]
    cpu_rows = [cpu_head, ["---"] * len(cpu_head)]
    for job in jobs:
        cells = [job.label]
        for n in names:
            cells.append(_cpu_per_op(med.get(n, {}).get(job.name)))
        cpu_rows.append(cells)
    errors = [f"- {r['contender']} round {r['round'] + 1}: {r['error']}"
              for r in doc["results"] if "error" in r]  # fmt: skip
    parts = ["\n".join(_md_row(r) for r in rows), "\n".join(_md_row(r) for r in cpu_rows)]
    if errors:
        parts.append("Errors:\n" + "\n".join(errors))
    return "\n\n".join(parts)


def _ratio_cells(
    compared: Sequence[tuple[str, float | None]], ratios: dict[str, float | None]
) -> list[str]:
    """The ratio columns, then the target and the verdict of the contender that has one."""
    cells, target, verdict = [], "-", "-"
    for n, goal in compared:
        ratio = ratios.get(n)
        cells.append("-" if ratio is None else f"{ratio:.2f}x")
        if goal is not None:
            target = f">= {goal}x ({n})"
            if ratio is not None:
                verdict = "meets" if ratio >= goal else f"misses by {(1 - ratio / goal):.0%}"
    return [*cells, target, verdict]


def _cpu_per_op(figures: dict[str, float] | None) -> str:
    if figures is None or not figures["ops"] or math.isnan(figures["server_cpu"]):
        return "-"
    us = figures["server_cpu"] / figures["ops"] * 1e6
    return f"{us:,.0f}" if us >= 100 else f"{us:.1f}"


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def profile_text(profile: dict[str, Any] | None) -> str:
    if not profile:
        return ""
    if "error" in profile:
        return f"profile: {profile['error']}"
    total = profile["samples"] or 1
    lines = [f"py-spy, in-process pass: {profile['samples']} samples (not idle)", "", "own:"]
    lines += [f"  {n / total:6.1%}  {frame}" for frame, n in profile["own"]]
    lines += ["", "inclusive:"]
    lines += [f"  {n / total:6.1%}  {frame}" for frame, n in profile["inclusive"]]
    return "\n".join(lines)


# --------------------------------------------------------------------------- on the host


def host_main(args: argparse.Namespace) -> int:
    """Boot the guest, run this script in it, print the tables."""
    sys.path.insert(0, os.fspath(REPO))  # the guest harness lives with the tests
    from tests.guest import boot, qemu

    guest = boot.prepare(log=_log)
    argv = [sys.executable, os.fspath(Path(__file__).resolve()),
            "--in-guest", f"/xfer/{RESULTS_NAME}", "--size", str(args.size),
            "--runtime", str(args.runtime), "--rounds", str(args.rounds),
            "--contenders", ",".join(args.contenders)]  # fmt: skip
    if args.profile:
        argv.append("--profile")
    if args.only:
        argv += ["--only", args.only]
    path = os.pathsep.join(p for p in (os.fspath(SRC), os.environ.get("PYTHONPATH", "")) if p)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-kernel-xfer-") as tmp:
        result = qemu.run(
            guest,
            argv,
            cwd=REPO,
            env={"PYTHONPATH": path, "PATH": os.environ.get("PATH", "")},
            timeout=args.timeout,
            memory=args.memory,
            cpus=args.cpus,
            output=sys.stderr.fileno(),
            xfer=Path(tmp),
        )
        out = Path(tmp) / RESULTS_NAME
        if result.returncode != 0 or not out.exists():
            _log(f"the guest run failed (exit status {result.returncode})")
            return 1
        doc = json.loads(out.read_text())
    settings = doc["settings"]
    print(
        f"> fio on /dev/nbdX, kernel {settings['kernel']} under TCG, {settings['cpus']} "
        f"guest CPUs; {settings['size_mib']} MiB device, {settings['rounds']} rounds, "
        f"{settings['runtime']:g} s per job; boot {result.boot_seconds:.1f} s, "
        f"guest run {result.command_seconds:.0f} s, total {time.monotonic() - start:.0f} s\n"
    )
    print(markdown(doc))
    text = profile_text(doc.get("profile"))
    if text:
        print("\n" + text)
    if args.json:
        args.json.write_text(json.dumps({**doc, "table": markdown(doc)}, indent=1))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.in_guest is not None:
        return guest_main(args)
    return host_main(args)


if __name__ == "__main__":
    sys.exit(main())
