"""bench/bench_copy.py: a --quick run proves the race runs both copiers, counts their
bytes and checks their copies; the rest tests its pure parts and the counting relay.
No speed is asserted: it depends on the host."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.serve_launcher import child_env

from .scripts import import_bench

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20
SUMMARY = (
    "pynbd copy: 1048576 bytes: read 1048576, written 1048576, zeroed 0, skipped 0, "
    "in 0.250 s (4.2 MB/s), 2 connection(s)"
)


@pytest.fixture(scope="module")
def bc() -> Any:
    return import_bench("bench_copy")


@pytest.mark.interop
@pytest.mark.slow
def test_quick_run_races_both_copiers_and_counts_their_bytes(tmp_path: Path, bc: Any) -> None:
    # CI installs the peers: a missing one is a failure, never a skip.
    for program in ("nbdkit", "nbdcopy", "qemu-img"):
        assert shutil.which(program), f"{program} is not installed (.ci/run installs it)"
    out_json = tmp_path / "copy.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_copy.py"), "--quick", "--only", "^unix/",
         "--markdown", "--json", str(out_json)],
        cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=100, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    header, rates, cpu, counted = _tables(proc.stdout)
    assert header.startswith("pynbd copy vs nbdcopy "), proc.stdout
    assert rates[0].startswith("| case | transport | nbdcopy MB/s | pynbd MB/s | ratio |")
    assert cpu[0].startswith("| case | transport | nbdcopy CPU s/GiB | pynbd CPU s/GiB |")
    assert counted[0].startswith("| case | transport | tool | connections (src/dst) |")

    doc = json.loads(out_json.read_text())
    ids = [f"unix/{case}/{s}" for case in ("mem-to-mem", "file-to-nbd", "nbd-to-file",
           "sparse") for s in ("default", "matched")]  # fmt: skip
    assert [row["id"] for row in doc["rows"]] == ids
    assert len(rates) == 2 + len(ids)
    for row in doc["rows"]:
        assert row["pynbd"] > 0 and row["libnbd"] > 0, row
        assert row["paired_ratio"] > 0 and not row["verdict"].startswith("error"), row
        assert row["target"] == (None if "/sparse/" in row["id"] else 0.9), row
        assert row["pynbd_engine_rate"] > 0, row  # parsed from pynbd copy -v
    assert {(r["case"], r["contender"]) for r in doc["results"]} == {
        (i.split("/", 1)[1], tool) for i in ids for tool in ("pynbd", "nbdcopy")
    }
    assert all(len(r["samples"]) == 1 and r["error"] is None for r in doc["results"])

    size, sparse = doc["settings"]["size"], doc["settings"]["sparse_size"]
    assert (size, sparse) == (32 * MiB, 128 * MiB)
    counts = {(b["id"], b["tool"]): b for b in doc["bytes"]}
    assert set(counts) == {(i, tool) for i in ids for tool in ("pynbd", "nbdcopy")}
    for (cid, _tool), b in counts.items():
        assert b["error"] is None and b["identical"] is True, b
        src, dst = b["source"], b["destination"]
        assert (src is None) == ("/file-to-nbd/" in cid), b
        assert (dst is None) == ("/nbd-to-file/" in cid), b
        for side in (src, dst):
            if side is not None:
                assert side["connections"] >= 1 and side["sent"] > 0 and side["received"] > 0
        if "/sparse/" in cid:
            # Data, not 128 MiB of zeroes, crossed the sockets; the holes did not.
            assert 0 < dst["sent"] < sparse // 4 and 0 < src["received"] < sparse // 4, b
        else:
            # Every byte of a dense copy crossed each socket, plus the headers.
            if src is not None:
                assert size < src["received"] < size + MiB, b
            if dst is not None:
                assert size < dst["sent"] < size + MiB, b
        assert b["total"] == sum(s["sent"] + s["received"] for s in (src, dst) if s)
    assert all("ratio" in counts[(i, "pynbd")] for i in ids)

    # --pool reads the run's document (bench_client's shape).
    pooled = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_copy.py"), "--pool", str(out_json)],
        env=child_env(), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert pooled.returncode == 0, pooled.stderr
    assert len(pooled.stdout.strip().splitlines()) == 2 + len(ids), pooled.stdout


def _tables(stdout: str) -> tuple[str, list[str], list[str], list[str]]:
    """The header line and the three Markdown tables of a run's output."""
    header, rest = stdout.split("\n", 1)
    rates, cpu, counted = (block.splitlines() for block in rest.strip().split("\n\n"))
    return header, rates, cpu, counted


# --------------------------------------------------------------------------- the relay


@pytest.fixture
def echo(tmp_path: Path) -> Iterator[dict[str, str]]:
    """An echo server on a unix socket and on 127.0.0.1, by URI."""
    listeners = []
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(tmp_path / "echo.sock"))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    for s in (unix, tcp):
        s.listen(8)
        listeners.append(s)

    def serve(listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    def answer(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    threads = [threading.Thread(target=serve, args=(s,), daemon=True) for s in listeners]
    for t in threads:
        t.start()
    yield {
        "unix": f"nbd+unix:///?socket={tmp_path / 'echo.sock'}",
        "tcp": f"nbd://127.0.0.1:{tcp.getsockname()[1]}/",
    }
    for s in listeners:
        s.shutdown(socket.SHUT_RDWR)
        s.close()
    for t in threads:
        t.join(10)


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_relay_counts_every_byte_each_way(
    bc: Any, echo: dict[str, str], tmp_path: Path, transport: str
) -> None:
    relay = bc.Relay(echo[transport], tmp_path / "relay.sock" if transport == "unix" else None)
    family, address = bc.address_of(relay.uri)
    sizes = (3 * MiB + 17, 1)
    for n in sizes:
        with socket.socket(family, socket.SOCK_STREAM) as c:
            c.connect(address)
            payload = bytes(range(256)) * (n // 256) + b"x" * (n % 256)
            sender = threading.Thread(target=c.sendall, args=(payload,))
            sender.start()
            got = bytearray()
            while len(got) < n:
                chunk = c.recv(1 << 20)
                assert chunk, "the relay closed early"
                got += chunk
            sender.join()
            assert bytes(got) == payload
    counts = relay.close()
    assert (counts.sent, counts.received, counts.connections) == (sum(sizes), sum(sizes), 2)


def test_address_of_reads_both_uri_forms(bc: Any) -> None:
    assert bc.address_of("nbd+unix:///?socket=/tmp/a.sock") == (socket.AF_UNIX, "/tmp/a.sock")
    assert bc.address_of("nbd://127.0.0.1:10809/") == (socket.AF_INET, ("127.0.0.1", 10809))
    with pytest.raises(ValueError):
        bc.address_of("nbds://127.0.0.1:10809/")


# --------------------------------------------------------------------------- pure parts


def test_run_copy_reports_time_cpu_and_the_summary(bc: Any) -> None:
    env = child_env()
    said = f"import sys; sys.stderr.write({SUMMARY!r} + '\\n')"
    got = bc.run_copy([sys.executable, "-c", said], env)
    assert got.seconds > 0 and got.cpu > 0
    assert (got.engine_seconds, got.summary) == (0.25, SUMMARY)
    with pytest.raises(RuntimeError, match=r"exited with 3: boom"):
        bc.run_copy(
            [sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"], env
        )
    with pytest.raises(RuntimeError, match=r"exited with 1: .*boom"):
        bc.run_copy([sys.executable, "-c", "raise SystemExit('boom')"], env)
    assert bc.parse_summary("nbdcopy: something\n") == (None, None)


def _results(bc: Any, rates: dict[str, tuple[list[float], list[float]]]) -> Any:
    """Results whose rounds ran at these MB/s (pynbd's, nbdcopy's), per id."""
    results = bc.Results()
    for cid, (mine, theirs) in rates.items():
        for tool, got in (("pynbd", mine), ("nbdcopy", theirs)):
            results.samples[(cid, tool, "timed")] = [
                bc.Sample(seconds=100 / r, cpu=0.5, size=100 * 10**6, engine_seconds=None)
                for r in got
            ]
    return results


def test_rows_pair_rounds_and_judge_the_dense_cases(bc: Any) -> None:
    ids = ["unix/mem-to-mem/default", "tcp/sparse/matched", "unix/nbd-to-file/default"]
    results = _results(
        bc,
        {
            # Round 2 was slow for both: the paired ratio is 1.0, the medians' 0.8.
            ids[0]: ([1000.0, 400.0, 800.0], [1000.0, 400.0, 1000.0]),
            ids[1]: ([500.0], [1000.0]),
        },
    )
    results.errors[(ids[2], "pynbd", "timed")] = "pynbd exited with 1: boom"
    rows = {r["id"]: r for r in bc.rows(results, ids)}
    dense, sparse, broken = rows[ids[0]], rows[ids[1]], rows[ids[2]]
    assert dense["ratio"] == pytest.approx(0.8) and dense["paired_ratio"] == pytest.approx(1.0)
    assert dense["target"] == 0.9 and dense["verdict"] == "misses by 11.1%"
    assert dense["pynbd_cpu_s_per_gib"] == pytest.approx(0.5 / (100 * 10**6) * (1 << 30))
    assert sparse["target"] is None and sparse["verdict"] == "no target"
    assert broken["verdict"] == "error: pynbd exited with 1: boom"
    table = bc.rate_table(list(rows.values()), markdown=True).splitlines()
    assert table[2] == (
        "| nbdkit memory -> nbdkit memory (default) | unix | 1,000 | 800 | 0.80x | 1.00x "
        "| >= 0.9x | misses by 11.1% |"
    )


def test_bytes_rows_hold_the_sparse_case_to_nbdcopys_bytes(bc: Any) -> None:
    results = bc.Results()
    sparse, dense = "unix/sparse/default", "tcp/nbd-to-file/matched"
    for cid, (ours, theirs) in {sparse: (1000, 900), dense: (500, 600)}.items():
        for tool, n in (("pynbd", ours), ("nbdcopy", theirs)):
            source = bc.Counts(sent=10, received=n, connections=2)
            destination = None if cid == dense else bc.Counts(sent=n, received=5, connections=2)
            results.counts[(cid, tool, "count")] = bc.Count(source, destination, True)
    results.errors[("unix/mem-to-mem/default", "pynbd", "count")] = "boom"
    rows = bc.bytes_rows(results, [sparse, dense, "unix/mem-to-mem/default"])
    assert [(r["id"], r["tool"]) for r in rows][:2] == [(sparse, "nbdcopy"), (sparse, "pynbd")]
    ours = rows[1]
    assert ours["total"] == 2015 and ours["ratio"] == pytest.approx(2015 / 1815)
    lines = bc.bytes_table(rows, markdown=True).splitlines()
    assert lines[3].endswith(
        "| 2/2 | 1,000 | 10 | 1,000 | 5 | 2,015 | yes | 1.1102x | misses by 11.02% |"
    )
    assert lines[2].endswith("| 1,815 | yes | - | - |")
    assert lines[5].endswith("| 2/file | 500 | 10 | - | - | 510 | yes | 0.8361x | no target |")
    assert lines[7].endswith("| error: boom |")


def test_arguments(bc: Any) -> None:
    args = bc.parse_args([])
    assert (args.rounds, args.size, args.sparse_size) == (5, 1024 * MiB, 4096 * MiB)
    assert len(args.ids) == 16 and args.ids[0] == "unix/mem-to-mem/default"
    assert args.matched[:2] == ["-C", args.matched[1]] and "--request-size" in args.matched
    args = bc.parse_args(["--quick", "--only", "/sparse/", "--matched", "-C 1 -R 4"])
    assert (args.rounds, args.size) == (1, 32 * MiB)
    assert args.ids == ["unix/sparse/default", "unix/sparse/matched", "tcp/sparse/default",
                        "tcp/sparse/matched"]  # fmt: skip
    assert args.matched == ["-C", "1", "-R", "4"]
    tools = bc.Tools("/py", args.matched, env={})
    assert tools.argv("pynbd", "matched", "a", "b") == [
        "/py", "-m", "pynbd", "copy", "-v", "-C", "1", "-R", "4", "a", "b"
    ]  # fmt: skip
    assert tools.argv("nbdcopy", "default", "a", "b")[1:] == ["a", "b"]
    with pytest.raises(SystemExit):
        bc.parse_args(["--only", "nothing-matches"])
