"""Mutual TLS with software nobody here wrote, fed by a real agent: nginx and Apache httpd configured from
deploy/nginx and deploy/apache (paths and ports substituted), files written by tessera-helper with the
deploy/config helper configs, curl and openssl s_client as clients; and openssl s_client against a server
built on the Tessera SDK. After a real SVID rotation the helper rewrites the files, nginx and Apache reload
and serve the new certificate, and no request fails meanwhile.
"""

from __future__ import annotations

import base64
import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
from cryptography import x509
from quickstart_support import ROOT, TesseraEnv, processes_mentioning, require_binaries
from support.procs import PY, Daemon, as_user, free_port, short_dir, wait_for
from support.web import QuietHandler

from tessera.sdk.http import SpiffeHTTPServer, peer_spiffe_id
from tessera.sdk.source import X509Source
from tessera.sdk.svid import parse_pem_certificates, spiffe_id_from_certificate
from tessera.sdk.tls import authorize_id

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

TD = "web.test"
WEB_ID = f"spiffe://{TD}/web"
CLIENT_ID = f"spiffe://{TD}/client"
CLIENT_GID = 1
HELPER = str(Path(PY).parent / "tessera-helper")
APACHE_MODULES = "/usr/lib/apache2/modules"  # Debian's layout, as scripts/system-deps.sh installs it
PEM = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def cert_from_header(value: str) -> x509.Certificate:
    """The client certificate a proxy passed on: URL-encoded PEM (nginx) or PEM with its line breaks turned
    into spaces (Apache)."""
    text = urllib.parse.unquote(value)
    body = text.replace("-----BEGIN CERTIFICATE-----", "").replace("-----END CERTIFICATE-----", "")
    return x509.load_der_x509_certificate(base64.b64decode("".join(body.split())))


class Backend(QuietHandler):
    """What sits behind nginx/Apache: reads the caller's SPIFFE ID from the certificate the proxy passed."""

    def do_GET(self) -> None:
        header = self.headers.get("X-Client-Cert", "")
        caller = str(spiffe_id_from_certificate(cert_from_header(header))) if header.strip() else ""
        body = json.dumps({"verify": self.headers.get("X-Client-Verify", ""), "spiffe_id": caller}).encode()
        self.reply(body)


class Whoami(QuietHandler):
    """A handler on the Tessera SDK's server: the caller's ID comes from the TLS connection itself."""

    def do_GET(self) -> None:
        body = f"hello {peer_spiffe_id(self.request)}\n".encode()
        self.reply(body)


@dataclass
class Site:
    name: str
    port: int
    dir: Path
    svid_dir: Path
    reload: list[str]
    stop: list[str]
    pid_file: Path
    helper: Daemon | None = None

    @property
    def served_file_serial(self) -> int:
        return parse_pem_certificates((self.svid_dir / "svid.pem").read_bytes())[0].serial_number


@dataclass
class Web:
    root: Path
    env: TesseraEnv
    bins: dict[str, str]
    client: Path
    nginx: Site
    apache: Site
    sdk_port: int
    closers: list[Any] = field(default_factory=list)

    def curl(self, site: Site, *extra: str, client: bool = True, path: str = "/hello") -> tuple[int, str, str]:
        auth = ["--cert", str(self.client / "svid.0.pem"), "--key", str(self.client / "svid.0.key")] if client else []
        out = subprocess.run(
            [self.bins["curl"], "-sS", "--max-time", "20", "--resolve", f"localhost:{site.port}:127.0.0.1",
             "--cacert", str(self.client / "bundle.0.pem"), *auth, *extra, "-w", "\n%{http_code}",
             f"https://localhost:{site.port}{path}"],
            capture_output=True, text=True, timeout=60, check=False,
        )
        body, _, code = out.stdout.rpartition("\n")
        return int(code or 0), body, out.stderr

    def s_client(self, port: int, *, client: bool = True, send: bytes = b"") -> str:
        auth = ["-cert", str(self.client / "svid.0.pem"), "-key", str(self.client / "svid.0.key")] if client else []
        out = subprocess.run(
            [self.bins["openssl"], "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
             "-CAfile", str(self.client / "bundle.0.pem"), *auth,
             # With a request to send, read the answer until the server closes; else quit at once.
             *(["-ign_eof"] if send else [])],
            input=send, capture_output=True, timeout=60, check=False,
        )
        return (out.stdout + out.stderr).decode(errors="replace")

    def served_serial(self, site: Site) -> int:
        """The serial of the certificate the server presents, as openssl s_client receives it."""
        text = self.s_client(site.port)
        match = PEM.search(text.encode())
        assert match, text
        return x509.load_pem_x509_certificate(match.group(0)).serial_number


def nginx_conf(site: Site, backend_port: int) -> str:
    server_block = (ROOT / "deploy" / "nginx" / "tessera-mtls.conf").read_text()
    server_block = (
        server_block.replace("/etc/nginx/svid/", f"{site.svid_dir}/")
        .replace("listen 8443 ssl;", f"listen 127.0.0.1:{site.port} ssl;")
        .replace("api.example.org", "localhost")
        .replace("http://127.0.0.1:8080", f"http://127.0.0.1:{backend_port}")
    )
    assert str(site.svid_dir) in server_block and str(site.port) in server_block and str(backend_port) in server_block
    d = site.dir
    return f"""
user nobody nogroup;
worker_processes 1;
pid {site.pid_file};
error_log {d}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
{server_block}
}}
"""


def apache_conf(site: Site, backend_port: int) -> str:
    vhost = (ROOT / "deploy" / "apache" / "tessera-mtls.conf").read_text()
    vhost = (
        vhost.replace("/etc/apache2/svid/", f"{site.svid_dir}/")
        .replace("Listen 8443", f"Listen 127.0.0.1:{site.port}")
        .replace("*:8443", f"*:{site.port}")
        .replace("api.example.org", "localhost")
        .replace("spiffe://example.org/frontend", CLIENT_ID)
        .replace("http://127.0.0.1:8080/", f"http://127.0.0.1:{backend_port}/")
    )
    assert CLIENT_ID in vhost and str(backend_port) in vhost and str(site.svid_dir) in vhost
    modules = "\n".join(
        f"LoadModule {name}_module {APACHE_MODULES}/mod_{name}.so"
        for name in ("mpm_event", "authz_core", "ssl", "headers", "proxy", "proxy_http")
    )
    d = site.dir
    return f"""
ServerRoot {d}
ServerName localhost
PidFile {site.pid_file}
ErrorLog {d}/error.log
LogLevel info
{modules}
User nobody
Group nogroup
Mutex file:{d}
DefaultRuntimeDir {d}
SSLSessionCache none
{vhost}
"""


def start_helper(web_root: Path, env: TesseraEnv, site: Site, config: str) -> None:
    base = [HELPER, "--config", str(ROOT / "deploy" / "config" / config),
            "--agent-address", f"unix://{env.socket}", "--cert-dir", str(site.svid_dir)]
    # Once (daemon_mode = false) for the files the web server needs to start at all...
    once = subprocess.run([*base, "--no-daemon-mode", "--cmd", ""], capture_output=True, text=True, timeout=60)
    assert once.returncode == 0, once.stderr
    # ...then for good: rewrite on every rotation and make the server reload.
    site.helper = env.add(Daemon(
        f"helper-{site.name}",
        [*base, "--cmd", site.reload[0], "--cmd-args", " ".join(site.reload[1:])],
        web_root / f"helper-{site.name}.log", own_group=True,
    )).start()


@pytest.fixture(scope="module")
def web() -> Iterator[Web]:
    if os.getuid() != 0:
        pytest.skip("needs root: the web servers' and the client's SVIDs go to two groups of root processes")
    bins = require_binaries("nginx", "apache2", "openssl", "curl")
    if not os.path.isfile(f"{APACHE_MODULES}/mod_ssl.so"):
        pytest.skip(f"apache2 is installed but not Debian's layout (no {APACHE_MODULES}/mod_ssl.so)")
    root = short_dir("tqw-")
    env = TesseraEnv(root, TD)
    closers: list[Any] = []
    sites: list[Site] = []
    try:
        env.start()
        # The web servers' SVID goes to root processes of group root (the helpers); the client's to root
        # processes of group daemon. The web SVID lives 60 s, so it rotates within the module.
        env.entry(WEB_ID, "unix:uid:0", "unix:gid:0", ttl="60s", dns=["localhost"])
        env.entry(CLIENT_ID, "unix:uid:0", f"unix:gid:{CLIENT_GID}", ttl="1h")
        env.start_agent()

        client = root / "client"
        fetched = subprocess.run(
            [*as_user(0, CLIENT_GID), PY, "-m", "tessera.agent", "api", "fetch", "x509", "--socket", env.socket,
             "--write", str(client)],
            capture_output=True, text=True, timeout=60, check=False,
        )
        assert fetched.returncode == 0 and CLIENT_ID in fetched.stdout, fetched.stdout + fetched.stderr

        backend = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Backend)
        threading.Thread(target=backend.serve_forever, daemon=True).start()
        closers.append(backend)
        backend_port = int(backend.server_address[1])

        nginx_dir, apache_dir = root / "nginx", root / "apache"
        for d in (nginx_dir / "tmp", apache_dir):
            d.mkdir(parents=True)
        nginx_base = [bins["nginx"], "-p", f"{nginx_dir}/", "-c", str(nginx_dir / "nginx.conf"),
                      "-e", str(nginx_dir / "error.log")]
        apache_base = [bins["apache2"], "-f", str(apache_dir / "httpd.conf")]
        nginx = Site("nginx", free_port(), nginx_dir, nginx_dir / "svid", [*nginx_base, "-s", "reload"],
                     [*nginx_base, "-s", "stop"], nginx_dir / "nginx.pid")
        apache = Site("apache", free_port(), apache_dir, apache_dir / "svid", [*apache_base, "-k", "graceful"],
                      [*apache_base, "-k", "stop"], apache_dir / "httpd.pid")
        (nginx_dir / "nginx.conf").write_text(nginx_conf(nginx, backend_port))
        (apache_dir / "httpd.conf").write_text(apache_conf(apache, backend_port))

        start_helper(root, env, nginx, "helper-nginx.toml")
        sites.append(nginx)
        started = subprocess.run(nginx_base, capture_output=True, text=True, timeout=60)
        assert started.returncode == 0, started.stderr + (nginx_dir / "error.log").read_text()

        start_helper(root, env, apache, "helper-apache.toml")
        sites.append(apache)
        started = subprocess.run([*apache_base, "-k", "start"], capture_output=True, text=True, timeout=60)
        assert started.returncode == 0, started.stdout + started.stderr

        # A server on the Tessera SDK, with the same (root, group root) identity from the agent.
        source = X509Source(address=f"unix://{env.socket}", timeout=60)
        closers.append(source)
        sdk_server = SpiffeHTTPServer(("127.0.0.1", 0), Whoami, source=source, authorizer=authorize_id(CLIENT_ID))
        threading.Thread(target=sdk_server.serve_forever, daemon=True).start()
        closers.append(sdk_server)

        w = Web(root, env, bins, client, nginx, apache, int(sdk_server.server_address[1]), closers)
        for site in (nginx, apache):
            wait_for(lambda s=site: w.curl(s)[0] == 200, 30, f"{site.name} answering")  # type: ignore[misc]
        yield w
    finally:
        teardown(root, env, sites, closers)


def stop_site(site: Site) -> None:
    """`nginx -s stop` / `apache2 -k stop`, then the master's pid must be gone (its workers go with it)."""
    pid = int(site.pid_file.read_text().strip()) if site.pid_file.exists() else None
    subprocess.run(site.stop, capture_output=True, timeout=60, check=False)
    if pid is not None:
        wait_for(lambda: not psutil.pid_exists(pid), 30, f"{site.name} master (pid {pid}) to exit")


def teardown(root: Path, env: TesseraEnv, sites: list[Site], closers: list[Any]) -> None:
    """Every step runs even when one before it fails, so no daemon outlives the module."""
    errors: list[str] = []
    steps: list[Any] = [functools.partial(stop_site, site) for site in sites]
    for closer in reversed(closers):
        if isinstance(closer, http.server.HTTPServer):
            steps += [closer.shutdown, closer.server_close]
        else:
            steps.append(closer.close)
    steps.append(env.stop)
    for step in steps:
        try:
            step()
        except Exception as exc:  # collected and reported below
            errors.append(f"{step}: {exc}")
    left = processes_mentioning(str(root))
    if os.environ.get("TESSERA_KEEP_E2E"):
        print("web test files in", root)
    else:
        shutil.rmtree(root, ignore_errors=True)
    assert not errors and not left, (errors, left)


def test_nginx_mtls_with_helper_files_curl_200_and_400_without_client_certificate(web: Web) -> None:
    code, body, _ = web.curl(web.nginx)
    assert code == 200, body
    # nginx verified the client SVID against the bundle and passed it on; the backend read the SPIFFE ID.
    assert json.loads(body) == {"verify": "SUCCESS", "spiffe_id": CLIENT_ID}
    code, body, _ = web.curl(web.nginx, client=False)
    assert code == 400 and "No required SSL certificate was sent" in body


def test_nginx_presents_the_helper_written_svid(web: Web) -> None:
    text = web.s_client(web.nginx.port)
    assert "Verify return code: 0 (ok)" in text, text
    assert web.served_serial(web.nginx) == web.nginx.served_file_serial
    assert (web.nginx.svid_dir / "svid.key").stat().st_mode & 0o777 == 0o600
    assert (web.nginx.svid_dir / "svid.pem").stat().st_mode & 0o777 == 0o644


def test_openssl_s_client_against_a_tessera_sdk_server(web: Web) -> None:
    text = web.s_client(web.sdk_port, send=b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
    assert "Verify return code: 0 (ok)" in text, text
    assert f"hello {CLIENT_ID}" in text, text
    # Without a client certificate the SDK server ends the handshake: no HTTP answer.
    refused = web.s_client(web.sdk_port, client=False, send=b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
    assert "hello" not in refused and "HTTP/1" not in refused, refused
    assert "alert" in refused.lower(), refused


def test_apache_requires_a_client_svid_and_authorizes_the_spiffe_id(web: Web) -> None:
    code, body, _ = web.curl(web.apache)
    assert code == 200, body
    assert json.loads(body) == {"verify": "SUCCESS", "spiffe_id": CLIENT_ID}
    # No client certificate: mod_ssl fails the TLS handshake itself.
    code, body, err = web.curl(web.apache, client=False)
    assert code == 0 and "alert" in err.lower(), (code, body, err)
    # A valid SVID of the trust domain but another SPIFFE ID (the web server's own): 403.
    svid = web.apache.svid_dir
    code, body, _ = web.curl(web.apache, "--cert", str(svid / "svid.pem"), "--key", str(svid / "svid.key"),
                             client=False)
    assert code == 403, body


class CurlLoop:
    """Requests with the client SVID in a steady stream, each on a new connection (a new curl), until stopped."""

    def __init__(self, web: Web, site: Site) -> None:
        self.web, self.site = web, site
        self.results: list[tuple[int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            code, body, err = self.web.curl(self.site)
            self.results.append((code, err.strip() or body[:200]))
            self._stop.wait(0.05)  # a steady stream, leaving CPU to the servers being reloaded

    def stop(self) -> list[tuple[int, str]]:
        self._stop.set()
        self._thread.join(60)
        return self.results


def test_rotation_rewrites_files_reloads_servers_and_no_request_fails(web: Web) -> None:
    sites = (web.nginx, web.apache)
    before = {s.name: web.served_serial(s) for s in sites}
    for site in sites:
        assert before[site.name] == site.served_file_serial
    loops = [CurlLoop(web, s) for s in sites]
    try:
        for site in sites:
            # The agent rotates the 60 s SVID at about half its life; the helper rewrites the files...
            wait_for(lambda s=site: s.served_file_serial != before[s.name], 90,  # type: ignore[misc]
                     f"{site.name} helper rewriting the rotated SVID")
            new = site.served_file_serial
            # ...and reloads the server, which then presents the new certificate.
            wait_for(lambda s=site, n=new: web.served_serial(s) == n, 60,  # type: ignore[misc]
                     f"{site.name} serving the new certificate")
        counts_at_switch = [len(loop.results) for loop in loops]
        wait_for(lambda: all(len(lp.results) >= c + 3 for lp, c in zip(loops, counts_at_switch, strict=True)), 60,
                 "more requests after the reload")
    finally:
        results = {loop.site.name: loop.stop() for loop in loops}
    for name, got in results.items():
        failed = [r for r in got if r[0] != 200]
        assert not failed, f"{name}: {len(failed)} of {len(got)} requests failed during rotation: {failed[:5]}"
        assert len(got) >= 5, (name, got)
    assert web.nginx.helper is not None and "nginx" in web.nginx.helper.output()
    for site in sites:
        assert site.served_file_serial != before[site.name]
        assert (site.svid_dir / "svid.key").stat().st_mode & 0o777 == 0o600
