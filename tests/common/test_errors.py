"""Every error class has a documented exit code, and the CLI maps them in one place."""

import re
from pathlib import Path

import est_agent.errors as errors
from est_agent.card.status import error_for_sw
from est_agent.errors import EstAgentError, exit_code_for

README = Path(__file__).resolve().parents[2] / "README.md"


def all_error_classes() -> list[type[EstAgentError]]:
    found: list[type[EstAgentError]] = []
    todo: list[type[EstAgentError]] = [EstAgentError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return [c for c in found if c.__module__ == "est_agent.errors"]


def readme_exit_table() -> dict[str, int]:
    text = README.read_text()
    section = text.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    table: dict[str, int] = {}
    for line in section.splitlines():
        match = re.match(r"\|\s*(\d+)\s*\|([^|]*)\|", line)
        if match:
            for name in re.findall(r"`(\w+)`", match.group(2)):
                table[name] = int(match.group(1))
    return table


def test_every_error_class_is_documented_with_its_exit_code() -> None:
    table = readme_exit_table()
    for cls in all_error_classes():
        if cls is EstAgentError:
            continue
        assert cls.__name__ in table, f"{cls.__name__} is missing from the README exit codes"
        assert table[cls.__name__] == cls.exit_code, cls.__name__


def test_every_error_class_is_exported() -> None:
    names = {c.__name__ for c in all_error_classes()}
    assert names <= set(errors.__all__)


def test_exit_code_for() -> None:
    assert exit_code_for(errors.NoCardError("gone")) == 69
    assert exit_code_for(error_for_sw(0x6982)) == 77
    assert exit_code_for(error_for_sw(0x6D00)) == 76
    assert exit_code_for(errors.EnrollmentPending(30)) == 75
    assert exit_code_for(errors.OutputError("stdout closed")) == 74
    assert exit_code_for(ValueError()) == 70


def test_status_word_error_message() -> None:
    # errors.py has no status-word table (it imports nothing of ours): the card layer's
    # error_for_sw passes the meaning.
    error = error_for_sw(0x6A82, "SELECT")
    assert isinstance(error, errors.NotFoundError)
    assert str(error) == "SELECT: card answered SW 6A82 (file, object or application not found)"
    explicit = errors.StatusWordError(0x6D00, "SIGN", "instruction not supported")
    assert str(explicit) == "SIGN: card answered SW 6D00 (instruction not supported)"
