"""NBD clients: :class:`Client` (blocking) and :class:`AsyncClient` (asyncio)."""

from __future__ import annotations

from .base import DEFAULT, MappedExtent
from .sync import Client, connect_multi

__all__ = ["DEFAULT", "Client", "MappedExtent", "connect_multi"]
