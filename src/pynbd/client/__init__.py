"""NBD clients: :class:`Client` (blocking) and :class:`AsyncClient` (asyncio), and the
connections they are built on.

A :class:`Connection` (blocking) or :class:`AsyncConnection` (asyncio) opens the stream
and negotiates; :class:`Negotiated` is what negotiation settled. Code that needs the
negotiated socket itself (the kernel side) or only negotiation (listing exports)
uses them directly; everything else uses the clients. :class:`ClientLimits` bounds what
a server may make a client hold (``limits=`` of both clients; the defaults elsewhere).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..proto.handshake import Negotiated
from ..proto.limits import ClientLimits
from ..proto.records import ServerEntry
from .base import DEFAULT, DEFAULT_TIMEOUT, ConnectOptions, MappedExtent, Target, resolve
from .connection import Connection, Deadline, negotiate
from .sync import Client, connect_multi

if TYPE_CHECKING:
    from .aio import AsyncClient, connect_multi_async
    from .aio_connection import AsyncConnection, negotiate_async

#: The asyncio names, imported on first use: asyncio costs a blocking program (a copy,
#: the kernel side) a third of its start-up.
_ASYNC = {
    "AsyncClient": "aio",
    "connect_multi_async": "aio",
    "AsyncConnection": "aio_connection",
    "negotiate_async": "aio_connection",
}


def __getattr__(name: str) -> Any:
    module = _ASYNC.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT",
    "DEFAULT_TIMEOUT",
    "AsyncClient",
    "AsyncConnection",
    "Client",
    "ClientLimits",
    "ConnectOptions",
    "Connection",
    "Deadline",
    "MappedExtent",
    "Negotiated",
    "ServerEntry",
    "Target",
    "connect_multi",
    "connect_multi_async",
    "negotiate",
    "negotiate_async",
    "resolve",
]
