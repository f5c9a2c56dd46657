"""tessera-agent command line: config errors, healthcheck, SPIFFE_ENDPOINT_SOCKET, fetch --write, watch."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from agent_testlib import add, entry, issue, make_cache, socket_dir, start_endpoint, stop_endpoint

from tessera.agent.cache import WorkloadCache
from tessera.sdk.testing import TestCA

ME = f"unix:uid:{os.getuid()}"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tessera.agent", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_config_errors_are_one_line_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "agent.toml"
    bad.write_text('[agent]\ntrust_domain = "example.org"\nserver_address = "127.0.0.1:1"\nsync_intervall = "5s"\n')
    out = cli("run", "--config", str(bad))
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and "sync_intervall" in out.stderr
    bad.write_text('[agent]\ntrust_domain = "example.org"\nserver_address = "127.0.0.1:1"\nsync_interval = "soon"\n')
    out = cli("run", "--config", str(bad))
    assert out.returncode == 1 and "sync_interval" in out.stderr and out.stderr.count("\n") == 1
    out = cli("run", "--server-address", "127.0.0.1:1")
    assert out.returncode == 1 and "trust_domain" in out.stderr
    out = cli("run", "--trust-domain", "example.org", "--server-address", "nohostport")
    assert out.returncode == 1 and "server_address" in out.stderr


def test_no_identity_and_no_token_stops_with_what_to_do(tmp_path: Path) -> None:
    sock = f"{socket_dir()}/api.sock"
    out = cli(
        "run", "--trust-domain", "example.org", "--server-address", "127.0.0.1:1", "--insecure-bootstrap",
        "--data-dir", str(tmp_path / "data"), "--socket", sock,
    )
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("tessera-agent: ") and "--join-token" in last


def test_healthcheck_without_an_agent_fails_and_says_why() -> None:
    d = tempfile.mkdtemp(dir="/tmp")
    out = cli("healthcheck", "--socket", f"{d}/none.sock", "--timeout", "2")
    assert out.returncode == 1 and "not healthy" in out.stderr


def _with_endpoint(cache: WorkloadCache, body: Any) -> Any:
    async def main() -> Any:
        ep, path = await start_endpoint(cache)
        try:
            return await body(path)
        finally:
            await stop_endpoint(ep)

    return asyncio.run(asyncio.wait_for(main(), 120))


def test_fetch_via_env_socket_write_json_and_healthcheck(tmp_path: Path) -> None:
    ca = TestCA()
    cache = make_cache(ca)
    add(cache, ca, entry("e1", ca, "/cli", [ME], hint="h1"))

    async def body(path: str) -> None:
        env = {"SPIFFE_ENDPOINT_SOCKET": f"unix://{path}"}
        out = await asyncio.to_thread(cli, "api", "fetch", "x509", "--write", str(tmp_path), env=env)
        assert out.returncode == 0, out.stderr
        assert "spiffe://example.org/cli" in out.stdout and "Hint:            h1" in out.stdout
        assert (tmp_path / "svid.0.key").stat().st_mode & 0o777 == 0o600
        assert (tmp_path / "svid.0.pem").read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
        out = await asyncio.to_thread(cli, "api", "fetch", "x509", "--output", "json", env=env)
        doc = json.loads(out.stdout)
        assert doc["svids"][0]["spiffe_id"] == "spiffe://example.org/cli" and doc["svids"][0]["serial"]
        out = await asyncio.to_thread(cli, "healthcheck", "--socket", path)
        assert out.returncode == 0 and "healthy" in out.stdout

    _with_endpoint(cache, body)


def test_fetch_write_makes_a_private_directory_under_a_permissive_umask(tmp_path: Path) -> None:
    ca = TestCA()
    cache = make_cache(ca)
    add(cache, ca, entry("e1", ca, "/cli", [ME]))
    target = tmp_path / "new" / "ids"

    async def body(path: str) -> None:
        argv = [sys.executable, "-m", "tessera.agent", "api", "fetch", "x509", "--write", str(target), "--socket", path]
        out = await asyncio.to_thread(
            subprocess.run, ["sh", "-c", 'umask 000; exec "$@"', "sh", *argv], capture_output=True, text=True,
            timeout=60, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr

    _with_endpoint(cache, body)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in target.iterdir()}
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    assert modes == {"svid.0.pem": 0o644, "svid.0.key": 0o600, "bundle.0.pem": 0o644}


def test_watch_prints_each_rotation() -> None:
    ca = TestCA()
    cache = make_cache(ca)
    e = entry("e1", ca, "/watched", [ME])
    add(cache, ca, e)

    async def body(path: str) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tessera.agent", "api", "watch", "--socket", path,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            first = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
            assert "spiffe://example.org/watched" in first
            cache.put_svids([issue(ca, e)])
            second = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
            assert "spiffe://example.org/watched" in second
            assert first.split("serial=")[1].split()[0] != second.split("serial=")[1].split()[0]
        finally:
            proc.terminate()
            await proc.wait()

    _with_endpoint(cache, body)


def test_shipped_example_config_is_accepted() -> None:
    from tessera.agent.daemon import SETTINGS, AgentSettings
    from tessera.sdk.config import load_settings

    example = Path(__file__).resolve().parents[2] / "deploy" / "config" / "agent.toml"
    settings = AgentSettings.from_values(load_settings("agent", SETTINGS, example, {}))
    assert settings.node.server_addresses and settings.socket.endswith("api.sock")


def test_the_workload_api_socket_defaults_out_of_tmp_and_is_checked_for_length() -> None:
    from tessera.agent.daemon import SETTINGS, AgentSettings
    from tessera.sdk.config import ConfigError, load_settings

    base = {"trust_domain": "example.org", "server_address": "127.0.0.1:1"}
    settings = AgentSettings.from_values(load_settings("agent", SETTINGS, None, base))
    assert settings.socket == "/run/tessera-agent/public/api.sock"  # as root
    with pytest.raises(ConfigError, match=r"^socket: .*\.XXXXXXXX/s"):
        AgentSettings.from_values(load_settings("agent", SETTINGS, None, {**base, "socket": "/" + "d" * 96 + "/s"}))
