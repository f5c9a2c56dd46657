"""`import tessera.sdk` stays light: workloads that only parse IDs or verify chains must not pay for gRPC. Its
front door exports what users type first, the heavy names on first use, visibly to type checkers."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import tessera.sdk

HEAVY = "('grpc', 'grpc.', 'tessera.proto', 'google.protobuf', 'tessera.server', 'tessera.agent', 'tessera._daemon')"
FRONT_DOOR = [
    "X509Source",
    "JwtSource",
    "WorkloadApiClient",
    "server_context",
    "client_context",
    "authorize_id",
    "authorize_any",
    "authorize_one_of",
    "authorize_member_of",
    "SpiffeId",
]


def _fresh(code: str) -> str:
    """``code`` run in a new interpreter after a helper ``heavy()`` listing the heavy modules loaded so far."""
    prelude = f"import sys\ndef heavy(): return ','.join(sorted(m for m in sys.modules if m.startswith({HEAVY})))\n"
    result = subprocess.run(
        [sys.executable, "-c", prelude + code], capture_output=True, text=True, check=True, timeout=60
    )
    return result.stdout.strip()


def test_top_level_import_does_not_load_grpc_or_protos() -> None:
    assert _fresh("import tessera.sdk; print(heavy())") == ""


def test_light_names_stay_light_and_heavy_names_load_on_first_use() -> None:
    out = _fresh(
        "import tessera.sdk\n"
        "tessera.sdk.SpiffeId.parse('spiffe://example.org/a'); tessera.sdk.X509Bundle; tessera.sdk.verify_x509_svid\n"
        "print(heavy() or 'light')\n"
        "from tessera.sdk import X509Source\n"
        "print('grpc' in sys.modules, X509Source.__module__)\n"
    )
    assert out.splitlines() == ["light", "True tessera.sdk.source"]


def test_the_front_door_names_of_the_issue_import_in_one_line() -> None:
    out = _fresh(f"from tessera.sdk import {', '.join(FRONT_DOOR)}; print('ok')")
    assert out == "ok"


@pytest.mark.parametrize("name", tessera.sdk.__all__)
def test_every_exported_name_is_the_object_of_its_defining_module(name: str) -> None:
    value = getattr(tessera.sdk, name)
    home = importlib.import_module(value.__module__)
    assert getattr(home, name) is value
    assert name in dir(tessera.sdk)


def test_the_front_door_covers_the_issue_and_the_old_names() -> None:
    old = ["TrustDomain", "X509Svid", "X509Bundle", "JwtBundle", "SpiffeBundle", "BundleSet", "JwtSvid",
           "verify_x509_svid", "TesseraError", "VerificationError"]  # fmt: skip
    assert set(FRONT_DOOR + old) <= set(tessera.sdk.__all__)
    assert tessera.sdk.__all__ == sorted(tessera.sdk.__all__)


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="has no attribute 'X509Sauce'"):
        tessera.sdk.X509Sauce  # type: ignore[attr-defined]  # noqa: B018
    with pytest.raises(ImportError):
        exec("from tessera.sdk import X509Sauce", {})


def test_type_checkers_see_every_lazy_name_where_it_is_loaded_from() -> None:
    """The ``if TYPE_CHECKING:`` imports (what mypy and IDEs read) name exactly the lazy table (what runs)."""
    tree = ast.parse(Path(tessera.sdk.__file__).read_text())
    (guard,) = [n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"]
    seen = {alias.name: node.module for node in guard.body if isinstance(node, ast.ImportFrom) for alias in node.names}
    lazy = tessera.sdk._LAZY
    assert seen == lazy
    assert set(lazy) <= set(tessera.sdk.__all__)
