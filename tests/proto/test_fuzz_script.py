"""scripts/fuzz: each harness runs under atheris (CI's short fuzz run, a few thousand
executions each), what libFuzzer says is summed up, a crash is reported with its input,
and a missing atheris is said in one line.

atheris is a test dependency (the ``fuzz`` extra; CI installs it): this imports it
rather than skip without it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import atheris  # type: ignore[import-not-found]  # noqa: F401  (see the docstring)
import pytest

from .harnesses import load

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fuzz"
RUN = load("run")
RUNS = 3000


def fuzz(*args: str, pythonpath: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHON=sys.executable)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("harness", list(RUN.HARNESSES))
def test_each_harness_runs_under_atheris(harness: str, tmp_path: Path) -> None:
    corpus, artifacts = tmp_path / "corpus", tmp_path / "artifacts"
    proc = fuzz(harness, "-n", str(RUNS), "--corpus", str(corpus), "--artifacts", str(artifacts))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = proc.stdout.splitlines()[0]
    m = re.fullmatch(
        rf"{harness}: (\d+) executions in \d+ s, cov: (\d+) ft: (\d+), "
        r"corpus: (\d+) inputs, crashes: 0",
        line,
    )
    assert m, line
    executions, cov, ft, kept = map(int, m.groups())
    assert executions == RUNS
    assert cov > 100 and ft >= cov and kept >= len(load(RUN.HARNESSES[harness].stem).SEEDS) // 2
    assert any(corpus.iterdir()), "the corpus was not seeded"
    assert "Done" in (artifacts / f"{harness}.log").read_text()


def test_missing_atheris_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "atheris.py").write_text("raise ImportError('no atheris here')\n")
    proc = fuzz("all", "-n", "10", pythonpath=str(tmp_path))
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "scripts/fuzz: atheris is not installed: pip install atheris"
    ]


def test_unknown_harness_is_refused() -> None:
    proc = fuzz("everything")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


# What libFuzzer printed for a crash of fuzz_server_transmission (a harness bug, fixed;
# the input is kept in fuzz_regressions/), cut short.
CRASH_LOG = """\
INFO: Seed: 2911385402
#2	INITED cov: 301 ft: 907 corp: 8/16Kb exec/s: 0 rss: 53Mb
#1296	REDUCE cov: 332 ft: 999 corp: 67/398Kb lim: 70063 exec/s: 0 rss: 54Mb L: 1747/70063

 === Uncaught Python exception: ===
AssertionError: <EMPTY MESSAGE>
Traceback (most recent call last):
  File "fuzz/fuzz_server_transmission.py", line 421, in take_output
    assert offset == ev.offset
           ^^^^^^^^^^^^^^^^^^^
AssertionError: <EMPTY MESSAGE>

==23358== ERROR: libFuzzer: fuzz target exited
SUMMARY: libFuzzer: fuzz target exited
MS: 1 CopyPart-; base unit: 99f2881b3675e24480b2d0c9360af30319510ddc
artifact_prefix='/tmp/art/'; Test unit written to /tmp/art/crash-e7e074b6947d
stat::number_of_executed_units: 1327
stat::average_exec_per_sec:     0
"""


def test_crash_is_reported_with_its_input() -> None:
    result = RUN.parse("server-transmission", CRASH_LOG, 1)
    assert (result.executions, result.cov, result.ft, result.corpus) == (1327, 332, 999, 67)
    assert result.crashed
    assert result.line() == (
        "server-transmission: 1327 executions, cov: 332 ft: 999, corpus: 67 inputs, "
        "CRASH: AssertionError: <EMPTY MESSAGE>; "
        "input: /tmp/art/crash-e7e074b6947d"
    )


def test_libfuzzer_errors_without_python_exception() -> None:
    log = "#10\tNEW cov: 5 ft: 6 corp: 2/3b\n==1== ERROR: libFuzzer: out-of-memory (used: 2100Mb)\n"
    log += "Test unit written to ./oom-abc\n"
    result = RUN.parse("client-handshake", log, 1)
    assert result.errors == ["libFuzzer: out-of-memory (used: 2100Mb)"]
    assert result.artifacts == ["./oom-abc"] and result.crashed
