"""The client fuzz harnesses' bodies (fuzz/fuzz_client_*.py), run on Hypothesis inputs
so CI covers them (the server ones: tests/server/test_core_fuzz.py).

Three kinds of input per harness: raw bytes, mutated seed transcripts (byte changes,
cuts, insertions), and streams assembled from plausible wire records with random
fields (right magics, cookies and options, wrong everything else), which get much
deeper into the cores than random bytes do. Generating an input costs far more than
running it, so each one also runs with other read sizes, feeding methods and configs
(its leading bytes): 400 inputs x 6-8 variants, a few thousand runs per harness.
"""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from .harnesses import SETTINGS, U8, U16, U32, load, mutated

HANDSHAKE = load("fuzz_client_handshake")
TRANSMISSION = load("fuzz_client_transmission")


# --- handshake streams ------------------------------------------------------------------

REPLY_MAGIC = bytes.fromhex("0003e889045565a9")
OPTIONS = st.sampled_from([1, 2, 3, 5, 6, 7, 8, 9, 10, 11]) | U32
REPLIES = st.sampled_from([1, 2, 3, 4] + [0x80000000 | i for i in range(1, 11)]) | U32
SMALL_TEXT = st.text(max_size=12).map(str.encode) | st.binary(max_size=12)


@st.composite
def option_payload(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 6))
    if kind == 0:  # NBD_INFO_EXPORT
        return struct.pack(">HQH", 0, draw(st.integers(0, 1 << 40)), draw(U16))
    if kind == 1:  # NBD_INFO_BLOCK_SIZE, often plausible
        sizes = st.sampled_from([0, 1, 3, 512, 4096, 65536, 131072, 1 << 25, 0xFFFFFFFF]) | U32
        return struct.pack(">HIII", 3, draw(sizes), draw(sizes), draw(sizes))
    if kind == 2:  # NAME / DESCRIPTION / unknown info
        return struct.pack(">H", draw(st.sampled_from([1, 2, 77]) | U16)) + draw(SMALL_TEXT)
    if kind == 3:  # META_CONTEXT
        return struct.pack(">I", draw(U32)) + draw(SMALL_TEXT)
    if kind == 4:  # SERVER
        name = draw(SMALL_TEXT)
        n = draw(st.sampled_from([len(name)]) | U32)
        return struct.pack(">I", n) + name + draw(SMALL_TEXT)
    if kind == 5:
        return b""
    return draw(st.binary(max_size=20))


@st.composite
def option_reply(draw: st.DrawFn) -> bytes:
    payload = draw(option_payload())
    length = draw(st.sampled_from([len(payload)]) | U32)
    return REPLY_MAGIC + struct.pack(">III", draw(OPTIONS), draw(REPLIES), length) + payload


@st.composite
def handshake_stream(draw: st.DrawFn) -> bytes:
    head = bytes([draw(U8), draw(st.sampled_from([0, 1, 3, 20, 255]))])
    if draw(st.integers(0, 5)) == 0:
        body = b"NBDMAGIC" + bytes.fromhex("0000420281861253")
        body += struct.pack(">QI", draw(st.integers(0, 1 << 40)), draw(U32)) + bytes(124)
        return head + body[: draw(st.integers(0, len(body)))]
    parts = [b"NBDMAGICIHAVEOPT", struct.pack(">H", draw(st.sampled_from([0, 1, 2, 3]) | U16))]
    for _ in range(draw(st.integers(0, 10))):
        if draw(st.integers(0, 7)) == 0:  # an EXPORT_NAME reply, with or without zeroes
            parts.append(struct.pack(">QH", draw(st.integers(0, 1 << 40)), draw(U16)))
            parts.append(bytes(draw(st.sampled_from([0, 124]))))
        else:
            parts.append(draw(option_reply()))
    return head + b"".join(parts)


@SETTINGS
@given(
    st.one_of(
        st.binary(max_size=300),
        mutated(HANDSHAKE.SEEDS),
        handshake_stream(),
    )
)
def test_handshake_harness(data: bytes) -> None:
    if len(data) < 2:
        HANDSHAKE.one_input(data)
        return
    for config in (data[0], data[0] ^ 0x0C):  # other reply styles asked for
        for step in (data[1], 1, 255):  # read sizes: as drawn, byte by byte, large
            HANDSHAKE.one_input(bytes([config, step]) + data[2:])


def test_handshake_seeds() -> None:
    for seed in HANDSHAKE.SEEDS:
        HANDSHAKE.one_input(seed)


# --- transmission streams ---------------------------------------------------------------

COOKIES = st.integers(0, 9) | st.integers(0, 0xFFFFFFFFFFFFFFFF)
CHUNK_TYPES = st.sampled_from([0, 1, 2, 5, 6, 0x8001, 0x8002, 0x8077, 3]) | U16
OFFSETS = st.sampled_from([0, 512, 1024, 4096, 4095, 8192, 65536]) | st.integers(0, 1 << 21)
ERRORS = st.sampled_from([0, 1, 5, 22, 28, 108, 9999])


@st.composite
def chunk_payload(draw: st.DrawFn, type_: int) -> bytes:
    if draw(st.integers(0, 7)) == 0:
        return draw(st.binary(max_size=40))
    if type_ == 1:
        return struct.pack(">Q", draw(OFFSETS)) + bytes(draw(st.integers(0, 600)))
    if type_ == 2:
        return struct.pack(">QI", draw(OFFSETS), draw(st.sampled_from([0, 1, 512, 4096]) | U32))
    if type_ in (5, 6):
        n = draw(st.integers(0, 4))
        cid = draw(st.sampled_from([1, 2, 3]) | U32)
        lengths = st.sampled_from([0, 512, 4096, 8192]) | U32
        if type_ == 5:
            return struct.pack(">I", cid) + b"".join(
                struct.pack(">II", draw(lengths), draw(U32)) for _ in range(n)
            )
        return struct.pack(">II", cid, draw(st.sampled_from([n]) | U32)) + b"".join(
            struct.pack(">QQ", draw(lengths), draw(U32)) for _ in range(n)
        )
    if type_ & 0x8000:
        msg = draw(SMALL_TEXT)
        mlen = draw(st.sampled_from([len(msg)]) | U16)
        tail = struct.pack(">Q", draw(OFFSETS)) if type_ == 0x8002 else draw(st.binary(max_size=8))
        return struct.pack(">IH", draw(ERRORS | U32), mlen) + msg + tail
    return b""


@st.composite
def reply(draw: st.DrawFn, style: int) -> bytes:
    cookie = draw(COOKIES)
    if style == 0 or draw(st.integers(0, 9)) == 0:
        data = bytes(draw(st.sampled_from([0, 0, 512, 4096]) | st.integers(0, 700)))
        return struct.pack(">IIQ", 0x67446698, draw(ERRORS | U32), cookie) + data
    type_ = draw(CHUNK_TYPES)
    payload = draw(chunk_payload(type_))
    flags = draw(st.sampled_from([0, 1]) | U16)
    if style >= 2:
        length = draw(st.sampled_from([len(payload)]) | st.integers(0, 1 << 64 - 1))
        offset = draw(st.sampled_from([0, 4096, 8192, 65536]) | st.integers(0, 1 << 64 - 1))
        head = struct.pack(">IHHQQQ", 0x6E8A278C, flags, type_, cookie, offset, length)
    else:
        length = draw(st.sampled_from([len(payload)]) | U32)
        head = struct.pack(">IHHQI", 0x668E33EF, flags, type_, cookie, length)
    return head + payload


@st.composite
def transmission_stream(draw: st.DrawFn) -> bytes:
    mode = draw(U8)
    head = bytes([mode, draw(st.sampled_from([0, 1, 7, 64, 0x80, 0x81, 0xC0]) | U8), draw(U8)])
    style = min(mode & 3, 2)
    return head + b"".join(draw(st.lists(reply(style), max_size=8)))


@SETTINGS
@given(
    st.one_of(
        st.binary(max_size=300),
        mutated(TRANSMISSION.SEEDS),
        transmission_stream(),
    )
)
def test_transmission_harness(data: bytes) -> None:
    if len(data) < 3:
        TRANSMISSION.one_input(data)
        return
    for mask in (data[2], 0xFF):  # requests in flight: as drawn, all
        for step in (data[1], 0x01, 0x81, 0x7F):  # byte by byte / large, both feeds
            TRANSMISSION.one_input(bytes([data[0], step, mask]) + data[3:])


def test_transmission_seeds() -> None:
    for seed in TRANSMISSION.SEEDS:
        TRANSMISSION.one_input(seed)
