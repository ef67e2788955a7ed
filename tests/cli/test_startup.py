"""What ``python -m pynbd COMMAND`` imports: the client commands (``info``, ``list``,
``map``, ``copy``) load neither the server (pynbd.server and the server half of
pynbd.proto) nor the kernel side (pynbd.kernel), whose imports would be most of their
start-up time. pynbd.cli's docstring says how a subcommand keeps it so.

Each check runs the command in a fresh interpreter (``python -c``, running the package
as ``-m`` does) and reads that interpreter's ``sys.modules`` once the command is done.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.peers import Server
from tests.serve_launcher import child_env

#: Module prefixes the client commands must not load.
HEAVY = ("pynbd.server", "pynbd.proto.server", "pynbd.kernel")

# ``python -c PROBE ARGS...``: run ``pynbd ARGS...`` as ``python -m pynbd`` would, then
# write the names of the loaded modules to the file named by PYNBD_PROBE_OUT.
PROBE = """
import json, os, runpy, sys
try:
    runpy.run_module("pynbd", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    status = exc.code
else:
    status = None
with open(os.environ["PYNBD_PROBE_OUT"], "w") as f:
    json.dump({"status": status, "modules": sorted(sys.modules)}, f)
"""


def loaded_modules(tmp_path: Path, *args: str) -> list[str]:
    """The modules ``pynbd ARGS...`` loaded; the command must succeed."""
    out = tmp_path / "modules.json"
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        capture_output=True,
        text=True,
        env={**child_env(), "PYNBD_PROBE_OUT": str(out)},
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["status"] == 0, proc.stderr
    modules: list[str] = report["modules"]
    # The probe sees the command's own modules: an empty answer proves nothing.
    assert "pynbd.cli" in modules, modules
    return modules


def heavy(modules: list[str]) -> list[str]:
    return [m for m in modules if m.startswith(HEAVY)]


@pytest.mark.parametrize(
    "args",
    [["--help"], ["copy", "--help"], ["info", "--help"], ["list", "--help"], ["map", "--help"]],
    ids=" ".join,
)
def test_help_loads_no_server_nor_kernel(tmp_path: Path, args: list[str]) -> None:
    # Every command builds the parser of every subcommand (serve, attach, resize...
    # included): --help loads all the parsers' modules, and nothing else of pynbd's.
    modules = loaded_modules(tmp_path, *args)
    assert heavy(modules) == []
    assert {"pynbd.cli.serve", "pynbd.cli.kernel", "pynbd.cli.resize"} <= set(modules)


def test_client_commands_load_no_server_nor_kernel(
    tmp_path: Path, nbdkit: Callable[..., Server]
) -> None:
    srv = nbdkit("memory", "1M")
    for args in (["info"], ["list"], ["map"], ["copy"]):
        command = [*args, srv.uri]
        if args[0] == "copy":
            command.append("null:")
        modules = loaded_modules(tmp_path, *command)
        assert heavy(modules) == [], command
        assert "pynbd.client.sync" in modules or "pynbd.client.aio" in modules


def test_probe_sees_the_server_when_a_command_loads_it(tmp_path: Path) -> None:
    # The other side of the checks above: a command that needs the server loads it, and
    # the probe reports it.
    modules = loaded_modules(tmp_path, "demo", "--size", "16M")
    assert "pynbd.server" in modules
    assert not any(m.startswith("pynbd.kernel") for m in modules)
