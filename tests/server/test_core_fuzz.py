"""Whatever a client sends, the server core raises nothing but ProtocolError."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pynbd.errors import ProtocolError
from pynbd.proto.constants import IHAVEOPT, Cmd, CmdFlag
from pynbd.proto.handshake import HandshakeConfig
from pynbd.proto.server import ServerConfig, ServerConnection

from .helpers import Store, full_spec, handshake

SPEC = full_spec("disk", 1 << 16, minimum_block=1)
CONFIG = ServerConfig({"disk": SPEC}, default_export="disk", max_option_length=4096)
MODES = [
    HandshakeConfig(structured_replies=False, extended_headers=False),
    HandshakeConfig(extended_headers=False),
    HandshakeConfig(),
]


def feed(conn: ServerConnection, chunks: list[bytes]) -> None:
    store = Store(bytearray(SPEC.size))
    try:
        for chunk in filter(None, chunks):  # b"" would mean end of stream
            conn.receive_data(chunk)
            store.serve(conn)
            conn.data_to_send()
        conn.receive_data(b"")
        store.serve(conn)
    except ProtocolError:
        pass
    assert conn.in_flight == 0


option = st.builds(
    lambda opt, data: struct.pack(">QII", IHAVEOPT, opt, len(data)) + data,
    st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0xFFFFFFFF]),
    st.binary(max_size=64),
)
chunks = st.lists(st.binary(min_size=1, max_size=64), max_size=8)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flags=st.sampled_from([0, 1, 2, 3, 4]), options=st.lists(option, max_size=6), tail=chunks)
def test_handshake_input(flags: int, options: list[bytes], tail: list[bytes]) -> None:
    conn = ServerConnection(CONFIG)
    conn.data_to_send()
    feed(conn, [struct.pack(">I", flags), *options, *tail])


def request_bytes(extended: bool) -> st.SearchStrategy[bytes]:
    def build(cmd: int, flags: int, offset: int, length: int, payload: bytes) -> bytes:
        if extended:
            if payload:
                flags |= CmdFlag.PAYLOAD_LEN
                length = len(payload)
            return struct.pack(">IHHQQQ", 0x21E41C71, flags, cmd, 1, offset, length) + payload
        if cmd == Cmd.WRITE:
            length = len(payload)
        return struct.pack(">IHHQQI", 0x25609513, flags, cmd, 1, offset, length) + payload

    return st.builds(
        build,
        st.integers(0, 10),
        st.integers(0, 0xFFFF) | st.sampled_from([0, 1, 2, 4, 8, 16, 32]),
        st.integers(0, 1 << 17) | st.integers(0, 2**64 - 1),
        st.integers(0, 1 << 17) | st.integers(0, 2**32 - 1),
        st.binary(max_size=300),
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mode=st.sampled_from(range(len(MODES))),
    data=st.data(),
    junk=chunks,
)
def test_transmission_input(mode: int, data: st.DataObject, junk: list[bytes]) -> None:
    conn = ServerConnection(CONFIG)
    config = MODES[mode]
    handshake(conn, config)
    extended = config.extended_headers
    requests = data.draw(st.lists(request_bytes(extended), max_size=8))
    stream = b"".join(requests)
    cut = data.draw(st.integers(0, len(stream)))
    feed(conn, [stream[:cut], stream[cut:], *junk])
