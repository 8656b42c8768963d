"""``edgeserve fleet publish|devices|wait`` against a real Mosquitto, in-process.

The device-side deployer does not exist yet, so a plain paho client (``Observer``) plays
the device honestly: it publishes retained reported-state JSON and ``online``/``offline``
exactly as issue 8 documents them; what publish sends is checked with the device's own
pieces (``verify_deployment`` under a root from ``fleet root init``, the ``Fetcher``).
Each test has its own topic prefix on the shared broker, so retained state never leaks.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from edgeserve.archive.format import write_archive
from edgeserve.archive.manifest import Manifest
from edgeserve.fleet.documents import DeviceFacts, parse_root
from edgeserve.fleet.fetcher import Artifact, Fetcher
from edgeserve.fleet.link import FleetLink
from edgeserve.fleet.verifier import verify_deployment
from edgeserve.types import NetworkCounters, TensorSpec
from tests.cli.conftest import assert_one_error_line
from tests.cli.support import Outcome, edgeserve, edgeserve_ok, keygen
from tests.mqtt_broker import Mosquitto, Observer, free_port

FACTS = DeviceFacts(arch="x86_64", free_disk_mb=10**6, free_memory_mb=10**6, accelerator="none")
JSON_KEYS = {
    "device",
    "online",
    "committed_serial",
    "root_version",
    "live",
    "deployment",
    "network_bytes",
    "last_seen",
}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root.key/.pub (the fleet root), release.key/.pub (archives), other.pub, root.json."""
    folder = tmp_path_factory.mktemp("keys")
    for name in ("root", "release", "other"):
        keygen(folder / name)
    edgeserve_ok(
        "fleet", "root", "init", "--key", folder / "root.pub", "--threshold", "1",
        "-o", folder / "root.json",
    )  # fmt: skip
    return folder


def archive(folder: Path, name: str, version: str, sign_key: Path | None, size: int) -> Path:
    """A valid archive whose model file is ``size`` random bytes (never loaded here)."""
    path = folder / f"{name}-{version}-{uuid.uuid4().hex[:6]}.esar"
    manifest = Manifest(
        name=name,
        version=version,
        model_file="model.pt",
        inputs=(TensorSpec("x", "FP32", (-1, 4)),),
        outputs=(TensorSpec("y", "FP32", (-1, 2)),),
        files={},
    )
    write_archive(path, manifest, {"model.pt": os.urandom(size)}, sign_key=sign_key)
    return path


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory, keys: Path) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("archives")
    release = keys / "release.key"
    return {
        "mlp-1": archive(folder, "mlp", "1", release, 600_000),  # three chunks
        "mlp-2": archive(folder, "mlp", "2", release, 1000),
        "tiny-1": archive(folder, "tiny", "1", release, 1000),
        "unsigned": archive(folder, "mlp", "3", None, 1000),
    }


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}/v1"


def broker_args(broker: Mosquitto, prefix: str) -> list[str]:
    return ["--broker", f"mqtt://{broker.host}:{broker.port}", "--topic-prefix", prefix]


def publish(broker: Mosquitto, prefix: str, keys: Path, *extra: str | Path) -> Outcome:
    return edgeserve(
        "fleet", "publish", *broker_args(broker, prefix), "--sign-key", keys / "root.key", *extra
    )  # fmt: skip


def retained(broker: Mosquitto, topic: str) -> bytes:
    observer = Observer(broker, topic)
    try:
        return observer.get().payload
    finally:
        observer.close()


def verify(keys: Path, data: bytes, device: str = "dev-1", groups: tuple[str, ...] = ()):
    root = parse_root((keys / "root.json").read_bytes())
    return verify_deployment(
        data,
        root=root,
        committed_serial=0,
        trusted_time=datetime.now(UTC),
        device_id=device,
        groups=groups,
        facts=FACTS,
    )


async def fetch(broker: Mosquitto, prefix: str, state: Path, artifact: Artifact) -> Path:
    link = FleetLink(host=broker.host, port=broker.port, client_id=uuid.uuid4().hex)
    await link.start()
    try:
        await link.wait_connected(10.0)
        fetcher = Fetcher(
            state / "staging",
            state_dir=state,
            counters=NetworkCounters(),
            max_bytes=10**8,
            link=link,
        )
        return await asyncio.wait_for(fetcher.fetch(artifact, prefix), 30.0)
    finally:
        await link.close()


# -- publish -------------------------------------------------------------------------------


def test_publish_uploads_fetchable_chunks_and_a_document_devices_verify(
    mosquitto: Mosquitto, prefix: str, keys: Path, archives: dict[str, Path], tmp_path: Path
) -> None:
    path = archives["mlp-1"]
    data = path.read_bytes()
    done = publish(
        mosquitto, prefix, keys, "--device", "dev-1", "--model", path,
        "--model", archives["tiny-1"], "--probation-s", "30",
        "--activation-window", "22:00-04:00", "--require-arch", "x86_64",
        "--trust-key", keys / "release.pub",
    )  # fmt: skip
    assert done.code == 0, done.err
    total = len(data) + archives["tiny-1"].stat().st_size
    topic = f"{prefix}/devices/dev-1/desired"
    expected = f"published serial 1 to {topic} (2 model(s), {total} bytes of artifacts)\n"
    assert done.out == expected
    assert done.err == ""  # no progress line without a terminal

    deployment = verify(keys, retained(mosquitto, topic))
    assert deployment.serial == 1 and deployment.target.devices == ("dev-1",)
    assert deployment.probation_s == 30 and deployment.activation_window == (22 * 60, 4 * 60)
    assert deployment.requires.arch == "x86_64"
    mlp = next(m for m in deployment.models if m.name == "mlp")
    assert (mlp.version, mlp.url, mlp.default) == ("1", None, True)
    assert (mlp.sha256, mlp.length) == (hashlib.sha256(data).hexdigest(), len(data))

    artifact = Artifact(mlp.name, mlp.version, mlp.sha256, mlp.length, None)
    fetched = asyncio.run(fetch(mosquitto, prefix, tmp_path / "state", artifact))
    assert fetched.read_bytes() == data


def test_serial_follows_the_retained_one_and_never_goes_back(
    mosquitto: Mosquitto, prefix: str, keys: Path, archives: dict[str, Path]
) -> None:
    group = ("--group", "lab", "--model", archives["mlp-2"])
    assert publish(mosquitto, prefix, keys, *group).code == 0
    again = publish(mosquitto, prefix, keys, *group)
    assert again.code == 0, again.err
    assert again.out.startswith(f"published serial 2 to {prefix}/groups/lab/desired ")
    jump = publish(mosquitto, prefix, keys, *group, "--serial", "7")
    assert jump.code == 0 and "serial 7" in jump.out
    back = publish(mosquitto, prefix, keys, *group, "--serial", "7")
    assert back.code == 2
    assert_one_error_line(back.err, "--serial", "not above serial 7")
    data = retained(mosquitto, f"{prefix}/groups/lab/desired")
    assert verify(keys, data, device="dev-9", groups=("lab",)).serial == 7


def test_url_base_names_the_artifact_and_uploads_nothing(
    mosquitto: Mosquitto, prefix: str, keys: Path, archives: dict[str, Path]
) -> None:
    chunks = Observer(mosquitto, f"{prefix}/artifacts/#")
    try:
        done = publish(
            mosquitto, prefix, keys, "--device", "dev-1", "--model", archives["mlp-2"],
            "--url-base", "https://files.example/models/",
        )  # fmt: skip
        assert done.code == 0, done.err
        deployment = verify(keys, retained(mosquitto, f"{prefix}/devices/dev-1/desired"))
        sha = deployment.models[0].sha256
        assert deployment.models[0].url == f"https://files.example/models/{sha}.esar"
        assert chunks.messages.empty()  # the document was retained after any chunk would be
    finally:
        chunks.close()


def test_publish_with_two_versions_needs_a_default(
    mosquitto: Mosquitto, prefix: str, keys: Path, archives: dict[str, Path]
) -> None:
    both = ("--device", "dev-1", "--model", archives["mlp-1"], "--model", archives["mlp-2"])
    done = publish(mosquitto, prefix, keys, *both, "--default", "mlp=2", "--url-base", "http://h")
    assert done.code == 0, done.err
    deployment = verify(keys, retained(mosquitto, f"{prefix}/devices/dev-1/desired"))
    assert {m.version: m.default for m in deployment.models} == {"1": False, "2": True}
    refused = publish(mosquitto, prefix, keys, *both)
    assert refused.code == 2
    assert_one_error_line(refused.err, "--default", "mlp has 2 versions")


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["--model", "{unsigned}"], ["is not signed"]),
        (["--model", "{mlp-2}", "--sign-key", "{missing.key}"], ["missing.key", "cannot read"]),
        (["--model", "{mlp-2}", "--default", "mlp=9"], ["--default", "mlp=9"]),
        (["--model", "{mlp-2}", "--default", "mlp"], ["--default", "NAME=VERSION"]),
        (["--model", "{mlp-2}", "--trust-key", "{other.pub}"], ["unknown key"]),
        (["--model", "{mlp-2}", "--activation-window", "25:00-01:00"], ["activation_window"]),
        (["--model", "{mlp-2}", "--expires", "2001-01-01T00:00:00Z"], ["not in the future"]),
        (["--model", "{nowhere.esar}"], ["nowhere.esar"]),
    ],
)
def test_publish_refusals_are_one_line_exit_2(
    mosquitto: Mosquitto,
    prefix: str,
    keys: Path,
    archives: dict[str, Path],
    extra: list[str],
    fragments: list[str],
) -> None:
    names = {**{k: str(v) for k, v in archives.items()}, "other.pub": str(keys / "other.pub")}
    names |= {"missing.key": str(keys / "missing.key"), "nowhere.esar": str(keys / "nowhere.esar")}
    argv = [names[a[1:-1]] if a.startswith("{") else a for a in extra]
    done = publish(mosquitto, prefix, keys, "--device", "dev-1", *argv)
    assert done.code == 2, done.err
    assert_one_error_line(done.err, *fragments)
    assert done.out == ""


def test_unreachable_broker_exits_3(keys: Path, archives: dict[str, Path]) -> None:
    where = ["--broker", f"mqtt://127.0.0.1:{free_port()}", "--connect-timeout", "0.3"]
    done = edgeserve(
        "fleet", "publish", *where, "--device", "dev-1", "--model", archives["mlp-2"],
        "--sign-key", keys / "root.key",
    )  # fmt: skip
    assert done.code == 3
    assert_one_error_line(done.err, "not connected")
    for argv in (["devices"], ["wait", "--device", "dev-1", "--serial", "1"]):
        done = edgeserve("fleet", *argv, *where)
        assert done.code == 3
        assert_one_error_line(done.err, "not connected")


# -- devices and wait (the device played by a plain MQTT client) ---------------------------


def report(device: str, committed: int, deployment: dict | None = None) -> bytes:
    body = {
        "device": device,
        "agent_version": "0.test",
        "time": "2026-12-02T10:00:00Z",
        "committed_serial": committed,
        "root_version": 1,
        "live": [{"name": "mlp", "version": "3", "sha256": "ab" * 32, "default": True}],
        "deployment": deployment,
        "network_bytes": {"artifacts": 4096, "control": 512, "telemetry": 64},
    }
    return json.dumps(body).encode()


@pytest.fixture
def device(mosquitto: Mosquitto, prefix: str):
    """A plain client that publishes what a device retains."""
    client = Observer(mosquitto, f"{prefix}/unused")

    def say(device_id: str, leaf: str, payload: bytes) -> None:
        client.publish(f"{prefix}/devices/{device_id}/{leaf}", payload, retain=True)

    try:
        yield say
    finally:
        client.close()


def test_devices_lists_online_and_offline_and_skips_malformed(
    mosquitto: Mosquitto, prefix: str, device
) -> None:
    device("dev-a", "reported", report("dev-a", 7, {"serial": 8, "state": "downloading",
           "reason": None, "bytes_done": 1024, "bytes_total": 4096}))  # fmt: skip
    device("dev-a", "online", b"online")
    device("dev-b", "reported", report("dev-b", 3))
    device("dev-b", "online", b"offline")
    device("dev-c", "reported", b"\x00 not json {")
    device("dev-d", "online", b"maybe")

    done = edgeserve("fleet", "devices", *broker_args(mosquitto, prefix), "--json")
    assert done.code == 0, done.err
    rows = json.loads(done.out)
    assert [r["device"] for r in rows] == ["dev-a", "dev-b"]
    assert all(set(r) == JSON_KEYS for r in rows)
    a, b = rows
    assert (a["online"], b["online"]) == (True, False)
    assert (a["committed_serial"], b["committed_serial"]) == (7, 3)
    assert a["deployment"]["state"] == "downloading" and b["deployment"] is None
    assert a["live"] == [{"name": "mlp", "version": "3", "sha256": "ab" * 32, "default": True}]
    assert a["network_bytes"] == {"artifacts": 4096, "control": 512, "telemetry": 64}
    assert a["last_seen"] == "2026-12-02T10:00:00Z"
    assert done.err == "skipped 2 malformed message(s)\n"
    assert "not json" not in done.out + done.err

    table = edgeserve_ok("fleet", "devices", *broker_args(mosquitto, prefix)).splitlines()
    assert table[0].split()[:3] == ["DEVICE", "ONLINE", "COMMITTED"]
    assert table[1].split()[:3] == ["dev-a", "online", "7"]
    assert "8 downloading 1024/4096 bytes" in table[1] and "4096/512/64" in table[1]
    assert table[2].split()[:3] == ["dev-b", "offline", "3"]


def wait(mosquitto: Mosquitto, prefix: str, serial: int, timeout: str = "10") -> Outcome:
    return edgeserve(
        "fleet", "wait", *broker_args(mosquitto, prefix), "--device", "dev-1",
        "--serial", str(serial), "--timeout", timeout,
    )  # fmt: skip


def test_wait_exits_0_when_the_device_commits_the_serial(
    mosquitto: Mosquitto, prefix: str, device
) -> None:
    device("dev-1", "reported", report("dev-1", 4))
    outcome: list[Outcome] = []
    waiter = threading.Thread(target=lambda: outcome.append(wait(mosquitto, prefix, 5)))
    waiter.start()
    progress = {"serial": 5, "state": "probation", "reason": None, "bytes_done": 9,
                "bytes_total": 9}  # fmt: skip
    device("dev-1", "reported", report("dev-1", 4, progress))
    device("dev-1", "reported", report("dev-1", 5, progress | {"state": "committed"}))
    waiter.join(30.0)
    assert outcome and outcome[0].code == 0, outcome
    assert outcome[0].out == "dev-1: serial 5 committed\n"
    assert wait(mosquitto, prefix, 4).code == 0  # an older serial, already committed


@pytest.mark.parametrize("state", ["rejected", "rolled_back"])
def test_wait_exits_1_with_the_reason_when_the_device_refuses(
    mosquitto: Mosquitto, prefix: str, device, state: str
) -> None:
    failed = {"serial": 6, "state": state, "reason": "expired", "bytes_done": 0, "bytes_total": 0}
    device("dev-1", "reported", report("dev-1", 5, failed))
    done = wait(mosquitto, prefix, 6)
    assert done.code == 1, done.err
    assert done.out == f"dev-1: serial 6 {state}: expired\n"


def test_wait_exits_3_on_timeout(mosquitto: Mosquitto, prefix: str, device) -> None:
    device("dev-1", "reported", b"[1, 2")  # malformed: ignored
    device("dev-1", "reported", report("dev-1", 5))
    done = wait(mosquitto, prefix, 6, timeout="0.5")
    assert done.code == 3
    assert_one_error_line(done.err, "dev-1", "serial 6", "0.5 s", "committed serial 5")
