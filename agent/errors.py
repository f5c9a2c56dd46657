"""The agent's error hierarchy, all of it in this one file (rooted at tessera.sdk.errors.TesseraError).

A caller catches the agent's failures with one ``except AgentError`` (or every Tessera failure with
``TesseraError``) without catching programming errors. The Workload API answers each refusal through one table
(:mod:`tessera.agent.endpoint.status`): the class says which status code, the message is what the workload reads.
"""

from __future__ import annotations

from collections.abc import Hashable

from tessera.sdk.errors import TesseraError


class AgentError(TesseraError):
    """Root of every error the agent raises on purpose."""


# --- the agent's own state ----------------------------------------------------------------------------------


class NodeIdentityError(AgentError):
    """The agent has no usable identity with the server and cannot get one without an operator."""


class ServerUnavailableError(AgentError):
    """None of the configured server addresses answered."""


class BundleDocumentError(AgentError):
    """A SPIFFE bundle document from the server could not be used."""


class CliError(AgentError):
    """What ``tessera-agent`` prints as its one line on stderr before exiting 1."""


# --- Workload API callers (SPIFFE.md section 2 says which status each one gets) -------------------------------


class WorkloadAttestationError(AgentError):
    """A caller could not be attested (its process went away or changed while we looked): UNAVAILABLE, retry.

    Not the server's node attestation: that one proves a host to the server, this one a local process to the agent.
    """


class CallerRefused(WorkloadAttestationError):
    """The connection no longer speaks for the process that opened it: that process exec'd, moved to another
    cgroup or exited since the connection was accepted, or another process holds the connection too. Answered
    PERMISSION_DENIED with the reason."""


class InvalidRequestError(AgentError):
    """The caller's mistake (no security header, no audience, a malformed SPIFFE ID): INVALID_ARGUMENT, which
    standard clients never retry, so it is never used for anything that could pass on a second try."""


class NoIdentityError(AgentError):
    """No registration entry gives this caller an identity (or the one it asked for): PERMISSION_DENIED; clients
    retry with backoff, since an entry may be created for it."""


class NotReadyError(AgentError):
    """The agent cannot answer right now but may soon (shutting down, not synced yet, an SVID not signed yet, a
    caller not identified yet, the server not reachable to mint a JWT-SVID): UNAVAILABLE, retry."""


class StreamLimitExceeded(AgentError):
    """A caller (a uid) already holds as many streams or connections as it may (agent/limits.py):
    RESOURCE_EXHAUSTED for a stream, an immediate close for a connection."""

    def __init__(self, key: Hashable, limit: int, what: str = "open Workload API streams") -> None:
        super().__init__(f"caller {key} already holds {limit} {what} (the per-caller limit)")
        self.key = key
        self.limit = limit
