"""The anchor store (A/B files) and the pure CA-rollover decision (RFC 7030 §4.1.3)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from est_agent.errors import EstResponseError, StoreError
from est_agent.testserver.issuer import CertificateAuthority, make_ca
from est_agent.testserver.rollover import RootRollover, link_certificate, make_rollover
from est_agent.workflow import anchors as anchors_module
from est_agent.workflow.anchors import (
    Anchor,
    AnchorSet,
    AnchorStore,
    CopyState,
    Source,
    Step,
    StoredAnchors,
    StoreState,
    decide_rollover,
    needs_cacerts_check,
)

T0 = datetime(2030, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def old_ca() -> CertificateAuthority:
    return make_ca("Old Root", T0 - timedelta(days=300), timedelta(days=400))  # ends T0+100d


@pytest.fixture(scope="module")
def ro(old_ca: CertificateAuthority) -> RootRollover:
    return make_rollover(old_ca, T0, common_name="New Root")


@pytest.fixture(scope="module")
def stranger() -> CertificateAuthority:
    return make_ca("Stranger Root", T0, timedelta(days=3650))


def configured_only(cert: x509.Certificate) -> AnchorSet:
    fallback = (Anchor(cert, Source.CONFIGURED),)
    return AnchorSet(current=fallback, next=None, fallback=fallback, state=StoreState.EMPTY)


def with_next(cert: x509.Certificate, nxt: x509.Certificate) -> AnchorSet:
    return configured_only(cert).with_stored(StoredAnchors((), Anchor(nxt, Source.ROLLOVER)))


def switched(cert: x509.Certificate, new: x509.Certificate) -> AnchorSet:
    return configured_only(cert).with_stored(StoredAnchors((Anchor(new, Source.ROLLOVER),), None))


# --- the store -------------------------------------------------------------------------------


def test_empty_store_is_empty_and_current_is_the_configured_anchor(
    tmp_path: Path, old_ca: CertificateAuthority
) -> None:
    held = AnchorStore(tmp_path).load([old_ca.certificate])
    assert held.state is StoreState.EMPTY
    assert [a.source for a in held.current] == [Source.CONFIGURED]
    assert held.next is None
    assert [c.state for c in held.copies] == [CopyState.ABSENT, CopyState.ABSENT]


def test_writes_alternate_between_the_two_copies(
    tmp_path: Path, old_ca: CertificateAuthority, ro: RootRollover
) -> None:
    store = AnchorStore(tmp_path)
    held = store.load([old_ca.certificate])
    held = store.save(held, StoredAnchors((), Anchor(ro.new.certificate, Source.ROLLOVER)))
    assert (tmp_path / "anchors-a.json").exists() and not (tmp_path / "anchors-b.json").exists()
    held = store.save(
        store.load([old_ca.certificate]),
        StoredAnchors((Anchor(ro.new.certificate, Source.ROLLOVER),), None),
    )
    assert json.loads((tmp_path / "anchors-b.json").read_text())["sequence"] == 2
    again = store.load([old_ca.certificate])
    assert again.sequence == 2 and again.state is StoreState.VALID
    assert again.current[0].certificate == ro.new.certificate
    assert again.current[0].source is Source.ROLLOVER and again.next is None
    assert (tmp_path / "anchors-a.json").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],  # torn
        lambda data: data.replace(b'"sequence": 2', b'"sequence": 3'),  # digest mismatch
        lambda data: b"",
    ],
    ids=["torn", "digest-mismatch", "empty-file"],
)
def test_a_damaged_newest_copy_leaves_the_previous_set(
    tmp_path: Path, old_ca: CertificateAuthority, ro: RootRollover, damage: object
) -> None:
    store = AnchorStore(tmp_path)
    nxt = StoredAnchors((), Anchor(ro.new.certificate, Source.ROLLOVER))
    store.save(store.load([old_ca.certificate]), nxt)  # seq 1 in A
    store.save(store.load([old_ca.certificate]), StoredAnchors((nxt.next,), None))  # type: ignore[arg-type]  # seq 2 in B
    path = tmp_path / "anchors-b.json"
    path.write_bytes(damage(path.read_bytes()))  # type: ignore[operator]
    held = store.load([old_ca.certificate])
    assert held.state is StoreState.VALID and held.sequence == 1
    assert held.next is not None and held.next.certificate == ro.new.certificate
    assert [c.state for c in held.copies] == [CopyState.VALID, CopyState.DAMAGED]
    # the next write goes over the damaged copy, not over the good one
    store.save(held, StoredAnchors((nxt.next,), None))  # type: ignore[arg-type]
    assert store.load([old_ca.certificate]).sequence == 2
    assert json.loads((tmp_path / "anchors-a.json").read_text())["sequence"] == 1


def test_both_copies_damaged_is_damaged_not_empty(
    tmp_path: Path, old_ca: CertificateAuthority
) -> None:
    (tmp_path / "anchors-a.json").write_text("{")
    (tmp_path / "anchors-b.json").write_text('{"format": 1}')
    held = AnchorStore(tmp_path).load([old_ca.certificate])
    assert held.state is StoreState.DAMAGED
    assert [c.state for c in held.copies] == [CopyState.DAMAGED, CopyState.DAMAGED]
    assert [a.source for a in held.current] == [Source.CONFIGURED]  # the fallback


def test_a_directory_in_place_of_a_copy_is_unreadable(
    tmp_path: Path, old_ca: CertificateAuthority
) -> None:
    (tmp_path / "anchors-a.json").mkdir()
    held = AnchorStore(tmp_path).load([old_ca.certificate])
    assert held.state is StoreState.DAMAGED
    assert held.copies[0].state is CopyState.UNREADABLE


def test_power_cut_while_storing_keeps_the_previous_set(
    tmp_path: Path,
    old_ca: CertificateAuthority,
    ro: RootRollover,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Power fails in the middle of the write: the target copy is left torn (as a file system
    without the atomic rename would), and the run dies. The other copy still loads."""
    store = AnchorStore(tmp_path)
    first = StoredAnchors((Anchor(ro.old.certificate, Source.BOOTSTRAP),), None)
    store.save(store.load(), first)

    def torn_write(path: Path, data: bytes, **_: object) -> None:
        Path(path).write_bytes(data[:100])
        raise SystemExit("power cut")

    monkeypatch.setattr(anchors_module, "atomic_write", torn_write)
    with pytest.raises(SystemExit):
        store.save(
            store.load(), StoredAnchors(first.current, Anchor(ro.new.certificate, Source.ROLLOVER))
        )
    monkeypatch.undo()
    held = store.load()
    assert held.state is StoreState.VALID and held.sequence == 1
    assert held.current[0].certificate == ro.old.certificate and held.next is None


def test_unwritable_state_dir_is_a_store_error(
    tmp_path: Path, old_ca: CertificateAuthority
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    store = AnchorStore(blocker / "state")
    with pytest.raises(StoreError, match="anchor store"):
        store.adopt(old_ca.certificate)


def test_adopt_makes_the_bootstrap_root_current(
    tmp_path: Path, old_ca: CertificateAuthority
) -> None:
    held = AnchorStore(tmp_path).adopt(old_ca.certificate)
    again = AnchorStore(tmp_path).load()
    assert again.current == held.current
    assert again.current[0].source is Source.BOOTSTRAP and again.fallback == ()


def test_trusted_during_the_overlap_is_both_roots(
    old_ca: CertificateAuthority, ro: RootRollover
) -> None:
    held = with_next(old_ca.certificate, ro.new.certificate)
    assert held.trusted(T0) == [old_ca.certificate, ro.new.certificate]
    # after the old root expired only the new one is offered to the TLS verifier
    assert held.trusted(T0 + timedelta(days=200)) == [ro.new.certificate]


# --- the decision: stored set x /cacerts x time ------------------------------------------------

OVERLAP = T0 + timedelta(days=10)
EXPIRED = T0 + timedelta(days=101)  # past the old root's not-after


# Every held set x every /cacerts x both times. Expected, written out: (step, what is stored):
# "-" nothing, "next" NewWithNew as the next anchor, "switch" NewWithNew as the current one.
# held: configured = only est.trust_anchor (old); bootstrap = old adopted by fingerprint, nothing
# configured; next = configured old + NewWithNew stored as next; switched = NewWithNew current,
# old still configured (the fallback). offered: old = OldWithOld alone; four = the rollover's
# four certificates; old+bad-link = old, new and a "NewWithOld" signed by a stranger's key;
# old+stranger = old and an unlinked root; new-only / stranger-only = that root alone;
# none = no /cacerts this run.
_TABLE = """
configured    old            KEEP -         KEEP -
configured    four           STORE_NEXT next SWITCH switch
configured    old+bad-link   REFUSE -       REFUSE -
configured    old+stranger   REFUSE -       REFUSE -
configured    new-only       UNRELATED -    UNRELATED -
configured    stranger-only  UNRELATED -    UNRELATED -
configured    none           KEEP -         KEEP -
bootstrap     old            KEEP -         KEEP -
bootstrap     four           STORE_NEXT next SWITCH switch
bootstrap     old+bad-link   REFUSE -       REFUSE -
bootstrap     old+stranger   REFUSE -       REFUSE -
bootstrap     new-only       UNRELATED -    UNRELATED -
bootstrap     stranger-only  UNRELATED -    UNRELATED -
bootstrap     none           KEEP -         KEEP -
next          old            KEEP -         SWITCH switch
next          four           KEEP -         SWITCH switch
next          old+bad-link   KEEP -         SWITCH switch
next          old+stranger   REFUSE -       REFUSE -
next          new-only       SWITCH switch  SWITCH switch
next          stranger-only  UNRELATED -    UNRELATED -
next          none           KEEP -         SWITCH switch
switched      old            KEEP -         KEEP -
switched      four           KEEP -         KEEP -
switched      old+bad-link   KEEP -         KEEP -
switched      old+stranger   KEEP -         KEEP -
switched      new-only       KEEP -         KEEP -
switched      stranger-only  UNRELATED -    UNRELATED -
switched      none           KEEP -         KEEP -
"""


def _cases() -> list[tuple[str, str, str, datetime, Step]]:
    cases = []
    for line in _TABLE.strip().splitlines():
        held, offered, step1, after1, step2, after2 = line.split()
        cases.append((held, offered, after1, OVERLAP, Step[step1]))
        cases.append((held, offered, after2, EXPIRED, Step[step2]))
    return cases


@pytest.mark.parametrize(("held_kind", "offered_kind", "after", "now", "step"), _cases())
def test_rollover_decision(
    old_ca: CertificateAuthority,
    ro: RootRollover,
    stranger: CertificateAuthority,
    held_kind: str,
    offered_kind: str,
    after: str,
    now: datetime,
    step: Step,
) -> None:
    old, new = old_ca.certificate, ro.new.certificate
    bootstrap = AnchorSet(current=(), next=None, fallback=(), state=StoreState.EMPTY).with_stored(
        StoredAnchors((Anchor(old, Source.BOOTSTRAP),), None)
    )
    held = {
        "configured": configured_only(old),
        "bootstrap": bootstrap,
        "next": with_next(old, new),
        "switched": switched(old, new),
    }[held_kind]
    # a "link" signed by a stranger's key: carries the new key but does not verify with old's
    bad_link = link_certificate(new, ro.new.key.public_key(), stranger, T0, T0 + timedelta(1))
    offered: list[x509.Certificate] | None = {
        "old": [old],
        "four": ro.four,
        "old+bad-link": [old, bad_link, new],
        "old+stranger": [old, stranger.certificate],
        "new-only": [new],
        "stranger-only": [stranger.certificate],
        "none": None,
    }[offered_kind]
    decision = decide_rollover(held, offered, now)
    assert decision.step is step, decision.reason
    if after == "-":
        assert decision.stored is None
    elif after == "next":
        assert decision.stored is not None and decision.stored.next is not None
        assert decision.stored.next.certificate == new
        assert decision.stored.next.source is Source.ROLLOVER
        assert decision.stored.current == held.stored.current  # the current one stays
    else:
        assert after == "switch" and decision.stored is not None
        assert [a.certificate for a in decision.stored.current] == [new]
        assert decision.stored.current[0].source is Source.ROLLOVER
        assert decision.stored.next is None
    if step is Step.REFUSE:
        with pytest.raises(EstResponseError, match="no anchor was stored"):
            decision.raise_if_refused()
    else:
        decision.raise_if_refused()


def test_roles_named_for_the_four_certificates(
    old_ca: CertificateAuthority, ro: RootRollover
) -> None:
    decision = decide_rollover(
        configured_only(old_ca.certificate), list(reversed(ro.four)), OVERLAP
    )
    assert decision.roles == ("OldWithOld", "NewWithOld", "OldWithNew", "NewWithNew")


def test_cacerts_check_near_expiry_or_with_a_next_anchor(
    old_ca: CertificateAuthority, ro: RootRollover
) -> None:
    held = configured_only(old_ca.certificate)  # ends T0+100d
    assert not needs_cacerts_check(held, T0)
    assert needs_cacerts_check(held, T0 + timedelta(days=71))
    assert needs_cacerts_check(with_next(old_ca.certificate, ro.new.certificate), T0)


def test_fast_path_check(tmp_path: Path, old_ca: CertificateAuthority, ro: RootRollover) -> None:
    import os

    from cryptography.hazmat.primitives.serialization import Encoding

    from est_agent.workflow.anchorcheck import check_due, write_check
    from est_agent.workflow.anchors import next_check_at

    pem = tmp_path / "anchor.pem"
    pem.write_bytes(old_ca.certificate.public_bytes(Encoding.PEM))
    state = tmp_path / "state"
    state.mkdir()
    assert check_due(state, pem, T0)  # never noted: unknown is not "not due"
    held = configured_only(old_ca.certificate)
    assert next_check_at(held) == old_ca.certificate.not_valid_after_utc - timedelta(days=30)
    write_check(state, next_check_at(held), pem)
    assert not check_due(state, pem, T0)  # 100 days left
    assert check_due(state, pem, T0 + timedelta(days=71))  # within the 30-day margin
    os.utime(pem, ns=(1, 1))  # another configured anchor file than the note was made from
    assert check_due(state, pem, T0)
    write_check(state, next_check_at(held), pem)
    assert not check_due(state, pem, T0)
    assert check_due(state, object(), T0)  # the anchor moved to the SIM: look again
    nxt = with_next(old_ca.certificate, ro.new.certificate)
    write_check(state, next_check_at(nxt), pem)
    assert check_due(state, pem, T0)  # a next anchor is held: every run looks
    (state / "anchors-check.json").write_text("torn")
    assert check_due(state, pem, T0)


def test_a_fifo_or_oversized_copy_is_unreadable_without_waiting(
    tmp_path: Path, old_ca: CertificateAuthority, ro: RootRollover, fifo: Path
) -> None:
    import time

    store = AnchorStore(tmp_path)
    store.save(store.load(), StoredAnchors((), Anchor(ro.new.certificate, Source.ROLLOVER)))
    # a symlink to a FIFO nobody writes to (the fixture releases a reader that blocks)
    (tmp_path / "anchors-b.json").symlink_to(fifo)
    started = time.monotonic()
    held = store.load([old_ca.certificate])
    assert time.monotonic() - started < 1.0
    assert held.copies[1].state is CopyState.UNREADABLE and "FIFO" in held.copies[1].reason
    assert held.state is StoreState.VALID and held.next is not None  # copy A still counts
    (tmp_path / "anchors-b.json").unlink()
    (tmp_path / "anchors-b.json").write_bytes(b" " * (512 * 1024))
    held = store.load([old_ca.certificate])
    assert held.copies[1].state is CopyState.UNREADABLE and "larger than" in held.copies[1].reason
