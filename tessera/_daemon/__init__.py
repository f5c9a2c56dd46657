"""Plumbing both daemons need and workloads never do.

``tessera.server`` and ``tessera.agent`` may not import each other, and what they share as daemons (claiming a
Unix socket safely, the gated accept loop, bounded logging under a flood, the ``/metrics`` listener, the
one-line refusal when a daemon's extra is not installed) does not belong in the public SDK a workload installs.
This package may import ``tessera.sdk``; it imports nothing of the server or the agent, and the SDK imports
nothing of it.

What both daemons use but stays in ``tessera.sdk``, and why:

- ``config``, ``logs``, ``files``, ``rundir``: ``tessera-helper`` (spiffe-helper's role, ``sdk/helper``) is a
  workload-side program shipped with the light install and reads a TOML file, logs, writes key files and finds
  the agent's socket with them. The SDK may not import this package, so they live in the SDK and the daemons
  take them from there. They need nothing beyond the standard library, and ``import tessera.sdk`` loads none.
- ``tessera.sdk.grpc.rewrap_handler``: the SDK's own authorizing interceptor is built on it; the daemons'
  interceptors (limits, metrics) reuse it rather than copying grpc's four handler constructors again.
"""
