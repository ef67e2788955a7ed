"""The host's own kernel: generic-netlink sockets (pynbd.kernel.nlsocket), ioctl errors.

This host has no nbd driver, so these tests talk to the generic-netlink controller
("nlctrl") itself, check that looking "nbd" up explains what is missing, and check the
ioctl wrappers' error path on a device that is not an nbd device (/dev/null). The
driver itself is tested in a guest (tests/kernel/).
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pynbd.errors import InvalidRequest, NBDError
from pynbd.kernel import ioctl
from pynbd.kernel import netlink as nl
from pynbd.kernel.errors import FamilyNotFound, KernelError
from pynbd.kernel.nlsocket import GenlSocket


@pytest.fixture
def nlsock() -> Iterator[GenlSocket]:
    with GenlSocket(timeout=5.0) as s:
        yield s


def test_resolve_nlctrl(nlsock: GenlSocket) -> None:
    family = nlsock.resolve_family("nlctrl")
    assert family.id == nl.GENL_ID_CTRL
    assert family.name == "nlctrl"
    assert family.version >= 1
    assert family.group_id("notify") is not None


def test_requests_in_a_row_match_their_replies(nlsock: GenlSocket) -> None:
    first = nlsock.resolve_family("nlctrl")
    for _ in range(5):
        assert nlsock.resolve_family("nlctrl") == first
    assert not nlsock.pending


def test_dump_every_family(nlsock: GenlSocket) -> None:
    # A real multi-part answer: NEWFAMILY messages, several to a datagram, then DONE.
    flags = nl.NlmFlag.REQUEST | nl.NlmFlag.ACK | nl.NlmFlag.DUMP
    data = nl.encode_request(
        nl.GENL_ID_CTRL, nl.CtrlCmd.GETFAMILY, nl.CTRL_VERSION, seq=nlsock.next_seq(), flags=flags
    )
    replies = nlsock.request(data, call="CTRL_CMD_GETFAMILY dump")
    assert all(r.flags & nl.NlmFlag.MULTI for r in replies)
    families = {f.name: f for f in map(nl.decode_family, replies)}
    assert families["nlctrl"] == nlsock.resolve_family("nlctrl")
    assert not nlsock.pending


def test_datagram_larger_than_the_buffer(nlsock: GenlSocket) -> None:
    nlsock._buf = bytearray(16)  # the next answer is bigger: the buffer must grow
    assert nlsock.resolve_family("nlctrl").name == "nlctrl"
    assert len(nlsock._buf) > 16


def test_resolve_nbd_without_the_driver(nlsock: GenlSocket) -> None:
    try:
        family, group = nlsock.resolve_nbd()
    except FamilyNotFound as exc:
        assert str(exc) == "the nbd driver is not loaded (modprobe nbd)"
        assert exc.errno == errno.ENOENT
        assert exc.family == "nbd"
        assert isinstance(exc, KernelError)
        assert isinstance(exc, NBDError)
        assert isinstance(exc, OSError)
        assert not Path("/sys/module/nbd").exists()
    else:
        # A host that has the driver (the lookup may even have loaded it).
        assert Path("/sys/module/nbd").exists()
        assert family.name == "nbd"
        assert family.version == nl.NBD_GENL_VERSION
        assert group > 0


def test_resolve_unknown_family(nlsock: GenlSocket) -> None:
    with pytest.raises(FamilyNotFound, match="'pynbd-nonesuch' not found") as info:
        nlsock.resolve_family("pynbd-nonesuch")
    assert info.value.errno == errno.ENOENT


def test_kernel_error_names_the_call(nlsock: GenlSocket) -> None:
    # No family has id 0xffff (ids stop at 1023): the kernel answers ENOENT.
    data = nl.encode_status(0xFFFF, seq=nlsock.next_seq())
    with pytest.raises(KernelError) as info:
        nlsock.request(data, call="NBD_CMD_STATUS", device="/dev/nbd7")
    assert info.value.errno == errno.ENOENT
    assert info.value.call == "NBD_CMD_STATUS"
    assert str(info.value).startswith("/dev/nbd7: NBD_CMD_STATUS: ")


def test_unsupported_command(nlsock: GenlSocket) -> None:
    data = nl.encode_request(nl.GENL_ID_CTRL, 99, nl.CTRL_VERSION, seq=nlsock.next_seq())
    with pytest.raises(KernelError) as info:
        nlsock.request(data, call="CTRL_CMD_99")
    assert info.value.errno == errno.EOPNOTSUPP


def test_subscribe(nlsock: GenlSocket) -> None:
    group = nlsock.resolve_family("nlctrl").group_id("notify")
    assert group is not None
    nlsock.subscribe(group)
    with pytest.raises(KernelError) as info:
        nlsock.subscribe(0)
    assert info.value.call == "NETLINK_ADD_MEMBERSHIP"
    with pytest.raises(InvalidRequest):
        nlsock.subscribe(1 << 32)


def test_receive_times_out() -> None:
    with GenlSocket(timeout=0.2) as s:
        with pytest.raises(KernelError) as info:
            s.receive()
        assert info.value.errno == errno.ETIMEDOUT


def send_to(port: int, data: bytes) -> None:
    """Send a datagram to a user netlink port, as root may (skip the test otherwise)."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, nl.NETLINK_GENERIC) as sender:
        sender.bind((0, 0))
        try:
            sender.sendto(data, (port, 0))
        except PermissionError:
            pytest.skip("sending to a user netlink port needs CAP_NET_ADMIN")


def test_unsolicited_messages_wait_for_receive(nlsock: GenlSocket) -> None:
    # As root, one netlink socket may send to another's port: stand in for the kernel's
    # LINK_DEAD event (seq 0, port 0) and for a stale answer (another sequence number).
    event = nl.encode_link_dead(0x1A, 4)
    stale = nl.encode_connect_reply(0x1A, 9, seq=0xFFFF, pid=nlsock.port_id)
    send_to(nlsock.port_id, event + stale)
    # The request reads past both messages to find its own reply, and keeps them.
    assert nlsock.resolve_family("nlctrl").id == nl.GENL_ID_CTRL
    assert nlsock.pending
    got = nlsock.receive()
    assert not nlsock.pending
    assert len(got) == 2
    dead, reply = got
    assert isinstance(dead, nl.GenlMessage)
    assert isinstance(reply, nl.GenlMessage)
    assert nl.decode_link_dead(dead) == 4
    assert nl.decode_connect_reply(reply) == 9


def test_sequence_numbers_wrap() -> None:
    with GenlSocket() as s:
        s._seq = 0xFFFFFFFF  # the last one
        assert s.next_seq() == 1
        assert s.next_seq() == 2


# --- ioctl: request codes and the error path ------------------------------------------


def test_ioctl_request_codes() -> None:
    # _IO(0xab, n) from include/uapi/asm-generic/ioctl.h: no direction, no size.
    generic = {
        "SET_SOCK": 0xAB00,
        "SET_BLKSIZE": 0xAB01,
        "SET_SIZE": 0xAB02,
        "DO_IT": 0xAB03,
        "CLEAR_SOCK": 0xAB04,
        "CLEAR_QUE": 0xAB05,
        "PRINT_DEBUG": 0xAB06,
        "SET_SIZE_BLOCKS": 0xAB07,
        "DISCONNECT": 0xAB08,
        "SET_TIMEOUT": 0xAB09,
        "SET_FLAGS": 0xAB0A,
    }
    for n, (name, code) in enumerate(generic.items()):
        assert ioctl.ioc_none(0xAB, n, "x86_64") == code
        assert ioctl.ioc_none(0xAB, n, "aarch64") == code
        # powerpc, mips, sparc and alpha: _IOC_NONE is 1 in 3 direction bits at bit 29.
        assert ioctl.ioc_none(0xAB, n, "ppc64le") == 0x20000000 | code
        assert ioctl.ioc_none(0xAB, n, "mips64") == 0x20000000 | code
        assert ioctl.Ioctl[name] == ioctl.ioc_none(0xAB, n)


@pytest.fixture
def devnull() -> Iterator[int]:
    fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


@pytest.mark.parametrize("size", [4096, 2**31 - 1, 2**31, 2**40, 2**64 - 1])
def test_ioctl_error_names_device_and_call(devnull: int, size: int) -> None:
    # Above INT_MAX the call goes through ctypes; the kernel's answer is the same.
    with pytest.raises(KernelError) as info:
        ioctl.set_size(devnull, size)
    assert info.value.errno == errno.ENOTTY
    assert info.value.device == "/dev/null"
    assert info.value.call == "NBD_SET_SIZE"
    assert str(info.value) == f"/dev/null: NBD_SET_SIZE: {os.strerror(errno.ENOTTY)}"


def test_every_ioctl_wrapper_reaches_the_kernel(devnull: int) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        calls: list[tuple[str, Callable[[], None]]] = [
            ("NBD_SET_SOCK", lambda: ioctl.set_sock(devnull, sock)),
            ("NBD_SET_BLKSIZE", lambda: ioctl.set_blksize(devnull, 512)),
            ("NBD_SET_SIZE_BLOCKS", lambda: ioctl.set_size_blocks(devnull, 8)),
            ("NBD_SET_TIMEOUT", lambda: ioctl.set_timeout(devnull, 30)),
            ("NBD_SET_FLAGS", lambda: ioctl.set_flags(devnull, 1)),
            ("NBD_DO_IT", lambda: ioctl.do_it(devnull)),
            ("NBD_CLEAR_SOCK", lambda: ioctl.clear_sock(devnull)),
            ("NBD_CLEAR_QUE", lambda: ioctl.clear_que(devnull)),
            ("NBD_PRINT_DEBUG", lambda: ioctl.print_debug(devnull)),
            ("NBD_DISCONNECT", lambda: ioctl.disconnect(devnull)),
        ]
        for name, call in calls:
            with pytest.raises(KernelError) as info:
                call()
            assert info.value.errno == errno.ENOTTY
            assert info.value.call == name


def test_ioctl_accepts_file_objects_and_a_device_name() -> None:
    with open("/dev/null", "rb") as f, pytest.raises(KernelError) as info:
        ioctl.disconnect(f, device="nbd3")
    assert str(info.value).startswith("nbd3: NBD_DISCONNECT: ")


@pytest.mark.parametrize("value", [-1, 2**64])
def test_ioctl_argument_out_of_range(devnull: int, value: int) -> None:
    with pytest.raises(InvalidRequest):
        ioctl.set_size(devnull, value)


def test_messages_after_the_ack_are_kept(nlsock: GenlSocket) -> None:
    # A datagram that holds the ack of our request and then an event: the event must
    # not be dropped with the rest of the datagram.
    seq = nlsock.next_seq()
    request = nl.encode_status(0xFFFF, seq=seq)
    ack = nl.ErrorMessage(
        errno=0,
        request=nl.NlMsgHdr.unpack(request[:16]),
        flags=nl.NLM_F_CAPPED,
        seq=seq,
        pid=nlsock.port_id,
    ).pack()
    send_to(nlsock.port_id, ack + nl.encode_link_dead(0x1A, 6))
    # The request itself goes to the kernel, which refuses it (no family 0xffff), but
    # the forged ack was queued first and ends the call; receive() then returns what
    # was kept without reading further.
    assert nlsock.request(request, call="NBD_CMD_STATUS") == []
    assert nlsock.pending
    events = nlsock.receive()
    assert [nl.decode_link_dead(e) for e in events if isinstance(e, nl.GenlMessage)] == [6]
