"""Virtual SIM faults on demand (est_agent.sim.faults): the spec, occurrence matching, and each
action in process, through the card client and the ``sim:`` link with its deadlines."""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature

from est_agent.backends.signer import public_key_from_point
from est_agent.card.channel import CardSession
from est_agent.card.iotsafe import IotSafeApplet
from est_agent.card.uri import IotSafeRef, ObjectKind
from est_agent.errors import (
    CardProtocolError,
    InputError,
    NoCardError,
    NotFoundError,
    StatusWordError,
    TransportError,
)
from est_agent.sim.card import VirtualCard
from est_agent.sim.faults import (
    FaultInjector,
    FaultKind,
    FaultPlan,
    FaultRule,
    LinkFault,
    LinkFaultError,
    answer_of,
    flip_digest_bit,
    parse_rule,
    replace_public_point,
)
from est_agent.sim.options import CardOptions
from est_agent.sim.personalize import personalize
from est_agent.sim.state import load_state
from est_agent.sim.transport import SimTransport
from est_agent.transport import open_transport

OP_A = IotSafeRef(ObjectKind.PRIVATE_KEY, label="op-a")
OP_A_PUBLIC = IotSafeRef(ObjectKind.PUBLIC_KEY, label="op-a")
BOOTSTRAP = IotSafeRef(ObjectKind.PRIVATE_KEY, object_id=b"\x01")
DIGEST = hashlib.sha256(b"certification request info").digest()
MANAGE_CHANNEL_OPEN = bytes.fromhex("0070000001")
GET_DATA = bytes.fromhex("81CB000044")


@pytest.fixture(scope="module")
def state_template(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("sim") / "sim.json"
    personalize(path, iccid="8988247000001234567")
    return path.read_bytes()


@pytest.fixture
def state(tmp_path: Path, state_template: bytes) -> Path:
    path = tmp_path / "sim.json"
    path.write_bytes(state_template)
    return path


DEFAULT_OPTIONS = CardOptions()


def applet_with(
    state: Path, *specs: str, options: CardOptions = DEFAULT_OPTIONS, timeout_s: float = 10.0
) -> tuple[IotSafeApplet, SimTransport]:
    transport = SimTransport(state, options, faults=FaultPlan.parse(specs), timeout_s=timeout_s)
    return IotSafeApplet.open(CardSession(transport)), transport


def private_scalars(state: Path) -> list[bytes]:
    return [k.scalar for k in load_state(state).applet.private_keys if k.scalar]


# -- the spec -------------------------------------------------------------------------------


def test_rule_words() -> None:
    rule = parse_rule("ins=B9, sw=6A84")
    assert rule == FaultRule(ins=0xB9, action=FaultKind.SW, value=0x6A84)
    assert parse_rule("ins=2b nth=2 bad_signature") == FaultRule(
        ins=0x2B, first=2, count=1, action=FaultKind.BAD_SIGNATURE
    )
    assert parse_rule("ins=CB from=3 count=2 delay_ms=1500") == FaultRule(
        ins=0xCB, first=3, count=2, delay_ms=1500
    )
    assert parse_rule("channel=1 p1=04 p2=00 disconnect") == FaultRule(
        channel=1, p1=0x04, p2=0x00, action=FaultKind.DISCONNECT
    )
    assert parse_rule("silence").action is FaultKind.SILENCE
    assert parse_rule("ins=B0 truncate=1").value == 1
    assert parse_rule("ins=CD wrong_public_key delay_ms=5").delay_ms == 5
    assert parse_rule("ins=B9 nth=2 sw=6985").describe() == "ins=B9 nth=2 sw=6985"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty fault rule"),
        ("ins=B9", "needs an action"),
        ("ins=B9 sw=6A84 silence", "one action per fault rule"),
        ("ins=B9 sw=6A8", "4 hex digits"),
        ("ins=XYZ silence", "must be hex"),
        ("ins=1FF silence", "must be hex"),
        ("nth=2 from=3 silence", "nth= excludes"),
        ("nth=0 silence", "count from 1"),
        ("channel=20 silence", "channel must be 0..19"),
        ("ins=B9 louder", "unknown fault word 'louder'"),
        ("volume=3 silence", "unknown fault key 'volume'"),
        ("ins=B9 ins=B0 silence", "given twice"),
        ("delay_ms=-5", "decimal number"),
    ],
)
def test_bad_rules_are_input_errors(spec: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_rule(spec)


def test_rules_file_lines_and_json(tmp_path: Path) -> None:
    lines = tmp_path / "faults.txt"
    lines.write_text("# a card that refuses keygen\n\nins=B9 sw=6A84  # once is enough\nsilence\n")
    plan = FaultPlan.load(lines)
    assert [r.action for r in plan.rules] == [FaultKind.SW, FaultKind.SILENCE]
    as_json = tmp_path / "faults.json"
    as_json.write_text(
        json.dumps([{"ins": "B9", "sw": "6A84"}, {"ins": "2B", "nth": 2, "bad_signature": True}])
    )
    loaded = FaultPlan.load(as_json)
    assert loaded.rules[0] == plan.rules[0]
    assert loaded.rules[1] == FaultRule(ins=0x2B, first=2, count=1, action=FaultKind.BAD_SIGNATURE)
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text('{"faults": [{"silence": true}]}')
    assert FaultPlan.load(wrapped).rules[0].action is FaultKind.SILENCE


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ins=B9 sw=6A84\nins=B9 frobnicate\n", "line 2: unknown fault word"),
        ('[{"ins": 185, "sw": "6A84"}]', "give ins as a hex string"),
        ('[{"ins": "B9"}]', "fault #1: a fault needs an action"),
        ("[1, 2]", "must be a JSON object"),
        ('{"rules": []}', "expected a JSON list"),
        ("[{", "not valid JSON"),
    ],
)
def test_bad_rules_files_name_the_place(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "faults"
    path.write_text(text)
    with pytest.raises(InputError, match=message) as caught:
        FaultPlan.load(path)
    assert str(path) in str(caught.value)


def test_missing_rules_file() -> None:
    with pytest.raises(InputError, match="cannot read faults file /nonexistent/f"):
        FaultPlan.load("/nonexistent/f")


# -- matching -------------------------------------------------------------------------------


def test_occurrences_nth_from_count() -> None:
    plan = FaultPlan.parse(["ins=CB nth=2 sw=6A88", "ins=CB from=4 count=2 sw=6985"])
    injector = FaultInjector(plan)
    fired = [injector.next(GET_DATA) for _ in range(7)]
    values = [None if f is None else f.value for f in fired]
    assert values == [None, 0x6A88, None, 0x6985, 0x6985, None, None]
    # other commands do not count as occurrences of an INS rule
    assert injector.next(MANAGE_CHANNEL_OPEN) is None


def test_first_firing_rule_wins_and_every_rule_counts() -> None:
    injector = FaultInjector(FaultPlan.parse(["ins=CB nth=1 sw=6A88", "nth=2 sw=6F00"]))
    first = injector.next(GET_DATA)  # both match; the first listed fires
    second = injector.next(MANAGE_CHANNEL_OPEN)  # the catch-all rule's 2nd occurrence
    assert first is not None and first.value == 0x6A88
    assert second is not None and second.value == 0x6F00
    assert injector.next(GET_DATA) is None


def test_selectors_channel_p1_p2() -> None:
    rule = parse_rule("ins=A4 channel=1 p1=04 silence")
    assert rule.matches(bytes.fromhex("01A4040007A0000005590010"))
    assert not rule.matches(bytes.fromhex("00A4040007A0000005590010"))  # channel 0
    assert not rule.matches(bytes.fromhex("01A4000C023F00"))  # P1 00
    assert not rule.matches(b"\x01")  # too short to carry the INS


def test_pure_rewrites() -> None:
    command = bytes.fromhex("9E20") + DIGEST
    flipped = flip_digest_bit(command)
    assert flipped[:2] == b"\x9e\x20" and flipped[2:-1] == DIGEST[:-1]
    assert flipped[-1] == DIGEST[-1] ^ 1
    assert flip_digest_bit(b"\x01") == b"\x01"  # not TLV: unchanged
    point = b"\x04" + bytes(64)
    other = b"\x04" + bytes([1]) * 64
    answer = bytes.fromhex("840102850102") + bytes.fromhex("3445494386") + bytes([65]) + point
    assert replace_public_point(answer, other) == answer[: -len(point)] + other
    assert replace_public_point(b"\x90\x00", other) == b"\x90\x00"


# -- each action, in process --------------------------------------------------------------


def test_sw_answers_instead_and_does_not_execute(state: Path) -> None:
    before = load_state(state).applet.public_keys
    applet, _ = applet_with(state, "ins=B9 sw=6A84")
    with pytest.raises(StatusWordError) as caught:
        applet.generate_key_pair(OP_A)
    assert caught.value.sw == 0x6A84
    assert load_state(state).applet.public_keys == before  # no key was generated


def test_sw_matching_by_occurrence(state: Path) -> None:
    applet, _ = applet_with(state, "ins=B9 nth=2 sw=6985")
    applet.generate_key_pair(OP_A)  # the first one works
    with pytest.raises(StatusWordError) as caught:
        applet.generate_key_pair(OP_A)
    assert caught.value.sw == 0x6985
    applet.generate_key_pair(OP_A)  # and the third again


def test_sw_on_select_hides_the_applet(state: Path) -> None:
    transport = SimTransport(state, faults=FaultPlan.parse(["ins=A4 p1=04 sw=6A82"]))
    with pytest.raises(NotFoundError, match="no IoT SAFE applet"):
        IotSafeApplet.open(CardSession(transport))


@pytest.mark.parametrize("keep", [0, 1])
def test_truncation_without_status_word_is_a_protocol_error(state: Path, keep: int) -> None:
    applet, _ = applet_with(state, f"ins=CB truncate={keep}")
    with pytest.raises(CardProtocolError, match="too short"):
        applet.info()


def test_truncation_keeping_bytes_is_garbage_not_a_crash(state: Path) -> None:
    responses = []
    for plan in (FaultPlan(), FaultPlan.parse(["ins=CB truncate=10"])):
        card = VirtualCard.load(state, faults=plan)
        card.process(MANAGE_CHANNEL_OPEN)
        card.process(bytes.fromhex("01A4040007A0000005590010"))
        responses.append(card.process(bytes.fromhex("81CB000044")))
    full, cut = responses
    assert len(full) == 70 and cut == full[:10]
    applet, _ = applet_with(state, "ins=CB truncate=10")
    # the last two kept bytes are taken as the SW: some typed error, never an IndexError
    with pytest.raises((StatusWordError, CardProtocolError)):
        applet.info()


def test_silence_costs_the_deadline_then_transport_error(state: Path) -> None:
    applet, transport = applet_with(state, "ins=CB silence", timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(TransportError, match=r"no answer to INS CB within 0\.5 s") as caught:
        applet.info()
    elapsed = time.monotonic() - started
    assert 0.5 <= elapsed < 1.5
    assert caught.value.exit_code == 69
    assert transport.dead is not None
    started = time.monotonic()
    with pytest.raises(TransportError, match="earlier failure"):
        transport.transmit(MANAGE_CHANNEL_OPEN)
    assert time.monotonic() - started < 0.1


def test_silence_on_key_generation_waits_the_key_generation_deadline(state: Path) -> None:
    transport = SimTransport(
        state, faults=FaultPlan.parse(["ins=B9 silence"]), timeout_s=0.2, slow_timeout_s=0.6
    )
    applet = IotSafeApplet.open(CardSession(transport))
    started = time.monotonic()
    with pytest.raises(TransportError, match=r"INS B9 within 0\.6 s"):
        applet.generate_key_pair(OP_A)
    assert 0.6 <= time.monotonic() - started < 1.6


def test_delay_within_and_beyond_the_deadline(state: Path) -> None:
    applet, _ = applet_with(state, "ins=CB delay_ms=300", timeout_s=2.0)
    started = time.monotonic()
    assert applet.info().version == 1
    assert 0.3 <= time.monotonic() - started < 1.3
    late, _ = applet_with(state, "ins=CB delay_ms=3000", timeout_s=0.4)
    started = time.monotonic()
    with pytest.raises(TransportError, match=r"within 0\.4 s"):
        late.info()
    assert time.monotonic() - started < 1.4


def test_disconnect_is_a_removed_card_until_reconnected(state: Path) -> None:
    applet, transport = applet_with(state, "ins=CB nth=1 disconnect")
    with pytest.raises(NoCardError, match="card removed during INS CB"):
        applet.info()
    with pytest.raises(NoCardError, match="card removed"):
        transport.transmit(MANAGE_CHANNEL_OPEN)
    transport.close()
    again = IotSafeApplet.open(CardSession(transport))  # reinserted: powers on afresh
    assert again.info().version == 1


def test_link_faults_raise_from_process_for_links_without_timing(state: Path) -> None:
    card = VirtualCard.load(state, faults=FaultPlan.parse(["ins=70 silence"]))
    with pytest.raises(LinkFaultError) as caught:
        card.process(MANAGE_CHANNEL_OPEN)
    assert caught.value.fault is LinkFault.SILENCE and caught.value.ins == 0x70
    answer = answer_of(card, MANAGE_CHANNEL_OPEN)
    assert answer.link is LinkFault.SILENCE and answer.response == b""


@pytest.mark.parametrize("options", [CardOptions(), CardOptions(t0_mode=True)])
def test_wrong_public_key_from_generate_and_read(state: Path, options: CardOptions) -> None:
    applet, _ = applet_with(state, "wrong_public_key", options=options)
    generated = applet.generate_key_pair(OP_A)
    held = next(k.point for k in load_state(state).applet.public_keys if k.label == "op-a")
    assert generated.public_point != held
    public_key_from_point(generated.public_point)  # still a valid P-256 point
    read_back = applet.read_public_key(OP_A_PUBLIC)
    assert read_back == generated.public_point  # the card tells one consistent lie
    # the card signs with the key it really holds
    signature = applet.sign_digest(OP_A, DIGEST)
    prehashed = ec.ECDSA(Prehashed(hashes.SHA256()))
    public_key_from_point(held).verify(signature, DIGEST, prehashed)
    with pytest.raises(InvalidSignature):
        public_key_from_point(generated.public_point).verify(signature, DIGEST, prehashed)


@pytest.mark.parametrize("fmt", ["wide", "short", "der"])
def test_bad_signature_is_well_formed_and_does_not_verify(state: Path, fmt: str) -> None:
    applet, _ = applet_with(
        state, "ins=2B nth=1 bad_signature", options=CardOptions(signature_format=fmt)
    )
    generated = applet.generate_key_pair(OP_A)
    public = public_key_from_point(generated.public_point)
    bad = applet.sign_digest(OP_A, DIGEST)
    r, s = decode_dss_signature(bad)  # a proper DER ECDSA-Sig-Value
    assert 0 < r < 2**256 and 0 < s < 2**256
    prehashed = ec.ECDSA(Prehashed(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        public.verify(bad, DIGEST, prehashed)
    # it is a signature over the digest with one bit flipped: made by the right key
    flipped = DIGEST[:-1] + bytes([DIGEST[-1] ^ 1])
    public.verify(bad, flipped, prehashed)
    public.verify(applet.sign_digest(OP_A, DIGEST), DIGEST, prehashed)  # nth=1: once only


def test_no_fault_puts_a_private_key_in_an_answer(state: Path) -> None:
    specs = [
        "ins=B9 nth=1 sw=6A84",
        "ins=CB nth=1 truncate=1",
        "ins=CD nth=1 wrong_public_key",
        "ins=B9 nth=3 wrong_public_key",
        "ins=2B nth=1 bad_signature",
        "ins=B0 nth=1 delay_ms=1",
    ]
    seen: list[bytes] = []

    class Tap(SimTransport):
        def _transmit_within(self, apdu: bytes, timeout_s: float) -> bytes:
            response = super()._transmit_within(apdu, timeout_s)
            seen.append(response)
            return response

    transport = Tap(state, faults=FaultPlan.parse(specs))
    applet = IotSafeApplet.open(CardSession(transport))
    for _ in range(3):
        with contextlib.suppress(StatusWordError):  # the first one is refused
            applet.generate_key_pair(OP_A)
    with pytest.raises(CardProtocolError):
        applet.info()
    applet.info()
    applet.read_public_key(OP_A_PUBLIC)
    applet.sign_digest(OP_A, DIGEST)
    applet.sign_digest(BOOTSTRAP, DIGEST)
    applet.read_file(IotSafeRef(ObjectKind.FILE, object_id=b"\x01"))
    assert transport.card is not None and transport.card.faults is not None
    assert len(transport.card.faults.fired) == 6
    secrets = private_scalars(state)
    assert len(secrets) == 2  # bootstrap and op-a
    for response in seen:
        for scalar in secrets:
            assert scalar not in response


def test_sim_reader_string_loads_faults_next_to_the_state(state: Path) -> None:
    (state.parent / "faults.txt").write_text("ins=CB sw=6A88\n")
    transport = open_transport(f"sim:{state}?faults=faults.txt&timeout=0.5")
    assert isinstance(transport, SimTransport) and transport.timeout_s == 0.5
    applet = IotSafeApplet.open(CardSession(transport))
    with pytest.raises(NotFoundError) as caught:
        applet.info()
    assert caught.value.sw == 0x6A88


def test_sim_reader_string_with_a_missing_faults_file(state: Path) -> None:
    transport = open_transport(f"sim:{state}?faults=absent.txt")  # building reads no file
    with pytest.raises(InputError, match="cannot read faults file"):
        transport.connect()


# -- sim serve options ----------------------------------------------------------------------


def test_sim_serve_fault_options(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from est_agent.cli.main import main
    from est_agent.cli.sim import fault_plan

    assert main(["sim", "serve", str(state), "--fault", "ins=B9 louder"]) == 64
    assert "--fault: unknown fault word 'louder'" in capsys.readouterr().err
    assert main(["sim", "serve", str(state), "--faults-file", str(state.parent / "none")]) == 65
    assert "cannot read faults file" in capsys.readouterr().err
    rules = state.parent / "faults.txt"
    rules.write_text("ins=CB silence\n")
    plan = fault_plan(["ins=B9,sw=6A84"], str(rules))
    assert plan is not None
    assert [r.action for r in plan.rules] == [FaultKind.SW, FaultKind.SILENCE]  # --fault first
    assert fault_plan([], None) is None


def test_sim_serve_help_documents_the_spec(capsys: pytest.CaptureFixture[str]) -> None:
    from est_agent.cli.main import main

    assert main(["sim", "serve", "--help"]) == 0
    text = capsys.readouterr().out
    for word in ("--fault SPEC", "--faults-file", "nth=N", "from=N", "count=N", "sw=XXXX"):
        assert word in text
    for action in ("truncate=N", "silence", "disconnect", "delay_ms=N"):
        assert action in text
    assert "wrong_public_key" in text and "bad_signature" in text
    assert "sim:STATE?faults=FILE" in text
