"""Conversions between datastore records and API messages (node and admin protos share ``Entry``)."""

from __future__ import annotations

from collections.abc import Iterable

from tessera.proto import admin_pb2 as apb
from tessera.proto import node_pb2 as npb
from tessera.server.datastore.base import AttestedAgent, RegistrationEntry
from tessera.server.selectors import Selector


def selectors_to_proto(selectors: Iterable[Selector]) -> list[npb.Selector]:
    return [npb.Selector(type=s.type, value=s.value) for s in selectors]


def selectors_from_proto(selectors: Iterable[npb.Selector]) -> tuple[Selector, ...]:
    """Raises SelectorError (a ValueError) for an empty type or value, or a ':' in the type."""
    return tuple(Selector(s.type, s.value) for s in selectors)


def entry_to_proto(entry: RegistrationEntry) -> npb.Entry:
    return npb.Entry(
        id=entry.id,
        spiffe_id=entry.spiffe_id,
        parent_id=entry.parent_id,
        selectors=selectors_to_proto(entry.selectors),
        x509_svid_ttl=entry.x509_svid_ttl,
        jwt_svid_ttl=entry.jwt_svid_ttl,
        dns_names=list(entry.dns_names),
        hint=entry.hint,
        admin=entry.admin,
        downstream=entry.downstream,
        federates_with=list(entry.federates_with),
        expires_at=entry.expires_at or 0,
        revision=entry.revision,
        created_at=entry.created_at,
        node=entry.node,
    )


def entry_from_proto(message: npb.Entry) -> RegistrationEntry:
    """The admin's entry as a record (not yet validated; id, revision and created_at are the server's)."""
    return RegistrationEntry(
        id=message.id,
        spiffe_id=message.spiffe_id,
        parent_id=message.parent_id,
        selectors=selectors_from_proto(message.selectors),
        x509_svid_ttl=message.x509_svid_ttl,
        jwt_svid_ttl=message.jwt_svid_ttl,
        dns_names=tuple(message.dns_names),
        hint=message.hint,
        admin=message.admin,
        downstream=message.downstream,
        node=message.node,
        federates_with=tuple(message.federates_with),
        expires_at=message.expires_at or None,
    )


def agent_to_proto(agent: AttestedAgent) -> apb.Agent:
    return apb.Agent(
        spiffe_id=agent.spiffe_id,
        attestor=agent.attestor,
        node_selectors=selectors_to_proto(agent.selectors),
        serial=agent.serial,
        expires_at=agent.expires_at,
        banned=agent.banned,
        created_at=agent.created_at,
        updated_at=agent.updated_at,
        reattestable=agent.reattestable,
    )
