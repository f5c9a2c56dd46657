"""Tessera in one minute: a server, an agent, two workloads with SPIFFE identities calling each other over
mutual TLS, and a certificate rotation while the calls go on. ``scripts/demo.sh`` runs this.

Everything runs on embedded defaults in a fresh temporary directory (SQLite datastore, join token, Unix
sockets, a free TCP port) that is removed at the end, and every process it starts is stopped again, also on
Ctrl-C or failure (each runs in its own process group, which is terminated, then killed; children also get
SIGTERM from the kernel if this program dies).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import json
import os
import pwd
import queue
import secrets
import shlex
import shutil
import signal
import site
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent
TRUST_DOMAIN = "demo.test"
AGENT_ID = f"spiffe://{TRUST_DOMAIN}/agent/demo-node"
BACKEND_ID = f"spiffe://{TRUST_DOMAIN}/backend"
FRONTEND_ID = f"spiffe://{TRUST_DOMAIN}/frontend"
BACKEND_DNS = "backend.demo.test"
PR_SET_PDEATHSIG = 1
INDENT = "      "


class DemoError(Exception):
    """A step failed; the message says which and why (logs are shown next to it)."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM."""


# -- output ---------------------------------------------------------------------------------------------


class Narrator:
    """Plain sentences on stdout; one progress line that rewrites itself on a terminal, or a line every few
    seconds when the output goes to a file or a pipe (so logs stay readable)."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self._progress_shown = False
        self._last_progress = 0.0

    def _clear(self) -> None:
        if self._progress_shown:
            self.stream.write("\r\033[K")
            self._progress_shown = False

    def say(self, text: str = "") -> None:
        self._clear()
        self.stream.write(text + "\n")
        self.stream.flush()

    def step(self, number: int, total: int, text: str) -> None:
        self.say(f"[{number}/{total}] {text}")

    def detail(self, text: str) -> None:
        self.say(INDENT + text)

    def progress(self, text: str, every: float = 5.0) -> None:
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r\033[K" + INDENT + text)
            self.stream.flush()
            self._progress_shown = True
        elif now - self._last_progress >= every:
            self._last_progress = now
            self.say(INDENT + "... " + text)


def short(serial: str) -> str:
    return serial if len(serial) <= 12 else serial[:12] + "..."


def clock(iso: str) -> str:
    return dt.datetime.fromisoformat(iso).astimezone(dt.UTC).strftime("%H:%M:%S UTC")


# -- processes ------------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child: ask the kernel for SIGTERM if the demo dies without cleaning up (even SIGKILL)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@dataclass
class Identity:
    """Who a workload process runs as: the kernel facts the agent attests."""

    uid: int
    gid: int
    label: str

    def preexec(self) -> Callable[[], None]:
        uid, gid = self.uid, self.gid

        def demote() -> None:
            if os.getuid() == 0 and (uid, gid) != (os.getuid(), os.getgid()):
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
            _die_with_parent()  # after the uid change, which would reset it

        return demote


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[str]
    log: Path
    events: queue.Queue[dict[str, Any]] | None = None
    threads: list[threading.Thread] = field(default_factory=list)
    stopped: bool = False
    left_behind: bool = False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(INDENT + "| " + line for line in text[-lines:])


class Processes:
    """Starts children in their own process groups and guarantees they are gone at the end."""

    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir = log_dir
        self.env = env
        self.children: list[Child] = []

    def start(
        self, name: str, argv: Sequence[str], *, identity: Identity | None = None, events: bool = False, cwd: str
    ) -> Child:
        log = self.log_dir / f"{name}.log"
        with open(log, "ab") as err:
            proc = subprocess.Popen(
                list(argv),
                stdout=subprocess.PIPE if events else err,
                stderr=err,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                env=self.env,
                text=True,
                start_new_session=True,  # its own process group: killed as a whole at the end
                preexec_fn=identity.preexec() if identity else _die_with_parent,
            )
        child = Child(name, proc, log)
        self.children.append(child)
        if events:
            child.events = queue.Queue()
            reader = threading.Thread(target=self._read_events, args=(child,), name=f"read-{name}", daemon=True)
            reader.start()
            child.threads.append(reader)
        return child

    @staticmethod
    def _read_events(child: Child) -> None:
        assert child.proc.stdout is not None and child.events is not None
        for line in child.proc.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "output", "text": line}
            child.events.put(event)
        child.events.put({"event": "exit"})

    def stop(self, child: Child, grace: float = 10.0) -> None:
        """SIGTERM to the child's whole process group, then SIGKILL after ``grace`` seconds. Once only: after
        the group is gone its number may be reused by an unrelated process."""
        if child.stopped:
            return
        pgid = child.proc.pid
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            child.proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(5)
        # Anything the child itself started in its group goes too.
        deadline = time.monotonic() + grace
        while group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if group_alive(pgid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)
        child.left_behind = child.alive() or group_alive(pgid)
        child.stopped = True
        for thread in child.threads:
            thread.join(5)

    def stop_all(self) -> list[str]:
        """Stops every child, last started first; returns the names of any that could not be stopped."""
        for child in reversed(self.children):
            self.stop(child)
        return [c.name for c in self.children if c.left_behind]


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def free_port() -> int:
    """A free port on 127.0.0.1 for a daemon to bind a moment later, chosen below the kernel's ephemeral range:
    ports from ``bind(0)`` come from the range every outgoing connection also draws from, so on a busy host one
    could be taken between this check and the daemon's bind."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            floor = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        floor = 32768
    low = 10000 if floor > 12000 else 1024
    for _ in range(200):
        port = low + secrets.randbelow(floor - low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the demo -------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """How the two workloads are told apart by the agent, which depends on what this user may do."""

    mode: str
    backend: Identity
    frontend: Identity
    backend_selectors: list[str]
    frontend_selectors: list[str]
    python: list[str]  # the command that runs a workload script (followed by the script and its arguments)
    note: str


LAUNCHER = (
    "import site, sys\n"
    "for d in {dirs!r}:\n"
    "    site.addsitedir(d)\n"
    "import runpy\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


def _site_dirs() -> list[str]:
    dirs = [*site.getsitepackages(), site.getusersitepackages()]
    return [d for d in dirs if os.path.isdir(d)]


def python_for(identity: Identity, workdir: Path) -> list[str] | None:
    """An interpreter ``identity`` can run that imports Tessera from this installation, or None.

    A virtualenv's ``python`` is often a link into a home directory other users cannot enter, so the
    interpreter of the same version found in the usual system places is tried too, with this installation's
    site-packages added explicitly (``-S`` plus ``site.addsitedir``).
    """
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [sys.executable, os.path.realpath(sys.executable), f"/usr/bin/python{version}",
                  f"/usr/local/bin/python{version}", shutil.which(f"python{version}") or ""]
    launcher = LAUNCHER.format(dirs=_site_dirs())
    probe = launcher.split("import runpy")[0] + "import tessera.sdk.grpc, tessera.sdk.http, tessera.sdk.source\n"
    seen: set[str] = set()
    for candidate in candidates:
        if not candidate or candidate in seen or not os.path.isfile(candidate):
            continue
        seen.add(candidate)
        try:
            result = subprocess.run(
                [candidate, "-S", "-c", probe], preexec_fn=identity.preexec(), cwd=workdir,
                capture_output=True, timeout=60, check=False,
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if result.returncode == 0:
            return [candidate, "-S", "-c", launcher]
    return None


def user_identity(name: str, fallback_uid: int) -> Identity:
    try:
        entry = pwd.getpwnam(name)
        return Identity(entry.pw_uid, entry.pw_gid, name)
    except KeyError:
        return Identity(fallback_uid, fallback_uid, f"uid {fallback_uid}")


def make_plan(requested: str, workdir: Path) -> Plan:
    uid, gid = os.getuid(), os.getgid()
    try:
        me = pwd.getpwuid(uid).pw_name
    except KeyError:  # containers often run under a uid with no passwd entry
        me = f"uid {uid}"
    same_python = [sys.executable]
    if uid == 0 and requested in ("auto", "uids"):
        backend, frontend = user_identity("nobody", 65534), user_identity("daemon", 1)
        py_b, py_f = python_for(backend, workdir), python_for(frontend, workdir)
        if py_b and py_f and py_b == py_f:
            return Plan(
                "uids", backend, frontend,
                [f"unix:uid:{backend.uid}"], [f"unix:uid:{frontend.uid}"], py_b,
                f"The backend runs as user {backend.label} (uid {backend.uid}) and the frontend as user "
                f"{frontend.label} (uid {frontend.uid}); the agent tells them apart by the uid the kernel "
                "reports for each connection to its socket.",
            )
        if requested == "uids":
            raise DemoError(
                f"users {backend.label} and {frontend.label} cannot run this Python installation "
                f"({sys.executable}); install Tessera where they can read it, or use --mode gids"
            )
        requested = "gids"
        why = (f"(users nobody and daemon cannot run this Python installation at {sys.executable}, "
               "so both workloads run as root with different groups instead)")
    else:
        why = ""
    if uid == 0 and requested == "gids":
        backend = Identity(0, user_identity("nobody", 65534).gid, "root, group nogroup")
        frontend = Identity(0, user_identity("daemon", 1).gid, "root, group daemon")
        return Plan(
            "gids", backend, frontend,
            ["unix:uid:0", f"unix:gid:{backend.gid}"], ["unix:uid:0", f"unix:gid:{frontend.gid}"], same_python,
            f"Both workloads run as root but with different groups (gid {backend.gid} and {frontend.gid}); "
            f"the agent tells them apart by the gid the kernel reports for each connection {why}".rstrip() + ".",
        )
    if requested not in ("auto", "same-user"):
        raise DemoError(f"--mode {requested} needs root (to start processes as other users or groups)")
    ident = Identity(uid, gid, me)
    why = "Not running as root, so" if uid != 0 else "As asked (--mode same-user),"
    hint = " Run the demo as root to see the agent tell workloads apart by user (uid)." if uid != 0 else ""
    return Plan(
        "same-user", ident, ident, [f"unix:uid:{uid}"], [f"unix:uid:{uid}"], same_python,
        f"{why} both workloads run as you ({me}, uid {uid}): the agent offers both identities to both "
        f"processes and each picks its own by SPIFFE ID.{hint}",
    )


class Demo:
    STEPS = 7

    def __init__(self, args: argparse.Namespace, out: Narrator) -> None:
        self.args = args
        self.out = out
        self.dir = Path(tempfile.mkdtemp(prefix="tessera-demo-", dir=args.tmpdir))
        # Other users (the workloads) must reach the agent's socket inside; the server and agent keep their
        # keys in their own 0700 data directories.
        os.chmod(self.dir, 0o755)  # noqa: S103
        self.logs = self.dir / "logs"
        self.logs.mkdir()
        env = {k: v for k, v in os.environ.items() if k != "SPIFFE_ENDPOINT_SOCKET"}
        env["PYTHONUNBUFFERED"] = "1"
        self.procs = Processes(self.logs, env)
        self.port = free_port()
        self.metrics_port = free_port()
        self.admin_socket = str(self.dir / "admin" / "api.sock")
        self.agent_socket = str(self.dir / "public" / "api.sock")
        self.python = sys.executable
        self.server: Child | None = None
        self.agent: Child | None = None
        self.plan_mode = ""

    # -- helpers -----------------------------------------------------------------------------------

    def shown(self, argv: Sequence[str]) -> str:
        text = shlex.join(argv)
        return text.replace(str(self.dir), "$DEMO")

    def admin(self, *args: str) -> str:
        argv = [self.python, "-m", "tessera.server", *args, "--socket", self.admin_socket]
        self.out.detail("$ " + self.shown(["tessera-server", *args]))
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        if result.returncode != 0:
            raise DemoError(f"tessera-server {' '.join(args[:2])} failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def wait(self, what: str, ready: Callable[[], bool], watch: Child, timeout: float) -> float:
        started = time.monotonic()
        deadline = started + timeout
        while True:
            if not watch.alive():
                raise DemoError(f"the {watch.name} exited while {what}:\n{watch.log_tail()}")
            if ready():
                return time.monotonic() - started
            elapsed = time.monotonic() - started
            if time.monotonic() > deadline:
                raise DemoError(f"timed out after {timeout:.0f}s {what}:\n{watch.log_tail()}")
            self.out.progress(f"{what} ({elapsed:.0f}s)", every=3.0)
            time.sleep(0.2)

    def healthy(self, module: str, sock: str) -> bool:
        result = subprocess.run(
            [self.python, "-m", module, "healthcheck", "--socket", sock], capture_output=True, timeout=30, check=False
        )
        return result.returncode == 0

    def next_event(self, child: Child, wanted: str, timeout: float, what: str) -> dict[str, Any]:
        assert child.events is not None
        deadline = time.monotonic() + timeout
        started = time.monotonic()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DemoError(f"timed out after {timeout:.0f}s {what}:\n{child.log_tail()}")
            try:
                event = child.events.get(timeout=min(1.0, remaining))
            except queue.Empty:
                self.out.progress(f"{what} ({time.monotonic() - started:.0f}s)", every=3.0)
                continue
            if event["event"] == wanted:
                return event
            if event["event"] == "exit":
                raise DemoError(f"the {child.name} exited while {what}:\n{child.log_tail()}")
            self.out.detail(f"[{child.name}] {event.get('text', '')}")

    # -- steps -------------------------------------------------------------------------------------

    def run(self) -> int:
        out, args = self.out, self.args
        out.say("Tessera quick start: two programs get SPIFFE identities and call each other over mutual TLS.")
        out.say(f"Everything lives in DEMO={self.dir} (SQLite datastore, keys, sockets, logs);")
        out.say("it is removed at the end (--keep keeps it).")
        out.say()

        plan = make_plan(args.mode, self.dir)
        self.plan_mode = plan.mode
        scripts = self.dir / "bin"
        scripts.mkdir(mode=0o755)
        for name in ("backend.py", "frontend.py"):
            shutil.copy(HERE / name, scripts / name)
            os.chmod(scripts / name, 0o644)

        # 1. server
        out.step(1, self.STEPS, f"Starting tessera-server, the certificate authority of trust domain {TRUST_DOMAIN}.")
        server_argv = [
            self.python, "-m", "tessera.server", "run", "--trust-domain", TRUST_DOMAIN,
            "--data-dir", str(self.dir / "server"), "--bind-address", f"127.0.0.1:{self.port}",
            "--socket", self.admin_socket,
        ]
        out.detail("$ " + self.shown(["tessera-server", *server_argv[3:]]))
        self.server = self.procs.start("server", server_argv, cwd=str(self.dir))
        took = self.wait("waiting for the server to answer its health check",
                         lambda: self.healthy("tessera.server", self.admin_socket), self.server, 60)
        out.detail(f"ready after {took:.1f}s: agents connect to 127.0.0.1:{self.port} (TLS), "
                   "admin commands use a local socket")

        # 2. registration
        out.step(2, self.STEPS, "Registering the two workloads: which SPIFFE ID goes to which process.")
        out.detail(plan.note)
        bundle = self.admin("bundle", "show")
        (self.dir / "bundle.pem").write_text(bundle + "\n")
        ttl = f"{args.ttl}s"
        for spiffe_id, selectors, dns in ((BACKEND_ID, plan.backend_selectors, [BACKEND_DNS]),
                                          (FRONTEND_ID, plan.frontend_selectors, [])):
            cmd = ["entry", "create", "--spiffe-id", spiffe_id, "--parent-id", AGENT_ID, "--x509-svid-ttl", ttl]
            for s in selectors:
                cmd += ["--selector", s]
            for d in dns:
                cmd += ["--dns-name", d]
            self.admin(*cmd)
        out.detail(f"{BACKEND_ID}  -> processes with {' + '.join(plan.backend_selectors)}, "
                   f"DNS name {BACKEND_DNS} (for gRPC clients)")
        out.detail(f"{FRONTEND_ID} -> processes with {' + '.join(plan.frontend_selectors)}")
        out.detail(f"Both certificates live only {args.ttl}s, so you will see them rotate in a moment.")

        # 3. agent
        out.step(3, self.STEPS, "Starting tessera-agent; it proves itself to the server with a one-time join token.")
        token = self.admin("token", "generate", "--spiffe-id", AGENT_ID).splitlines()[-1].strip()
        # A secret belongs in a 0600 file, not on a command line every user can read with `ps`.
        agent_config = self.dir / "agent.toml"
        fd = os.open(agent_config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f'[agent]\njoin_token = "{token}"\n')
        agent_argv = [
            self.python, "-m", "tessera.agent", "run", "--config", str(agent_config), "--trust-domain", TRUST_DOMAIN,
            "--server-address", f"127.0.0.1:{self.port}", "--trust-bundle", str(self.dir / "bundle.pem"),
            "--data-dir", str(self.dir / "agent"), "--socket", self.agent_socket, "--sync-interval", "2s",
            "--metrics-bind-address", f"127.0.0.1:{self.metrics_port}",
        ]
        out.detail("$ " + self.shown(["tessera-agent", *agent_argv[3:]]))
        out.detail("  ($DEMO/agent.toml, mode 0600, holds the token: join_token = \"...\")")
        self.agent = self.procs.start("agent", agent_argv, cwd=str(self.dir))
        took = self.wait("waiting for the agent to attest and open the Workload API",
                         lambda: self.healthy("tessera.agent", self.agent_socket), self.agent, 60)
        out.detail(f"ready after {took:.1f}s: the agent is {AGENT_ID} and serves the Workload API on "
                   f"{self.shown([self.agent_socket])}")

        # 4. backend
        backend_who = f"{plan.backend.label}" + (f" (uid {plan.backend.uid})" if plan.mode == "uids" else "")
        out.step(4, self.STEPS, f"Starting the backend as {backend_who}; it asks the agent who it is.")
        pick = ["--spiffe-id", BACKEND_ID] if plan.mode == "same-user" else []
        backend = self.procs.start(
            "backend",
            [*plan.python, str(scripts / "backend.py"), "--socket", f"unix://{self.agent_socket}", *pick,
             "--allow", FRONTEND_ID],
            identity=plan.backend, events=True, cwd=str(self.dir),
        )
        ident = self.next_event(backend, "identity", 90, "waiting for the backend's SVID")
        self.say_identity("backend", ident)
        ready = self.next_event(backend, "ready", 60, "waiting for the backend to listen")
        out.detail(f"[backend] {ready['text']}")

        # 5. frontend
        frontend_who = f"{plan.frontend.label}" + (f" (uid {plan.frontend.uid})" if plan.mode == "uids" else "")
        out.step(5, self.STEPS, f"Starting the frontend as {frontend_who}; it calls the backend every second.")
        pick = ["--spiffe-id", FRONTEND_ID] if plan.mode == "same-user" else []
        frontend = self.procs.start(
            "frontend",
            [*plan.python, str(scripts / "frontend.py"), "--socket", f"unix://{self.agent_socket}", *pick,
             "--backend-id", BACKEND_ID, "--backend-dns", BACKEND_DNS,
             "--grpc", f"127.0.0.1:{ready['grpc_port']}", "--https", f"127.0.0.1:{ready['https_port']}",
             "--interval", str(args.interval)],
            identity=plan.frontend, events=True, cwd=str(self.dir),
        )
        ident_f = self.next_event(frontend, "identity", 90, "waiting for the frontend's SVID")
        self.say_identity("frontend", ident_f)
        out.detail(f"The frontend checks the backend too: over HTTPS by its SPIFFE ID, over gRPC by the DNS name "
                   f"{BACKEND_DNS} (Python gRPC clients can only check a name; only the backend's SVID carries it).")

        self.refuse_stranger(int(ready["https_port"]))

        # 6. calls and rotation
        out.step(6, self.STEPS, "Calls go on while the agent rotates both certificates (at about half their life).")
        stats = self.watch_calls(backend, frontend, ident, ident_f)
        self.show_expiry_gauge("after the rotation")

        # 7. stop
        out.step(7, self.STEPS, "Stopping everything.")
        for child in (frontend, backend):
            self.procs.stop(child)
            self.drain(child)
        for child in (self.agent, self.server):
            self.procs.stop(child)
            out.detail(f"{child.name} stopped")
        out.say()
        if stats["failed"]:
            out.say(f"FAILED: {stats['failed']} of {stats['ok'] + stats['failed']} mutual-TLS calls failed "
                    f"(logs in {self.logs}).")
            return 1
        out.say(f"Done: {stats['ok']} mutual-TLS calls (gRPC and HTTPS), 0 failed, "
                f"{stats['rotations']} certificate rotations, no restart and no certificate file anywhere.")
        return 0

    def refuse_stranger(self, port: int) -> None:
        """Shows the other half of mutual TLS: a caller without an SVID does not get in."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # this caller trusts anything; the backend is the one that must refuse
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, ctx.wrap_socket(raw) as tls:
                tls.sendall(b"GET /hello HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n")
                data = tls.recv(4096)
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or str(exc)
            self.out.detail(f"[demo] a caller without a certificate tried HTTPS: the backend refused it ({reason})")
            return
        if data:
            raise DemoError("the backend answered a caller that presented no certificate")
        self.out.detail("[demo] a caller without a certificate tried HTTPS: the backend closed the connection")

    def show_expiry_gauge(self, when: str) -> None:
        """What an operator's monitoring sees: the agent's Prometheus gauge of the soonest SVID expiry, which
        falls as certificates age and jumps back up when the agent rotates them."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        name = "tessera_agent_svid_soonest_expiry_seconds"
        self.out.detail(f"$ curl -s {url} | grep ^{name}")
        text = ""
        if shutil.which("curl"):
            done = subprocess.run(["curl", "-s", "--max-time", "10", url], capture_output=True, text=True, check=False)
            text = done.stdout
        else:
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=10) as response:
                text = response.read().decode()
        line = next((ln for ln in text.splitlines() if ln.startswith(name)), None)
        if line is None:
            raise DemoError(f"the agent's metrics endpoint {url} did not report {name}")
        seconds = float(line.split()[-1])
        self.out.detail(f"  {line}   ({when}: the soonest SVID expires in {seconds:.0f}s)")

    def say_identity(self, name: str, event: dict[str, Any]) -> None:
        who = f"uid {event['uid']}" + (f", gid {event['gid']}" if self.plan_mode == "gids" else "")
        self.out.detail(f"[{name}] {event['text']} ({who}); certificate serial {short(event['serial'])}, "
                        f"valid until {clock(event['expires'])}")

    def drain(self, child: Child) -> None:
        if child.events is None:
            return
        while True:
            try:
                event = child.events.get_nowait()
            except queue.Empty:
                return
            if event["event"] in ("stopped", "output"):
                self.out.detail(f"[{child.name}] {event.get('text', '')}")

    def watch_calls(
        self, backend: Child, frontend: Child, ident_b: dict[str, Any], ident_f: dict[str, Any]
    ) -> dict[str, int]:
        out, args = self.out, self.args
        stats = {"ok": 0, "failed": 0, "rotations": 0}
        rotated: dict[str, int] = {"backend": 0, "frontend": 0}
        expires = {"backend": ident_b["expires"], "frontend": ident_f["expires"]}
        # The agent rotates at about half life (+-10 %): when to expect each rotation, for the progress line.
        halfway = {
            name: dt.datetime.fromisoformat(e["issued"]) + (
                dt.datetime.fromisoformat(e["expires"]) - dt.datetime.fromisoformat(e["issued"])) / 2
            for name, e in (("backend", ident_b), ("frontend", ident_f))
        }
        show_next = {"gRPC", "HTTPS"}  # print the next call of these in full
        current: dict[str, str | None] = {"backend": None, "frontend": None}  # serials since the last rotations
        gauge_shown = False
        after_rotation: dict[str, int] = {"gRPC": 0, "HTTPS": 0}
        started = time.monotonic()
        deadline = started + args.timeout
        first_expiry = min(dt.datetime.fromisoformat(e) for e in expires.values())
        out.detail(f"The certificates expire at {clock(first_expiry.isoformat())}; the agent replaces them well "
                   "before, and new connections pick up the new ones by themselves.")
        while True:
            if rotated["backend"] and rotated["frontend"] and min(after_rotation.values()) >= args.calls_after:
                return stats
            if time.monotonic() > deadline:
                raise DemoError(
                    f"no rotation of both certificates within {args.timeout:.0f}s "
                    f"(backend rotated {rotated['backend']}x, frontend {rotated['frontend']}x); "
                    f"agent log:\n{self.agent.log_tail() if self.agent else ''}"
                )
            got = False
            for child in (backend, frontend):
                assert child.events is not None
                try:
                    event = child.events.get(timeout=0.1)
                except queue.Empty:
                    continue
                got = True
                kind = event["event"]
                if kind == "exit":
                    raise DemoError(f"the {child.name} exited unexpectedly:\n{child.log_tail()}")
                if kind == "rotated":
                    rotated[child.name] += 1
                    current[child.name] = event["serial"]
                    stats["rotations"] += 1
                    after_rotation = {"gRPC": 0, "HTTPS": 0}
                    show_next = {"gRPC", "HTTPS"}
                    out.detail(f"[{child.name}] ROTATED: my certificate changed, serial {short(event['old_serial'])} "
                               f"-> {short(event['serial'])}, now valid until {clock(event['expires'])} "
                               "(same SPIFFE ID, new key, no restart)")
                elif kind == "call":
                    proto = event["proto"]
                    if event["ok"]:
                        stats["ok"] += 1
                        # A call already under way when a certificate rotated still carries the old one: only
                        # calls made with both sides' current certificates count (and are shown) as "after".
                        fresh = current["frontend"] in (None, event["my_serial"]) and current["backend"] in (
                            None, event["backend_serial"])
                        if not fresh:
                            continue
                        if rotated["backend"] or rotated["frontend"]:
                            after_rotation[proto] += 1
                        if proto in show_next:
                            show_next.discard(proto)
                            self.say_call(event)
                    else:
                        stats["failed"] += 1
                        out.detail(f"[frontend] FAILED: {event['text']}")
                else:
                    out.detail(f"[{child.name}] {event.get('text', '')}")
            if not got:
                waiting = [n for n, count in rotated.items() if not count]
                plural = "s" if len(waiting) > 1 else ""
                what = "a few more calls with the new certificates"
                if waiting:
                    due = (min(halfway[n] for n in waiting) - dt.datetime.now(dt.UTC)).total_seconds()
                    if due <= 4 and not gauge_shown:
                        gauge_shown = True
                        self.show_expiry_gauge("just before the rotation")
                    eta = f"expected in about {due:.0f}s" if due >= 1 else "any moment now"
                    what = f"waiting for the {' and '.join(waiting)} certificate{plural} to rotate ({eta})"
                out.progress(f"{time.monotonic() - started:.0f}s: {stats['ok']} calls OK, {stats['failed']} failed; "
                             f"{what}")

    def say_call(self, event: dict[str, Any]) -> None:
        proto = event["proto"]
        how = "gRPC (HTTP/2)" if proto == "gRPC" else "HTTPS (HTTP/1.1)"
        self.out.detail(f"[frontend] {event['caller']} called {event['backend']} over {how} with mutual TLS: "
                        f"{event['text']}")
        seen = f", the backend saw client certificate {short(event['seen_caller_serial'])}" \
            if "seen_caller_serial" in event else ""
        backend = "the backend presented" if proto == "HTTPS" else "the backend's current"
        self.out.detail(f"           client certificate {short(event['my_serial'])}, {backend} certificate "
                        f"{short(event['backend_serial'])}{seen}")

    def cleanup(self, failed: bool) -> list[str]:
        """Stops every process; removes the directory unless asked to keep it or the demo failed (its logs
        are what tells why)."""
        left = self.procs.stop_all()
        if self.args.keep or failed or left:
            self.out.say(f"Kept {self.dir} (logs in {self.logs}).")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
        return left


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/demo.sh",
        description="Run a Tessera server, an agent and two workloads talking mutual TLS, through a rotation.",
    )
    parser.add_argument("--mode", choices=("auto", "uids", "gids", "same-user"), default="auto",
                        help="how the agent tells the workloads apart: different users (root), different groups "
                             "(root), or one user with both identities (default: the best this user can do)")
    parser.add_argument("--ttl", type=int, default=60, help="X509-SVID life in seconds (the server's minimum is 60)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between rounds of calls")
    parser.add_argument("--calls-after", type=int, default=3,
                        help="successful calls of each kind to see after the last rotation")
    parser.add_argument("--timeout", type=float, default=150.0, help="give up when no rotation happened by then")
    parser.add_argument("--tmpdir", default="/tmp", help="where the demo directory is made (keep it short: sockets)")
    parser.add_argument("--keep", action="store_true", help="keep the demo directory (logs, database) at the end")
    args = parser.parse_args(argv)
    if args.ttl < 60:
        parser.error(f"--ttl: the server issues X509-SVIDs for at least 60 seconds, got {args.ttl}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = Narrator(sys.stdout)

    def on_term(signum: int, frame: object) -> None:
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, on_term)
    demo: Demo | None = None
    code = 1
    try:
        demo = Demo(args, out)
        code = demo.run()
    except Interrupted as exc:
        out.say()
        out.say(f"Interrupted ({exc}): stopping everything the demo started.")
        code = 130
    except DemoError as exc:
        out.say()
        out.say(f"The demo failed: {exc}")
        code = 1
    finally:
        # No second Ctrl-C may cut the clean-up short and leave daemons behind.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        if demo is not None:
            left = demo.cleanup(failed=code == 1)
            if left:
                out.say(f"Could not stop: {', '.join(left)}")
                code = code or 1
            else:
                out.say("All processes stopped.")
    return code


if __name__ == "__main__":
    sys.exit(main())
