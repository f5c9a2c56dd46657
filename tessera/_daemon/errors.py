"""Errors of the plumbing both daemons share (rooted at tessera.sdk.errors.TesseraError).

The server and the agent turn these into their own one-line start-up failure; the message is already the line
the operator reads, so it names the path and what to do about it.
"""

from __future__ import annotations

from tessera.sdk.errors import TesseraError


class DaemonError(TesseraError):
    """Root of every error ``tessera._daemon`` raises on purpose."""


class SocketClaimError(DaemonError):
    """A Unix socket path cannot be served safely: its directory (or a parent) is another user's or writable by
    others, something else lives at the path, or another process already listens on it."""
