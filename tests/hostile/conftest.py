"""Fixtures of the hostile-server tests: both clients, hostile servers, SIGUSR1."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.drivers import KINDS, Driver, driving

from .checks import CLIENT_TIMEOUT, Usr1
from .server import HostileServer, Step


@pytest.fixture(params=KINDS)
def api(request: pytest.FixtureRequest) -> Iterator[Driver]:
    """Both clients (tests/drivers.py), each with timeout=CLIENT_TIMEOUT."""
    with driving(request.param, timeout=CLIENT_TIMEOUT) as driver:
        yield driver


@pytest.fixture
def serve() -> Iterator[Callable[..., HostileServer]]:
    """Start hostile servers; every one is stopped at teardown, whatever happened."""
    servers: list[HostileServer] = []

    def start(script: list[Step], **kwargs: Any) -> HostileServer:
        server = HostileServer(script, **kwargs)
        servers.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in servers:
            server.stop()
    # A script that could not run as written is a bug in the test (or a client that
    # sent something unexpected): never let it pass as a client failure.
    for server in servers:
        if server.error is not None:
            pytest.fail(f"hostile server script failed: {server.error!r}")


@pytest.fixture
def sigusr1() -> Iterator[Usr1]:
    """SIGUSR1 sent by a server step (Usr1.step); the old handler is restored after."""
    usr1 = Usr1()
    old = signal.signal(signal.SIGUSR1, usr1.handler)
    try:
        yield usr1
    finally:
        signal.signal(signal.SIGUSR1, old)
