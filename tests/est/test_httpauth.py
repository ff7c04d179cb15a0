"""The pure HTTP authentication codecs: challenges (RFC 9110 §11.6.1), Basic, Digest (RFC 7616).

Expected Digest responses are the published examples (RFC 7616 §3.9.1, RFC 2617 §3.5), not
values computed by the code under test.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from est_agent.est.httpauth import (
    Challenge,
    DigestChallenge,
    DigestUnusable,
    basic_authorization,
    challenge_schemes,
    choose_digest,
    digest_authorization,
    digest_response,
    parse_challenges,
)

# RFC 7616 §3.9.1
RFC7616_REALM = "http-auth@example.org"
RFC7616_NONCE = "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v"
RFC7616_OPAQUE = "FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"
RFC7616_CNONCE = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ"
RFC7616_FIELDS = [
    f'Digest realm="{RFC7616_REALM}", qop="auth, auth-int", algorithm=SHA-256, '
    f'nonce="{RFC7616_NONCE}", opaque="{RFC7616_OPAQUE}"',
    f'Digest realm="{RFC7616_REALM}", qop="auth, auth-int", algorithm=MD5, '
    f'nonce="{RFC7616_NONCE}", opaque="{RFC7616_OPAQUE}"',
]


@pytest.mark.parametrize(
    ("values", "schemes"),
    [
        (['Basic realm="est"'], {"basic"}),
        (["basic"], {"basic"}),
        (['Digest realm="est", qop="auth", nonce="a,b", Basic realm="x"'], {"digest", "basic"}),
        # the RFC 9110 §11.6.1 example: two challenges, a quoted comma and escaped quotes
        (
            ['Newauth realm="apps", type=1, title="Login to \\"apps\\"", Basic realm="simple"'],
            {"newauth", "basic"},
        ),
        (['Digest realm="basic, really"', "Negotiate YIIBxQ=="], {"digest", "negotiate"}),
        (['Bearer realm = "x" , error="invalid_token"'], {"bearer"}),
        (["", ",,", 'realm="no scheme"', '"unterminated'], set()),
    ],
)
def test_challenge_schemes(values: list[str], schemes: set[str]) -> None:
    assert challenge_schemes(values) == schemes


def test_parse_challenges_keeps_params_token68_and_order() -> None:
    parsed = parse_challenges(
        [
            'Newauth realm="apps", type=1, title="Login to \\"apps\\"", Basic realm="simple"',
            "Negotiate YIIBxQ==, Digest REALM=x, realm=y, nonce=",
        ]
    )
    assert parsed == (
        Challenge("newauth", {"realm": "apps", "type": "1", "title": 'Login to "apps"'}),
        Challenge("basic", {"realm": "simple"}),
        Challenge("negotiate", {}, "YIIBxQ=="),
        # names are case-insensitive and a repeated one keeps its first value; "nonce=" with
        # no value is not an auth-param
        Challenge("digest", {"realm": "x"}),
    )


@pytest.mark.parametrize(
    "garbage",
    ['Digest realm="unterminated, nonce="n"', "Digest ===, ,", '"\\', "Digest a=b=c", "\x00\xff"],
)
def test_parse_challenges_never_raises_on_garbage(garbage: str) -> None:
    for challenge in parse_challenges([garbage]):
        assert challenge.scheme.isascii()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet=st.sampled_from(' \t,="\\=abcDigest/+'), max_size=40)))
def test_parse_challenges_is_total(values: list[str]) -> None:
    for challenge in parse_challenges(values):
        assert re.fullmatch(r"[!#$%&'*+.^_`|~0-9a-z-]+", challenge.scheme)


def test_basic_authorization() -> None:
    # RFC 7617 §2's example
    assert basic_authorization("Aladdin", "open sesame") == "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="


@pytest.mark.parametrize(
    ("algorithm", "expected"),
    [
        ("MD5", "8ca523f5e9506fed4657c9700eebdbec"),
        ("SHA-256", "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"),
    ],
)
def test_rfc7616_example(algorithm: str, expected: str) -> None:
    chosen = [c for c in parse_challenges(RFC7616_FIELDS) if c.params["algorithm"] == algorithm]
    challenge = DigestChallenge.parse(chosen[0])
    response = digest_response(
        challenge,
        username="Mufasa",
        password="Circle of Life",
        method="GET",
        uri="/dir/index.html",
        nc=1,
        cnonce=RFC7616_CNONCE,
    )
    assert response == expected  # the response value of §3.9.1
    header = digest_authorization(
        challenge,
        username="Mufasa",
        uri="/dir/index.html",
        nc=1,
        cnonce=RFC7616_CNONCE,
        response=response,
    )
    # the Authorization field of §3.9.1, parameter for parameter
    assert header == (
        f'Digest username="Mufasa", realm="{RFC7616_REALM}", uri="/dir/index.html", '
        f'algorithm={algorithm}, nonce="{RFC7616_NONCE}", nc=00000001, '
        f'cnonce="{RFC7616_CNONCE}", qop=auth, response="{expected}", '
        f'opaque="{RFC7616_OPAQUE}"'
    )


def test_rfc2617_example_without_algorithm_is_md5() -> None:
    # RFC 2617 §3.5: no algorithm parameter (MD5 then, RFC 7616 §3.3), qop list "auth,auth-int"
    (parsed,) = parse_challenges(
        [
            'Digest realm="testrealm@host.com", qop="auth,auth-int", '
            'nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", opaque="5ccc069c403ebaf9f0171e9517f40e41"'
        ]
    )
    challenge = DigestChallenge.parse(parsed)
    assert (challenge.algorithm, challenge.name) == ("MD5", "MD5")
    response = digest_response(
        challenge,
        username="Mufasa",
        password="Circle Of Life",
        method="GET",
        uri="/dir/index.html",
        nc=1,
        cnonce="0a4f113b",
    )
    assert response == "6629fae49393a05397450978507c4ef1"


def test_the_strongest_usable_challenge_is_chosen() -> None:
    # The server prefers MD5 (first); SHA-256 is stronger and offered: that one.
    offered = parse_challenges([RFC7616_FIELDS[1], RFC7616_FIELDS[0]])
    assert choose_digest(offered).algorithm == "SHA-256"
    odd = 'Digest realm="r", nonce="n", qop="auth", algorithm=SHA-512-256'
    md5 = 'Digest realm="r", nonce="n2", qop="auth", algorithm=md5-sess, stale=TRUE'
    chosen = choose_digest(parse_challenges([odd, md5]))
    assert (chosen.algorithm, chosen.name, chosen.nonce, chosen.stale) == (
        "MD5-SESS",
        "md5-sess",
        "n2",
        True,
    )


@pytest.mark.parametrize(
    ("field", "reason"),
    [
        ('Digest realm="r", nonce="n", qop="auth", algorithm=SHA-512-256', "SHA-512-256"),
        ('Digest realm="r", nonce="n", qop="auth-int"', "qop=auth-int, not auth"),
        ('Digest realm="r", nonce="n"', "no qop (RFC 2069"),
        ('Digest realm="r", qop="auth"', "no nonce"),
        ('Digest nonce="n", qop="auth"', "no realm"),
        ('Basic realm="r"', "no Digest challenge"),
    ],
)
def test_unusable_digest_challenges_say_why(field: str, reason: str) -> None:
    with pytest.raises(DigestUnusable, match=reason.replace("(", r"\(")):
        choose_digest(parse_challenges([field]))


def test_sess_and_quoting_and_non_ascii_username() -> None:
    challenge = DigestChallenge(
        realm='a "quoted" \\ realm', nonce="n", algorithm="SHA-256-SESS", name="SHA-256-sess"
    )
    header = digest_authorization(
        challenge, username="Jäsøn", uri="/x", nc=2, cnonce="c", response="r"
    )
    assert header.startswith(
        "Digest username*=UTF-8''J%C3%A4s%C3%B8n, "
        'realm="a \\"quoted\\" \\\\ realm", uri="/x", algorithm=SHA-256-sess, nonce="n", '
        'nc=00000002, cnonce="c", qop=auth, response="'
    )
    assert "opaque" not in header
    # -sess hashes H(A1) again with both nonces (RFC 7616 §3.4.2): another response, and one
    # that changes with the client nonce
    plain = DigestChallenge(realm=challenge.realm, nonce="n", algorithm="SHA-256", name="SHA-256")

    def response(c: DigestChallenge, cnonce: str) -> str:
        return digest_response(
            c, username="u", password="pw", method="POST", uri="/x", nc=1, cnonce=cnonce
        )

    assert response(challenge, "c") != response(plain, "c")
    assert response(challenge, "c") != response(challenge, "d")
