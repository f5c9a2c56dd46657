"""Shared pieces of the quick-start tests: a real tessera-server + tessera-agent pair, bounded waits, and a
check that nothing a test started outlives it."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def processes_mentioning(text: str) -> list[str]:
    """Live processes whose command line contains ``text`` (a per-test temp dir: every daemon gets it)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            cmdline = proc.info["cmdline"] or []
            if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.pid == os.getpid():
                continue
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if any(text in part for part in cmdline):
            found.append(f"{proc.pid}: {' '.join(cmdline)}")
    return found


def short_tempdir(prefix: str) -> Path:
    """A world-searchable directory under /tmp (Unix socket paths must stay under 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(path, 0o755)
    return path


def require_binaries(*names: str) -> dict[str, str]:
    """Paths of ``names``; installs missing ones with scripts/system-deps.sh (as CI does) and skips the test
    only when they still cannot be found."""

    def locate() -> dict[str, str]:
        found = {}
        for name in names:
            path = shutil.which(name) or next(
                (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
            )
            if path:
                found[name] = path
        return found

    found = locate()
    if len(found) == len(names):
        return found
    result = subprocess.run(
        [str(ROOT / "scripts" / "system-deps.sh")], capture_output=True, text=True, timeout=900, check=False
    )
    found = locate()
    missing = [n for n in names if n not in found]
    if missing:
        pytest.skip(
            f"{', '.join(missing)} not installed and scripts/system-deps.sh could not install them "
            f"(exit {result.returncode}: {(result.stderr or result.stdout).strip()[-300:]})"
        )
    return found


class Daemon:
    """A long-running child in its own process group, logging to a file; stop() ends the whole group."""

    def __init__(self, name: str, argv: Sequence[str], log: Path, **popen: Any) -> None:
        self.name, self.argv, self.log = name, list(argv), log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, **popen,
            )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything it started in its group


class TesseraEnv:
    """A tessera-server and a tessera-agent (join token), as an operator would start them."""

    def __init__(self, root: Path, trust_domain: str) -> None:
        self.root = root
        self.td = trust_domain
        self.agent_id = f"spiffe://{trust_domain}/agent/test-node"
        self.port = free_port()
        self.admin_socket = str(root / "admin" / "api.sock")
        self.socket = str(root / "public" / "api.sock")
        self.daemons: list[Daemon] = []

    def admin(self, *args: str) -> str:
        out = subprocess.run(
            [PY, "-m", "tessera.server", *args, "--socket", self.admin_socket],
            capture_output=True, text=True, timeout=60, check=False,
        )
        if out.returncode != 0:
            raise AssertionError(f"tessera-server {' '.join(args)} failed: {out.stderr}")
        return out.stdout.strip()

    def _healthy(self, daemon: Daemon, module: str, sock: str) -> bool:
        if not daemon.alive():
            raise AssertionError(f"{daemon.name} exited:\n{daemon.output()}")
        r = subprocess.run([PY, "-m", module, "healthcheck", "--socket", sock], capture_output=True, timeout=30)
        return r.returncode == 0

    def start(self) -> None:
        server = Daemon(
            "server",
            [PY, "-m", "tessera.server", "run", "--trust-domain", self.td, "--data-dir", str(self.root / "server"),
             "--bind-address", f"127.0.0.1:{self.port}", "--socket", self.admin_socket],
            self.root / "server.log", cwd="/tmp",
        )
        self.daemons.append(server)
        wait_for(lambda: self._healthy(server, "tessera.server", self.admin_socket), 60, "server healthy")
        (self.root / "bundle.pem").write_text(self.admin("bundle", "show") + "\n")

    def start_agent(self) -> None:
        token = self.admin("token", "generate", "--spiffe-id", self.agent_id).splitlines()[-1].strip()
        agent = Daemon(
            "agent",
            [PY, "-m", "tessera.agent", "run", "--trust-domain", self.td, "--server-address", f"127.0.0.1:{self.port}",
             "--trust-bundle", str(self.root / "bundle.pem"), "--data-dir", str(self.root / "agent"),
             "--socket", self.socket, "--sync-interval", "1s", f"--join-token={token}"],
            self.root / "agent.log", cwd="/tmp",
        )
        self.daemons.append(agent)
        wait_for(lambda: self._healthy(agent, "tessera.agent", self.socket), 60, "agent healthy")

    def entry(self, spiffe_id: str, *selectors: str, ttl: str, dns: Sequence[str] = ()) -> str:
        args = ["entry", "create", "--spiffe-id", spiffe_id, "--parent-id", self.agent_id, "--x509-svid-ttl", ttl]
        for s in selectors:
            args += ["--selector", s]
        for d in dns:
            args += ["--dns-name", d]
        return self.admin(*args).splitlines()[-1].strip()

    def add(self, daemon: Daemon) -> Daemon:
        self.daemons.append(daemon)
        return daemon

    def stop(self) -> None:
        for daemon in reversed(self.daemons):
            daemon.stop()
