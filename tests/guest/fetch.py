"""The guest's kernel: Debian's ``linux-image-amd64`` package, fetched with
``apt-get download`` and unpacked with ``dpkg -x`` into a cache, one folder per kernel
version (``CACHE/KVER/root``); nothing is installed."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from tests.guest.host import VMError, require_programs, run_checked, which

# Only needed to fetch a kernel that is not cached yet.
FETCH_PROGRAMS: Mapping[str, str] = {
    "apt-cache": "apt",
    "apt-get": "apt",
    "dpkg": "dpkg",
    "depmod": "kmod",
}


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


@contextlib.contextmanager
def locked(cache: Path) -> Iterator[None]:
    """Hold the cache's lock: two test sessions may prepare at once; the second waits
    and then finds the cache filled."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def kernel_package(apt_cache_depends: str) -> str | None:
    """Return the versioned kernel package named in ``apt-cache depends`` output."""
    for line in apt_cache_depends.splitlines():
        found = re.match(r"\s*\|?Depends:\s*(linux-image-(\S+))\s*$", line)
        if found and not found.group(2).endswith("-unsigned") and found.group(2)[0].isdigit():
            return found.group(1)
    return None


def complete_kernels(cache: Path) -> list[str]:
    """Return the kernel versions fully unpacked in *cache*, newest first."""

    def version(kver: str) -> list[int]:
        return [int(n) for n in re.findall(r"\d+", kver)]

    kvers = [p.parent.parent.name for p in cache.glob("*/root/.complete")]
    return sorted(kvers, key=version, reverse=True)


def module_dir(root: Path, kver: str) -> Path:
    """Return the kernel's modules folder in its ``dpkg -x`` tree *root*.

    Raises:
        VMError: there is none.
    """
    for candidate in (root / "lib" / "modules" / kver, root / "usr" / "lib" / "modules" / kver):
        if candidate.is_dir():
            return candidate.resolve()
    raise VMError(f"no lib/modules/{kver} in {root}")


def fetch_kernel(cache: Path, *, log: Callable[[str], None] | None = None) -> tuple[str, Path]:
    """Make sure the kernel of Debian's ``linux-image-amd64`` is unpacked in *cache*.

    Asks ``apt-cache depends linux-image-amd64`` which kernel package that is; when it
    is not in the cache yet, fetches it (``apt-get download``), unpacks it (``dpkg -x``)
    and runs ``depmod -b``. When apt knows no kernel (no ``apt-get update`` yet) or the
    download fails, the newest kernel already in the cache is used instead.

    Args:
        cache: the cache folder (:func:`cache_root` is the usual one).
        log: called with a line of progress before slow steps.

    Returns:
        ``(kver, root)``: the kernel release and its ``dpkg -x`` tree.

    Raises:
        VMError: no kernel in the cache and none could be fetched (the message says
            why: a missing program, apt knowing no linux-image-amd64, a failed step).
    """
    with locked(cache):
        cached = complete_kernels(cache)
        package: str | None = None
        problem = ""
        apt_cache = which("apt-cache")
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
                package = kernel_package(done.stdout)
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
    tools = require_programs(FETCH_PROGRAMS)
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
        run_checked([tools["apt-get"], "download", package], cwd=work, timeout=900, what="fetching")
        debs = sorted(work.glob("*.deb"))
        if len(debs) != 1:
            raise VMError(f"apt-get download {package} left {len(debs)} .deb files")
        tree = work / "root"
        run_checked(
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
        run_checked([tools["depmod"], "-b", os.fspath(tree), kver], timeout=300, what="depmod")
        (tree / ".complete").write_text(package + "\n")
        tree.rename(root)
    return root
