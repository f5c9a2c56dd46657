"""Two tessera-server processes on one PostgreSQL database, one agent configured with both addresses.

The agent attests through server A; entries created through either server reach it; then A is SIGKILLed
mid-run and server B rotates its CA. All along, a workload holds a Workload API stream open and verifies
every SVID it is handed against the bundle delivered with it: not one may fail, and SVIDs keep rotating
(now signed by B) after A is gone.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ha_testlib import (
    TD,
    Server,
    WorkloadWatcher,
    bundle_roots,
    ca_ids,
    cleanup,
    start_agent,
    start_servers,
)
from support.procs import TesseraAgent, short_dir, wait_for

pytestmark = pytest.mark.slow

SVID_TTL = "60s"  # the server's minimum X509-SVID TTL: the agent rotates at about half life (~30 s)


@pytest.fixture
def cluster(pg_url: str) -> Iterator[tuple[Path, str]]:
    root = short_dir("tha-")
    try:
        yield root, pg_url
    finally:
        cleanup(root)


def test_agent_fails_over_and_workloads_keep_verified_rotations(cluster: tuple[Path, str]) -> None:
    root, url = cluster
    a = Server("a", root, url)
    b = Server("b", root, url)
    agent: TesseraAgent | None = None
    watcher: WorkloadWatcher | None = None
    try:
        start_servers(a, b)
        # Each server keeps its own CA; the one trust bundle holds both, whichever server is asked.
        ca_a, ca_b = ca_ids(a), ca_ids(b)
        assert ca_a and ca_b and not set(ca_a) & set(ca_b)
        wait_for(lambda: set(ca_a) | set(ca_b) <= bundle_roots(a) and bundle_roots(a) == bundle_roots(b), 30,
                 "both servers' CAs in the shared bundle")  # fmt: skip
        a.write_bundle(root / "bundle.pem")

        agent_id = f"spiffe://{TD}/host/ha"
        token = a.join_token(agent_id)
        a.admin("entry", "create", "--spiffe-id", f"spiffe://{TD}/wl-a", "--parent-id", agent_id,
                "--selector", "unix:uid:0", "--x509-svid-ttl", SVID_TTL)  # fmt: skip
        agent, sock = start_agent(root, [a.address, b.address], token)
        watcher = WorkloadWatcher(sock)
        watcher.start()
        wait_for(lambda: {o.spiffe_id for o in watcher.observations} >= {f"spiffe://{TD}/wl-a"}, 60, "first SVID")

        # An entry created through B (the agent talks to A) is served within a sync interval or two.
        b.admin("entry", "create", "--spiffe-id", f"spiffe://{TD}/wl-b", "--parent-id", agent_id,
                "--selector", "unix:uid:0", "--x509-svid-ttl", SVID_TTL)  # fmt: skip
        wait_for(lambda: any(o.spiffe_id == f"spiffe://{TD}/wl-b" for o in watcher.observations), 30,
                 "entry created through server B served")  # fmt: skip

        # Server A dies without a word; the agent must carry on through B.
        a.kill()
        killed_at = time.time()
        b.admin("entry", "create", "--spiffe-id", f"spiffe://{TD}/wl-c", "--parent-id", agent_id,
                "--selector", "unix:uid:0", "--x509-svid-ttl", SVID_TTL)  # fmt: skip
        wait_for(lambda: any(o.spiffe_id == f"spiffe://{TD}/wl-c" for o in watcher.observations), 40,
                 "entry served after failover to B")  # fmt: skip

        # B rotates its CA (prepare publishes the new CA first; activate a sync interval later).
        b.admin("ca", "prepare")
        time.sleep(3)  # let the agent sync the bundle with the prepared CA (the ordering under test)
        b.admin("ca", "activate")
        new_active = {k for k, state in ca_ids(b).items() if state == "active"}
        assert new_active and not new_active & set(ca_b)

        # Rotations keep coming after the kill: wl-a, signed by A before, is re-signed by B's new CA.
        def rotated_by_b() -> bool:
            return any(
                o.at > killed_at and o.spiffe_id == f"spiffe://{TD}/wl-a" and o.issuer_ski in new_active
                for o in watcher.observations
            )

        wait_for(rotated_by_b, 60, "wl-a rotated by B's new CA after A was killed")
        assert agent.alive(), agent.output()
        assert f"switched to server {b.address}" in agent.output()
    finally:
        if watcher is not None:
            watcher.stop()
        if agent is not None:
            agent.stop()
        a.kill()
        b.stop()
    assert watcher is not None
    failures = watcher.failures()
    assert not failures, f"SVIDs that failed verification against their bundle: {failures[:3]}"
    assert len(watcher.serials()) >= 4  # wl-a, wl-b, wl-c and wl-a rotated
