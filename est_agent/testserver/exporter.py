"""The tls-exporter channel binding (RFC 9266) on the server side, for `--pop required`.

Python's ``ssl`` module has no exporter API (``SSL_export_keying_material``). OpenSSL still
derives exporter_master_secret itself (RFC 8446 §7.1, from ClientHello...server Finished) and
hands it to the key-log callback, which Python exposes as ``SSLContext.keylog_filename`` (the
NSS key log format: ``EXPORTER_SECRET <ClientHello.random> <secret>``). ``ExporterSecrets``
points that key log at a pipe and keeps the EXPORTER_SECRET lines in memory (never on disk,
the other secrets discarded as they are read); a connection's ClientHello.random is read with
``MSG_PEEK`` before the handshake (``peek_client_random``); ``tls_exporter`` is RFC 8446 §7.5
over the secret, with cryptography's HKDF-Expand.

Why this and not another TLS stack: pyOpenSSL would replace the server's whole TLS layer (its
timeouts, file objects and error classes, on which the hostile-client tests rely); a tlslite-ng
server would be the very stack the agent uses (a shared mistake would pass); the openssl binary
cannot terminate TLS in front of an HTTP handler. This way the secret is OpenSSL's own, and
only the public §7.5 step is written here, written apart from the agent's (the test server
imports nothing of the EST client) and checked against ``openssl s_client -keymatexport``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import struct
import threading
import time
from collections import OrderedDict

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from est_agent.errors import ConfigError

__all__ = [
    "CHANNEL_BINDING_LABEL",
    "ExporterSecrets",
    "client_random_of",
    "peek_client_random",
    "tls_exporter",
]

#: RFC 9266 §2: the label, an empty context, 32 bytes.
CHANNEL_BINDING_LABEL = b"EXPORTER-Channel-Binding"
_LENGTH = 32
#: a TLS record header (5) + handshake header (4) + legacy_version (2) + random (32)
_HELLO_PREFIX = 43
_RECORD_HANDSHAKE = 22
_CLIENT_HELLO = 1


def client_random_of(prefix: bytes) -> bytes | None:
    """ClientHello.random from the first bytes a client sends (RFC 8446 §5.1 record header,
    §4 handshake header, §4.1.2 legacy_version then random), None when they are not the start
    of a ClientHello that carries it in its first record."""
    if len(prefix) < _HELLO_PREFIX:
        return None
    record_type, record_length = prefix[0], struct.unpack("!H", prefix[3:5])[0]
    if record_type != _RECORD_HANDSHAKE or prefix[5] != _CLIENT_HELLO or record_length < 38:
        return None
    return bytes(prefix[11:43])


def peek_client_random(sock: socket.socket, timeout_s: float) -> bytes | None:
    """Read (without consuming) the start of the client's first record: its ClientHello.random.

    Waits until the 43 bytes are there, the peer closed or sent something else, or
    ``timeout_s`` passed (``TimeoutError``: the handshake would not have finished either).
    """
    deadline = time.monotonic() + timeout_s
    previous = sock.gettimeout()
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no ClientHello in time")
            sock.settimeout(left)
            head = sock.recv(_HELLO_PREFIX, socket.MSG_PEEK)
            if len(head) >= _HELLO_PREFIX or not head or head[0] != _RECORD_HANDSHAKE:
                return client_random_of(head)
            time.sleep(0.005)  # part of the hello has arrived: poll() would not wait for more
    finally:
        sock.settimeout(previous)


def _hkdf_expand_label(
    secret: bytes, label: bytes, context: bytes, length: int, algorithm: hashes.HashAlgorithm
) -> bytes:
    # RFC 8446 §7.1: HkdfLabel = uint16 length, opaque label<7..255> ("tls13 " + Label),
    # opaque context<0..255>.
    full = b"tls13 " + label
    info = struct.pack("!HB", length, len(full)) + full + struct.pack("!B", len(context)) + context
    return HKDFExpand(algorithm, length, info).derive(secret)


def _hash_of(data: bytes, algorithm: hashes.HashAlgorithm) -> bytes:
    digest = hashes.Hash(algorithm)
    digest.update(data)
    return digest.finalize()


def tls_exporter(
    exporter_secret: bytes,
    cipher_name: str,
    label: bytes = CHANNEL_BINDING_LABEL,
    context: bytes = b"",
    length: int = _LENGTH,
) -> bytes:
    """RFC 8446 §7.5: HKDF-Expand-Label(Derive-Secret(exporter_master_secret, label, ""),
    "exporter", Hash(context), length), Hash being the suite's (``cipher_name`` as
    ``SSLSocket.cipher()`` names it: SHA-384 for TLS_AES_256_GCM_SHA384, else SHA-256)."""
    algorithm: hashes.HashAlgorithm = (
        hashes.SHA384() if cipher_name.endswith("SHA384") else hashes.SHA256()
    )
    empty = _hash_of(b"", algorithm)
    per_label = _hkdf_expand_label(exporter_secret, label, empty, algorithm.digest_size, algorithm)
    return _hkdf_expand_label(
        per_label, b"exporter", _hash_of(context, algorithm), length, algorithm
    )


class ExporterSecrets:
    """OpenSSL's TLS 1.3 exporter secrets of one ``SSLContext``'s connections, in memory.

    ``secret(client_random)`` is the connection's exporter_master_secret once its handshake is
    done; ``forget`` drops it when the connection ends (at most ``capacity`` are kept anyway).
    """

    def __init__(self, context: ssl.SSLContext, *, capacity: int = 4096) -> None:
        self._context = context
        self._capacity = capacity
        self._secrets: OrderedDict[bytes, bytes] = OrderedDict()
        self._changed = threading.Condition()
        read_end, write_end = os.pipe()
        try:
            # The key log is opened by path: the pipe's write end, as this process sees it.
            context.keylog_filename = f"/proc/self/fd/{write_end}"
        except OSError as exc:
            os.close(read_end)
            raise ConfigError(
                f"--pop required under TLS 1.3 needs OpenSSL's key log on a pipe ({exc}); "
                "on a system without /proc use --tls-max 1.2 (tls-unique)"
            ) from exc
        finally:
            os.close(write_end)  # the context holds its own descriptor now
        self._reader = threading.Thread(
            target=self._read, args=(read_end,), name="est-testserver keylog", daemon=True
        )
        self._reader.start()

    def _read(self, read_end: int) -> None:
        with os.fdopen(read_end, "rb") as lines:
            for line in lines:
                fields = line.split()
                if len(fields) != 3 or fields[0] != b"EXPORTER_SECRET":
                    continue  # the traffic secrets: never kept
                with contextlib.suppress(ValueError), self._changed:
                    self._secrets[bytes.fromhex(fields[1].decode())] = bytes.fromhex(
                        fields[2].decode()
                    )
                    while len(self._secrets) > self._capacity:
                        self._secrets.popitem(last=False)
                    self._changed.notify_all()

    def secret(self, client_random: bytes, timeout_s: float = 2.0) -> bytes | None:
        """The exporter_master_secret of the connection whose ClientHello had this random
        (the key log line is written during the handshake; its reader may lag a little)."""
        with self._changed:
            self._changed.wait_for(lambda: client_random in self._secrets, timeout_s)
            return self._secrets.get(client_random)

    def forget(self, client_random: bytes) -> None:
        with self._changed:
            self._secrets.pop(client_random, None)

    def close(self) -> None:
        """Stop the key log: the context closes its end of the pipe, the reader sees EOF."""
        self._context.keylog_filename = None  # type: ignore[assignment]
        self._reader.join(timeout=5)
