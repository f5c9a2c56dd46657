"""The README stays true: its configuration tables match the code, its commands and links exist."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_configuration_reference_matches_the_settings() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_reference.py"), "--check"])
    assert result.returncode == 0, "README's configuration tables are stale: run scripts/gen_reference.py"


def test_ci_runs_the_readme_test_command_and_the_readme_starts_with_both_commands() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/test.sh" in ci
    first_blocks = re.findall(r"```sh\n(.*?)\n```", README, re.S)[:2]
    assert first_blocks == ["scripts/demo.sh", "scripts/test.sh"]


def test_relative_links_point_at_files_that_exist() -> None:
    for target in re.findall(r"\]\(((?!https?:)[^)#]+)\)", README):
        assert (ROOT / target).exists(), f"README links to missing {target}"


def test_benchmarks_named_in_the_readme_exist() -> None:
    for name in re.findall(r"`(bench_\w+\.py)`", README):
        assert (ROOT / "bench" / name).exists(), f"README names missing bench/{name}"


def test_cli_contract_commands_are_documented() -> None:
    for command in ("entry create", "entry show", "entry update", "token generate", "agent evict", "agent ban",
                    "bundle show", "ca taint", "api fetch x509", "api fetch jwt", "api validate jwt", "api watch"):
        assert command in README or command.split()[1] in README, command
