"""``tessera-agent`` and ``python -m tessera.agent``: the agent's entry point.

It checks that the 'agent' extra is installed before importing the CLI, whose imports need it: without it the
operator reads one line naming the extra to install (``tessera._daemon.extras``), not a traceback.
"""

from __future__ import annotations

import sys

from tessera._daemon.extras import require_extra


def main() -> int:
    require_extra("tessera-agent", "agent")
    from tessera.agent.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
