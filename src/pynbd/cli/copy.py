"""``pynbd copy SRC DST``: copy between NBD exports, files, devices and streams.

The options are nbdcopy's where nbdcopy has them (``-C``, ``-R``, ``--request-size``,
``--queue-size``, ``-S``, ``-p``/``--progress[=FD]``, ``--flush``,
``--destination-is-zero``, ``--allocated``, ``--no-extents``), plus ``--dirty-bitmap``
for incremental backups and ``-v`` for a summary.

Progress: ``-p`` draws a bar on stderr when it is a terminal (percent, bytes, rate, time
left) and writes a plain line at every tenth otherwise; ``--progress=FD`` writes
``N/100`` lines on descriptor FD whenever N changes, as nbdcopy does.

Exit status: 0 copied; 1 failed (one line naming the end, the offset and the error); 130
interrupted by Ctrl-C or SIGTERM, after the requests in flight were finished and the
destination flushed.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import TextIO

from .. import copier
from ..copier.endpoints import is_uri
from ..transport.tls import TLSConfig
from ..transport.uri import parse_uri
from .common import (
    CommandError,
    Subparsers,
    connection_options,
    parse_size,
    positive_int,
    tls_config,
    tls_options_given,
)

#: ``--progress`` given bare (the option parser fills it in as ``--progress=stderr``).
STDERR = "stderr"
OPTIONAL_VALUES = {"--progress": STDERR}


def register(sub: Subparsers) -> None:
    """Add the ``copy`` subcommand."""
    p = sub.add_parser(
        "copy",
        parents=[connection_options(with_uri=False)],
        help="copy to, from or between NBD servers (sparse, parallel)",
        description="Copy SRC to DST. Each is an NBD URI, a file or block device, or - "
        "(standard input or output); DST may also be null: (read and discard).",
    )
    p.add_argument("src", metavar="SRC", help="NBD URI, file, device or -")
    p.add_argument("dst", metavar="DST", help="NBD URI, file, device, - or null:")
    g = p.add_argument_group("copying")
    g.add_argument(
        "-C",
        "--connections",
        metavar="N",
        type=positive_int,
        help="connections to each NBD end (default 4 where both allow multi-conn, else 1)",
    )
    g.add_argument(
        "-T",
        "--threads",
        metavar="N",
        type=positive_int,
        help="use at most N connections, each with a reader and a writer thread "
        "(default: the number of processors)",
    )
    g.add_argument(
        "-R",
        "--requests",
        metavar="N",
        type=positive_int,
        default=64,
        help="requests per connection: the buffers its reader may fill ahead of its "
        "writer; each side sends up to 16 of them at once (default 64)",
    )
    g.add_argument(
        "--request-size",
        metavar="BYTES",
        type=parse_size,
        default=256 * 1024,
        help="the largest request (default 256K)",
    )
    g.add_argument(
        "--queue-size",
        metavar="BYTES",
        type=parse_size,
        default=None,
        help="bytes in flight per connection (default 16M)",
    )
    g.add_argument(
        "-S",
        "--sparse",
        metavar="BYTES",
        type=parse_size,
        default=4096,
        help="zero all-zero blocks of this size found in data, instead of writing them "
        "(default 4096; 0: off)",
    )
    g.add_argument("--flush", action="store_true", help="flush the destination at the end")
    g.add_argument(
        "--destination-is-zero",
        "--target-is-zero",
        action="store_true",
        help="the destination reads as zeroes already: skip zero ranges",
    )
    g.add_argument(
        "--allocated",
        action="store_true",
        help="leave no holes in the destination (zero ranges are written)",
    )
    g.add_argument(
        "--no-extents",
        dest="extents",
        action="store_false",
        help="ignore the source's block status: read everything",
    )
    g.add_argument(
        "--dirty-bitmap",
        metavar="NAME",
        help="copy only what qemu:dirty-bitmap:NAME marks dirty, onto a destination that "
        "holds the previous copy (an incremental backup)",
    )
    out = p.add_argument_group("output")
    out.add_argument("-p", dest="progress", action="store_const", const=STDERR, help="progress bar")
    out.add_argument(
        "--progress",
        metavar="FD",
        dest="progress",
        help="--progress: a bar on stderr; --progress=FD: 'N/100' lines on descriptor FD",
    )
    out.add_argument(
        "-v", "--verbose", action="store_true", help="print a summary on stderr at the end"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    tls = _tls(args)
    progress = _progress(args.progress)
    try:
        job = copier.Job(
            args.src,
            args.dst,
            connections=args.connections,
            threads=args.threads,
            requests=args.requests,
            request_size=args.request_size,
            queue_size=args.queue_size,
            sparse=args.sparse,
            flush=args.flush,
            destination_is_zero=args.destination_is_zero,
            allocated=args.allocated,
            extents=args.extents,
            dirty_bitmap=args.dirty_bitmap,
            progress=progress.update if progress.active else None,
            tls=tls,
            timeout=args.timeout,
        )
    except ValueError as exc:  # an option out of range
        raise CommandError(str(exc)) from exc
    # SIGTERM stops the copy as Ctrl-C does, by a KeyboardInterrupt: while the ends are
    # opened that ends the handshake at once; while copying, the engine takes it as
    # Job.stop() (the requests in flight finish first).
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = job.run()
    except copier.CopyInterrupted as exc:
        progress.end()
        sys.stderr.write(f"pynbd: copy {exc}\n")
        return 130
    except KeyboardInterrupt:  # before the copy proper: nothing was in flight
        progress.end()
        sys.stderr.write("pynbd: copy interrupted\n")
        return 130
    except ValueError as exc:  # an end that cannot be one (null: as the source)
        raise CommandError(str(exc)) from exc
    finally:
        signal.signal(signal.SIGTERM, previous)
        progress.end()  # before any error line (a bar ends its line)
    if args.verbose:
        rate = result.size / result.seconds / 1e6 if result.seconds else 0.0
        sys.stderr.write(
            f"pynbd copy: {result.size} bytes: read {result.read_bytes}, written "
            f"{result.written_bytes}, zeroed {result.zeroed_bytes}, skipped "
            f"{result.skipped_bytes}, in {result.seconds:.3f} s ({rate:.1f} MB/s), "
            f"{result.connections} connection(s)\n"
        )
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _tls(args: argparse.Namespace) -> TLSConfig | None:
    """The TLS options, when given, for every NBD end (else each URI's own)."""
    if not tls_options_given(args):
        return None
    for word in (args.src, args.dst):
        if is_uri(word):
            return tls_config(args, parse_uri(word))
    raise CommandError("TLS options need an NBD URI as SRC or DST")


def _progress(spec: str | None) -> _Progress:
    if spec is None:
        return _Progress()
    if spec == STDERR:
        return _Bar(sys.stderr) if sys.stderr.isatty() else _Lines(sys.stderr)
    try:
        fd = int(spec)
    except ValueError:
        raise CommandError(f"--progress takes a file descriptor number, not {spec!r}") from None
    try:
        os.fstat(fd)
    except OSError:
        raise CommandError(f"--progress={fd}: descriptor {fd} is not open") from None
    return _Percent(fd)


class _Progress:
    """No progress output."""

    active = False

    def update(self, done: int, total: int | None) -> None:
        pass

    def end(self) -> None:
        pass


class _Percent(_Progress):
    """nbdcopy's machine-readable form: ``N/100`` lines on a descriptor."""

    active = True

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._last = -1

    def update(self, done: int, total: int | None) -> None:
        # A stream's size is known only at its end: 0 until then, as nbdcopy writes.
        percent = 0 if total is None else min(100, done * 100 // total) if total else 100
        if percent != self._last:
            self._last = percent
            try:
                os.write(self._fd, f"{percent}/100\n".encode())
            except OSError:
                self.active = False  # the reader went away: the copy goes on


class _Lines(_Progress):
    """Plain lines for a log: one at every tenth (or every 64 MiB of a stream)."""

    active = True

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._start = time.monotonic()
        self._last = -1

    def update(self, done: int, total: int | None) -> None:
        step = done * 10 // total if total else done >> 26
        if step == self._last and done != total:
            return
        self._last = step
        self._out.write(f"pynbd copy: {_status(done, total, time.monotonic() - self._start)}\n")
        self._out.flush()


class _Bar(_Progress):
    """A bar redrawn in place on a terminal."""

    active = True
    WIDTH = 30

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._start = time.monotonic()
        self._drawn = False

    def update(self, done: int, total: int | None) -> None:
        if total:
            fill = min(self.WIDTH, done * self.WIDTH // total)
            bar = "[" + "#" * fill + "." * (self.WIDTH - fill) + "] "
        else:
            bar = ""
        text = bar + _status(done, total, time.monotonic() - self._start)
        self._out.write("\r" + text + "\x1b[K")
        self._out.flush()
        self._drawn = True

    def end(self) -> None:
        if self._drawn:
            self._out.write("\n")
            self._out.flush()
            self._drawn = False


def _status(done: int, total: int | None, elapsed: float) -> str:
    rate = done / elapsed if elapsed > 0 else 0.0
    parts = []
    if total:
        parts.append(f"{min(100.0, 100.0 * done / total):5.1f}%")
        parts.append(f"{_bytes(done)} / {_bytes(total)}")
    else:
        parts.append(_bytes(done))
    parts.append(f"{_bytes(int(rate))}/s")
    if total and rate > 0 and done < total:
        parts.append(f"{_clock((total - done) / rate)} left")
    elif total and done >= total:
        parts.append(f"in {_clock(elapsed)}")
    return "  ".join(parts)


def _bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _clock(seconds: float) -> str:
    s = int(seconds + 0.5)
    return (
        f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
    )


__all__ = ["OPTIONAL_VALUES", "register"]
