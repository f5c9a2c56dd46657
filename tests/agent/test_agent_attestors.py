"""Workload attestors: pure parsing of /proc texts, and the attestors against a real process."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tessera.agent.attestors import (
    CgroupAttestor,
    DigestCache,
    PeerCredentials,
    UnixAttestor,
    attest,
    default_attestors,
    process_for,
)
from tessera.agent.attestors.cgroup import (
    container_id_from_cgroups,
    pod_uid_from_cgroups,
    selectors_from_cgroup_text,
    systemd_unit_from_cgroups,
)
from tessera.agent.attestors.procfs import parse_cgroup, parse_stat_start_time, parse_status
from tessera.agent.errors import AttestationError

CID = "3f2a9c8e1d7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b2a19"
POD = "8b1f6c4e-2a3d-4e5f-9a8b-7c6d5e4f3a2b"


def test_stat_start_time_survives_parentheses_and_spaces_in_name() -> None:
    fields = " ".join(str(i) for i in range(3, 53))  # field 3 .. 52
    text = f"1234 (evil) name (x)) {fields}\n"
    # field 22 is the 20th field after the command name
    assert parse_stat_start_time(text) == 22


def test_stat_start_time_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        parse_stat_start_time("no parenthesis here")
    with pytest.raises(ValueError):
        parse_stat_start_time("1 (x) S 1 2")


def test_status_parsing() -> None:
    text = (
        "Name:\tpython3\nUmask:\t0022\nState:\tS (sleeping)\nUid:\t1000\t1000\t1000\t1000\n"
        "Gid:\t100\t100\t100\t100\nFDSize:\t64\nGroups:\t4 24 27 \n"
    )
    st = parse_status(text)
    assert st.uids == (1000, 1000, 1000, 1000)
    assert st.gids == (100, 100, 100, 100)
    assert st.groups == (4, 24, 27)
    assert parse_status("Uid:\t0 0 0 0\nGid:\t0 0 0 0\nGroups:\t\n").groups == ()
    with pytest.raises(ValueError):
        parse_status("Name:\tx\n")


V1_DOCKER = f"""12:pids:/docker/{CID}
11:memory:/docker/{CID}
1:name=systemd:/docker/{CID}
0::/
"""
V2_DOCKER_SYSTEMD = f"0::/system.slice/docker-{CID}.scope\n"
V1_K8S_CGROUPFS = f"""11:cpuset:/kubepods/burstable/pod{POD}/{CID}
1:name=systemd:/kubepods/burstable/pod{POD}/{CID}
"""
V2_K8S_CONTAINERD = (
    "0::/kubepods.slice/kubepods-besteffort.slice/"
    f"kubepods-besteffort-pod{POD.replace('-', '_')}.slice/cri-containerd-{CID}.scope\n"
)
V2_K8S_CRIO = (
    "0::/kubepods.slice/kubepods-burstable.slice/"
    f"kubepods-burstable-pod{POD.replace('-', '_')}.slice/crio-{CID}.scope\n"
)
V1_CONTAINERD_IN_SERVICE = (
    "1:name=systemd:/system.slice/containerd.service/"
    f"kubepods-burstable-pod{POD.replace('-', '_')}.slice:cri-containerd:{CID}\n"
)
V2_PODMAN = f"0::/machine.slice/libpod-{CID}.scope/container\n"
V2_SERVICE = "0::/system.slice/nginx.service\n"
V2_USER_SERVICE = "0::/user.slice/user-1000.slice/user@1000.service/app.slice/myapp.service\n"
V2_ROOT = "0::/\n"


@pytest.mark.parametrize(
    ("text", "container", "pod", "unit"),
    [
        (V1_DOCKER, CID, None, None),
        (V2_DOCKER_SYSTEMD, CID, None, f"docker-{CID}.scope"),
        (V1_K8S_CGROUPFS, CID, POD, None),
        (V2_K8S_CONTAINERD, CID, POD, f"cri-containerd-{CID}.scope"),
        (V2_K8S_CRIO, CID, POD, f"crio-{CID}.scope"),
        (V1_CONTAINERD_IN_SERVICE, CID, POD, "containerd.service"),
        (V2_PODMAN, CID, None, f"libpod-{CID}.scope"),
        (V2_SERVICE, None, None, "nginx.service"),
        (V2_USER_SERVICE, None, None, "myapp.service"),
        (V2_ROOT, None, None, None),
        ("4:memory:/process_api/f54cc276b6689ccd9945872b8f3b812c\n0::/\n", None, None, None),
    ],
)
def test_cgroup_patterns(text: str, container: str | None, pod: str | None, unit: str | None) -> None:
    lines = parse_cgroup(text)
    assert container_id_from_cgroups(lines) == container
    assert pod_uid_from_cgroups(lines) == pod
    assert systemd_unit_from_cgroups(lines) == unit


def test_cgroup_selectors() -> None:
    assert selectors_from_cgroup_text(V2_K8S_CONTAINERD) == [
        f"systemd:unit:cri-containerd-{CID}.scope",
        f"container:id:{CID}",
        f"k8s:pod-uid:{POD}",
    ]
    assert selectors_from_cgroup_text(V2_ROOT) == []


def test_crio_conmon_is_not_the_container() -> None:
    lines = parse_cgroup(f"0::/kubepods.slice/crio-conmon-{CID}.scope\n")
    assert container_id_from_cgroups(lines) is None


def test_malformed_cgroup_line() -> None:
    with pytest.raises(ValueError):
        parse_cgroup("garbage\n")


def _fake_proc(root: Path, pid: int, start: int, cgroup: str, exe: str) -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    fields = ["S"] + ["0"] * 18 + [str(start)] + ["0"] * 30
    (d / "stat").write_text(f"{pid} (fake) {' '.join(fields)}\n")
    (d / "status").write_text("Uid:\t1000\t1000\t1000\t1000\nGid:\t1000\t1000\t1000\t1000\nGroups:\t0 1000\n")
    (d / "cgroup").write_text(cgroup)
    os.symlink(exe, d / "exe")


def test_pipeline_on_a_fake_proc_tree_and_pid_reuse_guard(tmp_path: Path) -> None:
    exe = tmp_path / "bin"
    exe.write_bytes(b"#!/bin/true\n")
    _fake_proc(tmp_path, 4242, 777, V2_K8S_CONTAINERD, str(exe))
    creds = PeerCredentials(pid=4242, uid=1000, gid=1000)
    process = process_for(creds, str(tmp_path))
    assert process.start_time == 777
    selectors = asyncio.run(attest(process, default_attestors(str(tmp_path)), str(tmp_path)))
    assert {"unix:uid:1000", "unix:gid:1000", "unix:supplementary_gid:0", f"unix:path:{exe}"} <= selectors
    assert f"unix:sha256:{hashlib.sha256(b'#!/bin/true' + bytes([10])).hexdigest()}" in selectors
    assert f"container:id:{CID}" in selectors and f"k8s:pod-uid:{POD}" in selectors
    assert "unix:supplementary_group:root" in selectors

    # The PID now belongs to another process (different start time): refused, whatever it claims.
    shutil.rmtree(tmp_path / "4242")
    _fake_proc(tmp_path, 4242, 999, V2_ROOT, str(exe))
    with pytest.raises(AttestationError, match="PID reused"):
        asyncio.run(attest(process, default_attestors(str(tmp_path)), str(tmp_path)))
    shutil.rmtree(tmp_path / "4242")
    with pytest.raises(AttestationError, match="exited"):
        asyncio.run(attest(process, default_attestors(str(tmp_path)), str(tmp_path)))


def test_digest_cached_by_file_identity(tmp_path: Path) -> None:
    f = tmp_path / "prog"
    f.write_bytes(b"one")
    cache = DigestCache()
    d1 = asyncio.run(cache.digest(str(f)))
    d2 = asyncio.run(cache.digest(str(f)))
    assert d1 == d2 == hashlib.sha256(b"one").hexdigest()
    assert cache.computed == 1
    # Rewritten in place with a different size/mtime: hashed again.
    f.write_bytes(b"second")
    os.utime(f, ns=(1, 1_000_000_000))
    assert asyncio.run(cache.digest(str(f))) == hashlib.sha256(b"second").hexdigest()
    assert cache.computed == 2


def test_real_child_process_selectors() -> None:
    """A real process (this interpreter's child) is attested from /proc: path and digest of its binary."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        creds = PeerCredentials(pid=child.pid, uid=os.getuid(), gid=os.getgid())
        process = process_for(creds)
        unix = UnixAttestor()
        selectors = None
        for _ in range(100):  # wait until the child has exec'd python (not the forked parent image)
            selectors = asyncio.run(attest(process, [unix, CgroupAttestor()]))
            if f"unix:path:{os.path.realpath(sys.executable)}" in selectors:
                break
            asyncio.run(asyncio.sleep(0.05))
        assert selectors is not None
        real = os.path.realpath(sys.executable)
        assert f"unix:path:{real}" in selectors
        assert f"unix:sha256:{hashlib.sha256(Path(real).read_bytes()).hexdigest()}" in selectors
        assert f"unix:uid:{os.getuid()}" in selectors and "unix:user:root" in selectors
        before = unix.digests.computed
        asyncio.run(attest(process, [unix]))
        assert unix.digests.computed == before  # never recomputed per call
    finally:
        child.kill()
        child.wait()
    with pytest.raises(AttestationError):
        asyncio.run(attest(process, [UnixAttestor()]))


def test_no_pid() -> None:
    with pytest.raises(AttestationError):
        process_for(PeerCredentials(pid=0, uid=0, gid=0))

