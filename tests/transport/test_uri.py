"""NBD URI parsing and formatting (pynbd.transport.uri).

Expected values follow the NBD URI spec (doc/uri.md) and libnbd's nbd_connect_uri.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pynbd.errors import NBDError, URIError
from pynbd.transport.uri import DEFAULT_PORT, NBDURI, format_uri, parse_uri


def fields(u: NBDURI) -> dict[str, Any]:
    return {f.name: getattr(u, f.name) for f in dataclasses.fields(u)}


DEFAULTS: dict[str, Any] = {
    "scheme": "nbd",
    "tls": False,
    "host": "localhost",
    "port": DEFAULT_PORT,
    "socket_path": None,
    "export_name": "",
    "tls_certificates": None,
    "tls_verify_peer": True,
    "tls_psk_file": None,
    "tls_username": None,
    "tls_hostname": None,
}

GOOD: list[tuple[str, dict[str, Any]]] = [
    # The examples of libnbd's nbd_connect_uri(3) and of doc/uri.md.
    ("nbd://example.com", {"host": "example.com"}),
    ("nbds://example.com", {"scheme": "nbds", "tls": True, "host": "example.com"}),
    (
        "nbd+unix:///foo?socket=/tmp/nbd.sock",
        {
            "scheme": "nbd+unix",
            "host": None,
            "port": None,
            "socket_path": "/tmp/nbd.sock",
            "export_name": "foo",
        },
    ),
    (
        "nbds+unix://alice@/?socket=/tmp/nbd.sock&tls-certificates=certs",
        {
            "scheme": "nbds+unix",
            "tls": True,
            "host": None,
            "port": None,
            "socket_path": "/tmp/nbd.sock",
            "tls_certificates": "certs",
            "tls_username": "alice",
        },
    ),
    ("nbd://example.com:10809/export", {"host": "example.com", "export_name": "export"}),
    ("nbd://example.com/disk", {"host": "example.com", "export_name": "disk"}),
    ("nbd://example.com/", {"host": "example.com"}),
    ("nbd://example.com//disk", {"host": "example.com", "export_name": "/disk"}),
    ("nbd://example.com/hello%20world", {"host": "example.com", "export_name": "hello world"}),
    # Host and port forms.
    ("nbd://127.0.0.1:1234/", {"host": "127.0.0.1", "port": 1234}),
    ("nbd://[::1]:1234/x", {"host": "::1", "port": 1234, "export_name": "x"}),
    ("nbd://[::1]", {"host": "::1"}),
    ("nbd://[fe80::1%25eth0]/", {"host": "fe80::1%eth0"}),
    ("nbd://h:/", {"host": "h"}),  # empty port: the default (RFC 3986 3.2.3)
    ("nbd://", {}),  # no host: localhost, as libnbd
    ("nbd:///", {}),
    ("NBDS://h", {"scheme": "nbds", "tls": True, "host": "h"}),  # schemes ignore case
    ("nbd://h/%E2%82%AC", {"host": "h", "export_name": "\u20ac"}),
    ("nbd://h/\u20ac", {"host": "h", "export_name": "\u20ac"}),  # raw non-ASCII tolerated
    ("nbd://h/a+b", {"host": "h", "export_name": "a+b"}),  # "+" is not a space
    ("nbd://h/a?b=c", {"host": "h", "export_name": "a"}),  # unknown keys ignored (libnbd)
    # Query parameters.
    (
        "nbds://bob@h/?tls-psk-file=/k.psk&tls-verify-peer=false&tls-hostname=srv",
        {
            "scheme": "nbds",
            "tls": True,
            "host": "h",
            "tls_username": "bob",
            "tls_psk_file": "/k.psk",
            "tls_verify_peer": False,
            "tls_hostname": "srv",
        },
    ),
    (
        "nbds://h?tls-verify-peer=0",
        {"scheme": "nbds", "tls": True, "host": "h", "tls_verify_peer": False},
    ),
    ("nbds://h?tls-verify-peer=1", {"scheme": "nbds", "tls": True, "host": "h"}),
    ("nbds://h?tls-verify-peer=TRUE", {"scheme": "nbds", "tls": True, "host": "h"}),
    (
        "nbds://h?tls-username=carol",
        {"scheme": "nbds", "tls": True, "host": "h", "tls_username": "carol"},
    ),
    (
        "nbds://carol@h?tls-username=carol",
        {"scheme": "nbds", "tls": True, "host": "h", "tls_username": "carol"},
    ),
    ("nbds://al%40ce@h", {"scheme": "nbds", "tls": True, "host": "h", "tls_username": "al@ce"}),
    ("nbd://@h", {"host": "h"}),  # empty user info: no user name
    # Separators and repeats, libnbd's parse_uri_queries rules.
    (
        "nbd+unix:///?socket=/a;tls-certificates=/c",
        {
            "scheme": "nbd+unix",
            "host": None,
            "port": None,
            "socket_path": "/a",
            "tls_certificates": "/c",
        },
    ),
    (
        "nbd+unix:///?socket=/a&&socket=/b&=x&flag",
        {"scheme": "nbd+unix", "host": None, "port": None, "socket_path": "/b"},
    ),
    (
        "nbd+unix:///?socket=/s%20p%26q",
        {"scheme": "nbd+unix", "host": None, "port": None, "socket_path": "/s p&q"},
    ),
    (
        "nbd+unix:///?socket=%00abstract",
        {"scheme": "nbd+unix", "host": None, "port": None, "socket_path": "\0abstract"},
    ),
    (
        "nbd+unix:///?socket=/tmp/%FF",  # not UTF-8: kept as os.fsdecode would
        {"scheme": "nbd+unix", "host": None, "port": None, "socket_path": "/tmp/\udcff"},
    ),
    # A host or port in a +unix URI is ignored, as libnbd ignores it.
    (
        "nbd+unix://ignored:99/e?socket=/s",
        {"scheme": "nbd+unix", "host": None, "port": None, "socket_path": "/s", "export_name": "e"},
    ),
    ("nbd://h/?tls-certificates=/c", {"host": "h", "tls_certificates": "/c"}),  # kept, TLS off
]


@pytest.mark.parametrize(("text", "expected"), GOOD, ids=[g[0] for g in GOOD])
def test_parse_good(text: str, expected: dict[str, Any]) -> None:
    u = parse_uri(text)
    assert fields(u) == {**DEFAULTS, **expected}
    # Every parsed URI formats to a canonical text that parses back the same.
    assert parse_uri(u.to_uri()) == u
    assert str(u) == u.to_uri()


BAD: list[tuple[str, str]] = [
    ("", "does not have a scheme"),
    ("/tmp/sock", "nbd+unix:///?socket=PATH"),
    ("localhost", "nbd://localhost"),
    ("localhost:10809", "nbd://localhost:10809"),
    ("example.com/disk", "does not have a scheme"),
    ("http://h/", "unknown NBD URI scheme 'http'"),
    ("nbd:h", "must begin with 'nbd://'"),
    ("nbd:/h", "must begin with 'nbd://'"),
    ("nbd+vsock:///", "nbd+vsock URIs are not supported"),
    ("nbds+vsock://2:10809/", "nbds+vsock URIs are not supported"),
    ("nbd+unix:///", "needs a socket parameter"),
    ("nbds+unix:///x?tls-certificates=/c", "needs a socket parameter"),
    ("nbd+unix:///?socket=", "socket= is empty"),
    ("nbd://h/?socket=/s", "cannot be used with nbd:// (use nbd+unix://)"),
    ("nbds://h/?socket=/s", "use nbds+unix://"),
    ("nbd://u:pw@h/", "passwords"),
    ("nbd://h:0/", "out of range"),
    ("nbd://h:65536/", "out of range"),
    ("nbd://h:port/", "not a number"),
    ("nbd://h:-1/", "not a number"),
    ("nbd://::1/", "must be in brackets"),
    ("nbd://[::1/", "without ']'"),
    ("nbd://[::1]x/", "after the IPv6 address"),
    ("nbd://[1.2.3.4]/", "not an IPv6 address"),
    ("nbd://[v1.x]/", "not an IPv6 address"),
    ("nbd://h%2Fx/", "cannot have"),
    ("nbd://h/a#b", "fragment"),
    ("nbd://h/%zz", "bad percent-escape '%zz' in export name"),
    ("nbd://h/%4", "bad percent-escape"),
    ("nbd://h/%C3", "not valid UTF-8"),
    ("nbd://h/%00", "NUL"),
    ("nbd://h/" + "x" * 4097, "at most 4096"),
    ("nbd://h/a b", "space or control character"),
    ("nbd://h/a\tb", "space or control character"),
    ("nbd://h/a\nb", "space or control character"),
    ("nbds://h?tls-verify-peer=maybe", "must be true or false"),
    ("nbds://h?tls-verify-peer", "must be true or false"),
    ("nbds://u@h?tls-username=v", "disagree"),
    ("nbds://h?tls-psk-file=", "tls-psk-file is empty"),
    ("nbds://h?tls-hostname=a%00b", "NUL"),
    ("nbds://h?tls-username=%ff", "not valid UTF-8"),
]


@pytest.mark.parametrize(("text", "message"), BAD, ids=[b[0][:40] for b in BAD])
def test_parse_bad(text: str, message: str) -> None:
    with pytest.raises(URIError) as info:
        parse_uri(text)
    text_of_error = str(info.value)
    assert message in text_of_error
    assert "\n" not in text_of_error
    # URIError is a ValueError and a non-fatal NBDError.
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, NBDError)
    assert not info.value.fatal


def test_export_name_limit_is_bytes() -> None:
    # 4096 bytes is allowed, 4097 is not; the limit counts UTF-8 bytes, not characters.
    assert parse_uri("nbd://h/" + "x" * 4096).export_name == "x" * 4096
    with pytest.raises(URIError):
        parse_uri("nbd://h/" + "%E2%82%AC" * 1366)  # 4098 bytes


def test_unknown_query_with_bad_escape_is_still_ignored() -> None:
    assert parse_uri("nbd://h/?x-foo=%zz&bar").host == "h"


CANONICAL = [
    ("nbd://h", "nbd://h/"),
    ("nbd://h:10809", "nbd://h/"),
    ("NBD://h:99/e", "nbd://h:99/e"),
    ("nbd://[::1]:99", "nbd://[::1]:99/"),
    ("nbd://[fe80::1%25eth0]", "nbd://[fe80::1%25eth0]/"),
    ("nbd://h/a%2Fb", "nbd://h/a/b"),  # same export name, "/" needs no escape
    ("nbd://h/%3F%23%25", "nbd://h/%3F%23%25"),
    ("nbd://h//x", "nbd://h//x"),
    (
        "nbds+unix://u@/e?tls-verify-peer=0&tls-hostname=n&socket=/s",
        "nbds+unix://u@/e?socket=/s&tls-hostname=n&tls-verify-peer=false",
    ),
    ("nbds://h?tls-username=a%3Ab", "nbds://a%3Ab@h/"),
    ("nbd+unix:///?socket=/a%26b%3Dc%2Bd", "nbd+unix:///?socket=/a%26b%3Dc%2Bd"),
]


@pytest.mark.parametrize(("text", "canonical"), CANONICAL)
def test_canonical(text: str, canonical: str) -> None:
    assert parse_uri(text).to_uri() == canonical
    assert parse_uri(canonical) == parse_uri(text)


def test_format_uri() -> None:
    assert format_uri(host="h") == "nbd://h/"
    assert format_uri(host="::1", port=1, export_name="e", tls=True) == "nbds://[::1]:1/e"
    assert format_uri(socket_path="/s") == "nbd+unix:///?socket=/s"
    assert (
        format_uri(socket_path="/s", tls=True, tls_psk_file="/k", tls_username="u")
        == "nbds+unix://u@/?socket=/s&tls-psk-file=/k"
    )
    assert format_uri() == "nbd://localhost/"
    with pytest.raises(URIError, match="not both"):
        format_uri(host="h", socket_path="/s")
    with pytest.raises(URIError, match="out of range"):
        format_uri(host="h", port=70000)


def test_direct_construction() -> None:
    u = NBDURI("NBDS", host="h")
    assert (u.scheme, u.tls, u.port, u.endpoint) == ("nbds", True, DEFAULT_PORT, "h:10809")
    assert NBDURI("nbd", host="::1", port=5).endpoint == "[::1]:5"
    unix = NBDURI("nbd+unix", socket_path="/s")
    assert unix.is_unix and unix.endpoint == "unix:/s" and not unix.tls
    with pytest.raises(URIError, match="needs a socket path"):
        NBDURI("nbd+unix")
    with pytest.raises(URIError, match="takes no host"):
        NBDURI("nbd+unix", host="h", socket_path="/s")
    with pytest.raises(URIError, match="unknown NBD URI scheme"):
        NBDURI("ftp", host="h")
    with pytest.raises(URIError, match="not supported"):
        NBDURI("nbd+vsock")
    with pytest.raises(URIError, match="port must be an integer"):
        NBDURI("nbd", host="h", port=True)
    with pytest.raises(URIError, match="not an IPv6 address"):
        NBDURI("nbd", host="a:b")
    with pytest.raises(URIError, match="cannot have"):
        NBDURI("nbd", host="a/b")
    with pytest.raises(URIError, match="NUL"):
        NBDURI("nbd", host="h", export_name="a\0b")
    with pytest.raises(URIError, match="not valid Unicode"):
        NBDURI("nbd", host="h", export_name="\ud800")
    with pytest.raises(dataclasses.FrozenInstanceError):
        u.host = "x"  # type: ignore[misc, unused-ignore]


# Property tests: every valid NBDURI survives to_uri() -> parse_uri(), and parse_uri()
# raises nothing but URIError whatever it is given.

_text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\0"))
_nonempty = _text.filter(bool)
_path_text = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\0")
    | st.sampled_from(["\udc80", "\udcff"]),  # undecodable bytes of a file name
    min_size=1,
)
_hostname = st.from_regex(
    r"[A-Za-z0-9\u00e9\u4e2d]([A-Za-z0-9.\-_~\u00e9\u4e2d]{0,20})", fullmatch=True
)
_host = st.one_of(_hostname, st.ip_addresses().map(str), st.just("fe80::1%eth0"))
_export = _text.filter(lambda s: len(s.encode()) <= 4096)


@st.composite
def nbd_uris(draw: st.DrawFn) -> NBDURI:
    unix = draw(st.booleans())
    tls = draw(st.booleans())
    scheme = ("nbds" if tls else "nbd") + ("+unix" if unix else "")
    socket_path = None
    if unix:
        socket_path = draw(_path_text | _path_text.map(lambda p: "\0" + p))
    return NBDURI(
        scheme=scheme,
        host=None if unix else draw(_host),
        port=None if unix else draw(st.none() | st.integers(1, 65535)),
        socket_path=socket_path,
        export_name=draw(_export),
        tls_certificates=draw(st.none() | _path_text),
        tls_verify_peer=draw(st.booleans()),
        tls_psk_file=draw(st.none() | _path_text),
        tls_username=draw(st.none() | _nonempty),
        tls_hostname=draw(st.none() | _nonempty),
    )


@settings(max_examples=500)
@given(nbd_uris())
def test_roundtrip(u: NBDURI) -> None:
    text = u.to_uri()
    assert parse_uri(text) == u
    # The canonical form is a fixed point.
    assert parse_uri(text).to_uri() == text


_uri_alphabet = st.sampled_from(list("nbds+unix:/?#&;=%@[]0123456789abcdefABCDEF.-_~ \t\0\u20ac"))


@settings(max_examples=1000)
@given(
    st.one_of(
        st.text(_uri_alphabet, max_size=40),
        st.builds(
            lambda s, t: s + t,
            st.sampled_from(["nbd://", "nbds://", "nbd+unix://", "nbds+unix://"]),
            st.text(_uri_alphabet, max_size=40),
        ),
        st.text(max_size=40),
    )
)
def test_parse_raises_only_urierror(text: str) -> None:
    try:
        u = parse_uri(text)
    except URIError as exc:
        assert "\n" not in str(exc)
        return
    assert parse_uri(u.to_uri()) == u
