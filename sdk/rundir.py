"""Where Tessera's sockets live by default: a directory another local user cannot have made first.

* A fixed name under ``/tmp`` (the old default) can be created by any local user before the daemon's first
  start; they then own the directory the daemon would serve from (issue 12). The daemons now refuse such a
  directory, so the defaults must never point there.
* As root the sockets go under ``/run`` (root-owned; systemd's ``RuntimeDirectory=`` makes the same paths for a
  dedicated user). Any other user gets their own runtime directory: ``$XDG_RUNTIME_DIR`` (made by the login
  manager, 0700, theirs) when set, else a directory under their home.
* Pure: the caller's euid, environment and home can be handed in, so every branch is tested without
  switching users.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Mapping

SYSTEM_RUN_DIR = "/run"
XDG_RUNTIME_DIR_ENV = "XDG_RUNTIME_DIR"
HOME_RUN_DIR = ".tessera/run"
"""Under the user's home when ``$XDG_RUNTIME_DIR`` is not set (short: Unix socket paths stop at 107 bytes)."""


def runtime_path(
    system: str,
    home: str,
    *,
    euid: int | None = None,
    environ: Mapping[str, str] | None = None,
    home_dir: str | None = None,
) -> str:
    """``/run/<system>`` as root, else ``$XDG_RUNTIME_DIR/<system>``, else ``~/.tessera/run/<home>``.

    ``system`` and ``home`` are relative paths (``tessera-agent/public/api.sock``, ``agent/api.sock``).
    A relative ``$XDG_RUNTIME_DIR`` is ignored, as the XDG specification asks.
    """
    euid = os.geteuid() if euid is None else euid
    if euid == 0:
        return f"{SYSTEM_RUN_DIR}/{system}"
    env = os.environ if environ is None else environ
    runtime = env.get(XDG_RUNTIME_DIR_ENV, "")
    if runtime.startswith("/"):
        return f"{runtime.rstrip('/')}/{system}"
    if home_dir is None:
        home_dir = pwd.getpwuid(euid).pw_dir  # the account's home, not $HOME (which sudo may carry over)
    return f"{home_dir.rstrip('/')}/{HOME_RUN_DIR}/{home}"


def describe_runtime_path(system: str, home: str) -> str:
    """The rule of :func:`runtime_path` in words, for help texts and the generated README tables."""
    return f"{SYSTEM_RUN_DIR}/{system} as root, else ${XDG_RUNTIME_DIR_ENV}/{system}, else ~/{HOME_RUN_DIR}/{home}"
