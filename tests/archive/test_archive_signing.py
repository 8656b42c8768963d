"""Ed25519 archive signatures: keys, signing, and each way verification refuses."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest
from archive_helpers import rewrite, tree_snapshot, zip_entries

from edgeserve.archive.format import extract_archive, read_manifest, verify_tree
from edgeserve.archive.signing import (
    SIGNATURE_NAME,
    TrustStore,
    generate_key,
    key_id_of,
    load_public_key,
    sign_manifest,
)
from edgeserve.errors import ArchiveError, ConfigError, VerificationError


def _member(archive: Path, name: str) -> bytes:
    return next(data for info, data in zip_entries(archive) if info.filename == name)


def test_generate_key_modes_and_no_overwrite(tmp_path: Path) -> None:
    private, public = tmp_path / "k.key", tmp_path / "k.pub"
    key_id = generate_key(private, public)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"BEGIN PRIVATE KEY" in private.read_bytes()
    assert b"BEGIN PUBLIC KEY" in public.read_bytes()
    assert key_id == key_id_of(load_public_key(public)) and len(key_id) == 16
    before = private.read_bytes()
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        generate_key(private, tmp_path / "other.pub")
    assert private.read_bytes() == before


def test_sign_and_verify(keys: tuple[Path, Path], trust: TrustStore) -> None:
    manifest = b'{"any": "bytes"}\n'
    signature = sign_manifest(manifest, keys[0])
    document = json.loads(signature)
    assert set(document) == {"key_id", "signature"}
    assert document["key_id"] == trust.key_ids[0]
    assert len(base64.b64decode(document["signature"])) == 64
    assert trust.verify(manifest, signature, source="x") == document["key_id"]
    with pytest.raises(VerificationError, match="archive 'x' has a bad signature"):
        trust.verify(manifest + b" ", signature, source="x")


def test_signed_archive_verifies(signed_archive: Path, trust: TrustStore, tmp_path: Path) -> None:
    assert read_manifest(signed_archive, trust=trust).name == "mlp"
    dest = tmp_path / "dest"
    extract_archive(signed_archive, dest, trust=trust)
    assert (dest / SIGNATURE_NAME).read_bytes() == _member(signed_archive, SIGNATURE_NAME)


def test_unsigned_archive_is_refused(
    signed_archive: Path, trust: TrustStore, tmp_path: Path
) -> None:
    unsigned = rewrite(signed_archive, tmp_path / "unsigned.esar", drop=[SIGNATURE_NAME])
    assert read_manifest(unsigned, trust=None).name == "mlp"  # fine when nobody checks
    with pytest.raises(VerificationError, match=r"unsigned.esar' is not signed"):
        read_manifest(unsigned, trust=trust)
    with pytest.raises(VerificationError, match="is not signed"):
        extract_archive(unsigned, tmp_path / "dest", trust=trust)
    assert tree_snapshot(tmp_path) == ["unsigned.esar"]


def test_archive_signed_by_an_unknown_key(
    tmp_path: Path,
    models_py: Path,
    example_npy: Path,
    keys: tuple[Path, Path],
    other_keys: tuple[Path, Path],
    trust: TrustStore,
) -> None:
    from edgeserve.packager.build import build_archive

    archive = tmp_path / "other.esar"
    build_archive(
        f"{models_py}:build",
        name="mlp",
        version="1",
        output=archive,
        example_inputs=[example_npy],
        sign_key=other_keys[0],
    )
    other_id = key_id_of(load_public_key(other_keys[1]))
    with pytest.raises(VerificationError, match=f"signed by unknown key id {other_id}"):
        extract_archive(archive, tmp_path / "dest", trust=trust)
    assert not (tmp_path / "dest").exists()
    both = TrustStore.from_paths([keys[1], other_keys[1]])
    assert read_manifest(archive, trust=both).name == "mlp"


def test_manifest_modified_after_signing(
    signed_archive: Path, trust: TrustStore, tmp_path: Path
) -> None:
    """Valid hashes, valid schema, but not what was signed: a bad signature."""
    manifest = json.loads(_member(signed_archive, "manifest.json"))
    manifest["handler_config"] = {"topk": 1}
    bad = rewrite(
        signed_archive,
        tmp_path / "bad.esar",
        replace={"manifest.json": json.dumps(manifest).encode()},
    )
    assert read_manifest(bad, trust=None).handler_config == {"topk": 1}
    with pytest.raises(VerificationError, match="bad.esar' has a bad signature"):
        extract_archive(bad, tmp_path / "dest", trust=trust)
    assert not (tmp_path / "dest").exists()


def test_member_swapped_with_its_hash_in_a_signed_manifest(
    signed_archive: Path, trust: TrustStore, tmp_path: Path
) -> None:
    """Changing a member means changing its hash in the manifest, which breaks the signature."""
    import hashlib

    manifest = json.loads(_member(signed_archive, "manifest.json"))
    manifest["files"]["model.pt"] = hashlib.sha256(b"evil").hexdigest()
    bad = rewrite(
        signed_archive,
        tmp_path / "bad.esar",
        replace={"manifest.json": json.dumps(manifest).encode(), "model.pt": b"evil"},
    )
    with pytest.raises(VerificationError, match="bad signature"):
        read_manifest(bad, trust=trust)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"not json", "is not JSON"),
        (b"[]", "must be a JSON object"),
        (b'{"key_id": 1, "signature": "x"}', "needs string fields"),
        (b'{"key_id": "abc", "signature": "***"}', "is not base64"),
    ],
)
def test_malformed_signature_file(
    signed_archive: Path, trust: TrustStore, tmp_path: Path, content: bytes, needle: str
) -> None:
    bad = rewrite(signed_archive, tmp_path / "bad.esar", replace={SIGNATURE_NAME: content})
    with pytest.raises(VerificationError, match=needle):
        read_manifest(bad, trust=trust)


def test_trust_store_refuses_non_keys(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    junk = tmp_path / "junk.pub"
    junk.write_text("hello")
    with pytest.raises(ConfigError, match="junk.pub"):
        TrustStore.from_paths([junk])
    with pytest.raises(ConfigError, match="cannot read trusted key"):
        TrustStore.from_paths([tmp_path / "missing.pub"])
    with pytest.raises(ConfigError, match="not a PEM public key"):
        TrustStore.from_paths([keys[0]])  # a private key is not a trust anchor


def test_empty_trust_store_trusts_nothing(signed_archive: Path) -> None:
    with pytest.raises(VerificationError, match=r"unknown key id .* \(trusted: none\)"):
        read_manifest(signed_archive, trust=TrustStore({}))


def test_signature_refusals_are_verification_errors_and_archive_errors(
    signed_archive: Path, trust: TrustStore, tmp_path: Path
) -> None:
    """VerificationError is for signatures only; tampering the hashes catch stays an
    ArchiveError, and callers that catch ArchiveError still catch both."""
    unsigned = rewrite(signed_archive, tmp_path / "unsigned.esar", drop=[SIGNATURE_NAME])
    with pytest.raises(ArchiveError) as refused:
        read_manifest(unsigned, trust=trust)
    assert isinstance(refused.value, VerificationError)
    corrupt = rewrite(signed_archive, tmp_path / "corrupt.esar", replace={"model.pt": b"evil"})
    with pytest.raises(ArchiveError, match="sha256 mismatch") as tampered:
        read_manifest(corrupt, trust=trust)
    assert not isinstance(tampered.value, VerificationError)


def test_unpacked_directory_without_its_signature_is_refused(
    signed_archive: Path, trust: TrustStore, tmp_path: Path
) -> None:
    dest = tmp_path / "dest"
    extract_archive(signed_archive, dest, trust=trust)
    assert verify_tree(dest, trust=trust).name == "mlp"
    (dest / SIGNATURE_NAME).unlink()
    assert verify_tree(dest, trust=None).name == "mlp"
    with pytest.raises(VerificationError, match=r"dest' is not signed"):
        verify_tree(dest, trust=trust)
