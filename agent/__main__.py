import sys

from tessera.agent.cli import main

sys.exit(main())
