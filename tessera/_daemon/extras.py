"""A daemon started without its extra says, in one line, which extra to install.

- ``pip install tessera`` brings what a workload needs (grpcio, protobuf, cryptography, PyJWT) and nothing more.
  The daemons need more (gRPC health and reflection, Prometheus; the server also PostgreSQL and PKCS#11), which
  the ``agent`` and ``server`` extras bring (``tessera[all]`` both).
- Without it a daemon would die on its first import with a traceback about a module the operator never named.
  So each daemon's entry point (its ``__main__``) goes through :func:`run_cli`, which checks before importing the
  daemon's CLI: this module needs only the standard library, and asks the import system whether the modules
  exist without importing them.
- The whole extra is required, not only what this start's settings would load, so a daemon that starts once
  also starts after a config change to PostgreSQL or an HSM. :data:`EXTRA_MODULES` mirrors pyproject.toml's
  extras; a test keeps the two equal, and another that each daemon imports nothing outside its extra.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Iterable, Sequence
from importlib.machinery import ModuleSpec

_DAEMON = ("grpc_health", "grpc_reflection", "prometheus_client")
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "agent": _DAEMON,
    "server": (*_DAEMON, "psycopg", "psycopg_pool", "pkcs11"),
}
"""Extra -> the top-level modules its distributions install (pyproject.toml, ``[project.optional-dependencies]``)."""

Finder = Callable[[str], ModuleSpec | None]


def missing_modules(modules: Iterable[str], find_spec: Finder = importlib.util.find_spec) -> list[str]:
    """The top-level ``modules`` the import system cannot find, in the order given."""
    return [name for name in modules if find_spec(name) is None]


def missing_extra_line(program: str, extra: str, find_spec: Finder = importlib.util.find_spec) -> str | None:
    """The one line that tells the operator to install ``tessera[extra]``, or None when it is installed."""
    missing = missing_modules(EXTRA_MODULES[extra], find_spec)
    if not missing:
        return None
    return (
        f"{program}: error: the {extra} needs the '{extra}' extra (missing {', '.join(missing)}): "
        f"pip install 'tessera[{extra}]'"
    )


def require_extra(program: str, extra: str) -> None:
    """Exits with status 1 and :func:`missing_extra_line` on stderr when the extra is not installed."""
    line = missing_extra_line(program, extra)
    if line is not None:
        raise SystemExit(line)


def run_cli(program: str, extra: str, cli_module: str, argv: Sequence[str] | None = None) -> int:
    """Runs ``cli_module.main(argv)`` once :func:`require_extra` has passed; the module is named, not imported
    here, because importing it is what needs the extra."""
    require_extra(program, extra)
    main: Callable[[Sequence[str] | None], int] = importlib.import_module(cli_module).main
    return main(argv)
