"""Shared fixtures: signing keys, archive building, and a real daemon in a child process."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeserve.api.client import ClientError, InferenceClient
from tests.cli.support import keygen, package

torch.set_num_threads(1)

MLP_SOURCE = """\
import torch
from torch import nn


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
"""

# A custom handler that sleeps in `inference`, so tests can hold requests in flight.
SLOW_HANDLER_SOURCE = """\
import time
import uuid
from pathlib import Path

from edgeserve.handlers.tensor import TensorHandler


class SlowHandler(TensorHandler):
    def inference(self, data):
        marker_dir = self.context.config.get("marker_dir")
        if marker_dir:
            (Path(marker_dir) / uuid.uuid4().hex).touch()
        time.sleep(float(self.context.config.get("sleep_s", 0.3)))
        return super().inference(data)
"""


@pytest.fixture(scope="session")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``edgeserve keygen``: (test.key, test.pub)."""
    return keygen(tmp_path_factory.mktemp("keys") / "test")


@pytest.fixture(scope="session")
def mlp_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("src") / "mlp.py"
    path.write_text(MLP_SOURCE)
    return path


@pytest.fixture(scope="session")
def mlp_example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("npy") / "x.npy"
    np.save(path, np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32))
    return path


@pytest.fixture(scope="session")
def mlp_archive_factory(
    tmp_path_factory: pytest.TempPathFactory,
    signing_key: tuple[Path, Path],
    mlp_source: Path,
    mlp_example: Path,
):
    """Build (and cache) signed MLP archives: factory(version, quantize=None, **kw) -> Path.

    Each is built by ``edgeserve package`` (``kw`` are ``build_archive``'s options).
    """
    folder = tmp_path_factory.mktemp("archives")
    cache: dict[tuple, Path] = {}

    def factory(version: str = "1", quantize: str | None = None, **kwargs) -> Path:
        key = (version, quantize, tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
        if key not in cache:
            out = folder / f"mlp-{version}-{quantize or 'fp32'}-{len(cache)}.esar"
            kwargs.setdefault("name", "mlp")
            package(
                f"{mlp_source}:build",
                version=version,
                output=out,
                example_inputs=[("x", mlp_example)],
                quantize=quantize,
                max_batch_size=kwargs.pop("max_batch_size", 8),
                sign_key=signing_key[0],
                **kwargs,
            )
            cache[key] = out
        return cache[key]

    return factory


PICKY_TEXT = "words-only-the-model-knows"
"""Text only the picky model's errors carry: it must never reach a client or telemetry."""
PICKY_MARK = 4242.5
"""An input value the picky model refuses (a "." never occurs in a hex id)."""
_PICKY_HANDLER = f"""\
from pathlib import Path

from edgeserve.handlers.tensor import TensorHandler


class Picky(TensorHandler):
    def inference(self, data):
        flag = self.context.config.get("fail_while")
        if flag and Path(flag).exists():
            raise ValueError("{PICKY_TEXT}: warm-up")
        if bool((data[0] == {PICKY_MARK}).any()):
            raise RuntimeError("{PICKY_TEXT}: marked input")
        return super().inference(data)
"""


@pytest.fixture  # a folder per test: a flag file one test leaves must not reach another
def picky_archive(
    mlp_archive_factory: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], tuple[Path, Path]]:
    """factory(version) -> (archive of model "picky", flag file): the model raises on
    ``PICKY_MARK`` inputs, and on every run while the flag file exists."""
    folder = tmp_path_factory.mktemp("picky")
    handler = folder / "picky.py"
    handler.write_text(_PICKY_HANDLER)

    def make(version: str) -> tuple[Path, Path]:
        flag = folder / f"fail-{version}"
        archive = mlp_archive_factory(
            version, name="picky", handler=str(handler), handler_config={"fail_while": str(flag)}
        )
        return archive, flag

    return make


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class RunningDaemon:
    process: subprocess.Popen
    state_dir: Path
    run_dir: Path
    uds: Path
    tcp: str
    config: Path
    log_path: Path
    extra: dict = field(default_factory=dict)

    @property
    def uds_address(self) -> str:
        return f"unix://{self.uds}"

    def client(self) -> InferenceClient:
        return InferenceClient(self.tcp)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"daemon did not stop within {timeout}s:\n{self.log()}") from None


class DaemonFactory:
    """Starts real `edgeserve serve` processes; every one is stopped at teardown."""

    def __init__(self, root: Path, public_key: Path) -> None:
        self.root = root
        self.public_key = public_key
        self.started: list[RunningDaemon] = []

    def config_text(self, state_dir: Path, run_dir: Path, uds: Path, tcp: str, extra: str) -> str:
        return textwrap.dedent(f"""\
            state_dir: {state_dir}
            run_dir: {run_dir}
            server:
              listen: ["unix://{uds}", "{tcp}"]
              grace_period_s: 20
            management:
              listen: "unix://{run_dir / "management.sock"}"
            trust:
              keys: ["{self.public_key}"]
            logging:
              level: info
              format: json
            """) + textwrap.dedent(extra)

    def start(
        self,
        *archives: Path,
        state_dir: Path | None = None,
        extra_config: str = "",
        wait: bool = True,
        args: tuple[str, ...] = (),
        preexec_fn: Callable[[], None] | None = None,
    ) -> RunningDaemon:
        state_dir = state_dir or Path(tempfile.mkdtemp(dir=self.root, prefix="state-"))
        # Unix socket paths must stay under ~108 bytes: keep the run dir short.
        run_dir = Path(tempfile.mkdtemp(prefix="es-"))
        uds = run_dir / "inference.sock"
        tcp = f"127.0.0.1:{free_port()}"
        config = state_dir / "config.yaml"
        state_dir.mkdir(parents=True, exist_ok=True)
        config.write_text(self.config_text(state_dir, run_dir, uds, tcp, extra_config))
        command = [sys.executable, "-m", "edgeserve", "serve", "--config", str(config)]
        for archive in archives:
            command += ["--model", str(archive)]
        command += list(args)
        log_path = state_dir / "daemon.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with log_path.open("ab") as sink:
            process = subprocess.Popen(
                command, stdout=sink, stderr=subprocess.STDOUT, env=env, preexec_fn=preexec_fn
            )
        daemon = RunningDaemon(process, state_dir, run_dir, uds, tcp, config, log_path)
        self.started.append(daemon)
        if wait:
            wait_ready(daemon)
        return daemon

    def stop_all(self) -> None:
        for daemon in self.started:
            if daemon.process.poll() is None:
                daemon.process.kill()
                daemon.process.wait()
            shutil.rmtree(daemon.run_dir, ignore_errors=True)


def wait_ready(daemon: RunningDaemon, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    with daemon.client() as client:
        while time.monotonic() < deadline:
            if daemon.process.poll() is not None:
                raise AssertionError(
                    f"daemon exited with {daemon.process.returncode}:\n{daemon.log()}"
                )
            try:
                if client.server_ready(timeout=0.5):
                    return
            except ClientError:
                pass
            time.sleep(0.05)
    raise AssertionError(f"daemon not ready after {timeout}s:\n{daemon.log()}")


@pytest.fixture
def daemons(tmp_path: Path, signing_key: tuple[Path, Path]) -> Iterator[DaemonFactory]:
    factory = DaemonFactory(tmp_path, signing_key[1])
    try:
        yield factory
    finally:
        factory.stop_all()
