"""The systemd unit: what the daemon relies on, the hardening, and systemd's own checks."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgeserve.config import Config

Unit = dict[str, dict[str, list[str]]]

HARDENING = {
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "ProtectProc": "invisible",
    "PrivateUsers": "no",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "no",
    "SystemCallArchitectures": "native",
    "IPAddressDeny": "any",
    "IPAddressAllow": "localhost",
    "UMask": "0027",
}


def parse_unit(path: Path) -> Unit:
    """systemd's INI dialect: repeated keys accumulate, ``#``/``;`` comments, ``\\`` joins."""
    unit: Unit = {}
    section = None
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert section is not None and sep, f"{path.name}:{number}: not 'Key=value': {raw!r}"
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


@pytest.fixture
def unit(repo_root: Path) -> Unit:
    return parse_unit(repo_root / "systemd" / "edgeserve.service")


def _one(unit: Unit, section: str, key: str) -> str:
    values = unit[section].get(key)
    assert values and len(values) == 1, f"[{section}] {key}= must appear once, got {values}"
    return values[0]


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match, value
    return float(match[1]) * (60 if match[2] == "min" else 1)


def test_notify_service_that_the_daemon_drives(unit: Unit) -> None:
    service = unit["Service"]
    assert _one(unit, "Service", "Type") == "notify"
    assert _one(unit, "Service", "NotifyAccess") == "main"
    assert _one(unit, "Service", "ExecStart") == (
        "/usr/bin/edgeserve serve --config /etc/edgeserve/config.yaml"
    )
    assert _one(unit, "Service", "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert _one(unit, "Service", "KillSignal") == "SIGTERM"
    assert _one(unit, "Service", "Restart") == "on-failure"
    assert _seconds(_one(unit, "Service", "WatchdogSec")) == 30
    grace = Config().server.grace_period_s
    assert _seconds(_one(unit, "Service", "TimeoutStopSec")) > grace + 5
    assert service["User"] == service["Group"] == ["edgeserve"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_directories_match_the_config_defaults(unit: Unit) -> None:
    defaults = Config()
    assert defaults.state_dir == Path("/var/lib") / _one(unit, "Service", "StateDirectory")
    assert defaults.run_dir == Path("/run") / _one(unit, "Service", "RuntimeDirectory")
    assert _one(unit, "Service", "ConfigurationDirectory") == "edgeserve"
    assert _one(unit, "Service", "RuntimeDirectoryMode") == "0750"
    exec_start = _one(unit, "Service", "ExecStart")
    assert exec_start.split("--config ")[1].startswith("/etc/edgeserve/")
    # Sockets live in the 0750 runtime directory and are never world-accessible.
    assert defaults.management.socket_mode & 0o007 == 0


@pytest.mark.parametrize(("key", "expected"), sorted(HARDENING.items()))
def test_hardening(unit: Unit, key: str, expected: str) -> None:
    assert _one(unit, "Service", key) == expected


def test_syscall_filter(unit: Unit) -> None:
    assert unit["Service"]["SystemCallFilter"] == ["@system-service", "~@privileged"]
    assert _one(unit, "Service", "SystemCallErrorNumber") == "EPERM"


@pytest.mark.parametrize("name", ["gpu", "resources", "mqtt"])
def test_drop_in_examples_parse(repo_root: Path, name: str) -> None:
    drop_in = parse_unit(repo_root / "systemd" / f"{name}.conf.example")
    assert "Service" in drop_in
    assert set(drop_in) <= {"Unit", "Service"}


def test_gpu_drop_in_opens_only_nvidia_devices(repo_root: Path) -> None:
    service = parse_unit(repo_root / "systemd" / "gpu.conf.example")["Service"]
    assert service["PrivateDevices"] == ["no"]
    assert service["DevicePolicy"] == ["closed"]
    assert all(v.startswith("/dev/nvidia") for v in service["DeviceAllow"])


def _verifiable_copy(repo_root: Path, folder: Path, drop_ins: bool) -> Path:
    """The unit with ExecStart pointed at a binary that exists here (verify checks it)."""
    text = (repo_root / "systemd" / "edgeserve.service").read_text(encoding="utf-8")
    unit_path = folder / "edgeserve.service"
    unit_path.write_text(
        text.replace("ExecStart=/usr/bin/edgeserve", f"ExecStart={sys.executable}")
    )
    if drop_ins:
        (folder / "edgeserve.service.d").mkdir()
        for name in ("gpu", "resources", "mqtt"):
            shutil.copy(
                repo_root / "systemd" / f"{name}.conf.example",
                folder / "edgeserve.service.d" / f"{name}.conf",
            )
    return unit_path


def _systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        if os.environ.get("EDGESERVE_CI"):  # .ci/run installs it: a skip there hides a gap
            pytest.fail("systemd-analyze is missing in CI (apt-get install systemd)")
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    return path


@pytest.mark.parametrize("drop_ins", [False, True], ids=["unit", "unit+drop-ins"])
def test_systemd_analyze_verify(repo_root: Path, tmp_path: Path, drop_ins: bool) -> None:
    analyze = _systemd_analyze()
    unit_path = _verifiable_copy(repo_root, tmp_path, drop_ins)
    result = subprocess.run(
        [analyze, "verify", str(unit_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"SYSTEMD_UNIT_PATH": f"{tmp_path}:", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr  # unknown keys are only warnings: refuse them


def test_systemd_analyze_security_exposure(repo_root: Path, tmp_path: Path) -> None:
    analyze = _systemd_analyze()
    unit_path = _verifiable_copy(repo_root, tmp_path, drop_ins=False)
    result = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(unit_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for edgeserve\.service: (\d+\.\d)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match[1]) <= 1.5, result.stdout  # 1.2 with systemd 252: keep it there


MDWE_PROBE = """
import ctypes, sys
if sys.argv[1] == "wx":
    PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0):
        sys.exit(77)
import torch
torch.set_num_threads(1)
# A batch of images through a small conv: what batching exists for, and what oneDNN runs
# with kernels it generates at run time (tiny single images take another path).
torch.nn.Conv2d(3, 8, 3)(torch.randn(8, 3, 32, 32))
"""


def test_memory_deny_write_execute_must_stay_off() -> None:
    """systemd's MemoryDenyWriteExecute is W^X; the kernel's PR_SET_MDWE is the same rule.
    A batched fp32 convolution needs oneDNN's run-time code generation: W^X breaks it.
    When this test fails, torch no longer needs W+X: turn the setting on in the unit."""
    normal = subprocess.run(
        [sys.executable, "-c", MDWE_PROBE, "normal"], capture_output=True, text=True, timeout=120
    )
    assert normal.returncode == 0, normal.stderr
    under_wx = subprocess.run(
        [sys.executable, "-c", MDWE_PROBE, "wx"], capture_output=True, text=True, timeout=120
    )
    if under_wx.returncode == 77:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux < 6.3)")
    assert under_wx.returncode != 0
    assert "could not create a primitive" in under_wx.stderr
