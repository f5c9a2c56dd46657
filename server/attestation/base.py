"""The node attestor interface: one small shape so PSAT, TPM or cloud attestors can be added later.

An attestor receives the agent's payload and a channel for challenges, and either proves who the node is
(an agent SPIFFE ID plus node selectors) or raises :class:`~tessera.server.errors.NodeAttestationError`. It
never touches gRPC: the node API servicer adapts the bidirectional stream to :class:`ChallengeChannel`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from tessera.sdk.spiffeid import SpiffeId
from tessera.server.selectors import Selector


@dataclass(frozen=True, slots=True)
class AttestationResult:
    agent_id: SpiffeId
    # e.g. x509pop:subject:cn:host1: the selectors node alias entries match.
    selectors: tuple[Selector, ...] = field(default=())
    # True when the node can attest again with the same proof after its SVID expired (x509pop, not join_token).
    reattestable: bool = False


class ChallengeChannel(Protocol):
    async def challenge(self, data: bytes) -> bytes:
        """Sends ``data`` to the agent and returns its answer (raises NodeAttestationError if none comes)."""
        ...


class NodeAttestor(Protocol):
    name: str

    async def attest(self, payload: bytes, channel: ChallengeChannel) -> AttestationResult: ...
