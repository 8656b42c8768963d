"""The README's picture of ``edgeserve fleet report --plot``, from a real short run.

    python -m bench.report_figure [--out bench/figures/fleet-report.png] [--work DIR]

End to end, about two minutes: ``edgeserve keygen`` and ``edgeserve package`` (a tiny
MLP with a sample input), a local Mosquitto (``bench/broker.py``), a daemon with
telemetry at a 1 s interval and ``fleet.broker`` pointing at it (``bench/server.py``),
``edgeserve fleet collect`` in a child process, and a paced gRPC load that varies:

    0-20 s   20 req/s
    20-50 s  60 req/s, the broker stopped (the device buffers; nothing is lost)
    50-65 s  40 req/s, the broker back (live data first, then the backlog)
    65-80 s  the daemon stopped (SIGTERM): the span the report shades as offline
    80-110 s 30 req/s on the restarted daemon (same state dir, same buffer)

then waits until the daemon's backlog is empty, stops the collector and runs
``edgeserve fleet report --db fleet.db --since 5m --baseline ARCHIVE --plot OUT``
(the table goes to stdout). The broker outage leaves no gap in the curves (the device
kept recording); the daemon's absence does.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.broker import Broker
from bench.server import DaemonSetup, Server, start_daemon
from edgeserve.api.client import ClientError, InferenceClient

DEVICE = "edge-demo-1"
MODEL_SOURCE = """\
import torch
from torch import nn


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
"""


def edgeserve(*argv: str | Path, capture: bool = True) -> str:
    command = [sys.executable, "-m", "edgeserve", *(str(a) for a in argv)]
    done = subprocess.run(command, check=False, capture_output=capture, text=True, timeout=300)  # noqa: S603
    if done.returncode != 0:
        raise SystemExit(
            f"`edgeserve {' '.join(map(str, argv))}` exited {done.returncode}:\n{done.stderr}"
        )
    return done.stdout or ""


class Load:
    """A thread sending one request every ``1 / rate`` s; ``rate`` may change, 0 pauses."""

    def __init__(self) -> None:
        self.rate = 0.0
        self.address = ""
        self.ok = self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="figure-load", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        rng = np.random.default_rng(1)
        client, address = None, ""
        while not self._stop.is_set():
            if not self.rate or not self.address:
                self._stop.wait(0.05)  # paused
                continue
            if address != self.address:
                client, address = InferenceClient(self.address), self.address
            started = time.monotonic()
            x = rng.uniform(0.5, 2.0, (1, 16)).astype(np.float32)
            try:
                assert client is not None
                client.infer("mlp", {"x": x}, timeout=5.0)
                self.ok += 1
            except ClientError:
                self.failed += 1
            self._stop.wait(max(0.0, 1.0 / self.rate - (time.monotonic() - started)))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


def backlog_rows(server: Server) -> int:
    config = Path(server.log_path).parent / "state-figure" / "config.yaml"
    doc = json.loads(edgeserve("status", "--config", config, "--json"))
    return int(doc.get("telemetry", {}).get("backlog_rows", 0))


def run(work: Path, out: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    edgeserve("keygen", "--out", work / "figure")
    (work / "mlp.py").write_text(MODEL_SOURCE)
    rng = np.random.default_rng(0)
    np.save(work / "example.npy", rng.uniform(0.5, 2.0, (2, 16)).astype(np.float32))
    np.save(work / "sample.npy", rng.uniform(0.5, 2.0, (8, 16)).astype(np.float32))
    archive = work / "mlp-1.esar"
    example, sample = f"x={work / 'example.npy'}", f"x={work / 'sample.npy'}"
    edgeserve(
        "package", f"{work / 'mlp.py'}:build", "-o", archive, "--name", "mlp", "--version", "1",
        "--example-input", example, "--sample-input", sample, "--sign-key", work / "figure.key",
    )  # fmt: skip
    broker = Broker(work / "broker")
    broker.start()
    setup = DaemonSetup(
        models=[(archive, {})],
        public_key=work / "figure.pub",
        threads=1,
        metrics=False,
        telemetry={"enabled": True, "interval_s": 1, "sample_every_s": 1},
        fleet={"broker": broker.url, "device_id": DEVICE},
    )
    db = work / "fleet.db"
    collector = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "edgeserve", "fleet", "collect", "--broker", broker.url, "--db", db],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert collector.stderr is not None
    for line in collector.stderr:
        if line.strip() == "collecting":
            break
    load = Load()
    daemon = start_daemon(work, "figure", setup)
    try:
        load.address = daemon.tcp
        for rate, seconds, what in (
            (20, 20, "steady"),
            (60, 30, "broker down"),
            (40, 15, "broker back"),
            (0, 15, "daemon down"),
            (30, 30, "restarted"),
        ):
            print(f"{what}: {rate} req/s for {seconds} s", file=sys.stderr, flush=True)
            if what == "broker down":
                broker.stop()
            elif what == "broker back":
                broker.start()
            elif what == "daemon down":
                load.rate = 0
                daemon.stop()
            elif what == "restarted":
                daemon = start_daemon(work, "figure", setup)
                load.address = daemon.tcp
            load.rate = rate
            time.sleep(seconds)
        load.rate = 0
        deadline = time.monotonic() + 120
        while backlog_rows(daemon) and time.monotonic() < deadline:
            time.sleep(1)
        time.sleep(3)  # the last interval's rollup
    finally:
        load.close()
        daemon.stop()
        collector.terminate()
        collector.wait(30)
        broker.stop()
    print(f"load: {load.ok} ok, {load.failed} failed", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(
        edgeserve(
            "fleet", "report", "--db", db, "--since", "5m", "--baseline", archive, "--plot", out
        )
    )
    print(f"wrote {out} ({out.stat().st_size} bytes)", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/figures/fleet-report.png"))
    parser.add_argument("--work", type=Path, help="keep the run's files here (default: a temp dir)")
    args = parser.parse_args()
    if args.work:
        run(args.work, args.out)
    else:
        with tempfile.TemporaryDirectory(prefix="edgeserve-figure-") as tmp:
            run(Path(tmp), args.out)


if __name__ == "__main__":
    main()
