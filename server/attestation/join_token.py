"""join_token: a one-time secret an operator generated for one node (`tessera-server token generate`).

The datastore keeps only the token's SHA-256 and deletes it in the same transaction that checks it, so of
two agents racing with one token exactly one wins. The agent ID is derived from the token's *public* id,
never from the secret, so neither IDs nor selectors (which are logged and listed) reveal a usable token.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from tessera.sdk.errors import SpiffeIdError
from tessera.sdk.spiffeid import SpiffeId, TrustDomain
from tessera.server.attestation.base import AttestationResult, ChallengeChannel
from tessera.server.datastore.base import Datastore
from tessera.server.errors import JoinTokenExpiredError, NodeAttestationError, NotFound
from tessera.server.selectors import Selector

NAME = "join_token"
MAX_TOKEN_BYTES = 256


def default_agent_id(trust_domain: TrustDomain, token_id: str) -> SpiffeId:
    return trust_domain.spiffe_id("tessera", "agent", NAME, token_id)


class JoinTokenAttestor:
    name = NAME

    def __init__(self, datastore: Datastore, trust_domain: TrustDomain, clock: Callable[[], float] = time.time):
        self._ds = datastore
        self._td = trust_domain
        self._clock = clock

    async def attest(self, payload: bytes, channel: ChallengeChannel) -> AttestationResult:
        if not payload:
            raise NodeAttestationError("join_token: the payload must hold the join token", "invalid_argument")
        if len(payload) > MAX_TOKEN_BYTES:
            raise NodeAttestationError("join_token: the token is too long to be a join token", "invalid_argument")
        try:
            token = payload.decode("utf-8")
        except UnicodeDecodeError:
            raise NodeAttestationError("join_token: the token is not UTF-8 text", "invalid_argument") from None
        try:
            record = await asyncio.to_thread(self._ds.consume_join_token, token, now=int(self._clock()))
        except NotFound:
            raise NodeAttestationError("join_token: the token is unknown or was already used") from None
        except JoinTokenExpiredError:
            raise NodeAttestationError("join_token: the token has expired; generate a new one") from None
        if record.spiffe_id:
            try:
                agent_id = SpiffeId.parse(record.spiffe_id)
            except SpiffeIdError as exc:
                raise NodeAttestationError(f"join_token: the token's agent ID is invalid: {exc}") from None
        else:
            agent_id = default_agent_id(self._td, record.id)
        return AttestationResult(agent_id=agent_id, selectors=(Selector(NAME, f"id:{record.id}"),), reattestable=False)
