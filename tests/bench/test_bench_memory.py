"""bench/bench_memory.py: a --quick run proves the script runs against both servers; the
rest tests its pure parts. No figure of memory is asserted: it depends on the host."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.serve_launcher import child_env

from .scripts import import_bench

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bm() -> Any:
    return import_bench("bench_memory")


@pytest.mark.interop
@pytest.mark.slow
def test_quick_run_measures_every_scenario_on_both_servers(tmp_path: Path) -> None:
    # CI installs nbdkit: a missing one is a failure, never a skip.
    assert shutil.which("nbdkit"), "nbdkit is not installed (.ci/run installs it)"
    out_json = tmp_path / "mem.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_memory.py"), "--quick", "--markdown",
         "--json", str(out_json)],
        cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=100, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("Server memory "), proc.stdout
    assert lines[1].startswith("| scenario | server | RSS before (MiB) |"), proc.stdout
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[3:]]

    doc = json.loads(out_json.read_text())
    ids = [sc["id"] for sc in doc["settings"]["scenarios"]]
    assert ids == [
        "baseline",
        "idle-1",
        "idle-10",
        "noread-memory",
        "noread-file",
        "sparse-1T-0",
        "sparse-1T-0.0001%",
    ]
    records = doc["records"]
    assert [(r["scenario"], r["server"]) for r in records] == [
        (i, s) for i in ids for s in ("pynbd", "nbdkit")
    ]
    assert len(rows) == len(records)
    for record, row in zip(records, rows, strict=True):
        assert record["error"] is None, record
        assert row[1] == record["server"] and row[2] != "-", row
        after = record["after"]
        assert after["rss"] > 0 and after["hwm"] >= after["rss"] and after["threads"] >= 1
        if record["scenario"].startswith("idle-"):
            # Each connection holds a socket in the server, whatever else it costs.
            count = int(record["scenario"].split("-")[1])
            assert after["fds"] >= record["start"]["fds"] + count, record
    sparse = [r for r in records if r["scenario"] == "sparse-1T-0.0001%"]
    # 0.0001% of 1 TiB in 64 KiB pieces: 17 of them.
    assert {r["written"] for r in sparse} == {17 * 64 * 1024}


def test_sparse_specs_and_fractions(bm: Any) -> None:
    assert bm.parse_fraction("0.01%") == pytest.approx(1e-4)
    assert bm.parse_fraction("0.5") == 0.5
    for bad in ("101%", "-1", "x"):
        with pytest.raises(ValueError):
            bm.parse_fraction(bad)
    sc = bm.sparse_scenario("1T:0.01%")
    assert (sc.id, sc.kind, sc.export, sc.size) == ("sparse-1T-0.01%", "sparse", "memory", 1 << 40)
    assert sc.written == round((1 << 40) * 1e-4 / 65536) * 65536
    assert bm.sparse_scenario("64G:0").written == 0
    with pytest.raises(ValueError):
        bm.sparse_scenario("1T")


def test_arguments_refuse_what_the_machine_would_hold(bm: Any) -> None:
    args = bm.parse_args(["--only", "^idle-"])
    assert [sc.id for sc in args.scenarios] == ["idle-1", "idle-100", "idle-1000"]
    assert args.noread == (16, 16, 32 << 20) and args.settle_timeout == 30.0
    args = bm.parse_args(["--quick", "--servers", "nbdkit", "--noread", "3x4x2M"])
    noread = [sc for sc in args.scenarios if sc.kind == "noread"]
    assert [(sc.count, sc.reads, sc.read_size, sc.size) for sc in noread] == [
        (3, 4, 2 << 20, 8 << 20)
    ] * 2
    assert args.servers == ["nbdkit"]
    args = bm.parse_args(["--serve-arg=--no-connection-threads", "--serve-arg=-q"])
    assert args.serve_arg == ["--no-connection-threads", "-q"]
    for bad in (
        ["--sparse", "1T:1%"],  # 10 GiB written: more than the default 4 GiB cap
        ["--servers", "qemu-nbd"],
        ["--only", "nothing"],
        ["--sparse", "1T:2"],
    ):
        with pytest.raises(SystemExit):
            bm.parse_args(bad)
    assert bm.parse_args(["--sparse", "1T:1%", "--rss-cap", "16G"]).scenarios[-1].written > 0


def test_settling_compares_two_samples(bm: Any) -> None:
    a = bm.Usage(100 << 20, 100 << 20, 3, 9)
    assert bm.agree(a, bm.Usage((100 << 20) + 512 * 1024, 0, 3, 9))
    assert not bm.agree(a, bm.Usage(102 << 20, 0, 3, 9))
    assert not bm.agree(a, bm.Usage(100 << 20, 0, 4, 9))
    assert not bm.agree(a, bm.Usage(100 << 20, 0, 3, 10))
    me = bm.usage(os.getpid())
    assert me.rss > 0 and me.hwm >= me.rss and me.threads >= 1 and me.fds >= 3
    got = bm.settle(os.getpid(), timeout=0, cap=1)  # over a 1-byte cap at once
    assert got.over_cap and not got.settled


def test_table_rows(bm: Any) -> None:
    mib = 1 << 20
    ok = bm.Record("idle-4", "4 idle connections", "pynbd", start=bm.Usage(mib, mib, 1, 7))
    ok.before = ok.start
    ok.loaded = bm.Settled(bm.Usage(3 * mib, 3 * mib, 5, 19), settled=True, waited=1.0)
    sparse = bm.Record("sparse-x", "sparse", "nbdkit", written=2 * mib)
    sparse.before = bm.Usage(mib, mib, 1, 6)
    sparse.loaded = bm.Settled(bm.Usage(4 * mib, 5 * mib, 1, 6), False, 0.2, over_cap=True)
    broken = bm.Record("idle-4", "4 idle connections", "nbdkit", error="OSError: boom")
    lines = bm.table([ok, sparse, broken], markdown=True).splitlines()
    assert lines[2] == (
        "| 4 idle connections | pynbd | 1.0 | 3.0 | 2.0 | 3.0 | 5 | 19 "
        "| settled in 1.0 s; 512 KiB per connection |"
    )
    assert lines[3] == (
        "| sparse | nbdkit | 1.0 | 4.0 | 3.0 | 5.0 | 1 | 6 "
        "| past the RSS cap: measured there; held / written 1.50 |"
    )
    assert lines[4] == "| 4 idle connections | nbdkit | - | - | - | - | - | - | OSError: boom |"
