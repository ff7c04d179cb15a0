"""``est.proxy`` and its password keys: validation at load time, resolution at use time.

``EstConfig.https_proxy`` is what the agent hands the EST client; ``environ`` is injected so
each case states the environment it means (one case uses the process environment).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from est_agent.config import EstConfig, parse_config
from est_agent.errors import ConfigError
from est_agent.est.proxy import HttpsProxy
from est_agent.logs import redact

URL = "https://est.example.net/.well-known/est"
SECRET = "pr0xy-Pa55word"


def est(lines: str = "", url: str = URL, base_dir: Path | None = None) -> EstConfig:
    return parse_config(f'[est]\nurl = "{url}"\n{lines}\n', base_dir=base_dir).est


def test_default_connects_directly_whatever_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example.net:3128")
    monkeypatch.setenv("https_proxy", "http://proxy.example.net:3128")
    config = est()
    assert config.proxy == ""
    assert config.https_proxy() is None


def test_a_configured_proxy() -> None:
    proxy = est('proxy = "http://proxy.example.net:3128"').https_proxy(environ={})
    assert proxy == HttpsProxy("proxy.example.net", 3128, source="est.proxy")


def test_a_proxy_user_with_a_password_file(tmp_path: Path) -> None:
    (tmp_path / "proxy-pw").write_text(SECRET + "\n")
    config = est(
        'proxy = "http://dev@proxy.example.net:3128"\nproxy_password_file = "proxy-pw"',
        base_dir=tmp_path,
    )
    assert config.proxy_password_file == tmp_path / "proxy-pw"
    assert SECRET not in repr(config)
    proxy = config.https_proxy(environ={})
    assert proxy is not None
    assert (proxy.username, proxy.password) == ("dev", SECRET)
    assert SECRET not in repr(proxy)
    # registered with the log redaction once read
    assert redact(f"said {SECRET}") == "said [REDACTED]"


def test_the_password_variable_is_read_at_use(monkeypatch: pytest.MonkeyPatch) -> None:
    config = est('proxy = "http://dev@proxy:3128"\nproxy_password_env = "PROXY_PW"')
    monkeypatch.delenv("PROXY_PW", raising=False)
    with pytest.raises(ConfigError, match=r"est\.proxy_password_env: environment variable"):
        config.https_proxy(environ={})
    monkeypatch.setenv("PROXY_PW", SECRET)
    proxy = config.https_proxy(environ={})
    assert proxy is not None and proxy.password == SECRET


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ("proxy = 3128", "est.proxy: expected a string, got integer"),
        ('proxy = "proxy:3128"', "est.proxy: proxy URL 'proxy:3128': only an HTTP CONNECT"),
        ('proxy = "https://proxy:3128"', "est.proxy: proxy URL 'https://proxy:3128': TLS to"),
        ('proxy = "http://proxy"', "est.proxy: proxy URL 'http://proxy' needs a port"),
        ('proxy = "ENV"', "est.proxy: proxy URL 'ENV': only an HTTP CONNECT"),
        (
            'proxy = "http://u:hunter2@proxy:3128"',
            "est.proxy: must not carry a password: put it in est.proxy_password_file",
        ),
        (
            'proxy = "http://u@proxy:3128"',
            "est.proxy_password_file: est.proxy names a user without proxy_password_file",
        ),
        ('proxy_password_env = "P"', "est.proxy: required when a proxy password is configured"),
        (
            'proxy = "http://proxy:3128"\nproxy_password_env = "P"',
            "est.proxy: the proxy password needs a user",
        ),
        (
            'proxy = "http://u@proxy:3128"\nproxy_password_env = "P"\nproxy_password_file = "f"',
            "est.proxy_password_env: set only one",
        ),
        (
            'proxy = "http://u@proxy:3128"\nproxy_password_env = "A B"',
            "est.proxy_password_env: not an environment variable name",
        ),
        ('proxy = "env"\nproxy_password_env = 7', "est.proxy_password_env: expected a string"),
        ('proxy = "env"\nproxy_password_file = 7', "est.proxy_password_file: expected a string"),
    ],
)
def test_refused_at_load_time(lines: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        est(lines)
    assert str(info.value).startswith(f"<string>: {message}"), str(info.value)
    assert "hunter2" not in str(info.value)


def test_empty_password_keys_are_unset() -> None:
    config = est('proxy = "http://proxy:3128"\nproxy_password_file = ""\nproxy_password_env = ""')
    assert (config.proxy_password_file, config.proxy_password_env) == (None, None)


# -- est.proxy = "env" --------------------------------------------------------------------------


def test_env_mode_uses_https_proxy() -> None:
    config = est('proxy = "env"')
    assert config.https_proxy(environ={"HTTPS_PROXY": "proxy:3128"}) == HttpsProxy(
        "proxy", 3128, source="HTTPS_PROXY"
    )
    assert config.https_proxy(environ={}) is None
    assert config.https_proxy(environ={"HTTP_PROXY": "http://proxy:3128"}) is None


def test_env_mode_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("https_proxy", "http://lower:1")
    monkeypatch.setenv("HTTPS_PROXY", "http://upper:2")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert est('proxy = "env"').https_proxy() == HttpsProxy("lower", 1, source="https_proxy")


@pytest.mark.parametrize(
    ("url", "no_proxy", "direct"),
    [
        (URL, "example.net", True),
        (URL, "other.example", False),
        ("https://est.example.net:8443", "est.example.net:8443", True),
        ("https://est.example.net:8443", "est.example.net:443", False),
        (URL, "est.example.net:443", True),  # the https default port
        ("https://192.0.2.7", "192.0.2.0/24", True),
        ("https://[2001:db8::7]", "2001:db8::/32", True),
        ("https://[2001:db8::7]", "[2001:db8::7]", True),
    ],
)
def test_env_mode_honours_no_proxy(url: str, no_proxy: str, direct: bool) -> None:
    proxy = est('proxy = "env"', url=url).https_proxy(
        environ={"HTTPS_PROXY": "http://proxy:3128", "NO_PROXY": no_proxy}
    )
    assert (proxy is None) is direct


def test_env_credentials_in_the_url() -> None:
    proxy = est('proxy = "env"').https_proxy(
        environ={"HTTPS_PROXY": f"http://dev:{SECRET}@proxy:3128"}
    )
    assert proxy is not None and (proxy.username, proxy.password) == ("dev", SECRET)
    assert redact(SECRET) == "[REDACTED]"


def test_env_user_with_the_password_key(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text(SECRET)
    config = est('proxy = "env"\nproxy_password_file = "pw"', base_dir=tmp_path)
    proxy = config.https_proxy(environ={"HTTPS_PROXY": "http://dev@proxy:3128"})
    assert proxy is not None and (proxy.username, proxy.password) == ("dev", SECRET)


@pytest.mark.parametrize(
    ("value", "password_file", "message"),
    [
        ("http://proxy", False, "HTTPS_PROXY: proxy URL 'http://proxy' needs a port"),
        ("socks5://proxy:1080", False, "HTTPS_PROXY: proxy URL 'socks5://proxy:1080': only"),
        ("http://u:hunter2@proxy:x", False, "HTTPS_PROXY: malformed proxy URL 'http://u:[REDA"),
        ("http://dev@proxy:3128", False, "HTTPS_PROXY: names a proxy user without a password"),
        ("http://proxy:3128", True, "HTTPS_PROXY: the proxy password needs a user"),
        ("http://u:hunter2@proxy:3128", True, "HTTPS_PROXY: carries a password and so does"),
    ],
)
def test_env_values_refused_at_use(
    tmp_path: Path, value: str, password_file: bool, message: str
) -> None:
    (tmp_path / "pw").write_text(SECRET)
    lines = 'proxy = "env"' + ('\nproxy_password_file = "pw"' if password_file else "")
    with pytest.raises(ConfigError) as info:
        est(lines, base_dir=tmp_path).https_proxy(environ={"HTTPS_PROXY": value})
    assert str(info.value).startswith(message), str(info.value)
    assert "hunter2" not in str(info.value) and SECRET not in str(info.value)
