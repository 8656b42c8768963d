"""Keep the module map honest (DESIGN.md §2, STYLE.md): who may import whom, and docs."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
AGENT = ROOT / "agent"

CORE = {
    "lifecycle",
    "registry",
    "batching",
    "batch_policy",
    "worker",
    "runtime",
    "store",
    "archive",
    "manifest",
    "mar",
    "safezip",
    "warmup",
    "scripting",
    "package_samples",
    "batch_queue",
    "thread_budget",
}
FORBIDDEN_FOR_CORE = (
    "edgeserve.api",
    "edgeserve.fleet",
    "edgeserve.telemetry.buffer",
    "edgeserve.telemetry.uploader",
    "edgeserve.daemon",
    "edgeserve.cli",
)
THIRD_PARTY_HOMES = {
    "grpc": ("api/", "cli.py", "predict.py", "demo.py"),
    "paho": ("fleet/link.py",),
    "sqlite_utils": ("telemetry/buffer.py",),
    "cryptography": ("signing.py", "fleet/verifier.py"),
    "prometheus_client": ("metrics_http.py",),
}


def _module_files() -> list[Path]:
    return [p for p in AGENT.rglob("*.py") if "__pycache__" not in p.parts]


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("path", _module_files(), ids=lambda p: str(p.relative_to(AGENT)))
def test_import_rules(path: Path) -> None:
    rel = str(path.relative_to(AGENT))
    imports = _imports(path)
    if path.stem in CORE and path.parent == AGENT:
        bad = [i for i in imports if i.startswith(FORBIDDEN_FOR_CORE)]
        assert not bad, f"core module {rel} imports {bad}"
    if rel.startswith("api/"):
        bad = [
            i
            for i in imports
            if i.startswith(("edgeserve.fleet", "edgeserve.store", "edgeserve.telemetry.buffer"))
        ]
        assert not bad, f"{rel} imports {bad}"
    if rel == "batch_policy.py":
        assert not [i for i in imports if i.startswith(("edgeserve", "torch"))], imports
    for package, homes in THIRD_PARTY_HOMES.items():
        uses = [i for i in imports if i == package or i.startswith(package + ".")]
        if uses:
            assert rel.startswith(homes), f"{rel} imports {package}; only {homes} may"


def test_handlers_import_only_the_contract_and_torch() -> None:
    allowed = ("edgeserve.handlers", "edgeserve.types", "torch", "numpy", "PIL")
    for path in (ROOT / "handlers").glob("*.py"):
        for name in _imports(path):
            if name.startswith("edgeserve"):
                assert name.startswith(allowed), f"handlers/{path.name} imports {name}"


def _commands() -> list[str]:
    from edgeserve.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sorted(sub.choices)


@pytest.mark.parametrize("command", _commands())
def test_every_command_has_help_and_is_in_the_readme(command: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "edgeserve", command, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "example:" in out.stdout and "exit codes" in out.stdout
    assert f"edgeserve {command}" in (ROOT / "README.md").read_text()


def test_version_flag() -> None:
    from edgeserve import __version__

    out = subprocess.run(
        [sys.executable, "-m", "edgeserve", "--version"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and out.stdout.strip() == f"edgeserve {__version__}"


def test_readme_config_example_loads(tmp_path: Path) -> None:
    from edgeserve.config import load_config

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Configuration", 1)[1]
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    key = tmp_path / "release.pub"
    key.write_text("placeholder")
    path = tmp_path / "config.yaml"
    archive = tmp_path / "mlp-2.esar"
    archive.write_bytes(b"")
    path.write_text(
        example.replace("/etc/edgeserve/keys/release.pub", str(key)).replace(
            "/var/lib/edgeserve/incoming/mlp-2.esar", str(archive)
        )
    )
    config = load_config(path, env={})
    assert config.server.listen[-1] == "127.0.0.1:8001"
    assert config.models[0].batching.instances == 2
