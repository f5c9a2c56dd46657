"""Forging ``unix:sha256`` / ``unix:path`` by exec after connect, for real (issue 12, item 4).

As uid nobody, a process connects to a real agent's Workload API, keeps the connection in a forked child (or
hands it to a second process over SCM_RIGHTS), and execs a binary that registration entries select by hash and
by path; the other process then speaks gRPC over the connection it did not open. It must get PERMISSION_DENIED
saying why, never that binary's SVIDs, whether the exec happens after the agent accepted (the executable
changed since) or before (another process holds the connection; the agent is held stopped to make the order
certain). The same binary run for real, connecting itself, gets its SVIDs.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hardening_support import agent_proc, server_proc
from support.inproc import TD
from support.procs import (
    FETCH_SCRIPT,
    NOBODY,
    SYSTEM_PYTHON,
    TesseraAgent,
    TesseraServer,
    free_port,
    run_as,
    short_dir,
)
from trust_support import Lines, finish, spawn

pytestmark = pytest.mark.slow

AGENT_ID = f"spiffe://{TD}/host/exec"
BY_HASH, BY_PATH, CONTROL = f"spiffe://{TD}/payments/hash", f"spiffe://{TD}/payments/path", f"spiffe://{TD}/nobody"

# The attacker (run as nobody through trust_support.spawn; ``say`` prints JSON lines).
ATTACK = r"""
import contextlib, os, socket, threading, time
mode, agent_sock, binary, workdir = sys.argv[1:5]

def wait_exe(pid, target):
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/exe") == target:
                return
        time.sleep(0.01)
    say(error="the connecting process never exec'd")
    os._exit(1)

def become_binary(sock):
    # The connecting process execs the selected binary, which keeps (and ignores) the connection.
    os.set_inheritable(sock.fileno(), True)
    os.execv(binary, [binary, "-S", "-c", "import sys; sys.stdin.read()"])

def speak_over(fd, tag):
    # gRPC over a connection this process did not open: a private socket spliced onto it.
    path = f"{workdir}/{tag}-{os.getpid()}.sock"
    lsock = socket.socket(socket.AF_UNIX)
    lsock.bind(path)
    lsock.listen(1)
    up = socket.socket(fileno=fd)
    def pump(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            b.shutdown(socket.SHUT_WR)
    def splice():
        c, _ = lsock.accept()
        threading.Thread(target=pump, args=(c, up), daemon=True).start()
        pump(up, c)
    threading.Thread(target=splice, daemon=True).start()
    import grpc
    from tessera.proto import workload_pb2
    from tessera.sdk.workloadapi.wire import SECURITY_METADATA, WorkloadApiStub
    stub = WorkloadApiStub(grpc.insecure_channel("unix:" + path))
    def fetch(call):
        try:
            request = workload_pb2.X509SVIDRequest()
            resp = next(iter(stub.FetchX509SVID(request, metadata=SECURITY_METADATA, timeout=20)))
            say(call=call, code="OK", ids=sorted(s.spiffe_id for s in resp.svids))
        except grpc.RpcError as e:
            say(call=call, code=e.code().name, details=e.details() or "")
    return fetch

if mode == "receive":  # a second process, handed the connection over SCM_RIGHTS
    r = socket.socket(socket.AF_UNIX)
    r.bind(sys.argv[5])
    os.chmod(sys.argv[5], 0o777)
    r.listen(1)
    say(listening=True)
    c, _ = r.accept()
    data, fds, _, _ = socket.recv_fds(c, 64, 1)
    wait_exe(int(data), binary)
    speak_over(fds[0], "q")(1)
    say(done=True)
    sys.exit(0)

s = socket.socket(socket.AF_UNIX)
s.connect(agent_sock)
parent = os.getpid()
if mode == "exec-after-accept":
    go_r, go_w = os.pipe()
    if os.fork() == 0:
        fetch = speak_over(s.fileno(), "c")
        fetch(1)  # answered (refused: this child holds the connection too), so the agent has accepted it
        os.write(go_w, b"x")
        wait_exe(parent, binary)
        fetch(2)
        say(done=True)
        os._exit(0)
    os.read(go_r, 1)
    become_binary(s)
elif mode == "exec-before-accept":
    if os.fork() == 0:
        wait_exe(parent, binary)
        say(ready=True)
        speak_over(s.fileno(), "c")(1)
        say(done=True)
        os._exit(0)
    become_binary(s)
elif mode == "pass":
    r = socket.socket(socket.AF_UNIX)
    r.connect(sys.argv[5])
    socket.send_fds(r, [str(parent).encode()], [s.fileno()])
    r.close()
    become_binary(s)
"""


@dataclass
class World:
    root: Path
    server: TesseraServer
    agent: TesseraAgent
    binary: str
    work: Path
    metrics_port: int


def _selected_binary(directory: Path) -> tuple[str, str]:
    """A copy of the system python made unique (trailing bytes an ELF loader ignores) and its SHA-256, so
    that only this file, not every python on the host, is what the entries select."""
    path = directory / "payments-bin"
    data = Path(SYSTEM_PYTHON).read_bytes() + b"\0tessera-test-" + os.urandom(8).hex().encode()
    path.write_bytes(data)
    os.chmod(path, 0o755)
    return str(path), hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    root = short_dir("ttex-")
    work = root / "work"
    work.mkdir()
    os.chown(work, NOBODY, NOBODY)
    binary, digest = _selected_binary(root)
    server = server_proc(root)
    agent: TesseraAgent | None = None
    try:
        server.start_and_wait()
        server.write_bundle(root / "bundle.pem")
        for spiffe_id, selector in (
            (BY_HASH, f"unix:sha256:{digest}"),
            (BY_PATH, f"unix:path:{binary}"),
            (CONTROL, f"unix:uid:{NOBODY}"),
        ):
            server.admin("entry", "create", "--spiffe-id", spiffe_id, "--parent-id", AGENT_ID, "--selector", selector)
        port = free_port()
        agent = agent_proc(
            root, server, "agent", "--join-token", server.join_token(AGENT_ID),
            "--metrics-bind-address", f"127.0.0.1:{port}",
        ).start_and_wait()  # fmt: skip
        yield World(root, server, agent, binary, work, port)
    finally:
        if agent is not None:
            if agent.alive():
                os.kill(agent.pid, signal.SIGCONT)
            agent.stop()
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def _spawn(world: World, *args: str) -> subprocess.Popen[bytes]:
    return spawn(NOBODY, ATTACK, *args)


def _calls(events: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {e["call"]: e for e in events if "call" in e}


def _assert_refused(call: dict[str, Any], *reasons: str) -> None:
    assert call["code"] == "PERMISSION_DENIED", call  # above all: never OK with the binary's SVIDs
    assert any(reason in call["details"] for reason in reasons), call


def test_the_selected_binary_connecting_itself_gets_its_svids(world: World) -> None:
    out = run_as(NOBODY, FETCH_SCRIPT, world.agent.socket, python=world.binary)
    assert out.startswith("OK ") and set(out[3:].split(",")) == {BY_HASH, BY_PATH, CONTROL}
    # The attacker's own interpreter (the same program without the trailing bytes) is nobody's binary.
    assert run_as(NOBODY, FETCH_SCRIPT, world.agent.socket) == f"OK {CONTROL}"


def test_exec_after_the_agent_accepted_is_refused(world: World) -> None:
    attacker = _spawn(world, "exec-after-accept", world.agent.socket, world.binary, str(world.work))
    try:
        lines = Lines(attacker)
        lines.until("done")
        calls = _calls(lines.events)
    finally:
        finish(attacker)
    _assert_refused(calls[2], "has exec'd a different program since")
    _assert_refused(calls[1], "also held by process")  # a forked child speaking: refused before any exec


def test_exec_before_the_agent_accepted_is_refused(world: World) -> None:
    """The agent is stopped while the attacker connects, forks and execs, so the facts it captures at accept
    already describe the selected binary; only the shared connection gives the child away."""
    os.kill(world.agent.pid, signal.SIGSTOP)
    attacker = None
    try:
        attacker = _spawn(world, "exec-before-accept", world.agent.socket, world.binary, str(world.work))
        lines = Lines(attacker)
        lines.until("ready")
        os.kill(world.agent.pid, signal.SIGCONT)
        lines.until("done")
        calls = _calls(lines.events)
    finally:
        os.kill(world.agent.pid, signal.SIGCONT)
        if attacker is not None:
            finish(attacker)
    _assert_refused(calls[1], "the connection is also held by process")


def test_a_connection_passed_over_scm_rights_is_refused(world: World) -> None:
    inbox = world.work / "inbox.sock"
    receiver = _spawn(world, "receive", world.agent.socket, world.binary, str(world.work), str(inbox))
    sender = None
    try:
        lines = Lines(receiver)
        lines.until("listening")
        sender = _spawn(world, "pass", world.agent.socket, world.binary, str(world.work), str(inbox))
        lines.until("done")
        calls = _calls(lines.events)
    finally:
        finish(receiver, *([sender] if sender is not None else []))
    _assert_refused(calls[1], "also held by process", "has exec'd a different program since")


def test_refusals_are_counted_by_reason_and_the_agent_logged_no_traceback(world: World) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{world.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    for reason in ("caller_changed", "shared_connection"):
        match = re.search(rf'tessera_agent_workload_attestation_failures_total{{reason="{reason}"}} (\S+)', text)
        assert match is not None and float(match.group(1)) >= 1, reason
    assert world.agent.healthy()
    assert "Traceback" not in world.agent.output()
