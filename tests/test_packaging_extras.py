"""`pip install tessera` is the SDK; each daemon's extra is what that daemon imports besides, no more and no less;
a daemon started without its extra says in one line which extra to install.

The imports are read from the source (every ``import`` statement, also those inside functions), the extras from
pyproject.toml, and the daemons' start-up check from ``tessera._daemon.extras``: the three must agree.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterable
from importlib.machinery import ModuleSpec
from pathlib import Path

import pytest

from tessera._daemon.extras import EXTRA_MODULES, missing_extra_line, missing_modules

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS: dict[str, list[str]] = PROJECT["optional-dependencies"]


def _normal(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def _dist_name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert match, requirement
    return _normal(match.group(0))


_MODULES_OF: dict[str, set[str]] = {}
for _module, _dists in importlib.metadata.packages_distributions().items():
    for _dist in _dists:
        _MODULES_OF.setdefault(_normal(_dist), set()).add(_module)


def modules_of(requirements: Iterable[str]) -> set[str]:
    """The top-level modules the distributions of ``requirements`` install (read from this venv, which has all)."""
    out: set[str] = set()
    for requirement in requirements:
        name = _dist_name(requirement)
        assert name in _MODULES_OF, f"{name} is not installed in the test venv"
        out |= _MODULES_OF[name]
    return out


BASE = modules_of(PROJECT["dependencies"])


def third_party_imports(*areas: str) -> dict[str, set[str]]:
    """Top-level module -> the files under ``areas`` that import it, leaving out the standard library and tessera."""
    found: dict[str, set[str]] = {}
    for area in areas:
        for path in (ROOT / area).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top != "tessera":
                        found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_the_plain_install_is_what_a_workload_needs() -> None:
    assert {_dist_name(r) for r in PROJECT["dependencies"]} == {"grpcio", "protobuf", "cryptography", "pyjwt"}
    # The SDK (and tessera-helper, part of it) with the generated stubs it speaks the Workload API through uses
    # every one of them, and nothing beyond but its optional HTTP client adapters, each with an extra of its own.
    sdk = third_party_imports("sdk", "tessera/proto")
    assert set(sdk) - BASE == modules_of(EXTRAS["requests"] + EXTRAS["httpx"])
    assert set(sdk) >= BASE


@pytest.mark.parametrize("extra", sorted(EXTRA_MODULES))
def test_the_start_up_check_names_exactly_what_pyproject_installs(extra: str) -> None:
    assert set(EXTRA_MODULES[extra]) == modules_of(EXTRAS[extra])


def test_all_is_both_daemons() -> None:
    assert EXTRAS["all"] == ["tessera[agent,server]"]


@pytest.mark.parametrize(("extra", "areas"), [("agent", ("agent",)), ("server", ("server",))])
def test_each_daemon_imports_its_extra_and_nothing_else(extra: str, areas: tuple[str, ...]) -> None:
    imported = third_party_imports(*areas, "tessera/_daemon")
    outside = {m: files for m, files in imported.items() if m not in BASE | set(EXTRA_MODULES[extra])}
    assert not outside, f"imported but in neither the plain install nor tessera[{extra}]: {outside}"
    inert = set(EXTRA_MODULES[extra]) - set(imported)
    assert not inert, f"tessera[{extra}] installs what it never imports: {inert}"


def test_the_shared_plumbing_needs_only_what_both_extras_bring() -> None:
    both = set(EXTRA_MODULES["agent"]) & set(EXTRA_MODULES["server"])
    assert set(third_party_imports("tessera/_daemon")) <= BASE | both


def _finder(absent: set[str]) -> object:
    def find_spec(name: str) -> ModuleSpec | None:
        return None if name in absent else ModuleSpec(name, None)

    return find_spec


def test_the_refusal_is_one_line_naming_the_extra_and_what_is_missing() -> None:
    find = _finder({"pkcs11", "grpc_health"})
    assert missing_modules(["grpc_health", "psycopg", "pkcs11"], find) == ["grpc_health", "pkcs11"]  # type: ignore[arg-type]
    assert missing_extra_line("tessera-server", "server", find) == (  # type: ignore[arg-type]
        "tessera-server: error: the server needs the 'server' extra (missing grpc_health, pkcs11): "
        "pip install 'tessera[server]'"
    )
    assert missing_extra_line("tessera-agent", "agent", _finder({"pkcs11"})) is None  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("module", "program", "hidden", "extra"),
    [
        ("tessera.server", "tessera-server", "pkcs11", "server"),
        ("tessera.server", "tessera-server", "grpc_health", "server"),
        ("tessera.agent", "tessera-agent", "prometheus_client", "agent"),
    ],
)
def test_a_daemon_without_its_extra_refuses_in_one_line(module: str, program: str, hidden: str, extra: str) -> None:
    """The real entry point, in a fresh interpreter where one module of the extra cannot be found (a None in
    sys.modules is how the import system spells "not installed"); tests/test_packaging_light.py does the same
    in a venv that really lacks the extras."""
    code = (
        f"import sys; sys.modules[{hidden!r}] = None; sys.argv = [{program!r}, 'run']\n"
        f"from {module}.__main__ import main; sys.exit(main())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 1
    assert out.stdout == ""
    assert out.stderr == (
        f"{program}: error: the {extra} needs the '{extra}' extra (missing {hidden}): pip install 'tessera[{extra}]'\n"
    )


@pytest.mark.parametrize("module", ["tessera.server", "tessera.agent"])
def test_a_daemon_with_its_extra_starts_its_cli(module: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: tessera-")
