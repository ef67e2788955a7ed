"""The guest's initramfs: static busybox, the stage 1 and stage 2 scripts (``init``
and ``stage2`` next to this file), and the modules that mount the host's root."""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import os
import stat
import subprocess
import time
from pathlib import Path

from tests.guest.cpio import Entry, write_cpio
from tests.guest.host import VMError, run_checked, which

#: Modules the initramfs loads (their dependencies are added). virtio_pci carries the
#: 9p shares and the console; 9p mounts the host's root; overlay makes it writable.
GUEST_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay", "virtio_console")
#: Where the guest's two busybox sh scripts are.
SCRIPTS = Path(__file__).resolve().parent

# Bump when the initramfs layout changes, so that cached ones are rebuilt.
_FORMAT = "1"


def guest_script(name: str) -> bytes:
    """Return the guest script *name* (``init`` or ``stage2``)."""
    return (SCRIPTS / name).read_bytes()


def parse_show_depends(text: str) -> list[Path]:
    """Return the module files of ``modprobe --show-depends`` output, in load order,
    each once."""
    files: list[Path] = []
    for line in text.splitlines():
        words = line.split()
        # "builtin NAME" lines need nothing; options after the path are not ours to keep.
        if len(words) >= 2 and words[0] == "insmod" and Path(words[1]) not in files:
            files.append(Path(words[1]))
    return files


def module_bytes(path: Path) -> bytes:
    """Return kernel module *path*, decompressed: busybox insmod may lack the
    decompressors.

    Raises:
        VMError: a compression we cannot undo.
    """
    data = path.read_bytes()
    if path.name.endswith(".ko"):
        return data
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        zstd = which("zstd")
        if zstd is None:
            raise VMError(f"{path} is zstd-compressed: install the Debian package zstd")
        done = subprocess.run([zstd, "-dc", os.fspath(path)], capture_output=True, timeout=60)
        if done.returncode != 0:
            raise VMError(f"zstd -dc {path} failed: {done.stderr.decode(errors='replace')}")
        return done.stdout
    raise VMError(f"unknown kernel module format: {path}")


def module_name(path: Path) -> str:
    """``.../9p.ko.xz`` -> ``9p``."""
    return path.name.split(".ko", 1)[0]


def build_initrd(kver: str, root: Path, *, busybox: str, modprobe: str) -> Path:
    """Build (or find in the cache) the guest's initramfs for kernel *kver*.

    It holds the static *busybox*, ``init`` as ``/init``, ``stage2``, and the modules
    of :data:`GUEST_MODULES` with their dependencies, decompressed, in ``/modules`` with
    their load order in ``/modules/order``. The image is named by a hash of all that
    and stored next to *root*; images there older than a day are removed.

    Raises:
        VMError: the modules could not be listed or read.
    """
    done = run_checked(
        [modprobe, "-d", os.fspath(root), "-S", kver, "--show-depends", "-a", *GUEST_MODULES],
        timeout=60,
        what="listing the guest's modules",
    )
    modules = parse_show_depends(done.stdout)
    contents: list[Entry] = [
        (d, stat.S_IFDIR | 0o755, b"", 0) for d in ("bin", "dev", "modules", "proc", "sys")
    ]
    contents.append(("dev/console", stat.S_IFCHR | 0o600, b"", os.makedev(5, 1)))
    contents.append(("bin/busybox", stat.S_IFREG | 0o755, Path(busybox).read_bytes(), 0))
    contents.append(("init", stat.S_IFREG | 0o755, guest_script("init"), 0))
    contents.append(("stage2", stat.S_IFREG | 0o644, guest_script("stage2"), 0))
    for path in modules:
        contents.append(
            (f"modules/{module_name(path)}.ko", stat.S_IFREG | 0o644, module_bytes(path), 0)
        )
    order = "".join(module_name(p) + "\n" for p in modules).encode()
    contents.append(("modules/order", stat.S_IFREG | 0o644, order, 0))

    digest = hashlib.sha256(f"{_FORMAT}\0{kver}\0".encode())
    for name, mode, data, rdev in contents:
        digest.update(f"{name}\0{mode}\0{rdev}\0{len(data)}\0".encode() + data)
    target = root.parent / f"initrd-{digest.hexdigest()[:16]}.cpio.gz"
    if target.is_file():
        return target
    buf = io.BytesIO()
    write_cpio(contents, buf)
    tmp = target.with_suffix(".tmp")
    # mtime=0: the same inputs give the same bytes.
    tmp.write_bytes(gzip.compress(buf.getvalue(), compresslevel=6, mtime=0))
    tmp.rename(target)
    # Older images go, but not at once: another session may be about to boot one.
    for old in root.parent.glob("initrd-*.cpio.gz"):
        if old != target and time.time() - old.stat().st_mtime > 86400:
            old.unlink(missing_ok=True)
    return target
