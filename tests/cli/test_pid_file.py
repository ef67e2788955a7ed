"""``pynbd serve --pid-file``: the file is written through names nobody can plant.

The pid file's directory may be shared (/run, /tmp) and the server may run as root:
a symlink planted at the pid file or at its temporary name must be replaced, never
followed. These call the writer in this process, where the temporary name the old
code used (``FILE.PID.tmp``) is known; tests/cli/test_serve.py runs the server.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pynbd.cli import serve
from pynbd.cli.common import CommandError


def test_pid_file_replaces_planted_symlinks(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    pid_file = tmp_path / "serve.pid"
    (tmp_path / f"serve.pid.{os.getpid()}.tmp").symlink_to(victim)
    pid_file.symlink_to(victim)
    assert serve._write_pid_file(os.fspath(pid_file))
    assert victim.read_text() == "precious\n"
    assert not pid_file.is_symlink()
    assert pid_file.read_text() == f"{os.getpid()}\n"
    assert pid_file.stat().st_mode & 0o777 == 0o644
    # Nothing left behind but what was planted.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "serve.pid",
        f"serve.pid.{os.getpid()}.tmp",
        "victim",
    ]
    serve._remove_pid_file(os.fspath(pid_file))
    assert not pid_file.exists()


def test_pid_file_removal_does_not_follow_a_symlink(tmp_path: Path) -> None:
    # A pid file swapped for a symlink to a file that holds our pid: left alone.
    mine = tmp_path / "mine"
    mine.write_text(f"{os.getpid()}\n")
    pid_file = tmp_path / "serve.pid"
    pid_file.symlink_to(mine)
    serve._remove_pid_file(os.fspath(pid_file))
    assert pid_file.is_symlink() and mine.exists()


def test_pid_file_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(CommandError, match=r"cannot write the pid file .*/none/p: No such file"):
        serve._write_pid_file(os.fspath(tmp_path / "none" / "p"))
    (tmp_path / "dir").mkdir()
    with pytest.raises(CommandError, match=r"cannot write the pid file .*/dir: Is a directory"):
        serve._write_pid_file(os.fspath(tmp_path / "dir"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir"]  # no temporary left
