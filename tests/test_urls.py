"""URL checks and normalization: which URLs a declaration may carry, and the one form
notices carry them in."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from notice_relay.urls import TRACKING_PARAMS, check_http_url, normalize_url


def fullwidth(text: str) -> str:
    """``text`` in full-width forms, as East Asian input methods type it."""
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)


FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------ check_http_url


@pytest.mark.parametrize("url", [
    "https://www.pixiv.net/artworks/1",
    "http://example.com",
    "HTTPS://EXAMPLE.COM/a?b=c#d",
    "https://例え.jp/作品",
    "http://127.0.0.1:8080/x",
    "http://[2001:db8::1]/",
    "https://user:secret@example.com/",
    "https://my_host.example/",
])
def test_check_http_url_accepts_absolute_http_urls(url: str) -> None:
    """An absolute http(s) URL with a valid host is accepted and returned unchanged."""
    assert check_http_url(url) == url


@pytest.mark.parametrize(("url", "fragment"), [
    ("javascript:alert(1)", "'javascript'"),
    ("JavaScript:alert(1)", "'javascript'"),
    ("data:text/html,<script>alert(1)</script>", "'data'"),
    ("file:///etc/passwd", "'file'"),
    ("ftp://example.com/x", "'ftp'"),
    ("mailto:a@example.invalid", "'mailto'"),
    ("vbscript:msgbox(1)", "'vbscript'"),
    ("//example.com/x", "relative"),
    ("/artworks/1", "relative"),
    ("https://", "with a host"),
    ("https://exa mple.com/", "whitespace"),
    ("https://example.com/a b", "whitespace"),
    ("https://example.com/\u3000", "whitespace"),
    ("https://example.com/\x00", "control character"),
    ("https://example.com/\x7f", "control character"),
    ("https://example.com/\x85", "whitespace"),
    ("https://example.com/\u202e", "control character"),
    ("https://x.com\\@evil.example/", "backslash"),
    ("https://example.com:99999/", "port"),
    ("https://example.com:http/", "port"),
    ("https://a..b/", "host"),
    ("https://ex%41mple.com/", "host"),
    ("https://xn--a.ü.example/", "host"),
    ("http://[fe80::1%25eth0]/", "zone id"),
    ("http://[::1/", "not a valid URL"),
])
def test_check_http_url_refuses_other_urls(url: str, fragment: str) -> None:
    """Non-http(s) schemes (javascript:, data:, file: …), relative URLs, whitespace and
    control characters, backslashes, bad ports and bad hosts are refused, with a
    message that says which."""
    with pytest.raises(ValueError) as info:
        check_http_url(url)
    assert fragment in str(info.value)


def test_check_http_url_refuses_non_strings() -> None:
    """Passing something other than a string is a programming error: TypeError."""
    with pytest.raises(TypeError):
        check_http_url(b"https://example.com/")  # type: ignore[arg-type]


# ---------------------------------------------------------------- generic rules


@pytest.mark.parametrize(("url", "expected"), [
    ("HTTPS://EXAMPLE.COM/Path", "https://example.com/Path"),
    ("https://example.com", "https://example.com/"),
    ("https://example.com?x=1", "https://example.com/?x=1"),
    ("https://example.com./a", "https://example.com/a"),
])
def test_scheme_and_host_lowercased_path_kept_empty_path_is_slash(url: str, expected: str) -> None:
    """Scheme and host are lower-cased, a trailing dot leaves the host, the path keeps
    its case, and an empty path becomes "/"."""
    assert normalize_url(url) == expected


@pytest.mark.parametrize(("url", "expected"), [
    ("https://bücher.example/", "https://xn--bcher-kva.example/"),
    ("https://BÜCHER.example/", "https://xn--bcher-kva.example/"),
    ("https://例え.テスト/作品", "https://xn--r8jz45g.xn--zckzah/%E4%BD%9C%E5%93%81"),
    ("https://" + fullwidth("example.") + "com/", "https://example.com/"),
    ("https://xn--bcher-kva.example/", "https://xn--bcher-kva.example/"),
    ("https://faß.example/", "https://xn--fa-hia.example/"),
])
def test_internationalized_hosts_are_idna_encoded(url: str, expected: str) -> None:
    """Hosts are IDNA-encoded with UTS #46 mapping: Unicode and its upper-case or
    full-width spellings all give the same punycode host (non-transitional: ß stays)."""
    assert normalize_url(url) == expected


@pytest.mark.parametrize(("url", "expected"), [
    ("http://example.com:80/", "http://example.com/"),
    ("https://example.com:443/", "https://example.com/"),
    ("https://example.com:0443/", "https://example.com/"),
    ("http://example.com:443/", "http://example.com:443/"),
    ("https://example.com:80/", "https://example.com:80/"),
    ("https://example.com:8443/", "https://example.com:8443/"),
    ("http://[2001:DB8:0:0::1]:80/", "http://[2001:db8::1]/"),
])
def test_default_ports_dropped_others_kept(url: str, expected: str) -> None:
    """The scheme's default port (80 for http, 443 for https) is dropped; any other
    port is kept. IPv6 literals take their compressed, lower-case form."""
    assert normalize_url(url) == expected


def test_fragment_and_credentials_dropped() -> None:
    """The fragment never reaches a server and credentials are never forwarded: both
    go, which also shows the real host of a "trusted.site@other.host" URL."""
    assert normalize_url("https://u:p@example.com/a#section-2") == "https://example.com/a"
    assert normalize_url("https://www.pixiv.net@evil.example/") == "https://evil.example/"


@pytest.mark.parametrize("param", sorted(TRACKING_PARAMS))
def test_each_tracking_parameter_is_dropped(param: str) -> None:
    """Every documented tracking parameter is dropped, whatever its case, and the
    other parameters keep their order."""
    url = f"https://example.com/p?b=2&{param}=x&a=1&{param.upper()}=y"
    assert normalize_url(url) == "https://example.com/p?b=2&a=1"


@pytest.mark.parametrize("param", ["utm_source", "utm_medium", "utm_campaign", "utm_term",
                                   "utm_content", "utm_id", "UTM_Source", "utm_anything"])
def test_every_utm_parameter_is_dropped(param: str) -> None:
    """Any parameter starting with utm_ is tracking, not only the well-known five."""
    assert normalize_url(f"https://example.com/?{param}=x") == "https://example.com/"


def test_query_order_kept_and_empty_parts_removed() -> None:
    """Parameters are not sorted (sites may give order meaning); empty parameters
    and a query left empty disappear."""
    assert normalize_url("https://example.com/?z=1&&a=2&") == "https://example.com/?z=1&a=2"
    assert normalize_url("https://example.com/?") == "https://example.com/"
    assert normalize_url("https://example.com/?fbclid=1") == "https://example.com/"
    assert normalize_url("https://example.com/?t=5&s=1") == "https://example.com/?t=5&s=1"


@pytest.mark.parametrize(("url", "expected"), [
    ("https://example.com/%7euser", "https://example.com/~user"),
    ("https://example.com/%e4%bd%9c", "https://example.com/%E4%BD%9C"),
    ("https://example.com/作品", "https://example.com/%E4%BD%9C%E5%93%81"),
    ("https://example.com/100%", "https://example.com/100%25"),
    ("https://example.com/a%2Fb", "https://example.com/a%2Fb"),
    ("https://example.com/<x>", "https://example.com/%3Cx%3E"),
    ("https://example.com/?q=%7e&r=日本", "https://example.com/?q=~&r=%E6%97%A5%E6%9C%AC"),
    ("https://example.com/a/./b/../c", "https://example.com/a/c"),
    ("https://example.com/a/%2E%2E/b", "https://example.com/b"),
    ("https://example.com/../../a", "https://example.com/a"),
    ("https://example.com/a/b/..", "https://example.com/a/"),
    ("https://example.com/a/", "https://example.com/a/"),
])
def test_percent_encoding_and_dot_segments_normalized(url: str, expected: str) -> None:
    """Percent-escapes are upper-cased, escaped unreserved characters decoded, other
    characters outside RFC 3986 encoded as UTF-8, a lone % escaped, dot segments
    resolved; a trailing slash is kept."""
    assert normalize_url(url) == expected


# ------------------------------------------------------------------- site rules


@pytest.mark.parametrize(("url", "expected"), [
    ("https://www.pixiv.net/en/artworks/120034567", "https://www.pixiv.net/artworks/120034567"),
    ("https://www.pixiv.net/zh-tw/artworks/1", "https://www.pixiv.net/artworks/1"),
    ("https://pixiv.net/en/artworks/1", "https://www.pixiv.net/artworks/1"),
    ("http://www.pixiv.net/artworks/1", "https://www.pixiv.net/artworks/1"),
    ("https://www.pixiv.net/artworks/1/", "https://www.pixiv.net/artworks/1"),
    ("https://www.pixiv.net/en/users/5550001", "https://www.pixiv.net/users/5550001"),
    ("https://pixiv.net/users/5550001/", "https://www.pixiv.net/users/5550001"),
    ("https://www.pixiv.net/member_illust.php?mode=medium&illust_id=777",
     "https://www.pixiv.net/artworks/777"),
    ("https://www.pixiv.net/member.php?id=42", "https://www.pixiv.net/users/42"),
    ("https://www.pixiv.net/member_illust.php?illust_id=abc",
     "https://www.pixiv.net/member_illust.php?illust_id=abc"),
    ("https://www.pixiv.net/en/en/artworks/1", "https://www.pixiv.net/en/en/artworks/1"),
    ("https://www.pixiv.net/en/", "https://www.pixiv.net/en/"),
])
def test_pixiv_rules(url: str, expected: str) -> None:
    """pixiv: one host (www.pixiv.net), https, the UI-language prefix and a trailing
    slash dropped from artwork and user pages, legacy PHP URLs rewritten; anything
    else on pixiv is left alone."""
    assert normalize_url(url) == expected


@pytest.mark.parametrize("host", ["x.com", "www.x.com", "mobile.x.com", "twitter.com",
                                  "www.twitter.com", "mobile.twitter.com", "m.twitter.com",
                                  "X.COM", "Mobile.Twitter.com"])
def test_x_and_twitter_hosts_become_x_com(host: str) -> None:
    """Every X/Twitter host becomes https://x.com; handles are case-insensitive, so the
    path is lower-cased, and a trailing slash and the s/t share parameters go."""
    url = f"http://{host}/KeiAoba/status/1800000000000000001/?s=20&t=Ab12&lang=en"
    assert normalize_url(url) == "https://x.com/keiaoba/status/1800000000000000001?lang=en"


def test_x_lowercasing_keeps_percent_escapes_upper_case() -> None:
    """Lower-casing an X path leaves percent-escapes in their normal (upper-case) form."""
    assert normalize_url("https://x.com/hashtag/日本") == "https://x.com/hashtag/%E6%97%A5%E6%9C%AC"
    assert normalize_url("https://x.com/") == "https://x.com/"


@pytest.mark.parametrize(("url", "expected"), [
    ("https://artstation.com/maraquill", "https://www.artstation.com/maraquill"),
    ("http://www.artstation.com/MaraQuill", "https://www.artstation.com/MaraQuill"),
    ("https://www.artstation.com/artwork/Xk3Lm9", "https://www.artstation.com/artwork/Xk3Lm9"),
    ("https://maraquill.artstation.com/projects/1", "https://maraquill.artstation.com/projects/1"),
    ("https://deviantart.com/keiaoba/art/Night-1", "https://www.deviantart.com/keiaoba/art/Night-1"),
    ("http://www.deviantart.com/keiaoba", "https://www.deviantart.com/keiaoba"),
    ("https://instagram.com/p/Cx1/?igsh=abc&img_index=2",
     "https://www.instagram.com/p/Cx1/?img_index=2"),
    ("https://m.instagram.com/keiaoba/", "https://www.instagram.com/keiaoba/"),
])
def test_artstation_deviantart_instagram_rules(url: str, expected: str) -> None:
    """ArtStation, DeviantArt and Instagram: one https host each (www.), the path kept
    as written (user pages such as www.artstation.com/<user> unchanged); ArtStation
    portfolio subdomains are separate sites and untouched."""
    assert normalize_url(url) == expected


def test_site_rules_only_apply_to_their_hosts() -> None:
    """Look-alike hosts get only the generic rules."""
    assert normalize_url("http://notpixiv.net/en/artworks/1") == "http://notpixiv.net/en/artworks/1"
    assert normalize_url("http://x.com.example/A/?s=1") == "http://x.com.example/A/?s=1"


def test_scheme_upgrade_drops_port_that_becomes_default() -> None:
    """http://x.com:443/ is upgraded to https, where 443 is the default: it goes, so
    normalizing again changes nothing."""
    assert normalize_url("http://x.com:443/") == "https://x.com/"


# ----------------------------------------------------------------- idempotence

_HOSTS = st.sampled_from([
    "example.com", "EXAMPLE.com", "www.pixiv.net", "pixiv.net", "x.com", "mobile.twitter.com",
    "twitter.com", "www.artstation.com", "artstation.com", "deviantart.com", "instagram.com",
    "bücher.example", "例え.jp", fullwidth("x.") + "com", "127.0.0.1", "[2001:db8::1]",
    "[::FFFF:1]",
    "host_name.example", "example.com.", "xn--bcher-kva.example",
])
_PATH_CHARS = st.sampled_from([
    *"aZ09-._~!$&'()*+,;=:@/%?#[] <>\"{}|^`",
    "%2e", "%2E", "%7e", "%41", "%e4%bd%9c", "%zz", "..", ".", "/../", "/./", "作", "ß", "É",
    "en/", "artworks/", "users/", "123", "member_illust.php", "illust_id=", "&", "=",
])
_PARAMS = st.sampled_from(["utm_source=x", "UTM_medium=y", "fbclid=1", "si=2", "s=20", "t=Ab",
                           "a=1", "b", "", "illust_id=5", "id=7", "q=%7e", "r=日本", "x=%"])


@st.composite
def urls(draw: st.DrawFn) -> str:
    """URLs built from parts that exercise every rule, including the site rules."""
    scheme = draw(st.sampled_from(["http", "https", "HTTP", "HtTpS"]))
    userinfo = draw(st.sampled_from(["", "user@", "u:p@"]))
    host = draw(_HOSTS)
    port = draw(st.sampled_from(["", ":80", ":443", ":8080", ":0443", ":"]))
    path = "/" + "".join(draw(st.lists(_PATH_CHARS, max_size=8)))
    path = path.replace("?", "").replace("#", "").replace(" ", "").replace("\\", "")
    query = "&".join(draw(st.lists(_PARAMS, max_size=5)))
    fragment = draw(st.sampled_from(["", "#frag", "#"]))
    return f"{scheme}://{userinfo}{host}{port}{path}{'?' + query if query else ''}{fragment}"


def _assert_idempotent(url: str) -> None:
    try:
        once = normalize_url(url)
    except ValueError:
        with pytest.raises(ValueError):
            check_http_url(url)
        return
    assert check_http_url(url) == url
    assert normalize_url(once) == once
    assert check_http_url(once) == once


@FUZZ
@given(urls())
def test_normalize_url_is_idempotent_on_structured_urls(url: str) -> None:
    """normalize_url(normalize_url(u)) == normalize_url(u), and a URL normalizes
    exactly when check_http_url accepts it (so every accepted URL can be relayed)."""
    _assert_idempotent(url)


@FUZZ
@given(st.sampled_from(["http://", "https://", "HTTPS://www.pixiv.net/", "https://x.com/"]),
       st.text(max_size=60))
def test_normalize_url_is_idempotent_on_arbitrary_text(prefix: str, rest: str) -> None:
    """The same holds for arbitrary text after a scheme: normalize_url raises nothing
    but ValueError, and what it returns is a fixed point."""
    _assert_idempotent(prefix + rest)
