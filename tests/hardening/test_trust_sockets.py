"""Issue 12, items 1, 2 and 9, attacked for real by uid ``nobody``: sockets no other user can squat.

* Item 1: ``nobody`` owns the socket directory and keeps swapping the socket's name for a symlink to a
  root-owned 0600 file while a root daemon starts there. Before the fix root bound, then chmod-ed the path and
  made the victim world-writable (agent) or 0600-ed any file (server).
* Item 2: squatted directories (``nobody``'s own, writable by everyone, below ``nobody``'s directory, a symlink
  into ``nobody``'s): the daemons refuse to start, one line naming the directory and its owner; a fake admin
  server run by ``nobody`` receives nothing from the admin CLI.
* Item 9: ``tessera-agent api fetch x509 --write DIR`` into a DIR ``nobody`` made is refused before any key
  is fetched.

The daemons run as root (this suite's user) on sockets under a root-owned sticky directory like /tmp.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.inproc import TD
from support.procs import (
    NOBODY,
    PY,
    SYSTEM_PYTHON,
    VENV_SITE,
    Daemon,
    TesseraServer,
    as_user,
    free_port,
    run,
    run_as,
    short_dir,
    wait_for,
)

pytestmark = pytest.mark.slow

START_TIMEOUT = 45.0

# Runs as nobody until killed: the moment a socket appears at ``path``, replaces it by a symlink to ``victim``
# (what won the race against bind-then-chmod: root's chmod followed the link); prints "planted" each time.
SWAPPER = """
import os, stat, sys
path, victim = sys.argv[1], sys.argv[2]
print("ready", flush=True)
while True:
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            continue
        os.unlink(path)
        os.symlink(victim, path)
        print("planted", flush=True)
    except OSError:
        pass
"""

# Runs as nobody: a fake admin API in a directory of nobody's, recording every connection and byte.
FAKE_ADMIN = """
import os, socket, sys
directory = sys.argv[1]
os.mkdir(directory, 0o755)
server = socket.socket(socket.AF_UNIX)
server.bind(directory + "/api.sock")
os.chmod(directory + "/api.sock", 0o777)
server.listen()
print("listening", flush=True)
while True:
    conn, _ = server.accept()
    print("connection", flush=True)
    print("received", len(conn.recv(65536)), flush=True)
    conn.close()
"""

# As some user: "OK" when the socket accepts a connection, else the errno's name.
CONNECT = """
import errno, socket
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
    print("OK")
except OSError as exc:
    print(errno.errorcode.get(exc.errno, str(exc.errno)))
"""


@pytest.fixture
def base() -> Iterator[Path]:
    """A root-owned sticky directory like /tmp, where ``nobody`` may create directories of their own."""
    path = short_dir("tts-")
    os.chmod(path, 0o1777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=[0o600, 0o644], ids=["victim-0600", "victim-0644"])
def victim(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A root-owned file the attacker would like root to chmod, in a directory nobody may enter: 0600 (a
    shadow file the agent's 0777 would open to all) and 0644 (a file the server's 0600 would take away)."""
    directory = Path(short_dir("ttv-"))
    os.chmod(directory, 0o700)
    path = directory / "shadow"
    path.write_text("root:secret\n")
    os.chmod(path, request.param)
    try:
        yield path
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def as_nobody(script: str, *args: str) -> str:
    return run_as(NOBODY, script, *args)


def nobody_mkdir(path: Path, mode: int = 0o755) -> None:
    as_nobody(f"import os; os.mkdir(sys.argv[1], {mode:#o})", str(path))
    assert os.lstat(path).st_uid == NOBODY


def nobody_daemon(name: str, script: str, log: Path, *args: str) -> Daemon:
    prelude = f"import sys, site; site.addsitedir({VENV_SITE!r})\n"
    argv = [*as_user(NOBODY), SYSTEM_PYTHON, "-S", "-u", "-c", prelude + script, *args]
    return Daemon(name, argv, log).start()


def connect_as(uid: int, path: Path) -> str:
    return run_as(uid, CONNECT, str(path))


def agent_argv(data: Path, sock: Path) -> list[str]:
    """tessera-agent run against a server that is not there: it serves its socket, then keeps retrying."""
    return [
        PY, "-m", "tessera.agent", "run", "--trust-domain", TD, "--server-address", f"127.0.0.1:{free_port()}",
        "--insecure-bootstrap", "--join-token", "not-used", "--data-dir", str(data), "--socket", str(sock),
    ]  # fmt: skip


def server_argv(data: Path, sock: Path) -> list[str]:
    return [
        PY, "-m", "tessera.server", "run", "--trust-domain", TD, "--data-dir", str(data),
        "--bind-address", f"127.0.0.1:{free_port()}", "--socket", str(sock),
    ]  # fmt: skip


def with_umask(umask: int, argv: list[str]) -> list[str]:
    """``argv`` under ``umask`` (set by the shell that execs it), so only an explicit mode can explain the result."""
    return ["sh", "-c", f'umask {umask:03o}; exec "$@"', "sh", *argv]


def refusal(out: subprocess.CompletedProcess[str], directory: Path, owner: str) -> str:
    """The daemon refused to start: exit 1, its last line naming ``directory`` and ``owner``."""
    assert out.returncode == 1, f"expected a refusal, got {out.returncode}:\n{out.stderr[-3000:]}"
    lines = out.stderr.strip().splitlines()
    assert lines, "no error line"
    line = lines[-1]
    assert f"socket directory {directory}" in line and owner in line, line
    return line


def refused(argv: list[str], directory: Path, owner: str) -> str:
    """Runs a daemon that must refuse to start (see :func:`refusal`)."""
    return refusal(run(*argv, timeout=START_TIMEOUT), directory, owner)


def socket_up(path: Path, daemon: Daemon) -> bool:
    if not daemon.alive():
        raise AssertionError(f"{daemon.name} exited:\n{daemon.output()[-3000:]}")
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def unchanged(victim: Path, mode: int) -> None:
    st = os.lstat(victim)
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (mode, 0), f"the victim is now {stat.S_IMODE(st.st_mode):04o}"
    assert victim.read_text() == "root:secret\n"


# ----------------------------------------------------------------------------------- item 1: the symlink race


@pytest.mark.parametrize("daemon", ["agent", "server"])
def test_symlink_race_in_a_squatted_directory_is_refused_and_no_file_changes_mode(
    base: Path, victim: Path, daemon: str
) -> None:
    mode = stat.S_IMODE(os.lstat(victim).st_mode)
    squatted = base / daemon
    nobody_mkdir(squatted)
    sock = squatted / "api.sock"
    swapper = nobody_daemon("swapper", SWAPPER, base / "swapper.log", str(sock), str(victim))
    try:
        wait_for(lambda: "ready" in swapper.output(), 30, "the attacker's loop")
        argv = agent_argv(base / "data", sock) if daemon == "agent" else server_argv(base / "data", sock)
        proc = Daemon(daemon, argv, base / f"{daemon}.log").start()

        def over() -> bool:  # refused (exited), or the attack won
            return not proc.alive() or stat.S_IMODE(os.lstat(victim).st_mode) != mode

        try:
            wait_for(over, START_TIMEOUT, f"{daemon} to refuse the directory")
            unchanged(victim, mode)
        finally:
            status = proc.stop()
        out = subprocess.CompletedProcess(argv, status or 0, "", proc.output())
        line = refusal(out, squatted, "uid 65534 (nobody)")
        assert "not by this daemon (uid 0)" in line
    finally:
        swapper.stop()
    unchanged(victim, mode)
    assert "planted" not in swapper.output()  # no socket of root's ever appeared in their directory


@pytest.mark.parametrize(("daemon", "mode", "nobody_connects"), [("agent", 0o777, "OK"), ("server", 0o600, "EACCES")])
def test_in_its_own_directory_the_socket_has_its_mode_at_bind_time_and_the_attacker_cannot_get_in(
    base: Path, victim: Path, daemon: str, mode: int, nobody_connects: str
) -> None:
    victim_mode = stat.S_IMODE(os.lstat(victim).st_mode)
    own = base / daemon
    sock = own / "api.sock"
    # The attacker races from outside: the directory the daemon makes is not theirs to write.
    swapper = nobody_daemon("swapper", SWAPPER, base / "swapper.log", str(sock), str(victim))
    wait_for(lambda: "ready" in swapper.output(), 30, "the attacker's loop")
    # A umask that would give the wrong mode: only a mode set on purpose gets the right one.
    umask = 0o077 if daemon == "agent" else 0o000
    argv = agent_argv(base / "data", sock) if daemon == "agent" else server_argv(base / "data", sock)
    proc = Daemon(daemon, with_umask(umask, argv), base / f"{daemon}.log").start()
    try:
        wait_for(lambda: socket_up(sock, proc), START_TIMEOUT, f"{daemon} socket")
        st = os.lstat(sock)
        assert stat.S_IMODE(st.st_mode) == mode and st.st_uid == 0
        assert stat.S_IMODE(os.lstat(own).st_mode) == (0o755 if daemon == "agent" else 0o700)
        assert os.lstat(own).st_uid == 0
        assert os.listdir(own) == ["api.sock"]  # no staging directory left
        assert connect_as(NOBODY, sock) == nobody_connects
        assert connect_as(0, sock) == "OK"
    finally:
        swapper.stop()
        assert proc.stop() == 0, proc.output()[-3000:]
    assert "planted" not in swapper.output()
    assert not os.path.lexists(sock)  # removed on stop: it was still ours
    unchanged(victim, victim_mode)


# ----------------------------------------------------------------------------------- item 2: squatted directories


def _squat_nobody_dir(base: Path) -> tuple[Path, Path, str]:
    nobody_mkdir(base / "theirs", 0o700)  # even private: it is theirs, so the socket at its name is theirs
    return base / "theirs" / "api.sock", base / "theirs", "uid 65534 (nobody)"


def _squat_open_dir(base: Path) -> tuple[Path, Path, str]:
    (base / "open").mkdir()
    os.chmod(base / "open", 0o777)  # root's, but anyone may replace the socket in it
    return base / "open" / "api.sock", base / "open", "uid 0 (root)"


def _squat_nobody_parent(base: Path) -> tuple[Path, Path, str]:
    nobody_mkdir(base / "theirs")  # they could rename the daemon's directory away and put theirs there
    return base / "theirs" / "sub" / "api.sock", base / "theirs" / "sub", "uid 65534 (nobody)"


def _squat_symlinked_dir(base: Path) -> tuple[Path, Path, str]:
    nobody_mkdir(base / "theirs")
    (base / "link").symlink_to(base / "theirs")
    return base / "link" / "api.sock", base / "link", "uid 65534 (nobody)"


SQUATS = {
    "nobody-owns-the-directory": _squat_nobody_dir,
    "directory-0777": _squat_open_dir,
    "nobody-owns-a-parent": _squat_nobody_parent,
    "symlink-into-nobodys-directory": _squat_symlinked_dir,
}


@pytest.mark.parametrize("squat", SQUATS.values(), ids=SQUATS.keys())
def test_the_agent_refuses_a_squatted_socket_directory(base: Path, squat: object) -> None:
    sock, directory, owner = squat(base)  # type: ignore[operator]
    refused(agent_argv(base / "data", sock), directory, owner)
    assert not os.path.lexists(sock)
    assert not (base / "theirs" / "sub").exists()  # nothing made inside another user's directory


@pytest.mark.parametrize("squat", [_squat_nobody_dir, _squat_nobody_parent], ids=["directory", "parent"])
def test_the_server_refuses_a_squatted_admin_socket_directory(base: Path, squat: object) -> None:
    sock, directory, owner = squat(base)  # type: ignore[operator]
    refused(server_argv(base / "data", sock), directory, owner)
    assert not os.path.lexists(sock)


def test_restart_in_the_daemons_own_directory_replaces_the_stale_socket(base: Path) -> None:
    own = base / "agent"
    sock = own / "api.sock"
    argv = agent_argv(base / "data", sock)
    first = Daemon("agent", argv, base / "agent.log").start()
    try:
        wait_for(lambda: socket_up(sock, first), START_TIMEOUT, "agent socket")
        stale = os.lstat(sock).st_ino
    finally:
        first.kill()  # no clean-up: the socket stays behind
    assert os.lstat(sock).st_ino == stale and connect_as(0, sock) == "ECONNREFUSED"
    second = Daemon("agent", argv, base / "agent2.log").start()
    try:
        wait_for(lambda: socket_up(sock, second) and os.lstat(sock).st_ino != stale, START_TIMEOUT, "a new socket")
        assert connect_as(NOBODY, sock) == "OK"
        assert stat.S_IMODE(os.lstat(sock).st_mode) == 0o777
    finally:
        assert second.stop() == 0


def test_the_server_restarts_in_its_own_existing_directory(base: Path) -> None:
    own = base / "server"
    own.mkdir(mode=0o755)  # made by the operator (or a previous run), root's, not writable by others
    sock = own / "api.sock"
    server = TesseraServer(TD, data_dir=base / "data", admin_socket=str(sock), log=base / "server.log")
    try:
        server.start_and_wait(START_TIMEOUT)
        server.kill()
        assert os.path.lexists(sock)  # stale
        server.start_and_wait(START_TIMEOUT)
        assert stat.S_IMODE(os.lstat(sock).st_mode) == 0o600
        assert connect_as(NOBODY, sock) == "EACCES"  # the socket's own mode keeps them out of a 0755 directory
    finally:
        server.stop()
    assert not os.path.lexists(sock)


def test_the_admin_cli_sends_nothing_to_a_socket_another_user_owns(base: Path) -> None:
    fake_dir = base / "fake"
    fake = nobody_daemon("fake-admin", FAKE_ADMIN, base / "fake.log", str(fake_dir))
    try:
        wait_for(lambda: "listening" in fake.output(), 30, "the fake admin server")
        sock = fake_dir / "api.sock"
        for command in (["token", "generate", "--spiffe-id", f"spiffe://{TD}/host"], ["bundle", "show"],
                        ["healthcheck"]):  # fmt: skip
            out = run(PY, "-m", "tessera.server", *command, "--socket", str(sock))
            assert out.returncode == 1, out.stdout + out.stderr
            assert out.stderr.count("\n") == 1 and "owned by uid 65534 (nobody)" in out.stderr, out.stderr
        assert connect_as(0, sock) == "OK"  # it does listen: the CLI chose not to talk to it
        wait_for(lambda: "connection" in fake.output(), 30, "the probe's connection")
        assert fake.output().count("connection") == 1, fake.output()  # ours only: the CLI never connected
    finally:
        fake.stop()


def test_a_non_root_agent_without_socket_serves_in_its_own_runtime_directory(base: Path) -> None:
    runtime = base / "run-user"
    nobody_mkdir(runtime, 0o700)  # what logind makes for a user: $XDG_RUNTIME_DIR, theirs, 0700
    data = base / "data"
    nobody_mkdir(data, 0o700)
    launcher = f"import sys, site; site.addsitedir({VENV_SITE!r}); from tessera.agent.cli import main; sys.exit(main())"
    argv = [
        *as_user(NOBODY), SYSTEM_PYTHON, "-S", "-c", launcher, "run", "--trust-domain", TD,
        "--server-address", f"127.0.0.1:{free_port()}", "--insecure-bootstrap", "--join-token", "not-used",
        "--data-dir", str(data / "agent"),
    ]  # fmt: skip
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "XDG_RUNTIME_DIR": str(runtime)}
    agent = Daemon("agent-as-nobody", argv, base / "agent.log", env=env).start()
    sock = runtime / "tessera-agent" / "public" / "api.sock"
    try:
        wait_for(lambda: socket_up(sock, agent), START_TIMEOUT, "the agent's default socket")
        for path, mode in ((sock, 0o777), (sock.parent, 0o755), (sock.parent.parent, 0o755)):
            st = os.lstat(path)
            assert (stat.S_IMODE(st.st_mode), st.st_uid) == (mode, NOBODY), path
        assert connect_as(NOBODY, sock) == "OK"
    finally:
        assert agent.stop() == 0, agent.output()[-3000:]
    assert not os.path.lexists(sock)


# ---------------------------------------------------------------------------------- item 9: fetch --write DIR


def test_fetch_write_refuses_a_directory_another_user_made(base: Path) -> None:
    theirs = base / "out"
    nobody_mkdir(theirs)
    link = base / "out-link"
    as_nobody("import os; os.symlink(sys.argv[1], sys.argv[2])", str(theirs), str(link))
    for target, what in ((theirs, "owned by uid 65534 (nobody)"), (link, "is a symbolic link")):
        # The refusal comes before any call: no agent needs to listen at this socket.
        out = run(PY, "-m", "tessera.agent", "api", "fetch", "x509", "--write", str(target),
                  "--socket", str(base / "none.sock"))  # fmt: skip
        assert out.returncode == 1 and out.stderr.count("\n") == 1 and what in out.stderr, out.stderr
    assert os.listdir(theirs) == []


def test_fetch_write_makes_its_directory_0700_even_under_umask_000(base: Path) -> None:
    target = base / "new" / "certs"
    fetch = [PY, "-m", "tessera.agent", "api", "fetch", "x509", "--write", str(target)]
    argv = with_umask(0, [*fetch, "--socket", str(base / "none.sock"), "--timeout", "2"])
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 1 and "cannot reach the agent" in out.stderr  # no agent: the directory came first
    assert stat.S_IMODE(os.lstat(target).st_mode) == 0o700 and os.lstat(target).st_uid == 0
    assert stat.S_IMODE(os.lstat(target.parent).st_mode) == 0o755


# ------------------------------------------------------------------ data directories: keys never in another's


@pytest.mark.parametrize("daemon", ["agent", "server"])
def test_a_data_directory_another_user_made_is_refused_before_any_key_is_written(base: Path, daemon: str) -> None:
    """``nobody`` made the data directory first (a predictable path): the daemon would write its private key
    and CA state where ``nobody`` can read or replace them. It refuses in one line naming the owner."""
    data = base / "data"
    nobody_mkdir(data, 0o700)
    sock_dir = base / "sock"
    argv = agent_argv(data, sock_dir / "api.sock") if daemon == "agent" else server_argv(data, sock_dir / "api.sock")
    out = run(*argv, timeout=START_TIMEOUT)
    assert out.returncode == 1, out.stderr[-3000:]
    line = out.stderr.strip().splitlines()[-1]
    assert "data_dir" in line and str(data) in line and "uid 65534 (nobody)" in line, line
    assert as_nobody("import os; print(os.listdir(sys.argv[1]))", str(data)) == "[]"


@pytest.mark.parametrize("daemon", ["agent", "server"])
def test_a_data_directory_others_may_enter_is_closed_to_them_and_a_new_one_is_0700(base: Path, daemon: str) -> None:
    """The daemon's own data directory left open (0755) is narrowed to 0700 through its descriptor; a new one is
    0700 even under umask 000."""
    for data, umask in ((base / "old", 0o022), (base / "new" / "data", 0o000)):
        if umask:
            data.mkdir(mode=0o755)
            os.chmod(data, 0o755)
        sock = base / f"sock-{data.name}" / "api.sock"
        argv = agent_argv(data, sock) if daemon == "agent" else server_argv(data, sock)
        proc = Daemon(daemon, with_umask(umask, argv), base / f"{daemon}-{data.name}.log").start()
        try:
            wait_for(lambda proc=proc, sock=sock: socket_up(sock, proc), START_TIMEOUT, f"{daemon} socket")
            st = os.lstat(data)
            assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o700, 0)
        finally:
            proc.stop()
