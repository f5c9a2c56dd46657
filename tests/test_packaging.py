"""The distribution installs as tessera.* only, and imports from a fresh virtualenv."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True,
    )
    (whl,) = out.glob("tessera-*.whl")
    return whl


def test_wheel_has_nothing_but_tessera_at_the_top(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"tessera"}
    for sub in ("sdk", "server", "agent", "proto"):
        assert f"tessera/{sub}/__init__.py" in names
    assert "tessera/proto/workload_pb2.py" in names
    assert "tessera/sdk/py.typed" in names


def test_fresh_virtualenv_imports_the_installed_package(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    # The dependencies come from the test run's own site-packages on PYTHONPATH (where .pth files, such
    # as an editable install's finder, are not processed); tessera itself comes from the wheel only, and
    # is imported from a directory outside the checkout.
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True)
    out = subprocess.run(
        [str(py), "-c", "import tessera.sdk, tessera.proto.workload_pb2; print(tessera.sdk.__file__)"],
        check=True, capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(site.getsitepackages())},
    ).stdout
    assert str(venv) in out
