"""Secrets never reach the logs: a full run (server, agent, X.509 and JWT fetches, validation, rotation) at
debug level, in text and in JSON, then every log line is scanned for private keys (PEM markers and the
base64 of each key's DER, in any line wrapping), join tokens and JWT-SVIDs."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from hardening_support import agent_proc, server_proc
from support.inproc import TD
from support.procs import PY, TesseraAgent, run, short_dir, wait_for

pytestmark = pytest.mark.slow

AGENT_ID = f"spiffe://{TD}/host/logs"


def _key_fingerprints(pem: bytes) -> list[str]:
    """Substrings that would betray a private key: 40-character windows of its base64 DER."""
    key = serialization.load_pem_private_key(pem, None)
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    encoded = base64.b64encode(der).decode()
    raw = base64.b64encode(
        key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
                          serialization.NoEncryption())
    ).decode()  # fmt: skip
    return [text[i : i + 40] for text in (encoded, raw) for i in range(0, len(text) - 40, 40)]


def _scan(text: str, secrets: dict[str, list[str]]) -> list[str]:
    found = []
    if re.search(r"PRIVATE KEY", text):
        found.append("a PEM private key marker")
    for name, needles in secrets.items():
        for needle in needles:
            if needle and needle in text:
                found.append(name)
                break
    return found


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_full_run_logs_no_secrets(fmt: str) -> None:
    root = short_dir("thard-")
    server = server_proc(root, "--log-level", "debug", "--log-format", fmt)
    agent: TesseraAgent | None = None
    try:
        server.start_and_wait()
        server.write_bundle(root / "bundle.pem")
        server.admin(
            "entry", "create", "--spiffe-id", f"spiffe://{TD}/logs/workload", "--parent-id", AGENT_ID,
            "--selector", "unix:uid:0", "--x509-svid-ttl", "60s",
        )  # fmt: skip
        token = server.join_token(AGENT_ID)
        unused_token = server.join_token(f"spiffe://{TD}/host/unused")
        bad = run(PY, "-m", "tessera.agent", "api", "fetch", "x509", "--socket", str(root / "none.sock"))
        assert bad.returncode != 0
        agent = agent_proc(root, server, "agent", "--join-token", token, "--log-level", "debug", "--log-format", fmt)
        agent.start_and_wait()
        out_dir = root / "fetched"
        wait_for(
            lambda: run(
                PY, "-m", "tessera.agent", "api", "fetch", "x509", "--socket", agent.socket, "--write", str(out_dir)
            ).returncode == 0,
            what="X509-SVID fetch",
        )  # fmt: skip
        jwt_out = run(PY, "-m", "tessera.agent", "api", "fetch", "jwt", "--audience", "db", "--socket", agent.socket)
        assert jwt_out.returncode == 0, jwt_out.stderr
        tokens = re.findall(r"eyJ[\w-]+\.[\w-]+\.[\w-]+", jwt_out.stdout)
        assert tokens
        checked = run(
            PY, "-m", "tessera.agent", "api", "validate", "jwt", "--audience", "db", "--svid", tokens[0],
            "--socket", agent.socket,
        )  # fmt: skip
        assert checked.returncode == 0, checked.stderr
        # A forced CA rotation and a refused attestation with a wrong token put more paths in the logs.
        server.admin("ca", "prepare")
        server.admin("ca", "activate")
        server.write_bundle(root / "bundle.pem")  # new agents must trust the CA that now signs the server
        wrong = agent_proc(root, server, "wrong", "--join-token", token[:-4] + "AAAA", "--log-level", "debug")
        wrong.start()
        wait_for(lambda: not wrong.alive(), what="the agent with a wrong token to stop")
        secrets = {
            "the join token": [token, unused_token, token[:-4] + "AAAA"],
            "a JWT-SVID": tokens,
            "the agent's private key": _key_fingerprints((agent.data_dir / "agent.pem").read_bytes()),
            "the workload's private key": _key_fingerprints((out_dir / "svid.0.key").read_bytes()),
        }
        for key_file in server.data_dir.rglob("*.key.pem"):
            secrets[f"CA key {key_file.name}"] = _key_fingerprints(key_file.read_bytes())
        assert len(secrets) >= 6  # CA X.509 and JWT keys were found on disk
        agent.stop()
        server.stop()
        logs = {p.name: p.read_text(errors="replace") for p in root.glob("*.log")}
        assert set(logs) >= {"server.log", "agent.log", "wrong.log"}
        for name, text in logs.items():
            assert text.strip(), f"{name} is empty"
            problems = _scan(text, secrets)
            assert not problems, f"{name} leaks {problems}"
            if fmt == "json" and name != "wrong.log":
                for line in text.splitlines():
                    if line.strip():
                        record = json.loads(line)  # every line is one JSON object
                        assert {"ts", "level", "msg"} <= set(record)
        assert "debug" in logs["server.log"].lower()
    finally:
        if agent is not None:
            agent.stop()
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_the_log_scanner_finds_what_it_looks_for(tmp_path: Path) -> None:
    """The scan must be able to fail: a log that does contain each secret is caught."""
    key = subprocess.run(
        ["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
        capture_output=True, check=True, timeout=30,
    ).stdout  # fmt: skip
    fingerprints = _key_fingerprints(key)
    der_b64 = base64.b64encode(
        serialization.load_pem_private_key(key, None).private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    ).decode()
    secrets = {"key": fingerprints, "token": ["s3cr3t-token-value"]}
    assert _scan(f"loaded key {der_b64}", secrets) == ["key"]
    assert _scan("joining with s3cr3t-token-value", secrets) == ["token"]
    assert _scan(key.decode(), secrets)[0] == "a PEM private key marker"
    assert _scan("nothing to see", secrets) == []
