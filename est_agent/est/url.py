"""EST URLs (RFC 7030 §3.2.2): stdlib only, so the configuration loads without the EST stack."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from est_agent.errors import InputError

__all__ = ["EST_PATH_PREFIX", "OPERATIONS", "est_url"]

EST_PATH_PREFIX = "/.well-known/est"
OPERATIONS = frozenset({"cacerts", "csrattrs", "simpleenroll", "simplereenroll"})
_LABEL_RE = re.compile(r"[A-Za-z0-9._~-]{1,128}")


def est_url(base_url: str, operation: str, label: str = "") -> str:
    """The URL of an EST operation: ``<base>/[<label>/]<operation>`` (RFC 7030 §3.2.2).

    `base_url` is normally ``https://host[:port]/.well-known/est``; a bare origin gets the
    well-known prefix appended. Only https is accepted (RFC 7030 §3.3: EST runs over TLS), and
    no user-info, query or fragment: credentials in URLs end up in logs.
    """
    try:
        parts = urlsplit(base_url.strip())
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as exc:
        raise InputError(f"malformed EST server URL {base_url!r}: {exc}") from None
    if parts.scheme.lower() != "https":
        raise InputError(f"EST server URL must use https (RFC 7030 §3.3), got {base_url!r}")
    if not parts.hostname:
        raise InputError(f"EST server URL has no host: {base_url!r}")
    if parts.username is not None or parts.password is not None:
        raise InputError("EST server URL must not carry credentials (use the auth settings)")
    if parts.query or parts.fragment:
        raise InputError(f"EST server URL must not have a query or fragment: {base_url!r}")
    if operation not in OPERATIONS:
        raise InputError(
            f"unsupported EST operation {operation!r} (expected one of {sorted(OPERATIONS)})"
        )
    path = parts.path.rstrip("/")
    if not path:
        path = EST_PATH_PREFIX
    segments = [path]
    if label:
        if not _LABEL_RE.fullmatch(label) or label in (".", ".."):
            raise InputError(
                f"EST label {label!r} must be one path segment of letters, digits, '.', '_',"
                " '~' or '-' (RFC 7030 §3.2.2)"
            )
        segments.append(label)
    segments.append(operation)
    netloc = parts.netloc
    return f"https://{netloc}{'/'.join(segments)}"
