"""`est-agent run` with nothing due: decided from the host cache and one SIM record header.

Nothing here imports cryptography, httpx or the IoT SAFE applet client: the timer runs this
daily on every device, and real SIM links cost tens of milliseconds per APDU. The cost is one
SELECT and one READ BINARY of each slot's record header (plus MANAGE CHANNEL open/close when
the certificate EFs are on a logical channel), no network. Anything unexpected returns None
and the full workflow runs.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import TYPE_CHECKING

from est_agent.card.uicc import UiccFiles
from est_agent.errors import CardError
from est_agent.store import HEADER_SIZE, decode_header
from est_agent.workflow.hoststate import HostState
from est_agent.workflow.renewal import renewal_due_at
from est_agent.workflow.result import Outcome, Result

if TYPE_CHECKING:
    from est_agent.config import Config
    from est_agent.transport.base import LinkStats

__all__ = ["cached_not_due", "run_if_not_due"]

log = logging.getLogger(__name__)


def cached_not_due(
    config: Config, files: UiccFiles, host: HostState, now: datetime
) -> Result | None:
    """A NOT_DUE result when the cache says "not due" and the SIM record is the cached one."""
    cache = host.active
    if cache is None or host.pending is not None or cache.slot >= len(config.slots):
        return None
    due = renewal_due_at(
        cache.not_before,
        cache.not_after,
        threshold=config.renewal.threshold,
        jitter_s=config.renewal.jitter_s,
        serial=int(cache.serial, 16),
    )
    if now >= due:
        return None
    slot = config.slots[cache.slot]
    try:
        header = decode_header(files.read(slot.certificate, 0, HEADER_SIZE))
        # A newer record in another slot means a run stored a certificate and died before
        # deploying it (or before updating this cache): the full workflow adopts it.
        others = [
            decode_header(files.read(other.certificate, 0, HEADER_SIZE))
            for index, other in enumerate(config.slots)
            if index != cache.slot
        ]
    except CardError as exc:
        log.info("slot records unreadable (%s): full check", exc)
        return None
    if header is None or (header.sequence, header.sha256.hex()) != (cache.sequence, cache.sha256):
        log.info("SIM record differs from the cache: full check")
        return None
    if any(h is not None and h.sequence > cache.sequence for h in others):
        log.info("a newer record is on the SIM: full check")
        return None
    return Result(Outcome.NOT_DUE, slot.name, cache.subject, cache.serial, cache.not_after, due)


def run_if_not_due(config: Config, now: datetime) -> tuple[Result | None, LinkStats | None]:
    """(result or None, card-link counters): the whole fast path, card opened and closed here."""
    from est_agent.card.channel import CardSession
    from est_agent.config import UiccChannel
    from est_agent.transport import open_transport
    from est_agent.workflow.hoststate import load_host_state

    host = load_host_state(config.paths.state_dir)
    if host.active is None or host.pending is not None:
        return None, None
    session = CardSession(open_transport(config.card.reader))
    try:
        session.transport.connect()
        basic = config.card.uicc_channel.resolve(config.card.reader) is UiccChannel.BASIC
        channel = session.basic_channel if basic else session.open_channel()
        result = cached_not_due(config, UiccFiles(channel), host, now)
    finally:
        session.close()
    return result, session.transport.stats
