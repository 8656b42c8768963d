"""``edgeserve demo``: the embedded default, end to end, with nothing but this package.

Builds a small MLP, quantizes it to int8, packages and signs it, starts a real daemon
(``edgeserve serve`` in a child process, local state directory, Unix socket plus a
loopback port, no broker), sends requests over gRPC, prints what came back and how long
it took, and stops the daemon with SIGTERM (or leaves it running).
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgeserve.api.client import ClientError, InferenceClient
from edgeserve.cli.common import add_command
from edgeserve.cli.exits import UsageError
from edgeserve.errors import EdgeserveError

MODEL_NAME = "demo-mlp"
_MODEL_SOURCE = '''\
"""The demo model: a small MLP classifier (64 features -> 10 classes)."""
import torch
from torch import nn


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
'''


def register(commands: Any) -> None:
    sub = add_command(
        commands,
        "demo",
        "Build an int8 example model, serve it locally, and run requests through gRPC.",
        "edgeserve demo",
    )
    sub.add_argument(
        "--state-dir",
        type=Path,
        default=Path(".edgeserve-demo"),
        help="where the demo keeps its store and sockets",
    )
    sub.add_argument("--requests", type=_positive, default=200, help="requests to time")
    sub.add_argument(
        "--keep-running",
        action="store_true",
        help="leave the daemon serving after the demo (Ctrl-C to stop)",
    )


def _positive(text: str) -> int:
    """``--requests``: a count of at least 1 (the demo reports their median)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    state_dir, requests, keep_running = args.state_dir.resolve(), args.requests, args.keep_running
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"demo: --state-dir {state_dir}: {exc.strerror}") from None
    print(f"edgeserve demo: working in {state_dir}")
    archive, key_pub, example = _build_archive(state_dir)
    config, uds, tcp = _write_config(state_dir, key_pub)
    started = time.monotonic()
    # torch 2.13 prints a C++ deprecation notice for quantized tensors on every start.
    env = dict(os.environ, TORCH_CPP_LOG_LEVEL=os.environ.get("TORCH_CPP_LOG_LEVEL", "ERROR"))
    command = [sys.executable, "-m", "edgeserve", "serve", "--config", str(config)]
    daemon = subprocess.Popen(  # noqa: S603 - our own interpreter and module
        [*command, "--model", str(archive)], env=env
    )
    try:
        with InferenceClient(f"unix://{uds}") as client:
            _wait_ready(client, daemon, timeout=120.0)
            print(
                f"daemon ready in {time.monotonic() - started:.2f}s "
                f"(pid {daemon.pid}; listening on unix://{uds} and {tcp})"
            )
            _exercise(client, example, requests)
        if keep_running:
            print("daemon keeps running; Ctrl-C to stop it")
            daemon.wait()
    except KeyboardInterrupt:
        pass
    finally:
        code = _stop(daemon)
    print(f"daemon stopped cleanly (exit {code})" if code == 0 else f"daemon exited {code}")
    return 0 if code == 0 else 1


def _build_archive(state_dir: Path) -> tuple[Path, Path, np.ndarray]:
    """Key pair and archive through the same commands a user types (keygen, package)."""
    from edgeserve.cli import main

    keys = state_dir / "keys"
    keys.mkdir(exist_ok=True)
    key_priv, key_pub = keys / "demo.key", keys / "demo.pub"
    if not key_priv.exists():
        _run_step(main, ["keygen", "--out", str(keys / "demo")])
    source = state_dir / "demo_model.py"
    source.write_text(_MODEL_SOURCE)
    example = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    example_path = state_dir / "example.npy"
    np.save(example_path, example)
    archive = state_dir / f"{MODEL_NAME}-1.esar"
    t0 = time.monotonic()
    _run_step(
        main,
        [
            "package", f"{source}:build", "--name", MODEL_NAME, "--version", "1",
            "--example-input", f"x={example_path}", "--quantize", "dynamic",
            "--max-batch-size", "32", "--sign-key", str(key_priv), "-o", str(archive),
        ],
    )  # fmt: skip
    print(
        f"packaged {archive.name}: int8 dynamic-quantized MLP, signed "
        f"({archive.stat().st_size / 1024:.0f} KiB, {time.monotonic() - t0:.2f}s)"
    )
    return archive, key_pub, example


def _run_step(main: Callable[[list[str]], int], argv: list[str]) -> None:
    with contextlib.redirect_stdout(io.StringIO()):  # the demo prints its own summary
        code = main(argv)
    if code != 0:
        raise EdgeserveError(f"demo: `edgeserve {argv[0]}` failed (exit {code})")


def _write_config(state_dir: Path, key_pub: Path) -> tuple[Path, Path, str]:
    run_dir = state_dir / "run"
    uds = run_dir / "inference.sock"
    tcp = f"127.0.0.1:{_free_port()}"
    config = state_dir / "config.yaml"
    config.write_text(
        textwrap.dedent(f"""\
        # Written by `edgeserve demo`.
        state_dir: {state_dir}
        run_dir: {run_dir}
        server:
          listen: ["unix://{uds}", "{tcp}"]
        management:
          listen: "unix://{run_dir / "management.sock"}"
          allowed_group: "{grp.getgrgid(os.getgid()).gr_name}"
        trust:
          keys: ["{key_pub}"]
        logging:
          level: warning
          format: text
        """)
    )
    return config, uds, tcp


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_ready(client: InferenceClient, daemon: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise EdgeserveError(f"demo: the daemon exited with {daemon.returncode}")
        try:
            if client.server_ready(timeout=0.5):
                return
        except ClientError:
            pass
        time.sleep(0.05)
    raise EdgeserveError("demo: the daemon did not become ready in time")


def _exercise(client: InferenceClient, example: np.ndarray, requests: int) -> None:
    version, outputs = client.infer(MODEL_NAME, {"x": example})
    ((name, first),) = outputs.items()
    logits = ", ".join(f"{v:.3f}" for v in first[0, :4])
    print(
        f"request 1 -> {MODEL_NAME} v{version}: {name} {list(first.shape)} "
        f"argmax={int(first.argmax())} logits=[{logits}, ...]"
    )
    rng = np.random.default_rng(1)
    batch = rng.standard_normal((8, 64)).astype(np.float32)
    _, many = client.infer(MODEL_NAME, {"x": batch})
    print(f"batch of 8 -> argmax per row {many[name].argmax(axis=1).tolist()}")
    latencies = []
    for _ in range(requests):
        t0 = time.perf_counter()
        client.infer(MODEL_NAME, {"x": example})
        latencies.append((time.perf_counter() - t0) * 1e3)
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    print(
        f"{requests} sequential requests over the Unix socket: "
        f"p50 {statistics.median(latencies):.3f} ms, p99 {p99:.3f} ms"
    )


def _stop(daemon: subprocess.Popen[bytes]) -> int:
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.kill(daemon.pid, signal.SIGKILL)
            daemon.wait()
    return daemon.returncode
