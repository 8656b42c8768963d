"""The rules the docs test reads the README by, checked fast and shown able to fail.

``test_readme.py`` runs the blocks (a minute or more); these check, in milliseconds, that
every block is marked, that every command has a synopsis, that the substituted strings are
still there, and that each comparison rejects what it should.
"""

from __future__ import annotations

import pytest

from edgeserve.cli import COMMANDS
from tests.docs import readme_blocks as rb
from tests.docs.test_readme import ADDRESS, README, REFERENCE_PATHS


@pytest.fixture(scope="module")
def blocks() -> list[rb.Block]:
    return rb.parse_blocks(README.read_text())


def test_every_block_is_marked_and_the_daemon_examples_are_there(blocks: list[rb.Block]) -> None:
    kinds = [b.kind for b in blocks]
    # The walk needs the daemon the README starts, and runs the reference config.
    assert kinds.count("serve") >= 1 and kinds.count("config-reference") == 1
    run_blocks = [b for b in blocks if b.kind in ("run", "serve", "file", "output")]
    assert len(run_blocks) >= 8, [b.where() for b in run_blocks]


def test_every_command_has_a_synopsis(blocks: list[rb.Block]) -> None:
    synopses = {b.arg for b in blocks if b.kind == "synopsis"}
    assert set(COMMANDS) <= synopses, f"no synopsis for {set(COMMANDS) - synopses}"


def test_the_substituted_strings_are_still_in_the_readme(blocks: list[rb.Block]) -> None:
    ran = "".join(b.text for b in blocks if b.kind in ("run", "serve", "file", "output"))
    assert ADDRESS in ran, f"no block uses {ADDRESS}: the test has nothing to substitute"
    (reference,) = [b for b in blocks if b.kind == "config-reference"]
    for system_path in REFERENCE_PATHS:
        assert system_path in reference.text


@pytest.mark.parametrize(
    ("readme", "problem"),
    [
        ("text\n```sh\nedgeserve demo\n```\n", "has no <!-- readme-test"),
        ("<!-- readme-test: run -->\n\n```sh\nls\n```\n", "right above"),
        ("<!-- readme-test: skip -->\n```sh\nls\n```\n", "needs a (reason)"),
        ("<!-- readme-test: run -->\n```yaml\na: 1\n```\n", "cannot mark"),
        ("<!-- readme-test: file -->\n```yaml\na: 1\n```\n", "needs argument"),
        ("<!-- readme-test: runn -->\n```sh\nls\n```\n", "unknown readme-test kind"),
        ("<!-- readme-test run -->\n```sh\nls\n```\n", "malformed marker"),
        ("<!-- readme-test: run -->\n```sh\nls\n", "never closed"),
        ("```\n<!-- readme-test: run -->\n```\n", "has no <!-- readme-test"),
    ],
)
def test_unmarked_or_mismarked_blocks_are_refused(readme: str, problem: str) -> None:
    with pytest.raises(rb.ReadmeError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        rb.parse_blocks(readme)


def test_a_marked_block_parses_with_its_line_and_reason() -> None:
    (block,) = rb.parse_blocks("# t\n<!-- readme-test: skip (too slow) -->\n```sh\nls -l\n```\n")
    assert (block.line, block.kind, block.reason, block.text) == (3, "skip", "too slow", "ls -l\n")


HELP = """\
usage: edgeserve keygen [-h] --out OUT

options:
  -h, --help            show this help message and exit
  --out OUT             path prefix
  -q, --quiet           say less
"""


def test_a_synopsis_must_match_help_both_ways() -> None:
    helps = {"": HELP}
    assert rb.synopsis_problems("edgeserve keygen --out P [-q]\n", "edgeserve keygen", helps) == []
    missing = rb.synopsis_problems("edgeserve keygen --out P\n", "edgeserve keygen", helps)
    assert missing == [
        "`edgeserve keygen --help` has --quiet / -q, missing from the README synopsis"
    ]
    unknown = rb.synopsis_problems("keygen --out P -q --bits N\n", "edgeserve keygen", helps)
    assert unknown == [
        "the README shows --bits for `edgeserve keygen`, which its --help does not know"
    ]


def test_a_subcommand_synopsis_checks_each_line_and_each_subcommand() -> None:
    helps = {"": "", "list": HELP.replace("--out OUT", "--json   "), "scale": HELP}
    text = "edgeserve m list --json\nedgeserve m scale --out P\nevery action: [-q]\n"
    assert rb.synopsis_problems(text, "edgeserve m", helps) == []
    wrong = "edgeserve m list --out P --json\nedgeserve m drop\nevery action: [-q]\n"
    assert rb.synopsis_problems(wrong, "edgeserve m", helps) == [
        "`edgeserve m scale` is missing from the synopsis",
        "the synopsis shows `edgeserve m drop`, which does not exist",
        "the README shows --out for `edgeserve m list`, which its --help does not know",
    ]


STATUS = [
    "edgeserve 0.1.0: daemon up, ready, uptime 4m19s (pid 30289)  health: HEALTHY",
    "MODEL  VERSION  STATE",
    "mlp    2        READY",
    "system: cpu 100%",
]


def test_sample_output_is_compared_loosely_but_can_fail() -> None:
    actual = [
        "edgeserve 0.1.0: daemon up, ready, uptime 0m03s (pid 7)  health: HEALTHY",
        "MODEL  VERSION  STATE",
        "mlp    2        LOADING",
        "system: cpu 3%",
    ]
    assert rb.output_problems(STATUS, actual) == []
    degraded = [actual[0].replace("HEALTHY", "DEGRADED"), *actual[1:]]
    assert rb.output_problems(STATUS, degraded)[0].startswith("line 1:")
    renamed = [actual[0], "MODEL  VERSION  STATUS", *actual[2:]]
    assert rb.output_problems(STATUS, renamed)[0].startswith("line 2:")
    assert rb.output_problems(STATUS, actual[:3]) == ["3 lines of output, the README shows 4"]
