"""What a run does, decided before anything is written: one pure function over explicit states.

``plan`` looks only at data: the operation asked for, what each slot was found to hold
(``SlotState`` from store.py, with its record sequence number), the renewal timing of each valid
slot's certificate (due, expired, waiting after a failed attempt), and a pending 202 from an
earlier run. It returns a ``Plan``: do nothing, wait, enroll with the bootstrap credential,
re-enroll with the active one, or stop.

The rules, in order:

1. Any slot ``UNKNOWN`` (it could not be read): **stop**, nothing is written. It may hold the
   working credential; a failed read is not an empty slot.
2. The active slot is the ``VALID`` one with the highest sequence (the lower index on a tie).
3. ``enroll``: a valid credential exists → nothing to do; else bootstrap enrollment.
   ``renew`` / ``run``: no active credential, or the active certificate expired → bootstrap
   enrollment (``simpleenroll``); not due and not forced → nothing to do; ``renew``/``run``
   due but the retry time after a failed attempt has not come (workflow/renewal.py) → wait,
   nothing sent; else re-enrollment (``simplereenroll``) authenticated by the active
   credential. ``renew --force`` and an enrollment without a valid credential never wait.
4. The target of an enrollment is never the active slot, nor a *suspect* one: an intact
   record newer than every valid one whose key does not match. That is what the active
   credential looks like when the card misreports its key (or another program regenerated
   it): it is kept, and when it is the only slot left to write, the run stops.
   A pending request (RFC 7030 §4.2.3: 202 + Retry-After) for the same EST operation and a
   slot that may be written is resumed in its slot (its key is the one the server knows) — or
   waited for while its Retry-After has not passed. Otherwise the target is a non-active slot:
   an ``EMPTY`` one, else a ``DAMAGED`` one, else the superseded older ``VALID`` one (the
   previous credential: it must make room, the active one stays); the lowest index among
   equals.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from est_agent.errors import ConfigError
from est_agent.store import SlotState

__all__ = [
    "Action",
    "EstOperation",
    "Operation",
    "PendingFacts",
    "Plan",
    "SlotFacts",
    "Timing",
    "active_index",
    "plan",
]


class Operation(Enum):
    """What the command line asked for."""

    ENROLL = "enroll"  # first boot: nothing to do when a valid credential exists
    RENEW = "renew"  # renew when due (`run` is this), enroll when nothing valid is left
    RENEW_FORCED = "renew-forced"  # renew now, due or not


class EstOperation(Enum):
    """The EST request an enrollment makes (RFC 7030 §4.2)."""

    SIMPLEENROLL = "simpleenroll"
    SIMPLEREENROLL = "simplereenroll"


class Action(Enum):
    ALREADY_ENROLLED = "already-enrolled"
    NOT_DUE = "not-due"
    BOOTSTRAP = "bootstrap"  # simpleenroll with the bootstrap credential
    REENROLL = "reenroll"  # simplereenroll with the active credential
    WAIT_PENDING = "wait-pending"  # a pending request's Retry-After has not passed
    WAIT_RETRY = "wait-retry"  # due, but a failed attempt's retry time has not come
    STOP_UNKNOWN = "stop-unknown"  # a slot could not be read: write nothing


@dataclass(frozen=True)
class SlotFacts:
    state: SlotState
    sequence: int | None = None  # of the record header, when one was read
    #: DAMAGED because the intact certificate is not for the key the card reports
    key_mismatch: bool = False


@dataclass(frozen=True)
class Timing:
    """Renewal timing of a valid slot's certificate at the time of the run."""

    expired: bool
    due: bool
    #: a failed renewal of this certificate set a next attempt time that has not come
    retry_later: bool = False


@dataclass(frozen=True)
class PendingFacts:
    operation: EstOperation
    slot: int
    ready: bool  # its Retry-After has passed


@dataclass(frozen=True)
class Plan:
    action: Action
    active: int | None = None
    target: int | None = None
    resume_pending: bool = False
    reason: str = ""

    @property
    def est_operation(self) -> EstOperation | None:
        if self.action is Action.BOOTSTRAP:
            return EstOperation.SIMPLEENROLL
        if self.action is Action.REENROLL:
            return EstOperation.SIMPLEREENROLL
        return None


#: which non-active slot to write first: an empty one; then a damaged one (a "key mismatch" may
#: be a card misreporting the key of the working credential: keep it while there is room);
#: last the superseded older valid one
_WRITE_PREFERENCE = {SlotState.EMPTY: 0, SlotState.DAMAGED: 1, SlotState.VALID: 2}


def active_index(slots: Sequence[SlotFacts]) -> int | None:
    """The valid slot with the highest sequence number (the lower index on a tie)."""
    best: int | None = None
    for index, facts in enumerate(slots):
        if facts.state is not SlotState.VALID:
            continue
        if best is None or (facts.sequence or 0) > (slots[best].sequence or 0):
            best = index
    return best


def plan(
    operation: Operation,
    slots: Sequence[SlotFacts],
    timings: Sequence[Timing | None],
    pending: PendingFacts | None,
) -> Plan:
    """The decision of one run (module docstring). ``timings[i]`` is given for valid slots."""
    if len(slots) < 2 or len(timings) != len(slots):
        raise ConfigError("the credential store needs two slots")  # config.py ensures it
    unknown = [i for i, facts in enumerate(slots) if facts.state is SlotState.UNKNOWN]
    active = active_index(slots)
    if unknown:
        which = ", ".join(str(i) for i in unknown)
        return Plan(Action.STOP_UNKNOWN, active, reason=f"slot {which} could not be read")
    timing = timings[active] if active is not None else None
    if active is not None and operation is Operation.ENROLL:
        return Plan(Action.ALREADY_ENROLLED, active)
    if active is None or timing is None or timing.expired:
        action = Action.BOOTSTRAP
        reason = "no valid credential" if active is None else "the active certificate expired"
    elif operation is Operation.RENEW and not timing.due:
        return Plan(Action.NOT_DUE, active)
    elif operation is Operation.RENEW and timing.retry_later:
        return Plan(Action.WAIT_RETRY, active, reason="waiting after a failed attempt")
    else:
        action = Action.REENROLL
        reason = "forced" if operation is Operation.RENEW_FORCED else "renewal due"
    wanted = (
        EstOperation.SIMPLEENROLL if action is Action.BOOTSTRAP else EstOperation.SIMPLEREENROLL
    )
    newest_valid = (slots[active].sequence or 0) if active is not None else 0
    suspect = [
        i
        for i, facts in enumerate(slots)
        if facts.state is SlotState.DAMAGED
        and facts.key_mismatch
        and (facts.sequence or 0) > newest_valid
    ]
    if (
        pending is not None
        and pending.operation is wanted
        and 0 <= pending.slot < len(slots)
        and pending.slot != active
        and pending.slot not in suspect
    ):
        if not pending.ready:
            return Plan(Action.WAIT_PENDING, active, pending.slot, True, "pending at the server")
        return Plan(action, active, pending.slot, True, reason)
    candidates = [i for i in range(len(slots)) if i != active and i not in suspect]
    if not candidates:
        which = ", ".join(str(i) for i in suspect)
        return Plan(
            Action.STOP_UNKNOWN,
            active,
            reason=f"slot {which} holds the newest record but not its key: not overwritten",
        )
    target = min(candidates, key=lambda i: (_WRITE_PREFERENCE[slots[i].state], i))
    return Plan(action, active, target, False, reason)
