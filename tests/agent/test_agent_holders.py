"""Who holds a Workload API connection's client end: sock_diag messages (pure, against hand-made replies) and
the /proc descriptor scan against real processes and real sockets."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import os
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.procs import NOBODY, SYSTEM_PYTHON, as_user, short_dir

from tessera.agent.attestors import PeerCredentials, process_for
from tessera.agent.endpoint.holders import (
    CLOSED,
    NOT_HELD,
    SHARED_PREFIX,
    ConnectionGuard,
    connection_verdict,
)
from tessera.agent.endpoint.relay import capture_caller
from tessera.agent.endpoint.sockdiag import (
    NLMSG_ERROR,
    SOCK_DIAG_BY_FAMILY,
    UNIX_DIAG_PEER,
    parse_unix_diag_peer,
    peer_inode,
    unix_diag_request,
)
from tessera.agent.errors import CallerRefused

# -- sock_diag messages -------------------------------------------------------------------------------------


def _reply(inode: int, attrs: list[tuple[int, bytes]]) -> bytes:
    body = struct.pack("=BBBBI2I", socket.AF_UNIX, socket.SOCK_STREAM, 1, 0, inode, 7, 8)
    for kind, payload in attrs:
        attr = struct.pack("=HH", 4 + len(payload), kind) + payload
        body += attr + b"\0" * (-len(attr) % 4)
    return struct.pack("=IHHII", 16 + len(body), SOCK_DIAG_BY_FAMILY, 0, 1, 0) + body


def test_request_layout() -> None:
    msg = unix_diag_request(1234, seq=9)
    length, kind, flags, seq, _ = struct.unpack_from("=IHHII", msg)
    assert (length, kind, flags, seq) == (len(msg), SOCK_DIAG_BY_FAMILY, 1, 9)
    family, _, _, states, ino, show, c0, c1 = struct.unpack_from("=BBHIII2I", msg, 16)
    assert (family, states, ino, show, c0, c1) == (socket.AF_UNIX, 0xFFFFFFFF, 1234, 4, 0xFFFFFFFF, 0xFFFFFFFF)


def test_reply_parsing() -> None:
    name = (0, b"/run/x.sock\0")  # UNIX_DIAG_NAME, padded, before the peer
    assert parse_unix_diag_peer(_reply(1234, [name, (UNIX_DIAG_PEER, struct.pack("=I", 5678))]), 1234) == 5678
    assert parse_unix_diag_peer(_reply(1234, [name]), 1234) is None  # no peer: the other end is closed
    with pytest.raises(ValueError, match="not 1234"):
        parse_unix_diag_peer(_reply(99, []), 1234)
    error = struct.pack("=IHHII", 36, NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", -errno.ENOENT) + b"\0" * 16
    with pytest.raises(OSError) as info:
        parse_unix_diag_peer(error, 1234)
    assert info.value.errno == errno.ENOENT
    with pytest.raises(ValueError):
        parse_unix_diag_peer(_reply(1234, [])[:20], 1234)
    with pytest.raises(ValueError):
        parse_unix_diag_peer(b"", 1234)
    bad_attr = _reply(1234, [])[:-0] + b""
    bad_attr = bad_attr[:0] + struct.pack("=IHHII", 16 + 16 + 4, SOCK_DIAG_BY_FAMILY, 0, 1, 0) + bad_attr[16:32]
    bad_attr += struct.pack("=HH", 200, UNIX_DIAG_PEER)
    with pytest.raises(ValueError):
        parse_unix_diag_peer(bad_attr, 1234)


def test_the_kernel_names_the_peer() -> None:
    listener = socket.socket(socket.AF_UNIX)
    d = short_dir("tsh-")
    listener.bind(f"{d}/s")
    listener.listen()
    client = socket.socket(socket.AF_UNIX)
    client.connect(f"{d}/s")
    server, _ = listener.accept()
    try:
        assert peer_inode(os.fstat(server.fileno()).st_ino) == os.fstat(client.fileno()).st_ino
        client.close()
        assert peer_inode(os.fstat(server.fileno()).st_ino) is None
        assert peer_inode(2**32 - 2) is None  # no such socket
    finally:
        for s in (server, listener, client):
            s.close()
        os.unlink(f"{d}/s")
        os.rmdir(d)


# -- the scan, with real processes ---------------------------------------------------------------------------

HOLD = """
import os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
os.set_inheritable(s.fileno(), True)
if len(sys.argv) > 3:  # hand a copy to the process listening there
    r = socket.socket(socket.AF_UNIX)
    r.connect(sys.argv[3])
    socket.send_fds(r, [b"x"], [s.fileno()])
if sys.argv[2] == "fork" and os.fork() == 0:
    sys.stdout.write("child\\n"); sys.stdout.flush()
else:
    sys.stdout.write("ready\\n"); sys.stdout.flush()
sys.stdin.read()
"""


class World:
    def __init__(self) -> None:
        self.dir = short_dir("tsh-")
        self.path = f"{self.dir}/api.sock"
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(self.path)
        os.chmod(self.path, 0o777)
        self.listener.listen()
        self.children: list[subprocess.Popen[bytes]] = []
        self.accepted: list[socket.socket] = []

    def client(self, mode: str, uid: int = NOBODY, extra: str = "") -> tuple[subprocess.Popen[bytes], socket.socket]:
        child = subprocess.Popen(
            [*as_user(uid), SYSTEM_PYTHON, "-S", "-c", HOLD, self.path, mode, *([extra] if extra else [])],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd="/tmp",
        )
        self.children.append(child)
        conn, _ = self.listener.accept()
        self.accepted.append(conn)
        assert child.stdout is not None
        lines = {child.stdout.readline().strip() for _ in range(2 if mode == "fork" else 1)}
        assert lines == ({b"ready", b"child"} if mode == "fork" else {b"ready"})
        return child, conn

    def close(self) -> None:
        for child in self.children:
            if child.stdin is not None:
                child.stdin.close()
            child.wait(10)
        for s in [*self.accepted, self.listener]:
            s.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def world() -> Iterator[World]:
    w = World()
    try:
        yield w
    finally:
        w.close()


TRUSTED = frozenset({0})


def test_a_connection_held_only_by_its_process_passes(world: World) -> None:
    child, conn = world.client("alone")
    process = capture_caller(conn)
    assert process.pid == child.pid and process.uid == NOBODY
    assert connection_verdict(process, trusted_uids=TRUSTED, self_pid=os.getpid()) is None


def test_a_connection_inherited_by_a_forked_child_is_refused(world: World) -> None:
    _, conn = world.client("fork")
    process = capture_caller(conn)
    verdict = connection_verdict(process, trusted_uids=TRUSTED, self_pid=os.getpid())
    assert verdict is not None and verdict.startswith(SHARED_PREFIX) and f"(uid {NOBODY})" in verdict


RECEIVE = """
import os, socket, sys
r = socket.socket(socket.AF_UNIX)
r.bind(sys.argv[1])
os.chmod(sys.argv[1], 0o777)
r.listen()
sys.stdout.write("listening\\n"); sys.stdout.flush()
c, _ = r.accept()
_, fds, _, _ = socket.recv_fds(c, 16, 1)
sys.stdout.write("got\\n"); sys.stdout.flush()
sys.stdin.read()
"""


def test_a_holder_of_another_untrusted_uid_counts_too(world: World) -> None:
    """An attacker with two uids passes the socket over SCM_RIGHTS to its second one: still refused."""
    inbox = world.dir / "inbox"
    inbox.mkdir()
    os.chown(inbox, 1, 1)
    receiver = subprocess.Popen(
        [*as_user(1), SYSTEM_PYTHON, "-S", "-c", RECEIVE, str(inbox / "r.sock")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd="/tmp",
    )
    world.children.append(receiver)
    assert receiver.stdout is not None and receiver.stdout.readline() == b"listening\n"
    sender, conn = world.client("alone", extra=str(inbox / "r.sock"))
    assert receiver.stdout.readline() == b"got\n"
    process = capture_caller(conn)
    assert process.pid == sender.pid
    verdict = connection_verdict(process, trusted_uids=TRUSTED, self_pid=os.getpid())
    assert verdict is not None and verdict.startswith(f"{SHARED_PREFIX} {receiver.pid} (uid 1)")


def test_the_connecting_process_must_still_hold_it(world: World) -> None:
    child, conn = world.client("alone")
    process = capture_caller(conn)
    assert child.stdin is not None
    child.stdin.close()
    child.wait(10)
    verdict = connection_verdict(process, trusted_uids=TRUSTED, self_pid=os.getpid())
    assert verdict in (CLOSED, NOT_HELD)


def test_processes_of_trusted_uids_are_not_scanned(world: World) -> None:
    _, conn = world.client("fork", uid=0)  # root's forked child: trusted, so only the pid itself is checked
    process = capture_caller(conn)
    assert connection_verdict(process, trusted_uids=TRUSTED, self_pid=os.getpid()) is None
    verdict = connection_verdict(process, trusted_uids=frozenset(), self_pid=os.getpid())
    assert verdict is not None and verdict.startswith(SHARED_PREFIX)


def test_guard_checks_at_accept_and_at_each_call_only_while_enabled(world: World) -> None:
    enabled = [True]
    _, alone = world.client("alone")
    _, shared = world.client("fork")
    mine, forked = capture_caller(alone), capture_caller(shared)
    guard = ConnectionGuard(enabled=lambda: enabled[0], trusted_uids=TRUSTED)

    async def main() -> None:
        guard.accepted(mine)
        await guard.verify(mine)
        assert guard.scans == 2  # the accept-time scan and the call's own
        await guard.verify(mine)
        assert guard.scans == 3  # each call scans again (a descriptor can be received after accept)
        guard.accepted(forked)
        with pytest.raises(CallerRefused, match=SHARED_PREFIX):
            await guard.verify(forked)
        assert guard.scans == 4  # refused on the accept-time verdict
        guard.closed(mine)
        guard.closed(forked)
        unseen = dataclasses.replace(forked, exe=None)  # the agent could not see its executable:
        guard.accepted(unseen)
        await guard.verify(unseen)  # no unix:path / unix:sha256 for it, so nothing to protect
        assert guard.scans == 4
        enabled[0] = False
        guard.accepted(forked)
        await guard.verify(forked)  # no binary selector in use: nothing to protect, nothing scanned
        assert guard.scans == 4

    asyncio.run(asyncio.wait_for(main(), 30))


def test_process_for_rejects_a_pidfd_of_a_process_that_is_gone() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    pidfd = os.pidfd_open(child.pid)
    child.wait()
    me = os.getpid()
    try:
        with pytest.raises(CallerRefused, match="has exited"):
            # our own pid's facts, but the pidfd says the process that connected is gone (the pid was reused)
            process_for(PeerCredentials(pid=me, uid=0, gid=0), pidfd=pidfd)
    finally:
        os.close(pidfd)
    assert Path(f"/proc/{me}").exists()
