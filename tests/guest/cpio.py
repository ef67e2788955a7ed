"""A writer of "newc" cpio archives, the format the kernel unpacks as an initramfs."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import IO

#: One archive member: ``(name, mode, data, rdev)``; see :func:`write_cpio`.
Entry = tuple[str, int, bytes, int]


def write_cpio(entries: Iterable[Entry], out: IO[bytes]) -> None:
    """Write a "newc" cpio archive.

    Args:
        entries: ``(name, mode, data, rdev)``: the path without a leading ``/``, the
            full st_mode (file type included), the contents (regular files only) and,
            for device nodes, ``os.makedev(major, minor)``. Parents come first.
        out: where the archive goes.
    """

    def record(ino: int, name: str, mode: int, data: bytes, rdev: int) -> None:
        encoded = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, os.major(rdev), os.minor(rdev))
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        header += b"%08X%08X" % (len(encoded), 0)
        out.write(header + encoded + b"\0" * (-(len(header) + len(encoded)) % 4))
        out.write(data + b"\0" * (-len(data) % 4))

    ino = 0
    for ino, (name, mode, data, rdev) in enumerate(entries, start=1):
        record(ino, name, mode, data, rdev)
    record(ino + 1, "TRAILER!!!", 0, b"", 0)
