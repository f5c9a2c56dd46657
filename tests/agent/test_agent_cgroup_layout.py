"""Which cgroups prove a unit, a container or a pod: pure decisions over sample /proc/<pid>/cgroup and
mountinfo texts and directory owners (no cgroupfs needed; tests/hardening/test_trust_cgroup.py attacks the
real one)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from tessera.agent.attestors.cgroup_layout import (
    CgroupIdentity,
    cgroup_selectors,
    hierarchy_dirs,
    layout_identity,
    root_owned,
)
from tessera.agent.attestors.procfs import CgroupLine, parse_cgroup, parse_mountinfo

CID = "3f2a9c8e1d7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b2a19"
POD = "8b1f6c4e-2a3d-4e5f-9a8b-7c6d5e4f3a2b"
POD_ = POD.replace("-", "_")
STATIC_POD = "0123456789abcdef0123456789abcdef"


def root_everywhere(line: CgroupLine) -> Sequence[int]:
    return (0,) * (len([p for p in line.path.split("/") if p]) + 1)


def selectors(text: str) -> list[str]:
    return cgroup_selectors(parse_cgroup(text), root_everywhere)


# -- the runtimes' own layouts, read from the root ------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "unit", "container", "pod"),
    [
        ("/system.slice/nginx.service", "nginx.service", None, None),
        ("/system.slice/system-getty.slice/getty@tty1.service", "getty@tty1.service", None, None),
        ("/system.slice/nginx.service/worker", "nginx.service", None, None),  # below a unit: still the unit
        ("/init.scope", "init.scope", None, None),
        ("/user.slice/user-1000.slice/session-3.scope", "session-3.scope", None, None),
        (f"/system.slice/docker-{CID}.scope", f"docker-{CID}.scope", CID, None),
        (f"/docker/{CID}", None, CID, None),
        (f"/docker/{CID}/init.scope", None, CID, None),
        (f"/kubepods/burstable/pod{POD}/{CID}", None, CID, POD),
        (f"/kubepods/pod{POD}/{CID}", None, CID, POD),  # guaranteed QoS: no QoS level
        (f"/kubepods/besteffort/pod{POD}/crio-{CID}", None, CID, POD),
        (f"/kubepods/besteffort/pod{POD}", None, None, POD),
        (f"/kubepods/burstable/pod{STATIC_POD}/{CID}", None, CID, STATIC_POD),
        (
            f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{POD_}.slice/cri-containerd-{CID}.scope",
            f"cri-containerd-{CID}.scope",
            CID,
            POD,
        ),
        (
            f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_}.slice/crio-{CID}.scope",
            f"crio-{CID}.scope",
            CID,
            POD,
        ),
        (
            f"/kubepods.slice/kubepods-pod{POD_}.slice/cri-containerd-{CID}.scope",
            f"cri-containerd-{CID}.scope",
            CID,
            POD,
        ),
        (
            f"/system.slice/containerd.service/kubepods-burstable-pod{POD_}.slice:cri-containerd:{CID}",
            "containerd.service",
            CID,
            POD,
        ),
        (f"/machine.slice/libpod-{CID}.scope", f"libpod-{CID}.scope", CID, None),
        (f"/machine.slice/libpod-{CID}.scope/container", f"libpod-{CID}.scope", CID, None),
    ],
)
def test_runtime_layouts(path: str, unit: str | None, container: str | None, pod: str | None) -> None:
    assert layout_identity(path) == CgroupIdentity(unit, container, pod)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        # What a user builds under its delegated subtree names only the user manager, never what it spells.
        ("/user.slice/user-65534.slice/user@65534.service/payments.service", CgroupIdentity("user@65534.service")),
        (f"/user.slice/user-65534.slice/user@65534.service/docker-{CID}.scope", CgroupIdentity("user@65534.service")),
        (
            f"/user.slice/user-65534.slice/user@65534.service/kubepods-besteffort-pod{POD_}.slice/cri-containerd-{CID}.scope",
            CgroupIdentity("user@65534.service"),
        ),
        # Not where the runtime puts them: not at the root, or not in a pod's slice.
        (f"/tmp/docker/{CID}", CgroupIdentity()),
        (f"/somewhere/kubepods/burstable/pod{POD}/{CID}", CgroupIdentity()),
        (f"/kubepods.slice/cri-containerd-{CID}.scope", CgroupIdentity(f"cri-containerd-{CID}.scope")),
        (f"/system.slice/foo.service/docker-{CID}.scope", CgroupIdentity("foo.service")),
        ("/payments.service", CgroupIdentity()),  # a unit outside any slice (only PID 1's init.scope is)
        ("/system.slice/foo.slice/payments.service", CgroupIdentity()),  # nested slice not named system-*
        ("/system.slice/system-.slice/payments.service", CgroupIdentity()),
        ("/my-app.slice/payments.service", CgroupIdentity()),  # a top-level slice has no dash
        ("/system.slice", CgroupIdentity()),
        (f"/kubepods.slice/crio-conmon-{CID}.scope", CgroupIdentity(f"crio-conmon-{CID}.scope")),
        (f"/kubepods/burstable/pod{POD_}/{CID}", CgroupIdentity()),  # cgroupfs spells the uid with dashes
        (f"/../../kubepods/burstable/pod{POD}/{CID}", CgroupIdentity()),  # outside our cgroup namespace
        ("/process_api/f54cc276b6689ccd9945872b8f3b812c", CgroupIdentity()),
        ("/", CgroupIdentity()),
        ("relative/path", CgroupIdentity()),
    ],
)
def test_what_is_not_a_runtime_layout(path: str, expected: CgroupIdentity) -> None:
    assert layout_identity(path) == expected


# -- ownership: root all the way, or nothing ------------------------------------------------------------------


def test_root_owned_means_every_directory() -> None:
    assert root_owned((0, 0, 0))
    assert not root_owned((0, 0, 65534))
    assert not root_owned((0, 1000, 0))
    assert not root_owned(None)
    assert not root_owned(())


def test_a_delegated_directory_anywhere_on_the_path_voids_every_selector() -> None:
    text = f"0::/system.slice/docker-{CID}.scope\n"
    assert selectors(text) == [f"systemd:unit:docker-{CID}.scope", f"container:id:{CID}"]
    for owners in [(0, 0, 65534), (0, 65534, 0), (65534, 0, 0)]:
        assert cgroup_selectors(parse_cgroup(text), lambda line, o=owners: o) == []
    assert cgroup_selectors(parse_cgroup(text), lambda line: None) == []  # could not walk: nothing


def test_owners_are_looked_up_only_for_paths_that_name_something() -> None:
    asked: list[str] = []

    def owners(line: CgroupLine) -> Sequence[int]:
        asked.append(line.path)
        return root_everywhere(line)

    text = "12:pids:/user.slice\n1:name=systemd:/user.slice/user-1000.slice/session-2.scope\n0::/\n"
    assert cgroup_selectors(parse_cgroup(text), owners) == ["systemd:unit:session-2.scope"]
    assert asked == ["/user.slice/user-1000.slice/session-2.scope"]


# -- hierarchies: v2, v1, hybrid --------------------------------------------------------------------------------

V1_DOCKER = f"12:pids:/docker/{CID}\n11:memory:/docker/{CID}\n1:name=systemd:/docker/{CID}\n0::/\n"
HYBRID_SERVICE = "9:name=systemd:/system.slice/nginx.service\n4:memory:/system.slice/nginx.service\n0::/\n"
V1_CONTAINERD_IN_SERVICE = (
    f"1:name=systemd:/system.slice/containerd.service/kubepods-burstable-pod{POD_}.slice:cri-containerd:{CID}\n"
)


def test_v1_v2_and_hybrid_texts() -> None:
    assert selectors(V1_DOCKER) == [f"container:id:{CID}"]
    assert selectors(HYBRID_SERVICE) == ["systemd:unit:nginx.service"]
    assert selectors(V1_CONTAINERD_IN_SERVICE) == [
        "systemd:unit:containerd.service",
        f"container:id:{CID}",
        f"k8s:pod-uid:{POD}",
    ]
    # A unit is read only from the hierarchies systemd manages, not from a v1 controller's.
    assert selectors("4:memory:/system.slice/nginx.service\n0::/\n") == []


def test_the_first_trusted_hierarchy_wins_and_untrusted_ones_are_skipped() -> None:
    # v2 says one unit; the systemd v1 hierarchy (delegated to a user) says another: only the trusted one counts.
    text = "1:name=systemd:/system.slice/payments.service\n0::/system.slice/nginx.service\n"

    def owners(line: CgroupLine) -> Sequence[int]:
        return (0, 0, 65534) if "name=systemd" in line.controllers else (0, 0, 0)

    assert cgroup_selectors(parse_cgroup(text), owners) == ["systemd:unit:nginx.service"]


def test_a_text_with_two_lines_for_one_hierarchy_proves_nothing() -> None:
    # The kernel refuses "\n" in cgroup names; were one ever to slip through, a forged second line must not count.
    text = "1:name=systemd:/user.slice/x\n1:name=systemd:/system.slice/payments.service\n0::/\n"
    assert selectors(text) == []


MOUNTINFO_HYBRID = """\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime shared:9 - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
50 31 0:37 /system.slice /mnt/my\\040slice rw,relatime - cgroup cgroup rw,name=systemd
"""
MOUNTINFO_V2_SUBTREE = "60 31 0:40 /kubepods.slice /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"


def test_mountinfo_parsing() -> None:
    mounts = parse_mountinfo(MOUNTINFO_HYBRID + "garbage line\n")
    assert [m.mount_point for m in mounts][-1] == "/mnt/my slice"  # octal escapes undone
    systemd = [m for m in mounts if "name=systemd" in m.super_options]
    assert [(m.root, m.fstype) for m in systemd] == [("/", "cgroup"), ("/system.slice", "cgroup")]


@pytest.mark.parametrize(
    ("line", "mountinfo", "dirs"),
    [
        (
            "0::/system.slice/nginx.service",
            MOUNTINFO_HYBRID,
            [
                "/sys/fs/cgroup/unified",
                "/sys/fs/cgroup/unified/system.slice",
                "/sys/fs/cgroup/unified/system.slice/nginx.service",
            ],
        ),
        (
            "9:name=systemd:/system.slice/x.service",
            MOUNTINFO_HYBRID,  # the mount showing the whole hierarchy wins over the bind mount of a subtree
            [
                "/sys/fs/cgroup/systemd",
                "/sys/fs/cgroup/systemd/system.slice",
                "/sys/fs/cgroup/systemd/system.slice/x.service",
            ],
        ),
        (
            "2:cpu,cpuacct:/docker",
            MOUNTINFO_HYBRID,
            ["/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/cpu,cpuacct/docker"],
        ),
        ("3:pids:/docker", MOUNTINFO_HYBRID, None),  # not mounted here
        (
            "0::/kubepods.slice/kubepods-pod1.slice",
            MOUNTINFO_V2_SUBTREE,  # a mount whose root is not "/": the path is taken relative to it
            ["/sys/fs/cgroup", "/sys/fs/cgroup/kubepods-pod1.slice"],
        ),
        ("0::/system.slice/x.service", MOUNTINFO_V2_SUBTREE, None),  # outside the mounted subtree
        ("0::/../x", MOUNTINFO_HYBRID, None),
    ],
)
def test_hierarchy_dirs(line: str, mountinfo: str, dirs: list[str] | None) -> None:
    assert hierarchy_dirs(parse_cgroup(line)[0], parse_mountinfo(mountinfo)) == dirs
