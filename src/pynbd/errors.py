"""Exceptions raised by pynbd.

Every exception that pynbd raises on purpose derives from :class:`NBDError`. Each class
says, in its ``fatal`` attribute, whether the connection survives it: after a fatal error
the connection is closed and every further call raises :class:`ConnectionClosed`.

::

    NBDError
    ├── ProtocolError            fatal: the peer broke the protocol (bad magic, lying
    │                            lengths, unknown chunk, unexpected cookie, ...)
    ├── ConnectionClosed         fatal: the peer closed the connection, or we did
    ├── NBDTimeout               fatal: a call did not finish within its timeout
    ├── TLSError                 fatal: TLS could not be set up or failed
    ├── OptionError              not fatal: the server refused an option during
    │   │                        negotiation (``reply`` holds the NBD_REP_ERR_* code)
    │   └── ExportNotFound       the server does not know the export (ERR_UNKNOWN)
    ├── RequestError             not fatal: the server answered a command with an error
    │                            (also an :class:`OSError`: ``errno`` is set)
    ├── UnsupportedError         not fatal: the server did not advertise this command
    │                            or flag, so nothing was sent
    ├── InvalidRequest           not fatal: the arguments break a rule (range, alignment,
    │                            size), so nothing was sent (also a :class:`ValueError`)
    └── URIError                 not fatal: an NBD URI could not be parsed
                                 (also a :class:`ValueError`)

The sans-IO core (:mod:`pynbd.proto`) raises only :class:`ProtocolError`,
:class:`OptionError`, :class:`RequestError`, :class:`UnsupportedError` and
:class:`InvalidRequest`, whatever bytes it is fed.
"""

from __future__ import annotations

import errno as _errno
import os

__all__ = [
    "ConnectionClosed",
    "ExportNotFound",
    "InvalidRequest",
    "NBDError",
    "NBDTimeout",
    "OptionError",
    "ProtocolError",
    "RequestError",
    "TLSError",
    "URIError",
    "UnsupportedError",
]


class NBDError(Exception):
    """Base class of all pynbd errors."""

    #: True when the connection is closed by this error.
    fatal: bool = False


class ProtocolError(NBDError):
    """The peer sent something the protocol forbids; the connection is closed."""

    fatal = True


class ConnectionClosed(NBDError):
    """The connection is closed (by the peer, by a fatal error, or by ``close()``)."""

    fatal = True


class NBDTimeout(NBDError, TimeoutError):
    """A call did not complete within its timeout; the connection is closed.

    A late reply could still arrive and the server's state is unknown, so the client
    gives the connection up rather than guess.
    """

    fatal = True


class TLSError(NBDError):
    """TLS could not be negotiated, or the TLS layer failed; the connection is closed."""

    fatal = True


class OptionError(NBDError):
    """The server answered an option with an error reply.

    Attributes:
        option: the ``Opt`` value that was refused.
        reply: the ``NBD_REP_ERR_*`` code (an ``int``; a ``Rep`` where known).
        message: the server's message, possibly empty.
    """

    def __init__(self, option: int, reply: int, message: str = "") -> None:
        from .proto.constants import Opt, Rep

        self.option = option
        self.reply = reply
        self.message = message
        try:
            oname = Opt(option).name
        except ValueError:
            oname = str(option)
        try:
            rname = Rep(reply).name
        except ValueError:
            rname = hex(reply)
        text = f"server refused NBD_OPT_{oname}: NBD_REP_{rname}"
        if message:
            text += f" ({message})"
        super().__init__(text)


class ExportNotFound(OptionError):
    """The server does not have the export that was asked for."""


class RequestError(NBDError, OSError):
    """The server answered a command with an error. The connection stays usable.

    Attributes:
        errno: the error as a local errno value (``errno.EIO``...).
        message: the server's message from an error chunk, possibly empty.
        offset: the offset the server blamed (ERROR_OFFSET chunk), or None.
        command: the ``Cmd`` that failed.
        request_offset: the offset of the request that failed (which of several
            pipelined requests it was), or None.
    """

    def __init__(
        self,
        err: int,
        message: str = "",
        *,
        offset: int | None = None,
        command: int | None = None,
        request_offset: int | None = None,
    ) -> None:
        text = os.strerror(err)
        if command is not None:
            from .proto.constants import Cmd

            try:
                text = f"NBD_CMD_{Cmd(command).name}: {text}"
            except ValueError:
                text = f"command {command}: {text}"
        if message:
            text += f": {message}"
        if offset is not None:
            text += f" (at offset {offset})"
        OSError.__init__(self, err, text)
        self.message = message
        self.offset = offset
        self.command = command
        self.request_offset = request_offset

    def __str__(self) -> str:
        return str(self.strerror)


class UnsupportedError(NBDError):
    """The server does not support this command or flag; nothing was sent."""

    errno = _errno.ENOTSUP


class InvalidRequest(NBDError, ValueError):
    """The request's arguments break a protocol rule; nothing was sent."""


class URIError(NBDError, ValueError):
    """An NBD URI could not be parsed or uses something unsupported."""
