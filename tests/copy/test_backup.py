"""Incremental backup from a qemu dirty bitmap: a full copy, then three incrementals.

The source is a qcow2 image with a persistent, enabled bitmap (``qemu-img bitmap
--add``), changed between backups by ``qemu-io`` (writes, zero writes, discards, on data
and on holes, whole granules and a few KiB inside one) while no server runs, and served
read-only for each backup by ``qemu-nbd -r -B NAME``. The backup is a raw file. After
each backup the bitmap starts afresh, in one of the two ways that keep a chain exact
(nothing writes to the image between the backup and that step: qemu-nbd holds its
lock while it serves, and qemu-io runs only after it stopped):

- ``clear``: ``qemu-img bitmap --clear`` the one bitmap;
- ``rotate``: ``qemu-img bitmap --add`` the next bitmap before serving, ``--remove``
  the one just used after the backup.

Each chain runs its copies through one interface (``pynbd copy -v`` or
``pynbd.copy()``); its second incremental writes to an NBD export of the backup file
(nbdkit's file plugin, or ``qemu-nbd -f raw``). After every copy ``qemu-img compare``
must find the backup identical to the image (and, before each incremental, different).
What each incremental did is checked against the bitmap and base:allocation, read by
``pynbd.cli.extents.merged_extents`` and, for the dirty total, by nbdinfo: it reads
exactly the dirty bytes that are not zero, zeroes or writes every dirty byte, skips
every clean one. Run with ``-s`` to see the bytes of each copy.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

import pynbd
from pynbd.cli import main
from pynbd.cli.extents import merged_extents
from pynbd.client import Client
from tests.peers import Server, make_qcow2_with_bitmap, nbdinfo_json, run_tool

Factory = Callable[..., Server]

KiB, MiB = 1 << 10, 1 << 20
SIZE = 64 * MiB
GRANULARITY = 64 * KiB
#: Written before the first bitmap exists: what the full backup copies.
BASE = [(0, 8 * MiB), (12 * MiB + 4 * KiB, 100 * KiB), (32 * MiB, 4 * MiB)]
#: What qemu-io does before each incremental.
ROUNDS = [
    [
        "write -P 0x33 100K 8K",  # inside data, 8 KiB of a 64 KiB granule
        "write -z 33M 1M",  # zeroes over data: qcow2 zero clusters
        "discard 1M 2M",  # data discarded: holes
        "write -P 0x34 20M 3M",  # new data in a hole, larger than a request
    ],
    [
        "write -P 0x44 40M 1M",
        "discard 32M 64K",
        "write -z 50M 64K",  # zeroes over a hole: dirty all the same
        "write -P 0x45 5124K 4K",  # 4 KiB at 5M+4K
    ],
    [
        "write -P 0x55 3M 4K",
        "write -P 0x66 63M 1M",  # up to the end of the image
        "discard 36M 512K",  # beyond the data written at 32M: a discard of a hole
        "write -z 20M 1M",  # zeroes over round 1's data
        "discard 12M 64K",  # a granule that is only partly data
    ],
]


@dataclass
class Counts:
    read: int
    written: int
    zeroed: int
    skipped: int


@dataclass
class Dirty:
    """What the source's maps say before an incremental."""

    total: int  # dirty in the bitmap (nbdinfo)
    data: int  # dirty and not reading as zeroes (pynbd map's "dirty data")
    zero: int  # dirty and zero ("dirty zero")


def copy_cli(src: str, dst: str, bitmap: str | None, capsys: pytest.CaptureFixture[str]) -> Counts:
    args = ["copy", "-v", "--flush"] + (["--dirty-bitmap", bitmap] if bitmap else [])
    rc = main([*args, src, dst])
    out, err = capsys.readouterr()
    assert (rc, out) == (0, ""), err
    found = re.fullmatch(
        r"pynbd copy: (\d+) bytes: read (\d+), written (\d+), zeroed (\d+), skipped (\d+), "
        r"in [0-9.]+ s \([0-9.]+ MB/s\), \d+ connection\(s\)\n",
        err,
    )
    assert found, err
    size, read, written, zeroed, skipped = (int(g) for g in found.groups())
    assert size == SIZE
    return Counts(read, written, zeroed, skipped)


def copy_api(src: str, dst: str, bitmap: str | None, capsys: pytest.CaptureFixture[str]) -> Counts:
    result = pynbd.copy(src, dst, dirty_bitmap=bitmap, flush=True)
    assert result.size == SIZE
    return Counts(
        result.read_bytes, result.written_bytes, result.zeroed_bytes, result.skipped_bytes
    )


def compare(image: Path, backup: Path) -> int:
    """``qemu-img compare``'s exit status: 0 identical, 1 different."""
    done = run_tool(
        "qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", image, backup, check=False
    )
    assert done.returncode in (0, 1), done.stderr
    return done.returncode


def dirty_of(uri: str, bitmap: str) -> Dirty:
    context = f"qemu:dirty-bitmap:{bitmap}"
    total = sum(e["length"] for e in nbdinfo_json(uri, f"--map={context}") if e["type"] == 1)
    sums = {"dirty data": 0, "dirty zero": 0, "clean": 0}
    with Client(uri, meta_contexts=(context, "base:allocation")) as client:
        for ext in merged_extents(client, context, 0, client.size):
            assert ext.description is not None
            sums[ext.description] += ext.length
    assert sums["dirty data"] + sums["dirty zero"] == total
    return Dirty(total, sums["dirty data"], sums["dirty zero"])


def qemu_io(image: Path, commands: list[str]) -> None:
    run_tool("qemu-io", "-f", "qcow2", *(a for c in commands for a in ("-c", c)), image)


@pytest.fixture
def report() -> Iterator[list[str]]:
    lines: list[str] = []
    yield lines
    print("\n" + "\n".join(lines))


@pytest.mark.parametrize(
    ("interface", "restart", "nbd_destination"),
    [("cli", "clear", "nbdkit"), ("api", "rotate", "qemu-nbd")],
)
def test_full_and_three_incrementals(
    interface: str,
    restart: str,
    nbd_destination: str,
    qemu_nbd: Factory,
    nbdkit: Factory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    report: list[str],
) -> None:
    copy = {"cli": copy_cli, "api": copy_api}[interface]
    image = make_qcow2_with_bitmap(
        tmp_path / "src.qcow2", SIZE, bitmap="b0", granularity=GRANULARITY, clean=BASE
    )
    backup = tmp_path / "backup.raw"

    # The full backup, to a new file; the bitmap b0 is empty: it counts from here.
    with qemu_nbd(image, "qcow2", bitmaps=["b0"], readonly=True) as src:
        assert dirty_of(src.uri, "b0").total == 0
        data = sum(e["length"] for e in nbdinfo_json(src.uri, "--map") if not e["type"] & 2)
        full = copy(src.uri, str(backup), None, capsys)
    assert compare(image, backup) == 0
    assert backup.stat().st_size == SIZE
    # base:allocation decides: the data clusters are read, nothing else.
    assert 0 < full.read == data and full.written <= full.read
    report.append(f"{interface}/{restart} full: {full}")

    bitmap = "b0"
    for n, commands in enumerate(ROUNDS, 1):
        qemu_io(image, commands)
        assert compare(image, backup) == 1
        following = f"b{n}"
        if restart == "rotate":
            run_tool("qemu-img", "bitmap", "--add", "-g", str(GRANULARITY), image, following)
        with ExitStack() as stack:
            src = stack.enter_context(qemu_nbd(image, "qcow2", bitmaps=[bitmap], readonly=True))
            dirty = dirty_of(src.uri, bitmap)
            dst = str(backup)
            if n == 2:
                if nbd_destination == "nbdkit":
                    dst = stack.enter_context(nbdkit("file", str(backup))).uri
                else:
                    dst = stack.enter_context(qemu_nbd(backup, "raw", "backup")).uri
            got = copy(src.uri, dst, bitmap, capsys)
        assert compare(image, backup) == 0, f"incremental {n} ({dst})"
        assert backup.stat().st_size == SIZE
        where = "file" if dst == str(backup) else nbd_destination
        report.append(f"{interface}/{restart} incremental {n} ({where}): {got}; {dirty}")
        # Only the dirty bytes are touched; of those only the ones that are not zero
        # are read (whole granules: a 4 KiB write dirties 64 KiB).
        assert dirty.total % GRANULARITY == 0 and dirty.data > 0
        assert 0 < got.read == dirty.data <= dirty.total
        assert got.written + got.zeroed == dirty.total
        assert got.skipped == SIZE - dirty.total
        if restart == "clear":
            run_tool("qemu-img", "bitmap", "--clear", image, bitmap)
        else:
            run_tool("qemu-img", "bitmap", "--remove", image, bitmap)
            bitmap = following

    # The bitmap left counts from the last backup: nothing is dirty.
    with qemu_nbd(image, "qcow2", bitmaps=[bitmap], readonly=True) as src:
        assert dirty_of(src.uri, bitmap).total == 0
        again = copy(src.uri, str(backup), bitmap, capsys)
    assert again == Counts(0, 0, 0, SIZE)
    assert compare(image, backup) == 0
