"""HTTP authentication for the EST client, pure: challenges, Basic and Digest over strings.

* ``parse_challenges``: ``WWW-Authenticate`` field values as challenges (RFC 9110 §11.6.1):
  an auth-scheme, then a token68 or auth-params; one field may hold several challenges, a
  response several fields. Tolerant: garbage is skipped, never raised.
* ``basic_authorization``: RFC 7617 §2.
* Digest (RFC 7616): ``DigestChallenge.parse`` checks one challenge and says in words why it
  cannot be answered (``DigestUnusable``); ``choose_digest`` takes the strongest usable one;
  ``digest_response`` / ``digest_authorization`` compute the answer (§3.4.1) for qop=auth with
  MD5 or SHA-256, plain or ``-sess`` (§3.4.2). auth-int (a hash over the body), username
  hashing (§3.4.4, optional for clients) and RFC 2069's qop-less form are not spoken.

No I/O, no clock and no randomness: the caller passes the client nonce and the nonce count.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import quote

__all__ = [
    "DIGEST_ALGORITHMS",
    "Challenge",
    "DigestChallenge",
    "DigestUnusable",
    "basic_authorization",
    "challenge_schemes",
    "choose_digest",
    "digest_authorization",
    "digest_response",
    "parse_challenges",
]

# RFC 9110 §5.6.2 token, §11.2 token68, §5.6.4 quoted-string (quoted-pair inside).
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"  # noqa: S105 - a grammar, not a secret
_PARAM = re.compile(rf'({_TOKEN})[ \t]*=[ \t]*(?:({_TOKEN})|"((?:[^"\\]|\\.)*)")[ \t]*(?=,|$)')
_TOKEN68 = re.compile(r"([A-Za-z0-9._~+/-]+=*)[ \t]*(?=,|$)")
_SCHEME = re.compile(rf"({_TOKEN})(?=[ \t,]|$)")
_SKIP = re.compile(r'(?:[^,"]|"(?:[^"\\]|\\.)*(?:"|$))*')  # to the next comma outside quotes
_QUOTED_PAIR = re.compile(r"\\(.)")


@dataclass(frozen=True)
class Challenge:
    """One challenge: its scheme (lower case; ``name`` as the server wrote it) and its
    auth-params (names lower case, values unquoted) or token68."""

    scheme: str
    params: Mapping[str, str]
    token68: str | None = None
    name: str = field(default="", compare=False)


def parse_challenges(values: Iterable[str]) -> tuple[Challenge, ...]:
    """The challenges of ``WWW-Authenticate`` field values, in order (RFC 9110 §11.6.1).

    A list element that is a token not followed by ``=`` starts a challenge; ``name=value``
    elements are auth-params of the challenge before them (a repeated name keeps its first
    value: §11.2 allows each only once). Quoted strings may hold commas and quoted-pairs.
    Elements that fit neither are skipped.
    """
    found: list[tuple[str, dict[str, str], str | None]] = []  # (name, params, token68)
    for value in values:
        pos, end = 0, len(value)
        while pos < end:
            if value[pos] in " \t,":
                pos += 1
                continue
            param = _PARAM.match(value, pos)
            if param is not None:
                if found:
                    quoted = param.group(3)
                    text = _QUOTED_PAIR.sub(r"\1", quoted) if quoted is not None else param.group(2)
                    found[-1][1].setdefault(param.group(1).lower(), text)
                pos = param.end()
                continue
            scheme = _SCHEME.match(value, pos)
            if scheme is not None:
                pos = scheme.end()
                while pos < end and value[pos] in " \t":
                    pos += 1
                token68 = None if _PARAM.match(value, pos) else _TOKEN68.match(value, pos)
                if token68 is not None:
                    pos = token68.end()
                found.append((scheme.group(1), {}, token68.group(1) if token68 else None))
                continue
            skipped = _SKIP.match(value, pos)
            pos = max(pos + 1, skipped.end() if skipped else pos + 1)
    return tuple(Challenge(name.lower(), params, token68, name) for name, params, token68 in found)


def challenge_schemes(values: Iterable[str]) -> frozenset[str]:
    """The auth-schemes (lower case) of ``WWW-Authenticate`` field values."""
    return frozenset(c.scheme for c in parse_challenges(values))


def basic_authorization(user: str, password: str) -> str:
    """``Basic`` credentials (RFC 7617 §2): base64 of user-id ":" password in UTF-8."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return f"Basic {token}"


# RFC 7616 §3.3 (algorithm) and §6.1 (the registry): what this client answers, strongest
# first. SHA-512-256 is registered too; no EST server seen in the field offers it.
DIGEST_ALGORITHMS: Mapping[str, str] = {
    "SHA-256": "sha256",
    "SHA-256-SESS": "sha256",
    "MD5": "md5",
    "MD5-SESS": "md5",
}
_RANK = {name: rank for rank, name in enumerate(DIGEST_ALGORITHMS)}


class DigestUnusable(ValueError):
    """Why a Digest challenge cannot be answered, in words (for the operator)."""


@dataclass(frozen=True)
class DigestChallenge:
    """A Digest challenge this client can answer (RFC 7616 §3.3).

    ``algorithm`` is upper case as in ``DIGEST_ALGORITHMS`` (the token is matched without
    regard to case, and "MD5" when absent); ``name`` is how the server spelled it, echoed
    back; qop is "auth" (the only one answered); ``stale``: the nonce, not the credentials,
    was refused (§3.3: answer again, without asking for the password again).
    """

    realm: str
    nonce: str
    algorithm: str
    name: str
    opaque: str | None = None
    stale: bool = False

    @classmethod
    def parse(cls, challenge: Challenge) -> DigestChallenge:
        """The challenge's parameters, checked; raises ``DigestUnusable`` saying why not."""
        params = challenge.params
        if challenge.scheme != "digest":
            raise DigestUnusable(f"{challenge.scheme} is not Digest")
        for required in ("realm", "nonce"):
            if required not in params:
                raise DigestUnusable(f"the Digest challenge has no {required}")
        name = params.get("algorithm", "MD5")
        algorithm = name.upper()
        if algorithm not in DIGEST_ALGORITHMS:
            known = ", ".join(a for a in DIGEST_ALGORITHMS if not a.endswith("-SESS"))
            raise DigestUnusable(f"Digest algorithm={name} is not supported (only {known})")
        qops = {q.strip().lower() for q in params.get("qop", "").split(",")} - {""}
        if not qops:
            # RFC 7616 §3.3: qop is required; the qop-less RFC 2069 form has no client nonce.
            raise DigestUnusable("the Digest challenge has no qop (RFC 2069 form, not answered)")
        if "auth" not in qops:
            shown = ", ".join(sorted(qops))
            raise DigestUnusable(f"the Digest challenge offers qop={shown}, not auth")
        return cls(
            realm=params["realm"],
            nonce=params["nonce"],
            algorithm=algorithm,
            name=name,
            opaque=params.get("opaque"),
            stale=params.get("stale", "").lower() == "true",
        )


def choose_digest(challenges: Iterable[Challenge]) -> DigestChallenge:
    """The Digest challenge to answer: of those offered (RFC 7616 §3.7: one per algorithm),
    the usable one with the strongest algorithm, the server's order breaking ties.

    Raises ``DigestUnusable`` with the reasons when none can be answered (or none is Digest).
    """
    usable: list[DigestChallenge] = []
    reasons: list[str] = []
    for challenge in challenges:
        if challenge.scheme != "digest":
            continue
        try:
            usable.append(DigestChallenge.parse(challenge))
        except DigestUnusable as exc:
            reasons.append(str(exc))
    if not usable:
        raise DigestUnusable("; ".join(dict.fromkeys(reasons)) or "no Digest challenge")
    return min(usable, key=lambda c: _RANK[c.algorithm])


def _hex(algorithm: str, text: str) -> str:
    return hashlib.new(DIGEST_ALGORITHMS[algorithm], text.encode("utf-8")).hexdigest()


def digest_response(
    challenge: DigestChallenge,
    *,
    username: str,
    password: str,
    method: str,
    uri: str,
    nc: int,
    cnonce: str,
) -> str:
    """The ``response`` value for qop=auth (RFC 7616 §3.4.1-§3.4.3), lower-case hex.

    response = KD(H(A1), nonce ":" nc ":" cnonce ":" "auth" ":" H(A2)), KD(s, d) = H(s ":" d);
    A1 = username ":" realm ":" password, for ``-sess`` H(that) ":" nonce ":" cnonce; A2 =
    method ":" uri. Strings are UTF-8 (§4: the charset RFC 7616 defines).
    """
    algorithm = challenge.algorithm
    ha1 = _hex(algorithm, f"{username}:{challenge.realm}:{password}")
    if algorithm.endswith("-SESS"):
        ha1 = _hex(algorithm, f"{ha1}:{challenge.nonce}:{cnonce}")
    ha2 = _hex(algorithm, f"{method}:{uri}")
    return _hex(algorithm, f"{ha1}:{challenge.nonce}:{nc:08x}:{cnonce}:auth:{ha2}")


def _quoted(text: str) -> str:
    # RFC 9110 §5.6.4: a quoted-string escapes '"' and '\' with a backslash.
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def digest_authorization(
    challenge: DigestChallenge,
    *,
    username: str,
    uri: str,
    nc: int,
    cnonce: str,
    response: str,
) -> str:
    """The ``Authorization`` value answering ``challenge`` (RFC 7616 §3.4) with ``response``
    (``digest_response`` of the same username, uri, nc and cnonce; the caller keeps it to mask).

    ``algorithm``, ``qop`` and ``nc`` go unquoted (§3.4), the others as quoted strings. A
    username that is not plain ASCII travels as ``username*`` in RFC 8187 form (§3.4).
    """
    if username.isascii() and username.isprintable():
        user = f"username={_quoted(username)}"
    else:
        user = f"username*=UTF-8''{quote(username, safe='')}"
    fields = [
        user,
        f"realm={_quoted(challenge.realm)}",
        f"uri={_quoted(uri)}",
        f"algorithm={challenge.name}",
        f"nonce={_quoted(challenge.nonce)}",
        f"nc={nc:08x}",
        f"cnonce={_quoted(cnonce)}",
        "qop=auth",
        f"response={_quoted(response)}",
    ]
    if challenge.opaque is not None:
        fields.append(f"opaque={_quoted(challenge.opaque)}")
    return "Digest " + ", ".join(fields)
