"""`python -m tessera.server ...` is `tessera-server ...`."""

import sys

from tessera.server.cli import main

sys.exit(main())
