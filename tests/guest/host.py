"""What every step on the host shares: the error it raises, finding the programs it
runs (each named with its Debian package), and running one to completion."""

from __future__ import annotations

import os
import shlex
import shutil
import struct
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

#: Programs the harness runs on the host, and the Debian package of each.
HOST_PROGRAMS: Mapping[str, str] = {
    "qemu-system-x86_64": "qemu-system-x86",
    "busybox": "busybox-static",
    "modprobe": "kmod",
    "depmod": "kmod",
}
#: Directories searched besides PATH: sbin is often missing from a user's PATH.
SYSTEM_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


class VMError(RuntimeError):
    """The guest could not be prepared, booted, or did not report an exit status.

    The message says why: a missing program (with its Debian package), a failed
    download, a boot or run timeout (with the tail of the guest's console log).
    """


def which(name: str) -> str | None:
    """Return the full path of program *name* on PATH or in :data:`SYSTEM_DIRS`."""
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), *SYSTEM_DIRS]))


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
        path = which(name)
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


def is_static_elf(path: str | os.PathLike[str]) -> bool:
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


def static_busybox(path: str) -> str:
    """Return *path* if it is a statically linked busybox.

    The initramfs has no C library: a dynamically linked busybox (Debian's "busybox"
    package, which conflicts with busybox-static) cannot run there.

    Raises:
        VMError: it is dynamically linked.
    """
    if not is_static_elf(path):
        raise VMError(
            f"{path} is not statically linked: the guest needs the Debian package "
            "busybox-static (apt-get install busybox-static)"
        )
    return path


def run_checked(
    argv: Sequence[str], *, timeout: float, what: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a program to completion, its output captured.

    Raises:
        VMError: it could not start, took longer than *timeout* seconds, or exited
            with a status other than 0; the message starts with *what*.
    """
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
