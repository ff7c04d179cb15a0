"""Which setting a proof-of-possession refusal points to (RFC 7030 §3.5, RFC 8951 §4): pure."""

from __future__ import annotations

import pytest

from est_agent.config import CsrAttrsMode, PopMode
from est_agent.workflow.agent import pop_setting_hint

ADVISORY = CsrAttrsMode.ADVISORY


@pytest.mark.parametrize(
    ("text", "sent", "pop", "csrattrs", "expected"),
    [
        (
            "EST server rejected the request (HTTP 400: PoP required: CSR lacks"
            " challengePassword = base64(tls-unique))",
            None,
            PopMode.AUTO,
            ADVISORY,
            "the server wants proof of possession but the CSR carried none (est.pop = \"auto\""
            " and the server's /csrattrs did not list challengePassword (RFC 8951 §4)): set"
            ' est.pop = "tls-unique"',
        ),
        (
            "HTTP 401: Proof of Possession Mismatch.",  # libest, no binding named
            None,
            PopMode.AUTO,
            CsrAttrsMode.OFF,
            "the server wants proof of possession but the CSR carried none (est.pop = \"auto\""
            ' and /csrattrs was not asked (est.csrattrs = "off")): set est.pop = "tls-unique"'
            ' (TLS 1.2) or "tls-exporter" (TLS 1.3)',
        ),
        (
            "HTTP 400: challengePassword missing",
            None,
            PopMode.OFF,
            ADVISORY,
            'the server wants proof of possession and est.pop = "off": set est.pop ='
            ' "tls-unique" (TLS 1.2) or "tls-exporter" (TLS 1.3)',
        ),
        (
            "HTTP 400: PoP required: tls-unique is undefined under TLS 1.3; connect with TLS 1.2",
            "tls-exporter",
            PopMode.AUTO,
            ADVISORY,
            "the server checks tls-unique, the CSR carried tls-exporter: set est.pop ="
            ' "tls-unique"',
        ),
        (
            "HTTP 401: Proof of Possession Mismatch.",
            "tls-exporter",
            PopMode.TLS_EXPORTER,
            ADVISORY,
            "the server refused the CSR's tls-exporter binding: set est.pop = \"tls-unique\" if"
            ' it binds to that, or "off" if it does not need proof of possession',
        ),
    ],
)
def test_pop_setting_hint(
    text: str, sent: str | None, pop: PopMode, csrattrs: CsrAttrsMode, expected: str
) -> None:
    assert pop_setting_hint(text, sent, pop=pop, csrattrs=csrattrs) == expected


@pytest.mark.parametrize(
    "text",
    [
        "EST server rejected the request (HTTP 400: Invalid or corrupted pkcs10 request.)",
        "EST server refused the credentials (HTTP 401: The server was unable to authorize"
        " the request.)",
    ],
)
def test_other_refusals_get_no_pop_hint(text: str) -> None:
    for sent in (None, "tls-unique"):
        assert pop_setting_hint(text, sent, pop=PopMode.AUTO, csrattrs=ADVISORY) is None
