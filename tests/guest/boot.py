"""What qemu boots: a :class:`Guest` (kernel, initramfs, modules), made ready in the
cache by :func:`prepare`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.guest.fetch import cache_root, fetch_kernel, locked, module_dir
from tests.guest.host import HOST_PROGRAMS, VMError, require_programs, static_busybox
from tests.guest.initrd import build_initrd
from tests.guest.kernel import boot_kernel


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


def prepare(cache: Path | None = None, *, log: Callable[[str], None] | None = None) -> Guest:
    """Check the host's programs, fetch the kernel if needed, build the initramfs.

    A second or two once the cache is warm (mostly ``apt-cache``); the first time it
    downloads about 70 MB and unpacks about 400 MB (some seconds to a minute).

    Args:
        cache: the cache folder (default :func:`~tests.guest.fetch.cache_root`).
        log: called with a line of progress before slow steps.

    Raises:
        VMError: a program is missing (the message names its Debian package), or the
            kernel could not be fetched, or the initramfs could not be built.
    """
    tools = require_programs(HOST_PROGRAMS)
    busybox = static_busybox(tools["busybox"])
    cache = cache_root() if cache is None else cache
    kver, root = fetch_kernel(cache, log=log)
    vmlinuz = root / "boot" / f"vmlinuz-{kver}"
    if not vmlinuz.is_file():
        raise VMError(f"{vmlinuz} is missing: remove {root.parent} and try again")
    with locked(cache):
        initrd = build_initrd(kver, root, busybox=busybox, modprobe=tools["modprobe"])
        kernel = boot_kernel(vmlinuz)
    return Guest(kver=kver, root=root, kernel=kernel, moddir=module_dir(root, kver), initrd=initrd)
