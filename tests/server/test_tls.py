"""TLS in the asyncio server: X.509 and PSK, required and optional, with our clients and
libnbd's nbdinfo.

The certificates come from trustme (tests.peers.make_x509_dir: nbdkit's layout). Python
has server-side PSK only from 3.13: below it the server must refuse PSK with a TLSError
that says so (tested in-process), and the PSK tests run for real under Python 3.13 in a
subprocess: ``$PYNBD_PYTHON313``, else /root/.pyenv/versions/3.13.0/bin/python3. A
missing 3.13 fails the test; it never skips.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import ssl
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from pynbd.client import AsyncClient, Client
from pynbd.errors import NBDError, OptionError, TLSError
from pynbd.proto.constants import Rep
from pynbd.proto.server import TLSPolicy
from pynbd.server import Export, Limits, MemoryBackend, Server, ServerTLSConfig
from pynbd.server.tls import make_server_context, read_psk_file
from pynbd.transport.tls import TLSConfig
from tests.peers import make_psk_file, make_x509_dir, peer_env, python313
from tests.serve_launcher import child_env, start_pynbd

from .helpers import (
    PATIENCE,
    is_closed,
    raw_option,
    read_option_reply,
    recv_exactly,
    running_server,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def x509(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_x509_dir(tmp_path_factory.mktemp("tls"))


def ca_only(x509: Path, tmp_path: Path) -> Path:
    """A certificates directory with the CA but no client certificate."""
    d = tmp_path / "ca-only"
    d.mkdir()
    shutil.copy(x509 / "ca-cert.pem", d / "ca-cert.pem")
    return d


def nbdinfo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nbdinfo", *args], capture_output=True, text=True, timeout=60, env=peer_env()
    )


def roundtrip(c: Client) -> None:
    data = os.urandom(300_000)
    c.pwrite(data, 12345)
    assert c.pread(len(data), 12345) == data
    c.flush()


# --------------------------------------------------------------------------- X.509


@pytest.mark.parametrize("mode", [TLSPolicy.REQUIRED, TLSPolicy.OPTIONAL])
def test_x509_our_clients(x509: Path, mode: TLSPolicy) -> None:
    tls = ServerTLSConfig(certificates=str(x509))
    with running_server(MemoryBackend(4 << 20), tls=tls, tls_mode=mode) as srv:
        client_tls = TLSConfig(certificates=str(x509))
        with Client(path=srv.path, tls=client_tls) as c:
            assert c.negotiated.tls
            assert c.extended_headers or c.structured_replies
            roundtrip(c)
            assert c.block_status(c.size, 0)

        async def use_async() -> bytes:
            async with await AsyncClient.connect(path=srv.path, tls=client_tls) as ac:
                await ac.pwrite(b"async" * 1000, 0)
                return bytes(await ac.pread(5000, 0))

        assert asyncio.run(use_async()) == b"async" * 1000
        if mode is TLSPolicy.OPTIONAL:
            with Client(path=srv.path) as c:  # plaintext is fine in OPTIONAL
                assert not c.negotiated.tls
                assert c.pread(5, 0) == b"async"


def test_x509_nbdinfo(x509: Path) -> None:
    mem = MemoryBackend(8 << 20)
    mem.pwrite(memoryview(b"\xaa" * 65536), 1 << 20, False)
    with running_server(Export(mem, "tls disk"), tls=ServerTLSConfig(certificates=str(x509))) as s:
        uri = f"nbds+unix:///?socket={s.path}&tls-certificates={x509}"
        done = nbdinfo("--json", uri)
        assert done.returncode == 0, done.stderr
        info = json.loads(done.stdout)
        assert info["TLS"] is True
        (export,) = info["exports"]
        assert export["export-size"] == 8 << 20
        assert export["description"] == "tls disk"
        done = nbdinfo("--map", "--json", uri)
        assert done.returncode == 0, done.stderr
        got = [(e["offset"], e["length"], e["type"]) for e in json.loads(done.stdout)]
        end = (1 << 20) + 65536
        assert got == [(0, 1 << 20, 3), (1 << 20, 65536, 0), (end, (8 << 20) - end, 3)]
        # Without TLS nbdinfo is refused: every option gets TLS_REQD.
        plain = nbdinfo("--json", f"nbd+unix:///?socket={s.path}")
        assert plain.returncode != 0


def test_tls_required_refuses_a_plain_client(x509: Path) -> None:
    tls = ServerTLSConfig(certificates=str(x509))
    with running_server(MemoryBackend(1 << 20), tls=tls) as srv:
        with pytest.raises(OptionError) as info:
            Client(path=srv.path)
        assert info.value.reply == Rep.ERR_TLS_REQD
        # On the wire: LIST and GO get ERR_TLS_REQD, the connection stays up.
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(srv.path)
            assert recv_exactly(sock, 18)[:16] == b"NBDMAGICIHAVEOPT"
            sock.sendall(struct.pack(">I", 3))
            sock.sendall(raw_option(3))  # LIST
            assert read_option_reply(sock)[1] == Rep.ERR_TLS_REQD
            sock.sendall(raw_option(7, struct.pack(">I", 0) + struct.pack(">H", 0)))
            assert read_option_reply(sock)[1] == Rep.ERR_TLS_REQD
            sock.sendall(raw_option(2))  # ABORT
            assert read_option_reply(sock)[1] == Rep.ACK
            assert is_closed(sock)


def test_verify_peer(x509: Path, tmp_path: Path) -> None:
    tls = ServerTLSConfig(certificates=str(x509), verify_peer=True)
    with running_server(MemoryBackend(1 << 20), tls=tls) as srv:
        # The directory holds client-cert.pem and client-key.pem: accepted.
        with Client(path=srv.path, tls=TLSConfig(certificates=str(x509))) as c:
            roundtrip(c)
        done = nbdinfo("--size", f"nbds+unix:///?socket={srv.path}&tls-certificates={x509}")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == str(1 << 20)
        # No client certificate: turned away (in TLS 1.3, at the first read at the latest).
        no_cert = TLSConfig(certificates=str(ca_only(x509, tmp_path)))
        with pytest.raises(NBDError) as info, Client(path=srv.path, tls=no_cert) as c:
            c.pread(512, 0)
        assert info.value.fatal
        # The server lives on.
        with Client(path=srv.path, tls=TLSConfig(certificates=str(x509))) as c:
            assert c.pread(1, 0) == b"\0"


def test_bad_tls_handshake_ends_only_that_connection(x509: Path) -> None:
    tls = ServerTLSConfig(certificates=str(x509))
    with running_server(MemoryBackend(1 << 20), tls=tls) as srv:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(srv.path)
            recv_exactly(sock, 18)
            sock.sendall(struct.pack(">I", 3) + raw_option(5))  # STARTTLS
            assert read_option_reply(sock)[1] == Rep.ACK
            sock.sendall(b"this is not a TLS ClientHello" * 10)
            assert is_closed(sock)
        wait_until(lambda: not srv.call(lambda: len(srv.server.sessions)), "the session's end")
        with Client(path=srv.path, tls=TLSConfig(certificates=str(x509))) as c:
            roundtrip(c)


def test_option_in_the_same_write_as_the_tls_finished(x509: Path) -> None:
    """Bytes that arrive together with the end of the TLS handshake are the next option
    (asyncio may hand them over before start_tls returns): they must not be lost or
    taken for data sent in plaintext."""
    ctx = ssl.create_default_context(cafile=str(x509 / "ca-cert.pem"))
    ctx.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_side=False)
    exports = {"disk": Export(MemoryBackend(1 << 20), "the disk")}
    tls_config = ServerTLSConfig(certificates=str(x509))
    with running_server(exports, tls=tls_config) as srv, socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(srv.path)
        recv_exactly(sock, 18)
        sock.sendall(struct.pack(">I", 3) + raw_option(5))
        assert read_option_reply(sock)[1] == Rep.ACK
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if outgoing.pending:
                    sock.sendall(outgoing.read())
                incoming.write(sock.recv(65536))
        tls.write(raw_option(3))  # LIST, encrypted behind the client's Finished
        sock.sendall(outgoing.read())
        plain = bytearray()
        while b"the disk" not in plain or len(plain) < 20 + 4 + 4 + 8 + 20:
            try:
                plain += tls.read(65536)
            except ssl.SSLWantReadError:
                data = sock.recv(65536)
                assert data, f"connection closed after {bytes(plain)!r}"
                incoming.write(data)
        _magic, option, reply, length = struct.unpack(">QIII", plain[:20])
        assert (option, reply) == (3, Rep.SERVER)
        assert plain[20 : 20 + length] == struct.pack(">I", 4) + b"diskthe disk"


def test_shutdown_during_tls_handshake(x509: Path, tmp_path: Path) -> None:
    """A client that stalls inside the TLS handshake does not hold the server's close."""
    path = str(tmp_path / "nbd.sock")
    sock = socket.socket(socket.AF_UNIX)

    def starttls() -> None:
        sock.connect(path)
        recv_exactly(sock, 18)
        sock.sendall(struct.pack(">I", 3) + raw_option(5))
        assert read_option_reply(sock)[1] == Rep.ACK

    async def main() -> None:
        # Neither the TLS handshake's time limit nor the grace period ends before the
        # test gives up on close() (PATIENCE): only the shutdown itself can end it.
        limits = Limits(handshake_timeout=3600)
        tls = ServerTLSConfig(certificates=str(x509))
        server = Server(MemoryBackend(1 << 20), tls=tls, limits=limits)
        await server.start(unix=path)
        try:
            await asyncio.get_running_loop().run_in_executor(None, starttls)
            await asyncio.sleep(0.2)  # the server now waits for a ClientHello
            assert len(server.sessions) == 1
        finally:
            await asyncio.wait_for(server.close(3600), PATIENCE)

    try:
        asyncio.run(main())
        assert is_closed(sock)
    finally:
        sock.close()


def test_tls_mode_needs_credentials() -> None:
    with pytest.raises(ValueError, match="needs TLS credentials"):
        Server(MemoryBackend(1), tls_mode=TLSPolicy.REQUIRED)


def test_bad_credentials(tmp_path: Path, x509: Path) -> None:
    with pytest.raises(TLSError, match="does not exist"):
        make_server_context(ServerTLSConfig(certificates=str(tmp_path / "nope")))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TLSError, match=r"has no server-cert\.pem"):
        make_server_context(ServerTLSConfig(certificates=str(empty)))
    only_server = tmp_path / "server-only"
    only_server.mkdir()
    for name in ("server-cert.pem", "server-key.pem"):
        shutil.copy(x509 / name, only_server / name)
    context = make_server_context(ServerTLSConfig(certificates=str(only_server)))
    assert isinstance(context, ssl.SSLContext)
    with pytest.raises(TLSError, match=r"ca-cert\.pem"):
        make_server_context(ServerTLSConfig(certificates=str(only_server), verify_peer=True))
    (empty / "server-cert.pem").write_text("not a certificate")
    (empty / "server-key.pem").write_text("not a key")
    with pytest.raises(TLSError, match="cannot load server certificate"):
        make_server_context(ServerTLSConfig(certificates=str(empty)))


def test_psk_file_parsing(tmp_path: Path) -> None:
    f = tmp_path / "keys.psk"
    f.write_text("alice:00ff\n\nbob:0102\r\nalice:1111\n")
    assert read_psk_file(str(f)) == {"alice": b"\x00\xff", "bob": b"\x01\x02"}
    f.write_text("alice:0g\n")
    with pytest.raises(TLSError, match="line 1"):
        read_psk_file(str(f))
    f.write_text("\n")
    with pytest.raises(TLSError, match="no key"):
        read_psk_file(str(f))
    with pytest.raises(TLSError, match="cannot read"):
        read_psk_file(str(tmp_path / "missing"))


def test_psk_below_313_is_refused_clearly(tmp_path: Path) -> None:
    psk = make_psk_file(tmp_path)
    if sys.version_info >= (3, 13):
        assert isinstance(make_server_context(ServerTLSConfig(psk_file=str(psk))), ssl.SSLContext)
    else:
        with pytest.raises(TLSError, match=r"needs Python 3\.13"):
            Server(MemoryBackend(1), tls=ServerTLSConfig(psk_file=str(psk)))


# --------------------------------------------------------------------------- PSK (3.13)


# Run by Python 3.13 with PYTHONPATH=src:ROOT: our server with PSK, our clients with the
# right key, a wrong key and an unknown user. Prints one JSON line.
PSK_SCRIPT = r"""
import asyncio, json, os, sys
from pynbd.client import AsyncClient, Client
from pynbd.errors import NBDError
from pynbd.server import MemoryBackend, ServerTLSConfig
from pynbd.transport.tls import TLSConfig
from tests.server.helpers import running_server

psk, wrong = sys.argv[1], sys.argv[2]
out = {"python": sys.version.split()[0]}
with running_server(MemoryBackend(4 << 20), tls=ServerTLSConfig(psk_file=psk)) as srv:
    with Client(path=srv.path, tls=TLSConfig(psk_file=psk, username="alice")) as c:
        data = os.urandom(200000)
        c.pwrite(data, 777)
        out["sync"] = c.pread(len(data), 777) == data and c.negotiated.tls

    async def use():
        tls = TLSConfig(psk_file=psk, username="alice")
        async with await AsyncClient.connect(path=srv.path, tls=tls) as ac:
            return await ac.pread(10, 777) == data[:10]

    out["async"] = asyncio.run(use())
    for label, cfg in (("wrong_key", TLSConfig(psk_file=wrong, username="alice")),
                       ("unknown_user", TLSConfig(psk_file=wrong, username="mallory"))):
        try:
            with Client(path=srv.path, tls=cfg, timeout=10) as c:
                c.pread(1, 0)
            out[label] = "connected"
        except NBDError as exc:
            out[label] = type(exc).__name__
print(json.dumps(out))
"""


def test_psk_under_python313(tmp_path: Path) -> None:
    psk = make_psk_file(tmp_path)
    wrong = tmp_path / "wrong.psk"
    wrong.write_text(f"alice:{os.urandom(32).hex()}\nmallory:{os.urandom(32).hex()}\n")
    env = child_env()
    env["PYTHONPATH"] += os.pathsep + str(ROOT)  # for tests.server.helpers
    done = subprocess.run(
        [python313(), "-c", PSK_SCRIPT, str(psk), str(wrong)],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["python"].startswith("3.13"), result
    assert result["sync"] is True
    assert result["async"] is True
    assert result["wrong_key"] in ("TLSError", "ConnectionClosed"), result
    assert result["unknown_user"] in ("TLSError", "ConnectionClosed"), result


def test_nbdinfo_psk_against_a_python313_server(tmp_path: Path) -> None:
    psk = make_psk_file(tmp_path)
    with start_pynbd(
        tmp_path, "--memory", "16M", "--tls-psk-file", str(psk), listen="unix", python=python313()
    ) as srv:
        sock = srv.socket_path
        assert srv.uris == [f"nbds+unix:///?socket={sock}"], srv.log()
        uri = f"nbds+unix://alice@/?socket={sock}&tls-psk-file={psk}"
        done = nbdinfo("--json", uri)
        assert done.returncode == 0, done.stderr
        info = json.loads(done.stdout)
        assert info["TLS"] is True
        assert info["exports"][0]["export-size"] == 16 << 20
        # A key the server does not have for alice: refused.
        wrong = tmp_path / "wrong.psk"
        wrong.write_text(f"alice:{os.urandom(32).hex()}\n")
        bad = nbdinfo("--size", f"nbds+unix://alice@/?socket={sock}&tls-psk-file={wrong}")
        assert bad.returncode != 0
        assert srv.stop() == 0, srv.log()
