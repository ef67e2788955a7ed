"""The server fuzz harnesses' bodies (fuzz/fuzz_server_*.py), run on Hypothesis inputs so
CI covers them: whatever a client sends, the server cores raise nothing but
ProtocolError, answer every option and request as the spec says, and hold bounded
memory (the harnesses' docstrings list their checks).

Three kinds of input per harness, as in tests/proto/test_fuzz_smoke.py: raw bytes,
mutated seeds, and streams of plausible options or requests with random fields; each
runs with a few configs, read sizes and feeding methods (its leading bytes). The inputs
that once crashed a harness (tests/proto/fuzz_regressions/) run again here.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pynbd.proto.constants import IHAVEOPT, Cmd, CmdFlag

from ..proto.harnesses import SETTINGS, U8, U32, load, mutated, regressions

HANDSHAKE = load("fuzz_server_handshake")
TRANSMISSION = load("fuzz_server_transmission")
HARNESSES = {"fuzz_server_handshake": HANDSHAKE, "fuzz_server_transmission": TRANSMISSION}
HARNESSES |= {n: load(n) for n in ("fuzz_client_handshake", "fuzz_client_transmission")}

# --- handshake streams ------------------------------------------------------------------

SMALL_TEXT = st.text(max_size=12).map(str.encode) | st.binary(max_size=12)
NAMES = st.sampled_from([b"", b"disk", b"ro", b"bs", b"secret", b"nope"]) | SMALL_TEXT


@st.composite
def option_data(draw: st.DrawFn, option: int) -> bytes:
    """Data that is often right for the option, sometimes not."""
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return draw(st.binary(max_size=64))
    if option in (6, 7):  # INFO, GO: name, u16 n, n info types
        name = draw(NAMES)
        infos = draw(st.lists(st.sampled_from([0, 1, 2, 3, 77]), max_size=4))
        count = draw(st.sampled_from([len(infos)]) | st.integers(0, 0xFFFF))
        return struct.pack(">I", len(name)) + name + struct.pack(f">H{len(infos)}H", count, *infos)
    if option in (9, 10):  # LIST/SET_META_CONTEXT: name, u32 n, n queries
        name = draw(NAMES)
        queries = draw(
            st.lists(st.sampled_from([b"base:allocation", b"base:", b"qemu:x", b"x"]), max_size=3)
        )
        body = b"".join(struct.pack(">I", len(q)) + q for q in queries)
        count = draw(st.sampled_from([len(queries)]) | U32)
        return struct.pack(">I", len(name)) + name + struct.pack(">I", count) + body
    if option == 1:  # EXPORT_NAME
        return draw(NAMES)
    return b""


@st.composite
def option(draw: st.DrawFn) -> bytes:
    opt = draw(st.sampled_from([1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12]) | U32)
    data = draw(option_data(opt))
    length = draw(st.sampled_from([len(data)]) | st.sampled_from([0, 65, 4096, 0xFFFFFFFF]))
    magic = draw(st.sampled_from([IHAVEOPT]) | st.integers(0, 2**64 - 1))
    return struct.pack(">QII", magic, opt, length) + data


@st.composite
def handshake_stream(draw: st.DrawFn) -> bytes:
    head = bytes([draw(U8), draw(st.sampled_from([0, 1, 3, 16, 0x80, 0x81, 0xFF]) | U8)])
    flags = struct.pack(">I", draw(st.sampled_from([0, 1, 2, 3, 4]) | U32))
    options = draw(st.lists(option(), max_size=8))
    return head + flags + b"".join(options) + draw(st.binary(max_size=16))


@SETTINGS
@given(st.one_of(st.binary(max_size=300), mutated(HANDSHAKE.SEEDS), handshake_stream()))
def test_handshake_harness(data: bytes) -> None:
    if len(data) < 2:
        HANDSHAKE.one_input(data)
        return
    for config in (data[0], data[0] ^ 0x40):  # the option limit of 4, or 32
        for step in (data[1], 0, 0x87):  # as drawn, byte by byte, through the buffer
            HANDSHAKE.one_input(bytes([config, step]) + data[2:])


def test_handshake_seeds() -> None:
    for seed in HANDSHAKE.SEEDS:
        HANDSHAKE.one_input(seed)


# --- transmission streams ---------------------------------------------------------------

OFFSETS = st.sampled_from([0, 3, 512, 4096, 1 << 20, (1 << 20) - 512]) | st.integers(0, 2**64 - 1)
LENGTHS = st.sampled_from([0, 1, 512, 4096, 65536, 65537, 1 << 25]) | st.integers(0, 2**32 - 1)
FLAGS = st.sampled_from([0, 1, 2, 4, 8, 16, 32, 33, 0x1F]) | st.integers(0, 0xFFFF)


@st.composite
def request(draw: st.DrawFn, extended: bool) -> bytes:
    cmd = draw(st.sampled_from(list(range(9))) | st.integers(0, 0xFFFF))
    flags, offset, length = draw(FLAGS), draw(OFFSETS), draw(LENGTHS)
    payload = b""
    if cmd == Cmd.WRITE or (extended and flags & CmdFlag.PAYLOAD_LEN):
        if cmd == Cmd.BLOCK_STATUS and draw(st.booleans()):
            ids = draw(st.lists(st.sampled_from([1, 2]) | U32, min_size=0, max_size=3))
            payload = struct.pack(f">Q{len(ids)}I", draw(LENGTHS), *ids)
        else:
            payload = bytes(draw(st.integers(0, 1100)))
        if draw(st.integers(0, 5)):  # usually a length that matches
            length = len(payload)
        if extended and cmd == Cmd.WRITE and draw(st.integers(0, 5)):
            flags |= CmdFlag.PAYLOAD_LEN
    if extended:
        head = struct.pack(">IHHQQQ", 0x21E41C71, flags, cmd, draw(U8), offset, length)
    else:
        head = struct.pack(">IHHQQI", 0x25609513, flags, cmd, draw(U8), offset, length % 2**32)
    return head + payload


@st.composite
def transmission_stream(draw: st.DrawFn) -> bytes:
    setup = draw(U8)
    head = bytes([setup, draw(st.sampled_from([0, 1, 7, 64, 0x80, 0x81, 0xC0]) | U8), draw(U8)])
    requests = draw(st.lists(request(extended=setup & 3 >= 2), max_size=8))
    return head + b"".join(requests) + draw(st.binary(max_size=8))


@SETTINGS
@given(st.one_of(st.binary(max_size=300), mutated(TRANSMISSION.SEEDS), transmission_stream()))
def test_transmission_harness(data: bytes) -> None:
    if len(data) < 3:
        TRANSMISSION.one_input(data)
        return
    for setup in (data[0], data[0] ^ 0x70):  # sink, receive buffer and pool the other way
        for step in (data[1], 0x81):  # as drawn; byte by byte into receive_buffers
            TRANSMISSION.one_input(bytes([setup, step, data[2]]) + data[3:])


def test_transmission_seeds() -> None:
    for seed in TRANSMISSION.SEEDS:
        TRANSMISSION.one_input(seed)


# --- crash inputs kept ------------------------------------------------------------------


@pytest.mark.parametrize("path", regressions(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_kept_crash_input(path: Path) -> None:
    HARNESSES[path.parent.name].one_input(path.read_bytes())
