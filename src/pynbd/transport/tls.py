"""Client TLS for NBD: configuration, SSL contexts and the handshake after STARTTLS.

The NBD exchange that leads up to TLS (``NBD_OPT_STARTTLS`` and its ACK) belongs to the
protocol core; this module only builds the :class:`ssl.SSLContext` and runs the handshake
on a socket that is ready for it.

Two kinds of credentials, as libnbd and nbdkit use them:

- X.509. ``certificates`` names a directory in libnbd/nbdkit's layout: ``ca-cert.pem``
  (the CA to trust; without it the system CAs are used), ``client-cert.pem`` and
  ``client-key.pem`` (a client certificate, used only when both are there) and
  ``ca-crl.pem`` (a revocation list, used when there). ``cafile``, ``certfile`` and
  ``keyfile`` name files directly and win over the directory. The server is verified by
  default: its chain always, and its name when there is one to check (see
  :meth:`TLSConfig.server_name`: over a unix socket only ``hostname`` gives one).
  Over a unix socket without ``hostname`` only a CA given for the purpose (a pinned
  CA: ``ca-cert.pem`` or ``cafile``) can vouch for the server: with the system CAs any
  certificate of any site would do, so :func:`make_client_context` refuses that and
  says which URI parameter to add. libnbd (1.14) verifies nothing at all over a unix
  socket without a hostname; qemu refuses to connect ("No hostname for certificate
  validation") and never uses the system CAs. ``tls-verify-peer=false`` still turns
  verification off.
- PSK. ``psk_file`` names a file of ``username:hexkey`` lines, as nbdkit reads and
  GnuTLS's ``psktool`` writes. The user name defaults to the local user name (libnbd's
  rule: ``$LOGNAME``, else the login name), never to ``"default"``. Python exposes
  client PSK only from 3.13 (:meth:`ssl.SSLContext.set_psk_client_callback`). When a
  PSK file is given it wins over any certificate setting, as in libnbd.

A trap with PSK in TLS 1.3: OpenSSL offers the key, but a server that does not take it
can answer with an ordinary certificate handshake, and a PSK context verifies no
certificates, so the handshake would succeed with an unauthenticated server.
:func:`wrap_socket` therefore refuses a PSK handshake in which the server sent a
certificate or (in TLS 1.3) did not accept the key. TLS 1.3 external PSKs are bound to
SHA-256 in OpenSSL; GnuTLS servers (nbdkit, qemu-nbd) pick a matching cipher suite.
"""

from __future__ import annotations

import os
import pwd
import re
import socket
import ssl
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import NBDError, NBDTimeout, TLSError

if TYPE_CHECKING:
    from .uri import NBDURI

__all__ = [
    "TLSConfig",
    "check_session",
    "default_tls_username",
    "make_client_context",
    "read_psk_key",
    "start_client_tls",
    "tls_error",
    "wrap_socket",
]

# File names inside a certificates directory (libnbd lib/crypto.c, nbdkit --tls-certificates).
CA_CERT = "ca-cert.pem"
CA_CRL = "ca-crl.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"

#: Over a unix socket with no name to check, the system CAs would vouch for any site.
_NO_NAME_NO_CA = (
    "TLS over a unix socket without tls-hostname would accept any certificate the system "
    "CAs vouch for: add tls-certificates=DIR (a directory with the server's CA as "
    "ca-cert.pem) or tls-hostname=NAME (the name in the server's certificate) to the "
    "URI, or tls-verify-peer=false to skip verification"
)

_HEX_RE = re.compile(r"(?:[0-9A-Fa-f]{2})+")
_SSL_LOCATION_RE = re.compile(r"\s*\(_ssl\.c:\d+\)$")


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """How a client sets up TLS.

    Attributes:
        certificates: a directory with ``ca-cert.pem`` and optionally
            ``client-cert.pem`` + ``client-key.pem`` and ``ca-crl.pem``.
        cafile: a PEM file of CAs to trust (wins over the directory's ``ca-cert.pem``);
            with neither, the system CAs are trusted, but only where a name is checked
            (TCP, or ``hostname``).
        certfile: a PEM client certificate (chain), sent when the server asks.
        keyfile: the private key of ``certfile`` (may be omitted when ``certfile``
            holds the key too).
        verify_peer: verify the server's certificate (chain and name). Turning this off
            makes the connection open to a man in the middle.
        hostname: the name to verify the server's certificate against and to send as
            SNI, instead of the host connected to. Over a unix socket this is the only
            name there is; without it only the chain is verified, and only against a
            CA given here (``certificates`` or ``cafile``), never the system CAs.
        psk_file: a file of ``username:hexkey`` lines; selects TLS-PSK (Python 3.13+).
        username: the PSK user name; default :func:`default_tls_username`.
        required: True to fail when the server refuses STARTTLS; False for
            opportunistic TLS (go on in plaintext). Read by the protocol driver, not here.
    """

    certificates: str | None = None
    cafile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    verify_peer: bool = True
    hostname: str | None = None
    psk_file: str | None = None
    username: str | None = None
    required: bool = True

    @property
    def is_psk(self) -> bool:
        """True when this configuration uses a pre-shared key rather than X.509."""
        return self.psk_file is not None

    def server_name(self, connect_host: str | None) -> str | None:
        """The name to verify and send as SNI: ``hostname``, else the host connected to.

        Args:
            connect_host: the TCP host being connected to, or None for a unix socket.
        """
        return self.hostname or connect_host or None

    @classmethod
    def from_uri(cls, uri: NBDURI) -> TLSConfig | None:
        """The TLS settings of an NBD URI, or None when its scheme does not use TLS.

        ``nbds://`` and ``nbds+unix://`` require TLS (``required=True``); libnbd does
        not use TLS for ``nbd://`` even when ``tls-*`` parameters are present.
        """
        if not uri.tls:
            return None
        return cls(
            certificates=uri.tls_certificates,
            verify_peer=uri.tls_verify_peer,
            hostname=uri.tls_hostname,
            psk_file=uri.tls_psk_file,
            username=uri.tls_username,
            required=True,
        )


class _PSKContext(ssl.SSLContext):
    """An SSL context set up for TLS-PSK; :func:`wrap_socket` checks its handshakes."""

    psk_identity: str


def default_tls_username() -> str:
    """The TLS user name used when none is given: libnbd's rule.

    ``$LOGNAME`` first (so the user can override it, and because there may be no
    controlling terminal), then the login name, then the name of the effective user.

    Raises:
        TLSError: no user name can be found.
    """
    name = os.environ.get("LOGNAME")
    if name:
        return name
    try:
        return os.getlogin()
    except OSError:
        pass
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        raise TLSError("cannot find the local user name for TLS; give a username") from None


def read_psk_key(path: str, username: str) -> bytes:
    """Read the key of ``username`` from a PSK file.

    The file holds ``username:hexkey`` lines (nbdkit ``--tls-psk``, GnuTLS ``psktool``).
    The first line for the user wins; other lines are not looked at, as in libnbd.

    Args:
        path: the PSK file.
        username: whose key to return.

    Returns:
        The key as bytes.

    Raises:
        TLSError: the file cannot be read, has no line for the user, or the key is not
            an even number of hex digits.
    """
    if ":" in username or "\n" in username:
        raise TLSError(f"TLS user name {username!r} cannot appear in a PSK file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise TLSError(f"cannot read PSK file {path}: {exc.strerror or exc}") from exc
    prefix = username.encode() + b":"
    for line in data.split(b"\n"):
        line = line.removesuffix(b"\r")
        if line.startswith(prefix):
            hexkey = line[len(prefix) :].decode("ascii", "replace")
            if not _HEX_RE.fullmatch(hexkey):
                raise TLSError(f"PSK file {path}: the key of user {username!r} is not hex digits")
            return bytes.fromhex(hexkey)
    raise TLSError(f"PSK file {path} has no key for user {username!r}")


def make_client_context(cfg: TLSConfig, server_hostname: str | None = None) -> ssl.SSLContext:
    """Build the client SSL context for ``cfg``.

    Args:
        cfg: the TLS settings.
        server_hostname: the TCP host being connected to, or None for a unix socket.
            With ``cfg.hostname`` it decides whether the server's name is checked.

    Returns:
        A context that requires TLS 1.2 or newer. For X.509 it verifies the server
        unless ``cfg.verify_peer`` is False. Pass it to :func:`wrap_socket` with
        ``cfg.server_name(server_hostname)``.

    Raises:
        TLSError: a file cannot be read or parsed, PSK is asked for on Python < 3.13,
            or the server could not be verified (no name to check and no CA of its own).
    """
    if cfg.psk_file is not None:
        return _psk_context(cfg.psk_file, cfg.username)
    return _x509_context(cfg, cfg.server_name(server_hostname))


def _psk_context(psk_file: str, username: str | None) -> ssl.SSLContext:
    if sys.version_info < (3, 13):
        version = ".".join(str(n) for n in sys.version_info[:3])
        raise TLSError(f"TLS-PSK needs Python 3.13 or newer; this is Python {version}")
    identity = username or default_tls_username()
    key = read_psk_key(psk_file, identity)
    ctx = _PSKContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.psk_identity = identity
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # The key authenticates the server: no certificate is wanted or checked.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    # TLS 1.2: only suites authenticated by the PSK (not RSA-PSK, which adds a server
    # certificate that wrap_socket would refuse). TLS 1.3 suites are not affected.
    ctx.set_ciphers("aPSK")

    def callback(hint: str | None) -> tuple[str | None, bytes]:
        return identity, key

    ctx.set_psk_client_callback(callback)
    return ctx


def _x509_context(cfg: TLSConfig, name: str | None) -> ssl.SSLContext:
    cafile, certfile, keyfile, crlfile = cfg.cafile, cfg.certfile, cfg.keyfile, None
    if cfg.certificates is not None:
        d = cfg.certificates
        if not os.path.isdir(d):
            raise TLSError(f"TLS certificates directory {d} does not exist")
        if cafile is None and os.path.exists(os.path.join(d, CA_CERT)):
            cafile = os.path.join(d, CA_CERT)
        if os.path.exists(os.path.join(d, CA_CRL)):
            crlfile = os.path.join(d, CA_CRL)
        cert, key = os.path.join(d, CLIENT_CERT), os.path.join(d, CLIENT_KEY)
        if certfile is None and os.path.exists(cert) and os.path.exists(key):
            certfile, keyfile = cert, key
    if keyfile is not None and certfile is None:
        raise TLSError("a TLS client key was given without its certificate")

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if cafile is not None:
            what = f"CA certificate {cafile}"
            ctx.load_verify_locations(cafile=cafile)
        else:
            what = "the system CA certificates"
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        if crlfile is not None:
            what = f"revocation list {crlfile}"
            ctx.load_verify_locations(cafile=crlfile)
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        if certfile is not None:
            what = f"client certificate {certfile}"
            ctx.load_cert_chain(certfile, keyfile)
    except (OSError, ValueError) as exc:
        raise TLSError(f"cannot load {what}: {_describe(exc)}") from exc
    if cfg.verify_peer and name is None and cafile is None:
        raise TLSError(_NO_NAME_NO_CA)
    if cfg.verify_peer:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.check_hostname = name is not None
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def wrap_socket(
    sock: socket.socket,
    ctx: ssl.SSLContext,
    server_hostname: str | None = None,
    timeout: float | None = None,
) -> ssl.SSLSocket:
    """Run the client TLS handshake on ``sock`` (right after the server ACKed STARTTLS).

    Args:
        sock: a connected stream socket; it is taken over (detached) and must not be
            used afterwards, even when this fails (it is closed then).
        ctx: a context from :func:`make_client_context`.
        server_hostname: the name to verify and send as SNI, normally
            ``cfg.server_name(host)``; None when there is none (unix socket).
        timeout: the time limit of the handshake in seconds, None for none. The
            socket's previous timeout is restored afterwards.

    Returns:
        The TLS socket, handshake done.

    Raises:
        TLSError: the handshake failed (bad certificate, wrong key, server hung up...).
        NBDTimeout: the handshake did not finish within ``timeout``.

    With TLS 1.3 the server checks a client certificate after the client has finished
    its handshake, so a rejected client certificate shows up on the first read;
    :func:`tls_error` translates that error.
    """
    previous = sock.gettimeout()
    try:
        sock.settimeout(timeout)
        ssock = ctx.wrap_socket(
            sock, server_hostname=server_hostname, do_handshake_on_connect=False
        )
    except (OSError, ValueError) as exc:
        sock.close()
        raise tls_error(exc) from exc
    psk = isinstance(ctx, _PSKContext)
    try:
        ssock.do_handshake()
        if isinstance(ctx, _PSKContext):
            _check_psk_handshake(ssock, ctx)
        ssock.settimeout(previous)
    except (OSError, ValueError) as exc:
        ssock.close()
        raise tls_error(exc, psk=psk) from exc
    except BaseException:
        ssock.close()
        raise
    return ssock


def start_client_tls(
    sock: socket.socket,
    cfg: TLSConfig,
    connect_host: str | None = None,
    *,
    timeout: float | None = None,
) -> ssl.SSLSocket:
    """:func:`make_client_context` then :func:`wrap_socket` with the right name.

    Args:
        sock: a connected socket whose STARTTLS was just ACKed; taken over.
        cfg: the TLS settings.
        connect_host: the TCP host connected to, or None for a unix socket.
        timeout: the time limit of the handshake in seconds, None for none.

    Raises:
        TLSError, NBDTimeout: as :func:`make_client_context` and :func:`wrap_socket`.
    """
    try:
        ctx = make_client_context(cfg, connect_host)
    except BaseException:
        sock.close()
        raise
    return wrap_socket(sock, ctx, cfg.server_name(connect_host), timeout)


def tls_error(exc: BaseException, *, psk: bool = False) -> NBDError:
    """Translate an error raised by a TLS socket into a pynbd error (one line).

    Args:
        exc: the error from the handshake or from a read or write on a TLS socket.
        psk: True when the context used a pre-shared key (for a better hint).

    Returns:
        :class:`NBDTimeout` for a timeout, else :class:`TLSError`.
    """
    if isinstance(exc, TLSError | NBDTimeout):
        return exc
    if isinstance(exc, TimeoutError):
        return NBDTimeout("TLS timed out")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return TLSError(f"server certificate verification failed: {exc.verify_message}")
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError | ConnectionError):
        hint = " (wrong pre-shared key or user name?)" if psk else ""
        return TLSError(f"the server closed the connection during TLS{hint}")
    return TLSError(f"TLS failed: {_describe(exc)}")


def check_session(session: ssl.SSLSocket | ssl.SSLObject, ctx: ssl.SSLContext) -> None:
    """Check a finished client handshake made with ``ctx`` (for drivers that do the
    handshake themselves, such as asyncio's ``start_tls``).

    Raises:
        TLSError: a PSK context's server did not authenticate with the key.
    """
    if isinstance(ctx, _PSKContext):
        _check_psk_handshake(session, ctx)


def _check_psk_handshake(ssock: ssl.SSLSocket | ssl.SSLObject, ctx: _PSKContext) -> None:
    # See the module docstring: a server that ignored the key must not get through.
    if ssock.getpeercert(binary_form=True) is not None:
        raise TLSError(
            "the server answered with a certificate instead of the pre-shared key "
            f"of user {ctx.psk_identity!r}"
        )
    if ssock.version() == "TLSv1.3" and not ssock.session_reused:
        raise TLSError(f"the server did not accept the pre-shared key of {ctx.psk_identity!r}")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return _SSL_LOCATION_RE.sub("", exc.strerror)
    return _SSL_LOCATION_RE.sub("", str(exc)) or type(exc).__name__
