"""``pynbd map``: the extents of a meta context (block status), as ``nbdinfo --map``.

Text output, one line per extent (adjacent extents with the same type and description
are merged)::

         0       32768    0  data
     32768       98304    3  hole,zero

The columns are offset, length, the flags value (``type``) and its description when
the context is known: ``base:allocation`` (0 data, 1 hole, 2 zero, 3 hole,zero),
``qemu:dirty-bitmap:*`` (0 clean, 1 dirty), ``qemu:allocation-depth`` (0 absent,
1 local, N backing depth N). With ``--totals`` one line per type and description:
total bytes, percentage of the mapped range, flags, description.

A dirty bitmap is shown merged with ``base:allocation`` when the server offers both
(what an incremental backup reads and what it zeroes)::

         0       65536    0  clean
     65536       65536    1  dirty data
    131072      393216    0  clean
    524288      131072    1  dirty zero

The type is still the bitmap's flags; the description is ``clean`` (not dirty, whatever
its allocation), ``dirty data`` (dirty, and base:allocation does not say it reads as
zeroes: a backup reads it) or ``dirty zero`` (dirty, and base:allocation has the ZERO
flag: a backup writes zeroes there without reading). Without ``base:allocation`` the
bitmap is shown alone, ``clean`` and ``dirty``.

JSON (``--json``), one document:

- ``map``: a list of ``{"offset": int, "length": int, "type": int, "description":
  str | null}``, in offset order; a merged dirty bitmap adds ``"allocation": int``,
  the base:allocation flags that hold over the whole extent (1 hole, 2 zero);
- ``map --totals``: a list of ``{"size": int, "percent": float, "type": int,
  "description": str | null}``, by type and description.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from ..client import Client
from ..client.extents import intersect
from ..errors import ProtocolError
from ..proto.constants import BASE_ALLOCATION, StateFlag
from .common import CommandError, Connection, Subparsers, connection_options, parse_size

#: How much of the export one block status call covers: output streams per window.
WINDOW = 1 << 30

#: The prefix of qemu's dirty bitmap contexts; their only flag is NBD_STATE_DIRTY
#: (qemu's docs/interop/nbd.txt).
DIRTY_BITMAP = "qemu:dirty-bitmap:"
STATE_DIRTY = 1


class Extent(NamedTuple):
    """One line of a map.

    ``allocation`` is None unless a dirty bitmap is merged with base:allocation: then
    it holds the base:allocation flags true of every byte of the extent.
    """

    offset: int
    length: int
    flags: int
    description: str | None
    allocation: int | None = None


def register(sub: Subparsers) -> None:
    """Add the ``map`` subcommand."""
    p = sub.add_parser(
        "map",
        parents=[connection_options()],
        help="show allocated, hole and zero areas (block status)",
        description=(
            "Show the extents of a meta context (default base:allocation). A "
            "qemu:dirty-bitmap:NAME context is merged with base:allocation when the "
            "server offers it: clean, dirty data, dirty zero."
        ),
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

    A dirty bitmap context is merged with base:allocation when the server offers it.

    Raises:
        CommandError: the server does not offer the context, or the range is outside
            the export. NBDError, OSError: from the connection.
    """
    wanted = (context, BASE_ALLOCATION) if context.startswith(DIRTY_BITMAP) else (context,)
    with Client(conn.uri, meta_contexts=wanted, **conn.client_kwargs()) as client:
        if not client.can_meta_context(context):
            why = "" if client.structured_replies else " (it has no structured replies)"
            raise CommandError(f"the server does not support meta context {context!r}{why}")
        size = client.size
        if offset > size:
            raise CommandError(f"offset {offset} is beyond the end of the export ({size})")
        end = size if length is None else min(size, offset + length)
        extents = merged_extents(client, context, offset, end)
        if totals:
            print_totals(extents, end - offset, as_json)
        else:
            print_extents(extents, as_json)
    return 0


def merged_extents(client: Client, context: str, start: int, end: int) -> Iterator[Extent]:
    """The extents of ``context`` over [start, end), adjacent ones with the same type
    and description merged.

    A dirty bitmap is merged with base:allocation when ``client`` negotiated both.
    Yields as it goes, one window of :data:`WINDOW` bytes per call, so a large export
    prints without waiting for the whole map.
    """
    if context.startswith(DIRTY_BITMAP) and client.can_meta_context(BASE_ALLOCATION):
        pieces = _bitmap_pieces(client, context, start, end)
    else:
        pieces = _pieces(client, context, start, end)
    return _coalesce(pieces)


def _pieces(client: Client, context: str, start: int, end: int) -> Iterator[Extent]:
    pos = start
    while pos < end:
        got = client.block_status(min(end - pos, WINDOW), pos, context)
        if not got or got[0].offset != pos:
            raise ProtocolError(f"the server returned no extent for offset {pos}")
        for ext in got:
            yield Extent(ext.offset, ext.length, ext.flags, describe(context, ext.flags))
        pos = got[-1].offset + got[-1].length


def _bitmap_pieces(client: Client, context: str, start: int, end: int) -> Iterator[Extent]:
    """The pieces over which neither the bitmap nor base:allocation changes."""
    pos = start
    while pos < end:
        maps = client.block_status_all(
            min(end - pos, WINDOW), pos, contexts=(context, BASE_ALLOCATION)
        )
        at = pos
        for piece in intersect(maps[context], maps[BASE_ALLOCATION]):
            flags, allocation = piece.flags_a, piece.flags_b
            yield Extent(
                piece.offset, piece.length, flags, describe_dirty(flags, allocation), allocation
            )
            at = piece.offset + piece.length
        if at == pos:
            raise ProtocolError(f"the server returned no extent for offset {pos}")
        pos = at


def _coalesce(pieces: Iterable[Extent]) -> Iterator[Extent]:
    """Merge adjacent extents with the same type and description; the allocation of a
    merged extent keeps only the flags that all its pieces have."""
    pending: Extent | None = None
    for ext in pieces:
        if pending is not None and (pending.flags, pending.description) == (
            ext.flags,
            ext.description,
        ):
            allocation = (
                None
                if pending.allocation is None or ext.allocation is None
                else pending.allocation & ext.allocation
            )
            pending = pending._replace(length=pending.length + ext.length, allocation=allocation)
            continue
        if pending is not None:
            yield pending
        pending = ext
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
    if context.startswith(DIRTY_BITMAP):
        return {0: "clean", STATE_DIRTY: "dirty"}.get(flags)
    if context == "qemu:allocation-depth":
        return {0: "absent", 1: "local"}.get(flags, f"backing depth {flags}")
    return None


def describe_dirty(flags: int, allocation: int) -> str | None:
    """A dirty bitmap's ``flags`` seen with the base:allocation flags of the same bytes:
    ``clean``, ``dirty data`` or ``dirty zero``; None for flags qemu does not define."""
    if flags == 0:
        return "clean"
    if flags == STATE_DIRTY:
        return "dirty zero" if allocation & StateFlag.ZERO else "dirty data"
    return None


def print_extents(extents: Iterator[Extent], as_json: bool) -> None:
    """Print extents as nbdinfo does (text), or as a streamed JSON list."""
    out = sys.stdout
    if as_json:
        out.write("[")
        sep = "\n"
        for ext in extents:
            item: dict[str, int | str | None] = {
                "offset": ext.offset,
                "length": ext.length,
                "type": ext.flags,
                "description": ext.description,
            }
            if ext.allocation is not None:
                item["allocation"] = ext.allocation
            out.write(sep + json.dumps(item, ensure_ascii=False))
            sep = ",\n"
        out.write("\n]\n")
        return
    for ext in extents:
        desc = ext.description
        line = f"{ext.offset:10d}  {ext.length:10d}  {ext.flags:3d}"
        out.write(line + (f"  {desc}" if desc else "") + "\n")


def print_totals(extents: Iterator[Extent], mapped: int, as_json: bool) -> None:
    """Print the bytes of each type and description with their share of ``mapped``."""
    sums: dict[tuple[int, str], int] = {}
    for ext in extents:
        key = (ext.flags, ext.description or "")
        sums[key] = sums.get(key, 0) + ext.length
    rows = [
        (flags, desc or None, size, 100.0 * size / mapped if mapped else 0.0)
        for (flags, desc), size in sorted(sums.items())
    ]
    if as_json:
        doc = [
            {"size": size, "percent": pct, "type": flags, "description": desc}
            for flags, desc, size, pct in rows
        ]
        sys.stdout.write(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        return
    for flags, desc, size, pct in rows:
        sys.stdout.write(f"{size:10d} {pct:5.1f}% {flags:3d}" + (f" {desc}" if desc else "") + "\n")


__all__ = ["Extent", "describe", "describe_dirty", "merged_extents", "register", "show_map"]
