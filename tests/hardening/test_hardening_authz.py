"""Authorization matrix with real processes: a server, two agents (A and B) and workloads under two uids.

- agent A, holding its own SVID, can neither sign nor mint anything for agent B's entries, nor see them;
- a workload sees only its own SVIDs (uid 0 vs nobody), and cannot ask for a JWT-SVID of another's ID;
- the admin API is unreachable for a process that is not the server's user;
- the modes of sockets, data directories and key files are the documented ones;
- a join token presented by two agents at the same moment admits exactly one.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hardening_support import agent_proc, server_proc
from support.inproc import TD
from support.nodeapi import code_of, csr_der, ec_key
from support.procs import NOBODY, TesseraAgent, TesseraServer, run_as, short_dir, wait_for

from tessera.proto import node_pb2 as npb
from tessera.proto import node_pb2_grpc as ngrpc
from tessera.proto import workload_pb2 as wpb
from tessera.sdk.workloadapi.wire import SECURITY_METADATA, WorkloadApiStub

pytestmark = pytest.mark.slow

A_ID = f"spiffe://{TD}/host/a"
B_ID = f"spiffe://{TD}/host/b"


@dataclass
class World:
    root: Path
    server: TesseraServer
    a: TesseraAgent
    b: TesseraAgent
    entries: dict[str, str]


def _entry(server: TesseraServer, path: str, parent: str, *selectors: str) -> str:
    args = ["entry", "create", "--spiffe-id", f"spiffe://{TD}{path}", "--parent-id", parent]
    for s in selectors:
        args += ["--selector", s]
    return server.admin(*args).splitlines()[-1].strip()


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    root = short_dir("thard-")
    server = server_proc(root)
    agents: list[TesseraAgent] = []
    try:
        server.start_and_wait()
        server.write_bundle(root / "bundle.pem")
        entries = {
            "a-root": _entry(server, "/a/root", A_ID, "unix:uid:0"),
            "a-nobody": _entry(server, "/a/nobody", A_ID, f"unix:uid:{NOBODY}"),
            "b-root": _entry(server, "/b/root", B_ID, "unix:uid:0"),
        }
        a = agent_proc(root, server, "a", "--join-token", server.join_token(A_ID))
        b = agent_proc(root, server, "b", "--join-token", server.join_token(B_ID))
        agents = [a, b]
        a.start()
        b.start()
        wait_for(a.healthy, what="agent a healthy")
        wait_for(b.healthy, what="agent b healthy")
        yield World(root, server, a, b, entries)
    finally:
        for agent in agents:
            agent.stop()
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def _node_stub(world: World, agent: TesseraAgent) -> tuple[grpc.Channel, ngrpc.NodeStub]:
    """A node API client presenting the agent's own SVID, read from its data dir (what a thief on that host has)."""
    pem = (agent.data_dir / "agent.pem").read_bytes()
    key = serialization.load_pem_private_key(pem, None)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in x509.load_pem_x509_certificates(pem))
    creds = grpc.ssl_channel_credentials((world.root / "bundle.pem").read_bytes(), key_pem, chain)
    channel = grpc.secure_channel(f"127.0.0.1:{world.server.port}", creds)
    return channel, ngrpc.NodeStub(channel)  # type: ignore[no-untyped-call]


def test_agent_a_cannot_sign_mint_or_see_agent_b_entries(world: World) -> None:
    channel, stub = _node_stub(world, world.a)
    try:
        b_entry = world.entries["b-root"]
        sign = npb.BatchSignX509SVIDRequest(requests=[npb.X509SignRequest(entry_id=b_entry, csr=csr_der(ec_key()))])
        assert code_of(lambda: stub.BatchSignX509SVID(sign, timeout=30)) == grpc.StatusCode.PERMISSION_DENIED
        mixed = npb.BatchSignX509SVIDRequest(
            requests=[
                npb.X509SignRequest(entry_id=world.entries["a-root"], csr=csr_der(ec_key())),
                npb.X509SignRequest(entry_id=b_entry, csr=csr_der(ec_key())),
            ]
        )
        assert code_of(lambda: stub.BatchSignX509SVID(mixed, timeout=30)) == grpc.StatusCode.PERMISSION_DENIED
        mint = npb.MintJWTSVIDRequest(entry_id=b_entry, audience=["x"])
        assert code_of(lambda: stub.MintJWTSVID(mint, timeout=30)) == grpc.StatusCode.PERMISSION_DENIED
        synced = stub.Sync(npb.SyncRequest(), timeout=30)
        ids = {e.spiffe_id for e in synced.entries}
        assert f"spiffe://{TD}/a/root" in ids and f"spiffe://{TD}/b/root" not in ids
        # Its own entries still sign: the refusals above are about ownership, not a broken client.
        own = npb.BatchSignX509SVIDRequest(
            requests=[npb.X509SignRequest(entry_id=world.entries["a-root"], csr=csr_der(ec_key()))]
        )
        assert len(stub.BatchSignX509SVID(own, timeout=30).results) == 1
    finally:
        channel.close()


FETCH_SCRIPT = """
import grpc
from tessera.sdk.workloadapi.wire import SECURITY_METADATA, WorkloadApiStub
from tessera.proto import workload_pb2
stub = WorkloadApiStub(grpc.insecure_channel("unix:" + sys.argv[1]))
try:
    resp = next(iter(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=SECURITY_METADATA, timeout=20)))
    print("OK " + ",".join(s.spiffe_id for s in resp.svids))
except grpc.RpcError as e:
    print("ERR " + e.code().name + " " + (e.details() or ""))
"""


def _ids(socket_path: str, uid: int) -> set[str]:
    out = run_as(uid, FETCH_SCRIPT, socket_path)
    return {out} if out.startswith("ERR") else set(out[3:].split(","))


def test_workloads_see_only_their_own_svids(world: World) -> None:
    sock_a, sock_b = world.a.socket, world.b.socket
    assert wait_for(lambda: _ids(sock_a, NOBODY) == {f"spiffe://{TD}/a/nobody"}, what="nobody's SVID")
    assert wait_for(lambda: _ids(sock_a, 0) == {f"spiffe://{TD}/a/root"}, what="root's SVID on agent a")
    assert wait_for(lambda: _ids(sock_b, 0) == {f"spiffe://{TD}/b/root"}, what="root's SVID on agent b")
    for sock, uid in ((sock_b, NOBODY), (sock_a, 4242)):
        (refusal,) = _ids(sock, uid)
        assert refusal.startswith("ERR PERMISSION_DENIED"), refusal


JWT_SCRIPT = """
import grpc
from tessera.sdk.workloadapi.wire import SECURITY_METADATA, WorkloadApiStub
from tessera.proto import workload_pb2
stub = WorkloadApiStub(grpc.insecure_channel("unix:" + sys.argv[1]))
try:
    resp = stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["x"], spiffe_id=sys.argv[2]),
                             metadata=SECURITY_METADATA, timeout=20)
    print("OK " + ",".join(s.spiffe_id for s in resp.svids))
except grpc.RpcError as e:
    print("ERR " + e.code().name + " " + (e.details() or ""))
"""


def test_a_workload_cannot_mint_a_jwt_for_another(world: World) -> None:
    assert run_as(NOBODY, JWT_SCRIPT, world.a.socket, f"spiffe://{TD}/a/nobody") == f"OK spiffe://{TD}/a/nobody"
    assert run_as(NOBODY, JWT_SCRIPT, world.a.socket, f"spiffe://{TD}/a/root").startswith("ERR PERMISSION_DENIED")
    assert run_as(0, JWT_SCRIPT, world.a.socket, f"spiffe://{TD}/b/root").startswith("ERR PERMISSION_DENIED")


def test_requests_without_the_security_header_are_refused(world: World) -> None:
    with grpc.insecure_channel(f"unix:{world.a.socket}") as channel:
        stub = WorkloadApiStub(channel)
        code = code_of(lambda: next(iter(stub.FetchX509SVID(wpb.X509SVIDRequest(), timeout=20))))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        ok = next(iter(stub.FetchX509SVID(wpb.X509SVIDRequest(), metadata=SECURITY_METADATA, timeout=20)))
        assert ok.svids


ADMIN_SCRIPT = """
import socket
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
    print("CONNECTED")
except OSError as e:
    print("REFUSED " + type(e).__name__)
"""


def test_the_admin_api_is_unreachable_without_admin_rights(world: World) -> None:
    assert run_as(0, ADMIN_SCRIPT, world.server.admin_socket) == "CONNECTED"
    assert run_as(NOBODY, ADMIN_SCRIPT, world.server.admin_socket) == "REFUSED PermissionError"


def test_the_admin_cli_run_by_another_user_fails_in_one_line(world: World) -> None:
    cli = CLI_SCRIPT.replace("SOCKET", world.server.admin_socket)
    out = run_as(NOBODY, cli)
    code, _, stderr = out.partition("\n")
    assert code != "0" and stderr.strip() and len(stderr.strip().splitlines()) == 1, out
    assert "permission denied" in stderr.lower() and "Traceback" not in out
    assert "spiffe://" not in out


CLI_SCRIPT = """
import contextlib, io
from tessera.server.cli import main
err = io.StringIO()
with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()) as out:
    code = main(["entry", "show", "--socket", "SOCKET"])
print(code)
print(err.getvalue().strip())
print(out.getvalue().strip())
"""


def _mode(path: Path | str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_permissions_are_as_documented(world: World) -> None:
    admin_dir = Path(world.server.admin_socket).parent
    assert _mode(admin_dir) == 0o700 and os.stat(admin_dir).st_uid == os.getuid()
    assert _mode(world.server.admin_socket) == 0o600
    data = world.server.data_dir
    assert _mode(data) == 0o700
    files = [p for p in data.rglob("*") if p.is_file()]
    keys = [p for p in files if p.name.endswith(".key.pem") or "key" in p.name]
    assert keys, f"no CA key files found in {sorted(map(str, files))}"
    for path in files:
        # Everything the server keeps (keys, journal, SQLite and its WAL) is private to its user.
        assert _mode(path) & 0o077 == 0, f"{path} is {oct(_mode(path))}"
    for directory in [data, *(p for p in data.rglob("*") if p.is_dir())]:
        assert _mode(directory) & 0o077 == 0, f"{directory} is {oct(_mode(directory))}"
    agent_data = world.a.data_dir
    assert _mode(agent_data) == 0o700
    assert _mode(agent_data / "agent.pem") == 0o600
    # The Workload API socket must be reachable by every local workload (that is the point of it).
    assert _mode(world.a.socket) & 0o006 == 0o006


def test_a_join_token_used_by_two_agents_at_once_admits_exactly_one(world: World) -> None:
    token = world.server.join_token(f"spiffe://{TD}/host/race")
    racers = [agent_proc(world.root, world.server, f"race{i}", "--join-token", token) for i in range(2)]
    try:
        for r in racers:
            r.start()
        wait_for(
            lambda: sum(not r.alive() for r in racers) == 1 and any(r.alive() for r in racers),
            timeout=90,
            what="one racer to give up",
        )
        winner = next(r for r in racers if r.alive())
        loser = next(r for r in racers if not r.alive())
        wait_for(winner.healthy, what="the winner to serve")
        assert loser.proc is not None and loser.proc.returncode != 0
        assert "token" in loser.output().lower()
        assert not (loser.data_dir / "agent.pem").exists()
        agents = world.server.admin("agent", "list")
        assert agents.count(f"spiffe://{TD}/host/race") == 1
    finally:
        for r in racers:
            r.stop()
