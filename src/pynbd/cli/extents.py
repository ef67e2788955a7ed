"""``pynbd map``: the extents of a meta context (block status), as ``nbdinfo --map``.

Text output, one line per extent (adjacent extents with the same flags are merged)::

         0       32768    0  data
     32768       98304    3  hole,zero

The columns are offset, length, the flags value (``type``) and its description when
the context is known: ``base:allocation`` (0 data, 1 hole, 2 zero, 3 hole,zero),
``qemu:dirty-bitmap:*`` (0 clean, 1 dirty), ``qemu:allocation-depth`` (0 absent,
1 local, N backing depth N). With ``--totals`` one line per flags value: total bytes,
percentage of the mapped range, flags, description.

JSON (``--json``), one document:

- ``map``: a list of ``{"offset": int, "length": int, "type": int, "description":
  str | null}``, in offset order;
- ``map --totals``: a list of ``{"size": int, "percent": float, "type": int,
  "description": str | null}``, by type.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator

from ..client import Client, MappedExtent
from ..errors import ProtocolError
from ..proto.constants import BASE_ALLOCATION, StateFlag
from .common import CommandError, Connection, Subparsers, connection_options, parse_size

#: How much of the export one block status call covers: output streams per window.
WINDOW = 1 << 30


def register(sub: Subparsers) -> None:
    """Add the ``map`` subcommand."""
    p = sub.add_parser(
        "map",
        parents=[connection_options()],
        help="show allocated, hole and zero areas (block status)",
        description="Show the extents of a meta context (default base:allocation).",
    )
    add_map_options(p, context_option=True)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def add_map_options(p: argparse.ArgumentParser, *, context_option: bool) -> None:
    """The options ``map`` shares with ``info --map``."""
    if context_option:
        p.add_argument(
            "--context",
            metavar="NAME",
            default=BASE_ALLOCATION,
            help=f"the meta context to map (default {BASE_ALLOCATION})",
        )
    p.add_argument(
        "--offset", metavar="N", type=parse_size, default=0, help="start here (default 0)"
    )
    p.add_argument(
        "--length",
        metavar="N",
        type=parse_size,
        default=None,
        help="map this many bytes (default: to the end; clipped at the end)",
    )
    p.add_argument("--totals", action="store_true", help="sum the sizes of each type")


def run(args: argparse.Namespace) -> int:
    conn = Connection.from_args(args)
    return show_map(conn, args.context, args.offset, args.length, args.totals, args.json)


def show_map(
    conn: Connection,
    context: str,
    offset: int,
    length: int | None,
    totals: bool,
    as_json: bool,
) -> int:
    """Connect, map ``context`` over [offset, offset+length) and print it.

    Raises:
        CommandError: the server does not offer the context, or the range is outside
            the export. NBDError, OSError: from the connection.
    """
    with Client(conn.uri, meta_contexts=(context,), **conn.client_kwargs()) as client:
        if not client.can_meta_context(context):
            why = "" if client.structured_replies else " (it has no structured replies)"
            raise CommandError(f"the server does not support meta context {context!r}{why}")
        size = client.size
        if offset > size:
            raise CommandError(f"offset {offset} is beyond the end of the export ({size})")
        end = size if length is None else min(size, offset + length)
        extents = merged_extents(client, context, offset, end)
        if totals:
            print_totals(extents, context, end - offset, as_json)
        else:
            print_extents(extents, context, as_json)
    return 0


def merged_extents(client: Client, context: str, start: int, end: int) -> Iterator[MappedExtent]:
    """The extents over [start, end), adjacent ones with the same flags merged.

    Yields as it goes, one window of :data:`WINDOW` bytes per call, so a large export
    prints without waiting for the whole map.
    """
    pending: MappedExtent | None = None
    pos = start
    while pos < end:
        got = client.block_status(min(end - pos, WINDOW), pos, context)
        if not got or got[0].offset != pos:
            raise ProtocolError(f"the server returned no extent for offset {pos}")
        for ext in got:
            if pending is not None and pending.flags == ext.flags:
                pending = MappedExtent(pending.offset, pending.length + ext.length, ext.flags)
                continue
            if pending is not None:
                yield pending
            pending = ext
        pos = got[-1].offset + got[-1].length
    if pending is not None:
        yield pending


def describe(context: str, flags: int) -> str | None:
    """A description of an extent's flags in ``context``, or None when unknown."""
    if context == BASE_ALLOCATION:
        parts = []
        if flags & StateFlag.HOLE:
            parts.append("hole")
        if flags & StateFlag.ZERO:
            parts.append("zero")
        rest = flags & ~int(StateFlag.HOLE | StateFlag.ZERO)
        if not parts:
            parts.append("data")
        parts += [f"bit{n}" for n in range(32) if rest >> n & 1]
        return ",".join(parts)
    if context.startswith("qemu:dirty-bitmap:"):
        return {0: "clean", 1: "dirty"}.get(flags)
    if context == "qemu:allocation-depth":
        return {0: "absent", 1: "local"}.get(flags, f"backing depth {flags}")
    return None


def print_extents(extents: Iterator[MappedExtent], context: str, as_json: bool) -> None:
    """Print extents as nbdinfo does (text), or as a streamed JSON list."""
    out = sys.stdout
    if as_json:
        out.write("[")
        sep = "\n"
        for ext in extents:
            item = {
                "offset": ext.offset,
                "length": ext.length,
                "type": ext.flags,
                "description": describe(context, ext.flags),
            }
            out.write(sep + json.dumps(item, ensure_ascii=False))
            sep = ",\n"
        out.write("\n]\n")
        return
    for ext in extents:
        desc = describe(context, ext.flags)
        line = f"{ext.offset:10d}  {ext.length:10d}  {ext.flags:3d}"
        out.write(line + (f"  {desc}" if desc else "") + "\n")


def print_totals(extents: Iterator[MappedExtent], context: str, mapped: int, as_json: bool) -> None:
    """Print the bytes of each flags value with their share of ``mapped`` bytes."""
    sums: dict[int, int] = {}
    for ext in extents:
        sums[ext.flags] = sums.get(ext.flags, 0) + ext.length
    rows = [
        (flags, size, 100.0 * size / mapped if mapped else 0.0)
        for flags, size in sorted(sums.items())
    ]
    if as_json:
        doc = [
            {"size": size, "percent": pct, "type": flags, "description": describe(context, flags)}
            for flags, size, pct in rows
        ]
        sys.stdout.write(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        return
    for flags, size, pct in rows:
        desc = describe(context, flags)
        sys.stdout.write(f"{size:10d} {pct:5.1f}% {flags:3d}" + (f" {desc}" if desc else "") + "\n")


__all__ = ["describe", "merged_extents", "register", "show_map"]
