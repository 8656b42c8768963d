"""The verifier: each refusal once, rotations, threshold counting, trusted time.

Keys come from ``edgeserve keygen`` (through the CLI, in-process) and are read back with
the archive signing module, as the controller commands read them.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeserve.archive.signing import load_private_key
from edgeserve.errors import DocumentRefused
from edgeserve.fleet.canonical import Envelope, Signature, parse_envelope
from edgeserve.fleet.documents import DeviceFacts, Root, format_time
from edgeserve.fleet.verifier import (
    advance_trusted_time,
    key_id_of,
    public_key_text,
    sign,
    sign_deployment,
    to_bytes,
    verify_deployment,
    verify_root_chain,
    verify_root_rotation,
)
from tests.cli.support import keygen
from tests.fleet.test_documents import deployment_fields, model

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
FACTS = DeviceFacts(arch="x86_64", free_disk_mb=4096, free_memory_mb=2048, accelerator="none")


@dataclass
class Keys:
    by_name: dict[str, Ed25519PrivateKey]

    def __getitem__(self, name: str) -> Ed25519PrivateKey:
        return self.by_name[name]

    def root(self, *names: str, version: int = 1, threshold: int = 2, days: int = 365) -> Root:
        return Root.from_signed(
            self.root_fields(*names, version=version, threshold=threshold, days=days)
        )

    def root_fields(
        self, *names: str, version: int = 1, threshold: int = 2, days: int = 365
    ) -> dict[str, Any]:
        keys = {key_id_of(self[n]): public_key_text(self[n].public_key()) for n in names}
        expires = format_time(NOW + timedelta(days=days))
        return {
            "type": "root",
            "version": version,
            "keys": keys,
            "threshold": threshold,
            "expires": expires,
        }


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    folder = tmp_path_factory.mktemp("keys")
    by_name = {}
    for name in ("a", "b", "c", "d", "outsider"):
        private, _ = keygen(folder / name)
        by_name[name] = load_private_key(private)
    return Keys(by_name)


def signed_by(fields: dict[str, Any], *private: Ed25519PrivateKey) -> bytes:
    return to_bytes(sign(fields, private))


def verify(data: bytes, root: Root, **overrides: Any) -> Any:
    options: dict[str, Any] = {
        "root": root,
        "committed_serial": 2,
        "trusted_time": NOW,
        "device_id": "dev-1",
        "groups": ["lab"],
        "facts": FACTS,
    }
    options.update(overrides)
    return verify_deployment(data, **options)


def refused(call: Callable[[], object], reason: str, *fragments: str) -> DocumentRefused:
    with pytest.raises(DocumentRefused) as caught:
        call()
    assert caught.value.reason == reason, str(caught.value)
    for fragment in fragments:
        assert fragment in str(caught.value), str(caught.value)
    return caught.value


# -- deployments -----------------------------------------------------------------------------


def test_a_deployment_signed_by_a_threshold_is_accepted(keys: Keys) -> None:
    root = keys.root("a", "b", "c")
    deployment = verify(signed_by(deployment_fields(), keys["a"], keys["c"]), root)
    assert deployment.serial == 3 and deployment.models[0].name == "mlp"


def test_below_threshold_is_refused(keys: Keys) -> None:
    data = signed_by(deployment_fields(), keys["a"])
    refused(lambda: verify(data, keys.root("a", "b", "c")), "threshold", "1 valid", "2 required")


def test_unknown_key_is_refused(keys: Keys) -> None:
    data = signed_by(deployment_fields(), keys["a"], keys["outsider"])
    error = refused(lambda: verify(data, keys.root("a", "b")), "unknown_key")
    assert key_id_of(keys["outsider"])[:16] in str(error)


def test_bad_signature_is_refused(keys: Keys) -> None:
    envelope = sign(deployment_fields(), [keys["a"], keys["b"]])
    tampered = Envelope({**envelope.signed, "serial": 99}, envelope.signatures)
    refused(lambda: verify(to_bytes(tampered), keys.root("a", "b")), "bad_signature")


def test_a_bad_or_foreign_signature_among_enough_good_ones_is_ignored(keys: Keys) -> None:
    envelope = sign(deployment_fields(), [keys["a"], keys["b"]])
    junk = Signature(key_id_of(keys["c"]), b"\x00" * 64)
    foreign = sign(deployment_fields(), [keys["outsider"]]).signatures[0]
    padded = Envelope(envelope.signed, (*envelope.signatures, junk, foreign))
    assert verify(to_bytes(padded), keys.root("a", "b", "c")).serial == 3


def test_a_repeated_signature_counts_once(keys: Keys) -> None:
    envelope = sign(deployment_fields(), [keys["a"]])
    doubled = Envelope(envelope.signed, envelope.signatures * 2)
    refused(lambda: verify(to_bytes(doubled), keys.root("a", "b")), "threshold", "1 valid")
    # ...and one signer's key listed under two names would need two keyids: the root
    # binds every keyid to the sha256 of its key, so that cannot be written.


@pytest.mark.parametrize("serial", [2, 1])
def test_rollback_and_replay_are_refused(keys: Keys, serial: int) -> None:
    data = signed_by(deployment_fields(serial=serial), keys["a"], keys["b"])
    refused(lambda: verify(data, keys.root("a", "b")), "rollback", "not above the committed 2")


def test_expired_is_refused(keys: Keys) -> None:
    fields = deployment_fields(expires=format_time(NOW))
    data = signed_by(fields, keys["a"], keys["b"])
    refused(lambda: verify(data, keys.root("a", "b")), "expired", "deployment 3 expired")
    later = deployment_fields(expires=format_time(NOW + timedelta(seconds=1)))
    assert verify(signed_by(later, keys["a"], keys["b"]), keys.root("a", "b")).serial == 3


def test_a_clock_reset_does_not_reopen_an_expired_document(keys: Keys) -> None:
    data = signed_by(deployment_fields(), keys["a"], keys["b"])  # expires 2030
    trusted = advance_trusted_time(None, datetime(2031, 1, 1, tzinfo=UTC))
    trusted = advance_trusted_time(trusted, datetime(1970, 1, 1, tzinfo=UTC))  # RTC reset
    assert trusted == datetime(2031, 1, 1, tzinfo=UTC)
    refused(lambda: verify(data, keys.root("a", "b"), trusted_time=trusted), "expired")


def test_an_expired_root_refuses_deployments(keys: Keys) -> None:
    root = keys.root("a", "b", days=-1)
    data = signed_by(deployment_fields(), keys["a"], keys["b"])
    refused(lambda: verify(data, root), "expired", "trust root v1")


def test_wrong_target_is_refused(keys: Keys) -> None:
    root = keys.root("a", "b")
    other = deployment_fields(target={"devices": ["dev-2"], "groups": ["other"]})
    data = signed_by(other, keys["a"], keys["b"])
    refused(lambda: verify(data, root), "wrong_target", "dev-1")
    by_group = deployment_fields(target={"devices": [], "groups": ["lab"]})
    assert verify(signed_by(by_group, keys["a"], keys["b"]), root).serial == 3


@pytest.mark.parametrize(
    ("requires", "fragment"),
    [
        ({"arch": "aarch64"}, "needs arch aarch64"),
        ({"min_free_disk_mb": 4097}, "MB free disk"),
        ({"min_free_memory_mb": 4096}, "MB free memory"),
        ({"accelerator": "cuda"}, "needs accelerator cuda"),
    ],
)
def test_unmet_requirements_are_refused(
    keys: Keys, requires: dict[str, Any], fragment: str
) -> None:
    base = deployment_fields()["requires"]
    data = signed_by(deployment_fields(requires={**base, **requires}), keys["a"], keys["b"])
    refused(lambda: verify(data, keys.root("a", "b")), "requirements", fragment)


def test_met_requirements_and_arch_aliases(keys: Keys) -> None:
    requires = {"arch": "arm64", "min_free_disk_mb": 4096, "min_free_memory_mb": 2048}
    fields = deployment_fields(requires={**requires, "accelerator": "cuda"})
    facts = replace(FACTS, arch="aarch64", accelerator="cuda")
    data = signed_by(fields, keys["a"], keys["b"])
    assert verify(data, keys.root("a", "b"), facts=facts).serial == 3


def test_path_traversal_is_a_schema_refusal_even_when_signed(keys: Keys) -> None:
    fields = deployment_fields(models=[model(name="../../etc/passwd")])
    data = signed_by(fields, keys["a"], keys["b"])
    refused(lambda: verify(data, keys.root("a", "b")), "schema", "models[0].name")


@pytest.mark.parametrize(
    "data", [b"[" * 50_000 + b"]" * 50_000, b'{"signed":{},"signatures":[]}' + b" " * 70_000]
)
def test_huge_or_deep_documents_are_schema_refusals(keys: Keys, data: bytes) -> None:
    refused(lambda: verify(data, keys.root("a", "b")), "schema")


def test_the_artifact_length_cap_is_the_callers(keys: Keys) -> None:
    data = signed_by(deployment_fields(), keys["a"], keys["b"])  # length 1024
    refused(lambda: verify(data, keys.root("a", "b"), max_length=1023), "schema", "length")


def test_sign_deployment_writes_what_a_device_accepts(keys: Keys) -> None:
    fields = deployment_fields()
    del fields["type"]
    data = sign_deployment(fields, [keys["a"], keys["b"], keys["a"]])
    assert len(parse_envelope(data).signatures) == 2
    assert verify(data, keys.root("a", "b")).serial == 3
    refused(lambda: sign_deployment({**fields, "serial": 0}, [keys["a"]]), "schema", "serial")
    refused(lambda: sign_deployment(fields, []), "threshold")


# -- root rotation ---------------------------------------------------------------------------


def rotation(keys: Keys, signers: str, **options: Any) -> bytes:
    fields = keys.root_fields(*options.pop("names", ("b", "c", "d")), **options)
    return signed_by(fields, *(keys[n] for n in signers))


def test_rotation_signed_by_both_thresholds_is_accepted(keys: Keys) -> None:
    current = keys.root("a", "b", "c")  # threshold 2 of a, b, c
    new = verify_root_rotation(current, rotation(keys, "acd", version=2), trusted_time=NOW)
    assert new.version == 2 and set(new.keys) == {key_id_of(keys[n]) for n in "bcd"}


@pytest.mark.parametrize(
    ("signers", "role"),
    [("ad", "root v1 keys: 1 valid"), ("ab", "root v2 keys: 1 valid")],
)
def test_rotation_needs_both_thresholds(keys: Keys, signers: str, role: str) -> None:
    current = keys.root("a", "b", "c")
    data = rotation(keys, signers, version=2)
    refused(lambda: verify_root_rotation(current, data, trusted_time=NOW), "threshold", role)


def test_rotation_skipping_a_version_is_refused(keys: Keys) -> None:
    data = rotation(keys, "abcd", version=3)
    current = keys.root("a", "b", "c")
    refused(lambda: verify_root_rotation(current, data, trusted_time=NOW), "version_skip", "v3")


@pytest.mark.parametrize("version", [1, 2])
def test_replayed_rotation_is_a_rollback(keys: Keys, version: int) -> None:
    current = keys.root("a", "b", "c", version=2)
    data = rotation(keys, "abcd", version=version)
    refused(lambda: verify_root_rotation(current, data, trusted_time=NOW), "rollback")


def test_expired_rotation_is_refused_but_an_expired_root_may_rotate(keys: Keys) -> None:
    stale = keys.root("a", "b", "c", days=-30)
    data = rotation(keys, "abcd", version=2, days=-1)
    refused(lambda: verify_root_rotation(stale, data, trusted_time=NOW), "expired", "root v2")
    fresh = rotation(keys, "abcd", version=2)
    assert verify_root_rotation(stale, fresh, trusted_time=NOW).version == 2


def test_rotation_with_a_forged_signature_is_refused(keys: Keys) -> None:
    envelope = parse_envelope(rotation(keys, "abcd", version=2))
    forged = Envelope({**envelope.signed, "threshold": 1}, envelope.signatures)
    current = keys.root("a", "b", "c")
    refused(
        lambda: verify_root_rotation(current, to_bytes(forged), trusted_time=NOW), "bad_signature"
    )


def test_a_chain_walks_versions_and_checks_only_the_last_expiry(keys: Keys) -> None:
    v1 = keys.root("a", "b")
    v2 = rotation(keys, "abc", names=("b", "c"), version=2, days=-1)  # aged while offline
    v3 = rotation(keys, "bcd", names=("c", "d"), version=3)
    assert verify_root_chain(v1, [v2, v3], trusted_time=NOW).version == 3
    refused(lambda: verify_root_chain(v1, [v3], trusted_time=NOW), "version_skip")
    refused(lambda: verify_root_chain(v1, [v2], trusted_time=NOW), "expired")


def test_root_keys_are_base64_of_the_raw_key(keys: Keys) -> None:
    root = keys.root("a", threshold=1)
    raw = base64.b64decode(public_key_text(keys["a"].public_key()))
    assert root.keys == {key_id_of(keys["a"]): raw} and len(raw) == 32
