"""Selectors from the caller's cgroup: container id, Kubernetes pod UID and systemd unit.

The cgroup path is set by the kernel when the container runtime or systemd places the process, and the
process cannot leave it without privileges, which makes it a kernel fact worth selecting on. Layouts
covered (cgroup v1 and v2, cgroupfs and systemd drivers):

- Docker:      ``/docker/<id>``, ``/system.slice/docker-<id>.scope``
- containerd:  ``/kubepods/burstable/pod<uid>/<id>``,
               ``/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<u_i_d>.slice/cri-containerd-<id>.scope``,
               ``/system.slice/containerd.service/kubepods-...-pod<u_i_d>.slice:cri-containerd:<id>``
- CRI-O:       ``.../crio-<id>.scope``
- Podman:      ``/machine.slice/libpod-<id>.scope``
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from tessera.agent.attestors.base import ProcessInfo
from tessera.agent.attestors.procfs import CgroupLine, parse_cgroup

_CONTAINER_ID = re.compile(r"(?<![0-9a-f])([0-9a-f]{64})(?![0-9a-f])")
_POD_UID = re.compile(
    r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}|[0-9a-f]{32})(?:\.slice)?(?=/|:|$)"
)
_UNIT_SUFFIXES = (".service", ".scope")
# conmon (CRI-O's monitor) lives in its own scope next to the container; it is not the container.
_NOT_A_CONTAINER = re.compile(r"crio-conmon-[0-9a-f]{64}\.scope")


def _relevant_paths(lines: Sequence[CgroupLine]) -> list[str]:
    """The unified (v2) path first, then the v1 paths; they normally all name the same container."""
    unified = [line.path for line in lines if line.hierarchy_id == 0 and not line.controllers]
    systemd = [line.path for line in lines if "name=systemd" in line.controllers]
    others = [line.path for line in lines if line.path not in unified and line.path not in systemd]
    return unified + systemd + others


def container_id_from_cgroups(lines: Sequence[CgroupLine]) -> str | None:
    for path in _relevant_paths(lines):
        if _NOT_A_CONTAINER.search(path):
            continue
        matches = _CONTAINER_ID.findall(path)
        if matches:
            return str(matches[-1])
    return None


def pod_uid_from_cgroups(lines: Sequence[CgroupLine]) -> str | None:
    for path in _relevant_paths(lines):
        if "kubepods" not in path:
            continue
        matches = _POD_UID.findall(path)
        if matches:
            uid = str(matches[-1]).replace("_", "-")
            return uid
    return None


def systemd_unit_from_cgroups(lines: Sequence[CgroupLine]) -> str | None:
    """The deepest ``.service`` / ``.scope`` component of the systemd-managed path (v2 or name=systemd)."""
    candidates = [line.path for line in lines if line.hierarchy_id == 0 and not line.controllers]
    candidates += [line.path for line in lines if "name=systemd" in line.controllers]
    for path in candidates:
        for component in reversed(path.split("/")):
            # containerd's systemd driver appends ":cri-containerd:<id>" to the slice component
            component = component.split(":", 1)[0]
            if component.endswith(_UNIT_SUFFIXES) and len(component) > len(".scope"):
                return component
    return None


def selectors_from_cgroup_text(text: str) -> list[str]:
    lines = parse_cgroup(text)
    selectors: list[str] = []
    unit = systemd_unit_from_cgroups(lines)
    if unit:
        selectors.append(f"systemd:unit:{unit}")
    container = container_id_from_cgroups(lines)
    if container:
        selectors.append(f"container:id:{container}")
    pod = pod_uid_from_cgroups(lines)
    if pod:
        selectors.append(f"k8s:pod-uid:{pod}")
    return selectors


class CgroupAttestor:
    """systemd unit, container id and pod UID from /proc/<pid>/cgroup."""

    name = "cgroup"

    def __init__(self, proc_root: str = "/proc") -> None:
        self._proc = Path(proc_root)

    async def attest(self, process: ProcessInfo) -> Sequence[str]:
        try:
            text = (self._proc / str(process.pid) / "cgroup").read_text()
        except FileNotFoundError:
            return ()
        return selectors_from_cgroup_text(text)
