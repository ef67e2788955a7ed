"""``pynbd demo``: the README's first command, exactly as a new user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pynbd.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_readme_first_command_runs_as_written() -> None:
    # README: PYTHONPATH=src python3 -m pynbd demo (from the checkout's root)
    env = {**os.environ, "PYTHONPATH": "src"}
    proc = subprocess.run(
        [sys.executable, "-m", "pynbd", "demo"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "read 8 MiB back" in proc.stdout
    assert "every check passed" in proc.stdout
    assert proc.stderr == ""


def test_demo_rejects_a_size_too_small(capsys: object) -> None:
    assert main(["demo", "--size", "1M"]) == 1


@pytest.mark.parametrize("size", ["16M", "64M"])
def test_demo_on_a_small_export(size: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The demo's writes fit any size it accepts (it wrote at 100 MiB whatever the size)."""
    assert main(["demo", "--size", size]) == 0
    assert "every check passed" in capsys.readouterr().out
