"""The SIM as credential backend: keys in the GSMA IoT SAFE applet, records in UICC EFs.

IoT SAFE v1 has no command for the device to write a file container, so each slot's
certificate record goes to a transparent EF the SIM issuer created (ETSI TS 102 221 §11.1.3,
§11.1.4: READ / UPDATE BINARY), while its key is an IoT SAFE private key object (GSMA IoT.05:
GENERATE KEY PAIR, READ PUBLIC KEY, COMPUTE SIGNATURE).

One session: connect, the EFs on channel 0 or a logical channel of their own, the applet on a
logical channel opened at first use. Card transactions (PC/SC SCardBeginTransaction: other
clients of the reader wait) are held around card work, never across network waits: the
device's other software may need the SIM key meanwhile. The card layer makes each multi-APDU
operation one transaction (a GET RESPONSE after its command, SIGN INIT + UPDATE, an EF's
SELECT + READ/UPDATE BINARY); callers hold one around what must be one picture (the slots
scan, a write and its read-back). Light imports only: the fast path of `est-agent run` uses
this without loading cryptography.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from est_agent.card.channel import CardSession
from est_agent.card.iotsafe import IotSafeApplet
from est_agent.card.uicc import EF_ICCID, UiccFiles, decode_iccid
from est_agent.card.uri import IotSafeRef, ObjectKind, UiccPath
from est_agent.digests import sha256
from est_agent.errors import CardError, InputError, TransportError
from est_agent.transport.base import CardTransport, LinkStats

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

    from est_agent.backends.iotsafe import CardKeyAgreement, CardSigner

__all__ = ["IotSafeUiccBackend", "TransportOpener", "open_iotsafe_uicc"]

log = logging.getLogger(__name__)

#: builds (not connects) the transport a reader string names (est_agent.transport)
TransportOpener = Callable[[str], CardTransport]


def _key(ref: object) -> IotSafeRef:
    if not isinstance(ref, IotSafeRef) or ref.kind is not ObjectKind.PRIVATE_KEY:
        raise InputError(f"the IoT SAFE backend addresses keys as iotsafe: keys, not {ref}")
    return ref


def _public(ref: object) -> IotSafeRef:
    if not isinstance(ref, IotSafeRef) or ref.kind is not ObjectKind.PUBLIC_KEY:
        raise InputError(f"expected an iotsafe: public key, not {ref}")
    return ref


def _ef(ref: object) -> UiccPath:
    if not isinstance(ref, UiccPath):
        raise InputError(f"the IoT SAFE backend keeps records in uicc:path= EFs, not {ref}")
    return ref


def _public_ref(key: IotSafeRef) -> IotSafeRef:
    return IotSafeRef(ObjectKind.PUBLIC_KEY, object_id=key.object_id, label=key.label)


class IotSafeUiccBackend:
    """``CredentialBackend`` on one card session (est_agent/backends/base.py)."""

    def __init__(
        self,
        session: CardSession,
        files: UiccFiles,
        *,
        aids: Sequence[bytes],
        proprietary_cla: bool = True,
        implicit_channel: bool = False,
    ) -> None:
        self.session = session
        self.files = files
        self._aids = tuple(aids)
        self._proprietary_cla = proprietary_cla
        self._applet: IotSafeApplet | None = None
        #: open the applet's channel by its SELECT (ISO/IEC 7816-4 §5.5.2, one APDU fewer);
        #: the workflow turns it off for a card its host state remembers refusing (6881)
        self.implicit_channel = implicit_channel

    @property
    def implicit_channel_refused(self) -> bool:
        """Whether this session's applet SELECT was refused on a closed channel (6881): the
        workflow remembers it (workflow/hoststate.py) so later runs ask with MANAGE CHANNEL."""
        return self._applet is not None and self._applet.implicit_refused

    @property
    def transport(self) -> CardTransport:
        return self.session.transport

    @property
    def stats(self) -> LinkStats:
        return self.session.transport.stats

    @property
    def description(self) -> str:
        return f"IoT SAFE applet + UICC EFs on {self.transport.description}"

    def details(self) -> dict[str, str]:
        return {"reader": self.transport.description, "aid": self.applet.aid.hex().upper()}

    @property
    def applet(self) -> IotSafeApplet:
        """The IoT SAFE applet, selected on its own logical channel at first use."""
        if self._applet is None:
            self._applet = IotSafeApplet.open(
                self.session,
                aids=self._aids,
                proprietary_cla=self._proprietary_cla,
                implicit_channel=self.implicit_channel,
            )
        return self._applet

    def transaction(self) -> contextlib.AbstractContextManager[None]:
        return self.session.transaction()

    # -- records ----------------------------------------------------------------------------

    def record_size(self, record: object) -> int | None:
        return self.files.size(_ef(record))

    def read_record(self, record: object, offset: int, length: int) -> bytes:
        return self.files.read(_ef(record), offset, length)

    def write_record(self, record: object, data: bytes) -> None:
        self.files.update(_ef(record), data)

    # -- keys -------------------------------------------------------------------------------

    def signer(self, key: object, public_key: ec.EllipticCurvePublicKey) -> CardSigner:
        from est_agent.backends.iotsafe import CardSigner

        return CardSigner(self.applet, _key(key), public_key)

    def key_agreement(self, key: object, peer: object) -> CardKeyAgreement:
        """TLS 1.3's ephemeral ECDH on the card: ``key`` a key-agreement private key, ``peer``
        the writable public key object for the server's share."""
        from est_agent.backends.iotsafe import CardKeyAgreement

        return CardKeyAgreement(self.applet, _key(key), _public(peer))

    def public_key(self, key: object) -> ec.EllipticCurvePublicKey:
        from est_agent.backends.iotsafe import CardSigner

        return CardSigner.from_card(self.applet, _key(key)).public_key()

    def public_key_digest(self, key: object, *, last_use: bool = False) -> str:
        channel = self.files.channel
        if last_use and channel.number != 0 and self._applet is None:
            # The session ends right after this and the EFs have a logical channel of their
            # own: select the applet on it instead of opening another (2 APDUs fewer on modem
            # links). The channel's EF selection is gone afterwards.
            applet = IotSafeApplet.select(
                channel, aids=self._aids, proprietary_cla=self._proprietary_cla
            )
        else:
            applet = self.applet
        return sha256(applet.read_public_key(_public_ref(_key(key)))).hexdigest()

    def generate_key(self, key: object) -> ec.EllipticCurvePublicKey:
        from est_agent.backends.signer import public_key_from_point

        return public_key_from_point(self.applet.generate_key_pair(_key(key)).public_point)

    # -- identity ---------------------------------------------------------------------------

    def read_object(self, ref: object) -> bytes:
        if isinstance(ref, UiccPath):
            return self.files.read(ref)
        if isinstance(ref, IotSafeRef) and ref.kind is ObjectKind.FILE:
            return self.applet.read_file(ref)
        raise InputError(f"not an object on the card: {ref}")

    def iccid(self) -> str | None:
        try:
            return decode_iccid(self.files.read(EF_ICCID))
        except TransportError:
            raise
        except (CardError, InputError) as exc:
            log.warning("cannot read EF_ICCID: %s", exc)
            return None

    def imei(self) -> str | None:
        """AT+CGSN on a ``modem:`` link (3GPP TS 27.007 §5.4); other links know no IMEI."""
        imei = getattr(self.transport, "imei", None)
        if not callable(imei):
            return None
        try:
            return str(imei())
        except CardError as exc:
            log.warning("cannot read the modem's IMEI: %s", exc)
            return None


@contextlib.contextmanager
def open_iotsafe_uicc(
    reader: str,
    *,
    opener: TransportOpener,
    aids: Sequence[bytes],
    proprietary_cla: bool,
    basic_channel: bool,
    implicit_channel: bool = False,
) -> Iterator[IotSafeUiccBackend]:
    """Connect, open the EFs' channel; close every channel and the link on exit.

    With ``implicit_channel`` (``card.implicit_channel``, off by default: on a shared reader the
    SELECT would take another program's open channel) and the EFs on the basic channel of a
    reader (PC/SC), the applet's channel is opened by its SELECT
    (``IotSafeApplet.open(implicit_channel=True)``): one APDU fewer per run. Where the
    EFs get a channel of their own (the default on a modem: its baseband uses channels too),
    and on any modem link (AT+CCHO/AT+CGLA address only channels the modem opened), the card
    assigns every channel (MANAGE CHANNEL, TS 102 221 §11.1.17), so none is taken over, as
    everywhere without ``implicit_channel``.
    """
    session = CardSession(opener(reader))
    implicit = (
        implicit_channel
        and basic_channel
        and not reader.lower().startswith("modem:")
        and getattr(session.transport, "implicit_channel_opening", True)
    )
    try:
        session.transport.connect()
        try:
            channel = session.basic_channel if basic_channel else session.open_channel()
            yield IotSafeUiccBackend(
                session,
                UiccFiles(channel),
                aids=aids,
                proprietary_cla=proprietary_cla,
                implicit_channel=implicit,
            )
        finally:
            session.close_channels()  # best effort
    finally:
        session.close()
