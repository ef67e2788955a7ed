"""NBD URIs: parse and format ``nbd://``, ``nbds://``, ``nbd+unix://``, ``nbds+unix://``.

The rules are those of the NBD URI specification (doc/uri.md in the NetworkBlockDevice/nbd
repository) as libnbd's ``nbd_connect_uri`` applies them:

- ``scheme://[user@]host[:port][/export][?query]``; the scheme must be followed by
  ``://``. The port defaults to 10809; an empty host means ``localhost``.
- The export name is the path without its leading ``/``, percent-decoded:
  ``nbd://h``, ``nbd://h/`` both name the default export ``""``; ``nbd://h//x`` names
  ``/x``.
- ``socket=PATH`` is required by the ``+unix`` schemes and forbidden by the others. In
  a ``+unix`` URI the host and port are ignored (as libnbd does); the user name is not.
- The user name of the authority is the TLS user name (for TLS-PSK).
- Query keys understood: ``socket``, ``tls-certificates``, ``tls-psk-file``,
  ``tls-username``, ``tls-hostname``, ``tls-verify-peer``. Unknown keys are ignored, as
  libnbd ignores them. ``&`` and ``;`` both separate parameters; a key given twice keeps
  its last value; ``key`` alone means ``key=`` and ``=value`` is skipped (libnbd's rules).

Stricter than libnbd, because each of these would otherwise be silently misread: a
fragment (``#...``), a password in the user info, an unbracketed IPv6 address, port 0 or
a port past 65535, a malformed ``%`` escape, a raw space or control character, an export
name that is not UTF-8, holds NUL or is longer than 4096 bytes, an empty ``socket=`` or
``tls-*=`` value, and a ``tls-username`` that contradicts the user name of the authority.
``nbd+vsock`` and ``nbds+vsock`` are recognised and refused as not supported.

Everything here is pure string work: nothing is resolved or opened.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from dataclasses import dataclass, field

from ..errors import URIError
from ..proto.constants import MAX_STRING

__all__ = ["DEFAULT_PORT", "NBDURI", "SCHEMES", "format_uri", "parse_uri"]

#: The IANA port of NBD, used when a URI names none.
DEFAULT_PORT = 10809

#: scheme -> (uses TLS, uses a unix socket)
SCHEMES: dict[str, tuple[bool, bool]] = {
    "nbd": (False, False),
    "nbds": (True, False),
    "nbd+unix": (False, True),
    "nbds+unix": (True, True),
}
_VSOCK_SCHEMES = frozenset({"nbd+vsock", "nbds+vsock"})

_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*):")
_BAD_CHAR_RE = re.compile(r"[\x00-\x20\x7f]")
_BAD_ESCAPE_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_PORT_RE = re.compile(r"[0-9]+")
_KNOWN_KEYS = frozenset(
    {
        "socket",
        "tls-certificates",
        "tls-psk-file",
        "tls-username",
        "tls-hostname",
        "tls-verify-peer",
    }
)
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})

# Characters left unescaped by to_uri(), per RFC 3986 section 3. Query values also escape
# "+" (some parsers read it as a space) and the separators "&", ";", "=".
_SAFE_PATH = "/:@!$&'()*+,;="
_SAFE_QUERY = "/:@!$'()*,"
_SAFE_USER = "!$&'()*+,;="
_SAFE_HOST = "!$&'()*+,;="


@dataclass(frozen=True, slots=True)
class NBDURI:
    """A parsed NBD URI.

    Build one with :func:`parse_uri`, or directly (the scheme decides ``tls``; a TCP URI
    without a host gets ``localhost`` and without a port gets 10809).

    Attributes:
        scheme: ``nbd``, ``nbds``, ``nbd+unix`` or ``nbds+unix`` (lower case).
        tls: True for the ``nbds`` schemes, where TLS is required (not an argument).
        host: the TCP host (IPv6 without brackets), or None for a unix socket.
        port: the TCP port, or None for a unix socket.
        socket_path: the unix socket path (a leading NUL names an abstract socket), or
            None for TCP.
        export_name: the export name, ``""`` for the default export.
        tls_certificates: ``tls-certificates=DIR``: the directory with ``ca-cert.pem``,
            ``client-cert.pem``, ``client-key.pem``.
        tls_verify_peer: ``tls-verify-peer=``: whether to verify the server (default True).
        tls_psk_file: ``tls-psk-file=FILE``: a PSK file of ``username:hexkey`` lines.
        tls_username: the TLS user name, from ``user@`` or ``tls-username=``.
        tls_hostname: ``tls-hostname=NAME``: the name to check the server's
            certificate against (and send as SNI) instead of ``host``. Over a unix
            socket it is the only name; without it ``tls-certificates`` must hold the
            server's CA (the system CAs are not trusted there).

    Raises:
        URIError: when the fields do not make a valid NBD URI.
    """

    scheme: str
    tls: bool = field(init=False, default=False)
    host: str | None = None
    port: int | None = None
    socket_path: str | None = None
    export_name: str = ""
    tls_certificates: str | None = None
    tls_verify_peer: bool = True
    tls_psk_file: str | None = None
    tls_username: str | None = None
    tls_hostname: str | None = None

    def __post_init__(self) -> None:
        scheme = self.scheme.lower() if isinstance(self.scheme, str) else self.scheme
        if scheme in _VSOCK_SCHEMES:
            raise URIError(f"{scheme} URIs are not supported")
        if scheme not in SCHEMES:
            raise URIError(
                f"unknown NBD URI scheme {self.scheme!r} "
                "(expected nbd, nbds, nbd+unix or nbds+unix)"
            )
        tls, unix = SCHEMES[scheme]
        object.__setattr__(self, "scheme", scheme)
        object.__setattr__(self, "tls", tls)
        if unix:
            if not self.socket_path:
                raise URIError(f"{scheme} URI needs a socket path (?socket=PATH)")
            if self.host is not None or self.port is not None:
                raise URIError(f"{scheme} URI takes no host or port")
            _check_no_nul(self.socket_path[1:], "socket path")
            _check_encodable(self.socket_path, "socket path", path=True)
        else:
            if self.socket_path is not None:
                plus = "nbds+unix" if tls else "nbd+unix"
                raise URIError(f"socket= cannot be used with {scheme}:// (use {plus}://)")
            if not self.host:
                object.__setattr__(self, "host", "localhost")
            if self.port is None:
                object.__setattr__(self, "port", DEFAULT_PORT)
            elif isinstance(self.port, bool) or not isinstance(self.port, int):
                raise URIError(f"port must be an integer, not {self.port!r}")
            elif not 0 < self.port < 65536:
                raise URIError(f"port {self.port} is out of range 1-65535")
            _check_host(self.host or "")
        _check_export_name(self.export_name)
        for what, value in (
            ("tls-certificates", self.tls_certificates),
            ("tls-psk-file", self.tls_psk_file),
            ("tls-username", self.tls_username),
            ("tls-hostname", self.tls_hostname),
        ):
            if value is not None:
                if value == "":
                    raise URIError(f"{what} is empty")
                _check_no_nul(value, what)
                _check_encodable(value, what, path=what in ("tls-certificates", "tls-psk-file"))

    @property
    def is_unix(self) -> bool:
        """True when the URI names a unix domain socket rather than a TCP address."""
        return self.socket_path is not None

    @property
    def endpoint(self) -> str:
        """Where the URI points, for messages: ``HOST:PORT`` or ``unix:PATH``."""
        if self.socket_path is not None:
            return f"unix:{self.socket_path}"
        host = self.host or ""
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def to_uri(self) -> str:
        """Return the canonical text of this URI; :func:`parse_uri` reads it back equal.

        The user name goes in the authority; the port is written only when it is not
        10809; the query keys come in a fixed order; ``tls-verify-peer=false`` is written
        only when verification is off.
        """
        parts = [self.scheme, "://"]
        if self.tls_username is not None:
            parts += [_quote(self.tls_username, _SAFE_USER), "@"]
        if self.host is not None:
            parts.append(_format_host(self.host))
            if self.port != DEFAULT_PORT:
                parts.append(f":{self.port}")
        parts += ["/", _quote(self.export_name, _SAFE_PATH)]
        query = [
            (key, value)
            for key, value in (
                ("socket", self.socket_path),
                ("tls-certificates", self.tls_certificates),
                ("tls-psk-file", self.tls_psk_file),
                ("tls-hostname", self.tls_hostname),
                ("tls-verify-peer", None if self.tls_verify_peer else "false"),
            )
            if value is not None
        ]
        if query:
            parts.append("?")
            parts.append("&".join(f"{k}={_quote(v, _SAFE_QUERY)}" for k, v in query))
        return "".join(parts)

    def __str__(self) -> str:
        return self.to_uri()


def parse_uri(uri: str) -> NBDURI:
    """Parse an NBD URI.

    Args:
        uri: the URI text, e.g. ``nbd://example.com/disk`` or
            ``nbds+unix://alice@/?socket=/run/nbd.sock&tls-psk-file=keys.psk``.

    Returns:
        The parsed :class:`NBDURI`.

    Raises:
        URIError: the text is not a usable NBD URI; the message says why, in one line.
    """
    if not isinstance(uri, str):
        raise URIError(f"an NBD URI must be a str, not {type(uri).__name__}")
    bad = _BAD_CHAR_RE.search(uri)
    if bad:
        raise URIError(
            f"NBD URI contains a space or control character at offset {bad.start()}; "
            "percent-encode it"
        )
    match = _SCHEME_RE.match(uri)
    if not match:
        hint = ""
        if uri.startswith("/"):
            hint = ': to open a local socket use "nbd+unix:///?socket=PATH"'
        elif uri.lower().startswith("localhost"):
            hint = ': to open a local port use "nbd://localhost" or "nbd://localhost:PORT"'
        raise URIError(
            "NBD URI does not have a scheme: valid NBD URIs start with "
            f"nbd://, nbds://, nbd+unix:// or nbds+unix://{hint}"
        )
    scheme = match.group(1).lower()
    if scheme in _VSOCK_SCHEMES:
        raise URIError(f"{scheme} URIs are not supported")
    if scheme not in SCHEMES:
        hint = ""
        if _PORT_RE.fullmatch(uri[match.end() :]):
            hint = f": to open a TCP port use nbd://{uri}"
        raise URIError(
            f"unknown NBD URI scheme {match.group(1)!r} "
            f"(expected nbd, nbds, nbd+unix or nbds+unix){hint}"
        )
    _tls, unix = SCHEMES[scheme]
    rest = uri[match.end() :]
    if not rest.startswith("//"):
        raise URIError(f"NBD URI must begin with '{scheme}://'")
    rest = rest[2:]
    if "#" in rest:
        raise URIError("NBD URI has a fragment ('#'); write '#' in export names as %23")
    rest, _, raw_query = rest.partition("?")
    slash = rest.find("/")
    authority, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])

    username, host, port = _parse_authority(authority)
    export_name = _unquote(path[1:], "export name") if path else ""
    query = _parse_query(raw_query)

    socket_path = query.get("socket")
    if unix and socket_path is None:
        raise URIError(f"{scheme} URI needs a socket parameter ({scheme}:///?socket=PATH)")
    if socket_path == "":
        raise URIError("socket= is empty")
    q_user = query.get("tls-username")
    if q_user is not None and username is not None and q_user != username:
        raise URIError(
            f"user name {username!r} and tls-username={q_user!r} disagree; give only one"
        )
    verify = query.get("tls-verify-peer")
    return NBDURI(
        scheme=scheme,
        host=None if unix else host,
        port=None if unix else port,
        socket_path=socket_path,
        export_name=export_name,
        tls_certificates=query.get("tls-certificates"),
        tls_verify_peer=True if verify is None else _parse_bool(verify, "tls-verify-peer"),
        tls_psk_file=query.get("tls-psk-file"),
        tls_username=username if username is not None else q_user,
        tls_hostname=query.get("tls-hostname"),
    )


def format_uri(
    *,
    host: str | None = None,
    port: int | None = None,
    socket_path: str | None = None,
    export_name: str = "",
    tls: bool = False,
    tls_certificates: str | None = None,
    tls_verify_peer: bool = True,
    tls_psk_file: str | None = None,
    tls_username: str | None = None,
    tls_hostname: str | None = None,
) -> str:
    """Build the canonical URI for a TCP address or a unix socket.

    The scheme follows from ``tls`` and from whether ``socket_path`` is given. The other
    arguments are the :class:`NBDURI` fields of the same names.

    Raises:
        URIError: both a host/port and a socket path were given, or a field is invalid.
    """
    if socket_path is not None and (host is not None or port is not None):
        raise URIError("give a host and port or a socket path, not both")
    scheme = ("nbds" if tls else "nbd") + ("+unix" if socket_path is not None else "")
    return NBDURI(
        scheme=scheme,
        host=host,
        port=port,
        socket_path=socket_path,
        export_name=export_name,
        tls_certificates=tls_certificates,
        tls_verify_peer=tls_verify_peer,
        tls_psk_file=tls_psk_file,
        tls_username=tls_username,
        tls_hostname=tls_hostname,
    ).to_uri()


def _parse_authority(authority: str) -> tuple[str | None, str, int | None]:
    """Split ``[user@]host[:port]`` (RFC 3986 section 3.2) into decoded parts."""
    userinfo, at, hostport = authority.rpartition("@")
    username: str | None = None
    if at:
        if ":" in userinfo:
            raise URIError("passwords in NBD URIs are not supported (user:password@)")
        username = _unquote(userinfo, "user name") or None
    port_text = ""
    if hostport.startswith("["):
        # RFC 3986 section 3.2.2 IP-literal; RFC 6874 zone IDs are written %25.
        end = hostport.find("]")
        if end < 0:
            raise URIError("NBD URI has '[' without ']' around an IPv6 address")
        literal = _unquote(hostport[1:end], "IPv6 address")
        after = hostport[end + 1 :]
        if after and not after.startswith(":"):
            raise URIError(f"unexpected {after!r} after the IPv6 address")
        port_text = after[1:]
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            raise URIError(f"{literal!r} is not an IPv6 address") from None
        host = literal
    else:
        host, _, port_text = hostport.partition(":")
        if ":" in port_text:
            raise URIError("IPv6 addresses in NBD URIs must be in brackets: nbd://[::1]/")
        host = _unquote(host, "host")
    port: int | None = None
    if port_text:
        if not _PORT_RE.fullmatch(port_text):
            raise URIError(f"port {port_text!r} is not a number")
        port = int(port_text)
        if not 0 < port < 65536:
            raise URIError(f"port {port} is out of range 1-65535")
    return username, host, port


def _parse_query(raw: str) -> dict[str, str]:
    """Decode the query into a dict, the last value of a repeated key winning.

    libnbd's rules (lib/uri.c ``parse_uri_queries``): ``&`` or ``;`` separate
    parameters, ``name`` alone means ``name=``, ``=value`` is skipped.
    """
    out: dict[str, str] = {}
    for part in re.split(r"[&;]", raw):
        if not part or part.startswith("="):
            continue
        name, _, value = part.partition("=")
        # Unknown keys are ignored whatever they hold, so decode names leniently.
        key = urllib.parse.unquote(name, errors="replace")
        if key not in _KNOWN_KEYS:
            continue
        if key in ("socket", "tls-certificates", "tls-psk-file"):
            # Paths are bytes to the kernel: keep undecodable ones (os.fsdecode's rule).
            out[key] = _unquote(value, f"{key}=", path=True)
        else:
            out[key] = _unquote(value, f"{key}=")
    return out


def _parse_bool(value: str, what: str) -> bool:
    low = value.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise URIError(f"{what}={value!r} must be true or false (or 1 or 0)")


def _unquote(text: str, what: str, *, path: bool = False) -> str:
    bad = _BAD_ESCAPE_RE.search(text)
    if bad:
        raise URIError(f"bad percent-escape {text[bad.start() : bad.start() + 3]!r} in {what}")
    raw = urllib.parse.unquote_to_bytes(text)
    try:
        return raw.decode("utf-8", "surrogateescape" if path else "strict")
    except UnicodeDecodeError:
        raise URIError(f"{what} is not valid UTF-8 after percent-decoding") from None


def _quote(text: str, safe: str) -> str:
    return urllib.parse.quote(text.encode("utf-8", "surrogateescape"), safe=safe)


def _format_host(host: str) -> str:
    if ":" in host:
        return "[" + host.replace("%", "%25") + "]"
    return _quote(host, _SAFE_HOST)


def _check_host(host: str) -> None:
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise URIError(f"host {host!r} has ':' but is not an IPv6 address") from None
    elif _BAD_CHAR_RE.search(host) or any(c in host for c in "/?#@[]%"):
        raise URIError(f"host {host!r} contains a character a host name cannot have")
    else:
        _check_encodable(host, "host")


def _check_encodable(value: str, what: str, *, path: bool = False) -> None:
    try:
        value.encode("utf-8", "surrogateescape" if path else "strict")
    except UnicodeEncodeError:
        raise URIError(f"{what} is not valid Unicode") from None


def _check_no_nul(value: str, what: str) -> None:
    if "\0" in value:
        raise URIError(f"{what} contains a NUL character")


def _check_export_name(name: str) -> None:
    if not isinstance(name, str):
        raise URIError(f"export name must be a str, not {type(name).__name__}")
    _check_no_nul(name, "export name")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise URIError("export name is not valid Unicode") from None
    # NBD spec, "Option haggling": strings are at most 4096 bytes.
    if size > MAX_STRING:
        raise URIError(f"export name is {size} bytes long; NBD allows at most {MAX_STRING}")
