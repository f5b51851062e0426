"""URL checks and normalization (pure functions, no I/O).

:func:`check_http_url` decides whether a declaration may carry a URL at all;
:func:`normalize_url` turns an accepted URL into the one form that notices carry, so
that two spellings of the same page deduplicate and a developer can match the URL
against what their crawler saw. Every URL that :func:`check_http_url` accepts can be
normalized, and normalizing is idempotent: ``normalize_url(normalize_url(u)) ==
normalize_url(u)``.

Generic rules, applied to every URL:

- only ``http`` and ``https``; the scheme and host are lower-cased;
- an internationalized host is IDNA-encoded (UTS #46 mapping, so ``BÜCHER.example``
  and ``bücher.example`` both become ``xn--bcher-kva.example``); a trailing dot is
  dropped; IPv6 literals are written in their compressed form;
- ``user:password@`` is dropped (credentials are never forwarded, and the ``@`` trick
  ``https://pixiv.net@evil.example/`` then shows its real host);
- the default port (80 for http, 443 for https) is dropped;
- percent-escapes are upper-cased, escaped unreserved characters (``%7E`` → ``~``) are
  decoded, other characters outside RFC 3986 (non-ASCII, ``<``, ``"`` …) are
  UTF-8 percent-encoded, ``.``/``..`` path segments are resolved, an empty path
  becomes ``/``;
- the fragment is dropped (it never reaches the server);
- tracking parameters (:data:`TRACKING_PARAMS`, and any ``utm_*``) are dropped, the
  other parameters keep their order, and an empty query disappears.

Site rules for well-known art sites (these sites answer only on https, so their URLs
are upgraded to it):

============================  ===========================================================
host(s)                       rule
============================  ===========================================================
``pixiv.net``,                host ``www.pixiv.net``; ``/<lang>/artworks/N`` →
``www.pixiv.net``             ``/artworks/N`` and ``/<lang>/users/N`` → ``/users/N``
                              (pixiv serves one work under each UI language);
                              legacy ``/member_illust.php?illust_id=N`` →
                              ``/artworks/N`` and ``/member.php?id=N`` → ``/users/N``;
                              a trailing slash after the id is dropped
``x.com``, ``www.x.com``,     host ``x.com`` (one service, many historical hosts); the
``mobile.x.com``,             path is lower-cased (X handles are case-insensitive) and
``twitter.com``,              loses a trailing slash; the share-tracking parameters
``www.twitter.com``,          ``s`` and ``t`` are dropped
``mobile.twitter.com``,
``m.twitter.com``
``artstation.com``,           host ``www.artstation.com``; the path is kept
``www.artstation.com``        (``/<user>``, ``/artwork/<id>``); ``<user>.artstation.com``
                              portfolio sites are separate hosts and left alone
``deviantart.com``,           host ``www.deviantart.com``; the path is kept
``www.deviantart.com``
``instagram.com``,            host ``www.instagram.com``; ``igsh`` is dropped
``www.instagram.com``,
``m.instagram.com``
============================  ===========================================================

Rules deliberately *not* applied: query parameters are not sorted (some sites give
order meaning), trailing slashes are kept outside the site rules (``/a`` and ``/a/``
may be different pages), path case is kept outside X, and nothing is fetched.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, replace
from urllib.parse import unquote, urlsplit

import idna

#: Query parameters that only tell a site where a click came from. ``utm_*`` is
#: matched as a prefix; the rest exactly (case-insensitively).
TRACKING_PARAMS: frozenset[str] = frozenset(
    {
        "fbclid",  # Facebook
        "gclid",  # Google Ads
        "gclsrc",  # Google Ads
        "dclid",  # Google Display
        "gbraid",  # Google Ads (iOS)
        "wbraid",  # Google Ads (web-to-app)
        "msclkid",  # Microsoft Ads
        "yclid",  # Yandex
        "twclid",  # X/Twitter Ads
        "ttclid",  # TikTok Ads
        "li_fat_id",  # LinkedIn
        "mc_cid",  # Mailchimp
        "mc_eid",  # Mailchimp
        "_hsenc",  # HubSpot
        "_hsmi",  # HubSpot
        "mkt_tok",  # Marketo
        "igshid",  # Instagram share
        "igsh",  # Instagram share
        "ref_src",  # Twitter embeds
        "ref_url",  # Twitter embeds
        "si",  # YouTube/Spotify share id
        "_ga",  # Google Analytics cross-domain
        "_gl",  # Google Analytics cross-domain
    }
)
TRACKING_PREFIXES: tuple[str, ...] = ("utm_",)

_DEFAULT_PORTS = {"http": 80, "https": 443}
# The bidi overrides let a URL display as something other than what it is.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_ASCII_HOST = re.compile(r"^[a-z0-9_-]+(?:\.[a-z0-9_-]+)*$")
_HEX = "0123456789ABCDEFabcdef"
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_SUB_DELIMS = frozenset("!$&'()*+,;=")
# RFC 3986 pchar plus "/" (path) and plus "/?" (query): what may stay unescaped.
_PATH_SAFE = _UNRESERVED | _SUB_DELIMS | frozenset(":@/")
_QUERY_SAFE = _PATH_SAFE | frozenset("?")


@dataclass(frozen=True)
class _Url:
    scheme: str
    host: str  # lower-case ASCII; IPv6 without brackets
    port: int | None
    path: str
    query: str


def _check_chars(value: str) -> None:
    # Fast path: printable ASCII without spaces has nothing to refuse below.
    plain = value.isascii() and value.isprintable() and " " not in value
    for ch in "" if plain else value:
        if ch.isspace():
            raise ValueError("must not contain whitespace (percent-encode it as %20)")
        if unicodedata.category(ch) == "Cc" or ch in _BIDI_CONTROLS:
            raise ValueError(f"must not contain the control character U+{ord(ch):04X}")
    # Browsers read "\" as "/" in http(s) URLs and urllib does not, so the two would
    # disagree about the host of "https://x.com\@evil.example/": refuse, not guess.
    if "\\" in value.split("?", 1)[0].split("#", 1)[0]:
        raise ValueError('must not contain a backslash "\\" (use "/")')


def _ascii_host(host: str) -> str:
    if host.startswith("[") or ":" in host:
        return _ipv6_host(host.strip("[]"))
    if host.endswith("."):
        # "example.com." is the same DNS name as "example.com".
        host = host[:-1]
    if not host.isascii():
        try:
            host = idna.encode(host, uts46=True).decode("ascii")
        except idna.IDNAError as exc:
            raise ValueError(f"has a host that is not a valid domain name ({exc})") from None
        host = host.removesuffix(".")
    host = host.lower()
    if not _ASCII_HOST.match(host):
        raise ValueError("has a host that is not a valid domain name or IP address")
    return host


def _ipv6_host(host: str) -> str:
    try:
        address = ipaddress.IPv6Address(host)
    except ValueError:
        raise ValueError("has a host that is not a valid IPv6 address") from None
    if address.scope_id:
        raise ValueError("must not use an IPv6 zone id (it only means something on one machine)")
    return address.compressed


def _parse(value: str) -> _Url:
    if not isinstance(value, str):
        raise TypeError(f"a URL must be a string, not {type(value).__name__}")
    try:
        parts = urlsplit(value)
    except ValueError as exc:
        raise ValueError(f"is not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        shown = parts.scheme[:20] or "a relative"
        raise ValueError(f"must be an http(s) URL, not {shown!r} URL")
    if not parts.hostname:
        raise ValueError("must be an absolute URL with a host")
    _check_chars(value)
    try:
        port = parts.port
    except ValueError:
        raise ValueError("has an invalid port (it must be a number from 0 to 65535)") from None
    host = _ascii_host(parts.hostname)
    return _Url(scheme=scheme, host=host, port=port, path=parts.path, query=parts.query)


def check_http_url(value: str) -> str:
    """Accept an absolute http(s) URL with a valid host and port; raise ValueError
    otherwise. The value is returned unchanged: normalization happens later, in
    :func:`normalize_url`, which accepts everything this function accepts."""
    _parse(value)
    return value


# ----------------------------------------------------------------- normalization


def _normalize_escapes(text: str, safe: frozenset[str]) -> str:
    """Put percent-encoding in its one normal form (RFC 3986 section 6.2.2)."""
    if "%" not in text and all(ch in safe for ch in text):
        return text  # the common case: nothing to encode or decode
    out: list[str] = []
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "%":
            if i + 2 < n and text[i + 1] in _HEX and text[i + 2] in _HEX:
                byte = int(text[i + 1 : i + 3], 16)
                decoded = chr(byte)
                out.append(decoded if decoded in _UNRESERVED else f"%{byte:02X}")
                i += 3
                continue
            out.append("%25")  # a lone "%" is a literal percent sign
        elif ch in safe:
            out.append(ch)
        else:
            # surrogatepass: a lone surrogate still gets one stable escape.
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
        i += 1
    return "".join(out)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4, for a path that starts with "/"."""
    output: list[str] = []
    for segment in path.split("/")[1:]:
        if segment == "..":
            if output:
                output.pop()
        elif segment != ".":
            output.append(segment)
    result = "/" + "/".join(output)
    # "/a/." and "/a/.." name a directory: keep the trailing slash they imply.
    if path.endswith(("/.", "/..")) and not result.endswith("/"):
        result += "/"
    return result


def _normalize_path(path: str) -> str:
    path = _normalize_escapes(path, _PATH_SAFE)
    if not path.startswith("/"):
        path = "/" + path
    return _remove_dot_segments(path)


def _param_key(param: str) -> str:
    return unquote(param.split("=", 1)[0]).lower()


def _is_tracking(key: str) -> bool:
    return key in TRACKING_PARAMS or key.startswith(TRACKING_PREFIXES)


def _normalize_query(query: str, extra_drop: frozenset[str] = frozenset()) -> str:
    kept: list[str] = []
    for param in query.split("&"):
        if not param:
            continue
        param = _normalize_escapes(param, _QUERY_SAFE)
        key = _param_key(param)
        if _is_tracking(key) or key in extra_drop:
            continue
        kept.append(param)
    return "&".join(kept)


def _query_value(query: str, name: str) -> str | None:
    for param in query.split("&"):
        key, _, value = param.partition("=")
        if key == name:
            return value
    return None


# ------------------------------------------------------------------- site rules

_PIXIV_LANG = re.compile(r"^/[A-Za-z]{2}(?:-[A-Za-z]{2,4})?/(artworks|users)/([0-9]+)/?$")
_PIXIV_PLAIN = re.compile(r"^/(artworks|users)/([0-9]+)/$")
_ESCAPE = re.compile(r"(%[0-9A-F]{2})")


def _is_id(value: str | None) -> bool:
    return value is not None and value.isascii() and value.isdigit()


def _pixiv(url: _Url) -> _Url:
    path, query = url.path, url.query
    if m := _PIXIV_LANG.match(path) or _PIXIV_PLAIN.match(path):
        path = f"/{m.group(1)}/{m.group(2)}"
    elif path == "/member_illust.php" and _is_id(n := _query_value(query, "illust_id")):
        path, query = f"/artworks/{n}", ""
    elif path == "/member.php" and _is_id(n := _query_value(query, "id")):
        path, query = f"/users/{n}", ""
    return replace(url, scheme="https", host="www.pixiv.net", path=path, query=query)


def _x(url: _Url) -> _Url:
    # Lower-case letters outside percent-escapes, so the escapes stay in normal form.
    path = "".join(
        piece if _ESCAPE.fullmatch(piece) else piece.lower() for piece in _ESCAPE.split(url.path)
    )
    if len(path) > 1:
        path = path.rstrip("/") or "/"
    query = _normalize_query(url.query, frozenset({"s", "t"}))
    return replace(url, scheme="https", host="x.com", path=path, query=query)


def _canonical_host(host: str) -> Callable[[_Url], _Url]:
    def rule(url: _Url) -> _Url:
        return replace(url, scheme="https", host=host)

    return rule


_SITE_RULES: dict[str, Callable[[_Url], _Url]] = {
    "pixiv.net": _pixiv,
    "www.pixiv.net": _pixiv,
    **dict.fromkeys(
        (
            "x.com",
            "www.x.com",
            "mobile.x.com",
            "twitter.com",
            "www.twitter.com",
            "mobile.twitter.com",
            "m.twitter.com",
        ),
        _x,
    ),
    **dict.fromkeys(
        ("artstation.com", "www.artstation.com"), _canonical_host("www.artstation.com")
    ),
    **dict.fromkeys(
        ("deviantart.com", "www.deviantart.com"), _canonical_host("www.deviantart.com")
    ),
    **dict.fromkeys(
        ("instagram.com", "www.instagram.com", "m.instagram.com"),
        _canonical_host("www.instagram.com"),
    ),
}


def normalize_url(url: str) -> str:
    """Return the normal form of an http(s) URL (see the module docstring for the
    rules); raise ValueError for a URL that :func:`check_http_url` refuses."""
    parts = _parse(url)
    parts = replace(parts, path=_normalize_path(parts.path), query=_normalize_query(parts.query))
    rule = _SITE_RULES.get(parts.host)
    if rule is not None:
        parts = rule(parts)
    host = f"[{parts.host}]" if ":" in parts.host else parts.host
    # After the site rules: an upgrade to https can turn ":443" into the default.
    port = "" if parts.port in (None, _DEFAULT_PORTS[parts.scheme]) else f":{parts.port}"
    query = f"?{parts.query}" if parts.query else ""
    return f"{parts.scheme}://{host}{port}{parts.path}{query}"
