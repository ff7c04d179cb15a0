"""What a command handler of the virtual card answers, before T=0 and Le rules are applied.

Handlers do not change anything themselves when their answer carries data: they describe the
change (``transient`` for volatile card state, ``update`` for the persistent state) and the card
applies it only if the answer is actually delivered. A ``6Cxx`` refusal (wrong Le) therefore
leaves the card as it was, and a persistent change reaches the state file before the answer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from est_agent.card.iotsafe_codes import SW_MORE_DATA, SW_SIGNATURE_MISMATCH
from est_agent.sim.state import CardState

__all__ = [
    "SW_CHANNEL_NOT_SUPPORTED",
    "SW_CLA_NOT_SUPPORTED",
    "SW_CONDITIONS",
    "SW_EOF_WARNING",
    "SW_FUNCTION_NOT_SUPPORTED",
    "SW_INCORRECT_DATA",
    "SW_INS_NOT_SUPPORTED",
    "SW_MEMORY",
    "SW_MORE_DATA",
    "SW_NOT_FOUND",
    "SW_NO_EF",
    "SW_OK",
    "SW_P1P2",
    "SW_REF_NOT_FOUND",
    "SW_SECURITY",
    "SW_SIGNATURE_MISMATCH",
    "SW_SM_NOT_SUPPORTED",
    "SW_UNKNOWN",
    "SW_WRONG_LENGTH",
    "SW_WRONG_OFFSET",
    "Reply",
]

SW_OK = 0x9000
SW_EOF_WARNING = 0x6282
SW_MEMORY = 0x6581
SW_WRONG_LENGTH = 0x6700
SW_CHANNEL_NOT_SUPPORTED = 0x6881
SW_SM_NOT_SUPPORTED = 0x6882
SW_SECURITY = 0x6982
SW_CONDITIONS = 0x6985
SW_NO_EF = 0x6986
SW_INCORRECT_DATA = 0x6A80
SW_FUNCTION_NOT_SUPPORTED = 0x6A81
SW_NOT_FOUND = 0x6A82
SW_P1P2 = 0x6A86
SW_REF_NOT_FOUND = 0x6A88
SW_WRONG_OFFSET = 0x6B00
SW_INS_NOT_SUPPORTED = 0x6D00
SW_CLA_NOT_SUPPORTED = 0x6E00
SW_UNKNOWN = 0x6F00


@dataclass(frozen=True)
class Reply:
    """An answer: data, SW and the state changes to apply if it is delivered.

    ``exact`` marks data whose length the card fixes (not chosen by Le, as READ BINARY's is):
    only those can earn ``6Cxx`` for a wrong Le.
    """

    sw: int
    data: bytes = b""
    exact: bool = False
    transient: Callable[[], None] | None = None
    update: Callable[[CardState], None] | None = None
