"""`est-agent run` with nothing due: decided from the host cache, one record header and the key.

"Nothing due" includes a renewal that is due but waits after a failed attempt (the host state
says until when, workflow/renewal.py): same card checks, no network, exit 0 saying when.

Nothing here imports cryptography, httpx or the EST stack: the timer runs this daily on every
device, and real SIM links cost tens of milliseconds per APDU. The card work is SELECT and one
READ BINARY of the active slot's record header (it must still be the cached record), then the
slot's public key from the applet (SELECT opening a channel, READ PUBLIC KEY, MANAGE CHANNEL
close; MANAGE CHANNEL first on a card that refuses that; on links whose EFs already use a
logical channel, the applet is selected on that one)
compared with the cached key digest: another program may have regenerated the key
through the applet, and then the certificate is no longer usable whatever its dates say. No
network. Anything unexpected returns None and the full workflow runs, which judges both slots.

The cache is not trusted when it may be stale: while a record is being written (the host
state notes it first), while a request is pending, while the active certificate's deployment
has not succeeded, or when the state directory cannot be written (a run then could not have
recorded what it did to the SIM).
"""

from __future__ import annotations

import logging
import os
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from est_agent.errors import CardError, StoreError, TransportError
from est_agent.store import HEADER_SIZE, decode_header
from est_agent.workflow.cardwork import apply_card_facts, learned_card_facts
from est_agent.workflow.hoststate import HostState, load_host_state, save_host_state
from est_agent.workflow.lock import run_lock
from est_agent.workflow.renewal import renewal_due_at, retry_not_before
from est_agent.workflow.result import Outcome, Result

if TYPE_CHECKING:
    from est_agent.backends.base import CredentialBackend
    from est_agent.config import Config
    from est_agent.transport.base import LinkStats
    from est_agent.workflow.session import BackendOpener

__all__ = ["cached_not_due", "run_if_not_due"]

log = logging.getLogger(__name__)


def _trusted_cache(config: Config, host: HostState) -> bool:
    cache = host.active
    if cache is None or host.pending is not None or host.installing is not None:
        return False
    if cache.slot >= len(config.slots):
        return False
    paths = config.paths
    if paths.export_pem is not None or paths.deploy_hook:
        deployment = host.deployment
        if deployment is None or not deployment.succeeded:
            return False
        if not deployment.is_for(cache.slot, cache.sequence, cache.sha256):
            return False
    return os.access(paths.state_dir, os.W_OK)


def _retry_wait(config: Config, host: HostState, now: datetime) -> datetime | None:
    """Until when the cached credential's due renewal waits after failed attempts, or None."""
    cache, retry = host.active, host.retry
    if cache is None or retry is None or retry.next_at is None or not retry.is_for(cache.sha256):
        return None
    if now >= cache.not_after:
        return None  # expired: the full workflow falls back to the bootstrap credential now
    return retry_not_before(retry.failed_at, retry.next_at, now, cap_s=config.renewal.retry_cap_s)


def cached_not_due(
    config: Config,
    backend: CredentialBackend,
    host: HostState,
    now: datetime,
    *,
    last_use: bool = False,
) -> Result | None:
    """A NOT_DUE result when the cache says "not due" (RETRY_LATER when due but waiting after
    a failed attempt) and the SIM still holds that record and the key it was issued for; None
    when the full workflow must decide.

    ``last_use``: the session ends right after this (the backend may then take shortcuts,
    e.g. select the applet on the EFs' own logical channel: 2 APDUs fewer on modem links).
    """
    if not _trusted_cache(config, host):
        return None
    cache = host.active
    assert cache is not None
    due = renewal_due_at(
        cache.not_before,
        cache.not_after,
        threshold=config.renewal.threshold,
        jitter_s=config.renewal.jitter_s,
        serial=int(cache.serial, 16),
    )
    wait_until = None
    if now >= due:
        wait_until = _retry_wait(config, host, now)
        if wait_until is None:
            return None
    slot = config.slots[cache.slot]
    try:
        header = decode_header(backend.read_record(slot.certificate, 0, HEADER_SIZE))
        if header is None or (header.sequence, header.sha256.hex()) != (
            cache.sequence,
            cache.sha256,
        ):
            log.info("SIM record differs from the cache: full check")
            return None
        digest = backend.public_key_digest(slot.key, last_use=last_use)
    except TransportError:
        raise  # the card is gone: the full workflow would fail the same way
    except CardError as exc:
        log.info("slot %s not readable the short way (%s): full check", slot.name, exc)
        return None
    if digest != cache.public_key_sha256:
        log.warning("slot %s: the key on the card is not the cached one: full check", slot.name)
        return None
    if wait_until is not None:
        log.info("renewal due; waiting after a failed attempt until %s", wait_until.isoformat())
        return Result(
            Outcome.RETRY_LATER,
            slot.name,
            cache.subject,
            cache.serial,
            cache.not_after,
            due,
            next_attempt_at=wait_until,
        )
    return Result(Outcome.NOT_DUE, slot.name, cache.subject, cache.serial, cache.not_after, due)


def run_if_not_due(
    config: Config, now: datetime, *, backends: BackendOpener | None = None
) -> tuple[Result | None, LinkStats | None]:
    """(result or None, link counters): the whole fast path, under the run lock, the device
    opened and closed here; the device is not touched when the cache cannot decide anyway."""
    from est_agent.workflow.anchorcheck import check_due
    from est_agent.workflow.session import backend_opener

    paths = config.paths
    if not _trusted_cache(config, load_host_state(paths.state_dir)):
        return None, None
    if check_due(paths.state_dir, config.est.trust_anchor, now):
        return None, None  # a CA rollover check is due (RFC 7030 §4.1.3): the full run
    open_backend = backends or backend_opener()
    with run_lock(paths.state_dir, wait_s=paths.lock_wait_s):
        host = load_host_state(paths.state_dir)  # again: another run may just have changed it
        with open_backend(config) as backend, backend.transaction():
            apply_card_facts(backend, host)
            result = cached_not_due(config, backend, host, now, last_use=True)
            stats = backend.stats
        _remember_card_facts(paths.state_dir, learned_card_facts(backend, host))
    return result, stats


def _remember_card_facts(state_dir: Path, learned: HostState | None) -> None:
    """Save what the card taught this run (workflow/cardwork.py); a cache: failing is a log
    line, the next run asks the card again."""
    if learned is None:
        return
    try:
        save_host_state(state_dir, learned)
    except StoreError as exc:
        log.warning("%s", exc)
