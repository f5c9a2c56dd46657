"""Children of the trust-boundary attack suites (tests/hardening/test_trust_*.py): a script run as another uid
with the system python (the venv's site-packages added, as support.procs.run_as does) whose stdin stays open for
the test to drive and whose stdout carries JSON lines, read with bounded waits."""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from typing import Any

from support.procs import SYSTEM_PYTHON, VENV_SITE, as_user

# One line of JSON per event: ``say(key=value, ...)``; prepended to every script spawned here.
PRELUDE = f"""import sys, site, json
site.addsitedir({VENV_SITE!r})
def say(**kw):
    sys.stdout.write(json.dumps(kw) + "\\n")
    sys.stdout.flush()
"""


def spawn(uid: int, script: str, *args: str, python: str = SYSTEM_PYTHON) -> subprocess.Popen[bytes]:
    """``script`` under ``uid`` (set by setpriv before the interpreter starts), stdin and stdout piped."""
    return subprocess.Popen(
        [*as_user(uid), python, "-S", "-c", PRELUDE + script, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd="/tmp",
    )


class Lines:
    """JSON lines from a child's stdout (select on the raw pipe with a deadline, our own buffer)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.fd = proc.stdout.fileno()
        self.buffer = b""
        self.events: list[dict[str, Any]] = []

    def until(self, key: str, timeout: float = 45.0) -> dict[str, Any]:
        """The first event from now on that has ``key`` (events before it are kept in ``events``)."""
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\n", 1)
                event = json.loads(line)
                assert "error" not in event, event
                self.events.append(event)
                if key in event:
                    return event
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self.fd], [], [], max(0.0, remaining))
            if not ready:
                raise AssertionError(f"no {key!r} from the child within {timeout:g}s; got {self.events}")
            chunk = os.read(self.fd, 65536)
            if not chunk:
                raise AssertionError(f"the child ended before {key!r}; got {self.events}")
            self.buffer += chunk


def send(proc: subprocess.Popen[bytes], line: str = "go") -> None:
    assert proc.stdin is not None
    proc.stdin.write(line.encode() + b"\n")
    proc.stdin.flush()


def finish(*procs: subprocess.Popen[bytes]) -> None:
    """Closes their stdin (what they wait on) and reaps them; SIGKILL after a bounded wait."""
    for proc in procs:
        if proc.stdin is not None and not proc.stdin.closed:
            proc.stdin.close()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for proc in procs:
        if proc.stdout is not None:
            proc.stdout.close()


# A Workload API fetch from the child itself: say(fetch=<code>, ids=[...], details=...).
FETCH = """
def fetch(socket_path):
    import grpc
    from tessera.proto import workload_pb2
    from tessera.sdk.workloadapi.wire import SECURITY_METADATA, WorkloadApiStub
    with grpc.insecure_channel("unix:" + socket_path) as channel:
        stub = WorkloadApiStub(channel)
        try:
            request = workload_pb2.X509SVIDRequest()
            resp = next(iter(stub.FetchX509SVID(request, metadata=SECURITY_METADATA, timeout=20)))
            say(fetch="OK", ids=sorted(s.spiffe_id for s in resp.svids))
        except grpc.RpcError as e:
            say(fetch=e.code().name, ids=[], details=e.details() or "")
"""
