"""A device across a whole CA root key rollover (RFC 7030 §4.1.3), end to end: the real agent
over real TLS against the test server's rollover switch, one injected clock for both.

The EST CA of this PKI lives two days (real time) and is also the TLS trust anchor (the server
in rollover mode presents a TLS certificate from the EST CA, as after a bootstrap by
fingerprint). Phases by the shared clock: before the announcement (only OldWithOld), overlap
(the four certificates; issued and TLS chains still under the old root), after the switch
(issued by and TLS chained to the new root), and after the old root expired.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from est_agent.config import load_config
from est_agent.errors import EstAgentError, EstResponseError, StoreError
from est_agent.testserver import DevPki, EstTestServer
from est_agent.testserver.issuer import make_ca
from est_agent.testserver.pki import load_dev_pki
from est_agent.workflow import anchors as anchors_module
from est_agent.workflow.agent import Agent
from est_agent.workflow.anchors import AnchorStore, Source, StoreState
from tests.conftest import Run

from .conftest import Device

pytestmark = pytest.mark.integration

REAL_NOW = datetime.now(UTC).replace(microsecond=0)
ANNOUNCE = REAL_NOW + timedelta(hours=1)
SWITCH = REAL_NOW + timedelta(hours=3)
OLD_END = REAL_NOW + timedelta(days=2)  # after the old EST root's not-after


class Clock:
    def __init__(self) -> None:
        self.now = REAL_NOW

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture(scope="module")
def short_pki(dev_pki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    """The session's dev PKI (same bootstrap CA as the SIMs) with an EST CA of two days."""
    directory = tmp_path_factory.mktemp("rollover-pki") / "pki"
    shutil.copytree(dev_pki.directory, directory)
    ca = make_ca("est-agent short EST CA", REAL_NOW - timedelta(hours=1), timedelta(days=2))
    (directory / "ca.pem").write_bytes(ca.certificate.public_bytes(serialization.Encoding.PEM))
    (directory / "ca.key").write_bytes(
        ca.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return load_dev_pki(directory)


@pytest.fixture(params=["anchor", "anchor+pin"])
def rig(
    request: pytest.FixtureRequest,
    start_server: Callable[..., EstTestServer],
    short_pki: DevPki,
    device: Device,
) -> Iterator[tuple[EstTestServer, Clock, Callable[[], Agent]]]:
    """The server in rollover mode and a device trusting the old EST root; "anchor+pin" also
    pins that root's fingerprint (est.cacerts_fingerprint): a verified rollover carries on."""
    clock = Clock()
    server = start_server(pki=short_pki, rollover_at=SWITCH, rollover_announce_at=ANNOUNCE)
    server.clock = clock
    extra = {"est__trust_anchor": f'"{short_pki.directory / "ca.pem"}"'}
    if request.param == "anchor+pin":
        extra["est__cacerts_fingerprint"] = (
            f'"{anchors_module.fingerprint(short_pki.est_ca.certificate)}"'
        )
    device.write_config(server, short_pki, **extra)

    def agent() -> Agent:
        return Agent(load_config(device.config), clock=clock)

    yield server, clock, agent


def _ops(server: EstTestServer, since: int) -> list[str]:
    return [r.path.rsplit("/", 1)[-1] for r in server.requests[since:]]


def _store(device: Device, pki: DevPki) -> Any:
    return AnchorStore(device.state_dir).load([pki.est_ca.certificate])


def test_device_across_the_whole_rollover(
    rig: tuple[EstTestServer, Clock, Callable[[], Agent]],
    device: Device,
    short_pki: DevPki,
    cli: Run,
) -> None:
    server, clock, agent = rig
    assert server.rollover is not None
    old, new = short_pki.est_ca.certificate, server.rollover.new.certificate
    started = time.monotonic()

    # before: only OldWithOld; enrolled under the old root, nothing stored
    result = agent().enroll()
    assert result.outcome.value == "enrolled"
    assert _store(device, short_pki).state is StoreState.EMPTY

    # overlap: the four certificates; NewWithNew becomes the next anchor, still issued by old
    clock.now = ANNOUNCE + timedelta(minutes=10)
    a = agent()
    result = a.renew(force=True)
    assert result.outcome.value == "renewed"
    held = _store(device, short_pki)
    assert held.state is StoreState.VALID and held.sequence == 1
    assert held.next is not None and held.next.certificate == new
    assert held.next.source is Source.ROLLOVER
    assert [x.source for x in held.current] == [Source.CONFIGURED]

    status = a.status()
    roles = {(r.role, r.source, r.subject) for r in status.anchors}
    assert roles == {
        ("current", "configured", old.subject.rfc4514_string()),
        ("next", "rollover", new.subject.rfc4514_string()),
    }

    # after the switch: TLS chained to the new root and issued by it; both accepted
    clock.now = SWITCH + timedelta(minutes=10)
    since = len(server.requests)
    result = agent().renew(force=True)
    assert result.outcome.value == "renewed"
    code, out, _ = cli("status", "--config", str(device.config), "--json")
    assert code == 0
    report = json.loads(out)
    active = next(s for s in report["slots"] if s["name"] == report["active_slot"])
    assert active["serial"] == result.serial
    assert "simplereenroll" in _ops(server, since)
    issued = server.issuing_ca().certificate
    assert issued == new  # the server issues from the new root now
    assert _store(device, short_pki).next is not None  # old still valid: no switch yet

    # a run that is not due still asks /cacerts (a next anchor is held), server-only: no card
    since = len(server.requests)
    a = agent()
    result = a.run()
    assert result.outcome.value == "not-due"
    assert _ops(server, since) == ["cacerts"]
    assert a.card_signatures == 0

    # after the old root expired: the next anchor becomes current, the server sends only NwN
    clock.now = OLD_END + timedelta(hours=1)
    result = agent().renew(force=True)
    assert result.outcome.value == "renewed"
    held = _store(device, short_pki)
    assert [x.certificate for x in held.current] == [new] and held.next is None
    assert held.current[0].source is Source.ROLLOVER
    code, out, _ = cli("status", "--config", str(device.config))
    assert code == 0
    assert f"anchor current (rollover): {new.subject.rfc4514_string()}" in out
    assert f"anchor fallback (configured): {old.subject.rfc4514_string()}" in out
    code, out, _ = cli("status", "--config", str(device.config), "--json")
    report = json.loads(out)
    rows = report["anchors"]
    assert report["anchor_store"]["state"] == "valid"
    assert report["anchor_store"]["sequence"] == 2  # next stored, then the switch
    assert {c["file"]: c["sequence"] for c in report["anchor_store"]["copies"]} == {
        "anchors-a.json": 1,
        "anchors-b.json": 2,
    }
    assert [(r["role"], r["source"]) for r in rows] == [
        ("current", "rollover"),
        ("fallback", "configured"),
    ]
    assert rows[0]["sha256"] == anchors_module.fingerprint(new)
    assert rows[0]["not_after"] == new.not_valid_after_utc.isoformat()
    elapsed = time.monotonic() - started
    print(f"\nrollover end to end: {elapsed:.2f} s")
    assert elapsed < 60


def test_new_root_without_links_is_refused_before_the_card_makes_a_key(
    rig: tuple[EstTestServer, Clock, Callable[[], Agent]],
    device: Device,
    short_pki: DevPki,
    cli: Run,
) -> None:
    server, _clock, agent = rig
    assert agent().enroll().outcome.value == "enrolled"
    stranger = make_ca("Stranger Root", REAL_NOW, timedelta(days=30)).certificate
    server.cacerts_now = lambda: [short_pki.est_ca.certificate, stranger]  # type: ignore[method-assign]
    since = len(server.requests)
    started = time.monotonic()
    code, _, err = cli("renew", "--force", "--config", str(device.config))
    elapsed = time.monotonic() - started
    print(f"\nrefused /cacerts: exit {code} in {elapsed:.2f} s")
    assert code == 76
    assert "without a valid NewWithOld link" in err
    assert _ops(server, since) == ["cacerts"]  # no csrattrs, no CSR: the card made no key
    assert _store(device, short_pki).state is StoreState.EMPTY
    with pytest.raises(EstResponseError, match="no anchor was stored"):
        agent().renew(force=True)
    assert elapsed < 20


def test_power_cut_while_storing_the_next_anchor(
    rig: tuple[EstTestServer, Clock, Callable[[], Agent]],
    device: Device,
    short_pki: DevPki,
    monkeypatch: pytest.MonkeyPatch,
    cli: Run,
) -> None:
    """The run dies in the middle of writing the next anchor (the copy left torn). The previous
    anchors still load (the configured one: the store is damaged, not empty) and the next run,
    still in the overlap, completes the store."""
    server, clock, agent = rig
    assert agent().enroll().outcome.value == "enrolled"
    clock.now = ANNOUNCE + timedelta(minutes=10)

    def torn_write(path: Path, data: bytes, **_: object) -> None:
        Path(path).write_bytes(data[: len(data) // 3])
        raise SystemExit("power cut")

    monkeypatch.setattr(anchors_module, "atomic_write", torn_write)
    with pytest.raises(SystemExit):
        agent().renew(force=True)
    monkeypatch.undo()
    held = _store(device, short_pki)
    assert held.state is StoreState.DAMAGED  # unknown is not empty
    assert [x.certificate for x in held.current] == [short_pki.est_ca.certificate]
    code, out, _ = cli("status", "--config", str(device.config))
    assert code == 0
    assert "anchor store: damaged: anchors-a.json: damaged (not JSON (torn or overwritten))" in out
    started = time.monotonic()
    result = agent().renew(force=True)
    assert result.outcome.value == "renewed"
    held = _store(device, short_pki)
    assert held.state is StoreState.VALID
    assert server.rollover is not None and held.next is not None
    assert held.next.certificate == server.rollover.new.certificate
    assert time.monotonic() - started < 30


def test_a_device_that_missed_the_overlap_cannot_verify_the_new_chain(
    rig: tuple[EstTestServer, Clock, Callable[[], Agent]],
    device: Device,
    short_pki: DevPki,
    cli: Run,
) -> None:
    """No next anchor stored (offline during the whole overlap): the server's TLS chain to the
    new root is refused (the limitation the README states), and nothing is stored."""
    _server, clock, agent = rig
    assert agent().enroll().outcome.value == "enrolled"
    clock.now = SWITCH + timedelta(minutes=10)
    started = time.monotonic()
    with pytest.raises(EstAgentError) as info:
        agent().renew(force=True)
    elapsed = time.monotonic() - started
    print(
        f"\nmissed overlap: {type(info.value).__name__} exit {info.value.exit_code}"
        f" in {elapsed:.2f} s: {info.value}"
    )
    assert info.value.exit_code == 76
    assert _store(device, short_pki).state is StoreState.EMPTY
    assert elapsed < 20


def test_the_fast_path_gives_way_to_the_anchor_check(
    rig: tuple[EstTestServer, Clock, Callable[[], Agent]],
    device: Device,
    short_pki: DevPki,
    cli: Run,
) -> None:
    """`est-agent run` answers "not due" from the host-state cache without the network, except
    when a next anchor is held (or the anchor nears its end): then /cacerts is asked,
    server-only, and the card signs nothing."""
    server, clock, agent = rig
    assert agent().enroll().outcome.value == "enrolled"
    clock.now = ANNOUNCE + timedelta(minutes=10)  # the server's phase; the CLI runs on real time
    assert agent().renew(force=True).outcome.value == "renewed"
    assert _store(device, short_pki).next is not None
    since = len(server.requests)
    code, out, _ = cli("run", "--config", str(device.config), "--json")
    assert code == 0
    result = json.loads(out)
    assert result["outcome"] == "not-due"
    assert _ops(server, since) == ["cacerts"]
    assert result["card_link"]["signatures"] == 0


def test_an_unwritable_anchor_store_is_a_note_not_a_failed_renewal(
    rig: tuple[EstTestServer, Clock, Callable[[], Agent]],
    device: Device,
    short_pki: DevPki,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As with the host state: the renewal the card made stands; the next run stores it."""
    _server, clock, agent = rig
    assert agent().enroll().outcome.value == "enrolled"
    clock.now = ANNOUNCE + timedelta(minutes=10)

    def refuse(path: Path, data: bytes, **_: object) -> None:
        raise StoreError(f"cannot write anchor store {path}: Read-only file system")

    monkeypatch.setattr(anchors_module, "atomic_write", refuse)
    result = agent().renew(force=True)
    assert result.outcome.value == "renewed"
    assert any("Read-only file system" in n and "next run" in n for n in result.notes)
    assert _store(device, short_pki).state is StoreState.EMPTY
    monkeypatch.undo()
    assert agent().renew(force=True).notes == ()
    assert _store(device, short_pki).next is not None


def test_the_fast_path_stays_fast_while_no_check_is_due(
    start_server: Callable[..., EstTestServer], dev_pki: DevPki, device: Device
) -> None:
    """A ten-year anchor and no rollover: the full run notes when to look again, and `run`'s
    fast path answers "not due" from the cache (no certificate parse, no network)."""
    from est_agent.workflow.anchorcheck import check_due
    from est_agent.workflow.quick import run_if_not_due

    server = start_server()
    device.write_config(server, dev_pki)
    config = load_config(device.config)
    assert Agent(config).enroll().outcome.value == "enrolled"
    now = datetime.now(UTC)
    assert not check_due(device.state_dir, config.est.trust_anchor, now)
    since = len(server.requests)
    result, stats = run_if_not_due(config, now)
    assert result is not None and result.outcome.value == "not-due"
    assert stats is not None and stats.apdus > 0
    assert len(server.requests) == since
    # 30 days before the anchor ends the fast path gives way to the full run's /cacerts check
    later = dev_pki.tls_ca_certificate.not_valid_after_utc - timedelta(days=29)
    assert run_if_not_due(config, later) == (None, None)


def test_a_fingerprint_only_device_follows_the_rollover_without_bootstrapping_again(
    start_server: Callable[..., EstTestServer],
    short_pki: DevPki,
    device: Device,
) -> None:
    # est.trust_anchor = "" + est.cacerts_fingerprint (RFC 7030 §4.1.1): the bootstrapped root
    # is the store's current anchor; after the old root expired the server sends only the new
    # root, which no longer matches the pin: the device must go on from the rollover it
    # verified, not bootstrap again (that would be 76).
    clock = Clock()
    server = start_server(pki=short_pki, rollover_at=SWITCH, rollover_announce_at=ANNOUNCE)
    server.clock = clock
    assert server.rollover is not None
    old, new = short_pki.est_ca.certificate, server.rollover.new.certificate
    device.write_config(
        server,
        short_pki,
        est__trust_anchor='""',
        est__cacerts_fingerprint=f'"{anchors_module.fingerprint(old)}"',
    )

    def agent() -> Agent:
        return Agent(load_config(device.config), clock=clock)

    def stored() -> list[tuple[Any, Source]]:
        held = AnchorStore(device.state_dir).load(())
        return [(a.certificate, a.source) for a in held.stored.current]

    assert agent().enroll().outcome.value == "enrolled"
    assert stored() == [(old, Source.BOOTSTRAP)]
    bootstrap_requests = len(server.requests)

    clock.now = ANNOUNCE + timedelta(minutes=10)
    assert agent().renew(force=True).outcome.value == "renewed"
    held = AnchorStore(device.state_dir).load(())
    assert held.next is not None and held.next.certificate == new

    clock.now = SWITCH + timedelta(minutes=10)
    assert agent().renew(force=True).outcome.value == "renewed"

    clock.now = OLD_END + timedelta(hours=1)
    since = len(server.requests)
    assert agent().renew(force=True).outcome.value == "renewed"
    assert stored() == [(new, Source.ROLLOVER)]
    # every request after the first enrollment came with the device's certificate: no
    # provisional connection again
    later = server.requests[bootstrap_requests:]
    assert later and all(r.client_certificate is not None for r in later)
    assert "simplereenroll" in _ops(server, since)
