"""The ``pynbd`` command line: ``pynbd info``, ``pynbd list``, ``pynbd map``, ``pynbd copy``,
``pynbd demo``...

::

    pynbd info URI [--json] [--list] [--size | --can WHAT | --is WHAT | --map[=CONTEXT]]
    pynbd list URI [--json]
    pynbd map  URI [--json] [--context NAME] [--offset N] [--length N] [--totals]
    pynbd copy SRC DST [-C N] [-R N] [-p] [--dirty-bitmap NAME] ... (see :mod:`.copy`)

Every subcommand takes the connection options ``--export-name``, ``--timeout``,
``--tls``, ``--tls-certificates``, ``--tls-psk-file``, ``--tls-username``,
``--tls-hostname``, ``--no-tls-verify`` and ``--debug``. The output formats, text and
JSON, are described in the docstring of each subcommand's module: :mod:`.info`,
:mod:`.exports` (``list``), :mod:`.extents` (``map``).

Exit status: 0 success; 1 an error (one line ``pynbd: MESSAGE`` on stderr, no
traceback unless ``--debug``); 2 a usage error, or a ``--can``/``--is`` test that is
false; 130 interrupted (Ctrl-C).

To add a subcommand, write a module with ``register(sub)`` that calls
``sub.add_parser(NAME, parents=[common.connection_options()], ...)`` (if it connects)
and ``set_defaults(func=run)`` with ``run(args) -> int``, and add ``register`` to
:data:`SUBCOMMANDS`.

Every command imports every subcommand's module to build the parser, so whatever a
module imports at its top, every command pays for at start-up. At its top a subcommand's
module imports only :mod:`.common`, the client side that ``import pynbd`` loads anyway
(:mod:`pynbd.client`, :mod:`pynbd.copier`, :mod:`pynbd.transport`, :mod:`pynbd.errors`,
the client half of :mod:`pynbd.proto`) and light standard modules. What only its own
command needs is imported inside the functions that use it (``run`` and its helpers, or
an argument type such as ``serve --block-size``), with the names that annotations need
under ``TYPE_CHECKING``: the server (:mod:`pynbd.server`, ``pynbd.proto.server*``), the
kernel side (:mod:`pynbd.kernel`), and costly standard modules that no other command
needs, such as tempfile (with random and hashlib). So ``info``, ``list``, ``map`` and
``copy`` load neither the server nor the kernel side (tests/cli/test_startup.py checks
it).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from .. import __version__
from ..errors import NBDError, OptionError
from ..proto.constants import Rep
from . import copy as copy_cli
from . import demo, exports, extents, info, serve
from . import kernel as kernel_cli
from . import resize as resize_cli
from .common import CommandError, Subparsers

#: The ``register(sub)`` functions of the subcommands, in the order ``--help`` shows them.
SUBCOMMANDS: tuple[Callable[[Subparsers], None], ...] = (
    info.register,
    exports.register,
    extents.register,
    copy_cli.register,
    demo.register,
    serve.register,
    kernel_cli.register,
    resize_cli.register,
)

#: Options that take an optional value written ``--opt=VALUE``: bare, they get this value.
OPTIONAL_VALUES: dict[str, str] = {**info.OPTIONAL_VALUES, **copy_cli.OPTIONAL_VALUES}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``pynbd`` with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="pynbd",
        description="Network Block Device (NBD) tools.",
        epilog="Run 'pynbd COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"pynbd {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in SUBCOMMANDS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    Args:
        argv: the arguments without the program name (default ``sys.argv[1:]``).
    """
    parser = build_parser()
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(_fill_optional_values(args_list))
    except SystemExit as exc:  # --help, --version, usage errors
        return _code(exc.code)
    debug: bool = args.debug
    if debug:
        logging.basicConfig(level=logging.DEBUG, format="pynbd: %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except SystemExit as exc:  # parser.error() from a subcommand's own checks
        return _code(exc.code)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        return 130
    except BrokenPipeError:
        # The reader went away (pynbd map ... | head): not an error worth a message.
        _silence_stdout()
        return 1
    except (NBDError, OSError, CommandError) as exc:
        if debug:
            traceback.print_exc()
        _fail(_message(exc))
        return 1
    except Exception as exc:  # a bug: still one line, unless asked for the traceback
        if debug:
            traceback.print_exc()
        _fail(f"internal error: {type(exc).__name__}: {exc} (run with --debug for details)")
        return 1


def _fill_optional_values(argv: list[str]) -> list[str]:
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + argv[i:]
        out.append(f"{arg}={OPTIONAL_VALUES[arg]}" if arg in OPTIONAL_VALUES else arg)
    return out


def _message(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and not isinstance(exc, NBDError):
        # A bare socket error that the client did not translate: say what it means here.
        reason = exc.strerror or text
        if isinstance(exc, TimeoutError):
            text = f"timed out waiting for the server ({reason})"
        elif isinstance(exc, ConnectionError):
            text = f"connection lost: {reason}"
        else:
            text = reason + (f": {exc.filename}" if exc.filename else "")
    if isinstance(exc, OptionError):
        if exc.reply == Rep.ERR_TLS_REQD:
            text += " (the server requires TLS: use an nbds:// URI or --tls)"
        elif exc.reply == Rep.ERR_UNKNOWN:
            text += " (see the exports with: pynbd list URI)"
    return text


def _fail(message: str) -> None:
    message = " ".join(message.split())  # one line, whatever the message holds
    sys.stderr.write(f"pynbd: {message}\n")
    sys.stderr.flush()


def _code(code: object) -> int:
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


def _silence_stdout() -> None:
    # Python would report the broken pipe again when it flushes stdout at exit.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


__all__ = ["SUBCOMMANDS", "build_parser", "main"]
