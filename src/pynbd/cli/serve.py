"""``pynbd serve``: serve a file, a block device, memory, an overlay or a Python backend.

::

    pynbd serve FILE --unix /tmp/nbd.sock               # a file or block device
    pynbd serve --memory 1G --tcp 127.0.0.1:10809       # a sparse RAM disk
    pynbd serve --python mymod:Device size=1G --tcp :10809   # your own backend
    pynbd serve --export a=file:a.img --export b=overlay:golden.img --unix S
    pynbd serve --inetd --memory 64M                    # one connection on stdin/stdout

What to serve. One unnamed backend — ``FILE``, ``--memory SIZE`` or ``--python
MODULE:NAME [KEY=VALUE...]`` — is the export named "" (the default). ``--export
NAME=SPEC`` (repeatable) adds named exports, where SPEC is:

- ``memory:SIZE``: a sparse RAM disk (SIZE as ``64M``, ``1G``, ``4096``, powers of 1024);
- ``file:PATH``: a file or block device;
- ``overlay:PATH`` or ``overlay:SPEC``: copy-on-write over the file (opened
  read-only) or over another SPEC; writes go to memory, or to a temporary file in
  ``--overlay-dir DIR``, and are lost at exit;
- ``python:MODULE:NAME[,KEY=VALUE...]`` or ``python:FILE.py:NAME[,KEY=VALUE...]``: a
  backend of your own (see :mod:`pynbd.server.backend`); values are passed as strings.

Without an unnamed backend, the first ``--export`` is also the default export unless
``--default-export NAME`` names another. ``--description NAME=TEXT`` (or just TEXT
when there is one export) describes an export; ``--read-only`` and ``--block-size
MIN,PREF,MAX`` apply to every export.

Where. ``--tcp HOST:PORT`` (``[::1]:10809``, ``:10809`` for every interface; port 0
lets the kernel choose, and the chosen port is printed on stdout) and ``--unix PATH``
(both repeatable); ``--inetd`` serves the one connection on standard input; sockets
from systemd socket activation (``LISTEN_PID``/``LISTEN_FDS``, as ``nbdinfo -- [ CMD
]`` passes them) are used whenever they are present, and ``--socket-activation``
insists on them. Once listening, ``--ready-fd FD`` gets the server's URIs, one per
line, and is closed (with ``--inetd``, closed empty); ``--pid-file FILE`` gets the pid
(removed at exit).

TLS. ``--tls-certificates DIR`` (server-cert.pem, server-key.pem, ca-cert.pem: nbdkit's
layout) or ``--tls-psk-file FILE`` (``user:hexkey`` lines; needs Python 3.13) turn TLS
on, required by default: ``--tls require|optional|off``. ``--tls-verify-peer`` demands
a client certificate signed by ca-cert.pem.

Once a plain (not TLS) connection has chosen an export whose backend takes calls from
several threads (memory, files, block devices), its requests are served from a thread
of its own (an idle connection gives its thread up); ``--no-connection-threads`` keeps
every connection in the event loop.

Limits (see :class:`pynbd.server.Limits`): ``--max-connections N`` (1024; the next
connection is refused with NBD_REP_ERR_SHUTDOWN "too many connections");
``--handshake-timeout S`` (30; 0: none); ``--idle-timeout S`` (off; a connection in
transmission with nothing in flight, nothing received and nothing sent for S seconds
is closed); per connection, ``--max-in-flight N`` (64 requests) and
``--max-in-flight-bytes SIZE`` (32M), beyond which it is not read until requests
complete; per handshake, ``--max-options N`` (32) and ``--max-option-length SIZE``
(64K). At start the server raises its soft descriptor limit (RLIMIT_NOFILE) to the
hard one, and takes no more connections than that allows.

Each connection is logged on stderr when it ends: the peer, the export, what was
negotiated, requests and bytes. SIGINT or SIGTERM stops the server: requests under way
finish and are answered, then it exits with status 0 (a second signal aborts them).
Exit status 1: the server could not start (a file that cannot be opened, a port in
use, bad TLS credentials...); 2: a bad argument. Either way, one line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import resource
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

from .common import CommandError, Subparsers, parse_size

# pynbd.server (and the server half of pynbd.proto), and asyncio, are imported by the
# functions that use them: building the parser of every command must not (see pynbd.cli).
if TYPE_CHECKING:
    import asyncio

    from ..proto.server_common import TLSPolicy
    from ..server import Export, FileBackend, Limits, Server
    from ..server.backend import AnyBackend
    from ..server.tls import ServerTLSConfig

log = logging.getLogger("pynbd.server")

#: Seconds in-flight requests get to finish after SIGINT/SIGTERM.
GRACE = 10.0
_KINDS = ("memory", "file", "overlay", "python")
NOTHING = "nothing to serve: give FILE, --memory SIZE, --python MODULE:NAME or --export NAME=SPEC"
#: --tls: the TLSPolicy member of each mode.
_TLS_MODES = {"require": "REQUIRED", "optional": "OPTIONAL", "off": "NONE"}


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (the usage of serve is long), unknown options included."""

    def error(self, message: str) -> NoReturn:
        _usage(message)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extra = super().parse_known_args(args, namespace)
        if extra:
            self.error("unrecognized arguments: " + " ".join(extra))
        return parsed, extra


def _usage(message: str) -> NoReturn:
    sys.stderr.write(f"pynbd serve: error: {message} (see pynbd serve --help)\n")
    sys.stderr.flush()
    raise SystemExit(2)


def _positive_int(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def _positive_size(text: str) -> int:
    value = parse_size(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte: {text!r}")
    return value


def _fd(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a file descriptor: {text!r}") from None
    try:
        os.fstat(value)
    except (OSError, OverflowError):
        raise argparse.ArgumentTypeError(f"file descriptor {text} is not open") from None
    return value


def _seconds(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"not a valid number of seconds: {text!r}")
    return value or None


_TCP_RE = re.compile(r"(?:\[(?P<v6>[^\]]*)\]|(?P<host>[^:\[\]]*)):(?P<port>\d+)")


def parse_tcp(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPV6]:PORT`` or ``:PORT`` (every interface) for argparse."""
    m = _TCP_RE.fullmatch(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not HOST:PORT or [IPV6]:PORT: {text!r}")
    port = int(m.group("port"))
    if port > 65535:
        raise argparse.ArgumentTypeError(f"port out of range: {text!r}")
    return (m.group("v6") if m.group("v6") is not None else m.group("host")), port


def parse_block_sizes(text: str) -> tuple[int, int, int]:
    """``MIN,PREF,MAX`` (sizes as for --memory) for argparse."""
    from ..proto.server_common import check_block_sizes

    parts = text.split(",")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"not MIN,PREF,MAX: {text!r}")
    sizes = (parse_size(parts[0]), parse_size(parts[1]), parse_size(parts[2]))
    try:
        check_block_sizes(*sizes)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return sizes


def register(sub: Subparsers) -> None:
    doc = __doc__ or ""
    p = sub.add_parser(
        "serve",
        help="serve a file, a block device, memory or a Python backend over NBD",
        description=re.sub(r":\w+:`([^`]*)`|``", r"\1", doc[doc.index("What to serve.") :]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="pynbd serve [FILE | --memory SIZE | --python MODULE:NAME [KEY=VALUE...]] "
        "[--export NAME=SPEC...] [--tcp HOST:PORT | --unix PATH | --inetd] [OPTIONS]",
    )
    p.__class__ = _Parser  # one-line usage errors (see _Parser)
    p.add_argument("args", nargs="*", metavar="FILE | KEY=VALUE", help=argparse.SUPPRESS)
    g = p.add_argument_group("exports")
    g.add_argument("--memory", metavar="SIZE", type=parse_size, help="a sparse RAM disk")
    g.add_argument("--python", metavar="MODULE:NAME", help="a backend of your own")
    g.add_argument("--export", metavar="NAME=SPEC", action="append", default=[])
    g.add_argument("--description", metavar="NAME=TEXT", action="append", default=[])
    g.add_argument("--default-export", metavar="NAME", help="what the empty name selects")
    g.add_argument("--read-only", action="store_true", help="refuse writes to every export")
    g.add_argument("--overlay-dir", metavar="DIR", help="keep overlays in files here")
    g.add_argument("--block-size", metavar="MIN,PREF,MAX", type=parse_block_sizes)
    g = p.add_argument_group("listening")
    g.add_argument("--tcp", metavar="HOST:PORT", type=parse_tcp, action="append", default=[])
    g.add_argument("--unix", metavar="PATH", action="append", default=[])
    g.add_argument("--inetd", action="store_true", help="serve one connection on stdin")
    g.add_argument("--socket-activation", action="store_true", help="require LISTEN_FDS")
    g.add_argument("--ready-fd", metavar="FD", type=_fd, help="write URIs here when ready")
    g.add_argument("--pid-file", metavar="FILE", help="write the pid here when ready")
    g = p.add_argument_group("TLS")
    g.add_argument("--tls", choices=sorted(_TLS_MODES), help="default: require with keys")
    g.add_argument("--tls-certificates", metavar="DIR")
    g.add_argument("--tls-psk-file", metavar="FILE")
    g.add_argument("--tls-verify-peer", action="store_true")
    g = p.add_argument_group("protocol and limits")
    g.add_argument("--no-structured-replies", action="store_true", help="(and no ext. headers)")
    g.add_argument("--no-extended-headers", action="store_true")
    g.add_argument("--max-connections", metavar="N", type=_positive_int, default=1024)
    g.add_argument("--handshake-timeout", metavar="S", type=_seconds, default=30.0)
    g.add_argument("--idle-timeout", metavar="S", type=_seconds, help="default: none")
    g.add_argument("--max-in-flight", metavar="N", type=_positive_int, default=64)
    g.add_argument("--max-in-flight-bytes", metavar="SIZE", type=_positive_size, default="32M")
    g.add_argument("--max-options", metavar="N", type=_positive_int, default=32)
    g.add_argument("--max-option-length", metavar="SIZE", type=_positive_size, default="64K")
    g.add_argument("--threads", metavar="N", type=_positive_int, help="for blocking backends")
    g.add_argument(
        "--no-connection-threads",
        action="store_true",
        help="serve every connection in the event loop (not one thread each)",
    )
    g.add_argument("--quiet", "-q", action="store_true", help="log only warnings and errors")
    g.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    p.set_defaults(func=run)


# --- Building the exports ---------------------------------------------------------------


@dataclass
class _Built:
    exports: dict[str, Export] = field(default_factory=dict)
    default: str | None = None
    backends: list[AnyBackend] = field(default_factory=list)  # closed at exit


def _open_file(path: str, read_only: bool) -> FileBackend:
    from ..server import FileBackend

    try:
        return FileBackend(path, read_only=read_only)
    except OSError as exc:
        raise CommandError(f"cannot open {path}: {exc.strerror or exc}") from exc


def _backend(spec: str, args: argparse.Namespace, built: _Built) -> AnyBackend:
    """A backend for SPEC (see the module docstring)."""
    from ..server import Backend, MemoryBackend, OverlayBackend

    kind, colon, rest = spec.partition(":")
    if not colon or kind not in _KINDS:
        _usage(f"{spec!r} is not memory:SIZE, file:PATH, overlay:PATH or python:MODULE:NAME")
    if not rest:
        _usage(f"{spec!r} says nothing after {kind}:")
    backend: AnyBackend
    if kind == "memory":
        try:
            size = parse_size(rest)
        except argparse.ArgumentTypeError as exc:
            _usage(str(exc))
        backend = MemoryBackend(size, read_only=args.read_only)
    elif kind == "file":
        backend = _open_file(rest, args.read_only)
    elif kind == "overlay":
        if ":" in rest and rest.partition(":")[0] in _KINDS:
            base = _backend(rest, args, built)  # overlay:SPEC (kept in built.backends)
        else:
            base = _open_file(rest, True)
            built.backends.append(base)
        if not isinstance(base, Backend):
            raise CommandError(f"{spec}: an overlay needs a blocking backend, not an async one")
        try:
            backend = OverlayBackend(base, directory=args.overlay_dir)
        except OSError as exc:
            raise CommandError(f"cannot make an overlay in {args.overlay_dir}: {exc}") from exc
    else:
        target, _, extra = rest.partition(",")
        backend = _python(target, extra.split(",") if extra else [])
    built.backends.append(backend)
    return backend


def _python(target: str, arguments: list[str]) -> AnyBackend:
    from ..server.user import load_backend, parse_arguments

    try:
        kwargs = parse_arguments(arguments)
    except ValueError as exc:
        _usage(str(exc))
    try:
        return load_backend(target, kwargs)
    except ValueError as exc:
        raise CommandError(str(exc)) from exc


def build_exports(args: argparse.Namespace) -> _Built:
    """The exports the arguments describe; usage errors exit with status 2."""
    built = _Built()
    try:
        _build(args, built)
    except BaseException:
        _close_all(built.backends)
        raise
    return built


def _build(args: argparse.Namespace, built: _Built) -> None:
    from ..server import Export, MemoryBackend

    positional: list[str] = args.args
    unnamed: list[str] = []
    if args.python is not None:
        unnamed.append("--python")
    elif positional:
        unnamed.append("FILE")
        if len(positional) > 1:
            _usage(f"one FILE at most (KEY=VALUE goes with --python): {' '.join(positional)}")
    if args.memory is not None:
        unnamed.append("--memory")
    if len(unnamed) > 1:
        _usage(f"{' and '.join(unnamed)} both make the default export: name them with --export")
    named: list[tuple[str, str]] = []
    for item in args.export:
        name, eq, spec = item.partition("=")
        if not eq:
            _usage(f"--export {item!r} is not NAME=SPEC")
        if any(name == n for n, _ in named) or (unnamed and name == ""):
            _usage(f"export {name!r} is given twice")
        named.append((name, spec))
    if not unnamed and not named:
        _usage(NOTHING)

    backends: dict[str, AnyBackend] = {}
    if args.python is not None:
        backends[""] = _python(args.python, positional)
        built.backends.append(backends[""])
    elif positional:
        backends[""] = _open_file(positional[0], args.read_only)
        built.backends.append(backends[""])
    elif args.memory is not None:
        backends[""] = MemoryBackend(args.memory, read_only=args.read_only)
        built.backends.append(backends[""])
    for name, spec in named:
        backends[name] = _backend(spec, args, built)

    descriptions = _descriptions(args.description, list(backends))
    for name, backend in backends.items():
        export = Export(
            backend,
            description=descriptions.get(name, ""),
            read_only=args.read_only,
            block_sizes=args.block_size,
        )
        try:
            export.spec(name)
        except ValueError as exc:
            _usage(f"export {name!r}: {exc}")
        built.exports[name] = export
    if args.default_export is not None:
        if args.default_export not in backends:
            _usage(f"--default-export {args.default_export!r} is not an export")
        built.default = args.default_export
    elif "" not in backends:
        built.default = named[0][0]


def _descriptions(items: list[str], names: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, eq, text = item.partition("=")
        if eq and name in names:
            out[name] = text
        elif len(names) == 1:
            out[names[0]] = item
        else:
            _usage(f"--description {item!r} is not NAME=TEXT for an export")
    return out


def _close_all(backends: list[AnyBackend]) -> None:
    for backend in reversed(backends):
        with contextlib.suppress(Exception):
            backend.close()


# --- TLS and listening ------------------------------------------------------------------


def tls_settings(args: argparse.Namespace) -> tuple[ServerTLSConfig | None, TLSPolicy]:
    """The TLS credentials and mode the arguments ask for; usage errors exit 2."""
    from ..proto.server_common import TLSPolicy
    from ..server.tls import ServerTLSConfig

    certs, psk = args.tls_certificates, args.tls_psk_file
    if certs is not None and psk is not None:
        _usage("give --tls-certificates or --tls-psk-file, not both")
    if args.tls_verify_peer and certs is None:
        _usage("--tls-verify-peer needs --tls-certificates DIR (with ca-cert.pem)")
    have = certs is not None or psk is not None
    mode = (
        TLSPolicy[_TLS_MODES[args.tls]]
        if args.tls
        else (TLSPolicy.REQUIRED if have else TLSPolicy.NONE)
    )
    if mode is TLSPolicy.NONE:
        if have:
            _usage("--tls off contradicts --tls-certificates/--tls-psk-file")
        return None, mode
    if not have:
        _usage(f"--tls {args.tls} needs --tls-certificates DIR or --tls-psk-file FILE")
    cfg = ServerTLSConfig(certificates=certs, verify_peer=args.tls_verify_peer, psk_file=psk)
    return cfg, mode


def _uri(address: Any, tls: bool) -> str:
    scheme = "nbds" if tls else "nbd"
    if isinstance(address, tuple):
        host = str(address[0])
        host = f"[{host}]" if ":" in host else host
        return f"{scheme}://{host}:{address[1]}/"
    path = address.decode() if isinstance(address, bytes) else str(address)
    return f"{scheme}+unix:///?socket={path}"


def _write_pid_file(path: str | None) -> bool:
    """Write our pid to ``path`` (atomically, mode 0644); False when there is no pid file.

    The pid goes to a new file of an unguessable name (``mkstemp``: ``O_EXCL`` and
    ``O_NOFOLLOW``), which is then renamed over ``path``: a symlink planted at either
    name is replaced, never followed (a pid file's directory may be shared, such as
    /run or /tmp, and the server may run as root).
    """
    import tempfile  # here: it brings random and hashlib, which no other command needs

    if path is None:
        return False
    directory, name = os.path.split(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory or ".")
    except OSError as exc:
        raise CommandError(f"cannot write the pid file {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o644)
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise CommandError(f"cannot write the pid file {path}: {exc.strerror or exc}") from exc
    return True


def _remove_pid_file(path: str) -> None:
    """Remove the pid file if it still holds our pid (a symlink there is not followed)."""
    with contextlib.suppress(OSError, ValueError):
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            if int(f.read(32).strip()) != os.getpid():
                return
        os.unlink(path)


# --- Running ----------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from ..server.activation import socket_activated

    if not (args.args or args.memory is not None or args.python or args.export):
        _usage(NOTHING)
    if args.inetd and (args.tcp or args.unix or args.socket_activation):
        _usage("--inetd serves standard input: it excludes --tcp, --unix and socket activation")
    activated = not args.inetd and socket_activated()
    if args.socket_activation and not activated:
        raise CommandError("--socket-activation: LISTEN_PID/LISTEN_FDS do not name this process")
    if not (args.tcp or args.unix or args.inetd or activated):
        _usage(
            "nowhere to listen: give --tcp HOST:PORT (NBD's port is 10809), --unix PATH or --inetd"
        )
    tls, mode = tls_settings(args)
    if args.pid_file is not None and not os.path.isdir(os.path.dirname(args.pid_file) or "."):
        raise CommandError(f"cannot write the pid file {args.pid_file}: no such directory")
    _setup_logging(args.quiet)
    _raise_descriptor_limit()
    built = build_exports(args)
    import asyncio

    try:
        return asyncio.run(_serve(args, built, tls, mode, activated))
    finally:
        _close_all(built.backends)


def _raise_descriptor_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit: each connection takes a
    descriptor or two, and the usual soft limit of 1024 would cap the default
    ``--max-connections 1024`` (the server takes no more than the limit allows)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _setup_logging(quiet: bool) -> None:
    logger = logging.getLogger("pynbd")
    if logging.getLogger().handlers or logger.handlers:
        return  # --debug configured logging already
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("pynbd: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


async def _serve(
    args: argparse.Namespace,
    built: _Built,
    tls: ServerTLSConfig | None,
    mode: TLSPolicy,
    activated: bool,
) -> int:
    from ..server import Server

    no_sr = bool(args.no_structured_replies)
    server = Server(
        built.exports,
        default_export=built.default,
        structured_replies=not no_sr,
        extended_headers=not (no_sr or args.no_extended_headers),
        limits=limits_from(args),
        tls=tls,
        tls_mode=mode,
    )
    import asyncio

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: signal.Signals) -> None:
        if stop.is_set():  # a second signal: do not wait for requests under way
            for session in [*server.sessions, *server.refusing]:
                session.abort(f"{signum.name} again")
            return
        log.info("%s: finishing the requests under way, then exiting", signum.name)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    pid_written = False
    try:
        if args.inetd:
            sock = _inetd_socket(args.ready_fd)
            pid_written = _write_pid_file(args.pid_file)
            await _serve_inetd(server, sock, stop)
        else:
            uris, chosen = await _listen(server, args, activated)
            # The pid file first: whoever waits for the ready fd may read it at once.
            pid_written = _write_pid_file(args.pid_file)
            _announce(server, args, uris, chosen)
            await stop.wait()
        return 0
    finally:
        try:
            # Still under our signal handlers: a second signal aborts what is left.
            await server.close(GRACE)
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
            if pid_written:
                _remove_pid_file(args.pid_file)


def limits_from(args: argparse.Namespace) -> Limits:
    """The server's limits the arguments set (see :class:`pynbd.server.Limits`)."""
    from ..server import Limits

    return Limits(
        handshake_timeout=args.handshake_timeout,
        idle_timeout=args.idle_timeout,
        max_connections=args.max_connections,
        max_in_flight=args.max_in_flight,
        max_in_flight_bytes=args.max_in_flight_bytes,
        max_options=args.max_options,
        max_option_length=args.max_option_length,
        threads=args.threads,
        connection_threads=not args.no_connection_threads,
    )


def _inetd_socket(ready_fd: int | None) -> socket.socket:
    from ..server.activation import inetd_socket

    try:
        sock = inetd_socket()
    except ValueError as exc:
        raise CommandError(f"--inetd: {exc}") from exc
    if ready_fd is not None:  # nothing listens: the connection is already there
        with contextlib.suppress(OSError):
            os.close(ready_fd)
    return sock


async def _serve_inetd(server: Server, sock: socket.socket, stop: asyncio.Event) -> None:
    import asyncio

    serving = asyncio.ensure_future(server.serve_socket(sock))
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not serving.done():
            await server.close(GRACE)
            await serving
    finally:
        stopping.cancel()


async def _listen(
    server: Server, args: argparse.Namespace, activated: bool
) -> tuple[list[str], list[int]]:
    """Start every listener; returns their URIs and the ports the kernel chose."""
    from ..server.activation import listen_fds

    tls = server.tls_context is not None
    uris: list[str] = []
    chosen: list[int] = []
    for host, port in args.tcp:
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            bound = await server.start(tcp=(host, port))
        except OSError as exc:
            raise CommandError(f"cannot listen on {shown}: {_reason(exc)}") from exc
        uris += [_uri(a, tls) for a in bound]
        if port == 0:
            chosen += [a[1] for a in bound]
    for path in args.unix:
        try:
            bound = await server.start(unix=path)
        except OSError as exc:
            raise CommandError(f"cannot listen on unix socket {path}: {_reason(exc)}") from exc
        uris += [_uri(a, tls) for a in bound]
    if activated:
        try:
            sockets = listen_fds()
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        if not sockets:
            raise CommandError("socket activation passed no sockets (LISTEN_FDS=0)")
        uris += [_uri(a, tls) for a in await server.start(sockets=sockets)]
    return uris, chosen


def _announce(server: Server, args: argparse.Namespace, uris: list[str], chosen: list[int]) -> None:
    """Tell the world the server listens: ports on stdout, a log line, the ready fd."""
    for port in chosen:  # port 0: tell the caller which one the kernel picked
        print(port, flush=True)
    names = ", ".join(repr(n) for n in server.exports)
    log.info("serving %s on %s", names, ", ".join(uris))
    if args.ready_fd is not None:
        with contextlib.suppress(OSError):
            os.write(args.ready_fd, "".join(u + "\n" for u in uris).encode())
        with contextlib.suppress(OSError):
            os.close(args.ready_fd)


def _reason(exc: OSError) -> str:
    text = exc.strerror or str(exc)
    # asyncio words bind errors as "error while attempting to bind on address (...): why",
    # and from 3.13 "why" starts with "[errno N] ".
    return _ERRNO_PREFIX.sub("", text.rsplit("): ", 1)[-1])


_ERRNO_PREFIX = re.compile(r"^\[errno \d+\] ", re.IGNORECASE)


__all__ = [
    "build_exports",
    "limits_from",
    "parse_block_sizes",
    "parse_tcp",
    "register",
    "run",
    "tls_settings",
]
