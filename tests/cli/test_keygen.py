"""`edgeserve keygen`: a key pair the packager signs with and the daemon trusts."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from edgeserve.archive.signing import key_id_of, load_private_key, load_public_key
from edgeserve.cli import main
from tests.cli.conftest import assert_one_error_line, assert_usage_error


def test_keygen_writes_a_matching_pair(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prefix = tmp_path / "release"
    assert main(["keygen", "--out", str(prefix)]) == 0
    out, err = capsys.readouterr()
    private, public = tmp_path / "release.key", tmp_path / "release.pub"
    assert out.strip() == f"wrote {private} (keep secret) and {public} (add to trust.keys)"
    assert err == ""
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    derived = load_private_key(private).public_key()
    assert key_id_of(derived) == key_id_of(load_public_key(public))


def test_keygen_refuses_to_overwrite_a_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = tmp_path / "release"
    assert main(["keygen", "--out", str(prefix)]) == 0
    before = (tmp_path / "release.key").read_bytes(), (tmp_path / "release.pub").read_bytes()
    capsys.readouterr()
    assert main(["keygen", "--out", str(prefix)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert_one_error_line(err, f"{prefix}.key", "refusing to overwrite")
    after = (tmp_path / "release.key").read_bytes(), (tmp_path / "release.pub").read_bytes()
    assert after == before


@pytest.mark.parametrize("where", ["missing-folder", "under-a-file"])
def test_keygen_into_an_unwritable_prefix_names_the_file(
    where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if where == "under-a-file":
        (tmp_path / "plain").write_text("not a folder")
        prefix, reason = tmp_path / "plain" / "release", "Not a directory"
    else:
        prefix, reason = tmp_path / "nowhere" / "release", "No such file or directory"
    assert main(["keygen", "--out", str(prefix)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert_one_error_line(err, f"keygen: cannot write {prefix}.key", reason)
    assert not Path(f"{prefix}.pub").exists()


def test_keygen_needs_out(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keygen"]) == 2
    assert_usage_error(capsys.readouterr().err, "keygen", "--out")
