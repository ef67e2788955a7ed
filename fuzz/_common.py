"""What the atheris harnesses share: pynbd on the path, instrumentation, the entry point.

A harness is ``fuzz/fuzz_<name>.py`` with ``one_input(data: bytes)`` and ``SEEDS``;
``python3 fuzz/fuzz_<name>.py [LIBFUZZER FLAGS] [CORPUS_DIR...]`` fuzzes it (an empty or
missing corpus directory is seeded first), and ``scripts/fuzz`` runs any of them for a
number of executions and sums up what libFuzzer said.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parents[1] / "src"

# This checkout's pynbd, even where another one is installed (an editable install of
# another tree in the same venv would otherwise be the one fuzzed).
if (SRC / "pynbd").is_dir() and str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))


#: Most pieces a transmission harness feeds its input in: a long input fed a byte at a
#: time would cost thousands of rounds per execution, while a short one still tries
#: every cut (libFuzzer keeps both).
MAX_READS = 64


def read_size(byte: int, length: int) -> int:
    """The read size an input asks for (0 meaning 1), but at least ``length / MAX_READS``."""
    return max(byte or 1, -(-length // MAX_READS))


def instrument_pynbd(atheris: Any) -> None:
    """Instrument pynbd's own functions. atheris.instrument_all() would also instrument
    the stdlib (enum, dataclasses...), which makes every run many times slower."""
    import gc
    import types

    for obj in gc.get_objects():
        if isinstance(obj, types.FunctionType) and (obj.__module__ or "").startswith("pynbd"):
            atheris.instrument_func(obj)


def seed_corpus(directory: Path, seeds: Sequence[bytes]) -> None:
    """Write the seeds into ``directory`` if it holds no input yet."""
    directory.mkdir(parents=True, exist_ok=True)
    if not any(directory.iterdir()):
        for i, seed in enumerate(seeds):
            (directory / f"seed-{i}").write_bytes(seed)


def fuzz_main(name: str, one_input: Callable[[bytes], None], seeds: Sequence[bytes]) -> None:
    """The harness's ``__main__``: libFuzzer flags and corpus directories from argv."""
    import tempfile

    import atheris  # type: ignore[import-not-found]

    instrument_pynbd(atheris)
    argv = list(sys.argv)
    corpora = [Path(a) for a in argv[1:] if not a.startswith("-")]
    if not corpora:
        corpora = [Path(tempfile.mkdtemp(prefix=f"pynbd-fuzz-{name}-"))]
        argv.append(str(corpora[0]))
    seed_corpus(corpora[0], seeds)
    atheris.Setup(argv, one_input)
    atheris.Fuzz()
