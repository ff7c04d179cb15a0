"""The trust-anchor store and the CA-rollover decision (RFC 7030 §4.1.1, §4.1.3; RFC 4210 §4.4).

What is trusted for the EST server's TLS chain, over a device's lifetime:

* the **configured** ``est.trust_anchor`` is the initial anchor and stays the fallback: it is
  never written here and is always read from the configuration;
* the store (two files in ``paths.state_dir``) holds the **current** anchor(s) when they are no
  longer the configured ones (adopted by a fingerprint bootstrap, or switched to by a rollover)
  and the **next** anchor: a CA rollover's NewWithNew root, proven by a NewWithOld link
  certificate (the new key signed by the current anchor's key, RFC 7030 §4.1.3).

A/B files, crash safety: ``anchors-a.json`` and ``anchors-b.json`` each carry a sequence number
and the SHA-256 of their content. A write goes (through ``fileio.atomic_write``) to the copy
that does *not* hold the newest valid set, with the next sequence number, so a power cut while
storing leaves the previous set readable whatever happens to the file being written. Loading
judges each copy with an explicit state (absent, valid, damaged, unreadable) and the store as
a whole (empty, valid, damaged): a damaged store is never taken for an empty one; the agent
then trusts the configured anchor only and says so.

The rollover decision (``decide_rollover``) is a pure function of the held set, the
certificates of one ``/cacerts`` answer (or None: no request this run) and the time.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from est_agent.certificates import sha256_fingerprint
from est_agent.errors import EstResponseError, StoreError
from est_agent.fileio import atomic_write, read_bounded

__all__ = [
    "ANCHOR_CHECK_MARGIN",
    "Anchor",
    "AnchorSet",
    "AnchorStore",
    "CopyReport",
    "CopyState",
    "Rollover",
    "Source",
    "Step",
    "StoreState",
    "StoredAnchors",
    "decide_rollover",
    "fingerprint",
    "needs_cacerts_check",
    "next_check_at",
]

log = logging.getLogger(__name__)

#: A run that would otherwise make no request fetches /cacerts when a current anchor ends
#: within this margin (or a next anchor is held: the server may have stopped sending the old
#: root). RFC 4210 §4.4 has the new CA key announced well before the old one expires; 30 days
#: of daily runs see it even when a device misses a few.
ANCHOR_CHECK_MARGIN = timedelta(days=30)

FILES = ("anchors-a.json", "anchors-b.json")
_FORMAT = 1
_LIMIT_BYTES = 256 * 1024  # a handful of certificates in base64


class Source(enum.Enum):
    """Where an anchor came from."""

    CONFIGURED = "configured"  # est.trust_anchor
    BOOTSTRAP = "bootstrap"  # the /cacerts root matching est.cacerts_fingerprint (§4.1.1)
    ROLLOVER = "rollover"  # NewWithNew, proven by NewWithOld (§4.1.3)


class CopyState(enum.Enum):
    ABSENT = "absent"
    VALID = "valid"
    DAMAGED = "damaged"  # present but not a well-formed record with a matching digest
    UNREADABLE = "unreadable"  # present (or not known to be absent) but could not be read


class StoreState(enum.Enum):
    EMPTY = "empty"  # both copies absent: nothing was ever stored
    VALID = "valid"  # at least one copy valid: the one with the higher sequence counts
    DAMAGED = "damaged"  # no valid copy, at least one damaged or unreadable: NOT empty


def _spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 over the DER certificate, hex (what est.cacerts_fingerprint pins)."""
    return sha256_fingerprint(cert).hex()


@dataclass(frozen=True)
class Anchor:
    certificate: x509.Certificate
    source: Source

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.certificate)

    def same_key(self, cert: x509.Certificate) -> bool:
        return _spki(self.certificate) == _spki(cert)


@dataclass(frozen=True)
class StoredAnchors:
    """The content of one store copy. ``current`` empty: the configured anchor is current."""

    current: tuple[Anchor, ...] = ()
    next: Anchor | None = None


@dataclass(frozen=True)
class CopyReport:
    name: str
    state: CopyState
    sequence: int | None = None
    reason: str = ""


@dataclass(frozen=True)
class AnchorSet:
    """What is trusted now: the store's view merged with the configured anchor(s)."""

    current: tuple[Anchor, ...]
    next: Anchor | None
    fallback: tuple[Anchor, ...]  # the configured anchors (always trusted, see `trusted`)
    state: StoreState
    sequence: int = 0
    copies: tuple[CopyReport, ...] = ()
    stored: StoredAnchors = field(default_factory=StoredAnchors)

    def trusted(self, now: datetime) -> list[x509.Certificate]:
        """The TLS trust anchors (RFC 7030 §3.6.1 explicit TA): current, next (the overlap of a
        rollover: server chains to either root are accepted) and the configured fallback.
        Anchors expired at `now` are left out while any other remains."""
        seen: dict[bytes, x509.Certificate] = {}
        for anchor in (*self.current, *((self.next,) if self.next else ()), *self.fallback):
            seen.setdefault(anchor.certificate.public_bytes(Encoding.DER), anchor.certificate)
        certs = list(seen.values())
        alive = [c for c in certs if c.not_valid_after_utc > now]
        return alive or certs

    def with_stored(self, stored: StoredAnchors) -> AnchorSet:
        return AnchorSet(
            current=stored.current or self.fallback,
            next=stored.next,
            fallback=self.fallback,
            state=self.state,
            sequence=self.sequence,
            copies=self.copies,
            stored=stored,
        )


# --- the files -------------------------------------------------------------------------------


def _encode_anchor(anchor: Anchor) -> dict[str, str]:
    der = anchor.certificate.public_bytes(Encoding.DER)
    return {"source": anchor.source.value, "der": base64.b64encode(der).decode("ascii")}


def _payload(sequence: int, stored: StoredAnchors) -> dict[str, Any]:
    return {
        "format": _FORMAT,
        "sequence": sequence,
        "current": [_encode_anchor(a) for a in stored.current],
        "next": _encode_anchor(stored.next) if stored.next else None,
    }


def _digest(payload: dict[str, Any]) -> str:
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(canonical).hexdigest()


def encode_copy(sequence: int, stored: StoredAnchors) -> bytes:
    payload = _payload(sequence, stored)
    return json.dumps({**payload, "sha256": _digest(payload)}, indent=2).encode("utf-8")


class _Damaged(Exception):
    pass


def _decode_anchor(item: Any) -> Anchor:
    if not isinstance(item, dict) or set(item) != {"source", "der"}:
        raise _Damaged("an anchor entry is not {source, der}")
    try:
        source = Source(item["source"])
        cert = x509.load_der_x509_certificate(base64.b64decode(item["der"], validate=True))
    except (ValueError, TypeError) as exc:
        raise _Damaged(f"an anchor does not parse ({exc})") from None
    if source is Source.CONFIGURED:
        raise _Damaged("a configured anchor is never stored")
    return Anchor(cert, source)


def decode_copy(data: bytes) -> tuple[int, StoredAnchors]:
    """(sequence, content) of one copy; `_Damaged` with the reason otherwise."""
    try:
        record = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise _Damaged("not JSON (torn or overwritten)") from None
    if not isinstance(record, dict) or record.get("format") != _FORMAT:
        raise _Damaged(f"not an anchor store record of format {_FORMAT}")
    claimed = record.pop("sha256", None)
    if set(record) != {"format", "sequence", "current", "next"}:
        raise _Damaged("unexpected fields")
    if claimed != _digest(record):
        raise _Damaged("digest mismatch")
    sequence = record["sequence"]
    if not isinstance(sequence, int) or isinstance(sequence, bool) or sequence < 1:
        raise _Damaged("bad sequence number")
    current = record["current"]
    if not isinstance(current, list):
        raise _Damaged("current is not a list")
    nxt = record["next"]
    return sequence, StoredAnchors(
        tuple(_decode_anchor(a) for a in current),
        _decode_anchor(nxt) if nxt is not None else None,
    )


class AnchorStore:
    """The A/B anchor files in `state_dir` (see the module docstring)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    def _read(self, name: str) -> tuple[CopyReport, StoredAnchors | None]:
        path = self.state_dir / name
        try:
            os.lstat(path)
        except FileNotFoundError:
            return CopyReport(name, CopyState.ABSENT), None
        except OSError as exc:
            return CopyReport(name, CopyState.UNREADABLE, reason=exc.strerror or str(exc)), None
        try:
            data = read_bounded(
                path, limit_bytes=_LIMIT_BYTES, what="anchor store", error=StoreError
            )
        except StoreError as exc:
            return CopyReport(name, CopyState.UNREADABLE, reason=str(exc)), None
        try:
            sequence, stored = decode_copy(data)
        except _Damaged as exc:
            return CopyReport(name, CopyState.DAMAGED, reason=str(exc)), None
        return CopyReport(name, CopyState.VALID, sequence), stored

    def load(self, configured: Sequence[x509.Certificate] = ()) -> AnchorSet:
        """The held set: the newest valid copy, else the configured anchors (store empty or
        damaged; `state` says which)."""
        fallback = tuple(Anchor(c, Source.CONFIGURED) for c in configured)
        reads = [self._read(name) for name in FILES]
        copies = tuple(report for report, _ in reads)
        valid = [(r.sequence or 0, s) for r, s in reads if s is not None]
        if valid:
            sequence, stored = max(valid, key=lambda item: item[0])
            state = StoreState.VALID
        else:
            sequence, stored = 0, StoredAnchors()
            bad = any(c.state is not CopyState.ABSENT for c in copies)
            state = StoreState.DAMAGED if bad else StoreState.EMPTY
            for copy in copies:
                if copy.state is not CopyState.ABSENT:
                    log.warning(
                        "anchor store %s: %s (%s)", copy.name, copy.state.value, copy.reason
                    )
        return AnchorSet(
            current=stored.current or fallback,
            next=stored.next,
            fallback=fallback,
            state=state,
            sequence=sequence,
            copies=copies,
            stored=stored,
        )

    def save(self, held: AnchorSet, stored: StoredAnchors) -> AnchorSet:
        """Write `stored` as the next sequence into the copy that does not hold `held`'s
        newest valid set (A/B: the previous set stays readable whatever this write does)."""
        newest = next(
            (
                c.name
                for c in held.copies
                if c.state is CopyState.VALID and c.sequence == held.sequence
            ),
            None,
        )
        target = FILES[1] if newest == FILES[0] else FILES[0]
        sequence = held.sequence + 1
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise StoreError(
                f"cannot write the anchor store in {self.state_dir}: {exc.strerror or exc}"
            ) from exc
        atomic_write(
            self.state_dir / target,
            encode_copy(sequence, stored),
            mode=0o600,
            what="anchor store",
        )
        copies = tuple(
            CopyReport(target, CopyState.VALID, sequence) if c.name == target else c
            for c in held.copies
        ) or (CopyReport(target, CopyState.VALID, sequence),)
        return AnchorSet(
            current=stored.current or held.fallback,
            next=stored.next,
            fallback=held.fallback,
            state=StoreState.VALID,
            sequence=sequence,
            copies=copies,
            stored=stored,
        )

    def adopt(
        self,
        cert: x509.Certificate,
        *,
        configured: Sequence[x509.Certificate] = (),
        source: Source = Source.BOOTSTRAP,
    ) -> AnchorSet:
        """Make `cert` the current anchor (a fingerprint-verified bootstrap root, RFC 7030
        §4.1.1); any next anchor is dropped (it was proven by another root)."""
        if source is Source.CONFIGURED:
            raise ValueError("a configured anchor is read from the configuration, not stored")
        held = self.load(configured)
        return self.save(held, StoredAnchors((Anchor(cert, source),), None))


# --- the rollover decision (pure) ------------------------------------------------------------


class Step(enum.Enum):
    KEEP = "keep"  # nothing to change
    STORE_NEXT = "store-next"  # a proven NewWithNew becomes the next anchor
    SWITCH = "switch"  # the next anchor becomes current
    UNRELATED = "unrelated"  # /cacerts holds none of our anchors (TLS CA is another CA)
    REFUSE = "refuse"  # a new root without a valid link: 76, nothing stored


@dataclass(frozen=True)
class Rollover:
    step: Step
    reason: str
    #: the certificates of /cacerts by role: OldWithOld, NewWithOld, OldWithNew, NewWithNew
    roles: tuple[str, ...] = ()
    #: what to store (None: nothing to write)
    stored: StoredAnchors | None = None

    def raise_if_refused(self) -> None:
        if self.step is Step.REFUSE:
            raise EstResponseError(f"/cacerts refused: {self.reason}; no anchor was stored")


def _name(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "(empty subject)"


def _expired(cert: x509.Certificate, now: datetime) -> bool:
    return now >= cert.not_valid_after_utc


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _switched(held: AnchorSet, reason: str, roles: tuple[str, ...] = ()) -> Rollover:
    assert held.next is not None
    new = Anchor(held.next.certificate, Source.ROLLOVER)
    return Rollover(Step.SWITCH, reason, roles, StoredAnchors((new,), None))


def needs_cacerts_check(
    held: AnchorSet, now: datetime, margin: timedelta = ANCHOR_CHECK_MARGIN
) -> bool:
    """Whether a run that makes no other request should fetch /cacerts: a current anchor ends
    within `margin`, or a next anchor is held (has the server stopped sending the old root?)."""
    if held.next is not None:
        return True
    return any(a.certificate.not_valid_after_utc - now <= margin for a in held.current)


def next_check_at(held: AnchorSet, margin: timedelta = ANCHOR_CHECK_MARGIN) -> datetime:
    """From when `needs_cacerts_check` holds (workflow/anchorcheck.py writes it for `run`'s
    fast path): at once while a next anchor is held, else `margin` before the first current
    anchor ends."""
    if held.next is not None or not held.current:
        return datetime.min.replace(tzinfo=UTC)
    return min(a.certificate.not_valid_after_utc for a in held.current) - margin


def decide_rollover(
    held: AnchorSet, offered: Sequence[x509.Certificate] | None, now: datetime
) -> Rollover:
    """What one /cacerts answer (or none: `offered` None) means for the held anchors.

    RFC 7030 §4.1.3 / RFC 4210 §4.4: during a root key rollover the server sends OldWithOld,
    NewWithOld (the new key signed by the old), OldWithNew (the old key signed by the new) and
    NewWithNew. A new root is taken as the next anchor only when a NewWithOld link verifies
    with a current anchor's key; a /cacerts that holds a current anchor and also an unknown
    root without such a link is refused. Next becomes current when the old root expires or
    the server stops sending it.
    """
    if offered is None:
        if (
            held.next is not None
            and held.current
            and all(_expired(a.certificate, now) for a in held.current)
        ):
            return _switched(held, "the current anchor expired: the next one takes over")
        return Rollover(Step.KEEP, "no /cacerts this run")
    from est_agent.est.messages import classify_cacerts  # not on `run`'s fast path

    certs = list(offered)
    if not certs:
        raise EstResponseError("/cacerts returned no certificates")
    held_anchors = (*held.current, *held.fallback)
    # classify relative to the anchor the device holds (never by guessing from dates)
    hint = next((a.certificate for a in held_anchors for c in certs if a.same_key(c)), None)
    roles_of = classify_cacerts(certs, current_anchor=hint)
    roles = ["OldWithOld"]
    if roles_of.new_with_old is not None:
        roles.append("NewWithOld")
    if roles_of.old_with_new is not None:
        roles.append("OldWithNew")
    if roles_of.new_root is not None:
        roles.append("NewWithNew")
    names = tuple(roles)
    old = roles_of.anchor
    in_current = any(a.same_key(old) for a in held.current)
    if not in_current:
        nxt = held.next
        if nxt is not None and any(nxt.same_key(r) for r in roles_of.roots):
            return _switched(held, "the server stopped sending the old root", names)
        if any(a.same_key(old) for a in held.fallback):
            return Rollover(Step.KEEP, "the server sends the configured anchor", names)
        return Rollover(
            Step.UNRELATED,
            f"/cacerts root {_name(old)} is none of the trust anchors (a separate TLS CA)",
            names,
        )
    new = roles_of.new_root
    if new is not None and (
        new.not_valid_after_utc <= old.not_valid_after_utc or _expired(new, now)
    ):
        # After a switch the retired root is still sent, linked both ways: a new root replaces
        # the current one (RFC 4210 §4.4), so one that ends no later is the retired one.
        new = None
    known = [*held_anchors, *((held.next,) if held.next else ())]
    # a linked root (new, or the retired one after a switch) is accounted for; any other is not
    linked = roles_of.new_root
    foreign = [
        r
        for r in roles_of.roots
        if not any(a.same_key(r) for a in known) and (linked is None or r is not linked)
    ]
    if foreign:
        return Rollover(
            Step.REFUSE,
            f"it offers the root {_name(foreign[0])} without a valid NewWithOld link certificate"
            f" signed by the current anchor {_name(old)} (RFC 7030 §4.1.3)",
            names,
        )
    if new is None:
        if held.next is not None and _expired(old, now):
            return _switched(held, "the current anchor expired: the next one takes over", names)
        return Rollover(Step.KEEP, "no rollover offered", names)
    link = roles_of.new_with_old
    assert link is not None  # classify_cacerts sets new_root only with its NewWithOld link
    if not _is_ca(new) or link.subject != new.subject:
        return Rollover(
            Step.REFUSE,
            f"the NewWithNew root {_name(new)} is not a CA certificate matching its link",
            names,
        )
    if held.next is not None and held.next.same_key(new):
        if _expired(old, now):
            return _switched(held, "the current anchor expired: the next one takes over", names)
        return Rollover(Step.KEEP, "rollover overlap: next anchor already stored", names)
    if _expired(old, now):
        return Rollover(
            Step.SWITCH,
            "the current anchor expired: the linked new root takes over",
            names,
            StoredAnchors((Anchor(new, Source.ROLLOVER),), None),
        )
    return Rollover(
        Step.STORE_NEXT,
        f"CA rollover: {_name(new)} (linked by NewWithOld) stored as the next anchor",
        names,
        StoredAnchors(held.stored.current, Anchor(new, Source.ROLLOVER)),
    )
