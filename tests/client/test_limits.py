"""The clients' bounds against hostile servers (tests/client/hostile.py), over a
socketpair: ``Client``, ``AsyncClient`` and the kernel's negotiation take
``ClientLimits`` (the defaults where nothing is given) and fail with a ProtocolError
that names the bound (issue 16, findings 5 and 6)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterator

import pytest

from pynbd.client import AsyncClient, Client, MappedExtent, Target
from pynbd.errors import ProtocolError
from pynbd.kernel.dial import negotiate_for_kernel
from pynbd.proto.limits import ClientLimits
from tests.client.hostile import Hostile, info_flood, list_flood, status_flood

Server = Callable[..., None]


@pytest.fixture
def hostile() -> Iterator[Callable[[Server], Hostile]]:
    made: list[Hostile] = []

    def start(server: Server) -> Hostile:
        made.append(Hostile(server))
        return made[-1]

    yield start
    for h in made:
        h.join()


SMALL = ClientLimits(max_handshake_bytes=256 * 1024)


def test_client_stops_a_go_flood(hostile: Callable[[Server], Hostile]) -> None:
    h = hostile(info_flood)
    with pytest.raises(ProtocolError, match=r"ClientLimits\.max_handshake_bytes"):
        Client(sock=h.client, limits=SMALL, timeout=60)


def test_async_client_stops_a_go_flood(hostile: Callable[[Server], Hostile]) -> None:
    h = hostile(info_flood)

    async def main() -> None:
        await AsyncClient.connect(sock=h.client, limits=SMALL, timeout=60)

    with pytest.raises(ProtocolError, match=r"ClientLimits\.max_handshake_bytes"):
        asyncio.run(main())


def test_kernel_negotiation_stops_a_go_flood_with_the_defaults(
    hostile: Callable[[Server], Hostile],
) -> None:
    # Kernel attach runs as root and takes no limits: the defaults bound it (16 MiB).
    h = hostile(info_flood)
    with pytest.raises(ProtocolError, match=r"ClientLimits\.max_handshake_bytes"):
        negotiate_for_kernel(h.client, Target(), "", 60)


def test_negotiation_stops_a_list_flood(hostile: Callable[[Server], Hostile]) -> None:
    h = hostile(list_flood)
    limits = ClientLimits(max_option_replies=1000)
    with pytest.raises(ProtocolError, match=r"ClientLimits\.max_option_replies"):
        Client.negotiate(sock=h.client, limits=limits, timeout=60)


def test_async_negotiation_stops_a_list_flood(hostile: Callable[[Server], Hostile]) -> None:
    h = hostile(list_flood)
    limits = ClientLimits(max_option_replies=1000)

    async def main() -> None:
        await AsyncClient.negotiate(sock=h.client, limits=limits, timeout=60)

    with pytest.raises(ProtocolError, match=r"ClientLimits\.max_option_replies"):
        asyncio.run(main())


#: 10 extents of 512 bytes where the request holds them; 4 are kept of each reply.
TEN = functools.partial(status_flood, extents=10, extent_length=512)
EXPECTED = [MappedExtent(i * 512, 512, 0) for i in range(10)]


def test_client_block_status_asks_again_after_a_cut_reply(
    hostile: Callable[[Server], Hostile],
) -> None:
    h = hostile(TEN)
    with Client(sock=h.client, limits=ClientLimits(max_extents=4), timeout=60) as c:
        assert c.block_status(5120, 0) == EXPECTED


def test_async_client_block_status_asks_again_after_a_cut_reply(
    hostile: Callable[[Server], Hostile],
) -> None:
    h = hostile(TEN)

    async def main() -> list[MappedExtent]:
        limits = ClientLimits(max_extents=4)
        async with await AsyncClient.connect(sock=h.client, limits=limits, timeout=60) as c:
            return await c.block_status(5120, 0)

    assert asyncio.run(main()) == EXPECTED
