"""`tessera-server` end to end as an operator runs it: a daemon subprocess and the admin commands."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from server_api_support import TD, HostPki, cleanup, free_socket_dir, pem_certs

from tessera.sdk.bundle import SpiffeBundle, X509Bundle

BIN = Path(sys.executable).parent / "tessera-server"
READY = re.compile(r"tessera-server ready: node API on [\d.]+:(\d+)")

pytestmark = pytest.mark.slow


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}): {result.stderr}")
    return result


@dataclass
class Daemon:
    process: subprocess.Popen[str]
    socket: str
    port: int = 0
    lines: list[str] = field(default_factory=list)

    def admin(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return cli(*args, "--socket", self.socket, check=check)


def start_daemon(config: Path, *extra: str, env: dict[str, str] | None = None) -> Daemon:
    process = subprocess.Popen(
        [str(BIN), "run", "--config", str(config), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    socket_path = re.search(r'socket = "([^"]+)"', config.read_text())
    assert socket_path
    daemon = Daemon(process, socket_path.group(1))
    ready = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            daemon.lines.append(line)
            match = READY.search(line)
            if match:
                daemon.port = int(match.group(1))
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(60):
        process.kill()
        raise AssertionError("server did not become ready:\n" + "".join(daemon.lines))
    return daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    base = tmp_path_factory.mktemp("cli")
    sock_dir = free_socket_dir()
    config = base / "server.toml"
    config.write_text(
        f'[server]\ntrust_domain = "{TD}"\ndata_dir = "{base / "data"}"\nbind_address = "127.0.0.1:0"\n'
        f'socket = "{sock_dir / "private" / "api.sock"}"\nlog_format = "json"\ndefault_x509_svid_ttl = "30m"\n'
    )
    d = start_daemon(config)
    try:
        yield d
    finally:
        if d.process.poll() is None:
            d.process.send_signal(signal.SIGTERM)
            d.process.wait(30)
        cleanup(sock_dir)


def test_healthcheck_and_graceful_sigterm(tmp_path: Path) -> None:
    sock_dir = free_socket_dir()
    config = tmp_path / "s.toml"
    config.write_text(
        f'[server]\ndata_dir = "{tmp_path / "d"}"\nbind_address = "127.0.0.1:0"\nsocket = "{sock_dir}/a.sock"\n'
    )
    d = start_daemon(config, "--trust-domain", "flag.example")  # flags join the file
    try:
        assert cli("healthcheck", "--socket", d.socket).returncode == 0
        assert json.loads(cli("bundle", "show", "--format", "spiffe", "--socket", d.socket).stdout)
        assert Path(d.socket).parent.stat().st_mode & 0o777 == 0o700
        d.process.send_signal(signal.SIGTERM)
        assert d.process.wait(30) == 0
        assert not Path(d.socket).exists()
        failed = cli("healthcheck", "--socket", d.socket, check=False)
        assert failed.returncode == 1 and len(failed.stderr.strip().splitlines()) == 1
    finally:
        if d.process.poll() is None:
            d.process.kill()
        cleanup(sock_dir)


def test_entries_from_the_command_line(daemon: Daemon) -> None:
    parent = f"spiffe://{TD}/tessera/agent/join_token/cli-agent"
    created = daemon.admin(
        "entry",
        "create",
        "--spiffe-id",
        f"spiffe://{TD}/cli/web",
        "--parent-id",
        parent,
        "--selector",
        "unix:uid:1000",
        "--selector",
        "unix:gid:50",
        "--dns-name",
        "web.example.org",
        "--x509-svid-ttl",
        "10m",
        "--hint",
        "web",
        "--expires-at",
        "2099-01-01T00:00:00Z",
    )
    entry_id = created.stdout.strip()
    assert re.fullmatch(r"[0-9a-f-]{36}", entry_id)
    shown = json.loads(daemon.admin("entry", "show", "--id", entry_id, "--output", "json").stdout)
    assert shown[0]["x509_svid_ttl"] == 600 and shown[0]["selectors"] == ["unix:gid:50", "unix:uid:1000"]
    assert shown[0]["dns_names"] == ["web.example.org"] and shown[0]["expires_at"] == 4070908800
    text = daemon.admin("entry", "show", "--selector", "unix:uid:1000").stdout
    assert entry_id in text and f"spiffe://{TD}/cli/web" in text
    updated = json.loads(daemon.admin("entry", "update", "--id", entry_id, "--hint", "web2", "--output", "json").stdout)
    assert updated["hint"] == "web2" and updated["x509_svid_ttl"] == 600
    duplicate = daemon.admin(
        "entry",
        "create",
        "--spiffe-id",
        f"spiffe://{TD}/cli/web",
        "--parent-id",
        parent,
        "--selector",
        "unix:uid:1000",
        "--selector",
        "unix:gid:50",
        check=False,
    )
    assert duplicate.returncode == 1 and "already_exists" in duplicate.stderr
    assert len(duplicate.stderr.strip().splitlines()) == 1
    node = daemon.admin(
        "entry", "create", "--spiffe-id", f"spiffe://{TD}/cli/group", "--selector", "x509pop:subject:cn:x", "--node"
    )
    assert node.returncode == 0
    daemon.admin("entry", "delete", "--id", entry_id)
    gone = daemon.admin("entry", "show", "--id", entry_id, check=False)
    assert gone.returncode == 1 and "not_found" in gone.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["entry", "create", "--spiffe-id", "nope", "--parent-id", f"spiffe://{TD}/a", "--selector", "unix:uid:1"],
        ["entry", "create", "--spiffe-id", f"spiffe://{TD}/a", "--parent-id", f"spiffe://{TD}/b", "--selector", "bad"],
        [
            "entry",
            "create",
            "--spiffe-id",
            f"spiffe://{TD}/a",
            "--parent-id",
            f"spiffe://{TD}/b",
            "--selector",
            "unix:uid:1",
            "--x509-svid-ttl",
            "soon",
        ],
        [
            "entry",
            "create",
            "--spiffe-id",
            f"spiffe://{TD}/a",
            "--parent-id",
            f"spiffe://{TD}/b",
            "--selector",
            "unix:uid:1",
            "--expires-at",
            "tomorrow",
        ],
        ["entry", "update", "--id", "no-such-entry", "--hint", "x"],
        ["agent", "show", "--spiffe-id", f"spiffe://{TD}/no-agent"],
        ["agent", "evict", "--spiffe-id", "garbage"],
        ["token", "generate", "--spiffe-id", "spiffe://elsewhere.test/a"],
        ["bundle", "set", "--id", "spiffe://x.test", "--path", "/nonexistent/bundle.pem"],
        ["bundle", "delete", "--id", "spiffe://never-set.test"],
        ["ca", "activate"],
        ["ca", "taint", "--id", "0123456789abcdef"],
        ["ca", "revoke", "--id", "0123456789abcdef"],
        ["x509", "revoke", "--serial", "zz-not-hex"],
        ["federation", "show", "--trust-domain", "never.test"],
    ],
)
def test_errors_are_one_line_and_exit_1(daemon: Daemon, args: list[str]) -> None:
    result = daemon.admin(*args, check=False)
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tessera-server: "), result.stderr


def test_tokens_agents_bundles_and_ca(daemon: Daemon, tmp_path: Path) -> None:
    token = daemon.admin("token", "generate", "--ttl", "5m").stdout.strip()
    assert len(token) >= 32 and "\n" not in token
    as_json = json.loads(daemon.admin("token", "generate", "--output", "json").stdout)
    assert as_json["spiffe_id"].endswith(as_json["id"]) and as_json["token"] != as_json["id"]
    assert json.loads(daemon.admin("agent", "list", "--output", "json").stdout) == []

    pem = daemon.admin("bundle", "show").stdout
    assert len(X509Bundle.parse_pem(TD, pem.encode())) >= 1
    doc = daemon.admin("bundle", "show", "--format", "spiffe").stdout
    assert SpiffeBundle.from_document(TD, doc.encode()).jwt_authorities

    partner = tmp_path / "partner.pem"
    partner.write_bytes(pem_certs([HostPki.create().root]))
    daemon.admin("bundle", "set", "--id", "spiffe://partner.test", "--path", str(partner))
    listed = json.loads(daemon.admin("bundle", "list", "--output", "json").stdout)
    assert [b["trust_domain"] for b in listed] == ["partner.test"] and listed[0]["x509_authorities"] == 1
    daemon.admin("bundle", "delete", "--id", "spiffe://partner.test")
    assert "no federated bundles" in daemon.admin("bundle", "list").stdout

    slots = json.loads(daemon.admin("ca", "show", "--output", "json").stdout)
    assert {(s["kind"], s["state"]) for s in slots} == {("x509", "active"), ("jwt", "active")}
    prepared = json.loads(daemon.admin("ca", "prepare", "--output", "json").stdout)
    assert {s["state"] for s in prepared} == {"active", "prepared"}
    activated = json.loads(daemon.admin("ca", "activate", "--output", "json").stdout)
    assert {s["state"] for s in activated} == {"active", "old"}
    assert "active" in daemon.admin("ca", "show").stdout
    assert json.loads(daemon.admin("x509", "revoked", "--output", "json").stdout) == []
    assert json.loads(daemon.admin("federation", "show", "--output", "json").stdout) == []


@pytest.mark.parametrize(
    ("toml", "flags", "needle"),
    [
        ("", [], "trust_domain"),
        (f'trust_domain = "{TD}"\ncolour = "blue"\n', [], "colour"),
        (f'trust_domain = "{TD}"\nca_ttl = "forever"\n', [], "ca_ttl"),
        (f'trust_domain = "{TD}"\nbind_address = "nowhere"\n', [], "bind_address"),
        (f'trust_domain = "{TD}"\ndefault_x509_svid_ttl = "48h"\n', [], "default_x509_svid_ttl"),
        (f'trust_domain = "{TD}"\n', ["--trust-domain", "Bad_TD!"], "trust_domain"),
        (f'trust_domain = "{TD}"\n', ["--data-dir", "/proc/version/sub"], "data_dir"),
        (f'trust_domain = "{TD}"\n', ["--upstream-authority-cert", "/nonexistent.pem"], "upstream_authority"),
    ],
)
def test_bad_configuration_stops_start_up_with_one_line(
    tmp_path: Path, toml: str, flags: list[str], needle: str
) -> None:
    sock_dir = free_socket_dir()
    config = tmp_path / "bad.toml"
    config.write_text(f'[server]\n{toml}socket = "{sock_dir}/a.sock"\n')
    if "--data-dir" not in flags:
        flags = [*flags, "--data-dir", str(tmp_path / "data")]
    if "bind_address" not in toml:
        flags = [*flags, "--bind-address", "127.0.0.1:0"]
    try:
        result = subprocess.run(
            [str(BIN), "run", "--config", str(config), *flags], capture_output=True, text=True, timeout=60
        )
    finally:
        cleanup(sock_dir)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("tessera-server:")]
    assert len(errors) == 1 and needle in errors[0], result.stderr


def test_python_dash_m_is_the_same_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tessera.server", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "healthcheck" in result.stdout
    assert os.access(BIN, os.X_OK)


def test_the_example_deployment_config_is_accepted() -> None:
    from tessera.sdk.config import load_settings
    from tessera.server.config import SETTINGS, build_config

    example = Path(__file__).resolve().parents[2] / "deploy" / "config" / "server.toml"
    config = build_config(load_settings("server", SETTINGS, example, {}))
    assert config.bind_port == 8081 and config.dns_names[0] == "tessera-server.example.org"


SOFTHSM = next((p for p in ("/usr/lib/softhsm/libsofthsm2.so",) if Path(p).exists()), None)


@pytest.mark.skipif(SOFTHSM is None or shutil.which("softhsm2-util") is None, reason="SoftHSM2 is not installed")
def test_ca_keys_on_a_pkcs11_token(tmp_path: Path) -> None:
    """key_manager = pkcs11: the daemon signs with keys that live on the token; none lands in the data dir."""
    conf = tmp_path / "softhsm2.conf"
    (tmp_path / "tokens").mkdir()
    conf.write_text(f"directories.tokendir = {tmp_path / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    env = {**os.environ, "SOFTHSM2_CONF": str(conf), "TESSERA_TEST_PIN": "2468-pin"}
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", "srv", "--pin", "2468-pin", "--so-pin", "1357-so"],
        check=True, capture_output=True, env=env, timeout=60,
    )  # fmt: skip
    sock_dir = free_socket_dir()
    config = tmp_path / "hsm.toml"
    config.write_text(
        f'[server]\ntrust_domain = "{TD}"\ndata_dir = "{tmp_path / "data"}"\nbind_address = "127.0.0.1:0"\n'
        f'socket = "{sock_dir}/a.sock"\nkey_manager = "pkcs11"\npkcs11_module = "{SOFTHSM}"\n'
        f'pkcs11_token_label = "srv"\npkcs11_pin = "env:TESSERA_TEST_PIN"\n'
    )
    d = start_daemon(config, env=env)
    try:
        slots = json.loads(d.admin("ca", "show", "--output", "json").stdout)
        assert {(s["kind"], s["state"]) for s in slots} == {("x509", "active"), ("jwt", "active")}
        assert X509Bundle.parse_pem(TD, d.admin("bundle", "show").stdout.encode())
        data_files = [p for p in (tmp_path / "data").rglob("*") if p.is_file()]
        assert not [p for p in data_files if b"PRIVATE KEY" in p.read_bytes()]
        assert "2468-pin" not in "".join(d.lines)
    finally:
        d.process.send_signal(signal.SIGTERM)
        d.process.wait(30)
        cleanup(sock_dir)
