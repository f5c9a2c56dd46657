"""``tessera-server`` and ``python -m tessera.server``: the CLI, once the 'server' extra is known to be installed.

The check (``tessera._daemon.extras``) comes before importing the CLI, whose imports need the extra: without it
the operator reads one line naming the extra to install, not a traceback.
"""

import sys
from functools import partial

from tessera._daemon.extras import run_cli

main = partial(run_cli, "tessera-server", "server", "tessera.server.cli")
"""The ``tessera-server`` console script."""

if __name__ == "__main__":
    sys.exit(main())
