"""pread_many and pwrite_many: pipelined batches on both clients, against nbdkit.

A failed request of a batch is named by its ``request_offset``: the eval plugin below
fails reads and writes from 64 KiB on, so the second request of each batch fails.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable

import pytest

from pynbd import AsyncClient, Client
from pynbd.errors import RequestError
from tests.peers import Server

pytestmark = pytest.mark.interop

K64 = 65536
# Reads give a pattern; reads and writes at or past 64 KiB fail with EIO.
FAIL_PAST_64K = (
    "get_size=echo 1M",
    "pread=if [ $4 -ge 65536 ]; then echo EIO bad >&2; exit 1; fi; "
    "head -c $3 /dev/zero | tr '\\0' x",
    "pwrite=if [ $4 -ge 65536 ]; then echo EIO bad >&2; exit 1; fi; cat >/dev/null",
)


def test_batches_round_trip(nbdkit: Callable[..., Server]) -> None:
    server = nbdkit("memory", "1M")
    data = [(bytes([i + 1]) * 4096, i * 8192) for i in range(16)]
    with Client(server.uri) as c:
        c.pwrite_many(data)
        out = [(bytearray(4096), off) for _, off in data]
        c.pread_many(out)
    assert [bytes(b) for b, _ in out] == [d for d, _ in data]

    async def main() -> None:
        async with await AsyncClient.connect(server.uri) as a:
            got = [(bytearray(4096), off) for _, off in data]
            await a.pread_many(got)
            assert [bytes(b) for b, _ in got] == [d for d, _ in data]
            await a.pwrite_many([(b"z" * 512, 0)])
            assert await a.pread(512, 0) == b"z" * 512

    asyncio.run(main())


def test_the_failed_request_is_named(nbdkit: Callable[..., Server]) -> None:
    server = nbdkit("eval", *FAIL_PAST_64K)
    with Client(server.uri) as c:
        reads = [(bytearray(4096), 0), (bytearray(4096), K64), (bytearray(4096), 2 * K64)]
        with pytest.raises(RequestError) as info:
            c.pread_many(reads)
        assert info.value.errno == errno.EIO and info.value.request_offset == K64
        assert bytes(reads[0][0]) == b"x" * 4096  # the requests before it completed
        with pytest.raises(RequestError) as info:
            c.pwrite_many([(b"a" * 512, 512), (b"b" * 512, 3 * K64)])
        assert info.value.request_offset == 3 * K64
        assert c.pread(4, 0) == b"xxxx"  # the connection is still usable
