"""HTTP Digest authentication (RFC 7616) for the test server: challenges, nonces, verification.

Written apart from the agent's client (the test server never imports ``est_agent.est``), from
the RFC's formulas, so that a misreading shared by both sides is less likely.

Challenges: one ``WWW-Authenticate`` field per offered algorithm, in the configured order
(RFC 7616 §3.7). ``MD5`` is sent as libest sends it (``-h``): ``qop="auth"``, realm and nonce,
no ``algorithm`` (which then means MD5, §3.3) and no ``opaque``; the others carry
``algorithm``, ``opaque`` and ``charset=UTF-8``.

Nonces are stateless and not bound to a connection (libest's are not either):
base64url(issued-at in ms, 8 bytes || HMAC-SHA256(secret, issued-at)[:16]). A nonce older
than ``lifetime_s`` is answered with a fresh challenge marked ``stale=true`` (§3.3: the
credentials were right, the nonce too old). Each nonce's count must grow (§3.4.6 replay
protection): a repeated nonce count is refused.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote

__all__ = [
    "DIGEST_ALGORITHMS",
    "DigestAuthenticator",
    "DigestVerdict",
    "parse_digest_authorization",
]

#: RFC 7616 §3.3 / §6.1 algorithms this server can offer, as it spells them.
DIGEST_ALGORITHMS: Mapping[str, str] = {
    "MD5": "md5",
    "MD5-sess": "md5",
    "SHA-256": "sha256",
    "SHA-256-sess": "sha256",
}
_PARAM = re.compile(r'\s*([A-Za-z0-9_*-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,"]*)\s*(?:,|$)')
_NC = re.compile(r"[0-9a-fA-F]{8}")
_MAX_TRACKED_NONCES = 10_000


def parse_digest_authorization(value: str | None) -> dict[str, str] | None:
    """The auth-params of an ``Authorization: Digest`` value (names lower case, unquoted), or
    None when it is absent, another scheme or malformed. ``username*`` (RFC 8187) is decoded
    into ``username``."""
    if not value:
        return None
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != "digest":
        return None
    params: dict[str, str] = {}
    pos = 0
    rest = rest.strip()
    while pos < len(rest):
        match = _PARAM.match(rest, pos)
        if match is None or match.end() == pos:
            return None
        name, raw = match.group(1).lower(), match.group(2)
        text = re.sub(r"\\(.)", r"\1", raw[1:-1]) if raw.startswith('"') else raw
        if name in params:
            return None  # RFC 7616 §3.4: each parameter at most once
        params[name] = text
        pos = match.end()
    extended = params.pop("username*", None)
    if extended is not None:
        charset, _, encoded = extended.partition("''")
        if charset.upper() != "UTF-8" or "username" in params:
            return None
        params["username"] = unquote(encoded, encoding="utf-8", errors="strict")
    return params


class DigestVerdict(enum.Enum):
    OK = "ok"
    MISSING = "missing"  # no Digest credentials at all
    STALE = "stale"  # right credentials, nonce too old: challenge again with stale=true
    REFUSED = "refused"


def _h(algorithm: str, text: str) -> str:
    return hashlib.new(DIGEST_ALGORITHMS[algorithm], text.encode("utf-8")).hexdigest()


@dataclass
class DigestAuthenticator:
    """One Digest account and the nonces issued for it; safe to share between threads."""

    realm: str
    username: str
    password: str
    algorithms: tuple[str, ...] = ("MD5",)
    lifetime_s: float = 300.0
    clock: Callable[[], float] = time.time
    _secret: bytes = field(default_factory=lambda: os.urandom(32), repr=False)
    _opaque: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    _counts: dict[str, int] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        unknown = [a for a in self.algorithms if a not in DIGEST_ALGORITHMS]
        if not self.algorithms or unknown:
            raise ValueError(f"Digest algorithms: expected some of {', '.join(DIGEST_ALGORITHMS)}")

    # -- challenges ---------------------------------------------------------------------------
    def new_nonce(self) -> str:
        issued = int(self.clock() * 1000).to_bytes(8, "big")
        tag = hmac.new(self._secret, issued, hashlib.sha256).digest()[:16]
        return base64.urlsafe_b64encode(issued + tag).decode("ascii")

    def challenges(self, *, stale: bool = False) -> tuple[str, ...]:
        """The ``WWW-Authenticate`` values of a 401: one per algorithm, one fresh nonce."""
        nonce = self.new_nonce()
        fields = []
        for algorithm in self.algorithms:
            if algorithm == "MD5":
                # libest's form: no algorithm (MD5 by default) and no opaque
                value = f'Digest qop="auth", realm="{self.realm}", nonce="{nonce}"'
            else:
                value = (
                    f'Digest realm="{self.realm}", qop="auth", algorithm={algorithm}, '
                    f'nonce="{nonce}", opaque="{self._opaque}", charset=UTF-8'
                )
            fields.append(value + (", stale=true" if stale else ""))
        return tuple(fields)

    def _nonce_age_s(self, nonce: str) -> float | None:
        """Seconds since this server issued `nonce`, or None when it did not issue it."""
        try:
            raw = base64.urlsafe_b64decode(nonce.encode("ascii"))
        except (binascii.Error, UnicodeEncodeError, ValueError):
            return None
        if len(raw) != 24:
            return None
        issued, tag = raw[:8], raw[8:]
        expected = hmac.new(self._secret, issued, hashlib.sha256).digest()[:16]
        if not hmac.compare_digest(tag, expected):
            return None
        return self.clock() - int.from_bytes(issued, "big") / 1000

    # -- verification -------------------------------------------------------------------------
    def check(self, authorization: str | None, method: str, uri: str) -> tuple[DigestVerdict, str]:
        """Verify an ``Authorization`` value for `method` on the request-target `uri`; the
        verdict and, when not OK, a short reason (never a secret)."""
        params = parse_digest_authorization(authorization)
        if params is None:
            return DigestVerdict.MISSING, "HTTP Digest credentials required"
        missing = [
            name
            for name in ("username", "realm", "nonce", "uri", "response", "qop", "nc", "cnonce")
            if name not in params
        ]
        if missing:
            return DigestVerdict.REFUSED, f"Digest credentials lack {', '.join(missing)}"
        algorithm = next(
            (a for a in self.algorithms if a.lower() == params.get("algorithm", "MD5").lower()),
            None,
        )
        problem = self._problem(params, algorithm, uri)
        if problem is not None:
            return DigestVerdict.REFUSED, problem
        assert algorithm is not None
        age = self._nonce_age_s(params["nonce"])
        if age is None:
            return DigestVerdict.REFUSED, "Digest nonce not issued by this server"
        expected = self.expected_response(algorithm, params, method)
        user_ok = hmac.compare_digest(params["username"].encode(), self.username.encode())
        response_ok = hmac.compare_digest(params["response"].lower().encode(), expected.encode())
        if not (user_ok and response_ok):
            return DigestVerdict.REFUSED, "HTTP Digest credentials refused"
        if not 0 <= age <= self.lifetime_s:
            return DigestVerdict.STALE, "Digest nonce expired"
        if not self._count(params["nonce"], int(params["nc"], 16)):
            return DigestVerdict.REFUSED, "Digest nonce count replayed"
        return DigestVerdict.OK, ""

    def _problem(self, params: Mapping[str, str], algorithm: str | None, uri: str) -> str | None:
        if algorithm is None:
            return f"Digest algorithm {params.get('algorithm')!r} was not offered"
        if params["realm"] != self.realm:
            return "Digest realm does not match"
        if params["qop"] != "auth":
            return "Digest qop must be auth"
        if params["uri"] != uri:
            # RFC 7616 §3.4.6: the uri must be the request-target it authenticates
            return "Digest uri is not the request-target"
        if not _NC.fullmatch(params["nc"]):
            return "Digest nc must be 8 hex digits"
        if algorithm != "MD5" and params.get("opaque") != self._opaque:
            return "Digest opaque does not match the challenge"
        return None

    def expected_response(self, algorithm: str, params: Mapping[str, str], method: str) -> str:
        """The ``response`` this account gives for `params` (RFC 7616 §3.4.1-§3.4.3, qop=auth:
        KD(H(A1), nonce:nc:cnonce:auth:H(A2)), A1 hashed again with the nonces for -sess)."""
        ha1 = _h(algorithm, f"{self.username}:{self.realm}:{self.password}")
        if algorithm.endswith("-sess"):
            ha1 = _h(algorithm, f"{ha1}:{params['nonce']}:{params['cnonce']}")
        ha2 = _h(algorithm, f"{method}:{params['uri']}")
        data = f"{params['nonce']}:{params['nc']}:{params['cnonce']}:auth:{ha2}"
        return _h(algorithm, f"{ha1}:{data}")

    def _count(self, nonce: str, nc: int) -> bool:
        """Note `nc` for `nonce`; False when it does not exceed the last one seen."""
        with self._lock:
            if nc <= self._counts.get(nonce, 0):
                return False
            if len(self._counts) >= _MAX_TRACKED_NONCES:
                self._counts.clear()  # a test server: forgetting old nonces is fine
            self._counts[nonce] = nc
            return True
