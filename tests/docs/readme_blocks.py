"""The README's fenced blocks, each with the marker that says how the docs test treats it.

Every fenced block in README.md must have a marker on the line right above it, an HTML
comment that GitHub does not render::

    <!-- readme-test: KIND [ARG] [(REASON)] -->

Kinds (``KINDS``): ``run`` (a shell block through bash, a Python block through the venv's
python), ``file NAME`` (written to NAME in the working folder), ``serve`` (a shell block
with a long-running ``edgeserve serve``, started in the background and stopped at the
end), ``background port:N|log:TEXT`` (another long-running command, such as a local
broker or the collector, ready once the README's port N accepts connections or its
output shows TEXT, stopped at the end), ``synopsis COMMAND`` (usage text, checked
against ``edgeserve COMMAND --help``),
``output`` (sample output: its ``$`` line is run and the result compared loosely),
``config-reference`` (the configuration reference, served with its paths substituted),
``skip (REASON)`` (not run) and ``skip-ci (REASON)`` (not run here because ``.ci/run``
runs each of its lines verbatim).

Pure parsing and comparison: nothing here starts a process.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

# kind -> (languages it may mark, whether it takes an ARG, whether it needs a REASON)
KINDS: dict[str, tuple[frozenset[str], bool, bool]] = {
    "run": (frozenset({"sh", "python"}), False, False),
    "file": (frozenset({"python", "yaml", "sh", "text"}), True, False),
    "serve": (frozenset({"sh"}), False, False),
    "background": (frozenset({"sh"}), True, False),
    "synopsis": (frozenset({"text"}), True, False),
    "output": (frozenset({"text"}), False, False),
    "config-reference": (frozenset({"yaml"}), False, False),
    "skip": (frozenset({"sh", "python", "yaml", "text"}), False, True),
    "skip-ci": (frozenset({"sh"}), False, True),
}
_MARKER = re.compile(
    r"^<!-- readme-test: (?P<kind>[a-z-]+)(?: (?P<arg>[^\s()]+))?(?: \((?P<reason>[^)]+)\))? -->$"
)
_FENCE = "```"
_OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")
_HELP_OPTION = re.compile(r"^  (-\S.*?)(?:\s{2,}|$)")
_HELP_SUBCOMMAND = re.compile(r"^    ([a-z][\w-]*)(?:\s{2,}|$)")


class ReadmeError(Exception):
    """The README's blocks or markers break the rules above; the message names the line."""


@dataclass(frozen=True)
class Block:
    line: int
    """1-based line of the opening fence in README.md."""
    lang: str
    kind: str
    arg: str | None
    reason: str | None
    text: str
    """The lines between the fences, each ending in a newline."""

    def where(self) -> str:
        label = f"{self.kind} {self.arg}" if self.arg else self.kind
        return f"README.md line {self.line} (```{self.lang}, readme-test: {label})"


def parse_blocks(readme: str) -> list[Block]:
    """Every fenced block, in order, with its marker; ``ReadmeError`` on any unmarked one."""
    lines = readme.splitlines()
    blocks: list[Block] = []
    marker: tuple[int, re.Match[str]] | None = None
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if marker is not None and marker[0] == i - 1 and not line.startswith(_FENCE):
            raise ReadmeError(f"line {i}: a readme-test marker must sit right above a ``` fence")
        if line.startswith("<!-- readme-test"):
            match = _MARKER.match(line)
            if match is None:
                raise ReadmeError(f"line {i + 1}: malformed marker {line!r}")
            marker = (i, match)
        elif line.startswith(_FENCE):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == _FENCE), None)
            if end is None:
                raise ReadmeError(f"line {i + 1}: fence never closed")
            lang = line[len(_FENCE) :].strip()
            if marker is None or marker[0] != i - 1:
                raise ReadmeError(
                    f"line {i + 1}: ```{lang} block has no <!-- readme-test: ... --> marker "
                    "on the line above (mark it run, file, serve, ... or skip (why))"
                )
            body = "".join(f"{text}\n" for text in lines[i + 1 : end])
            blocks.append(_block(i + 1, lang, marker[1], body))
            marker, i = None, end
        i += 1
    if marker is not None and marker[0] == len(lines) - 1:
        raise ReadmeError(f"line {len(lines)}: a readme-test marker must sit above a fence")
    return blocks


def _block(line: int, lang: str, match: re.Match[str], body: str) -> Block:
    kind, arg, reason = match["kind"], match["arg"], match["reason"]
    if kind not in KINDS:
        raise ReadmeError(f"line {line - 1}: unknown readme-test kind {kind!r}")
    langs, takes_arg, needs_reason = KINDS[kind]
    if lang not in langs:
        raise ReadmeError(f"line {line}: readme-test {kind} cannot mark a ```{lang} block")
    if bool(arg) != takes_arg:
        raise ReadmeError(
            f"line {line - 1}: readme-test {kind} {'needs' if takes_arg else 'takes no'} argument"
        )
    if needs_reason and not (reason and reason.strip()):
        raise ReadmeError(f"line {line - 1}: readme-test {kind} needs a (reason)")
    return Block(line, lang, kind, arg, reason, body)


# --- synopsis blocks against --help -------------------------------------------------


def help_options(help_text: str) -> list[set[str]]:
    """argparse's option lines, one set per option (aliases together), ``--help`` left out."""
    groups = []
    for line in help_text.splitlines():
        match = _HELP_OPTION.match(line)
        if match:
            group = {name.split()[0] for name in match[1].split(", ")}
            if "--help" not in group:
                groups.append(group)
    return groups


def help_subcommands(help_text: str) -> list[str]:
    """The subcommand names an argparse parent's ``--help`` lists."""
    return [m[1] for line in help_text.splitlines() if (m := _HELP_SUBCOMMAND.match(line))]


def synopsis_options(text: str) -> set[str]:
    return set(_OPTION.findall(_without_comments(text)))


def synopsis_lines(text: str, prefix: str, subs: Collection[str] = ()) -> dict[str, set[str]]:
    """Options per subcommand for ``prefix SUB ...`` lines; "" collects the other lines.

    ``SUB`` is one word, or two when ``subs`` names the pair (``fleet root init``). An
    indented line continues the one above it; an unindented line that does not start with
    ``prefix`` names options every subcommand takes.
    """
    per: dict[str, set[str]] = {}
    current = ""
    for raw in _without_comments(text).splitlines():
        if raw.startswith(prefix + " "):
            words = raw[len(prefix) + 1 :].split()
            pair = " ".join(words[:2])
            current = pair if pair in subs else words[0]
        elif not raw[:1].isspace():
            current = ""
        per.setdefault(current, set()).update(_OPTION.findall(raw))
    return per


def _without_comments(text: str) -> str:
    return "\n".join(line.split("  #", 1)[0] for line in text.splitlines())


def unknown_options(documented: set[str], groups: list[set[str]], command: str) -> list[str]:
    """Options the README shows that ``--help`` does not list."""
    known = set().union(*groups) if groups else set()
    return [
        f"the README shows {name} for `{command}`, which its --help does not know"
        for name in sorted(documented - known)
    ]


def undocumented_options(documented: set[str], groups: list[set[str]], command: str) -> list[str]:
    """Options ``--help`` lists that the README shows under none of their names."""
    return [
        f"`{command} --help` has {' / '.join(sorted(g))}, missing from the README synopsis"
        for g in groups
        if not g & documented
    ]


def synopsis_problems(text: str, command: str, helps: dict[str, str]) -> list[str]:
    """A synopsis block against ``--help``: ``helps`` maps "" to the command's own help and
    each subcommand (``models list``) to its help; every option both ways, every subcommand.
    """
    if len(helps) == 1:
        shown, groups = synopsis_options(text), help_options(helps[""])
        return unknown_options(shown, groups, command) + undocumented_options(
            shown, groups, command
        )
    per_line = synopsis_lines(text, command, helps)
    common = per_line.pop("", set())
    # A subcommand with subcommands of its own (``fleet root``) is shown through them.
    groups_of = {s for s in helps if s and any(k.startswith(s + " ") for k in helps)}
    subs = [s for s in helps if s and s not in groups_of]
    problems = [f"`{command} {s}` is missing from the synopsis" for s in subs if s not in per_line]
    problems += [
        f"the synopsis shows `{command} {s}`, which does not exist"
        for s in per_line
        if s not in subs
    ]
    all_groups: list[set[str]] = []
    for sub in subs:
        groups = help_options(helps[sub])
        all_groups += groups
        problems += unknown_options(per_line.get(sub, set()) | common, groups, f"{command} {sub}")
    return problems + undocumented_options(common.union(*per_line.values()), all_groups, command)


# --- sample output --------------------------------------------------------------------


def _shape(line: str) -> str:
    return re.sub(r"\d+", "N", " ".join(line.split()))


def output_problems(sample: list[str], actual: list[str]) -> list[str]:
    """Loose comparison: same number of lines, the same first word on each, and the two
    first lines (headline and table header) equal once numbers are masked."""
    if len(sample) != len(actual):
        return [f"{len(actual)} lines of output, the README shows {len(sample)}"]
    problems = []
    for n, (want, got) in enumerate(zip(sample, actual, strict=True), start=1):
        if n <= 2 and _shape(want) != _shape(got):
            problems.append(f"line {n}: README {want.strip()!r}, got {got.strip()!r}")
        elif want.split()[:1] != got.split()[:1]:
            problems.append(f"line {n} starts differently: README {want!r}, got {got!r}")
    return problems
