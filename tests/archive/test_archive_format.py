"""The archive format: writing, reading, and every way a hostile archive is refused."""

from __future__ import annotations

import dataclasses
import os
import stat
import zipfile
from pathlib import Path

import pytest
from archive_helpers import (
    hand_archive,
    manifest_json,
    rewrite,
    symlink_info,
    tree_snapshot,
    write_zip,
    zip_entries,
)

from edgeserve.archive.format import (
    ArchiveLimits,
    extract_archive,
    read_manifest,
    verify_tree,
    write_archive,
)
from edgeserve.archive.manifest import Manifest
from edgeserve.archive.signing import TrustStore
from edgeserve.errors import ArchiveError
from edgeserve.types import TensorSpec

MODEL = b"not really torchscript, the format does not care"


def _manifest(model_file: str = "model.pt") -> Manifest:
    return Manifest(
        name="hand",
        version="1",
        model_file=model_file,
        inputs=(TensorSpec("x", "FP32", (-1, 4)),),
        outputs=(TensorSpec("y", "FP32", (-1, 4)),),
        files={},
    )


def _refused(
    archive: Path, tmp_path: Path, *needles: str, limits: ArchiveLimits | None = None
) -> ArchiveError:
    """Both read_manifest and extract_archive refuse; nothing is written; message has needles."""
    dest = tmp_path / "dest"
    before = tree_snapshot(tmp_path)
    kwargs = {"limits": limits} if limits else {}
    with pytest.raises(ArchiveError) as read_exc:
        read_manifest(archive, trust=None, **kwargs)
    with pytest.raises(ArchiveError) as extract_exc:
        extract_archive(archive, dest, trust=None, **kwargs)
    assert str(read_exc.value) == str(extract_exc.value)
    assert not dest.exists()
    assert tree_snapshot(tmp_path) == before, "extraction left something behind"
    message = str(extract_exc.value)
    assert str(archive) in message
    for needle in needles:
        assert needle in message, message
    return extract_exc.value


# -- writing ------------------------------------------------------------------------------


def test_write_computes_hashes_and_round_trips(tmp_path: Path) -> None:
    extra = tmp_path / "labels.txt"
    extra.write_text("cat\ndog\n")
    out = tmp_path / "a.esar"
    final = write_archive(out, _manifest(), {"model.pt": MODEL, "labels.txt": extra})
    assert set(final.files) == {"model.pt", "labels.txt"}
    assert read_manifest(out, trust=None) == final
    dest = tmp_path / "unpacked"
    assert extract_archive(out, dest, trust=None) == final
    assert (dest / "model.pt").read_bytes() == MODEL
    assert (dest / "labels.txt").read_text() == "cat\ndog\n"
    for path in dest.rglob("*"):
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert verify_tree(dest, trust=None) == final
    assert sorted(os.listdir(tmp_path)) == ["a.esar", "labels.txt", "unpacked"]


def test_write_is_deterministic(tmp_path: Path) -> None:
    members = {"model.pt": MODEL, "b/z.bin": b"z" * 100, "a.txt": b"a"}
    write_archive(tmp_path / "one.esar", _manifest(), members)
    write_archive(tmp_path / "two.esar", _manifest(), dict(reversed(members.items())))
    assert (tmp_path / "one.esar").read_bytes() == (tmp_path / "two.esar").read_bytes()
    names = [info.filename for info, _ in zip_entries(tmp_path / "one.esar")]
    assert names == ["manifest.json", "a.txt", "b/z.bin", "model.pt"]
    assert {info.date_time for info, _ in zip_entries(tmp_path / "one.esar")} == {
        (1980, 1, 1, 0, 0, 0)
    }


def test_write_replaces_atomically_and_cleans_up_on_failure(tmp_path: Path) -> None:
    out = tmp_path / "a.esar"
    out.write_bytes(b"previous")
    with pytest.raises(ArchiveError, match="model_file"):
        write_archive(out, _manifest(model_file="missing.pt"), {"model.pt": MODEL})
    assert out.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["a.esar"]
    write_archive(out, _manifest(), {"model.pt": MODEL})
    assert read_manifest(out, trust=None).name == "hand"
    assert os.listdir(tmp_path) == ["a.esar"]


@pytest.mark.parametrize("name", ["../x", "/abs", "a\\b", "manifest.json", "a//b"])
def test_write_refuses_bad_member_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(ArchiveError, match="cannot write member"):
        write_archive(tmp_path / "a.esar", _manifest(), {"model.pt": MODEL, name: b"x"})
    assert not (tmp_path / "a.esar").exists()


# -- the zip itself -----------------------------------------------------------------------


def test_not_a_zip(tmp_path: Path) -> None:
    bad = tmp_path / "bad.esar"
    bad.write_bytes(b"hello, I am a text file")
    _refused(bad, tmp_path, "not a zip file")


def test_truncated_zip(tmp_path: Path, signed_archive: Path) -> None:
    data = signed_archive.read_bytes()
    cut = tmp_path / "cut.esar"
    cut.write_bytes(data[: len(data) // 2])
    _refused(cut, tmp_path, "truncated")


def test_missing_archive_file(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="does not exist"):
        read_manifest(tmp_path / "nope.esar", trust=None)


def test_corrupt_member_data(tmp_path: Path) -> None:
    good = write_archive(tmp_path / "g.esar", _manifest(), {"model.pt": MODEL * 100})
    data = bytearray((tmp_path / "g.esar").read_bytes())
    with zipfile.ZipFile(tmp_path / "g.esar") as zf:
        info = zf.getinfo("model.pt")
    offset = info.header_offset + 30 + len(info.filename) + 10  # inside the deflate stream
    data[offset] ^= 0xFF
    bad = tmp_path / "bad.esar"
    bad.write_bytes(bytes(data))
    (tmp_path / "g.esar").unlink()
    assert good.files
    _refused(bad, tmp_path, "model.pt", "corrupt")


def test_declared_size_that_lies_is_caught(tmp_path: Path) -> None:
    """A central directory that understates a member's size (a classic bomb trick)."""
    write_archive(tmp_path / "g.esar", _manifest(), {"model.pt": bytes(100_000)})
    data = bytearray((tmp_path / "g.esar").read_bytes())
    # find the central-directory record of model.pt and set its uncompressed size to 10
    central = data.index(b"PK\x01\x02")
    while True:
        name_len = int.from_bytes(data[central + 28 : central + 30], "little")
        name = bytes(data[central + 46 : central + 46 + name_len])
        if name == b"model.pt":
            break
        central = data.index(b"PK\x01\x02", central + 4)
    data[central + 24 : central + 28] = (10).to_bytes(4, "little")
    bad = tmp_path / "bad.esar"
    bad.write_bytes(bytes(data))
    (tmp_path / "g.esar").unlink()
    _refused(bad, tmp_path, "model.pt")


# -- member names and types ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("../evil.pt", "escapes the archive"),
        ("samples/../../evil", "escapes the archive"),
        ("/etc/cron.d/evil", "absolute path"),
        ("C:/Windows/evil.dll", "absolute path"),
        ("c:evil", "absolute path"),
        ("..\\evil", "backslash"),
        ("dir\\evil", "backslash"),
        ("a//b", "not a normalised"),
        ("./a", "not a normalised"),
    ],
)
def test_escaping_member_names(tmp_path: Path, name: str, problem: str) -> None:
    archive = hand_archive(tmp_path / "a.esar", {"model.pt": MODEL, name: b"payload"})
    _refused(archive, tmp_path, f"member '{name}'", problem)
    assert not (tmp_path.parent / "evil.pt").exists()


def test_symlink_member(tmp_path: Path) -> None:
    members = {"model.pt": MODEL}
    archive = write_zip(
        tmp_path / "a.esar",
        [
            ("manifest.json", manifest_json({**members, "link": b"/etc/passwd"})),
            ("model.pt", MODEL),
            (symlink_info("link"), b"/etc/passwd"),
        ],
    )
    _refused(archive, tmp_path, "member 'link'", "symbolic link")


def test_directory_entry(tmp_path: Path) -> None:
    archive = hand_archive(tmp_path / "a.esar", {"model.pt": MODEL}, extra=[("extra/", b"")])
    _refused(archive, tmp_path, "member 'extra/'", "directory entry")


def test_duplicate_names(tmp_path: Path) -> None:
    members = {"model.pt": MODEL}
    archive = write_zip(
        tmp_path / "a.esar",
        [("manifest.json", manifest_json(members)), ("model.pt", MODEL), ("model.pt", b"evil")],
    )
    _refused(archive, tmp_path, "member 'model.pt'", "duplicate")


def test_file_that_is_also_a_directory(tmp_path: Path) -> None:
    archive = hand_archive(tmp_path / "a.esar", {"model.pt": MODEL, "a": b"1", "a/b": b"2"})
    _refused(archive, tmp_path, "'a'", "both a file and a directory")


# -- zip bombs ----------------------------------------------------------------------------


def test_total_size_limit(tmp_path: Path) -> None:
    archive = hand_archive(tmp_path / "a.esar", {"model.pt": bytes(5000)})
    limits = ArchiveLimits(max_total_bytes=4096)
    _refused(archive, tmp_path, "over the limit of 4096", "zip bomb", limits=limits)
    assert read_manifest(archive, trust=None).name == "hand"  # the default limits allow it


def test_expansion_ratio_limit(tmp_path: Path) -> None:
    archive = hand_archive(tmp_path / "a.esar", {"model.pt": bytes(2_000_000)})
    assert archive.stat().st_size < 20_000
    limits = ArchiveLimits(ratio_floor_bytes=1_000_000, max_ratio=50)
    _refused(archive, tmp_path, "limit 50x", "zip bomb", limits=limits)


def test_member_count_limit(tmp_path: Path) -> None:
    members = {"model.pt": MODEL, **{f"f{i}": b"" for i in range(20)}}
    archive = hand_archive(tmp_path / "a.esar", members)
    _refused(archive, tmp_path, "22 members", limits=ArchiveLimits(max_members=10))


# -- manifest and member set --------------------------------------------------------------


def test_missing_manifest(tmp_path: Path) -> None:
    archive = write_zip(tmp_path / "a.esar", [("model.pt", MODEL)])
    _refused(archive, tmp_path, "no manifest.json")


def test_manifest_not_json(tmp_path: Path) -> None:
    archive = write_zip(tmp_path / "a.esar", [("manifest.json", b"{nope"), ("model.pt", MODEL)])
    _refused(archive, tmp_path, "manifest.json is not valid JSON")


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"name": "../x"}, "manifest field 'name'"),
        ({"schema": 7}, "manifest field 'schema'"),
        ({"inputs": []}, "manifest field 'inputs'"),
        ({"format": "onnx"}, "manifest field 'format'"),
    ],
)
def test_manifest_breaking_the_schema(tmp_path: Path, overrides: dict, needle: str) -> None:
    members = {"model.pt": MODEL}
    archive = write_zip(
        tmp_path / "a.esar",
        [("manifest.json", manifest_json(members, **overrides)), ("model.pt", MODEL)],
    )
    _refused(archive, tmp_path, needle)


def test_manifest_listing_an_escaping_name(tmp_path: Path) -> None:
    members = {"model.pt": MODEL, "../x": b"x"}
    archive = write_zip(
        tmp_path / "a.esar", [("manifest.json", manifest_json(members)), ("model.pt", MODEL)]
    )
    _refused(archive, tmp_path, "manifest lists member '../x'")


def test_listed_member_missing(tmp_path: Path, archive_copy: Path) -> None:
    sample = next(n for n in read_manifest(archive_copy, trust=None).files if "samples/" in n)
    bad = rewrite(archive_copy, tmp_path / "bad.esar", drop=[sample])
    _refused(bad, tmp_path, f"member '{sample}'", "listed in the manifest but missing")


def test_unlisted_member(tmp_path: Path, archive_copy: Path) -> None:
    bad = rewrite(archive_copy, tmp_path / "bad.esar", add=[("payload.sh", b"rm -rf /")])
    _refused(bad, tmp_path, "member 'payload.sh'", "not listed in the manifest")


def test_hash_mismatch(tmp_path: Path, archive_copy: Path) -> None:
    bad = rewrite(archive_copy, tmp_path / "bad.esar", replace={"model.pt": b"evil weights"})
    _refused(bad, tmp_path, "member 'model.pt'", "sha256 mismatch")


def test_extract_refuses_an_existing_destination(tmp_path: Path, signed_archive: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep").write_text("mine")
    with pytest.raises(ArchiveError, match="already exists"):
        extract_archive(signed_archive, dest, trust=None)
    assert tree_snapshot(dest) == ["keep"]


# -- verify_tree --------------------------------------------------------------------------


@pytest.fixture
def unpacked(tmp_path: Path, signed_archive: Path, trust: TrustStore) -> Path:
    dest = tmp_path / "model"
    extract_archive(signed_archive, dest, trust=trust)
    assert verify_tree(dest, trust=trust).name == "mlp"
    return dest


def test_verify_tree_modified_file(unpacked: Path) -> None:
    (unpacked / "model.pt").write_bytes(b"changed")
    with pytest.raises(ArchiveError, match="file 'model.pt' sha256 mismatch"):
        verify_tree(unpacked, trust=None)


def test_verify_tree_missing_file(unpacked: Path) -> None:
    (unpacked / "model.pt").unlink()
    with pytest.raises(ArchiveError, match="'model.pt' is listed in the manifest but missing"):
        verify_tree(unpacked, trust=None)


def test_verify_tree_extra_file(unpacked: Path) -> None:
    (unpacked / "samples" / "evil.py").write_text("import os")
    with pytest.raises(ArchiveError, match="'samples/evil.py' is not listed"):
        verify_tree(unpacked, trust=None)


def test_verify_tree_extra_directory(unpacked: Path) -> None:
    (unpacked / "stray").mkdir()
    with pytest.raises(ArchiveError, match="directory 'stray'"):
        verify_tree(unpacked, trust=None)


def test_verify_tree_symlink(unpacked: Path, tmp_path: Path) -> None:
    real = tmp_path / "elsewhere.pt"
    (unpacked / "model.pt").rename(real)
    (unpacked / "model.pt").symlink_to(real)
    with pytest.raises(ArchiveError, match="'model.pt' is a symbolic link"):
        verify_tree(unpacked, trust=None)


def test_verify_tree_with_trust_needs_the_signature(unpacked: Path, trust: TrustStore) -> None:
    (unpacked / "signature.ed25519.json").unlink()
    assert verify_tree(unpacked, trust=None).name == "mlp"
    with pytest.raises(ArchiveError, match="is not signed"):
        verify_tree(unpacked, trust=trust)


def test_verify_tree_modified_manifest(unpacked: Path, trust: TrustStore) -> None:
    manifest = read_manifest_dir(unpacked)
    changed = dataclasses.replace(manifest, handler_config={"evil": True})
    from edgeserve.archive.format import manifest_bytes

    (unpacked / "manifest.json").write_bytes(manifest_bytes(changed))
    assert verify_tree(unpacked, trust=None).handler_config == {"evil": True}
    with pytest.raises(ArchiveError, match="bad signature"):
        verify_tree(unpacked, trust=trust)


def read_manifest_dir(path: Path) -> Manifest:
    import json

    return Manifest.from_dict(json.loads((path / "manifest.json").read_bytes()))


def test_write_into_a_missing_directory(tmp_path: Path) -> None:
    out = tmp_path / "no" / "such" / "a.esar"
    with pytest.raises(ArchiveError, match="a.esar': cannot be written"):
        write_archive(out, _manifest(), {"model.pt": MODEL})
