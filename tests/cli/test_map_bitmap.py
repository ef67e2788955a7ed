"""``pynbd map --context qemu:dirty-bitmap:NAME``: the bitmap merged with base:allocation.

Each test makes a qcow2 image with a persistent bitmap (``make_qcow2_with_bitmap``, then
zero writes and discards by ``qemu-io``), serves it with ``qemu-nbd -r -B b0`` and
compares pynbd's map with one built here from ``nbdinfo --map=qemu:dirty-bitmap:b0`` and
``nbdinfo --map`` on the same server: cut wherever either map changes, each piece
``clean`` / ``dirty data`` / ``dirty zero``, adjacent pieces of one kind merged, the
allocation of a merged piece being the base:allocation flags all its bytes have.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from pynbd.cli import extents, main
from pynbd.cli.extents import Extent, describe_dirty, merged_extents
from pynbd.client import Client
from tests.peers import Server, make_qcow2_with_bitmap, nbdinfo_json, run_tool
from tests.serve_launcher import child_env

Factory = Callable[..., Server]

KiB, MiB = 1 << 10, 1 << 20
BITMAP = "b0"
DIRTY = f"qemu:dirty-bitmap:{BITMAP}"
SIZE = 8 * MiB
#: Written before the bitmap was added: data, clean.
CLEAN = [(0, 1 * MiB), (4 * MiB, 512 * KiB)]
#: Written after it (qemu-io write -P): 8 KiB inside clean data, two whole clusters in
#: a hole, 4 KiB in the middle of a hole's cluster.
DIRTY_WRITES = [(100 * KiB, 8 * KiB), (2 * MiB, 128 * KiB), (3 * MiB + 4 * KiB, 4 * KiB)]
#: Then qemu-io zero writes and discards, on data and on holes, whole 64 KiB clusters.
MORE = [
    "write -z 4M 64K",  # on data: a zero cluster
    "discard 512K 128K",  # on data: unallocated again
    "write -z 6M 64K",  # on a hole
    "discard 7M 64K",  # on a hole: dirty all the same
]
#: The bitmap's dirty 64 KiB granules, and what base:allocation says of them where that
#: does not depend on the host file system (qcow2 clusters are 64 KiB too).
EXPECTED_DIRTY = [
    (64 * KiB, 64 * KiB, "dirty data"),
    (512 * KiB, 128 * KiB, "dirty zero"),
    (2 * MiB, 128 * KiB, "dirty data"),
    (3 * MiB, 64 * KiB, None),  # data at +4K; the rest of the cluster may read as zero
    (4 * MiB, 64 * KiB, "dirty zero"),
    (6 * MiB, 64 * KiB, "dirty zero"),
    (7 * MiB, 64 * KiB, "dirty zero"),
]


@pytest.fixture
def server(qemu_nbd: Factory, tmp_path: Path) -> Server:
    image = make_qcow2_with_bitmap(
        tmp_path / "disk.qcow2", SIZE, bitmap=BITMAP, clean=CLEAN, dirty=DIRTY_WRITES
    )
    run_tool("qemu-io", "-f", "qcow2", *(a for cmd in MORE for a in ("-c", cmd)), image)
    return qemu_nbd(image, "qcow2", "disk", bitmaps=[BITMAP], readonly=True)


# --- The truth, from nbdinfo ------------------------------------------------------------


def expected_map(uri: str, start: int = 0, end: int = SIZE) -> list[dict[str, Any]]:
    """pynbd's JSON map of [start, end), built from nbdinfo's two maps at every cut."""
    bitmap = nbdinfo_json(uri, f"--map={DIRTY}")
    alloc = nbdinfo_json(uri, "--map")
    cuts = sorted({start, end} | {e["offset"] for e in bitmap + alloc if start < e["offset"] < end})

    def flags_at(mapped: list[dict[str, Any]], pos: int) -> int:
        (flags,) = [e["type"] for e in mapped if e["offset"] <= pos < e["offset"] + e["length"]]
        return int(flags)

    out: list[dict[str, Any]] = []
    for a, b in itertools.pairwise(cuts):
        dirty, allocation = flags_at(bitmap, a), flags_at(alloc, a)
        desc = {0: "clean", 1: "dirty zero" if allocation & 2 else "dirty data"}[dirty]
        last = out[-1] if out else None
        if last and (last["type"], last["description"]) == (dirty, desc):
            last["length"] += b - a
            last["allocation"] &= allocation
        else:
            out.append(
                {
                    "offset": a,
                    "length": b - a,
                    "type": dirty,
                    "description": desc,
                    "allocation": allocation,
                }
            )
    return out


def as_text(doc: Sequence[dict[str, Any]]) -> str:
    return "".join(
        f"{e['offset']:10d}  {e['length']:10d}  {e['type']:3d}  {e['description']}\n" for e in doc
    )


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


# --- Tests ------------------------------------------------------------------------------


def test_describe_dirty() -> None:
    assert describe_dirty(0, 0) == "clean"
    assert describe_dirty(0, 3) == "clean"
    assert describe_dirty(1, 0) == "dirty data"
    assert describe_dirty(1, 1) == "dirty data"  # a hole that does not read as zeroes
    assert describe_dirty(1, 2) == "dirty zero"
    assert describe_dirty(1, 3) == "dirty zero"
    assert describe_dirty(2, 0) is None


def test_map_merges_the_bitmap_with_allocation(
    capsys: pytest.CaptureFixture[str], server: Server
) -> None:
    truth = expected_map(server.uri)
    rc, out, err = run(capsys, "map", "--context", DIRTY, "--json", server.uri)
    assert (rc, err) == (0, "")
    ours = json.loads(out)
    assert ours == truth

    # What qemu-io did, seen in the map: every dirty granule and nothing else.
    runs: list[tuple[int, int, str | None]] = []  # adjacent dirty pieces joined
    for e in ours:
        if e["type"] != 1:
            continue
        if runs and runs[-1][0] + runs[-1][1] == e["offset"]:
            off, n, desc = runs[-1]
            runs[-1] = (off, n + e["length"], desc if desc == e["description"] else None)
        else:
            runs.append((e["offset"], e["length"], e["description"]))
    assert [(o, n) for o, n, _ in runs] == [(o, n) for o, n, _ in EXPECTED_DIRTY]
    for got, want in zip(runs, EXPECTED_DIRTY, strict=True):
        assert want[2] is None or got[2] == want[2], (got, want)
    # The 4 KiB written at 3M+4K is data, inside a granule that is dirty as a whole.
    (piece,) = [e for e in ours if e["offset"] <= 3 * MiB + 4 * KiB < e["offset"] + e["length"]]
    assert piece["description"] == "dirty data"
    # A discard leaves a hole (3: hole,zero) that is dirty; a clean run keeps only the
    # flags of all its bytes (0 where it holds data anywhere).
    discarded = {"offset": 512 * KiB, "length": 128 * KiB, "type": 1}
    assert discarded | {"description": "dirty zero", "allocation": 3} in ours
    assert ours[0] == {
        "offset": 0,
        "length": 64 * KiB,
        "type": 0,
        "description": "clean",
        "allocation": 0,
    }
    # The bitmap alone (nbdinfo) and the merged map agree on what is dirty.
    bitmap = nbdinfo_json(server.uri, f"--map={DIRTY}")
    assert sum(e["length"] for e in ours if e["type"] == 1) == sum(
        e["length"] for e in bitmap if e["type"] == 1
    )

    # Text: the same lines; info --map is the same map.
    rc, out, _ = run(capsys, "map", "--context", DIRTY, server.uri)
    assert (rc, out) == (0, as_text(truth))
    rc, out, _ = run(capsys, "info", f"--map={DIRTY}", server.uri)
    assert (rc, out) == (0, as_text(truth))


def test_totals(capsys: pytest.CaptureFixture[str], server: Server) -> None:
    truth = expected_map(server.uri)
    sums: dict[tuple[int, str], int] = {}
    for e in truth:
        key = (e["type"], e["description"])
        sums[key] = sums.get(key, 0) + e["length"]
    assert set(sums) == {(0, "clean"), (1, "dirty data"), (1, "dirty zero")}
    rc, out, _ = run(capsys, "map", "--context", DIRTY, "--totals", "--json", server.uri)
    assert rc == 0
    assert json.loads(out) == [
        {"size": size, "percent": 100.0 * size / SIZE, "type": t, "description": d}
        for (t, d), size in sorted(sums.items())
    ]
    rc, out, _ = run(capsys, "map", "--context", DIRTY, "--totals", server.uri)
    assert (rc, out) == (
        0,
        "".join(
            f"{size:10d} {100.0 * size / SIZE:5.1f}% {t:3d} {d}\n"
            for (t, d), size in sorted(sums.items())
        ),
    )


def test_range_and_windows(
    capsys: pytest.CaptureFixture[str], server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A range cut inside pieces, mapped in windows that end inside pieces too: the
    pieces are clipped to the range and merged across windows."""
    start, end = 100 * KiB, 6 * MiB + 32 * KiB
    truth = expected_map(server.uri, start, end)
    args = ["map", "--context", DIRTY, "--json", "--offset", str(start)]
    args += ["--length", str(end - start), server.uri]
    rc, out, _ = run(capsys, *args)
    assert (rc, json.loads(out)) == (0, truth)
    monkeypatch.setattr(extents, "WINDOW", 100 * KiB + 512)
    rc, out, _ = run(capsys, *args)
    assert (rc, json.loads(out)) == (0, truth)


def test_without_base_allocation_the_bitmap_alone(
    capsys: pytest.CaptureFixture[str], server: Server
) -> None:
    """A client that has no base:allocation (the server did not agree to it) shows the
    bitmap as nbdinfo does: clean and dirty, no allocation."""
    with Client(server.uri, meta_contexts=(DIRTY,)) as client:
        assert client.meta_contexts == (DIRTY,)
        alone = list(merged_extents(client, DIRTY, 0, SIZE))
    bitmap = nbdinfo_json(server.uri, f"--map={DIRTY}")
    assert alone == [
        Extent(e["offset"], e["length"], e["type"], e["description"], None) for e in bitmap
    ]
    extents.print_extents(iter(alone), as_json=False)
    assert capsys.readouterr().out == run_tool("nbdinfo", f"--map={DIRTY}", server.uri).stdout
    extents.print_extents(iter(alone), as_json=True)
    assert json.loads(capsys.readouterr().out) == bitmap


def test_unknown_bitmap_and_subprocess(capsys: pytest.CaptureFixture[str], server: Server) -> None:
    rc, out, err = run(capsys, "map", "--context", "qemu:dirty-bitmap:nope", server.uri)
    assert (rc, out) == (1, "")
    assert err.startswith("pynbd: ") and "qemu:dirty-bitmap:nope" in err
    assert len(err.splitlines()) == 1
    proc = subprocess.run(
        [sys.executable, "-m", "pynbd", "map", "--context", DIRTY, "--json", server.uri],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=60,
        check=False,
    )
    assert (proc.returncode, proc.stderr) == (0, "")
    assert json.loads(proc.stdout) == expected_map(server.uri)
