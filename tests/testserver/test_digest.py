"""The test server's Digest authenticator (RFC 7616) offline: challenges, nonces, verification.

Expected responses are the RFC 7616 §3.9.1 example or computed here with hashlib from the
RFC's formulas, never by the code under test.
"""

from __future__ import annotations

import hashlib

import pytest

from est_agent.testserver.digest import (
    DigestAuthenticator,
    DigestVerdict,
    parse_digest_authorization,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def _params(value: str) -> dict[str, str]:
    # the challenge's auth-params, read with a regex of the test's own
    import re

    return {k: v.strip('"') for k, v in re.findall(r'(\w+)=("[^"]*"|[^,\s]*)', value)}


def _answer(
    challenge: str,
    *,
    user: str = "alice",
    password: str = "s3cret",
    method: str = "POST",
    uri: str = "/.well-known/est/simpleenroll",
    nc: str = "00000001",
    cnonce: str = "0a4f113b",
    username_field: str | None = None,
) -> str:
    c = _params(challenge)
    algorithm = c.get("algorithm", "MD5")
    name = "sha256" if algorithm.startswith("SHA-256") else "md5"

    def h(text: str) -> str:
        return hashlib.new(name, text.encode()).hexdigest()

    ha1 = h(f"{user}:{c['realm']}:{password}")
    if algorithm.endswith("-sess"):
        ha1 = h(f"{ha1}:{c['nonce']}:{cnonce}")
    response = h(f"{ha1}:{c['nonce']}:{nc}:{cnonce}:auth:{h(f'{method}:{uri}')}")
    fields = [
        username_field or f'username="{user}"',
        f'realm="{c["realm"]}"',
        f'nonce="{c["nonce"]}"',
        f'uri="{uri}"',
        f"algorithm={algorithm}",
        "qop=auth",
        f"nc={nc}",
        f'cnonce="{cnonce}"',
        f'response="{response}"',
    ]
    if "opaque" in c:
        fields.append(f'opaque="{c["opaque"]}"')
    return "Digest " + ", ".join(fields)


def _authenticator(*algorithms: str, clock: Clock | None = None) -> DigestAuthenticator:
    return DigestAuthenticator(
        realm="est",
        username="alice",
        password="s3cret",
        algorithms=algorithms or ("MD5",),
        lifetime_s=60,
        clock=clock or Clock(),
    )


def test_challenges_md5_as_libest_then_the_others_in_order() -> None:
    md5, sha = _authenticator("MD5", "SHA-256").challenges()
    assert md5.startswith('Digest qop="auth", realm="est", nonce="')
    assert "algorithm" not in md5 and "opaque" not in md5  # libest sends neither
    assert sha.startswith('Digest realm="est", qop="auth", algorithm=SHA-256, nonce="')
    assert "opaque=" in sha and sha.endswith("charset=UTF-8")
    assert _params(md5)["nonce"] == _params(sha)["nonce"]
    assert _authenticator().challenges(stale=True)[0].endswith(", stale=true")


@pytest.mark.parametrize("algorithm", ["MD5", "MD5-sess", "SHA-256", "SHA-256-sess"])
def test_a_correct_answer_is_accepted_once(algorithm: str) -> None:
    auth = _authenticator(algorithm)
    (challenge,) = auth.challenges()
    answer = _answer(challenge)
    uri = "/.well-known/est/simpleenroll"
    assert auth.check(answer, "POST", uri) == (DigestVerdict.OK, "")
    # the same nonce count again: a replay (RFC 7616 §3.4.6)
    assert auth.check(answer, "POST", uri) == (DigestVerdict.REFUSED, "Digest nonce count replayed")
    # the next count on the same nonce: fine (nonces are reused across requests, §3.4)
    assert auth.check(_answer(challenge, nc="00000002"), "POST", uri)[0] is DigestVerdict.OK


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"password": "wrong"}, "credentials refused"),
        ({"user": "bob"}, "credentials refused"),
        ({"method": "GET"}, "credentials refused"),  # A2 covers the method
        ({"uri": "/.well-known/est/cacerts"}, "uri is not the request-target"),
        ({"nc": "1"}, "nc must be 8 hex digits"),
    ],
)
def test_wrong_answers_are_refused(change: dict[str, str], reason: str) -> None:
    auth = _authenticator("SHA-256")
    (challenge,) = auth.challenges()
    verdict, text = auth.check(
        _answer(challenge, **change), "POST", "/.well-known/est/simpleenroll"
    )
    assert verdict is DigestVerdict.REFUSED and reason in text
    assert "s3cret" not in text and "wrong" not in text


def test_forged_foreign_and_unoffered() -> None:
    auth = _authenticator("SHA-256")
    (challenge,) = auth.challenges()
    uri = "/.well-known/est/simpleenroll"
    forged = challenge.replace(_params(challenge)["nonce"][:4], "AAAA")
    assert auth.check(_answer(forged), "POST", uri)[1] == "Digest nonce not issued by this server"
    other = _authenticator("SHA-256").challenges()[0]  # another server's secret and opaque
    assert auth.check(_answer(other), "POST", uri)[0] is DigestVerdict.REFUSED
    md5 = challenge.replace("algorithm=SHA-256", "algorithm=MD5")
    assert "was not offered" in auth.check(_answer(md5), "POST", uri)[1]
    assert auth.check(None, "POST", uri)[0] is DigestVerdict.MISSING
    assert auth.check("Basic YWxpY2U6czNjcmV0", "POST", uri)[0] is DigestVerdict.MISSING


def test_an_old_nonce_with_the_right_password_is_stale() -> None:
    clock = Clock()
    auth = _authenticator("MD5", clock=clock)
    (challenge,) = auth.challenges()
    clock.now += 61
    uri = "/.well-known/est/simpleenroll"
    assert auth.check(_answer(challenge), "POST", uri)[0] is DigestVerdict.STALE
    # stale only when the credentials were right (RFC 7616 §3.3)
    wrong = _answer(challenge, password="nope", nc="00000002")
    assert auth.check(wrong, "POST", uri)[0] is DigestVerdict.REFUSED


def test_rfc7616_example_response() -> None:
    auth = DigestAuthenticator(
        realm="http-auth@example.org", username="Mufasa", password="Circle of Life"
    )
    params = {
        "nonce": "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",
        "cnonce": "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ",
        "nc": "00000001",
        "uri": "/dir/index.html",
    }
    assert auth.expected_response("MD5", params, "GET") == "8ca523f5e9506fed4657c9700eebdbec"
    assert auth.expected_response("SHA-256", params, "GET") == (
        "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('Digest username="a", nc=00000001', {"username": "a", "nc": "00000001"}),
        ('digest  realm="x, \\"y\\"" ,qop=auth', {"realm": 'x, "y"', "qop": "auth"}),
        ("Digest username*=UTF-8''J%C3%A4s%C3%B8n", {"username": "Jäsøn"}),
        ("Digest username*=ISO-8859-1''J%E4", None),
        ('Digest username="a", username="b"', None),  # each parameter once
        ('Digest realm="unterminated', None),
        ("Basic YWxpY2U6czNjcmV0", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_digest_authorization(value: str | None, expected: dict[str, str] | None) -> None:
    assert parse_digest_authorization(value) == expected


def test_non_ascii_username_is_accepted_from_username_star() -> None:
    auth = DigestAuthenticator(realm="est", username="Jäsøn", password="pw", clock=Clock())
    (challenge,) = auth.challenges()
    answer = _answer(
        challenge, user="Jäsøn", password="pw", username_field="username*=UTF-8''J%C3%A4s%C3%B8n"
    )
    assert auth.check(answer, "POST", "/.well-known/est/simpleenroll")[0] is DigestVerdict.OK


def test_unknown_algorithms_are_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="Digest algorithms"):
        _authenticator("SHA-512-256")
