"""Pure parsers for the /proc texts the workload attestors read.

Kept free of I/O so the exact kernel formats (including awkward process names) are unit-tested with
sample texts.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ProcStatus:
    """The identity fields of /proc/<pid>/status (real, effective, saved, fs ids; supplementary groups)."""

    uids: tuple[int, ...]
    gids: tuple[int, ...]
    groups: tuple[int, ...]


def parse_stat_start_time(text: str) -> int:
    """Returns field 22 (starttime, clock ticks since boot) of /proc/<pid>/stat.

    The command name (field 2) may contain spaces and parentheses, so fields are counted after the
    *last* closing parenthesis.
    """
    end = text.rfind(")")
    if end < 0:
        raise ValueError("malformed /proc/<pid>/stat: no command name")
    rest = text[end + 1 :].split()
    # rest[0] is field 3 (state); starttime is field 22 -> rest[19]
    if len(rest) < 20:
        raise ValueError("malformed /proc/<pid>/stat: too few fields")
    return int(rest[19])


def parse_stat_state(text: str) -> str:
    """Returns field 3 (state: R, S, D, Z for a zombie, X dead...) of /proc/<pid>/stat."""
    end = text.rfind(")")
    rest = text[end + 1 :].split() if end >= 0 else []
    if not rest:
        raise ValueError("malformed /proc/<pid>/stat: no state")
    return rest[0]


def parse_status(text: str) -> ProcStatus:
    uids: tuple[int, ...] = ()
    gids: tuple[int, ...] = ()
    groups: tuple[int, ...] = ()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "Uid":
            uids = tuple(int(v) for v in value.split())
        elif key == "Gid":
            gids = tuple(int(v) for v in value.split())
        elif key == "Groups":
            groups = tuple(int(v) for v in value.split())
    if not uids or not gids:
        raise ValueError("malformed /proc/<pid>/status: no Uid/Gid lines")
    return ProcStatus(uids=uids, gids=gids, groups=groups)


@dataclass(frozen=True, slots=True)
class CgroupLine:
    hierarchy_id: int
    controllers: tuple[str, ...]
    path: str


def parse_cgroup(text: str) -> list[CgroupLine]:
    """Parses /proc/<pid>/cgroup (v1 lines ``4:memory:/path``, v2 line ``0::/path``)."""
    lines: list[CgroupLine] = []
    for raw in text.splitlines():
        raw = raw.strip()
        if not raw:
            continue
        parts = raw.split(":", 2)
        if len(parts) != 3:
            raise ValueError(f"malformed /proc/<pid>/cgroup line: {raw!r}")
        hid, controllers, path = parts
        lines.append(
            CgroupLine(
                hierarchy_id=int(hid),
                controllers=tuple(c for c in controllers.split(",") if c),
                path=path,
            )
        )
    return lines


@dataclass(frozen=True, slots=True)
class Mount:
    """One line of /proc/self/mountinfo, the fields the cgroup attestor needs."""

    root: str  # the directory of the mounted filesystem shown at mount_point ("/" for a whole cgroup hierarchy)
    mount_point: str
    fstype: str
    super_options: frozenset[str]


def _unescape(field: str) -> str:
    r"""mountinfo escapes space, tab, newline and backslash as ``\040``-style octal."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        chunk = field[i : i + 4]
        if len(chunk) == 4 and chunk[0] == "\\" and all(c in "01234567" for c in chunk[1:]):
            out.append(chr(int(chunk[1:], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    """Parses /proc/<pid>/mountinfo (``id parent major:minor root mount_point options [optional...] - fstype
    source super_options``); malformed lines are skipped (they never describe a cgroup hierarchy)."""
    mounts: list[Mount] = []
    for raw in text.splitlines():
        fields = raw.split(" ")
        try:
            dash = fields.index("-", 6)
        except ValueError:
            continue
        if len(fields) < dash + 4:
            continue
        mounts.append(
            Mount(
                root=_unescape(fields[3]),
                mount_point=_unescape(fields[4]),
                fstype=fields[dash + 1],
                super_options=frozenset(fields[dash + 3].split(",")),
            )
        )
    return mounts
