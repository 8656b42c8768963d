"""The README is executable: every fenced block runs, in the README's order, as written.

One test walks the blocks (``readme_blocks`` says how each kind is treated) in one empty
folder with the venv first on PATH: the quick start's ``edgeserve demo``, the packaging
example (``keygen``, ``package --quantize dynamic --sign-key``, ``serve`` with
``trust.keys``), ``predict``, the ``tritonclient`` snippet, the configuration reference
(served by ``edgeserve serve --config``), ``status`` and ``models``, and each command's
``--help`` against its synopsis. The daemon is the one the README's ``serve`` line starts.

Substitutions are few and explicit, and each is asserted to be present so none can drift:
the README's inference address ``127.0.0.1:8001`` becomes a free port in every block that
runs, and the configuration reference's system paths become folders of the working folder
(``REFERENCE_PATHS``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, NoReturn

import pytest
import yaml

from edgeserve.api.client import ClientError, InferenceClient
from tests.docs import readme_blocks as rb

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
CI_SCRIPT = ROOT / ".ci" / "run"
ADDRESS = "127.0.0.1:8001"  # the README's inference address; each daemon here gets a free port
# Every loopback address the README may use; each is swapped for a free port of its own.
ADDRESSES = (ADDRESS, "127.0.0.1:8002", "127.0.0.1:8003", "127.0.0.1:1883")
REFERENCE_PATHS = {  # configuration reference: system path -> folder below the working folder
    "/etc/edgeserve/keys/release.pub": "release.pub",
    "/var/lib/edgeserve": "reference/state",
    "/run/edgeserve": "reference/run",
}
BLOCK_TIMEOUT_S = 180.0
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _tail(text: str, limit: int = 4000) -> str:
    return text if len(text) <= limit else "...\n" + text[-limit:]


def _fail(block: rb.Block, what: str, out: str = "", err: str = "") -> NoReturn:
    pytest.fail(
        f"{block.where()}: {what}\n--- block ---\n{block.text}--- stdout ---\n{_tail(out)}\n"
        f"--- stderr ---\n{_tail(err)}",
        pytrace=False,
    )


class Daemon:
    """A README ``edgeserve serve`` command line, started by bash in the background."""

    def __init__(self, command: str, cwd: Path, env: dict[str, str], log: Path) -> None:
        self.log = log
        self._log_file: IO[bytes] = log.open("wb")
        self.process = subprocess.Popen(
            ["bash", "-e", "-c", command],
            cwd=cwd,
            env=env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the signal reaches edgeserve
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, address: str) -> str | None:
        """None once the server answers ready on ``address``, else why not."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        with InferenceClient(address) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    return f"exited with {self.process.returncode} before it was ready"
                try:
                    if client.server_ready(timeout=1.0):
                        return None
                except ClientError:
                    pass
                time.sleep(0.1)  # poll interval; the deadline bounds the wait
        return f"not ready on {address} within {READY_TIMEOUT_S:.0f}s"

    def wait_until(self, what: str, check: Callable[[], bool]) -> str | None:
        """None once ``check()`` holds, else why not (exited, or the deadline passed)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return f"exited with {self.process.returncode} before {what}"
            if check():
                return None
            time.sleep(0.1)  # poll interval; the deadline bounds the wait
        return f"did not show {what} within {READY_TIMEOUT_S:.0f}s"

    def stop(self) -> int:
        """SIGTERM, as systemd sends it; the README promises a drain and exit 0."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log_file.close()
        return self.process.returncode


class Walk:
    """State carried from block to block: the folder, the daemons, what ran."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd, self.env = cwd, env
        self.ports = {readme: f"127.0.0.1:{_free_port()}" for readme in ADDRESSES}
        self.address = self.ports[ADDRESS]
        self.daemons: list[tuple[rb.Block, Daemon]] = []
        self.synopses: set[str] = set()

    def substitute(self, block: rb.Block, text: str | None = None, address: str = "") -> str:
        """The block's text with each of ``ADDRESSES`` replaced by its free port (``ADDRESS``
        by ``address`` when given)."""
        text = block.text if text is None else text
        code = " ".join(line.split(" #", 1)[0] for line in text.splitlines())  # not comments
        stray = {
            w for w in code.split() if "127.0.0.1:" in w and not any(a in w for a in ADDRESSES)
        }
        if stray:
            _fail(block, f"uses a loopback address not in {ADDRESSES}: {sorted(stray)}")
        for readme, local in self.ports.items():
            text = text.replace(readme, address if address and readme == ADDRESS else local)
        return text

    def shell(self, block: rb.Block, script: str) -> subprocess.CompletedProcess[str]:
        return self.run(block, ["bash", "-e", "-o", "pipefail", "-c", script])

    def run(
        self, block: rb.Block, argv: list[str], stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run to completion; fail the test, showing the block, on a non-zero exit."""
        try:
            result = subprocess.run(
                argv,
                cwd=self.cwd,
                env=self.env,
                input=stdin,
                capture_output=True,
                text=True,
                timeout=BLOCK_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired as exc:
            _fail(block, f"still running after {BLOCK_TIMEOUT_S:.0f}s", str(exc.stdout or ""))
        if result.returncode != 0:
            _fail(block, f"exited {result.returncode}", result.stdout, result.stderr)
        if "Traceback" in result.stdout + result.stderr:
            _fail(block, "printed a traceback", result.stdout, result.stderr)
        return result

    def start_daemon(self, block: rb.Block, command: str, address: str) -> Daemon:
        return self.start_background(block, command, lambda d: d.wait_ready(address))

    def start_background(
        self, block: rb.Block, command: str, ready: Callable[[Daemon], str | None]
    ) -> Daemon:
        daemon = Daemon(command, self.cwd, self.env, self.cwd / f".daemon-{block.line}.log")
        self.daemons.append((block, daemon))
        problem = ready(daemon)
        if problem:
            _fail(block, f"the command {problem}", daemon.output())
        return daemon

    def stop_daemons(self, only: Daemon | None = None) -> list[str]:
        """Stop the daemons (newest first); what went wrong, or nothing."""
        problems = []
        for block, daemon in reversed(self.daemons):
            if only is not None and daemon is not only:
                continue
            code = daemon.stop()
            log = daemon.output()
            if code != 0:
                problems.append(f"{block.where()}: the daemon exited {code}\n{_tail(log)}")
            elif "Traceback" in log:
                problems.append(f"{block.where()}: the daemon logged a traceback\n{_tail(log)}")
        self.daemons = [(b, d) for b, d in self.daemons if only is not None and d is not only]
        return problems


# --- one handler per kind ---------------------------------------------------------------


def _run_block(walk: Walk, block: rb.Block) -> None:
    text = walk.substitute(block)
    if block.lang == "python":
        walk.run(block, [sys.executable, "-"], text)
    else:
        walk.shell(block, text)


def _file_block(walk: Walk, block: rb.Block) -> None:
    assert block.arg is not None
    (walk.cwd / block.arg).write_text(walk.substitute(block))


def _serve_block(walk: Walk, block: rb.Block) -> None:
    """Ready once it answers on its TCP address: the README's, or its config file's."""
    command = walk.substitute(block)
    address = walk.address
    config = re.search(r"--config (\S+)", command)
    if config:
        listen = yaml.safe_load((walk.cwd / config.group(1)).read_text())["server"]["listen"]
        address = next((a for a in listen if a.startswith("127.0.0.1:")), address)
    walk.start_daemon(block, command, address)


def _background_block(walk: Walk, block: rb.Block) -> None:
    """``port:N``: ready once the README's port N (its free stand-in) accepts a connection;
    ``log:TEXT``: once the command's output shows TEXT."""
    how, _, what = str(block.arg).partition(":")
    if how == "port":
        port = int(walk.ports[f"127.0.0.1:{what}"].rsplit(":", 1)[1])
        command = walk.substitute(block)
        if not re.search(rf"(?<![\d.:]){what}(?!\d)", command):
            _fail(block, f"does not name its port {what}")
        walk.start_background(
            block,
            re.sub(rf"(?<![\d.:]){what}(?!\d)", str(port), command),  # `-p 1883` too
            lambda d: d.wait_until(f"port {what}", lambda: _accepts(port)),
        )
    elif how == "log":
        walk.start_background(
            block,
            walk.substitute(block),
            lambda d: d.wait_until(repr(what), lambda: what in d.output()),
        )
    else:
        _fail(block, f"background needs port:N or log:TEXT, got {block.arg!r}")


def _accepts(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1.0)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _synopsis_block(walk: Walk, block: rb.Block) -> None:
    command = f"edgeserve {block.arg}"
    walk.synopses.add(str(block.arg))
    helps = {"": _help(walk, block, command)}
    for sub in rb.help_subcommands(helps[""]):
        helps[sub] = _help(walk, block, f"{command} {sub}")
        for inner in rb.help_subcommands(helps[sub]):  # `fleet root init`
            helps[f"{sub} {inner}"] = _help(walk, block, f"{command} {sub} {inner}")
    problems = rb.synopsis_problems(block.text, command, helps)
    if problems:
        _fail(block, "does not match --help:\n  " + "\n  ".join(problems))


def _help(walk: Walk, block: rb.Block, command: str) -> str:
    out = walk.shell(block, f"{command} --help").stdout
    if "example:" not in out or "exit codes" not in out:
        _fail(block, f"`{command} --help` lacks an example or the exit codes", out)
    return out


def _output_block(walk: Walk, block: rb.Block) -> None:
    first, *sample = walk.substitute(block).splitlines()
    if not first.startswith("$ "):
        _fail(block, "sample output must start with the `$ command` that prints it")
    actual = walk.shell(block, first[2:]).stdout.splitlines()
    problems = rb.output_problems(sample, actual)
    if problems:
        _fail(block, "output differs:\n  " + "\n  ".join(problems), "\n".join(actual))


def _config_reference_block(walk: Walk, block: rb.Block) -> None:
    """Served as written, by a second daemon with its own folders and port, then stopped."""
    text = block.text
    for system_path, local in REFERENCE_PATHS.items():
        if system_path not in text:
            _fail(block, f"no longer contains {system_path!r}; update REFERENCE_PATHS")
        text = text.replace(system_path, str(walk.cwd / local))
    address = f"127.0.0.1:{_free_port()}"
    text = walk.substitute(block, text, address)
    config = yaml.safe_load(text)
    for entry in config.get("models", []):  # the archives it names, from this folder
        archive = Path(entry["archive"])
        if not (walk.cwd / archive.name).is_file():
            _fail(block, f"names {archive.name}, which no earlier block made")
        archive.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(walk.cwd / archive.name, archive)
    path = walk.cwd / "reference" / "config.yaml"
    path.write_text(text)
    daemon = walk.start_daemon(block, f"edgeserve serve --config {path}", address)
    listed = json.loads(walk.shell(block, f"edgeserve models list --json --config {path}").stdout)
    problems = _settings_problems(config, listed) + walk.stop_daemons(only=daemon)
    if problems:
        _fail(block, "the daemon did not apply it:\n  " + "\n  ".join(problems), json.dumps(listed))


def _settings_problems(config: dict[str, Any], listed: list[dict[str, Any]]) -> list[str]:
    """Each configured model is live with its batching, over the global batching defaults."""
    entries = config.get("models") or []
    if len(listed) != len(entries):
        return [f"{len(listed)} model(s) live, the configuration names {len(entries)}"]
    problems = []
    for entry, model in zip(entries, listed, strict=True):
        want = {**config.get("batching", {}), **entry.get("batching", {})}
        got = {k: model["settings"].get(k) for k in want}
        if got != want:
            problems.append(f"{model['name']} {model['version']}: settings {got}, want {want}")
        if entry.get("default") and not model["default"]:
            problems.append(f"{model['name']} {model['version']} is not the default")
    return problems


def _skip_ci_block(walk: Walk, block: rb.Block) -> None:
    script = CI_SCRIPT.read_text().splitlines()
    for line in block.text.splitlines():
        if line.strip() and line not in script:
            _fail(block, f"is marked as run by .ci/run, which lacks the line {line!r}")


HANDLERS = {
    "run": _run_block,
    "file": _file_block,
    "serve": _serve_block,
    "background": _background_block,
    "synopsis": _synopsis_block,
    "output": _output_block,
    "config-reference": _config_reference_block,
    "skip": lambda walk, block: None,
    "skip-ci": _skip_ci_block,
}


@pytest.fixture
def walk(workdir: Path, user_env: dict[str, str]) -> Iterator[Walk]:
    walk = Walk(workdir, user_env)
    try:
        yield walk
    finally:
        walk.stop_daemons()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_readme_runs_in_order(walk: Walk) -> None:
    blocks = rb.parse_blocks(README.read_text())
    assert set(HANDLERS) == set(rb.KINDS)
    for block in blocks:
        started = time.monotonic()
        HANDLERS[block.kind](walk, block)
        print(f"{time.monotonic() - started:6.1f}s  {block.where()}")  # shown with -rP
    problems = walk.stop_daemons()
    assert not problems, "\n".join(problems)
    top = subprocess.run(
        ["edgeserve", "--help"], env=walk.env, capture_output=True, text=True, timeout=60
    )
    commands = rb.help_subcommands(top.stdout)
    assert top.returncode == 0 and commands, f"`edgeserve --help` lists no commands: {top}"
    missing = sorted(set(commands) - walk.synopses)
    assert not missing, f"commands without a synopsis block in the README: {missing}"
