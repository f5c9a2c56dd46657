"""The server's error hierarchy.

Every error the server raises on purpose derives from :class:`ServerError` (itself a
:class:`~tessera.sdk.errors.TesseraError`), so the gRPC layer can map a whole family to one status code and
a caller can catch the server's failures without catching programming errors. Keep this module a flat list
of classes: each component adds the few it needs, and the class name says which rule failed. Also in the tree,
beside the code they serve: :class:`~tessera.server.api.status.ApiError` (an answer that names its own gRPC
status), ``StartupError`` (app), ``FetchError`` (federation), ``InconsistentStateError`` (statecheck).
"""

from __future__ import annotations

from typing import Literal

from tessera.sdk.errors import TesseraError


class ServerError(TesseraError):
    """Root of every error the server raises on purpose."""


# --- certificate authority (tessera.server.ca) -------------------------------------------------------------


class CaError(ServerError):
    """The certificate authority cannot do what was asked (its state, keys or configuration are unusable)."""


class CaNotReadyError(CaError):
    """No authority is active yet (or the active one has expired), so nothing can be signed right now."""


class KeyManagerError(CaError):
    """A CA private key could not be generated, stored, loaded or deleted."""


class CaJournalError(CaError):
    """The CA journal (which authorities exist and in which slot) is unreadable or inconsistent."""


class UpstreamAuthorityError(CaError):
    """The configured upstream authority (certificate, key, bundle files) is unusable."""


class UnknownAuthorityError(CaError):
    """No authority with that authority ID is held (``ca show`` lists them)."""


class AuthorityStateError(CaError):
    """The authority is in a state that does not allow the operation (the message says what to do first)."""


class BadCsrError(ServerError, ValueError):
    """A certificate signing request is malformed, is not DER PKCS#10, or its signature does not verify."""


class WeakKeyError(BadCsrError):
    """A public key offered for signing is of a refused type or too weak (RSA < 2048, EC other than P-256/384)."""


class BadSigningRequestError(ServerError, ValueError):
    """A signing request names an invalid SPIFFE ID, TTL, DNS name or audience."""


# --- node attestation (tessera.server.attestation) ------------------------------------------------------------

Refusal = Literal["invalid_argument", "permission_denied", "unavailable"]


class NodeAttestationError(ServerError):
    """A node's attestation is refused. ``kind`` says which gRPC status the transport maps it to: a malformed
    request is the caller's mistake (InvalidArgument); a refused proof is PermissionDenied. (Named apart from
    the agent's error for a workload it cannot attest: the two are unrelated.)"""

    def __init__(self, message: str, kind: Refusal = "permission_denied") -> None:
        super().__init__(message)
        self.kind: Refusal = kind


# --- selectors and registration entries (tessera.server.selectors, tessera.server.entries) -----------------


class SelectorError(ServerError, ValueError):
    """A selector is not of the form ``type:value`` with a non-empty type and value, or breaks a bound."""


class EntryValidationError(ServerError, ValueError):
    """A registration entry breaks a rule; ``field`` names the offending field (as in the admin API)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


# --- datastore (tessera.server.datastore) ------------------------------------------------------------------


class DatastoreError(ServerError):
    """The datastore cannot be used: not writable, locked, corrupt, of a newer schema, or a driver failure."""


class NotFound(DatastoreError):
    """The record asked for does not exist (or a join token was already used)."""


class AlreadyExists(DatastoreError):
    """A record with the same identity exists (same entry spiffe_id/parent_id/selectors, same token, ...)."""


class RevisionConflictError(DatastoreError):
    """A compare-and-set update lost: the record changed since the revision (or serial) the caller read."""


class InvalidPageTokenError(DatastoreError, ValueError):
    """A page token was not issued by this listing (or is damaged): start the listing again without it."""


class AgentBannedError(DatastoreError):
    """The agent is banned: it may not attest or renew until an operator evicts (deletes) the ban."""


class JoinTokenExpiredError(DatastoreError):
    """The join token existed but its lifetime had ended; it is deleted all the same."""


# --- the admin command line (tessera.server.cli) ------------------------------------------------------------


class CliError(ServerError):
    """An admin command failed; the message is the one line the operator reads (exit status 1)."""
