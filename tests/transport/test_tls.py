"""TLS contexts, the TLS handshake and stream opening (pynbd.transport.tls / .connect).

The interop tests run nbdkit with TLS and speak just enough NBD by hand (greeting,
NBD_OPT_STARTTLS, then NBD_OPT_ABORT over TLS) to prove the handshake; nothing here
uses pynbd's protocol core. TLS-PSK needs Python 3.13, so those tests run a small
script under tests.peers.python313(). The tests that need nbdkit or Python 3.13 are
marked interop; they fail, never skip, when it is missing.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import pwd
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from pynbd.client import Client
from pynbd.errors import ConnectionClosed, NBDTimeout, TLSError
from pynbd.transport import (
    TLSConfig,
    default_tls_username,
    make_client_context,
    open_stream,
    parse_uri,
    read_psk_key,
    start_client_tls,
    tls_error,
    wrap_socket,
)
from tests.peers import Server, free_port, python313
from tests.serve_launcher import child_env

# --- A hand-written minimum of NBD, for the tests only ---------------------------------
# (These functions are also copied into the Python 3.13 script with inspect.getsource.)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def raw_starttls(sock: socket.socket) -> None:
    """Newstyle greeting, client flags, NBD_OPT_STARTTLS; expect NBD_REP_ACK."""
    magic, ihaveopt, _flags = struct.unpack(">QQH", recv_exact(sock, 18))
    assert (magic, ihaveopt) == (0x4E42444D41474943, 0x49484156454F5054)
    sock.sendall(struct.pack(">I", 1))  # NBD_FLAG_C_FIXED_NEWSTYLE
    sock.sendall(struct.pack(">QII", 0x49484156454F5054, 5, 0))  # NBD_OPT_STARTTLS
    reply = struct.unpack(">QIII", recv_exact(sock, 20))
    assert reply == (0x3E889045565A9, 5, 1, 0), reply  # NBD_REP_ACK, no payload


def raw_abort(sock: socket.socket) -> None:
    """NBD_OPT_ABORT; expect NBD_REP_ACK (nbdkit sends one)."""
    sock.sendall(struct.pack(">QII", 0x49484156454F5054, 2, 0))
    reply = struct.unpack(">QIII", recv_exact(sock, 20))
    assert reply == (0x3E889045565A9, 2, 1, 0), reply


# --- Certificates -----------------------------------------------------------------------


@dataclass
class PKI:
    server_dir: Path  # ca-cert.pem, server-cert.pem, server-key.pem
    client_dir: Path  # ca-cert.pem, client-cert.pem, client-key.pem
    ca_only_dir: Path  # ca-cert.pem
    other_ca_dir: Path  # ca-cert.pem of an unrelated CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    base = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1", "::1")
    client = ca.issue_cert("client.example")
    dirs = PKI(base / "server", base / "client", base / "ca", base / "other")
    for d in (dirs.server_dir, dirs.client_dir, dirs.ca_only_dir, dirs.other_ca_dir):
        d.mkdir()
        if d is not dirs.other_ca_dir:
            ca.cert_pem.write_to_path(str(d / "ca-cert.pem"))
    server.private_key_pem.write_to_path(str(dirs.server_dir / "server-key.pem"))
    server.cert_chain_pems[0].write_to_path(str(dirs.server_dir / "server-cert.pem"))
    client.private_key_pem.write_to_path(str(dirs.client_dir / "client-key.pem"))
    client.cert_chain_pems[0].write_to_path(str(dirs.client_dir / "client-cert.pem"))
    trustme.CA().cert_pem.write_to_path(str(dirs.other_ca_dir / "ca-cert.pem"))
    return dirs


def tls_roundtrip(server: Server, cfg: TLSConfig, host: str | None = None) -> str:
    """Connect, STARTTLS, handshake, ABORT over TLS; return the TLS version."""
    if server.socket_path is not None:
        sock = open_stream(path=os.fspath(server.socket_path), timeout=10)
    else:
        sock = open_stream(host="127.0.0.1", port=server.port, timeout=10)
    try:
        raw_starttls(sock)
    except BaseException:
        sock.close()
        raise
    ssock = start_client_tls(sock, cfg, host, timeout=10)
    with ssock:
        try:
            raw_abort(ssock)
        except (OSError, EOFError) as exc:
            # TLS 1.3: a refused client certificate is only seen on the first read.
            raise tls_error(exc) from exc
        return str(ssock.version())


# --- X.509 against nbdkit ---------------------------------------------------------------


@pytest.mark.interop
def test_x509_tcp_verified(nbdkit: Callable[..., Server], pki: PKI) -> None:
    with nbdkit("memory", "1M", tls="x509", tls_creds=pki.server_dir, tcp=True) as srv:
        # By IP address (the server certificate names 127.0.0.1) and by name.
        cfg = TLSConfig(certificates=str(pki.ca_only_dir))
        assert tls_roundtrip(srv, cfg, "127.0.0.1") in ("TLSv1.2", "TLSv1.3")
        ctx = make_client_context(cfg, "127.0.0.1")
        assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
        # The same through a URI.
        uri = parse_uri(f"nbds://127.0.0.1:{srv.port}/?tls-certificates={pki.ca_only_dir}")
        from_uri = TLSConfig.from_uri(uri)
        assert from_uri is not None and from_uri.required
        sock = open_stream(uri, timeout=10)
        raw_starttls(sock)
        with start_client_tls(sock, from_uri, uri.host, timeout=10) as ssock:
            raw_abort(ssock)


@pytest.mark.interop
def test_x509_wrong_ca_fails(nbdkit: Callable[..., Server], pki: PKI) -> None:
    with nbdkit("memory", "1M", tls="x509", tls_creds=pki.server_dir, tcp=True) as srv:
        cfg = TLSConfig(certificates=str(pki.other_ca_dir))
        with pytest.raises(TLSError, match="certificate verification failed") as info:
            tls_roundtrip(srv, cfg, "127.0.0.1")
        assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
        assert "\n" not in str(info.value)
        # The system CAs do not know a test CA either.
        with pytest.raises(TLSError, match="certificate verification failed"):
            tls_roundtrip(srv, TLSConfig(), "127.0.0.1")
        # Without verification the wrong CA does not matter (and nothing is checked).
        assert tls_roundtrip(srv, TLSConfig(certificates=str(pki.other_ca_dir), verify_peer=False))


@pytest.mark.interop
def test_x509_unix_socket_names(nbdkit: Callable[..., Server], pki: PKI) -> None:
    with nbdkit("memory", "1M", tls="x509", tls_creds=pki.server_dir) as srv:
        ca = str(pki.ca_only_dir)
        # No name over a unix socket: the chain is verified, the name is not.
        assert not make_client_context(TLSConfig(certificates=ca)).check_hostname
        assert tls_roundtrip(srv, TLSConfig(certificates=ca))
        # A hostname is checked against the certificate.
        assert tls_roundtrip(srv, TLSConfig(certificates=ca, hostname="localhost"))
        with pytest.raises(TLSError, match="Hostname mismatch"):
            tls_roundtrip(srv, TLSConfig(certificates=ca, hostname="wrong.example"))
        # The chain is still checked without a name.
        with pytest.raises(TLSError, match="verification failed"):
            tls_roundtrip(srv, TLSConfig(certificates=str(pki.other_ca_dir)))


@pytest.mark.interop
def test_x509_unix_socket_never_trusts_the_system_cas_without_a_name(
    nbdkit: Callable[..., Server], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A server over a unix socket with a certificate for some other site, issued by a
    # CA the system trusts (SSL_CERT_FILE stands for the system's CAs here).
    public = trustme.CA()
    creds = tmp_path / "creds"
    creds.mkdir()
    public.cert_pem.write_to_path(str(creds / "ca-cert.pem"))
    site = public.issue_cert("evil.example")
    site.private_key_pem.write_to_path(str(creds / "server-key.pem"))
    site.cert_chain_pems[0].write_to_path(str(creds / "server-cert.pem"))
    public.cert_pem.write_to_path(str(tmp_path / "system-cas.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "system-cas.pem"))
    with nbdkit("memory", "1M", tls="x509", tls_creds=creds) as srv:
        with pytest.raises(TLSError) as info:
            tls_roundtrip(srv, TLSConfig())
        assert "add tls-certificates=DIR" in str(info.value)
        assert "or tls-hostname=NAME" in str(info.value)
        assert "tls-verify-peer=false" in str(info.value)
        # The same through a URI, with pynbd's client.
        uri = f"nbds+unix:///?socket={srv.socket_path}"
        with pytest.raises(TLSError, match="without tls-hostname"):
            Client(uri, timeout=10)
        # With the name to check, the system CAs are as good as for TCP.
        assert tls_roundtrip(srv, TLSConfig(hostname="evil.example"))
        with pytest.raises(TLSError, match="Hostname mismatch"):
            tls_roundtrip(srv, TLSConfig(hostname="localhost"))
        # A pinned CA, or no verification at all, as asked.
        assert tls_roundtrip(srv, TLSConfig(certificates=str(creds)))
        assert tls_roundtrip(srv, TLSConfig(verify_peer=False))
        with Client(f"{uri}&tls-verify-peer=false", timeout=10) as c:
            assert c.size == 1 << 20


@pytest.mark.interop
def test_x509_tls_hostname_over_tcp(nbdkit: Callable[..., Server], pki: PKI) -> None:
    with nbdkit("memory", "1M", tls="x509", tls_creds=pki.server_dir, tcp=True) as srv:
        ca = str(pki.ca_only_dir)
        # hostname wins over the address connected to.
        assert tls_roundtrip(srv, TLSConfig(certificates=ca, hostname="localhost"), "127.0.0.1")
        with pytest.raises(TLSError, match="Hostname mismatch"):
            tls_roundtrip(srv, TLSConfig(certificates=ca, hostname="other.example"), "127.0.0.1")


@pytest.mark.interop
def test_x509_client_certificate(nbdkit: Callable[..., Server], pki: PKI) -> None:
    with nbdkit("memory", "1M", tls="x509", tls_creds=pki.server_dir, tls_verify_peer=True) as srv:
        # The directory's client-cert.pem and client-key.pem are sent.
        assert tls_roundtrip(srv, TLSConfig(certificates=str(pki.client_dir)))
        # Or named files.
        files = TLSConfig(
            cafile=str(pki.ca_only_dir / "ca-cert.pem"),
            certfile=str(pki.client_dir / "client-cert.pem"),
            keyfile=str(pki.client_dir / "client-key.pem"),
        )
        assert tls_roundtrip(srv, files)
        # Without a client certificate nbdkit refuses (at the handshake or, with TLS 1.3,
        # on the first read after it).
        with pytest.raises(TLSError):
            tls_roundtrip(srv, TLSConfig(certificates=str(pki.ca_only_dir)))


# --- PSK ----------------------------------------------------------------------------------

PSK_SCRIPT = """
import socket, struct, sys
from pynbd.errors import NBDError
from pynbd.transport import TLSConfig, open_stream, start_client_tls

{helpers}

def main():
    path, psk_file, user = sys.argv[1:4]
    sock = open_stream(path=path, timeout=10)
    raw_starttls(sock)
    try:
        cfg = TLSConfig(psk_file=psk_file, username=user or None)
        with start_client_tls(sock, cfg, None, timeout=10) as ssock:
            raw_abort(ssock)
            print("OK", ssock.version(), ssock.cipher()[0])
    except NBDError as exc:
        print(type(exc).__name__ + ":", exc)

main()
"""


def run_psk_client(tmp: Path, path: Path, psk_file: Path, user: str) -> str:
    helpers = "\n\n".join(inspect.getsource(f) for f in (recv_exact, raw_starttls, raw_abort))
    script = tmp / "psk_client.py"
    script.write_text(PSK_SCRIPT.format(helpers=helpers))
    env = {**child_env(), "LOGNAME": "alice"}
    out = subprocess.run(
        [python313(), str(script), str(path), str(psk_file), user],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.fixture
def psk_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.psk"
    # (LF only: nbdkit reads a CR as part of the key.)
    path.write_text(f"bob:{os.urandom(32).hex()}\nalice:{os.urandom(32).hex()}\n")
    return path


@pytest.mark.interop
def test_psk_against_nbdkit(tmp_path: Path, psk_file: Path, nbdkit: Callable[..., Server]) -> None:
    with nbdkit("memory", "1M", tls="psk", tls_creds=psk_file) as srv:
        assert srv.socket_path is not None
        out = run_psk_client(tmp_path, srv.socket_path, psk_file, "alice")
        assert out.startswith("OK TLSv1.3"), out
        # The user name defaults to $LOGNAME (alice in the script's environment).
        assert run_psk_client(tmp_path, srv.socket_path, psk_file, "").startswith("OK "), out
        out = run_psk_client(tmp_path, srv.socket_path, psk_file, "bob")
        assert out.startswith("OK "), out
        # A key nbdkit does not have for that user.
        wrong = tmp_path / "wrong.psk"
        wrong.write_text(f"alice:{os.urandom(32).hex()}\n")
        out = run_psk_client(tmp_path, srv.socket_path, wrong, "alice")
        assert out.startswith("TLSError: "), out
        # A user the client's file does not have: refused before any TLS.
        out = run_psk_client(tmp_path, srv.socket_path, psk_file, "carol")
        assert out == f"TLSError: PSK file {psk_file} has no key for user 'carol'", out


@pytest.mark.interop
def test_psk_refuses_certificate_server(
    tmp_path: Path, psk_file: Path, pki: PKI, nbdkit: Callable[..., Server]
) -> None:
    # A server without the key answers with a certificate handshake; a PSK client
    # verifies no certificates, so without the check this would be a silent success.
    with nbdkit("memory", "1M", tls="x509", tls_creds=pki.server_dir) as srv:
        assert srv.socket_path is not None
        out = run_psk_client(tmp_path, srv.socket_path, psk_file, "alice")
        assert out.startswith("TLSError: the server answered with a certificate"), out


@pytest.mark.skipif(sys.version_info >= (3, 13), reason="PSK works on this Python")
def test_psk_needs_python_313(psk_file: Path) -> None:
    version = ".".join(str(n) for n in sys.version_info[:3])
    with pytest.raises(TLSError) as info:
        make_client_context(TLSConfig(psk_file=str(psk_file), username="alice"))
    assert str(info.value) == f"TLS-PSK needs Python 3.13 or newer; this is Python {version}"


# --- PSK files and user names --------------------------------------------------------------


def test_read_psk_key(tmp_path: Path) -> None:
    path = tmp_path / "k.psk"
    path.write_bytes(b"\nbob:00ff\r\nalice:0A0b\nalice:cccc\nmallory:zz\n")
    assert read_psk_key(str(path), "alice") == b"\x0a\x0b"  # first line wins
    assert read_psk_key(str(path), "bob") == b"\x00\xff"  # CRLF tolerated
    with pytest.raises(TLSError, match="not hex digits"):
        read_psk_key(str(path), "mallory")
    with pytest.raises(TLSError, match="has no key for user 'al'"):
        read_psk_key(str(path), "al")  # a prefix of a user name is not that user
    with pytest.raises(TLSError, match="cannot appear"):
        read_psk_key(str(path), "a:b")
    with pytest.raises(TLSError, match=r"cannot read PSK file .*No such file"):
        read_psk_key(str(tmp_path / "missing"), "alice")
    path.write_text("alice:abc\n")
    with pytest.raises(TLSError, match="not hex digits"):
        read_psk_key(str(path), "alice")  # odd length
    path.write_text("alice:\n")
    with pytest.raises(TLSError, match="not hex digits"):
        read_psk_key(str(path), "alice")  # empty key


def test_default_tls_username(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOGNAME", "someone")
    assert default_tls_username() == "someone"
    monkeypatch.delenv("LOGNAME")

    def no_login() -> str:
        raise OSError(6, "No such device or address")

    monkeypatch.setattr(os, "getlogin", no_login)
    assert default_tls_username() == pwd.getpwuid(os.geteuid()).pw_name


# --- Contexts without a server --------------------------------------------------------------


def test_context_settings(pki: PKI) -> None:
    ctx = make_client_context(TLSConfig(certificates=str(pki.client_dir)), "h")
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    off = make_client_context(TLSConfig(verify_peer=False), "h")
    assert off.verify_mode == ssl.CERT_NONE and not off.check_hostname
    # No CA given: the system CAs, with the name checked.
    assert make_client_context(TLSConfig(), "h").verify_mode == ssl.CERT_REQUIRED
    # Over a unix socket (no host) without a name: only a pinned CA, never the system's.
    with pytest.raises(TLSError, match="without tls-hostname would accept any certificate"):
        make_client_context(TLSConfig())
    assert not make_client_context(TLSConfig(certificates=str(pki.ca_only_dir))).check_hostname
    assert make_client_context(TLSConfig(hostname="srv")).check_hostname
    assert make_client_context(TLSConfig(verify_peer=False)).verify_mode == ssl.CERT_NONE


def test_context_errors(tmp_path: Path, pki: PKI) -> None:
    with pytest.raises(TLSError, match=r"directory .* does not exist"):
        make_client_context(TLSConfig(certificates=str(tmp_path / "nope")))
    with pytest.raises(TLSError, match="key was given without its certificate"):
        make_client_context(TLSConfig(keyfile=str(pki.client_dir / "client-key.pem")))
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(TLSError, match=f"cannot load CA certificate {bad}"):
        make_client_context(TLSConfig(cafile=str(bad)))
    with pytest.raises(TLSError, match="cannot load client certificate"):
        make_client_context(TLSConfig(certfile=str(bad)))
    with pytest.raises(TLSError, match=r"cannot load CA certificate .*No such file"):
        make_client_context(TLSConfig(cafile=str(tmp_path / "missing.pem")))


def test_from_uri_and_server_name() -> None:
    assert TLSConfig.from_uri(parse_uri("nbd://h/?tls-certificates=/c")) is None
    cfg = TLSConfig.from_uri(
        parse_uri("nbds+unix://bob@/?socket=/s&tls-psk-file=/k&tls-hostname=srv&tls-verify-peer=0")
    )
    assert cfg == TLSConfig(
        psk_file="/k", username="bob", hostname="srv", verify_peer=False, required=True
    )
    assert cfg.is_psk
    assert cfg.server_name(None) == "srv"
    assert TLSConfig().server_name("h") == "h"
    assert TLSConfig().server_name(None) is None


#: A peer that says nothing hangs up after this long: a client still waiting then has
#: overstayed its timeout, and sees the connection end instead of timing out.
LATE = 20.0


@contextlib.contextmanager
def hang_up_after(seconds: float, close: Callable[[], None]) -> Iterator[None]:
    """Call ``close`` after ``seconds``, unless the block has ended by then."""
    timer = threading.Timer(seconds, close)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()


def test_handshake_timeout() -> None:
    # A peer that never answers the ClientHello.
    a, b = socket.socketpair()
    with b, hang_up_after(LATE, b.close):
        with pytest.raises(NBDTimeout):
            wrap_socket(a, make_client_context(TLSConfig(verify_peer=False)), None, 0.3)
        assert a.fileno() == -1  # taken over and closed


def test_handshake_peer_hangs_up() -> None:
    a, b = socket.socketpair()
    b.close()
    with pytest.raises(TLSError, match="closed the connection"):
        wrap_socket(a, make_client_context(TLSConfig(verify_peer=False)), None, 5)


def test_handshake_needs_name_when_checking() -> None:
    ctx = make_client_context(TLSConfig(), "h")
    a, b = socket.socketpair()
    with b:
        with pytest.raises(TLSError):
            wrap_socket(a, ctx, None, 5)
        assert a.fileno() == -1


def test_handshake_restores_timeout(pki: PKI) -> None:
    # A local TLS server on a socketpair, to see the socket's timeout come back.

    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(pki.server_dir / "server-cert.pem", pki.server_dir / "server-key.pem")
    a, b = socket.socketpair()

    def serve() -> None:
        with sctx.wrap_socket(b, server_side=True) as s:
            s.sendall(b"x")

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        a.settimeout(7.0)
        ctx = make_client_context(TLSConfig(certificates=str(pki.ca_only_dir)), "localhost")
        with wrap_socket(a, ctx, "localhost", 30) as ssock:
            assert ssock.gettimeout() == 7.0
            assert recv_exact(ssock, 1) == b"x"
    finally:
        thread.join(10)


# --- open_stream -------------------------------------------------------------------------------


def test_open_stream_tcp() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        with open_stream(host="127.0.0.1", port=port, timeout=5) as sock:
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
            assert sock.gettimeout() == 5
            conn, _ = listener.accept()
            with conn:
                conn.sendall(b"hi")
                assert recv_exact(sock, 2) == b"hi"
        with open_stream(parse_uri(f"nbd://127.0.0.1:{port}/x")) as sock:
            assert sock.gettimeout() is None
            listener.accept()[0].close()


def test_open_stream_tcp_ipv6() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        listener = socket.socket(socket.AF_INET6)
        listener.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    with listener:
        listener.listen(1)
        port = listener.getsockname()[1]
        with open_stream(parse_uri(f"nbd://[::1]:{port}/"), timeout=5) as sock:
            assert sock.family == socket.AF_INET6
            listener.accept()[0].close()
        with open_stream(host="[::1]", port=port, timeout=5):
            listener.accept()[0].close()


def test_open_stream_refused() -> None:
    port = free_port()
    with pytest.raises(ConnectionClosed) as info:
        open_stream(host="127.0.0.1", port=port, timeout=5)
    assert str(info.value) == f"cannot connect to 127.0.0.1:{port}: Connection refused"
    assert isinstance(info.value.__cause__, ConnectionRefusedError)


def test_open_stream_timeout() -> None:
    # A listener with backlog 0 takes one connection; the kernel then drops SYNs.
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        addr = listener.getsockname()
        filler.connect(addr)
        message = f"cannot connect to 127.0.0.1:{addr[1]}: timed out"
        with hang_up_after(LATE, listener.close), pytest.raises(NBDTimeout, match=message):
            open_stream(host="127.0.0.1", port=addr[1], timeout=0.3)


def test_open_stream_resolve_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> list[object]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    with pytest.raises(ConnectionClosed, match="cannot resolve nohost: Name or service not known"):
        open_stream(host="nohost")


def test_open_stream_unix(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    with pytest.raises(ConnectionClosed) as info:
        open_stream(path=path)
    assert str(info.value) == f"cannot connect to unix socket {path}: No such file or directory"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen(1)
        with open_stream(parse_uri(f"nbd+unix:///?socket={path}"), timeout=5) as sock:
            assert sock.family == socket.AF_UNIX
            listener.accept()[0].close()


def test_open_stream_unix_abstract() -> None:
    name = f"\0pynbd-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(name)
        listener.listen(1)
        with open_stream(parse_uri("nbd+unix:///?socket=%00" + name[1:])) as sock:
            listener.accept()[0].close()
            assert sock.family == socket.AF_UNIX
    with pytest.raises(ConnectionClosed, match="unix socket @pynbd-test"):
        open_stream(path=name)


def test_open_stream_unix_backlog_full(tmp_path: Path) -> None:
    # A full unix backlog makes a connect with a timeout fail with EAGAIN at once; it
    # must wait for the timeout instead, and succeed when room is made.
    path = str(tmp_path / "busy.sock")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen(0)
        fillers = []
        for _ in range(3):
            s = socket.socket(socket.AF_UNIX)
            s.setblocking(False)
            try:
                s.connect(path)
            except BlockingIOError:
                s.close()
                break
            fillers.append(s)
        try:
            with pytest.raises(NBDTimeout):
                open_stream(path=path, timeout=0.3)
            timer = threading.Timer(0.2, lambda: listener.accept()[0].close())
            timer.start()
            try:
                with open_stream(path=path, timeout=30):
                    pass
            finally:
                timer.join()
        finally:
            for s in fillers:
                s.close()


def test_open_stream_arguments(tmp_path: Path) -> None:
    uri = parse_uri("nbd://h/")
    with pytest.raises(ValueError, match="not several"):
        open_stream(uri, host="h")
    with pytest.raises(ValueError, match="not both"):
        open_stream(host="h", path="/s")
    with pytest.raises(ValueError, match="give a URI"):
        open_stream()
    with pytest.raises(ValueError, match="1-65535"):
        open_stream(host="127.0.0.1", port=0)
