"""Resize without a kernel: backends' resize, the server's view of a new size, the
state file, and ``pynbd resize``'s logic with the kernel call replaced."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from pynbd.client.sync import Client
from pynbd.errors import InvalidRequest, ProtocolError
from pynbd.kernel import resize
from pynbd.server import FileBackend, MemoryBackend
from tests.server.helpers import running_server

MiB = 1 << 20


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PYNBD_STATE_DIR", os.fspath(tmp_path / "state"))
    return tmp_path / "state"


def test_memory_backend_shrink_then_grow_reads_zeroes() -> None:
    mem = MemoryBackend(4 * MiB, page_size=64 * 1024)
    mem.pwrite(memoryview(b"x" * (2 * MiB)), MiB, False)
    mem.resize(MiB + 100)
    assert mem.size == MiB + 100
    assert mem.allocated == 64 * 1024  # only the page across the new end is left
    mem.resize(4 * MiB)
    buf = memoryview(bytearray(2 * MiB))
    mem.pread_into(buf, MiB)
    assert bytes(buf[:100]) == b"x" * 100
    assert bytes(buf[100:]) == bytes(2 * MiB - 100)
    with pytest.raises(ValueError):
        mem.resize(-1)


def test_file_backend_resize(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"a" * 4096)
    with FileBackend(image) as fb:
        fb.resize(MiB)
        assert fb.size == MiB == image.stat().st_size
        fb.resize(100)
        assert image.read_bytes() == b"a" * 100


def test_server_reports_the_new_size() -> None:
    mem = MemoryBackend(MiB)
    with running_server(mem) as srv, Client(srv.uri) as live:
        assert live.size == MiB
        srv.call(lambda: mem.resize(3 * MiB))
        assert srv.call(lambda: resize._apply_export_size(srv.server, mem, 3 * MiB)) == 1
        # The live connection's server side accepts requests up to the new end (our
        # client checks ranges itself, so look at the server's core)...
        sizes = srv.call(lambda: [s.core.transmission.size for s in srv.server.sessions])
        assert sizes == [3 * MiB]
        # ...and a new one is told the new size.
        with Client(srv.uri) as fresh:
            assert fresh.size == 3 * MiB
        srv.call(lambda: resize._apply_export_size(srv.server, mem, MiB))
        srv.call(lambda: mem.resize(MiB))
        with Client(srv.uri) as fresh:
            assert fresh.size == MiB


def test_live_connection_refuses_past_a_shrunk_end() -> None:
    mem = MemoryBackend(2 * MiB)
    with running_server(mem) as srv, Client(srv.uri) as live:
        srv.call(lambda: resize._apply_export_size(srv.server, mem, MiB))
        with pytest.raises((InvalidRequest, ProtocolError, OSError)):
            live.pread(4096, MiB + 4096)


class _FakeAttachment:
    def __init__(self, serve: Any = None) -> None:
        self.device, self.index, self.block_size, self.size = "/dev/nbd7", 7, 4096, MiB
        self._serve = serve


def test_resize_backend_orders_the_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    mem = MemoryBackend(MiB)
    steps: list[str] = []
    monkeypatch.setattr(resize, "set_device_size", lambda i, s: steps.append(f"dev {s}"))
    with running_server(mem) as srv:
        att = _FakeAttachment((srv.server, srv.loop))
        assert resize.resize_backend(att, 2 * MiB + 5) == 2 * MiB  # block-aligned
        steps.append(f"backend {mem.size}")
        assert resize.resize_backend(att, MiB) == MiB
        steps.append(f"backend {mem.size}")
    # Growing: the backend already had its size when the device grew; shrinking: the
    # device shrank while the backend still had the old size.
    assert steps == [f"dev {2 * MiB}", f"backend {2 * MiB + 5}", f"dev {MiB}", f"backend {MiB}"]
    assert att.size == MiB


def test_resize_backend_refusals() -> None:
    with pytest.raises(InvalidRequest, match="not served by this process"):
        resize.resize_backend(_FakeAttachment(), MiB)
    with running_server(MemoryBackend(MiB)) as srv:
        att = _FakeAttachment((srv.server, srv.loop))
        with pytest.raises(InvalidRequest, match="below one block"):
            resize.resize_backend(att, 100)


def test_state_file_round_trip(state_dir: Path) -> None:
    path = resize.write_state("/dev/nbd3", "nbds://h/e?tls-certificates=/x", connections=2)
    assert path == state_dir / "nbd3.json"
    assert path.stat().st_mode & 0o777 == 0o600
    record = resize.read_state(3)
    assert record is not None
    assert record["uri"] == "nbds://h/e?tls-certificates=/x"
    assert record["device"] == "/dev/nbd3" and record["connections"] == 2
    resize.remove_state("nbd3")
    assert resize.read_state(3) is None
    resize.remove_state(3)  # twice is fine
    (state_dir / "nbd4.json").write_text("{not json")
    assert resize.read_state(4) is None


def test_reread_size_asks_the_recorded_server(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str | int, int]] = []
    monkeypatch.setattr(resize, "set_device_size", lambda d, s: calls.append((d, s)))
    monkeypatch.setattr(resize, "sysfs_state", lambda d: type("S", (), {"size": 5 * MiB})())
    with running_server(MemoryBackend(5 * MiB)) as srv:
        resize.write_state(2, srv.uri)
        assert resize.reread_size("/dev/nbd2") == 5 * MiB
        assert calls == [("/dev/nbd2", 5 * MiB)]
        resize.reread_size(2, size=MiB)
        assert calls[-1] == (2, MiB)
        with pytest.raises(InvalidRequest, match="more than the export"):
            resize.reread_size(2, size=6 * MiB)
    with pytest.raises(InvalidRequest, match="no server recorded"):
        resize.reread_size(9)


def test_cli_resize_usage(state_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pynbd.cli import main

    assert main(["resize", "/dev/nbd9"]) == 1
    assert "no server recorded for /dev/nbd9" in capsys.readouterr().err
    assert main(["resize", "not-a-device", "--size", "1M"]) == 1


def test_state_file_never_follows_a_planted_symlink(state_dir: Path, tmp_path: Path) -> None:
    # Whoever can write to the state directory plants symlinks at the names the record
    # goes through: the old temporary name was predictable (.nbdX.json.PID).
    state_dir.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (state_dir / f".nbd3.json.{os.getpid()}").symlink_to(victim)
    (state_dir / "nbd3.json").symlink_to(victim)
    path = resize.write_state(3, "nbd://h/")
    assert victim.read_text() == "precious\n"
    assert not path.is_symlink() and path.stat().st_mode & 0o777 == 0o600
    assert (resize.read_state(3) or {})["uri"] == "nbd://h/"
    # A record reached through a symlink is not read either.
    planted = tmp_path / "planted.json"
    planted.write_text('{"uri": "nbd://attacker/"}\n')
    (state_dir / "nbd5.json").symlink_to(planted)
    assert resize.read_state(5) is None
    resize.remove_state(5)  # removes the symlink, not its target
    assert planted.exists() and not (state_dir / "nbd5.json").is_symlink()


def test_state_directory_checked_as_root(
    state_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state_dir.mkdir()
    resize.write_state(3, "nbd://h/")
    monkeypatch.setattr(resize, "_running_as_root", lambda: True, raising=False)
    state_dir.chmod(0o755)
    assert resize.read_state(3) is not None  # ours, not writable by others: fine
    state_dir.chmod(0o1777)  # sticky or not, anyone could plant a record
    with pytest.raises(PermissionError, match=r"state directory .*state is writable by others"):
        resize.write_state(3, "nbd://h/")
    with pytest.raises(PermissionError, match="writable by others"):
        resize.read_state(3)
    with pytest.raises(InvalidRequest, match="not reading the recorded server: state dir"):
        resize.reread_size(3)
    state_dir.chmod(0o755)
    link = tmp_path / "link"
    link.symlink_to(state_dir)
    monkeypatch.setenv("PYNBD_STATE_DIR", os.fspath(link))
    with pytest.raises(PermissionError, match="is a symlink"):
        resize.write_state(3, "nbd://h/")
    # Someone else's directory (the owner test on a made-up status).
    other = os.stat_result((0o40755, 0, 0, 2, os.geteuid() + 1, 0, 0, 0, 0, 0))
    assert resize._unsafe_dir(other) == f"owned by uid {os.geteuid() + 1}, not by root"
    assert resize._unsafe_dir(os.stat(state_dir)) is None
    # Not root: the user's own choice, not checked.
    monkeypatch.setattr(resize, "_running_as_root", lambda: False)
    state_dir.chmod(0o777)
    assert resize.write_state(3, "nbd://h/") == link / "nbd3.json"
