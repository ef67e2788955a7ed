"""Server TLS: credentials and the :class:`ssl.SSLContext` a server upgrades with.

The NBD side of TLS (NBD_OPT_STARTTLS, the TLS modes) lives in the protocol core; the
session (:mod:`.session`) upgrades its transport with ``loop.start_tls`` when the core
says so. This module only turns credentials into a server context.

Two kinds of credentials, laid out as nbdkit and qemu-nbd read them:

- X.509. ``certificates`` names a directory with ``server-cert.pem`` and
  ``server-key.pem`` (nbdkit's ``--tls-certificates DIR``), plus ``ca-cert.pem`` (the
  CA that signs client certificates) and optionally ``ca-crl.pem`` (a revocation
  list). ``certfile``, ``keyfile`` and ``cafile`` name files directly and win over the
  directory. With ``verify_peer`` a client must present a certificate signed by the
  CA (nbdkit's ``--tls-verify-peer``); otherwise none is asked for.
- PSK. ``psk_file`` names a file of ``username:hexkey`` lines (nbdkit's ``--tls-psk``,
  GnuTLS's ``psktool``); a client proves it knows the key of the user it names.
  Python has server-side PSK only from 3.13
  (:meth:`ssl.SSLContext.set_psk_server_callback`); older versions get a
  :class:`~pynbd.errors.TLSError` that says so.
"""

from __future__ import annotations

import os
import re
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import TLSError

__all__ = ["ServerTLSConfig", "make_server_context", "read_psk_file"]

# File names inside a certificates directory (nbdkit --tls-certificates, qemu tls-creds-x509).
CA_CERT = "ca-cert.pem"
CA_CRL = "ca-crl.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"

_HEX_RE = re.compile(r"(?:[0-9A-Fa-f]{2})+")
_SSL_LOCATION_RE = re.compile(r"\s*\(_ssl\.c:\d+\)$")


@dataclass(frozen=True, slots=True)
class ServerTLSConfig:
    """A server's TLS credentials.

    Attributes:
        certificates: a directory with ``server-cert.pem``, ``server-key.pem`` and
            optionally ``ca-cert.pem`` and ``ca-crl.pem``.
        certfile: the server's certificate (chain), PEM; wins over the directory.
        keyfile: its private key (may be omitted when ``certfile`` holds it).
        cafile: the CA that signs client certificates, PEM; wins over the directory.
        verify_peer: demand a client certificate signed by the CA.
        psk_file: a file of ``username:hexkey`` lines; selects TLS-PSK (Python 3.13+)
            and excludes the X.509 settings.
    """

    certificates: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    cafile: str | None = None
    verify_peer: bool = False
    psk_file: str | None = None

    @property
    def is_psk(self) -> bool:
        """True when this configuration uses pre-shared keys rather than X.509."""
        return self.psk_file is not None


def read_psk_file(path: str) -> dict[str, bytes]:
    """Read every ``username:hexkey`` line of a PSK file.

    Blank lines are skipped; the first line for a user wins (as in nbdkit).

    Returns:
        username -> key.

    Raises:
        TLSError: the file cannot be read, a line is not ``username:hexkey`` with an
            even number of hex digits, or there is no key at all.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise TLSError(f"cannot read PSK file {path}: {exc.strerror or exc}") from exc
    keys: dict[str, bytes] = {}
    for number, raw in enumerate(data.split(b"\n"), 1):
        line = raw.removesuffix(b"\r").decode("utf-8", "replace")
        if not line.strip():
            continue
        user, colon, hexkey = line.partition(":")
        if not colon or not user or not _HEX_RE.fullmatch(hexkey):
            raise TLSError(f"PSK file {path}, line {number}: not USERNAME:HEXKEY")
        keys.setdefault(user, bytes.fromhex(hexkey))
    if not keys:
        raise TLSError(f"PSK file {path} holds no key")
    return keys


def make_server_context(cfg: ServerTLSConfig) -> ssl.SSLContext:
    """Build the server SSL context for ``cfg`` (TLS 1.2 or newer).

    Raises:
        TLSError: a file is missing or cannot be loaded, the settings contradict each
            other, or PSK is asked for on Python < 3.13.
    """
    if cfg.psk_file is not None:
        if cfg.certificates or cfg.certfile or cfg.keyfile or cfg.cafile or cfg.verify_peer:
            raise TLSError("TLS-PSK and X.509 settings cannot be combined")
        return _psk_context(cfg.psk_file)
    return _x509_context(cfg)


def _psk_context(path: str) -> ssl.SSLContext:
    if sys.version_info < (3, 13) or not getattr(ssl, "HAS_PSK", False):
        version = ".".join(str(n) for n in sys.version_info[:3])
        raise TLSError(f"a TLS-PSK server needs Python 3.13 or newer; this is Python {version}")
    keys = read_psk_file(path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # TLS 1.2: only suites authenticated by the key alone (there is no certificate).
    ctx.set_ciphers("aPSK")

    def callback(identity: str | None) -> bytes:
        # An empty key refuses the handshake: unknown users learn nothing more.
        return keys.get(identity or "", b"")

    setter: Callable[..., None] = ctx.set_psk_server_callback  # type: ignore[attr-defined,unused-ignore]
    setter(callback)
    return ctx


def _x509_context(cfg: ServerTLSConfig) -> ssl.SSLContext:
    certfile, keyfile, cafile, crlfile = cfg.certfile, cfg.keyfile, cfg.cafile, None
    if cfg.certificates is not None:
        d = cfg.certificates
        if not os.path.isdir(d):
            raise TLSError(f"TLS certificates directory {d} does not exist")
        if certfile is None:
            certfile = os.path.join(d, SERVER_CERT)
            keyfile = keyfile or os.path.join(d, SERVER_KEY)
            for path in (certfile, keyfile):
                if not os.path.exists(path):
                    raise TLSError(
                        f"TLS certificates directory {d} has no {os.path.basename(path)}"
                    )
        if cafile is None and os.path.exists(os.path.join(d, CA_CERT)):
            cafile = os.path.join(d, CA_CERT)
        if os.path.exists(os.path.join(d, CA_CRL)):
            crlfile = os.path.join(d, CA_CRL)
    if certfile is None:
        raise TLSError("a TLS server needs a certificate: give a certificates directory")
    if cfg.verify_peer and cafile is None:
        raise TLSError(f"verifying client certificates needs a CA certificate ({CA_CERT})")

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    what = f"server certificate {certfile}"
    try:
        ctx.load_cert_chain(certfile, keyfile)
        if cfg.verify_peer:
            assert cafile is not None  # checked above
            what = f"CA certificate {cafile}"
            ctx.load_verify_locations(cafile=cafile)
            if crlfile is not None:
                what = f"revocation list {crlfile}"
                ctx.load_verify_locations(cafile=crlfile)
                ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    except (OSError, ValueError) as exc:
        raise TLSError(f"cannot load {what}: {_describe(exc)}") from exc
    ctx.verify_mode = ssl.CERT_REQUIRED if cfg.verify_peer else ssl.CERT_NONE
    return ctx


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return _SSL_LOCATION_RE.sub("", exc.strerror)
    return _SSL_LOCATION_RE.sub("", str(exc)) or type(exc).__name__
