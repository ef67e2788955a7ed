"""pynbd's clients against nbd-server: simple replies only, named exports, LIST, and
its NBD_OPT_INFO quirk.

Every test runs through both clients (the ``api`` fixture) against its own nbd-server,
started by the test and stopped after it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from pynbd.errors import ExportNotFound, UnsupportedError
from tests.drivers import Driver
from tests.peers import Server, make_raw_image

from .conftest import KiB, MiB, assert_alive, exercise_all

pytestmark = pytest.mark.interop

Factory = Callable[..., Server]

#: Per-export options that make nbd-server advertise FLUSH, FUA and TRIM.
ALL_ON = {"flush": "true", "fua": "true", "trim": "true"}


def test_simple_replies_only(api: Driver, nbd_server: Factory, tmp_path: Path) -> None:
    """No structured replies: block status and DF are refused unsent; reads, writes,
    flush, trim and zero work."""
    image = make_raw_image(tmp_path / "disk.img", 4 * MiB)
    server = nbd_server({"disk": image}, tcp=False, options={"disk": ALL_ON})
    c = api.connect(server.uri)
    assert c.structured_replies is False
    assert c.extended_headers is False
    assert c.meta_contexts == ()
    assert c.size == 4 * MiB
    assert c.can_flush() and c.can_fua() and c.can_trim() and c.can_zero()
    assert not c.can_df() and not c.can_cache() and not c.can_fast_zero()
    with pytest.raises(UnsupportedError):
        c.block_status(4096, 0)
    with pytest.raises(UnsupportedError):
        c.block_status_all(4096, 0)
    with pytest.raises(UnsupportedError):
        c.pread(4096, 0, df=True)
    assert_alive(c)
    data = os.urandom(300 * KiB)
    c.pwrite(data, 12345)
    assert c.pread(len(data), 12345) == data
    c.pwrite(data[:4096], 1 * MiB, fua=True)
    c.flush()
    c.trim(64 * KiB, 2 * MiB)
    c.zero(1000, 12345 + 10)
    assert c.pread(len(data), 12345) == data[:10] + bytes(1000) + data[1010:]
    c.close()
    with open(image, "rb") as f:
        f.seek(1 * MiB)
        assert f.read(4096) == data[:4096]


def test_exercise_all(api: Driver, nbd_server: Factory, tmp_path: Path) -> None:
    image = make_raw_image(tmp_path / "disk.img", 48 * MiB)
    server = nbd_server({"disk": image}, tcp=False, options={"disk": ALL_ON})
    c = api.connect(server.uri)
    result = exercise_all(c)
    assert result.done == {
        "read",
        "write",
        "split",
        "fua",
        "flush",
        "trim",
        "zero",
        "no_hole",
    }, result
    assert result.refused == {"fast_zero", "cache", "df", "block_status"}, result


def test_exercise_all_defaults(api: Driver, nbd_server: Factory, tmp_path: Path) -> None:
    """nbd-server's default export advertises neither FLUSH, FUA nor TRIM: the client
    must refuse them without breaking the connection."""
    image = make_raw_image(tmp_path / "disk.img", 48 * MiB)
    server = nbd_server({"disk": image}, tcp=False)
    c = api.connect(server.uri)
    assert not c.can_flush() and not c.can_fua() and not c.can_trim()
    result = exercise_all(c)
    assert result.done == {"read", "write", "split", "zero", "no_hole"}, result
    assert result.refused == {"fua", "flush", "trim", "fast_zero", "cache", "df", "block_status"}


def test_named_exports(api: Driver, nbd_server: Factory, tmp_path: Path) -> None:
    alpha = make_raw_image(tmp_path / "alpha.img", 1 * MiB, fill=0x41)
    beta = make_raw_image(tmp_path / "beta.img", 2 * MiB, fill=0x42)
    server = nbd_server({"alpha": alpha, "beta": beta}, readonly={"beta"}, tcp=True)
    a = api.connect(server.uri, export_name="alpha")
    b = api.connect(server.uri_for("beta"))
    assert (a.export_name, a.size, a.is_read_only()) == ("alpha", 1 * MiB, False)
    assert (b.export_name, b.size, b.is_read_only()) == ("beta", 2 * MiB, True)
    assert a.pread(4096, 0) == b"\x41" * 4096
    assert b.pread(4096, 0) == b"\x42" * 4096
    a.pwrite(b"\x61" * 4096, 8192)
    assert a.pread(4096, 8192) == b"\x61" * 4096
    assert b.pread(4096, 8192) == b"\x42" * 4096
    with pytest.raises(UnsupportedError):
        b.pwrite(b"x", 0)
    result = exercise_all(b, readonly_content=lambda off, n: b"\x42" * n)
    assert {"write", "trim", "zero"} <= result.refused
    with pytest.raises(ExportNotFound):
        api.connect(server.uri_for("gamma"))


def test_info_reports_size_zero(api: Driver, nbd_server: Factory, tmp_path: Path) -> None:
    """Documented quirk: nbd-server 3.24 answers NBD_OPT_INFO with size 0 and gives the
    real size only to NBD_OPT_GO. Negotiation mode with go=False therefore reports 0;
    go=True and a connected client report the real size."""
    image = make_raw_image(tmp_path / "disk.img", 3 * MiB)
    server = nbd_server({"disk": image})
    info = api.negotiate(server.uri, list_exports=False, list_meta_contexts=False, go=False)
    assert info.in_transmission is False
    assert info.size == 0
    went = api.negotiate(server.uri, list_exports=False, list_meta_contexts=False, go=True)
    assert went.size == 3 * MiB
    assert api.connect(server.uri).size == 3 * MiB


def test_list_exports(api: Driver, nbd_server: Factory, tmp_path: Path) -> None:
    names = ["one", "two", "three"]
    server = nbd_server(
        {n: make_raw_image(tmp_path / f"{n}.img", (i + 1) * MiB) for i, n in enumerate(names)}
    )
    info = api.negotiate(server.uri, list_exports=True)
    assert info.exports is not None
    assert sorted(e.name for e in info.exports) == sorted(names)
    # No structured replies, so no meta contexts to list.
    assert not info.available_meta_contexts
    # Each listed export connects and has its own size.
    for i, name in enumerate(names):
        assert api.connect(server.uri_for(name)).size == (i + 1) * MiB
