"""``edgeserve fleet publish|devices|wait``: deploy a model set, see the fleet, wait for it.

Thin shells over ``fleet/controller.py``: parse, check everything local (archives, keys,
options) before touching the broker, call the library, map errors to exit codes. Their
entries join ``cli/fleet.py``'s ``SUBCOMMANDS`` through ``CONTROL_COMMANDS``; the broker
options and connection helpers are that module's (imported when first used, since it
imports this one).

- ``publish`` writes the signed deployment retained on ``P/devices/<id>/desired`` or
  ``P/groups/<g>/desired`` after uploading the artifacts as retained chunks (or naming
  ``<url-base>/<sha256>.esar``). Exit 0 published, 2 usage, archive, key or serial
  problem, 3 broker unreachable.
- ``devices`` lists what devices retain on ``P/devices/+/reported`` and ``.../online``.
  Exit 0, 3 broker unreachable.
- ``wait`` exits 0 when the device reports the serial committed, 1 when it reports it
  rejected or rolled back (the reason printed), 3 on timeout or broker unreachable.

The device side that answers them is ``fleet/deployer.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from edgeserve.archive.signing import TrustStore, load_private_key
from edgeserve.cli.exits import UsageError
from edgeserve.cli.fleet_root import parse_expires
from edgeserve.errors import DocumentRefused
from edgeserve.fleet.artifacts import publish_artifact
from edgeserve.fleet.controller import (
    DEVICE_NAME,
    ArchiveInfo,
    FleetView,
    WaitTimedOut,
    desired_topic,
    inspect_archive,
    model_entries,
    retained_serial,
    wait_for_serial,
    watch_fleet,
)
from edgeserve.fleet.documents import ACCELERATORS, format_time
from edgeserve.fleet.link import FleetLink
from edgeserve.fleet.verifier import sign_deployment

T = TypeVar("T")
DEFAULT_EXPIRES = "30d"
SETTLE_S = 0.5
DEVICES_TIMEOUT_S = 5.0
WAIT_TIMEOUT_S = 600.0


class WaitTimeout(ConnectionError):
    """``fleet wait`` ran out of time; exits with ``ExitCode.UNREACHABLE`` (3)."""


def _fleet() -> ModuleType:
    from edgeserve.cli import fleet  # noqa: PLC0415 - cli/fleet.py imports this module

    return fleet


async def with_link(
    args: argparse.Namespace, command: str, body: Callable[[FleetLink], Coroutine[Any, Any, T]]
) -> T:
    """Connect (``BrokerUnreachable`` if not), run ``body``, always close the link."""
    fleet = _fleet()
    client_id = args.client_id or f"edgeserve-{command}-{secrets.token_hex(6)}"
    link = fleet.connect_link(args, client_id, session_expiry_s=0)
    try:
        await link.start()
        await fleet.wait_for_broker(link, args)
        return await body(link)
    finally:
        await link.close()


def _name(value: str, option: str) -> str:
    if not DEVICE_NAME.fullmatch(value):
        raise UsageError(f"{option}: expected [A-Za-z0-9._-]{{1,64}}, got {value!r}")
    return value


# -- publish -------------------------------------------------------------------------------


def _publish_options(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--device", metavar="ID", help="deploy to this device")
    target.add_argument("--group", metavar="G", help="deploy to every device of this group")
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="ARCHIVE",
        help="a signed .esar archive of the desired set (repeatable: the complete set)",
    )
    parser.add_argument(
        "--default",
        action="append",
        default=[],
        metavar="NAME=VERSION",
        help="the default version of a model listed in several versions (repeatable)",
    )
    parser.add_argument(
        "--serial", type=int, metavar="N", help="default: one more than the one published"
    )
    parser.add_argument(
        "--sign-key",
        action="append",
        required=True,
        metavar="KEY",
        help="a private key of the fleet root (repeatable: meet its threshold)",
    )
    parser.add_argument(
        "--trust-key",
        action="append",
        default=[],
        metavar="FILE.pub",
        help="check each archive's signature against these release keys (default: any signature)",
    )
    parser.add_argument(
        "--expires",
        default=DEFAULT_EXPIRES,
        metavar="AGE|TIME",
        help=f"30d, 12h, or 2027-01-01T00:00:00Z (default {DEFAULT_EXPIRES})",
    )
    parser.add_argument(
        "--probation-s", type=int, metavar="S", help="default: the device's fleet.probation_s"
    )
    parser.add_argument(
        "--activation-window", metavar="HH:MM-HH:MM", help="activate only in this local time"
    )
    parser.add_argument(
        "--url-base", metavar="URL", help="devices fetch <URL>/<sha256>.esar instead of chunks"
    )
    parser.add_argument("--require-arch", metavar="ARCH", help="e.g. aarch64 or x86_64")
    parser.add_argument("--require-accelerator", choices=ACCELERATORS)
    parser.add_argument("--require-free-disk-mb", type=int, default=0, metavar="MB")
    parser.add_argument("--require-free-memory-mb", type=int, default=0, metavar="MB")
    _fleet().broker_options(parser)


def _defaults(values: list[str]) -> dict[str, str]:
    defaults: dict[str, str] = {}
    for value in values:
        name, sep, version = value.partition("=")
        if not sep or not name or not version or name in defaults:
            raise UsageError(f"--default: expected NAME=VERSION once per name, got {value!r}")
        defaults[name] = version
    return defaults


def _fields(args: argparse.Namespace, archives: list[ArchiveInfo]) -> dict[str, Any]:
    """The deployment's ``signed`` fields but its serial."""
    url_base = args.url_base.rstrip("/") if args.url_base else None
    if url_base is not None and not url_base.startswith(("http://", "https://")):
        raise UsageError(f"--url-base: expected an http:// or https:// URL, got {args.url_base!r}")
    models = model_entries(archives, _defaults(args.default), url_base)
    return {
        "type": "deployment",
        "expires": format_time(parse_expires(args.expires, datetime.now(UTC))),
        "target": {
            "devices": [_name(args.device, "--device")] if args.device else [],
            "groups": [_name(args.group, "--group")] if args.group else [],
        },
        "requires": {
            "arch": args.require_arch,
            "min_free_disk_mb": args.require_free_disk_mb,
            "min_free_memory_mb": args.require_free_memory_mb,
            "accelerator": args.require_accelerator,
        },
        "probation_s": args.probation_s,
        "activation_window": args.activation_window,
        "models": models,
    }


def _publish(args: argparse.Namespace) -> int:
    _fleet().parse_broker_url(args.broker)
    keys = [load_private_key(Path(p)) for p in args.sign_key]
    trust = TrustStore.from_paths(Path(p) for p in args.trust_key) if args.trust_key else None
    archives = [inspect_archive(Path(p), trust) for p in args.model]
    if args.serial is not None and args.serial < 1:
        raise UsageError(f"--serial: must be >= 1, got {args.serial}")
    try:
        fields = _fields(args, archives)
        sign_deployment({**fields, "serial": args.serial or 1}, keys)  # refuse it here, early
    except DocumentRefused as exc:
        raise UsageError(exc.detail) from None
    topic = desired_topic(args.topic_prefix, device=args.device, group=args.group)

    async def publish(link: FleetLink) -> int:
        current = await retained_serial(link, topic)
        serial = current + 1 if args.serial is None else args.serial
        if serial <= current:
            raise UsageError(f"--serial: {serial} is not above serial {current} on {topic}")
        if args.url_base is None:
            for archive in archives:
                await _upload(link, args.topic_prefix, archive)
        document = sign_deployment({**fields, "serial": serial}, keys)
        await link.publish(topic, document, qos=1, retain=True)
        return serial

    serial = asyncio.run(with_link(args, "publish", publish))
    total = sum(a.length for a in archives)
    models = f"{len(archives)} model(s), {total} bytes of artifacts"
    print(f"published serial {serial} to {topic} ({models})")
    return 0


async def _upload(link: FleetLink, prefix: str, archive: ArchiveInfo) -> None:
    label = f"{archive.name} {archive.version}"
    tty = sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        print(
            f"\ruploading {label}: {100 * done // total:3d}% of {total} bytes",
            end="",
            file=sys.stderr,
        )

    await publish_artifact(link, prefix, archive.path, progress=progress if tty else None)
    if tty:
        print(file=sys.stderr)


# -- devices -------------------------------------------------------------------------------


def _devices_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print a JSON list of devices")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEVICES_TIMEOUT_S,
        metavar="S",
        help=f"listen at most this long for retained state (default {DEVICES_TIMEOUT_S:g})",
    )
    _fleet().broker_options(parser)


def _devices(args: argparse.Namespace) -> int:
    _fleet().parse_broker_url(args.broker)

    async def watch(link: FleetLink) -> FleetView:
        return await watch_fleet(
            link, args.topic_prefix, settle_s=min(SETTLE_S, args.timeout), timeout_s=args.timeout
        )

    view = asyncio.run(with_link(args, "devices", watch))
    rows = view.rows()
    if view.skipped:
        print(f"skipped {view.skipped} malformed message(s)", file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=2))
    elif rows:
        print(render_devices(rows))
    else:
        print("no devices seen", file=sys.stderr)
    return 0


def _live_text(live: list[dict[str, Any]]) -> str:
    return (
        ", ".join(f"{m['name']} {m['version']}{'*' if m['default'] else ''}" for m in live) or "-"
    )


def _deployment_text(d: dict[str, Any] | None) -> str:
    if d is None:
        return "-"
    text = f"{d['serial'] if d['serial'] is not None else '?'} {d['state'] or '?'}"
    if d["reason"]:
        text += f": {d['reason']}"
    elif d["bytes_total"]:
        text += f" {d['bytes_done'] or 0}/{d['bytes_total']} bytes"
    return text


def _bytes_text(n: dict[str, int | None] | None) -> str:
    if n is None:
        return "-"
    return "/".join(
        "?" if n[k] is None else str(n[k]) for k in ("artifacts", "control", "telemetry")
    )


def render_devices(rows: list[dict[str, Any]]) -> str:
    """The human table of ``fleet devices`` (the ``--json`` rows, rendered)."""
    header = ("DEVICE", "ONLINE", "COMMITTED", "LIVE", "DEPLOYMENT", "BYTES A/C/T", "LAST SEEN")
    table = [header] + [
        (
            r["device"],
            "online" if r["online"] else "offline",
            "-" if r["committed_serial"] is None else str(r["committed_serial"]),
            _live_text(r["live"]),
            _deployment_text(r["deployment"]),
            _bytes_text(r["network_bytes"]),
            r["last_seen"] or "-",
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in table
    )


# -- wait ----------------------------------------------------------------------------------


def _wait_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", required=True, metavar="ID", help="the device to watch")
    parser.add_argument("--serial", required=True, type=int, metavar="N", help="the deployment")
    parser.add_argument(
        "--timeout",
        type=float,
        default=WAIT_TIMEOUT_S,
        metavar="S",
        help=f"give up after S seconds, exit 3 (default {WAIT_TIMEOUT_S:g})",
    )
    _fleet().broker_options(parser)


def _wait(args: argparse.Namespace) -> int:
    _fleet().parse_broker_url(args.broker)
    device = _name(args.device, "--device")
    if args.timeout <= 0:
        raise UsageError(f"--timeout: must be > 0, got {args.timeout:g}")

    async def wait(link: FleetLink) -> Any:
        return await wait_for_serial(link, args.topic_prefix, device, args.serial, args.timeout)

    try:
        outcome = asyncio.run(with_link(args, "wait", wait))
    except WaitTimedOut as exc:
        raise WaitTimeout(str(exc)) from None
    if outcome.committed:
        print(f"{device}: serial {args.serial} committed")
        return 0
    print(f"{device}: serial {args.serial} {outcome.state}: {outcome.reason or 'no reason given'}")
    return 1


Run = Callable[[argparse.Namespace], int]
CONTROL_COMMANDS: dict[str, tuple[Run, str, str, Callable[[argparse.ArgumentParser], None]]] = {
    "publish": (
        _publish,
        "Sign and publish a device's or group's complete model set, uploading its archives.",
        "edgeserve fleet publish --broker mqtt://127.0.0.1:1883 --device dev-1 "
        "--model mlp-2.esar --sign-key root.key",
        _publish_options,
    ),
    "devices": (
        _devices,
        "One row per device: online, committed serial, live models, deployment, bytes.",
        "edgeserve fleet devices --broker mqtt://127.0.0.1:1883 --json",
        _devices_options,
    ),
    "wait": (
        _wait,
        "Wait until a device commits a serial (0), refuses or rolls it back (1), or time out (3).",
        "edgeserve fleet wait --broker mqtt://127.0.0.1:1883 --device dev-1 --serial 2",
        _wait_options,
    ),
}
