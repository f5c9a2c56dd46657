"""End to end: two trust domains, each with its own tessera-server and tessera-agent processes.

In file order, on one pair of domains: mutual TLS across a.test and b.test through federation (refused once the
relationship is removed), the compromise drill (prepare, activate, taint, revoke the old CA with traffic
flowing), and revocation of a single live X509-SVID (refused by SDK servers, then re-issued and accepted).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from federation_testlib import SYNC_INTERVAL, Domain, call, client, domains, issuer_key_id, serve
from support.procs import PY, Daemon, free_port, wait_for

from tessera.sdk.bundle import BundleSet
from tessera.sdk.errors import TesseraError
from tessera.sdk.source import JwtSource, StaticX509Source, X509Source
from tessera.sdk.spiffeid import TrustDomain
from tessera.sdk.svid import X509Svid
from tessera.sdk.tls import authorize_id

pytestmark = pytest.mark.slow

A, B = "a.test", "b.test"


@pytest.fixture(scope="module")
def env() -> Iterator[tuple[Domain, Domain]]:
    with domains(A, B) as (a, b):
        yield a, b


def has_bundle(source: X509Source, td: str) -> bool:
    return source.bundles.get(TrustDomain(td)) is not None


def federate(local: Domain, foreign: Domain) -> None:
    bootstrap = local.root / f"{foreign.td}.bundle.json"
    bootstrap.write_text(foreign.admin("bundle", "show", "--format", "spiffe"))
    local.admin(
        "federation", "create", "--trust-domain", foreign.td, "--bundle-endpoint-url", foreign.endpoint_url,
        "--profile", "https_spiffe", "--endpoint-spiffe-id", foreign.endpoint_id, "--bundle-file", str(bootstrap),
    )  # fmt: skip

    def fetched() -> bool:
        shown = json.loads(local.admin("federation", "show", "--trust-domain", foreign.td, "--output", "json"))
        assert shown["last_error"] == "", shown["last_error"]
        return bool(shown["last_refresh"] and shown["has_bundle"])

    wait_for(fetched, what=f"{local.td} to fetch {foreign.td}'s bundle from its endpoint")


def test_mutual_tls_across_trust_domains_until_the_relationship_is_removed(env: tuple[Domain, Domain]) -> None:
    a, b = env
    a.entry("/web", federates_with=(B,))
    b.entry("/client", federates_with=(A,))
    federate(a, b)
    federate(b, a)
    web, cli = a.source("/web"), b.source("/client")
    try:
        wait_for(lambda: has_bundle(web, B) and has_bundle(cli, A), what="federated bundles at the workloads")
        server = serve(web, authorize_id(f"spiffe://{B}/client"))
        context = client(cli, authorize_id(f"spiffe://{A}/web"))
        assert call(server.port, context) == f"ok spiffe://{B}/client ping"
        # JWT too: a b.test JWT-SVID validates at the a.test workload with the federated JWT bundle.
        with JwtSource(address=a.address) as a_jwt, JwtSource(address=b.address) as b_jwt:
            wait_for(lambda: a_jwt.bundles.get(TrustDomain(B)) is not None, what="federated JWT bundle")
            token = b_jwt.fetch_jwt_svid(f"spiffe://{A}/web", spiffe_id=f"spiffe://{B}/client")
            assert str(a_jwt.validate(token.token, f"spiffe://{A}/web").spiffe_id) == f"spiffe://{B}/client"

        a.admin("federation", "delete", "--trust-domain", B)
        wait_for(lambda: not has_bundle(web, B), what="a.test workloads to drop b.test's bundle")
        with pytest.raises((ssl.SSLError, OSError, ConnectionError)):
            call(server.port, context)
        wait_for(lambda: server.refused, what="the a.test server to record refusing the b.test client")
        server.close()
    finally:
        web.close()
        cli.close()


def test_admin_commands_refuse_bad_requests_with_one_line(env: tuple[Domain, Domain]) -> None:
    a, b = env
    # Updating an https_spiffe relationship needs no bundle file while a bundle is held.
    updated = json.loads(
        b.admin(
            "federation", "update", "--trust-domain", A, "--bundle-endpoint-url", a.endpoint_url,
            "--profile", "https_spiffe", "--endpoint-spiffe-id", a.endpoint_id, "--output", "json",
        )
    )  # fmt: skip
    assert updated["has_bundle"] and updated["last_error"] == ""

    def refused(*args: str) -> str:
        out = a.admin_cmd(*args, check=False)
        assert out.returncode == 1, out
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1, out.stderr
        return lines[0]

    assert "https://" in refused(
        "federation", "create", "--trust-domain", "c.test", "--bundle-endpoint-url", "http://127.0.0.1:1/"
    )
    assert "needs the foreign trust domain's bundle" in refused(
        "federation", "create", "--trust-domain", "c.test", "--bundle-endpoint-url", "https://127.0.0.1:1/",
        "--profile", "https_spiffe", "--endpoint-spiffe-id", "spiffe://c.test/tessera/server",
    )  # fmt: skip
    assert "own trust domain" in refused(
        "federation", "create", "--trust-domain", A, "--bundle-endpoint-url", "https://127.0.0.1:1/"
    )
    assert "not_found" in refused("federation", "show", "--trust-domain", "nowhere.test")
    active = _active_x509(a)
    assert "is active" in refused("ca", "taint", "--id", active)
    assert "is active" in refused("ca", "revoke", "--id", active)
    assert "not_found" in refused("ca", "taint", "--id", "00" * 20)
    assert "exactly one" in refused("x509", "revoke")
    assert "not hexadecimal" in refused("x509", "revoke", "--serial", "xyz")
    assert "not_found" in refused("x509", "revoke", "--serial", "abcdef")
    # An https_web relationship to an endpoint that is down: created, and `federation refresh` says why.
    a.admin(
        "federation", "create", "--trust-domain", "c.test", "--bundle-endpoint-url", f"https://127.0.0.1:{free_port()}/"
    )
    assert "cannot connect" in refused("federation", "refresh", "--trust-domain", "c.test")
    shown = json.loads(a.admin("federation", "show", "--output", "json"))
    assert [r["trust_domain"] for r in shown] == ["c.test"] and "cannot connect" in shown[0]["last_error"]
    a.admin("federation", "delete", "--trust-domain", "c.test")


def _active_x509(domain: Domain) -> str:
    slots = json.loads(domain.admin("ca", "show", "--output", "json"))
    return str(next(s["key_id"] for s in slots if s["kind"] == "x509" and s["state"] == "active"))


def test_compromise_drill_prepare_activate_taint_revoke_without_a_failed_request(env: tuple[Domain, Domain]) -> None:
    a, b = env
    a.entry("/api")
    web, api = a.source("/web"), a.source("/api")
    server = serve(web, authorize_id(f"spiffe://{A}/api"))
    context = client(api, authorize_id(f"spiffe://{A}/web"))
    failures: list[str] = []
    requests = [0]
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            try:
                call(server.port, context)
                requests[0] += 1
            except Exception as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
            time.sleep(0.02)

    worker = threading.Thread(target=traffic, daemon=True)
    worker.start()
    jwt_source = JwtSource(address=a.address)
    try:
        old = _active_x509(a)
        stolen = web.svid  # what an attacker holding the old CA's key could have minted, say
        assert issuer_key_id(stolen.leaf) == old
        old_kid = next(
            s["key_id"]
            for s in json.loads(a.admin("ca", "show", "--output", "json"))
            if s["kind"] == "jwt" and s["state"] == "active"
        )
        old_token = jwt_source.fetch_jwt_svid("drill", spiffe_id=f"spiffe://{A}/api").token
        a.admin("ca", "prepare")
        new = next(
            s["key_id"]
            for s in json.loads(a.admin("ca", "show", "--output", "json"))
            if s["kind"] == "x509" and s["state"] == "prepared"
        )

        # The prepared CA reaches every workload's bundle before it signs anything, and b.test's refresher
        # fetches it at the advertised refresh hint (2 s here) without being asked.
        def b_sees_both() -> bool:
            shown = json.loads(b.admin("federation", "show", "--trust-domain", A, "--output", "json"))
            return bool(shown["x509_authorities"] == 2)

        wait_for(b_sees_both, what="b.test to refresh a.test's bundle at its refresh hint")
        wait_for(
            lambda: all(len(s.bundles.get(TrustDomain(A)) or ()) >= 2 for s in (web, api)), what="new CA published"
        )
        a.admin("ca", "activate")
        a.admin("ca", "taint", "--id", old)
        tainted_at = time.monotonic()
        wait_for(
            lambda: all(issuer_key_id(s.svid.leaf) == new for s in (web, api)),
            what="every workload SVID re-issued by the new CA",
        )
        took = time.monotonic() - tainted_at
        print(f"workload SVIDs re-issued {took:.1f}s after the taint (sync interval {SYNC_INTERVAL:g}s)")
        assert took < 30  # "two sync intervals" on an idle machine; generous for a loaded one

        def revoked() -> bool:
            out = a.admin_cmd("ca", "revoke", "--id", old, check=False)
            assert out.returncode == 0 or "not been re-issued" in out.stderr, out.stderr
            return out.returncode == 0

        wait_for(revoked, what="the old CA to become revocable (agent SVID re-issued too)")
        slots = json.loads(a.admin("ca", "show", "--output", "json"))
        assert old not in [s["key_id"] for s in slots]
        wait_for(lambda: all(len(s.bundles.get(TrustDomain(A)) or ()) == 1 for s in (web, api)), what="old CA gone")
        # A chain from the old CA is refused by the SDK server context now.
        attacker = client(StaticX509Source(stolen, BundleSet([web.bundles.get(TrustDomain(A))])))  # type: ignore[list-item]
        with pytest.raises((ssl.SSLError, OSError, ConnectionError)):
            call(server.port, attacker)
        # The JWT key likewise: a JWT-SVID it minted is still valid, so revoking needs --force.
        a.admin("ca", "taint", "--kind", "jwt", "--id", old_kid)
        refused_jwt = a.admin_cmd("ca", "revoke", "--kind", "jwt", "--id", old_kid, check=False)
        assert refused_jwt.returncode == 1 and "wait until then or pass --force" in refused_jwt.stderr
        assert jwt_source.validate(old_token, "drill")
        a.admin("ca", "revoke", "--kind", "jwt", "--id", old_kid, "--force")
        wait_for(lambda: old_kid not in (jwt_source.bundles.get(TrustDomain(A)) or {}), what="old JWT key gone")
        with pytest.raises(TesseraError):
            jwt_source.validate(old_token, "drill")
        stop.set()
        worker.join(10)
        assert requests[0] > 0
        assert failures == [], failures[:5]
    finally:
        stop.set()
        jwt_source.close()
        server.close()
        web.close()
        api.close()


def test_revoked_svid_is_refused_at_the_next_handshake_and_reissued(env: tuple[Domain, Domain], tmp_path: Path) -> None:
    _, b = env
    b.entry("/svc")
    svc, cli = b.source("/svc"), b.source("/client")
    server = serve(svc, authorize_id(f"spiffe://{B}/client"))
    try:
        victim = cli.svid
        assert call(server.port, client(cli)).startswith("ok ")
        serial = format(victim.leaf.serial_number, "x")
        out = json.loads(b.admin("x509", "revoke", "--serial", serial, "--output", "json"))
        assert [r["serial"] for r in out] == [serial]
        revoked_at = time.monotonic()
        stale = client(StaticX509Source(victim, cli.bundles))

        def refused() -> bool:
            try:
                call(server.port, stale)
            except (ssl.SSLError, OSError, ConnectionError):
                return True
            return False

        wait_for(refused, what="the SDK server to refuse the revoked SVID")
        took = time.monotonic() - revoked_at
        print(f"revoked SVID refused {took:.1f}s after `x509 revoke` (sync interval {SYNC_INTERVAL:g}s)")
        wait_for(lambda: any("revoked" in r for r in server.refused), what="the refusal to name the revocation")
        # The agent re-issues the revoked SVID; the new one is accepted.
        wait_for(lambda: cli.svid.leaf.serial_number != victim.leaf.serial_number, what="re-issued client SVID")
        assert call(server.port, client(cli)) == f"ok spiffe://{B}/client ping"
        listed = json.loads(b.admin("x509", "revoked", "--output", "json"))
        assert serial in [r["serial"] for r in listed]

        # Revoking an agent: its own SVID and every SVID it obtained; it renews and re-issues them all.
        def agent_serial() -> str:
            return str(json.loads(b.admin("agent", "show", "--spiffe-id", b.agent_id, "--output", "json"))["serial"])

        old_agent = agent_serial()
        before = {id(s): s.svid.leaf.serial_number for s in (svc, cli)}
        revoked = json.loads(b.admin("x509", "revoke", "--agent", b.agent_id, "--output", "json"))
        assert old_agent in [r["serial"] for r in revoked] and len(revoked) >= 3
        wait_for(lambda: agent_serial() != old_agent, what="the agent to renew its revoked SVID")
        wait_for(
            lambda: all(s.svid.leaf.serial_number != before[id(s)] for s in (svc, cli)),
            what="every workload SVID of the agent re-issued",
        )
        assert call(server.port, client(cli)) == f"ok spiffe://{B}/client ping"
    finally:
        server.close()
        svc.close()
        cli.close()


NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)


def _nginx_conf(d: Path, port: int, certs: Path) -> str:
    return f"""
user root root;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate     {certs}/svid.pem;
        ssl_certificate_key {certs}/svid.key;
        ssl_client_certificate {certs}/bundle.pem;
        ssl_verify_client on;
        ssl_verify_depth 3;
        ssl_crl {certs}/crl.pem;
        location / {{ return 200 "ok $ssl_client_serial\\n"; }}
    }}
}}
"""


def _nginx_status(port: int, cert: Path, key: Path) -> int:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # this checks nginx's verdict on *our* certificate
    ctx.load_cert_chain(str(cert), str(key))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, ctx.wrap_socket(raw) as tls:
        tls.sendall(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
        head = tls.recv(100)
    return int(head.split(b" ")[1])


def _write_svid(svid: X509Svid, d: Path, name: str) -> tuple[Path, Path]:
    cert, key = d / f"{name}.pem", d / f"{name}.key"
    cert.write_bytes(svid.chain_pem())
    key.write_bytes(svid.key_pem())
    key.chmod(0o600)
    return cert, key


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed")
def test_nginx_with_the_helpers_crl_file_refuses_a_revoked_svid(env: tuple[Domain, Domain], tmp_path: Path) -> None:
    _, b = env
    assert NGINX is not None
    work = b.root / "nginx"
    certs = work / "certs"
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi", "certs"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    helper = [PY, "-m", "tessera.sdk.helper.cli", "--agent-address", b.address, "--cert-dir", str(certs),
              "--svid-file-name", "svid.pem", "--svid-key-file-name", "svid.key", "--svid-bundle-file-name",
              "bundle.pem", "--crl-file-name", "crl.pem"]  # fmt: skip
    once = subprocess.run([*helper, "--no-daemon-mode"], capture_output=True, text=True, timeout=60)
    assert once.returncode == 0, once.stderr
    assert (certs / "crl.pem").read_bytes().startswith(b"-----BEGIN X509 CRL-----")
    port = free_port()
    (work / "nginx.conf").write_text(_nginx_conf(work, port, certs))
    base = [NGINX, "-p", f"{work}/", "-c", str(work / "nginx.conf"), "-e", str(work / "error.log")]
    started = subprocess.run(base, capture_output=True, text=True, timeout=60)
    assert started.returncode == 0, started.stderr
    daemon = Daemon(
        "helper", [*helper, "--pid-file-name", str(work / "nginx.pid"), "--renew-signal", "SIGHUP"], work / "helper.log"
    )
    daemon.start()
    cli = b.source("/client")
    try:
        current = cli.svid
        cert, key = _write_svid(current, tmp_path, "client")
        wait_for(lambda: _nginx_status(port, cert, key) == 200, what="nginx to accept the client SVID")
        b.admin("x509", "revoke", "--serial", format(current.leaf.serial_number, "x"))
        # The helper rewrites crl.pem and sends nginx SIGHUP; nginx then answers 400 to the revoked certificate.
        wait_for(lambda: _nginx_status(port, cert, key) == 400, what="nginx to refuse the revoked SVID")
        wait_for(lambda: cli.svid.leaf.serial_number != current.leaf.serial_number, what="re-issued client SVID")
        fresh_cert, fresh_key = _write_svid(cli.svid, tmp_path, "fresh")
        assert _nginx_status(port, fresh_cert, fresh_key) == 200
    finally:
        cli.close()
        daemon.stop()
        subprocess.run([*base, "-s", "stop"], capture_output=True, timeout=30)
