"""The socket-activation helpers in-process (the real thing, with sockets on fds 3 and
up and an exec'd server, is in tests/cli/test_serve.py)."""

from __future__ import annotations

import os

import pytest

from pynbd.server.activation import listen_fds, socket_activated


def test_not_for_us_is_ignored_and_the_environment_is_cleared(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "nbd")
    assert not socket_activated()
    assert listen_fds() == []
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        assert name not in os.environ


def test_no_environment() -> None:
    assert "LISTEN_PID" not in os.environ
    assert not socket_activated()
    assert listen_fds(unset_environment=False) == []


def test_bad_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "two")
    assert socket_activated()
    with pytest.raises(ValueError, match="LISTEN_FDS='two' is not a number"):
        listen_fds()


def test_zero_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "0")
    assert listen_fds() == []
