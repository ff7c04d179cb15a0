"""Log output (text and JSON lines), step progress, and redaction of secrets."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import datetime

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
)

from est_agent import logs
from est_agent.errors import InputError, UsageError
from est_agent.logs import REDACTED, Progress, configure_logging, redact, register_secret

# generated per run: no key material, not even a fragment, is committed
PEM_KEY = (
    ec.generate_private_key(ec.SECP256R1())
    .private_bytes(Encoding.PEM, PrivateFormat.TraditionalOpenSSL, NoEncryption())
    .decode()
)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    secrets = set(logs._secrets)
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logs._secrets.clear()
    logs._secrets.update(secrets)


def _configured(verbosity: int, fmt: logs.LogFormat) -> io.StringIO:
    stream = io.StringIO()
    configure_logging(verbosity, fmt, stream=stream)
    return stream


# --- formats ----------------------------------------------------------------------------------


def test_text_is_level_and_message() -> None:
    stream = _configured(1, "text")
    logging.getLogger("est_agent.workflow").info("renewal due in %d days", 3)
    logging.getLogger("est_agent.workflow").debug("hidden at -v")
    assert stream.getvalue() == "INFO renewal due in 3 days\n"


def test_text_names_the_logger_from_vv() -> None:
    stream = _configured(2, "text")
    logging.getLogger("est_agent.card.channel").debug("opened channel %d", 1)
    assert stream.getvalue() == "DEBUG est_agent.card.channel: opened channel 1\n"


@pytest.mark.parametrize(
    ("verbosity", "level"),
    [(-1, logging.ERROR), (0, logging.WARNING), (1, logging.INFO), (5, logging.DEBUG)],
)
def test_verbosity_levels(verbosity: int, level: int) -> None:
    configure_logging(verbosity, "text", stream=io.StringIO())
    assert logging.getLogger().level == level


def test_json_lines_parse_and_carry_extra_fields() -> None:
    stream = _configured(1, "json")
    log = logging.getLogger("est_agent.workflow")
    log.info("installed in slot %s", "op-b", extra={"step": 7, "slot": "op-b", "ok": True})
    log.warning("deploy hook failed", extra={"exit_status": 3, "argv": ("a", "b")})
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 2
    first, second = lines
    assert first["level"] == "INFO"
    assert first["logger"] == "est_agent.workflow"
    assert first["msg"] == "installed in slot op-b"
    assert (first["step"], first["slot"], first["ok"]) == (7, "op-b", True)
    assert first["ts"].endswith("Z")
    assert datetime.fromisoformat(first["ts"]).utcoffset() is not None
    assert second["exit_status"] == 3
    assert second["argv"] == ["a", "b"]
    assert list(first)[:4] == ["ts", "level", "logger", "msg"]


def test_json_extras_cannot_overwrite_the_fixed_keys() -> None:
    stream = _configured(0, "json")
    logging.getLogger("est_agent").warning("real", extra={"level": "DEBUG", "ts": "x"})
    line = json.loads(stream.getvalue())
    assert (line["level"], line["msg"]) == ("WARNING", "real")
    assert line["ts"] != "x"


def test_json_non_serialisable_extra_becomes_text() -> None:
    stream = _configured(0, "json")
    logging.getLogger("est_agent").warning("x", extra={"obj": object(), "data": b"\x01"})
    line = json.loads(stream.getvalue())
    assert line["obj"].startswith("<object object")
    assert line["data"] == "b'\\x01'"


def test_json_exception_is_one_line_with_a_redacted_traceback() -> None:
    stream = _configured(0, "json")
    try:
        raise RuntimeError("Authorization: Basic dXNlcjpodW50ZXIy")
    except RuntimeError:
        logging.getLogger("est_agent").exception("unexpected")
    (text,) = stream.getvalue().splitlines()
    line = json.loads(text)
    assert "RuntimeError" in line["exc"]
    assert "dXNlcjpodW50ZXIy" not in text


def test_text_traceback_is_redacted() -> None:
    stream = _configured(0, "text")
    try:
        raise RuntimeError(PEM_KEY)
    except RuntimeError:
        logging.getLogger("est_agent").exception("unexpected")
    assert PEM_KEY.splitlines()[1] not in stream.getvalue()
    assert "RuntimeError" in stream.getvalue()


def test_configuring_twice_replaces_the_handler() -> None:
    first = _configured(0, "text")
    second = _configured(0, "json")
    logging.getLogger("est_agent").warning("once")
    assert first.getvalue() == ""
    assert len(second.getvalue().splitlines()) == 1


def test_unknown_format_is_refused() -> None:
    with pytest.raises(UsageError, match=r"^unknown log format 'xml'"):
        configure_logging(0, "xml")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=r"^unknown log format 'xml'"):
        Progress(total=3, fmt="xml")  # type: ignore[arg-type]


# --- progress ---------------------------------------------------------------------------------


def test_progress_text_lines() -> None:
    stream = io.StringIO()
    progress = Progress(total=8, fmt="text", stream=stream)
    progress.step("reading the bootstrap credential")
    progress.step("generating key in SIM slot op-b", index=3)
    assert stream.getvalue().splitlines() == [
        "[1/8] reading the bootstrap credential\u2026",
        "[3/8] generating key in SIM slot op-b\u2026",
    ]


def test_progress_json_lines() -> None:
    stream = io.StringIO()
    progress = Progress(total=8, fmt="json", stream=stream)
    progress.step("generating key in SIM slot op-b", index=3, slot="op-b")
    line = json.loads(stream.getvalue())
    assert (line["step"], line["total"], line["text"]) == (3, 8, "generating key in SIM slot op-b")
    assert line["slot"] == "op-b"
    assert line["level"] == "INFO"
    assert line["logger"] == "est_agent.progress"
    assert line["msg"] == "[3/8] generating key in SIM slot op-b"


def test_progress_writes_to_stderr_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    Progress(total=2).step("checking the card")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "[1/2] checking the card\u2026\n"


def test_progress_beyond_total_grows_the_total_and_disabled_prints_nothing() -> None:
    stream = io.StringIO()
    progress = Progress(total=1, stream=stream)
    progress.step("a")
    progress.step("b")
    assert stream.getvalue().splitlines()[-1] == "[2/2] b\u2026"
    quiet = io.StringIO()
    Progress(total=3, stream=quiet, enabled=False).step("x")
    assert quiet.getvalue() == ""
    with pytest.raises(InputError, match="at least one step, got 0"):
        Progress(total=0)


def test_progress_text_is_redacted() -> None:
    stream = io.StringIO()
    Progress(total=1, fmt="json", stream=stream).step("posting to https://dev:pw123@est/x")
    assert "pw123" not in stream.getvalue()


# --- redaction --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Authorization: Basic dXNlcjpwYXNz", f"Authorization: Basic {REDACTED}"),
        ("proxy-authorization: Bearer abc.def", f"proxy-authorization: Bearer {REDACTED}"),
        ("authorization=token123 rest", f"authorization={REDACTED}"),
        (
            "headers {'authorization': 'Basic dXNlcjpwYXNz', 'accept': '*/*'}",
            f"headers {{'authorization': 'Basic {REDACTED}', 'accept': '*/*'}}",
        ),
        (
            "[(b'Authorization', b'Digest x=1'), (b'Host', b'est')]",
            f"[(b'Authorization', b'Digest {REDACTED}'), (b'Host', b'est')]",
        ),
        ("GET https://dev1:s3cret@est.example/x", f"GET https://dev1:{REDACTED}@est.example/x"),
        (
            f"before\n{PEM_KEY}after",
            f"before\n-----BEGIN EC PRIVATE KEY-----{REDACTED}-----END EC PRIVATE KEY-----\nafter",
        ),
        (
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIF (excerpt cut",
            f"-----BEGIN ENCRYPTED PRIVATE KEY-----{REDACTED}",
        ),
        ("the authorization failed (401)", "the authorization failed (401)"),
        (
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----",
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----",
        ),
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected
    assert redact(expected) == expected  # masking twice changes nothing


def test_registered_secret_is_masked_everywhere() -> None:
    register_secret("")  # ignored: would otherwise mask between every character
    register_secret("hunter2")
    register_secret("hunter2-long")
    assert redact("pw=hunter2-long, again hunter2") == f"pw={REDACTED}, again {REDACTED}"
    assert redact("plain") == "plain"


def test_filter_redacts_messages_args_and_extras_of_any_logger() -> None:
    stream = _configured(0, "json")
    register_secret("basic-pass-42")
    logging.getLogger("httpx").warning(
        "request headers %s", {"Authorization": "Basic Zm9vOmJhcg=="}, extra={"note": PEM_KEY}
    )
    logging.getLogger("est_agent.config").error("bad password basic-pass-42")
    out = stream.getvalue()
    assert "Zm9vOmJhcg" not in out
    assert PEM_KEY.splitlines()[1] not in out
    assert "basic-pass-42" not in out
    assert out.count(REDACTED) == 3


def test_text_handler_redacts_too() -> None:
    stream = _configured(0, "text")
    logging.getLogger("est_agent").warning("sending Authorization: Basic Zm9vOmJhcg==")
    assert stream.getvalue() == f"WARNING sending Authorization: Basic {REDACTED}\n"
