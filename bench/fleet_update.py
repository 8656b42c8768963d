"""Fleet update figures (issue 8; reported, not asserted), from one real run on loopback.

    python -m bench.fleet_update [--work DIR] [--big-mb 200] [--archive-mb 20] [--window-s 10]

A local Mosquitto (``bench/broker.py``), a daemon serving a tiny MLP with ``fleet.root``
set (``bench/server.py``), and this process as the controller:

1. **p99 while a large artifact downloads.** A closed loop of sequential requests (one
   client, TCP) for ``--window-s`` with the link idle, then for as long as the device
   downloads a ``--big-mb`` artifact that was uploaded beforehand as retained 256 KiB chunks
   (random bytes under a signed deployment; the device fetches and verifies it, then
   rejects it at install because it is no model archive, which is after the window). The
   daemon's RSS is sampled every 0.2 s in both windows: artifacts stream to disk, so the
   download should add little (goal: + <= 32 MB; p99 goal <= 1.1x idle).
2. **publish -> committed.** ``edgeserve fleet publish`` of a ``--archive-mb`` model archive
   (an MLP with that many bytes of weights) as MQTT chunks, then ``edgeserve fleet wait``:
   the seconds from the publish command's start to the device's reported commit
   (probation 0 s), with the upload's share.
3. **Bytes on the wire.** The device's ``network_bytes.artifacts`` against each artifact's
   size (chunk payloads; MQTT framing is a few bytes per 256 KiB chunk on top).

Two cores shared with other work make single figures noisy: compare the ratio within one
run, and rerun before believing a change.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from bench.broker import Broker
from bench.server import DaemonSetup, Server, start_daemon
from edgeserve.api.client import InferenceClient
from edgeserve.archive.signing import load_private_key
from edgeserve.fleet.artifacts import publish_artifact
from edgeserve.fleet.link import FleetLink
from edgeserve.fleet.verifier import sign_deployment

DEVICE = "bench-fleet"
FETCHING = (None, "received", "verified", "downloading")
PREFIX = "edgeserve/v1"
MODEL_SOURCE = """\
import torch
from torch import nn


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


def build_big() -> nn.Module:
    torch.manual_seed(0)
    side = int(os.environ["BENCH_SIDE"])
    return nn.Sequential(nn.Linear(16, side), nn.ReLU(), nn.Linear(side, side),
                         nn.ReLU(), nn.Linear(side, 4)).eval()
"""
X = np.ones((1, 16), dtype=np.float32)


def edgeserve(*argv: str | Path, env: dict[str, str] | None = None) -> str:
    command = [sys.executable, "-m", "edgeserve", *(str(a) for a in argv)]
    done = subprocess.run(  # noqa: S603 - our interpreter, our arguments
        command, check=False, capture_output=True, text=True, timeout=900,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"`edgeserve {' '.join(map(str, argv))}` exited {done.returncode}:\n"
                         f"{done.stderr}")  # fmt: skip
    return done.stdout


def status(work: Path) -> dict[str, Any]:
    config = work / "state-fleet" / "config.yaml"
    return json.loads(edgeserve("status", "--config", config, "--json", "--timeout", "20"))


def fleet_of(work: Path) -> dict[str, Any]:
    return status(work).get("fleet") or {}


class Window:
    """Sequential requests on one client, and the daemon's RSS every 0.2 s, until stopped."""

    def __init__(self, server: Server) -> None:
        self.latencies: list[float] = []
        self.rss: list[int] = []
        self.failed = 0
        self._stop = threading.Event()
        self._process = psutil.Process(server.pid)
        self._threads = [
            threading.Thread(target=self._requests, args=(server.tcp,)),
            threading.Thread(target=self._sample),
        ]
        for thread in self._threads:
            thread.start()

    def _requests(self, address: str) -> None:
        with InferenceClient(address) as client:
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    client.infer("mlp", {"x": X}, timeout=5.0)
                    self.latencies.append(time.perf_counter() - started)
                except Exception:  # noqa: BLE001 - counted, the run goes on
                    self.failed += 1

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            self.rss.append(self._process.memory_info().rss)

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        ms = np.array(self.latencies) * 1000
        return {
            "requests": len(ms),
            "failed": self.failed,
            "p50_ms": round(float(np.percentile(ms, 50)), 3) if len(ms) else None,
            "p99_ms": round(float(np.percentile(ms, 99)), 3) if len(ms) else None,
            "rss_max_mb": round(max(self.rss) / 2**20, 1) if self.rss else None,
            "rss_median_mb": round(float(np.median(self.rss)) / 2**20, 1) if self.rss else None,
        }


async def upload(broker: Broker, path: Path) -> tuple[str, int]:
    link = FleetLink(host=broker.host, port=broker.port, client_id="bench-controller",
                     session_expiry_s=0)  # fmt: skip
    await link.start()
    try:
        await link.wait_connected(30)
        return await publish_artifact(link, PREFIX, path)
    finally:
        await link.close()


def retain(broker: Broker, topic: str, payload: bytes) -> None:
    async def send() -> None:
        link = FleetLink(host=broker.host, port=broker.port, client_id="bench-document",
                         session_expiry_s=0)  # fmt: skip
        await link.start()
        try:
            await link.wait_connected(30)
            await link.publish(topic, payload, qos=1, retain=True)
        finally:
            await link.close()

    asyncio.run(send())


def deployment(serial: int, sha256: str, length: int) -> dict[str, Any]:
    expires = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "serial": serial, "expires": expires, "target": {"devices": [DEVICE], "groups": []},
        "requires": {"arch": None, "min_free_disk_mb": 0, "min_free_memory_mb": 0,
                     "accelerator": None},
        "probation_s": 0, "activation_window": None,
        "models": [{"name": "blob", "version": "1", "sha256": sha256, "length": length,
                    "source": {"mqtt": True}, "default": True, "batching": None}],
    }  # fmt: skip


class Reports:
    """The device's retained reported state, followed in this process by a plain client
    (polling ``edgeserve status`` would start a Python process every time, and that CPU
    would land in the measured window only)."""

    def __init__(self, broker: Broker) -> None:
        self.last: dict[str, Any] = {}
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        self._client.on_message = self._take
        self._client.connect(broker.host, broker.port)
        self._client.subscribe(f"{PREFIX}/devices/{DEVICE}/reported", qos=1)
        self._client.loop_start()

    def _take(self, _client: Any, _userdata: Any, message: Any) -> None:
        self.last = json.loads(message.payload)

    def wait(self, done: Any, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if done(self.last.get("deployment") or {}):
                return self.last
            time.sleep(0.05)
        raise SystemExit(f"bench: the device did not get there in {timeout:.0f} s: {self.last}")

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


def run(work: Path, big_mb: int, archive_mb: int, window_s: float) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    edgeserve("keygen", "--out", work / "release")
    edgeserve("keygen", "--out", work / "fleet")
    edgeserve("fleet", "root", "init", "--key", work / "fleet.pub", "--threshold", "1",
              "-o", work / "root.json")  # fmt: skip
    (work / "mlp.py").write_text("import os\n" + MODEL_SOURCE)
    np.save(work / "x.npy", X)
    edgeserve("package", f"{work / 'mlp.py'}:build", "--name", "mlp", "--version", "1",
              "--example-input", f"x={work / 'x.npy'}", "--sign-key", work / "release.key",
              "-o", work / "mlp-1.esar")  # fmt: skip
    side = int((archive_mb * 2**20 / 4) ** 0.5)  # the side x side layer dominates the weights
    archive = work / "big-2.esar"
    edgeserve("package", f"{work / 'mlp.py'}:build_big", "--name", "mlp", "--version", "2",
              "--example-input", f"x={work / 'x.npy'}", "--sign-key", work / "release.key",
              "-o", archive, env={"BENCH_SIDE": str(side)})  # fmt: skip
    blob = work / "blob.bin"
    with blob.open("wb") as out:
        for _ in range(big_mb):
            out.write(os.urandom(2**20))

    broker = Broker(work / "broker")
    broker.start()
    setup = DaemonSetup(
        models=[(work / "mlp-1.esar", {})],
        public_key=work / "release.pub",
        threads=1,
        metrics=False,
        fleet={
            "broker": broker.url,
            "device_id": DEVICE,
            "root": str(work / "root.json"),
            "probation_s": 0,
            "max_artifact_bytes": (big_mb + 64) * 2**20,
        },  # fmt: skip
    )
    server = start_daemon(work, "fleet", setup)
    results: dict[str, Any] = {}
    try:
        _wait_connected(work)
        print(f"uploading a {big_mb} MB artifact...", file=sys.stderr, flush=True)
        sha256, length = asyncio.run(upload(broker, blob))
        idle = Window(server)
        time.sleep(window_s)
        results["idle"] = idle.stop()
        before = fleet_of(work)["network_bytes"]["artifacts"]
        key = load_private_key(work / "fleet.key")
        reports = Reports(broker)
        started = time.monotonic()
        busy = Window(server)  # from the document's publication to the end of the download
        retain(broker, f"{PREFIX}/devices/{DEVICE}/desired",
               sign_deployment(deployment(1, sha256, length), [key]))  # fmt: skip
        last = reports.wait(lambda d: d.get("serial") == 1 and d.get("state") not in FETCHING, 1800)
        results["download"] = busy.stop() | {"seconds": round(time.monotonic() - started, 2)}
        reports.close()
        wire = last["network_bytes"]["artifacts"] - before
        results["download"] |= {"artifact_bytes": length, "wire_bytes": wire}

        before = fleet_of(work)["network_bytes"]["artifacts"]
        started = time.monotonic()
        edgeserve("fleet", "publish", "--broker", broker.url, "--device", DEVICE,
                  "--model", archive, "--sign-key", work / "fleet.key", "--serial", "2",
                  "--probation-s", "0")  # fmt: skip
        published = time.monotonic() - started
        edgeserve("fleet", "wait", "--broker", broker.url, "--device", DEVICE, "--serial", "2",
                  "--timeout", "600")  # fmt: skip
        total = time.monotonic() - started
        wire = fleet_of(work)["network_bytes"]["artifacts"] - before
        results["publish_to_commit"] = {
            "archive_bytes": archive.stat().st_size,
            "upload_s": round(published, 2),
            "publish_to_commit_s": round(total, 2),
            "wire_bytes": wire,
        }
    finally:
        server.process.terminate()
        server.process.wait(60)
        broker.stop()
    idle, download = results["idle"], results["download"]
    results["ratios"] = {
        "p99_download_over_idle": round(download["p99_ms"] / idle["p99_ms"], 3),
        "rss_added_mb": round(download["rss_max_mb"] - idle["rss_max_mb"], 1),
        "download_wire_over_artifact": round(
            download["wire_bytes"] / download["artifact_bytes"], 4
        ),  # fmt: skip
        "archive_wire_over_size": round(
            results["publish_to_commit"]["wire_bytes"]
            / results["publish_to_commit"]["archive_bytes"],
            4,
        ),
    }
    return results


def _wait_connected(work: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fleet_of(work).get("connected"):
            return
        time.sleep(0.2)
    raise SystemExit("bench: the daemon never connected to the broker")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument("--big-mb", type=int, default=200)
    parser.add_argument("--archive-mb", type=int, default=20)
    parser.add_argument("--window-s", type=float, default=10.0)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    results = run(work, args.big_mb, args.archive_mb, args.window_s)
    print(json.dumps(results, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
