"""The one exception tree of est-agent, and the exit code of each branch.

    EstAgentError                      70  (bug / unexpected)
    ├── ConfigError                    78  fix the configuration
    ├── UsageError                     64  wrong command line / bad argument value
    ├── InputError                     65  input data cannot be used (bad PEM, bad URI ...)
    │   └── CsrError                   65
    ├── CardError                      76  the card refused or answered garbage
    │   ├── StatusWordError            76  an unexpected SW (carries sw, command, meaning)
    │   │   ├── SecurityStatusError    77  6982 / access condition not met
    │   │   ├── NotFoundError          76  6A82 / 6A88: object, file or applet not found
    │   │   └── ConditionsNotSatisfiedError 76  6985
    │   ├── CardProtocolError          76  malformed response bytes
    │   ├── SlotUnreadableError        76  a credential slot could not be read: nothing written
    │   └── TransportError             69  card unreachable
    │       ├── NoCardError            69  reader present, no card (or card removed)
    │       ├── ReaderError            69  PC/SC service/reader problems
    │       └── ModemError             69  serial/AT problems (cellular modem transport)
    ├── SimStateError                  65  virtual SIM state file missing/corrupt
    ├── StoreError                     73  certificate not installed; active one intact
    ├── OutputError                    74  standard output closed (the reader of a pipe left)
    ├── EstError                       76
    │   ├── EstRejectedError           76  4xx from the server
    │   ├── EstResponseError           76  unparseable/invalid response
    │   ├── TlsVerificationError       76  server not authenticated
    │   └── EstConnectionError         69  server unreachable
    ├── AuthError                      77  credentials refused (401/403)
    ├── EnrollmentPending              75  try later (carries retry_after_s)
    └── BusyError                      75  another est-agent holds the run lock

`exit_code_for` is the one mapping from these to exit codes; the command lines (`cli/main.py`,
`testserver/cli.py`) call it and name every other status by the ``EX_`` constants below.
This module imports nothing of est-agent: it is the bottom layer every other one may use.
Messages never carry key material, PINs or passwords: only status words, command names
and bounded excerpts.
"""

from __future__ import annotations

__all__ = [
    "EX_CANTCREAT",
    "EX_CONFIG",
    "EX_DATAERR",
    "EX_INTERRUPTED",
    "EX_IOERR",
    "EX_NOPERM",
    "EX_OK",
    "EX_OSERR",
    "EX_PROTOCOL",
    "EX_SOFTWARE",
    "EX_TEMPFAIL",
    "EX_UNAVAILABLE",
    "EX_UNHEALTHY",
    "EX_USAGE",
    "AuthError",
    "BusyError",
    "CardError",
    "CardProtocolError",
    "ConditionsNotSatisfiedError",
    "ConfigError",
    "CsrError",
    "EnrollmentPending",
    "EstAgentError",
    "EstConnectionError",
    "EstError",
    "EstRejectedError",
    "EstResponseError",
    "InputError",
    "ModemError",
    "NoCardError",
    "NotFoundError",
    "OutputError",
    "ReaderError",
    "SecurityStatusError",
    "SimStateError",
    "SlotUnreadableError",
    "StatusWordError",
    "StoreError",
    "TlsVerificationError",
    "TokenError",
    "TokenLoginError",
    "TransportError",
    "UsageError",
    "exit_code_for",
]

# sysexits.h values (FreeBSD sysexits(3)), the exit codes of every est-agent process
EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_CANTCREAT = 73
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_PROTOCOL = 76
EX_NOPERM = 77
EX_CONFIG = 78
#: cannot bind a port or write a file (est-testserver: an OS error outside our tree)
EX_OSERR = 71
#: killed by SIGINT: 128 + the signal number, the shell's convention (POSIX.1-2017 XCU §2.8.2)
EX_INTERRUPTED = 130
#: a health check that failed: Docker's HEALTHCHECK contract is 0 healthy, 1 unhealthy
#: (Dockerfile reference, HEALTHCHECK; compose's healthcheck.test runs `est-testserver probe`)
EX_UNHEALTHY = 1


class EstAgentError(Exception):
    """Root of every error est-agent raises on purpose."""

    exit_code: int = EX_SOFTWARE


class ConfigError(EstAgentError):
    """Raised when the configuration is missing, malformed or inconsistent."""

    exit_code = EX_CONFIG


class UsageError(EstAgentError):
    """Raised when a command-line argument has a value that cannot be used."""

    exit_code = EX_USAGE


class InputError(EstAgentError):
    """Raised when input data (a URI, a PEM file, a hex string) cannot be used."""

    exit_code = EX_DATAERR


class CsrError(InputError):
    """Raised when a CSR cannot be built as asked."""


class SimStateError(EstAgentError):
    """Raised when a virtual SIM state file is missing, unreadable or corrupt."""

    exit_code = EX_DATAERR


class CardError(EstAgentError):
    """Raised when the card refuses a command or answers something unusable."""

    exit_code = EX_PROTOCOL


class StatusWordError(CardError):
    """Raised when the card answers a status word the command does not accept.

    The caller says what the status word means: the table of meanings belongs to the card layer
    (``card.status.error_for_sw`` builds these from ISO/IEC 7816-4 §5.1.3), and this module
    imports nothing of ours.
    """

    def __init__(self, sw: int, command: str, meaning: str) -> None:
        self.sw = sw
        self.command = command
        self.meaning = meaning
        where = f"{command}: " if command else ""
        super().__init__(f"{where}card answered SW {sw:04X} ({self.meaning})")


class SecurityStatusError(StatusWordError):
    """Raised on SW 6982: the access condition for the object or file is not met."""

    exit_code = EX_NOPERM


class NotFoundError(StatusWordError):
    """Raised on SW 6A82/6A88: the applet, object or file does not exist on the card."""


class ConditionsNotSatisfiedError(StatusWordError):
    """Raised on SW 6985: e.g. a key slot that does not allow the operation."""


class CardProtocolError(CardError):
    """Raised when the card's response bytes do not follow the expected encoding."""


class SlotUnreadableError(CardError):
    """Raised when a credential slot's record or key could not be read: it may hold the
    working credential, so the run writes nothing (store.py ``SlotState.UNKNOWN``)."""


class TokenError(CardError):
    """Raised when a PKCS#11 token answered an operation with an error (a CKR_* return value,
    PKCS#11 v2.40 §5.1) or does not hold the object named: the token was reached, so a slot it
    could not show is unknown, never empty."""


class TokenLoginError(TokenError):
    """Raised when the token refuses the user PIN (CKR_PIN_INCORRECT, CKR_PIN_LOCKED ...)."""

    exit_code = EX_NOPERM


class TransportError(CardError):
    """Raised when the card cannot be reached at all."""

    exit_code = EX_UNAVAILABLE


class NoCardError(TransportError):
    """Raised when the reader has no card, or the card went away mid-command."""


class ReaderError(TransportError):
    """Raised when the PC/SC service or the named reader is unavailable."""


class ModemError(TransportError):
    """Raised when the cellular modem's serial link or AT dialogue fails.

    ``cme_error``: the numeric ``+CME ERROR: <err>`` (3GPP TS 27.007 §9.2) when the modem gave
    one, so callers can tell "operation not allowed" (3) from "SIM busy" (14).
    """

    def __init__(self, message: str, *, cme_error: int | None = None) -> None:
        self.cme_error = cme_error
        super().__init__(message)


class StoreError(EstAgentError):
    """Raised when an issued certificate could not be installed on the SIM.

    The previously active credential is untouched when this is raised.
    """

    exit_code = EX_CANTCREAT


class OutputError(EstAgentError):
    """Raised when standard output cannot be written (EPIPE: the reader of the pipe is gone).

    What the command did is done; only its report was lost, which a pipeline must be able to
    tell from success (sysexits.h EX_IOERR).
    """

    exit_code = EX_IOERR


class EstError(EstAgentError):
    """Raised when the EST exchange fails."""

    exit_code = EX_PROTOCOL


class EstRejectedError(EstError):
    """Raised when the EST server rejects the request (4xx other than 401/403)."""


class EstResponseError(EstError):
    """Raised when the EST server's answer cannot be parsed or does not validate."""


class TlsVerificationError(EstError):
    """Raised when the EST server's TLS certificate does not verify."""


class EstConnectionError(EstError):
    """Raised when the EST server cannot be reached."""

    exit_code = EX_UNAVAILABLE


class AuthError(EstAgentError):
    """Raised when credentials are refused (HTTP 401/403)."""

    exit_code = EX_NOPERM


class EnrollmentPending(EstAgentError):
    """Raised when the server accepted the request but has not issued yet (202/503)."""

    exit_code = EX_TEMPFAIL

    def __init__(self, retry_after_s: float, message: str = "") -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message or f"enrollment pending; retry after {retry_after_s:.0f} s")


class BusyError(EstAgentError):
    """Raised when another est-agent process holds the run lock longer than we may wait."""

    exit_code = EX_TEMPFAIL


def exit_code_for(exc: BaseException) -> int:
    """Exit status for an exception reaching the CLI (70 for anything not ours)."""
    if isinstance(exc, EstAgentError):
        return exc.exit_code
    return EX_SOFTWARE
