"""Secrets the configuration points at, read when used: a password or PIN from the first line of
a file, or from an environment variable. Never from the command line, never kept in a
configuration object, never in a message (messages name the key and the file or variable only).

Used for the HTTP Basic password (``est.basic_password_file`` / ``est.basic_password_env``);
a token PIN takes the same two forms.
"""

from __future__ import annotations

import os
from pathlib import Path

from est_agent.errors import ConfigError
from est_agent.fileio import PASSWORD_LIMIT_BYTES, read_bounded

__all__ = ["has_control_character", "read_secret"]


def has_control_character(text: str) -> bool:
    """RFC 5234 Appendix B.1 CTL (%x00-1F, %x7F): RFC 7617 §2 forbids them in a Basic user-id
    and password (a server would refuse them, or read another user-id than the one meant)."""
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


def read_secret(
    *,
    file: Path | None = None,
    env: str | None = None,
    file_key: str,
    env_key: str,
) -> str | None:
    """The secret from ``file`` (its first line, UTF-8, at most 4 KiB read) or else from the
    environment variable ``env``; None when neither is configured. ``ConfigError`` naming
    ``file_key`` / ``env_key`` when it is missing, empty or holds a control character."""
    if file is not None:
        raw = read_bounded(file, limit_bytes=PASSWORD_LIMIT_BYTES, what=file_key)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{file_key}: {file} is not UTF-8") from None
        lines = text.splitlines()
        secret = lines[0] if lines else ""
        if not secret:
            raise ConfigError(f"{file_key}: the first line of {file} is empty")
        if has_control_character(secret):
            raise ConfigError(
                f"{file_key}: the first line of {file} contains a control character "
                "(RFC 7617 §2)"
            )
        return secret
    if env is not None:
        value = os.environ.get(env)
        if not value:
            raise ConfigError(f"{env_key}: environment variable {env} is not set or empty")
        if has_control_character(value):
            raise ConfigError(
                f"{env_key}: environment variable {env} contains a control character "
                "(RFC 7617 §2)"
            )
        return value
    return None
