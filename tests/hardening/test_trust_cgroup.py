"""Forged cgroup selectors, for real (issue 12, item 3).

In the host's real cgroupfs (every hierarchy systemd would manage: cgroup v2 and/or v1 ``name=systemd``; this
machine is hybrid), root builds what systemd gives a user: ``/user.slice/user-65534.slice/user@65534.service``
owned by nobody (Delegate=yes). As nobody, a process creates ``pay<run>.service``, ``docker-<64 hex>.scope`` and
``kubepods-besteffort-pod<uid>.slice/cri-containerd-<id>.scope`` in it, moves itself there and asks a real agent
for the SVIDs of entries selecting exactly those names: it must get only its ``unix:uid`` identity. Likewise a
system service delegated to nobody (``/system.slice/tsd<run>.service`` owned by nobody: on cgroup v1 any
nobody process may join it) proves nothing. A process root places in root-owned
``/system.slice/tsr<run>.service``, ``/system.slice/docker-<id>.scope`` and a kubepods pod slice does get the
unit, container and pod identities: the feature still works. Names are unique per run and removed afterwards.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hardening_support import agent_proc, server_proc
from support.inproc import TD
from support.procs import NOBODY, TesseraAgent, TesseraServer, short_dir
from trust_support import FETCH, Lines, finish, send, spawn

from tessera.agent.attestors.procfs import parse_mountinfo

pytestmark = pytest.mark.slow

AGENT_ID = f"spiffe://{TD}/host/cgroup"
CONTROL = f"spiffe://{TD}/nobody"
USER_MANAGER = "user.slice/user-65534.slice/user@65534.service"

# As nobody: report our pid, wait until root has placed us, move ourselves into each [mount, path] (creating
# the directories), say where we are, then fetch from the agent ourselves.
MOVE_AND_FETCH = (
    FETCH
    + """
import os
agent_sock, moves = sys.argv[1], json.loads(sys.argv[2])
say(pid=os.getpid())
sys.stdin.readline()
for mount, path in moves:
    d = os.path.join(mount, path)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
say(cgroup=open("/proc/self/cgroup").read())
fetch(agent_sock)
"""
)


def _hierarchies() -> list[str]:
    """Mount points of the hierarchies systemd manages here: cgroup v2 and v1 ``name=systemd``."""
    with open("/proc/self/mountinfo") as f:
        mounts = parse_mountinfo(f.read())
    return [
        m.mount_point
        for m in mounts
        if m.root == "/" and (m.fstype == "cgroup2" or (m.fstype == "cgroup" and "name=systemd" in m.super_options))
    ]


@dataclass
class Tree:
    """Directories made in every hierarchy for this run (removed deepest first)."""

    mounts: list[str]
    made: list[str] = field(default_factory=list)

    def make(self, path: str, owner: int = 0) -> None:
        for mount in self.mounts:
            current = mount
            for part in path.split("/"):
                current = os.path.join(current, part)
                if not os.path.isdir(current):
                    os.mkdir(current)
                    self.made.append(current)
            if owner:
                for name in ["", *os.listdir(current)]:
                    os.chown(os.path.join(current, name), owner, owner)  # what systemd does for Delegate=yes

    def place(self, pid: int, path: str, mounts: list[str] | None = None) -> None:
        for mount in mounts if mounts is not None else self.mounts:
            with open(os.path.join(mount, path, "cgroup.procs"), "w") as f:
                f.write(str(pid))

    def remove(self) -> None:
        for mount in self.mounts:  # whatever nobody made under what we made, deepest first
            for made in [d for d in self.made if d.startswith(mount)]:
                for dirpath, _, _ in sorted(os.walk(made), key=lambda w: -w[0].count("/")):
                    with contextlib.suppress(OSError):
                        os.rmdir(dirpath)
        for made in reversed(self.made):
            with contextlib.suppress(OSError):
                os.rmdir(made)


@dataclass
class World:
    server: TesseraServer
    agent: TesseraAgent
    tree: Tree
    run: str
    cids: dict[str, str]
    pods: dict[str, str]


def _writable_mounts() -> list[str]:
    mounts = _hierarchies()
    if not mounts:
        pytest.skip("no cgroup v2 or v1 name=systemd hierarchy is mounted here")
    probe = f"tessera-probe-{uuid.uuid4().hex[:8]}"
    for mount in mounts:
        try:
            os.mkdir(os.path.join(mount, probe))
        except OSError as exc:
            if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                pytest.skip(f"cgroupfs is not writable here ({mount}: {exc.strerror})")
            raise
        os.rmdir(os.path.join(mount, probe))
    for mount in mounts:
        if os.path.exists(os.path.join(mount, USER_MANAGER)):
            pytest.skip(f"{mount}/{USER_MANAGER} already exists (a real user manager for nobody?)")
    return mounts


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    tree = Tree(_writable_mounts())
    run = uuid.uuid4().hex[:8]
    cids = {name: os.urandom(32).hex() for name in ("forged_docker", "forged_pod", "real_docker", "real_pod")}
    pods = {name: str(uuid.uuid4()) for name in ("forged", "real")}
    root = short_dir("ttcg-")
    server = server_proc(root)
    agent: TesseraAgent | None = None
    try:
        tree.make(USER_MANAGER.rsplit("/", 1)[0])
        tree.make(USER_MANAGER, owner=NOBODY)
        tree.make(f"system.slice/tsd{run}.service", owner=NOBODY)  # a Delegate=yes service with User=nobody
        tree.make(f"system.slice/tsr{run}.service")
        tree.make(f"system.slice/docker-{cids['real_docker']}.scope")
        pod_slice = f"kubepods-besteffort-pod{pods['real'].replace('-', '_')}.slice"
        tree.make(f"kubepods.slice/kubepods-besteffort.slice/{pod_slice}/cri-containerd-{cids['real_pod']}.scope")
        server.start_and_wait()
        server.write_bundle(root / "bundle.pem")
        entries = {
            "/forged/unit": f"systemd:unit:pay{run}.service",
            "/forged/delegated-unit": f"systemd:unit:tsd{run}.service",
            "/forged/docker": f"container:id:{cids['forged_docker']}",
            "/forged/pod": f"k8s:pod-uid:{pods['forged']}",
            "/forged/pod-container": f"container:id:{cids['forged_pod']}",
            "/real/unit": f"systemd:unit:tsr{run}.service",
            "/real/docker": f"container:id:{cids['real_docker']}",
            "/real/pod": f"k8s:pod-uid:{pods['real']}",
            "/nobody": f"unix:uid:{NOBODY}",
        }
        for path, selector in entries.items():
            server.admin(
                "entry", "create", "--spiffe-id", f"spiffe://{TD}{path}", "--parent-id", AGENT_ID,
                "--selector", selector,
            )  # fmt: skip
        agent = agent_proc(root, server, "agent", "--join-token", server.join_token(AGENT_ID)).start_and_wait()
        yield World(server, agent, tree, run, cids, pods)
    finally:
        if agent is not None:
            agent.stop()
        server.stop()
        tree.remove()
        shutil.rmtree(root, ignore_errors=True)


def _run_in(world: World, placed_in: str | None, moves: list[str]) -> dict[str, Any]:
    """A nobody process, placed by root in ``placed_in`` (as systemd would), moving itself into each of
    ``moves`` (relative to the hierarchies' roots, created as nobody); returns its cgroup and fetch result."""
    mounts = world.tree.mounts
    child = spawn(NOBODY, MOVE_AND_FETCH, world.agent.socket, json.dumps([[m, p] for p in moves for m in mounts]))
    try:
        lines = Lines(child)
        pid = lines.until("pid")["pid"]
        if placed_in is not None:
            world.tree.place(pid, placed_in)
        send(child)
        where = lines.until("cgroup")["cgroup"]
        result = lines.until("fetch")
    finally:
        finish(child)
    for path in moves[-1:] or ([placed_in] if placed_in else []):
        assert f":/{path}\n" in where, f"the process is not where the test put it: {where}"  # the move worked
    return result


def test_forged_names_under_the_users_delegated_subtree_prove_nothing(world: World) -> None:
    forged_pod = f"kubepods-besteffort-pod{world.pods['forged'].replace('-', '_')}.slice"
    results = {}
    for inside in (
        f"pay{world.run}.service",
        f"docker-{world.cids['forged_docker']}.scope",
        f"{forged_pod}/cri-containerd-{world.cids['forged_pod']}.scope",
    ):
        results[inside] = _run_in(world, USER_MANAGER, [f"{USER_MANAGER}/{inside}"])
    assert results == {key: {"fetch": "OK", "ids": [CONTROL]} for key in results}


def test_a_service_delegated_to_the_user_proves_nothing(world: World) -> None:
    """``/system.slice/tsd<run>.service`` has the layout of a real unit, but nobody owns it (on cgroup v1,
    nobody may join it from anywhere): no ``systemd:unit`` selector."""
    unit = f"system.slice/tsd{world.run}.service"
    v1 = [m for m in world.tree.mounts if not os.path.exists(os.path.join(m, "cgroup.controllers"))]
    v2 = [m for m in world.tree.mounts if m not in v1]
    # cgroup v2 lets nobody move only below a cgroup it may write: root places the process (as systemd
    # places the service's own processes); on v1 the process joins by itself.
    child = spawn(NOBODY, MOVE_AND_FETCH, world.agent.socket, json.dumps([[m, unit] for m in v1]))
    try:
        lines = Lines(child)
        pid = lines.until("pid")["pid"]
        world.tree.place(pid, unit, v2)
        send(child)
        where = lines.until("cgroup")["cgroup"]
        result = lines.until("fetch")
    finally:
        finish(child)
    assert f":/{unit}\n" in where, where
    assert result == {"fetch": "OK", "ids": [CONTROL]}, result


def test_root_owned_runtime_cgroups_still_prove_unit_container_and_pod(world: World) -> None:
    pod_slice = f"kubepods-besteffort-pod{world.pods['real'].replace('-', '_')}.slice"
    for placed_in, expected in (
        (f"system.slice/tsr{world.run}.service", f"spiffe://{TD}/real/unit"),
        (f"system.slice/docker-{world.cids['real_docker']}.scope", f"spiffe://{TD}/real/docker"),
        (
            f"kubepods.slice/kubepods-besteffort.slice/{pod_slice}/cri-containerd-{world.cids['real_pod']}.scope",
            f"spiffe://{TD}/real/pod",
        ),
    ):
        result = _run_in(world, placed_in, [])
        assert result["fetch"] == "OK" and expected in result["ids"] and CONTROL in result["ids"], result
        assert not any("/forged/" in i for i in result["ids"]), result


def test_the_agent_logged_no_traceback(world: World) -> None:
    assert world.agent.healthy()
    assert "Traceback" not in world.agent.output()
