"""``pynbd info``: what a server says about an export, as ``nbdinfo``.

The export is entered with NBD_OPT_GO and left at once (NBD_CMD_DISC): some servers
(nbd-server) report the right size only to GO, not to NBD_OPT_INFO. Meta contexts are
listed with NBD_OPT_LIST_META_CONTEXT. With ``--list`` every export of NBD_OPT_LIST is
probed the same way, one connection each.

Text output::

    protocol: fixed newstyle without TLS, using structured replies
    export="":
    \texport_size: 1048576 (1M)
    \tdescription: ...                  (when the server sent one)
    \turi: nbd+unix:///?socket=/tmp/s
    \tcontexts:
    \t\tbase:allocation
    \ttransmission_flags: 0x4ed HAS_FLAGS SEND_FLUSH ...
    \tis_read_only: false
    \t...
    \tblock_size_minimum: 1
    \t...

JSON (``--json``), one document::

    {
      "protocol": str,                  "oldstyle", "newstyle" or "fixed newstyle"
      "tls": bool,
      "structured_replies": bool,
      "extended_headers": bool,
      "exports": [                      one, or every export with --list
        {
          "export_name": str,
          "export_size": int,
          "export_size_str": str,       "1M", "976.6K"
          "canonical_name": str | null, NBD_INFO_NAME
          "description": str | null,    NBD_INFO_DESCRIPTION (or the LIST description)
          "uri": str,
          "transmission_flags": int,
          "transmission_flag_names": [str],  "HAS_FLAGS", "SEND_FLUSH", ..., "BIT13"
          "contexts": [str] | null,     null: the server cannot list meta contexts
          "is_read_only": bool, "is_rotational": bool,
          "can_cache": bool, "can_df": bool, "can_fast_zero": bool, "can_flush": bool,
          "can_fua": bool, "can_multi_conn": bool, "can_trim": bool, "can_zero": bool,
          "can_block_status_payload": bool,
          "block_size_minimum": int, "block_size_preferred": int,
          "block_size_maximum": int,
          "block_size_advertised": bool  false: the three above are the spec's defaults
        }
        or, for an export of --list that could not be probed:
        {"export_name": str, "error": str}
      ]
    }

``--size`` prints only the size (a JSON number with ``--json``). ``--can X`` and
``--is X`` print nothing and exit 0 when true, 2 when false (nbdinfo's convention).
``--map[=CONTEXT]`` prints the map as ``pynbd map`` does (write the context with ``=``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from ..client import Client, Negotiated
from ..errors import NBDError
from ..proto.constants import BASE_ALLOCATION, TransmissionFlag
from .common import (
    EXIT_FALSE,
    Connection,
    Subparsers,
    connection_options,
    human_size,
    list_exports,
    print_json,
    show_name,
)
from .extents import show_map

CAN: dict[str, Callable[[Negotiated], bool]] = {
    "cache": Negotiated.can_cache,
    "connect": lambda n: True,  # reaching this point means negotiation succeeded
    "df": Negotiated.can_df,
    "extended-headers": lambda n: n.extended_headers,
    "fast-zero": Negotiated.can_fast_zero,
    "flush": Negotiated.can_flush,
    "fua": Negotiated.can_fua,
    "multi-conn": Negotiated.can_multi_conn,
    "read": lambda n: True,  # every export can be read
    "structured-reply": lambda n: n.structured_replies,
    "trim": Negotiated.can_trim,
    "write": lambda n: not n.is_read_only(),
    "zero": Negotiated.can_zero,
}
IS: dict[str, Callable[[Negotiated], bool]] = {
    "read-only": Negotiated.is_read_only,
    "rotational": Negotiated.is_rotational,
    "tls": lambda n: n.tls,
}

#: Options whose value is optional: a bare ``--map`` means ``--map=base:allocation``
#: (rewritten before parsing, so that ``--map URI`` does not read the URI as a context).
OPTIONAL_VALUES = {"--map": BASE_ALLOCATION}


def register(sub: Subparsers) -> None:
    """Add the ``info`` subcommand."""
    p = sub.add_parser(
        "info",
        parents=[connection_options()],
        help="show what the server says about an export",
        description="Show an export's size, flags, block sizes, meta contexts and the "
        "protocol spoken; or test one property (--can, --is).",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--list", action="store_true", help="show every export of the server")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--size", action="store_true", help="print only the size in bytes")
    mode.add_argument(
        "--can",
        choices=sorted(CAN),
        metavar="WHAT",
        help=f"exit 0 if the export can WHAT, else 2; WHAT: {', '.join(sorted(CAN))}",
    )
    mode.add_argument(
        "--is",
        dest="is_",
        choices=sorted(IS),
        metavar="WHAT",
        help=f"exit 0 if the export is WHAT, else 2; WHAT: {', '.join(sorted(IS))}",
    )
    mode.add_argument(
        "--map",
        nargs="?",
        const=BASE_ALLOCATION,
        metavar="CONTEXT",
        help="show the map of a meta context (default base:allocation; write --map=CONTEXT)",
    )
    p.add_argument("--totals", action="store_true", help="with --map: sum each type")
    p.set_defaults(func=run, parser=p)


def probe(conn: Connection, export_name: str) -> Negotiated:
    """Negotiate ``export_name`` (GO, then disconnect) and list its meta contexts."""
    return Client.negotiate(
        conn.uri,
        list_exports=False,
        list_meta_contexts=True,
        go=True,
        **conn.client_kwargs(export_name),
    )


def run(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.parser
    if args.list and (args.size or args.can or args.is_ or args.map):
        parser.error("--list cannot be combined with --size, --can, --is or --map")
    if args.totals and args.map is None:
        parser.error("--totals needs --map")
    if args.json and (args.can or args.is_):
        parser.error("--json cannot be combined with --can or --is")
    conn = Connection.from_args(args)
    if args.map is not None:
        return show_map(conn, args.map, 0, None, args.totals, args.json)
    if args.list:
        return _show_all(conn, args.json)
    n = probe(conn, conn.export_name)
    if args.size:
        sys.stdout.write(f"{n.size or 0}\n")
        return 0
    if args.can:
        return 0 if CAN[args.can](n) else EXIT_FALSE
    if args.is_:
        return 0 if IS[args.is_](n) else EXIT_FALSE
    doc = protocol_doc(n)
    doc["exports"] = [export_doc(conn, conn.export_name, n)]
    _emit(doc, args.json)
    return 0


def _show_all(conn: Connection, as_json: bool) -> int:
    style, entries = list_exports(conn)
    doc: dict[str, Any] = {}
    exports: list[dict[str, Any]] = []
    failed = 0
    for entry in entries:
        try:
            n = probe(conn, entry.name)
        except (NBDError, OSError) as exc:
            # One export that cannot be opened does not hide the others.
            failed += 1
            exports.append({"export_name": entry.name, "error": str(exc)})
            sys.stderr.write(f"pynbd: export {show_name(entry.name)}: {exc}\n")
            continue
        if not doc:
            doc = protocol_doc(n)
        exports.append(export_doc(conn, entry.name, n, entry.description))
    if not doc:
        doc = {"protocol": style, "tls": conn.tls is not None}
    doc["exports"] = exports
    _emit(doc, as_json)
    return 1 if failed else 0


def protocol_doc(n: Negotiated) -> dict[str, Any]:
    """The connection-wide part of the JSON document."""
    return {
        "protocol": n.style,
        "tls": n.tls,
        "structured_replies": n.structured_replies,
        "extended_headers": n.extended_headers,
    }


def flag_names(flags: int) -> list[str]:
    """The names of the transmission flags set in ``flags`` (``BITn`` when unknown)."""
    names = []
    for bit in range(16):
        if flags >> bit & 1:
            try:
                names.append(str(TransmissionFlag(1 << bit).name))
            except ValueError:
                names.append(f"BIT{bit}")
    return names


def export_doc(
    conn: Connection, name: str, n: Negotiated, listed_description: str = ""
) -> dict[str, Any]:
    """One export's entry of the JSON document (also what the text output shows)."""
    size = n.size or 0
    contexts = n.available_meta_contexts
    return {
        "export_name": name,
        "export_size": size,
        "export_size_str": human_size(size),
        "canonical_name": n.canonical_name,
        "description": n.description or listed_description or None,
        "uri": conn.uri_for(name),
        "transmission_flags": int(n.flags),
        "transmission_flag_names": flag_names(int(n.flags)),
        "contexts": None if contexts is None else list(contexts),
        "is_read_only": n.is_read_only(),
        "is_rotational": n.is_rotational(),
        "can_cache": n.can_cache(),
        "can_df": n.can_df(),
        "can_fast_zero": n.can_fast_zero(),
        "can_flush": n.can_flush(),
        "can_fua": n.can_fua(),
        "can_multi_conn": n.can_multi_conn(),
        "can_trim": n.can_trim(),
        "can_zero": n.can_zero(),
        "can_block_status_payload": n.can_block_status_payload(),
        "block_size_minimum": n.minimum_block,
        "block_size_preferred": n.preferred_block,
        "block_size_maximum": n.maximum_payload,
        "block_size_advertised": n.block_size_advertised,
    }


def _emit(doc: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(doc)
        return
    out = sys.stdout
    if "structured_replies" in doc:
        if doc["extended_headers"]:
            replies = "extended headers"
        elif doc["structured_replies"]:
            replies = "structured replies"
        else:
            replies = "simple replies"
        tls = "with TLS" if doc["tls"] else "without TLS"
        out.write(f"protocol: {doc['protocol']} {tls}, using {replies}\n")
    for export in doc["exports"]:
        out.write(f"export={json.dumps(export['export_name'], ensure_ascii=False)}:\n")
        for key, value in export.items():
            if key == "export_name":
                continue
            if key == "export_size":
                out.write(f"\t{key}: {value} ({export['export_size_str']})\n")
            elif key in ("export_size_str", "transmission_flag_names"):
                continue
            elif key == "transmission_flags":
                names = " ".join(export["transmission_flag_names"])
                out.write(f"\t{key}: {value:#x} {names}\n")
            elif key == "canonical_name" and value is not None:
                out.write(f"\t{key}: {json.dumps(value, ensure_ascii=False)}\n")
            elif key == "contexts":
                if value is not None:
                    out.write(f"\t{key}:\n" + "".join(f"\t\t{c}\n" for c in value))
            elif value is None:
                continue
            elif isinstance(value, bool):
                out.write(f"\t{key}: {'true' if value else 'false'}\n")
            else:
                out.write(f"\t{key}: {value}\n")


__all__ = ["CAN", "IS", "OPTIONAL_VALUES", "export_doc", "probe", "register"]
