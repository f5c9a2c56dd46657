"""End to end: a real tessera-server process and a real tessera-agent process.

One server and one agent are shared by the tests of this module (they run in file order); the last tests
stop and restart them (server outage, agent restart).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from agent_testlib import socket_dir
from support.procs import (
    FETCH_SCRIPT,
    NOBODY,
    SYSTEM_PYTHON,
    TesseraAgent,
    TesseraServer,
    run_as,
    tessera,
    wait_for,
)

from tessera.proto import workload_pb2 as wpb
from tessera.sdk.svid import parse_der_certificates
from tessera.sdk.workloadapi.wire import SECURITY_METADATA, WorkloadApiStub

pytestmark = pytest.mark.slow

TD = "example.org"
AGENT_ID = f"spiffe://{TD}/host/e2e"
VENV_PYTHON = os.path.realpath(sys.executable)


class Env:
    """The shared server and agent; the agent is (re)created by start_agent()."""

    def __init__(self, root: Path, sockets: str) -> None:
        self.root = root
        self.socket = f"{sockets}/public/api.sock"
        self.server = TesseraServer(
            TD, data_dir=root / "server", admin_socket=f"{sockets}/admin/api.sock", log=root / "server.log"
        )
        self.port = self.server.port
        self.admin = self.server.admin_socket
        self.agent: TesseraAgent | None = None

    def admin_cmd(self, *args: str) -> str:
        return self.server.admin(*args)

    def agent_cmd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return tessera("tessera.agent", *args, sock=self.socket, check=check)

    def start_server(self) -> None:
        self.server.start()
        self.server.wait_healthy()

    def start_agent(self, *extra: str) -> None:
        self.agent = TesseraAgent(
            TD, servers=self.server.address, trust_bundle=self.root / "bundle.pem", data_dir=self.root / "agent",
            socket=self.socket, log=self.root / "agent.log", extra=extra,
        )  # fmt: skip
        self.agent.start()
        self.agent.wait_healthy()

    def entry(self, path: str, *selectors: str, ttl: str | None = None) -> str:
        args = ["entry", "create", "--spiffe-id", f"spiffe://{TD}{path}", "--parent-id", AGENT_ID]
        for s in selectors:
            args += ["--selector", s]
        if ttl:
            args += ["--x509-svid-ttl", ttl]
        return self.admin_cmd(*args).splitlines()[-1].strip()


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    root = Path(socket_dir())
    e = Env(root, str(root))
    try:
        e.start_server()
        e.server.write_bundle(root / "bundle.pem")
        token = e.server.join_token(AGENT_ID)
        e.entry("/root", "unix:uid:0")
        e.entry("/nobody", f"unix:uid:{NOBODY}")
        sys_digest = hashlib.sha256(Path(SYSTEM_PYTHON).read_bytes()).hexdigest()
        e.entry("/by-digest", "unix:uid:0", f"unix:sha256:{sys_digest}")
        e.entry("/by-path", "unix:uid:0", f"unix:path:{VENV_PYTHON}")
        e.start_agent("--join-token", token)
        yield e
    finally:
        if e.agent is not None:
            e.agent.stop()
        e.server.stop()
        if os.environ.get("TESSERA_KEEP_E2E"):
            print("e2e logs in", root)
        else:
            shutil.rmtree(root, ignore_errors=True)


def ids_for(env: Env, uid: int, python: str = SYSTEM_PYTHON) -> set[str]:
    out = run_as(uid, FETCH_SCRIPT, env.socket, python=python)
    if out.startswith("ERR"):
        return {out}
    return set(out[3:].split(","))


def test_uid_selectors_serve_the_right_process(env: Env) -> None:
    nobody = ids_for(env, NOBODY)
    assert nobody == {f"spiffe://{TD}/nobody"}
    root = ids_for(env, 0)
    assert f"spiffe://{TD}/root" in root and f"spiffe://{TD}/nobody" not in root


def test_uid_without_entry_is_refused(env: Env) -> None:
    assert ids_for(env, 4242) == {"ERR PERMISSION_DENIED"}


def test_binary_selectors(env: Env) -> None:
    system = ids_for(env, 0, python=SYSTEM_PYTHON)
    venv = ids_for(env, 0, python=VENV_PYTHON)
    assert f"spiffe://{TD}/by-digest" in system and f"spiffe://{TD}/by-path" not in system
    assert f"spiffe://{TD}/by-path" in venv and f"spiffe://{TD}/by-digest" not in venv


def test_cli_fetch_write_and_jwt(env: Env, tmp_path: Path) -> None:
    out = env.agent_cmd("api", "fetch", "x509", "--write", str(tmp_path)).stdout
    assert f"spiffe://{TD}/root" in out and "Serial:" in out and "Valid until:" in out
    assert (tmp_path / "svid.0.key").stat().st_mode & 0o777 == 0o600
    assert b"BEGIN CERTIFICATE" in (tmp_path / "bundle.0.pem").read_bytes()
    token = env.agent_cmd("api", "fetch", "jwt", "--audience", "svc", "--spiffe-id", f"spiffe://{TD}/root").stdout
    jwt = token.splitlines()[1].strip()
    valid = env.agent_cmd("api", "validate", "jwt", "--audience", "svc", "--svid", jwt).stdout
    assert f"SPIFFE ID : spiffe://{TD}/root" in valid
    bad = env.agent_cmd("api", "validate", "jwt", "--audience", "other", "--svid", jwt, check=False)
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr


def test_pyspiffe_client_interop(env: Env) -> None:
    from spiffe import JwtSvid, WorkloadApiClient

    client = WorkloadApiClient(socket_path="unix://" + env.socket)
    try:
        svid = client.fetch_x509_svid(timeout=20)
        ours = {f"spiffe://{TD}/root", f"spiffe://{TD}/by-path"}
        assert str(svid.spiffe_id) in ours
        ctx = client.fetch_x509_context(timeout=20)
        assert {str(s.spiffe_id) for s in ctx.x509_svids} >= ours
        bundles = client.fetch_x509_bundles(timeout=20)
        assert bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain) is not None
        jwt_svid = client.fetch_jwt_svid(audience={"interop"}, subject=svid.spiffe_id, timeout=20)
        assert str(jwt_svid.spiffe_id) == str(svid.spiffe_id)
        validated = client.validate_jwt_svid(jwt_svid.token, "interop", timeout=20)
        assert str(validated.spiffe_id) == str(svid.spiffe_id)
        jwt_bundles = client.fetch_jwt_bundles(timeout=20)
        jwt_bundle = jwt_bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
        assert jwt_bundle is not None
        # the standard library also validates the token offline against the JWT bundle we served
        assert str(JwtSvid.parse_and_validate(jwt_svid.token, jwt_bundle, {"interop"}).spiffe_id) == str(svid.spiffe_id)
    finally:
        client.close()


def test_rotation_reaches_watchers_before_expiry_without_reconnecting(env: Env) -> None:
    """A 60 s SVID (the server's minimum) rotates at about half life; one stream and one X509Source see it."""
    from spiffe import X509Source

    env.entry("/short", "unix:uid:0", "unix:gid:0", ttl="60s")
    target = f"spiffe://{TD}/short"

    def pick(svids: list[Any]) -> Any:
        for s in svids:
            if str(s.spiffe_id) == target:
                return s
        return svids[0]

    seen: list[tuple[str, float]] = []  # (serial, not_after) of /short, as one stream delivers them
    errors: list[BaseException] = []
    channel = grpc.insecure_channel("unix:" + env.socket)
    call = WorkloadApiStub(channel).FetchX509SVID(wpb.X509SVIDRequest(), metadata=SECURITY_METADATA)

    def watch() -> None:
        try:
            for message in call:
                for s in message.svids:
                    if s.spiffe_id == target:
                        leaf = parse_der_certificates(s.x509_svid)[0]
                        item = (format(leaf.serial_number, "x"), leaf.not_valid_after_utc.timestamp())
                        if not seen or seen[-1] != item:
                            seen.append((item[0], time.time()))
                            seen.append(item)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                errors.append(exc)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    source = X509Source(socket_path="unix://" + env.socket, timeout_in_seconds=30, svid_picker=pick)
    try:
        wait_for(lambda: len(seen) >= 2, 60, "first /short SVID")
        first_serial, first_not_after = seen[1]
        def current() -> Any:
            return pick(source.get_x509_context().x509_svids)

        source_first = wait_for(lambda: str(current().spiffe_id) == target and current().leaf.serial_number, 60)
        wait_for(lambda: len(seen) >= 4, 90, "rotated /short SVID on the same stream")
        rotated_serial, received_at = seen[2]
        assert rotated_serial != first_serial
        assert received_at < first_not_after, "the rotated SVID must arrive before the old one expires"
        wait_for(lambda: current().leaf.serial_number != source_first, 60, "X509Source update")
        assert not errors, errors
    finally:
        call.cancel()
        channel.close()
        source.close()
        thread.join(10)


def test_server_outage_cached_svids_then_resume(env: Env) -> None:
    env.server.stop()
    out = env.agent_cmd("api", "fetch", "x509").stdout
    assert f"spiffe://{TD}/root" in out
    assert ids_for(env, NOBODY) == {f"spiffe://{TD}/nobody"}
    env.start_server()
    # a new entry made after the restart reaches the agent: sync resumed with the stored identity
    env.entry("/after-outage", f"unix:uid:{NOBODY}", "unix:gid:65534")
    wait_for(lambda: f"spiffe://{TD}/after-outage" in ids_for(env, NOBODY), 60, "sync after outage")
    assert env.agent is not None and env.agent.alive()


def test_agent_restart_reuses_its_stored_identity(env: Env) -> None:
    assert env.agent is not None
    env.agent.stop()
    assert oct((env.root / "agent" / "agent.pem").stat().st_mode & 0o777) == "0o600"
    env.start_agent()  # no join token: the stored SVID is enough
    assert "reusing stored agent SVID" in env.agent.output()
    assert ids_for(env, NOBODY) >= {f"spiffe://{TD}/nobody", f"spiffe://{TD}/after-outage"}
