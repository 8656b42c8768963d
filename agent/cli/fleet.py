"""``edgeserve fleet ...``: the controller side of the fleet (DESIGN §6-7).

Each subcommand is one entry of ``SUBCOMMANDS`` (chosen by ``args.fleet_command``):
``(run, help, example, add_options)``; more subcommands join the table. ``root`` has
actions of its own (``cli/fleet_root.py``, on ``args.root_command``). The broker
options and ``connect_link`` are shared by every subcommand that talks to the broker.

Exit codes: 0 success, 1 the operation failed (a storage error stopped ``collect``), 2
usage error (a bad broker URL, a file that is not a records file, matplotlib missing for
``--plot``, a bad key or root file, a rotation devices would refuse), 3 the broker is not
reachable or refused us.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import re
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edgeserve.cli.common import add_command
from edgeserve.cli.exits import EPILOG, UsageError
from edgeserve.cli.fleet_control import CONTROL_COMMANDS
from edgeserve.cli.fleet_root import root_options, run_root
from edgeserve.fleet.link import FleetLink
from edgeserve.fleet.link_types import LinkError, LinkNotConnected, LinkRefused, LinkTls
from edgeserve.telemetry.collection import RecordStore, parse_time
from edgeserve.telemetry.collector import Collector
from edgeserve.telemetry.plot import require_matplotlib, write_plot
from edgeserve.telemetry.report import archive_baseline, build_report, render_table

DEFAULT_PREFIX = "edgeserve/v1"
SESSION_EXPIRY_S = 7 * 86_400  # what devices publish while the collector is away waits this long
FLEET_EPILOG = EPILOG.replace("daemon not reachable", "daemon (fleet: broker) not reachable")


class BrokerUnreachable(ConnectionError):
    """The broker did not answer or refused us; exits with ``ExitCode.UNREACHABLE``."""


@dataclass(frozen=True)
class Broker:
    host: str
    port: int
    tls: bool


def parse_broker_url(url: str) -> Broker:
    """``mqtt://host[:1883]`` or ``mqtts://host[:8883]``; ``UsageError`` otherwise."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise UsageError(f"--broker: not a broker URL: {url!r}") from None
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise UsageError(
            f"--broker: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT], got {url!r}"
        )
    if parts.username or parts.password:
        raise UsageError("--broker: no credentials in the URL; use --username and --password-file")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise UsageError(f"--broker: a broker URL has no path or query, got {url!r}")
    tls = parts.scheme == "mqtts"
    return Broker(parts.hostname, port or (8883 if tls else 1883), tls)


def broker_options(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    parser.add_argument(
        "--broker", required=required, metavar="URL", help="mqtt://HOST:PORT or mqtts://HOST:PORT"
    )
    parser.add_argument("--client-id", metavar="ID", help="MQTT client id")
    parser.add_argument(
        "--topic-prefix",
        default=DEFAULT_PREFIX,
        metavar="P",
        help=f"topic prefix (default {DEFAULT_PREFIX})",
    )
    parser.add_argument(
        "--ca-file", metavar="F", help="CA certificates for mqtts:// (default: the system's)"
    )
    parser.add_argument("--cert-file", metavar="F", help="client certificate (mqtts://)")
    parser.add_argument("--key-file", metavar="F", help="client key (mqtts://)")
    parser.add_argument("--username", metavar="U")
    parser.add_argument(
        "--password-file", metavar="F", help="a file whose first line is the password"
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds to wait for the broker (default 10)",
    )


def connect_link(args: argparse.Namespace, client_id: str, **options: Any) -> FleetLink:
    """A ``FleetLink`` from the broker options (not started)."""
    broker = parse_broker_url(args.broker)
    files = (args.ca_file, args.cert_file, args.key_file)
    if any(files) and not broker.tls:
        raise UsageError("--ca-file, --cert-file and --key-file need an mqtts:// broker")
    if bool(args.cert_file) != bool(args.key_file):
        raise UsageError("--cert-file and --key-file go together")
    password = None
    if args.password_file:
        try:
            lines = Path(args.password_file).read_text().splitlines()
        except OSError as exc:
            raise UsageError(f"--password-file: {exc.strerror}: {args.password_file}") from None
        password = lines[0] if lines else ""
    try:
        return FleetLink(
            host=broker.host,
            port=broker.port,
            client_id=client_id,
            tls=LinkTls(*files) if broker.tls else None,
            username=args.username,
            password=password,
            **options,
        )
    except LinkError as exc:  # the TLS files could not be loaded
        raise UsageError(str(exc)) from None


async def wait_for_broker(link: FleetLink, args: argparse.Namespace) -> None:
    try:
        await link.wait_connected(args.connect_timeout)
    except (LinkNotConnected, LinkRefused) as exc:
        raise BrokerUnreachable(str(exc)) from None


# -- collect -------------------------------------------------------------------------------


def _collect_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", required=True, metavar="FILE", help="the records file (SQLite)")
    parser.add_argument(
        "--device",
        action="append",
        default=[],
        metavar="ID",
        help="collect only this device (repeatable)",
    )
    broker_options(parser)


def default_client_id(db: str) -> str:
    """Stable per records file, so a restarted collector resumes its broker session."""
    digest = hashlib.sha256(str(Path(db).resolve()).encode()).hexdigest()[:16]
    return f"edgeserve-collect-{digest}"


def _collect(args: argparse.Namespace) -> int:
    return asyncio.run(_collect_async(args))


async def _collect_async(args: argparse.Namespace) -> int:
    parse_broker_url(args.broker)
    store = RecordStore(args.db)
    try:
        link = connect_link(
            args, args.client_id or default_client_id(args.db), session_expiry_s=SESSION_EXPIRY_S
        )
        collector = Collector(link, store, topic_prefix=args.topic_prefix, devices=args.device)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, collector.stop)
        try:
            await _run_collector(link, collector, args)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
    finally:
        store.close()
    c = collector.counts
    print(
        f"stopped: {c.stored} records stored, {c.duplicates} duplicates, "
        f"{c.malformed} malformed messages skipped",
        file=sys.stderr,
    )
    if collector.failure is not None:
        raise collector.failure
    return 0


async def _run_collector(link: FleetLink, collector: Collector, args: argparse.Namespace) -> None:
    async def startup() -> None:
        await link.start()
        # Register the filters before the loop runs a single callback: a resumed session
        # delivers what waited at the broker right after CONNACK, and the link hands a
        # message only to the filters it knows at that moment.
        await collector.subscribe()
        await wait_for_broker(link, args)
        try:
            await asyncio.wait_for(collector.subscribe(), args.connect_timeout)
        except TimeoutError:
            raise BrokerUnreachable(
                f"no SUBACK from {args.broker} within {args.connect_timeout} s"
            ) from None
        print("collecting", file=sys.stderr, flush=True)

    try:
        started = asyncio.ensure_future(startup())
        stopping = asyncio.ensure_future(collector.wait_stopping())
        await asyncio.wait({started, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if started.done():
            started.result()
            await stopping
        else:
            started.cancel()
        stopping.cancel()
        await collector.finish()
    finally:
        await link.close()


# -- report --------------------------------------------------------------------------------


def _report_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db", required=True, metavar="FILE", help="the records file of fleet collect"
    )
    parser.add_argument(
        "--device", action="append", default=[], metavar="ID", help="only this device (repeatable)"
    )
    parser.add_argument(
        "--since",
        default="24h",
        metavar="AGE|TIME",
        help="window: 90m, 24h, 7d, or an ISO 8601 time (default 24h)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        help="also draw latency and throughput per model (needs edgeserve[report])",
    )
    parser.add_argument(
        "--baseline",
        action="append",
        default=[],
        metavar="ARCHIVE",
        help="drift baseline of that archive's model version: its sample inputs instead of "
        "the first day (repeatable; informational: read without a signature check)",
    )


def parse_since(text: str, now: datetime) -> datetime:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if match:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86_400}[match.group(2)]
        return now - timedelta(seconds=float(match.group(1)) * unit)
    moment = parse_time(text)
    if moment is None:
        raise UsageError(f"--since: expected an age such as 24h or an ISO 8601 time, got {text!r}")
    return moment


def _report(args: argparse.Namespace) -> int:
    now = datetime.now(UTC)
    since = parse_since(args.since, now)
    if args.plot:
        require_matplotlib()
    baselines = [archive_baseline(Path(path)) for path in args.baseline]
    versions = [(b.model, b.version) for b in baselines]
    if twice := sorted({v for v in versions if versions.count(v) > 1}):
        raise UsageError(f"--baseline: two archives of {twice[0][0]} version {twice[0][1]}")
    store = RecordStore(args.db, create=False)
    try:
        report = build_report(store, since=since, now=now, devices=args.device, baselines=baselines)
    finally:
        store.close()
    if args.plot:
        write_plot(report, args.plot)
    print(json.dumps(report, indent=2) if args.json else render_table(report))
    return 0


Run = Callable[[argparse.Namespace], int]
SUBCOMMANDS: dict[str, tuple[Run, str, str, Callable[[argparse.ArgumentParser], None]]] = {
    "collect": (
        _collect,
        "Store every device's telemetry from the broker, each record once (until SIGINT/SIGTERM).",
        "edgeserve fleet collect --broker mqtt://127.0.0.1:1883 --db fleet.db",
        _collect_options,
    ),
    "report": (
        _report,
        "Per device: last seen, offline spans, id gaps, latency/error trends, input drift.",
        "edgeserve fleet report --db fleet.db --since 24h --plot fleet.png",
        _report_options,
    ),
    "root": (
        run_root,
        "The fleet's trust root: init writes version 1, rotate the next version.",
        "edgeserve fleet root init --key a.pub --threshold 1 -o root.json",
        root_options,
    ),
    **CONTROL_COMMANDS,  # publish, devices, wait (cli/fleet_control.py)
}


def register(commands: Any) -> None:
    group = add_command(
        commands,
        "fleet",
        "The controller side of a fleet: collect device telemetry, report on it.",
        "edgeserve fleet report --db fleet.db --json",
    )
    group.epilog = FLEET_EPILOG
    actions = group.add_subparsers(
        title="fleet commands", metavar="ACTION", dest="fleet_command", required=True
    )
    for name, (_, text, example, options) in SUBCOMMANDS.items():
        parser = add_command(actions, name, text, example)
        parser.epilog = FLEET_EPILOG
        options(parser)


def run(args: argparse.Namespace) -> int:
    return SUBCOMMANDS[args.fleet_command][0](args)
