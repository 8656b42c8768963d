"""The controller commands' library: what ``fleet publish``, ``fleet devices`` and
``fleet wait`` do, without the command line (``cli/fleet_publish.py`` is their shell).

Topics under the prefix ``P`` (issue 8): the controller writes the signed deployment
retained on ``P/devices/<id>/desired`` or ``P/groups/<g>/desired`` and the artifacts as
retained chunks (``fleet/artifacts.py``); a device writes its reported state retained on
``P/devices/<id>/reported`` and ``online``/``offline`` retained on ``P/devices/<id>/online``.

The device side that consumes the deployment and produces the reported state is
``fleet/deployer.py``; the controller's own tests play the device with a plain MQTT
client that publishes exactly the documented reported-state JSON.

Reports come from devices and are not trusted: a payload that is not a bounded JSON
object, or arrives on a topic without a valid device id, is skipped and counted; fields of
the wrong type read as missing. Payloads are never logged.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeserve.archive.format import read_manifest
from edgeserve.archive.signing import TrustStore
from edgeserve.errors import DocumentRefused, VerificationError
from edgeserve.fleet.artifacts import hash_file
from edgeserve.fleet.canonical import parse_envelope

if TYPE_CHECKING:
    from edgeserve.fleet.link import FleetLink

DEVICE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_REPORT_BYTES = 64 * 1024
RETAINED_SETTLE_S = 1.0
"""How long after the SUBACK a retained desired document may take to arrive."""
NETWORK_PURPOSES = ("artifacts", "control", "telemetry")
DONE_STATES = ("committed",)
FAILED_STATES = ("rejected", "rolled_back")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def desired_topic(prefix: str, *, device: str | None = None, group: str | None = None) -> str:
    if device is not None:
        return f"{prefix}/devices/{device}/desired"
    return f"{prefix}/groups/{group}/desired"


# -- publish -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchiveInfo:
    """One archive to deploy: its manifest's name and version, its bytes' sha256 and length."""

    path: Path
    name: str
    version: str
    sha256: str
    length: int


class _AnySignature(TrustStore):
    """Refuses an unsigned archive; with no release keys given, trusts any signer."""

    def __init__(self) -> None:
        super().__init__({})

    def verify(self, manifest_bytes: bytes, signature_json: bytes | None, *, source: str) -> str:
        if signature_json is None:
            raise VerificationError(f"archive '{source}' is not signed (no signature file)")
        return ""


def inspect_archive(path: Path, trust: TrustStore | None) -> ArchiveInfo:
    """Validate the archive as a device will (members, hashes, a signature, checked
    against ``trust`` when given) and hash its bytes (blocking: run it in a thread)."""
    manifest = read_manifest(path, trust=trust if trust is not None else _AnySignature())
    sha256, length = hash_file(path)
    return ArchiveInfo(path, manifest.name, manifest.version, sha256, length)


def model_entries(
    archives: Sequence[ArchiveInfo], defaults: Mapping[str, str], url_base: str | None
) -> list[dict[str, Any]]:
    """The ``models`` of a deployment. Each name's default is ``defaults[name]``, or its
    only version; a name with several versions and no default is refused."""
    versions: dict[str, list[str]] = {}
    for a in archives:
        versions.setdefault(a.name, []).append(a.version)
    for name, version in defaults.items():
        if version not in versions.get(name, []):
            raise DocumentRefused.schema("--default", f"{name}={version} is not among the models")
    entries = []
    for a in archives:
        if a.name in defaults:
            default = defaults[a.name] == a.version
        elif len(versions[a.name]) == 1:
            default = True
        else:
            raise DocumentRefused.schema(
                "--default", f"{a.name} has {len(versions[a.name])} versions; pick one"
            )
        source: dict[str, Any] = (
            {"url": f"{url_base}/{a.sha256}.esar"} if url_base else {"mqtt": True}
        )
        entries.append(
            {
                "name": a.name,
                "version": a.version,
                "sha256": a.sha256,
                "length": a.length,
                "source": source,
                "default": default,
                "batching": None,
            }
        )
    return entries


def serial_of(payload: bytes) -> int | None:
    """The serial of a retained deployment envelope, read without verifying it."""
    if not payload:
        return None
    try:
        serial = parse_envelope(payload).signed.get("serial")
    except DocumentRefused:
        return None
    return serial if isinstance(serial, int) and not isinstance(serial, bool) else None


async def retained_serial(link: FleetLink, topic: str, settle_s: float = RETAINED_SETTLE_S) -> int:
    """The highest serial retained on ``topic`` (0 when none), waiting ``settle_s`` after
    the SUBACK for the broker's retained message."""
    seen: list[int] = []
    arrived = asyncio.Event()

    def received(_topic: str, payload: bytes, _retained: bool) -> None:
        serial = serial_of(payload)
        if serial is not None:
            seen.append(serial)
        arrived.set()

    await link.subscribe(topic, received)
    try:
        await asyncio.wait_for(arrived.wait(), settle_s)
    except TimeoutError:
        pass
    await link.unsubscribe(topic)
    return max(seen, default=0)


# -- reported state ------------------------------------------------------------------------


def _text(value: Any, limit: int = 200) -> str | None:
    if not isinstance(value, str):
        return None
    return _UNPRINTABLE.sub("?", value[:limit])


def _count(value: Any) -> int | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return value if ok else None


def _live(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        return []
    live = []
    for item in value[:256]:
        if isinstance(item, dict) and _text(item.get("name")) and _text(item.get("version")):
            live.append(
                {
                    "name": _text(item["name"]),
                    "version": _text(item["version"]),
                    "sha256": _text(item.get("sha256"), 64),
                    "default": item.get("default") is True,
                }
            )
    return live


def _deployment(value: Any) -> dict[str, Any] | None:
    if not isinstance(value, dict):
        return None
    return {
        "serial": _count(value.get("serial")),
        "state": _text(value.get("state"), 32),
        "reason": _text(value.get("reason")),
        "bytes_done": _count(value.get("bytes_done")),
        "bytes_total": _count(value.get("bytes_total")),
    }


def _network(value: Any) -> dict[str, int | None] | None:
    if not isinstance(value, dict):
        return None
    return {purpose: _count(value.get(purpose)) for purpose in NETWORK_PURPOSES}


def parse_report(payload: bytes) -> dict[str, Any] | None:
    """The fields of a reported state the controller shows, each checked for type (a wrong
    one reads as missing); None when the payload is not a bounded JSON object."""
    if not payload or len(payload) > MAX_REPORT_BYTES:
        return None
    try:
        report = json.loads(payload)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(report, dict):
        return None
    return {
        "committed_serial": _count(report.get("committed_serial")),
        "root_version": _count(report.get("root_version")),
        "live": _live(report.get("live")),
        "deployment": _deployment(report.get("deployment")),
        "network_bytes": _network(report.get("network_bytes")),
        "last_seen": _text(report.get("time"), 64),
    }


def device_of(prefix: str, topic: str, leaf: str) -> str | None:
    """``<id>`` of ``P/devices/<id>/<leaf>`` when it is a valid device id."""
    head, tail = f"{prefix}/devices/", f"/{leaf}"
    if not (topic.startswith(head) and topic.endswith(tail)):
        return None
    device = topic[len(head) : len(topic) - len(tail)]
    return device if DEVICE_NAME.fullmatch(device) else None


@dataclass
class FleetView:
    """What the broker holds about each device: its last report and online flag."""

    prefix: str
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    online: dict[str, bool] = field(default_factory=dict)
    skipped: int = 0
    last_change: float = field(default_factory=time.monotonic)

    def take(self, topic: str, payload: bytes, _retained: bool) -> None:
        self.last_change = time.monotonic()
        if (device := device_of(self.prefix, topic, "reported")) is not None:
            report = parse_report(payload)
            if report is not None:
                self.reports[device] = report
                return
        elif (device := device_of(self.prefix, topic, "online")) is not None:
            if payload in (b"online", b"offline"):
                self.online[device] = payload == b"online"
                return
            if not payload:  # the retained flag was cleared
                return
        self.skipped += 1

    def rows(self) -> list[dict[str, Any]]:
        """One object per device seen, sorted by id: the ``--json`` form."""
        rows = []
        for device in sorted(set(self.reports) | set(self.online)):
            report = self.reports.get(device, {})
            rows.append(
                {
                    "device": device,
                    "online": self.online.get(device, False),
                    "committed_serial": report.get("committed_serial"),
                    "root_version": report.get("root_version"),
                    "live": report.get("live", []),
                    "deployment": report.get("deployment"),
                    "network_bytes": report.get("network_bytes"),
                    "last_seen": report.get("last_seen"),
                }
            )
        return rows


async def watch_fleet(
    link: FleetLink, prefix: str, *, settle_s: float, timeout_s: float
) -> FleetView:
    """Collect the retained reports and online flags until none came for ``settle_s``
    (after the SUBACKs), or ``timeout_s`` passed."""
    view = FleetView(prefix)
    deadline = time.monotonic() + timeout_s
    for leaf in ("reported", "online"):
        await link.subscribe(f"{prefix}/devices/+/{leaf}", view.take)
    view.last_change = max(view.last_change, time.monotonic())
    while (now := time.monotonic()) < deadline:
        quiet_until = view.last_change + settle_s
        if now >= quiet_until:
            break
        await asyncio.sleep(min(quiet_until, deadline) - now)
    return view


# -- wait ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """How a device ended a deployment: ``committed`` or a failure state with its reason."""

    state: str
    reason: str | None = None

    @property
    def committed(self) -> bool:
        return self.state in DONE_STATES


def outcome_for(report: Mapping[str, Any], serial: int) -> Outcome | None:
    """What ``report`` (from ``parse_report``) says of ``serial``; None: not decided yet."""
    committed = report.get("committed_serial")
    deployment = report.get("deployment") or {}
    state = deployment.get("state")
    if committed == serial or (
        committed is not None and committed >= serial and state in DONE_STATES
    ):
        return Outcome("committed")
    if deployment.get("serial") == serial and state in FAILED_STATES:
        return Outcome(state, deployment.get("reason"))
    return None


@dataclass
class _Waiting:
    serial: int
    decided: asyncio.Future[Outcome]
    last_state: str | None = None
    skipped: int = 0

    def take(self, _topic: str, payload: bytes, _retained: bool) -> None:
        report = parse_report(payload)
        if report is None:
            self.skipped += 1
            return
        deployment = report.get("deployment") or {}
        self.last_state = f"committed serial {report.get('committed_serial')}" + (
            f", deployment {deployment.get('serial')} {deployment.get('state')}"
            if deployment
            else ""
        )
        outcome = outcome_for(report, self.serial)
        if outcome is not None and not self.decided.done():
            self.decided.set_result(outcome)


class WaitTimedOut(Exception):
    """The device did not decide the serial within the wait."""

    def __init__(self, device: str, serial: int, timeout_s: float, last: str | None) -> None:
        seen = f"last reported: {last}" if last else "no report from it"
        super().__init__(
            f"device {device} did not commit serial {serial} within {timeout_s:g} s ({seen})"
        )


async def wait_for_serial(
    link: FleetLink, prefix: str, device: str, serial: int, timeout_s: float
) -> Outcome:
    """The device's outcome for ``serial`` from its reported state; ``WaitTimedOut``."""
    waiting = _Waiting(serial, asyncio.get_running_loop().create_future())
    await link.subscribe(f"{prefix}/devices/{device}/reported", waiting.take)
    try:
        return await asyncio.wait_for(asyncio.shield(waiting.decided), timeout_s)
    except TimeoutError:
        raise WaitTimedOut(device, serial, timeout_s, waiting.last_state) from None
