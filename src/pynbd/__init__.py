"""pynbd: the Network Block Device protocol in Python.

The blocking :class:`Client` and the asyncio :class:`AsyncClient` speak the whole
protocol to any NBD server; :func:`copy` (and :func:`copy_async`) copies between
exports, files and streams (:mod:`pynbd.copier`); :mod:`pynbd.proto` is the sans-IO
core they share; :mod:`pynbd.errors` holds the exception tree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import errors
from .client import Client, MappedExtent, connect_multi
from .copier import CopyError, CopyInterrupted, CopyResult, copy, copy_async
from .errors import NBDError
from .transport.tls import TLSConfig
from .transport.uri import NBDURI, parse_uri

if TYPE_CHECKING:
    from .client import AsyncClient, connect_multi_async


def __getattr__(name: str) -> Any:
    # The asyncio client is imported on first use (see pynbd.client).
    if name in ("AsyncClient", "connect_multi_async"):
        from . import client

        value = getattr(client, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
