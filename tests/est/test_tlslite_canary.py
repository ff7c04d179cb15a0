"""Canaries for the tlslite-ng adapter (est_agent/est/tls/tlslite_adapter.py).

The adapter subclasses tlslite-ng and reaches into its private internals (its docstring lists
each one). These tests fail loudly, naming what to re-check, when tlslite-ng changes: another
installed version, an overridden or called private method gone or with other parameters, an
attribute tlslite reads from our card key no longer read that way, the per-connection AES-GCM
cipher not taking effect, or taking effect beyond our connections. The two tests that run a
handshake or a second interpreter are marked ``integration``; the rest are offline.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import inspect
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from est_agent.est.tls import TlsliteTls, policy, tlslite_adapter
from est_agent.est.tls.tlslite_adapter import OpenSslAesGcm
from est_agent.testserver import DevPki
from tests.est import hostile_tls as hostile

ADAPTED_VERSION = "0.8.2"
RECHECK = (
    "re-check every tlslite-ng internal listed in the docstring of "
    "est_agent/est/tls/tlslite_adapter.py against the installed tlslite-ng"
)


@pytest.fixture(scope="module", autouse=True)
def _tlslite() -> None:
    tlslite_adapter.load()  # imports tlslite-ng's submodules as the client does


def _resolve(dotted: str) -> Any:
    """``tlslite.tlsconnection.TLSConnection._sendMsg`` -> the object (module, then attributes)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = inspect.getattr_static(obj, name)
            obj = obj.__func__ if isinstance(obj, staticmethod | classmethod) else obj
        return obj
    raise AssertionError(f"{dotted} not found: {RECHECK}")


# -- the version we adapted to --------------------------------------------------------------------


def test_installed_tlslite_ng_is_the_adapted_version() -> None:
    installed = importlib.metadata.version("tlslite-ng")
    assert installed == ADAPTED_VERSION, (
        f"tlslite-ng {installed} is installed, the adapter was written for {ADAPTED_VERSION}: "
        f"{RECHECK}, then set ADAPTED_VERSION here and the bound in pyproject.toml"
    )


# -- the private methods we override or call keep their parameters ---------------------------------

#: (what, its parameters as tlslite-ng 0.8.2 has them, whether it is a generator: the
#: overrides ``yield from`` the base method).
PRIVATE_METHODS: list[tuple[str, list[str], bool]] = [
    ("tlslite.tlsconnection.TLSConnection.__init__", ["self", "sock"], False),
    (
        "tlslite.tlsconnection.TLSConnection._clientGetKeyFromChain",
        ["self", "certificate", "settings", "tack_ext"],
        True,
    ),
    (
        "tlslite.tlsconnection.TLSConnection._clientKeyExchange",
        [
            "self",
            "settings",
            "cipherSuite",
            "clientCertChain",
            "privateKey",
            "certificateType",
            "tackExt",
            "clientRandom",
            "serverRandom",
            "keyExchange",
        ],
        True,
    ),
    (
        "tlslite.tlsconnection.TLSConnection._clientTLS13Handshake",
        [
            "self",
            "settings",
            "session",
            "clientHello",
            "clientCertChain",
            "privateKey",
            "serverHello",
        ],
        True,
    ),
    (
        "tlslite.tlsrecordlayer.TLSRecordLayer._sendMsg",
        ["self", "msg", "randomizeFirstBlock", "update_hashes"],
        True,
    ),
    (
        "tlslite.tlsrecordlayer.TLSRecordLayer._sendError",
        ["self", "alertDescription", "errorStr"],
        True,
    ),
    (
        "tlslite.tlsconnection.TLSConnection.keyingMaterialExporter",
        ["self", "label", "length"],
        False,
    ),
    ("tlslite.tlsconnection.TLSConnection._genKeyShareEntry", ["cls", "group", "version"], False),
    ("tlslite.tlsconnection.TLSConnection._getKEX", ["group", "version"], False),
    (
        "tlslite.keyexchange.RawDHKeyExchange.calc_shared_key",
        ["self", "private", "peer_share", "valid_point_formats"],
        False,
    ),
    ("tlslite.handshakehashes.HandshakeHashes.copy", ["self"], False),
    ("tlslite.handshakehashes.HandshakeHashes.digest", ["self", "digest"], False),
    ("tlslite.utils.ecdsakey.ECDSAKey._sign", ["self", "data", "hash_alg"], False),
    ("tlslite.utils.ecdsakey.ECDSAKey._verify", ["self", "signature", "hash_bytes"], False),
    ("tlslite.recordlayer.RecordLayer._getCipherSettings", ["cipherSuite"], False),
    ("tlslite.utils.cipherfactory.createAESGCM", ["key", "implList"], False),
]


#: (method, the call in its source through which the device's key agreement is reached): the
#: adapter's instance-method overrides of tlslite's class/static methods only take effect
#: where tlslite calls them through ``self``.
KEY_SHARE_CALLS = [
    ("tlslite.tlsconnection.TLSConnection._clientSendClientHello", "self._genKeyShareEntry("),
    ("tlslite.tlsconnection.TLSConnection._clientGetServerHello", "self._genKeyShareEntry("),
    ("tlslite.tlsconnection.TLSConnection._clientTLS13Handshake", "self._getKEX("),
]


@pytest.mark.parametrize(("target", "call"), KEY_SHARE_CALLS, ids=lambda v: v)
def test_key_share_hooks_are_called_through_self(target: str, call: str) -> None:
    source = inspect.getsource(_resolve(target))
    assert call in source, f"{target} no longer calls {call}...): {RECHECK}"


@pytest.mark.parametrize(("target", "params", "generator"), PRIVATE_METHODS, ids=lambda v: v)
def test_private_method_keeps_its_signature(
    target: str, params: list[str], generator: bool
) -> None:
    function = _resolve(target)
    got = list(inspect.signature(function).parameters)
    assert got == params, f"{target} now takes {got}, not {params}: {RECHECK}"
    assert inspect.isgeneratorfunction(function) == generator, (
        f"{target} is {'no longer' if generator else 'now'} a generator: {RECHECK}"
    )


def test_handshake_client_cert_takes_what_the_adapter_passes() -> None:
    function = _resolve("tlslite.tlsconnection.TLSConnection.handshakeClientCert")
    got = set(inspect.signature(function).parameters)
    assert {"certChain", "privateKey", "settings", "serverName"} <= got, RECHECK


def test_get_cipher_settings_is_a_static_method_naming_create_aes_gcm() -> None:
    # use_fast_aes_gcm shadows it on one record layer instance, and swaps this factory.
    from tlslite.constants import CipherSuite
    from tlslite.recordlayer import RecordLayer
    from tlslite.utils import cipherfactory

    assert isinstance(inspect.getattr_static(RecordLayer, "_getCipherSettings"), staticmethod), (
        f"RecordLayer._getCipherSettings is no longer a staticmethod: {RECHECK}"
    )
    for suite, key_length in [
        (CipherSuite.TLS_AES_128_GCM_SHA256, 16),
        (CipherSuite.TLS_AES_256_GCM_SHA384, 32),
        (CipherSuite.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, 16),
    ]:
        assert RecordLayer._getCipherSettings(suite) == (key_length, 4, cipherfactory.createAESGCM)


def test_a_connection_has_its_own_record_layer() -> None:
    from tlslite.recordlayer import RecordLayer
    from tlslite.tlsconnection import TLSConnection

    a, b = socket.socketpair()
    with a, b:
        first, second = TLSConnection(a), TLSConnection(b)
        assert isinstance(first._recordLayer, RecordLayer), RECHECK
        assert first._recordLayer is not second._recordLayer


def test_ecdsa_key_plumbing_the_card_key_relies_on() -> None:
    # CardEcdsaKey overrides _sign/_verify and provides private_key.curve.baselen, key_type and
    # public_key without calling ECDSAKey.__init__: tlslite must still reach it that way.
    from tlslite.keyexchange import KeyExchange
    from tlslite.utils.ecdsakey import ECDSAKey

    assert "self._sign(" in inspect.getsource(ECDSAKey.sign), RECHECK
    assert "self._verify(" in inspect.getsource(ECDSAKey.verify), RECHECK
    certificate_verify = inspect.getsource(KeyExchange.makeCertificateVerify)
    assert "privateKey.private_key.curve.baselen" in certificate_verify, RECHECK
    assert 'privateKey.key_type == "ecdsa"' in certificate_verify, RECHECK


def test_message_fields_the_adapter_reads() -> None:
    from tlslite.constants import ContentType
    from tlslite.errors import TLSRemoteAlert
    from tlslite.messages import ClientHello, Finished

    assert ClientHello().cipher_suites == [], RECHECK  # sorted in place by _sendMsg
    finished = Finished((3, 3)).create(bytearray(12))
    assert finished.verify_data == bytearray(12) and finished.contentType == ContentType.handshake
    alert = Exception.__new__(TLSRemoteAlert)
    alert.description = 42
    assert tlslite_adapter.remote_alert(alert) == 42


def test_handshake_settings_accept_the_policy(dev_pki: DevPki) -> None:
    config = TlsliteTls((dev_pki.tls_ca_certificate,))
    validated = tlslite_adapter._handshake_settings(config).validate()
    assert validated.cipherNames == list(policy.TLS_CIPHERS)
    assert validated.keyExchangeNames == list(policy.TLS12_KEY_EXCHANGES)
    assert validated.macNames == list(policy.TLS_MACS)
    assert (validated.minVersion, validated.maxVersion) == ((3, 3), (3, 4))
    assert validated.certificate_compression_send == []
    assert validated.ecdsaSigHashes[0] == "sha256"


# -- the AES-GCM cipher: ours on our connections, known answers, nowhere else ----------------------

# Known answers from the GCM specification's test vectors (McGrew & Viega, "The Galois/Counter
# Mode of Operation", test cases 4 and 16; the NIST SP 800-38D validation vectors): a 60-byte
# plaintext with 20 bytes of additional data, under AES-128 and AES-256.
GCM_IV = "cafebabefacedbaddecaf888"
GCM_PLAINTEXT = (
    "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
    "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39"
)
GCM_AAD = "feedfacedeadbeeffeedfacedeadbeefabaddad2"
GCM_VECTORS = {
    "aes128gcm": (
        "feffe9928665731c6d6a8f9467308308",
        "42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e"
        "21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e091",
        "5bc94fbc3221a5db94fae95ae7121a47",
    ),
    "aes256gcm": (
        "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308",
        "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
        "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662",
        "76fc6ece0f4e1768cddf8853bb2d551b",
    ),
}


def _b(hex_text: str) -> bytearray:
    return bytearray(bytes.fromhex(hex_text))


def _assert_known_answer(cipher: Any, name: str) -> None:
    _, ciphertext, tag = GCM_VECTORS[name]
    sealed = cipher.seal(_b(GCM_IV), _b(GCM_PLAINTEXT), _b(GCM_AAD))
    assert bytes(sealed) == bytes.fromhex(ciphertext + tag)
    assert cipher.open(_b(GCM_IV), sealed, _b(GCM_AAD)) == _b(GCM_PLAINTEXT)
    forged = bytearray(sealed)
    forged[-1] ^= 1
    assert cipher.open(_b(GCM_IV), forged, _b(GCM_AAD)) is None  # tlslite's "bad tag"


@pytest.mark.parametrize("name", list(GCM_VECTORS))
def test_openssl_aes_gcm_gives_the_known_answers_with_tlslites_interface(name: str) -> None:
    from tlslite.utils import python_aesgcm

    key = _b(GCM_VECTORS[name][0])
    ours, theirs = OpenSslAesGcm(key), python_aesgcm.new(key)
    _assert_known_answer(ours, name)
    _assert_known_answer(theirs, name)  # the vector itself is right
    for attribute in ("isBlockCipher", "isAEAD", "nonceLength", "tagLength", "name", "key"):
        assert getattr(ours, attribute) == getattr(theirs, attribute), attribute


@pytest.mark.parametrize("name", list(GCM_VECTORS))
def test_record_layer_cipher_is_ours_on_our_connection_only(name: str) -> None:
    from tlslite.constants import CipherSuite
    from tlslite.tlsconnection import TLSConnection

    suite = (
        CipherSuite.TLS_AES_128_GCM_SHA256
        if name == "aes128gcm"
        else CipherSuite.TLS_AES_256_GCM_SHA384
    )
    key = _b(GCM_VECTORS[name][0])
    a, b = socket.socketpair()
    with a, b:
        ours, plain = TLSConnection(a), TLSConnection(b)
        tlslite_adapter.use_fast_aes_gcm(ours)
        _, _, create = ours._recordLayer._getCipherSettings(suite)
        cipher = create(key, ["openssl", "pycrypto", "python"])
        assert isinstance(cipher, OpenSslAesGcm), f"the AES-GCM patch did not take: {RECHECK}"
        _assert_known_answer(cipher, name)
        _, _, create = plain._recordLayer._getCipherSettings(suite)
        assert create(key, ["python"]).implementation == "python"  # tlslite's own


# -- a real handshake: our client against a plain tlslite server in the same process --------------


@contextlib.contextmanager
def _plain_tlslite_server(
    pki: DevPki, sock: socket.socket, version: tuple[int, int]
) -> Iterator[dict[str, Any]]:
    """Another tlslite user in this process: a plain TLSConnection server on ``sock`` that
    echoes one message; ``seen`` gets its cipher objects and what it received."""
    from tlslite.handshakesettings import HandshakeSettings
    from tlslite.tlsconnection import TLSConnection
    from tlslite.utils.keyfactory import parsePEMKey
    from tlslite.x509certchain import X509CertChain

    chain = X509CertChain()
    chain.parsePemList(hostile.pem(hostile.server_certificate(pki)))
    key = parsePEMKey(pki.server_key_path.read_text(), private=True, implementations=["python"])
    settings = HandshakeSettings()
    settings.minVersion = settings.maxVersion = version
    settings.versions = [version]
    settings.cipherNames = ["aes128gcm"]
    if version == (3, 4):  # tlslite refuses its TLS 1.2-only curves then (RFC 8446 §4.2.7)
        settings.eccCurves = ["x25519", "secp256r1", "secp384r1"]
    seen: dict[str, Any] = {}

    def serve() -> None:
        try:
            tls = TLSConnection(sock)
            tls.handshakeServer(certChain=chain, privateKey=key, settings=settings)
            seen["ciphers"] = (
                tls._recordLayer._writeState.encContext,
                tls._recordLayer._readState.encContext,
            )
            seen["received"] = bytes(tls.recv(1024))
            tls.sendall(b"echo:" + seen["received"])
            tls.close()
        except Exception as exc:  # recorded for the test
            seen["error"] = exc

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        thread.join(timeout=10)


@pytest.mark.integration
@pytest.mark.parametrize("version", [(3, 3), (3, 4)], ids=["tls12", "tls13"])
def test_our_client_uses_openssl_aes_gcm_a_plain_server_keeps_tlslites(
    dev_pki: DevPki, version: tuple[int, int]
) -> None:
    import time

    started = time.monotonic()
    client_sock, server_sock = socket.socketpair()
    client_sock.settimeout(10)
    server_sock.settimeout(10)
    config = TlsliteTls((dev_pki.tls_ca_certificate,), max_version="1.3")
    with client_sock, server_sock, _plain_tlslite_server(dev_pki, server_sock, version) as seen:
        client = tlslite_adapter.handshake(
            client_sock, config, "localhost", card_time=contextlib.nullcontext
        )
        client.sendall(b"ping")
        answer = client.recv(1024)
        record_layer = client._connection._recordLayer
        ours = (record_layer._writeState.encContext, record_layer._readState.encContext)
        negotiated = client.ssl_object.version()
        client.close()
    assert "error" not in seen, seen.get("error")
    assert answer == b"echo:ping"  # records sealed by OpenSSL opened by tlslite, and back
    assert all(isinstance(c, OpenSslAesGcm) for c in ours), f"patch did not take: {RECHECK}"
    assert [c.implementation for c in seen["ciphers"]] == ["python", "python"]
    assert negotiated == ("TLSv1.3" if version == (3, 4) else "TLSv1.2")
    assert time.monotonic() - started < 10


@pytest.mark.integration
def test_our_tls13_exporter_derivation_matches_tlslites_where_tlslite_is_right(
    dev_pki: DevPki,
) -> None:
    # Without a CertificateRequest nothing of the client's enters the transcript between the
    # server Finished and the point where tlslite-ng derives exporter_master_secret, so its
    # value is right there (RFC 8446 §7.1): ours, from the master secret, the suite and the
    # transcript copy _sendMsg took, must be the same secret and the same exporter. A change
    # of those tlslite internals (session.masterSecret, session.cipherSuite, _handshake_hash,
    # the moment _sendMsg copies it) shows here. (Against OpenSSL, with client authentication
    # too: tests/est/test_tls_exporter.py.)
    import time

    from est_agent.est.tls import keyschedule

    started = time.monotonic()
    client_sock, server_sock = socket.socketpair()
    client_sock.settimeout(10)
    server_sock.settimeout(10)
    config = TlsliteTls((dev_pki.tls_ca_certificate,))
    with client_sock, server_sock, _plain_tlslite_server(dev_pki, server_sock, (3, 4)) as seen:
        client = tlslite_adapter.handshake(
            client_sock, config, "localhost", card_time=contextlib.nullcontext
        )
        connection = client._connection
        hash_name = keyschedule.transcript_hash_algorithm(connection.session.cipherSuite)
        transcript = bytes(connection.est_server_finished_hashes.digest(hash_name))
        ours = keyschedule.exporter_master_secret(
            bytes(connection.session.masterSecret), transcript, hash_name
        )
        theirs = bytes(connection.session.exporterMasterSecret)
        exported = client.ssl_object.export_keying_material(policy.TLS_EXPORTER_LABEL, 32)
        tlslites = bytes(
            connection.keyingMaterialExporter(bytearray(policy.TLS_EXPORTER_LABEL), 32)
        )
        client.sendall(b"ping")
        client.recv(1024)
        client.close()
    assert "error" not in seen, seen.get("error")
    assert ours == theirs, f"tlslite's exporter_master_secret is no longer derived so: {RECHECK}"
    assert exported == tlslites
    assert time.monotonic() - started < 10


# -- the package import bypass is invisible to other tlslite users ---------------------------------

_OTHER_USER = """
import sys, warnings
from est_agent.est.tls import tlslite_adapter
tlslite_adapter.load()
assert "tlslite.api" not in sys.modules, "the package __init__ ran at load()"
assert not hasattr(sys.modules["tlslite"], "__wrapped__")  # introspection does not complete it
assert "tlslite.api" not in sys.modules, "introspection ran the package __init__"
warnings.simplefilter("ignore", DeprecationWarning)  # tlslite's own (asyncore)
import tlslite
from tlslite import TLSConnection, HandshakeSettings
print(tlslite.__version__, TLSConnection.__module__, "tlslite.api" in sys.modules)
"""


@pytest.mark.integration
def test_other_tlslite_users_see_the_whole_package() -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run(
        [sys.executable, "-c", _OTHER_USER],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [ADAPTED_VERSION, "tlslite.tlsconnection", "True"], RECHECK
