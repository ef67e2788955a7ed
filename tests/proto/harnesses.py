"""The fuzz harnesses (fuzz/*.py) as modules, and what the tests that run them on
Hypothesis inputs share (tests/proto/test_fuzz_smoke.py, tests/server/test_core_fuzz.py).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

FUZZ_DIR = Path(__file__).resolve().parents[2] / "fuzz"
#: Inputs that crashed a harness once, kept to be run again: DIR/HARNESS/NAME.
REGRESSIONS = Path(__file__).resolve().parent / "fuzz_regressions"

U8 = st.integers(0, 255)
U16 = st.integers(0, 0xFFFF)
U32 = st.integers(0, 0xFFFFFFFF)
SETTINGS = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)


def load(name: str) -> ModuleType:
    """fuzz/NAME.py as a module (fuzz/ is not a package)."""
    module_name = f"pynbd_fuzz_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, FUZZ_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A seed with a few byte changes, cuts, insertions, or other leading bytes."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.integers(0, 4))
        pos = draw(st.integers(0, len(data)))
        if op == 0 and pos < len(data):
            data[pos] = draw(U8)
        elif op == 1:
            del data[pos : pos + draw(st.integers(1, 24))]
        elif op == 2:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=24))
        elif op == 3:
            del data[pos:]
        elif len(data) >= 3:
            data[draw(st.integers(0, 2))] = draw(U8)  # another config / read size
    return bytes(data)


def regressions() -> list[Path]:
    """Every kept crash input (fuzz_regressions/HARNESS/NAME)."""
    return sorted(REGRESSIONS.glob("*/*"))
