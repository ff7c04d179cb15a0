"""est-agent command line: argparse at the edge, one place mapping errors to exit codes."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("est-agent: not yet wired", file=sys.stderr)
    return 70
