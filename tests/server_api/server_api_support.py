"""Shared pieces of the server API tests: a real server in a thread, an agent-side client, certificates (the
reusable parts live in tests/support and are re-exported here)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from support.inproc import TD as TD
from support.inproc import AdminClient as AdminClient
from support.inproc import RunningServer as RunningServer
from support.inproc import cleanup as cleanup
from support.inproc import free_socket_dir as free_socket_dir
from support.inproc import make_config as make_config
from support.nodeapi import Agent as Agent
from support.nodeapi import HostPki as HostPki
from support.nodeapi import code_of as code_of
from support.nodeapi import csr_der as csr_der
from support.nodeapi import ec_key as ec_key
from support.nodeapi import pem_certs as pem_certs
from support.nodeapi import pem_key as pem_key
from support.nodeapi import sign_challenge as sign_challenge
from support.nodeapi import trust_bundle as trust_bundle


@contextmanager
def running_server(data_dir: Path, **overrides: Any) -> Iterator[RunningServer]:
    """A RunningServer (make_config(data_dir, ...)) with its admin socket in a fresh short directory; stopped and
    cleaned up on exit."""
    sock_dir = free_socket_dir()
    try:
        server = RunningServer(make_config(data_dir, sock_dir / "api.sock", **overrides))
        try:
            yield server
        finally:
            server.stop()
    finally:
        cleanup(sock_dir)


def port_is_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0
