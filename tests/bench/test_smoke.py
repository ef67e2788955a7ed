"""Smoke test of bench/bench_client.py: one tiny case runs and prints its table.

The benchmark needs libnbd's Python binding, which only Debian's /usr/bin/python3 has,
so it runs as a subprocess under that interpreter. It asserts that the run works and
reports; it asserts no speed. The benchmarks' own arithmetic (paired ratios, pooling,
bench_kernel's job files and tables) is tested here too, without any peer.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.serve_launcher import child_env

REPO = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = "/usr/bin/python3"
HEADER = "| test | transport | pynbd | libnbd | ratio | paired | target | verdict |"


def _has_libnbd() -> bool:
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return False
    probe = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True, timeout=30, check=False
    )
    return probe.returncode == 0


def quick_run(tmp_path: Path, only: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    """A --quick --markdown run of the cases matching ``only``; its JSON file's path."""
    # CI installs the peers: a missing one is a failure, never a skip.
    assert shutil.which("nbdkit"), "nbdkit is not installed (.ci/run installs it)"
    assert _has_libnbd(), "python3-libnbd is missing for /usr/bin/python3 (.ci/run installs it)"
    out_json = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            SYSTEM_PYTHON,
            str(REPO / "bench" / "bench_client.py"),
            "--quick",
            "--only",
            only,
            "--markdown",
            "--json",
            str(out_json),
        ],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc, out_json


@pytest.mark.interop
def test_quick_run_prints_a_markdown_table(tmp_path: Path) -> None:
    proc, out_json = quick_run(tmp_path, "^unix/rand-read-qd1$")
    # The comparison table, then (after a blank line) the CPU-per-operation table.
    table, cpu_table = proc.stdout.strip().split("\n\n")
    lines = table.splitlines()
    assert lines[0] == HEADER, proc.stdout
    assert len(lines) == 3, proc.stdout  # header, separator, one row
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[:2] == ["4 KiB random read, QD1", "unix"]
    assert cells[2].endswith("IOPS") and cells[3].endswith("IOPS"), lines[2]
    assert cells[4].endswith("x") and cells[5].endswith("x"), lines[2]
    assert cells[6] == ">= 0.8x" and "error" not in cells[7], lines[2]
    assert cpu_table.splitlines()[0].startswith("| test | transport | pynbd CPU"), proc.stdout

    doc = json.loads(out_json.read_text())
    (row,) = doc["rows"]
    assert row["id"] == "unix/rand-read-qd1"
    assert row["pynbd"] > 0 and row["libnbd"] > 0
    assert {r["contender"] for r in doc["results"]} == {"pynbd Client.pread", "libnbd pread"}
    assert all(len(r["samples"]) == 2 for r in doc["results"])
    assert row["paired_ratio"] > 0


@pytest.mark.interop
def test_kept_case_compares_new_bytes_and_one_buffer(tmp_path: Path) -> None:
    """The seq-read-kept case: three contenders, two rows without a target."""
    proc, out_json = quick_run(tmp_path, "^unix/seq-read-kept$")
    doc = json.loads(out_json.read_text())
    rows = {row["test"]: row for row in doc["rows"]}
    assert set(rows) == {
        "seq read 256 KiB kept, new buffer per call",
        "seq read 256 KiB kept, into one buffer",
    }, proc.stdout
    for row in rows.values():
        assert row["target"] is None and row["pynbd"] > 0 and row["libnbd"] > 0, row
    assert {r["contender"] for r in doc["results"]} == {
        "pynbd Client.pread, kept",
        "libnbd pread, kept",
        "pynbd Client.pread_into, one buffer",
    }
    assert all(len(r["samples"]) == 2 and r["error"] is None for r in doc["results"])


def test_paired_ratio_is_the_median_of_each_rounds_ratio() -> None:
    from bench import bench_client as bc

    def result(rates: list[float], error: str | None = None) -> bc.Result:
        samples = [bc.Sample(ops=int(r), nbytes=int(r), seconds=1.0) for r in rates]
        return bc.Result("unix", "case", "who", "IOPS", samples, error)

    # Round 2 was slow for both sides. The medians' ratio is 0.8; the median of the
    # rounds' own ratios (1.0, 1.0, 0.8) is 1.0.
    mine, theirs = result([100, 40, 80]), result([100, 40, 100])
    assert mine.median() is not None and theirs.median() is not None
    assert mine.median() / theirs.median() == pytest.approx(0.8)
    assert bc.paired_ratio(mine, theirs) == pytest.approx(1.0)
    assert bc.paired_ratio(result([1, 2, 3]), result([1, 2])) is None  # no pairs
    assert bc.paired_ratio(result([1]), result([1], error="boom")) is None


def _run_doc(rounds: dict[str, tuple[list[float], list[float]]], target: float | None) -> dict:
    """A --json document of one run: per case, pynbd's and libnbd's round rates. As in
    the real runs, every case has the same two contender names."""
    doc: dict = {"rows": [], "results": []}
    for name, (mine, theirs) in rounds.items():
        doc["rows"].append(
            {"id": f"unix/{name}", "test": name, "transport": "unix", "target": target,
             "pynbd_contender": "pynbd", "libnbd_contender": "libnbd"}
        )  # fmt: skip
        for who, rates in (("pynbd", mine), ("libnbd", theirs)):
            samples = [{"rate": r} for r in rates]
            doc["results"].append({"transport": "unix", "case": name, "contender": who,
                                   "error": None, "samples": samples})  # fmt: skip
    return doc


def test_pooled_rows_pool_each_rounds_ratio_over_runs() -> None:
    from bench import bench_client as bc

    steady = ([102.0] * 5, [100.0] * 5)  # 1.02 in every round: the interval is 1.02 too
    mixed = ([99.0, 105.0, 103.0], [100.0] * 3)  # median 1.03, one round at 0.99
    slow = ([90.0, 95.0], [100.0] * 2)
    broken = ([1.0, 2.0], [1.0])  # the rounds do not pair up: left out
    docs = [
        _run_doc({"steady": steady, "mixed": mixed, "slow": slow, "broken": broken}, 1.0),
        _run_doc({"steady": steady, "mixed": mixed}, 1.0),
    ]
    rows = {r["test"]: r for r in bc.pooled_rows(docs)}
    assert set(rows) == {"steady", "mixed", "slow"}
    assert (rows["steady"]["runs"], rows["steady"]["rounds"]) == (2, 10)
    assert rows["steady"]["median"] == pytest.approx(1.02)
    assert rows["steady"]["low"] == pytest.approx(1.02) == rows["steady"]["high"]
    assert rows["steady"]["verdict"] == "meets"
    assert rows["mixed"]["median"] == pytest.approx(1.03)
    assert rows["mixed"]["low"] == pytest.approx(0.99)  # six rounds: a resample can be low
    assert rows["mixed"]["verdict"] == "meets within noise"
    assert rows["slow"]["verdict"] == "misses by 7.5%"
    assert bc.pooled_rows(docs) == bc.pooled_rows(docs)  # seeded
    (free,) = bc.pooled_rows([_run_doc({"free": steady}, None)])
    assert free["verdict"] == "no target"
    table = bc.render_pooled(list(rows.values()), markdown=True).splitlines()
    assert table[0].split(" | ")[4:6] == ["paired", "95% interval"]
    assert "| steady | unix | 2 | 10 | 1.020x | 1.020x .. 1.020x | >= 1.0x | meets |" in table


def test_pool_option_reads_files_and_fails_in_one_line(tmp_path: Path) -> None:
    from bench import bench_client as bc

    good = tmp_path / "run.json"
    good.write_text(json.dumps(_run_doc({"steady": ([102.0] * 3, [100.0] * 3)}, 1.0)))
    assert bc.main(["--pool", str(good), str(good)]) == 0
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    script = str(REPO / "bench" / "bench_client.py")
    for args in ([str(bad)], [str(tmp_path / "missing.json")], [str(good), str(bad)]):
        proc = subprocess.run(
            [sys.executable, script, "--pool", *args], capture_output=True, text=True,
            timeout=60, check=False,
        )  # fmt: skip
        assert proc.returncode == 2, proc
        assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith("cannot pool "), proc.stderr


# --------------------------------------------------------------------------- bench_kernel
# bench/bench_kernel.py runs fio in the kernel test guest; here only its host-side code:
# arguments, the fio job file, parsing fio's JSON and the CPU marks, and the tables.


def test_bench_kernel_arguments() -> None:
    from bench import bench_kernel as bk

    args = bk.parse_args([])
    assert (args.size, args.runtime, args.rounds, args.profile) == (64, 2.0, 3, False)
    assert args.contenders == list(bk.CONTENDERS) and args.in_guest is None
    args = bk.parse_args(["--contenders", "nbdkit-mem,pynbd-inproc", "--rounds", "1"])
    assert args.contenders == ["nbdkit-mem", "pynbd-inproc"] and args.rounds == 1
    assert [j.name for j in bk.selected_jobs("^rand-read")] == [
        "rand-read-4k-qd1",
        "rand-read-4k-qd16",
    ]
    for bad in (
        ["--contenders", "pynbd-inproc"],
        ["--contenders", "x,nbdkit-mem"],
        ["--size", "1"],
        ["--only", "nothing-matches"],
    ):
        with pytest.raises(SystemExit):
            bk.parse_args(bad)


def test_bench_kernel_job_file_interleaves_contenders() -> None:
    from bench import bench_kernel as bk

    text = bk.job_file({"b": ("/dev/nbd1", 20), "a": ("/dev/nbd0", 10)}, 1.5)
    sections = [line[1:-1] for line in text.splitlines() if line.startswith("[")]
    assert sections[0] == "global"
    assert sections[1:] == [f"{job.name}@{n}" for job in bk.JOBS for n in ("b", "a")]
    assert "runtime=1500ms" in text and text.count("stonewall") == 2 * len(bk.JOBS)
    assert text.count("exec_prerun=cat /proc/20/stat") == len(bk.JOBS)
    assert text.count("exec_postrun=cat /proc/10/stat") == len(bk.JOBS)
    assert ";" not in text  # fio would take the rest of the line for a comment
    assert "exec_" not in bk.job_file({"a": ("/dev/nbd0", 10)}, 1, marks=False)


def _fake_fio(scale: dict[str, float]) -> dict[str, object]:
    from bench import bench_kernel as bk

    jobs: list[dict[str, object]] = []
    for name, factor in scale.items():
        for job in bk.JOBS:
            side = {"bw_bytes": 100e6 * factor, "iops": 1000 * factor, "total_ios": 2000,
                    "runtime": 2000}  # fmt: skip
            jobs.append({"jobname": f"{job.name}@{name}", "error": 0, job.direction: side})
    return {"jobs": jobs}


def test_bench_kernel_parses_fio_and_marks(tmp_path: Path) -> None:
    from bench import bench_kernel as bk

    hz = os.sysconf("SC_CLK_TCK")
    stat = "1 (a b) c) S" + " 0" * 10 + " {u} {s} 0 0\n"  # comm may hold spaces and ")"
    (tmp_path / "seq-write-1m@x.prerun.txt").write_text(stat.format(u=100, s=50))
    (tmp_path / "seq-write-1m@x.postrun.txt").write_text(stat.format(u=100 + hz, s=50 + hz))
    (tmp_path / "seq-read-1m@x.prerun.txt").write_text("garbage")
    cpu = bk.parse_marks(tmp_path, ["seq-write-1m@x", "seq-read-1m@x", "rand-read-4k-qd1@x"])
    assert cpu == {"seq-write-1m@x": 2.0}
    figures = bk.parse_fio(_fake_fio({"x": 1.0}), cpu)
    expected = {"mbps": 100.0, "iops": 1000.0, "ops": 2000, "seconds": 2.0, "server_cpu": 2.0}
    assert figures["x"]["seq-write-1m"] == {**expected, "error": 0}
    unknown = figures["x"]["rand-read-4k-qd1"]["server_cpu"]
    assert unknown != unknown  # NaN: no marks for this job


def test_bench_kernel_tables() -> None:
    from bench import bench_kernel as bk

    scale = {"pynbd-inproc": 0.5, "nbdkit-mem": 1.0, "pynbd-serve": 0.8}
    rounds = [bk.parse_fio(_fake_fio(scale), {}) for _ in range(3)]
    doc = {
        "settings": {"contenders": list(bk.CONTENDERS)},
        "results": [{"round": i, "contender": n, "jobs": jobs}
                    for i, r in enumerate(rounds) for n, jobs in r.items()]
        + [{"round": 0, "contender": "pynbd-serve", "error": "boom"}],
    }  # fmt: skip
    table, cpu_table, errors = bk.markdown(doc).split("\n\n")
    lines = table.splitlines()
    assert lines[0] == (
        "| case | pynbd-inproc | nbdkit-mem | pynbd-serve | pynbd-inproc / nbdkit-mem "
        "| pynbd-serve / nbdkit-mem | target | verdict |"
    )
    assert len(lines) == 2 + len(bk.JOBS) + 1
    assert lines[-1].endswith("|  |  |  | 0.50x | 0.80x | >= 0.7x (pynbd-inproc) | misses by 29% |")
    seq = lines[2].split(" | ")
    assert seq[1:6] == ["50.0 MB/s", "100 MB/s", "80.0 MB/s", "0.50x", "0.80x"]
    assert seq[6:] == [">= 0.7x (pynbd-inproc)", "misses by 29% |"]
    rand = next(line for line in lines if line.startswith("| 4 KiB random read, QD16"))
    assert "500 IOPS | 1.0k IOPS | 800 IOPS" in rand
    assert cpu_table.splitlines()[2].endswith("| - | - | - |")  # no marks: no CPU figure
    assert errors == "Errors:\n- pynbd-serve round 1: boom"


@pytest.mark.interop
def test_abtrees_compares_a_checkout_with_itself(tmp_path: Path) -> None:
    """bench/abtrees.py imports two checkouts side by side (here the same one twice)
    and prints the control's and the new tree's ratios to the base; no speed asserted."""
    assert shutil.which("nbdkit"), "nbdkit is not installed (.ci/run installs it)"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "abtrees.py"),
            str(REPO),
            str(REPO),
            "--case",
            "pread_into",
            "--size",
            "4K",
            "--rounds",
            "3",
            "--seconds",
            "0.02",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("pread_into 4096 bytes, 3 rounds of 0.02 s; base ")
    assert lines[1].split()[:3] == ["control", "(base", "again)"]
    assert lines[2].split()[0] == "new"
    for line in lines[1:]:
        assert " of base (quartiles " in line


def test_bench_server_baseline_table_pairs_rounds() -> None:
    """--baseline's table: per case and backend, the median of each round's ratio of
    this checkout's server to the baseline's (throughput, and CPU per unit)."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import bench_server as bs
    finally:
        sys.path.remove(str(REPO / "bench"))
    results = bs.Results()
    # Three rounds: ours 100, 90, 120 MB/s against the baseline's 100, 100, 100 (ratios
    # 1.0, 0.9, 1.2: median 1.0); CPU seconds so that CPU per MB halves in every round.
    for ours, base in ((100, 100), (90, 100), (120, 100)):
        results.samples.setdefault(("unix", "write-4m", "pynbd-mem"), []).append(
            bs.Sample(ours, 1.0, 0.5, 100)
        )
        results.samples.setdefault(("unix", "write-4m", "base-mem"), []).append(
            bs.Sample(base, 1.0, 1.0, 100)
        )
    lines = bs.baseline_table(results, "unix", ["write-4m"])
    assert lines[-1] == "| write-4m | 1.000 | 0.500 | - | - |"
