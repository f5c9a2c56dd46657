"""The README's first command, `scripts/demo.sh`, run for real: it exits 0 after mutual-TLS calls over gRPC and
HTTPS and a certificate rotation, and leaves no process behind, also when interrupted or killed.

The runs overlap (they wait mostly on the 60 s SVID life), so the file takes about one demo's time; the
interrupted runs are checked first, while the others go on.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import site
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from quickstart_support import ROOT, processes_mentioning
from support.procs import PY, as_user, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

DEMO_DIR = re.compile(r"DEMO=(/\S+)")
RUN_LIMIT = 240.0


class Run:
    """One demo process with its output collected line by line as it comes."""

    def __init__(self, name: str, argv: list[str], **popen: Any) -> None:
        self.name = name
        popen.setdefault("cwd", ROOT)
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, **popen,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def wait_line(self, pattern: str, timeout: float = 120.0) -> str:
        regex = re.compile(pattern)

        def found() -> str | None:
            if self.proc.poll() is not None and not self._reader.is_alive():
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}) before {pattern!r}:\n{self.text}")
            return next((line for line in list(self.lines) if regex.search(line)), None)

        return str(wait_for(found, timeout, f"{pattern!r} from {self.name}"))

    def finish(self, timeout: float = RUN_LIMIT) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"{self.name} still running after {timeout:.0f}s:\n{self.text}") from None
        self._reader.join(10)
        return code

    def demo_dir(self) -> str:
        match = DEMO_DIR.search(self.text)
        assert match, f"{self.name} did not say where its files are:\n{self.text}"
        return match.group(1)


def readme_command() -> str:
    """The one command in the README's Quick start section."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.+?)```", section, re.S)
    assert block, "the Quick start section must open with a sh code block"
    lines = [line for line in block.group(1).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


NOBODY = 65534


def ordinary_user_python() -> tuple[list[str], dict[str, str]] | None:
    """The system interpreter of this version, run as nobody, importing Tessera from this checkout and its
    dependencies from the virtualenv (whose own python may live where nobody cannot enter), or None."""
    python = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    if os.getuid() != 0 or not os.access(python, os.X_OK):
        return None
    env = {**os.environ, "HOME": "/tmp", "PYTHONPATH": os.pathsep.join([str(ROOT), *site.getsitepackages()])}
    probe = subprocess.run(
        [*as_user(NOBODY), python, "-c", "import tessera.sdk.grpc, tessera.server.cli, tessera.agent.cli"],
        env=env, cwd="/tmp", capture_output=True, timeout=60, check=False,
    )
    return ([python], env) if probe.returncode == 0 else None


@pytest.fixture(scope="module")
def runs() -> Iterator[dict[str, Run]]:
    started: dict[str, Run] = {}
    try:
        # The command exactly as the README gives it (it also bootstraps .venv, so it goes first and alone).
        started["readme"] = Run(f"README command {readme_command()!r}", shlex.split(readme_command()))
        started["readme"].wait_line(r"^Tessera quick start", timeout=600)
        demo = [PY, str(ROOT / "examples" / "demo.py")]
        started["same-user"] = Run("demo --mode same-user", [*demo, "--mode", "same-user"])
        started["sigint"] = Run("demo (Ctrl-C)", demo)
        started["sigkill"] = Run("demo (killed)", demo)
        # No rotation can happen within 3 s: the demo must fail, say why, and still stop everything.
        started["failure"] = Run("demo (failing)", [*demo, "--timeout", "3"])
        ordinary = ordinary_user_python()
        if ordinary is not None:
            python, env = ordinary
            started["nobody"] = Run(
                "demo as nobody", [*as_user(NOBODY), *python, str(ROOT / "examples" / "demo.py")], env=env, cwd="/tmp"
            )
        yield started
    finally:
        for run in started.values():
            if run.proc.poll() is None:
                run.proc.kill()
                run.proc.wait()
            match = DEMO_DIR.search(run.text)
            left_dir = match.group(1) if match else ""
            if left_dir and os.path.isdir(left_dir):  # a run killed mid-way could not clean up
                wait_for(lambda: not processes_mentioning(left_dir), 60, "killed demo's processes")  # noqa: B023
                shutil.rmtree(left_dir, ignore_errors=True)


def assert_nothing_left(demo_dir: str) -> None:
    # The demo has exited and says all stopped: nothing may still be running (a short grace for the kernel
    # to reap what was just killed).
    wait_for(lambda: not processes_mentioning(demo_dir), 10, f"no process left of {demo_dir}")


def assert_a_full_story(run: Run) -> None:
    text = run.text
    # Each step a newcomer reads: the server, registration, the agent, both workloads and who called whom.
    for step in range(1, 8):
        assert f"[{step}/7]" in text, text
    assert "spiffe://demo.test/frontend called spiffe://demo.test/backend over gRPC" in text
    assert "spiffe://demo.test/frontend called spiffe://demo.test/backend over HTTPS" in text
    assert "a caller without a certificate tried HTTPS: the backend refused it" in text
    rotations = re.findall(r"\[(backend|frontend)\] ROTATED: my certificate changed, serial (\S+) -> (\S+), now valid "
                           r"until \d\d:\d\d:\d\d UTC", text)
    assert {who for who, _, _ in rotations} == {"backend", "frontend"}, text
    assert all(old != new for _, old, new in rotations)
    # After the rotations, calls went on with the new client certificate, and the backend saw it.
    last_rotation = max(i for i, line in enumerate(run.lines) if "ROTATED" in line)
    after = "\n".join(run.lines[last_rotation:])
    new_frontend = [new for who, _, new in rotations if who == "frontend"][-1]
    assert f"the backend saw client certificate {new_frontend}" in after, text
    done = re.search(r"Done: (\d+) mutual-TLS calls \(gRPC and HTTPS\), 0 failed, (\d+) certificate rotations", text)
    assert done and int(done.group(1)) >= 10 and int(done.group(2)) >= 2, text
    assert text.rstrip().endswith("All processes stopped."), text
    # The agent's Prometheus gauge, read with curl, falls as the SVIDs age and jumps back after the rotation.
    found = re.findall(r"tessera_agent_svid_soonest_expiry_seconds (\S+)\s+\((just before|after) the rotation", text)
    gauges = {when: value for value, when in found}
    assert gauges.keys() == {"just before", "after"}, text
    assert float(gauges["after"]) > float(gauges["just before"]), text


def test_ctrl_c_stops_every_process_and_cleans_up(runs: dict[str, Run]) -> None:
    run = runs["sigint"]
    run.wait_line(r"^\[6/7\]")
    run.wait_line(r"called spiffe://demo.test/backend over HTTPS")
    demo_dir = run.demo_dir()
    assert processes_mentioning(demo_dir), "server, agent and workloads should be running now"
    run.proc.send_signal(signal.SIGINT)
    code = run.finish(60)
    assert code == 130, run.text
    assert "Interrupted (SIGINT): stopping everything the demo started." in run.text
    assert run.text.rstrip().endswith("All processes stopped."), run.text
    assert not processes_mentioning(demo_dir)
    assert not os.path.exists(demo_dir)


def test_killed_demo_takes_its_processes_with_it(runs: dict[str, Run]) -> None:
    """Even SIGKILL, which allows no clean-up, leaves no daemon running: the kernel signals the children."""
    run = runs["sigkill"]
    run.wait_line(r"^\[6/7\]")
    demo_dir = run.demo_dir()
    assert processes_mentioning(demo_dir)
    run.proc.kill()
    run.finish(30)
    deadline = time.monotonic() + 60
    while processes_mentioning(demo_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = processes_mentioning(demo_dir)
    shutil.rmtree(demo_dir, ignore_errors=True)
    assert not left, left


def test_failed_demo_says_why_stops_everything_and_keeps_its_logs(runs: dict[str, Run]) -> None:
    run = runs["failure"]
    code = run.finish(120)
    assert code == 1, run.text
    assert "The demo failed: no rotation of both certificates within 3s" in run.text, run.text
    demo_dir = run.demo_dir()
    try:
        assert f"Kept {demo_dir} (logs in {demo_dir}/logs)." in run.text
        assert run.text.rstrip().endswith("All processes stopped."), run.text
        assert_nothing_left(demo_dir)
        assert (Path(demo_dir) / "logs" / "agent.log").is_file()
    finally:
        shutil.rmtree(demo_dir, ignore_errors=True)


def test_readme_demo_command_runs_the_whole_story_and_exits_0(runs: dict[str, Run]) -> None:
    run = runs["readme"]
    code = run.finish()
    assert code == 0, run.text
    assert_a_full_story(run)
    if os.getuid() == 0:
        # As root the agent tells the workloads apart by uid alone.
        assert "runs as user nobody (uid 65534) and the frontend as user daemon (uid 1)" in run.text
        assert "[backend] the agent says I am spiffe://demo.test/backend (uid 65534)" in run.text
        assert "[frontend] the agent says I am spiffe://demo.test/frontend (uid 1)" in run.text
    demo_dir = run.demo_dir()
    assert_nothing_left(demo_dir)
    assert not os.path.exists(demo_dir), "the demo directory must be removed"


def test_one_user_fallback_also_works(runs: dict[str, Run]) -> None:
    """What a non-root user gets: both workloads as one user, each picking its own SPIFFE ID."""
    run = runs["same-user"]
    code = run.finish()
    assert code == 0, run.text
    assert "both workloads run as" in run.text and "each picks its own by SPIFFE ID" in run.text
    assert_a_full_story(run)
    assert_nothing_left(run.demo_dir())


def test_an_ordinary_user_gets_the_one_user_demo(runs: dict[str, Run]) -> None:
    """Not root: no way to run processes as other users, so both workloads run as this user."""
    if "nobody" not in runs:
        pytest.skip("needs root and a system python of this version that user nobody can run with this checkout")
    run = runs["nobody"]
    code = run.finish()
    assert code == 0, run.text
    assert "Not running as root, so both workloads run as you (nobody, uid 65534)" in run.text
    assert "[backend] the agent says I am spiffe://demo.test/backend (uid 65534)" in run.text
    assert_a_full_story(run)
    assert_nothing_left(run.demo_dir())
    assert not os.path.exists(run.demo_dir())
