"""The wheel: it holds every module and data file of the checkout, and installed into a
fresh virtual environment its console script runs.

The wheel is built from a copy of the files git tracks (or would track), so a stale
``build/`` folder cannot hide a missing subpackage. The fresh environment gets the wheel
with ``--no-deps``; its dependencies come from the test's own environment through a
``.pth`` line (a plain path: the editable install's import hook there is not loaded), so
``edgeserve`` can only be imported from the wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from edgeserve import __version__

ROOT = Path(__file__).resolve().parents[2]
# Folder in the checkout -> folder in the installed package, and the files it ships.
SHIPPED = {
    "agent": ("edgeserve", ("*.py",)),
    "handlers": ("edgeserve/handlers", ("*.py",)),
    "proto": ("edgeserve/proto", ("*.py", "*.proto", "*.pyi")),
}


def _project_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.splitlines()
    return [name for name in listed if (ROOT / name).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source")
    for name in _project_files():
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    out = tmp_path_factory.mktemp("dist")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
        + ["--wheel-dir", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (path,) = out.glob("edgeserve-*.whl")
    return path


def _expected_members() -> set[str]:
    expected = set()
    for folder, (package, patterns) in SHIPPED.items():
        for pattern in patterns:
            for path in (ROOT / folder).rglob(pattern):
                if "__pycache__" not in path.parts:
                    expected.add(f"{package}/{path.relative_to(ROOT / folder).as_posix()}")
    return expected


def test_the_wheel_holds_every_module_and_data_file(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        members = set(zf.namelist())
        metadata = next(n for n in members if n.endswith(".dist-info/METADATA"))
        entry_points = next(n for n in members if n.endswith(".dist-info/entry_points.txt"))
        assert "edgeserve = edgeserve.cli:main" in zf.read(entry_points).decode()
        assert f"Version: {__version__}" in zf.read(metadata).decode()
    expected = _expected_members()
    assert "edgeserve/serving/batch_policy.py" in expected  # the walk itself found files
    missing = sorted(expected - members)
    assert not missing, f"not in the wheel: {missing}"


def test_the_installed_wheel_runs_its_console_script(wheel: Path, tmp_path: Path) -> None:
    # The fresh environment sees nothing of this one's import path but the .pth below.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300, env=env)
    python = venv / "bin" / "python"
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert installed.returncode == 0, installed.stderr
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env=env,
    ).stdout.strip()
    (Path(site) / "deps-from-test-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    def edgeserve(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(venv / "bin" / "edgeserve"), *args],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=120,
            env=env,
        )

    where = subprocess.run(
        [str(python), "-c", "import edgeserve.cli; print(edgeserve.cli.__file__)"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert where.stdout.strip().startswith(site), where.stdout + where.stderr
    version = edgeserve("--version")
    assert (version.returncode, version.stdout.strip()) == (0, f"edgeserve {__version__}")
    package_help = edgeserve("package", "--help")
    assert package_help.returncode == 0, package_help.stderr
    assert "--sign-key" in package_help.stdout and "example:" in package_help.stdout
    keygen = edgeserve("keygen", "--out", "release")
    assert keygen.returncode == 0, keygen.stderr
    assert (tmp_path / "release.key").stat().st_mode & 0o077 == 0
