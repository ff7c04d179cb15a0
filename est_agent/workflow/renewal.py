"""When a certificate is due for renewal: pure functions of the certificate times and now.

Renewal starts at ``threshold`` of the lifetime (default 0.67, as certbot's 2/3), plus a
per-device offset of up to ``jitter_s`` so that a fleet issued in the same hour does not renew
in the same minute. The offset is derived from the certificate serial: deterministic (a device
asks again at the same time after a reboot) yet spread across the fleet. The offset never
pushes renewal past 90 % of the lifetime.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta

from est_agent.errors import ConfigError

__all__ = ["is_expired", "renewal_due_at"]

_LATEST_FRACTION = 0.9


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
            hashlib.sha256(serial.to_bytes(20, "big", signed=False)).digest()[:4]
        )
        due += timedelta(seconds=jitter_s * spread / 2**32)
    return min(due, not_before + lifetime * max(threshold, _LATEST_FRACTION))


def is_expired(not_after: datetime, now: datetime) -> bool:
    return now >= not_after
