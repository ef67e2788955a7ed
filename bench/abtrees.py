"""A/B two checkouts' blocking clients in one process, with an A/A control.

A pooled ``bench_client.py`` run compares each tree with libnbd, in separate processes
minutes apart. On a shared machine its runs differ by more than a change of a few per
cent, so two trees are hard to tell apart that way. This script puts both trees in one
process instead. Each tree's ``src/pynbd`` is copied as a package of its own name
(pynbd's modules import one another relatively), and each gets one ``Client`` on the
same ``nbdkit memory`` server. Short rounds alternate between the trees, in an order
that rotates, and each round's rate is divided by the base tree's round next to it.

A second copy of the base tree runs as a control. Its ratio, which should be 1.0,
shows what the noise does to identical code::

    python3 bench/abtrees.py OLD_CHECKOUT NEW_CHECKOUT --case pread --size 256K

It prints, for the control and for the new tree, the median and the quartiles of its
per-round ratios to the base tree. It is a probe for work on the client's hot paths,
not a race against a peer, and asserts nothing.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_client import nbdkit  # (this script's folder is first on sys.path)

from pynbd.cli.common import parse_size  # (importable once bench_client is)

KiB = 1024
MiB = 1024 * KiB
REGION = 64 * MiB


def load_trees(checkouts: list[Path], workdir: Path) -> list[Any]:
    """Import each checkout's ``src/pynbd`` as a package of its own name; return
    their ``client`` modules, in order."""
    sys.path.insert(0, str(workdir))
    modules = []
    for i, checkout in enumerate(checkouts):
        source = checkout / "src" / "pynbd"
        if not (source / "__init__.py").is_file():
            raise SystemExit(f"{checkout}: no src/pynbd there")
        name = f"pynbd_tree{i}"
        shutil.copytree(source, workdir / name, ignore=shutil.ignore_patterns("__pycache__"))
        modules.append(importlib.import_module(f"{name}.client"))
    return modules


def operation(client: Any, case: str, size: int, buf: bytearray) -> Callable[[int], Any]:
    """One call of ``case`` at an offset."""
    if case == "pread":
        return lambda offset: client.pread(size, offset)
    if case == "pread_into":
        return lambda offset: client.pread_into(buf, offset)
    data = bytes(buf)
    return lambda offset: client.pwrite(data, REGION + offset)


def run(
    uri: str, modules: list[Any], case: str, size: int, rounds: int, seconds: float
) -> list[list[float]]:
    """Per-round rates (calls per second) of each module's client."""
    clients = [m.Client(uri) for m in modules]
    try:
        buf = bytearray(os.urandom(size))
        offsets = list(range(0, REGION - size + 1, size))
        ops = [operation(c, case, size, buf) for c in clients]
        rates: list[list[float]] = [[] for _ in clients]
        pos, clock, k = 0, time.perf_counter, len(clients)
        for r in range(rounds + 1):  # round 0 warms up and is dropped
            order = list(range(k))
            order = order[r % k :] + order[: r % k]
            if (r // k) % 2:
                order.reverse()
            for i in order:
                op, n = ops[i], 0
                start = clock()
                end = start + seconds
                while True:
                    op(offsets[pos])
                    pos = (pos + 1) % len(offsets)
                    n += 1
                    if clock() >= end:
                        break
                if r:
                    rates[i].append(n / (clock() - start))
        return rates
    finally:
        for c in clients:
            c.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base", type=Path, help="the checkout to compare against (old)")
    p.add_argument("new", type=Path, help="the checkout under test (new)")
    p.add_argument("--case", choices=("pread", "pread_into", "pwrite"), default="pread")
    p.add_argument("--size", type=parse_size, default=256 * KiB, help="bytes per call")
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--seconds", type=float, default=0.2, help="length of one round")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="pynbd-ab-") as tmp:
        workdir = Path(tmp)
        # base, its control copy, new
        modules = load_trees([args.base, args.base, args.new], workdir)
        with nbdkit("unix", tmp) as uri:
            fill = modules[0].Client(uri)
            chunk = os.urandom(4 * MiB)
            for offset in range(0, REGION, len(chunk)):
                fill.pwrite(chunk, offset)
            fill.close()
            rates = run(uri, modules, args.case, args.size, args.rounds, args.seconds)
    base = rates[0]
    print(
        f"{args.case} {args.size} bytes, {args.rounds} rounds of {args.seconds} s; "
        f"base {statistics.median(base):,.0f} calls/s"
    )
    for label, mine in (("control (base again)", rates[1]), ("new", rates[2])):
        ratios = [m / b for m, b in zip(mine, base, strict=True)]
        q1, med, q3 = statistics.quantiles(ratios, n=4)
        print(f"  {label:22} {med:.3f} of base (quartiles {q1:.3f} .. {q3:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
