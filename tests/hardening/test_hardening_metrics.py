"""Metrics of real processes: a server and an agent with their opt-in /metrics listeners, scraped over HTTP
while agents attest, workloads fetch and stream, and the CA rotates."""

from __future__ import annotations

import json
import re
import shutil
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
import pytest
import yaml
from hardening_support import agent_proc, server_proc
from support.inproc import TD
from support.procs import (
    FETCH_SCRIPT,
    NOBODY,
    PY,
    TesseraAgent,
    TesseraServer,
    free_port,
    run,
    run_as,
    short_dir,
    wait_for,
)

from tessera.proto import workload_pb2 as wpb
from tessera.sdk.workloadapi.wire import SECURITY_METADATA, WorkloadApiStub

pytestmark = pytest.mark.slow

AGENT_ID = f"spiffe://{TD}/host/metrics"
ALERTS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "tessera-alerts.yaml"
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def scrape(port: int) -> dict[str, float]:
    """``name{labels}`` -> value for every sample of the exposition text."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            samples[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return samples


def value(samples: dict[str, float], name: str, **labels: str) -> float:
    wanted = {f'{k}="{v}"' for k, v in labels.items()}
    for key, val in samples.items():
        base, _, rest = key.partition("{")
        if base == name and wanted <= set(rest.rstrip("}").split(",")) - {""}:
            return val
    raise KeyError(f"{name}{labels} not in scrape")


@dataclass
class World:
    root: Path
    server: TesseraServer
    agent: TesseraAgent
    server_metrics: int
    agent_metrics: int


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    root = short_dir("thard-")
    server_port, agent_port = free_port(), free_port()
    server = server_proc(root, "--metrics-bind-address", f"127.0.0.1:{server_port}")
    agent: TesseraAgent | None = None
    try:
        server.start_and_wait()
        server.write_bundle(root / "bundle.pem")
        server.admin(
            "entry", "create", "--spiffe-id", f"spiffe://{TD}/metrics/root", "--parent-id", AGENT_ID,
            "--selector", "unix:uid:0", "--x509-svid-ttl", "120s",
        )  # fmt: skip
        agent = agent_proc(
            root, server, "agent", "--join-token", server.join_token(AGENT_ID),
            "--metrics-bind-address", f"127.0.0.1:{agent_port}",
        )  # fmt: skip
        agent.start_and_wait()
        yield World(root, server, agent, server_port, agent_port)
    finally:
        if agent is not None:
            agent.stop()
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def _fetch(world: World) -> None:
    out = run(PY, "-m", "tessera.agent", "api", "fetch", "x509", "--socket", world.agent.socket)
    assert out.returncode == 0, out.stderr


def test_server_metrics_count_signing_rpcs_and_attestation_failures(world: World) -> None:
    wait_for(lambda: run(PY, "-m", "tessera.agent", "api", "fetch", "x509", "--socket", world.agent.socket)
             .returncode == 0, what="first SVID")  # fmt: skip
    bad = agent_proc(world.root, world.server, "bad", "--join-token", "not-a-real-token")
    bad.start()
    wait_for(lambda: not bad.alive(), what="the agent with a bad token to stop")
    samples = scrape(world.server_metrics)
    assert value(samples, "tessera_server_svids_issued_total", kind="x509") >= 2  # agent SVID + workload SVID
    assert value(samples, "tessera_server_signing_duration_seconds_count", kind="x509") >= 2
    assert value(samples, "tessera_server_node_rpcs_total", method="Sync", code="OK") >= 1
    assert value(samples, "tessera_server_node_rpcs_total", method="Attest", code="OK") >= 1
    assert value(samples, "tessera_server_attestation_failures_total", reason="permission_denied") >= 1
    assert 23 * 3600 < value(samples, "tessera_server_ca_expiry_seconds", kind="x509") <= 24 * 3600
    assert value(samples, "tessera_server_ca_expiry_seconds", kind="jwt") > 0
    assert 0 <= value(samples, "tessera_server_maintenance_seconds_since_success") < 30
    assert value(samples, "tessera_server_process_resident_memory_bytes") > 0


def test_agent_metrics_streams_cache_expiry_and_refusals(world: World) -> None:
    _fetch(world)
    with grpc.insecure_channel(f"unix:{world.agent.socket}") as channel:
        stream = WorkloadApiStub(channel).FetchX509SVID(wpb.X509SVIDRequest(), metadata=SECURITY_METADATA)
        next(iter(stream))
        samples = scrape(world.agent_metrics)
        assert value(samples, "tessera_agent_workload_api_streams_open", method="FetchX509SVID") >= 1
        stream.cancel()
    assert run_as(NOBODY, FETCH_SCRIPT, world.agent.socket).startswith("ERR PERMISSION_DENIED")
    samples = scrape(world.agent_metrics)
    assert value(samples, "tessera_agent_cache_size", kind="x509_svids") >= 1
    assert 0 < value(samples, "tessera_agent_svid_soonest_expiry_seconds") <= 120
    assert 0 < value(samples, "tessera_agent_svid_expiry_seconds") <= 3600
    assert value(samples, "tessera_agent_rotation_lag_seconds") == 0
    assert value(samples, "tessera_agent_syncs_total") >= 1
    assert value(samples, "tessera_agent_sync_duration_seconds_count") >= 1
    assert value(samples, "tessera_agent_workload_attestation_failures_total", reason="no_identity") >= 1
    # Streams end when the workload hangs up: CANCELLED is their normal end, never OK.
    assert value(samples, "tessera_agent_workload_api_rpcs_total", method="FetchX509SVID", code="CANCELLED") >= 1
    wait_for(
        lambda: scrape(world.agent_metrics).get('tessera_agent_workload_api_streams_open{method="FetchX509SVID"}') == 0,
        what="stream gauge back to 0",
    )




def test_expiry_gauges_move_across_a_rotation(world: World) -> None:
    before_server = value(scrape(world.server_metrics), "tessera_server_ca_expiry_seconds", kind="x509")
    before_agent = value(scrape(world.agent_metrics), "tessera_agent_svid_soonest_expiry_seconds")
    slots = json.loads(world.server.admin("ca", "show", "--output", "json"))
    if isinstance(slots, dict):
        slots = next(v for v in slots.values() if isinstance(v, list))
    (old_id,) = [s["key_id"] for s in slots if s["kind"] == "x509" and s["state"] == "active"]
    world.server.admin("ca", "prepare")
    world.server.admin("ca", "activate")
    after_server = value(scrape(world.server_metrics), "tessera_server_ca_expiry_seconds", kind="x509")
    assert after_server > before_server  # the new CA has its whole life ahead
    # Tainting the old CA makes the agent re-sign at once: the soonest SVID expiry jumps forward.
    world.server.admin("ca", "taint", "--id", old_id)
    wait_for(
        lambda: value(scrape(world.agent_metrics), "tessera_agent_svid_soonest_expiry_seconds") > before_agent + 1,
        what="the agent's soonest expiry to move after re-signing",
    )


def test_every_metric_the_alert_rules_use_is_exported(world: World) -> None:
    _fetch(world)
    exported = {key.partition("{")[0] for key in (*scrape(world.server_metrics), *scrape(world.agent_metrics))}
    rules = yaml.safe_load(ALERTS.read_text())
    used = set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert rule["alert"] and rule["expr"] and rule["labels"]["severity"] in ("warning", "critical")
            used |= set(re.findall(r"\b(tessera_[a-z0-9_]+)", str(rule["expr"])))
    assert used, "no tessera metric in the alert rules"
    missing = sorted(used - exported)
    assert not missing, f"alert rules use {missing}, which neither daemon exports"


def test_metrics_listener_is_opt_in() -> None:
    """Without metrics_bind_address the server listens on its node API port and nothing else."""
    root = short_dir("thard-")
    server = server_proc(root)
    try:
        server.start_and_wait()
        listening = {
            c.laddr.port
            for c in psutil.Process(server.pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        }
        assert listening == {server.port}
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
