"""Node attestors: how an agent proves which node it runs on (join_token, x509pop; more can plug in)."""

from tessera.server.attestation.base import AttestationError, AttestationResult, ChallengeChannel, NodeAttestor

__all__ = ["AttestationError", "AttestationResult", "ChallengeChannel", "NodeAttestor"]
