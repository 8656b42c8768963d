"""Fixtures for the management API: real daemons with a management section of our choice,
clients through the stub and the CLI, and throwaway users for the security tests."""

from __future__ import annotations

import grp
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgeserve.api.management_client import ManagementClient

CLI_TIMEOUT = 120


def management_address(daemon: Any) -> str:
    return f"unix://{daemon.run_dir / 'management.sock'}"


@pytest.fixture
def mdaemons(daemons: Any) -> Any:
    """``daemons`` whose ``start`` also takes ``management={...}`` and ``runtime={...}``,
    merged into those sections of the config file ("{run_dir}" is filled in)."""
    original_start = daemons.start
    original_text = daemons.config_text
    sections: dict[str, dict[str, Any]] = {}

    def config_text(state_dir: Path, run_dir: Path, *rest: Any) -> str:
        data = yaml.safe_load(original_text(state_dir, run_dir, *rest))
        for key, values in sections.items():
            data.setdefault(key, {}).update(_with_run_dir(values, run_dir))
        return yaml.safe_dump(data)

    def start(
        *archives: Path, management: dict | None = None, runtime: dict | None = None, **kwargs: Any
    ) -> Any:
        sections.clear()
        if management:
            sections["management"] = management
        if runtime:
            sections["runtime"] = runtime
        return original_start(*archives, **kwargs)

    daemons.config_text = config_text
    daemons.start = start
    return daemons


def _with_run_dir(value: Any, run_dir: Path) -> Any:
    """Replace "{run_dir}" in strings (the run dir is made inside ``start``)."""
    if isinstance(value, str):
        return value.replace("{run_dir}", str(run_dir))
    if isinstance(value, list):
        return [_with_run_dir(v, run_dir) for v in value]
    if isinstance(value, dict):
        return {k: _with_run_dir(v, run_dir) for k, v in value.items()}
    return value


@pytest.fixture
def client_of() -> Iterator[Any]:
    """client_of(daemon) -> ManagementClient on its Unix socket (closed at teardown)."""
    opened: list[ManagementClient] = []

    def make(daemon: Any, **kwargs: Any) -> ManagementClient:
        client = ManagementClient(management_address(daemon), **kwargs)
        opened.append(client)
        return client

    yield make
    for client in opened:
        client.close()


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m edgeserve ARGS`` in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "edgeserve", *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        env=env,
    )


def drop_in(daemon: Any, archive: Path, name: str | None = None) -> Path:
    """Copy an archive into the daemon's allowed directory (<state_dir>/incoming)."""
    incoming = daemon.state_dir / "incoming"
    incoming.mkdir(exist_ok=True)
    target = incoming / (name or archive.name)
    shutil.copyfile(archive, target)
    return target


# -- other users ----------------------------------------------------------------------------

# Runs as root, imports what the CLI needs, then drops to the given uid/gid/groups and runs
# `edgeserve ARGS`. The interpreter lives under /root (0700), so imports must happen first.
_AS_USER = textwrap.dedent("""\
    import os, sys, json
    import grpc, edgeserve.cli, edgeserve.api.management_client, edgeserve.config.load
    import edgeserve.telemetry.status, edgeserve.store.model_store, edgeserve.telemetry.sampler
    import encodings.idna, argparse, json.decoder
    uid, gid, groups = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
    os.setgroups(groups)
    os.setgid(gid)
    os.setuid(uid)
    assert os.getuid() == uid and os.geteuid() == uid
    sys.exit(edgeserve.cli.main(sys.argv[4:]))
    """)


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]

    def run_cli(self, *args: str, gid: int | None = None) -> subprocess.CompletedProcess[str]:
        """`edgeserve ARGS` as this user (optionally with another primary gid)."""
        import json

        return subprocess.run(
            [
                sys.executable,
                "-c",
                _AS_USER,
                str(self.uid),
                str(self.gid if gid is None else gid),
                json.dumps(list(self.groups)),
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
            cwd="/",
        )


@dataclass(frozen=True)
class Accounts:
    group: str
    gid: int
    insider: Account
    outsider: Account


@pytest.fixture(scope="session")
def accounts() -> Iterator[Accounts]:
    """A throwaway group with one member and one user outside it; removed at the end."""
    if os.geteuid() != 0:
        # CI runs as root (.ci/run sets this): there, a skip would hide the security tests.
        if os.environ.get("EDGESERVE_CI"):
            pytest.fail("the management security tests need root in CI")
        pytest.skip("creating throwaway users needs root")
    tag = secrets.token_hex(3)
    group, insider, outsider = f"esg{tag}", f"esin{tag}", f"esout{tag}"
    subprocess.run(["groupadd", group], check=True)
    try:
        subprocess.run(["useradd", "-M", "-N", "-G", group, insider], check=True)
        subprocess.run(["useradd", "-M", "-N", outsider], check=True)
        gid = grp.getgrnam(group).gr_gid

        def account(name: str, groups: tuple[int, ...]) -> Account:
            entry = pwd.getpwnam(name)
            return Account(name, entry.pw_uid, entry.pw_gid, groups)

        yield Accounts(group, gid, account(insider, (gid,)), account(outsider, ()))
    finally:
        for user in (insider, outsider):
            subprocess.run(["userdel", user], check=False, capture_output=True)
        subprocess.run(["groupdel", group], check=False, capture_output=True)


def open_run_dir(daemon: Any, gid: int) -> None:
    """Let the group traverse the daemon's run_dir (mkdtemp made it 0700), as systemd's
    RuntimeDirectoryMode=0750 with Group= would."""
    os.chown(daemon.run_dir, -1, gid)
    os.chmod(daemon.run_dir, 0o750)  # noqa: S103 (group only, as in production)
