"""pynbd's clients over TLS: X.509 against nbdkit and qemu-nbd, TLS-PSK against nbdkit
and qemu-nbd.

Python exposes client PSK only from 3.13, so on an older interpreter the client must
refuse PSK with a TLSError that says so (tested in-process), and the same PSK
connections are run for real in a subprocess under Python 3.13: the interpreter named by
``$PYNBD_PYTHON313``, else /root/.pyenv/versions/3.13.0/bin/python3. A missing 3.13
fails the test; it never skips.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pynbd.errors import (
    ExportNotFound,
    NBDError,
    OptionError,
    TLSError,
)
from pynbd.proto.constants import Rep
from tests.drivers import Driver
from tests.peers import Peers, Server, make_psk_file, make_raw_image, make_x509_dir, python313
from tests.serve_launcher import child_env

from .conftest import KiB, MiB, exercise_all

pytestmark = pytest.mark.interop

Factory = Callable[..., Server]


#: How a server that demands a client certificate turns away a client without one.
#: With TLS 1.3 the server checks the certificate after the client's handshake is done,
#: so the client sees the connection drop on its first read after STARTTLS; the two
#: clients report that differently today (see the report), all of them fatal.
def _without_certificate(peers: Peers, tmp_path: Path) -> Path:
    """A certificates directory with the test CA but no client certificate."""
    directory = tmp_path / "ca-only"
    directory.mkdir()
    (directory / "ca-cert.pem").write_bytes((peers.x509_dir() / "ca-cert.pem").read_bytes())
    return directory


def _roundtrip(c: Any) -> bytes:
    """Write, read back and flush 1 MiB + 3 bytes at offset 4097; returns the data."""
    data = os.urandom(1 * MiB + 3)
    c.pwrite(data, 4097)
    assert c.pread(len(data), 4097) == data
    c.flush()
    return data


# --------------------------------------------------------------------------- X.509


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_nbdkit_x509(api: Driver, nbdkit: Factory, tcp: bool) -> None:
    # The server demands a client certificate (--tls-verify-peer); the URI's
    # tls-certificates directory holds the CA and the client's certificate and key.
    server = nbdkit("memory", "48M", tcp=tcp, tls="x509", tls_verify_peer=True)
    assert server.uri.startswith("nbds")
    c = api.connect(server.uri)
    assert c.tls
    assert c.structured_replies
    if tcp:
        _roundtrip(c)
    else:
        result = exercise_all(c, trim_zeroes=True)
        assert {"split", "fua", "flush", "trim", "zero", "df", "block_status"} <= result.done


def _rejected(api: Driver, uri: str) -> type[NBDError]:
    """Connect and read; the attempt must fail with TLSError and
    leave no socket behind (a leaked one warns when collected: caught here, so that
    the failure is reported by this test and not by whichever test runs the GC)."""
    kinds: list[type[NBDError] | None] = []
    leaks = _leaks(lambda: kinds.append(_attempt(api, uri)))
    assert not leaks, f"the refused client left sockets open: {leaks}"
    kind = kinds[0]
    assert kind is not None, "a client without a certificate got in"
    # The server hangs up right after the TLS handshake: reported as a TLS failure.
    assert kind is TLSError, kind
    return kind


def _attempt(api: Driver, uri: str) -> type[NBDError] | None:
    # Only the exception's type leaves this frame: its traceback (and the sockets its
    # frames hold) must be freed before _rejected looks for leaks.
    try:
        c = api.connect(uri)
        c.pread(512, 0)  # TLS 1.3: the rejection may come with the first read
    except NBDError as exc:
        return type(exc)
    return None


def _leaks(fn: Callable[[], object]) -> list[str]:
    """Run ``fn`` and collect; return the ResourceWarnings (unclosed sockets) seen."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        fn()
        gc.collect()
    return [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


def test_nbdkit_x509_client_certificate_required(api: Driver, peers: Peers, tmp_path: Path) -> None:
    server = peers.nbdkit("memory", "1M", tls="x509", tls_verify_peer=True)
    assert server.tls_dir is not None
    ca_only = _without_certificate(peers, tmp_path)
    _rejected(api, server.uri.replace(os.fspath(server.tls_dir), os.fspath(ca_only)))
    # The server is unharmed: a client with a certificate gets in.
    assert api.connect(server.uri).pread(512, 0) == bytes(512)


def test_nbdkit_x509_untrusted_server(api: Driver, peers: Peers) -> None:
    server = peers.nbdkit("memory", "1M", tls="x509")
    assert server.tls_dir is not None
    other = make_x509_dir(peers.workdir, "other-ca")
    with pytest.raises(TLSError, match="verification failed"):
        api.connect(server.uri.replace(os.fspath(server.tls_dir), os.fspath(other)))


def test_nbdkit_x509_hostname_checked(api: Driver, nbdkit: Factory) -> None:
    server = nbdkit("memory", "1M", tcp=True, tls="x509")
    # The certificate names localhost and 127.0.0.1, which the URI connects to.
    assert api.connect(server.uri).tls
    assert api.connect(server.uri + "&tls-hostname=localhost").tls
    with pytest.raises(TLSError, match="verification failed"):
        api.connect(server.uri + "&tls-hostname=other.example")


def test_nbdkit_x509_plaintext_client_refused(api: Driver, nbdkit: Factory) -> None:
    server = nbdkit("memory", "1M", tls="x509")
    plain = server.uri_for(tls_params=False).replace("nbds+unix://", "nbd+unix://", 1)
    with pytest.raises(OptionError) as info:
        api.connect(plain)
    assert info.value.reply == Rep.ERR_TLS_REQD


def test_qemu_x509(api: Driver, peers: Peers, tmp_path: Path) -> None:
    # qemu's tls-creds-x509 reads ca-cert.pem, server-cert.pem and server-key.pem (and
    # dh-params.pem) from dir=, the names make_x509_dir writes.
    image = make_raw_image(tmp_path / "disk.raw", 8 * MiB)
    server = peers.qemu_nbd(image, "raw", "disk", tls="x509", tls_verify_peer=True)
    c = api.connect(server.uri)
    assert c.tls and c.export_name == "disk"
    assert c.get_block_size("maximum") == 32 * MiB
    data = _roundtrip(c)
    assert c.block_status(1 * MiB, 4096)[0].flags == 0  # written: data
    c.close()
    with open(image, "rb") as f:
        f.seek(4097)
        assert f.read(len(data)) == data


def test_qemu_x509_client_certificate_required(api: Driver, peers: Peers, tmp_path: Path) -> None:
    image = make_raw_image(tmp_path / "disk.raw", 1 * MiB)
    server = peers.qemu_nbd(image, "raw", "disk", tls="x509", tls_verify_peer=True)
    assert server.tls_dir is not None
    ca_only = _without_certificate(peers, tmp_path)
    _rejected(api, server.uri.replace(os.fspath(server.tls_dir), os.fspath(ca_only)))
    assert api.connect(server.uri).pread(512, 0) == bytes(512)


def test_qemu_x509_unknown_export(api: Driver, peers: Peers, tmp_path: Path) -> None:
    """An option error after STARTTLS: ExportNotFound, and no socket left open."""
    image = make_raw_image(tmp_path / "disk.raw", 1 * MiB)
    server = peers.qemu_nbd(image, "raw", "disk", tls="x509")

    def attempt() -> None:
        with pytest.raises(ExportNotFound):
            api.connect(server.uri, export_name="nope")

    assert _leaks(attempt) == []
    assert api.connect(server.uri).tls


# --------------------------------------------------------------------------- PSK


def test_psk_needs_python_313(api: Driver, nbdkit: Factory) -> None:
    """In this interpreter: below 3.13 PSK is refused with a TLSError that says why;
    from 3.13 on it works."""
    server = nbdkit("memory", "4M", tls="psk")
    if sys.version_info < (3, 13):
        with pytest.raises(TLSError, match=r"needs Python 3\.13"):
            api.connect(server.uri)
    else:
        c = api.connect(server.uri)
        assert c.tls
        _roundtrip(c)


# Run by Python 3.13 with PYTHONPATH=src: both clients over PSK, a wrong key and a wrong
# user name. Prints one JSON object.
_PSK_SCRIPT = r"""
import asyncio, json, os, sys
from pynbd import AsyncClient, Client
from pynbd.errors import NBDError, TLSError

good, wrong_key, wrong_user = sys.argv[1:4]
out = {"python": sys.version.split()[0]}

def check(c, read, write, flush):
    assert c.tls, "not TLS"
    data = os.urandom(1024 * 1024 + 3)
    write(data, 4097)
    assert read(len(data), 4097) == data, "data differs"
    flush()
    return c.size

def sync_client():
    with Client(good, timeout=20) as c:
        return check(c, c.pread, c.pwrite, c.flush)

async def async_client():
    async with await AsyncClient.connect(good, timeout=20) as c:
        data = os.urandom(1024 * 1024 + 3)
        assert c.tls, "not TLS"
        await asyncio.gather(c.pwrite(data, 4097), c.pwrite(data[:4096], 8 * 1024 * 1024))
        assert await c.pread(len(data), 4097) == data, "data differs"
        await c.flush()
        return c.size

def refused(uri):
    try:
        Client(uri, timeout=20).close()
    except TLSError as exc:
        return "TLSError: " + str(exc)
    except NBDError as exc:
        return type(exc).__name__ + ": " + str(exc)
    return "connected"

out["sync"] = sync_client()
out["async"] = asyncio.run(async_client())
out["wrong_key"] = refused(wrong_key)
out["wrong_user"] = refused(wrong_user)
print(json.dumps(out))
"""


def _run_psk_script(server: Server, tmp_path: Path) -> dict[str, Any]:
    assert server.psk_file is not None and server.tls_username == "alice"
    good = server.uri
    other_key = make_psk_file(tmp_path, "alice", name="wrong-key")
    mallory = make_psk_file(tmp_path, "mallory", name="mallory")
    wrong_key = good.replace(os.fspath(server.psk_file), os.fspath(other_key))
    wrong_user = good.replace("alice@", "mallory@").replace(
        os.fspath(server.psk_file), os.fspath(mallory)
    )
    assert wrong_key != good and "mallory@" in wrong_user
    script = tmp_path / "psk_check.py"
    script.write_text(_PSK_SCRIPT)
    env = {**child_env(), "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(
        [python313(), "-W", "error", os.fspath(script), good, wrong_key, wrong_user],
        capture_output=True,
        text=True,
        env=env,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, f"--- stdout\n{done.stdout}--- stderr\n{done.stderr}"
    result: dict[str, Any] = json.loads(done.stdout)
    assert result["python"].startswith("3.13"), result
    return result


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_nbdkit_psk_python313(nbdkit: Factory, tmp_path: Path, tcp: bool) -> None:
    server = nbdkit("memory", "16M", tcp=tcp, tls="psk")
    result = _run_psk_script(server, tmp_path)
    assert result["sync"] == result["async"] == 16 * MiB
    assert result["wrong_key"].startswith("TLSError"), result
    assert result["wrong_user"].startswith("TLSError"), result


def test_qemu_psk_python313(peers: Peers, tmp_path: Path) -> None:
    image = make_raw_image(tmp_path / "disk.raw", 16 * MiB)
    server = peers.qemu_nbd(image, "raw", "disk", tcp=True, tls="psk")
    result = _run_psk_script(server, tmp_path)
    assert result["sync"] == result["async"] == 16 * MiB
    assert result["wrong_key"].startswith("TLSError"), result
    assert result["wrong_user"].startswith("TLSError"), result
    with open(image, "rb") as f:
        f.seek(8 * MiB)
        assert f.read(4 * KiB) != bytes(4 * KiB)  # the async client's second write
