"""``edgeserve fleet root init|rotate`` with real keys and files, in-process."""

from __future__ import annotations

import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from edgeserve.archive.signing import load_public_key
from edgeserve.fleet.canonical import canonical_bytes, parse_envelope
from edgeserve.fleet.documents import parse_root
from edgeserve.fleet.verifier import key_id_of, verify_root_rotation
from tests.cli.conftest import assert_one_error_line
from tests.cli.support import edgeserve, edgeserve_ok, keygen


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for name in ("a", "b", "c", "outsider"):
        keygen(tmp_path / name)
    return tmp_path


def keyid(folder: Path, name: str) -> str:
    return key_id_of(load_public_key(folder / f"{name}.pub"))


def init(folder: Path, *extra: str | Path) -> Path:
    out = folder / "root.json"
    edgeserve_ok(
        "fleet", "root", "init", "--key", folder / "a.pub", "--key", folder / "b.pub",
        "--threshold", "2", "-o", out, *extra,
    )  # fmt: skip
    return out


def rotate(
    folder: Path, *signers: str, out: str = "root-2.json", root: str = "root.json"
) -> tuple[int, str, Path]:
    argv: list[str | Path] = ["fleet", "root", "rotate", "--root", folder / root]
    argv += ["--key", folder / "b.pub", "--key", folder / "c.pub", "--threshold", "2"]
    for name in signers:
        argv += ["--sign-key", folder / f"{name}.key"]
    done = edgeserve(*argv, "-o", folder / out)
    return done.code, done.err, folder / out


def test_init_writes_version_1_as_canonical_bytes(folder: Path) -> None:
    before = datetime.now(UTC)
    out = init(folder)
    data = out.read_bytes()
    root = parse_root(data)
    assert root.version == 1 and root.threshold == 2
    assert set(root.keys) == {keyid(folder, "a"), keyid(folder, "b")}
    assert before + timedelta(days=364) < root.expires < before + timedelta(days=366)
    envelope = parse_envelope(data)
    assert envelope.signatures == ()
    assert canonical_bytes({"signed": dict(envelope.signed), "signatures": []}) == data


def test_init_with_an_absolute_expiry_and_its_own_signatures(folder: Path) -> None:
    out = init(
        folder, "--expires", "2099-01-01T00:00:00Z",
        "--sign-key", folder / "a.key", "--sign-key", folder / "b.key",
    )  # fmt: skip
    root = parse_root(out.read_bytes())
    assert root.expires == datetime(2099, 1, 1, tzinfo=UTC)
    assert {s.keyid for s in parse_envelope(out.read_bytes()).signatures} == set(root.keys)


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["--threshold", "3"], ["--threshold", "1..2"]),
        (["--threshold", "0"], ["--threshold"]),
        (["--expires", "tomorrow"], ["--expires", "tomorrow"]),
        (["--expires", "2001-01-01T00:00:00Z"], ["--expires", "not in the future"]),
        (["--sign-key", "{outsider.key}"], ["--sign-key", "not a key of the root"]),
        (["--sign-key", "{a.key}"], ["1 valid signature(s) of the 2 required"]),
        (["--key", "{missing.pub}"], ["missing.pub"]),
        (["--key", "{a.key}"], ["a.key", "not a PEM public key"]),
    ],
)
def test_init_errors_are_one_line_and_exit_2(
    folder: Path, extra: list[str], fragments: list[str]
) -> None:
    argv = ["fleet", "root", "init", "--key", str(folder / "a.pub"), "--key", str(folder / "b.pub")]
    if "--threshold" not in extra:
        argv += ["--threshold", "2"]
    argv += [str(folder / e[1:-1]) if e.startswith("{") else e for e in extra]
    done = edgeserve(*argv, "-o", folder / "root.json")
    assert done.code == 2 and done.out == ""
    assert_one_error_line(done.err, *fragments)
    assert not (folder / "root.json").exists()


def test_init_refuses_to_overwrite(folder: Path) -> None:
    out = init(folder)
    before = out.read_bytes()
    done = edgeserve(
        "fleet", "root", "init", "--key", folder / "c.pub", "--threshold", "1", "-o", out
    )
    assert done.code == 2
    assert_one_error_line(done.err, str(out), "refusing to overwrite")
    assert out.read_bytes() == before


def test_rotate_round_trip_is_what_a_device_accepts(folder: Path) -> None:
    current = parse_root(init(folder).read_bytes())
    code, err, out = rotate(folder, "a", "b", "c")
    assert code == 0, err
    new = verify_root_rotation(current, out.read_bytes(), trusted_time=datetime.now(UTC))
    assert new.version == 2 and set(new.keys) == {keyid(folder, "b"), keyid(folder, "c")}
    # ...and once more, from v2 to v3, signed by b and c alone (both thresholds are theirs).
    code, err, third = rotate(folder, "b", "c", root="root-2.json", out="root-3.json")
    assert code == 0, err
    assert (
        verify_root_rotation(new, third.read_bytes(), trusted_time=datetime.now(UTC)).version == 3
    )


@pytest.mark.parametrize(
    ("signers", "fragment"),
    [
        (("a", "c"), "root v1 keys: 1 valid"),  # old threshold 2 of a, b: only a
        (("a", "b"), "root v2 keys: 1 valid"),  # new threshold 2 of b, c: only b
    ],
)
def test_rotate_refuses_what_devices_would_refuse(
    folder: Path, signers: tuple[str, ...], fragment: str
) -> None:
    init(folder)
    code, err, out = rotate(folder, *signers)
    assert code == 2
    assert_one_error_line(err, "devices would refuse this rotation", fragment, "(threshold)")
    assert not out.exists()


def test_rotate_errors_exit_2(folder: Path) -> None:
    init(folder)
    code, err, out = rotate(folder, "a", "b", "outsider")
    assert code == 2 and not out.exists()
    assert_one_error_line(err, "outsider.key", "not a key of the old or the new root")

    (folder / "junk.json").write_text('{"signed": {"type": "root"}, "signatures": []}')
    code, err, out = rotate(folder, "a", "b", "c", root="junk.json")
    assert code == 2 and not out.exists()
    assert_one_error_line(err, "missing key(s)")

    code, err, out = rotate(folder, "a", "b", "c", root="nowhere.json")
    assert code == 2 and not out.exists()
    assert_one_error_line(err, "--root", "nowhere.json")

    code, err, _ = rotate(folder, "a", "b", "c", out="root.json")
    assert code == 2
    assert_one_error_line(err, "refusing to overwrite")


def test_rotate_needs_its_options(folder: Path) -> None:
    init(folder)
    done = edgeserve("fleet", "root", "rotate", "--root", folder / "root.json", "-o", folder / "x")
    assert done.code == 2 and "Traceback" not in done.err
    assert "required" in done.err.splitlines()[-1]


def test_rotate_with_an_unreachable_broker_writes_the_file_then_exits_3(folder: Path) -> None:
    init(folder)
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv: list[str | Path] = ["fleet", "root", "rotate", "--root", folder / "root.json"]
    argv += ["--key", folder / "b.pub", "--threshold", "1"]
    argv += ["--sign-key", folder / "a.key", "--sign-key", folder / "b.key"]
    argv += ["-o", folder / "root-2.json", "--broker", f"mqtt://127.0.0.1:{port}"]
    done = edgeserve(*argv, "--connect-timeout", "1")
    assert done.code == 3, done.err
    assert_one_error_line(done.err)
    assert parse_root((folder / "root-2.json").read_bytes()).version == 2  # kept: publish later
    bad = edgeserve(*argv[:-2], "--broker", "http://example.org", "-o", folder / "x.json")
    assert bad.code == 2 and not (folder / "x.json").exists()
