"""``pynbd demo``: the whole path in one process, on the built-in default export.

A sparse memory export (1 GiB by default) is served by pynbd's own server on one end of
a socketpair, and pynbd's client talks NBD to it on the other end: negotiation, writes
with FUA, reads checked against what was written, WRITE_ZEROES, TRIM, FLUSH and the
allocation map. Nothing is installed, no port is opened, nothing outlives the command.
Exit status 0 means every check held.
"""

from __future__ import annotations

import argparse
import os
import socket
import threading
import time

from ..client import Client
from ..proto.constants import StateFlag, TransmissionFlag
from .common import CommandError, Subparsers, human_size, parse_size

MiB = 1 << 20


def register(sub: Subparsers) -> None:
    p = sub.add_parser(
        "demo",
        help="serve a memory export in-process and exercise it with the client",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument(
        "--size", default="1G", type=parse_size, help="export size (default 1G; K, M, G, T)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here: building the parser of every command must not (see pynbd.cli).
    from ..server import MemoryBackend, serve_socket

    size: int = args.size
    if size < 16 * MiB:
        raise CommandError("--size must be at least 16M for the demo")
    backend = MemoryBackend(size)
    ours, theirs = socket.socketpair()
    server = threading.Thread(
        target=serve_socket, args=(theirs, backend), name="pynbd-demo-server", daemon=True
    )
    server.start()
    try:
        with Client(sock=ours, timeout=30) as c:
            _exercise(c, size)
    finally:
        server.join(10)
    print("demo: every check passed")
    return 0


def _line(label: str, value: object) -> None:
    print(f"  {label:<22} {value}")


def _exercise(c: Client, size: int) -> None:
    import hashlib  # here, as the server in run: no other command needs either

    print(f"demo: a {human_size(size)} sparse memory export, served in-process over a socketpair")
    _line("size", f"{c.size} bytes")
    flags = ", ".join(
        f.name.lower() for f in TransmissionFlag if f & c.flags and f.name is not None
    )
    _line("transmission flags", flags)
    replies = (
        "extended headers"
        if c.extended_headers
        else ("structured replies" if c.structured_replies else "simple replies")
    )
    _line("replies", replies)
    _line(
        "block sizes",
        f"min {c.get_block_size('minimum')}, preferred {c.get_block_size('preferred')}, "
        f"max payload {human_size(c.get_block_size('maximum'))}",
    )
    _line("meta contexts", ", ".join(c.meta_contexts) or "(none)")

    # Write 8 MiB of random data with FUA (at 100 MiB, or in the middle of a smaller
    # export, on a MiB boundary), read it back, compare.
    length = 8 * MiB
    offset = min(100 * MiB, (size - length) // 2 // MiB * MiB)
    data = os.urandom(length)
    start = time.perf_counter()
    c.pwrite(data, offset, fua=c.can_fua())
    wrote = time.perf_counter() - start
    back = bytearray(length)
    start = time.perf_counter()
    c.pread_into(back, offset)
    read = time.perf_counter() - start
    if back != data:
        raise CommandError("data read back differs from what was written")
    digest = hashlib.sha256(data).hexdigest()[:16]
    _line(f"write 8M at {human_size(offset)}, FUA", f"{length / wrote / 1e6:,.0f} MB/s")
    _line("read 8 MiB back", f"{length / read / 1e6:,.0f} MB/s, sha256 {digest}… matches")

    # Zero the first MiB of that region, trim the last, flush, check both read as zeroes.
    c.zero(MiB, offset, no_hole=True)
    c.trim(MiB, offset + length - MiB)
    c.flush()
    head = c.pread(MiB, offset)
    tail = c.pread(MiB, offset + length - MiB)
    if any(head) or any(tail):
        raise CommandError("zeroed or trimmed range does not read as zeroes")
    if c.pread(MiB, offset + MiB) != data[MiB : 2 * MiB]:
        raise CommandError("data next to the zeroed range changed")
    _line("zero, trim, flush", "zeroed and trimmed ranges read as zeroes; the rest intact")

    # The allocation map: only what was written is data; the rest is a hole.
    if c.can_meta_context():
        print("  allocation map (base:allocation):")
        for ext in c.block_status(size, 0):
            kind = "data" if not ext.flags & StateFlag.HOLE else "hole"
            if ext.flags & StateFlag.ZERO:
                kind += ",zero"
            print(f"    {ext.offset:>14,} {ext.length:>14,}  {kind}")
