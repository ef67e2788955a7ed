"""Negotiating for the kernel: what the nbd driver can use, on a socket it can take.

The driver reads simple replies only and never asks for block status, so a
connection meant for it negotiates GO (or EXPORT_NAME) without structured replies,
extended headers or meta contexts, and is handed over in transmission with nothing
buffered (:meth:`~pynbd.client.connection.Connection.release`). :mod:`.attach` dials
plain servers with it and :mod:`.relay` TLS servers.
"""

from __future__ import annotations

import socket

from ..client import Connection, ConnectOptions, Negotiated, Target
from ..errors import InvalidRequest
from ..transport.tls import TLSConfig


def kernel_options(export_name: str, tls: TLSConfig | None = None) -> ConnectOptions:
    """The options of a connection for the nbd driver, to ``export_name`` (over
    ``tls`` when given: then it is required)."""
    return ConnectOptions(
        export_name=export_name,
        tls=tls,
        structured_replies=False,
        extended_headers=False,
        meta_contexts=(),
        request_block_size=True,
    )


def negotiate_for_kernel(
    sock: socket.socket, target: Target, export_name: str, timeout: float
) -> tuple[socket.socket, Negotiated]:
    """Negotiate on ``sock`` (connected, not yet spoken on) as the kernel needs it;
    return the socket to hand to the driver (a TLS socket when ``target.tls`` is set)
    and what was negotiated.

    Raises:
        ConnectionClosed, NBDTimeout, TLSError, OptionError, ExportNotFound,
        ProtocolError: as :meth:`Connection.open` and :meth:`Connection.release`.
        InvalidRequest: the export's size is 0. The socket is closed on any error.
    """
    conn = Connection.open(
        target, kernel_options(export_name, target.tls), sock=sock, timeout=timeout
    )
    out = conn.release()
    if not conn.negotiated.size:
        out.close()
        raise InvalidRequest("the export's size is 0: nothing to attach")
    return out, conn.negotiated


__all__ = ["kernel_options", "negotiate_for_kernel"]
