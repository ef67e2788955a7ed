"""The kernel image qemu boots: the ELF vmlinux inside Debian's bzImage, when it
carries a PVH entry.

Under TCG the bzImage's own decompressor takes about 6 s; qemu boots an ELF vmlinux
that carries the PVH entry note directly. The vmlinux is extracted once and kept in the
cache next to the kernel's tree.
"""

from __future__ import annotations

import lzma
import struct
import zlib
from pathlib import Path

_PT_NOTE = 4
_XEN_ELFNOTE_PHYS32_ENTRY = 18


def elf_has_pvh_note(data: bytes) -> bool:
    """Return True if 64-bit ELF *data* carries Xen's PHYS32_ENTRY note (PVH boot)."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return False
    (phoff,) = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    for i in range(phnum):
        p_type, _flags, offset, _vaddr, _paddr, filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + i * phentsize
        )
        if p_type != _PT_NOTE:
            continue
        pos, end = offset, offset + filesz
        while pos + 12 <= end:
            namesz, descsz, n_type = struct.unpack_from("<III", data, pos)
            name = data[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and n_type == _XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def extract_vmlinux(vmlinuz: Path) -> bytes | None:
    """Return the ELF kernel inside bzImage *vmlinuz* if qemu can boot it by PVH.

    None when the payload's compression is not one we read or the kernel has no PVH
    entry (then boot the bzImage).
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
    return data if elf_has_pvh_note(data) else None


def boot_kernel(vmlinuz: Path) -> Path:
    """Return the kernel file to boot: a cached PVH-bootable vmlinux, else *vmlinuz*.

    *vmlinuz* is ``CACHE/KVER/root/boot/vmlinuz-KVER``; the vmlinux goes to
    ``CACHE/KVER/vmlinux-KVER`` (or ``vmlinux-KVER.unusable`` marks that there is none).
    """
    kver = vmlinuz.name.removeprefix("vmlinuz-")
    vmlinux = vmlinuz.parent.parent.parent / f"vmlinux-{kver}"
    unusable = vmlinux.with_name(vmlinux.name + ".unusable")
    if vmlinux.is_file():
        return vmlinux
    if unusable.exists():
        return vmlinuz
    data = extract_vmlinux(vmlinuz)
    if data is None:
        unusable.touch()
        return vmlinuz
    tmp = vmlinux.with_name(vmlinux.name + ".tmp")
    tmp.write_bytes(data)
    tmp.rename(vmlinux)
    return vmlinux
