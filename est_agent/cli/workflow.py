"""`est-agent enroll | renew | run | status`: the commands a device (and its timer) runs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from est_agent.workflow.agent import Agent, Result


def _agent(args: argparse.Namespace, total_steps: int) -> Agent:
    from est_agent.config import load_config
    from est_agent.logs import Progress
    from est_agent.workflow.agent import Agent

    config = load_config(Path(args.config))
    progress = Progress(total_steps, args.log_format)
    return Agent(config, progress=progress.step)


def _print_result(args: argparse.Namespace, result: Result) -> int:
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return 0
    messages = {
        "enrolled": "enrolled",
        "renewed": "renewed",
        "already-enrolled": "already enrolled (valid credential on the SIM; nothing to do)",
        "not-due": "not due for renewal",
    }
    print(f"{messages.get(result.outcome, result.outcome)}: slot {result.slot}")
    print(f"  subject    {result.subject}")
    print(f"  serial     {result.serial}")
    print(f"  not after  {result.not_after:%Y-%m-%d %H:%M:%S %Z}")
    if result.renew_at is not None:
        print(f"  renew at   {result.renew_at:%Y-%m-%d %H:%M:%S %Z}")
    if result.hook is not None:
        print(f"  deploy hook exit status {result.hook.get('exit_status')}")
    return 0


def enroll(args: argparse.Namespace) -> int:
    return _print_result(args, _agent(args, 6).enroll())


def renew(args: argparse.Namespace) -> int:
    return _print_result(args, _agent(args, 6).renew(force=args.force))


def run(args: argparse.Namespace) -> int:
    return _print_result(args, _agent(args, 6).run())


def status(args: argparse.Namespace) -> int:
    report = _agent(args, 1).status()
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0
    print(f"reader:      {report.reader}")
    print(f"ICCID:       {report.iccid or '-'}")
    print(f"applet:      IoT SAFE {report.aid}")
    print(f"active slot: {report.active or 'none'}")
    print(f"renew at:    {report.renew_at or '-'}")
    if report.pending:
        print(
            f"pending:     {report.pending['operation']} for slot {report.pending['slot']}, "
            f"retry after {report.pending['retry_at']}"
        )
    for slot in report.slots:
        line = f"slot {slot.name}: {slot.status}"
        if slot.subject:
            line += f", {slot.subject}, serial {slot.serial}, not after {slot.not_after}"
        if slot.detail and slot.status != "valid":
            line += f" ({slot.detail})"
        print(line)
    return 0
