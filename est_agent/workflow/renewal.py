"""When a certificate is due for renewal, and when to try again after a failed attempt: pure
functions of the certificate times, the failures so far and now.

Renewal starts at ``threshold`` of the lifetime (default 0.67, as certbot's 2/3), plus a
per-device offset of up to ``jitter_s`` so that a fleet issued in the same hour does not renew
in the same minute. The offset is derived from the certificate serial: deterministic (a device
asks again at the same time after a reboot) yet spread across the fleet, and nothing sleeps for
it. The offset never pushes renewal past 90 % of the lifetime.

After a failed attempt (``next_attempt_at``) the next one waits

    min(1 h * 2**(failures - 1), (not_after - failed_at) / 10, retry_cap_s), at least 1 h,

and never past ``not_after`` (then the credential is expired and the next run falls back to the
bootstrap credential at once). The exponential term is the usual backoff for a server that is
down (the in-run retries of est/client.py use the same shape), so a blip costs an hour, not a
day; a tenth of the time left is the spacing of Anjay's EST re-enrollment retries that issue
12 names, so attempts get denser as expiry nears instead of stopping; the 1 h floor keeps a
fleet whose CA is down from coming back every few minutes (boot runs, manual runs), and
``renewal.retry_cap_s`` (default a day, the timer's period) keeps a long-lived certificate from
waiting weeks between attempts.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from est_agent.digests import sha256
from est_agent.errors import ConfigError

__all__ = ["RETRY_FLOOR_S", "is_expired", "next_attempt_at", "renewal_due_at", "retry_not_before"]

_LATEST_FRACTION = 0.9
#: the shortest wait between two failed attempts (module docstring)
RETRY_FLOOR_S = 3600.0
#: 2**40 h is far beyond any cap: larger exponents only risk float overflow
_MAX_DOUBLINGS = 40


def renewal_due_at(
    not_before: datetime,
    not_after: datetime,
    *,
    threshold: float,
    jitter_s: float = 0.0,
    serial: int = 0,
) -> datetime:
    if not 0.0 < threshold < 1.0:
        # RenewalConfig refuses such a value at load time; this guards other callers.
        raise ConfigError(f"renewal.threshold: expected 0 < threshold < 1, got {threshold!r}")
    lifetime = not_after - not_before
    due = not_before + lifetime * threshold
    if jitter_s > 0:
        spread = int.from_bytes(
            sha256(serial.to_bytes(20, "big", signed=False)).digest()[:4]
        )
        due += timedelta(seconds=jitter_s * spread / 2**32)
    return min(due, not_before + lifetime * max(threshold, _LATEST_FRACTION))


def is_expired(not_after: datetime, now: datetime) -> bool:
    return now >= not_after


def next_attempt_at(
    failed_at: datetime,
    not_after: datetime,
    failures: int,
    *,
    cap_s: float,
    floor_s: float = RETRY_FLOOR_S,
) -> datetime:
    """When the attempt after ``failures`` (>= 1) consecutive failed ones may start (module
    docstring). ``cap_s`` below ``floor_s`` wins: it is the operator's explicit bound."""
    doublings = min(max(failures, 1) - 1, _MAX_DOUBLINGS)
    tenth_left_s = (not_after - failed_at).total_seconds() / 10
    wait_s = min(floor_s * 2.0**doublings, tenth_left_s, cap_s)
    wait_s = max(wait_s, min(floor_s, cap_s))
    return min(failed_at + timedelta(seconds=wait_s), max(not_after, failed_at))


def retry_not_before(
    failed_at: datetime, next_at: datetime, now: datetime, *, cap_s: float
) -> datetime | None:
    """The time a due renewal still waits for after a recorded failure, or None (go now).

    The record comes from a cache file: it may be stale or wrong, and it must never hold a
    renewal off for long. A failure "in the future" (the clock was set back since, or the file
    is not ours) is not trusted; a wait longer than ``cap_s`` (the cap was lowered, or the
    record is damaged) is cut to ``cap_s`` after the failure.
    """
    if failed_at > now:
        return None
    until = min(next_at, failed_at + timedelta(seconds=cap_s))
    return until if now < until else None
