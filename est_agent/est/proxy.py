"""HTTPS through an HTTP proxy: the proxy setting, ``NO_PROXY`` and what the proxy is sent.

Stdlib only, so the configuration loads (and checks ``est.proxy``) without the EST stack; the
CONNECT exchange itself (RFC 9110 §9.3.6) runs in est/tls/backend.py, at the TCP connect step,
before any TLS: the TLS session, its channel binding and every EST request then run end to end
with the EST server inside the tunnel, so the proxy relays ciphertext only.

* ``parse_proxy_url``: ``http://[user[:password]@]host:port`` (a port is required: curl
  defaults to 1080, httpx to 80, so leaving it out means different proxies to different tools).
* ``no_proxy_matches``: a ``NO_PROXY`` list as curl (CURLOPT_NOPROXY) and httpx read it.
* ``environment_proxy``: ``https_proxy`` / ``HTTPS_PROXY`` unless ``NO_PROXY`` excludes the
  server (lower case first, as curl and Python's urllib do).
* ``HttpsProxy``: the resolved proxy, with its Basic credentials (RFC 9110 §11.7.2
  Proxy-Authorization, RFC 7617 §2); the password is never shown by ``repr``.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from est_agent.errors import InputError

__all__ = [
    "HttpsProxy",
    "ProxyUrl",
    "authority",
    "environment_proxy",
    "no_proxy_matches",
    "parse_proxy_url",
    "proxy_with_password",
]

#: the environment variables read when ``est.proxy = "env"``, in the order curl reads them
PROXY_VARIABLES = ("https_proxy", "HTTPS_PROXY")
NO_PROXY_VARIABLES = ("no_proxy", "NO_PROXY")

# A host name as a URL carries it (RFC 3986 §3.2.2 reg-name, ASCII: IDNs in their A-label form).
_HOST_NAME = re.compile(r"[a-z0-9](?:[a-z0-9._-]*[a-z0-9_])?")
# user:password@ in a URL, to show a URL without its password
_URL_PASSWORD = re.compile(r"(://[^/@]*?):[^/@]*@")
_MAX_URL = 2048


def authority(host: str, port: int) -> str:
    """``host:port`` as a request target in authority-form (RFC 9112 §3.2.3): IPv6 bracketed."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _shown(text: str) -> str:
    """A proxy URL for a message: any password masked, control characters escaped, bounded."""
    masked = _URL_PASSWORD.sub(r"\1:[REDACTED]@", text[:200])
    return repr(masked + ("..." if len(text) > 200 else ""))


@dataclass(frozen=True)
class ProxyUrl:
    """A parsed proxy URL; ``username`` / ``password`` percent-decoded (RFC 3986 §3.2.1)."""

    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)


def parse_proxy_url(text: str, *, assume_http: bool = False) -> ProxyUrl:
    """``http://[user[:password]@]host:port[/]``; ``InputError`` saying what is wrong (the
    password, if any, masked). ``assume_http``: a value without ``scheme://`` is an http URL,
    as curl and httpx read ``HTTPS_PROXY=proxy:3128``."""
    if len(text) > _MAX_URL:
        raise InputError(f"proxy URL longer than {_MAX_URL} characters")
    if assume_http and "://" not in text:
        text = f"http://{text}"
    try:
        parts = urlsplit(text)
        port = parts.port  # raises ValueError on "host:x" or "host:99999"
    except ValueError as exc:
        raise InputError(f"malformed proxy URL {_shown(text)}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme == "https":
        raise InputError(
            f"proxy URL {_shown(text)}: TLS to the proxy itself (https://) is not supported; "
            "use http://host:port (the EST TLS session runs end to end through the tunnel)"
        )
    if scheme != "http":
        raise InputError(
            f"proxy URL {_shown(text)}: only an HTTP CONNECT proxy (http://host:port) is "
            "supported"
        )
    host = parts.hostname or ""
    if not _valid_host(host):
        raise InputError(f"proxy URL {_shown(text)} has no usable host")
    if port is None or port == 0:
        raise InputError(f"proxy URL {_shown(text)} needs a port (http://host:port)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise InputError(f"proxy URL {_shown(text)} must not have a path, query or fragment")
    username = None if parts.username is None else unquote(parts.username)
    password = None if parts.password is None else unquote(parts.password)
    if username is not None and (not username or ":" in username):
        # RFC 7617 §2: the user-id is not empty here and cannot contain a colon.
        raise InputError(f"proxy URL {_shown(text)}: the user must be non-empty, without ':'")
    for value in (username, password):
        if value is not None and _has_control_character(value):
            raise InputError(
                f"proxy URL {_shown(text)}: the credentials contain a control character "
                "(RFC 7617 §2)"
            )
    return ProxyUrl(host, port, username, password)


def _valid_host(host: str) -> bool:
    if not host:
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return _HOST_NAME.fullmatch(host) is not None
    return True


def _has_control_character(text: str) -> bool:
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _split_entry(entry: str) -> tuple[str, int | None] | None:
    """One ``NO_PROXY`` entry as (host, port or None); None when it cannot be read."""
    if entry.startswith("["):  # [v6] or [v6]:port
        close = entry.find("]")
        if close < 0:
            return None
        host, rest = entry[1:close], entry[close + 1 :]
        if not rest:
            return host, None
        if rest.startswith(":") and rest[1:].isdigit():
            return host, int(rest[1:])
        return None
    if entry.count(":") == 1:  # host:port or v4:port (a bare IPv6 address has several colons)
        host, _, port = entry.partition(":")
        return (host, int(port)) if port.isdigit() else None
    return entry, None


def no_proxy_matches(no_proxy: str, host: str, port: int) -> bool:
    """Whether ``NO_PROXY`` (comma-separated) says to connect to ``host``:``port`` directly.

    The forms curl (CURLOPT_NOPROXY) and httpx accept: ``*`` (every host); a name, matching
    itself and every subdomain (``example.com`` and ``.example.com`` both match
    ``example.com`` and ``a.example.com``, not ``badexample.com``; ``*.`` is read as ``.``);
    an IPv4 or IPv6 address (brackets optional) or a CIDR block (``10.0.0.0/8``, ``fd00::/8``),
    matching addresses only (names are not resolved); any of these with ``:port`` to match
    that port only (httpx, Python's urllib). Case-insensitive; a trailing dot is ignored;
    entries that cannot be read match nothing, as in curl.
    """
    target = host.strip().lower().removeprefix("[").removesuffix("]").rstrip(".")
    target_ip = _ip(target)
    for raw in no_proxy.split(","):
        entry = raw.strip().lower()
        if entry == "*":
            return True
        split = _split_entry(entry) if entry else None
        if split is None:
            continue
        name, entry_port = split
        if entry_port is not None and entry_port != port:
            continue
        if "/" in name:
            try:
                network = ipaddress.ip_network(name, strict=False)
            except ValueError:
                continue
            if target_ip is not None and target_ip in network:
                return True
            continue
        entry_ip = _ip(name)
        if entry_ip is not None:
            if target_ip == entry_ip:
                return True
            continue
        name = name.removeprefix("*").lstrip(".").rstrip(".")
        if name and target_ip is None and (target == name or target.endswith("." + name)):
            return True
    return False


def environment_proxy(environ: Mapping[str, str], host: str, port: int) -> tuple[str, str] | None:
    """(variable, value) of the proxy the environment sets for ``https://host:port``, or None
    when none is set (or it is empty) or ``NO_PROXY`` excludes the server. ``https_proxy``
    before ``HTTPS_PROXY``, ``no_proxy`` before ``NO_PROXY`` (curl's order)."""
    found = [(n, v) for n in PROXY_VARIABLES if (v := environ.get(n, "").strip())]
    if not found:
        return None
    no_proxy = next((environ[n] for n in NO_PROXY_VARIABLES if environ.get(n, "").strip()), "")
    return None if no_proxy_matches(no_proxy, host, port) else found[0]


@dataclass(frozen=True)
class HttpsProxy:
    """An HTTP proxy that tunnels the EST connection with CONNECT (RFC 9110 §9.3.6).

    ``source`` names where it was configured (``est.proxy``, ``HTTPS_PROXY`` ...), for
    messages. With ``username`` and ``password``, every CONNECT carries Proxy-Authorization:
    Basic (RFC 9110 §11.7.2, RFC 7617): pre-emptively, as curl does, since the proxy's 407
    would otherwise cost a connection. It travels to the proxy in clear (an http:// proxy);
    the EST credentials never go to the proxy (they only travel inside the tunnelled TLS).
    """

    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    source: str = "est.proxy"

    def __post_init__(self) -> None:
        if not _valid_host(self.host) or not 0 < self.port < 65536:
            raise InputError(f"unusable proxy address {self.host!r}:{self.port}")
        if (self.username is None) != (self.password is None):
            raise InputError("a proxy user and its password go together")

    @property
    def authority(self) -> str:
        return authority(self.host, self.port)

    def describe(self) -> str:
        """``proxy host:port (source)``: how messages name it."""
        return f"proxy {self.authority} ({self.source})"

    def authorization(self) -> str | None:
        """The Proxy-Authorization value, or None without credentials (RFC 7617 §2: UTF-8)."""
        if self.username is None or self.password is None:
            return None
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode("ascii")
        return f"Basic {token}"


def proxy_with_password(
    url: ProxyUrl, password: str | None, *, source: str, setting: str
) -> HttpsProxy:
    """The proxy of ``url`` (configured in ``source``) with the user's password from
    ``setting`` (``password`` None: not set there). One password, in the URL or in the
    setting, and a password only with a user; ``InputError`` saying which otherwise. The
    password is registered with the log redaction: masked in every message from now on."""
    if password is not None and url.password is not None:
        raise InputError(f"carries a password and so does {setting}: set one")
    if password is not None and url.username is None:
        raise InputError("the proxy password needs a user: http://user@host:port")
    password = url.password if password is None else password
    if url.username is not None and password is None:
        raise InputError(f"names a proxy user without a password ({setting})")
    if password:
        from est_agent.logs import register_secret

        register_secret(password)
    return HttpsProxy(url.host, url.port, url.username, password, source=source)
