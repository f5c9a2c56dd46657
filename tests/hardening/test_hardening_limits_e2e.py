"""The limits in real daemons: attestation per source address and signing per agent on a server, open
Workload API streams per caller uid on an agent. Refusals are RESOURCE_EXHAUSTED with a retry hint; the
daemons keep serving everyone else."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import grpc
import pytest
from hardening_support import agent_proc, server_proc
from support.inproc import TD, RunningServer, cleanup, free_socket_dir, make_config
from support.nodeapi import Agent, csr_der, ec_key
from support.procs import FETCH_SCRIPT, NOBODY, TesseraAgent, run_as, short_dir

from tessera.proto import node_pb2 as npb
from tessera.proto import workload_pb2 as wpb
from tessera.sdk.workloadapi.wire import SECURITY_METADATA, WorkloadApiStub

pytestmark = pytest.mark.slow


@pytest.fixture
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    data = tmp_path_factory.mktemp("limits")
    sock_dir = free_socket_dir()
    config = make_config(data / "server", sock_dir / "api.sock", attestation_rate_limit="5", signing_rate_limit="600")
    srv = RunningServer(config)
    try:
        yield srv
    finally:
        srv.stop()
        cleanup(sock_dir)


def test_attestation_is_rate_limited_per_source_address(server: RunningServer) -> None:
    codes = []
    for _ in range(8):
        try:
            Agent(server).attest_join_token("no-such-token")
        except grpc.RpcError as exc:
            codes.append((exc.code(), exc.details() or ""))
    assert [c for c, _ in codes[:5]] == [grpc.StatusCode.PERMISSION_DENIED] * 5
    assert {c for c, _ in codes[5:]} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert "127.0.0.1" in codes[5][1] and "retry in" in codes[5][1]


def test_signing_is_rate_limited_per_agent(tmp_path_factory: pytest.TempPathFactory) -> None:
    data = tmp_path_factory.mktemp("signing-limit")
    sock_dir = free_socket_dir()
    srv = RunningServer(make_config(data / "server", sock_dir / "api.sock", signing_rate_limit="600"))
    try:
        agents: list[tuple[Agent, npb.Entry]] = []
        with srv.admin() as admin:
            for _ in range(2):
                agent = Agent(srv)
                agent.attest_join_token(admin.token().token)
                entry = admin.create_entry(f"spiffe://{TD}/limited/{len(agents)}", agent.spiffe_id)
                agents.append((agent, entry))
        batch = {
            id(a): npb.BatchSignX509SVIDRequest(
                requests=[npb.X509SignRequest(entry_id=e.id, csr=csr_der(ec_key())) for _ in range(500)]
            )
            for a, e in agents
        }
        first, second = agents
        assert len(first[0].stub().BatchSignX509SVID(batch[id(first[0])], timeout=60).results) == 500
        with pytest.raises(grpc.RpcError) as info:
            first[0].stub().BatchSignX509SVID(batch[id(first[0])], timeout=60)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "signing rate limit" in (info.value.details() or "")
        # Another agent has its own budget.
        assert len(second[0].stub().BatchSignX509SVID(batch[id(second[0])], timeout=60).results) == 500
        too_big = npb.BatchSignX509SVIDRequest(
            requests=[npb.X509SignRequest(entry_id=second[1].id, csr=csr_der(ec_key()))] * 500
        )
        with pytest.raises(grpc.RpcError) as info:
            second[0].stub().BatchSignX509SVID(too_big, timeout=60)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        srv.stop()
        cleanup(sock_dir)




def test_open_streams_are_capped_per_caller_uid() -> None:
    root = short_dir("thard-")
    server = server_proc(root)
    agent: TesseraAgent | None = None
    try:
        server.start_and_wait()
        server.write_bundle(root / "bundle.pem")
        agent_id = f"spiffe://{TD}/host/cap"
        for path, uid in (("/cap/root", 0), ("/cap/nobody", NOBODY)):
            server.admin(
                "entry", "create", "--spiffe-id", f"spiffe://{TD}{path}", "--parent-id", agent_id,
                "--selector", f"unix:uid:{uid}",
            )  # fmt: skip
        agent = agent_proc(
            root, server, "agent", "--join-token", server.join_token(agent_id),
            "--workload-api-max-streams-per-caller", "3",
        ).start_and_wait()  # fmt: skip
        with grpc.insecure_channel(f"unix:{agent.socket}") as channel:
            stub = WorkloadApiStub(channel)
            held = [stub.FetchX509SVID(wpb.X509SVIDRequest(), metadata=SECURITY_METADATA, timeout=60) for _ in range(3)]
            for stream in held:
                next(stream)
            extra = stub.FetchX509SVID(wpb.X509SVIDRequest(), metadata=SECURITY_METADATA, timeout=60)
            with pytest.raises(grpc.RpcError) as info:
                next(extra)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # Another uid is not affected; unary calls are not streams.
            assert run_as(NOBODY, FETCH_SCRIPT, agent.socket) == f"OK spiffe://{TD}/cap/nobody"
            jwt = stub.FetchJWTSVID(wpb.JWTSVIDRequest(audience=["x"]), metadata=SECURITY_METADATA, timeout=30)
            assert jwt.svids
            held[0].cancel()
            again = None
            for _ in range(50):  # the freed slot comes back once the agent has seen the cancellation
                again = stub.FetchX509SVID(wpb.X509SVIDRequest(), metadata=SECURITY_METADATA, timeout=60)
                try:
                    next(again)
                    break
                except grpc.RpcError:
                    again = None
            assert again is not None
    finally:
        if agent is not None:
            agent.stop()
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
