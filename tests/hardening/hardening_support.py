"""Where a hardening test's daemons live: one short root holding the server, its agents, their logs and the
trust bundle the agents bootstrap from (``root / "bundle.pem"``). The daemons are tests/support's."""

from __future__ import annotations

from pathlib import Path

from support.inproc import TD
from support.procs import TesseraAgent, TesseraServer


def server_proc(
    root: Path,
    *extra: str,
    env: dict[str, str] | None = None,
    port: int | None = None,
    admin_socket: str | None = None,
    log: Path | None = None,
) -> TesseraServer:
    """``tessera-server run`` for TD with its data, admin socket and log under ``root`` (``port``: the previous
    instance's, for a restart; ``admin_socket`` and ``log``: elsewhere than under ``root``)."""
    return TesseraServer(
        TD, data_dir=root / "server", admin_socket=admin_socket or str(root / "admin" / "api.sock"),
        log=log or root / "server.log", extra=extra, port=port, env=env,
    )  # fmt: skip


def agent_proc(
    root: Path, server: TesseraServer, name: str, *extra: str, env: dict[str, str] | None = None
) -> TesseraAgent:
    """``tessera-agent run`` called ``name`` against ``server``, its files under ``root`` (prefixed by name)."""
    return TesseraAgent(
        TD, servers=server.address, data_dir=root / f"{name}-data", socket=str(root / f"{name}-public" / "api.sock"),
        log=root / f"{name}.log", trust_bundle=root / "bundle.pem", extra=extra, name=name, env=env,
    )  # fmt: skip
