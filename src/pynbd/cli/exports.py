"""``pynbd list``: the exports a server offers (NBD_OPT_LIST).

Text output: one line per export, the name (quoted as JSON when it is empty or holds
spaces or unprintable characters), then a tab and the description if there is one.

JSON (``--json``), one document::

    {"exports": [{"export_name": str, "description": str | null}, ...]}

A server that refuses NBD_OPT_LIST (nbd-server without ``allowlist = true``, an
oldstyle server) is an error: one line on stderr, exit status 1.
"""

from __future__ import annotations

import argparse
import sys

from .common import Connection, Subparsers, connection_options, list_exports, print_json, show_name


def register(sub: Subparsers) -> None:
    """Add the ``list`` subcommand."""
    p = sub.add_parser(
        "list",
        parents=[connection_options()],
        help="list the exports of a server",
        description="List the export names and descriptions of a server (NBD_OPT_LIST).",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    conn = Connection.from_args(args)
    _style, exports = list_exports(conn)
    if args.json:
        print_json(
            {
                "exports": [
                    {"export_name": e.name, "description": e.description or None} for e in exports
                ]
            }
        )
        return 0
    for e in exports:
        line = show_name(e.name)
        if e.description:
            line += "\t" + e.description
        sys.stdout.write(line + "\n")
    return 0


__all__ = ["register"]
