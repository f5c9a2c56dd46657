"""Shared pieces of the hardening tests: reuse the server API test harness, run real daemons as processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PY = sys.executable
TD = "example.org"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def short_dir(prefix: str = "thard-") -> Path:
    """A directory under /tmp (Unix socket paths must stay under 107 bytes), world-searchable for other uids."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(d, 0o755)
    return d


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


class Proc:
    """A daemon subprocess writing to a log file (bounded waits, SIGTERM then SIGKILL)."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.argv, self.log, self.env = argv, log, env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, cwd="/tmp", env=self.env or dict(os.environ)
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def run(*argv: str, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False, **kw)


class ServerProc(Proc):
    """``tessera-server run`` as a real process, plus its admin CLI."""

    def __init__(self, root: Path, *extra: str, env: dict[str, str] | None = None, port: int | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        self.admin_socket = str(root / "admin" / "api.sock")
        self.data_dir = root / "server"
        argv = [
            PY, "-m", "tessera.server", "run", "--trust-domain", TD, "--data-dir", str(self.data_dir),
            "--bind-address", f"127.0.0.1:{self.port}", "--socket", self.admin_socket, *extra,
        ]  # fmt: skip
        super().__init__(argv, root / "server.log", env)

    def cli(self, *args: str, check: bool = True) -> str:
        out = run(PY, "-m", "tessera.server", *args, "--socket", self.admin_socket)
        if check and out.returncode != 0:
            raise AssertionError(f"tessera-server {' '.join(args)} failed: {out.stderr}")
        return out.stdout.strip()

    def healthy(self) -> bool:
        if not self.alive():
            raise AssertionError("server exited:\n" + self.output())
        return run(PY, "-m", "tessera.server", "healthcheck", "--socket", self.admin_socket).returncode == 0

    def start_and_wait(self) -> ServerProc:
        self.start()
        wait_for(self.healthy, what="server healthy")
        return self

    def token(self, spiffe_id: str) -> str:
        return self.cli("token", "generate", "--spiffe-id", spiffe_id).splitlines()[-1].strip()

    def write_bundle(self, path: Path) -> Path:
        path.write_text(self.cli("bundle", "show") + "\n")
        return path


class AgentProc(Proc):
    def __init__(self, root: Path, server: ServerProc, name: str, *extra: str, env: dict[str, str] | None = None):
        self.socket = str(root / f"{name}-public" / "api.sock")
        self.data_dir = root / f"{name}-data"
        argv = [
            PY, "-m", "tessera.agent", "run", "--trust-domain", TD, "--server-address", f"127.0.0.1:{server.port}",
            "--trust-bundle", str(root / "bundle.pem"), "--data-dir", str(self.data_dir), "--socket", self.socket,
            "--sync-interval", "1s", "--sync-max-backoff", "2s", *extra,
        ]  # fmt: skip
        super().__init__(argv, root / f"{name}.log", env)

    def healthy(self) -> bool:
        if not self.alive():
            raise AssertionError("agent exited:\n" + self.output())
        return run(PY, "-m", "tessera.agent", "healthcheck", "--socket", self.socket).returncode == 0

    def start_and_wait(self) -> AgentProc:
        self.start()
        wait_for(self.healthy, what="agent healthy")
        return self
