"""A throw-away SoftHSM2 token for tests: its own token directory and config (SOFTHSM2_CONF), one token."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

SOFTHSM_MODULES = ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so")
USER_PIN = "8642-tessera"
SO_PIN = "97531-so"


def softhsm_module() -> str | None:
    for path in SOFTHSM_MODULES:
        if os.path.exists(path):
            return path
    return None


@dataclass
class SoftHsm:
    root: Path
    module: str
    label: str
    conf: Path

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SOFTHSM2_CONF": str(self.conf)}

    def token_files(self) -> list[Path]:
        return [p for p in (self.root / "tokens").rglob("*") if p.is_file()]


def make_token(root: Path, label: str = "tessera-test", this_process: bool = False) -> SoftHsm:
    """Initialises a fresh token under ``root``; ``this_process`` points this process's SoftHSM2 at it.

    SoftHSM2 reads SOFTHSM2_CONF once, when a process first initialises the library: a test process can use
    one token directory only, so in-process tests share one token and daemons get theirs through ``env``.
    """
    module = softhsm_module()
    if module is None or shutil.which("softhsm2-util") is None:
        raise RuntimeError("SoftHSM2 is not installed (scripts/system-deps.sh installs the softhsm2 package)")
    (root / "tokens").mkdir(parents=True, exist_ok=True)
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    if this_process:
        os.environ["SOFTHSM2_CONF"] = str(conf)
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", USER_PIN, "--so-pin", SO_PIN],
        check=True,
        capture_output=True,
        env={**os.environ, "SOFTHSM2_CONF": str(conf)},
        timeout=60,
    )
    return SoftHsm(root, module, label, conf)


def assert_no_private_key_under(directory: Path, *, expect_files: bool = False) -> None:
    """No file under ``directory`` is a private key, PEM or DER: the keys must stay in the token.
    ``expect_files``: the directory must hold files at all (so the check cannot pass on an empty tree)."""
    files = [p for p in directory.rglob("*") if p.is_file()]
    if expect_files:
        assert files
    for path in files:
        data = path.read_bytes()
        assert b"PRIVATE KEY" not in data, f"{path} holds a PEM private key"
        for loader in (serialization.load_der_private_key, serialization.load_pem_private_key):
            try:
                loader(data, None)
            except (ValueError, TypeError):
                continue
            raise AssertionError(f"{path} is a private key")
