"""`est-testserver serve` as a process, driven by curl + openssl and by strongSwan's pki --est.

These clients share no code with est_agent: if they enroll, the server speaks the protocol.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from est_agent.testserver import DevPki
from tests.testserver.esttls_helpers import ServerProcess

pytestmark = pytest.mark.integration

needs_curl_openssl = pytest.mark.skipif(
    not (shutil.which("curl") and shutil.which("openssl")), reason="needs curl and openssl"
)


def _strongswan_missing() -> str | None:
    """Why strongSwan's pki cannot run these tests, or None when it can."""
    if shutil.which("pki") is None:
        return "needs strongSwan's pki (apt: strongswan-pki libstrongswan-standard-plugins)"
    # Without the openssl plugin (Debian: libstrongswan-standard-plugins) pki has no ECDSA
    # and no ECDH, so it can neither read a P-256 key nor complete the TLS handshake.
    out = subprocess.run(["pki", "--help"], capture_output=True, text=True, check=False)
    loaded = next(
        (ln for ln in (out.stdout + out.stderr).splitlines() if "loaded plugins" in ln), ""
    )
    if " openssl" not in loaded:
        return "strongSwan pki lacks its openssl plugin (apt: libstrongswan-standard-plugins)"
    return None


_STRONGSWAN_MISSING = _strongswan_missing()
needs_strongswan = pytest.mark.skipif(
    _STRONGSWAN_MISSING is not None, reason=_STRONGSWAN_MISSING or ""
)


def run(
    *argv: str | Path, cwd: Path, ok: bool = True, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(
        [str(a) for a in argv], cwd=cwd, capture_output=True, timeout=30, input=stdin, check=False
    )
    if ok and result.returncode != 0:
        raise AssertionError(
            f"{argv[0]} failed ({result.returncode}):\n{result.stdout.decode(errors='replace')}"
            f"\n{result.stderr.decode(errors='replace')}"
        )
    return result


@pytest.fixture
def serve(dev_pki: DevPki, tmp_path: Path) -> Iterator[object]:
    started: list[ServerProcess] = []

    def start(*options: str) -> ServerProcess:
        server = ServerProcess(dev_pki.directory, tmp_path / f"srv{len(started)}", *options)
        started.append(server)
        return server

    yield start
    for server in started:
        assert server.stop() == 0, server.stderr_path.read_text()


def _openssl_csr(work: Path, name: str, subject: str, san: str) -> Path:
    key = work / f"{name}.key"
    run("openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key, cwd=work)
    der = work / f"{name}.csr.der"
    run(
        "openssl",
        "req",
        "-new",
        "-key",
        key,
        "-subj",
        subject,
        "-addext",
        f"subjectAltName={san}",
        "-outform",
        "DER",
        "-out",
        der,
        cwd=work,
    )
    b64 = work / f"{name}.csr.b64"
    run("openssl", "base64", "-in", der, "-out", b64, cwd=work)  # wrapped at 64 chars
    return b64


def _curl_post(work: Path, url: str, body: Path, out: Path, *auth: str) -> str:
    result = run(
        "curl",
        "-sS",
        "--cacert",
        work / "pki" / "tls-ca.pem",
        *auth,
        "-H",
        "Content-Type: application/pkcs10",
        "--data-binary",
        f"@{body}",
        "-o",
        out,
        "-w",
        "%{http_code}",
        url,
        cwd=work,
    )
    return result.stdout.decode()


def _pkcs7_to_pem(work: Path, b64: Path, pem: Path) -> None:
    der = work / (b64.name + ".der")
    run("openssl", "base64", "-d", "-in", b64, "-out", der, cwd=work)
    run("openssl", "pkcs7", "-inform", "DER", "-in", der, "-print_certs", "-out", pem, cwd=work)


@needs_curl_openssl
def test_curl_openssl_enroll_and_reenroll(serve, dev_pki: DevPki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = serve()
    work = tmp_path
    (work / "pki").symlink_to(dev_pki.directory)
    url = f"{server.url}/.well-known/est"
    csr = _openssl_csr(work, "dev", "/CN=curl-device", "DNS:curl-device.example")
    boot = (
        "--cert",
        str(work / "pki/bootstrap-client.pem"),
        "--key",
        str(work / "pki/bootstrap-client.key"),
    )
    assert _curl_post(work, f"{url}/simpleenroll", csr, work / "r1.b64", *boot) == "200"
    _pkcs7_to_pem(work, work / "r1.b64", work / "dev.pem")
    assert (
        b": OK"
        in run(
            "openssl", "verify", "-CAfile", work / "pki/ca.pem", work / "dev.pem", cwd=work
        ).stdout
    )
    text = run("openssl", "x509", "-in", work / "dev.pem", "-noout", "-text", cwd=work).stdout
    assert b"TLS Web Client Authentication" in text
    assert b"DNS:curl-device.example" in text

    # Re-enroll with the issued certificate and its key (renew: same key, same names).
    recsr = work / "re.csr.b64"
    der = work / "re.csr.der"
    run(
        "openssl",
        "req",
        "-new",
        "-key",
        work / "dev.key",
        "-subj",
        "/CN=curl-device",
        "-addext",
        "subjectAltName=DNS:curl-device.example",
        "-outform",
        "DER",
        "-out",
        der,
        cwd=work,
    )
    run("openssl", "base64", "-in", der, "-out", recsr, cwd=work)
    mine = ("--cert", str(work / "dev.pem"), "--key", str(work / "dev.key"))
    assert _curl_post(work, f"{url}/simplereenroll", recsr, work / "r2.b64", *mine) == "200"
    _pkcs7_to_pem(work, work / "r2.b64", work / "dev2.pem")
    run("openssl", "verify", "-CAfile", work / "pki/ca.pem", work / "dev2.pem", cwd=work)

    # cacerts via curl, decoded by openssl, is the EST CA.
    run(
        "curl",
        "-sS",
        "--cacert",
        work / "pki/tls-ca.pem",
        "-o",
        work / "ca.b64",
        f"{url}/cacerts",
        cwd=work,
    )
    _pkcs7_to_pem(work, work / "ca.b64", work / "cacerts.pem")
    assert (
        run("openssl", "x509", "-in", work / "cacerts.pem", "-noout", "-subject", cwd=work)
        .stdout.strip()
        .endswith(b"est-agent dev EST CA")
    )


@needs_curl_openssl
def test_curl_basic_auth(serve, dev_pki: DevPki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = serve("--auth", "basic", "--basic", "alice:s3cret")
    work = tmp_path
    (work / "pki").symlink_to(dev_pki.directory)
    url = f"{server.url}/.well-known/est/simpleenroll"
    csr = _openssl_csr(work, "b", "/CN=basic-device", "DNS:basic-device.example")
    assert _curl_post(work, url, csr, work / "no.txt") == "401"
    assert _curl_post(work, url, csr, work / "bad.txt", "-u", "alice:wrong") == "401"
    assert _curl_post(work, url, csr, work / "ok.b64", "-u", "alice:s3cret") == "200"
    _pkcs7_to_pem(work, work / "ok.b64", work / "b.pem")
    run("openssl", "verify", "-CAfile", work / "pki/ca.pem", work / "b.pem", cwd=work)


@needs_curl_openssl
@pytest.mark.parametrize(
    ("algorithms", "close_after"),
    [("MD5", None), ("SHA-256", None), ("SHA-256,MD5", None), ("MD5", "401")],
)
def test_curl_digest_auth(  # type: ignore[no-untyped-def]
    serve, dev_pki: DevPki, tmp_path: Path, algorithms: str, close_after: str | None
) -> None:
    # curl's own RFC 7616 client against the server's Digest, also when the server closes the
    # connection after its 401 as libest does (curl then answers on a new connection).
    options = ["--auth", "basic", "--basic", "alice:s3cret", "--http-auth", "digest"]
    options += ["--digest-algorithms", algorithms]
    if close_after:
        options += ["--close-after", close_after]
    server = serve(*options)
    work = tmp_path
    (work / "pki").symlink_to(dev_pki.directory)
    url = f"{server.url}/.well-known/est/simpleenroll"
    csr = _openssl_csr(work, "d", "/CN=digest-device", "DNS:digest-device.example")
    assert _curl_post(work, url, csr, work / "no.txt") == "401"
    assert _curl_post(work, url, csr, work / "bad.txt", "--digest", "-u", "alice:wrong") == "401"
    assert _curl_post(work, url, csr, work / "ok.b64", "--digest", "-u", "alice:s3cret") == "200"
    _pkcs7_to_pem(work, work / "ok.b64", work / "d.pem")
    run("openssl", "verify", "-CAfile", work / "pki/ca.pem", work / "d.pem", cwd=work)


@needs_curl_openssl
@pytest.mark.parametrize(("tls_max", "tls13_ok"), [("1.3", True), ("1.2", False)])
def test_openssl_s_client_versions(
    serve, tmp_path: Path, dev_pki: DevPki, tls_max: str, tls13_ok: bool
) -> None:  # type: ignore[no-untyped-def]
    server = serve("--tls-max", tls_max)

    def handshake(flag: str) -> bool:
        result = run(
            "openssl",
            "s_client",
            flag,
            "-connect",
            f"127.0.0.1:{server.port}",
            "-CAfile",
            dev_pki.directory / "tls-ca.pem",
            "-verify_return_error",
            "-brief",
            cwd=tmp_path,
            ok=False,
            stdin=b"",
        )
        return result.returncode == 0

    assert handshake("-tls1_2")
    assert handshake("-tls1_3") is tls13_ok
    assert not handshake("-tls1_1")


def test_ready_line_and_sigterm(serve) -> None:  # type: ignore[no-untyped-def]
    server = serve()
    assert server.stdout_path.read_text().startswith(
        f"est-testserver: listening on https://127.0.0.1:{server.port}/.well-known/est"
    )
    assert server.stop() == 0


@needs_strongswan
def test_strongswan_pki_enroll_and_renew(serve, dev_pki: DevPki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # strongSwan's client parses only unwrapped base64 and sends Basic without a certificate
    # on first enrollment; renewal authenticates with the old certificate and key.
    server = serve(
        "--unwrapped-base64",
        "--auth",
        "cert-or-basic",
        "--basic",
        "alice:s3cret",
        "--manual-approval",
        "1",
    )
    work = tmp_path
    pki_dir = dev_pki.directory
    run(
        "pki",
        "--estca",
        "--url",
        server.url,
        "--cacert",
        pki_dir / "tls-ca.pem",
        "--caout",
        work / "estca.pem",
        "--outform",
        "pem",
        cwd=work,
    )
    assert (work / "estca.pem").read_bytes() == (pki_dir / "ca.pem").read_bytes()

    def key_and_csr(name: str) -> tuple[Path, Path]:
        key = work / f"{name}.key"
        key.write_bytes(
            run(
                "pki", "--gen", "--type", "ecdsa", "--size", "256", "--outform", "pem", cwd=work
            ).stdout
        )
        csr = work / f"{name}.csr"
        csr.write_bytes(
            run(
                "pki",
                "--req",
                "--type",
                "ecdsa",
                "--in",
                key,
                "--dn",
                "CN=sw-device",
                "--san",
                "sw-device.example",
                "--digest",
                "sha256",
                "--outform",
                "der",
                cwd=work,
            ).stdout
        )
        return key, csr

    key1, csr1 = key_and_csr("one")
    first = run(
        "pki",
        "--est",
        "--url",
        server.url,
        "--cacert",
        pki_dir / "tls-ca.pem",
        "--cacert",
        work / "estca.pem",
        "--in",
        csr1,
        "--userpass",
        "alice:s3cret",
        "--interval",
        "1",
        "--maxpolltime",
        "10",
        "--outform",
        "pem",
        cwd=work,
    )
    assert b"EST request pending" in first.stderr  # the 202 + Retry-After round was taken
    (work / "one.pem").write_bytes(first.stdout)
    run("openssl", "verify", "-CAfile", pki_dir / "ca.pem", work / "one.pem", cwd=work)

    _key2, csr2 = key_and_csr("two")
    second = run(
        "pki",
        "--est",
        "--url",
        server.url,
        "--cacert",
        pki_dir / "tls-ca.pem",
        "--cacert",
        work / "estca.pem",
        "--in",
        csr2,
        "--cert",
        work / "one.pem",
        "--key",
        key1,
        "--interval",
        "1",
        "--maxpolltime",
        "10",
        "--outform",
        "pem",
        cwd=work,
    )
    (work / "two.pem").write_bytes(second.stdout)
    run("openssl", "verify", "-CAfile", pki_dir / "ca.pem", work / "two.pem", cwd=work)
    log = (work / "srv0" / "server.stderr").read_text()
    assert '"POST /.well-known/est/simpleenroll HTTP/1.1" 200' in log
    assert '"POST /.well-known/est/simplereenroll HTTP/1.1" 200' in log


@needs_strongswan
def test_strongswan_cannot_parse_wrapped_base64(serve, dev_pki: DevPki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # The quirk --unwrapped-base64 exists for (RFC 8951 §3 says line breaks are to be
    # tolerated; strongSwan's client does not): keep it visible.
    server = serve("--auth", "basic", "--basic", "alice:s3cret")
    key = tmp_path / "k.key"
    key.write_bytes(
        run(
            "pki", "--gen", "--type", "ecdsa", "--size", "256", "--outform", "pem", cwd=tmp_path
        ).stdout
    )
    csr = tmp_path / "k.csr"
    csr.write_bytes(
        run(
            "pki",
            "--req",
            "--type",
            "ecdsa",
            "--in",
            key,
            "--dn",
            "CN=w",
            "--outform",
            "der",
            cwd=tmp_path,
        ).stdout
    )
    result = run(
        "pki",
        "--est",
        "--url",
        server.url,
        "--cacert",
        dev_pki.directory / "tls-ca.pem",
        "--cacert",
        dev_pki.directory / "ca.pem",
        "--in",
        csr,
        "--userpass",
        "alice:s3cret",
        cwd=tmp_path,
        ok=False,
    )
    assert result.returncode != 0
