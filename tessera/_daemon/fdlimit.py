"""Both daemons hold a descriptor per connection: take the file descriptor limit the hard limit allows.

The caps on connections (per caller uid on the agent; unauthenticated, in total and per source, on the
server) are sized in connections; a soft limit of 1024 (a common default outside systemd) would run out long
before them, and a daemon at its descriptor limit serves nobody, legitimate callers included.
"""

from __future__ import annotations

import contextlib
import resource

UNLIMITED_FALLBACK = 65536


def raise_fd_limit() -> int:
    """Raises the soft RLIMIT_NOFILE to the hard one (65536 when the hard one is unlimited); the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else UNLIMITED_FALLBACK
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


__all__ = ["raise_fd_limit"]
