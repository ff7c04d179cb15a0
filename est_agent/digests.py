"""SHA-256 (FIPS 180-4 §6.2) without loading OpenSSL, for the paths that hash a few hundred bytes.

``import hashlib`` always imports ``_hashlib``, which maps the system's libcrypto: ≈ 3.4 MiB of
RSS and ≈ 4 ms on these machines, a sixth of what `est-agent run` with nothing due may cost
(issue 16). That path hashes a serial number and a 65-byte public key, nothing more. CPython
ships its own SHA-256 as a built-in module (``_sha256`` up to 3.11, ``_sha2`` from 3.12), the
one the standard library's ``random`` module takes for the same reason; a build without it
(some FIPS builds leave the built-in hashes out) falls back to ``hashlib``. The digest is the
same whichever implementation computes it, and the object has the ``hashlib`` interface
(``update``, ``digest``, ``hexdigest``).

At the bottom of the package beside ``errors``: it imports nothing of ours.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["sha256"]

if TYPE_CHECKING:
    from hashlib import sha256
else:
    try:
        from _sha256 import sha256  # CPython <= 3.11
    except ImportError:
        try:
            from _sha2 import sha256  # CPython >= 3.12
        except ImportError:
            from hashlib import sha256
