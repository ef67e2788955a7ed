"""Byte streams for NBD: URIs, TCP and unix sockets, and TLS.

This package opens connections and wraps them in TLS; it never speaks NBD (the protocol
core in :mod:`pynbd.proto` decides when STARTTLS happens).

- :mod:`.uri`: :func:`parse_uri`, :func:`format_uri`, :class:`NBDURI`.
- :mod:`.connect`: :func:`open_stream`.
- :mod:`.tls`: :class:`TLSConfig`, :func:`make_client_context`, :func:`wrap_socket`,
  :func:`start_client_tls`.
"""

from __future__ import annotations

from .connect import open_stream
from .tls import (
    TLSConfig,
    default_tls_username,
    make_client_context,
    read_psk_key,
    start_client_tls,
    tls_error,
    wrap_socket,
)
from .uri import DEFAULT_PORT, NBDURI, SCHEMES, format_uri, parse_uri

__all__ = [
    "DEFAULT_PORT",
    "NBDURI",
    "SCHEMES",
    "TLSConfig",
    "default_tls_username",
    "format_uri",
    "make_client_context",
    "open_stream",
    "parse_uri",
    "read_psk_key",
    "start_client_tls",
    "tls_error",
    "wrap_socket",
]
