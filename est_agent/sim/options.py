"""How the virtual SIM behaves where real cards differ (docs/iot-safe-card.md).

The defaults are a well-behaved T=1 card; each switch reproduces a quirk seen on real cards or
in other implementations so that clients can be tested against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from est_agent.card.iotsafe_codes import DEFAULT_AID
from est_agent.errors import ConfigError

__all__ = ["DEFAULT_AID", "CardOptions", "SignatureFormat"]


SignatureFormat = Literal["wide", "short", "der"]
_SIGNATURE_FORMATS: frozenset[str] = frozenset({"wide", "short", "der"})
_READ_OOB_SWS = frozenset({0x6A86, 0x6981})


@dataclass(frozen=True)
class CardOptions:
    """Behaviour switches of one virtual card.

    - ``t0_mode``: answer data-returning commands with ``61xx`` and serve the data by GET
      RESPONSE, as a T=0 card (or a modem's ``AT+CSIM``) does.
    - ``wrong_le_6c``: a command whose answer has a fixed length, sent with a non-zero Le that
      differs from it, is refused with ``6Cxx`` (resend with Le = xx) and not executed.
    - ``signature_format``: tag ``33`` coding: ``wide`` = ``33 00 40 r||s``, ``short`` =
      ``33 40 r||s``, ``der`` = ``33 <len> SEQUENCE{r, s}``.
    - ``pubkey_id_offset``: added (mod 256) to the last byte of every public key ID on the
      APDU interface, so GENERATE KEY PAIR returns a public ID unlike the private one.
    - ``object_list_page_bytes``: GET DATA object-list page size; more → ``6300``, P2 ``01``.
    - ``read_file_max``: most bytes one READ FILE answers.
    - ``read_oob_sw``: READ FILE offset past the end: ``6A86`` or ``6981`` (IoT.05 lists both).
    - ``aids``: AIDs that select the IoT SAFE applet.
    - ``implicit_channel_open``: a SELECT of the applet by AID (P1 ``04``) on a closed logical
      channel opens that channel and selects the applet, as a Java Card runtime does (Java
      Card 3 Runtime Environment §4.2.1; ISO/IEC 7816-4 §5.5.2 leaves it to the card); off, it
      is refused ``6881`` as some cards do.
    """

    t0_mode: bool = False
    wrong_le_6c: bool = False
    signature_format: SignatureFormat = "wide"
    pubkey_id_offset: int = 0
    object_list_page_bytes: int = 240
    read_file_max: int = 256
    read_oob_sw: int = 0x6A86
    aids: tuple[bytes, ...] = (DEFAULT_AID,)
    implicit_channel_open: bool = True

    def __post_init__(self) -> None:
        if self.signature_format not in _SIGNATURE_FORMATS:
            raise ConfigError(
                f"signature_format must be one of {sorted(_SIGNATURE_FORMATS)}, "
                f"got {self.signature_format!r}"
            )
        if not 0 <= self.pubkey_id_offset <= 0xFF:
            raise ConfigError(f"pubkey_id_offset must be 0..255, got {self.pubkey_id_offset}")
        if not 32 <= self.object_list_page_bytes <= 0xFFFF:
            raise ConfigError(
                f"object_list_page_bytes must be 32..65535, got {self.object_list_page_bytes}"
            )
        if not 1 <= self.read_file_max <= 256:
            raise ConfigError(f"read_file_max must be 1..256, got {self.read_file_max}")
        if self.read_oob_sw not in _READ_OOB_SWS:
            raise ConfigError(f"read_oob_sw must be 6A86 or 6981, got {self.read_oob_sw:04X}")
        if not self.aids:
            raise ConfigError("at least one applet AID is needed")
        for aid in self.aids:
            if not 5 <= len(aid) <= 16:
                raise ConfigError(f"AID must be 5..16 bytes, got {aid.hex().upper()}")
