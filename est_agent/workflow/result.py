"""What a workflow command did (kept apart from the workflow so the fast path stays light)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

__all__ = ["HookReport", "Outcome", "Result"]


class Outcome(StrEnum):
    ENROLLED = "enrolled"
    RENEWED = "renewed"
    ALREADY_ENROLLED = "already-enrolled"
    NOT_DUE = "not-due"
    #: due, but waiting after a failed attempt (workflow/renewal.py): nothing was sent
    RETRY_LATER = "retry-later"


@dataclass(frozen=True)
class HookReport:
    """How the deploy hook of this run ended (hooks.py ran it)."""

    argv: tuple[str, ...]
    exit_status: int | None
    timed_out: bool
    error: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "argv": list(self.argv),
            "exit_status": self.exit_status,
            "timed_out": self.timed_out,
            "error": self.error,
        }


@dataclass(frozen=True)
class Result:
    """What a run did, for the CLI to print (text or JSON).

    ``notes``: what went wrong beside the outcome without undoing it (the host state could not
    be written, the deployment failed): the outcome on the SIM stands.
    """

    outcome: Outcome
    slot: str
    subject: str
    serial: str
    not_after: datetime
    renew_at: datetime | None = None
    hook: HookReport | None = None
    notes: tuple[str, ...] = ()
    #: RETRY_LATER: when the next attempt may start
    next_attempt_at: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome.value,
            "slot": self.slot,
            "subject": self.subject,
            "serial": self.serial,
            "not_after": self.not_after.isoformat(),
            "renew_at": self.renew_at.isoformat() if self.renew_at else None,
            "deploy_hook": self.hook.to_json() if self.hook is not None else None,
            "notes": list(self.notes),
            "next_attempt_at": self.next_attempt_at.isoformat() if self.next_attempt_at else None,
        }
