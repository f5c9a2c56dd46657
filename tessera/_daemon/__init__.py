"""Plumbing both daemons need and workloads never do.

``tessera.server`` and ``tessera.agent`` may not import each other, and what they share as daemons (claiming a
Unix socket safely, bounded logging under a flood, ...) does not belong in the public SDK a workload installs.
This package may import ``tessera.sdk``; it imports nothing of the server or the agent.
"""
