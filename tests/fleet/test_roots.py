"""The device's root keeper without a daemon: walking rotations held from ``P/root/<v>``,
persisting before use, bounds, and which root a restart starts from."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeserve.fleet.documents import Root, format_time
from edgeserve.fleet.roots import MAX_AHEAD, RootKeeper
from edgeserve.fleet.verifier import key_id_of, public_key_text, sign, to_bytes

NOW = datetime(2026, 12, 1, tzinfo=UTC)
KEYS = [Ed25519PrivateKey.generate() for _ in range(5)]


def signed_root(version: int, key: int, *, days: int = 30) -> dict[str, Any]:
    public = KEYS[key].public_key()
    return {
        "type": "root",
        "version": version,
        "keys": {key_id_of(public): public_key_text(public)},
        "threshold": 1,
        "expires": format_time(NOW + timedelta(days=days)),
    }


def rotation(version: int, *, days: int = 30, signers: tuple[int, ...] | None = None) -> bytes:
    """Version ``version`` held by key ``version - 1``, signed by the old and the new key."""
    signers = (version - 2, version - 1) if signers is None else signers
    return to_bytes(sign(signed_root(version, version - 1, days=days), [KEYS[i] for i in signers]))


def keeper(tmp_path: Path, changes: list[int] | None = None) -> RootKeeper:
    v1 = Root.from_signed(signed_root(1, 0))
    kept = RootKeeper(v1, tmp_path, trusted_time=lambda: NOW)
    if changes is not None:
        kept.on_change = lambda: changes.append(kept.current.version)
    return kept


def test_rotations_out_of_order_are_walked_one_version_at_a_time(tmp_path: Path) -> None:
    changes: list[int] = []
    kept = keeper(tmp_path, changes)
    kept.offer("p/root", rotation(3), retained=True)  # the newest first: held, not trusted
    assert kept.current.version == 1 and changes == []
    kept.offer("p/root/2", rotation(2), retained=True)
    assert kept.current.version == 3 and changes == [3]
    assert (tmp_path / "root.json").read_bytes() == rotation(3)  # persisted before use
    kept.offer("p/root/2", rotation(2), retained=True)  # old news
    assert changes == [3]


def test_a_rotation_without_the_old_keys_threshold_is_refused(tmp_path: Path) -> None:
    kept = keeper(tmp_path)
    kept.offer("p/root/2", rotation(2, signers=(1,)), retained=True)  # the new key alone
    assert kept.current.version == 1 and kept.last_refusal == "threshold"
    assert not (tmp_path / "root.json").exists()
    kept.offer("p/root/2", rotation(2), retained=True)  # the genuine one still gets in
    assert kept.current.version == 2


def test_the_walk_ends_on_the_newest_unexpired_root(tmp_path: Path) -> None:
    kept = keeper(tmp_path)
    kept.offer("p/root/3", rotation(3), retained=True)
    kept.offer("p/root/2", rotation(2, days=-1), retained=True)  # aged while offline
    assert kept.current.version == 3
    kept.offer("p/root/4", rotation(4, days=-1), retained=True)  # the newest is expired
    assert kept.current.version == 3 and kept.last_refusal == "expired"


def test_mislabelled_far_ahead_and_malformed_documents_are_ignored(tmp_path: Path) -> None:
    kept = keeper(tmp_path)
    kept.offer("p/root/5", rotation(2), retained=True)  # the topic names another version
    kept.offer("p/root/2", b'{"signed": [', retained=True)
    far = MAX_AHEAD + 2
    kept.offer(f"p/root/{far}", to_bytes(sign(signed_root(far, 0), [KEYS[0]])), retained=True)
    assert kept.current.version == 1
    kept.offer("p/root/2", rotation(2), retained=True)
    assert kept.current.version == 2  # none of the above was held as version 2


def test_a_restart_takes_the_newer_of_the_installed_and_the_persisted_root(
    tmp_path: Path,
) -> None:
    kept = keeper(tmp_path)
    kept.offer("p/root/2", rotation(2), retained=True)
    again = keeper(tmp_path)
    again.load()
    assert again.current.version == 2
    installed_v3 = Root.from_signed(signed_root(3, 2))  # an operator installed a newer one
    newer = RootKeeper(installed_v3, tmp_path, trusted_time=lambda: NOW)
    newer.load()
    assert newer.current.version == 3
    (tmp_path / "root.json").write_bytes(b"torn")
    broken = keeper(tmp_path)
    broken.load()
    assert broken.current.version == 1
