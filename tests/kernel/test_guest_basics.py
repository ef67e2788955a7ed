"""The test guest itself: the nbd driver loads, its device, sysfs and netlink interfaces
exist, and nbd-client can attach /dev/nbd0 to a server and move data through it.

These run only in the guest (see conftest.py: on the host they are proxies for the
guest's results). Servers run inside the guest, on 127.0.0.1.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.kernel.helpers import KernelLog
from tests.peers import Server

# Generic netlink, from include/uapi/linux/netlink.h and genetlink.h. Netlink headers
# and attributes are in the host's byte order ("=" in struct formats).
NETLINK_GENERIC = 16
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
CTRL_ATTR_VERSION = 3
CTRL_ATTR_MCAST_GROUPS = 7
CTRL_ATTR_MCAST_GRP_NAME = 1
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER

NBD_MAJOR = 43
DEVICE = "/dev/nbd0"
EXPORT_SIZE = 16 * 1024 * 1024
# A command that may block on a dead server gets this long (nbd-client -t too).
COMMAND_TIMEOUT = 60


def _nla(kind: int, payload: bytes) -> bytes:
    header = struct.pack("=HH", 4 + len(payload), kind)
    return header + payload + b"\0" * (-len(payload) % 4)


def _nlas(data: bytes) -> Iterator[tuple[int, bytes]]:
    pos = 0
    while pos + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, pos)
        if length < 4:
            raise ValueError(f"netlink attribute of length {length}")
        yield kind & NLA_TYPE_MASK, data[pos + 4 : pos + length]
        pos += (length + 3) & ~3


def _get_family(name: str) -> dict[int, bytes]:
    """Ask the kernel's generic netlink controller about family *name*; return its
    attributes. Raises OSError with the kernel's errno when it has no such family."""
    body = struct.pack("=BBH", CTRL_CMD_GETFAMILY, 1, 0)
    body += _nla(CTRL_ATTR_FAMILY_NAME, name.encode() + b"\0")
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC) as sock:
        sock.settimeout(10)
        sock.bind((0, 0))
        sock.send(struct.pack("=IHHII", 16 + len(body), GENL_ID_CTRL, NLM_F_REQUEST, 1, 0) + body)
        reply = sock.recv(65536)
    length, kind, _flags, seq, _pid = struct.unpack_from("=IHHII", reply)
    assert seq == 1
    if kind == NLMSG_ERROR:
        (error,) = struct.unpack_from("=i", reply, 16)
        raise OSError(-error, f"CTRL_CMD_GETFAMILY {name}: {os.strerror(-error)}")
    assert kind == GENL_ID_CTRL
    return dict(_nlas(reply[20:length]))


def _detach() -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nbd-client", "-d", DEVICE],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )


def _sysfs(name: str) -> Path:
    return Path("/sys/block") / Path(DEVICE).name / name


def test_guest_environment() -> None:
    """We run as root in the guest, on the overlay root, with this kernel's modules."""
    assert os.environ.get("NBDVM") == "1"
    assert os.geteuid() == 0
    mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    assert ["/", "overlay"] in [fields[1:3] for fields in mounts]
    assert Path("/lib/modules", os.uname().release, "modules.dep").is_file()


def test_modprobe_nbd(nbd_module: None) -> None:
    assert Path("/sys/module/nbd").is_dir()


def test_dev_nbd0_exists(nbd_module: None) -> None:
    mode = os.stat(DEVICE).st_mode
    assert stat.S_ISBLK(mode)
    assert os.major(os.stat(DEVICE).st_rdev) == NBD_MAJOR


def test_sys_block_nbd0_exists(nbd_module: None) -> None:
    assert _sysfs("").is_dir()
    assert _sysfs("size").read_text().strip().isdigit()


def test_netlink_family_nbd_registered(nbd_module: None) -> None:
    attrs = _get_family("nbd")
    (family_id,) = struct.unpack("=H", attrs[CTRL_ATTR_FAMILY_ID])
    (version,) = struct.unpack("=I", attrs[CTRL_ATTR_VERSION])
    assert family_id >= GENL_ID_CTRL
    assert version >= 1
    groups = [dict(_nlas(group)) for _, group in _nlas(attrs[CTRL_ATTR_MCAST_GROUPS])]
    assert b"nbd_mc_group\0" in [g.get(CTRL_ATTR_MCAST_GRP_NAME) for g in groups]


def test_netlink_unknown_family_is_enoent() -> None:
    with pytest.raises(OSError) as excinfo:
        _get_family("no-such-family")
    assert excinfo.value.errno == 2  # ENOENT


def _log_to_kernel(line: str) -> None:
    with open("/dev/kmsg", "w") as kmsg:
        kmsg.write(line + "\n")


def test_kernel_log_reads_what_came_after_it_opened() -> None:
    """What the kernel log check (conftest.py's kernel_log_clean) reads: the lines
    logged while it is open, no earlier ones, and so no other test's."""
    with KernelLog() as first:
        _log_to_kernel("pynbd-test: WARNING: a line the check must see")
        with KernelLog() as second:
            _log_to_kernel("pynbd-test: a harmless line")
            ours = [line for line in second.read() if line.startswith("pynbd-test:")]
            assert ours == ["pynbd-test: a harmless line"]
            assert second.bad_lines() == []
        assert first.bad_lines() == ["pynbd-test: WARNING: a line the check must see"]
        assert first.read() == []


def test_nbd_client_attach_write_read_detach(
    nbd_module: None, nbdkit: Callable[..., Server], tmp_path: Path
) -> None:
    server = nbdkit("memory", str(EXPORT_SIZE), tcp=True)
    host, port = server.host, server.port
    assert host is not None and port is not None
    # 1 MiB at offset 1 MiB, a pattern that differs in every 512-byte sector.
    pattern = b"".join(struct.pack(">Q", i) * 64 for i in range(2048))
    (tmp_path / "pattern").write_bytes(pattern)
    attach = subprocess.run(
        ["nbd-client", host, str(port), DEVICE, "-b", "512", "-t", str(COMMAND_TIMEOUT)],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    try:
        assert attach.returncode == 0, attach.stderr + attach.stdout
        deadline = time.monotonic() + 30
        while int(_sysfs("size").read_text()) * 512 != EXPORT_SIZE:
            assert time.monotonic() < deadline, "the device never got the export's size"
            time.sleep(0.1)
        subprocess.run(
            ["dd", f"if={tmp_path / 'pattern'}", f"of={DEVICE}", "bs=64k", "seek=16",
             "oflag=direct", "conv=fsync", "status=none"],
            check=True, timeout=COMMAND_TIMEOUT,
        )  # fmt: skip
        subprocess.run(
            ["dd", f"if={DEVICE}", f"of={tmp_path / 'readback'}", "bs=64k", "skip=16",
             "count=16", "iflag=direct", "status=none"],
            check=True, timeout=COMMAND_TIMEOUT,
        )  # fmt: skip
        assert (tmp_path / "readback").read_bytes() == pattern
    finally:
        detach = _detach()
    assert detach.returncode == 0, detach.stderr + detach.stdout
    deadline = time.monotonic() + 30
    while _sysfs("pid").exists():
        assert time.monotonic() < deadline, "the device is still connected after nbd-client -d"
        time.sleep(0.1)
    # The data reached the server: read it back through another client.
    disk = subprocess.run(
        ["nbdcopy", server.uri, "-"], capture_output=True, timeout=COMMAND_TIMEOUT, check=True
    ).stdout
    assert len(disk) == EXPORT_SIZE
    assert disk[1 << 20 : 2 << 20] == pattern
