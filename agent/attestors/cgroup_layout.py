"""Which cgroups prove a systemd unit, a container or a pod: pure decisions over paths and directory owners.

- A cgroup name is not secret and not reserved: anyone who may create directories in a cgroup hierarchy can
  spell ``payments.service``, ``docker-<id>.scope`` or ``kubepods-...-pod<uid>.slice``. systemd hands every
  user such a place (``user@UID.service``, Delegate=yes, owned by the user), and on cgroup v1 anyone may join
  a cgroup whose ``cgroup.procs`` they can write. So a name proves something only where nobody but root can
  create directories or place processes: every directory from the hierarchy's root down to the process's
  cgroup must be owned by root.
- Root-owned is necessary, not sufficient: the name must also sit where the runtime itself puts it, read from
  the root of the hierarchy, never "the deepest match anywhere". The layouts: systemd's slice tree
  (``/system.slice/[system-x.slice/]<unit>.service|.scope``, each nested slice named after its parent), the
  systemd-driver container scopes inside it (``docker-``, ``cri-containerd-``, ``crio-``, ``libpod-<id>.scope``,
  under ``/kubepods.slice/...-pod<uid>.slice/`` for pods), containerd's ``<pod>.slice:cri-containerd:<id>``
  directly below a unit, and the cgroupfs driver spellings ``/docker/<id>`` and ``/kubepods[/qos]/pod<uid>/<id>``.
- Everything below the identifying directory still belongs to it (a container's own sub-cgroups), so deeper
  components change nothing; the walk over owners covers them too.

:func:`cgroup_selectors` takes the owners through a callback, so the I/O (stat of each directory) happens only
for paths whose layout names something; tests hand in owners directly.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from tessera.agent.attestors.procfs import CgroupLine, Mount

_HEX64 = r"[0-9a-f]{64}"
_UUID_DASH = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32}"
_UUID_UNDERSCORE = r"[0-9a-f]{8}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{12}|[0-9a-f]{32}"
_QOS = r"(?:-besteffort|-burstable)?"

# systemd driver: the container's scope unit (conmon's "crio-conmon-<id>.scope" does not match: not the container)
_CONTAINER_SCOPE = re.compile(rf"(?:docker|cri-containerd|crio|libpod)-({_HEX64})\.scope")
_POD_SLICE = re.compile(rf"kubepods{_QOS}-pod({_UUID_UNDERSCORE})")  # a slice name without ".slice"
# containerd's systemd driver on cgroup v1 leaves "<pod slice>:cri-containerd:<id>" directly below its unit
_CONTAINERD_V1 = re.compile(rf"kubepods{_QOS}-pod({_UUID_UNDERSCORE})\.slice:cri-containerd:({_HEX64})")
# cgroupfs driver
_POD_DIR = re.compile(rf"pod({_UUID_DASH})")
_CONTAINER_DIR = re.compile(rf"(?:crio-)?({_HEX64})")
_QOS_DIRS = ("besteffort", "burstable")
_UNIT_SUFFIXES = (".service", ".scope")


@dataclass(frozen=True, slots=True)
class CgroupIdentity:
    """What a cgroup path says about its processes, by layout alone (ownership is decided apart)."""

    unit: str | None = None
    container: str | None = None
    pod: str | None = None

    def __bool__(self) -> bool:
        return bool(self.unit or self.container or self.pod)


def _pod_uid(text: str) -> str:
    return text.replace("_", "-")


def _systemd_identity(parts: Sequence[str]) -> CgroupIdentity:
    """systemd's tree: slices from the root, each named ``<parent>-<name>.slice``, then one unit."""
    slices: list[str] = []
    i = 0
    while i < len(parts) and parts[i].endswith(".slice"):
        name = parts[i][: -len(".slice")]
        parent = slices[-1] if slices else ""
        if not name or (not parent and "-" in name) or (parent and not name.startswith(parent + "-")):
            return CgroupIdentity()  # not a slice systemd would have made here
        if parent and len(name) == len(parent) + 1:
            return CgroupIdentity()
        slices.append(name)
        i += 1
    if i >= len(parts) or not parts[i].endswith(_UNIT_SUFFIXES) or len(parts[i]) <= len(".scope"):
        return CgroupIdentity()
    unit = parts[i]
    if not slices and unit != "init.scope":
        return CgroupIdentity()  # every unit but PID 1's lives in a slice
    identity = CgroupIdentity(unit=unit)
    in_kubepods = bool(slices) and slices[0] == "kubepods"
    scope = _CONTAINER_SCOPE.fullmatch(unit)
    if scope:
        if not in_kubepods:
            identity = replace(identity, container=scope.group(1))
        else:
            pod = _POD_SLICE.fullmatch(slices[-1])
            if pod:  # a pod's containers sit directly in the pod's slice
                identity = replace(identity, container=scope.group(1), pod=_pod_uid(pod.group(1)))
    if i + 1 < len(parts) and not in_kubepods:
        legacy = _CONTAINERD_V1.fullmatch(parts[i + 1])
        if legacy:
            identity = replace(identity, container=legacy.group(2), pod=_pod_uid(legacy.group(1)))
    return identity


def _cgroupfs_identity(parts: Sequence[str]) -> CgroupIdentity:
    """The cgroupfs driver: ``/docker/<id>`` and ``/kubepods[/besteffort|/burstable]/pod<uid>[/<id>]``."""
    if parts[0] == "docker":
        if len(parts) >= 2 and re.fullmatch(_HEX64, parts[1]):
            return CgroupIdentity(container=parts[1])
        return CgroupIdentity()
    rest = list(parts[1:])
    if rest and rest[0] in _QOS_DIRS:
        rest = rest[1:]
    pod = _POD_DIR.fullmatch(rest[0]) if rest else None
    if pod is None:
        return CgroupIdentity()
    container = _CONTAINER_DIR.fullmatch(rest[1]) if len(rest) >= 2 else None
    return CgroupIdentity(container=container.group(1) if container else None, pod=pod.group(1))


def layout_identity(path: str) -> CgroupIdentity:
    """The unit, container and pod a cgroup path names when it follows a runtime's own layout from the root."""
    if not path.startswith("/"):
        return CgroupIdentity()
    parts = [p for p in path.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        return CgroupIdentity()  # "/.." appears for cgroups outside the reader's cgroup namespace
    if parts[0] in ("docker", "kubepods"):
        return _cgroupfs_identity(parts)
    return _systemd_identity(parts)


def root_owned(owners: Sequence[int] | None) -> bool:
    """Every directory from the hierarchy's root to the cgroup is owned by root (None: could not be walked)."""
    return owners is not None and len(owners) > 0 and all(uid == 0 for uid in owners)


def _is_unified(line: CgroupLine) -> bool:
    return line.hierarchy_id == 0 and not line.controllers


def _is_systemd(line: CgroupLine) -> bool:
    return _is_unified(line) or "name=systemd" in line.controllers


def ordered_lines(lines: Sequence[CgroupLine]) -> list[CgroupLine]:
    """cgroup v2 first, then systemd's v1 hierarchy, then the v1 controllers (they normally agree)."""
    return sorted(lines, key=lambda line: 0 if _is_unified(line) else 1 if _is_systemd(line) else 2)


def well_formed(lines: Sequence[CgroupLine]) -> bool:
    """One line per hierarchy, as the kernel writes it: anything else is not a text to draw conclusions from."""
    ids = [line.hierarchy_id for line in lines]
    return bool(lines) and len(ids) == len(set(ids))


def _relative(path: str, root: str) -> list[str] | None:
    parts = [p for p in path.split("/") if p]
    base = [p for p in root.split("/") if p]
    if any(p in (".", "..") for p in parts) or parts[: len(base)] != base:
        return None
    return parts[len(base) :]


def hierarchy_dirs(line: CgroupLine, mounts: Sequence[Mount]) -> list[str] | None:
    """The directories, from the hierarchy's mount point down to the process's cgroup, that hold ``line``'s
    cgroup in this mount namespace; None when no mount of that hierarchy shows it.

    A mount's root need not be the hierarchy's root (a container sees only its own subtree): the path is then
    taken relative to it, and the mount showing the most of the hierarchy wins. Directories above a mount's
    root cannot be seen; they hold the agent's own view of the hierarchy and are taken as its operator set it.
    """
    if _is_unified(line):
        candidates = [m for m in mounts if m.fstype == "cgroup2"]
    else:
        wanted = set(line.controllers)
        candidates = [m for m in mounts if m.fstype == "cgroup" and wanted and wanted <= m.super_options]
    best: tuple[Mount, list[str]] | None = None
    for mount in candidates:
        relative = _relative(line.path, mount.root)
        if relative is not None and (best is None or len(mount.root) < len(best[0].root)):
            best = (mount, relative)
    if best is None:
        return None
    mount, relative = best
    dirs = [mount.mount_point]
    for part in relative:
        dirs.append(dirs[-1].rstrip("/") + "/" + part)
    return dirs


def cgroup_selectors(lines: Sequence[CgroupLine], owners_of: Callable[[CgroupLine], Sequence[int] | None]) -> list[str]:
    """Selectors for the process in these cgroups: each fact from the first hierarchy (v2, then systemd's, then
    the controllers) whose path names it by layout and whose directories are all root's. A systemd unit is read
    only from the hierarchies systemd manages (v2 and ``name=systemd``)."""
    if not well_formed(lines):
        return []
    unit: str | None = None
    container: str | None = None
    pod: str | None = None
    for line in ordered_lines(lines):
        identity = layout_identity(line.path)
        if not _is_systemd(line):
            identity = replace(identity, unit=None)
        new = (identity.unit and not unit) or (identity.container and not container) or (identity.pod and not pod)
        if not new or not root_owned(owners_of(line)):
            continue
        unit = unit or identity.unit
        container = container or identity.container
        pod = pod or identity.pod
    selectors = []
    if unit:
        selectors.append(f"systemd:unit:{unit}")
    if container:
        selectors.append(f"container:id:{container}")
    if pod:
        selectors.append(f"k8s:pod-uid:{pod}")
    return selectors


__all__ = [
    "CgroupIdentity",
    "cgroup_selectors",
    "hierarchy_dirs",
    "layout_identity",
    "ordered_lines",
    "root_owned",
    "well_formed",
]
