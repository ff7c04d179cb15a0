# ruff: noqa: E501 - the decision table reads best one row per line
"""workflow/plan.py: the decision of a run, as a table over every combination of the two
slots' states, the renewal timing, the pending 202 and the operation.

Two layers: hand-written rows (the expected plan spelled out), and a sweep of all 4 x 4 slot
states x sequence order x timings x 9 pending variants x 3 operations checked against the
invariants that keep the credential (never write the active slot or an unknown one) and
against an oracle written here independently of plan()'s code.
"""

from __future__ import annotations

import itertools

import pytest

from est_agent.errors import ConfigError
from est_agent.store import SlotState
from est_agent.workflow.plan import (
    Action,
    EstOperation,
    Operation,
    PendingFacts,
    Plan,
    SlotFacts,
    Timing,
    active_index,
    plan,
)

V, E, D, U = SlotState.VALID, SlotState.EMPTY, SlotState.DAMAGED, SlotState.UNKNOWN
#: DAMAGED because the certificate is not for the key the card reports ("key-mismatch")
DK = "damaged-key-mismatch"
State = SlotState | str
OK = Timing(expired=False, due=False)
DUE = Timing(expired=False, due=True)
EXPIRED = Timing(expired=True, due=True)
#: due, but a failed attempt's next attempt time has not come (workflow/renewal.py)
DUE_RETRY = Timing(expired=False, due=True, retry_later=True)
ENROLL, RENEW, FORCED = Operation.ENROLL, Operation.RENEW, Operation.RENEW_FORCED
SE, SRE = EstOperation.SIMPLEENROLL, EstOperation.SIMPLEREENROLL


def facts(a: State, b: State, seq_a: int = 1, seq_b: int = 2) -> list[SlotFacts]:
    def one(state: State, seq: int) -> SlotFacts:
        if state == DK:
            return SlotFacts(D, seq, key_mismatch=True)
        assert isinstance(state, SlotState)
        return SlotFacts(state, seq if state in (V, D, U) else None)

    return [one(a, seq_a), one(b, seq_b)]


def run(
    op: Operation,
    a: State,
    b: State,
    ta: Timing | None = None,
    tb: Timing | None = None,
    pending: PendingFacts | None = None,
    seq_a: int = 1,
    seq_b: int = 2,
) -> Plan:
    timings = [ta if a is V else None, tb if b is V else None]
    return plan(op, facts(a, b, seq_a, seq_b), timings, pending)


ROWS = [
    # (id, operation, slot a, slot b, timing a, timing b, pending) -> (action, active, target, resume)
    ("fresh-sim-enroll", ENROLL, E, E, None, None, None, (Action.BOOTSTRAP, None, 0, False)),
    ("fresh-sim-run", RENEW, E, E, None, None, None, (Action.BOOTSTRAP, None, 0, False)),
    ("enrolled-enroll", ENROLL, V, E, OK, None, None, (Action.ALREADY_ENROLLED, 0, None, False)),
    ("enrolled-expired-enroll", ENROLL, V, E, EXPIRED, None, None, (Action.ALREADY_ENROLLED, 0, None, False)),
    ("not-due", RENEW, V, E, OK, None, None, (Action.NOT_DUE, 0, None, False)),
    ("due", RENEW, V, E, DUE, None, None, (Action.REENROLL, 0, 1, False)),
    ("forced", FORCED, V, E, OK, None, None, (Action.REENROLL, 0, 1, False)),
    ("expired-falls-back", RENEW, V, E, EXPIRED, None, None, (Action.BOOTSTRAP, 0, 1, False)),
    ("expired-forced", FORCED, V, E, EXPIRED, None, None, (Action.BOOTSTRAP, 0, 1, False)),
    # both valid: b (sequence 2) is active, a is the superseded previous credential
    ("both-valid-not-due", RENEW, V, V, OK, OK, None, (Action.NOT_DUE, 1, None, False)),
    ("both-valid-due", RENEW, V, V, OK, DUE, None, (Action.REENROLL, 1, 0, False)),
    # damaged slots may be written unless active (a damaged one never is)
    ("torn-other", RENEW, V, D, DUE, None, None, (Action.REENROLL, 0, 1, False)),
    ("active-b-torn-a", RENEW, D, V, None, DUE, None, (Action.REENROLL, 1, 0, False)),
    ("both-damaged", RENEW, D, D, None, None, None, (Action.BOOTSTRAP, None, 0, False)),
    ("empty-before-damaged", ENROLL, D, E, None, None, None, (Action.BOOTSTRAP, None, 1, False)),
    ("damaged-after-empty", RENEW, E, D, None, None, None, (Action.BOOTSTRAP, None, 0, False)),
    # unknown: stop, whatever else holds
    ("unknown-active-side", RENEW, U, V, None, DUE, None, (Action.STOP_UNKNOWN, 1, None, False)),
    ("unknown-other", RENEW, V, U, DUE, None, None, (Action.STOP_UNKNOWN, 0, None, False)),
    ("unknown-not-due", RENEW, V, U, OK, None, None, (Action.STOP_UNKNOWN, 0, None, False)),
    ("unknown-fresh", ENROLL, U, E, None, None, None, (Action.STOP_UNKNOWN, None, None, False)),
    ("both-unknown", FORCED, U, U, None, None, None, (Action.STOP_UNKNOWN, None, None, False)),
    # pending 202: resumed in its slot once Retry-After passed, waited for before
    ("pending-enroll-ready", ENROLL, E, E, None, None, PendingFacts(SE, 1, True), (Action.BOOTSTRAP, None, 1, True)),
    ("pending-enroll-waiting", RENEW, E, E, None, None, PendingFacts(SE, 1, False), (Action.WAIT_PENDING, None, 1, True)),
    ("pending-reenroll-ready", RENEW, V, E, DUE, None, PendingFacts(SRE, 1, True), (Action.REENROLL, 0, 1, True)),
    ("pending-reenroll-waiting-forced", FORCED, V, E, OK, None, PendingFacts(SRE, 1, False), (Action.WAIT_PENDING, 0, 1, True)),
    # a pending request for the active slot is stale: never resumed there
    ("pending-for-active-slot", RENEW, V, E, DUE, None, PendingFacts(SRE, 0, True), (Action.REENROLL, 0, 1, False)),
    # a pending request of the other EST operation is not this run's
    ("pending-other-operation", RENEW, V, E, DUE, None, PendingFacts(SE, 1, False), (Action.REENROLL, 0, 1, False)),
    ("pending-enroll-now-enrolled", ENROLL, V, E, OK, None, PendingFacts(SE, 1, False), (Action.ALREADY_ENROLLED, 0, None, False)),
    ("pending-out-of-range", RENEW, E, E, None, None, PendingFacts(SE, 7, True), (Action.BOOTSTRAP, None, 0, False)),
    ("pending-not-due-ignored", RENEW, V, E, OK, None, PendingFacts(SRE, 1, False), (Action.NOT_DUE, 0, None, False)),
    # the newest record's key does not match (a card misreporting the active key): never written
    ("suspect-newest-is-the-only-room", RENEW, V, DK, DUE, None, None, (Action.STOP_UNKNOWN, 0, None, False)),
    ("suspect-newest-forced", FORCED, V, DK, OK, None, None, (Action.STOP_UNKNOWN, 0, None, False)),
    ("suspect-newest-pending-not-resumed", RENEW, V, DK, DUE, None, PendingFacts(SRE, 1, True), (Action.STOP_UNKNOWN, 0, None, False)),
    ("suspect-newest-enroll-already", ENROLL, V, DK, OK, None, None, (Action.ALREADY_ENROLLED, 0, None, False)),
    ("suspect-no-valid-other-empty", ENROLL, DK, E, None, None, None, (Action.BOOTSTRAP, None, 1, False)),
    ("suspect-no-valid-other-damaged", RENEW, D, DK, None, None, None, (Action.BOOTSTRAP, None, 0, False)),
    ("both-suspect", RENEW, DK, DK, None, None, None, (Action.STOP_UNKNOWN, None, None, False)),
    # after a failed renewal: `run` waits for the next attempt time, nothing is sent
    ("retry-later", RENEW, V, E, DUE_RETRY, None, None, (Action.WAIT_RETRY, 0, None, False)),
    ("retry-later-b-active", RENEW, V, V, OK, DUE_RETRY, None, (Action.WAIT_RETRY, 1, None, False)),
    ("retry-forced-goes-now", FORCED, V, E, DUE_RETRY, None, None, (Action.REENROLL, 0, 1, False)),
    ("retry-enroll-already", ENROLL, V, E, DUE_RETRY, None, None, (Action.ALREADY_ENROLLED, 0, None, False)),
    ("retry-not-due-is-not-due", RENEW, V, E, Timing(False, False, True), None, None, (Action.NOT_DUE, 0, None, False)),
    ("retry-expired-falls-back-now", RENEW, V, E, Timing(True, True, True), None, None, (Action.BOOTSTRAP, 0, 1, False)),
    ("retry-before-a-ready-pending", RENEW, V, E, DUE_RETRY, None, PendingFacts(SRE, 1, True), (Action.WAIT_RETRY, 0, None, False)),
    ("retry-unknown-stops", RENEW, V, U, DUE_RETRY, None, None, (Action.STOP_UNKNOWN, 0, None, False)),
]


@pytest.mark.parametrize(("name", "op", "a", "b", "ta", "tb", "pending", "expected"), ROWS, ids=[r[0] for r in ROWS])
def test_table(
    name: str,
    op: Operation,
    a: State,
    b: State,
    ta: Timing | None,
    tb: Timing | None,
    pending: PendingFacts | None,
    expected: tuple[Action, int | None, int | None, bool],
) -> None:
    result = run(op, a, b, ta, tb, pending)
    assert (result.action, result.active, result.target, result.resume_pending) == expected


STATES: list[State] = [V, E, D, DK, U]
TIMINGS = [OK, DUE, EXPIRED, DUE_RETRY]
PENDINGS: list[PendingFacts | None] = [None] + [
    PendingFacts(operation, slot, ready)
    for operation in (SE, SRE)
    for slot in (0, 1)
    for ready in (True, False)
]


def _combinations() -> list[tuple[Operation, State, State, Timing | None, Timing | None, PendingFacts | None, int, int]]:
    out = []
    for op, a, b in itertools.product(Operation, STATES, STATES):
        for ta, tb in itertools.product(
            TIMINGS if a is V else [None], TIMINGS if b is V else [None]
        ):
            for seq_a, seq_b in ((1, 2), (2, 1)):
                for pending in PENDINGS:
                    out.append((op, a, b, ta, tb, pending, seq_a, seq_b))
    return out


COMBINATIONS = _combinations()


def _oracle(
    op: Operation,
    states: tuple[State, State],
    timings: tuple[Timing | None, Timing | None],
    seqs: tuple[int, int],
    pending: PendingFacts | None,
) -> tuple[Action, int | None, int | None, bool]:
    """The rules of plan.py's docstring, written again without looking at its code."""
    valid = [i for i in (0, 1) if states[i] is V]
    active = None
    if len(valid) == 2:
        active = 0 if seqs[0] >= seqs[1] else 1
    elif valid:
        active = valid[0]
    if U in states:
        return Action.STOP_UNKNOWN, active, None, False
    if op is ENROLL and active is not None:
        return Action.ALREADY_ENROLLED, active, None, False
    timing = timings[active] if active is not None else None
    if timing is None or timing.expired:
        action, wanted = Action.BOOTSTRAP, SE
    elif op is RENEW and not timing.due:
        return Action.NOT_DUE, active, None, False
    elif op is RENEW and timing.retry_later:
        return Action.WAIT_RETRY, active, None, False
    else:
        action, wanted = Action.REENROLL, SRE
    newest_valid = seqs[active] if active is not None else 0
    suspect = {i for i in (0, 1) if states[i] == DK and seqs[i] > newest_valid}
    if (
        pending is not None
        and pending.operation is wanted
        and pending.slot in (0, 1)
        and pending.slot != active
        and pending.slot not in suspect
    ):
        return (action if pending.ready else Action.WAIT_PENDING), active, pending.slot, True
    others = [i for i in (0, 1) if i != active and i not in suspect]
    for wanted_state in (E, D, DK, V):
        for i in others:
            if states[i] == wanted_state:
                return action, active, i, False
    return Action.STOP_UNKNOWN, active, None, False


def test_the_sweep_covers_every_combination() -> None:
    # 3 operations x (states with their timings: 16 valid-valid + 2 x 4 x 4 one valid + 16
    # neither) x 2 orders x 9 pendings
    per_order = 16 + 4 * 4 * 2 + 16
    assert len(COMBINATIONS) == 3 * per_order * 2 * 9 == len(set(COMBINATIONS))


@pytest.mark.parametrize("combination", COMBINATIONS)
def test_invariants_and_oracle(
    combination: tuple[Operation, State, State, Timing | None, Timing | None, PendingFacts | None, int, int],
) -> None:
    op, a, b, ta, tb, pending, seq_a, seq_b = combination
    states = (a, b)
    result = plan(op, facts(a, b, seq_a, seq_b), [ta, tb], pending)
    # the promises, independent of the oracle:
    if U in states:
        assert result.action is Action.STOP_UNKNOWN and result.target is None
    if result.target is not None:
        assert result.target != result.active, "never the active slot"
        assert states[result.target] is not U, "never a slot that could not be read"
        if states[result.target] is V:
            # only the superseded older valid credential may make room
            assert result.active is not None and states[result.active] is V
        if states[result.target] == DK:
            # a record with a mismatching key is written only when older than the active one
            active_seq = (seq_a, seq_b)[result.active] if result.active is not None else 0
            assert (seq_a, seq_b)[result.target] <= active_seq
    if result.action is Action.REENROLL:
        assert result.active is not None and states[result.active] is V
    if result.action in (Action.BOOTSTRAP, Action.REENROLL, Action.WAIT_PENDING):
        assert result.target is not None
    else:
        assert result.target is None and not result.resume_pending
    if result.resume_pending:
        assert pending is not None and result.target == pending.slot
        assert result.est_operation in (pending.operation, None)
    expected = _oracle(op, states, (ta, tb), (seq_a, seq_b), pending)
    assert (result.action, result.active, result.target, result.resume_pending) == expected


def test_equal_sequences_make_the_lower_index_active() -> None:
    # two valid records with one sequence number (only a foreign tool could write that)
    result = run(RENEW, V, V, DUE, DUE, seq_a=5, seq_b=5)
    assert (result.action, result.active, result.target) == (Action.REENROLL, 0, 1)


def test_active_index() -> None:
    assert active_index(facts(V, V, 3, 2)) == 0
    assert active_index(facts(V, V, 3, 4)) == 1
    assert active_index(facts(D, V, 9, 1)) == 1
    assert active_index(facts(E, U)) is None


def test_two_slots_are_required() -> None:
    with pytest.raises(ConfigError):
        plan(ENROLL, [SlotFacts(E)], [None], None)
