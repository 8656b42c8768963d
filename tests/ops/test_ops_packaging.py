"""The .deb: layout and control files (a --dry-run build, no torch), the packaged config,
the maintainer scripts, and constraints.txt."""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import edgeserve
from edgeserve.config import Config, load_config


def _dpkg_deb() -> str:
    path = shutil.which("dpkg-deb")
    if path is None:
        pytest.skip("dpkg-deb is not installed (not a Debian system)")
    return path


@pytest.fixture(scope="module")
def dry_run_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _dpkg_deb()
    root = Path(__file__).resolve().parents[2]
    out = tmp_path_factory.mktemp("deb")
    result = subprocess.run(
        ["bash", str(root / "packaging" / "build-deb.sh"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    deb = Path(result.stdout.strip().splitlines()[-1])
    assert deb.parent == out and deb.name.endswith(".dry-run.deb")
    return deb


@pytest.fixture(scope="module")
def unpacked(dry_run_deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("unpacked")
    subprocess.run([_dpkg_deb(), "--raw-extract", str(dry_run_deb), str(folder)], check=True)
    return folder


def test_control_fields(dry_run_deb: Path) -> None:
    fields = ["Package", "Version", "Architecture", "Depends", "Installed-Size"]
    result = subprocess.run(
        [_dpkg_deb(), "--field", str(dry_run_deb), *fields],
        capture_output=True,
        text=True,
        check=True,
    )
    control = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert control["Package"] == "edgeserve"
    assert control["Version"] == f"{edgeserve.__version__}-1"
    minor = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert f"python3 (>= {minor})" in control["Depends"]
    assert "adduser" in control["Depends"]
    assert int(control["Installed-Size"]) > 0


def test_layout_and_ownership(dry_run_deb: Path) -> None:
    listing = subprocess.run(
        [_dpkg_deb(), "--contents", str(dry_run_deb)], capture_output=True, text=True, check=True
    ).stdout
    entries = {
        line.split()[-1] if "->" not in line else line.split()[-3]: line
        for line in listing.splitlines()
    }
    for path in (
        "./lib/systemd/system/edgeserve.service",
        "./etc/edgeserve/config.yaml",
        "./usr/share/doc/edgeserve/examples/gpu.conf.example",
        "./usr/bin/edgeserve",
    ):
        assert path in entries, listing
    assert entries["./usr/bin/edgeserve"].rstrip().endswith("-> /opt/edgeserve/bin/edgeserve")
    assert entries["./etc/edgeserve/config.yaml"].startswith("-rw-r----- root/root")
    assert all(" root/root " in line for line in listing.splitlines())
    assert not any("./opt/" in line for line in listing.splitlines())  # dry run: no venv


def test_files_are_the_repository_files(unpacked: Path, repo_root: Path) -> None:
    pairs = [
        ("lib/systemd/system/edgeserve.service", "systemd/edgeserve.service"),
        ("etc/edgeserve/config.yaml", "packaging/config.yaml"),
        ("DEBIAN/postinst", "packaging/postinst"),
        ("DEBIAN/prerm", "packaging/prerm"),
        ("DEBIAN/postrm", "packaging/postrm"),
    ]
    for packaged, source in pairs:
        assert (unpacked / packaged).read_bytes() == (repo_root / source).read_bytes(), packaged
    assert (unpacked / "DEBIAN" / "conffiles").read_text() == "/etc/edgeserve/config.yaml\n"
    for script in ("postinst", "prerm", "postrm"):
        assert (unpacked / "DEBIAN" / script).stat().st_mode & 0o777 == 0o755


@pytest.mark.parametrize("script", ["postinst", "prerm", "postrm"])
def test_maintainer_scripts(repo_root: Path, script: str) -> None:
    path = repo_root / "packaging" / script
    subprocess.run(["sh", "-n", str(path)], check=True)
    bogus = subprocess.run(["sh", str(path), "bogus-action"], capture_output=True, text=True)
    assert bogus.returncode == 1
    assert f"{script} called with unknown argument 'bogus-action'" in bogus.stderr
    # The branches that must do nothing at all are safe to run for real.
    harmless = {"postinst": "abort-upgrade", "prerm": "failed-upgrade", "postrm": "upgrade"}
    done = subprocess.run(["sh", str(path), harmless[script]], capture_output=True, text=True)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_postinst_creates_the_user_and_enables_the_unit(repo_root: Path) -> None:
    text = (repo_root / "packaging" / "postinst").read_text()
    assert re.search(r"adduser --system --group .*edgeserve", text.replace("\\\n", " "))
    assert "systemctl daemon-reload" in text
    assert "systemctl enable edgeserve.service" in text
    assert "chmod 0640 /etc/edgeserve/config.yaml" in text
    assert "rm -rf /var/lib/edgeserve" in (repo_root / "packaging" / "postrm").read_text()


def test_packaged_config_is_rendered_from_the_code(repo_root: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(repo_root / "packaging" / "render_config.py"),
            "--check",
            str(repo_root / "packaging" / "config.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_packaged_config_uncommented_is_the_defaults(repo_root: Path, tmp_path: Path) -> None:
    text = (repo_root / "packaging" / "config.yaml").read_text()
    assert (
        load_config(
            repo_root / "packaging" / "config.yaml", env={}, overrides={"run_dir": "/run/edgeserve"}
        )
        == Config()
    )
    settings = [line[2:] for line in text.splitlines() if line.startswith("# ")]
    enabled = tmp_path / "enabled.yaml"
    enabled.write_text("\n".join(settings) + "\n")
    assert load_config(enabled, env={}) == Config()
    assert len(settings) > 30  # every key is there to uncomment


def test_constraints_pin_the_cpu_torch_and_match_this_environment(repo_root: Path) -> None:
    pins = {}
    for line in (repo_root / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: not a pin: {line!r}"
            pins[name.lower()] = version
    assert pins["torch"] == "2.13.0"
    assert importlib.metadata.version("torch").startswith("2.13.0+cpu"), "not the CPU build"
    mismatched = {}
    for name, version in pins.items():
        try:
            installed = importlib.metadata.version(name).split("+")[0]
        except importlib.metadata.PackageNotFoundError:
            continue  # a constraint, not a requirement
        if installed != version:
            mismatched[name] = (version, installed)
    assert not mismatched, f"constraints.txt vs installed: {mismatched}"
