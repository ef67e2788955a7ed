"""The markers tests/conftest.py gives: every test it names by hand exists."""

from __future__ import annotations

import importlib

import pytest

from tests.conftest import NEEDS


@pytest.mark.parametrize("nodeid", sorted(NEEDS))
def test_each_named_test_exists(nodeid: str) -> None:
    path, _, name = nodeid.partition("::")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    assert callable(getattr(module, name, None)), f"{nodeid} names no test: fix tests/conftest.py"
