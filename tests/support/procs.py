"""Real processes for end-to-end tests: free ports, bounded waits, daemons with log files, tessera-server and
tessera-agent as an operator starts them, and children run under another uid."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self

PY = sys.executable
# A python another uid can run: the venv lives under /root, which `nobody` cannot enter, so children under
# other uids use the system interpreter (same minor version) with the venv's site-packages added by hand.
SYSTEM_PYTHON = "/usr/bin/python3.11"
VENV_SITE = os.path.join(os.path.dirname(os.path.dirname(sys.executable)), "lib", "python3.11", "site-packages")
NOBODY = 65534


def _ephemeral_floor() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on, for a daemon to bind a moment later.

    Chosen below the kernel's ephemeral range: a port the kernel hands out for ``bind(0)`` comes from the
    range it also hands to every outgoing connection, and with three test workers making thousands of those one
    took a daemon's port between this check and the daemon's bind now and then ("address already in use")."""
    floor = _ephemeral_floor()
    low = 10000 if floor > 12000 else 1024
    for _ in range(200):
        port = random.randrange(low, floor)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def short_dir(prefix: str) -> Path:
    """A directory under /tmp (Unix socket paths must stay under 107 bytes), world-searchable so that children
    running as other uids can reach the sockets inside."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(d, 0o755)
    return d


def wait_for(
    predicate: Callable[[], Any], timeout: float = 60.0, what: str = "condition", *, interval: float = 0.1
) -> Any:
    """Polls ``predicate`` until it returns something truthy (returned) or ``timeout`` seconds pass (an
    AssertionError naming ``what`` and the last value). The predicate runs at least once."""
    deadline = time.monotonic() + timeout
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last: {last!r})")
        time.sleep(interval)


class Daemon:
    """A long-running child writing stdout and stderr to ``log``; stop() is SIGTERM, then SIGKILL after a bounded
    wait. With ``own_group`` the child leads its own process group and stop()/kill() end the whole group, so
    nothing it started outlives it."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log: Path,
        *,
        env: dict[str, str] | None = None,
        cwd: str | Path = "/tmp",
        own_group: bool = False,
    ) -> None:
        self.name, self.argv, self.log = name, list(argv), log
        self.env, self.cwd, self.own_group = env, cwd, own_group
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.cwd,
                env=self.env, start_new_session=self.own_group,
            )  # fmt: skip
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was never started"
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def _signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        if self.own_group:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL: no shutdown at all (a crashed or partitioned process)."""
        if self.alive():
            self._signal(signal.SIGKILL)
            assert self.proc is not None
            self.proc.wait(20)

    def stop(self, timeout: float = 20) -> int | None:
        """Ends the daemon (if it runs) and returns its exit status (None if it was never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait()
        if self.own_group:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # anything it started in its group
        return self.proc.returncode


def run(*argv: str, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
    """A command run to completion, its output captured as text; the caller judges its exit status."""
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False, **kw)


def tessera(
    module: str, *args: str, sock: str, check: bool = True, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``python -m <module> <args> --socket <sock>`` (a tessera-server admin or tessera-agent command)."""
    out = subprocess.run(
        [PY, "-m", module, *args, "--socket", sock], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and out.returncode != 0:
        raise AssertionError(f"{module} {' '.join(args)} failed ({out.returncode}): {out.stderr}")
    return out


class _TesseraDaemon(Daemon):
    """A tessera daemon whose commands (``python -m <module> ... --socket <command_socket>``) include
    ``healthcheck``."""

    module = ""
    command_socket = ""

    def command(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        try:
            return tessera(self.module, *args, sock=self.command_socket, check=check)
        except AssertionError as exc:
            raise AssertionError(f"[{self.name}] {exc}\n{self.output()[-3000:]}") from None

    def healthy(self) -> bool:
        if not self.alive():
            raise AssertionError(f"{self.name} exited:\n{self.output()}")
        return self.command("healthcheck", check=False).returncode == 0

    def wait_healthy(self, timeout: float = 60.0) -> None:
        wait_for(self.healthy, timeout, f"{self.name} healthy")

    def start_and_wait(self, timeout: float = 60.0) -> Self:
        self.start()
        self.wait_healthy(timeout)
        return self


class TesseraServer(_TesseraDaemon):
    """``tessera-server run`` as a process on a free port, with its admin commands."""

    module = "tessera.server"

    def __init__(
        self,
        trust_domain: str,
        *,
        data_dir: Path,
        admin_socket: str,
        log: Path,
        extra: Sequence[str] = (),
        name: str = "server",
        port: int | None = None,
        **daemon: Any,
    ) -> None:
        self.trust_domain = trust_domain
        self.port = port or free_port()
        self.admin_socket = self.command_socket = admin_socket
        self.data_dir = data_dir
        argv = [
            PY, "-m", "tessera.server", "run", "--trust-domain", trust_domain, "--data-dir", str(data_dir),
            "--bind-address", f"127.0.0.1:{self.port}", "--socket", admin_socket, *extra,
        ]  # fmt: skip
        super().__init__(name, argv, log, **daemon)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def admin_cmd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.command(*args, check=check)

    def admin(self, *args: str) -> str:
        """An admin command that must succeed; its stdout, stripped."""
        return self.command(*args).stdout.strip()

    def join_token(self, spiffe_id: str) -> str:
        return self.admin("token", "generate", "--spiffe-id", spiffe_id).splitlines()[-1].strip()

    def write_bundle(self, path: Path) -> Path:
        """The trust bundle (PEM) an agent bootstraps from."""
        path.write_text(self.admin("bundle", "show") + "\n")
        return path


class TesseraAgent(_TesseraDaemon):
    """``tessera-agent run`` as a process, with its own commands (``--socket`` of its Workload API)."""

    module = "tessera.agent"

    def __init__(
        self,
        trust_domain: str,
        *,
        servers: str,
        data_dir: Path,
        socket: str,
        log: Path,
        trust_bundle: Path | None = None,
        join_token: str | None = None,
        sync_interval: str = "1s",
        sync_max_backoff: str | None = "2s",
        extra: Sequence[str] = (),
        name: str = "agent",
        **daemon: Any,
    ) -> None:
        self.socket = self.command_socket = socket
        self.data_dir = data_dir
        argv = [
            PY, "-m", "tessera.agent", "run", "--trust-domain", trust_domain, "--server-address", servers,
            "--data-dir", str(data_dir), "--socket", socket, "--sync-interval", sync_interval,
        ]  # fmt: skip
        if sync_max_backoff is not None:
            argv += ["--sync-max-backoff", sync_max_backoff]
        if trust_bundle is not None:
            argv += ["--trust-bundle", str(trust_bundle)]
        if join_token is not None:
            argv += ["--join-token", join_token]
        super().__init__(name, [*argv, *extra], log, **daemon)


def as_user(uid: int, gid: int | None = None, groups: Sequence[int] = ()) -> list[str]:
    """An argv prefix that runs the command under ``uid`` / ``gid`` (default: ``uid``) with exactly ``groups``.

    The ids are changed by ``setpriv`` after exec, never by the test process: ``subprocess``'s ``user=`` /
    ``group=`` / ``preexec_fn`` make CPython use fork() instead of vfork(), which runs gRPC's fork handlers in
    the child. With gRPC threads busy in the test process (open streams) the child then crashed before its
    exec: SIGBUS, SIGSEGV or "Check failed: next_worker->state == KICKED", about one run in ten. A vfork()ed
    child runs no fork handlers at all."""
    gid = uid if gid is None else gid
    groups_arg = f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", groups_arg, "--"]


def run_as(uid: int, script: str, *args: str, python: str = SYSTEM_PYTHON, timeout: float = 60) -> str:
    """Runs ``script`` in a child process under ``uid`` (set before the interpreter starts, so the kernel knows
    it); its stdout."""
    prelude = f"import sys, site; site.addsitedir({VENV_SITE!r})\n"
    demote = [] if uid == os.getuid() else as_user(uid)
    out: subprocess.CompletedProcess[str] = subprocess.run(
        [*demote, python, "-S", "-c", prelude + script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd="/tmp",
        check=False,
    )
    if out.returncode != 0:
        raise AssertionError(f"child failed ({out.returncode}): {out.stderr}")
    if out.stderr:
        print(out.stderr, file=sys.stderr)
    return out.stdout.strip()


# For run_as(uid, FETCH_SCRIPT, socket_path): "OK <id>,<id>..." or "ERR <status code name>".
FETCH_SCRIPT = """
import grpc
from tessera.sdk.workloadapi.wire import SECURITY_METADATA, WorkloadApiStub
from tessera.proto import workload_pb2
ch = grpc.insecure_channel("unix:" + sys.argv[1])
stub = WorkloadApiStub(ch)
try:
    resp = next(iter(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=SECURITY_METADATA, timeout=20)))
    print("OK " + ",".join(s.spiffe_id for s in resp.svids))
except grpc.RpcError as e:
    print("ERR " + e.code().name)
    print(e.details(), file=sys.stderr)
"""
