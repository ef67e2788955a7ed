"""The Python cost of one blocking client call, without a server's time in it.

The client negotiates with the scripted server of tests/proto/fake_server.py over a
socketpair (``Served``); then its socket is swapped for an object that answers every request at
once (a structured OFFSET_DATA chunk for a read, a simple reply for anything else).
What is left per call is the client's and the core's Python, plus the stand-in's own
copying, which is the same for any two trees compared. CPU time, best of 9 rounds:

    PYTHONPATH=src python3 bench/pycost.py [CALLS]        # from the checkout's root

CPU time moves with the machine's load. ``--once CASE CALLS`` makes CALLS calls of one
case untimed, for a count of machine instructions that does not (cachegrind; the
difference of two runs leaves out start-up):

    for n in 2000 6000; do PYTHONPATH=src valgrind --tool=cachegrind --cache-sim=no \
        --cachegrind-out-file=/dev/null python3 bench/pycost.py --once "pread 4K" $n \
        2>&1 | grep 'I *refs'; done       # (second - first) / 4000 per call

A probe for A/B work on the client's hot paths (run two trees alternately); it
reaches into the client's private attributes, and is no benchmark against a peer.
"""

from __future__ import annotations

import socket
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.proto.fake_server import FakeServer, Served

import pynbd

_REQUEST = struct.Struct(">IHHQQI")
_DATA = struct.Struct(">IHHQIQ")
_SIMPLE = struct.Struct(">IIQ")


class Answering:
    """A socket stand-in that queues each request's successful reply as it is sent."""

    family = socket.AF_UNIX

    def __init__(self) -> None:
        self.out = bytearray()
        self.data = bytes(1 << 22)

    def _answer(self, sent: bytes) -> None:
        while len(sent) >= _REQUEST.size:
            _, _, kind, cookie, offset, length = _REQUEST.unpack_from(sent)
            sent = sent[_REQUEST.size :]
            if kind == 0:  # NBD_CMD_READ
                self.out += _DATA.pack(0x668E33EF, 1, 1, cookie, length + 8, offset)
                self.out += self.data[:length]
            else:
                if kind == 1:  # NBD_CMD_WRITE: skip its payload
                    sent = sent[length:]
                self.out += _SIMPLE.pack(0x67446698, 0, cookie)

    def sendall(self, data: Any) -> None:
        self._answer(bytes(data))

    def sendmsg(self, buffers: Any) -> int:
        joined = b"".join(bytes(b) for b in buffers)
        self._answer(joined)
        return len(joined)

    def recv_into(self, buf: Any, nbytes: int = 0, flags: int = 0) -> int:
        n = min(nbytes or len(buf), len(buf), len(self.out))
        buf[:n] = self.out[:n]
        del self.out[:n]
        return n

    def recv(self, nbytes: int, flags: int = 0) -> bytes:
        n = min(nbytes, len(self.out))
        data = bytes(self.out[:n])
        del self.out[:n]
        return data

    def setsockopt(self, *args: Any) -> None:
        pass

    def settimeout(self, timeout: float | None) -> None:
        pass

    def close(self) -> None:
        pass


def _negotiated_client() -> pynbd.Client:
    served = Served(FakeServer(structured=True, extended=False, block_size=None))
    client = pynbd.Client(sock=served.client, export_name="disk", timeout=None)
    fake: Any = Answering()
    client._sock = fake
    client._timer.sock = fake
    return client


def main() -> None:
    once = sys.argv[1:2] == ["--once"]
    if once and len(sys.argv) != 4:
        sys.exit("usage: pycost.py [CALLS] | pycost.py --once CASE CALLS")
    calls = int(sys.argv[-1]) if len(sys.argv) > 1 else 20000
    c = _negotiated_client()
    big, small = bytearray(1 << 18), bytearray(4096)
    payload, big_payload = bytes(4096), bytes(1 << 18)
    cases: dict[str, Callable[[int], object]] = {
        "pread 4K": lambda i: c.pread(4096, (i % 1000) * 4096),
        "pread_into 4K": lambda i: c.pread_into(small, (i % 1000) * 4096),
        "pread 256K": lambda i: c.pread(1 << 18, (i % 100) << 18),
        "pread_into 256K": lambda i: c.pread_into(big, (i % 100) << 18),
        "pwrite 4K": lambda i: c.pwrite(payload, (i % 1000) * 4096),
        "pwrite 256K": lambda i: c.pwrite(big_payload, (i % 100) << 18),
        "flush": lambda i: c.flush(),
    }
    if once:
        call = cases[sys.argv[2]]
        for i in range(calls):
            call(i)
        return
    for name, call in cases.items():
        best = float("inf")
        for _ in range(9):
            start = time.process_time()
            for i in range(calls):
                call(i)
            best = min(best, (time.process_time() - start) / calls * 1e6)
        print(f"{name:16s} {best:7.2f} us")


if __name__ == "__main__":
    main()
