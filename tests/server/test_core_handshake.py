"""The server handshake core, sans-IO: every option, the tables, and our client core."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from pynbd.errors import ProtocolError
from pynbd.proto.constants import (
    BASE_ALLOCATION,
    IHAVEOPT,
    NBDMAGIC,
    OPT_REPLY_MAGIC,
    Info,
    Opt,
    Rep,
    TransmissionFlag,
)
from pynbd.proto.handshake import HandshakeConfig
from pynbd.proto.records import InfoRequest, MetaContextRequest, OptionReply, unpack_info
from pynbd.proto.server import (
    NEED_DATA,
    Disconnect,
    ExportSpec,
    ServerConfig,
    ServerConnection,
    ServerHandshake,
    StartTLS,
    TLSPolicy,
    TransmissionStarted,
)
from pynbd.proto.server_handshake import TRANSITIONS, Input, State

from .helpers import full_spec, handshake

DISK = full_spec("disk", 1 << 20, description="the disk")
OTHER = ExportSpec("other", 4096, read_only=True)


def make(**kwargs: Any) -> ServerConnection:
    options: dict[str, Any] = {"default_export": "disk"}
    options.update(kwargs)
    return ServerConnection(ServerConfig({"disk": DISK, "other": OTHER}, **options))


def opened(flags: int = 3, **kwargs: Any) -> ServerConnection:
    """A server past the greeting and client flags."""
    conn = make(**kwargs)
    assert conn.data_to_send() == struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3)
    conn.receive_data(struct.pack(">I", flags))
    assert conn.next_event() is NEED_DATA
    return conn


#: The event each connection gave after its last option (see ``option``).
LAST_EVENT: dict[int, object] = {}


def option(conn: ServerConnection, opt: int, data: bytes = b"") -> list[OptionReply]:
    """Send one option; return every reply to it (the event goes to LAST_EVENT)."""
    conn.receive_data(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)
    LAST_EVENT[id(conn)] = conn.next_event()
    out = conn.data_to_send()
    replies = []
    while out:
        magic, o, rep, length = struct.unpack(">QIII", out[:20])
        assert magic == OPT_REPLY_MAGIC
        assert o == opt
        replies.append(OptionReply(o, rep, out[20 : 20 + length]))
        out = out[20 + length :]
    return replies


def kinds(replies: list[OptionReply]) -> list[int]:
    return [r.reply for r in replies]


# -- greeting and flags ---------------------------------------------------------------


def test_greeting_is_fixed_newstyle_with_no_zeroes() -> None:
    conn = make()
    assert conn.data_to_send().hex() == "4e42444d4147494349484156454f50540003"


@pytest.mark.parametrize("flags", [4, 0x80000000, 0xFFFFFFFF])
def test_unknown_client_flags_are_fatal(flags: int) -> None:
    conn = make()
    conn.receive_data(struct.pack(">I", flags))
    with pytest.raises(ProtocolError, match="client flags"):
        conn.next_event()
    with pytest.raises(ProtocolError):  # the connection stays dead
        conn.next_event()


def test_disconnect_is_reported_once() -> None:
    conn = opened()
    conn.receive_data(b"")
    assert isinstance(conn.next_event(), Disconnect)
    assert conn.next_event() is NEED_DATA


def test_eof_during_handshake_is_a_disconnect() -> None:
    conn = opened()
    conn.receive_data(b"")
    event = conn.next_event()
    assert isinstance(event, Disconnect) and not event.soft


def test_bad_option_magic_is_fatal() -> None:
    conn = opened()
    conn.receive_data(struct.pack(">QII", 0x1234, Opt.LIST, 0))
    with pytest.raises(ProtocolError, match="magic"):
        conn.next_event()


def test_lying_option_length_is_fatal() -> None:
    conn = opened()
    conn.receive_data(struct.pack(">QII", IHAVEOPT, Opt.GO, 0xFFFFFFFF))
    with pytest.raises(ProtocolError, match="too long"):
        conn.next_event()


def test_option_waits_for_all_its_data() -> None:
    conn = opened()
    data = InfoRequest("disk", ()).pack()
    conn.receive_data(struct.pack(">QII", IHAVEOPT, Opt.INFO, len(data)) + data[:-1])
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == b""
    conn.receive_data(data[-1:])
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send()


# -- options ----------------------------------------------------------------------------


def test_abort() -> None:
    conn = opened()
    assert kinds(option(conn, Opt.ABORT, b"ignored")) == [Rep.ACK]
    event = LAST_EVENT[id(conn)]
    assert isinstance(event, Disconnect) and event.soft


def test_list() -> None:
    conn = opened()
    replies = option(conn, Opt.LIST)
    assert kinds(replies) == [Rep.SERVER, Rep.SERVER, Rep.ACK]
    assert replies[0].data == struct.pack(">I", 4) + b"disk" + b"the disk"
    assert replies[1].data == struct.pack(">I", 5) + b"other"


def test_list_with_data_or_disabled() -> None:
    conn = opened()
    assert kinds(option(conn, Opt.LIST, b"x")) == [Rep.ERR_INVALID]
    conn = opened(allow_list=False)
    assert kinds(option(conn, Opt.LIST)) == [Rep.ERR_POLICY]


@pytest.mark.parametrize("opt", [Opt.PEEK_EXPORT, 12, 0x7FFFFFFF, 0])
def test_unknown_options_are_unsupported(opt: int) -> None:
    conn = opened()
    replies = option(conn, opt, b"some data")
    assert kinds(replies) == [Rep.ERR_UNSUP]
    assert kinds(option(conn, Opt.LIST)) == [Rep.SERVER, Rep.SERVER, Rep.ACK]


def test_starttls_without_tls_is_policy() -> None:
    conn = opened()
    assert kinds(option(conn, Opt.STARTTLS, b"x")) == [Rep.ERR_INVALID]
    assert kinds(option(conn, Opt.STARTTLS)) == [Rep.ERR_POLICY]


def test_starttls_accepted_resets_negotiation() -> None:
    conn = opened(tls=TLSPolicy.OPTIONAL)
    assert kinds(option(conn, Opt.STRUCTURED_REPLY)) == [Rep.ACK]
    conn.receive_data(struct.pack(">QII", IHAVEOPT, Opt.STARTTLS, 0))
    assert isinstance(conn.next_event(), StartTLS)
    assert kinds_of(conn.data_to_send()) == [Rep.ACK]
    conn.tls_established()
    assert conn.negotiated.tls and not conn.negotiated.structured_replies
    assert kinds(option(conn, Opt.STARTTLS)) == [Rep.ERR_INVALID]  # already TLS
    # Meta contexts now need structured replies again.
    query = MetaContextRequest("disk", (BASE_ALLOCATION,)).pack()
    assert kinds(option(conn, Opt.SET_META_CONTEXT, query)) == [Rep.ERR_INVALID]


def kinds_of(out: bytes) -> list[int]:
    result = []
    while out:
        _, _, rep, length = struct.unpack(">QIII", out[:20])
        result.append(rep)
        out = out[20 + length :]
    return result


def test_data_sent_before_tls_handshake_is_fatal() -> None:
    conn = opened(tls=TLSPolicy.OPTIONAL)
    injected = struct.pack(">QII", IHAVEOPT, Opt.STARTTLS, 0) + b"plaintext"
    conn.receive_data(injected)
    assert isinstance(conn.next_event(), StartTLS)
    with pytest.raises(ProtocolError, match="between"):
        conn.tls_established()


def test_tls_established_without_starttls_is_fatal() -> None:
    with pytest.raises(ProtocolError):
        opened().tls_established()


def test_forced_tls_refuses_other_options() -> None:
    conn = opened(tls=TLSPolicy.REQUIRED)
    for opt in (Opt.LIST, Opt.INFO, Opt.STRUCTURED_REPLY, 99):
        assert kinds(option(conn, opt)) == [Rep.ERR_TLS_REQD]
    conn.receive_data(struct.pack(">QII", IHAVEOPT, Opt.EXPORT_NAME, 4) + b"disk")
    assert isinstance(conn.next_event(), Disconnect)


def test_starttls_needs_fixed_newstyle_client() -> None:
    conn = opened(flags=0, tls=TLSPolicy.OPTIONAL)
    assert kinds(option(conn, Opt.STARTTLS)) == [Rep.ERR_POLICY]


def infos(replies: list[OptionReply]) -> dict[int, object]:
    return {
        struct.unpack(">H", r.data[:2])[0]: unpack_info(r.data)
        for r in replies
        if r.reply == Rep.INFO
    }


def test_info_answers_what_was_asked() -> None:
    conn = opened()
    request = InfoRequest("", (Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE, 77)).pack()
    replies = option(conn, Opt.INFO, request)
    assert replies[-1].reply == Rep.ACK
    got = infos(replies)
    assert set(got) == {Info.EXPORT, Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE}
    assert got[Info.NAME].name == "disk"  # type: ignore[attr-defined]
    assert got[Info.DESCRIPTION].description == "the disk"  # type: ignore[attr-defined]
    export = got[Info.EXPORT]
    assert export.size == 1 << 20  # type: ignore[attr-defined]
    # INFO stays in negotiation.
    assert kinds(option(conn, Opt.LIST))[-1] == Rep.ACK


def test_info_without_requests_sends_only_export() -> None:
    conn = opened()
    replies = option(conn, Opt.INFO, InfoRequest("disk").pack())
    assert kinds(replies) == [Rep.INFO, Rep.ACK]


@pytest.mark.parametrize("opt", [Opt.INFO, Opt.GO])
def test_info_unknown_export(opt: Opt) -> None:
    conn = opened()
    assert kinds(option(conn, opt, InfoRequest("nope").pack())) == [Rep.ERR_UNKNOWN]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x00\x00\x10abc\x00\x00",  # name longer than the option
        InfoRequest("disk", (1, 2)).pack()[:-1],  # count does not match
        b"\x00\x00\x00\x02\xff\xfe\x00\x00",  # not UTF-8
    ],
)
def test_info_malformed_is_invalid_not_fatal(data: bytes) -> None:
    conn = opened()
    assert kinds(option(conn, Opt.GO, data)) == [Rep.ERR_INVALID]
    assert kinds(option(conn, Opt.LIST))[-1] == Rep.ACK


def test_default_export_unknown_without_default() -> None:
    conn = opened(default_export=None)
    assert kinds(option(conn, Opt.GO, InfoRequest("").pack())) == [Rep.ERR_UNKNOWN]


def test_go_enters_transmission() -> None:
    conn = opened()
    replies = option(conn, Opt.GO, InfoRequest("other", (Info.BLOCK_SIZE,)).pack())
    assert kinds(replies) == [Rep.INFO, Rep.INFO, Rep.ACK]
    event = LAST_EVENT[id(conn)]
    assert isinstance(event, TransmissionStarted)
    assert event.export is OTHER
    assert event.negotiated.flags & TransmissionFlag.READ_ONLY
    assert event.negotiated.block_size_requested
    assert conn.in_transmission


def test_block_size_required() -> None:
    spec = ExportSpec("b", 1 << 20, minimum_block=512, block_size_required=True)
    conn = ServerConnection(ServerConfig({"b": spec}))
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", 3))
    replies = option(conn, Opt.GO, InfoRequest("b").pack())
    # The sizes are sent anyway, then the refusal (spec: to save a round trip).
    assert kinds(replies) == [Rep.INFO, Rep.INFO, Rep.ERR_BLOCK_SIZE_REQD]
    replies = option(conn, Opt.GO, InfoRequest("b", (Info.BLOCK_SIZE,)).pack())
    assert kinds(replies)[-1] == Rep.ACK
    # EXPORT_NAME cannot promise anything: the server closes.
    conn = ServerConnection(ServerConfig({"b": spec}))
    conn.receive_data(
        struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, Opt.EXPORT_NAME, 1) + b"b"
    )
    assert isinstance(conn.next_event(), Disconnect)


def test_structured_and_extended() -> None:
    conn = opened()
    assert kinds(option(conn, Opt.STRUCTURED_REPLY, b"x")) == [Rep.ERR_INVALID]
    assert kinds(option(conn, Opt.EXTENDED_HEADERS, b"x")) == [Rep.ERR_INVALID]
    assert kinds(option(conn, Opt.EXTENDED_HEADERS)) == [Rep.ACK]
    assert kinds(option(conn, Opt.STRUCTURED_REPLY)) == [Rep.ERR_EXT_HEADER_REQD]
    assert conn.negotiated.extended_headers and conn.negotiated.structured_replies


def test_structured_and_extended_can_be_disabled() -> None:
    conn = opened(structured_replies=False, extended_headers=False)
    assert kinds(option(conn, Opt.STRUCTURED_REPLY)) == [Rep.ERR_UNSUP]
    assert kinds(option(conn, Opt.EXTENDED_HEADERS)) == [Rep.ERR_UNSUP]


def test_export_name_after_extended_headers_is_fatal() -> None:
    conn = opened()
    option(conn, Opt.EXTENDED_HEADERS)
    conn.receive_data(struct.pack(">QII", IHAVEOPT, Opt.EXPORT_NAME, 4) + b"disk")
    with pytest.raises(ProtocolError, match="EXPORT_NAME"):
        conn.next_event()


@pytest.mark.parametrize(("flags", "zeroes"), [(1, 124), (3, 0)])
def test_export_name(flags: int, zeroes: int) -> None:
    conn = opened(flags)
    conn.receive_data(struct.pack(">QII", IHAVEOPT, Opt.EXPORT_NAME, 0))
    event = conn.next_event()
    assert isinstance(event, TransmissionStarted)
    out = conn.data_to_send()
    assert len(out) == 10 + zeroes
    size, tflags = struct.unpack(">QH", out[:10])
    assert size == 1 << 20 and tflags == event.negotiated.flags
    assert out[10:] == bytes(zeroes)


def test_export_name_unknown_closes() -> None:
    conn = opened()
    conn.receive_data(struct.pack(">QII", IHAVEOPT, Opt.EXPORT_NAME, 4) + b"nope")
    event = conn.next_event()
    assert isinstance(event, Disconnect) and "nope" in event.reason
    assert conn.data_to_send() == b""


def test_trailing_data_after_export_name_goes_to_transmission() -> None:
    conn = opened()
    request = struct.pack(">IHHQQI", 0x25609513, 0, 3, 9, 0, 0)  # FLUSH
    conn.receive_data(struct.pack(">QII", IHAVEOPT, Opt.EXPORT_NAME, 0) + request)
    assert isinstance(conn.next_event(), TransmissionStarted)
    event = conn.next_event()
    assert getattr(event, "cookie", None) == 9


def test_meta_context_needs_structured_replies() -> None:
    conn = opened()
    data = MetaContextRequest("disk", (BASE_ALLOCATION,)).pack()
    assert kinds(option(conn, Opt.LIST_META_CONTEXT, data)) == [Rep.ERR_INVALID]
    assert kinds(option(conn, Opt.SET_META_CONTEXT, data)) == [Rep.ERR_INVALID]


@pytest.mark.parametrize(
    ("queries", "listed"),
    [
        ((), [BASE_ALLOCATION]),
        (("base:",), [BASE_ALLOCATION]),
        ((BASE_ALLOCATION, BASE_ALLOCATION), [BASE_ALLOCATION]),
        (("base:other", "qemu:dirty-bitmap:x", "nocolon"), []),
    ],
)
def test_list_meta_context(queries: tuple[str, ...], listed: list[str]) -> None:
    conn = opened()
    option(conn, Opt.STRUCTURED_REPLY)
    replies = option(conn, Opt.LIST_META_CONTEXT, MetaContextRequest("disk", queries).pack())
    assert replies[-1].reply == Rep.ACK
    entries = [r.data for r in replies[:-1]]
    assert entries == [b"\0\0\0\0" + name.encode() for name in listed]


def test_set_meta_context_selects_and_replaces() -> None:
    conn = opened()
    option(conn, Opt.STRUCTURED_REPLY)
    # "base:" selects nothing in SET; no query selects nothing.
    for queries in ((), ("base:",)):
        data = MetaContextRequest("disk", queries).pack()
        assert kinds(option(conn, Opt.SET_META_CONTEXT, data)) == [Rep.ACK]
    replies = option(
        conn, Opt.SET_META_CONTEXT, MetaContextRequest("disk", (BASE_ALLOCATION,)).pack()
    )
    assert kinds(replies) == [Rep.META_CONTEXT, Rep.ACK]
    cid = struct.unpack(">I", replies[0].data[:4])[0]
    assert cid != 0 and replies[0].data[4:] == BASE_ALLOCATION.encode()
    # A failed SET still clears the selection.
    assert kinds(option(conn, Opt.SET_META_CONTEXT, b"junk")) == [Rep.ERR_INVALID]
    option(conn, Opt.GO, InfoRequest("disk").pack())
    event = LAST_EVENT[id(conn)]
    assert isinstance(event, TransmissionStarted) and event.negotiated.meta_contexts == {}


def test_meta_contexts_dropped_when_go_names_another_export() -> None:
    conn = opened()
    option(conn, Opt.EXTENDED_HEADERS)
    option(conn, Opt.SET_META_CONTEXT, MetaContextRequest("other", (BASE_ALLOCATION,)).pack())
    replies = option(conn, Opt.GO, InfoRequest("disk").pack())
    assert kinds(replies)[-1] == Rep.ACK
    event = LAST_EVENT[id(conn)]
    assert isinstance(event, TransmissionStarted)
    assert event.negotiated.meta_contexts == {}
    assert not event.negotiated.flags & TransmissionFlag.BLOCK_STATUS_PAYLOAD


def test_meta_contexts_kept_for_default_export_alias() -> None:
    conn = opened()
    option(conn, Opt.STRUCTURED_REPLY)
    option(conn, Opt.SET_META_CONTEXT, MetaContextRequest("", (BASE_ALLOCATION,)).pack())
    option(conn, Opt.GO, InfoRequest("disk").pack())
    event = LAST_EVENT[id(conn)]
    assert isinstance(event, TransmissionStarted)
    assert list(event.negotiated.meta_contexts.values()) == [BASE_ALLOCATION]


def test_info_and_go_flags_agree() -> None:
    conn = opened()
    option(conn, Opt.EXTENDED_HEADERS)
    option(conn, Opt.SET_META_CONTEXT, MetaContextRequest("disk", (BASE_ALLOCATION,)).pack())
    info = infos(option(conn, Opt.INFO, InfoRequest("disk").pack()))[Info.EXPORT]
    go = infos(option(conn, Opt.GO, InfoRequest("disk").pack()))[Info.EXPORT]
    assert info == go
    assert go.flags & TransmissionFlag.BLOCK_STATUS_PAYLOAD  # type: ignore[attr-defined]


def test_shutdown_refuses_options_but_abort() -> None:
    conn = opened()
    conn.shutdown()
    assert kinds(option(conn, Opt.LIST)) == [Rep.ERR_SHUTDOWN]
    assert kinds(option(conn, Opt.GO, InfoRequest("disk").pack())) == [Rep.ERR_SHUTDOWN]
    assert kinds(option(conn, Opt.ABORT)) == [Rep.ACK]


def test_tls_only_export() -> None:
    spec = ExportSpec("secret", 4096, tls_only=True)
    conn = ServerConnection(ServerConfig({"secret": spec, "disk": DISK}, tls=TLSPolicy.OPTIONAL))
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", 3))
    assert kinds(option(conn, Opt.LIST)) == [Rep.SERVER, Rep.ACK]  # hidden
    assert kinds(option(conn, Opt.GO, InfoRequest("secret").pack())) == [Rep.ERR_TLS_REQD]


# -- the tables -------------------------------------------------------------------------


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("event", list(Input))
def test_transition_table_exhaustively(state: State, event: Input) -> None:
    machine = ServerHandshake(ServerConfig({"disk": DISK}))
    machine.state = state
    if (state, event) in TRANSITIONS:
        machine._transition(event)
        assert machine.state is TRANSITIONS[(state, event)]
    else:
        with pytest.raises(ProtocolError):
            machine._transition(event)


def test_closed_and_transmission_states_are_final() -> None:
    assert not any(s in (State.CLOSED, State.TRANSMISSION) for s, _ in TRANSITIONS)


# -- against our client core ------------------------------------------------------------


@pytest.mark.parametrize("bytewise", [False, True])
@pytest.mark.parametrize(("extended", "structured"), [(True, True), (False, True), (False, False)])
def test_client_core_negotiates(extended: bool, structured: bool, bytewise: bool) -> None:
    conn = make()
    config = HandshakeConfig(extended_headers=extended, structured_replies=structured)
    result = handshake(conn, config, bytewise=bytewise)
    assert result.size == 1 << 20 and result.canonical_name == "disk"
    assert result.description == "the disk"
    assert result.extended_headers is extended
    assert result.structured_replies is structured
    assert bool(result.meta_contexts) is structured
    assert bool(result.flags & TransmissionFlag.SEND_DF) is structured
    assert conn.in_transmission
    assert conn.negotiated.entered_by == "go"


def test_client_core_lists_in_negotiation_mode() -> None:
    conn = make()
    config = HandshakeConfig(go=False, list_exports=True, list_meta_contexts=True)
    result = handshake(conn, config)
    assert result.exports is not None
    assert [e.name for e in result.exports] == ["disk", "other"]
    assert result.available_meta_contexts == (BASE_ALLOCATION,)
    assert not result.in_transmission
    assert conn.handshake.state.value == "closed"  # the client sent ABORT
    assert conn.next_event() is NEED_DATA  # Disconnect was reported once
