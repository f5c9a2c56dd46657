"""tessera-helper: files openssl accepts, modes, atomic rewrites on rotation, signalling a process, JWT files,
one-shot and daemon modes, configuration errors."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sdk_rt_fakeagent import FakeAgent, wait_for

from tessera.sdk.config import ConfigError
from tessera.sdk.helper.cli import main
from tessera.sdk.helper.config import load_config
from tessera.sdk.jwtsvid import JwtSvid, mint_jwt_svid
from tessera.sdk.svid import parse_pem_certificates
from tessera.sdk.testing import TestCA

WEB = "spiffe://example.org/web"
PY = sys.executable

COUNTER = textwrap.dedent(
    """
    import os, signal, sys, time
    out = sys.argv[1]
    counts = {"HUP": 0, "USR1": 0}
    def save():
        with open(out + ".tmp", "w") as fh:
            fh.write(f"{counts['HUP']} {counts['USR1']}")
        os.replace(out + ".tmp", out)
    def on(sig, frame):
        counts["HUP" if sig == signal.SIGHUP else "USR1"] += 1
        save()
    signal.signal(signal.SIGHUP, on)
    signal.signal(signal.SIGUSR1, on)
    if len(sys.argv) > 2:
        with open(sys.argv[2], "w") as fh:
            fh.write(str(os.getpid()))
    save()
    while True:
        time.sleep(0.05)
    """
)


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA("example.org")


@pytest.fixture
def agent(ca: TestCA) -> Iterator[FakeAgent]:
    fake = FakeAgent()
    fake.set_x509([ca.issue_svid(WEB)], [ca.x509_bundle(), TestCA("partner.org").x509_bundle()])

    def mint(spiffe_id: str, audiences: Any) -> str:
        now = dt.datetime.now(dt.UTC)
        return mint_jwt_svid(ca.jwt_key, ca.jwt_kid, spiffe_id, audiences, now + dt.timedelta(minutes=5), now)

    fake.set_jwt([ca.jwt_bundle()], mint=mint)
    fake.start()
    yield fake
    fake.stop()


def _openssl_verify(d: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "verify", "-CAfile", str(d / "bundle.pem"), *extra, str(d / "svid.pem")],
        capture_output=True, text=True, check=False,
    )


def _counts(path: Path) -> tuple[int, int]:
    try:
        hup, usr1 = path.read_text().split()
    except (OSError, ValueError):
        return (-1, -1)
    return int(hup), int(usr1)


def test_one_shot_writes_files_openssl_accepts(agent: FakeAgent, tmp_path: Path, ca: TestCA) -> None:
    certs = tmp_path / "certs"
    old = os.umask(0o077)  # the configured modes win over the umask
    try:
        rc = main([
            "--agent-address", agent.address, "--cert-dir", str(certs), "--no-daemon-mode",
            "--svid-file-name", "svid.pem", "--svid-key-file-name", "key.pem", "--svid-bundle-file-name", "bundle.pem",
            "--jwt-svids", "db=db.jwt", "--jwt-bundle-file-name", "jwt_bundle.json",
        ])
    finally:
        os.umask(old)
    assert rc == 0
    check = _openssl_verify(certs)
    assert check.returncode == 0, check.stdout + check.stderr
    assert stat.S_IMODE((certs / "key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((certs / "svid.pem").stat().st_mode) == 0o644
    assert stat.S_IMODE((certs / "bundle.pem").stat().st_mode) == 0o644
    assert len(parse_pem_certificates((certs / "bundle.pem").read_bytes())) == 1  # no federated CAs by default
    token = (certs / "db.jwt").read_text()
    assert JwtSvid.parse_and_validate(token, ca.jwt_bundle(), "db").spiffe_id.path == "/web"
    assert stat.S_IMODE((certs / "db.jwt").stat().st_mode) == 0o600
    jwks = json.loads((certs / "jwt_bundle.json").read_text())
    assert list(jwks) == ["spiffe://example.org"] and jwks["spiffe://example.org"]["keys"][0]["kid"] == ca.jwt_kid
    assert not [p for p in certs.iterdir() if p.name.startswith(".tessera-")]  # no temp files left behind


def test_cert_dir_is_made_0755_under_any_umask_and_another_users_is_refused(
    agent: FakeAgent, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--agent-address", agent.address, "--no-daemon-mode"]
    old = os.umask(0)
    try:
        assert main([*args, "--cert-dir", str(tmp_path / "certs")]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "certs").stat().st_mode) == 0o755
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    assert main([*args, "--cert-dir", str(theirs), "--timeout", "5s"]) != 0
    assert "owned by uid 65534 (nobody)" in capsys.readouterr().err
    assert list(theirs.iterdir()) == []  # no key written into it


def test_one_shot_with_intermediate_and_federation(agent: FakeAgent, tmp_path: Path, ca: TestCA) -> None:
    inter = ca.issue_intermediate()
    agent.set_x509([inter.issue_svid(WEB)], [ca.x509_bundle(), TestCA("partner.org").x509_bundle()])
    config = tmp_path / "helper.toml"
    config.write_text(textwrap.dedent(f"""
        [helper]
        agent_address = "{agent.address}"
        cert_dir = "{tmp_path / 'out'}"
        svid_file_name = "svid.pem"
        svid_key_file_name = "svid.key"
        svid_bundle_file_name = "bundle.pem"
        include_federated_domains = true
        daemon_mode = false
        cert_file_mode = 0o640
        key_file_mode = "0400"
    """))
    assert main(["--config", str(config)]) == 0
    out = tmp_path / "out"
    assert len(parse_pem_certificates((out / "svid.pem").read_bytes())) == 2
    assert len(parse_pem_certificates((out / "bundle.pem").read_bytes())) == 2
    check = _openssl_verify(out, "-untrusted", str(out / "svid.pem"))
    assert check.returncode == 0, check.stdout + check.stderr
    assert stat.S_IMODE((out / "svid.key").stat().st_mode) == 0o400
    assert stat.S_IMODE((out / "svid.pem").stat().st_mode) == 0o640


def test_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[helper]\ncert_dir = "/tmp/x"\nsvid_fil_name = "a"\n')
    assert main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "svid_fil_name" in err
    with pytest.raises(ConfigError, match="cert_dir"):
        load_config([])
    with pytest.raises(ConfigError, match="renew_signal"):
        load_config(["--cert-dir", "/tmp/x", "--pid-file-name", "/tmp/pid"])
    with pytest.raises(ConfigError, match="SIGNOPE"):
        load_config(["--cert-dir", "/tmp/x", "--renew-signal", "SIGNOPE"])
    with pytest.raises(ConfigError, match="octal"):
        load_config(["--cert-dir", "/tmp/x", "--key-file-mode", "rw"])
    with pytest.raises(ConfigError, match="plain file name"):
        load_config(["--cert-dir", "/tmp/x", "--svid-file-name", "../escape.pem"])
    top = tmp_path / "top.toml"  # top-level keys work too; flags override the file
    top.write_text('cert_dir = "/tmp/a"\nrenew_signal = "HUP"\ndaemon_mode = false\n'
                   'jwt_svids = [{jwt_audience = "x", jwt_svid_file_name = "x.jwt"}]\n')
    cfg = load_config(["--config", str(top), "--cert-dir", "/tmp/b"], environ={"SPIFFE_ENDPOINT_SOCKET": "unix:/s"})
    assert cfg.cert_dir == "/tmp/b" and cfg.renew_signal == signal.SIGHUP and not cfg.daemon_mode
    assert cfg.agent_address == "unix:/s" and cfg.jwt_svids[0].file_name == "x.jwt"


def _helper(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([PY, "-m", "tessera.sdk.helper.cli", *args], stderr=subprocess.PIPE)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0


def test_daemon_rewrites_on_rotation_and_signals_cmd(agent: FakeAgent, ca: TestCA) -> None:
    work = Path(tempfile.mkdtemp(prefix="trt-helper-"))
    script = work / "counter.py"
    script.write_text(COUNTER)
    counts = work / "counts"
    helper = _helper([
        "--agent-address", agent.address, "--cert-dir", str(work / "certs"), "--svid-file-name", "svid.pem",
        "--svid-bundle-file-name", "bundle.pem", "--cmd", PY, "--cmd-args", f"{script} {counts}",
        "--renew-signal", "SIGHUP",
    ])
    try:
        wait_for(lambda: _counts(counts) == (0, 0), what="cmd started after the first write")
        first = (work / "certs" / "svid.pem").read_bytes()
        for n in (1, 2):
            agent.set_x509([ca.issue_svid(WEB)], [ca.x509_bundle()])
            wait_for(lambda n=n: _counts(counts) == (n, 0), what=f"SIGHUP #{n}")  # type: ignore[misc]
            assert _openssl_verify(work / "certs").returncode == 0
        assert (work / "certs" / "svid.pem").read_bytes() != first
    finally:
        _stop(helper)
    # The helper stops its cmd when it stops.
    wait_for(lambda: subprocess.run(["pgrep", "-f", str(script)], capture_output=True).returncode != 0,
             what="cmd terminated")


def test_daemon_signals_pid_file_process(agent: FakeAgent, ca: TestCA) -> None:
    work = Path(tempfile.mkdtemp(prefix="trt-helper-"))
    script = work / "counter.py"
    script.write_text(COUNTER)
    counts, pid_file = work / "counts", work / "app.pid"
    app = subprocess.Popen([PY, str(script), str(counts), str(pid_file)])
    helper = None
    try:
        wait_for(lambda: _counts(counts) == (0, 0) and pid_file.exists(), what="app ready")
        helper = _helper([
            "--agent-address", agent.address, "--cert-dir", str(work / "certs"),
            "--pid-file-name", str(pid_file), "--renew-signal", "SIGUSR1",
        ])
        wait_for(lambda: _counts(counts) == (0, 1), what="signal after the first write")
        agent.set_x509([ca.issue_svid(WEB)], [ca.x509_bundle()])
        wait_for(lambda: _counts(counts) == (0, 2), what="signal after rotation")
    finally:
        if helper is not None:
            _stop(helper)
        app.kill()
        app.wait()


def test_daemon_reports_unreachable_agent(tmp_path: Path) -> None:
    helper = _helper([
        "--agent-address", "unix:///tmp/nonexistent-trt/api.sock", "--cert-dir", str(tmp_path), "--timeout", "1s",
    ])
    assert helper.wait(30) == 1
    assert helper.stderr is not None
    err = helper.stderr.read().decode()
    assert "no X509-SVID from unix:///tmp/nonexistent-trt/api.sock within 1s" in err
