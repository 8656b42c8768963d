"""Keep the module map honest (DESIGN.md §2, STYLE.md §4): who may import whom, and docs.

Every import in ``agent/`` is read with ``ast`` (also those inside functions and under
``TYPE_CHECKING``) and checked against the rules below; a new module lands in one of the
parts or the test fails.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
AGENT = ROOT / "agent"

# The parts of agent/ (a folder, or a top-level module), and which parts each may import.
# Plain layers first: anything may import them.
# jsonsafe: the one bounded JSON parser for files and documents an outsider controls.
BASE = {
    "errors",
    "types",
    "dtypes",
    "config",
    "logs",
    "jsonsafe",
    "handlers",
    "proto",
    "__init__",
}
MAY_IMPORT: dict[str, set[str]] = {
    "errors": set(),
    "types": {"errors"},
    "dtypes": set(),
    "jsonsafe": set(),
    # config's dataclasses hold types.BatchingSettings, the one type for batching settings.
    "config": {"errors", "types"},
    "logs": {"errors", "config"},
    "archive": BASE,
    "store": BASE | {"archive"},
    "serving": BASE | {"archive", "telemetry.recorders"},
    "lifecycle": BASE | {"archive", "store", "serving", "telemetry.recorders"},
    # telemetry -> archive: `fleet report --baseline ARCHIVE` reads sample inputs.
    "telemetry": BASE | {"archive", "serving", "lifecycle", "telemetry"},
    "api": BASE | {"serving.registry", "serving.torch_dtypes", "lifecycle", "telemetry", "api"},
    "packager": BASE | {"archive", "serving", "packager"},
    # cli/fleet.py wires fleet/link into the controller commands (DESIGN §6: they ship in the CLI).
    "cli": BASE
    | {"api", "cli", "archive.signing", "packager", "store", "telemetry", "daemon", "fleet"},
    "daemon": BASE
    | {"api", "archive", "store", "serving", "lifecycle", "telemetry", "sdnotify", "fleet"},
    "fleet": BASE | {"lifecycle", "store", "archive", "telemetry.recorders", "fleet"},
    "sdnotify": set(),
    "__main__": {"cli"},
    "__init__": set(),
}
# Within a part, modules import each other freely, except these pure ones.
PURE = {"serving/batch_policy.py": set()}
THIRD_PARTY_HOMES = {
    "grpc": ("api/",),
    "paho": ("fleet/link.py",),
    # One owner per database file: the device's buffer, the controller's collected records.
    "sqlite_utils": ("telemetry/buffer.py", "telemetry/collection.py"),
    "sqlite3": ("telemetry/buffer.py", "telemetry/collection.py"),
    "cryptography": ("archive/signing.py", "fleet/verifier.py"),
    "prometheus_client": ("telemetry/prometheus.py",),
    # types.py: under TYPE_CHECKING only; archive/mar.py: lazily, to check a .mar's model;
    # telemetry/drift.py: lazily, inside observe_batch (the recorders import it, and the
    # CLI imports the recorders without torch).
    "torch": (
        "serving/",
        "packager/",
        "api/codec.py",
        "types.py",
        "archive/mar.py",
        "telemetry/drift.py",
    ),
}


def _module_files() -> list[Path]:
    return sorted(p for p in AGENT.rglob("*.py") if "__pycache__" not in p.parts)


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _part(rel: str) -> str:
    return rel.split("/", 1)[0].removesuffix(".py")


def _allowed(target: str, allowed: set[str]) -> bool:
    """``target`` is a dotted name below ``edgeserve.``; is it inside an allowed part?"""
    return any(target == a or target.startswith(a + ".") for a in allowed)


def _internal(imports: set[str]) -> set[str]:
    inside = {i.removeprefix("edgeserve.") for i in imports if i.startswith("edgeserve.")}
    # `from edgeserve.x import Name` also yields "x.Name": keep only module-ish prefixes.
    return {i for i in inside if not any(i != j and i.startswith(j + ".") for j in inside)}


@pytest.mark.parametrize("path", _module_files(), ids=lambda p: str(p.relative_to(AGENT)))
def test_import_rules(path: Path) -> None:
    rel = str(path.relative_to(AGENT))
    part = _part(rel)
    assert part in MAY_IMPORT, f"{rel} is in no part of the module map; add it to STYLE §4"
    imports = _imports(path)
    allowed = MAY_IMPORT[part] | {part} if rel not in PURE else PURE[rel]
    bad = sorted(i for i in _internal(imports) if i != "__version__" and not _allowed(i, allowed))
    assert not bad, f"{rel} ({part}) may not import {bad}"
    if rel in PURE:
        assert not [i for i in imports if i.startswith("torch")], f"{rel} must stay pure"
    for package, homes in THIRD_PARTY_HOMES.items():
        uses = [i for i in imports if i == package or i.startswith(package + ".")]
        if uses:
            assert rel.startswith(homes), f"{rel} imports {package}; only {homes} may"


def test_the_rules_can_fail() -> None:
    # The core may not reach up to the edges: a hypothetical import is refused.
    assert not _allowed("api.server", MAY_IMPORT["serving"])
    assert not _allowed("packager.build", MAY_IMPORT["store"])
    assert not _allowed("fleet.link", MAY_IMPORT["api"])
    assert _allowed("serving.registry", MAY_IMPORT["api"])


def test_handlers_import_only_the_contract_and_torch() -> None:
    allowed = ("edgeserve.handlers", "edgeserve.types", "torch", "numpy", "PIL")
    for path in (ROOT / "handlers").glob("*.py"):
        for name in _imports(path):
            if name.startswith("edgeserve"):
                assert name.startswith(allowed), f"handlers/{path.name} imports {name}"


def test_every_subpackage_is_packaged() -> None:
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packaged = set(config["tool"]["setuptools"]["packages"])
    folders = {
        "edgeserve." + str(p.parent.relative_to(AGENT)).replace("/", ".")
        for p in AGENT.rglob("__init__.py")
        if p.parent != AGENT
    }
    assert folders <= packaged, f"missing from pyproject packages: {folders - packaged}"


def _commands() -> list[str]:
    from edgeserve.cli import COMMANDS

    return sorted(COMMANDS)


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
