"""What the subcommands share: connection options, the connection settings, listing
exports, and small output helpers.

A subcommand adds :func:`connection_options` to its parser (``parents=[...]``) and
turns the parsed arguments into a :class:`Connection` with :meth:`Connection.from_args`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from dataclasses import dataclass
from typing import Any, TypeAlias

from ..client import DEFAULT_TIMEOUT, Client, ServerEntry
from ..proto.constants import Opt, Rep
from ..transport.tls import TLSConfig
from ..transport.uri import NBDURI, parse_uri

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

#: Exit status when a ``--can``/``--is`` test is false (nbdinfo's convention).
EXIT_FALSE = 2


class CommandError(Exception):
    """A failure of the command itself (not of the library): one line, exit status 1."""


def connection_options(*, with_uri: bool = True) -> argparse.ArgumentParser:
    """A parent parser with the URI argument and the options every subcommand takes.

    ``with_uri=False``: without the URI argument and ``--export-name``, for a command
    with URIs of its own (``copy``); :func:`tls_config` reads the TLS options for each.
    """
    p = argparse.ArgumentParser(add_help=False)
    if with_uri:
        p.add_argument(
            "uri",
            metavar="URI",
            help="the server: nbd://HOST[:PORT]/[EXPORT], nbds://..., "
            "nbd+unix:///[EXPORT]?socket=PATH, nbds+unix://...",
        )
    g = p.add_argument_group("connection")
    if with_uri:
        g.add_argument(
            "--export-name",
            metavar="NAME",
            help="the export to use (instead of the URI's)",
        )
    g.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_timeout,
        default=DEFAULT_TIMEOUT,
        help=f"time limit of connecting and of each request (default {DEFAULT_TIMEOUT:g}; 0: none)",
    )
    g.add_argument(
        "--tls",
        action="store_true",
        help="require TLS even with an nbd:// URI (nbds:// URIs always require it); "
        "any --tls-* option implies this",
    )
    g.add_argument(
        "--tls-certificates",
        metavar="DIR",
        help="directory with ca-cert.pem (and client-cert.pem, client-key.pem)",
    )
    g.add_argument(
        "--tls-psk-file",
        metavar="FILE",
        help="file of USERNAME:HEXKEY lines for TLS-PSK (needs Python 3.13)",
    )
    g.add_argument("--tls-username", metavar="NAME", help="the TLS-PSK user name")
    g.add_argument(
        "--tls-hostname",
        metavar="NAME",
        help="the name to check the server's certificate against",
    )
    g.add_argument(
        "--no-tls-verify",
        action="store_true",
        help="do not verify the server's certificate (insecure)",
    )
    # SUPPRESS: a subcommand's default must not undo "pynbd --debug COMMAND".
    g.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show tracebacks and debug logging",
    )
    return p


def _timeout(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value < 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"not a valid number of seconds: {text!r}")
    return None if value == 0 else value


_SIZE_RE = re.compile(r"(0x[0-9a-f]+|[0-9]+)\s*([kmgtpe]?)(?:i?b)?", re.IGNORECASE)
_UNITS = "kmgtpe"


def parse_size(text: str) -> int:
    """Parse a byte count for argparse: ``4096``, ``0x1000``, ``4k``, ``1M``, ``2GiB``.

    Suffixes are powers of 1024. Raises ArgumentTypeError for anything else.
    """
    m = _SIZE_RE.fullmatch(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a byte count: {text!r}")
    digits = m.group(1)
    number = int(digits, 16) if digits[:2].lower() == "0x" else int(digits)
    unit = m.group(2).lower()
    return number << (10 * (_UNITS.index(unit) + 1)) if unit else number


def positive_int(text: str) -> int:
    """Parse a count of at least 1 for argparse."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def human_size(size: int) -> str:
    """A short human form of a byte count: ``1M`` when exact, ``976.6K`` when not."""
    units = ["", "K", "M", "G", "T", "P", "E"]
    n, i = size, 0
    while n >= 1024 and n % 1024 == 0 and i < len(units) - 1:
        n //= 1024
        i += 1
    if n < 1024 or i == len(units) - 1:
        return f"{n}{units[i]}"
    value = float(size)
    i = 0
    while value >= 1024 and i < len(units) - 1:
        value /= 1024
        i += 1
    return f"{value:.1f}{units[i]}"


def show_name(name: str) -> str:
    """An export name as printed in text output: quoted when it could be misread."""
    if name and name.isprintable() and not any(c.isspace() for c in name) and '"' not in name:
        return name
    return json.dumps(name, ensure_ascii=False)


def print_json(doc: Any) -> None:
    """Write one JSON document to stdout."""
    sys.stdout.write(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")


@dataclass(frozen=True, slots=True)
class Connection:
    """Where and how to connect, from the command line.

    Attributes:
        uri: the parsed URI.
        export_name: the export to use (``--export-name`` or the URI's).
        tls: the TLS settings, or None for plaintext.
        timeout: seconds, or None for no limit.
    """

    uri: NBDURI
    export_name: str
    tls: TLSConfig | None
    timeout: float | None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Connection:
        """Build the settings from parsed arguments.

        Raises:
            URIError: the URI cannot be parsed.
        """
        uri = parse_uri(args.uri)
        name = uri.export_name if args.export_name is None else args.export_name
        return cls(uri, name, tls_config(args, uri), args.timeout)

    def client_kwargs(self, export_name: str | None = None) -> dict[str, Any]:
        """Keyword arguments for :class:`~pynbd.client.Client` and ``Client.negotiate``."""
        return {
            "export_name": self.export_name if export_name is None else export_name,
            "tls": self.tls,
            "timeout": self.timeout,
        }

    def uri_for(self, export_name: str) -> str:
        """The URI of another export on the same server (for display)."""
        return dataclasses.replace(self.uri, export_name=export_name).to_uri()


def tls_options_given(args: argparse.Namespace) -> bool:
    """Whether any TLS option (``--tls``, ``--tls-*``, ``--no-tls-verify``) was given."""
    given = (args.tls_certificates, args.tls_psk_file, args.tls_username, args.tls_hostname)
    return bool(args.tls or args.no_tls_verify or any(v is not None for v in given))


def tls_config(args: argparse.Namespace, uri: NBDURI) -> TLSConfig | None:
    """The TLS settings for ``uri`` from the options (None: plaintext)."""
    overrides = {
        "certificates": args.tls_certificates,
        "psk_file": args.tls_psk_file,
        "username": args.tls_username,
        "hostname": args.tls_hostname,
    }
    base = TLSConfig.from_uri(uri)
    if base is None:
        if not tls_options_given(args):
            return None
        # An nbd:// URI may still carry tls-* parameters; --tls makes them count.
        base = TLSConfig(
            certificates=uri.tls_certificates,
            verify_peer=uri.tls_verify_peer,
            hostname=uri.tls_hostname,
            psk_file=uri.tls_psk_file,
            username=uri.tls_username,
        )
    cfg = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
    if args.no_tls_verify:
        cfg = dataclasses.replace(cfg, verify_peer=False)
    return cfg


def list_exports(conn: Connection) -> tuple[str, tuple[ServerEntry, ...]]:
    """Ask the server for its exports (NBD_OPT_LIST).

    Only the list is asked for: a server with named exports alone (nbd-server) has no
    default export to ask about.

    Returns:
        The protocol style (``"fixed newstyle"``...) and the exports, in server order.

    Raises:
        CommandError: the server refused to list its exports.
        OptionError: the server requires TLS and none was asked for.
        TLSError, ConnectionClosed, NBDTimeout, ProtocolError: connecting failed.
    """
    result = Client.negotiate(
        conn.uri, list_exports=True, list_meta_contexts=False, info=False, **conn.client_kwargs()
    )
    if result.exports is None:
        refusal = result.refused.get(Opt.LIST)
        if refusal is not None and refusal.reply == Rep.ERR_TLS_REQD:
            # A server that wants TLS refuses every option with TLS_REQD, LIST included.
            raise refusal
        if result.style != "fixed newstyle":
            raise CommandError(f"the server speaks {result.style} NBD, which cannot list exports")
        raise CommandError("the server refused to list its exports (NBD_OPT_LIST)")
    return result.style, result.exports


__all__ = [
    "EXIT_FALSE",
    "CommandError",
    "Connection",
    "Subparsers",
    "connection_options",
    "human_size",
    "list_exports",
    "parse_size",
    "positive_int",
    "print_json",
    "show_name",
    "tls_config",
    "tls_options_given",
]
