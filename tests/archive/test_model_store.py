"""The model store: atomic installs that leave no trace on failure, immutability, live state."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from archive_helpers import rewrite, tree_snapshot

from edgeserve.archive.signing import SIGNATURE_NAME, TrustStore
from edgeserve.errors import ArchiveError, NotFound, StoreError, VerificationError
from edgeserve.store.model_store import STAGING, LiveEntry, ModelStore
from edgeserve.types import BatchingSettings


@pytest.fixture
def store(tmp_path: Path, trust: TrustStore) -> ModelStore:
    return ModelStore(tmp_path / "models", trust, live_state_path=tmp_path / "live.json")


def _no_trace(store: ModelStore) -> None:
    """Nothing but the (empty) staging folder and the lock file."""
    assert tree_snapshot(store.root) in ([], [".lock"], [".lock", STAGING])
    assert tree_snapshot(store.root / STAGING) == []


def test_install_get_list_remove(store: ModelStore, signed_archive: Path) -> None:
    installed = store.install(signed_archive)
    assert (installed.name, installed.version) == ("mlp", "1")
    assert installed.path == store.root / "mlp" / "1"
    assert (installed.path / "manifest.json").is_file()
    assert (installed.path / SIGNATURE_NAME).is_file()
    for path in installed.path.rglob("*"):
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert tree_snapshot(store.root / STAGING) == []
    assert store.get("mlp", "1") == installed
    assert store.list() == [installed]
    store.remove("mlp", "1")
    assert not (store.root / "mlp").exists()
    assert store.list() == []
    with pytest.raises(NotFound, match="model 'mlp' version '1' is not installed"):
        store.get("mlp", "1")
    with pytest.raises(NotFound):
        store.remove("mlp", "1")


def test_failed_install_leaves_no_trace(
    store: ModelStore, signed_archive: Path, tmp_path: Path
) -> None:
    bad = rewrite(signed_archive, tmp_path / "bad.esar", replace={"model.pt": b"evil"})
    with pytest.raises(ArchiveError, match="sha256 mismatch"):
        store.install(bad)
    _no_trace(store)


def test_unsigned_archive_is_not_installed(
    store: ModelStore, signed_archive: Path, tmp_path: Path
) -> None:
    unsigned = rewrite(signed_archive, tmp_path / "u.esar", drop=[SIGNATURE_NAME])
    with pytest.raises(VerificationError, match="is not signed"):
        store.install(unsigned)
    _no_trace(store)
    relaxed = ModelStore(store.root, None, live_state_path=store.live_state_path)
    assert relaxed.install(unsigned).name == "mlp"


def test_failed_final_rename_leaves_no_trace(store: ModelStore, signed_archive: Path) -> None:
    """<root>/mlp is a file, so the version directory cannot be put in place."""
    store.root.mkdir(parents=True)
    blocker = store.root / "mlp"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match=r"cannot install model 'mlp' version '1' into"):
        store.install(signed_archive)
    assert blocker.read_text() == "not a directory"
    assert tree_snapshot(store.root / STAGING) == []
    assert sorted(p.name for p in store.root.iterdir()) == [".lock", STAGING, "mlp"]


def test_reinstall_identical_is_a_no_op(store: ModelStore, signed_archive: Path) -> None:
    first = store.install(signed_archive)
    inode = first.path.stat().st_ino
    again = store.install(signed_archive)
    assert again == first
    assert first.path.stat().st_ino == inode
    assert tree_snapshot(store.root / STAGING) == []


def test_versions_are_immutable(
    store: ModelStore,
    signed_archive: Path,
    tmp_path: Path,
    models_py: Path,
    example_npy: Path,
    keys: tuple[Path, Path],
) -> None:
    from edgeserve.packager.build import build_archive

    first = store.install(signed_archive)
    different = tmp_path / "different.esar"
    build_archive(
        f"{models_py}:build",
        name="mlp",
        version="1",
        output=different,
        example_inputs=[example_npy],  # input named input__0 this time
        sign_key=keys[0],
    )
    with pytest.raises(StoreError, match="versions are immutable"):
        store.install(different)
    assert store.get("mlp", "1").manifest == first.manifest
    assert tree_snapshot(store.root / STAGING) == []


def test_get_reverifies(store: ModelStore, signed_archive: Path) -> None:
    installed = store.install(signed_archive)
    (installed.path / "model.pt").write_bytes(b"tampered on disk")
    with pytest.raises(StoreError, match="'mlp' version '1' fails verification.*sha256"):
        store.get("mlp", "1")


@pytest.mark.parametrize(
    ("name", "version"), [("..", "1"), ("mlp", "../../etc"), (".staging", "x")]
)
def test_get_refuses_names_that_are_not_store_names(
    store: ModelStore, name: str, version: str
) -> None:
    with pytest.raises(NotFound, match="not a valid store name"):
        store.get(name, version)


def test_collect_garbage_removes_interrupted_installs(
    store: ModelStore, signed_archive: Path
) -> None:
    store.install(signed_archive)
    leftover = store.root / STAGING / "deadbeef" / "model"
    leftover.mkdir(parents=True)
    (leftover / "model.pt").write_bytes(b"half written")
    (store.root / STAGING / "stray.tmp").write_bytes(b"")
    assert store.collect_garbage() == 2
    assert tree_snapshot(store.root / STAGING) == []
    assert store.get("mlp", "1").name == "mlp"
    assert store.collect_garbage() == 0


def test_list_skips_a_broken_directory(store: ModelStore, signed_archive: Path) -> None:
    store.install(signed_archive)
    broken = store.root / "junk" / "1"
    broken.mkdir(parents=True)
    (broken / "manifest.json").write_text("{")
    assert [(m.name, m.version) for m in store.list()] == [("mlp", "1")]


# -- live state ---------------------------------------------------------------------------


def test_live_state_round_trip(store: ModelStore) -> None:
    assert store.read_live_state() == []
    entries = [
        LiveEntry("mlp", "1", False, BatchingSettings(instances=1)),
        LiveEntry("mlp", "2", True, BatchingSettings(instances=2, max_batch_size=16), "cuda:0"),
        LiveEntry("resnet", "7", True),
    ]
    store.write_live_state(entries)
    assert store.read_live_state() == entries
    assert json.loads(store.live_state_path.read_text())["schema"] == 1


def test_live_state_written_by_earlier_versions_still_loads(store: ModelStore) -> None:
    # Before BatchingSettings, every field was written, unset ones as null, device inside.
    settings = {
        "max_batch_size": None,
        "max_queue_delay_ms": None,
        "max_queue_size": 256,
        "preferred_batch_sizes": [4, 8],
        "instances": 2,
        "intra_op_threads": None,
        "device": "cpu",
    }
    document = {
        "schema": 1,
        "models": [{"name": "mlp", "version": "1", "default": True, "settings": settings}],
    }
    store.live_state_path.parent.mkdir(parents=True, exist_ok=True)
    store.live_state_path.write_text(json.dumps(document))
    asked = BatchingSettings(max_queue_size=256, preferred_batch_sizes=(4, 8), instances=2)
    assert store.read_live_state() == [LiveEntry("mlp", "1", True, asked, "cpu")]


def test_live_state_replace_is_atomic(store: ModelStore) -> None:
    store.write_live_state([LiveEntry("mlp", "1", True)])
    first_inode = store.live_state_path.stat().st_ino
    store.write_live_state([LiveEntry("mlp", "2", True)])
    # a new file renamed over the old one, never the old one rewritten in place
    assert store.live_state_path.stat().st_ino != first_inode
    assert store.read_live_state() == [LiveEntry("mlp", "2", True)]
    assert os.listdir(store.live_state_path.parent) == ["live.json"]


def test_live_state_failed_write_keeps_the_old_file(store: ModelStore) -> None:
    store.write_live_state([LiveEntry("mlp", "1", True)])
    with pytest.raises(StoreError, match="not JSON"):
        not_json = BatchingSettings(instances=object())  # type: ignore[arg-type]
        store.write_live_state([LiveEntry("mlp", "2", True, not_json)])
    with pytest.raises(StoreError, match="more than one default"):
        store.write_live_state([LiveEntry("mlp", "1", True), LiveEntry("mlp", "2", True)])
    with pytest.raises(StoreError, match="listed twice"):
        store.write_live_state([LiveEntry("a", "1", True), LiveEntry("a", "1", False)])
    assert store.read_live_state() == [LiveEntry("mlp", "1", True)]
    assert os.listdir(store.live_state_path.parent) == ["live.json"]


@pytest.mark.parametrize(
    "content",
    [b"{", b'{"schema": 9, "models": []}', b'{"schema": 1, "models": [{"name": "x"}]}'],
)
def test_malformed_live_state(store: ModelStore, content: bytes) -> None:
    store.live_state_path.write_bytes(content)
    with pytest.raises(StoreError, match="live.json' is malformed"):
        store.read_live_state()
