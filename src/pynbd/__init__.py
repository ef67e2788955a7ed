"""pynbd: the Network Block Device protocol in Python.

The blocking :class:`Client` and the asyncio :class:`AsyncClient` speak the whole
protocol to any NBD server; :func:`copy` (and :func:`copy_async`) copies between
exports, files and streams (:mod:`pynbd.copier`); :mod:`pynbd.proto` is the sans-IO
core they share; :mod:`pynbd.errors` holds the exception tree.
"""

from __future__ import annotations

from . import errors
from .client import AsyncClient, Client, MappedExtent, connect_multi, connect_multi_async
from .copier import CopyError, CopyInterrupted, CopyResult, copy, copy_async
from .errors import NBDError
from .transport.tls import TLSConfig
from .transport.uri import NBDURI, parse_uri

__version__ = "0.1.0"

__all__ = [
    "NBDURI",
    "AsyncClient",
    "Client",
    "CopyError",
    "CopyInterrupted",
    "CopyResult",
    "MappedExtent",
    "NBDError",
    "TLSConfig",
    "__version__",
    "connect_multi",
    "connect_multi_async",
    "copy",
    "copy_async",
    "errors",
    "parse_uri",
]
