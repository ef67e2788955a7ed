"""Open the byte stream an NBD client talks over: TCP or a unix domain socket.

Nothing here speaks NBD. TCP sockets get ``TCP_NODELAY`` (NBD requests are small and
latency-bound: NBD-NOTES rule 12) and ``SO_KEEPALIVE`` (an idle dead peer is otherwise
never noticed: the kernel's NBD timeout only runs while requests are outstanding).
Failures are raised as pynbd errors with one-line messages, so a command-line tool can
print them as they are.
"""

from __future__ import annotations

import socket
import time

from ..errors import ConnectionClosed, NBDTimeout
from .uri import DEFAULT_PORT, NBDURI

__all__ = ["open_stream"]


def open_stream(
    uri: NBDURI | None = None,
    *,
    host: str | None = None,
    port: int | None = None,
    path: str | None = None,
    timeout: float | None = None,
) -> socket.socket:
    """Connect to an NBD server's address and return the connected socket.

    Give exactly one of: ``uri``; ``host`` (with an optional ``port``, default 10809);
    ``path`` (a unix socket; a leading NUL names an abstract socket).

    For TCP every address ``getaddrinfo`` gives is tried in turn, within one overall
    ``timeout``. TLS is not started here (NBD starts it with NBD_OPT_STARTTLS, after
    the greeting).

    Args:
        uri: a parsed NBD URI; its host/port or socket path are used.
        host: a host name or IP address (IPv6 with or without brackets).
        port: the TCP port.
        path: the unix socket path.
        timeout: seconds for the whole connect, None to wait as long as the OS does.
            The returned socket keeps this timeout (as :func:`socket.create_connection`
            does); set another with ``settimeout``.

    Returns:
        A connected stream socket, owned by the caller.

    Raises:
        ConnectionClosed: the connection could not be made (refused, unreachable,
            unknown host, no such socket...); the message names the address and the
            reason, and the OSError is chained.
        NBDTimeout: ``timeout`` passed before a connection was made.
        ValueError: the arguments do not name exactly one address, or the port is
            out of range.
    """
    if uri is not None:
        if host is not None or port is not None or path is not None:
            raise ValueError("give a URI or host/port or path, not several")
        if uri.socket_path is not None:
            return _open_unix(uri.socket_path, timeout)
        host, port = uri.host, uri.port
    elif path is not None:
        if host is not None or port is not None:
            raise ValueError("give host/port or path, not both")
        return _open_unix(path, timeout)
    if host is None:
        raise ValueError("give a URI, a host or a unix socket path")
    if port is None:
        port = DEFAULT_PORT
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"port must be an integer in 1-65535, not {port!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return _open_tcp(host, port, timeout)


def _open_unix(path: str, timeout: float | None) -> socket.socket:
    shown = "@" + path[1:] if path.startswith("\0") else path
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = 0.005
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
        except BlockingIOError as exc:
            # With a timeout Python connects in non-blocking mode, and a unix listener
            # whose backlog is full answers EAGAIN at once instead of making us wait:
            # retry until the deadline, as a blocking connect would wait.
            sock.close()
            if deadline is None or time.monotonic() + delay > deadline:
                raise NBDTimeout(f"cannot connect to unix socket {shown}: timed out") from exc
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
            continue
        except TimeoutError as exc:
            sock.close()
            raise NBDTimeout(f"cannot connect to unix socket {shown}: timed out") from exc
        except OSError as exc:
            sock.close()
            raise ConnectionClosed(
                f"cannot connect to unix socket {shown}: {_reason(exc)}"
            ) from exc
        return sock


def _open_tcp(host: str, port: int, timeout: float | None) -> socket.socket:
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise ConnectionClosed(f"cannot resolve {host}: {_reason(exc)}") from exc
    deadline = None if timeout is None else time.monotonic() + timeout
    errors: list[str] = []
    last: OSError | None = None
    timed_out = False
    for family, type_, proto, _canon, addr in infos:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            timed_out = True
            errors.append("timed out")
            break
        sock = socket.socket(family, type_, proto)
        try:
            sock.settimeout(remaining)
            sock.connect(addr)
        except OSError as exc:
            sock.close()
            last = exc
            if isinstance(exc, TimeoutError):
                timed_out = True
                reason = "timed out"
            else:
                reason = _reason(exc)
            if len(infos) > 1:
                reason = f"{addr[0]}: {reason}"
            if reason not in errors:
                errors.append(reason)
            continue
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.settimeout(timeout)
        except BaseException:
            sock.close()
            raise
        return sock
    message = f"cannot connect to {where}: {'; '.join(errors) or 'no address found'}"
    if timed_out:
        raise NBDTimeout(message) from last
    raise ConnectionClosed(message) from last


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
