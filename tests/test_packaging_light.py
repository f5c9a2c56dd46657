"""`pip install .` with no extras is what a workload gets, and all it needs.

A fresh venv of this interpreter, outside the checkout, installs the wheel built from the checkout with its
dependencies as pip resolves them (its cache makes that quick; the test skips, saying so, only when pip cannot
reach a package index at all). Then, against a real server and agent started from the test venv:

- none of the daemons' extras is there (psycopg, python-pkcs11, prometheus-client, gRPC health and reflection),
  nor psutil;
- ``import tessera.sdk`` and an ``X509Source`` from its front door do mutual TLS (support/mtls_probe.py);
- ``tessera-helper`` writes the SVID files; ``tessera-server`` and ``tessera-agent`` each refuse in one line
  naming the extra to install.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.stack import HostStack, host_stack

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PROBE = ROOT / "tests" / "support" / "mtls_probe.py"
INSTALL_TIMEOUT = 300
NEVER_IN_THE_LIGHT_INSTALL = {
    "psycopg", "psycopg-binary", "psycopg-pool", "python-pkcs11", "prometheus-client", "grpcio-health-checking",
    "grpcio-reflection", "psutil",
}  # fmt: skip
# pip's words when it could not talk to any index (as opposed to a wheel or requirement it refused).
_NO_INDEX = re.compile(
    r"Failed to establish a new connection|Temporary failure in name resolution|Network is unreachable|"
    r"Could not find a version that satisfies the requirement|No matching distribution found|ProxyError",
)


def _env() -> dict[str, str]:
    """This environment without what would let the checkout or the test venv leak into the light venv."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


class LightVenv:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.python = str(root / "venv" / "bin" / "python")

    def bin(self, name: str) -> str:
        return str(self.root / "venv" / "bin" / name)

    def run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False, cwd=self.root, env=_env()
        )


@pytest.fixture(scope="module")
def light(tmp_path_factory: pytest.TempPathFactory) -> LightVenv:
    root = tmp_path_factory.mktemp("light")
    wheels = root / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(ROOT)],
        check=True, timeout=INSTALL_TIMEOUT,
    )  # fmt: skip
    (wheel,) = wheels.glob("tessera-*.whl")
    venv = LightVenv(root)
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True, timeout=120)
    out = venv.run(venv.python, "-m", "pip", "install", "--disable-pip-version-check", "-q", str(wheel),
                   timeout=INSTALL_TIMEOUT)  # fmt: skip
    if out.returncode != 0:
        if _NO_INDEX.search(out.stdout + out.stderr):
            pytest.skip(f"pip cannot reach a package index here: {(out.stderr or out.stdout).strip()[-300:]}")
        raise AssertionError(f"pip install of the plain wheel failed:\n{out.stdout}\n{out.stderr}")
    return venv


@pytest.fixture(scope="module")
def stack() -> Iterator[HostStack]:
    with host_stack(prefix="tlv-") as s:
        yield s


def test_the_light_venv_has_what_a_workload_needs_and_no_extra(light: LightVenv) -> None:
    out = light.run(
        light.python, "-c",
        "import importlib.metadata as m, json; print(json.dumps([d.metadata['Name'] for d in m.distributions()]))",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    names = {re.sub(r"[-_.]+", "-", n).lower() for n in json.loads(out.stdout)}
    assert {"tessera", "grpcio", "protobuf", "cryptography", "pyjwt"} <= names
    assert not names & NEVER_IN_THE_LIGHT_INSTALL


def test_an_x509_source_from_the_light_install_does_mutual_tls(light: LightVenv, stack: HostStack) -> None:
    out = light.run(light.python, str(PROBE), stack.address, timeout=120)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["sdk"].startswith(str(light.root / "venv")), "tessera.sdk came from outside the light venv"
    for client in ("sdk_client", "default_context_client"):
        assert seen[client]["server_saw"] == seen[client]["client_saw"] == stack.spiffe_id


def test_tessera_helper_runs_from_the_light_install(light: LightVenv, stack: HostStack) -> None:
    out = light.run(
        light.bin("tessera-helper"), "--agent-address", stack.address, "--cert-dir", str(light.root / "certs"),
        "--no-daemon-mode", timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert (light.root / "certs" / "svid.pem").read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")


@pytest.mark.parametrize(
    ("program", "extra", "missing"),
    [
        ("tessera-server", "server", "grpc_health, grpc_reflection, prometheus_client, psycopg, psycopg_pool, pkcs11"),
        ("tessera-agent", "agent", "grpc_health, grpc_reflection, prometheus_client"),
    ],
)
def test_a_daemon_from_the_light_install_names_its_extra(
    light: LightVenv, program: str, extra: str, missing: str
) -> None:
    out = light.run(light.bin(program), "run")
    assert (out.returncode, out.stdout) == (1, "")
    assert out.stderr == (
        f"{program}: error: the {extra} needs the '{extra}' extra (missing {missing}): pip install 'tessera[{extra}]'\n"
    )
