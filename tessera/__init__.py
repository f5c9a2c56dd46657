"""Tessera: SPIFFE workload identity in Python.

The distribution's subpackages are ``tessera.sdk`` (what workloads import), ``tessera.server`` (the CA and
registration service) and ``tessera.agent`` (the per-host daemon serving the SPIFFE Workload API).
In the source tree those live in the top-level folders ``sdk/``, ``server/`` and ``agent/``; the
symlinks beside this file let tools run from a checkout see the installed shape.
"""

__version__ = "0.1.0"
