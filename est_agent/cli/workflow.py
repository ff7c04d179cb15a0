"""`est-agent enroll | renew | run | status`: the commands a device (and its timer) runs.

`run` (and `renew` without --force) first try the fast path of workflow/quick.py, which never
imports the EST or certificate stacks; only when something may be due does the full workflow
load.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from est_agent.config import Config
    from est_agent.workflow.agent import Agent
    from est_agent.workflow.result import Result


def _config(args: argparse.Namespace) -> Config:
    from est_agent.config import load_config

    return load_config(Path(args.config))


def _agent(args: argparse.Namespace, config: Config, total_steps: int) -> Agent:
    from est_agent.logs import Progress
    from est_agent.workflow.agent import Agent

    return Agent(config, progress=Progress(total_steps, args.log_format).step)


def _card_link(agent: Agent) -> dict[str, Any]:
    stats = agent.link_stats
    return {
        "apdus": stats.apdus if stats else 0,
        "bytes": stats.bytes_total if stats else 0,
        "signatures": agent.card_signatures,
    }


def _print_result(args: argparse.Namespace, result: Result, card_link: dict[str, Any]) -> int:
    if args.json:
        print(json.dumps({**result.to_json(), "card_link": card_link}, indent=2))
        return 0
    messages = {
        "enrolled": "enrolled",
        "renewed": "renewed",
        "already-enrolled": "already enrolled (valid credential on the SIM; nothing to do)",
        "not-due": "not due for renewal",
        "retry-later": "renewal due; waiting after a failed attempt (renew --force tries now)",
    }
    print(f"{messages.get(result.outcome.value, result.outcome.value)}: slot {result.slot}")
    print(f"  subject    {result.subject}")
    print(f"  serial     {result.serial}")
    print(f"  not after  {result.not_after:%Y-%m-%d %H:%M:%S %Z}")
    if result.renew_at is not None:
        print(f"  renew at   {result.renew_at:%Y-%m-%d %H:%M:%S %Z}")
    if result.next_attempt_at is not None:
        print(f"  next try   {result.next_attempt_at:%Y-%m-%d %H:%M:%S %Z}")
    if result.hook is not None:
        print(f"  deploy hook exit status {result.hook.exit_status}")
    for note in result.notes:
        print(f"  note       {note}")
    return 0


def _quick(args: argparse.Namespace, config: Config) -> int | None:
    from est_agent.workflow.quick import run_if_not_due

    result, stats = run_if_not_due(config, datetime.now(UTC))
    if result is None or stats is None:
        return None
    link = {"apdus": stats.apdus, "bytes": stats.bytes_total, "signatures": 0}
    return _print_result(args, result, link)


def enroll(args: argparse.Namespace) -> int:
    config = _config(args)
    agent = _agent(args, config, 6)
    return _print_result(args, agent.enroll(), _card_link(agent))


def renew(args: argparse.Namespace) -> int:
    config = _config(args)
    if not args.force:
        done = _quick(args, config)
        if done is not None:
            return done
    agent = _agent(args, config, 6)
    # the fast path above already read the card: no second try in the full workflow
    return _print_result(args, agent.renew(force=args.force, use_cache=False), _card_link(agent))


def run(args: argparse.Namespace) -> int:
    config = _config(args)
    done = _quick(args, config)
    if done is not None:
        return done
    agent = _agent(args, config, 6)
    return _print_result(args, agent.run(use_cache=False), _card_link(agent))


def status(args: argparse.Namespace) -> int:
    report = _agent(args, _config(args), 1).status()
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0
    print(f"backend:     {report.backend}")
    print(f"reader:      {report.reader}")
    if report.backend == "iotsafe":
        print(f"ICCID:       {report.iccid or '-'}")
        print(f"applet:      IoT SAFE {report.aid}")
    print(f"active slot: {report.active or 'none'}")
    print(f"renew at:    {report.renew_at or '-'}")
    if report.pending:
        print(
            f"pending:     {report.pending['operation']} for slot {report.pending['slot']}, "
            f"retry after {report.pending['retry_at']}"
        )
    if report.retry:
        retry = report.retry
        when = retry["next_attempt_at"] or "the next run"
        print(
            f"retry:       {retry['failures']} failed attempt(s), last {retry['last_error']}"
            f" (exit {retry['exit_code']}) at {retry['failed_at']}; next attempt {when}"
        )
    if report.deployment:
        deployment = report.deployment
        line = f"deployment:  {deployment['state']}"
        if deployment.get("attempts"):
            line += f" after {deployment['attempts']} attempt(s)"
        if deployment.get("error"):
            line += f" ({deployment['error']})"
        print(line)
    store = report.anchor_store or {}
    if store.get("state") not in (None, "valid", "empty"):
        why = store.get("error") or "; ".join(
            f"{c['file']}: {c['state']}" + (f" ({c['reason']})" if c.get("reason") else "")
            for c in store.get("copies", ())
        )
        print(f"anchor store: {store['state']}: {why}")
    for anchor in report.anchors:
        print(
            f"anchor {anchor.role} ({anchor.source}): {anchor.subject}, not after"
            f" {anchor.not_after}, SHA-256 {anchor.sha256}"
        )
    for slot in report.slots:
        line = f"slot {slot.name}: {slot.status}"
        if slot.subject:
            line += f", {slot.subject}, serial {slot.serial}, not after {slot.not_after}"
        if slot.status != "valid" and (slot.reason or slot.detail):
            line += f" ({slot.reason}: {slot.detail})" if slot.detail else f" ({slot.reason})"
        print(line)
    return 0
