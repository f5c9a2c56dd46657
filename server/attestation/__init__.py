"""Node attestors: how an agent proves which node it runs on (join_token, x509pop; more can plug in)."""

from tessera.server.attestation.base import AttestationResult, ChallengeChannel, NodeAttestor
from tessera.server.errors import NodeAttestationError

__all__ = ["AttestationResult", "ChallengeChannel", "NodeAttestationError", "NodeAttestor"]
