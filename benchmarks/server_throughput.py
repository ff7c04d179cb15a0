"""Enrollments per second of the EST test server with N concurrent TLS clients.

Starts `est-testserver serve` as a separate process on 127.0.0.1 (a throwaway dev PKI in a
temporary directory), then for each N runs N client threads that each make enrollments, one
fresh TLS connection + POST /simpleenroll per enrollment (as an agent does), for a bounded
number of requests. CSRs are prepared beforehand so that the figure is the server's.

    .venv/bin/python benchmarks/server_throughput.py --clients 1 10 50 --requests 400
"""

from __future__ import annotations

import argparse
import base64
import http.client
import ssl
import statistics
import tempfile
import threading
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from est_agent.testserver.launch import running_test_server
from est_agent.testserver.pki import generate_dev_pki


def _csr_body(i: int) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"bench-{i}")]))
        .sign(key, hashes.SHA256())
    )
    return base64.encodebytes(csr.public_bytes(serialization.Encoding.DER))


def _run(
    port: int, ctx: ssl.SSLContext, clients: int, bodies: list[bytes]
) -> tuple[float, list[float]]:
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    next_index = iter(range(len(bodies)))
    barrier = threading.Barrier(clients)

    def worker() -> None:
        barrier.wait()
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            started = time.perf_counter()
            conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
            try:
                conn.request(
                    "POST",
                    "/.well-known/est/simpleenroll",
                    bodies[i],
                    {"Content-Type": "application/pkcs10"},
                )
                response = conn.getresponse()
                response.read()
                ok = response.status == 200
            except OSError:
                ok = False
            finally:
                conn.close()
            elapsed = time.perf_counter() - started
            with lock:
                if ok:
                    latencies.append(elapsed)
                else:
                    errors.append(str(i))

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if errors:
        raise SystemExit(f"{len(errors)} enrollments failed")
    return wall, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--requests", type=int, default=300, help="enrollments per run (bounded)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pki = work / "pki"
        generate_dev_pki(pki)
        ctx = ssl.create_default_context(cafile=str(pki / "tls-ca.pem"))
        ctx.load_cert_chain(str(pki / "bootstrap-client.pem"), str(pki / "bootstrap-client.key"))
        bodies = [_csr_body(i) for i in range(args.requests)]
        with running_test_server(pki, work) as server:
            port = server.port
            print(f"{'clients':>7} {'enroll/s':>9} {'p50 ms':>8} {'p95 ms':>8}")
            for clients in args.clients:
                wall, lat = _run(port, ctx, clients, bodies)
                lat.sort()
                p95 = lat[min(len(lat) - 1, int(len(lat) * 0.95))]
                print(
                    f"{clients:>7} {len(lat) / wall:>9.1f} "
                    f"{statistics.median(lat) * 1000:>8.1f} {p95 * 1000:>8.1f}"
                )


if __name__ == "__main__":
    main()
