"""Smoke test of bench/bench_client.py: one tiny case runs and prints its table.

The benchmark needs libnbd's Python binding, which only Debian's /usr/bin/python3 has,
so it runs as a subprocess under that interpreter. It asserts that the run works and
reports; it asserts no speed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"
HEADER = "| test | transport | pynbd | libnbd | ratio | target | verdict |"


def _has_libnbd() -> bool:
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return False
    probe = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True, timeout=30, check=False
    )
    return probe.returncode == 0


pytestmark = [pytest.mark.interop]


def test_quick_run_prints_a_markdown_table(tmp_path: Path) -> None:
    # CI installs the peers: a missing one is a failure, never a skip.
    assert shutil.which("nbdkit"), "nbdkit is not installed (.ci/run installs it)"
    assert _has_libnbd(), "python3-libnbd is missing for /usr/bin/python3 (.ci/run installs it)"
    out_json = tmp_path / "bench.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO / "src"), env.get("PYTHONPATH", "")) if p
    )
    proc = subprocess.run(
        [
            SYSTEM_PYTHON,
            str(REPO / "bench" / "bench_client.py"),
            "--quick",
            "--only",
            "^unix/rand-read-qd1$",
            "--markdown",
            "--json",
            str(out_json),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    # The comparison table, then (after a blank line) the CPU-per-operation table.
    table, cpu_table = proc.stdout.strip().split("\n\n")
    lines = table.splitlines()
    assert lines[0] == HEADER, proc.stdout
    assert len(lines) == 3, proc.stdout  # header, separator, one row
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[:2] == ["4 KiB random read, QD1", "unix"]
    assert cells[2].endswith("IOPS") and cells[3].endswith("IOPS"), lines[2]
    assert cells[4].endswith("x") and cells[5] == ">= 0.8x", lines[2]
    assert "error" not in cells[6], lines[2]
    assert cpu_table.splitlines()[0].startswith("| test | transport | pynbd CPU"), proc.stdout

    doc = json.loads(out_json.read_text())
    (row,) = doc["rows"]
    assert row["id"] == "unix/rand-read-qd1"
    assert row["pynbd"] > 0 and row["libnbd"] > 0
    assert {r["contender"] for r in doc["results"]} == {"pynbd Client.pread", "libnbd pread"}
    assert all(len(r["samples"]) == 2 for r in doc["results"])
