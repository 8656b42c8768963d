"""``edgeserve status``: the technician's one screen, also when the daemon is down.

Exit 0 healthy, 1 degraded, 3 daemon unreachable (and it still prints what the state
files say was live, and the telemetry buffer's backlog read from its file).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edgeserve.cli.common import add_command
from edgeserve.cli.management import call, client_options, daemon_config, management_target
from edgeserve.errors import EdgeserveError


def register(commands: Any) -> None:
    parser = add_command(
        commands,
        "status",
        "Daemon, models, traffic and system at a glance (exit 0 healthy, 1 degraded, "
        "3 daemon unreachable).",
        "edgeserve status --json",
    )
    client_options(parser, timeout=10.0)


def run(args: argparse.Namespace) -> int:
    from edgeserve.telemetry import status

    target, _ = management_target(args)
    try:
        document = call(args, lambda c: c.status())
    except ConnectionError as exc:
        document = offline_status(args, target, str(exc))
    print(status.render_json(document) if args.json else status.render_table(document))
    return status.exit_code(document)


def offline_status(args: argparse.Namespace, address: str, reason: str) -> dict[str, Any]:
    """The document for a daemon that is down: the persisted live set, the machine, the
    telemetry buffer (opened read-only), the fleet link (not connected)."""
    import time

    from edgeserve.config import default_device_id
    from edgeserve.store.model_store import ModelStore
    from edgeserve.telemetry import status
    from edgeserve.telemetry.buffer import read_stats
    from edgeserve.telemetry.sampler import sample

    config = daemon_config(args)
    state_dir = Path(config.state_dir)
    notes = [reason]
    entries: list[Any] = []
    store = ModelStore(state_dir / "models", None, live_state_path=state_dir / "live.json")
    try:
        entries = store.read_live_state()
    except EdgeserveError as exc:
        notes.append(str(exc))
    system = sample(state_dir)
    system["process"] = None  # this CLI process, not the daemon: nothing to report
    db = config.telemetry_db()
    now = time.time()
    telemetry = status.telemetry_section(
        read_stats(db), enabled=config.telemetry.enabled, db=db, now=now
    )
    fleet = status.fleet_section(
        device_id=config.fleet.device_id or default_device_id(), broker=config.fleet.broker
    )
    return status.build_status(
        daemon=status.DaemonFacts(up=False, address=address),
        models=status.offline_models(entries),
        system=system,
        notes=notes,
        telemetry=telemetry,
        fleet=fleet,
        now=now,
    )
