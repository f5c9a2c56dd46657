"""The node attestor interface: one small shape so PSAT, TPM or cloud attestors can be added later.

An attestor receives the agent's payload and a channel for challenges, and either proves who the node is
(an agent SPIFFE ID plus node selectors) or raises :class:`AttestationError`. It never touches gRPC: the
node API servicer adapts the bidirectional stream to :class:`ChallengeChannel`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

from tessera.sdk.spiffeid import SpiffeId
from tessera.server.errors import ServerError
from tessera.server.selectors import Selector

Refusal = Literal["invalid_argument", "permission_denied", "unavailable"]


class AttestationError(ServerError):
    """Attestation refused. ``kind`` says which gRPC status the transport maps it to: a malformed request
    is the caller's mistake (InvalidArgument); a refused proof is PermissionDenied."""

    def __init__(self, message: str, kind: Refusal = "permission_denied") -> None:
        super().__init__(message)
        self.kind: Refusal = kind


@dataclass(frozen=True, slots=True)
class AttestationResult:
    agent_id: SpiffeId
    # e.g. x509pop:subject:cn:host1: the selectors node alias entries match.
    selectors: tuple[Selector, ...] = field(default=())
    # True when the node can attest again with the same proof after its SVID expired (x509pop, not join_token).
    reattestable: bool = False


class ChallengeChannel(Protocol):
    async def challenge(self, data: bytes) -> bytes:
        """Sends ``data`` to the agent and returns its answer (raises AttestationError if none comes)."""
        ...


class NodeAttestor(Protocol):
    name: str

    async def attest(self, payload: bytes, channel: ChallengeChannel) -> AttestationResult: ...
