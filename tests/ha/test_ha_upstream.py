"""Two servers on one PostgreSQL database whose CAs are both signed by one upstream authority (the
organisation's PKI): the bundle is that one root, each server signs through its own intermediate, and an
agent attested by one server keeps working through the other when the first is killed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
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

from tessera.sdk.keys import private_key_to_pem
from tessera.sdk.testing import TestCA

pytestmark = pytest.mark.slow


@pytest.fixture
def setup(pg_url: str) -> Iterator[tuple[Path, str, TestCA]]:
    root = short_dir("thu-")
    upstream = TestCA(TD, common_name="Example Org SPIFFE root")
    (root / "upstream.crt").write_bytes(upstream.certificate.public_bytes(Encoding.PEM))
    (root / "upstream.key").write_bytes(private_key_to_pem(upstream.key))
    (root / "upstream.key").chmod(0o600)
    try:
        yield root, pg_url, upstream
    finally:
        cleanup(root)


def test_servers_under_one_upstream_share_its_root_and_serve_each_others_agents(
    setup: tuple[Path, str, TestCA],
) -> None:
    root, url, upstream = setup
    flags = ("--upstream-authority-cert", str(root / "upstream.crt"), "--upstream-authority-key",
             str(root / "upstream.key"))  # fmt: skip
    a, b = Server("a", root, url, *flags), Server("b", root, url, *flags)
    upstream_id = x509.SubjectKeyIdentifier.from_public_key(upstream.certificate.public_key()).digest.hex()
    agent: TesseraAgent | None = None
    watcher: WorkloadWatcher | None = None
    try:
        start_servers(a, b)
        intermediates = {"a": set(ca_ids(a)), "b": set(ca_ids(b))}
        assert intermediates["a"] and intermediates["b"] and not intermediates["a"] & intermediates["b"]
        assert bundle_roots(a) == bundle_roots(b) == {upstream_id}  # one root, whichever server is asked
        a.write_bundle(root / "bundle.pem")

        agent_id = f"spiffe://{TD}/host/up"
        token = a.join_token(agent_id)
        a.admin("entry", "create", "--spiffe-id", f"spiffe://{TD}/up-a", "--parent-id", agent_id,
                "--selector", "unix:uid:0")  # fmt: skip
        agent, sock = start_agent(root, [a.address, b.address], token)
        watcher = WorkloadWatcher(sock)
        watcher.start()
        first = wait_for(lambda: [o for o in watcher.observations if o.spiffe_id.endswith("/up-a")], 60, "first SVID")
        assert first[0].issuer_ski in intermediates["a"]

        a.kill()
        b.admin("entry", "create", "--spiffe-id", f"spiffe://{TD}/up-b", "--parent-id", agent_id,
                "--selector", "unix:uid:0")  # fmt: skip
        served = wait_for(lambda: [o for o in watcher.observations if o.spiffe_id.endswith("/up-b")], 40,
                          "entry served through B after A was killed")  # fmt: skip
        assert served[0].issuer_ski in intermediates["b"]  # signed by B's intermediate, verified by the one root
        assert f"switched to server {b.address}" in agent.output()
    finally:
        if watcher is not None:
            watcher.stop()
        if agent is not None:
            agent.stop()
        a.kill()
        b.stop()
    assert not watcher.failures(), watcher.failures()[:3]
