"""The command line a workflow command is parsed with (cli/main.py build_parser(argv)).

For `enroll`, `renew`, `run` and `status` the parser is built without the other commands'
parsers (the daily `run` need not pay for them): whatever such a command line parses to, prints
as help or is refused with must be what the whole parser gives.
"""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from est_agent.cli.main import build_parser

WORKFLOW = ("enroll", "renew", "run", "status")


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    (commands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    choice: argparse.ArgumentParser = commands.choices[name]
    return choice


def _parsed(parser: argparse.ArgumentParser, argv: list[str]) -> dict[str, Any]:
    args = vars(parser.parse_args(argv))
    func = args.pop("func")
    return {**args, "func": [cell.cell_contents for cell in func.__closure__ or ()]}


def _outcome(
    parser: argparse.ArgumentParser, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> tuple[object, str, str]:
    try:
        parser.parse_args(argv)
    except SystemExit as exc:
        out, err = capsys.readouterr()
        return exc.code, out, err
    raise AssertionError(f"{argv} parsed")


def test_the_reduced_parser_has_only_the_workflow_commands() -> None:
    reduced = build_parser(["run"])
    (commands,) = (a for a in reduced._actions if isinstance(a, argparse._SubParsersAction))
    assert sorted(commands.choices) == sorted(WORKFLOW)
    (full_commands,) = (
        a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    )
    assert {"card", "csr", "sim", "demo", "cacerts", "csrattrs", *WORKFLOW} <= set(
        full_commands.choices
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["run"],
        ["run", "--config", "/tmp/x.toml", "--json", "-vv", "--log-format", "json"],
        ["renew", "--force", "--config", "c.toml"],
        ["enroll", "-v"],
        ["status", "--json"],
    ],
)
def test_a_workflow_command_line_parses_as_with_the_whole_parser(argv: list[str]) -> None:
    assert _parsed(build_parser(argv), argv) == _parsed(build_parser(), argv)
    assert _parsed(build_parser(argv), argv)["command"] == argv[0]


@pytest.mark.parametrize("name", WORKFLOW)
def test_a_workflow_command_help_is_the_whole_parser_help(name: str) -> None:
    reduced = _subparser(build_parser([name]), name).format_help()
    assert reduced == _subparser(build_parser(), name).format_help()
    assert f"usage: est-agent {name} [-h]" in reduced


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--bogus"],
        ["renew", "--force=yes"],
        ["status", "--log-format", "xml"],
        ["run", "extra"],
        ["enroll", "--help"],
    ],
)
def test_a_refused_workflow_command_line_reads_as_with_the_whole_parser(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    reduced = _outcome(build_parser(argv), argv, capsys)
    assert reduced == _outcome(build_parser(), argv, capsys)
    assert reduced[0] in (0, 2)
