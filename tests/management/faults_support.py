"""Helpers for the fault tests (hung models, full and read-only state dirs, corrupt state):
real daemons whose config and log live outside the state dir, a model that hangs while
a flag file exists, and tmpfs mounts (root)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import DaemonFactory, RunningDaemon, free_port, wait_ready

# Hangs in `inference` (so in warm-up, the thread probe and requests alike) while the
# flag file exists; touches "<flag>.entered" first, so a test knows the hang began.
_HANG_HANDLER = """\
import time
from pathlib import Path

from edgeserve.handlers.tensor import TensorHandler


class Hang(TensorHandler):
    def inference(self, data):
        flag = Path(self.context.config["hang_while"])
        if flag.exists():
            Path(str(flag) + ".entered").touch()
        while flag.exists():
            time.sleep(0.05)
        return super().inference(data)
"""


def hang_archive(factory: Callable[..., Path], folder: Path, version: str = "1") -> Path:
    """An archive of model "hang" that hangs while ``folder / "hang"`` exists."""
    handler = folder / "hang_handler.py"
    handler.write_text(_HANG_HANDLER)
    flag = folder / "hang"
    return factory(
        version, name="hang", handler=str(handler), handler_config={"hang_while": str(flag)}
    )


def start(
    factory: DaemonFactory,
    *archives: Path,
    state_dir: Path,
    home: Path,
    sections: dict[str, dict[str, Any]] | None = None,
    wait: bool = True,
) -> RunningDaemon:
    """``edgeserve serve`` with its state at ``state_dir`` and its config and log in
    ``home`` (a full or read-only state dir must not take the test's view of the log
    with it); ``sections`` are merged into the config's sections. Stopped at teardown."""
    run_dir = Path(tempfile.mkdtemp(prefix="es-"))
    uds = run_dir / "inference.sock"
    tcp = f"127.0.0.1:{free_port()}"
    home.mkdir(parents=True, exist_ok=True)
    data = yaml.safe_load(factory.config_text(state_dir, run_dir, uds, tcp, ""))
    data["management"] = {"listen": f"unix://{run_dir / 'management.sock'}"}
    for key, values in (sections or {}).items():
        data.setdefault(key, {}).update(values)
    config = home / "config.yaml"
    config.write_text(yaml.safe_dump(data))
    command = [sys.executable, "-m", "edgeserve", "serve", "--config", str(config)]
    for archive in archives:
        command += ["--model", str(archive)]
    log_path = home / "daemon.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with log_path.open("ab") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    daemon = RunningDaemon(process, state_dir, run_dir, uds, tcp, config, log_path)
    factory.started.append(daemon)
    if wait:
        wait_ready(daemon)
    return daemon


def need_root(what: str) -> None:
    """Root-only scenarios fail in CI (``EDGESERVE_CI``), where a skip would hide a gap."""
    if os.geteuid() == 0:
        return
    if os.environ.get("EDGESERVE_CI"):
        pytest.fail(f"{what} needs root in CI")
    pytest.skip(f"{what} needs root")


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "16m") -> Iterator[Path]:
    """A tmpfs mounted at ``path`` for the block; unmounted (lazily, a daemon may still
    hold it) at the end."""
    need_root("mounting a tmpfs")
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0750", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert mounted.returncode == 0, f"mount tmpfs at {path}: {mounted.stderr}"
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path) -> Path:
    """Fill the file system of ``folder`` with ``dd`` until it refuses; the filler."""
    filler = folder / "filler"
    dd = subprocess.run(
        ["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True, check=False
    )
    assert dd.returncode != 0 and b"No space left on device" in dd.stderr, dd.stderr
    return filler


def remount(path: Path, mode: str) -> None:
    """``mode``: "ro" or "rw" for the mount at ``path``."""
    done = subprocess.run(
        ["mount", "-o", f"remount,{mode}", str(path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, f"remount {mode} {path}: {done.stderr}"
