"""Fleet documents: the schemas of what a signed envelope carries, the trust ``Root`` and
the ``Deployment`` (its target, requirements and models), validated field by field.

Pure data, no I/O and no cryptography; the canonical bytes, bounded parsing and the
envelope are ``fleet/canonical.py``. A root's ``keys`` map each keyid to its public key as
**base64 of the raw 32 bytes** (compact, and the keyid is a hash of exactly those bytes;
the root is refused when a keyid does not match its key). Times are ISO 8601 UTC to the
second with a ``Z``: ``2027-01-01T00:00:00Z``.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, NoReturn

from edgeserve.errors import DocumentRefused
from edgeserve.fleet.canonical import (
    HEX64,
    MAX_SIGNATURES,
    decode_b64,
    exact_keys,
    key_id,
    parse_envelope,
)
from edgeserve.types import BATCHING_LIMITS, BatchingSettings

MAX_MODELS = 256
DEFAULT_MAX_LENGTH = 2 * 1024**3  # fleet.max_artifact_bytes' default
MAX_INT = 2**63 - 1
MAX_PROBATION_S = 7 * 86_400

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_DEVICE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_TIME = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)Z")
_WINDOW = re.compile(r"([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)")
_URL = re.compile(r"(https?)://([A-Za-z0-9\[][^/?#@\s]*)([/?#]\S*)?")
ACCELERATORS = ("cuda", "none")


def _bad(where: str, problem: str) -> NoReturn:
    raise DocumentRefused.schema(where, problem)


# -- field checks ----------------------------------------------------------------------------


def _int(value: Any, where: str, low: int, high: int = MAX_INT) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        _bad(where, f"must be an integer, got {value!r}")
    if not low <= value <= high:
        _bad(where, f"must be {low}..{high}, got {value}")
    return value


def _name(value: Any, where: str, pattern: re.Pattern[str] = _NAME) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        _bad(where, f"must be a plain name ({pattern.pattern}), got {value!r}")
    return value


def _names(value: Any, where: str, pattern: re.Pattern[str]) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > 1000:
        _bad(where, "must be a list (at most 1000 names)")
    return tuple(_name(v, f"{where}[{i}]", pattern) for i, v in enumerate(value))


def parse_time(value: Any, where: str = "time") -> datetime:
    """``YYYY-MM-DDTHH:MM:SSZ`` (UTC, whole seconds) as an aware datetime."""
    match = _TIME.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        _bad(where, f"must be an ISO 8601 UTC time like 2027-01-01T00:00:00Z, got {value!r}")
    try:
        year, month, day, hour, minute, second = (int(g) for g in match.groups())
        return datetime(year, month, day, hour, minute, second, tzinfo=UTC)
    except ValueError as exc:
        _bad(where, f"{value!r}: {exc}")


def format_time(moment: datetime) -> str:
    """The document form of an aware datetime (to the second, UTC, ``Z``)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- root ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Root:
    """The fleet's trust root: who may sign, and how many of them must."""

    version: int
    keys: Mapping[str, bytes]  # keyid -> raw 32-byte Ed25519 public key
    threshold: int
    expires: datetime

    @classmethod
    def from_signed(cls, signed: Mapping[str, Any]) -> Root:
        exact_keys(signed, "signed", {"type", "version", "keys", "threshold", "expires"})
        if signed["type"] != "root":
            _bad("signed.type", f"must be 'root', got {signed['type']!r}")
        keys_in = signed["keys"]
        if not isinstance(keys_in, dict) or not 1 <= len(keys_in) <= MAX_SIGNATURES:
            _bad("signed.keys", f"must be an object of 1..{MAX_SIGNATURES} keys")
        keys: dict[str, bytes] = {}
        for keyid, text in keys_in.items():
            where = f"signed.keys.{keyid}"
            raw = (
                decode_b64(text, where) if isinstance(text, str) else _bad(where, "must be base64")
            )
            if key_id(raw) != keyid:
                _bad(where, "keyid is not the sha256 of the key")
            keys[keyid] = raw
        threshold = _int(signed["threshold"], "signed.threshold", 1, len(keys))
        return cls(
            version=_int(signed["version"], "signed.version", 1),
            keys=MappingProxyType(keys),
            threshold=threshold,
            expires=parse_time(signed["expires"], "signed.expires"),
        )

    def to_signed(self) -> dict[str, Any]:
        return {
            "type": "root",
            "version": self.version,
            "keys": {k: base64.b64encode(v).decode("ascii") for k, v in self.keys.items()},
            "threshold": self.threshold,
            "expires": format_time(self.expires),
        }


def parse_root(data: bytes) -> Root:
    """The root in an installed ``fleet.root`` file, trusted because it was installed:
    its signatures are not checked here (a rotation's are, by ``verifier``)."""
    return Root.from_signed(parse_envelope(data).signed)


# -- deployment ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    devices: tuple[str, ...]
    groups: tuple[str, ...]


@dataclass(frozen=True)
class Requirements:
    arch: str | None  # platform.machine() style; None: any
    min_free_disk_mb: int
    min_free_memory_mb: int
    accelerator: str | None  # "cuda" or "none"; None: any


@dataclass(frozen=True)
class DeviceFacts:
    """What the device knows about itself, for ``requires`` (gathered by the caller)."""

    arch: str
    free_disk_mb: int
    free_memory_mb: int
    accelerator: str  # "cuda" or "none"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    version: str
    sha256: str
    length: int
    url: str | None  # None: the artifact comes as MQTT chunks
    default: bool
    batching: Mapping[str, Any]  # BatchingSettings fields (validated), integers only


@dataclass(frozen=True)
class Deployment:
    """The complete desired set for the devices and groups it targets."""

    serial: int
    expires: datetime
    target: Target
    requires: Requirements
    probation_s: int | None  # None: the device's fleet.probation_s
    activation_window: tuple[int, int] | None  # minutes after midnight, start and end
    models: tuple[ModelEntry, ...]

    @classmethod
    def from_signed(
        cls, signed: Mapping[str, Any], *, max_length: int = DEFAULT_MAX_LENGTH
    ) -> Deployment:
        """Validate ``signed``; every artifact's ``length`` must be at most ``max_length``."""
        top = {"type", "serial", "expires", "target", "requires", "probation_s"}
        exact_keys(signed, "signed", top | {"activation_window", "models"})
        if signed["type"] != "deployment":
            _bad("signed.type", f"must be 'deployment', got {signed['type']!r}")
        probation = signed["probation_s"]
        models = signed["models"]
        if not isinstance(models, list) or len(models) > MAX_MODELS:
            _bad("signed.models", f"must be a list of at most {MAX_MODELS} models")
        entries = tuple(_model(m, f"signed.models[{i}]", max_length) for i, m in enumerate(models))
        _check_set(entries)
        return cls(
            serial=_int(signed["serial"], "signed.serial", 1),
            expires=parse_time(signed["expires"], "signed.expires"),
            target=_target(signed["target"]),
            requires=_requires(signed["requires"]),
            probation_s=None
            if probation is None
            else _int(probation, "signed.probation_s", 0, MAX_PROBATION_S),
            activation_window=parse_window(signed["activation_window"]),
            models=entries,
        )


def parse_window(value: Any, where: str = "signed.activation_window") -> tuple[int, int] | None:
    """``"HH:MM-HH:MM"`` (may wrap past midnight) as minutes, or None for null."""
    if value is None:
        return None
    match = _WINDOW.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        _bad(where, f"must be HH:MM-HH:MM or null, got {value!r}")
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if start == end:
        _bad(where, f"start and end are the same time, got {value!r}")
    return start, end


def _target(value: Any) -> Target:
    exact_keys(value, "signed.target", {"devices", "groups"})
    devices = _names(value["devices"], "signed.target.devices", _DEVICE)
    groups = _names(value["groups"], "signed.target.groups", _DEVICE)
    if not devices and not groups:
        _bad("signed.target", "names no device and no group")
    return Target(devices, groups)


def _requires(value: Any) -> Requirements:
    where = "signed.requires"
    exact_keys(value, where, {"arch", "min_free_disk_mb", "min_free_memory_mb", "accelerator"})
    arch, accelerator = value["arch"], value["accelerator"]
    if arch is not None:
        _name(arch, f"{where}.arch")
    if accelerator is not None and accelerator not in ACCELERATORS:
        _bad(f"{where}.accelerator", f"must be 'cuda', 'none' or null, got {accelerator!r}")
    return Requirements(
        arch=arch,
        min_free_disk_mb=_int(value["min_free_disk_mb"], f"{where}.min_free_disk_mb", 0),
        min_free_memory_mb=_int(value["min_free_memory_mb"], f"{where}.min_free_memory_mb", 0),
        accelerator=accelerator,
    )


def _model(value: Any, where: str, max_length: int) -> ModelEntry:
    keys = {"name", "version", "sha256", "length", "source", "default", "batching"}
    exact_keys(value, where, keys)
    sha = value["sha256"]
    if not isinstance(sha, str) or not HEX64.fullmatch(sha):
        _bad(f"{where}.sha256", "must be 64 lowercase hex digits")
    if not isinstance(value["default"], bool):
        _bad(f"{where}.default", "must be true or false")
    return ModelEntry(
        name=_name(value["name"], f"{where}.name"),
        version=_name(value["version"], f"{where}.version"),
        sha256=sha,
        length=_int(value["length"], f"{where}.length", 1, max_length),
        url=_source(value["source"], f"{where}.source"),
        default=value["default"],
        batching=_batching(value["batching"], f"{where}.batching"),
    )


def _source(value: Any, where: str) -> str | None:
    if value == {"mqtt": True}:
        return None
    if not isinstance(value, dict) or set(value) != {"url"}:
        _bad(where, 'must be {"mqtt": true} or {"url": "http(s)://..."}')
    url = value["url"]
    if not isinstance(url, str) or len(url) > 2048 or not _URL.fullmatch(url):
        _bad(f"{where}.url", f"must be an http:// or https:// URL without credentials, got {url!r}")
    return url


def _batching(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, dict):
        _bad(where, "must be an object or null")
    known = set(BATCHING_LIMITS) | {"preferred_batch_sizes"}
    unknown = set(value) - known
    if unknown:
        _bad(where, f"unknown key(s) {', '.join(sorted(unknown))}")
    settings = BatchingSettings.from_dict(value)
    settings.validate(where, error=DocumentRefused.schema)
    return MappingProxyType(dict(value))


def _check_set(models: tuple[ModelEntry, ...]) -> None:
    seen: set[tuple[str, str]] = set()
    defaults: set[str] = set()
    for m in models:
        if (m.name, m.version) in seen:
            _bad("signed.models", f"{m.name} version {m.version} is listed twice")
        seen.add((m.name, m.version))
        if m.default:
            if m.name in defaults:
                _bad("signed.models", f"{m.name} has more than one default version")
            defaults.add(m.name)
