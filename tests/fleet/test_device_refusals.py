"""Every refusal of issue 8 through a real daemon following a real Mosquitto: the document
is refused, the live set stays what it was, and the reported state carries the reason.

Documents the controller would never write (tampered, mis-targeted, lying about their
artifacts, traversing paths) are signed here and retained with a plain client; artifacts
come as retained MQTT chunks (uploaded by ``fleet publish`` to another device) or from a
local HTTP server that lies about them.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.cli.support import edgeserve
from tests.conftest import DaemonFactory
from tests.fleet.device_support import (
    desired,
    entry,
    fleet_config,
    live,
    publish,
    reported,
    retain,
    serves,
    sign_raw,
    signed_fields,
    state_of,
    upload,
    wait,
    wait_for_state,
)
from tests.mqtt_broker import Mosquitto

pytestmark = pytest.mark.slow


class LyingServer:
    """Serves ``/<name>`` from ``files``; ``/endless/<name>`` sends the file and then junk
    without end (no Content-Length), as a hostile server would."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.sent = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                endless = self.path.startswith("/endless/")
                body = outer.files[self.path.rsplit("/", 1)[-1]]
                self.send_response(200)
                if not endless:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                    outer.sent += len(body)
                    junk = b"\0" * 65536
                    while endless and outer.sent < 256 << 20:  # bounded, in case of a bug
                        self.wfile.write(junk)
                        outer.sent += len(junk)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def lying_server(mlp_archive_factory: Any) -> Iterator[LyingServer]:
    server = LyingServer({"mlp-2.esar": mlp_archive_factory("2").read_bytes()})
    try:
        yield server
    finally:
        server.close()


def _tampered(data: bytes) -> bytes:
    document = json.loads(data)
    document["signed"]["probation_s"] = 2  # the signature covered probation_s: 1
    return json.dumps(document).encode()


CASES = [
    "threshold",
    "unknown_key",
    "bad_signature",
    "expired",
    "wrong_target",
    "requirements",
    "length",
    "sha256",
    "mix_and_match",
    "schema",
]


@pytest.mark.parametrize("reason", CASES)
def test_each_refusal_leaves_the_live_set_and_reports_why(
    daemons: DaemonFactory,
    mosquitto: Mosquitto,
    prefix: str,
    device_keys: Path,
    mlp_archive_factory: Any,
    lying_server: LyingServer,
    reason: str,
) -> None:
    key, second, stranger = (device_keys / f"{n}.key" for n in ("root", "second", "stranger"))
    root = device_keys / ("root-2of2.json" if reason == "threshold" else "root.json")
    v2, v3 = mlp_archive_factory("2"), mlp_archive_factory("3")
    daemon = daemons.start(
        mlp_archive_factory("1"), extra_config=fleet_config(mosquitto, prefix, root)
    )
    models = [entry(v2, "mlp", "2")]
    if reason in ("threshold", "unknown_key", "requirements"):
        argv: list[str | Path] = ["--model", v2, "--serial", "1"]
        if reason == "requirements":
            argv += ["--require-free-memory-mb", str(1 << 40)]
        signer = stranger if reason == "unknown_key" else key
        assert publish(mosquitto, prefix, signer, *argv).code == 0
    else:
        overrides: dict[str, Any] = {}
        if reason == "expired":
            overrides["expires"] = "2020-01-01T00:00:00Z"
        elif reason == "wrong_target":
            overrides["target"] = {"devices": ["dev-2"], "groups": ["elsewhere"]}
        elif reason == "length":  # the server goes on past the declared length
            models = [
                entry(v2, "mlp", "2", source={"url": f"{lying_server.url}/endless/mlp-2.esar"})
            ]
        elif reason == "sha256":  # the right length, other bytes
            wrong = entry(v3, "mlp", "3")["sha256"]
            models = [entry(v2, "mlp", "2", sha256=wrong,
                            source={"url": f"{lying_server.url}/mlp-2.esar"})]  # fmt: skip
        elif reason == "mix_and_match":  # the document says v2, the artifact it names is v3
            upload(mosquitto, prefix, key, v3)
            models = [entry(v3, "mlp", "2")]
        elif reason == "schema":
            models = [entry(v2, "mlp", "../../../etc")]
        data = sign_raw(signed_fields(models, 1, **overrides), key, second)
        if reason == "bad_signature":
            data = _tampered(data)
        retain(mosquitto, desired(prefix), data)

    waited = wait(mosquitto, prefix, 1)
    assert waited.code == 1, waited.out + waited.err + daemon.log()[-3000:]
    assert reason in waited.out + waited.err
    row = reported(mosquitto, prefix)
    assert state_of(row) == (1, "rejected", reason)
    assert row["committed_serial"] == 0
    assert live(row) == {("mlp", "1", True)}
    assert serves(daemon) == "1"
    staging = daemon.state_dir / "fleet" / "staging"
    assert not list(staging.glob("*")) if staging.exists() else True  # nothing left behind
    if reason == "length":  # aborted at the cap, not after the server's endless stream
        declared = entry(v2, "mlp", "2")["length"]
        assert row["network_bytes"]["artifacts"] <= declared + 65536
    if reason == "mix_and_match":  # refused before anything entered the store
        assert not (daemon.state_dir / "models" / "mlp" / "3").exists()


def test_a_replay_after_kill_9_is_refused_by_the_fsynced_committed_serial(
    daemons: DaemonFactory,
    mosquitto: Mosquitto,
    prefix: str,
    device_keys: Path,
    mlp_archive_factory: Any,
) -> None:
    key = device_keys / "root.key"
    config = fleet_config(mosquitto, prefix, device_keys / "root.json", probation_s=0)
    daemon = daemons.start(mlp_archive_factory("1"), extra_config=config)
    upload(mosquitto, prefix, key, mlp_archive_factory("2"))
    upload(mosquitto, prefix, key, mlp_archive_factory("3"))
    first = sign_raw(signed_fields([entry(mlp_archive_factory("2"), "mlp", "2")], 1), key)
    retain(mosquitto, desired(prefix), first)
    assert wait(mosquitto, prefix, 1).code == 0
    second = sign_raw(signed_fields([entry(mlp_archive_factory("3"), "mlp", "3")], 2), key)
    retain(mosquitto, desired(prefix), second)
    assert wait(mosquitto, prefix, 2).code == 0
    # edgeserve status (through the management API) carries the same, and a table line.
    done = edgeserve("status", "--config", daemon.config, "--json", "--timeout", "10")
    fleet = json.loads(done.out)["fleet"]
    assert fleet["device_id"] == "dev-1" and fleet["connected"] is True
    assert fleet["committed_serial"] == 2 and fleet["root_version"] == 1
    assert fleet["deployment"]["state"] == "committed"
    assert (
        fleet["network_bytes"]["artifacts"] >= entry(mlp_archive_factory("3"), "m", "3")["length"]
    )
    table = edgeserve("status", "--config", daemon.config, "--timeout", "10").out
    assert "updates: committed serial 2, root v1; deployment serial 2 committed" in table
    daemon.process.kill()  # right after the commit was reported: no clean shutdown
    daemon.process.wait()

    retain(mosquitto, desired(prefix), first)  # an attacker replays the older document
    again = daemons.start(mlp_archive_factory("1"), state_dir=daemon.state_dir, extra_config=config)
    row = wait_for_state(mosquitto, prefix, lambda r: state_of(r)[0] == 1)
    assert state_of(row) == (1, "rejected", "rollback"), again.log()[-3000:]
    assert row["committed_serial"] == 2
    assert live(row) == {("mlp", "3", True)}
    assert serves(again) == "3"
