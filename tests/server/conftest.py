"""The ``serving_mode`` fixture: a module that uses it (``pytestmark =
pytest.mark.usefixtures("serving_mode")``) runs each test twice, its servers serving
plain connections from a thread each and then in the event loop."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from . import helpers


@pytest.fixture(params=["threads", "loop"])
def serving_mode(request: pytest.FixtureRequest) -> Iterator[str]:
    helpers.connection_threads = request.param == "threads"
    try:
        yield request.param
    finally:
        helpers.connection_threads = None
