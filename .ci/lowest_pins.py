#!/usr/bin/env python
"""Print the lowest versions setup.py allows, one ``name==version`` per line, for CI's compatibility run.

Reads the requirement strings of ``install_requires`` and of the extras named on the command line straight from
setup.py's source (nothing is executed), and pins every requirement with a ``>=`` bound to that bound. torch is left
out: CI installs the pinned CPU build first. A requirement without a lower bound is an error, so that setup.py
cannot claim support it never tests.

Usage: python .ci/lowest_pins.py [EXTRA ...]     e.g. python .ci/lowest_pins.py sentence-transformers
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

SETUP = Path(__file__).resolve().parent.parent / "setup.py"
NOT_PINNED = {"torch"}  # the CPU wheel is installed first, pinned exactly, in every CI environment
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9_.\-]*)\s*(.*)$")


def setup_keywords(source: str) -> dict[str, ast.expr]:
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            return {keyword.arg: keyword.value for keyword in node.keywords if keyword.arg}
    raise SystemExit(f"{SETUP}: no setup(...) call found")


def lowest_pins(extras: list[str]) -> list[str]:
    keywords = setup_keywords(SETUP.read_text(encoding="utf-8"))
    requirements = list(ast.literal_eval(keywords["install_requires"]))
    extras_require = ast.literal_eval(keywords.get("extras_require", ast.Dict(keys=[], values=[])))
    for extra in extras:
        if extra not in extras_require:
            raise SystemExit(f"{SETUP}: no extra {extra!r} (extras: {', '.join(sorted(extras_require))})")
        requirements += extras_require[extra]
    pins: dict[str, str] = {}
    for requirement in requirements:
        match = REQUIREMENT.match(requirement.split(";")[0])
        name, specifiers = match.group(1), match.group(2)
        if name.lower() in NOT_PINNED:
            continue
        lower = re.search(r">=\s*([0-9][A-Za-z0-9.]*)", specifiers)
        if lower is None:
            raise SystemExit(f"{SETUP}: {requirement!r} has no lower bound (>=): declare the lowest version tested")
        pins[name.lower()] = f"{name}=={lower.group(1)}"
    return sorted(pins.values())


if __name__ == "__main__":
    print("\n".join(lowest_pins(sys.argv[1:])))
