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
    ExecutableHasher,
    PeerCredentials,
    ProcessInfo,
    UnixAttestor,
    attest,
    check_unchanged,
    default_attestors,
    process_for,
)
from tessera.agent.attestors.digest import OversizeLog
from tessera.agent.attestors.procfs import parse_cgroup, parse_stat_start_time, parse_stat_state, parse_status
from tessera.agent.errors import CallerRefused, WorkloadAttestationError

CID = "3f2a9c8e1d7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b2a19"
POD = "8b1f6c4e-2a3d-4e5f-9a8b-7c6d5e4f3a2b"


def test_stat_start_time_survives_parentheses_and_spaces_in_name() -> None:
    fields = " ".join(str(i) for i in range(3, 53))  # field 3 .. 52
    text = f"1234 (evil) name (x)) {fields}\n"
    # field 22 is the 20th field after the command name
    assert parse_stat_start_time(text) == 22


def test_stat_state() -> None:
    assert parse_stat_state("1234 (a) b) Z 1 2 3\n") == "Z"
    with pytest.raises(ValueError):
        parse_stat_state("1234 (a)")


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


def test_malformed_cgroup_line() -> None:
    with pytest.raises(ValueError):
        parse_cgroup("garbage\n")


# -- a fake /proc and cgroupfs: capture at accept, checks at call -------------------------------------------


class FakeProc:
    """A /proc tree (one process) and a cgroup v2 hierarchy under ``root``, as root owns them in the tests."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.proc = root / "proc"
        self.cgroupfs = root / "cgroup"
        (self.proc / "self").mkdir(parents=True)
        self.cgroupfs.mkdir()
        (self.proc / "self" / "mountinfo").write_text(f"41 31 0:38 / {self.cgroupfs} rw - cgroup2 cgroup2 rw\n")

    def process(self, pid: int, start: int, cgroup_path: str, exe: Path, state: str = "S") -> None:
        d = self.proc / str(pid)
        if d.exists():
            shutil.rmtree(d)
        d.mkdir()
        fields = [state] + ["0"] * 18 + [str(start)] + ["0"] * 30
        (d / "stat").write_text(f"{pid} (fake) {' '.join(fields)}\n")
        (d / "status").write_text("Uid:\t1000\t1000\t1000\t1000\nGid:\t1000\t1000\t1000\t1000\nGroups:\t0 1000\n")
        (d / "cgroup").write_text(f"0::{cgroup_path}\n")
        os.symlink(exe, d / "exe")
        (self.cgroupfs / cgroup_path.lstrip("/")).mkdir(parents=True, exist_ok=True)

    def attestors(self, **kwargs: object) -> list[object]:
        return default_attestors(str(self.proc), **kwargs)  # type: ignore[arg-type]


K8S_PATH = (
    "/kubepods.slice/kubepods-besteffort.slice/"
    f"kubepods-besteffort-pod{POD.replace('-', '_')}.slice/cri-containerd-{CID}.scope"
)


def _run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_pipeline_on_a_fake_proc_tree(tmp_path: Path) -> None:
    fake = FakeProc(tmp_path)
    exe = tmp_path / "bin"
    exe.write_bytes(b"#!/bin/true\n")
    fake.process(4242, 777, K8S_PATH, exe)
    process = process_for(PeerCredentials(pid=4242, uid=1000, gid=1000), str(fake.proc), socket_inode=99)
    assert process.start_time == 777 and process.socket_inode == 99
    assert process.exe is not None and process.exe.path == str(exe) and process.groups == (0, 1000)
    selectors = _run(attest(process, fake.attestors(), str(fake.proc)))
    assert {"unix:uid:1000", "unix:gid:1000", "unix:supplementary_gid:0", f"unix:path:{exe}"} <= selectors
    assert f"unix:sha256:{hashlib.sha256(b'#!/bin/true' + bytes([10])).hexdigest()}" in selectors
    assert f"container:id:{CID}" in selectors and f"k8s:pod-uid:{POD}" in selectors
    assert "unix:supplementary_group:root" in selectors


def test_cgroup_selectors_need_root_owned_directories(tmp_path: Path) -> None:
    fake = FakeProc(tmp_path)
    exe = tmp_path / "bin"
    exe.write_bytes(b"x")
    fake.process(4242, 777, K8S_PATH, exe)
    os.chown(fake.cgroupfs / "kubepods.slice" / "kubepods-besteffort.slice", 65534, 65534)
    process = process_for(PeerCredentials(pid=4242, uid=1000, gid=1000), str(fake.proc))
    selectors = _run(attest(process, fake.attestors(), str(fake.proc)))
    assert not any(s.startswith(("container:", "k8s:", "systemd:")) for s in selectors)  # type: ignore[union-attr]


def test_every_call_refuses_a_process_that_exec_d_moved_or_exited(tmp_path: Path) -> None:
    fake = FakeProc(tmp_path)
    exe, other = tmp_path / "bin", tmp_path / "other"
    exe.write_bytes(b"one")
    other.write_bytes(b"two")
    fake.process(4242, 777, "/system.slice/app.service", exe)
    process = process_for(PeerCredentials(pid=4242, uid=1000, gid=1000), str(fake.proc))
    check_unchanged(process, str(fake.proc))

    fake.process(4242, 777, "/system.slice/app.service", other)  # exec: same pid and start, another inode
    with pytest.raises(CallerRefused, match="exec'd a different program since"):
        _run(attest(process, fake.attestors(), str(fake.proc)))
    fake.process(4242, 777, "/system.slice/other.service", exe)
    with pytest.raises(CallerRefused, match="moved to another cgroup since"):
        check_unchanged(process, str(fake.proc))
    fake.process(4242, 999, "/system.slice/app.service", exe)  # the pid now belongs to another process
    with pytest.raises(CallerRefused, match="has exited"):
        check_unchanged(process, str(fake.proc))
    fake.process(4242, 777, "/system.slice/app.service", exe, state="Z")
    with pytest.raises(CallerRefused, match="has exited"):
        check_unchanged(process, str(fake.proc))
    shutil.rmtree(fake.proc / "4242")
    with pytest.raises(CallerRefused, match="has exited"):
        check_unchanged(process, str(fake.proc))
    with pytest.raises(WorkloadAttestationError):
        process_for(PeerCredentials(pid=4242, uid=1000, gid=1000), str(fake.proc))


def test_an_exec_racing_the_capture_is_captured_as_it_ends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The process exec'd while the agent looked at it: the facts describe the new program (what it runs from
    then on), never half the old one and half the new one."""
    from tessera.agent.attestors import process as process_module

    fake = FakeProc(tmp_path)
    old, new = tmp_path / "old", tmp_path / "new"
    old.write_bytes(b"old")
    new.write_bytes(b"new")
    fake.process(4242, 777, "/", old)
    real = process_module._exe_key
    calls = [0]

    def exec_during_the_first_look(pid: int, proc_root: str) -> tuple[int, int] | None:
        calls[0] += 1
        if calls[0] == 2:  # between the first read and its re-check
            fake.process(4242, 777, "/", new)
        return real(pid, proc_root)

    monkeypatch.setattr(process_module, "_exe_key", exec_during_the_first_look)
    process = process_for(PeerCredentials(pid=4242, uid=1000, gid=1000), str(fake.proc))
    assert process.exe is not None and process.exe.path == str(new) and process.exe.ino == os.stat(new).st_ino


def test_a_binary_replaced_on_disk_is_still_the_program_that_runs(tmp_path: Path) -> None:
    fake = FakeProc(tmp_path)
    exe = tmp_path / "bin"
    exe.write_bytes(b"one")
    fake.process(4242, 777, "/", exe)
    process = process_for(PeerCredentials(pid=4242, uid=1000, gid=1000), str(fake.proc))
    os.rename(exe, tmp_path / "renamed")  # the link now names another path, the inode is the same
    os.unlink(fake.proc / "4242" / "exe")
    os.symlink(tmp_path / "renamed", fake.proc / "4242" / "exe")
    check_unchanged(process, str(fake.proc))


# -- digests: only when used, of the captured inode, bounded ------------------------------------------------


def _captured(fake: FakeProc, exe: Path, pid: int = 4242, uid: int = 1000) -> ProcessInfo:
    fake.process(pid, 777, "/", exe)
    return process_for(PeerCredentials(pid=pid, uid=uid, gid=uid), str(fake.proc))


def test_digest_cached_by_file_identity(tmp_path: Path) -> None:
    fake = FakeProc(tmp_path)
    f = tmp_path / "prog"
    f.write_bytes(b"one")
    hasher = ExecutableHasher()
    process = _captured(fake, f)
    d1 = _run(hasher.digest(process, str(fake.proc)))
    d2 = _run(hasher.digest(process, str(fake.proc)))
    assert d1 == d2 == hashlib.sha256(b"one").hexdigest()
    assert hasher.cache.computed == 1 and hasher.bytes_hashed == 3
    # Rewritten in place with a different size/mtime: hashed again.
    f.write_bytes(b"second")
    os.utime(f, ns=(1, 1_000_000_000))
    process = _captured(fake, f)
    assert _run(hasher.digest(process, str(fake.proc))) == hashlib.sha256(b"second").hexdigest()
    assert hasher.cache.computed == 2


def test_digest_refused_when_the_exe_is_no_longer_the_captured_inode(tmp_path: Path) -> None:
    fake = FakeProc(tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    process = _captured(fake, a)
    fake.process(4242, 777, "/", b)
    with pytest.raises(CallerRefused, match="exec'd"):
        _run(ExecutableHasher().digest(process, str(fake.proc)))


def test_nothing_is_hashed_while_no_entry_selects_by_sha256(tmp_path: Path) -> None:
    fake = FakeProc(tmp_path)
    f = tmp_path / "prog"
    f.write_bytes(b"one")
    process = _captured(fake, f)
    in_use: set[str] = {"unix"}
    hasher = ExecutableHasher()
    unix = UnixAttestor(str(fake.proc), hasher, selector_in_use=in_use.__contains__)
    selectors = _run(unix.attest(process))
    assert f"unix:path:{f}" in selectors  # type: ignore[operator]
    assert not any(s.startswith("unix:sha256:") for s in selectors)  # type: ignore[union-attr]
    assert hasher.cache.computed == 0
    in_use.add("unix:sha256")
    assert f"unix:sha256:{hashlib.sha256(b'one').hexdigest()}" in _run(unix.attest(process))  # type: ignore[operator]
    assert hasher.cache.computed == 1


def test_executables_above_the_bound_are_not_hashed_and_said_so_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeProc(tmp_path)
    big, small = tmp_path / "big", tmp_path / "small"
    with open(big, "wb") as f:
        f.truncate(4 << 30)  # a 4 GiB sparse file costs nothing to make
    small.write_bytes(b"small")
    now = [0.0]
    hasher = ExecutableHasher(max_bytes=1 << 20, oversize_log=OversizeLog(interval=300, clock=lambda: now[0]))
    unix = UnixAttestor(str(fake.proc), hasher)
    process = _captured(fake, big)
    with caplog.at_level("WARNING", logger="tessera.agent.attestors.digest"):
        for _ in range(3):
            selectors = _run(unix.attest(process))
            assert not any(s.startswith("unix:sha256:") for s in selectors)  # type: ignore[union-attr]
        now[0] = 301.0
        _run(unix.attest(process))
    lines = [r.getMessage() for r in caplog.records if "not hashing" in r.getMessage()]
    assert len(lines) == 2 and str(big) in lines[0] and "workload_attestor_max_hash_bytes" in lines[0]
    assert hasher.cache.computed == 0 and hasher.too_large == 4
    small_process = _captured(fake, small, pid=4243)
    assert any(s.startswith("unix:sha256:") for s in _run(unix.attest(small_process)))  # type: ignore[union-attr]


def test_oversize_log_has_a_budget_across_executables() -> None:
    now = [0.0]
    budget = OversizeLog(interval=300, budget=3, clock=lambda: now[0])
    assert [budget.admit(i) for i in range(5)] == [True, True, True, False, False]
    assert budget.suppressed == 2
    now[0] = 300.0
    assert budget.admit(10) and not budget.admit(10)


def test_hashing_runs_at_most_two_at_a_time_per_uid_and_never_delays_another_uid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hashes of one uid queue behind each other (2 at a time); another uid's hash starts at once."""
    import threading

    from tessera.agent.attestors import digest as digest_module

    fake = FakeProc(tmp_path)
    release = threading.Event()
    running: list[int] = []
    peak = [0]
    lock = threading.Lock()
    real = digest_module._sha256_fd

    def slow_hash(fd: int, stop: threading.Event) -> object:
        with lock:
            running.append(fd)
            peak[0] = max(peak[0], len(running))
        release.wait(20)
        with lock:
            running.remove(fd)
        return real(fd, stop)

    monkeypatch.setattr(digest_module, "_sha256_fd", slow_hash)
    hasher = ExecutableHasher()
    attacker = []
    for i in range(6):
        f = tmp_path / f"big{i}"
        f.write_bytes(bytes([i]))
        attacker.append(_captured(fake, f, pid=5000 + i, uid=65534))
    mine = tmp_path / "mine"
    mine.write_bytes(b"mine")
    victim = _captured(fake, mine, pid=6000, uid=1000)

    async def main() -> None:
        tasks = [asyncio.create_task(hasher.digest(p, str(fake.proc))) for p in attacker]
        while len(running) < 2:
            await asyncio.sleep(0.01)
        assert hasher.gate.active(65534) == 2
        victim_task = asyncio.create_task(hasher.digest(victim, str(fake.proc)))
        while len(running) < 3:  # the other uid's hash started although 4 of the first uid's still wait
            await asyncio.sleep(0.01)
        assert peak[0] == 3
        release.set()
        assert await victim_task == hashlib.sha256(b"mine").hexdigest()
        await asyncio.gather(*tasks)
        assert peak[0] <= 3 and hasher.cache.computed == 7

    asyncio.run(asyncio.wait_for(main(), 30))


# -- a real process ------------------------------------------------------------------------------------------


def test_real_child_process_selectors() -> None:
    """A real process (this interpreter's child) is attested from /proc: path and digest of its binary."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; sys.stdout.write('up\\n'); sys.stdout.flush(); time.sleep(30)"],
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == b"up\n"  # it has exec'd python
        creds = PeerCredentials(pid=child.pid, uid=os.getuid(), gid=os.getgid())
        process = process_for(creds)
        unix = UnixAttestor()
        selectors = asyncio.run(attest(process, [unix, CgroupAttestor()]))
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
    with pytest.raises(CallerRefused, match="has exited"):
        asyncio.run(attest(process, [UnixAttestor()]))


def test_no_pid() -> None:
    with pytest.raises(WorkloadAttestationError):
        process_for(PeerCredentials(pid=0, uid=0, gid=0))
