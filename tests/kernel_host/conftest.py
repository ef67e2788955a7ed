"""Fixtures of the host-side kernel tests: a fake /sys/block tree."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pynbd.kernel import device

# make(index, size=SECTORS, pid=..., backend=..., ro=..., block_size=...) writes a
# fake /sys/block/nbdINDEX; None leaves an attribute out.
MakeDevice = Callable[..., Path]


@pytest.fixture
def sys_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty fake /sys/block that pynbd.kernel.device reads instead of the real one."""
    root = tmp_path / "sys" / "block"
    root.mkdir(parents=True)
    monkeypatch.setattr(device, "SYS_BLOCK", root)
    return root


@pytest.fixture
def make_device(sys_block: Path) -> MakeDevice:
    def make(
        index: int,
        *,
        size: str = "0",
        pid: str | None = None,
        backend: str | None = None,
        ro: str = "0",
        block_size: str | None = "512",
    ) -> Path:
        base = sys_block / f"nbd{index}"
        (base / "queue").mkdir(parents=True, exist_ok=True)
        (base / "size").write_text(size + "\n")
        (base / "ro").write_text(ro + "\n")
        for name, value in (("pid", pid), ("backend", backend)):
            if value is not None:
                (base / name).write_text(value + "\n")
        if block_size is not None:
            (base / "queue" / "logical_block_size").write_text(block_size + "\n")
        return base

    return make
