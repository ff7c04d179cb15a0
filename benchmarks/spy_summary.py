"""Where an agent process spends its wall time: a py-spy raw profile (``py-spy record --idle
--format raw``, as ``enroll_realistic.py --profile-dir`` writes) ranked by cost, and
``-X importtime`` of a command ranked by top-level import.

Every sample falls in exactly one category, checked in this order: interpreter start-up
(``site``), an import (by the package whose module body runs, i.e. the deepest ``<module>``
frame, and the est_agent module that imported it), card time (the simulated card's sleep in
est_agent/sim/transport.py), card link wait (pyserial waiting for the modem's answer),
network wait (a socket read, connect or ``select``: py-spy shows the Python caller of the
blocking call), else CPU, credited to the deepest est_agent frame and the leaf's package.

    .venv/bin/python benchmarks/spy_summary.py PROFILE.txt [--rate 500] [--top 12]
    .venv/bin/python benchmarks/spy_summary.py --importtime -- est-agent run --config ...
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
_NET_FUNCS = ("recv", "recv_into", "read", "connect", "create_connection", "select", "poll",
              "sendall", "send", "accept", "do_handshake")  # fmt: skip
_NET_FILES = ("socket.py", "ssl.py", "selectors.py")


def _parse(frame: str) -> tuple[str, str]:
    match = _FRAME.match(frame)
    return (match["func"], match["file"]) if match else (frame, "")


def _package(path: str) -> str:
    """Top-level package of a frame's file (py-spy shows paths relative to sys.path)."""
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    if "est_agent/" in path:
        parts = path.split("est_agent/", 1)[1].split("/")
        return "est_agent." + parts[0].removesuffix(".py")
    if not path:
        return "?"
    if path.startswith("/"):
        return "stdlib:" + Path(path).name.removesuffix(".py")
    return path.split("/", 1)[0].removesuffix(".py")


def categorize(stack: list[str]) -> tuple[str, str]:
    """(category, detail) of one sample, frames root first."""
    frames = [_parse(f) for f in stack]
    if frames and frames[0][1].startswith("<frozen site"):
        return "start-up (site, .pth)", ""
    if any(func == "_find_and_load" for func, _ in frames):
        modules = [p for f, p in frames if f == "<module>" and not p.startswith("<")]
        if not modules:
            return "imports", "?"
        # the package whose module body runs now, and the est_agent module that asked for it
        mine = [p for p in modules[:-1] if "est_agent/" in p and not p.endswith("__main__.py")]
        outer = _package(mine[-1]) if mine else ""
        inner = _package(modules[-1])
        return "imports", inner if inner == outer or not outer else f"{inner}  <- {outer}"
    leaf_func, leaf_file = frames[-1] if frames else ("", "")
    leaf_name = leaf_func.rsplit(".", 1)[-1]
    if leaf_file.endswith("sim/transport.py") and leaf_name == "_transmit_within":
        return "card time (simulated)", ""
    if leaf_file.endswith(("serialposix.py", "transport/modem.py", "transport/at.py")):
        return "card link wait (modem pty)", leaf_func
    if leaf_name in _NET_FUNCS or leaf_file.endswith(_NET_FILES):
        where = next(
            (f"{f} ({_package(p)})" for f, p in reversed(frames) if "est_agent/" in p), leaf_func
        )
        return "network wait", where
    mine = [(f, p) for f, p in frames if "est_agent/" in p]
    if mine:
        func, path = mine[-1]
        return "CPU", f"{func} ({path.split('est_agent/', 1)[1]}) -> {_package(leaf_file)}"
    return "CPU", f"{leaf_func} ({_package(leaf_file)})"


def summarize(path: Path, rate: float, top: int) -> str:
    categories: collections.Counter[str] = collections.Counter()
    details: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    total = 0
    for line in path.read_text().splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not stack_text or not count_text.isdigit():
            continue
        count = int(count_text)
        category, detail = categorize(stack_text.split(";"))
        categories[category] += count
        details[category][detail] += count
        total += count
    ms = 1000 / rate
    out = [f"{path.name}: {total} samples = {total * ms:.0f} ms of wall time"]
    for category, count in categories.most_common():
        out.append(f"  {count * ms:7.0f} ms {100 * count / total:5.1f} %  {category}")
        for detail, n in details[category].most_common(top):
            if detail:
                out.append(f"      {n * ms:7.0f} ms  {detail}")
    return "\n".join(out)


def importtime(argv: list[str], top: int) -> str:
    """Imports of ``argv`` (a Python command): self time summed by top-level package
    (est_agent by subpackage), and the top-level imports by cumulative time."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", *argv], capture_output=True, text=True, check=False
    )
    by_package: collections.Counter[str] = collections.Counter()
    rows = []
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        head, cumulative_us, name = line.split("|", 2)
        module = name.strip()
        parts = module.split(".")
        package = ".".join(parts[:2]) if parts[0] == "est_agent" else parts[0]
        by_package[package] += int(head.split(":", 1)[1].strip())
        # nesting is shown by two spaces per level after the one that follows the bar
        if not name[1:].startswith(" "):
            rows.append((int(cumulative_us.strip()), module))
    rows.sort(reverse=True)
    total = sum(by_package.values())
    out = [f"-X importtime: {total / 1000:.0f} ms of imports (exit {done.returncode})"]
    out.append("  self time by package:")
    out += [f"    {us / 1000:7.1f} ms  {name}" for name, us in by_package.most_common(top)]
    out.append("  top-level imports (cumulative, the first importer is credited):")
    out += [f"    {us / 1000:7.1f} ms  {name}" for us, name in rows[:top]]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profiles", nargs="*", type=Path)
    parser.add_argument("--rate", type=float, default=500.0, help="py-spy -r of the profile")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--importtime", nargs=argparse.REMAINDER, help="python args to time")
    args = parser.parse_args()
    for path in args.profiles:
        print(summarize(path, args.rate, args.top))
    if args.importtime:
        command = args.importtime[1:] if args.importtime[0] == "--" else args.importtime
        print(importtime(command, args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
