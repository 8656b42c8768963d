"""The peer cells (``--peers torchserve``): TorchServe beside edgeserve, the idle figures.

``start_torchserve`` packages every TorchServe registration the chosen cases use (the
TorchScript file of the edgeserve archive of the same model), starts TorchServe and
returns the server with the serialized request of each registration, after a few
seconds of load on each (the JVM's warm-up). ``idle`` measures,
with nothing sent, the RSS and CPU of edgeserve's peer daemon (both models) and of
TorchServe as deployed for both models in one configuration (the Java front end and the
two workers of the batching configuration).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import grpc

from bench import torchserve
from bench.cases import Case
from bench.catalog import MODELS, reset_counters
from bench.server import Server


def registrations(cases: list[Case]) -> list[str]:
    """The TorchServe registrations the cases drive, in catalog order."""
    wanted = {c.target for c in cases}
    return [k for k, m in MODELS.items() if m.on_torchserve and k in wanted]


def start_torchserve(work: Path, keys: list[str]) -> tuple[Server, dict[str, tuple[bytes, str]]]:
    setup = torchserve.ensure_venv()
    models = []
    for key in keys:
        spec = MODELS[key]
        assert spec.peer_of is not None
        reset_counters(spec.counter_file(work))
        pt = torchserve.model_file_of(
            MODELS[spec.peer_of].archive(work), work / "ts-src" / f"{spec.peer_of}.pt"
        )
        batch, delay = spec.peer_batch
        models.append(
            torchserve.PeerModel(
                key, pt, spec.input_shape[1:], batch, delay, spec.counter_file(work)
            )
        )
    print(f"  starting TorchServe {torchserve.VERSION} with {', '.join(keys)} ...", flush=True)
    server = torchserve.start(setup, work, models)
    requests = {
        key: (
            torchserve.payload(setup, key, MODELS[key].example().tobytes()),
            torchserve.METHOD,
        )
        for key in keys
    }
    _warm(server, requests, WARM_S)
    return server, requests


WARM_S = 4.0
"""Seconds of load per registration before anything is measured: the Java front end's
JIT compiles its hot paths only after thousands of calls (measured here: single calls
took 2-3x longer on a fresh TorchServe than after a case)."""


def _warm(server: Server, requests: dict[str, tuple[bytes, str]], seconds: float) -> None:
    """16 calls in flight to each registration for ``seconds``; errors are not expected
    (each registration already answered once) and end the bench."""
    channel = grpc.insecure_channel(server.tcp)
    try:
        for payload, method in requests.values():
            call = channel.unary_unary(method)
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                futures = [call.future(payload, timeout=30) for _ in range(16)]
                for future in futures:
                    future.result()
    finally:
        channel.close()


def idle(edgeserve: Server, peer: Server | None, seconds: float) -> dict[str, Any]:
    """RSS (MiB) and CPU (% of a core over ``seconds``) of both servers at rest."""
    servers = {"edgeserve": edgeserve, **({"torchserve": peer} if peer else {})}
    before = {name: s.cpu_seconds() for name, s in servers.items()}
    started = time.monotonic()
    time.sleep(seconds)
    wall = time.monotonic() - started
    found: dict[str, Any] = {"idle_window_s": wall}
    for name, server in servers.items():
        found[f"{name}_cpu_percent"] = 100.0 * (server.cpu_seconds() - before[name]) / wall
    found["edgeserve_rss_mb"] = edgeserve.rss() / 2**20
    if peer is not None:
        batching = [k for k, m in MODELS.items() if m.on_torchserve and m.peer_batch[0] > 1]
        found["torchserve_rss_mb"] = torchserve.idle_rss_mb(peer, batching)
        found["torchserve_all_registrations_rss_mb"] = peer.rss() / 2**20
    return found
