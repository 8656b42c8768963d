"""Signing and verifying fleet documents (Ed25519): pure, no clock reads, no files.

Everything a decision depends on is passed in: the trusted root, the committed serial,
the trusted time, who the device is and what it has. Each refusal is a
``DocumentRefused`` whose ``reason`` is one word for the reported state.

**Counting signatures** (TUF's rule): a role (a root version's key set and threshold)
vouches for a document when at least ``threshold`` *distinct keys of that role* have a
valid signature over ``canonical_bytes(signed)``. A keyid listed twice counts once;
signatures by keys outside the role and signatures that do not verify count for nothing
and veto nothing: a document that enough good signatures vouch for is accepted even if
it also carries a bad or foreign one (so no one can block a genuine document by
appending junk to it). When the count falls short, the refusal names the most specific
cause: ``bad_signature`` when a known key's signature did not verify, else
``unknown_key`` when a signature came from a key the root does not know, else
``threshold``.

**Order of checks.** A deployment: schema, signatures (against the trusted root), the
root's own expiry, ``serial`` above the committed one (``rollback``), ``expires``
(``expired``), target (``wrong_target``), requirements (``requirements``). A root
rotation: schema, version exactly one above the current (``rollback`` when not above,
``version_skip`` when more than one above), a threshold of the current version's keys,
a threshold of the new version's keys, the new root's ``expires``. An expired *current*
root may still rotate (that is how a fleet recovers from one).

**Time.** ``trusted_time`` is the newest trustworthy time the device has seen; the
caller keeps it with ``advance_trusted_time``, so a clock reset to 1970 cannot make an
expired document current again. A document expires at its ``expires`` instant.
"""

from __future__ import annotations

import base64
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgeserve.errors import DocumentRefused
from edgeserve.fleet.canonical import (
    Envelope,
    Signature,
    envelope_bytes,
    key_id,
    parse_envelope,
)
from edgeserve.fleet.documents import (
    DEFAULT_MAX_LENGTH,
    Deployment,
    DeviceFacts,
    Root,
    format_time,
)

_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}


# -- keys and signing ------------------------------------------------------------------------


def raw_public_key(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id_of(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """The keyid of a key (of its public half): hex sha256 of the raw 32 bytes."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return key_id(raw_public_key(public))


def sign(signed: Mapping[str, Any], private_keys: Iterable[Ed25519PrivateKey]) -> Envelope:
    """An envelope of ``signed`` signed by each key once (in keyid order)."""
    message = Envelope(signed, ()).signed_bytes
    by_id = {key_id_of(k): k for k in private_keys}
    sigs = tuple(Signature(kid, by_id[kid].sign(message)) for kid in sorted(by_id))
    return Envelope(signed, sigs)


def to_bytes(envelope: Envelope) -> bytes:
    return envelope_bytes(envelope.signed, list(envelope.signatures))


def sign_deployment(
    deployment_fields: Mapping[str, Any],
    keys: Sequence[Ed25519PrivateKey],
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> bytes:
    """The canonical envelope bytes of a deployment document, ready to publish.

    ``deployment_fields`` is the ``signed`` object (``"type": "deployment"`` is added
    when absent); it is validated as a device would, so a bad one never leaves here.
    """
    if not keys:
        raise DocumentRefused("threshold", "a deployment needs at least one signing key")
    signed = {"type": "deployment", **deployment_fields}
    Deployment.from_signed(signed, max_length=max_length)
    return to_bytes(sign(signed, keys))


# -- counting signatures ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Tally:
    valid: frozenset[str]  # keyids with at least one signature that verifies
    bad: frozenset[str]  # known keyids whose every signature failed
    unknown: frozenset[str]  # keyids no key set here knows


def _tally(envelope: Envelope, known: Mapping[str, bytes]) -> _Tally:
    message = envelope.signed_bytes
    valid: set[str] = set()
    tried: set[str] = set()
    unknown: set[str] = set()
    for signature in envelope.signatures:
        raw = known.get(signature.keyid)
        if raw is None:
            unknown.add(signature.keyid)
            continue
        tried.add(signature.keyid)
        if signature.keyid not in valid and _verifies(raw, signature.sig, message):
            valid.add(signature.keyid)
    return _Tally(frozenset(valid), frozenset(tried - valid), frozenset(unknown))


def _verifies(raw: bytes, sig: bytes, message: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(raw).verify(sig, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def _require(tally: _Tally, keys: Mapping[str, bytes], threshold: int, role: str) -> None:
    count = len(tally.valid & keys.keys())
    if count >= threshold:
        return
    short = f"{role}: {count} valid signature(s) of the {threshold} required"
    if tally.bad:
        first = sorted(tally.bad)[0]
        raise DocumentRefused("bad_signature", f"{short}; key {first[:16]} signed something else")
    if tally.unknown:
        first = sorted(tally.unknown)[0]
        raise DocumentRefused("unknown_key", f"{short}; signed by unknown key {first[:16]}")
    raise DocumentRefused("threshold", short)


# -- time ------------------------------------------------------------------------------------


def advance_trusted_time(current: datetime | None, observed: datetime) -> datetime:
    """The newer of the two: the trusted time never goes back."""
    return observed if current is None or observed > current else current


def _check_expiry(expires: datetime, trusted_time: datetime, what: str) -> None:
    if expires <= trusted_time:
        raise DocumentRefused(
            "expired",
            f"{what} expired at {format_time(expires)} (trusted time {format_time(trusted_time)})",
        )


# -- roots -----------------------------------------------------------------------------------


def verify_root_rotation(current: Root, data: bytes, *, trusted_time: datetime) -> Root:
    """The next root, if ``data`` is a valid rotation from ``current``; else refused."""
    new = verify_root_step(current, data)
    _check_expiry(new.expires, trusted_time, f"root v{new.version}")
    return new


def verify_root_chain(current: Root, documents: Iterable[bytes], *, trusted_time: datetime) -> Root:
    """Rotate through consecutive versions (a device that was offline across several);
    only the last root must be unexpired, as an intermediate one may have aged meanwhile."""
    root = current
    for data in documents:
        root = verify_root_step(root, data)
    if root is not current:
        _check_expiry(root.expires, trusted_time, f"root v{root.version}")
    return root


def verify_root_step(current: Root, data: bytes) -> Root:
    """One rotation step (version, both thresholds) without the expiry check: a device
    walking a chain checks only the expiry of the root it ends on."""
    envelope = parse_envelope(data)
    new = Root.from_signed(envelope.signed)
    if new.version <= current.version:
        raise DocumentRefused(
            "rollback", f"root v{new.version} is not newer than the trusted v{current.version}"
        )
    if new.version != current.version + 1:
        raise DocumentRefused(
            "version_skip",
            f"root v{new.version} skips from v{current.version}; rotate one version at a time",
        )
    tally = _tally(envelope, {**current.keys, **new.keys})
    _require(tally, current.keys, current.threshold, f"root v{current.version} keys")
    _require(tally, new.keys, new.threshold, f"root v{new.version} keys")
    return new


def verify_self_signed_root(data: bytes) -> Root:
    """A root signed by a threshold of its own keys (``fleet root init --sign-key``)."""
    envelope = parse_envelope(data)
    root = Root.from_signed(envelope.signed)
    _require(_tally(envelope, root.keys), root.keys, root.threshold, f"root v{root.version}")
    return root


# -- deployments -----------------------------------------------------------------------------


def verify_deployment(
    data: bytes,
    *,
    root: Root,
    committed_serial: int,
    trusted_time: datetime,
    device_id: str,
    groups: Collection[str],
    facts: DeviceFacts,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> Deployment:
    """The deployment in ``data`` if this device may act on it now; else refused."""
    envelope = parse_envelope(data)
    deployment = Deployment.from_signed(envelope.signed, max_length=max_length)
    serial = deployment.serial
    _require(_tally(envelope, root.keys), root.keys, root.threshold, f"deployment {serial}")
    _check_expiry(root.expires, trusted_time, f"trust root v{root.version}")
    if serial <= committed_serial:
        raise DocumentRefused(
            "rollback", f"deployment serial {serial} is not above the committed {committed_serial}"
        )
    _check_expiry(deployment.expires, trusted_time, f"deployment {serial}")
    target = deployment.target
    if device_id not in target.devices and not set(groups) & set(target.groups):
        raise DocumentRefused(
            "wrong_target",
            f"deployment {serial} targets neither device {device_id!r} nor its groups",
        )
    unmet = unmet_requirements(deployment, facts)
    if unmet:
        raise DocumentRefused("requirements", f"deployment {serial}: {'; '.join(unmet)}")
    return deployment


def unmet_requirements(deployment: Deployment, facts: DeviceFacts) -> list[str]:
    """What this device lacks for ``deployment.requires``; empty when it has it all."""
    req, unmet = deployment.requires, []
    if req.arch is not None and _arch(req.arch) != _arch(facts.arch):
        unmet.append(f"needs arch {req.arch}, this device is {facts.arch}")
    if facts.free_disk_mb < req.min_free_disk_mb:
        unmet.append(f"needs {req.min_free_disk_mb} MB free disk, has {facts.free_disk_mb}")
    if facts.free_memory_mb < req.min_free_memory_mb:
        unmet.append(f"needs {req.min_free_memory_mb} MB free memory, has {facts.free_memory_mb}")
    if req.accelerator is not None and req.accelerator != facts.accelerator:
        unmet.append(f"needs accelerator {req.accelerator}, this device has {facts.accelerator}")
    return unmet


def _arch(name: str) -> str:
    lowered = name.lower()
    return _ARCH_ALIASES.get(lowered, lowered)


def public_key_text(key: Ed25519PublicKey) -> str:
    """A public key as a root's ``keys`` hold it: base64 of the raw 32 bytes."""
    return base64.b64encode(raw_public_key(key)).decode("ascii")
