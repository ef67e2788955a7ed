"""The client connections (pynbd.client.connection, pynbd.client.aio_connection) against
the scripted server of tests/proto/fake_server.py, over a socketpair."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from pynbd.client import (
    AsyncClient,
    AsyncConnection,
    Client,
    Connection,
    ConnectOptions,
    Deadline,
    Target,
    negotiate,
    negotiate_async,
)
from pynbd.errors import ConnectionClosed, ExportNotFound, NBDTimeout, ProtocolError
from pynbd.proto.constants import Opt, Rep
from tests.proto.fake_server import SIZE, FakeServer, Served, rep


@pytest.fixture
def served() -> Iterator[list[Served]]:
    made: list[Served] = []
    yield made
    for s in made:
        s.client.close()
        s.join()


def serve(made: list[Served], server: FakeServer) -> Served:
    s = Served(server)
    made.append(s)
    return s


OPTIONS = ConnectOptions(export_name="disk")


def test_open_release_hands_over_a_blocking_socket(served: list[Served]) -> None:
    s = serve(served, FakeServer())
    conn = Connection.open(Target(), OPTIONS, sock=s.client, timeout=10)
    assert conn.negotiated.in_transmission and conn.negotiated.size == SIZE
    assert conn.core is not None
    sock = conn.release()
    assert sock is s.client and sock.gettimeout() is None and conn.closed
    assert s.server.option_names()[-1] == Opt.GO


def test_release_refuses_bytes_sent_before_any_request(served: list[Served]) -> None:
    def go_then_junk(server: FakeServer, option: int, data: bytes) -> bytes:
        return FakeServer.default(server, option, data) + b"junk"

    s = serve(served, FakeServer(handlers={Opt.GO: go_then_junk}))
    conn = Connection.open(Target(), OPTIONS, sock=s.client, timeout=10)
    with pytest.raises(ProtocolError, match="bad reply magic"):
        assert conn.core  # junk where a reply would start
    with pytest.raises(ProtocolError, match="before any request"):
        conn.release()
    assert s.client.fileno() == -1  # closed


def test_release_refuses_negotiation_mode(served: list[Served]) -> None:
    s = serve(served, FakeServer())
    conn = Connection.open(Target(), OPTIONS, sock=s.client, go=False, timeout=10)
    with pytest.raises(ConnectionClosed):
        assert conn.core
    with pytest.raises(ProtocolError, match="without entering transmission"):
        conn.release()


def test_negotiate_keeps_the_list_when_info_is_refused(served: list[Served]) -> None:
    s = serve(served, FakeServer())
    result = negotiate(
        Target(), ConnectOptions(export_name="missing"), sock=s.client, list_exports=True
    )
    assert result.exports is not None and [e.name for e in result.exports] == ["", "disk"]
    assert isinstance(result.refused[Opt.INFO], ExportNotFound)
    assert s.server.option_names()[-1] == Opt.ABORT


def test_client_negotiate_raises_a_refused_info(served: list[Served]) -> None:
    s = serve(served, FakeServer())
    with pytest.raises(ExportNotFound):
        Client.negotiate(sock=s.client, export_name="missing")


def test_negotiate_without_info_never_asks(served: list[Served]) -> None:
    s = serve(served, FakeServer(handlers={Opt.LIST: lambda srv, o, d: rep(o, Rep.ERR_POLICY)}))
    result = negotiate(Target(), OPTIONS, sock=s.client, list_exports=True, info=False)
    assert result.exports is None and Opt.LIST in result.refused
    assert Opt.INFO not in s.server.option_names()


def test_close_in_transmission_sends_disc(served: list[Served]) -> None:
    s = serve(served, FakeServer())
    conn = Connection.open(Target(), OPTIONS, sock=s.client, timeout=10)
    conn.close()
    conn.close()  # idempotent
    s.join()
    assert s.server.after[:4] == bytes.fromhex("25609513")  # a request: NBD_CMD_DISC
    assert s.server.after[6:8] == b"\x00\x02"


def test_deadline() -> None:
    assert Deadline(None).left() is None and Deadline(None).end is None
    left = Deadline(60).left()
    assert left is not None and 0 < left <= 60
    with pytest.raises(NBDTimeout):
        Deadline(0).left()  # no time at all: passed at once


def test_async_connection_and_negotiate(served: list[Served]) -> None:
    async def main() -> None:
        s = serve(served, FakeServer())
        conn = await AsyncConnection.open(Target(), OPTIONS, sock=s.client, timeout=10)
        assert conn.core is not None and conn.negotiated.size == SIZE
        client = AsyncClient(conn, OPTIONS)
        assert client.can_flush() and client.export_name == "disk"
        await client.close()
        s2 = serve(served, FakeServer())
        result = await negotiate_async(
            Target(), ConnectOptions(export_name="missing"), sock=s2.client
        )
        assert isinstance(result.refused[Opt.INFO], ExportNotFound)
        s3 = serve(served, FakeServer())
        with pytest.raises(ExportNotFound):
            await AsyncClient.negotiate(sock=s3.client, export_name="missing")

    asyncio.run(main())


def test_async_open_closes_when_the_server_sends_junk_after_go(served: list[Served]) -> None:
    def go_then_junk(server: FakeServer, option: int, data: bytes) -> bytes:
        return FakeServer.default(server, option, data) + b"junk" * 8

    async def main() -> None:
        s = serve(served, FakeServer(handlers={Opt.GO: go_then_junk}))
        with pytest.raises(ProtocolError, match="bad reply magic"):
            await AsyncConnection.open(Target(), OPTIONS, sock=s.client, timeout=10)
        await asyncio.sleep(0)  # the transport's close callback
        s.join()  # the server saw the connection end

    asyncio.run(main())
