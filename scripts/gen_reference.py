#!/usr/bin/env python3
"""Regenerates the configuration reference in README.md from the daemons' own setting lists.

Usage: python scripts/gen_reference.py [--check]

The tables sit between ``<!-- BEGIN GENERATED: config -->`` and ``<!-- END GENERATED: config -->``;
tests/test_readme.py fails when they differ from what the code accepts, so the README stays true.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BEGIN = "<!-- BEGIN GENERATED: config -->"
END = "<!-- END GENERATED: config -->"


def _default(setting: object) -> str:
    default = getattr(setting, "default", None)
    if getattr(setting, "required", False):
        return "**required**"
    if default is None or default == [] or default == "":
        return ""
    if isinstance(default, list | tuple):
        return ", ".join(f"`{d}`" for d in default)
    if getattr(setting, "kind", "") == "duration" and isinstance(default, int | float):
        return f"`{int(default) if float(default).is_integer() else default}s`"
    return f"`{default}`"


def _table(title: str, program: str, table: str, settings: Sequence[object]) -> str:
    lines = [
        f"### {title} (`{program} --config FILE`, table `[{table}]`)",
        "",
        "| key (flag `--key-with-dashes`) | kind | default | what |",
        "|---|---|---|---|",
    ]
    for s in settings:
        help_text = str(getattr(s, "help", "")).replace("|", "\\|")
        lines.append(f"| `{s.name}` | {s.kind} | {_default(s)} | {help_text} |")  # type: ignore[attr-defined]
    return "\n".join(lines)


def generate() -> str:
    sys.path.insert(0, str(ROOT))
    from tessera.agent.daemon import SETTINGS as AGENT
    from tessera.sdk.helper.config import SETTINGS as HELPER
    from tessera.server.config import SETTINGS as SERVER

    parts = [
        BEGIN,
        _table("Server", "tessera-server run", "server", SERVER),
        _table("Agent", "tessera-agent run", "agent", AGENT),
        _table("Helper", "tessera-helper", "helper", HELPER),
        END,
    ]
    return "\n\n".join(parts)


def splice(readme: str, block: str) -> str:
    start, end = readme.index(BEGIN), readme.index(END) + len(END)
    return readme[:start] + block + readme[end:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when README.md is out of date")
    args = parser.parse_args()
    text = README.read_text()
    new = splice(text, generate())
    if args.check:
        sys.exit(0 if new == text else 1)
    README.write_text(new)


if __name__ == "__main__":
    main()
