"""pynbd.kernel.attach logic that needs no nbd driver.

The block-size choice, the multi-connection check, the argument checks and error
messages of attach/attach_backend/detach/device_status on a host without the driver,
status from a fake sysfs, and the userspace handshake done for the kernel
(:func:`connect_for_kernel`) against nbdkit. Attaching for real is tested in the guest
(tests/kernel/test_attach.py).
"""

from __future__ import annotations

import errno
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from pynbd.errors import InvalidRequest, ProtocolError, URIError
from pynbd.kernel import device
from pynbd.kernel.attach import (
    Attachment,
    DeviceInfo,
    _check_same,
    attach,
    attach_backend,
    choose_block_size,
    connect_for_kernel,
    detach,
    device_status,
)
from pynbd.kernel.errors import FamilyNotFound, KernelError
from pynbd.proto.constants import REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, Cmd, TransmissionFlag
from pynbd.proto.handshake import Negotiated
from pynbd.server import MemoryBackend
from tests.kernel_host.conftest import MakeDevice
from tests.peers import Server

FLAGS = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH
NOWHERE = "nbd+unix:///?socket=/nonexistent/pynbd-test.sock"


def _require_no_nbd_driver() -> None:
    if Path("/sys/module/nbd").exists():
        pytest.fail("this host has the nbd driver: these tests check the messages without it")


@pytest.fixture
def page_4k(monkeypatch: pytest.MonkeyPatch) -> None:
    """The limit of a 6.1 kernel on x86-64, whatever this host runs."""
    monkeypatch.setattr(device, "max_block_size", lambda: 4096)


# --------------------------------------------------------------------------- block size


@pytest.mark.parametrize(
    ("advertised", "minimum", "given", "chosen"),
    [
        (False, 1, None, 512),  # no advertisement: 512, the unit of partition tables
        (False, 4096, None, 512),  # a minimum not advertised is not one
        (True, 1, None, 512),  # qemu-nbd's and nbdkit's minimum of 1
        (True, 512, None, 512),
        (True, 2048, None, 2048),  # raised to the server's minimum
        (True, 4096, None, 4096),
        (False, 1, 4096, 4096),  # a given size wins
        (True, 512, 1024, 1024),
        (True, 4096, 4096, 4096),
    ],
)
def test_choose_block_size(
    page_4k: None, advertised: bool, minimum: int, given: int | None, chosen: int
) -> None:
    negotiated = Negotiated(size=1 << 20, minimum_block=minimum, block_size_advertised=advertised)
    assert choose_block_size(negotiated, given) == chosen


def test_block_size_below_the_servers_minimum(page_4k: None) -> None:
    negotiated = Negotiated(size=1 << 20, minimum_block=4096, block_size_advertised=True)
    with pytest.raises(InvalidRequest, match="block size 512 is below the server's minimum"):
        choose_block_size(negotiated, 512)


@pytest.mark.parametrize("given", [256, 1000, 8192])
def test_invalid_block_size_given(page_4k: None, given: int) -> None:
    with pytest.raises(InvalidRequest, match=f"block size {given} is not a power of two"):
        choose_block_size(Negotiated(size=1 << 20), given)


def test_server_minimum_above_the_page_size(page_4k: None) -> None:
    # The kernel cannot take it: refused, not silently lowered below the server's minimum.
    negotiated = Negotiated(size=1 << 20, minimum_block=65536, block_size_advertised=True)
    with pytest.raises(InvalidRequest, match="block size 65536 is not a power of two"):
        choose_block_size(negotiated)


# --------------------------------------------------------------------------- multi-conn


def test_same_size_and_flags_pass() -> None:
    first = Negotiated(size=1 << 30, flags=FLAGS, minimum_block=1)
    # Block sizes and names may differ: the kernel only takes the size and flags.
    _check_same(first, Negotiated(size=1 << 30, flags=FLAGS, minimum_block=512))


@pytest.mark.parametrize(
    ("size", "flags", "text"),
    [
        ((1 << 30) + 512, FLAGS, "1073742336/0x5 vs 1073741824/0x5"),
        (1 << 30, FLAGS | TransmissionFlag.READ_ONLY, "1073741824/0x7 vs 1073741824/0x5"),
    ],
)
def test_another_connection_that_differs(size: int, flags: TransmissionFlag, text: str) -> None:
    first = Negotiated(size=1 << 30, flags=FLAGS)
    with pytest.raises(ProtocolError, match="different size or flags") as excinfo:
        _check_same(first, Negotiated(size=size, flags=flags))
    assert text in str(excinfo.value)


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kwargs", "exc", "text"),
    [
        ({"uri": "http://localhost/"}, URIError, "unknown NBD URI scheme .http."),
        ({"connections": 0}, InvalidRequest, "connections must be at least 1, not 0"),
        ({"timeout": -1}, InvalidRequest, "timeout must not be negative, not -1"),
        ({"device": "/dev/sda"}, InvalidRequest, "/dev/sda is not an nbd device"),
        ({"device": -3}, InvalidRequest, "negative"),
    ],
)
def test_attach_refuses_bad_arguments_before_connecting(
    kwargs: dict[str, object], exc: type[Exception], text: str
) -> None:
    # NOWHERE does not exist: a check that came after connecting would fail otherwise.
    uri = kwargs.pop("uri", NOWHERE)
    with pytest.raises(exc, match=text):
        attach(uri, **kwargs)  # type: ignore[arg-type]


def test_attach_without_the_driver_says_modprobe(sys_block: Path) -> None:
    _require_no_nbd_driver()
    with pytest.raises(FamilyNotFound, match=r"the nbd driver is not loaded \(modprobe nbd\)"):
        attach(NOWHERE)


def _in_process_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("pynbd in-process")]


def test_attach_backend_without_the_driver_stops_its_server(sys_block: Path) -> None:
    _require_no_nbd_driver()
    before = _in_process_threads()
    with pytest.raises(FamilyNotFound, match="modprobe nbd"):
        attach_backend(MemoryBackend(1 << 20))
    assert _in_process_threads() == before


def test_connect_for_kernel_refuses_tls() -> None:
    with pytest.raises(InvalidRequest, match=r"cannot use TLS: attach\(\) relays nbds://"):
        connect_for_kernel("nbds://localhost/")


def test_attach_tls_without_the_driver_leaves_no_relay(sys_block: Path) -> None:
    # nbds:// goes through a TLS relay; a failed attach must not leave its threads.
    _require_no_nbd_driver()
    with pytest.raises(FamilyNotFound, match="modprobe nbd"):
        attach(NOWHERE.replace("nbd+unix", "nbds+unix"))
    assert not [t for t in threading.enumerate() if t.name.startswith("pynbd relay")]


# --------------------------------------------------------------------------- status


def test_device_status_from_sysfs(make_device: MakeDevice) -> None:
    _require_no_nbd_driver()  # no netlink: sysfs alone answers
    make_device(0, size="131072", pid="42", backend="b", block_size="4096")
    make_device(1)
    infos = device_status()
    assert [i.device for i in infos] == ["/dev/nbd0", "/dev/nbd1"]
    assert infos[0] == DeviceInfo(
        index=0,
        device="/dev/nbd0",
        connected=True,
        size=64 << 20,
        pid=42,
        backend="b",
        read_only=False,
        block_size=4096,
    )
    assert infos[1].as_dict() == {
        "index": 1,
        "device": "/dev/nbd1",
        "connected": False,
        "size": 0,
        "pid": None,
        "backend": None,
        "read_only": False,
        "block_size": 512,
    }
    assert device_status("nbd1") == [infos[1]]


def test_device_status_without_devices_says_modprobe(sys_block: Path) -> None:
    _require_no_nbd_driver()
    with pytest.raises(KernelError, match=r"modprobe nbd") as excinfo:
        device_status()
    assert excinfo.value.errno == errno.ENODEV


def test_device_status_of_a_missing_device(make_device: MakeDevice) -> None:
    make_device(0)
    with pytest.raises(KernelError, match="no such nbd device") as excinfo:
        device_status(5)
    assert excinfo.value.errno == errno.ENODEV and excinfo.value.device == "/dev/nbd5"


def test_detach_without_the_driver_names_device_and_call() -> None:
    _require_no_nbd_driver()
    with pytest.raises(KernelError) as excinfo:
        detach("nbd7", timeout=0)
    exc = excinfo.value
    assert exc.errno == errno.ENOENT and (exc.device, exc.call) == ("/dev/nbd7", "open")


def test_detach_refuses_another_device() -> None:
    with pytest.raises(InvalidRequest, match="not an nbd device"):
        detach("/dev/null")


def _attachment(index: int) -> Attachment:
    return Attachment(
        device=f"/dev/nbd{index}",
        index=index,
        size=64 << 20,
        block_size=512,
        flags=FLAGS,
        connections=1,
        method="netlink",
        negotiated=Negotiated(size=64 << 20, flags=FLAGS),
    )


def test_attachment_follows_sysfs(make_device: MakeDevice) -> None:
    base = make_device(2, size="131072", pid="42")
    att = _attachment(2)
    assert att.attached
    assert att.wait(timeout=0.05) is False  # still attached
    (base / "pid").unlink()  # someone else detached it
    assert not att.attached
    assert att.wait(timeout=0.05) is True


def test_detached_attachment_does_nothing_more(make_device: MakeDevice) -> None:
    make_device(3, size="131072", pid="42")
    att = _attachment(3)
    att._detached = True  # as after detach(): a second detach must not touch the device
    assert not att.attached
    att.detach(timeout=0)
    with att:
        pass


# --------------------------------------------------------------------------- handshake


@pytest.mark.interop
def test_connect_for_kernel_leaves_a_socket_for_the_kernel(
    nbdkit: Callable[..., Server],
) -> None:
    server = nbdkit("memory", "1M")
    sock, negotiated = connect_for_kernel(server.uri)
    with sock:
        assert negotiated.in_transmission and negotiated.size == 1 << 20
        # The kernel reads simple replies only, and owns a blocking socket.
        assert not negotiated.structured_replies and not negotiated.extended_headers
        assert sock.gettimeout() is None and sock.getblocking()
        sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, Cmd.READ, 7, 4096, 512))
        reply = _recv_exactly(sock, 16 + 512)
        assert struct.unpack(">IIQ", reply[:16]) == (SIMPLE_REPLY_MAGIC, 0, 7)
        assert reply[16:] == bytes(512)


@pytest.mark.interop
def test_connect_for_kernel_over_tcp_sets_nodelay_and_keepalive(
    nbdkit: Callable[..., Server],
) -> None:
    server = nbdkit("memory", "1M", tcp=True)
    sock, _ = connect_for_kernel(server.uri)
    with sock:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)


@pytest.mark.interop
def test_connect_for_kernel_refuses_an_empty_export(nbdkit: Callable[..., Server]) -> None:
    server = nbdkit("null", "0")
    with pytest.raises(InvalidRequest, match="the export's size is 0: nothing to attach"):
        connect_for_kernel(server.uri)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    sock.settimeout(30)
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "the server closed the connection"
        data += chunk
    return data
