"""PEM export and deploy hook: explicit environment, no shell, bounded output, kills on timeout,
and neither ever undoes (or raises over) an installed credential."""

from __future__ import annotations

import datetime
import logging
import os
import re
import stat
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509

from est_agent import fileio, hooks
from est_agent.errors import InputError
from est_agent.hooks import (
    HOOK_ENV_NAMES,
    OUTPUT_EXCERPT_BYTES,
    check_hook_command,
    deploy_new_certificate,
    hook_environment,
    run_deploy_hook,
    write_pem_export,
)
from tests.certs import certificate, p256_key

NOT_AFTER = datetime.datetime(2027, 5, 1, 12, 30, 15, tzinfo=datetime.UTC)
HOOK_ARGS = {
    "slot": "op-b",
    "key": "iotsafe:key-id=03",
    "serial": "0a1b2c",
    "not_after": NOT_AFTER,
    "pem_path": Path("/etc/est-agent/device.pem"),
    "subject": "CN=8944500000000000001",
}
ENV = "/usr/bin/env"


# --- helpers ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chain() -> list[x509.Certificate]:
    # exact subjects (EST_AGENT_SUBJECT is checked as "CN=device-1"): not a trustme chain
    ca_key, month = p256_key(), datetime.timedelta(days=30)
    ca = certificate(ca_key, ca_key, cn="unit-test CA", ca=True, lifetime=month)
    leaf = certificate(p256_key(), ca_key, cn="device-1", issuer_cn="unit-test CA", lifetime=month)
    return [leaf, ca]


def _script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def _env_of(stdout: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in stdout.splitlines())


def _alive(pid: int) -> bool:
    # A killed child whose parent died first may stay a zombie if PID 1 does not reap it: that
    # is dead for this purpose.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _wait_dead(pid: int, timeout_s: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def parent_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """An agent environment full of things a hook must not see."""
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setenv("LANG", "C.UTF-8")
    monkeypatch.setenv("EST_BASIC_PASSWORD", "hunter2-secret")
    monkeypatch.setenv("HOME", "/root")
    monkeypatch.setenv("HTTPS_PROXY", "http://user:pw@proxy:3128")
    monkeypatch.setenv("EST_AGENT_SLOT", "stale-from-parent")


# --- environment ------------------------------------------------------------------------------


@pytest.mark.usefixtures("parent_env")
def test_hook_gets_exactly_the_documented_environment() -> None:
    result = run_deploy_hook([ENV], **HOOK_ARGS)  # type: ignore[arg-type]
    assert result.ok, result
    assert _env_of(result.stdout) == {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "EST_AGENT_SLOT": "op-b",
        "EST_AGENT_KEY": "iotsafe:key-id=03",
        "EST_AGENT_SERIAL": "0A1B2C",
        "EST_AGENT_NOT_AFTER": "2027-05-01T12:30:15Z",
        "EST_AGENT_PEM": "/etc/est-agent/device.pem",
        "EST_AGENT_SUBJECT": "CN=8944500000000000001",
    }
    assert "hunter2-secret" not in result.stdout
    assert set(HOOK_ENV_NAMES) <= set(_env_of(result.stdout))


def test_readme_documents_exactly_the_hook_variables() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    documented = re.findall(r"^\| `(EST_AGENT_[A-Z_]+)` \|", readme, flags=re.MULTILINE)
    assert documented == list(HOOK_ENV_NAMES)


def test_without_lang_or_path_in_the_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LANG", raising=False)
    monkeypatch.delenv("PATH", raising=False)
    env = hook_environment(**HOOK_ARGS)  # type: ignore[arg-type]
    assert "LANG" not in env
    assert env["PATH"] == hooks.DEFAULT_PATH


@pytest.mark.usefixtures("parent_env")
def test_base_env_adds_but_cannot_override_est_agent_names() -> None:
    env = hook_environment(
        **HOOK_ARGS,  # type: ignore[arg-type]
        base_env={"SERVICE": "mosquitto", "PATH": "/opt/bin", "EST_AGENT_SERIAL": "FF"},
    )
    assert env["SERVICE"] == "mosquitto"
    assert env["PATH"] == "/opt/bin"
    assert env["EST_AGENT_SERIAL"] == "0A1B2C"
    assert "EST_BASIC_PASSWORD" not in env


def test_no_export_gives_an_empty_pem_variable() -> None:
    env = hook_environment(**{**HOOK_ARGS, "pem_path": None})  # type: ignore[arg-type]
    assert env["EST_AGENT_PEM"] == ""


def test_not_after_is_converted_to_utc_and_naive_means_utc() -> None:
    cet = datetime.timezone(datetime.timedelta(hours=2))
    aware = datetime.datetime(2027, 5, 1, 14, 30, 15, tzinfo=cet)
    naive = datetime.datetime(2027, 5, 1, 12, 30, 15)
    for value in (aware, naive):
        env = hook_environment(**{**HOOK_ARGS, "not_after": value})  # type: ignore[arg-type]
        assert env["EST_AGENT_NOT_AFTER"] == "2027-05-01T12:30:15Z"


def test_serial_must_be_hex() -> None:
    with pytest.raises(InputError, match="hexadecimal"):
        hook_environment(**{**HOOK_ARGS, "serial": "0a:1b"})  # type: ignore[arg-type]


def test_nul_from_a_hostile_subject_does_not_break_the_run() -> None:
    result = run_deploy_hook(
        [ENV],
        **{**HOOK_ARGS, "subject": "CN=evil\0injected"},  # type: ignore[arg-type]
    )
    assert result.ok, result
    assert _env_of(result.stdout)["EST_AGENT_SUBJECT"] == "CN=evil\ufffdinjected"


def test_arguments_reach_the_hook_verbatim_without_a_shell() -> None:
    result = run_deploy_hook(["/usr/bin/printf", "%s|", "$(id)", "a b", "*"], **HOOK_ARGS)  # type: ignore[arg-type]
    assert result.ok, result
    assert result.stdout == "$(id)|a b|*|"


def test_bare_name_is_looked_up_in_the_hook_path(tmp_path: Path) -> None:
    _script(tmp_path, "my-hook", 'echo "ran $EST_AGENT_SLOT"\n')
    result = run_deploy_hook(
        ["my-hook"],
        **HOOK_ARGS,  # type: ignore[arg-type]
        base_env={"PATH": str(tmp_path)},
    )
    assert result.ok, result
    assert result.stdout == "ran op-b\n"


def test_a_bare_name_keeps_its_argv0() -> None:
    result = run_deploy_hook(
        ["cat", "/proc/self/cmdline"],
        **HOOK_ARGS,  # type: ignore[arg-type]
        base_env={"PATH": "/usr/bin:/bin"},
    )
    assert result.ok, result
    assert result.stdout == "cat\0/proc/self/cmdline\0"


# --- failures are results, not exceptions -----------------------------------------------------


def test_nonzero_exit_is_reported(tmp_path: Path) -> None:
    hook = _script(tmp_path, "fail", "echo partial; echo 'reload failed' >&2; exit 3\n")
    result = run_deploy_hook([str(hook)], **HOOK_ARGS)  # type: ignore[arg-type]
    assert not result.ok
    assert result.exit_status == 3
    assert result.stdout == "partial\n"
    assert result.stderr == "reload failed\n"
    assert not result.timed_out
    assert result.error is None
    assert "exited with status 3" in result.describe()


def test_killed_by_a_signal_is_described(tmp_path: Path) -> None:
    hook = _script(tmp_path, "suicide", "kill -9 $$\n")
    result = run_deploy_hook([str(hook)], **HOOK_ARGS)  # type: ignore[arg-type]
    assert result.exit_status == -9
    assert "killed by SIGKILL" in result.describe()


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda d: d / "missing-hook", "does not exist"),
        (lambda d: d, "is a directory"),
        (lambda d: _plain_file(d, 0o644), "is not executable"),
        (lambda d: _plain_file(d, 0o755), "cannot start"),  # no #! line: ENOEXEC
    ],
)
def test_unrunnable_hook_gives_a_clear_error(tmp_path: Path, make: object, expected: str) -> None:
    path = make(tmp_path)  # type: ignore[operator]
    result = run_deploy_hook([str(path)], **HOOK_ARGS)  # type: ignore[arg-type]
    assert not result.ok
    assert result.exit_status is None
    assert result.error is not None
    assert expected in result.error
    assert expected in result.describe()


def _plain_file(directory: Path, mode: int) -> Path:
    path = directory / "not-a-program"
    path.write_bytes(b"\x00\x01 not an executable format\n")
    path.chmod(mode)
    return path


def test_bare_name_not_in_path_and_empty_argv() -> None:
    result = run_deploy_hook(["no-such-hook-xyz"], **HOOK_ARGS)  # type: ignore[arg-type]
    assert result.error is not None
    assert "not found in PATH" in result.error
    assert run_deploy_hook([], **HOOK_ARGS).error == "no command given"  # type: ignore[arg-type]


def test_check_hook_command(tmp_path: Path) -> None:
    assert check_hook_command([ENV]) is None
    assert check_hook_command(["env"], path="/usr/bin") is None
    assert "does not exist" in (check_hook_command([str(tmp_path / "x")]) or "")


# --- timeouts and output ----------------------------------------------------------------------


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    hook = _script(tmp_path, "hang", f"sleep 30 &\necho $! > {pid_file}\nsleep 30\n")
    started = time.monotonic()
    result = run_deploy_hook([str(hook)], **HOOK_ARGS, timeout_s=0.5)  # type: ignore[arg-type]
    assert time.monotonic() - started < 5
    assert result.timed_out
    assert not result.ok
    assert result.exit_status == -15  # SIGTERM was enough for sh
    assert "timed out" in result.describe()
    assert _wait_dead(int(pid_file.read_text()))


def test_timeout_escalates_to_sigkill(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hooks, "_KILL_GRACE_S", 0.2)
    ready = tmp_path / "ready"
    hook = _script(
        tmp_path, "stubborn", f"trap '' TERM\ntouch {ready}\nwhile :; do sleep 0.05; done\n"
    )
    result = run_deploy_hook([str(hook)], **HOOK_ARGS, timeout_s=0.5)  # type: ignore[arg-type]
    assert ready.exists()
    assert result.timed_out
    assert result.exit_status == -9


def test_timeout_with_pipes_closed(tmp_path: Path) -> None:
    hook = _script(tmp_path, "quiet-hang", "exec >/dev/null 2>&1\nexec sleep 30\n")
    started = time.monotonic()
    result = run_deploy_hook([str(hook)], **HOOK_ARGS, timeout_s=0.5)  # type: ignore[arg-type]
    assert result.timed_out
    assert time.monotonic() - started < 5


def test_background_child_holding_the_pipes_does_not_stall_the_agent(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    hook = _script(tmp_path, "daemonize", f"sleep 30 &\necho $! > {pid_file}\necho started\n")
    started = time.monotonic()
    try:
        result = run_deploy_hook([str(hook)], **HOOK_ARGS, timeout_s=20)  # type: ignore[arg-type]
        assert time.monotonic() - started < 5
        assert result.ok, result
        assert result.stdout == "started\n"
    finally:
        os.kill(int(pid_file.read_text()), 9)


def test_output_is_bounded_to_its_tail() -> None:
    code = "import sys; sys.stdout.write('x' * 200000 + 'END'); sys.stderr.write('e' * 10)"
    result = run_deploy_hook([sys.executable, "-c", code], **HOOK_ARGS)  # type: ignore[arg-type]
    assert result.ok, result
    assert len(result.stdout) == OUTPUT_EXCERPT_BYTES
    assert result.stdout.endswith("xEND")
    assert result.stdout_truncated
    assert result.stderr == "e" * 10
    assert not result.stderr_truncated


def test_undecodable_output_is_replaced_not_fatal() -> None:
    code = "import sys; sys.stdout.buffer.write(b'ok\\xff\\xfe')"
    result = run_deploy_hook([sys.executable, "-c", code], **HOOK_ARGS)  # type: ignore[arg-type]
    assert result.stdout == "ok\ufffd\ufffd"


# --- PEM export -------------------------------------------------------------------------------


def test_export_writes_leaf_then_chain_0644_whatever_the_umask(
    tmp_path: Path, chain: list[x509.Certificate]
) -> None:
    target = tmp_path / "device.pem"
    old_umask = os.umask(0o077)
    try:
        result = write_pem_export(target, chain)
    finally:
        os.umask(old_umask)
    assert result.ok, result.error
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert x509.load_pem_x509_certificates(target.read_bytes()) == chain
    assert [p.name for p in tmp_path.iterdir()] == ["device.pem"]


def test_export_replaces_by_rename_of_a_complete_file(
    tmp_path: Path, chain: list[x509.Certificate], monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "device.pem"
    target.write_text("old\n")
    old_inode = target.stat().st_ino
    seen: list[tuple[Path, int, bytes]] = []
    real_replace = os.replace

    def spy(src: str, dst: Path) -> None:
        # At the moment of the switch the new file is complete and already 0644.
        seen.append((Path(src).parent, stat.S_IMODE(os.stat(src).st_mode), Path(src).read_bytes()))
        assert target.read_text() == "old\n"
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    assert write_pem_export(target, chain).ok
    assert seen == [(tmp_path, 0o644, hooks.pem_bundle(chain))]
    assert target.stat().st_ino != old_inode


def test_export_failure_leaves_the_old_file_and_no_temp(
    tmp_path: Path, chain: list[x509.Certificate], monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "device.pem"
    target.write_text("old\n")

    def failing_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    result = write_pem_export(target, chain)
    assert not result.ok
    assert result.error is not None
    assert str(target) in result.error
    assert "No space left on device" in result.error
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["device.pem"]


def test_directory_fsync_refused_is_only_a_warning(
    tmp_path: Path,
    chain: list[x509.Certificate],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def refuse(directory: Path) -> None:
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(fileio, "_fsync_directory", refuse)  # the writer is fileio's now
    target = tmp_path / "device.pem"
    assert write_pem_export(target, chain).ok
    assert x509.load_pem_x509_certificates(target.read_bytes()) == chain
    assert "cannot fsync" in caplog.text


def test_export_into_a_missing_directory_is_a_result(
    tmp_path: Path, chain: list[x509.Certificate]
) -> None:
    result = write_pem_export(tmp_path / "nope" / "device.pem", chain)
    assert not result.ok
    assert "cannot write the PEM export" in (result.error or "")


def test_export_replaces_a_symlink_not_its_target(
    tmp_path: Path, chain: list[x509.Certificate]
) -> None:
    elsewhere = tmp_path / "elsewhere.pem"
    elsewhere.write_text("keep\n")
    link = tmp_path / "device.pem"
    link.symlink_to(elsewhere)
    assert write_pem_export(link, chain).ok
    assert not link.is_symlink()
    assert elsewhere.read_text() == "keep\n"


def test_export_of_nothing_is_a_caller_bug(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no certificate"):
        write_pem_export(tmp_path / "x.pem", [])


# --- export + hook together -------------------------------------------------------------------


@pytest.mark.usefixtures("parent_env")
def test_deploy_exports_then_runs_the_hook_with_the_certificate_values(
    tmp_path: Path, chain: list[x509.Certificate], caplog: pytest.LogCaptureFixture
) -> None:
    target = tmp_path / "device.pem"
    caplog.set_level(logging.INFO, logger="est_agent.hooks")
    report = deploy_new_certificate(
        chain, slot="op-a", key="iotsafe:key-id=02", export_path=target, hook_argv=[ENV]
    )
    assert report.ok
    assert report.export is not None
    assert report.hook is not None
    env = _env_of(report.hook.stdout)
    leaf = chain[0]
    assert env["EST_AGENT_SLOT"] == "op-a"
    assert env["EST_AGENT_KEY"] == "iotsafe:key-id=02"
    assert int(env["EST_AGENT_SERIAL"], 16) == leaf.serial_number
    assert env["EST_AGENT_PEM"] == str(target)
    assert env["EST_AGENT_SUBJECT"] == "CN=device-1"
    assert datetime.datetime.fromisoformat(env["EST_AGENT_NOT_AFTER"]) == leaf.not_valid_after_utc
    assert x509.load_pem_x509_certificates(target.read_bytes())[0] == leaf


def test_deploy_hook_gets_no_pem_when_the_export_failed(
    tmp_path: Path, chain: list[x509.Certificate], caplog: pytest.LogCaptureFixture
) -> None:
    report = deploy_new_certificate(
        chain,
        slot="op-a",
        key="iotsafe:key-id=02",
        export_path=tmp_path / "missing" / "x.pem",
        hook_argv=[ENV],
    )
    assert not report.ok
    assert report.export is not None
    assert not report.export.ok
    assert report.hook is not None
    assert report.hook.ok
    assert _env_of(report.hook.stdout)["EST_AGENT_PEM"] == ""
    assert "cannot write the PEM export" in caplog.text


def test_failing_hook_is_logged_as_a_warning_and_nothing_raises(
    tmp_path: Path, chain: list[x509.Certificate], caplog: pytest.LogCaptureFixture
) -> None:
    hook = _script(tmp_path, "fail", "echo 'nginx: reload failed' >&2; exit 1\n")
    report = deploy_new_certificate(
        chain, slot="op-b", key="iotsafe:key-id=03", export_path=None, hook_argv=[str(hook)]
    )
    assert report.export is None
    assert report.hook is not None
    assert report.hook.exit_status == 1
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "stays active" in record.getMessage()
    assert "nginx: reload failed" in record.getMessage()
    assert record.__dict__["slot"] == "op-b"


def test_deploy_with_nothing_configured(chain: list[x509.Certificate]) -> None:
    report = deploy_new_certificate(
        chain, slot="op-a", key="iotsafe:key-id=02", export_path=None, hook_argv=()
    )
    assert report == hooks.DeployReport(None, None)
    assert report.ok
