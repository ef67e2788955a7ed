"""The command line (pynbd.cli): ``pynbd info``, ``list``, ``map``.

Each test starts its own server (nbdkit or nbd-server, on a unix socket) through the
fixtures of tests/peers.py, which stop it by pid at teardown, also when the test
failed. The CLI runs in-process (``main([...])``, output captured by capsys) and as a
subprocess (``python -m pynbd``). Maps are compared with ``nbdinfo --map`` on the same
server.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme

from pynbd import __version__
from pynbd.cli import main
from pynbd.cli.common import human_size, parse_size
from pynbd.cli.extents import describe
from pynbd.client import Client
from tests.peers import Server, free_port, make_raw_image, run_tool
from tests.serve_launcher import child_env

Factory = Callable[..., Server]


# A 1 MiB disk with data at 0, 128 KiB and 512 KiB (nbdkit's data plugin allocates in
# 32 KiB pages, so each byte makes a 32 KiB data extent).
DATA = ["data", "1 @0x20000 ( 2 )*5000 @0x80000 1", "size=1M"]
DATA_MAP = [
    (0, 32768, 0),
    (32768, 98304, 3),
    (131072, 32768, 0),
    (163840, 360448, 3),
    (524288, 32768, 0),
    (557056, 491520, 3),
]


# --- Running the CLI -------------------------------------------------------------------


def run_in_process(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def run_subprocess(*args: str, timeout: float = 60) -> tuple[int, str, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "pynbd", *args],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=timeout,
        check=False,
    )
    return proc.returncode, proc.stdout, proc.stderr


def nbdinfo(*args: str) -> str:
    return run_tool("nbdinfo", *args).stdout


def assert_one_error_line(err: str, *fragments: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("pynbd: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], err


# --- Helpers without a server ------------------------------------------------------------


def test_parse_size() -> None:
    assert parse_size("4096") == 4096
    assert parse_size("0x1000") == 4096
    assert parse_size("010") == 10
    assert parse_size("4k") == 4096
    assert parse_size("1M") == 1 << 20
    assert parse_size("2GiB") == 2 << 30
    for bad in ("", "zz", "-1", "1.5M", "4q"):
        with pytest.raises(Exception, match="byte count"):
            parse_size(bad)


def test_human_size() -> None:
    assert human_size(0) == "0"
    assert human_size(512) == "512"
    assert human_size(1 << 20) == "1M"
    assert human_size(3 << 40) == "3T"
    assert human_size(1536) == "1.5K"
    assert human_size(1_000_000) == "976.6K"


def test_describe() -> None:
    ba = "base:allocation"
    assert [describe(ba, f) for f in range(4)] == ["data", "hole", "zero", "hole,zero"]
    assert describe(ba, 4) == "data,bit2"
    assert describe("qemu:dirty-bitmap:b0", 1) == "dirty"
    assert describe("qemu:allocation-depth", 3) == "backing depth 3"
    assert describe("other:context", 1) is None


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_in_process(capsys, "--version")
    assert (rc, out.strip()) == (0, f"pynbd {__version__}")
    rc, out, err = run_subprocess("--version")
    assert (rc, out.strip(), err) == (0, f"pynbd {__version__}", "")


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_in_process(capsys, "--help")
    assert rc == 0
    for command in ("info", "list", "map"):
        assert command in out
    rc, out, _ = run_in_process(capsys, "map", "--help")
    assert rc == 0 and "--totals" in out and "--tls-certificates" in out


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["info"],
        ["frobnicate", "nbd://x"],
        ["map", "--offset", "zz", "nbd://x"],
        ["info", "--timeout", "-1", "nbd://x"],
        ["info", "--list", "--size", "nbd://x"],
        ["info", "--totals", "nbd://x"],
        ["info", "--can", "fly", "nbd://x"],
        ["info", "--size", "--is", "tls", "nbd://x"],
    ],
)
def test_usage_errors(capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    rc, out, err = run_in_process(capsys, *args)
    assert rc == 2
    assert out == ""
    assert "usage: pynbd" in err and "Traceback" not in err


def test_keyboard_interrupt(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Client, "negotiate", interrupted)
    rc, out, err = run_in_process(capsys, "info", "nbd://localhost")
    assert (rc, out) == (130, "")
    assert "Traceback" not in err


def test_internal_error_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(Client, "negotiate", broken)
    rc, _, err = run_in_process(capsys, "info", "nbd://localhost")
    assert rc == 1
    assert_one_error_line(err, "internal error", "boom second line", "--debug")


# --- Errors: one line on stderr, exit status 1 ---------------------------------------------


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("localhost:10809", "scheme"),
        ("nbd://host:99999/", "port"),
        ("nbd+unix:///", "socket"),
    ],
)
def test_bad_uri(capsys: pytest.CaptureFixture[str], uri: str, fragment: str) -> None:
    for command in ("info", "list", "map"):
        rc, out, err = run_in_process(capsys, command, uri)
        assert (rc, out) == (1, "")
        assert_one_error_line(err, fragment)
    rc, out, err = run_subprocess("info", uri)
    assert (rc, out) == (1, "")
    assert_one_error_line(err, fragment)


def test_connection_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    port = free_port()
    for command in ("info", "list", "map"):
        rc, _, err = run_in_process(capsys, command, f"nbd://127.0.0.1:{port}")
        assert rc == 1
        assert_one_error_line(err, f"127.0.0.1:{port}", "refused")
    rc, _, err = run_subprocess("list", f"nbd://127.0.0.1:{port}")
    assert rc == 1
    assert_one_error_line(err, "refused")
    rc, _, err = run_subprocess("info", f"nbd+unix:///?socket={tmp_path / 'missing.sock'}")
    assert rc == 1
    assert_one_error_line(err, "missing.sock", "No such file")


def test_debug_shows_traceback() -> None:
    rc, _, err = run_subprocess("info", "--debug", f"nbd://127.0.0.1:{free_port()}")
    assert rc == 1
    assert "Traceback" in err and err.splitlines()[-1].startswith("pynbd: ")
    rc, _, err = run_subprocess("--debug", "info", f"nbd://127.0.0.1:{free_port()}")
    assert rc == 1 and "Traceback" in err


def test_timeout(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # A listener that never speaks: the handshake must give up after --timeout. After
    # 20 s the listener goes away, resetting the connections it never accepted: a
    # client still waiting then would report the reset, not a timeout.
    path = tmp_path / "silent.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen(4)
        hang_up = threading.Timer(20, listener.close)
        hang_up.start()
        try:
            for command in ("info", "list", "map"):
                rc, _, err = run_in_process(
                    capsys, command, "--timeout", "0.3", f"nbd+unix:///?socket={path}"
                )
                assert rc == 1
                assert_one_error_line(err)
                assert "time" in err
        finally:
            hang_up.cancel()
            hang_up.join()


@pytest.mark.interop
def test_tls_only_server_without_tls(capsys: pytest.CaptureFixture[str], nbdkit: Factory) -> None:
    srv = nbdkit("memory", "1M", tls="psk")
    plain = f"nbd+unix:///?socket={srv.socket_path}"
    for command in ("info", "list", "map"):
        rc, out, err = run_in_process(capsys, command, plain)
        assert (rc, out) == (1, "")
        assert_one_error_line(err, "TLS_REQD", "requires TLS")
    rc, _, err = run_subprocess("info", "--list", plain)
    assert rc == 1
    assert_one_error_line(err, "requires TLS")


@pytest.mark.interop
def test_unknown_export(capsys: pytest.CaptureFixture[str], nbdkit: Factory) -> None:
    args = ["exportname=a", "exportname-strict=true"]
    srv = nbdkit("memory", "1M", *args, filters=["exportname"])
    for command in ("info", "map"):
        rc, _, err = run_in_process(capsys, command, srv.uri_for("nope"))
        assert rc == 1
        assert_one_error_line(err, "ERR_UNKNOWN", "pynbd list")
    rc, _, err = run_subprocess("info", "--export-name", "nope", srv.uri_for("a"))
    assert rc == 1
    assert_one_error_line(err, "ERR_UNKNOWN")
    rc, out, _ = run_in_process(capsys, "info", "--size", srv.uri_for("a"))
    assert (rc, out) == (0, "1048576\n")


# --- info ----------------------------------------------------------------------------------


@pytest.mark.interop
def test_info_text_and_json(capsys: pytest.CaptureFixture[str], nbdkit: Factory) -> None:
    srv = nbdkit(*DATA)
    uri = srv.uri
    rc, out, err = run_in_process(capsys, "info", uri)
    assert (rc, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == "protocol: fixed newstyle without TLS, using structured replies"
    assert lines[1] == 'export="":'
    assert "\texport_size: 1048576 (1M)" in lines
    assert "\tcontexts:" in lines and "\t\tbase:allocation" in lines
    flags_line = next(x for x in lines if x.startswith("\ttransmission_flags:"))
    assert "HAS_FLAGS" in flags_line and "SEND_FLUSH" in flags_line
    assert "READ_ONLY" not in flags_line

    rc, out, _ = run_in_process(capsys, "info", "--json", uri)
    assert rc == 0
    doc = json.loads(out)
    assert doc["protocol"] == "fixed newstyle"
    assert doc["tls"] is False and doc["structured_replies"] is True
    (export,) = doc["exports"]
    assert export["export_name"] == ""
    assert export["export_size"] == 1048576 and export["export_size_str"] == "1M"
    assert export["contexts"] == ["base:allocation"]
    assert export["transmission_flags"] & 1
    assert "HAS_FLAGS" in export["transmission_flag_names"]
    assert export["block_size_advertised"] is False
    assert export["uri"] == uri
    assert all(k == k.lower() and "-" not in k for k in export)

    # The same answers as nbdinfo on the same server.
    theirs = json.loads(nbdinfo("--json", uri))["exports"][0]
    for key, value in theirs.items():
        if key.startswith(("can_", "is_")):
            assert export[key] == value, key
    assert theirs["export-size"] == export["export_size"]

    # As a subprocess too.
    rc, out, err = run_subprocess("info", "--json", uri)
    assert (rc, err) == (0, "")
    assert json.loads(out)["exports"][0]["export_size"] == 1048576


@pytest.mark.interop
def test_info_size_can_is(capsys: pytest.CaptureFixture[str], nbdkit: Factory) -> None:
    srv = nbdkit("memory", "3M", extra=["-r"])
    uri = srv.uri
    assert run_in_process(capsys, "info", "--size", uri) == (0, "3145728\n", "")
    assert run_in_process(capsys, "info", "--size", "--json", uri)[1] == "3145728\n"
    expected = {
        ("--is", "read-only"): 0,
        ("--can", "write"): 2,
        ("--can", "read"): 0,
        ("--can", "connect"): 0,
        ("--can", "structured-reply"): 0,
        ("--is", "tls"): 2,
        ("--is", "rotational"): 2,
    }
    for (option, what), code in expected.items():
        assert run_in_process(capsys, "info", option, what, uri) == (code, "", ""), what
    assert run_subprocess("info", "--is", "read-only", uri) == (0, "", "")


@pytest.mark.interop
def test_info_block_sizes_and_description(
    capsys: pytest.CaptureFixture[str], nbdkit: Factory
) -> None:
    args = [
        "blocksize-minimum=512",
        "blocksize-preferred=4096",
        "blocksize-maximum=65536",
        "exportdesc=fixed:a test disk",
    ]
    srv = nbdkit("memory", "1M", *args, filters=["blocksize-policy", "exportname"])
    rc, out, _ = run_in_process(capsys, "info", "--json", srv.uri)
    assert rc == 0
    export = json.loads(out)["exports"][0]
    assert export["block_size_advertised"] is True
    assert (
        export["block_size_minimum"],
        export["block_size_preferred"],
        export["block_size_maximum"],
    ) == (512, 4096, 65536)
    assert export["description"] == "a test disk"
    rc, out, _ = run_in_process(capsys, "info", srv.uri)
    assert "\tdescription: a test disk" in out.splitlines()
    assert "\tblock_size_minimum: 512" in out.splitlines()


@pytest.mark.interop
def test_info_list_with_descriptions(capsys: pytest.CaptureFixture[str], nbdkit: Factory) -> None:
    args = [
        "exportname=one",
        "exportname=two words",
        "exportname-list=explicit",
        "exportdesc=fixed:shared disk",
    ]
    srv = nbdkit("memory", "2M", *args, filters=["exportname"])
    rc, out, err = run_in_process(capsys, "list", srv.uri)
    assert (rc, err) == (0, "")
    assert out.splitlines() == ["one\tshared disk", '"two words"\tshared disk']
    rc, out, _ = run_in_process(capsys, "info", "--list", "--json", srv.uri)
    assert rc == 0
    exports = json.loads(out)["exports"]
    assert [e["export_name"] for e in exports] == ["one", "two words"]
    assert [e["description"] for e in exports] == ["shared disk"] * 2
    assert exports[1]["uri"] == srv.uri_for("two words")


@pytest.mark.interop
def test_list_refused_by_nbdkit(capsys: pytest.CaptureFixture[str], nbdkit: Factory) -> None:
    srv = nbdkit("memory", "1M", "exportname-list=error", filters=["exportname"])
    for command in (["list"], ["info", "--list"]):
        rc, out, err = run_in_process(capsys, *command, srv.uri)
        assert (rc, out) == (1, "")
        assert_one_error_line(err, "refused to list")


# --- nbd-server: named exports, LIST, the size only GO reports ---------------------------


@pytest.mark.interop
def test_list_nbd_server(
    capsys: pytest.CaptureFixture[str], nbd_server: Factory, tmp_path: Path
) -> None:
    alpha = make_raw_image(tmp_path / "alpha.img", 1 << 20)
    beta = make_raw_image(tmp_path / "beta.img", 2 << 20)
    srv = nbd_server({"alpha": alpha, "beta": beta}, readonly=["beta"], tcp=False)
    uri = srv.uri_for("")
    assert run_in_process(capsys, "list", uri) == (0, "alpha\nbeta\n", "")
    rc, out, _ = run_in_process(capsys, "list", "--json", uri)
    assert rc == 0
    assert json.loads(out) == {
        "exports": [
            {"export_name": "alpha", "description": None},
            {"export_name": "beta", "description": None},
        ]
    }
    assert run_subprocess("list", uri) == (0, "alpha\nbeta\n", "")

    # nbd-server reports size 0 to NBD_OPT_INFO; GO gives the real size.
    rc, out, err = run_in_process(capsys, "info", "--list", "--json", uri)
    assert (rc, err) == (0, "")
    doc = json.loads(out)
    assert doc["structured_replies"] is False
    assert [(e["export_name"], e["export_size"], e["is_read_only"]) for e in doc["exports"]] == [
        ("alpha", 1 << 20, False),
        ("beta", 2 << 20, True),
    ]
    assert doc["exports"][0]["contexts"] is None
    rc, out, _ = run_in_process(capsys, "info", srv.uri_for("beta"))
    assert rc == 0
    assert "protocol: fixed newstyle without TLS, using simple replies" in out
    assert "\texport_size: 2097152 (2M)" in out

    # No default export here: a one-line error with a hint.
    rc, _, err = run_in_process(capsys, "info", uri)
    assert rc == 1
    assert_one_error_line(err, "ERR_UNKNOWN", "pynbd list")
    # No structured replies: no map.
    rc, _, err = run_subprocess("map", srv.uri_for("alpha"))
    assert rc == 1
    assert_one_error_line(err, "base:allocation", "structured replies")
    # The server is still there after all of that.
    assert run_in_process(capsys, "info", "--size", srv.uri_for("alpha"))[0] == 0


@pytest.mark.interop
def test_list_refused_by_nbd_server(
    capsys: pytest.CaptureFixture[str], nbd_server: Factory, tmp_path: Path
) -> None:
    alpha = make_raw_image(tmp_path / "alpha.img", 1 << 20)
    srv = nbd_server({"alpha": alpha}, tcp=False, allowlist=False)
    rc, out, err = run_in_process(capsys, "list", srv.uri_for("alpha"))
    assert (rc, out) == (1, "")
    assert_one_error_line(err, "refused to list", "NBD_OPT_LIST")
    rc, _, err = run_subprocess("list", "--json", srv.uri_for(""))
    assert rc == 1
    assert_one_error_line(err, "refused to list")


@pytest.mark.interop
def test_info_list_with_a_broken_export(
    capsys: pytest.CaptureFixture[str], nbd_server: Factory, tmp_path: Path
) -> None:
    alpha = make_raw_image(tmp_path / "alpha.img", 1 << 20)
    # ghost.img does not exist: the server refuses to open that export.
    srv = nbd_server({"alpha": alpha, "ghost": tmp_path / "ghost.img"}, tcp=False)
    rc, out, err = run_in_process(capsys, "info", "--list", "--json", srv.uri_for(""))
    assert rc == 1
    assert_one_error_line(err, "export ghost", "NBD_OPT_GO")
    alpha, ghost = json.loads(out)["exports"]
    assert alpha["export_size"] == 1 << 20
    assert set(ghost) == {"export_name", "error"} and ghost["export_name"] == "ghost"
    rc, out, _ = run_in_process(capsys, "info", "--list", srv.uri_for(""))
    assert rc == 1
    assert 'export="ghost":\n\terror: server refused NBD_OPT_GO' in out


# --- map -------------------------------------------------------------------------------------


def nbdinfo_map(uri: str) -> list[tuple[int, int, int]]:
    return [
        (e["offset"], e["length"], e["type"]) for e in json.loads(nbdinfo("--map", "--json", uri))
    ]


@pytest.mark.interop
def test_map_matches_nbdinfo(capsys: pytest.CaptureFixture[str], nbdkit: Factory) -> None:
    srv = nbdkit(*DATA)
    uri = srv.uri
    assert nbdinfo_map(uri) == DATA_MAP
    rc, out, err = run_in_process(capsys, "map", "--json", uri)
    assert (rc, err) == (0, "")
    ours = json.loads(out)
    assert [(e["offset"], e["length"], e["type"]) for e in ours] == DATA_MAP
    assert {e["description"] for e in ours} == {"data", "hole,zero"}
    # The text is nbdinfo's, column for column.
    rc, out, _ = run_in_process(capsys, "map", uri)
    assert (rc, out) == (0, nbdinfo("--map", uri))
    rc, out, _ = run_in_process(capsys, "map", "--totals", uri)
    assert (rc, out) == (0, nbdinfo("--map", "--totals", uri))
    # info --map is the same map; a bare --map before the URI does not eat it.
    assert run_in_process(capsys, "info", "--map", uri)[1] == nbdinfo("--map", uri)
    assert run_in_process(capsys, "info", "--map=base:allocation", uri)[0] == 0
    rc, out, err = run_subprocess("map", "--json", uri)
    assert (rc, err) == (0, "")
    assert [(e["offset"], e["length"], e["type"]) for e in json.loads(out)] == DATA_MAP


@pytest.mark.interop
def test_map_zero_type_and_merging(
    capsys: pytest.CaptureFixture[str], nbdkit: Factory, tmp_path: Path
) -> None:
    extents = tmp_path / "extents"
    extents.write_text("0 4096 0\n4096 4096 0\n8192 8192 zero\n16384 16384 hole,zero\n")
    srv = nbdkit("memory", "64K", f"extentlist={extents}", filters=["extentlist"])
    uri = srv.uri
    rc, out, _ = run_in_process(capsys, "map", "--json", uri)
    assert rc == 0
    ours = [(e["offset"], e["length"], e["type"], e["description"]) for e in json.loads(out)]
    assert ours == [
        (0, 8192, 0, "data"),
        (8192, 8192, 2, "zero"),
        (16384, 49152, 3, "hole,zero"),
    ]
    assert [x[:3] for x in ours] == nbdinfo_map(uri)


@pytest.mark.interop
def test_map_after_writes(capsys: pytest.CaptureFixture[str], nbdkit: Factory) -> None:
    srv = nbdkit("memory", "4M")
    uri = srv.uri
    with Client(uri) as client:
        client.pwrite(b"\xab" * 65536, 1 << 20)
        client.pwrite(b"\xcd" * 4096, 3 << 20)
    rc, out, _ = run_in_process(capsys, "map", "--json", uri)
    assert rc == 0
    ours = [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]
    assert ours == nbdinfo_map(uri)
    data = [(o, n) for o, n, t in ours if t == 0]
    assert any(o <= 1 << 20 and o + n >= (1 << 20) + 65536 for o, n in data)
    assert any(o <= 3 << 20 < o + n for o, n in data)


@pytest.mark.interop
def test_map_range_and_totals(capsys: pytest.CaptureFixture[str], nbdkit: Factory) -> None:
    srv = nbdkit(*DATA)
    uri = srv.uri
    rc, out, _ = run_in_process(
        capsys, "map", "--json", "--offset", "100k", "--length", "0x40000", uri
    )
    assert rc == 0
    assert [(e["offset"], e["length"], e["type"]) for e in json.loads(out)] == [
        (102400, 28672, 3),
        (131072, 32768, 0),
        (163840, 200704, 3),
    ]
    rc, out, _ = run_in_process(capsys, "map", "--totals", "--json", uri)
    assert rc == 0
    assert json.loads(out) == [
        {"size": 98304, "percent": 9.375, "type": 0, "description": "data"},
        {"size": 950272, "percent": 90.625, "type": 3, "description": "hole,zero"},
    ]
    # The length is clipped at the end; an empty range prints an empty map.
    rc, out, _ = run_in_process(capsys, "map", "--offset", "1016k", "--length", "1G", uri)
    assert (rc, out) == (0, f"{1040384:10d}  {8192:10d}  {3:3d}  hole,zero\n")
    assert run_in_process(capsys, "map", "--json", "--offset", "1M", uri)[:2] == (0, "[\n]\n")
    rc, _, err = run_in_process(capsys, "map", "--offset", "2M", uri)
    assert rc == 1
    assert_one_error_line(err, "beyond the end")
    rc, _, err = run_in_process(capsys, "map", "--context", "qemu:nothing", uri)
    assert rc == 1
    assert_one_error_line(err, "qemu:nothing")


# --- TLS ------------------------------------------------------------------------------------


@pytest.mark.interop
def test_info_over_tls(capsys: pytest.CaptureFixture[str], nbdkit: Factory, tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    server_dir = tmp_path / "server"
    client_dir = tmp_path / "client"
    server_dir.mkdir()
    client_dir.mkdir()
    ca.cert_pem.write_to_path(str(server_dir / "ca-cert.pem"))
    ca.cert_pem.write_to_path(str(client_dir / "ca-cert.pem"))
    cert.private_key_pem.write_to_path(str(server_dir / "server-key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(server_dir / "server-cert.pem"))
    srv = nbdkit("memory", "1M", tls="x509", tls_creds=server_dir)
    plain = f"nbd+unix:///?socket={srv.socket_path}"
    # The client's directory holds only the CA: no client certificate.
    tls_uri = f"nbds+unix:///?socket={srv.socket_path}&tls-certificates={client_dir}"
    rc, out, err = run_in_process(capsys, "info", tls_uri)
    assert (rc, err) == (0, "")
    assert out.startswith("protocol: fixed newstyle with TLS, using structured replies\n")
    rc, out, err = run_in_process(
        capsys, "info", "--json", "--tls-certificates", str(client_dir), plain
    )
    assert (rc, err) == (0, "")
    assert json.loads(out)["tls"] is True
    assert run_in_process(capsys, "info", "--is", "tls", tls_uri)[0] == 0
    assert run_in_process(capsys, "list", "--json", tls_uri)[0] == 0
    rc, out, _ = run_in_process(capsys, "map", "--json", tls_uri)
    assert rc == 0 and json.loads(out)[0]["length"] == 1 << 20
    # The wrong CA: one line, exit 1.
    other = tmp_path / "other"
    other.mkdir()
    trustme.CA().cert_pem.write_to_path(str(other / "ca-cert.pem"))
    rc, _, err = run_subprocess("info", "--tls", "--tls-certificates", str(other), plain)
    assert rc == 1
    assert_one_error_line(err, "certificate")
