"""The agent's small host-side state: a cache of the active credential, a pending request, the
deployment of the active certificate, a note of a record being written, and the failed
renewal attempts with the time of the next one.

The SIM is the source of truth; this file lets `est-agent run` decide "nothing due" with a few
APDUs (no certificate parse, no network), remembers a 202 (pending manual approval) across
reboots, and remembers whether the active certificate's PEM export and deploy hook succeeded
(a failed deployment is retried by later runs), and after a failed renewal when to try again
(workflow/renewal.py). It is a cache: a missing, unreadable or malformed file (a JSON list, a
non-hex serial, a directory in its place) is treated as empty and rebuilt from the SIM by the
next full run; for the retry schedule that means "no wait": a damaged file never delays a
renewal. Writing it may fail (read-only state directory): callers report that and go on,
because the SIM holds what matters.

Format 3 added ``retry``; format 2 files (written before it) are read as they are. The
optional ``implicit_channel_refused`` (a fact about the card, not a format change) is read as
false when absent.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from est_agent.errors import StoreError
from est_agent.fileio import atomic_write, read_bounded

__all__ = [
    "ActiveCache",
    "Deployment",
    "HostState",
    "Installing",
    "Pending",
    "Retry",
    "load_host_state",
    "save_host_state",
]

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
_FORMAT = 3
#: formats this version reads: 2 is 3 without ``retry``
_READABLE_FORMATS = frozenset({2, 3})
_MAX_STATE_BYTES = 64 * 1024  # a few hundred bytes in practice
_HEX = re.compile(r"[0-9a-fA-F]+")
_OPERATIONS = frozenset({"simpleenroll", "simplereenroll"})


@dataclass(frozen=True)
class ActiveCache:
    slot: int
    sequence: int
    sha256: str  # hex SHA-256 of the certificate DER, as in the SIM record header
    serial: str  # hex
    subject: str
    not_before: datetime
    not_after: datetime
    #: hex SHA-256 of the certificate's public key point: the fast path checks the slot's key
    public_key_sha256: str


@dataclass(frozen=True)
class Pending:
    """A request the server accepted but has not answered (HTTP 202, RFC 7030 §4.2.3)."""

    operation: str  # simpleenroll | simplereenroll
    slot: int
    #: hex SEC1 point of the key generated for it (resume without rekeying); "" when the
    #: server asked to wait before the key was made (a long Retry-After on /cacerts)
    public_key: str
    retry_at: datetime
    since: datetime


@dataclass(frozen=True)
class Deployment:
    """The last PEM export / deploy hook run for a credential (slot, record sequence, hash)."""

    slot: int
    sequence: int
    sha256: str
    succeeded: bool
    attempts: int
    at: datetime
    error: str = ""

    def is_for(self, slot: int, sequence: int, sha256: str) -> bool:
        return (self.slot, self.sequence, self.sha256) == (slot, sequence, sha256)


@dataclass(frozen=True)
class Installing:
    """Written before a record goes to the SIM: until a full run has adopted it, the fast path
    must not trust the cache (the new record may be complete and newer than the cache)."""

    slot: int
    sequence: int


@dataclass(frozen=True)
class Retry:
    """Consecutive failed enrollment attempts and when the next one may start."""

    #: hex SHA-256 of the record header of the active credential being renewed ("" none: a
    #: first enrollment); a record for another credential no longer applies
    sha256: str
    failures: int
    error: str  # class name of the last error (EstConnectionError, AuthError, ...)
    exit_code: int  # of the last failed run
    failed_at: datetime
    #: None: no wait (no valid credential to renew: every run tries)
    next_at: datetime | None

    def is_for(self, sha256: str) -> bool:
        return self.sha256 == sha256


@dataclass(frozen=True)
class HostState:
    active: ActiveCache | None = None
    pending: Pending | None = None
    deployment: Deployment | None = None
    installing: Installing | None = None
    retry: Retry | None = None
    #: the card answered 6881 to a SELECT opening a logical channel implicitly (ISO/IEC 7816-4
    #: §5.5.2): later runs open the applet's channel with MANAGE CHANNEL instead of asking
    #: again (one APDU each); absent in older files, which reads as "not refused"
    implicit_channel_refused: bool = False


# --- decoding (strict: anything odd makes the whole file "no cache") -------------------------


class _Malformed(ValueError):
    pass


def _dt(value: Any) -> datetime:
    if not isinstance(value, str):
        raise _Malformed("timestamp is not a string")
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise _Malformed("timestamp without a time zone")
    return parsed


def _int(value: Any, *, minimum: int = 0, maximum: int = 2**32 - 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= maximum:
        raise _Malformed(f"not an integer in {minimum}..{maximum}: {value!r}")
    return value


def _hex(value: Any, length: int | None = None) -> str:
    if not isinstance(value, str) or not _HEX.fullmatch(value):
        raise _Malformed(f"not hex: {value!r}")
    if length is not None and len(value) != length:
        raise _Malformed(f"hex of {len(value)} characters, expected {length}")
    return value.lower() if length else value.upper()


def _key_hex(value: Any) -> str:
    """A pending request's key point (65 bytes, hex), or "" when none was made yet."""
    return "" if value == "" else _hex(value, 130)


def _optional_dt(value: Any) -> datetime | None:
    return None if value is None else _dt(value)


def _digest_or_empty(value: Any) -> str:
    return "" if value == "" else _hex(value, 64)


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise _Malformed(f"not a string: {value!r}")
    return value


def _table(raw: dict[str, Any], key: str) -> dict[str, Any] | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _Malformed(f"{key} is not an object")
    return value


def _decode(raw: Any) -> HostState:
    if not isinstance(raw, dict) or raw.get("format") not in _READABLE_FORMATS:
        raise _Malformed("not a state object of a known format")
    active = _table(raw, "active")
    pending = _table(raw, "pending")
    deployment = _table(raw, "deployment")
    installing = _table(raw, "installing")
    retry = _table(raw, "retry")
    return HostState(
        active=ActiveCache(
            slot=_int(active["slot"], maximum=15),
            sequence=_int(active["sequence"], minimum=1),
            sha256=_hex(active["sha256"], 64),
            serial=_hex(active["serial"]),
            subject=_str(active["subject"]),
            not_before=_dt(active["not_before"]),
            not_after=_dt(active["not_after"]),
            public_key_sha256=_hex(active["public_key_sha256"], 64),
        )
        if active
        else None,
        pending=Pending(
            operation=_str(pending["operation"]),
            slot=_int(pending["slot"], maximum=15),
            public_key=_key_hex(pending["public_key"]),
            retry_at=_dt(pending["retry_at"]),
            since=_dt(pending["since"]),
        )
        if pending and pending.get("operation") in _OPERATIONS
        else None,
        deployment=Deployment(
            slot=_int(deployment["slot"], maximum=15),
            sequence=_int(deployment["sequence"], minimum=1),
            sha256=_hex(deployment["sha256"], 64),
            succeeded=bool(deployment["succeeded"]),
            attempts=_int(deployment["attempts"]),
            at=_dt(deployment["at"]),
            error=_str(deployment.get("error", "")),
        )
        if deployment
        else None,
        installing=Installing(
            slot=_int(installing["slot"], maximum=15),
            sequence=_int(installing["sequence"], minimum=1),
        )
        if installing
        else None,
        retry=Retry(
            sha256=_digest_or_empty(retry["sha256"]),
            failures=_int(retry["failures"], minimum=1),
            error=_str(retry["error"])[:80],
            exit_code=_int(retry["exit_code"], maximum=255),
            failed_at=_dt(retry["failed_at"]),
            next_at=_optional_dt(retry["next_at"]),
        )
        if retry
        else None,
        implicit_channel_refused=raw.get("implicit_channel_refused") is True,
    )


def load_host_state(state_dir: Path) -> HostState:
    """The cached state, or an empty one when there is none or it cannot be used."""
    path = state_dir / STATE_FILE
    if not os.path.lexists(path):
        return HostState()
    try:
        raw = read_bounded(path, limit_bytes=_MAX_STATE_BYTES, what="host state", error=StoreError)
        return _decode(json.loads(raw))
    except (StoreError, ValueError, KeyError, TypeError, RecursionError) as exc:
        # The SIM is authoritative: a damaged cache only costs a full read of the slots.
        log.warning("ignoring unusable host state %s (%s): it is rebuilt from the SIM", path, exc)
        return HostState()


def _encode(state: HostState) -> dict[str, Any]:
    def plain(obj: object) -> Any:
        if obj is None:
            return None
        data = asdict(obj)  # type: ignore[call-overload]
        return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in data.items()}

    return {
        "format": _FORMAT,
        "active": plain(state.active),
        "pending": plain(state.pending),
        "deployment": plain(state.deployment),
        "installing": plain(state.installing),
        "retry": plain(state.retry),
        "implicit_channel_refused": state.implicit_channel_refused,
    }


def save_host_state(state_dir: Path, state: HostState) -> None:
    """Atomic replace (fileio.atomic_write); ``StoreError`` if the directory cannot take it
    (callers decide whether that matters)."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise StoreError(
            f"cannot write agent state in {state_dir}: {exc.strerror or exc}"
        ) from exc
    data = json.dumps(_encode(state), indent=2).encode("utf-8")
    atomic_write(state_dir / STATE_FILE, data, mode=0o600, what="agent state")
