"""The client side of the NBD handshake, sans-IO.

:class:`ClientHandshake` consumes the server's bytes (``receive_data``), produces the
client's (``data_to_send``) and reports what the driver must do (``next_event``):

- :data:`NEED_DATA`: read more from the peer and call ``receive_data`` (``b""`` is EOF);
- :class:`StartTLS`: the server accepted NBD_OPT_STARTTLS; wrap the stream in TLS, then
  call :meth:`ClientHandshake.tls_established`;
- :class:`HandshakeDone`: negotiation is over; ``result.in_transmission`` tells whether
  the transmission phase started (GO or EXPORT_NAME) or the session was aborted
  (NBD_OPT_ABORT sent: the driver closes the stream).

Two layers keep the logic readable. The *machine* knows the wire: which bytes are
expected in which state, and which option replies are legal for which option
(:data:`REPLY_OUTCOMES`, :data:`TRANSITIONS`); a pair that is not in the tables is a
protocol error. The *plan* is a generator that decides which option to send next
(the policy: STARTTLS first, extended headers or structured replies, meta contexts,
GO with the fallback to EXPORT_NAME, LIST and INFO in negotiation mode).
"""

from __future__ import annotations

import enum
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import TypeAlias

from ..errors import (
    ExportNotFound,
    InvalidRequest,
    NBDError,
    OptionError,
    ProtocolError,
    TLSError,
)
from .constants import (
    BASE_ALLOCATION,
    CLISERV_MAGIC,
    DEFAULT_MAX_PAYLOAD,
    DEFAULT_MIN_BLOCK,
    DEFAULT_PREFERRED_BLOCK,
    IHAVEOPT,
    NBDMAGIC,
    REP_ERROR_BIT,
    ClientFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    TransmissionFlag,
)
from .events import NEED_DATA, NeedData, StartTLS
from .limits import DEFAULT_LIMITS, ClientLimits
from .records import (
    BlockSizeInfo,
    ClientFlags,
    DescriptionInfo,
    ExportInfo,
    ExportNameReply,
    InfoRecord,
    InfoRequest,
    MetaContextEntry,
    MetaContextRequest,
    NameInfo,
    OldstyleGreeting,
    OptionReply,
    OptionRequest,
    ServerEntry,
    UnknownInfo,
    check_block_sizes,
    decode_string,
    encode_string,
    unpack_info,
)
from .wire import EXPORT_NAME_REPLY_SIZE, OLDSTYLE_GREETING_SIZE, OPTION_REPLY_HEADER_SIZE

#: Largest option reply payload accepted. Replies carry at most a few strings of 4096
#: bytes; anything larger is a lying length from a broken or hostile server.
MAX_OPTION_REPLY = 16 * 1024


class TLSMode(enum.Enum):
    """Whether the client asks for TLS (libnbd's tls setting)."""

    DISABLE = "disable"  # never send STARTTLS
    ALLOW = "allow"  # try STARTTLS; go on in plaintext if the server refuses
    REQUIRE = "require"  # STARTTLS or fail


@dataclass(frozen=True, slots=True)
class HandshakeConfig:
    """What the client wants from negotiation.

    Attributes:
        export_name: the export to select ("" is the default export).
        tls: whether to send NBD_OPT_STARTTLS.
        structured_replies: ask for NBD_OPT_STRUCTURED_REPLY.
        extended_headers: ask for NBD_OPT_EXTENDED_HEADERS (taken first when offered).
        meta_contexts: contexts to select with NBD_OPT_SET_META_CONTEXT.
        request_block_size: ask for NBD_INFO_BLOCK_SIZE (and then obey it).
        go: enter transmission (GO, or EXPORT_NAME as a fallback); when False,
            negotiation mode: ask NBD_OPT_INFO (see ``info``) and abort.
        list_exports: send NBD_OPT_LIST first and record the exports.
        list_meta_contexts: send NBD_OPT_LIST_META_CONTEXT with no query (all
            contexts of the export) and record them.
        info: in negotiation mode, ask NBD_OPT_INFO about the export. A refusal
            ends negotiation without an error: it is recorded in
            :attr:`Negotiated.refused`, with what was learned before it.
        limits: what the server may make the client hold (see
            :class:`~pynbd.proto.limits.ClientLimits`).
    """

    export_name: str = ""
    tls: TLSMode = TLSMode.DISABLE
    structured_replies: bool = True
    extended_headers: bool = True
    meta_contexts: tuple[str, ...] = (BASE_ALLOCATION,)
    request_block_size: bool = True
    go: bool = True
    list_exports: bool = False
    list_meta_contexts: bool = False
    info: bool = True
    limits: ClientLimits = DEFAULT_LIMITS


@dataclass(slots=True)
class Negotiated:
    """What negotiation settled; the transmission core is built from it.

    The ``can_*`` and ``is_*`` methods answer from the transmission flags, as the
    clients' methods of the same names do.

    Attributes:
        refused: the options the server refused and negotiation went on (or ended
            cleanly) without, by option: NBD_OPT_LIST, NBD_OPT_INFO in negotiation
            mode, NBD_OPT_STRUCTURED_REPLY... Their error says why.
    """

    export_name: str = ""
    size: int | None = None
    flags: TransmissionFlag = TransmissionFlag.HAS_FLAGS & 0
    minimum_block: int = DEFAULT_MIN_BLOCK
    preferred_block: int = DEFAULT_PREFERRED_BLOCK
    maximum_payload: int = DEFAULT_MAX_PAYLOAD
    block_size_advertised: bool = False
    canonical_name: str | None = None
    description: str | None = None
    structured_replies: bool = False
    extended_headers: bool = False
    meta_contexts: dict[str, int] = field(default_factory=dict)
    exports: tuple[ServerEntry, ...] | None = None
    available_meta_contexts: tuple[str, ...] | None = None
    tls: bool = False
    style: str = "fixed newstyle"
    no_zeroes: bool = False
    in_transmission: bool = False
    refused: dict[Opt, OptionError] = field(default_factory=dict)

    def _has(self, flag: TransmissionFlag) -> bool:
        return bool(self.flags & flag)

    def is_read_only(self) -> bool:
        return self._has(TransmissionFlag.READ_ONLY)

    def is_rotational(self) -> bool:
        return self._has(TransmissionFlag.ROTATIONAL)

    def can_flush(self) -> bool:
        return self._has(TransmissionFlag.SEND_FLUSH)

    def can_fua(self) -> bool:
        return self._has(TransmissionFlag.SEND_FUA)

    def can_trim(self) -> bool:
        return self._has(TransmissionFlag.SEND_TRIM)

    def can_zero(self) -> bool:
        return self._has(TransmissionFlag.SEND_WRITE_ZEROES)

    def can_fast_zero(self) -> bool:
        return self._has(TransmissionFlag.SEND_FAST_ZERO)

    def can_df(self) -> bool:
        return self._has(TransmissionFlag.SEND_DF) and self.structured_replies

    def can_multi_conn(self) -> bool:
        return self._has(TransmissionFlag.CAN_MULTI_CONN)

    def can_cache(self) -> bool:
        return self._has(TransmissionFlag.SEND_CACHE)

    def can_block_status_payload(self) -> bool:
        return self._has(TransmissionFlag.BLOCK_STATUS_PAYLOAD) and self.extended_headers

    def can_meta_context(self, name: str = BASE_ALLOCATION) -> bool:
        """True when ``name`` was negotiated for block status."""
        return name in self.meta_contexts


@dataclass(frozen=True, slots=True)
class HandshakeDone:
    """Negotiation finished; see ``result.in_transmission``."""

    result: Negotiated


HandshakeEvent: TypeAlias = NeedData | StartTLS | HandshakeDone


@dataclass(frozen=True, slots=True)
class OptionResult:
    """What the server answered to one option: the final reply, and the entries of the
    replies before it (an NBD_REP_INFO of an unknown type is not kept; of a known type,
    the last one).
    """

    option: int
    reply: int  # the final reply type: Rep.ACK or an error
    entries: tuple[ServerEntry | InfoRecord | MetaContextEntry, ...] = ()
    message: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.reply == Rep.ACK)

    def error(self) -> OptionError:
        cls = ExportNotFound if self.reply == Rep.ERR_UNKNOWN else OptionError
        return cls(self.option, self.reply, self.message)


# --- The machine's tables ----------------------------------------------------------------


class State(enum.Enum):
    GREETING = "greeting"  # expecting NBDMAGIC and the second magic (16 bytes)
    NEWSTYLE_FLAGS = "newstyle flags"  # expecting the u16 handshake flags
    OLDSTYLE = "oldstyle"  # expecting size, flags and zeroes
    READY = "ready"  # the client may send an option; the server must be quiet
    AWAIT_REPLY = "await reply"  # an option is in flight
    AWAIT_EXPORT_NAME = "await export name"  # NBD_OPT_EXPORT_NAME is in flight
    TLS = "tls"  # the driver is upgrading the stream
    DONE = "done"  # transmission, or aborted


class Input(enum.Enum):
    NEWSTYLE_MAGIC = "newstyle magic"
    OLDSTYLE_MAGIC = "oldstyle magic"
    HANDSHAKE_FLAGS = "handshake flags"
    OLDSTYLE_INFO = "oldstyle info"
    SEND_OPTION = "send option"
    SEND_EXPORT_NAME = "send export name"
    SEND_ABORT = "send abort"
    REPLY_MORE = "partial reply"
    REPLY_FINAL = "final reply"
    REPLY_GO_ACK = "GO acknowledged"
    REPLY_STARTTLS_ACK = "STARTTLS acknowledged"
    EXPORT_NAME_REPLY = "export name reply"
    TLS_ESTABLISHED = "TLS established"


#: (state, input) -> next state. Any other pair is a protocol error (or, for inputs the
#: client makes itself, a bug in the plan); tests try every pair.
TRANSITIONS: dict[tuple[State, Input], State] = {
    (State.GREETING, Input.NEWSTYLE_MAGIC): State.NEWSTYLE_FLAGS,
    (State.GREETING, Input.OLDSTYLE_MAGIC): State.OLDSTYLE,
    (State.NEWSTYLE_FLAGS, Input.HANDSHAKE_FLAGS): State.READY,
    (State.OLDSTYLE, Input.OLDSTYLE_INFO): State.DONE,
    (State.READY, Input.SEND_OPTION): State.AWAIT_REPLY,
    (State.READY, Input.SEND_EXPORT_NAME): State.AWAIT_EXPORT_NAME,
    (State.READY, Input.SEND_ABORT): State.DONE,
    (State.AWAIT_REPLY, Input.REPLY_MORE): State.AWAIT_REPLY,
    (State.AWAIT_REPLY, Input.REPLY_FINAL): State.READY,
    (State.AWAIT_REPLY, Input.REPLY_GO_ACK): State.DONE,
    (State.AWAIT_REPLY, Input.REPLY_STARTTLS_ACK): State.TLS,
    (State.AWAIT_EXPORT_NAME, Input.EXPORT_NAME_REPLY): State.DONE,
    (State.TLS, Input.TLS_ESTABLISHED): State.READY,
}


class ReplyKind(enum.Enum):
    ACK = "ack"
    SERVER = "server"
    INFO = "info"
    META_CONTEXT = "meta context"
    ERROR = "error"


_REPLY_KINDS: dict[int, ReplyKind] = {
    Rep.ACK: ReplyKind.ACK,
    Rep.SERVER: ReplyKind.SERVER,
    Rep.INFO: ReplyKind.INFO,
    Rep.META_CONTEXT: ReplyKind.META_CONTEXT,
}


def reply_kind(reply: int) -> ReplyKind | None:
    """Classify an option reply type; None for an unknown non-error type."""
    if reply & REP_ERROR_BIT:
        return ReplyKind.ERROR
    return _REPLY_KINDS.get(reply)


_FINAL = Input.REPLY_FINAL
_MORE = Input.REPLY_MORE

#: (option in flight, kind of reply) -> machine input. Any pair not here is a protocol
#: error: an unknown non-error reply type, or a partial reply the option cannot have.
REPLY_OUTCOMES: dict[tuple[Opt, ReplyKind], Input] = {
    **{(opt, ReplyKind.ERROR): _FINAL for opt in Opt if opt != Opt.EXPORT_NAME},
    **{(opt, ReplyKind.ACK): _FINAL for opt in Opt if opt != Opt.EXPORT_NAME},
    (Opt.GO, ReplyKind.ACK): Input.REPLY_GO_ACK,
    (Opt.STARTTLS, ReplyKind.ACK): Input.REPLY_STARTTLS_ACK,
    (Opt.LIST, ReplyKind.SERVER): _MORE,
    (Opt.INFO, ReplyKind.INFO): _MORE,
    (Opt.GO, ReplyKind.INFO): _MORE,
    (Opt.LIST_META_CONTEXT, ReplyKind.META_CONTEXT): _MORE,
    (Opt.SET_META_CONTEXT, ReplyKind.META_CONTEXT): _MORE,
}


# --- The plan's actions ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Abort:
    pass


_Action: TypeAlias = OptionRequest | _Abort
_Plan: TypeAlias = Generator[_Action, OptionResult, None]


class ClientHandshake:
    """Client side of the handshake (oldstyle, newstyle and fixed newstyle).

    Raises (from ``next_event``/``tls_established``): :class:`ProtocolError` when the
    server breaks the protocol or goes over ``config.limits`` (the message names the
    bound, see :class:`~pynbd.proto.limits.ClientLimits`), :class:`OptionError` (or
    :class:`ExportNotFound`) when the server refuses an option the client cannot do
    without, :class:`TLSError` when TLS is required and the server does not offer it.
    The handshake is over after any of them: every later call raises the same error.
    When the server refused an option during fixed newstyle haggling, NBD_OPT_ABORT is
    queued first (the spec's soft disconnect), so a driver may still send
    :meth:`data_to_send` before it closes the stream.

    Args:
        config: what to negotiate (defaults: :class:`HandshakeConfig`).

    Raises:
        InvalidRequest: the export name or a meta context query is over 4096 bytes.
    """

    def __init__(self, config: HandshakeConfig | None = None) -> None:
        self.config = config or HandshakeConfig()
        try:
            encode_string(self.config.export_name, "export name")
            for query in self.config.meta_contexts:
                encode_string(query, "meta context query")
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        self.state = State.GREETING
        self.result = Negotiated(export_name=self.config.export_name)
        self._in = bytearray()
        self._out = bytearray()
        self._fixed = False
        self._option: Opt | None = None
        # What the option in flight has answered so far (see _keep).
        self._entries: list[ServerEntry | MetaContextEntry] = []
        self._infos: dict[type, InfoRecord] = {}
        # What all option replies of the handshake cost so far (see ClientLimits).
        self._replies_seen = 0
        self._reply_bytes = 0
        self._plan: _Plan | None = None
        self._tls_pending = False
        self._eof = False
        self._error: NBDError | None = None

    # -- driver interface --

    def receive_data(self, data: bytes) -> None:
        """Give the core bytes read from the server; ``b""`` means end of stream."""
        if data:
            self._in += data
        else:
            self._eof = True

    def data_to_send(self) -> bytes:
        """Bytes the driver must write to the server now (possibly empty)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def trailing_data(self) -> bytes:
        """Bytes received after the handshake ended (for the transmission core)."""
        return bytes(self._in)

    def tls_established(self) -> None:
        """Tell the core the stream is now TLS; negotiation restarts from scratch.

        Raises ProtocolError when no STARTTLS was accepted, or the server sent data
        before the TLS handshake; the plan's errors as :meth:`next_event`.
        """
        if self._error is not None:
            raise self._error
        try:
            self._tls_established()
        except NBDError as exc:
            self._error = exc
            raise

    def _tls_established(self) -> None:
        self._transition(Input.TLS_ESTABLISHED)
        if self._in:
            raise ProtocolError("server sent data between STARTTLS and the TLS handshake")
        self._tls_pending = False
        # Rule 4: STARTTLS throws away earlier negotiation.
        keep = self.result
        self.result = Negotiated(
            export_name=keep.export_name,
            tls=True,
            style=keep.style,
            no_zeroes=keep.no_zeroes,
        )
        self._advance(OptionResult(Opt.STARTTLS, Rep.ACK))

    def next_event(self) -> HandshakeEvent:
        """Process what was received and say what the driver must do next.

        Raises ProtocolError, OptionError (ExportNotFound) or TLSError, see the class.
        """
        if self._error is not None:
            raise self._error
        try:
            return self._next_event()
        except NBDError as exc:
            self._error = exc
            raise

    def _next_event(self) -> HandshakeEvent:
        while True:
            if self.state is State.DONE:
                return HandshakeDone(self.result)
            if self.state is State.TLS:
                if self._tls_pending:
                    return StartTLS()
                return NEED_DATA
            if self.state is State.READY:
                if self._in:
                    raise ProtocolError("server sent data while no option was in flight")
                if self._eof:
                    raise ProtocolError("server closed the connection during negotiation")
                return NEED_DATA  # pragma: no cover - READY always sends an option at once
            if not self._step():
                if self._eof:
                    if self.state is State.AWAIT_EXPORT_NAME:
                        raise ExportNotFound(
                            Opt.EXPORT_NAME,
                            Rep.ERR_UNKNOWN,
                            "the server closed the connection after NBD_OPT_EXPORT_NAME",
                        )
                    raise ProtocolError(f"server closed the connection ({self.state.value})")
                return NEED_DATA

    # -- the machine --

    def _transition(self, event: Input) -> None:
        try:
            self.state = TRANSITIONS[(self.state, event)]
        except KeyError:
            raise ProtocolError(
                f"unexpected {event.value} in handshake state {self.state.value}"
            ) from None

    def _take(self, n: int) -> bytes | None:
        if len(self._in) < n:
            return None
        data = bytes(self._in[:n])
        del self._in[:n]
        return data

    def _step(self) -> bool:
        """Consume one unit of input if it is all there; False when more is needed."""
        if self.state is State.GREETING:
            if len(self._in) >= 8:
                # Judge the first magic as soon as it is there: a peer that is not an
                # NBD server may send 8 bytes and wait.
                magic = int.from_bytes(self._in[:8], "big")
                if magic != NBDMAGIC:
                    raise ProtocolError(f"not an NBD server: bad magic {magic:#x}")
            if len(self._in) < 16:
                return False
            second = int.from_bytes(self._in[8:16], "big")
            if second == IHAVEOPT:
                del self._in[:16]
                self._transition(Input.NEWSTYLE_MAGIC)
            elif second == CLISERV_MAGIC:
                self._transition(Input.OLDSTYLE_MAGIC)
            else:
                raise ProtocolError(f"unknown handshake magic {second:#x}")
            return True
        if self.state is State.OLDSTYLE:
            data = self._take(OLDSTYLE_GREETING_SIZE)
            if data is None:
                return False
            greeting = OldstyleGreeting.unpack(data)
            if self.config.tls is TLSMode.REQUIRE:
                raise TLSError("TLS is required but the server speaks oldstyle negotiation")
            self._transition(Input.OLDSTYLE_INFO)
            self.result.style = "oldstyle"
            self._set_export(greeting.size, greeting.flags)
            self.result.in_transmission = True
            return True
        if self.state is State.NEWSTYLE_FLAGS:
            data = self._take(2)
            if data is None:
                return False
            return self._on_handshake_flags(int.from_bytes(data, "big"))
        if self.state is State.AWAIT_REPLY:
            return self._on_option_reply()
        if self.state is State.AWAIT_EXPORT_NAME:
            size = EXPORT_NAME_REPLY_SIZE + (0 if self.result.no_zeroes else 124)
            data = self._take(size)
            if data is None:
                return False
            reply = ExportNameReply.unpack(data[:EXPORT_NAME_REPLY_SIZE])
            self._transition(Input.EXPORT_NAME_REPLY)
            self._set_export(reply.size, reply.flags)
            self.result.in_transmission = True
            return True
        raise ProtocolError(f"no input expected in state {self.state.value}")  # pragma: no cover

    def _on_handshake_flags(self, flags: int) -> bool:
        self._transition(Input.HANDSHAKE_FLAGS)
        hflags = HandshakeFlag(flags & 0x3)  # unknown handshake flags are ignored (spec)
        self._fixed = bool(hflags & HandshakeFlag.FIXED_NEWSTYLE)
        self.result.style = "fixed newstyle" if self._fixed else "newstyle"
        cflags = ClientFlag(0)
        if self._fixed:
            cflags |= ClientFlag.FIXED_NEWSTYLE
        if hflags & HandshakeFlag.NO_ZEROES:
            cflags |= ClientFlag.NO_ZEROES
            self.result.no_zeroes = True
        self._out += ClientFlags(int(cflags)).pack()
        self._plan = self._run_plan()
        self._perform(next(self._plan))
        return True

    def _on_option_reply(self) -> bool:
        if len(self._in) < OPTION_REPLY_HEADER_SIZE:
            return False
        option, reply, length = OptionReply.unpack_header(
            bytes(self._in[:OPTION_REPLY_HEADER_SIZE])
        )
        assert self._option is not None  # set whenever AWAIT_REPLY is entered
        if option != self._option:
            raise ProtocolError(
                f"option reply is for option {option}, but NBD_OPT_{self._option.name} was sent"
            )
        if length > MAX_OPTION_REPLY:
            raise ProtocolError(f"option reply of {length} bytes is too long")
        # The handshake's bounds are judged on the header, before the payload is awaited.
        size = OPTION_REPLY_HEADER_SIZE + length
        limits = self.config.limits
        if self._replies_seen >= limits.max_option_replies:
            raise ProtocolError(
                f"the server sent more than {limits.max_option_replies} option replies "
                "in one handshake (ClientLimits.max_option_replies)"
            )
        if self._reply_bytes + size > limits.max_handshake_bytes:
            raise ProtocolError(
                f"the server's option replies exceed {limits.max_handshake_bytes} bytes "
                "in one handshake (ClientLimits.max_handshake_bytes)"
            )
        if len(self._in) < size:
            return False
        data = bytes(self._in[OPTION_REPLY_HEADER_SIZE:size])
        del self._in[:size]
        self._replies_seen += 1
        self._reply_bytes += size
        kind = reply_kind(reply)
        event = REPLY_OUTCOMES.get((self._option, kind)) if kind else None
        if event is None:
            raise ProtocolError(
                f"reply type {reply:#x} is not valid for NBD_OPT_{self._option.name}"
            )
        if event is _MORE:
            self._keep(reply, data)
            self._transition(event)
            return True
        if kind is ReplyKind.ACK and data:
            raise ProtocolError("NBD_REP_ACK with a payload")
        message = decode_string(data, "error message") if kind is ReplyKind.ERROR else ""
        entries = (*self._entries, *self._infos.values())
        result = OptionResult(self._option, reply, entries, message)
        self._entries = []
        self._infos = {}
        self._option = None
        self._transition(event)
        if event is Input.REPLY_STARTTLS_ACK:
            if self._in:
                raise ProtocolError("server sent data after accepting STARTTLS")
            self._tls_pending = True
            return True
        self._advance(result)
        return True

    def _keep(self, reply: int, data: bytes) -> None:
        """Record what an NBD_REP_SERVER, INFO or META_CONTEXT reply says, and no more:
        an information type this client does not know is dropped (the client MUST
        ignore it, spec "NBD_OPT_INFO"), and a known one that comes again replaces the
        earlier one (it SHOULD appear once), so an export's information never grows
        with the number of replies."""
        if reply == Rep.INFO:
            info = unpack_info(data)
            if not isinstance(info, UnknownInfo):
                self._infos[type(info)] = info
        elif reply == Rep.SERVER:
            self._entries.append(ServerEntry.unpack(data))
        else:
            self._entries.append(MetaContextEntry.unpack(data))

    def _advance(self, result: OptionResult) -> None:
        """Feed an option's outcome to the plan and perform what it asks next."""
        assert self._plan is not None
        try:
            if result.reply == Rep.ERR_SHUTDOWN:
                # Spec "Termination of the session during option haggling": after
                # NBD_REP_ERR_SHUTDOWN the client MUST initiate a soft disconnect.
                raise result.error()
            action = self._plan.send(result)
        except StopIteration:
            if self.state is not State.DONE:
                raise ProtocolError("negotiation ended without entering transmission") from None
            return
        except (OptionError, TLSError):
            self._soft_disconnect()
            raise
        self._perform(action)

    def _soft_disconnect(self) -> None:
        """Queue NBD_OPT_ABORT when giving up between options (fixed newstyle only).

        The spec lets a client end haggling only with a soft disconnect, save after a
        protocol violation or a failed TLS negotiation.
        """
        if self._fixed and self.state is State.READY:
            self._out += OptionRequest(Opt.ABORT).pack()
            self._transition(Input.SEND_ABORT)

    def _perform(self, action: _Action) -> None:
        if isinstance(action, _Abort):
            self._out += OptionRequest(Opt.ABORT).pack()
            self._transition(Input.SEND_ABORT)
            return
        self._out += action.pack()
        if action.option == Opt.EXPORT_NAME:
            self._transition(Input.SEND_EXPORT_NAME)
        else:
            self._option = Opt(action.option)
            self._transition(Input.SEND_OPTION)

    # -- the plan --

    def _note(self, res: OptionResult) -> bool:
        """True when the option succeeded; else record its refusal (see
        :attr:`Negotiated.refused`)."""
        if not res.ok:
            self.result.refused[Opt(res.option)] = res.error()
        return res.ok

    def _set_export(self, size: int, flags: int) -> None:
        self.result.size = size
        self.result.flags = TransmissionFlag(flags)

    def _apply_info(self, entries: tuple[object, ...]) -> bool:
        """Record NBD_REP_INFO entries; True when NBD_INFO_EXPORT was among them."""
        seen_export = False
        for entry in entries:
            if isinstance(entry, ExportInfo):
                self._set_export(entry.size, entry.flags)
                seen_export = True
            elif isinstance(entry, NameInfo):
                self.result.canonical_name = entry.name
            elif isinstance(entry, DescriptionInfo):
                self.result.description = entry.description
            elif isinstance(entry, BlockSizeInfo):
                check_block_sizes(entry)
                self.result.minimum_block = entry.minimum
                self.result.preferred_block = entry.preferred
                self.result.maximum_payload = entry.maximum
                self.result.block_size_advertised = True
        return seen_export

    def _info_request(self, option: Opt) -> OptionRequest:
        infos = [Info.NAME, Info.DESCRIPTION]
        if self.config.request_block_size:
            infos.append(Info.BLOCK_SIZE)
        return OptionRequest(option, InfoRequest(self.config.export_name, tuple(infos)).pack())

    def _export_name_request(self) -> OptionRequest:
        return OptionRequest(Opt.EXPORT_NAME, encode_string(self.config.export_name, "export name"))

    def _run_plan(self) -> _Plan:
        cfg = self.config
        if not self._fixed:
            # Non-fixed newstyle knows only NBD_OPT_EXPORT_NAME.
            if cfg.tls is TLSMode.REQUIRE:
                raise TLSError("TLS is required but the server does not speak fixed newstyle")
            yield self._export_name_request()
            return
        if cfg.tls is not TLSMode.DISABLE:
            res = yield OptionRequest(Opt.STARTTLS)
            if not self._note(res) and cfg.tls is TLSMode.REQUIRE:
                raise TLSError(f"TLS is required but the server refused it: {res.error()}")
        if cfg.list_exports:
            res = yield OptionRequest(Opt.LIST)
            if self._note(res):
                self.result.exports = tuple(e for e in res.entries if isinstance(e, ServerEntry))
        if cfg.extended_headers:
            res = yield OptionRequest(Opt.EXTENDED_HEADERS)
            self.result.extended_headers = self._note(res)
        if cfg.structured_replies and not self.result.extended_headers:
            res = yield OptionRequest(Opt.STRUCTURED_REPLY)
            self.result.structured_replies = self._note(res)
        self.result.structured_replies |= self.result.extended_headers
        if cfg.list_meta_contexts and self.result.structured_replies:
            res = yield OptionRequest(
                Opt.LIST_META_CONTEXT, MetaContextRequest(cfg.export_name, ()).pack()
            )
            if self._note(res):
                self.result.available_meta_contexts = tuple(
                    e.name for e in res.entries if isinstance(e, MetaContextEntry)
                )
        if cfg.go and cfg.meta_contexts and self.result.structured_replies:
            res = yield OptionRequest(
                Opt.SET_META_CONTEXT, MetaContextRequest(cfg.export_name, cfg.meta_contexts).pack()
            )
            if self._note(res):
                self.result.meta_contexts = {
                    e.name: e.context_id for e in res.entries if isinstance(e, MetaContextEntry)
                }
        if not cfg.go and not cfg.info:
            yield _Abort()
            return
        option = Opt.GO if cfg.go else Opt.INFO
        res = yield self._info_request(option)
        if res.reply == Rep.ERR_UNSUP and not self.result.extended_headers:
            # Rule 1: a server without GO/INFO only knows EXPORT_NAME, which enters
            # transmission; in negotiation mode the driver then sends NBD_CMD_DISC.
            self.result.meta_contexts = {}
            yield self._export_name_request()
            return
        if not res.ok and cfg.go:
            raise res.error()
        if not self._note(res):
            yield _Abort()  # negotiation mode: what was learned so far stands
            return
        if not self._apply_info(res.entries):
            raise ProtocolError(f"NBD_OPT_{option.name} succeeded without NBD_INFO_EXPORT")
        if cfg.go:
            self.result.in_transmission = True
            return  # the GO ACK moved the machine to DONE
        yield _Abort()


__all__ = [
    "MAX_OPTION_REPLY",
    "NEED_DATA",
    "REPLY_OUTCOMES",
    "TRANSITIONS",
    "ClientHandshake",
    "HandshakeConfig",
    "HandshakeDone",
    "HandshakeEvent",
    "Input",
    "NeedData",
    "Negotiated",
    "OptionResult",
    "ReplyKind",
    "StartTLS",
    "State",
    "TLSMode",
    "reply_kind",
]
