"""Import a bench script as the tests of it need: bench/ on the path while it loads, as
when it runs (the scripts import each other by their bare names)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[2] / "bench"


def import_bench(name: str) -> ModuleType:
    """The bench script ``bench/NAME.py`` as a module."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))
