"""Data integrity of ``pynbd serve`` under concurrent, overlapping writes from several
connections, in the spirit of nbd-tester-client's replay: every byte of the export is
checked against a model at the end.

Four connections to one 16 MiB export (which advertises multi-conn): two pynbd
:class:`~pynbd.AsyncClient` in this process and two libnbd handles, each in a worker
process of Debian's /usr/bin/python3 (the only interpreter with ``import nbd``), driven
by JSON lines on its stdin. The writes are planned here so that the final content is
unambiguous whatever the order in which the server runs concurrent requests:

1. Stripes: the export is cut into 64 KiB stripes dealt round-robin to the
   connections. Each connection sends a few hundred writes of random offset and length
   inside its own stripes, up to 16 in flight, but never two overlapping ones at once:
   a write that overlaps one in flight waits for it. So overlapping writes of one
   connection complete in the order they were planned, and connections never touch
   each other's bytes.
2. Rounds: all four connections write at once to ranges anywhere in the export (so
   across stripes and over each other's earlier writes), ranges of one round pairwise
   disjoint, some of them write-zeroes; a round ends when all four are done.
3. Conflicts: writes to one small region from the connections in turn, each awaited
   before the next is sent.

The model applies phase 1 per connection in plan order, then the rounds, then the
conflicts. After a flush, each of the four connections reads the whole export and must
see exactly the model (multi-conn: a write completed on one connection, then flushed,
is visible on all of them). Every write carries data unique to it (a hash of its
connection and sequence number), so a misplaced or stale write cannot go unnoticed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import subprocess
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pynbd import AsyncClient
from tests.peers import peer_env
from tests.serve_launcher import PynbdServer

KiB = 1024
MiB = 1024 * KiB
SIZE = 16 * MiB
STRIPE = 64 * KiB
CONNECTIONS = 4
PYNBD_CONNS = (0, 1)  # the others are libnbd
IN_FLIGHT = 16

Start = Callable[..., PynbdServer]

pytestmark = pytest.mark.interop

LIBNBD_PYTHON = "/usr/bin/python3"


def payload(conn: int, seq: int, length: int) -> bytes:
    """The bytes of write *seq* of connection *conn*: unique to that write."""
    return hashlib.shake_128(f"{conn}:{seq}".encode()).digest(length)


#: A write (or, with zero=True, a write-zeroes) planned for one connection.
@dataclass(frozen=True)
class Op:
    conn: int
    seq: int
    offset: int
    length: int
    zero: bool = False
    fua: bool = False

    @property
    def end(self) -> int:
        return self.offset + self.length

    def data(self) -> bytes:
        return bytes(self.length) if self.zero else payload(self.conn, self.seq, self.length)

    def wire(self) -> list[int]:
        return [self.seq, self.offset, self.length, int(self.zero), int(self.fua)]


# --------------------------------------------------------------------------- the plan


def plan(rng: random.Random) -> tuple[list[list[Op]], list[list[Op]], list[Op]]:
    """Return (stripe writes per connection, rounds, serialized conflicts)."""
    seq = [0] * CONNECTIONS

    def next_seq(conn: int) -> int:
        seq[conn] += 1
        return seq[conn]

    stripes: list[list[Op]] = [[] for _ in range(CONNECTIONS)]
    nstripes = SIZE // STRIPE
    for conn in range(CONNECTIONS):
        # A handful of favourite stripes make overlaps within a connection common.
        mine = list(range(conn, nstripes, CONNECTIONS))
        hot = rng.sample(mine, 6)
        for _ in range(300):
            stripe = rng.choice(hot) if rng.random() < 0.6 else rng.choice(mine)
            base = stripe * STRIPE
            start = rng.randrange(STRIPE)
            length = rng.randint(1, min(STRIPE - start, rng.choice((512, 4096, 32 * KiB))))
            stripes[conn].append(
                Op(conn, next_seq(conn), base + start, length, fua=rng.random() < 0.1)
            )

    rounds: list[list[Op]] = []
    for _ in range(30):
        taken: list[tuple[int, int]] = []
        ops: list[Op] = []
        for conn in range(CONNECTIONS):
            for _ in range(4):
                while True:
                    length = rng.randint(1, 256 * KiB)
                    offset = rng.randrange(SIZE - length + 1)
                    if all(offset >= e or offset + length <= s for s, e in taken):
                        break
                taken.append((offset, offset + length))
                ops.append(Op(conn, next_seq(conn), offset, length, zero=rng.random() < 0.15))
        rounds.append(ops)

    conflicts: list[Op] = []
    region = 8 * MiB - 100 * KiB
    for i in range(24):
        conn = i % CONNECTIONS
        offset = region + rng.randrange(150 * KiB)
        length = rng.randint(1, 50 * KiB)
        conflicts.append(Op(conn, next_seq(conn), offset, length, zero=i % 7 == 6))
    return stripes, rounds, conflicts


def model_of(stripes: list[list[Op]], rounds: list[list[Op]], conflicts: list[Op]) -> bytearray:
    model = bytearray(SIZE)
    for ops in stripes:  # disjoint between connections: any order of connections
        for op in ops:
            model[op.offset : op.end] = op.data()
    for ops in rounds:
        for op in ops:
            model[op.offset : op.end] = op.data()
    for op in conflicts:
        model[op.offset : op.end] = op.data()
    return model


# --------------------------------------------------------------------------- libnbd worker

WORKER = """
import hashlib, json, sys
import nbd

uri, conn = sys.argv[1], int(sys.argv[2])
h = nbd.NBD()
h.connect_uri(uri)
assert h.can_multi_conn()
out = sys.stdout


def payload(seq, length):
    return hashlib.shake_128(f"{conn}:{seq}".encode()).digest(length)


def run(ops, limit):
    # up to `limit` in flight; a command that overlaps one in flight waits for it
    flight = {}  # cookie -> (start, end, buffer kept alive)

    def retire():
        for cookie in list(flight):
            if h.aio_command_completed(cookie):  # raises nbd.Error if it failed
                del flight[cookie]

    for seq, off, length, zero, fua in ops:
        end = off + length
        while len(flight) >= limit or any(s < end and off < e for s, e, _ in flight.values()):
            h.poll(-1)
            retire()
        flags = nbd.CMD_FLAG_FUA if fua else 0
        if zero:
            cookie = h.aio_zero(length, off, flags=flags)
            buf = None
        else:
            buf = payload(seq, length)
            cookie = h.aio_pwrite(buf, off, flags=flags)
        flight[cookie] = (off, end, buf)
    while flight:
        h.poll(-1)
        retire()


for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "run":
        run(cmd["ops"], cmd["limit"])
        reply = "done"
    elif cmd["op"] == "flush":
        h.flush()
        reply = "done"
    elif cmd["op"] == "digest":
        reply = json.dumps([hashlib.sha256(h.pread(1 << 20, off)).hexdigest()
                            for off in range(0, h.get_size(), 1 << 20)])
    elif cmd["op"] == "quit":
        break
    out.write(reply + "\\n")
    out.flush()
h.shutdown()
"""


class LibnbdWorker:
    """One libnbd connection in a /usr/bin/python3 process, driven line by line."""

    def __init__(self, script: Path, uri: str, conn: int) -> None:
        self.conn = conn
        self.proc = subprocess.Popen(
            [LIBNBD_PYTHON, str(script), uri, str(conn)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=peer_env(),
        )

    def call(self, cmd: dict[str, Any]) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        if not reply:
            self.proc.wait(10)
            assert self.proc.stderr is not None
            raise AssertionError(
                f"libnbd worker {self.conn} died ({self.proc.returncode}):\n"
                f"{self.proc.stderr.read()}"
            )
        return reply.strip()

    def run(self, ops: list[Op], limit: int) -> None:
        assert self.call({"op": "run", "ops": [op.wire() for op in ops], "limit": limit}) == "done"

    def close(self) -> None:
        """Ask the worker to disconnect and exit; kill it (by pid) if it does not."""
        try:
            if self.proc.poll() is None and self.proc.stdin is not None:
                self.proc.stdin.write('{"op": "quit"}\n')
                self.proc.stdin.close()
            self.proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(10)
        finally:
            for pipe in (self.proc.stdout, self.proc.stderr):
                if pipe is not None:
                    pipe.close()


# --------------------------------------------------------------------------- pynbd side


async def run_async(client: AsyncClient, ops: list[Op], limit: int) -> None:
    """Send *ops* on *client*: up to *limit* in flight, overlapping ones in order."""
    flight: dict[asyncio.Task[None], tuple[int, int]] = {}

    async def send(op: Op) -> None:
        if op.zero:
            await client.zero(op.length, op.offset, fua=op.fua)
        else:
            await client.pwrite(op.data(), op.offset, fua=op.fua)

    for op in ops:
        while True:
            blockers = [t for t, (s, e) in flight.items() if s < op.end and op.offset < e]
            if len(flight) >= limit and not blockers:
                blockers = list(flight)
            if not blockers:
                break
            done, _ = await asyncio.wait(blockers, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                del flight[t]
                t.result()
        flight[asyncio.create_task(send(op))] = (op.offset, op.end)
    for t in list(flight):
        await t


async def run_everything(
    uri: str, workers: dict[int, LibnbdWorker], rng: random.Random
) -> tuple[bytearray, list[AsyncClient]]:
    stripes, rounds, conflicts = plan(rng)
    model = model_of(stripes, rounds, conflicts)
    clients = {c: await AsyncClient.connect(uri) for c in PYNBD_CONNS}
    try:
        for client in clients.values():
            assert client.can_multi_conn()

        async def run_on(conn: int, ops: list[Op], limit: int) -> None:
            if conn in clients:
                await run_async(clients[conn], ops, limit)
            else:
                await asyncio.to_thread(workers[conn].run, ops, limit)

        # 1. stripes, all four connections at once
        await asyncio.gather(*(run_on(c, stripes[c], IN_FLIGHT) for c in range(CONNECTIONS)))
        # 2. rounds: disjoint within a round, all at once; rounds one after another
        for ops in rounds:
            await asyncio.gather(
                *(
                    run_on(c, [op for op in ops if op.conn == c], IN_FLIGHT)
                    for c in range(CONNECTIONS)
                )
            )
        # 3. conflicts, serialized by awaiting each one
        for op in conflicts:
            await run_on(op.conn, [op], 1)
        # One flush on a pynbd connection and one on a libnbd one.
        await clients[PYNBD_CONNS[0]].flush()
        await asyncio.to_thread(workers[min(workers)].call, {"op": "flush"})
        return model, list(clients.values())
    except BaseException:
        for client in clients.values():
            await client.close()
        raise


def first_difference(got: bytes | bytearray, want: bytes | bytearray) -> str:
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        if a != b:
            return f"first difference at byte {i}: got {a:#04x}, want {b:#04x}"
    return "no difference"


@pytest.mark.parametrize("backend", ["memory", "file"])
@pytest.mark.parametrize("seed", [1, 2])
def test_concurrent_overlapping_writes(
    pynbd_server: Start, tmp_path: Path, backend: str, seed: int
) -> None:
    if not os.path.exists(LIBNBD_PYTHON):
        raise AssertionError(f"{LIBNBD_PYTHON} is missing: install python3-libnbd")
    if backend == "memory":
        srv = pynbd_server("--memory", str(SIZE))
    else:
        image = tmp_path / "disk.img"
        with open(image, "wb") as f:
            f.truncate(SIZE)
        srv = pynbd_server(str(image))
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    workers: dict[int, LibnbdWorker] = {}
    try:
        for conn in range(CONNECTIONS):
            if conn not in PYNBD_CONNS:
                workers[conn] = LibnbdWorker(script, srv.uri, conn)

        async def main() -> None:
            model, clients = await run_everything(srv.uri, workers, random.Random(seed))
            try:
                # The plan is not vacuous: most of the export was written, by everyone.
                assert model.count(0) < SIZE // 2
                want_digests = [
                    hashlib.sha256(model[o : o + MiB]).hexdigest() for o in range(0, SIZE, MiB)
                ]
                # Every byte, as seen by each of the four connections.
                for i, client in enumerate(clients):
                    got = await client.pread(SIZE, 0)
                    # Not `assert got == model`: pytest would diff 16 MiB.
                    if got != model:
                        raise AssertionError(
                            f"pynbd connection {i}: " + first_difference(got, model)
                        )
                for conn, worker in workers.items():
                    got_digests = json.loads(await asyncio.to_thread(worker.call, {"op": "digest"}))
                    bad = [
                        i
                        for i, (g, w) in enumerate(zip(got_digests, want_digests, strict=True))
                        if g != w
                    ]
                    assert not bad, f"libnbd connection {conn}: MiB blocks {bad} differ"
            finally:
                for client in clients:
                    await client.close()

        asyncio.run(main())
    finally:
        for worker in workers.values():
            worker.close()
    if backend == "file":
        srv.stop()
        assert image.read_bytes() == model_of(*plan(random.Random(seed)))
