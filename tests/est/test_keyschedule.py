"""The TLS 1.3 key schedule pieces of est/tls/keyschedule.py against RFC 8448 §3 (offline).

RFC 8448 §3 ("Simple 1-RTT Handshake") prints the master secret, the transcript hash through
the server Finished, and what is derived from them: exporter_master_secret ("exp master"), the
application traffic secrets, the server's write key and IV. The RFC 9266 exporter itself has
no published vector: tests/est/test_tls_exporter.py compares it with OpenSSL's.
"""

from __future__ import annotations

import pytest

from est_agent.est.tls import keyschedule

# RFC 8448 §3
MASTER_SECRET = bytes.fromhex("18df06843d13a08bf2a449844c5f8a478001bc4d4c627984d5a41da8d0402919")
SERVER_FINISHED_HASH = bytes.fromhex(
    "9608102a0f1ccc6db6250b7b7e417b1a000eaada3daae4777a7686c9ff83df13"
)
EXP_MASTER = "fe22f881176eda18eb8f44529e6792c50c9a3f89452f68d8ae311b4309d3cf50"
C_AP_TRAFFIC = "9e40646ce79a7f9dc05af8889bce6552875afa0b06df0087f792ebb7c17504a5"
S_AP_TRAFFIC = "a11af9f05531f856ad47116b45a950328204b4f44bfb6b3a4b4f1f3fcb631643"
S_AP_KEY = "9f02283b6c9c07efc26bb9f2ac92e356"
S_AP_IV = "cf782b88dd83549aadf1e984"


def test_exporter_master_secret_is_rfc_8448s() -> None:
    secret = keyschedule.exporter_master_secret(MASTER_SECRET, SERVER_FINISHED_HASH, "sha256")
    assert secret.hex() == EXP_MASTER


@pytest.mark.parametrize(
    ("label", "expected"), [(b"c ap traffic", C_AP_TRAFFIC), (b"s ap traffic", S_AP_TRAFFIC)]
)
def test_derive_secret_is_rfc_8448s(label: bytes, expected: str) -> None:
    secret = keyschedule.derive_secret(MASTER_SECRET, label, SERVER_FINISHED_HASH, "sha256")
    assert secret.hex() == expected


def test_hkdf_expand_label_with_empty_context_is_rfc_8448s() -> None:
    traffic = bytes.fromhex(S_AP_TRAFFIC)
    assert keyschedule.hkdf_expand_label(traffic, b"key", b"", 16, "sha256").hex() == S_AP_KEY
    assert keyschedule.hkdf_expand_label(traffic, b"iv", b"", 12, "sha256").hex() == S_AP_IV


def test_exporter_depends_on_label_context_and_hash() -> None:
    secret = bytes.fromhex(EXP_MASTER)
    base = keyschedule.tls13_exporter(secret, b"EXPORTER-Channel-Binding", b"", 32, "sha256")
    assert len(base) == 32
    assert base != keyschedule.tls13_exporter(secret, b"EXPORTER-Other", b"", 32, "sha256")
    assert base != keyschedule.tls13_exporter(
        secret, b"EXPORTER-Channel-Binding", b"x", 32, "sha256"
    )
    assert base != keyschedule.tls13_exporter(
        secret, b"EXPORTER-Channel-Binding", b"", 32, "sha384"
    )
    assert (
        keyschedule.tls13_exporter(secret, b"EXPORTER-Channel-Binding", b"", 16, "sha256")
        != base[:16]
    )


@pytest.mark.parametrize(
    ("suite", "hash_name"), [(0x1301, "sha256"), (0x1302, "sha384"), (0x1303, "sha256")]
)
def test_transcript_hash_of_each_tls13_suite(suite: int, hash_name: str) -> None:
    # RFC 8446 §B.4: TLS_AES_128_GCM_SHA256, TLS_AES_256_GCM_SHA384, TLS_CHACHA20_POLY1305_SHA256
    assert keyschedule.transcript_hash_algorithm(suite) == hash_name


@pytest.mark.parametrize(
    ("label", "context", "length", "hash_name"),
    [
        (b"", b"", 32, "sha256"),
        (b"x" * 250, b"", 32, "sha256"),
        (b"key", b"c" * 256, 16, "sha256"),
        (b"key", b"", 0, "sha256"),
        (b"key", b"", 16, "md5"),
    ],
)
def test_out_of_range_parameters_are_refused(
    label: bytes, context: bytes, length: int, hash_name: str
) -> None:
    with pytest.raises(ValueError, match=r"RFC 8446|TLS 1.3 hash"):
        keyschedule.hkdf_expand_label(MASTER_SECRET, label, context, length, hash_name)
