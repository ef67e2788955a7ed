"""pynbd: the Network Block Device protocol in Python.

The blocking :class:`Client` and the asyncio :class:`AsyncClient` speak the whole
protocol to any NBD server; :mod:`pynbd.proto` is the sans-IO core they share;
:mod:`pynbd.errors` holds the exception tree.
"""

from __future__ import annotations

from . import errors
from .client import AsyncClient, Client, MappedExtent, connect_multi, connect_multi_async
from .errors import NBDError
from .transport.tls import TLSConfig
from .transport.uri import NBDURI, parse_uri

__version__ = "0.1.0"

__all__ = [
    "NBDURI",
    "AsyncClient",
    "Client",
    "MappedExtent",
    "NBDError",
    "TLSConfig",
    "__version__",
    "connect_multi",
    "connect_multi_async",
    "errors",
    "parse_uri",
]
