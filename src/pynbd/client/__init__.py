"""NBD clients: :class:`Client` (blocking) and :class:`AsyncClient` (asyncio)."""

from __future__ import annotations

from .aio import AsyncClient, connect_multi_async
from .base import DEFAULT, MappedExtent
from .sync import Client, connect_multi

__all__ = [
    "DEFAULT",
    "AsyncClient",
    "Client",
    "MappedExtent",
    "connect_multi",
    "connect_multi_async",
]
