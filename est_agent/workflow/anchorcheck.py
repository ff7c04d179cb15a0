"""When `run`'s fast path must give way to the full run for the trust anchors' sake.

The fast path (workflow/quick.py) decides "nothing due" from the host-state cache with a few
APDUs: no certificate parse, no network, not even the cryptography import. The anchors need a
look now and then (workflow/anchors.py: a /cacerts check when an anchor nears its end or a next
anchor is held, RFC 7030 §4.1.3), so every full run that loaded them writes here when that is:
``paths.state_dir/anchors-check.json`` = {"check_at": ISO time, "configured": the configured
PEM file's size and mtime, or null}. The fast path gives way when the time has come, when the
configured anchor file is not the one that time was computed from, and when the file is
missing or unusable (unknown is not "not due").
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from est_agent.errors import EstAgentError, StoreError
from est_agent.fileio import atomic_write, read_bounded

__all__ = ["CHECK_FILE", "check_due", "forget_check", "write_check"]

log = logging.getLogger(__name__)

CHECK_FILE = "anchors-check.json"
_LIMIT_BYTES = 4096


def _identity(trust_anchor: object) -> dict[str, int] | None:
    """Size and mtime of the configured anchor file (None: not a file, or unreadable)."""
    if not isinstance(trust_anchor, Path):
        return None
    try:
        info = os.stat(trust_anchor)
    except (OSError, ValueError):
        return None
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns}


def _record(check_at: datetime, trust_anchor: object) -> dict[str, Any]:
    return {"check_at": check_at.isoformat(), "configured": _identity(trust_anchor)}


def write_check(state_dir: Path, check_at: datetime, trust_anchor: object) -> None:
    """Note when the fast path must next give way (written only when it changed). A failed
    write removes the old note: the fast path then gives way rather than trust a stale one."""
    record = _record(check_at, trust_anchor)
    path = state_dir / CHECK_FILE
    with contextlib.suppress(EstAgentError, OSError, ValueError):
        if json.loads(read_bounded(path, limit_bytes=_LIMIT_BYTES, what="anchor check")) == record:
            return
    try:
        atomic_write(path, json.dumps(record).encode("utf-8"), mode=0o600, what="anchor check")
    except StoreError as exc:
        log.info("%s", exc)
        forget_check(state_dir)


def forget_check(state_dir: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(state_dir / CHECK_FILE)


def check_due(state_dir: Path, trust_anchor: object, now: datetime) -> bool:
    """Whether the fast path must give way (see the module docstring)."""
    try:
        record = json.loads(
            read_bounded(state_dir / CHECK_FILE, limit_bytes=_LIMIT_BYTES, what="anchor check")
        )
        check_at = datetime.fromisoformat(record["check_at"])
        configured = record["configured"]
    except (EstAgentError, ValueError, TypeError, KeyError):
        return True
    if check_at.tzinfo is None or configured != _identity(trust_anchor):
        return True
    return now >= check_at
