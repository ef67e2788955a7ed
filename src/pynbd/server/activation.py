"""Sockets handed over by a supervisor: systemd socket activation and inetd.

- systemd socket activation (``sd_listen_fds(3)``): the supervisor binds and listens,
  then starts the server with the sockets as file descriptors 3, 4, ... and the
  environment ``LISTEN_PID`` (the server's pid, so a child does not take them) and
  ``LISTEN_FDS`` (how many). libnbd starts servers this way
  (``nbdinfo -- [ CMD ARGS ]``, ``nbd_connect_systemd_socket_activation``).
- inetd: one connection, already accepted, on standard input (and output); the server
  serves it and exits. libnbd's ``nbd_connect_command`` starts servers this way, with
  one end of a socketpair as stdin and stdout.
"""

from __future__ import annotations

import os
import socket
import stat

__all__ = [
    "LISTEN_FDS_START",
    "inetd_socket",
    "listen_fds",
    "socket_activated",
]

#: The first file descriptor of socket activation (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3
_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def socket_activated() -> bool:
    """True when the environment hands this process sockets (LISTEN_PID is our pid)."""
    return os.environ.get("LISTEN_PID", "").strip() == str(os.getpid())


def listen_fds(*, unset_environment: bool = True) -> list[socket.socket]:
    """The listening sockets passed by socket activation; [] when there are none.

    Args:
        unset_environment: remove LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES from the
            environment, so that child processes do not see them (as sd_listen_fds).

    Returns:
        The sockets, close-on-exec, in descriptor order; the caller owns them.

    Raises:
        ValueError: LISTEN_FDS is not a number, or a descriptor is not an open stream
            socket.
    """
    ours = socket_activated()
    count = os.environ.get("LISTEN_FDS", "")
    if unset_environment:
        for name in _VARIABLES:
            os.environ.pop(name, None)
    if not ours:
        return []
    try:
        n = int(count)
    except ValueError:
        raise ValueError(f"LISTEN_FDS={count!r} is not a number") from None
    if n < 0:
        raise ValueError(f"LISTEN_FDS={count!r} is negative")
    sockets: list[socket.socket] = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + n):
        try:
            mode = os.fstat(fd).st_mode
        except OSError as exc:
            raise ValueError(f"socket activation: descriptor {fd} is not open") from exc
        if not stat.S_ISSOCK(mode):
            raise ValueError(f"socket activation: descriptor {fd} is not a socket")
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        if sock.type != socket.SOCK_STREAM:
            sock.detach()
            raise ValueError(f"socket activation: descriptor {fd} is not a stream socket")
        sockets.append(sock)
    return sockets


def inetd_socket() -> socket.socket:
    """Standard input as a connected socket, for inetd-style serving.

    Descriptors 0 and 1 are then pointed at /dev/null: nothing printed by accident can
    corrupt the NBD stream, and the connection ends when the returned socket is
    closed (not when the last of three descriptors is).

    Raises:
        ValueError: standard input is not a stream socket.
    """
    try:
        mode = os.fstat(0).st_mode
    except OSError as exc:
        raise ValueError("standard input is closed") from exc
    if not stat.S_ISSOCK(mode):
        raise ValueError("standard input is not a socket (--inetd serves a socket on fd 0)")
    sock = socket.socket(fileno=os.dup(0))
    if sock.type != socket.SOCK_STREAM:
        sock.close()
        raise ValueError("standard input is not a stream socket")
    null = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(null, 0)
        os.dup2(null, 1)
    finally:
        os.close(null)
    return sock
