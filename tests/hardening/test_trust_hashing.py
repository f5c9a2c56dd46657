"""Unbounded executable hashing, for real (issue 12, item 8).

Eight 4 GiB sparse executables (copies of the system python, extended with a hole) run as nobody and fetch in
parallel from a real agent. While no entry selects by ``unix:sha256`` nothing is hashed at all; once one does,
files above ``workload_attestor_max_hash_bytes`` (default 256 MiB) are still not hashed (no ``unix:sha256``
selector, one log line per executable, not one per call) and root's fetch meanwhile is served. What the agent
hashed is read from its own metrics (executables hashed, bytes read, executables refused for their size), so
nothing here depends on timing.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
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
    wait_for,
)
from trust_support import FETCH, Lines, finish, spawn

pytestmark = pytest.mark.slow

AGENT_ID = f"spiffe://{TD}/host/hashing"
CONTROL, ROOT, HASHED = f"spiffe://{TD}/nobody", f"spiffe://{TD}/root", f"spiffe://{TD}/hashed"
GIANTS = 8
GIANT_SIZE = 4 << 30
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\s+(\S+)$", re.M)


@dataclass
class World:
    root: Path
    server: TesseraServer
    agent: TesseraAgent
    metrics_port: int
    giants: list[str]
    small: str
    small_digest: str

    def counters(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        return {name: float(value) for name, value in _SAMPLE.findall(text) if "executable" in name}


def _python_copy(path: Path, size: int = 0) -> str:
    """The system python, unique (trailing bytes an ELF loader ignores), extended with a hole to ``size``."""
    data = Path(SYSTEM_PYTHON).read_bytes() + b"\0tessera-test-" + os.urandom(8).hex().encode()
    path.write_bytes(data)
    if size:
        os.truncate(path, size)
    os.chmod(path, 0o755)
    return str(path)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    root = short_dir("tthash-")
    giants = [_python_copy(root / f"giant{i}", GIANT_SIZE) for i in range(GIANTS)]
    small = _python_copy(root / "small")
    server = server_proc(root)
    agent: TesseraAgent | None = None
    try:
        server.start_and_wait()
        server.write_bundle(root / "bundle.pem")
        for spiffe_id, selector in ((CONTROL, f"unix:uid:{NOBODY}"), (ROOT, "unix:uid:0")):
            server.admin("entry", "create", "--spiffe-id", spiffe_id, "--parent-id", AGENT_ID, "--selector", selector)
        port = free_port()
        agent = agent_proc(
            root, server, "agent", "--join-token", server.join_token(AGENT_ID),
            "--metrics-bind-address", f"127.0.0.1:{port}",
        ).start_and_wait()  # fmt: skip
        digest = hashlib.sha256(Path(small).read_bytes()).hexdigest()
        yield World(root, server, agent, port, giants, small, digest)
    finally:
        if agent is not None:
            agent.stop()
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def _giants_fetch(world: World, *, meanwhile: Any = None) -> tuple[list[dict[str, Any]], Any]:
    """Every giant fetches at once (as nobody); ``meanwhile()`` runs while they do. Their results and its."""
    children: list[subprocess.Popen[bytes]] = []
    try:
        for giant in world.giants:
            children.append(spawn(NOBODY, FETCH + "fetch(sys.argv[1])\n", world.agent.socket, python=giant))
        other = meanwhile() if meanwhile is not None else None
        results = [Lines(child).until("fetch") for child in children]
    finally:
        finish(*children)
    return results, other


def _not_hashing_lines(world: World) -> list[str]:
    return [line for line in world.agent.output().splitlines() if "not hashing the executable" in line]


def test_nothing_is_hashed_while_no_entry_selects_by_sha256(world: World) -> None:
    results, _ = _giants_fetch(world)
    assert results == [{"fetch": "OK", "ids": [CONTROL]}] * GIANTS
    counters = world.counters()
    assert counters["tessera_agent_executables_hashed_total"] == 0, counters
    assert counters["tessera_agent_executables_too_large_total"] == 0, counters  # not even looked at
    assert counters["tessera_agent_executable_hash_bytes_total"] == 0, counters
    assert _not_hashing_lines(world) == []


def test_giant_executables_are_not_hashed_once_an_entry_selects_by_sha256(world: World) -> None:
    world.server.admin(
        "entry", "create", "--spiffe-id", HASHED, "--parent-id", AGENT_ID,
        "--selector", f"unix:sha256:{world.small_digest}",
    )  # fmt: skip
    wait_for(
        lambda: HASHED in run_as(NOBODY, FETCH_SCRIPT, world.agent.socket, python=world.small),
        30,
        "the agent to sync the unix:sha256 entry",
        interval=0.5,
    )
    before = world.counters()

    results, root_fetch = _giants_fetch(world, meanwhile=lambda: run_as(0, FETCH_SCRIPT, world.agent.socket))
    assert root_fetch == f"OK {ROOT}"  # another uid is served while the giants are being attested
    assert results == [{"fetch": "OK", "ids": [CONTROL]}] * GIANTS  # no unix:sha256 for them, so no HASHED
    after = world.counters()
    assert (
        after["tessera_agent_executables_too_large_total"] - before["tessera_agent_executables_too_large_total"]
        == GIANTS
    )
    read = after["tessera_agent_executable_hash_bytes_total"] - before["tessera_agent_executable_hash_bytes_total"]
    assert read < 256 << 20, f"{read} bytes hashed: a giant was read"  # at most root's own interpreter
    lines = _not_hashing_lines(world)
    assert len(lines) == GIANTS and all(any(g in line for line in lines) for g in world.giants), lines
    assert "workload_attestor_max_hash_bytes" in lines[0]


def test_the_size_refusal_is_logged_once_per_executable_not_per_call(world: World) -> None:
    logged = len(_not_hashing_lines(world))
    before = world.counters()["tessera_agent_executables_too_large_total"]
    results, _ = _giants_fetch(world)
    assert results == [{"fetch": "OK", "ids": [CONTROL]}] * GIANTS
    assert world.counters()["tessera_agent_executables_too_large_total"] - before == GIANTS
    assert len(_not_hashing_lines(world)) == logged


def test_the_agent_logged_no_traceback(world: World) -> None:
    assert world.agent.healthy()
    assert "Traceback" not in world.agent.output()
