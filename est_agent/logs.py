"""Logging and step progress on stderr, as text for people or JSON lines for journald and fleets.

`configure_logging(verbosity, fmt)` installs one stderr handler on the root logger:

- text: ``LEVEL message`` (``LEVEL logger: message`` from ``-vv`` on, where the module matters);
- json: one object per line: ``ts`` (ISO 8601 UTC, milliseconds), ``level``, ``logger``, ``msg``,
  ``exc`` when there is a traceback, and every ``extra=`` field of the call (``step``, ``slot``,
  ``exit_status`` ...). The four fixed keys cannot be overwritten by an extra.

`Progress` prints the workflow's step lines (``[3/8] generating key in SIM slot op-b…``) to
stderr whatever the verbosity, as the issue asks for one line per step; in json mode each step is
a line of the same shape as a log record plus ``step``, ``total`` and ``text``.

Both pass everything through `redact`, which masks PEM private key blocks, ``Authorization``
header values, passwords in URLs and any value registered with `register_secret`. The agent
never logs such things on purpose; this is the second line of defence for the day an exception
message or a library's debug output carries one.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
import threading
import traceback
from datetime import UTC, datetime
from typing import IO, Any, Literal

from est_agent.errors import InputError, UsageError

__all__ = [
    "REDACTED",
    "JsonFormatter",
    "LogFormat",
    "Progress",
    "RedactionFilter",
    "TextFormatter",
    "configure_logging",
    "redact",
    "register_secret",
]

LogFormat = Literal["text", "json"]
REDACTED = "[REDACTED]"

_AUTH_SCHEMES = r"(?:basic|bearer|digest|negotiate|ntlm)\s+"


@functools.cache
def _patterns() -> tuple[re.Pattern[str], re.Pattern[str], re.Pattern[str], re.Pattern[str]]:
    """The redaction patterns, compiled on the first record that reaches a handler (≈ 2.5 ms
    here: `run` with nothing due logs nothing at the default level and never needs them)."""
    return (
        # Any PEM private key label: PRIVATE KEY, ENCRYPTED PRIVATE KEY, EC/RSA/OPENSSH
        # PRIVATE KEY. An excerpt cut before the END line is masked up to its end.
        re.compile(
            r"(-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----)"
            r"(?:.*?(-----END [A-Z0-9 ]*PRIVATE KEY-----)|.*\Z)",
            re.DOTALL,
        ),
        # A header in a repr: 'Authorization': 'Basic dXNlcjpwYXNz' / (b'authorization', b'...').
        re.compile(
            rf"""(\b(?:proxy-)?authorization['"]?\s*[:=,]\s*b?)(['"])({_AUTH_SCHEMES})?.*?\2""",
            re.IGNORECASE,
        ),
        # A header as sent or printed: "Authorization: Basic dXNlcjpwYXNz" (to the end of the
        # line).
        re.compile(
            rf"""(\b(?:proxy-)?authorization\s*[:=]\s*)(?!b?['"])({_AUTH_SCHEMES})?[^\r\n]+""",
            re.IGNORECASE,
        ),
        # https://user:password@host: keep the user, mask the password.
        re.compile(r"\b([a-z][a-z0-9+.-]*://[^/\s:@]+):[^@\s/]*@", re.IGNORECASE),
    )


_secrets: set[str] = set()
_secrets_lock = threading.Lock()

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}
_JSON_KEYS = ("ts", "level", "logger", "msg")


def register_secret(value: str) -> None:
    """Mask `value` wherever it appears in logs and progress (e.g. the EST Basic password).

    The configuration loader calls this for each secret it reads. Empty values are ignored.
    """
    if value:
        with _secrets_lock:
            _secrets.add(value)


def redact(text: str) -> str:
    """`text` with private keys, Authorization values, URL passwords and secrets masked."""
    pem_private_key, auth_quoted, auth_line, url_password = _patterns()
    text = pem_private_key.sub(_masked_pem, text)
    text = auth_quoted.sub(rf"\1\2\3{REDACTED}\2", text)
    text = auth_line.sub(rf"\1\2{REDACTED}", text)
    text = url_password.sub(rf"\1:{REDACTED}@", text)
    with _secrets_lock:
        # Longest first, so a secret containing another is masked whole.
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return text


def _masked_pem(match: re.Match[str]) -> str:
    # The END line is kept so that redacting the output again finds the same block (the
    # filter and the formatters both redact) instead of masking everything after it.
    return f"{match[1]}{REDACTED}{match[2] or ''}"


class RedactionFilter(logging.Filter):
    """Handler filter: renders the message, redacts it and every string `extra` in place.

    On the handler rather than a logger, because logger filters do not see records propagated
    from child loggers (httpx, the card layer ...).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and isinstance(value, str):
                setattr(record, key, redact(value))
        return True


class TextFormatter(logging.Formatter):
    """``LEVEL message``, or ``LEVEL logger: message`` with `show_logger`; all of it redacted."""

    def __init__(self, *, show_logger: bool = False) -> None:
        fmt = "%(levelname)s %(name)s: %(message)s" if show_logger else "%(levelname)s %(message)s"
        super().__init__(fmt)

    def format(self, record: logging.LogRecord) -> str:
        # The whole line, not only the message: a traceback may have been rendered and cached
        # on the record (exc_text) by another handler before this one, without redaction.
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (see the module docstring for the keys)."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            key: _jsonable(value)
            for key, value in vars(record).items()
            if key not in _RECORD_FIELDS and key not in _JSON_KEYS
        }
        line = _line(
            record.created, record.levelname, record.name, redact(record.getMessage()), fields
        )
        if record.exc_info:
            line["exc"] = redact("".join(traceback.format_exception(*record.exc_info)).rstrip())
        elif record.exc_text:
            line["exc"] = redact(record.exc_text)
        if record.stack_info:
            line["stack"] = redact(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def _line(
    created: float, level: str, logger: str, msg: str, fields: dict[str, Any]
) -> dict[str, Any]:
    ts = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")
    return {"ts": ts.replace("+00:00", "Z"), "level": level, "logger": logger, "msg": msg} | {
        key: value for key, value in fields.items() if key not in _JSON_KEYS
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return redact(str(value))


# Marks the handler configure_logging installed, so a second call replaces it instead of
# printing every line twice (tests and the CLI may call it more than once in one process).
_HANDLER_MARK = "_est_agent_handler"


def configure_logging(
    verbosity: int, fmt: LogFormat = "text", *, stream: IO[str] | None = None
) -> logging.Handler:
    """Send log records to stderr (or `stream`) as `fmt`, at the level `verbosity` selects.

    verbosity <0: errors only; 0: warnings; 1 (``-v``): info; 2+ (``-vv``): debug, and the text
    format then names the logger. Returns the installed handler.
    """
    if fmt not in ("text", "json"):
        raise UsageError(f"unknown log format {fmt!r} (expected text or json)")
    level = (
        logging.ERROR
        if verbosity < 0
        else logging.WARNING
        if verbosity == 0
        else logging.INFO
        if verbosity == 1
        else logging.DEBUG
    )
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(
        JsonFormatter() if fmt == "json" else TextFormatter(show_logger=verbosity >= 2)
    )
    handler.addFilter(RedactionFilter())
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler


class Progress:
    """Numbered step lines on stderr: ``[3/8] generating key in SIM slot op-b…``.

    `step(text)` announces the next step; `index=` jumps (a step the workflow skipped, such as
    an optional /cacerts fetch, still counts). A step beyond `total` raises the total rather
    than printing ``[9/8]``. `enabled=False` prints nothing (e.g. for ``--quiet``).
    """

    def __init__(
        self,
        total: int,
        fmt: LogFormat = "text",
        *,
        stream: IO[str] | None = None,
        enabled: bool = True,
        logger: str = "est_agent.progress",
    ) -> None:
        if total < 1:
            raise InputError(f"Progress needs at least one step, got {total}")
        if fmt not in ("text", "json"):
            raise UsageError(f"unknown log format {fmt!r} (expected text or json)")
        self.total = total
        self.fmt: LogFormat = fmt
        self.current = 0
        self._stream = stream
        self._enabled = enabled
        self._logger = logger

    def step(self, text: str, *, index: int | None = None, **fields: Any) -> None:
        """Announce step `index` (default: the next one); `fields` are extra JSON keys."""
        self.current = self.current + 1 if index is None else index
        self.total = max(self.total, self.current)
        if not self._enabled:
            return
        text = redact(text)
        if self.fmt == "json":
            extra = {key: _jsonable(value) for key, value in fields.items()}
            line = _line(
                datetime.now(UTC).timestamp(),
                "INFO",
                self._logger,
                f"[{self.current}/{self.total}] {text}",
                extra | {"step": self.current, "total": self.total, "text": text},
            )
            out = json.dumps(line, ensure_ascii=False, default=str)
        else:
            out = f"[{self.current}/{self.total}] {text}\u2026"
        # Resolved at each call, so a stream swapped after construction (pytest's capsys,
        # a redirected stderr) is the one written to.
        stream = self._stream if self._stream is not None else sys.stderr
        stream.write(out + "\n")
        stream.flush()
