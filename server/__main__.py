"""``tessera-server`` and ``python -m tessera.server``: the server's entry point.

It checks that the 'server' extra is installed before importing the CLI, whose imports need it: without it the
operator reads one line naming the extra to install (``tessera._daemon.extras``), not a traceback.
"""

from __future__ import annotations

import sys

from tessera._daemon.extras import require_extra


def main() -> int:
    require_extra("tessera-server", "server")
    from tessera.server.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
