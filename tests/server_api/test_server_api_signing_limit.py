"""Signing is bounded: however many agents ask at once, at most MAX_CONCURRENT_SIGNING batches are being signed,
so a burst of rotations queues instead of taking every worker thread from other agents' syncs."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from server_api_support import TD, Agent, RunningServer, csr_der, ec_key, running_server

from tessera.proto import node_pb2 as npb
from tessera.server.api import node as node_module


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    with running_server(tmp_path / "server") as srv:
        yield srv


def test_concurrent_batches_are_signed_a_bounded_number_at_a_time(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    authority: Any = server.app._authority
    real_sign = authority.sign_x509_svid
    lock = threading.Lock()
    active = [0]
    peak = [0]

    def tracking_sign(*args: Any, **kwargs: Any) -> Any:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            time.sleep(0.05)  # long enough for concurrent batches to overlap if nothing bounds them
            return real_sign(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(authority, "sign_x509_svid", tracking_sign)
    agent = Agent(server)
    with server.admin() as admin:
        agent.attest_join_token(admin.token().token)
        entry = admin.create_entry(f"spiffe://{TD}/burst", agent.spiffe_id)
    stub = agent.stub()
    calls = 4 * node_module.MAX_CONCURRENT_SIGNING + 4
    request = npb.BatchSignX509SVIDRequest(requests=[npb.X509SignRequest(entry_id=entry.id, csr=csr_der(ec_key()))])
    peak[0] = 0
    with ThreadPoolExecutor(calls) as pool:
        results = list(pool.map(lambda _: stub.BatchSignX509SVID(request, timeout=60), range(calls)))
    assert all(len(r.results) == 1 for r in results)
    assert 1 <= peak[0] <= node_module.MAX_CONCURRENT_SIGNING
