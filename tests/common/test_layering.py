"""The core never imports the virtual SIM or the test server (import-linter checks the whole
graph in CI: pyproject.toml [tool.importlinter]; this is the quick local check)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "est_agent"
TEST_DOUBLES = ("est_agent.sim", "est_agent.testserver")
# "sim:<file>" readers are registered by est_agent.sim itself (transport/registry.py); cli/ is
# the front end of every part, the virtual SIM included, and api.py (the public API) offers
# sim: readers the way the CLI does (est_agent.sim.register(), nothing of the card model).
ALLOWED: set[str] = {"api.py"}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_core_does_not_import_test_doubles() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.split("/")[0] in ("sim", "testserver", "cli") or rel in ALLOWED:
            continue
        bad = [m for m in imports_of(path) if m.startswith(TEST_DOUBLES)]
        if bad:
            offenders.append(f"{rel}: {bad}")
    assert not offenders


def test_card_layer_has_no_network_or_http_imports() -> None:
    for path in (PACKAGE / "card").rglob("*.py"):
        imported = imports_of(path)
        assert not {"httpx", "socket", "ssl", "smartcard"} & imported, path.name
