"""A user's own backend: the example in backend.py's docstring works as printed, and
load_backend finds classes and factories by module or by file, or says why not."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest

import pynbd.server.backend as backend_module
from pynbd.client import Client
from pynbd.errors import InvalidRequest
from pynbd.server import AsyncBackend, Backend, Blocking, Capabilities, load_backend
from pynbd.server.user import load_factory, parse_arguments

from .helpers import running_server

# Each test runs with connections served from threads, then from the event loop.
pytestmark = pytest.mark.usefixtures("serving_mode")


def docstring_example() -> str:
    """The example code of backend.py's module docstring, dedented."""
    doc = backend_module.__doc__ or ""
    start = doc.index("    from pynbd.server import ")
    end = doc.index("Serve it with")
    return textwrap.dedent(doc[start:end])


@pytest.fixture
def device_file(tmp_path: Path) -> Path:
    path = tmp_path / "mydevice.py"
    path.write_text(docstring_example())
    return path


def test_the_docstring_example_is_about_20_lines() -> None:
    lines = [line for line in docstring_example().splitlines() if line.strip()]
    assert 15 <= len(lines) <= 25


def test_docstring_example_served(device_file: Path) -> None:
    device = load_backend(f"{device_file}:DictDevice", ["size=1048576"])
    assert isinstance(device, Backend)
    assert device.size == 1 << 20
    with running_server(device) as srv, Client(srv.uri) as c:
        assert c.get_block_size("minimum") == 4096
        data = os.urandom(3 * 4096)
        c.pwrite(data, 8192)
        assert c.pread(3 * 4096, 8192) == data
        c.trim(4096, 8192)
        assert c.pread(4096, 8192) == bytes(4096)
        c.zero(4096, 12288)  # emulated with pwrite
        assert c.pread(8192, 12288) == bytes(4096) + data[8192:]
        with pytest.raises(InvalidRequest):
            c.pread(100, 1)  # unaligned: the client obeys the advertised minimum
    assert sorted(device.blocks) == [3, 4]  # type: ignore[attr-defined]


def test_module_name_and_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "userdevs.py").write_text(
        docstring_example()
        + textwrap.dedent(
            """
            def make(size="8192", fill="a"):
                dev = DictDevice(size)
                dev.blocks[0] = fill.encode() * 4096
                return dev

            class Holder:
                inner = DictDevice

            def not_a_backend():
                return 42

            def broken(size):
                raise RuntimeError("no disk today")
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "userdevs", raising=False)
    dev = load_backend("userdevs:make", {"fill": "z"})
    buf = bytearray(4096)
    assert isinstance(dev, Backend)
    dev.pread_into(memoryview(buf), 0)
    assert buf == b"z" * 4096
    assert load_backend("userdevs:Holder.inner").size == 67108864
    with pytest.raises(ValueError, match="returned int, not a Backend"):
        load_backend("userdevs:not_a_backend")
    with pytest.raises(ValueError, match="RuntimeError: no disk today"):
        load_backend("userdevs:broken", ["size=1"])
    with pytest.raises(ValueError, match="failed: TypeError"):
        load_backend("userdevs:make", ["colour=red"])
    with pytest.raises(ValueError, match="has no 'Nope'"):
        load_backend("userdevs:Nope")


def test_async_backend_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "adev.py"
    path.write_text(
        textwrap.dedent(
            """
            from pynbd.server import AsyncBackend

            class Zeroes(AsyncBackend):
                @property
                def size(self):
                    return 65536

                async def pread_into(self, buf, offset):
                    buf[:] = bytes(len(buf))
            """
        )
    )
    dev = load_backend(f"{path}:Zeroes")
    assert isinstance(dev, AsyncBackend)
    with running_server(dev) as srv, Client(srv.uri) as c:
        assert c.pread(100, 0) == bytes(100)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nocolon", "not MODULE:NAME"),
        ("mod:", "not MODULE:NAME"),
        ("mod:1abc", "not a Python name"),
        ("no_such_module_pynbd:X", "no module named 'no_such_module_pynbd'"),
        ("bad-name:X", "not a module name"),
        ("/nonexistent/dev.py:X", "no such file"),
        ("os:sep", "not a class or function"),
    ],
)
def test_load_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_factory(spec)


def test_file_that_fails_to_load(tmp_path: Path) -> None:
    path = tmp_path / "bad.py"
    path.write_text("raise ImportError('missing dependency')\n")
    with pytest.raises(ValueError, match=r"cannot load .*missing dependency"):
        load_factory(f"{path}:X")
    assert "pynbd_user_bad" not in sys.modules


def test_parse_arguments() -> None:
    assert parse_arguments(["a=1", "b=x=y", "c="]) == {"a": "1", "b": "x=y", "c": ""}
    for bad in (["noequals"], ["=v"], ["1a=2"], ["class=3"], ["a=1", "a=2"]):
        with pytest.raises(ValueError):
            parse_arguments(bad)


def test_capabilities_example_matches_interface() -> None:
    # The docstring promises that capabilities can be a class attribute.
    caps = Capabilities(minimum_block=4096, can_trim=True, blocking=Blocking.NEVER)
    assert isinstance(caps, Capabilities)
