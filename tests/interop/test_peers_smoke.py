"""Smoke tests of tests/peers.py: each kind of real server starts, answers libnbd's
nbdinfo as configured, and is stopped cleanly.

These prove the fixtures, not pynbd. They use no pynbd code, and they fail (never
skip) when a peer program is missing.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.peers import (
    PeerError,
    Peers,
    Server,
    _session_members,
    free_port,
    make_qcow2_with_bitmap,
    make_raw_image,
    nbdinfo_json,
    run_tool,
    wait_for_socket,
)

pytestmark = pytest.mark.interop

KiB = 1024
MiB = 1024 * KiB

Factory = Callable[..., Server]


def only_export(info: Any) -> dict[str, Any]:
    """The single export of an ``nbdinfo --json URI`` answer."""
    exports = info["exports"]
    assert len(exports) == 1, exports
    export: dict[str, Any] = exports[0]
    return export


def assert_transport(server: Server, tcp: bool) -> None:
    if tcp:
        assert server.socket_path is None
        assert server.host == "127.0.0.1"
        assert server.port is not None and 0 < server.port < 65536
        assert server.uri.split("://")[0] in ("nbd", "nbds")
    else:
        assert server.port is None
        assert server.socket_path is not None and server.socket_path.is_socket()
        assert f"socket={server.socket_path}" in server.uri


def refused_without_tls(server: Server) -> None:
    """A TLS-only server must turn away a client that does not start TLS."""
    done = run_tool("nbdinfo", "--size", server.uri_for(tls_params=False), check=False)
    assert done.returncode != 0, done.stdout


# --------------------------------------------------------------------------- nbdkit


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_nbdkit_memory(nbdkit: Factory, tcp: bool) -> None:
    server = nbdkit("memory", "64M", tcp=tcp)
    assert_transport(server, tcp)
    assert server.uri.startswith("nbd+unix:///?" if not tcp else "nbd://127.0.0.1:")
    info = nbdinfo_json(server.uri)
    assert info["TLS"] is False
    export = only_export(info)
    assert export["export-size"] == 64 * MiB
    assert export["is_read_only"] is False
    assert "base:allocation" in export["contexts"]


def test_nbdkit_filters_and_export_name(nbdkit: Factory) -> None:
    # Filter parameters go among the plugin's: nbdkit takes them all as KEY=VALUE.
    server = nbdkit(
        "memory",
        "1M",
        "blocksize-minimum=512",
        "blocksize-preferred=8192",
        "blocksize-maximum=1048576",
        filters=["blocksize-policy"],
        export="named disk",
    )
    assert "/named%20disk?" in server.uri
    export = only_export(nbdinfo_json(server.uri))
    assert export["export-name"] == "named disk"
    assert export["export-size"] == 1 * MiB
    assert (
        export["block_size_minimum"],
        export["block_size_preferred"],
        export["block_size_maximum"],
    ) == (512, 8192, 1 * MiB)


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_nbdkit_tls_x509(nbdkit: Factory, tcp: bool) -> None:
    server = nbdkit("memory", "2M", tcp=tcp, tls="x509", tls_verify_peer=True)
    assert_transport(server, tcp)
    assert server.uri.startswith("nbds")
    assert server.tls_dir is not None
    assert "tls-certificates=" in server.uri
    info = nbdinfo_json(server.uri)
    assert info["TLS"] is True
    assert only_export(info)["export-size"] == 2 * MiB
    refused_without_tls(server)


def test_nbdkit_tls_x509_rejects_client_without_certificate(peers: Peers, tmp_path: Path) -> None:
    server = peers.nbdkit("memory", "1M", tls="x509", tls_verify_peer=True)
    ca_only = tmp_path / "ca-only"
    ca_only.mkdir()
    (ca_only / "ca-cert.pem").write_bytes((peers.x509_dir() / "ca-cert.pem").read_bytes())
    uri = server.uri.replace(f"tls-certificates={server.tls_dir}", f"tls-certificates={ca_only}")
    done = run_tool("nbdinfo", "--size", uri, check=False)
    assert done.returncode != 0, done.stdout


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_nbdkit_tls_psk(nbdkit: Factory, tcp: bool) -> None:
    server = nbdkit("memory", "3M", tcp=tcp, tls="psk")
    assert_transport(server, tcp)
    assert server.psk_file is not None and server.tls_username == "alice"
    assert server.psk_file.read_text().startswith("alice:")
    assert "alice@" in server.uri and "tls-psk-file=" in server.uri
    info = nbdinfo_json(server.uri)
    assert info["TLS"] is True
    assert only_export(info)["export-size"] == 3 * MiB
    refused_without_tls(server)


def test_nbdkit_python_plugin(nbdkit: Factory, tmp_path: Path) -> None:
    # Proves nbdkit-plugin-python is installed: hostile-server tests build on it.
    script = tmp_path / "plugin.py"
    script.write_text(
        "API_VERSION = 2\n"
        "def open(readonly):\n"
        "    return 1\n"
        "def get_size(h):\n"
        "    return 123 * 512\n"
        "def pread(h, buf, offset, flags):\n"
        "    buf[:] = b'\\x5a' * len(buf)\n"
    )
    server = nbdkit("python", os.fspath(script))
    export = only_export(nbdinfo_json(server.uri))
    assert export["export-size"] == 123 * 512
    assert export["is_read_only"] is True  # the script has no pwrite


# --------------------------------------------------------------------------- qemu-nbd


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_qemu_nbd_raw(qemu_nbd: Factory, tmp_path: Path, tcp: bool) -> None:
    image = make_raw_image(tmp_path / "disk.raw", 5 * MiB, fill=0x5A)
    server = qemu_nbd(image, "raw", "disk", tcp=tcp)
    assert_transport(server, tcp)
    export = only_export(nbdinfo_json(server.uri))
    assert export["export-name"] == "disk"
    assert export["export-size"] == 5 * MiB
    assert export["can_multi_conn"] is True  # --shared=16
    # qemu-nbd advertises block sizes (1 / 4096 / 32 MiB on Debian 12); versions may differ.
    sizes = [export[f"block_size_{k}"] for k in ("minimum", "preferred", "maximum")]
    assert 1 <= sizes[0] <= sizes[1] <= sizes[2]


def test_qemu_nbd_qcow2_dirty_bitmap(qemu_nbd: Factory, tmp_path: Path) -> None:
    image = make_qcow2_with_bitmap(
        tmp_path / "disk.qcow2",
        4 * MiB,
        bitmap="b0",
        clean=[(0, 64 * KiB)],
        dirty=[(1 * MiB, 128 * KiB), (3 * MiB, 4 * KiB)],
    )
    server = qemu_nbd(image, "qcow2", "disk", allocation_depth=True, bitmaps=["b0"])
    export = only_export(nbdinfo_json(server.uri))
    assert export["export-size"] == 4 * MiB
    assert {"base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0"} <= set(
        export["contexts"]
    )
    extents = nbdinfo_json(server.uri, "--map=qemu:dirty-bitmap:b0")
    dirty = [(e["offset"], e["length"]) for e in extents if e["type"] == 1]
    # The 4 KiB write dirties its whole 64 KiB bitmap granule; the clean write at 0
    # happened before the bitmap existed.
    assert dirty == [(1 * MiB, 128 * KiB), (3 * MiB, 64 * KiB)]
    allocated = nbdinfo_json(server.uri, "--map=base:allocation")
    data = [(e["offset"], e["length"]) for e in allocated if e["type"] & 1 == 0]
    assert (0, 64 * KiB) in data


def test_qemu_nbd_tls_x509_needs_client_certificate(qemu_nbd: Factory, tmp_path: Path) -> None:
    image = make_raw_image(tmp_path / "disk.raw", 1 * MiB)
    server = qemu_nbd(image, export="disk", tls="x509", tls_verify_peer=True)
    info = nbdinfo_json(server.uri)
    assert info["TLS"] is True
    assert only_export(info)["export-size"] == 1 * MiB
    refused_without_tls(server)


def test_qemu_nbd_tls_psk(qemu_nbd: Factory, tmp_path: Path) -> None:
    image = make_raw_image(tmp_path / "disk.raw", 1 * MiB)
    server = qemu_nbd(image, export="disk", tcp=True, tls="psk")
    info = nbdinfo_json(server.uri)
    assert info["TLS"] is True
    assert only_export(info)["export-size"] == 1 * MiB
    refused_without_tls(server)


def test_qemu_nbd_missing_option_is_an_error(peers: Peers, tmp_path: Path) -> None:
    image = make_raw_image(tmp_path / "disk.raw", 1 * MiB)
    with pytest.raises(PeerError, match="exited before listening"):
        peers.qemu_nbd(image, extra=["--no-such-option"])


# --------------------------------------------------------------------------- nbd-server


@pytest.mark.parametrize("tcp", [True, False], ids=["tcp", "unix"])
def test_nbd_server_two_exports(nbd_server: Factory, tmp_path: Path, tcp: bool) -> None:
    alpha = make_raw_image(tmp_path / "alpha.img", 1 * MiB)
    beta = make_raw_image(tmp_path / "beta.img", 2 * MiB, fill=0x42)
    server = nbd_server({"alpha": alpha, "beta": beta}, readonly={"beta"}, tcp=tcp)
    assert_transport(server, tcp)
    assert server.exports == ("alpha", "beta") and server.export == "alpha"
    listed = nbdinfo_json(server.uri, "--list")
    assert sorted(e["export-name"] for e in listed["exports"]) == ["alpha", "beta"]
    # nbd-server 3.24 answers NBD_OPT_INFO with size 0, which --json reports; --size
    # goes through NBD_OPT_GO and gets the real one.
    for name, size in (("alpha", 1 * MiB), ("beta", 2 * MiB)):
        done = run_tool("nbdinfo", "--size", server.uri_for(name))
        assert int(done.stdout) == size
    flags = {e["export-name"]: e["is_read_only"] for e in listed["exports"]}
    assert flags == {"alpha": False, "beta": True}


def test_nbd_server_export_options(nbd_server: Factory, tmp_path: Path) -> None:
    image = make_raw_image(tmp_path / "a.img", 1 * MiB)
    server = nbd_server({"a": image, "b": image}, tcp=False, options={"a": {"flush": "true"}})
    can_flush = {
        e["export-name"]: e["can_flush"] for e in nbdinfo_json(server.uri, "--list")["exports"]
    }
    assert can_flush == {"a": True, "b": False}


def test_nbd_server_stop_ends_connection_children(nbd_server: Factory, tmp_path: Path) -> None:
    image = make_raw_image(tmp_path / "a.img", 1 * MiB)
    server = nbd_server({"a": image}, tcp=False)
    assert isinstance(server.address, str)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(server.address)
        assert sock.recv(8, socket.MSG_WAITALL) == b"NBDMAGIC"
        # nbd-server forked a child for this connection, in the daemon's session.
        assert len(_session_members(server.pid)) >= 2
        server.stop()
    assert not server.is_running()
    assert _session_members(server.pid) == []
    assert not server.socket_path or not server.socket_path.exists()


# --------------------------------------------------------------------------- helpers


def test_stop_kill_and_cleanup(peers: Peers) -> None:
    first = peers.nbdkit("memory", "1M")
    assert first.socket_path is not None
    wait_for_socket(first.address, timeout=5)
    first.stop()
    assert not first.is_running() and not first.socket_path.exists()
    first.stop()  # idempotent
    with peers.nbdkit("memory", "1M", tcp=True) as second:
        second.kill()
        assert not second.is_running()
    with pytest.raises(PeerError, match="accepted no connection"):
        wait_for_socket(first.socket_path, timeout=0.2)


def test_failed_start_reports_output(peers: Peers) -> None:
    with pytest.raises(PeerError) as excinfo:
        peers.nbdkit("no-such-plugin-here")
    assert "no-such-plugin-here" in str(excinfo.value)


def test_nbd_server_retries_a_taken_port(peers: Peers, tmp_path: Path) -> None:
    image = make_raw_image(tmp_path / "a.img", 1 * MiB)
    port = free_port()
    with socket.create_server(("127.0.0.1", port)):
        with pytest.raises(PeerError, match="exited before listening"):
            peers.nbd_server({"a": image}, port=port)
        # Without a fixed port it picks another and starts.
        server = peers.nbd_server({"a": image})
        assert server.port != port
        assert int(run_tool("nbdinfo", "--size", server.uri).stdout) == 1 * MiB


def test_x509_dir_files(peers: Peers) -> None:
    directory = peers.x509_dir()
    names = {p.name for p in directory.iterdir()}
    assert {
        "ca-cert.pem",
        "server-cert.pem",
        "server-key.pem",
        "client-cert.pem",
        "client-key.pem",
    } <= names
    assert peers.x509_dir() == directory  # one CA per work directory
