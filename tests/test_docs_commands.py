"""Every `ff <command> --option` written in the README and docs/ exists: the options are
generated from the configuration dataclasses (cache/options.py), and a doc that names an option
the command line no longer has would send a newcomer to an error."""
from __future__ import annotations

import re
from pathlib import Path

import click

from cli import GLOBAL_OPTIONS, main

ROOT = Path(__file__).resolve().parents[1]
CMD = re.compile(r"\bff (cache|train|eval|run|generate|bake|export|verify|inspect|copy)\b")
RETIRED = {"--probe-ramps", "--probe-pools"}
"""Options measured and retired, named on the results page with the commit their commands ran at."""


def _options(name: str) -> set[str]:
    command = main.commands[name]
    return {o for p in command.params if isinstance(p, click.Option) for o in (*p.opts, *p.secondary_opts)}


def _commands(text: str):
    """(line number, command, the text of its arguments) of every `ff <command>` in a document:
    up to the closing backtick or the next `ff` command, continuation lines included."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        for m in CMD.finditer(line):
            tail = line[m.end():]
            nxt, tick = CMD.search(tail), tail.find("`")
            end = min(tick if tick >= 0 else len(tail), nxt.start() if nxt else len(tail))
            span, j = tail[:end], i
            while end == len(tail) and span.rstrip().endswith("\\") and j + 1 < len(lines):
                j += 1
                span += " " + lines[j]
            yield i + 1, m.group(1), span


def test_every_option_the_docs_name_exists():
    allowed = set(GLOBAL_OPTIONS) | {"--version", "--help", "-h"}
    bad = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for line, command, span in _commands(path.read_text()):
            for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", span):
                if flag.startswith("--ff") or flag in RETIRED and path.name == "results.md":
                    continue  # the README's diagram (model --ff cache--> ...); retired, with their commit
                if flag not in _options(command) | allowed:
                    bad.append(f"{path.relative_to(ROOT)}:{line}: ff {command} {flag}")
    assert not bad, "\n".join(bad)


def test_the_check_finds_an_option_that_does_not_exist():
    found = [(c, re.findall(r"--[a-z-]+", s)) for _, c, s in _commands("run `ff train --store S --steps 5` now")]
    assert found == [("train", ["--store", "--steps"])] and "--steps" not in _options("train")
