"""Virtual SIM faults on demand: hostile card behaviours switched on by a small spec.

A ``FaultPlan`` is a list of rules. Each rule picks commands (by INS, optionally the logical
channel, P1, P2 and which occurrence) and says what the card does instead of answering
normally. The plan is data: parsing and matching here are pure; ``FaultInjector`` counts the
occurrences for one card; the card model (``est_agent.sim.card``) applies an answer-level
fault and every link (in process, vpcd, emulated modem) applies the link-level ones (silence,
disconnect, delay) in its own terms.

Spec syntax: one rule is a few ``key=value`` words or flags, separated by commas or spaces::

    ins=B9 sw=6A84                      GENERATE KEY PAIR answers 6A84, not executed
    ins=2B nth=2 bad_signature          the 2nd COMPUTE SIGNATURE UPDATE signs another digest
    ins=CB from=3 count=2 delay_ms=1500 the 3rd and 4th GET DATA are answered 1.5 s late
    ins=B0 truncate=1                   READ FILE answers its first byte only (no status word)
    ins=A4 p1=04 silence                SELECT by name is never answered
    channel=1 disconnect                the first command on logical channel 1 drops the link

Selectors (all optional; without any, a rule matches every command):
  ``ins=HEX``      instruction byte
  ``channel=N``    logical channel coded in CLA (ETSI TS 102 221 §10.1.1), 0..19
  ``p1=HEX``, ``p2=HEX``
  ``nth=N``        only the Nth command the selectors match (1 = the first)
  ``from=N``       the Nth and every later one
  ``count=N``      at most N times (with ``from=``: N times from the Nth on)
Actions (one; ``delay_ms`` may also come alone or with another):
  ``sw=XXXX``          answer this status word instead; the command is not executed
  ``truncate=N``       execute, then answer only the first N bytes of the response APDU
                       (status word included: N < 2 leaves none; through vpcd N = 0 is
                       silence, since vpcd waits for at least one byte)
  ``silence``          never answer (not executed); the link is out of step from then on
  ``disconnect``       drop the link instead of answering (not executed): in process
                       ``NoCardError``, through vpcd the socket closes (the card comes back a
                       second later), behind the modem ``+CME ERROR: 10`` (SIM not inserted)
  ``delay_ms=N``       answer N ms late
  ``wrong_public_key`` GENERATE KEY PAIR (B9) and READ PUBLIC KEY (CD) return another valid
                       P-256 point than the key the card holds (the card still generates and
                       keeps its own key); other commands run normally
  ``bad_signature``    COMPUTE SIGNATURE UPDATE (2B) returns a well-formed signature that does
                       not verify: the card signs the host's digest with one bit flipped

Every command counts as an occurrence for every rule whose selectors it matches; of the rules
that fire on a command, the first one listed wins. Counts live as long as the card object
(one ``sim serve`` process, one in-process link).

Files (``sim serve --faults-file FILE``, reader ``sim:STATE?faults=FILE``): one rule per line,
``#`` starts a comment; or JSON: a list of objects with the same keys, flags as ``true``
(``[{"ins": "B9", "sw": "6A84"}, {"ins": "2B", "bad_signature": true}]``), hex values as
strings.

No fault ever puts key material in an answer: ``wrong_public_key`` uses the point of a
throw-away key whose scalar is discarded, ``bad_signature`` changes what is signed, not how.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from est_agent.card.iotsafe_codes import (
    TAG_EC_POINT,
    TAG_ECC_KEY,
    TAG_HASH_VALUE,
    TAG_PUBLIC_KEY,
)
from est_agent.card.tlv import Tlv, decode_tlvs, encode_tlv
from est_agent.errors import CardProtocolError, InputError
from est_agent.transport.cla import MAX_CHANNEL, channel_of_cla

__all__ = [
    "AnsweringCard",
    "CardAnswer",
    "Fault",
    "FaultInjector",
    "FaultKind",
    "FaultPlan",
    "FaultRule",
    "LinkFault",
    "LinkFaultError",
    "answer_of",
    "flip_digest_bit",
    "parse_rule",
    "replace_public_point",
]

_MAX_DELAY_MS = 600_000
_MAX_RESPONSE = 0xFFFF + 2


class FaultKind(enum.Enum):
    """What a rule does to the commands it picks (module docstring)."""

    SW = "sw"
    TRUNCATE = "truncate"
    SILENCE = "silence"
    DISCONNECT = "disconnect"
    WRONG_PUBLIC_KEY = "wrong_public_key"
    BAD_SIGNATURE = "bad_signature"


_FLAGS = {
    kind.value: kind
    for kind in (
        FaultKind.SILENCE,
        FaultKind.DISCONNECT,
        FaultKind.WRONG_PUBLIC_KEY,
        FaultKind.BAD_SIGNATURE,
    )
}
_HEX_BYTE_KEYS = ("ins", "p1", "p2")
_DECIMAL_KEYS = ("channel", "nth", "from", "count", "truncate", "delay_ms")


class LinkFault(enum.Enum):
    """Faults only a link can act out: the card model cannot stay silent or unplug itself."""

    SILENCE = "silence"
    DISCONNECT = "disconnect"


@dataclass(frozen=True)
class FaultRule:
    """One rule: selectors (None = any), the occurrence window, the action and a delay."""

    ins: int | None = None
    channel: int | None = None
    p1: int | None = None
    p2: int | None = None
    #: first occurrence (1-based) the rule fires on, and how many times (None: no limit)
    first: int = 1
    count: int | None = None
    action: FaultKind | None = None
    #: the status word for SW, the byte count for TRUNCATE
    value: int = 0
    delay_ms: int = 0

    def __post_init__(self) -> None:
        for name in _HEX_BYTE_KEYS:
            byte = getattr(self, name)
            if byte is not None and not 0 <= byte <= 0xFF:
                raise InputError(f"fault {name} must be one byte (00..FF), got {byte}")
        if self.channel is not None and not 0 <= self.channel <= MAX_CHANNEL:
            raise InputError(f"fault channel must be 0..{MAX_CHANNEL}, got {self.channel}")
        if self.first < 1 or (self.count is not None and self.count < 1):
            raise InputError("fault nth/from/count count from 1")
        if self.action is None and not self.delay_ms:
            raise InputError("a fault needs an action (sw=, truncate=, silence, ...) or delay_ms=")
        if self.action is FaultKind.SW and not 0 <= self.value <= 0xFFFF:
            raise InputError(f"fault sw must be 4 hex digits, got {self.value:X}")
        if self.action is FaultKind.TRUNCATE and not 0 <= self.value < _MAX_RESPONSE:
            raise InputError(f"fault truncate must be 0..{_MAX_RESPONSE - 1}, got {self.value}")
        if not 0 <= self.delay_ms <= _MAX_DELAY_MS:
            raise InputError(f"fault delay_ms must be 0..{_MAX_DELAY_MS}, got {self.delay_ms}")

    def matches(self, apdu: bytes) -> bool:
        """Do the selectors pick this command (its header; a short APDU matches no selector)?"""
        header = apdu[:4]
        for index, wanted in enumerate((None, self.ins, self.p1, self.p2)):
            if wanted is None:
                continue
            if len(header) <= index or header[index] != wanted:
                return False
        if self.channel is not None:
            return bool(header) and channel_of_cla(header[0]) == self.channel
        return True

    def fires_on(self, occurrence: int) -> bool:
        """Does the rule act on the ``occurrence``-th (1-based) command it matched?"""
        if occurrence < self.first:
            return False
        return self.count is None or occurrence < self.first + self.count

    def describe(self) -> str:
        """The rule in spec syntax (for logs and error messages)."""
        words = [
            f"{name}={value:02X}"
            for name, value in (("ins", self.ins), ("p1", self.p1), ("p2", self.p2))
            if value is not None
        ]
        if self.channel is not None:
            words.append(f"channel={self.channel}")
        if self.count == 1 and self.first > 1:
            words.append(f"nth={self.first}")
        else:
            if self.first > 1:
                words.append(f"from={self.first}")
            if self.count is not None:
                words.append(f"count={self.count}")
        if self.action is FaultKind.SW:
            words.append(f"sw={self.value:04X}")
        elif self.action is FaultKind.TRUNCATE:
            words.append(f"truncate={self.value}")
        elif self.action is not None:
            words.append(self.action.value)
        if self.delay_ms:
            words.append(f"delay_ms={self.delay_ms}")
        return " ".join(words)


_WORD_SPLIT = re.compile(r"[\s,]+")


def _parse_int(key: str, text: str, *, hex_digits: int | None) -> int:
    if hex_digits is not None:
        if not re.fullmatch(rf"[0-9A-Fa-f]{{1,{hex_digits}}}", text):
            raise InputError(f"fault {key} must be hex ({hex_digits} digits at most), got {text!r}")
        return int(text, 16)
    if not text.isdigit():
        raise InputError(f"fault {key} must be a decimal number, got {text!r}")
    return int(text)


def parse_rule(text: str) -> FaultRule:
    """One rule from its spec words (module docstring); InputError names what is wrong."""
    words = [word for word in _WORD_SPLIT.split(text.strip()) if word]
    if not words:
        raise InputError("empty fault rule")
    values: dict[str, int] = {}
    action: FaultKind | None = None
    for word in words:
        key, sep, value = word.partition("=")
        key = key.lower()
        if not sep:
            if key not in _FLAGS:
                raise InputError(f"unknown fault word {word!r} in {text!r}")
            kind = _FLAGS[key]
        elif key == "sw":
            kind = FaultKind.SW
            values["value"] = _parse_int(key, value, hex_digits=4)
            if len(value) != 4:
                raise InputError(f"fault sw must be 4 hex digits, got {value!r}")
        elif key == "truncate":
            kind = FaultKind.TRUNCATE
            values["value"] = _parse_int(key, value, hex_digits=None)
        elif key in _HEX_BYTE_KEYS or key in _DECIMAL_KEYS:
            if key in values:
                raise InputError(f"fault {key} given twice in {text!r}")
            hex_digits = 2 if key in _HEX_BYTE_KEYS else None
            values[key] = _parse_int(key, value, hex_digits=hex_digits)
            continue
        else:
            raise InputError(f"unknown fault key {key!r} in {text!r}")
        if action is not None:
            raise InputError(f"one action per fault rule, got {action.value} and {kind.value}")
        action = kind
    return _rule_from(values, action, text)


def _rule_from(values: dict[str, int], action: FaultKind | None, text: str) -> FaultRule:
    if "nth" in values and ("from" in values or "count" in values):
        raise InputError(f"fault nth= excludes from= and count= ({text!r})")
    first = values.get("nth", values.get("from", 1))
    count = 1 if "nth" in values else values.get("count")
    return FaultRule(
        ins=values.get("ins"),
        channel=values.get("channel"),
        p1=values.get("p1"),
        p2=values.get("p2"),
        first=first,
        count=count,
        action=action,
        value=values.get("value", 0),
        delay_ms=values.get("delay_ms", 0),
    )


def _json_rule(item: object, where: str) -> str:
    """A JSON object rule as spec words (so both forms share one parser)."""
    if not isinstance(item, dict):
        raise InputError(f"{where}: each fault must be a JSON object, got {type(item).__name__}")
    words = []
    for key, value in item.items():
        if value is True:
            words.append(str(key))
        elif isinstance(value, str):
            words.append(f"{key}={value}")
        elif isinstance(value, int) and not isinstance(value, bool):
            if key in _HEX_BYTE_KEYS or key == "sw":
                raise InputError(f'{where}: give {key} as a hex string, e.g. "{key}": "B9"')
            words.append(f"{key}={value}")
        else:
            raise InputError(f"{where}: bad value for {key!r}: {value!r}")
    return " ".join(words)


@dataclass(frozen=True)
class FaultPlan:
    """The rules one card follows, in order (the first rule that fires on a command wins)."""

    rules: tuple[FaultRule, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.rules)

    def __add__(self, other: FaultPlan) -> FaultPlan:
        return FaultPlan(self.rules + other.rules)

    @classmethod
    def parse(cls, specs: Iterable[str]) -> FaultPlan:
        """One rule per spec string (``sim serve --fault``)."""
        return cls(tuple(parse_rule(spec) for spec in specs))

    @classmethod
    def parse_text(cls, text: str, *, source: str = "faults") -> FaultPlan:
        """A rules file: JSON (starts with ``[`` or ``{``) or one rule per line, ``#`` comments."""
        stripped = text.lstrip()
        if stripped.startswith(("[", "{")):
            return cls._parse_json(stripped, source)
        rules = []
        for number, line in enumerate(text.splitlines(), 1):
            spec = line.partition("#")[0].strip()
            if not spec:
                continue
            try:
                rules.append(parse_rule(spec))
            except InputError as exc:
                raise InputError(f"{source} line {number}: {exc}") from None
        return cls(tuple(rules))

    @classmethod
    def _parse_json(cls, text: str, source: str) -> FaultPlan:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise InputError(f"{source}: not valid JSON ({exc})") from None
        if isinstance(data, dict):
            data = data.get("faults")
        if not isinstance(data, list):
            raise InputError(f'{source}: expected a JSON list of faults (or {{"faults": [...]}})')
        rules = []
        for index, item in enumerate(data):
            where = f"{source} fault #{index + 1}"
            try:
                rules.append(parse_rule(_json_rule(item, where)))
            except InputError as exc:
                message = str(exc)
                raise InputError(
                    message if message.startswith(where) else f"{where}: {message}"
                ) from None
        return cls(tuple(rules))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FaultPlan:
        """Read a rules file; InputError when it is missing, unreadable or malformed."""
        file = Path(os.fspath(path))
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise InputError(f"cannot read faults file {file}: {reason}") from None
        return cls.parse_text(text, source=f"faults file {file}")

    def describe(self) -> str:
        return "; ".join(rule.describe() for rule in self.rules) or "none"


@dataclass(frozen=True)
class Fault:
    """What happens to one command: ``action`` (None: answered normally) after ``delay_s``."""

    rule: FaultRule

    @property
    def action(self) -> FaultKind | None:
        return self.rule.action

    @property
    def value(self) -> int:
        return self.rule.value

    @property
    def delay_s(self) -> float:
        return self.rule.delay_ms / 1000.0

    @property
    def link(self) -> LinkFault | None:
        if self.rule.action is FaultKind.SILENCE:
            return LinkFault.SILENCE
        if self.rule.action is FaultKind.DISCONNECT:
            return LinkFault.DISCONNECT
        return None


class FaultInjector:
    """A plan plus the occurrence counts of one card: ``next(apdu)`` says what to do with it."""

    def __init__(self, plan: FaultPlan) -> None:
        self.plan = plan
        self._seen = [0] * len(plan.rules)
        #: faults that fired, in order (tests and logs)
        self.fired: list[FaultRule] = []

    def next(self, apdu: bytes) -> Fault | None:
        chosen: FaultRule | None = None
        for index, rule in enumerate(self.plan.rules):
            if not rule.matches(apdu):
                continue
            self._seen[index] += 1
            if chosen is None and rule.fires_on(self._seen[index]):
                chosen = rule
        if chosen is None:
            return None
        self.fired.append(chosen)
        return Fault(chosen)


# -- answer rewriting (pure, over bytes) ---------------------------------------------------


def flip_digest_bit(data: bytes) -> bytes:
    """COMPUTE SIGNATURE UPDATE data with the last bit of the hash (tag 9E) flipped.

    The card then signs a digest the host did not send: a genuine, well-formed ECDSA
    signature that does not verify over the host's digest. Data without a hash TLV (or not
    TLV at all) is returned as it is: the card refuses it anyway.
    """
    try:
        items = decode_tlvs(data)
    except CardProtocolError:
        return data
    out = b""
    changed = False
    for item in items:
        value = item.value
        if item.tag == TAG_HASH_VALUE and value and not changed:
            value = value[:-1] + bytes((value[-1] ^ 0x01,))
            changed = True
        out += encode_tlv(item.tag, value)
    return out if changed else data


def _replace_in(items: list[Tlv], path: tuple[int, ...], point: bytes) -> tuple[bytes, bool]:
    out = b""
    done = False
    for item in items:
        value = item.value
        if item.tag == path[0] and not done:
            if len(path) == 1:
                value, done = point, True
            else:
                with contextlib.suppress(CardProtocolError):
                    value, done = _replace_in(decode_tlvs(value), path[1:], point)
        out += encode_tlv(item.tag, value)
    return out, done


def replace_public_point(data: bytes, point: bytes) -> bytes:
    """A GENERATE KEY PAIR / READ PUBLIC KEY answer with its EC point (34 > 49 > 86) replaced.

    Anything else (no public key TLV, malformed data) is returned unchanged.
    """
    try:
        items = decode_tlvs(data)
    except CardProtocolError:
        return data
    out, done = _replace_in(items, (TAG_PUBLIC_KEY, TAG_ECC_KEY, TAG_EC_POINT), point)
    return out if done else data


# -- what links see -----------------------------------------------------------------------


@dataclass(frozen=True)
class CardAnswer:
    """A card's reaction to one command as a link must act it out.

    ``response`` (data + SW, possibly truncated) is sent after ``delay_s``, unless ``link``
    says the card stays silent or the link drops.
    """

    response: bytes = b""
    delay_s: float = 0.0
    link: LinkFault | None = None

    def act_out(self, apdu: bytes) -> bytes:
        """As a link without timing of its own delivers it (in process): sleep ``delay_s``,
        raise ``LinkFaultError`` for a silence or drop, else the response APDU."""
        if self.delay_s:
            import time

            time.sleep(self.delay_s)
        if self.link is not None:
            raise LinkFaultError(self.link, apdu[1] if len(apdu) > 1 else None)
        return self.response


class LinkFaultError(Exception):
    """Raised by ``VirtualCard.process`` for a fault only a link can act out (no answer at
    all, or a dropped link): links with timing use ``VirtualCard.answer`` instead."""

    def __init__(self, fault: LinkFault, ins: int | None) -> None:
        self.fault = fault
        self.ins = ins
        where = f" on INS {ins:02X}" if ins is not None else ""
        super().__init__(f"virtual card fault: {fault.value}{where}")


@runtime_checkable
class AnsweringCard(Protocol):
    """A card that can say how a link should act out its answer (``VirtualCard`` does)."""

    def answer(self, apdu: bytes) -> CardAnswer: ...


class _ProcessingCard(Protocol):
    def process(self, apdu: bytes) -> bytes: ...


def answer_of(card: _ProcessingCard, apdu: bytes) -> CardAnswer:
    """``card.answer(apdu)`` where the card knows faults, else its plain ``process`` answer."""
    if isinstance(card, AnsweringCard):
        return card.answer(apdu)
    return CardAnswer(card.process(apdu))
