"""The client handshake machine (pynbd.proto.handshake), driven by a fake server.

The fake server (tests/proto/fake_server.py) is written from the spec, not from
pynbd's records. Every scenario runs twice: the server's bytes given whole, and one
byte at a time.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import pytest

from pynbd.errors import (
    ExportNotFound,
    InvalidRequest,
    NBDError,
    OptionError,
    ProtocolError,
    TLSError,
)
from pynbd.proto.constants import (
    BASE_ALLOCATION,
    REP_ERROR_BIT,
    Opt,
    Rep,
    TransmissionFlag,
)
from pynbd.proto.handshake import (
    NEED_DATA,
    REPLY_OUTCOMES,
    TRANSITIONS,
    ClientHandshake,
    HandshakeConfig,
    HandshakeDone,
    Input,
    Negotiated,
    OptionResult,
    ReplyKind,
    StartTLS,
    State,
    TLSMode,
    _Abort,
    reply_kind,
)
from tests.proto.fake_server import (
    FLAGS,
    IHAVEOPT,
    NBDMAGIC,
    REPLY_MAGIC,
    SIZE,
    FakeServer,
    h,
    info_export,
    lstr,
    opt,
    parse_queries,
    rep,
)


@dataclass
class Run:
    result: Negotiated | None
    handshake: ClientHandshake
    server: FakeServer
    error: NBDError | None = None
    events: list[object] = field(default_factory=list)
    delivered: int = 0
    undelivered: bytes = b""  # server bytes the driver still held at the end


def drive(
    server: FakeServer,
    config: HandshakeConfig | None = None,
    *,
    bytewise: bool = False,
    cut: int | None = None,
    on_tls: Callable[[ClientHandshake], None] | None = None,
) -> Run:
    """Run a handshake against ``server``; ``cut``: EOF after that many server bytes.

    Errors are returned in ``Run.error`` (so a test can look at what was queued).
    """
    hs = ClientHandshake(config or HandshakeConfig())
    run = Run(None, hs, server)
    to_client = bytearray(server.greeting())
    for _ in range(100_000):
        try:
            event = hs.next_event()
        except NBDError as exc:
            run.error = exc
            return run
        run.events.append(event)
        out = hs.data_to_send()
        if out:
            to_client += server.feed(out)
        if event is NEED_DATA:
            if cut is not None and run.delivered >= cut:
                hs.receive_data(b"")
                continue
            if not to_client:
                assert server.closed, "deadlock: both sides wait"
                hs.receive_data(b"")
                continue
            n = 1 if bytewise else len(to_client)
            if cut is not None:
                n = min(n, cut - run.delivered)
            hs.receive_data(bytes(to_client[:n]))
            del to_client[:n]
            run.delivered += n
        elif isinstance(event, StartTLS):
            if on_tls is not None:
                on_tls(hs)
            try:
                hs.tls_established()
            except NBDError as exc:
                run.error = exc
                return run
        else:
            assert isinstance(event, HandshakeDone)
            run.result = event.result
            run.undelivered = bytes(to_client)
            return run
    raise AssertionError("the handshake did not finish")


@pytest.fixture(params=[False, True], ids=["whole", "bytewise"])
def bytewise(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def ok(run: Run) -> Negotiated:
    if run.error is not None:
        raise run.error
    assert run.result is not None
    return run.result


def fails(run: Run, exc: type[NBDError]) -> NBDError:
    assert isinstance(run.error, exc), repr(run.error)
    assert run.result is None
    # The error sticks: the core does not pretend the handshake can go on.
    with pytest.raises(exc):
        run.handshake.next_event()
    return run.error


# --- oldstyle and plain newstyle --------------------------------------------------------


def test_oldstyle(bytewise: bool) -> None:
    server = FakeServer(style="oldstyle")
    run = drive(server, bytewise=bytewise)
    res = ok(run)
    assert res.style == "oldstyle"
    assert res.size == SIZE and res.flags == FLAGS
    assert res.in_transmission and not res.structured_replies
    assert server.received == b""  # the client says nothing in oldstyle


def test_oldstyle_tls_required(bytewise: bool) -> None:
    fails(
        drive(
            FakeServer(style="oldstyle"), HandshakeConfig(tls=TLSMode.REQUIRE), bytewise=bytewise
        ),
        TLSError,
    )


def test_oldstyle_tls_allowed(bytewise: bool) -> None:
    res = ok(
        drive(FakeServer(style="oldstyle"), HandshakeConfig(tls=TLSMode.ALLOW), bytewise=bytewise)
    )
    assert not res.tls


@pytest.mark.parametrize("no_zeroes", [False, True])
def test_newstyle_not_fixed(bytewise: bool, no_zeroes: bool) -> None:
    server = FakeServer(style="newstyle", no_zeroes=no_zeroes)
    run = drive(server, HandshakeConfig(export_name="disk", tls=TLSMode.ALLOW), bytewise=bytewise)
    res = ok(run)
    assert res.style == "newstyle" and res.no_zeroes is no_zeroes
    # Client flags: no FIXED_NEWSTYLE, NO_ZEROES mirrored; then only EXPORT_NAME.
    flags = h("00000002") if no_zeroes else h("00000000")
    assert bytes(server.received) == flags + h("49484156454f5054 00000001 00000004 6469736b")
    assert res.size == SIZE and res.flags == FLAGS and res.in_transmission
    assert run.handshake.trailing_data == b""


def test_newstyle_not_fixed_tls_required(bytewise: bool) -> None:
    run = drive(
        FakeServer(style="newstyle"), HandshakeConfig(tls=TLSMode.REQUIRE), bytewise=bytewise
    )
    fails(run, TLSError)
    assert run.server.options == []


@pytest.mark.parametrize("no_zeroes", [False, True])
def test_export_name_fallback(bytewise: bool, no_zeroes: bool) -> None:
    """GO -> ERR_UNSUP -> EXPORT_NAME, with and without the 124 zero bytes."""
    server = FakeServer(
        no_zeroes=no_zeroes, handlers={Opt.GO: lambda s, o, d: rep(o, Rep.ERR_UNSUP)}
    )
    run = drive(server, HandshakeConfig(export_name="disk"), bytewise=bytewise)
    res = ok(run)
    assert server.option_names() == [
        Opt.EXTENDED_HEADERS,
        Opt.STRUCTURED_REPLY,
        Opt.SET_META_CONTEXT,
        Opt.GO,
        Opt.EXPORT_NAME,
    ]
    assert server.client_flags == (3 if no_zeroes else 1)
    assert res.size == SIZE and res.flags == FLAGS and res.in_transmission
    assert res.structured_replies  # the ACK to STRUCTURED_REPLY still holds
    assert res.meta_contexts == {}  # but contexts belong to GO (rule 5)
    assert res.no_zeroes is no_zeroes
    assert run.handshake.trailing_data == b""


def test_export_name_reply_then_transmission_bytes(bytewise: bool) -> None:
    """Bytes after the EXPORT_NAME reply (and its zeroes) are handed on, not eaten."""

    def export_name(s: FakeServer, o: int, d: bytes) -> bytes:
        return FakeServer.default(s, o, d) + b"\x67\x44\x66\x98tail"

    server = FakeServer(style="newstyle", no_zeroes=False, handlers={Opt.EXPORT_NAME: export_name})
    run = drive(server, bytewise=bytewise)
    ok(run)
    # Whatever the read sizes, nothing after the reply is eaten by the handshake.
    assert run.handshake.trailing_data + run.undelivered == b"\x67\x44\x66\x98tail"


def test_export_name_closed_is_export_not_found(bytewise: bool) -> None:
    run = drive(
        FakeServer(style="newstyle"), HandshakeConfig(export_name="nope"), bytewise=bytewise
    )
    err = fails(run, ExportNotFound)
    assert isinstance(err, OptionError) and err.reply == Rep.ERR_UNKNOWN


# --- GO ------------------------------------------------------------------------------------


def test_go_success(bytewise: bool) -> None:
    server = FakeServer(block_size=(512, 4096, 1 << 20))
    run = drive(server, HandshakeConfig(export_name="disk"), bytewise=bytewise)
    res = ok(run)
    assert res.in_transmission and res.style == "fixed newstyle" and res.no_zeroes
    assert res.export_name == "disk"
    assert res.size == SIZE and res.flags == FLAGS
    assert isinstance(res.flags, TransmissionFlag)
    assert res.canonical_name == "canonical-disk"
    assert res.description == "a disk"
    assert (res.minimum_block, res.preferred_block, res.maximum_payload) == (512, 4096, 1 << 20)
    assert res.block_size_advertised
    assert res.structured_replies and not res.extended_headers
    assert res.meta_contexts == {BASE_ALLOCATION: 7}
    assert run.handshake.trailing_data == b""
    # The client's exact bytes: flags, then one option at a time.
    assert bytes(server.received) == (
        h("00000003")
        + h("49484156454f5054 0000000b 00000000")  # EXTENDED_HEADERS
        + h("49484156454f5054 00000008 00000000")  # STRUCTURED_REPLY
        + h("49484156454f5054 0000000a 0000001f")  # SET_META_CONTEXT, 31 bytes
        + h("00000004 6469736b 00000001 0000000f")
        + b"base:allocation"
        + h("49484156454f5054 00000007 00000010")  # GO, 16 bytes
        + h("00000004 6469736b 0003 0001 0002 0003")  # NAME, DESCRIPTION, BLOCK_SIZE
    )


def test_go_without_block_size_request(bytewise: bool) -> None:
    server = FakeServer(block_size=None)
    res = ok(drive(server, HandshakeConfig(request_block_size=False), bytewise=bytewise))
    assert server.options[-1] == (Opt.GO, h("00000000 0002 0001 0002"))
    assert not res.block_size_advertised
    assert (res.minimum_block, res.preferred_block, res.maximum_payload) == (1, 4096, 1 << 25)


def test_go_unknown_info_ignored(bytewise: bool) -> None:
    def go(s: FakeServer, o: int, d: bytes) -> bytes:
        return rep(o, Rep.INFO, h("7777 0102")) + FakeServer.default(s, o, d)

    res = ok(drive(FakeServer(handlers={Opt.GO: go}), bytewise=bytewise))
    assert res.size == SIZE


def test_go_without_info_export(bytewise: bool) -> None:
    server = FakeServer(handlers={Opt.GO: lambda s, o, d: rep(o, Rep.ACK)})
    fails(drive(server, bytewise=bytewise), ProtocolError)


def test_go_unknown_export(bytewise: bool) -> None:
    run = drive(FakeServer(), HandshakeConfig(export_name="nope"), bytewise=bytewise)
    err = fails(run, ExportNotFound)
    assert isinstance(err, OptionError)
    assert err.option == Opt.GO and err.reply == Rep.ERR_UNKNOWN
    assert err.message == "no such export"
    # A soft disconnect is queued for the driver (spec: the client ends haggling with
    # NBD_OPT_ABORT).
    assert run.handshake.data_to_send() == h("49484156454f5054 00000002 00000000")


def test_go_unsup_after_extended_headers_is_an_error(bytewise: bool) -> None:
    # A server that agreed to extended headers MUST support GO; EXPORT_NAME is forbidden.
    server = FakeServer(extended=True, handlers={Opt.GO: lambda s, o, d: rep(o, Rep.ERR_UNSUP)})
    err = fails(drive(server, bytewise=bytewise), OptionError)
    assert isinstance(err, OptionError) and err.reply == Rep.ERR_UNSUP
    assert Opt.EXPORT_NAME not in server.option_names()


@pytest.mark.parametrize(
    "sizes",
    [
        (3, 4096, 1 << 20),
        (1 << 17, 1 << 17, 1 << 20),
        (512, 256, 1 << 20),
        (512, 4096, 2048),
        (4096, 4096, 4096 + 512),
        (0, 4096, 4096),
    ],
)
def test_go_invalid_block_sizes(bytewise: bool, sizes: tuple[int, int, int]) -> None:
    fails(drive(FakeServer(block_size=sizes), bytewise=bytewise), ProtocolError)


# --- TLS ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [TLSMode.ALLOW, TLSMode.REQUIRE])
def test_starttls(bytewise: bool, mode: TLSMode) -> None:
    server = FakeServer(tls=True, extended=True)
    seen: list[Negotiated] = []

    def on_tls(hs: ClientHandshake) -> None:
        # Only STARTTLS went before TLS (the plan sends it first); simulate earlier
        # negotiation to check that rule 4 throws it away.
        assert server.option_names() == [Opt.STARTTLS]
        hs.result.structured_replies = True
        hs.result.meta_contexts = {"stale": 1}
        hs.result.size = 1
        seen.append(hs.result)

    run = drive(server, HandshakeConfig(tls=mode), bytewise=bytewise, on_tls=on_tls)
    res = ok(run)
    assert any(isinstance(e, StartTLS) for e in run.events)
    assert res is not seen[0] and res.tls
    assert res.meta_contexts == {BASE_ALLOCATION: 7} and res.size == SIZE
    assert server.option_names() == [
        Opt.STARTTLS,
        Opt.EXTENDED_HEADERS,
        Opt.SET_META_CONTEXT,
        Opt.GO,
    ]
    assert res.extended_headers and res.structured_replies


def test_tls_required_but_refused(bytewise: bool) -> None:
    run = drive(FakeServer(tls=False), HandshakeConfig(tls=TLSMode.REQUIRE), bytewise=bytewise)
    fails(run, TLSError)
    assert run.server.option_names() == [Opt.STARTTLS]
    assert run.handshake.data_to_send() == opt(Opt.ABORT)


def test_tls_allowed_but_refused(bytewise: bool) -> None:
    server = FakeServer(tls=False)
    res = ok(drive(server, HandshakeConfig(tls=TLSMode.ALLOW), bytewise=bytewise))
    assert not res.tls and res.in_transmission
    assert server.option_names()[:2] == [Opt.STARTTLS, Opt.EXTENDED_HEADERS]


def test_tls_disabled_sends_no_starttls(bytewise: bool) -> None:
    server = FakeServer(tls=True)
    ok(drive(server, bytewise=bytewise))
    assert Opt.STARTTLS not in server.option_names()


def test_data_right_after_starttls_ack(bytewise: bool) -> None:
    server = FakeServer(
        tls=True, handlers={Opt.STARTTLS: lambda s, o, d: rep(o, Rep.ACK) + b"\x16\x03"}
    )
    fails(drive(server, HandshakeConfig(tls=TLSMode.REQUIRE), bytewise=bytewise), ProtocolError)


def test_data_before_tls_established() -> None:
    """The server talks in plaintext after its STARTTLS ACK, before the upgrade."""
    hs = ClientHandshake(HandshakeConfig(tls=TLSMode.REQUIRE))
    hs.receive_data(NBDMAGIC + IHAVEOPT + h("0003"))
    assert hs.next_event() is NEED_DATA
    assert hs.data_to_send() == h("00000003") + opt(Opt.STARTTLS)
    hs.receive_data(rep(Opt.STARTTLS, Rep.ACK))
    assert isinstance(hs.next_event(), StartTLS)
    assert isinstance(hs.next_event(), StartTLS)  # asking again changes nothing
    hs.receive_data(b"plaintext")
    with pytest.raises(ProtocolError):
        hs.tls_established()
    with pytest.raises(ProtocolError):
        hs.next_event()
    with pytest.raises(ProtocolError):
        hs.tls_established()


def test_tls_established_without_starttls() -> None:
    hs = ClientHandshake()
    with pytest.raises(ProtocolError):
        hs.tls_established()


# --- extended headers, structured replies, meta contexts --------------------------------


def test_extended_headers_ack(bytewise: bool) -> None:
    server = FakeServer(extended=True)
    res = ok(drive(server, bytewise=bytewise))
    assert res.extended_headers and res.structured_replies
    assert Opt.STRUCTURED_REPLY not in server.option_names()


def test_extended_refused_structured_ack(bytewise: bool) -> None:
    server = FakeServer(extended=False, structured=True)
    res = ok(drive(server, bytewise=bytewise))
    assert not res.extended_headers and res.structured_replies
    assert server.option_names()[:2] == [Opt.EXTENDED_HEADERS, Opt.STRUCTURED_REPLY]


def test_no_reply_styles_no_meta_contexts(bytewise: bool) -> None:
    server = FakeServer(extended=False, structured=False)
    res = ok(drive(server, bytewise=bytewise))
    assert not res.structured_replies and res.meta_contexts == {}
    assert server.option_names() == [Opt.EXTENDED_HEADERS, Opt.STRUCTURED_REPLY, Opt.GO]


def test_nothing_asked(bytewise: bool) -> None:
    server = FakeServer()
    config = HandshakeConfig(structured_replies=False, extended_headers=False)
    res = ok(drive(server, config, bytewise=bytewise))
    assert server.option_names() == [Opt.GO]
    assert not res.structured_replies


def test_set_meta_context(bytewise: bool) -> None:
    contexts = {BASE_ALLOCATION: 7, "qemu:dirty-bitmap:b": 9, "qemu:allocation-depth": 3}
    server = FakeServer(contexts=contexts)
    wanted = (BASE_ALLOCATION, "qemu:dirty-bitmap:b", "x-unknown:thing")
    res = ok(drive(server, HandshakeConfig(meta_contexts=wanted), bytewise=bytewise))
    assert res.meta_contexts == {BASE_ALLOCATION: 7, "qemu:dirty-bitmap:b": 9}
    set_meta = [d for o, d in server.options if o == Opt.SET_META_CONTEXT]
    assert parse_queries(set_meta[0]) == list(wanted)


def test_set_meta_context_refused(bytewise: bool) -> None:
    server = FakeServer(handlers={Opt.SET_META_CONTEXT: lambda s, o, d: rep(o, Rep.ERR_INVALID)})
    res = ok(drive(server, bytewise=bytewise))
    assert res.meta_contexts == {} and res.in_transmission


def test_negotiation_mode(bytewise: bool) -> None:
    """LIST and LIST_META_CONTEXT with go=False: INFO, then ABORT; no transmission."""
    contexts = {BASE_ALLOCATION: 7, "qemu:allocation-depth": 3}
    server = FakeServer(contexts=contexts, extended=True)
    config = HandshakeConfig(go=False, list_exports=True, list_meta_contexts=True)
    run = drive(server, config, bytewise=bytewise)
    res = ok(run)
    assert server.option_names() == [
        Opt.LIST,
        Opt.EXTENDED_HEADERS,
        Opt.LIST_META_CONTEXT,
        Opt.INFO,
        Opt.ABORT,
    ]
    assert not res.in_transmission
    assert res.exports is not None
    assert [(e.name, e.description) for e in res.exports] == [
        ("", "the default"),
        ("disk", "a disk"),
    ]
    assert res.available_meta_contexts == (BASE_ALLOCATION, "qemu:allocation-depth")
    assert res.meta_contexts == {}
    assert res.size == SIZE and res.canonical_name == "canonical-"
    # LIST_META_CONTEXT carries the export name and no query (all contexts).
    assert server.options[2][1] == h("00000000 00000000")
    assert server.options[-1] == (Opt.ABORT, b"")


def test_list_refused_and_meta_context_list_error(bytewise: bool) -> None:
    server = FakeServer(
        handlers={
            Opt.LIST: lambda s, o, d: rep(o, Rep.ERR_POLICY),
            # Entries followed by an error: the client MUST disregard them.
            Opt.LIST_META_CONTEXT: lambda s, o, d: (
                rep(o, Rep.META_CONTEXT, h("00000000") + b"base:allocation")
                + rep(o, Rep.ERR_TOO_BIG)
            ),
        }
    )
    config = HandshakeConfig(go=False, list_exports=True, list_meta_contexts=True)
    res = ok(drive(server, config, bytewise=bytewise))
    assert res.exports is None and res.available_meta_contexts is None


def test_list_refusal_is_recorded(bytewise: bool) -> None:
    server = FakeServer(handlers={Opt.LIST: lambda s, o, d: rep(o, Rep.ERR_POLICY, b"no")})
    config = HandshakeConfig(go=False, list_exports=True)
    res = ok(drive(server, config, bytewise=bytewise))
    assert res.exports is None
    assert set(res.refused) == {Opt.LIST, Opt.EXTENDED_HEADERS}  # (this server has none)
    err = res.refused[Opt.LIST]
    assert (err.option, err.reply, err.message) == (Opt.LIST, Rep.ERR_POLICY, "no")
    assert res.size == SIZE  # INFO went on without the list


def test_negotiation_mode_keeps_the_list_when_info_is_refused(bytewise: bool) -> None:
    """A refused INFO ends negotiation mode cleanly (ABORT), keeping what came before."""
    server = FakeServer(handlers={Opt.INFO: lambda s, o, d: rep(o, Rep.ERR_UNKNOWN, b"nope")})
    config = HandshakeConfig(go=False, list_exports=True, export_name="missing")
    res = ok(drive(server, config, bytewise=bytewise))
    assert res.exports is not None and [e.name for e in res.exports] == ["", "disk"]
    assert not res.in_transmission and res.size is None
    err = res.refused[Opt.INFO]
    assert isinstance(err, ExportNotFound) and err.message == "nope"
    assert server.option_names()[-2:] == [Opt.INFO, Opt.ABORT]


def test_negotiation_mode_without_info(bytewise: bool) -> None:
    server = FakeServer()
    config = HandshakeConfig(go=False, list_exports=True, info=False)
    res = ok(drive(server, config, bytewise=bytewise))
    assert Opt.INFO not in server.option_names()
    assert server.option_names()[0] == Opt.LIST and server.option_names()[-1] == Opt.ABORT
    assert res.exports is not None and res.size is None and not res.in_transmission


def test_go_refusal_still_raises(bytewise: bool) -> None:
    """With go=True a refused GO is fatal whatever was learned: nothing to use."""
    server = FakeServer(handlers={Opt.GO: lambda s, o, d: rep(o, Rep.ERR_UNKNOWN)})
    fails(drive(server, HandshakeConfig(list_exports=True), bytewise=bytewise), ExportNotFound)


def test_negotiated_getters() -> None:
    n = Negotiated(flags=TransmissionFlag(FLAGS), structured_replies=False)
    assert n.can_flush() and n.can_fua() and n.can_trim() and n.can_zero()
    assert n.can_multi_conn() and not n.can_cache() and not n.is_read_only()
    assert not n.can_df() and not n.can_meta_context()
    n = Negotiated(
        flags=TransmissionFlag.HAS_FLAGS | TransmissionFlag.READ_ONLY | TransmissionFlag.SEND_DF,
        structured_replies=True,
        meta_contexts={BASE_ALLOCATION: 1},
    )
    assert n.is_read_only() and n.can_df() and n.can_meta_context(BASE_ALLOCATION)
    assert not n.can_flush() and not n.can_block_status_payload()


def test_negotiation_mode_info_unsup_falls_back_to_export_name(bytewise: bool) -> None:
    server = FakeServer(handlers={Opt.INFO: lambda s, o, d: rep(o, Rep.ERR_UNSUP)})
    res = ok(drive(server, HandshakeConfig(go=False), bytewise=bytewise))
    assert res.in_transmission  # the driver must now send NBD_CMD_DISC
    assert server.option_names()[-1] == Opt.EXPORT_NAME


# --- misbehaving servers ----------------------------------------------------------------


def test_reply_for_wrong_option(bytewise: bool) -> None:
    server = FakeServer(handlers={Opt.STRUCTURED_REPLY: lambda s, o, d: rep(Opt.GO, Rep.ACK)})
    fails(drive(server, bytewise=bytewise), ProtocolError)


def test_second_final_reply(bytewise: bool) -> None:
    """A reply with no option in flight is taken for the next option's: wrong option."""
    server = FakeServer(
        handlers={Opt.STRUCTURED_REPLY: lambda s, o, d: rep(o, Rep.ACK) + rep(o, Rep.ACK)}
    )
    fails(drive(server, bytewise=bytewise), ProtocolError)


def test_reply_with_bad_magic(bytewise: bool) -> None:
    server = FakeServer(handlers={Opt.EXTENDED_HEADERS: lambda s, o, d: b"X" + rep(o, Rep.ACK)[1:]})
    fails(drive(server, bytewise=bytewise), ProtocolError)


def test_huge_option_reply_length(bytewise: bool) -> None:
    """A 4 GiB length is refused from the header alone, without waiting for data."""
    header = REPLY_MAGIC + struct.pack(">III", Opt.EXTENDED_HEADERS, Rep.ERR_UNSUP, 0xFFFFFFFF)
    server = FakeServer(handlers={Opt.EXTENDED_HEADERS: lambda s, o, d: header})
    fails(drive(server, bytewise=bytewise), ProtocolError)


def test_lying_option_reply_length(bytewise: bool) -> None:
    """A length longer than what follows: the client waits, then EOF is an error."""
    lying = REPLY_MAGIC + struct.pack(">III", Opt.EXTENDED_HEADERS, Rep.ERR_UNSUP, 100) + b"short"

    def handler(s: FakeServer, o: int, d: bytes) -> bytes:
        s.closed = True
        return lying

    fails(
        drive(FakeServer(handlers={Opt.EXTENDED_HEADERS: handler}), bytewise=bytewise),
        ProtocolError,
    )


def test_ack_with_payload(bytewise: bool) -> None:
    server = FakeServer(handlers={Opt.STRUCTURED_REPLY: lambda s, o, d: rep(o, Rep.ACK, b"x")})
    fails(drive(server, bytewise=bytewise), ProtocolError)


def test_unknown_non_error_reply_type(bytewise: bool) -> None:
    server = FakeServer(handlers={Opt.STRUCTURED_REPLY: lambda s, o, d: rep(o, 99)})
    fails(drive(server, bytewise=bytewise), ProtocolError)


def test_unknown_error_reply_type_is_a_refusal(bytewise: bool) -> None:
    unknown = REP_ERROR_BIT | 99
    server = FakeServer(handlers={Opt.STRUCTURED_REPLY: lambda s, o, d: rep(o, unknown, b"?")})
    res = ok(drive(server, bytewise=bytewise))
    assert not res.structured_replies and res.in_transmission


def test_unknown_error_reply_type_to_go(bytewise: bool) -> None:
    unknown = REP_ERROR_BIT | 99
    server = FakeServer(handlers={Opt.GO: lambda s, o, d: rep(o, unknown, b"odd")})
    err = fails(drive(server, bytewise=bytewise), OptionError)
    assert isinstance(err, OptionError) and err.reply == unknown and err.message == "odd"


def test_error_shutdown_soft_disconnects(bytewise: bool) -> None:
    server = FakeServer(handlers={Opt.STRUCTURED_REPLY: lambda s, o, d: rep(o, Rep.ERR_SHUTDOWN)})
    run = drive(server, bytewise=bytewise)
    err = fails(run, OptionError)
    assert isinstance(err, OptionError) and err.reply == Rep.ERR_SHUTDOWN
    assert run.handshake.data_to_send() == opt(Opt.ABORT)


def test_error_message_not_utf8(bytewise: bool) -> None:
    server = FakeServer(handlers={Opt.GO: lambda s, o, d: rep(o, Rep.ERR_UNKNOWN, b"\xff")})
    fails(drive(server, bytewise=bytewise), ProtocolError)


def test_reply_type_not_valid_for_option(bytewise: bool) -> None:
    # NBD_REP_SERVER belongs to LIST only.
    server = FakeServer(handlers={Opt.GO: lambda s, o, d: rep(o, Rep.SERVER, lstr("x"))})
    fails(drive(server, bytewise=bytewise), ProtocolError)


def test_bad_first_magic_seen_early() -> None:
    hs = ClientHandshake()
    hs.receive_data(b"HTTP/1.1")  # 8 bytes: enough to know it is not NBD
    with pytest.raises(ProtocolError):
        hs.next_event()


def test_bad_second_magic() -> None:
    hs = ClientHandshake()
    hs.receive_data(NBDMAGIC + b"IHAVEOPX" + h("0001"))
    with pytest.raises(ProtocolError):
        hs.next_event()


def test_config_strings_checked() -> None:
    with pytest.raises(InvalidRequest):
        ClientHandshake(HandshakeConfig(export_name="x" * 4097))
    with pytest.raises(InvalidRequest):
        ClientHandshake(HandshakeConfig(meta_contexts=("é" * 2049,)))


# --- EOF at every point -----------------------------------------------------------------

SCENARIOS: dict[str, Callable[[], tuple[FakeServer, HandshakeConfig]]] = {
    "oldstyle": lambda: (FakeServer(style="oldstyle"), HandshakeConfig()),
    "newstyle": lambda: (FakeServer(style="newstyle", no_zeroes=False), HandshakeConfig()),
    "go": lambda: (FakeServer(), HandshakeConfig(export_name="disk")),
    "fallback-zeroes": lambda: (
        FakeServer(no_zeroes=False, handlers={Opt.GO: lambda s, o, d: rep(o, Rep.ERR_UNSUP)}),
        HandshakeConfig(),
    ),
    "tls-extended": lambda: (
        FakeServer(tls=True, extended=True),
        HandshakeConfig(tls=TLSMode.REQUIRE),
    ),
    "negotiation": lambda: (
        FakeServer(extended=True),
        HandshakeConfig(go=False, list_exports=True, list_meta_contexts=True),
    ),
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_eof_at_every_point(name: str) -> None:
    server, config = SCENARIOS[name]()
    full = drive(server, config)
    ok(full)
    for cut in range(full.delivered):
        server, config = SCENARIOS[name]()
        run = drive(server, config, cut=cut)
        # EOF after EXPORT_NAME is how a server refuses it; anything else is a broken
        # server. Never a finished handshake.
        assert isinstance(run.error, (ProtocolError, ExportNotFound)), (cut, run.error)
        assert run.result is None


# --- the tables, exhaustively -----------------------------------------------------------


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("event", list(Input))
def test_transition_table(state: State, event: Input) -> None:
    hs = ClientHandshake()
    hs.state = state
    if (state, event) in TRANSITIONS:
        hs._transition(event)
        assert hs.state is TRANSITIONS[(state, event)]
    else:
        with pytest.raises(ProtocolError):
            hs._transition(event)
        assert hs.state is state


def test_transition_table_reaches_done() -> None:
    """Every state can reach DONE through the table (no dead ends)."""
    reach = {State.DONE}
    changed = True
    while changed:
        changed = False
        for (src, _), dst in TRANSITIONS.items():
            if dst in reach and src not in reach:
                reach.add(src)
                changed = True
    assert reach == set(State)


UNKNOWN_REPLIES = [5, 99, 0x7FFFFFFF, 0, REP_ERROR_BIT | 0, REP_ERROR_BIT | 11, 0xFFFFFFFF]
ALL_REPLIES = [int(r) for r in Rep] + UNKNOWN_REPLIES


def expected_outcome(option: Opt, reply: int) -> str:
    """What the spec's "Option types" and "Option reply types" allow: an independent
    statement of REPLY_OUTCOMES. "final", "more", "go", "tls" or "error" (protocol)."""
    if option == Opt.EXPORT_NAME:
        return "error"  # EXPORT_NAME never gets option replies
    if reply & REP_ERROR_BIT:
        return "final"
    if reply == Rep.ACK:
        return {Opt.GO: "go", Opt.STARTTLS: "tls"}.get(option, "final")
    more = {
        Rep.SERVER: {Opt.LIST},
        Rep.INFO: {Opt.INFO, Opt.GO},
        Rep.META_CONTEXT: {Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT},
    }
    if reply in more and option in more[Rep(reply)]:
        return "more"
    return "error"


PAYLOADS: dict[int, bytes] = {
    Rep.SERVER: lstr("disk"),
    Rep.INFO: info_export(),
    Rep.META_CONTEXT: h("00000001") + b"base:allocation",
}


def _stub_plan(hs: ClientHandshake, seen: list[OptionResult]) -> Generator[object, OptionResult]:
    """A plan that records the option's outcome and then aborts (or stops after GO)."""
    res = yield None  # primed by next()
    seen.append(res)
    if hs.state is State.READY:
        yield _Abort()


@pytest.mark.parametrize("option", list(Opt))
@pytest.mark.parametrize("reply", ALL_REPLIES, ids=hex)
def test_reply_outcomes(option: Opt, reply: int) -> None:
    expected = expected_outcome(option, reply)
    kind = reply_kind(reply)
    table = REPLY_OUTCOMES.get((option, kind)) if kind is not None else None
    want_input = {
        "final": Input.REPLY_FINAL,
        "more": Input.REPLY_MORE,
        "go": Input.REPLY_GO_ACK,
        "tls": Input.REPLY_STARTTLS_ACK,
        "error": None,
    }[expected]
    assert table is want_input
    assert kind is (
        ReplyKind.ERROR
        if reply & REP_ERROR_BIT
        else {
            1: ReplyKind.ACK,
            2: ReplyKind.SERVER,
            3: ReplyKind.INFO,
            4: ReplyKind.META_CONTEXT,
        }.get(reply)
    )

    # And the machine acts on it: feed the reply to a handshake with ``option`` in flight.
    hs = ClientHandshake()
    seen: list[OptionResult] = []
    plan = _stub_plan(hs, seen)
    next(plan)
    hs._plan = plan  # type: ignore[assignment]
    hs._fixed = True
    if option == Opt.EXPORT_NAME:
        hs.state = State.AWAIT_EXPORT_NAME
    else:
        hs.state = State.AWAIT_REPLY
        hs._option = option
    hs.receive_data(rep(option, reply, PAYLOADS.get(reply, b"")))
    if option == Opt.EXPORT_NAME:
        # 20 bytes of option reply read as a 10-byte export reply + part of the zeroes:
        # the core waits for the rest rather than misreading it as an option reply.
        assert hs.next_event() is NEED_DATA
        return
    if expected == "error":
        with pytest.raises(ProtocolError):
            hs.next_event()
        return
    if reply == Rep.ERR_SHUTDOWN:
        # A final reply, but the spec then requires a soft disconnect.
        with pytest.raises(OptionError):
            hs.next_event()
        assert hs.data_to_send() == opt(Opt.ABORT) and hs.state is State.DONE
        return
    event = hs.next_event()
    if expected == "more":
        assert event is NEED_DATA and hs.state is State.AWAIT_REPLY and seen == []
    elif expected == "tls":
        assert isinstance(event, StartTLS) and hs.state is State.TLS
    elif expected == "go":
        assert isinstance(event, HandshakeDone) and seen[0].reply == reply
    else:
        assert seen and seen[0].option == option and seen[0].reply == reply
        assert isinstance(event, HandshakeDone) and not event.result.in_transmission
