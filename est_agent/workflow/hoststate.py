"""The agent's small host-side state: a cache of the active credential and a pending request.

The SIM is the source of truth; this file only lets `est-agent run` decide "nothing due" with
one header read from the card (no applet, no certificate parse, no network), and remembers a
202 (pending manual approval) across reboots. Written atomically; a missing or unreadable file
is treated as empty (the next run rebuilds it from the SIM).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from est_agent.errors import StoreError

__all__ = ["ActiveCache", "HostState", "Pending", "load_host_state", "save_host_state"]

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
_FORMAT = 1


@dataclass(frozen=True)
class ActiveCache:
    slot: int
    sequence: int
    sha256: str  # hex SHA-256 of the certificate DER, as in the SIM record header
    serial: str  # hex
    subject: str
    not_before: datetime
    not_after: datetime


@dataclass(frozen=True)
class Pending:
    """A request the server accepted but has not answered (HTTP 202, RFC 7030 §4.2.3)."""

    operation: str  # simpleenroll | simplereenroll
    slot: int
    public_key: str  # hex SEC1 point of the key generated for it (resume without rekeying)
    retry_at: datetime
    since: datetime


@dataclass(frozen=True)
class HostState:
    active: ActiveCache | None = None
    pending: Pending | None = None


def _dt(value: Any) -> datetime:
    return datetime.fromisoformat(str(value))


def _decode(raw: dict[str, Any]) -> HostState:
    active = raw.get("active")
    pending = raw.get("pending")
    return HostState(
        active=ActiveCache(
            slot=int(active["slot"]),
            sequence=int(active["sequence"]),
            sha256=str(active["sha256"]),
            serial=str(active["serial"]),
            subject=str(active["subject"]),
            not_before=_dt(active["not_before"]),
            not_after=_dt(active["not_after"]),
        )
        if active
        else None,
        pending=Pending(
            operation=str(pending["operation"]),
            slot=int(pending["slot"]),
            public_key=str(pending["public_key"]),
            retry_at=_dt(pending["retry_at"]),
            since=_dt(pending["since"]),
        )
        if pending
        else None,
    )


def load_host_state(state_dir: Path) -> HostState:
    path = state_dir / STATE_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("format") != _FORMAT:
            raise ValueError("unknown format")
        return _decode(raw)
    except FileNotFoundError:
        return HostState()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        # The SIM is authoritative: a damaged cache only costs a full read of the slots.
        log.warning("ignoring unreadable host state %s: %s", path, exc)
        return HostState()


def _encode(state: HostState) -> dict[str, Any]:
    def plain(obj: object) -> Any:
        if obj is None:
            return None
        data = asdict(obj)  # type: ignore[call-overload]
        return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in data.items()}

    return {"format": _FORMAT, "active": plain(state.active), "pending": plain(state.pending)}


def save_host_state(state_dir: Path, state: HostState) -> None:
    """Atomic replace (temp file + fsync + rename + directory fsync)."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=".state-", dir=state_dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(_encode(state), handle, indent=2)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, state_dir / STATE_FILE)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(state_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise StoreError(f"cannot write agent state in {state_dir}: {exc.strerror}") from exc
