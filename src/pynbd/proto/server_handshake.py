"""The server side of the NBD handshake (fixed newstyle), sans-IO.

:class:`ServerHandshake` queues the greeting at once, then consumes the client's flags
and options (``receive_data``), answers every option itself from the
:class:`~pynbd.proto.server_common.ServerConfig` (``data_to_send``), and tells the driver
what to do (``next_event``): :data:`NEED_DATA`, :class:`StartTLS` (upgrade the stream,
then call :meth:`ServerHandshake.tls_established`), :class:`TransmissionStarted` or
:class:`Disconnect`.

The machine is data: :data:`TRANSITIONS` maps (state, input) to the next state, and
:data:`OPTION_HANDLERS` maps each option to its handler; a pair not in the first table
is a protocol error. Peer input that breaks a MUST raises :class:`ProtocolError`: the
driver closes the connection (the spec's hard disconnect). Malformed option data is
not fatal: it is answered with NBD_REP_ERR_INVALID, as the spec asks.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from ..errors import ProtocolError
from .constants import (
    ClientFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
)
from .records import (
    BlockSizeInfo,
    ClientFlags,
    DescriptionInfo,
    ExportInfo,
    ExportNameReply,
    InfoRequest,
    MetaContextEntry,
    MetaContextRequest,
    NameInfo,
    NewstyleGreeting,
    OptionReply,
    OptionRequest,
    ServerEntry,
    decode_string,
)
from .server_common import (
    AVAILABLE_META_CONTEXTS,
    NEED_DATA,
    Disconnect,
    ExportSpec,
    ServerConfig,
    ServerEvent,
    ServerNegotiated,
    StartTLS,
    TLSPolicy,
    TransmissionStarted,
)
from .wire import OPTION_HEADER_SIZE

__all__ = ["OPTION_HANDLERS", "TRANSITIONS", "Input", "ServerHandshake", "State"]

# An int: ~ on an IntFlag complements only the known bits, hiding unknown ones.
_KNOWN_CLIENT_FLAGS = int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)
#: Context ids handed out by NBD_OPT_SET_META_CONTEXT, in AVAILABLE_META_CONTEXTS order.
_CONTEXT_IDS = {name: i + 1 for i, name in enumerate(AVAILABLE_META_CONTEXTS)}


class State(enum.Enum):
    CLIENT_FLAGS = "client flags"  # greeting sent; expecting the u32 client flags
    OPTIONS = "options"  # expecting an option (header and data)
    TLS = "tls"  # STARTTLS acknowledged; the driver is upgrading the stream
    TRANSMISSION = "transmission"  # GO or EXPORT_NAME succeeded
    CLOSED = "closed"  # aborted, refused, or the client went away


class Input(enum.Enum):
    CLIENT_FLAGS = "client flags"
    OPTION_ANSWERED = "option answered"  # any option that leaves haggling going on
    GO_ACCEPTED = "GO accepted"
    EXPORT_NAME_ACCEPTED = "EXPORT_NAME accepted"
    EXPORT_NAME_REFUSED = "EXPORT_NAME refused"
    ABORT = "ABORT"
    STARTTLS_ACCEPTED = "STARTTLS accepted"
    TOO_MANY_OPTIONS = "too many options"
    TLS_ESTABLISHED = "TLS established"
    EOF = "end of stream"


#: (state, input) -> next state; any other pair is a protocol error (tests try them all).
TRANSITIONS: dict[tuple[State, Input], State] = {
    (State.CLIENT_FLAGS, Input.CLIENT_FLAGS): State.OPTIONS,
    (State.CLIENT_FLAGS, Input.EOF): State.CLOSED,
    (State.OPTIONS, Input.OPTION_ANSWERED): State.OPTIONS,
    (State.OPTIONS, Input.GO_ACCEPTED): State.TRANSMISSION,
    (State.OPTIONS, Input.EXPORT_NAME_ACCEPTED): State.TRANSMISSION,
    (State.OPTIONS, Input.EXPORT_NAME_REFUSED): State.CLOSED,
    (State.OPTIONS, Input.ABORT): State.CLOSED,
    (State.OPTIONS, Input.STARTTLS_ACCEPTED): State.TLS,
    (State.OPTIONS, Input.TOO_MANY_OPTIONS): State.CLOSED,
    (State.OPTIONS, Input.EOF): State.CLOSED,
    (State.TLS, Input.TLS_ESTABLISHED): State.OPTIONS,
    (State.TLS, Input.EOF): State.CLOSED,
}

_Handler = Callable[["ServerHandshake", int, bytes], Input]

#: Options a FORCEDTLS server answers before TLS (spec "FORCEDTLS mode").
_BEFORE_TLS = frozenset({Opt.STARTTLS, Opt.ABORT})


class ServerHandshake:
    """Server side of the fixed newstyle handshake.

    Args:
        config: the exports and the negotiation policy.

    Raises (from ``next_event`` and ``tls_established``): :class:`ProtocolError` when
    the client breaks a MUST of the spec (unknown client flags, a bad option magic, an
    option longer than ``config.max_option_length``, NBD_OPT_EXPORT_NAME after extended
    headers, data sent before the TLS handshake); the driver then closes the connection.
    The option after ``config.max_options`` is refused with NBD_REP_ERR_POLICY and ends
    the session with a :class:`Disconnect` (the driver sends the reply, then closes).
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.state = State.CLIENT_FLAGS
        self.result = ServerNegotiated()
        self._in = bytearray()
        self._out = bytearray()
        self._eof = False
        self._shutdown: str | None = None
        self._tls_pending = False
        self._disconnect: Disconnect | None = None
        self._disconnect_reported = False
        # Options taken so far, whatever became of them (STARTTLS resets nothing here).
        self._options = 0
        # The export the last NBD_OPT_SET_META_CONTEXT named, and what it selected.
        self._meta_export: ExportSpec | None = None
        self._meta: dict[int, str] = {}
        self._out += NewstyleGreeting(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES).pack()

    # -- driver interface ---------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Give the core bytes read from the client; ``b""`` means end of stream."""
        if data:
            if self.state is not State.CLOSED:
                self._in += data
        else:
            self._eof = True

    def data_to_send(self) -> bytes:
        """Bytes to write to the client now (possibly empty)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def trailing_data(self) -> bytes:
        """Bytes received after the option that entered transmission."""
        data = bytes(self._in)
        self._in.clear()
        return data

    @property
    def eof(self) -> bool:
        """True once the client closed its side of the stream."""
        return self._eof

    def shutdown(self, reason: str = "the server is shutting down") -> None:
        """The server is shutting down, or will not serve this connection (``reason``,
        sent to the client): answer further options with NBD_REP_ERR_SHUTDOWN."""
        self._shutdown = reason

    def tls_established(self) -> None:
        """The stream is now TLS; negotiation restarts (spec "NBD_OPT_STARTTLS").

        Raises ProtocolError if no STARTTLS was accepted, or if the client sent bytes
        between its STARTTLS and the TLS handshake (they were not protected by TLS).
        """
        self._transition(Input.TLS_ESTABLISHED)
        if self._in:
            raise ProtocolError("client sent data between NBD_OPT_STARTTLS and TLS")
        self._tls_pending = False
        keep = self.result
        # The server MUST NOT preserve negotiation state from before STARTTLS.
        self.result = ServerNegotiated(
            fixed_newstyle=keep.fixed_newstyle, no_zeroes=keep.no_zeroes, tls=True
        )
        self._meta_export, self._meta = None, {}

    def next_event(self) -> ServerEvent:
        """Process what was received; say what the driver must do next."""
        while True:
            if self.state is State.TRANSMISSION:
                return TransmissionStarted(self.result)
            if self.state is State.CLOSED:
                # Reported once; nothing follows it (as in transmission).
                if self._disconnect_reported:
                    return NEED_DATA
                self._disconnect_reported = True
                return self._disconnect or Disconnect("client closed the connection", soft=False)
            if self.state is State.TLS:
                return StartTLS() if self._tls_pending else NEED_DATA
            if not self._step():
                if self._eof:
                    self._transition(Input.EOF)
                    continue
                return NEED_DATA

    # -- the machine ----------------------------------------------------------------------

    def _transition(self, event: Input) -> None:
        try:
            self.state = TRANSITIONS[(self.state, event)]
        except KeyError:
            raise ProtocolError(
                f"unexpected {event.value} in handshake state {self.state.value}"
            ) from None

    def _close(self, event: Input, reason: str, soft: bool) -> Input:
        self._disconnect = Disconnect(reason, soft)
        return event

    def _step(self) -> bool:
        """Consume one message if it is all there; False when more is needed."""
        if self.state is State.CLIENT_FLAGS:
            if len(self._in) < 4:
                return False
            flags = ClientFlags.unpack(bytes(self._in[:4])).flags
            del self._in[:4]
            if flags & ~_KNOWN_CLIENT_FLAGS:
                # Spec "Client flags": the server MUST drop the connection.
                raise ProtocolError(f"unknown client flags {flags:#x}")
            self.result.fixed_newstyle = bool(flags & ClientFlag.FIXED_NEWSTYLE)
            self.result.no_zeroes = bool(flags & ClientFlag.NO_ZEROES)
            self._transition(Input.CLIENT_FLAGS)
            return True
        # State.OPTIONS
        if len(self._in) < OPTION_HEADER_SIZE:
            return False
        option, length = OptionRequest.unpack_header(bytes(self._in[:OPTION_HEADER_SIZE]))
        if self._options == self.config.max_options and option != Opt.ABORT:
            # Refused at its header: its data is never read (nor waited for).
            self._transition(self._too_many_options(option))
            return True
        if length > self.config.max_option_length:
            raise ProtocolError(f"option {option} claims {length} bytes of data; too long")
        if len(self._in) < OPTION_HEADER_SIZE + length:
            return False
        data = bytes(self._in[OPTION_HEADER_SIZE : OPTION_HEADER_SIZE + length])
        del self._in[: OPTION_HEADER_SIZE + length]
        self._options += 1
        self._transition(self._on_option(option, data))
        return True

    def _too_many_options(self, option: int) -> Input:
        # The spec lets a server hard-disconnect a client it deems a denial of service
        # ("Termination of the session during option haggling"); nbdkit closes after
        # 32 options without a word. Here the client first gets a reason it can show
        # (NBD_OPT_EXPORT_NAME has no error reply: only the close).
        limit = self.config.max_options
        reason = f"too many options: this server allows {limit} per connection"
        if option != Opt.EXPORT_NAME:
            self._reply(option, Rep.ERR_POLICY, truncate_message(reason))
        self._in.clear()  # whatever else the client sent is not read
        return self._close(Input.TOO_MANY_OPTIONS, reason, soft=False)

    def _on_option(self, option: int, data: bytes) -> Input:
        if option == Opt.ABORT:
            # Data is ignored (spec "NBD_OPT_ABORT"); the ACK is a courtesy.
            self._reply(option, Rep.ACK)
            return self._close(Input.ABORT, "client sent NBD_OPT_ABORT", soft=True)
        if self._shutdown is not None:
            if option == Opt.EXPORT_NAME:
                return self._close(Input.EXPORT_NAME_REFUSED, self._shutdown, False)
            return self._error(option, Rep.ERR_SHUTDOWN, self._shutdown)
        if (
            self.config.tls is TLSPolicy.REQUIRED
            and not self.result.tls
            and option not in _BEFORE_TLS
        ):
            if option == Opt.EXPORT_NAME:
                return self._close(Input.EXPORT_NAME_REFUSED, "TLS is required", soft=False)
            return self._error(option, Rep.ERR_TLS_REQD, "TLS is required")
        handler = OPTION_HANDLERS.get(option)
        if handler is None:
            return self._error(option, Rep.ERR_UNSUP, f"option {option} is not supported")
        return handler(self, option, data)

    # -- replies ------------------------------------------------------------------------

    def _reply(self, option: int, reply: int, data: bytes = b"") -> None:
        self._out += OptionReply(option, reply, data).pack()

    def _error(self, option: int, reply: Rep, message: str) -> Input:
        self._reply(option, reply, truncate_message(message))
        return Input.OPTION_ANSWERED

    def _no_data(self, option: int, data: bytes) -> Input | None:
        if data:
            return self._error(option, Rep.ERR_INVALID, "this option takes no data")
        return None

    def _export(self, option: int, name: str) -> ExportSpec | Input:
        export = self.config.lookup(name)
        if export is None:
            return self._error(option, Rep.ERR_UNKNOWN, f"no export named {name!r}")
        if export.tls_only and not self.result.tls:
            return self._error(option, Rep.ERR_TLS_REQD, "this export needs TLS")
        return export

    def _flags_for(self, export: ExportSpec) -> int:
        """The flags GO would give now (INFO and GO MUST agree, spec "NBD_OPT_INFO")."""
        return int(
            export.transmission_flags(
                structured=self.result.structured_replies,
                extended=self.result.extended_headers,
                meta_contexts=self._meta_export is export and bool(self._meta),
            )
        )

    # -- option handlers ----------------------------------------------------------------

    def _on_export_name(self, option: int, data: bytes) -> Input:
        if self.result.extended_headers:
            raise ProtocolError("NBD_OPT_EXPORT_NAME after extended headers were negotiated")
        try:
            name = decode_string(data, "export name")
        except ProtocolError:
            return self._close(Input.EXPORT_NAME_REFUSED, "export name is not valid", False)
        export = self.config.lookup(name)
        # This option cannot fail politely: the spec has the server close instead.
        if export is None:
            return self._close(Input.EXPORT_NAME_REFUSED, f"no export named {name!r}", False)
        if export.tls_only and not self.result.tls:
            return self._close(Input.EXPORT_NAME_REFUSED, "this export needs TLS", False)
        if export.block_size_required:
            return self._close(
                Input.EXPORT_NAME_REFUSED, "this export needs NBD_INFO_BLOCK_SIZE", False
            )
        self._enter(export, "export name")
        reply = ExportNameReply(export.size, int(self.result.flags)).pack(
            no_zeroes=self.result.no_zeroes
        )
        self._out += reply
        return Input.EXPORT_NAME_ACCEPTED

    def _on_list(self, option: int, data: bytes) -> Input:
        if (refused := self._no_data(option, data)) is not None:
            return refused
        if not self.config.allow_list:
            return self._error(option, Rep.ERR_POLICY, "listing exports is disabled")
        for export in self.config.exports.values():
            # SELECTIVETLS MAY hide TLS-only exports from a client without TLS.
            if export.tls_only and not self.result.tls:
                continue
            self._reply(option, Rep.SERVER, ServerEntry(export.name, export.description).pack())
        self._reply(option, Rep.ACK)
        return Input.OPTION_ANSWERED

    def _on_starttls(self, option: int, data: bytes) -> Input:
        if (refused := self._no_data(option, data)) is not None:
            return refused
        if self.result.tls:
            return self._error(option, Rep.ERR_INVALID, "TLS is already established")
        if self.config.tls is TLSPolicy.NONE:
            return self._error(option, Rep.ERR_POLICY, "TLS is not configured on this server")
        if not self.result.fixed_newstyle:
            # Spec "Server-side requirements": NOTLS unless both sides are fixed newstyle.
            return self._error(option, Rep.ERR_POLICY, "TLS needs fixed newstyle")
        self._reply(option, Rep.ACK)
        self._tls_pending = True
        return Input.STARTTLS_ACCEPTED

    def _on_info(self, option: int, data: bytes) -> Input:
        try:
            request = InfoRequest.unpack(data)
        except ProtocolError as exc:
            return self._error(option, Rep.ERR_INVALID, str(exc))
        found = self._export(option, request.name)
        if not isinstance(found, ExportSpec):
            return found
        export = found
        wanted = set(request.infos)
        flags = self._flags_for(export)
        self._reply(option, Rep.INFO, ExportInfo(export.size, flags).pack())
        if Info.NAME in wanted:
            self._reply(option, Rep.INFO, NameInfo(export.name).pack())
        if Info.DESCRIPTION in wanted and export.description:
            self._reply(option, Rep.INFO, DescriptionInfo(export.description).pack())
        block_size = Info.BLOCK_SIZE in wanted
        if block_size or not export.default_block_sizes:
            # Unasked, the sizes are only a hint; a client that asked MUST obey them.
            info = BlockSizeInfo(
                export.minimum_block, export.preferred_block, export.maximum_payload
            )
            self._reply(option, Rep.INFO, info.pack())
        if option == Opt.GO and export.block_size_required and not block_size:
            return self._error(
                option, Rep.ERR_BLOCK_SIZE_REQD, "this export needs NBD_INFO_BLOCK_SIZE"
            )
        self._reply(option, Rep.ACK)
        if option == Opt.INFO:
            return Input.OPTION_ANSWERED
        self._enter(export, "go")
        self.result.block_size_requested = block_size
        return Input.GO_ACCEPTED

    def _on_structured_reply(self, option: int, data: bytes) -> Input:
        if (refused := self._no_data(option, data)) is not None:
            return refused
        if not self.config.structured_replies:
            return self._error(option, Rep.ERR_UNSUP, "structured replies are disabled")
        if self.result.extended_headers:
            return self._error(option, Rep.ERR_EXT_HEADER_REQD, "extended headers are in use")
        self.result.structured_replies = True
        self._reply(option, Rep.ACK)
        return Input.OPTION_ANSWERED

    def _on_extended_headers(self, option: int, data: bytes) -> Input:
        if (refused := self._no_data(option, data)) is not None:
            return refused
        if not self.config.extended_headers:
            return self._error(option, Rep.ERR_UNSUP, "extended headers are disabled")
        self.result.extended_headers = True
        # Extended headers carry every structured reply type.
        self.result.structured_replies = True
        self._reply(option, Rep.ACK)
        return Input.OPTION_ANSWERED

    def _on_meta_context(self, option: int, data: bytes) -> Input:
        setting = option == Opt.SET_META_CONTEXT
        if setting:
            # SET replaces the selection even when it fails (spec).
            self._meta_export, self._meta = None, {}
        if not self.result.structured_replies:
            return self._error(
                option, Rep.ERR_INVALID, "negotiate structured replies or extended headers first"
            )
        try:
            request = MetaContextRequest.unpack(data)
        except ProtocolError as exc:
            return self._error(option, Rep.ERR_INVALID, str(exc))
        found = self._export(option, request.name)
        if not isinstance(found, ExportSpec):
            return found
        names = _match_contexts(request.queries, listing=not setting)
        selected: dict[int, str] = {}
        for name in names:
            cid = _CONTEXT_IDS[name] if setting else 0  # LIST's ids SHOULD be zero
            self._reply(option, Rep.META_CONTEXT, MetaContextEntry(cid, name).pack())
            selected[cid] = name
        if setting:
            self._meta_export, self._meta = found, selected
        self._reply(option, Rep.ACK)
        return Input.OPTION_ANSWERED

    def _enter(self, export: ExportSpec, how: str) -> None:
        """Settle the result for transmission on ``export``."""
        result = self.result
        result.export = export
        result.entered_by = how
        # BLOCK_STATUS needs SET_META_CONTEXT on the export that is finally chosen.
        result.meta_contexts = dict(self._meta) if self._meta_export is export else {}
        result.flags = export.transmission_flags(
            structured=result.structured_replies,
            extended=result.extended_headers,
            meta_contexts=bool(result.meta_contexts),
        )


def truncate_message(message: str) -> bytes:
    """A message as UTF-8, cut to the spec's 4096-byte string limit on a character edge."""
    data = message.encode("utf-8")
    if len(data) <= 4096:
        return data
    return data[:4096].decode("utf-8", "ignore").encode("utf-8")


def _match_contexts(queries: tuple[str, ...], *, listing: bool) -> list[str]:
    """The available contexts the queries select (spec "The base: metadata namespace").

    No query lists everything (LIST) or selects nothing (SET); "base:" is a wildcard
    only for LIST; unknown namespaces and leaf names are ignored, never an error.
    """
    if not queries:
        return list(AVAILABLE_META_CONTEXTS) if listing else []
    found: list[str] = []
    for query in queries:
        namespace, colon, _leaf = query.partition(":")
        if not colon:
            continue
        for name in AVAILABLE_META_CONTEXTS:
            wildcard = listing and query == namespace + ":" and name.startswith(query)
            if (query == name or wildcard) and name not in found:
                found.append(name)
    return found


#: option -> handler. An option not here is answered with NBD_REP_ERR_UNSUP.
OPTION_HANDLERS: dict[int, _Handler] = {
    Opt.EXPORT_NAME: ServerHandshake._on_export_name,
    Opt.LIST: ServerHandshake._on_list,
    Opt.STARTTLS: ServerHandshake._on_starttls,
    Opt.INFO: ServerHandshake._on_info,
    Opt.GO: ServerHandshake._on_info,
    Opt.STRUCTURED_REPLY: ServerHandshake._on_structured_reply,
    Opt.LIST_META_CONTEXT: ServerHandshake._on_meta_context,
    Opt.SET_META_CONTEXT: ServerHandshake._on_meta_context,
    Opt.EXTENDED_HEADERS: ServerHandshake._on_extended_headers,
}
