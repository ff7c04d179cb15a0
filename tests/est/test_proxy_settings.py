"""The proxy setting's pure parts (est/proxy.py): proxy URLs, NO_PROXY, the environment.

Expected values come from curl's documentation of CURLOPT_NOPROXY (names match themselves
and their subdomains, a leading dot changes nothing, ``*`` matches all, CIDR since 7.86) and
httpx's (``host:port`` entries), never from the code under test.
"""

from __future__ import annotations

import pytest

from est_agent.errors import InputError
from est_agent.est.proxy import (
    HttpsProxy,
    ProxyUrl,
    authority,
    environment_proxy,
    no_proxy_matches,
    parse_proxy_url,
)

# -- proxy URLs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://proxy.example.net:3128", ProxyUrl("proxy.example.net", 3128)),
        ("HTTP://Proxy.Example.NET:3128/", ProxyUrl("proxy.example.net", 3128)),
        ("http://10.0.0.1:8080", ProxyUrl("10.0.0.1", 8080)),
        ("http://[fd00::1]:8080", ProxyUrl("fd00::1", 8080)),
        ("http://dev@proxy:3128", ProxyUrl("proxy", 3128, "dev")),
        ("http://d%40v:p%3Ass@proxy:3128", ProxyUrl("proxy", 3128, "d@v", "p:ss")),
    ],
)
def test_proxy_urls_that_parse(text: str, expected: ProxyUrl) -> None:
    parsed = parse_proxy_url(text)
    assert parsed == expected
    assert parsed.password == expected.password  # repr=False, compare=True: checked apart


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("https://proxy:3128", "TLS to the proxy itself"),
        ("socks5://proxy:1080", "only an HTTP CONNECT proxy"),
        ("proxy:3128", "only an HTTP CONNECT proxy"),  # no scheme: only the env form assumes it
        ("http://proxy", "needs a port"),
        ("http://proxy:0", "needs a port"),
        ("http://proxy:99999", "malformed proxy URL"),
        ("http://proxy:x", "malformed proxy URL"),
        ("http://[::1:3128", "malformed proxy URL"),
        ("http://:3128", "no usable host"),
        ("http://pro xy:3128", "no usable host"),
        ("http://pröxy:3128", "no usable host"),
        ("http://proxy:3128/path", "path, query or fragment"),
        ("http://proxy:3128?x=1", "path, query or fragment"),
        ("http://@proxy:3128", "user must be non-empty"),
        ("http://u%0a:p@proxy:3128", "control character"),
        ("http://" + "a" * 3000 + ":1", "longer than"),
    ],
)
def test_proxy_urls_refused(text: str, match: str) -> None:
    with pytest.raises(InputError, match=match):
        parse_proxy_url(text)


def test_the_env_form_may_leave_out_the_scheme() -> None:
    assert parse_proxy_url("proxy:3128", assume_http=True) == ProxyUrl("proxy", 3128)


def test_a_refused_url_never_shows_its_password() -> None:
    with pytest.raises(InputError) as info:
        parse_proxy_url("http://user:hunter2@proxy:notaport")
    assert "hunter2" not in str(info.value)
    assert "user:[REDACTED]@" in str(info.value)


def test_authority_form_brackets_ipv6() -> None:
    # RFC 9112 §3.2.3 authority-form = uri-host ":" port; RFC 3986 §3.2.2 IP-literal in brackets
    assert authority("est.example.net", 443) == "est.example.net:443"
    assert authority("::1", 8443) == "[::1]:8443"


def test_https_proxy_credentials_and_repr() -> None:
    proxy = HttpsProxy("127.0.0.1", 3128, "u", "p", source="HTTPS_PROXY")
    assert proxy.authorization() == "Basic dTpw"  # base64("u:p"), RFC 7617 §2
    assert "'p'" not in repr(proxy) and "password" not in repr(proxy)
    assert proxy.describe() == "proxy 127.0.0.1:3128 (HTTPS_PROXY)"
    assert HttpsProxy("::1", 1).authorization() is None
    assert HttpsProxy("::1", 1).describe() == "proxy [::1]:1 (est.proxy)"
    with pytest.raises(InputError, match="go together"):
        HttpsProxy("h", 1, "u")
    with pytest.raises(InputError, match="unusable proxy address"):
        HttpsProxy("h", 70000)


# -- NO_PROXY -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("no_proxy", "host", "port", "direct"),
    [
        ("", "est.example.net", 443, False),
        ("*", "est.example.net", 443, True),
        ("a.example, *", "est.example.net", 443, True),
        # a name matches itself and its subdomains, with or without a leading dot (curl)
        ("example.net", "example.net", 443, True),
        ("example.net", "est.example.net", 443, True),
        (".example.net", "example.net", 443, True),
        (".example.net", "est.example.net", 443, True),
        ("*.example.net", "est.example.net", 443, True),
        ("example.net", "badexample.net", 443, False),
        ("est.example.net", "example.net", 443, False),
        ("EXAMPLE.net.", "Est.Example.NET", 443, True),
        ("example.net", "est.example.net.", 443, True),
        (" foo.example , example.net ", "est.example.net", 443, True),
        ("foo.example,,bar.example", "est.example.net", 443, False),
        # addresses, exact or CIDR (curl 7.86); names are not resolved
        ("127.0.0.1", "127.0.0.1", 8443, True),
        ("127.0.0.1", "127.0.0.2", 8443, False),
        ("127.0.0.0/8", "127.9.9.9", 443, True),
        ("10.0.0.0/8", "127.0.0.1", 443, False),
        ("::1", "::1", 443, True),
        ("[::1]", "::1", 443, True),
        ("::1", "[::1]", 443, True),
        ("fd00::/8", "fd12::5", 443, True),
        ("fd00::/8", "10.0.0.1", 443, False),
        ("localhost", "127.0.0.1", 443, False),
        ("127.0.0.1", "localhost", 443, False),
        ("0.0.0.1", "1", 443, False),  # a name "1" is no address
        # with a port: that port only (httpx, urllib)
        ("est.example.net:8443", "est.example.net", 8443, True),
        ("est.example.net:8443", "est.example.net", 443, False),
        ("127.0.0.1:8443", "127.0.0.1", 8443, True),
        ("[::1]:8443", "::1", 8443, True),
        ("[::1]:8443", "::1", 443, False),
        # unreadable entries match nothing
        ("[::1", "::1", 443, False),
        ("[::1]x", "::1", 443, False),
        ("host:port", "host", 443, False),
        ("10.0.0.0/99", "10.0.0.1", 443, False),
        (".", "est.example.net", 443, False),
    ],
)
def test_no_proxy(no_proxy: str, host: str, port: int, direct: bool) -> None:
    assert no_proxy_matches(no_proxy, host, port) is direct


# -- the environment ----------------------------------------------------------------------------

PROXY_1 = ("HTTPS_PROXY", "http://p:1")


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"HTTPS_PROXY": ""}, None),
        ({"HTTPS_PROXY": "  "}, None),
        ({"HTTP_PROXY": "http://p:1", "ALL_PROXY": "http://p:2"}, None),  # https only
        ({"HTTPS_PROXY": "http://p:1"}, ("HTTPS_PROXY", "http://p:1")),
        ({"https_proxy": " http://p:2 "}, ("https_proxy", "http://p:2")),
        # lower case first (curl, urllib), an empty one does not count
        ({"https_proxy": "http://p:2", "HTTPS_PROXY": "http://p:1"}, ("https_proxy", "http://p:2")),
        ({"https_proxy": "", "HTTPS_PROXY": "http://p:1"}, ("HTTPS_PROXY", "http://p:1")),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "example.net"}, None),
        ({"HTTPS_PROXY": "http://p:1", "no_proxy": "other.example"}, ("HTTPS_PROXY", "http://p:1")),
        ({"HTTPS_PROXY": "http://p:1", "no_proxy": "other", "NO_PROXY": "*"}, PROXY_1),
        ({"HTTPS_PROXY": "http://p:1", "no_proxy": "", "NO_PROXY": "*"}, None),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "est.example.net:443"}, None),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "est.example.net:8443"}, PROXY_1),
    ],
)
def test_environment_proxy(environ: dict[str, str], expected: tuple[str, str] | None) -> None:
    assert environment_proxy(environ, "est.example.net", 443) == expected
