"""Render the commented default config (packaging/config.yaml) from agent/config.py.

Every key appears with its default and the one-line docstring under its field, so the
file the .deb installs as /etc/edgeserve/config.yaml cannot drift from the code:
``tests/ops`` fails when the committed file differs from what this script renders.

    python packaging/render_config.py                  # print to stdout
    python packaging/render_config.py -o packaging/config.yaml
    python packaging/render_config.py --check packaging/config.yaml

Lines starting with ``##`` are documentation; lines starting with ``# `` are settings:
removing the ``# `` of a setting line (and of its section line) turns it on.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

from edgeserve import config as cfg
from edgeserve.types import BatchingSettings

HEADER = """\
## edgeserve configuration (/etc/edgeserve/config.yaml).
##
## Every setting is optional; what is shown is the default. Precedence, lowest first:
## defaults < this file < EDGESERVE_* environment variables < `edgeserve serve` flags.
{env}
## Relative paths in this file are relative to the folder that holds it.
## After a change: `systemctl restart edgeserve` (models: `systemctl reload edgeserve`).
"""
MODEL_EXAMPLE = """\
## Example:
##   models:
##     - archive: /var/lib/edgeserve/incoming/mlp-1.esar
##       default: true
##       batching: {max_batch_size: 32, max_queue_delay_ms: 2.0, instances: 2}
##     - name: resnet18          # already in the store
##       version: "3"
##       device: cuda:0
"""
_PLAIN = re.compile(r"^/[A-Za-z0-9_./-]*$")


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the string literal right under it in the class body."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, after in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
                docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


def yaml_value(name: str, value: Any) -> str:
    if name.endswith("_mode") and isinstance(value, int):
        return f"0{value:o}"  # YAML 1.1 octal, what PyYAML reads
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(yaml_value(name, v) for v in value) + "]"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # a nested section
        pairs = (
            f"{f.name}: {yaml_value(f.name, getattr(value, f.name))}"
            for f in dataclasses.fields(value)
        )
        return "{" + ", ".join(pairs) + "}"
    if isinstance(value, str) and _PLAIN.match(value):
        return value
    return json.dumps(value)


def render() -> str:
    env = textwrap.wrap("Environment variables: " + ", ".join(cfg.ENV_VARS) + ".", 86)
    lines = HEADER.format(env="\n".join("## " + line for line in env)).splitlines()
    defaults = cfg.Config()
    docs = field_docs(cfg.Config)
    for f in dataclasses.fields(cfg.Config):
        value = getattr(defaults, f.name)
        lines += ["", f"## {docs[f.name]}"]
        if dataclasses.is_dataclass(value):
            lines.append(f"# {f.name}:")
            sub_docs = field_docs(type(value))
            for sub in dataclasses.fields(value):
                lines.append(f"#   ## {sub_docs[sub.name]}")
                lines.append(f"#   {sub.name}: {yaml_value(sub.name, getattr(value, sub.name))}")
        elif f.name == "models":
            lines += _model_docs()
            lines.append(f"# {f.name}: []")
        else:
            lines.append(f"# {f.name}: {yaml_value(f.name, value)}")
    return "\n".join(lines) + "\n"


def _model_docs() -> list[str]:
    lines = ["## Each entry:"]
    for name, doc in field_docs(cfg.ModelConfig).items():
        lines.append(f"##   {name}: {doc}")
    lines.append("##   batching keys: " + ", ".join(field_docs(BatchingSettings)))
    return lines + MODEL_EXAMPLE.splitlines()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-o", "--output", type=Path, help="write here")
    group.add_argument("--check", type=Path, help="exit 1 when this file is not up to date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if args.check.read_text(encoding="utf-8") != text:
            print(f"{args.check} is stale: run {sys.argv[0]} -o {args.check}", file=sys.stderr)
            return 1
        return 0
    if args.output:
        args.output.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
