"""The NBD server: backends and an asyncio server, with blocking entry points.

::

    from pynbd.server import MemoryBackend, serve
    serve(MemoryBackend(1 << 30), unix="/tmp/nbd.sock")   # until SIGINT/SIGTERM

- :func:`serve`: serve exports on TCP and/or a unix socket until interrupted.
- :func:`serve_socket`: serve one connected socket (one end of a socketpair) until the
  client disconnects; blocks the calling thread, which may be any thread.
- :mod:`.aio`: the asyncio :class:`~pynbd.server.aio.Server` and its coroutines;
  :mod:`.session`: one connection in the event loop; :mod:`.conn_thread`: one served
  from a thread of its own.
- :mod:`.backend`: :class:`Backend`, :class:`AsyncBackend`, :class:`Capabilities` (what
  a backend can do: its features, and whether its calls block (:class:`Blocking`), may
  overlap, or lend its memory), :class:`Export`, the errno table, and how to write a
  backend of your own.
- :mod:`.policy`: how the server runs requests, decided per connection from the
  capabilities (:class:`Limits` holds its options); :mod:`.runner` runs them and
  :mod:`.responder` answers them, for the event loop and the connection threads alike.
- Backends: :mod:`.memory` (:class:`MemoryBackend`), :mod:`.file`
  (:class:`FileBackend`), :mod:`.overlay` (:class:`OverlayBackend`, copy-on-write over
  any backend); :mod:`.user` loads a user's backend by name (:func:`load_backend`).
- :mod:`.tls`: :class:`ServerTLSConfig` (X.509 or PSK credentials); TLS is required
  or optional per :class:`~pynbd.proto.server.TLSPolicy` (``Server(tls_mode=...)``).
- :mod:`.activation`: sockets from systemd socket activation or inetd.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any

from ..proto.server import TLSPolicy
from .aio import Exports, Server
from .aio import serve_socket as _serve_socket_async
from .backend import (
    ERRNO_TO_NBD,
    AsyncBackend,
    Backend,
    Blocking,
    Capabilities,
    Export,
    Support,
    errno_to_nbd,
)
from .file import FileBackend
from .memory import MemoryBackend
from .overlay import OverlayBackend
from .policy import Limits
from .tls import ServerTLSConfig
from .user import load_backend

__all__ = [
    "ERRNO_TO_NBD",
    "AsyncBackend",
    "Backend",
    "Blocking",
    "Capabilities",
    "Export",
    "FileBackend",
    "Limits",
    "MemoryBackend",
    "OverlayBackend",
    "Server",
    "ServerTLSConfig",
    "Support",
    "TLSPolicy",
    "errno_to_nbd",
    "load_backend",
    "serve",
    "serve_socket",
]


def serve(
    exports: Exports,
    *,
    tcp: tuple[str, int] | None = None,
    unix: str | os.PathLike[str] | None = None,
    sockets: Iterable[socket.socket] = (),
    ready: Callable[[Server], None] | None = None,
    grace: float = 10.0,
    **options: Any,
) -> None:
    """Serve ``exports`` until SIGINT or SIGTERM (or KeyboardInterrupt), then shut down
    cleanly: in-flight requests finish within ``grace`` seconds.

    Args:
        exports: a backend or :class:`Export` (the default export ""), or a mapping
            name -> backend or Export.
        tcp: ``(host, port)`` to listen on (port 0: the kernel picks).
        unix: a unix socket path to listen on.
        sockets: listening sockets to accept on (see :mod:`.activation`).
        ready: called with the :class:`Server` once it listens (to learn its
            addresses, or to tell a supervisor).
        grace: seconds given to in-flight requests at shutdown.
        options: :class:`Server` keyword arguments (default_export, limits, tls, ...).

    Raises:
        ValueError: no tcp, unix or sockets given, or bad exports.
        OSError: an address cannot be bound.
        TLSError: the TLS credentials cannot be loaded.
    """
    sockets = list(sockets)
    if tcp is None and unix is None and not sockets:
        raise ValueError("give tcp=(host, port), unix=PATH and/or sockets")

    async def main() -> None:
        server = Server(exports, **options)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        handled: list[signal.Signals] = []
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, stop.set)
                handled.append(signum)
        try:
            await server.start(tcp=tcp, unix=unix, sockets=sockets)
            if ready is not None:
                ready(server)
            await stop.wait()
        finally:
            for signum in handled:
                loop.remove_signal_handler(signum)
            await server.close(grace)

    # Outside the main thread there are no signal handlers; Ctrl-C ends the loop.
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


def serve_socket(sock: socket.socket, exports: Exports, **options: Any) -> None:
    """Serve one connected stream socket until the client disconnects (blocking).

    Runs a private event loop in the calling thread; the socket is closed at the end.
    ``options`` are :class:`Server` keyword arguments.
    """
    asyncio.run(_serve_socket_async(sock, exports, **options))
