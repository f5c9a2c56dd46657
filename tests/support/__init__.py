"""Harness code shared by every test folder (``from support.procs import ...``; pyproject puts ``tests`` on
sys.path). Test folders keep only what is particular to them."""
