"""The agent's error hierarchy (all rooted at tessera.sdk.errors.TesseraError)."""

from __future__ import annotations

from tessera.sdk.errors import TesseraError


class AgentError(TesseraError):
    """Root of every error the agent raises on purpose."""


class AttestationError(AgentError):
    """A caller could not be attested (its process went away or changed while we looked)."""


class CallerRefused(AttestationError):
    """The connection no longer speaks for the process that opened it: that process exec'd, moved to another
    cgroup or exited since the connection was accepted, or another process holds the connection too. Answered
    PERMISSION_DENIED with the reason."""


class NodeIdentityError(AgentError):
    """The agent has no usable identity with the server and cannot get one without an operator."""


class ServerUnavailableError(AgentError):
    """None of the configured server addresses answered."""
