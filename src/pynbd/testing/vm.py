"""Run a command in a qemu guest that boots Debian's own kernel, for kernel tests.

The machines pynbd is developed and tested on run a kernel without the nbd driver (and
without module support), so ``/dev/nbdX`` cannot exist on the host. This module boots
the kernel of Debian's ``linux-image-amd64`` in qemu and runs a command in it:

- the kernel package is fetched with ``apt-get download`` and unpacked with ``dpkg -x``
  into a cache (``$PYNBD_VM_CACHE``, else ``$XDG_CACHE_HOME/pynbd/kernel``, else
  ``~/.cache/pynbd/kernel``), one folder per kernel version; nothing is installed;
- a small initramfs (static busybox, the two scripts in ``guest/``, and the virtio, 9p
  and overlay modules with their dependencies) is built next to it;
- qemu runs with TCG (``-machine q35,accel=tcg -cpu max``). Never KVM: /dev/kvm on
  these machines is PVM, under which a stock kernel hangs rather than failing;
- the guest mounts the host's ``/`` read-only over 9p under a tmpfs overlay, so the
  host's Python, the checkout and every installed program work at the same paths, and
  the guest may write anywhere without touching the host;
- the command runs as root in the given directory, with ``NBDVM=1`` set, its output on
  the virtio console (our stdout), under a timeout; then the guest powers off. A second,
  outer timeout on the host kills qemu if the guest does not boot or power off in time.

The guest has its own network stack: servers a kernel test needs run inside the guest on
127.0.0.1. Guest CPU work is about 25 times slower than the host's: keep it small.
Booting takes 5-10 s, because qemu boots the ELF kernel extracted once from the
package's bzImage by its PVH entry (the bzImage's own decompressor takes 6 s more under
TCG); each Python start in the guest takes a few seconds, and a pytest start 15-20 s.

Debian packages needed on the host: ``qemu-system-x86 busybox-static kmod`` (and
``apt`` and ``dpkg`` to fetch the kernel the first time); the kernel tests also use
``nbdkit nbd-client e2fsprogs util-linux fio`` inside the guest. ``.ci/run`` installs
them all; a missing one is reported by name.

By hand, from the checkout (``.venv/bin/python`` is the interpreter ``.ci/run`` builds;
any Python 3.11+ with pynbd importable will do)::

    sudo apt-get update                  # once, so that apt knows linux-image-amd64
    .venv/bin/python -m pynbd.testing.vm --prepare   # fetch the kernel, build the initramfs
    .venv/bin/python -m pynbd.testing.vm -v -- sh -c 'modprobe nbd && ls -l /dev/nbd0'
    .venv/bin/python -m pynbd.testing.vm -v --timeout 300 -- \
        .venv/bin/python -m pytest -p no:cacheprovider tests/kernel   # tests, by hand
    scripts/test tests/kernel            # the usual way: one guest, results reported here

``python -m pynbd.testing.vm [OPTIONS] -- CMD...`` exits with CMD's exit status, or 125
when the guest could not be prepared, booted, or did not report a status (the reason,
with the guest's console log, goes to stderr); ``--help`` lists the options. The
command's stdin is /dev/null. ``PATH`` and ``PYTHONPATH`` are passed to the guest, and
``--env NAME[=VALUE]`` passes more. When ``--timeout`` expires the command gets SIGINT
(then SIGKILL) and a message says so. With ``--keep`` the xfer folder (the guest's
``/xfer``: the command script, its exit status, anything the command wrote there) is
kept and named on stderr. Give the interpreter by its path: a pyenv shim works in the
guest, but slowly.

From Python: ``guest = prepare()`` once, then ``run(guest, argv, ...)`` for each boot.
Under pytest, ``tests/kernel/conftest.py`` boots one guest per session and runs every
selected kernel test in it (:func:`run_pytest`, which reads back the guest's junit xml).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import fcntl
import gzip
import hashlib
import importlib.util
import io
import lzma
import os
import re
import shlex
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import IO, Literal

__all__ = [
    "BOOT_TIMEOUT",
    "GUEST_MODULES",
    "GUEST_TEST_PROGRAMS",
    "HOST_PROGRAMS",
    "RUN_TIMEOUT",
    "CaseResult",
    "Guest",
    "GuestPytest",
    "Outcome",
    "RunResult",
    "VMError",
    "build_initrd",
    "cache_root",
    "fetch_kernel",
    "in_guest",
    "junit_key",
    "main",
    "parse_junit",
    "prepare",
    "require_programs",
    "run",
    "run_pytest",
    "write_cpio",
]

#: Seconds from starting qemu until the guest starts the command.
BOOT_TIMEOUT = 90.0
#: Default seconds the command may run in the guest before it gets SIGINT.
RUN_TIMEOUT = 600.0
#: Seconds between the guest's SIGINT and SIGKILL to the command.
KILL_AFTER = 20.0
#: Seconds the host grants after the guest's own deadline before it kills qemu.
POWEROFF_GRACE = 30.0

#: Modules the initramfs loads (their dependencies are added). virtio_pci carries the
#: 9p shares and the console; 9p mounts the host's root; overlay makes it writable.
GUEST_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay", "virtio_console")

#: Programs the harness runs on the host, and the Debian package of each.
HOST_PROGRAMS: Mapping[str, str] = {
    "qemu-system-x86_64": "qemu-system-x86",
    "busybox": "busybox-static",
    "modprobe": "kmod",
    "depmod": "kmod",
}
#: Programs the kernel tests run inside the guest, and the Debian package of each.
GUEST_TEST_PROGRAMS: Mapping[str, str] = {
    "nbdkit": "nbdkit",
    "nbd-client": "nbd-client",
    "nbdcopy": "libnbd-bin",
    "mkfs.ext4": "e2fsprogs",
    "blockdev": "util-linux",
    "fio": "fio",
    "sfdisk": "fdisk",
    "qemu-nbd": "qemu-utils",
    "nbd-server": "nbd-server",
}
# Only needed to fetch a kernel that is not cached yet.
_FETCH_PROGRAMS: Mapping[str, str] = {"apt-cache": "apt", "apt-get": "apt", "dpkg": "dpkg"}

# Bump when the initramfs layout changes, so that cached ones are rebuilt.
_INITRD_FORMAT = "1"
# Directories searched besides PATH: sbin is often missing from a user's PATH.
_SYSTEM_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
_POLL = 0.05


class VMError(RuntimeError):
    """The guest could not be prepared, booted, or did not report an exit status.

    The message says why: a missing program (with its Debian package), a failed
    download, a boot or run timeout (with the tail of the guest's console log).
    """


def in_guest() -> bool:
    """Return True inside a guest started by :func:`run` (``NBDVM=1``)."""
    return os.environ.get("NBDVM") == "1"


# --------------------------------------------------------------------------- programs


def _search_path() -> str:
    return os.pathsep.join([os.environ.get("PATH", ""), *_SYSTEM_DIRS])


def _which(name: str) -> str | None:
    return shutil.which(name, path=_search_path())


def require_programs(programs: Mapping[str, str]) -> dict[str, str]:
    """Find each program; return a map from name to full path.

    Args:
        programs: program name -> the Debian package that brings it.

    Raises:
        VMError: some are missing; the message names every missing program and its
            package, and says how to install them.
    """
    found: dict[str, str] = {}
    missing: dict[str, str] = {}
    for name, package in programs.items():
        path = _which(name)
        if path is None:
            missing[name] = package
        else:
            found[name] = path
    if missing:
        packages = " ".join(sorted(set(missing.values())))
        raise VMError(
            "the kernel test guest needs "
            + ", ".join(f"{name} (Debian package {pkg})" for name, pkg in missing.items())
            + f": apt-get install {packages}   (.ci/run installs them)"
        )
    return found


def _is_static_elf(path: str | os.PathLike[str]) -> bool:
    """Return True for a 64-bit ELF executable without a PT_INTERP (loader) segment."""
    with open(path, "rb") as f:
        ident = f.read(64)
        if len(ident) < 64 or ident[:4] != b"\x7fELF" or ident[4] != 2:
            return False
        order = "<" if ident[5] == 1 else ">"
        (phoff,) = struct.unpack_from(order + "Q", ident, 32)
        phentsize, phnum = struct.unpack_from(order + "HH", ident, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    pt_interp = 3
    for i in range(phnum):
        (p_type,) = struct.unpack_from(order + "I", table, i * phentsize)
        if p_type == pt_interp:
            return False
    return True


def _static_busybox(path: str) -> str:
    # The initramfs has no C library: a dynamically linked busybox (Debian's "busybox"
    # package, which conflicts with busybox-static) cannot run there.
    if not _is_static_elf(path):
        raise VMError(
            f"{path} is not statically linked: the guest needs the Debian package "
            "busybox-static (apt-get install busybox-static)"
        )
    return path


def _run(
    argv: Sequence[str], *, timeout: float, what: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(
            list(argv),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise VMError(f"{what}: {shlex.join(argv)} took more than {timeout:.0f} s") from exc
    except OSError as exc:
        raise VMError(f"{what}: cannot run {argv[0]}: {exc}") from exc
    if done.returncode != 0:
        raise VMError(
            f"{what}: {shlex.join(argv)} exited with status {done.returncode}\n"
            f"{(done.stderr or done.stdout).strip()}"
        )
    return done


# --------------------------------------------------------------------------- the kernel


def cache_root() -> Path:
    """Return the folder that holds the unpacked kernels and their initramfs images.

    ``$PYNBD_VM_CACHE`` if set, else ``$XDG_CACHE_HOME/pynbd/kernel``, else
    ``~/.cache/pynbd/kernel``.
    """
    explicit = os.environ.get("PYNBD_VM_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "pynbd" / "kernel"


@dataclass(frozen=True)
class Guest:
    """A kernel unpacked in the cache, and an initramfs built for it.

    Attributes:
        kver: the kernel release (``uname -r`` in the guest), e.g. ``6.1.0-56-amd64``.
        root: the ``dpkg -x`` tree of the kernel package.
        kernel: the kernel image qemu boots: the ELF vmlinux extracted from the
            package's bzImage when it can be booted by PVH (much faster under TCG),
            else the bzImage.
        moddir: the kernel's modules (``lib/modules/KVER`` in *root*), bound onto the
            guest's ``/lib/modules/KVER``.
        initrd: the initramfs.
    """

    kver: str
    root: Path
    kernel: Path
    moddir: Path
    initrd: Path


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    # Two test sessions may prepare at once; the second waits and then finds the cache.
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _kernel_package(apt_cache_depends: str) -> str | None:
    """Return the versioned kernel package named in ``apt-cache depends`` output."""
    for line in apt_cache_depends.splitlines():
        found = re.match(r"\s*\|?Depends:\s*(linux-image-(\S+))\s*$", line)
        if found and not found.group(2).endswith("-unsigned") and found.group(2)[0].isdigit():
            return found.group(1)
    return None


def _complete_kernels(cache: Path) -> list[str]:
    """Return the kernel versions fully unpacked in *cache*, newest first."""

    def version(kver: str) -> list[int]:
        return [int(n) for n in re.findall(r"\d+", kver)]

    kvers = [p.parent.parent.name for p in cache.glob("*/root/.complete")]
    return sorted(kvers, key=version, reverse=True)


def _moddir(root: Path, kver: str) -> Path:
    for candidate in (root / "lib" / "modules" / kver, root / "usr" / "lib" / "modules" / kver):
        if candidate.is_dir():
            return candidate.resolve()
    raise VMError(f"no lib/modules/{kver} in {root}")


def fetch_kernel(
    cache: Path | None = None, *, log: Callable[[str], None] | None = None
) -> tuple[str, Path]:
    """Make sure the kernel of Debian's ``linux-image-amd64`` is unpacked in the cache.

    Asks ``apt-cache depends linux-image-amd64`` which kernel package that is; when it
    is not in the cache yet, fetches it (``apt-get download``), unpacks it (``dpkg -x``)
    and runs ``depmod -b``. When apt knows no kernel (no ``apt-get update`` yet) or the
    download fails, the newest kernel already in the cache is used instead.

    Args:
        cache: the cache folder (default :func:`cache_root`).
        log: called with a line of progress before slow steps.

    Returns:
        ``(kver, root)``: the kernel release and its ``dpkg -x`` tree.

    Raises:
        VMError: no kernel in the cache and none could be fetched (the message says
            why: a missing program, apt knowing no linux-image-amd64, a failed step).
    """
    cache = cache_root() if cache is None else cache
    with _locked(cache):
        cached = _complete_kernels(cache)
        package: str | None = None
        problem = ""
        apt_cache = _which("apt-cache")
        if apt_cache is None:
            problem = "apt-cache not found (Debian package apt)"
        else:
            try:
                done = subprocess.run(
                    [apt_cache, "depends", "linux-image-amd64"],
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    text=True,
                    timeout=120,
                    check=False,
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                problem = f"apt-cache depends linux-image-amd64 failed: {exc}"
            else:
                package = _kernel_package(done.stdout)
                if package is None:
                    problem = (
                        "apt knows no linux-image-amd64 package: run apt-get update (as "
                        f"root) first\n{done.stderr.strip()}"
                    )
        if package is not None:
            kver = package.removeprefix("linux-image-")
            if kver in cached:
                return kver, cache / kver / "root"
            try:
                return kver, _unpack_kernel(cache, package, kver, log)
            except VMError as exc:
                problem = str(exc)
        if cached:
            if log is not None:
                log(f"using the cached kernel {cached[0]}: {problem.splitlines()[0]}")
            return cached[0], cache / cached[0] / "root"
        raise VMError(f"no kernel for the test guest: {problem}")


def _unpack_kernel(cache: Path, package: str, kver: str, log: Callable[[str], None] | None) -> Path:
    tools = require_programs({**_FETCH_PROGRAMS, "depmod": "kmod"})
    folder = cache / kver
    folder.mkdir(parents=True, exist_ok=True)
    root = folder / "root"
    if root.exists():  # a half-unpacked tree from an interrupted run
        shutil.rmtree(root)
    if log is not None:
        log(f"fetching {package} into {folder} (once per kernel version; about 400 MB)")
    with tempfile.TemporaryDirectory(dir=folder, prefix="fetch-") as tmp:
        work = Path(tmp)
        # apt downloads as user _apt where it can: let it write here.
        work.chmod(0o755)
        _run([tools["apt-get"], "download", package], cwd=work, timeout=900, what="fetching")
        debs = sorted(work.glob("*.deb"))
        if len(debs) != 1:
            raise VMError(f"apt-get download {package} left {len(debs)} .deb files")
        tree = work / "root"
        _run(
            [tools["dpkg"], "-x", os.fspath(debs[0]), os.fspath(tree)],
            timeout=600,
            what="unpacking",
        )
        vmlinuz = tree / "boot" / f"vmlinuz-{kver}"
        if not vmlinuz.is_file():
            raise VMError(f"{package} has no boot/vmlinuz-{kver}")
        # kmod looks in lib/modules or usr/lib/modules depending on how it was built;
        # make both paths lead to the modules.
        lib, usr_lib = tree / "lib" / "modules", tree / "usr" / "lib" / "modules"
        if lib.is_dir() and not usr_lib.exists():
            usr_lib.parent.mkdir(parents=True, exist_ok=True)
            usr_lib.symlink_to(os.path.relpath(lib, usr_lib.parent))
        elif usr_lib.is_dir() and not lib.exists():
            lib.parent.mkdir(parents=True, exist_ok=True)
            lib.symlink_to(os.path.relpath(usr_lib, lib.parent))
        _run([tools["depmod"], "-b", os.fspath(tree), kver], timeout=300, what="depmod")
        (tree / ".complete").write_text(package + "\n")
        tree.rename(root)
    return root


# --------------------------------------------------------------------------- initramfs


def write_cpio(entries: Iterable[tuple[str, int, bytes, int]], out: IO[bytes]) -> None:
    """Write a "newc" cpio archive, the format the kernel unpacks as an initramfs.

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


def _guest_script(name: str) -> bytes:
    return (resources.files("pynbd.testing") / "guest" / name).read_bytes()


def _module_files(root: Path, kver: str, modprobe: str) -> list[Path]:
    """Return the .ko files of GUEST_MODULES and their dependencies, in load order."""
    done = _run(
        [modprobe, "-d", os.fspath(root), "-S", kver, "--show-depends", "-a", *GUEST_MODULES],
        timeout=60,
        what="listing the guest's modules",
    )
    return _parse_show_depends(done.stdout)


def _parse_show_depends(text: str) -> list[Path]:
    files: list[Path] = []
    for line in text.splitlines():
        words = line.split()
        # "builtin NAME" lines need nothing; options after the path are not ours to keep.
        if len(words) >= 2 and words[0] == "insmod" and Path(words[1]) not in files:
            files.append(Path(words[1]))
    return files


def _module_bytes(path: Path) -> bytes:
    # busybox insmod may lack the decompressors: give it plain .ko files.
    data = path.read_bytes()
    if path.name.endswith(".ko"):
        return data
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        zstd = _which("zstd")
        if zstd is None:
            raise VMError(f"{path} is zstd-compressed: install the Debian package zstd")
        done = subprocess.run([zstd, "-dc", os.fspath(path)], capture_output=True, timeout=60)
        if done.returncode != 0:
            raise VMError(f"zstd -dc {path} failed: {done.stderr.decode(errors='replace')}")
        return done.stdout
    raise VMError(f"unknown kernel module format: {path}")


def _module_name(path: Path) -> str:
    return path.name.split(".ko", 1)[0]


def build_initrd(kver: str, root: Path, *, busybox: str, modprobe: str) -> Path:
    """Build (or find in the cache) the guest's initramfs for kernel *kver*.

    It holds the static *busybox*, ``guest/init`` as ``/init``, ``guest/stage2``, and
    the modules of :data:`GUEST_MODULES` with their dependencies, decompressed, in
    ``/modules`` with their load order in ``/modules/order``. The image is named by a
    hash of all that and stored next to *root*; images there older than a day are
    removed.

    Raises:
        VMError: the modules could not be listed or read.
    """
    modules = _module_files(root, kver, modprobe)
    contents: list[tuple[str, int, bytes, int]] = [
        (d, stat.S_IFDIR | 0o755, b"", 0) for d in ("bin", "dev", "modules", "proc", "sys")
    ]
    contents.append(("dev/console", stat.S_IFCHR | 0o600, b"", os.makedev(5, 1)))
    contents.append(("bin/busybox", stat.S_IFREG | 0o755, Path(busybox).read_bytes(), 0))
    contents.append(("init", stat.S_IFREG | 0o755, _guest_script("init"), 0))
    contents.append(("stage2", stat.S_IFREG | 0o644, _guest_script("stage2"), 0))
    for path in modules:
        contents.append(
            (f"modules/{_module_name(path)}.ko", stat.S_IFREG | 0o644, _module_bytes(path), 0)
        )
    order = "".join(_module_name(p) + "\n" for p in modules).encode()
    contents.append(("modules/order", stat.S_IFREG | 0o644, order, 0))

    digest = hashlib.sha256(f"{_INITRD_FORMAT}\0{kver}\0".encode())
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


def _elf_has_pvh_note(data: bytes) -> bool:
    """Return True if 64-bit ELF *data* carries Xen's PHYS32_ENTRY note (PVH boot)."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return False
    (phoff,) = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    pt_note, xen_elfnote_phys32_entry = 4, 18
    for i in range(phnum):
        p_type, _flags, offset, _vaddr, _paddr, filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + i * phentsize
        )
        if p_type != pt_note:
            continue
        pos, end = offset, offset + filesz
        while pos + 12 <= end:
            namesz, descsz, n_type = struct.unpack_from("<III", data, pos)
            name = data[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and n_type == xen_elfnote_phys32_entry:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def _extract_vmlinux(vmlinuz: Path) -> bytes | None:
    """Return the ELF kernel inside bzImage *vmlinuz* if qemu can boot it by PVH.

    Under TCG the bzImage's own decompressor takes about 6 s; qemu boots an ELF
    vmlinux that carries the PVH entry note directly. None when the payload's
    compression is not one we read or the kernel has no PVH entry (then boot the
    bzImage).
    """
    image = vmlinuz.read_bytes()
    # x86 boot protocol: setup_sects at 0x1f1, payload_offset/length at 0x248/0x24c,
    # the payload offset counted from the protected-mode code after the setup sectors.
    if len(image) < 0x250 or image[0x202:0x206] != b"HdrS":
        return None
    setup_sects = image[0x1F1] or 4
    offset, length = struct.unpack_from("<II", image, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = image[start : start + length]
    try:
        if payload.startswith(b"\xfd7zXZ\0"):
            data = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
        elif payload.startswith(b"\x1f\x8b"):
            data = zlib.decompressobj(wbits=31).decompress(payload)
        else:  # zstd, lz4, ...: not in the standard library of every Python we support
            return None
    except (lzma.LZMAError, zlib.error):
        return None
    return data if _elf_has_pvh_note(data) else None


def _boot_kernel(vmlinuz: Path) -> Path:
    """Return the kernel file to boot: a cached PVH-bootable vmlinux, else *vmlinuz*.

    *vmlinuz* is ``CACHE/KVER/root/boot/vmlinuz-KVER``; the vmlinux goes to
    ``CACHE/KVER/vmlinux-KVER``.
    """
    kver = vmlinuz.name.removeprefix("vmlinuz-")
    vmlinux = vmlinuz.parent.parent.parent / f"vmlinux-{kver}"
    unusable = vmlinux.with_name(vmlinux.name + ".unusable")
    if vmlinux.is_file():
        return vmlinux
    if unusable.exists():
        return vmlinuz
    data = _extract_vmlinux(vmlinuz)
    if data is None:
        unusable.touch()
        return vmlinuz
    tmp = vmlinux.with_name(vmlinux.name + ".tmp")
    tmp.write_bytes(data)
    tmp.rename(vmlinux)
    return vmlinux


def prepare(cache: Path | None = None, *, log: Callable[[str], None] | None = None) -> Guest:
    """Check the host's programs, fetch the kernel if needed, build the initramfs.

    A second or two once the cache is warm (mostly ``apt-cache``); the first time it
    downloads about 70 MB and unpacks about 400 MB (some seconds to a minute).

    Args:
        cache: the cache folder (default :func:`cache_root`).
        log: called with a line of progress before slow steps.

    Raises:
        VMError: a program is missing (the message names its Debian package), or the
            kernel could not be fetched, or the initramfs could not be built.
    """
    tools = require_programs(HOST_PROGRAMS)
    busybox = _static_busybox(tools["busybox"])
    cache = cache_root() if cache is None else cache
    kver, root = fetch_kernel(cache, log=log)
    vmlinuz = root / "boot" / f"vmlinuz-{kver}"
    if not vmlinuz.is_file():
        raise VMError(f"{vmlinuz} is missing: remove {root.parent} and try again")
    with _locked(cache):
        initrd = build_initrd(kver, root, busybox=busybox, modprobe=tools["modprobe"])
        kernel = _boot_kernel(vmlinuz)
    return Guest(kver=kver, root=root, kernel=kernel, moddir=_moddir(root, kver), initrd=initrd)


# --------------------------------------------------------------------------- running


@dataclass(frozen=True)
class RunResult:
    """How a guest run went.

    Attributes:
        returncode: the command's exit status (128 + N when signal N ended it).
        timed_out: the guest's timeout expired and sent the command SIGINT (then
            *returncode* is whatever the command made of it: 2 for pytest).
        boot_seconds: from starting qemu until the command started (host clock).
        command_seconds: how long the command ran (guest clock).
        total_seconds: from starting qemu until it exited (host clock).
        console: the guest kernel's and stage 1's console log (serial port).
        xfer: the xfer folder, when kept (``keep=True`` or a caller's *xfer*).
    """

    returncode: int
    timed_out: bool
    boot_seconds: float
    command_seconds: float
    total_seconds: float
    console: str
    xfer: Path | None = None


def _qemu_escape(value: str | os.PathLike[str]) -> str:
    # qemu's option syntax splits on commas; a literal comma is written twice.
    return os.fspath(value).replace(",", ",,")


def _command_script(argv: Sequence[str], cwd: Path, env: Mapping[str, str]) -> str:
    lines = ["# written by pynbd.testing.vm; run by the guest's stage 2"]
    lines.append(f"cd {shlex.quote(os.fspath(cwd))} || exit 125")
    for name, value in env.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"not an environment variable name: {name!r}")
        lines.append(f"export {name}={shlex.quote(value)}")
    lines.append("exec " + shlex.join(argv))
    return "\n".join(lines) + "\n"


def _guest_path(host_path: str | None) -> str:
    # The host's PATH, with the system folders (sbin: modprobe, nbd-client) after it.
    parts = [p for p in (host_path or "").split(os.pathsep) if p]
    return os.pathsep.join(parts + [d for d in _SYSTEM_DIRS if d not in parts])


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _read_float(path: Path, index: int = 0) -> float | None:
    try:
        return float(path.read_text().split()[index])
    except (OSError, ValueError, IndexError):
        return None


def _die_with_us() -> Callable[[], None] | None:
    """Return a preexec_fn that makes the child get SIGKILL when we die, if possible.

    The ``finally`` in :func:`run` stops qemu on every exception, KeyboardInterrupt
    included; this covers our own SIGKILL, which no ``finally`` sees.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def set_pdeathsig() -> None:
        prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)

    return set_pdeathsig


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run(
    guest: Guest,
    argv: Sequence[str],
    *,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = RUN_TIMEOUT,
    boot_timeout: float = BOOT_TIMEOUT,
    memory: str = "1G",
    cpus: int = 2,
    output: IO[bytes] | int | None = None,
    xfer: Path | None = None,
    keep: bool = False,
    qemu: str | None = None,
) -> RunResult:
    """Boot *guest*, run *argv* in it as root, power it off, return how it went.

    Args:
        guest: from :func:`prepare`.
        argv: the command and its arguments (run with ``exec``; use
            ``["sh", "-c", "..."]`` for a shell command line).
        cwd: where it runs (default: the current folder; the guest sees the same path).
        env: variables exported to the command. The guest starts from an empty
            environment with ``NBDVM=1``, ``HOME=/root``, ``LANG=C.UTF-8``, and a
            ``PATH`` of *env*'s ``PATH`` (if any) followed by the system folders.
        timeout: seconds the command may run; then it gets SIGINT, and SIGKILL
            :data:`KILL_AFTER` seconds later.
        boot_timeout: seconds from starting qemu until the command starts.
        memory: guest memory (qemu ``-m``); the guest's writes live in it (tmpfs).
        cpus: guest CPUs (TCG runs one host thread per CPU).
        output: where the command's output goes (a binary file or fd; default: our
            stdout).
        xfer: an empty folder to share as the guest's ``/xfer`` and to leave in place
            (the command may write results there); default: a temporary one.
        keep: keep the temporary xfer folder (named in :attr:`RunResult.xfer`).
        qemu: the qemu program (default ``$PYNBD_VM_QEMU`` or ``qemu-system-x86_64``).

    Raises:
        VMError: qemu is missing or failed to start, the guest did not start the
            command within *boot_timeout*, or did not power off in time, or reported
            no exit status; the message holds the tail of the console log and of qemu's
            own messages. qemu is never left running.
    """
    qemu = qemu or os.environ.get("PYNBD_VM_QEMU") or "qemu-system-x86_64"
    qemu_path = _which(qemu)
    if qemu_path is None:
        raise VMError(f"{qemu} not found: install the Debian package qemu-system-x86")
    cwd_path = Path.cwd() if cwd is None else Path(cwd).resolve()
    exports = {"PATH": _guest_path(None), **(env or {})}
    exports["PATH"] = _guest_path(exports["PATH"])

    work = Path(tempfile.mkdtemp(prefix="pynbd-vm-"))
    if xfer is None:
        share = Path(tempfile.mkdtemp(prefix="pynbd-vm-xfer-"))
        remove_share = not keep
    else:
        share = xfer
        share.mkdir(parents=True, exist_ok=True)
        remove_share = False
    try:
        (share / "command").write_text(_command_script(argv, cwd_path, exports))
        (share / "settings").write_text(
            f"MODDIR={shlex.quote(os.fspath(guest.moddir))}\n"
            f"TIMEOUT={max(1, round(timeout))}\n"
            f"KILL_AFTER={round(KILL_AFTER)}\n"
        )
        for name in ("started", "exit"):
            (share / name).unlink(missing_ok=True)
        serial = work / "console.log"
        qemu_log = work / "qemu.log"
        args = [
            qemu_path,
            "-machine", "q35,accel=tcg",
            "-cpu", "max",
            "-m", memory,
            "-smp", str(cpus),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", os.fspath(guest.kernel),
            "-initrd", os.fspath(guest.initrd),
            # panic=-1 with -no-reboot: a panic ends qemu at once.
            "-append", "console=ttyS0 quiet loglevel=3 panic=-1",
            "-chardev", f"file,id=serial0,path={_qemu_escape(serial)}",
            "-serial", "chardev:serial0",
            "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
            "-fsdev", f"local,id=xfer,path={_qemu_escape(share)},security_model=none",
            "-device", "virtio-9p-pci,fsdev=xfer,mount_tag=xfer",
            "-device", "virtio-serial-pci",
            "-chardev", "stdio,id=out,signal=off",
            "-device", "virtconsole,chardev=out",
        ]  # fmt: skip
        start = time.monotonic()
        with open(qemu_log, "wb") as qemu_err:
            try:
                proc = subprocess.Popen(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=qemu_err,
                    preexec_fn=_die_with_us(),
                )
            except OSError as exc:
                raise VMError(f"cannot start {qemu_path}: {exc}") from exc
            try:
                started = _wait(proc, share, start, boot_timeout, timeout, serial, qemu_log)
            finally:
                # Also on KeyboardInterrupt and pytest-timeout: qemu never outlives us.
                _stop(proc)
        result = _result(share, start, started, serial, qemu_log, proc.returncode, timeout)
        return result if remove_share else dataclasses.replace(result, xfer=share)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if remove_share:
            shutil.rmtree(share, ignore_errors=True)


def _wait(
    proc: subprocess.Popen[bytes],
    share: Path,
    start: float,
    boot_timeout: float,
    timeout: float,
    serial: Path,
    qemu_log: Path,
) -> float | None:
    """Wait for qemu to exit; return when the command started (monotonic), if it did."""
    started: float | None = None
    while proc.poll() is None:
        now = time.monotonic()
        if started is None and (share / "started").exists():
            started = now
        if started is None and now - start > boot_timeout:
            raise VMError(
                f"the guest did not start the command within {boot_timeout:.0f} s"
                + _diagnostics(serial, qemu_log)
            )
        if started is not None and now - started > timeout + KILL_AFTER + POWEROFF_GRACE:
            raise VMError(
                f"the guest did not power off within {timeout + KILL_AFTER:.0f} s "
                f"(+{POWEROFF_GRACE:.0f} s) of starting the command"
                + _diagnostics(serial, qemu_log)
            )
        time.sleep(_POLL)
    if started is None and (share / "started").exists():
        started = time.monotonic()
    return started


def _diagnostics(serial: Path, qemu_log: Path) -> str:
    text = ""
    console = _tail(serial)
    if console:
        text += "\n--- guest console (last lines)\n" + console
    messages = _tail(qemu_log)
    if messages:
        text += "\n--- qemu\n" + messages
    return text


def _result(
    share: Path,
    start: float,
    started: float | None,
    serial: Path,
    qemu_log: Path,
    qemu_status: int | None,
    timeout: float,
) -> RunResult:
    end = time.monotonic()
    exit_fields: list[str] = []
    with contextlib.suppress(OSError):
        exit_fields = (share / "exit").read_text().split()
    if started is None or len(exit_fields) != 2 or not exit_fields[0].isdigit():
        where = "before starting the command" if started is None else "without an exit status"
        raise VMError(
            f"the guest stopped {where} (qemu exit status {qemu_status})"
            + _diagnostics(serial, qemu_log)
        )
    # Durations on the guest's clock when it gave them (the host's includes polling).
    t0 = _read_float(share / "started")
    t1 = _read_float(share / "exit", index=1)
    command_seconds = t1 - t0 if t0 is not None and t1 is not None and t1 >= t0 else end - started
    return RunResult(
        returncode=int(exit_fields[0]),
        # busybox timeout counts whole seconds; the status is whatever the command made
        # of its SIGINT (pytest: 2), so the duration tells.
        timed_out=command_seconds >= timeout - 1,
        boot_seconds=started - start,
        command_seconds=command_seconds,
        total_seconds=end - start,
        console=serial.read_text(errors="replace") if serial.exists() else "",
    )


# --------------------------------------------------------------------------- pytest


Outcome = Literal["passed", "failed", "error", "skipped"]


@dataclass(frozen=True)
class CaseResult:
    """One ``<testcase>`` of a junit xml report, as pytest writes it.

    Attributes:
        classname: the dotted module path and classes (``tests.kernel.test_x.TestY``).
        name: the test function's name, parameters included (``test_z[1]``).
        outcome: ``failed`` when a ``<failure>`` is present (the test, or an xpass with
            strict xfail), ``error`` for a setup or teardown error, ``skipped`` (skips
            and xfails), else ``passed``.
        message: the failure, error or skip message.
        details: the text of the failure, error or skip elements (pytest's report).
        output: the test's captured stdout, stderr and log (``system-out``, ``system-err``).
        seconds: the time pytest gave.
    """

    classname: str
    name: str
    outcome: Outcome
    message: str = ""
    details: str = ""
    output: str = ""
    seconds: float = 0.0

    @property
    def key(self) -> tuple[str, str]:
        """``(classname, name)``, the value :func:`junit_key` gives for its node id."""
        return (self.classname, self.name)


def junit_key(nodeid: str) -> tuple[str, str]:
    """Return the ``(classname, name)`` pair pytest's junit xml gives test *nodeid*.

    ``tests/kernel/test_x.py::TestY::test_z[a::b]`` becomes
    ``("tests.kernel.test_x.TestY", "test_z[a::b]")``: the path's slashes become dots and
    ``.py`` goes; parameters (after the first ``[``) are kept as they are.
    """
    path, bracket, params = nodeid.partition("[")
    names = path.split("::")
    names[0] = re.sub(r"\.py$", "", names[0].replace("/", "."))
    names[-1] += bracket + params
    return ".".join(names[:-1]), names[-1]


def _has_output(text: str | None) -> bool:
    # With junit_logging=all pytest writes "--- Captured Out ---" headers even when
    # nothing was captured.
    lines = (text or "").splitlines()
    return any(line.strip() and not re.fullmatch(r"-+ Captured \w+ -+", line) for line in lines)


def parse_junit(source: str | os.PathLike[str] | IO[bytes]) -> list[CaseResult]:
    """Read the test cases of a junit xml report written by pytest.

    Raises:
        VMError: the file is missing or is not junit xml.
    """
    try:
        tree = ET.parse(source)
    except (OSError, ET.ParseError) as exc:
        raise VMError(f"cannot read the guest's junit xml: {exc}") from exc
    cases: list[CaseResult] = []
    for case in tree.getroot().iter("testcase"):
        found = {child.tag: child for child in case}
        outcome: Outcome = "passed"
        for tag in ("skipped", "error", "failure"):  # the last one present wins
            if tag in found:
                outcome = "failed" if tag == "failure" else tag
        messages, details, output = [], [], []
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                if child.get("message"):
                    messages.append(child.get("message", ""))
                if child.text and child.text.strip():
                    details.append(child.text.rstrip())
            elif child.tag in ("system-out", "system-err") and _has_output(child.text):
                output.append(f"--- {child.tag}\n{(child.text or '').rstrip()}")
        try:
            seconds = float(case.get("time", "0"))
        except ValueError:
            seconds = 0.0
        cases.append(
            CaseResult(
                classname=case.get("classname", ""),
                name=case.get("name", ""),
                outcome=outcome,
                message="\n".join(messages),
                details="\n\n".join(details),
                output="\n".join(output),
                seconds=seconds,
            )
        )
    return cases


@dataclass(frozen=True)
class GuestPytest:
    """What a pytest session in the guest reported.

    Attributes:
        result: how the guest run went (pytest's exit status is ``result.returncode``).
        cases: every ``<testcase>`` of its junit xml, by :attr:`CaseResult.key`.
        output: pytest's terminal output in the guest.
        junit_error: why the junit xml could not be read ("" when it could).
    """

    result: RunResult
    cases: dict[tuple[str, str], CaseResult] = field(default_factory=dict)
    output: str = ""
    junit_error: str = ""


def run_pytest(
    guest: Guest,
    args: Sequence[str],
    *,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    python: str = sys.executable,
    plugins: Sequence[str] = ("pytest_timeout",),
    timeout: float = RUN_TIMEOUT,
    boot_timeout: float = BOOT_TIMEOUT,
    memory: str = "1G",
    cpus: int = 2,
) -> GuestPytest:
    """Boot *guest* once and run ``PYTHON -m pytest ARGS`` in it, reporting to junit xml.

    The host's interpreter and checkout are visible at the same paths in the guest, so
    *python* defaults to ours. pytest runs without its cache provider, without its
    report header (pytest_report_header hooks may run programs), and with only the
    plugins named in *plugins* (``PYTEST_DISABLE_PLUGIN_AUTOLOAD``): under TCG each
    auto-loaded plugin costs seconds (hypothesis alone 10-20 s). Its junit xml (captured
    output included) is written to the xfer share and read back here.

    Args:
        guest: from :func:`prepare`.
        args: pytest arguments (test ids, options).
        cwd, env, timeout, boot_timeout, memory, cpus: as for :func:`run`.
        python: the interpreter to run pytest with.
        plugins: modules loaded with ``-p`` (those *python* cannot import are left
            out, so that a missing optional plugin is not an error).

    Raises:
        VMError: as :func:`run`. A pytest that ran but failed, or wrote no junit xml,
            is not an error: see :attr:`GuestPytest.junit_error` and the exit status.
    """
    argv = [
        python, "-m", "pytest",
        "-p", "no:cacheprovider",
        "--no-header",
        "--junitxml=/xfer/junit.xml",
        "-o", "junit_family=xunit2",
        "-o", "junit_logging=all",
        "-o", "junit_log_passing_tests=false",
    ]  # fmt: skip
    if python == sys.executable:
        plugins = [name for name in plugins if importlib.util.find_spec(name) is not None]
    for name in plugins:
        argv += ["-p", name]
    argv += args
    env = {**(env or {}), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    with tempfile.TemporaryDirectory(prefix="pynbd-vm-pytest-") as tmp:
        xfer = Path(tmp) / "xfer"
        out_path = Path(tmp) / "output"
        with open(out_path, "wb") as out:
            result = run(
                guest,
                argv,
                cwd=cwd,
                env=env,
                timeout=timeout,
                boot_timeout=boot_timeout,
                memory=memory,
                cpus=cpus,
                output=out,
                xfer=xfer,
            )
        output = out_path.read_text(errors="replace")
        try:
            cases = {case.key: case for case in parse_junit(xfer / "junit.xml")}
            junit_error = ""
        except VMError as exc:
            cases, junit_error = {}, str(exc)
    return GuestPytest(
        result=dataclasses.replace(result, xfer=None),
        cases=cases,
        output=output,
        junit_error=junit_error,
    )


# --------------------------------------------------------------------------- command line


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pynbd.testing.vm",
        description="Run CMD as root in a qemu guest booting Debian's kernel (which has the "
        "nbd driver), with the host's / shared read-only under a tmpfs overlay. Exits with "
        "CMD's status, or 125 when the guest could not run it.",
    )
    parser.add_argument(
        "--prepare", action="store_true", help="only fetch the kernel and build the initramfs"
    )
    parser.add_argument(
        "--cache",
        type=Path,
        help="cache folder (default: $PYNBD_VM_CACHE or ~/.cache/pynbd/kernel)",
    )
    parser.add_argument("-C", "--cwd", type=Path, help="where CMD runs (default: here)")
    parser.add_argument(
        "-e", "--env", action="append", default=[], metavar="NAME[=VALUE]",
        help="export NAME to CMD (its host value without =VALUE); PATH and PYTHONPATH always are",
    )  # fmt: skip
    parser.add_argument("-m", "--memory", default="1G", help="guest memory (default 1G)")
    parser.add_argument("--cpus", type=int, default=2, help="guest CPUs (default 2)")
    parser.add_argument(
        "--timeout", type=float, default=RUN_TIMEOUT,
        help=f"seconds CMD may run before SIGINT (default {RUN_TIMEOUT:.0f})",
    )  # fmt: skip
    parser.add_argument(
        "--boot-timeout", type=float, default=BOOT_TIMEOUT,
        help=f"seconds the guest may take to boot (default {BOOT_TIMEOUT:.0f})",
    )  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the xfer folder and name it")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="say what happens and how long it took"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    args = parser.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.prepare and not args.command:
        parser.error("no command: python -m pynbd.testing.vm [OPTIONS] -- CMD [ARGS...]")
    return args


def _log(text: str) -> None:
    print(f"pynbd.testing.vm: {text}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: ``python -m pynbd.testing.vm [OPTIONS] -- CMD...``.

    Returns:
        CMD's exit status in the guest, or 125 when the guest could not run it.
    """
    args = _parse_args(argv)
    env = {name: os.environ[name] for name in ("PATH", "PYTHONPATH") if name in os.environ}
    for item in args.env:
        name, eq, value = item.partition("=")
        if eq:
            env[name] = value
        elif name in os.environ:
            env[name] = os.environ[name]
    try:
        guest = prepare(args.cache, log=_log)
        if args.prepare:
            print(f"kernel {guest.kver}\nimage {guest.kernel}\ninitrd {guest.initrd}")
            return 0
        if args.verbose:
            _log(f"booting {guest.kver} (TCG) to run {shlex.join(args.command)}")
        sys.stdout.flush()
        result = run(
            guest,
            args.command,
            cwd=args.cwd,
            env=env,
            timeout=args.timeout,
            boot_timeout=args.boot_timeout,
            memory=args.memory,
            cpus=args.cpus,
            keep=args.keep,
        )
    except (VMError, ValueError) as exc:
        _log(str(exc))
        return 125
    if result.timed_out:
        _log(f"the command ran out of time ({args.timeout:.0f} s) and was interrupted")
    if args.verbose:
        _log(
            f"exit status {result.returncode}; boot {result.boot_seconds:.1f} s, "
            f"command {result.command_seconds:.1f} s, total {result.total_seconds:.1f} s"
        )
    if result.xfer is not None:
        _log(f"xfer folder kept: {result.xfer}")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
