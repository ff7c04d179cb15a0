"""est_agent.digests.sha256: the FIPS 180-4 digest, without loading OpenSSL's libcrypto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from est_agent.digests import sha256

REPO = Path(__file__).resolve().parents[2]


def test_sha256_matches_the_published_examples() -> None:
    # NIST's SHA-256 examples (FIPS 180-4 / CSRC "SHA256.pdf"): one block, two blocks, a million "a"
    assert (
        sha256(b"abc").hexdigest()
        == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    two_blocks = b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
    assert (
        sha256(two_blocks).hexdigest()
        == "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
    )
    hasher = sha256()
    for _ in range(1000):
        hasher.update(b"a" * 1000)
    assert hasher.digest() == bytes.fromhex(
        "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"
    )


def test_importing_it_does_not_load_hashlib() -> None:
    # CPython ships SHA-256 built in; only a build without it falls back to hashlib (libcrypto)
    done = subprocess.run(
        [sys.executable, "-c", "import sys, est_agent.digests; print(sorted(m for m in "
         "('hashlib', '_hashlib') if m in sys.modules))"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )  # fmt: skip
    assert done.stdout.strip() == "[]"
