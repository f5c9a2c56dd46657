"""Who is calling the node API: the agent proven by the TLS client certificate, checked against the store.

The TLS layer has already verified the certificate chain against the current trust bundle. What it cannot
know is whether the server still vouches for that agent: the decision here refuses an agent that was never
attested or was evicted, a banned agent, and an agent presenting any SVID other than the one the server
issued to it last (an older, still-valid certificate of a re-attested or renewed agent is not enough).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from cryptography import x509

from tessera.sdk.errors import SvidError
from tessera.sdk.spiffeid import SpiffeId, TrustDomain
from tessera.sdk.svid import spiffe_id_from_certificate
from tessera.server.api.status import denied
from tessera.server.api.tls_front import PeerInfo
from tessera.server.datastore.base import AttestedAgent, Datastore
from tessera.server.errors import NotFound


class PeerLookup(Protocol):
    def lookup(self, peer: str) -> PeerInfo | None: ...


@dataclass(frozen=True, slots=True)
class AuthorizedAgent:
    spiffe_id: SpiffeId
    agent: AttestedAgent
    leaf: x509.Certificate


def serial_hex(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def authorize_agent(
    leaf: x509.Certificate | None, datastore: Datastore, trust_domain: TrustDomain, now: float
) -> AuthorizedAgent:
    """Raises ApiError(PERMISSION_DENIED) unless ``leaf`` is the current SVID of an attested, unbanned agent."""
    if leaf is None:
        raise denied("this call needs the agent's SVID as TLS client certificate (attest first)")
    try:
        agent_id = spiffe_id_from_certificate(leaf)
    except (SvidError, ValueError) as exc:
        raise denied(f"client certificate is not an agent SVID: {exc}") from None
    if not agent_id.member_of(trust_domain):
        raise denied(f"{agent_id} is not in trust domain {trust_domain}")
    if leaf.not_valid_after_utc.timestamp() <= now:
        raise denied(f"the SVID of {agent_id} has expired; attest again")
    try:
        agent = datastore.get_agent(str(agent_id))
    except NotFound:
        raise denied(f"{agent_id} is not an attested agent (never attested, or evicted)") from None
    if agent.banned:
        raise denied(f"agent {agent_id} is banned")
    if agent.serial != serial_hex(leaf):
        raise denied(
            f"agent {agent_id} presented an SVID that is no longer current; use the latest one or attest again"
        )
    return AuthorizedAgent(spiffe_id=agent_id, agent=agent, leaf=leaf)
