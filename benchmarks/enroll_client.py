"""One first enrollment with the card's keys, in a fresh process, vs. curl + openssl.

For each run a fresh Python process opens the (zero-latency, in-process) virtual SIM, reads
its bootstrap certificate, generates the operational key in slot 02, and enrolls with
`EstClient`: TLS client authentication signed by the bootstrap key on the card (tlslite-ng),
the CSR built by `CsrBuilder` and signed by the new card key, GET /cacerts + POST
/simpleenroll on one TLS connection, the issued certificate validated. The baseline does the
same work with files: `openssl ecparam` + `openssl req` + one `curl` invocation (GET /cacerts,
then POST /simpleenroll on the reused connection) with the bootstrap credential as PEM files.

Both talk to the same `est-testserver` process on 127.0.0.1 in the same run. Reported per
variant (median of --runs): wall time of the whole child process (interpreter start and
imports included), its peak RSS (`os.wait4` rusage: the child and everything it waited for),
and for the card runs the APDUs and bytes over the card link, card signatures and TCP
connections, checked against the issue's targets.

    .venv/bin/python benchmarks/enroll_client.py --runs 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TARGETS = {
    "apdus": 22,
    "card_link_bytes": 8 * 1024,
    "connections": 1,
    "peak_rss_mib": 40.0,
    "wall_ratio": 2.5,
}


# -- child: one enrollment with the card ------------------------------------------------------


def child(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from est_agent.backends.iotsafe import CardSigner
    from est_agent.backends.signer import public_key_from_point
    from est_agent.card.channel import CardSession
    from est_agent.card.iotsafe import IotSafeApplet
    from est_agent.card.uri import IotSafeRef, ObjectKind
    from est_agent.csr import CsrBuilder
    from est_agent.est.client import EstClient
    from est_agent.sim.transport import SimTransport

    imported = time.perf_counter()
    transport = SimTransport(args.sim)
    applet = IotSafeApplet.open(CardSession(transport))
    cert = x509.load_der_x509_certificate(
        applet.read_file(IotSafeRef(ObjectKind.FILE, object_id=b"\x01"))
    )
    public_key = cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    bootstrap = CardSigner(
        applet, IotSafeRef(ObjectKind.PRIVATE_KEY, object_id=b"\x01"), public_key
    )
    op_ref = IotSafeRef(ObjectKind.PRIVATE_KEY, object_id=b"\x02")
    operational = CardSigner(
        applet, op_ref, public_key_from_point(applet.generate_key_pair(op_ref).public_point)
    )
    setup_apdus, setup_bytes = transport.stats.apdus, transport.stats.bytes_total
    builder = (
        CsrBuilder()
        .subject([(NameOID.COMMON_NAME, "bench-device")])
        .subject_alt_names([x509.DNSName("bench-device.example")])
        .eku_client_auth()
    )
    anchor = x509.load_pem_x509_certificate(Path(args.trust_anchor).read_bytes())
    with EstClient(
        args.server,
        trust_anchors=[anchor],
        client_cert_chain=[cert],
        signer=bootstrap,
        tls_max=args.tls,
    ) as client:
        enrolled = client.simpleenroll(lambda _binding: builder.build(operational))
        assert client.transport is not None
        connections = client.transport.connections_opened
    assert enrolled.certificate.public_key() == operational.public_key()
    done = time.perf_counter()
    applet.close()
    transport.close()
    print(
        json.dumps(
            {
                "apdus": transport.stats.apdus,
                "card_link_bytes": transport.stats.bytes_total,
                "setup_apdus": setup_apdus,
                "setup_bytes": setup_bytes,
                "tls_signatures": bootstrap.signatures,
                "csr_signatures": operational.signatures,
                "connections": connections,
                "import_s": imported - started,
                "work_s": done - imported,
            }
        )
    )
    # As `est-agent` does before its process exits (est_agent/cli/main.py): no garbage
    # collection over every object during interpreter shutdown (~40 ms).
    import gc

    gc.freeze()
    return 0


# -- parent -----------------------------------------------------------------------------------


def _run(argv: list[str], cwd: Path | None = None) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MiB) and stdout of a child process."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd)
    assert proc.stdout is not None and proc.stderr is not None
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {err.decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024, out.decode()


def _curl_script(work: Path, pki: Path, url: str, tls: str) -> list[str]:
    # The same work as the card run, with files: a new key, a CSR, then one curl process that
    # fetches /cacerts and POSTs the CSR over the reused connection (--next).
    script = f"""
set -e
cd {work}
openssl ecparam -name prime256v1 -genkey -noout -out op.key
openssl req -new -key op.key -subj /CN=bench-device -addext \
  subjectAltName=DNS:bench-device.example -outform DER -out csr.der
openssl base64 -in csr.der -out csr.b64
curl -sS --fail --tlsv1.2 --tls-max {tls} --cacert {pki}/tls-ca.pem \
  --cert {pki}/bootstrap-client.pem --key {pki}/bootstrap-client.key \
  -o cacerts.b64 {url}/.well-known/est/cacerts --next \
  --tlsv1.2 --tls-max {tls} --cacert {pki}/tls-ca.pem \
  --cert {pki}/bootstrap-client.pem --key {pki}/bootstrap-client.key \
  -H 'Content-Type: application/pkcs10' --data-binary @csr.b64 \
  -o cert.b64 {url}/.well-known/est/simpleenroll
test -s cert.b64
"""
    return ["sh", "-c", script]


def compile_package() -> None:
    """Byte-compile est_agent first, as an installed package is (pip, the Dockerfile): with
    PYTHONDONTWRITEBYTECODE set, as on these machines, every child would otherwise compile the
    package from source (~45 ms, ~0.8 MiB) and the figures would measure the compiler."""
    import compileall

    compileall.compile_dir(str(REPO / "est_agent"), quiet=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sim", help=argparse.SUPPRESS)
    parser.add_argument("--server", help=argparse.SUPPRESS)
    parser.add_argument("--trust-anchor", help=argparse.SUPPRESS)
    parser.add_argument("--tls", default="1.3", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    for tool in ("curl", "openssl"):
        if shutil.which(tool) is None:
            print(f"{tool} is needed for the baseline", file=sys.stderr)
            return 69
    compile_package()

    from est_agent.sim.personalize import personalize
    from est_agent.testserver.launch import running_test_server
    from est_agent.testserver.pki import generate_dev_pki, load_dev_pki

    with tempfile.TemporaryDirectory(prefix="enroll-bench-") as tmp:
        work = Path(tmp)
        pki_dir = work / "pki"
        generate_dev_pki(pki_dir)
        pki = load_dev_pki(pki_dir)
        template = work / "sim-template.json"
        ca = pki.bootstrap_ca
        personalize(template, bootstrap_ca=(ca.certificate, ca.key))
        results: dict[str, dict[str, Any]] = {}
        with running_test_server(pki_dir, work) as server:
            url = f"https://127.0.0.1:{server.port}"
            for tls in ("1.2", "1.3"):
                card_runs: list[dict[str, Any]] = []
                curl_runs: list[tuple[float, float]] = []
                for i in range(args.runs):
                    sim = work / f"sim-{tls}-{i}.json"
                    shutil.copyfile(template, sim)
                    wall, rss, out = _run(
                        [
                            sys.executable,
                            str(Path(__file__).resolve()),
                            "--child",
                            "--sim",
                            str(sim),
                            "--server",
                            url,
                            "--trust-anchor",
                            str(pki_dir / "tls-ca.pem"),
                            "--tls",
                            tls,
                        ],
                        cwd=REPO,
                    )
                    card_runs.append({"wall_s": wall, "peak_rss_mib": rss, **json.loads(out)})
                    curl_dir = work / f"curl-{tls}-{i}"
                    curl_dir.mkdir()
                    c_wall, c_rss, _ = _run(_curl_script(curl_dir, pki_dir, url, tls))
                    curl_runs.append((c_wall, c_rss))
                results[tls] = _summarise(card_runs, curl_runs)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        _print(results, args.runs)
    return 0


def _summarise(
    card_runs: list[dict[str, Any]], curl_runs: list[tuple[float, float]]
) -> dict[str, Any]:
    def median(key: str) -> float:
        return statistics.median(float(r[key]) for r in card_runs)

    card_wall = median("wall_s")
    curl_wall = statistics.median(w for w, _ in curl_runs)
    last = card_runs[-1]
    return {
        "card_wall_s": card_wall,
        "card_import_s": median("import_s"),
        "card_work_s": median("work_s"),
        "curl_openssl_wall_s": curl_wall,
        "wall_ratio": card_wall / curl_wall,
        "peak_rss_mib": median("peak_rss_mib"),
        "curl_openssl_peak_rss_mib": statistics.median(r for _, r in curl_runs),
        "apdus": last["apdus"],
        "setup_apdus": last["setup_apdus"],
        "card_link_bytes": last["card_link_bytes"],
        "setup_bytes": last["setup_bytes"],
        "tls_signatures": last["tls_signatures"],
        "csr_signatures": last["csr_signatures"],
        "connections": last["connections"],
    }


def _print(results: dict[str, dict[str, Any]], runs: int) -> None:
    print(f"first enrollment, median of {runs} fresh processes (127.0.0.1, in-process SIM)")
    for tls, r in results.items():
        checks = {
            "apdus": r["apdus"] <= TARGETS["apdus"],
            "card_link_bytes": r["card_link_bytes"] <= TARGETS["card_link_bytes"],
            "connections": r["connections"] == TARGETS["connections"],
            "signatures": (r["tls_signatures"], r["csr_signatures"]) == (1, 1),
            "peak_rss_mib": r["peak_rss_mib"] <= TARGETS["peak_rss_mib"],
            "wall_ratio": r["wall_ratio"] <= TARGETS["wall_ratio"],
        }

        def mark(key: str, checks: dict[str, bool] = checks) -> str:
            return "ok  " if checks[key] else "MISS"

        print(f"\nTLS {tls}")
        print(
            f"  wall       card {r['card_wall_s'] * 1000:7.1f} ms "
            f"(imports {r['card_import_s'] * 1000:.0f} ms, work {r['card_work_s'] * 1000:.0f} ms)"
            f"   curl+openssl {r['curl_openssl_wall_s'] * 1000:7.1f} ms"
            f"   ratio {r['wall_ratio']:.2f}x  {mark('wall_ratio')} (<= 2.5x)"
        )
        print(
            f"  peak RSS   card {r['peak_rss_mib']:7.1f} MiB"
            f"   curl+openssl {r['curl_openssl_peak_rss_mib']:7.1f} MiB"
            f"   {mark('peak_rss_mib')} (<= 40 MiB)"
        )
        print(
            f"  card link  {r['apdus']} APDUs, {r['card_link_bytes']} bytes "
            f"(of which setup: {r['setup_apdus']} APDUs / {r['setup_bytes']} bytes: SELECT, "
            f"read bootstrap cert, GENERATE KEY PAIR)   "
            f"{mark('apdus')} (<= 22)  {mark('card_link_bytes')} (<= 8 KiB)"
        )
        print(
            f"  signatures {r['tls_signatures']} TLS handshake + {r['csr_signatures']} CSR   "
            f"{mark('signatures')};  TCP connections {r['connections']}  {mark('connections')}"
        )


if __name__ == "__main__":
    sys.exit(main())
